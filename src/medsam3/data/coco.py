"""The COCO instance layout: annotation JSON files (``images``, ``annotations``, ``categories``) + images.

One record per image listed in a JSON file. Category names become concepts (through the vocabulary, or the
``concepts`` option: ``{"<category name or id>": "<concept>", "*": "<concept for all>"}``). Each
annotation is one instance; its ``segmentation`` is a polygon list or an RLE (compressed string or counts
list). Masks are rasterised with ``pycocotools`` when it is installed, otherwise with this module's own RLE
decoder and scanline polygon filler (pixel-centre rule; a few boundary pixels can differ from pycocotools).

Label values in the rasterised map are category ids; overlapping instances are painted in annotation
order (the later one wins), instance ids are ``1..N`` in annotation order.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from medsam3.data.discovery import Candidate, Discovery
from medsam3.data.labels import LabelArrays, file_suffix
from medsam3.data.manifest import Record
from medsam3.errors import InputError

try:  # optional: exact COCO rasterisation
    from pycocotools import mask as _coco_mask
except ImportError:  # pragma: no cover - depends on the environment
    _coco_mask = None


@functools.lru_cache(maxsize=8)
def _load(path: str, mtime: float) -> tuple[dict, dict[int, dict], dict[int, list[dict]]]:
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(path, f"cannot read the COCO JSON ({exc})") from None
    if not isinstance(doc, Mapping) or not {"images", "annotations", "categories"} <= set(doc):
        raise InputError(path, "not a COCO instance file (needs 'images', 'annotations', 'categories')")
    categories = {int(c["id"]): c for c in doc["categories"]}
    images = {int(im["id"]): im for im in doc["images"]}
    by_image: dict[int, list[dict]] = {i: [] for i in images}
    for ann in doc["annotations"]:
        cid, iid = int(ann.get("category_id", -1)), int(ann.get("image_id", -1))
        if cid not in categories:
            raise InputError(
                path, f"annotation {ann.get('id')} has category_id {cid}, not listed in 'categories'"
            )
        if iid not in images:
            raise InputError(
                path, f"annotation {ann.get('id')} refers to image_id {iid}, not listed in 'images'"
            )
        by_image[iid].append(ann)
    return categories, images, by_image


def load_coco(path: str | Path) -> tuple[dict, dict[int, dict], dict[int, list[dict]]]:
    """(categories by id, images by id, annotations by image id) of a COCO JSON file (cached)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "COCO annotation file not found")
    return _load(str(path.resolve()), path.stat().st_mtime)


# -- RLE and polygons ----------------------------------------------------------------------------------
def rle_counts_from_string(s: str) -> list[int]:
    """Decode COCO's compressed RLE string (6-bit chunks from ``'0'``, delta-coded after the 2nd run)."""
    counts: list[int] = []
    p = 0
    data = s.encode("ascii")
    while p < len(data):
        x, k, more = 0, 0, True
        while more:
            c = data[p] - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def rle_decode(counts: list[int], height: int, width: int) -> np.ndarray:
    """Runs (zeros first, column-major as COCO stores them) -> ``(height, width)`` uint8 mask."""
    flat = np.zeros(height * width, np.uint8)
    pos, value = 0, 0
    for run in counts:
        if value:
            flat[pos : pos + run] = 1
        pos += run
        value ^= 1
    if pos != height * width:
        raise ValueError(f"RLE covers {pos} pixels, the image has {height * width}")
    return flat.reshape(width, height).T


def polygons_to_mask(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    """Fill COCO polygons (``[x1, y1, x2, y2, ...]``) into a ``(height, width)`` uint8 mask.

    COCO coordinates put pixel ``i`` on ``[i, i + 1)``; a pixel is inside when its centre ``(i + 0.5,
    j + 0.5)`` is inside the polygon (even-odd rule, scanline per row). Several polygons are united.
    """
    mask = np.zeros((height, width), np.uint8)
    for poly in polygons:
        if len(poly) < 6:
            continue
        xs = np.asarray(poly[0::2], dtype=np.float64)[: len(poly) // 2]
        ys = np.asarray(poly[1::2], dtype=np.float64)[: len(xs)]
        x1, y1 = np.roll(xs, -1), np.roll(ys, -1)
        top = max(0, int(np.floor(ys.min() - 0.5)))
        bottom = min(height - 1, int(np.ceil(ys.max())))
        for row in range(top, bottom + 1):
            yc = row + 0.5
            cross = ((ys <= yc) & (y1 > yc)) | ((y1 <= yc) & (ys > yc))
            if not cross.any():
                continue
            xi = np.sort(xs[cross] + (yc - ys[cross]) * (x1[cross] - xs[cross]) / (y1[cross] - ys[cross]))
            for a, b in zip(xi[0::2], xi[1::2], strict=True):
                c0, c1 = max(0, int(np.ceil(a - 0.5))), min(width, int(np.ceil(b - 0.5)))
                if c1 > c0:
                    mask[row, c0:c1] = 1
    return mask


def annotation_mask(segmentation: Any, height: int, width: int, use_pycocotools: bool = True) -> np.ndarray:
    """One annotation's mask, ``(height, width)`` uint8 in {0, 1}."""
    if use_pycocotools and _coco_mask is not None:
        if isinstance(segmentation, list):
            rles = _coco_mask.frPyObjects(segmentation, height, width)
            rle = _coco_mask.merge(rles)
        elif isinstance(segmentation.get("counts"), list):
            rle = _coco_mask.frPyObjects(segmentation, height, width)
        else:
            rle = dict(segmentation)
            rle["counts"] = rle["counts"].encode("ascii") if isinstance(rle["counts"], str) else rle["counts"]
        return np.asarray(_coco_mask.decode(rle), np.uint8)
    if isinstance(segmentation, list):
        return polygons_to_mask(segmentation, height, width)
    counts = segmentation["counts"]
    h, w = (int(v) for v in segmentation.get("size", (height, width)))
    counts = rle_counts_from_string(counts) if isinstance(counts, str) else [int(c) for c in counts]
    return rle_decode(counts, h, w)


# -- discovery and rasterisation -----------------------------------------------------------------------
def _category_names(categories: Mapping[int, dict], concepts: Mapping[str, str], labels) -> dict[int, str]:
    names = {}
    for cid, cat in categories.items():
        name = str(cat.get("name", cid))
        names[cid] = concepts.get(name, concepts.get(str(cid), concepts.get("*", name)))
    if labels:
        names.update({int(k): v for k, v in labels.items()})
    return {k: v for k, v in names.items() if k != 0}


def _image_dirs(root: Path, json_path: Path, option: str | None) -> list[Path]:
    if option:
        return [json_path.parent / option, root / option]
    return [
        json_path.parent,
        json_path.parent.parent / "images",
        json_path.parent / "images",
        root / "images",
        root,
    ]


def discover_coco(root: Path, options: Mapping, labels, modality) -> Discovery:
    patterns = [options["annotations"]] if options.get("annotations") else ["annotations/*.json", "*.json"]
    files: list[Path] = []
    for pattern in patterns:
        # an absolute pattern (a file given by its full path) is looked up where it says, not under the root
        base, rest = (
            (Path(pattern).parent, Path(pattern).name) if Path(pattern).is_absolute() else (root, pattern)
        )
        files = sorted(p for p in base.glob(rest) if p.is_file())
        if files:
            break
    if not files:
        raise InputError(root, f"no COCO annotation JSON found (looked for {', '.join(patterns)})")
    concepts = {str(k): str(v) for k, v in (options.get("concepts") or {}).items()}
    mod = modality or options.get("modality") or "OTHER"
    found = Discovery("coco", [])
    for json_path in files:
        categories, images, by_image = load_coco(json_path)
        names = _category_names(categories, concepts, labels)
        dirs = _image_dirs(root, json_path, options.get("image_dir"))
        prefix = f"{json_path.stem}/" if len(files) > 1 else ""
        for image_id, info in sorted(images.items()):
            file_name = str(info["file_name"])
            image = next((d / file_name for d in dirs if (d / file_name).is_file()), None)
            if image is None:
                tried = ", ".join(str(d) for d in dirs)
                raise InputError(json_path, f"image {file_name!r} (id {image_id}) not found in {tried}")
            usable = [a for a in by_image[image_id] if a.get("segmentation")]
            if len(usable) < len(by_image[image_id]):
                found.skipped.append(
                    f"{file_name}: {len(by_image[image_id]) - len(usable)} annotations without segmentation"
                )
            case = prefix + file_name[: len(file_name) - len(file_suffix(file_name))]
            source = {"image_id": image_id, "height": int(info["height"]), "width": int(info["width"])}
            found.candidates.append(
                Candidate(
                    case,
                    [image],
                    [json_path],
                    dict(names),
                    {"mode": "coco"},
                    mod,
                    instances=True,
                    source=source,
                )
            )
    return found


def rasterize_record(record: Record) -> LabelArrays:
    """Label map of a COCO record: category ids (semantic) and instance ids 1..N (annotation order)."""
    json_path = Path(record.label[0])
    _, images, by_image = load_coco(json_path)
    image_id = int(record.source["image_id"])
    if image_id not in images:
        raise InputError(json_path, f"image id {image_id} is no longer in the file")
    h, w = int(record.source["height"]), int(record.source["width"])
    semantic = np.zeros((h, w), np.int32)
    instances = np.zeros((h, w), np.int32)
    values: dict[int, int] = {}
    n = 0
    for ann in by_image[image_id]:
        if not ann.get("segmentation"):
            continue
        try:
            m = annotation_mask(ann["segmentation"], h, w).astype(bool)
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(json_path, f"annotation {ann.get('id')}: bad segmentation ({exc})") from None
        if m.shape != (h, w):
            raise InputError(json_path, f"annotation {ann.get('id')}: mask size {m.shape} is not {(h, w)}")
        n += 1
        semantic[m] = int(ann["category_id"])
        instances[m] = n
        values[n] = int(ann["category_id"])
    present = set(np.unique(instances).tolist()) - {0}
    return LabelArrays(semantic, instances, {i: v for i, v in values.items() if i in present})
