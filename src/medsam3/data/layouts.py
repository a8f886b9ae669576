"""Readers of dataset layouts: which files form image/label pairs, and what their label values are called.

Discovery lists files and reads JSON side files only; no pixel data. Four layouts:

``nnunet``    nnU-Net raw / Medical Segmentation Decathlon folder: ``dataset.json`` + ``imagesTr/`` +
              ``labelsTr/``. Labels in the MSD form ``{"0": "background", "1": "Anterior"}`` or the nnU-Net v2
              form ``{"background": 0, "liver": 1}`` (lists are regions); channels from ``channel_names``
              (v2) or ``modality`` (MSD); cases from the MSD ``training`` list when present, else from
              ``labelsTr/*<file_ending>`` with images ``<case>_0000<file_ending>``, ``_0001``, ...
``folder2d``  image and mask files paired by name. Each pair rule has ``images`` (a glob under the root)
              and either ``mask`` (a path template relative to the image's folder, with ``{stem}``,
              ``{name}``, ``{ext}`` and glob wildcards, e.g. ``"../masks/{stem}.*"`` or
              ``"{stem}_mask*.png"``) or ``mask_regex`` (``[pattern, replacement]`` applied to the image path
              relative to the root). Several masks of one image are merged. Works for volumes too.
``npz``       CVPR BiomedSegFM ``.npz`` files (:mod:`medsam3.data.npz_layout`).
``coco``      COCO instance JSON (:mod:`medsam3.data.coco`).
"""

from __future__ import annotations

import fnmatch
import glob
import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from medsam3.data.coco import discover_coco
from medsam3.data.discovery import Candidate, Discovery
from medsam3.data.labels import READABLE, file_stem, file_suffix, parse_label_map
from medsam3.data.npz_layout import discover_npz
from medsam3.errors import InputError

LAYOUTS = ("nnunet", "folder2d", "npz", "coco")
ALIASES = {
    "msd": "nnunet",
    "nnunet": "nnunet",
    "folder": "folder2d",
    "folder2d": "folder2d",
    "npz": "npz",
    "biomedsegfm": "npz",
    "coco": "coco",
}

_MASK_DIRS = (
    "masks",
    "mask",
    "labels",
    "label",
    "gt",
    "gts",
    "ground_truth",
    "groundtruth",
    "annotations",
    "segmentations",
    "segmentation",
)
_IMAGE_DIRS = ("images", "image", "imgs", "img")
_MASK_KEYS = ("mode", "threshold", "value", "palette", "fill_holes", "ignore_values", "other_values")


def canonical_layout(name: str) -> str:
    try:
        return ALIASES[name.lower()]
    except KeyError:
        raise InputError(None, f"unknown layout {name!r}; expected one of {', '.join(LAYOUTS)}") from None


def discover(
    layout: str,
    root: str | Path,
    options: Mapping[str, Any] | None = None,
    labels: Mapping[int, str] | None = None,
    modality: str | None = None,
) -> Discovery:
    """Find the image/label pairs of the dataset folder ``root`` in ``layout``.

    ``labels`` (value -> name) overrides the names the dataset ships; ``modality`` overrides the guess.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(root, "dataset folder not found")
    layout = canonical_layout(layout)
    options = dict(options or {})
    if layout == "nnunet":
        found = discover_nnunet(root, options, labels, modality)
    elif layout == "folder2d":
        found = discover_folder2d(root, options, labels, modality)
    elif layout == "npz":
        found = discover_npz(root, options, labels, modality)
    else:
        found = discover_coco(root, options, labels, modality)
    if not found.candidates:
        reasons = "; ".join(found.skipped[:3])
        raise InputError(
            root, f"no image/label pairs found in {layout} layout" + (f" ({reasons})" if reasons else "")
        )
    ids = [c.case_id for c in found.candidates]
    label_sets = {(c.case_id, tuple(c.label)) for c in found.candidates}
    if len(label_sets) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:3]
        raise InputError(root, f"case ids {dup} are found twice with the same label file")
    return found


# -- modality ------------------------------------------------------------------------------------------
_CHANNEL_MODALITY = {
    "ct": "CT",
    "mr": "MR",
    "mri": "MR",
    "t1": "MR",
    "t1w": "MR",
    "t2": "MR",
    "t2w": "MR",
    "flair": "MR",
    "t1gd": "MR",
    "t1c": "MR",
    "t1ce": "MR",
    "adc": "MR",
    "dwi": "MR",
    "pd": "MR",
    "us": "US",
    "ultrasound": "US",
    "pet": "PT",
    "pt": "PT",
    "xr": "XR",
    "x-ray": "XR",
    "xray": "XR",
    "cxr": "XR",
    "rgb": "RGB",
    "r": "RGB",
    "g": "RGB",
    "b": "RGB",
    "red": "RGB",
    "green": "RGB",
    "blue": "RGB",
    "microscopy": "MICROSCOPY",
    "em": "MICROSCOPY",
}


def modality_from_names(names: Iterable[Any]) -> str:
    """Modality code from channel names (``{"0": "T2", "1": "ADC"}`` -> ``"MR"``); ``OTHER`` if unclear."""
    codes = {code for n in names if (code := _CHANNEL_MODALITY.get(str(n).strip().lower())) is not None}
    if len(codes) == 1:
        return codes.pop()
    return "MR" if "MR" in codes else "OTHER"


# -- nnU-Net / MSD -------------------------------------------------------------------------------------
def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(path, f"cannot read JSON ({exc})") from None


def _inside(root: Path, rel: str) -> Path:
    return (root / rel.removeprefix("./")).resolve()


def discover_nnunet(root: Path, options: Mapping, labels, modality) -> Discovery:
    ds_path = root / options.get("dataset_json", "dataset.json")
    if not ds_path.is_file():
        raise InputError(
            root, "no dataset.json: an nnU-Net / MSD dataset folder has dataset.json, imagesTr/, labelsTr/"
        )
    doc = _read_json(ds_path)
    if "labels" not in doc:
        raise InputError(ds_path, "dataset.json has no 'labels'")
    names, regions = parse_label_map(doc["labels"], ds_path)
    if labels:
        names, regions = dict(labels), {}
    channels = doc.get("channel_names") or doc.get("modality") or {}
    mod = modality or modality_from_names(channels.values() if isinstance(channels, Mapping) else channels)
    ending = doc.get("file_ending", ".nii.gz")
    images_dir = root / options.get("images", "imagesTr")
    labels_dir = root / options.get("labels", "labelsTr")
    n_channels = len(channels) if isinstance(channels, Mapping) else 0
    found = Discovery("nnunet", [], scope_names=[str(doc.get("name", ""))])

    def channel_files(case: str) -> list[Path]:
        if n_channels:
            files = [images_dir / f"{case}_{i:04d}{ending}" for i in range(n_channels)]
            if all(f.is_file() for f in files):
                return files
        files = sorted(images_dir.glob(f"{glob.escape(case)}_[0-9][0-9][0-9][0-9]{ending}"))
        if files:
            return files
        single = images_dir / f"{case}{ending}"
        return [single] if single.is_file() else []

    pairs: list[tuple[str, list[Path], Path]] = []
    if isinstance(doc.get("training"), list) and doc["training"]:
        for entry in doc["training"]:
            label = _inside(root, entry["label"])
            case = label.name[: -len(ending)] if label.name.endswith(ending) else file_stem(label)
            image = _inside(root, entry["image"])
            images = [image] if image.is_file() else channel_files(case)
            if not label.is_file():
                raise InputError(label, "listed in dataset.json 'training' but missing")
            if not images:
                raise InputError(image, "listed in dataset.json 'training' but missing")
            pairs.append((case, images, label))
    else:
        if not labels_dir.is_dir():
            raise InputError(root, f"no {labels_dir.name}/ folder next to dataset.json")
        for label in sorted(labels_dir.iterdir()):
            if label.name.startswith(".") or not label.name.endswith(ending):
                continue
            case = label.name[: -len(ending)]
            images = channel_files(case)
            if not images:
                raise InputError(label, f"no image for case {case!r} in {images_dir} ({case}_0000{ending})")
            pairs.append((case, images, label))
        labelled = {c for c, _, _ in pairs}
        if images_dir.is_dir():
            for img in sorted(images_dir.iterdir()):
                if not img.name.endswith(ending):
                    continue
                image_case = re.sub(r"_\d{4}$", "", img.name[: -len(ending)])
                if image_case and not img.name.startswith(".") and image_case not in labelled:
                    found.skipped.append(f"{img.name}: image without a label in {labels_dir.name}/")
    for case, images, label in pairs:
        found.candidates.append(
            Candidate(case, images, [label], dict(names), {"mode": "values"}, mod, dict(regions))
        )
    return found


# -- folder of image / mask pairs ----------------------------------------------------------------------
def _glob_base(pattern: str) -> str:
    parts = []
    for part in Path(pattern).parts[:-1]:
        if glob.has_magic(part):
            break
        parts.append(part)
    return os.path.join(*parts) if parts else ""


def _default_pair(root: Path) -> dict[str, Any]:
    for img_dir in _IMAGE_DIRS:
        if (root / img_dir).is_dir():
            for mask_dir in _MASK_DIRS:
                if (root / mask_dir).is_dir():
                    return {"images": f"{img_dir}/*", "mask": f"../{mask_dir}/{{stem}}.*"}
    raise InputError(
        root,
        "no images/ and masks/ folders found: give the pairing (--images GLOB --mask TEMPLATE, "
        "e.g. --images 'images/*.png' --mask '../masks/{stem}_mask.png')",
    )


def _mask_paths(root: Path, image: Path, pair: Mapping[str, Any]) -> list[Path]:
    if pair.get("mask_regex"):
        pattern, repl = pair["mask_regex"]
        rel = image.relative_to(root).as_posix()
        if not re.search(pattern, rel):
            return []
        target = re.sub(pattern, repl, rel)
        return sorted(p for p in root.glob(target) if p.is_file())
    template = str(pair["mask"])
    stem, name, ext = file_stem(image), image.name, file_suffix(image)
    filled = template.format(stem=glob.escape(stem), name=glob.escape(name), ext=ext)
    base = image.parent
    if os.path.isabs(filled):
        return sorted(Path(p) for p in glob.glob(filled))
    return sorted(Path(os.path.normpath(p)) for p in glob.glob(str(base / filled)) if Path(p).is_file())


def _same_folder_mask_pattern(pair: Mapping[str, Any]) -> str | None:
    template = pair.get("mask")
    if not template or "/" in str(template):
        return None
    return str(template).replace("{stem}", "*").replace("{name}", "*").replace("{ext}", "*")


def _mask_spec(options: Mapping[str, Any], pair: Mapping[str, Any]) -> dict[str, Any]:
    spec = {"mode": "auto"}
    for source in (options, pair):
        spec.update({k: source[k] for k in _MASK_KEYS if k in source})
    if spec.get("palette") and spec["mode"] == "auto":
        spec["mode"] = "palette"
    return spec


def discover_folder2d(root: Path, options: Mapping, labels, modality) -> Discovery:
    pairs = options.get("pairs")
    if not pairs:
        pair = {k: options[k] for k in ("images", "mask", "mask_regex", "exclude") if k in options}
        if "images" not in pair:
            pair = {**_default_pair(root), **pair}
        if "mask" not in pair and "mask_regex" not in pair:
            raise InputError(root, "give how masks are named (--mask TEMPLATE, e.g. '../masks/{stem}.png')")
        pairs = [pair]
    mod = modality or options.get("modality") or "OTHER"
    found = Discovery("folder2d", [])
    bases = [_glob_base(p["images"]) for p in pairs]
    common = os.path.commonpath([os.path.join("root", b) for b in bases])[len("root") :].lstrip(os.sep)
    for pair in pairs:
        names = {int(k): str(v) for k, v in (pair.get("labels") or options.get("labels") or {}).items()}
        if labels:
            names = dict(labels)
        if not names:
            raise InputError(
                root, 'the mask values have no names: give --labels map.json (e.g. {"1": "polyp"})'
            )
        exclude = list(pair.get("exclude", [])) + list(options.get("exclude", []))
        same_folder = _same_folder_mask_pattern(pair)
        if same_folder:
            exclude.append(same_folder)
        images = sorted(
            p
            for p in root.glob(pair["images"])
            if p.is_file()
            and not p.name.startswith(".")
            and file_suffix(p) in READABLE
            and not any(fnmatch.fnmatch(p.name, e) for e in exclude)
        )
        if not images:
            found.skipped.append(f"no image files match {pair['images']!r}")
        for image in images:
            masks = [m for m in _mask_paths(root, image, pair) if m != image]
            rel = image.relative_to(root).as_posix()
            if not masks:
                found.skipped.append(f"{rel}: no mask found")
                continue
            case = Path(os.path.relpath(image, root / common)).as_posix() if common else rel
            case = case[: len(case) - len(file_suffix(image))]
            found.candidates.append(
                Candidate(case, [image], masks, dict(names), _mask_spec(options, pair), mod)
            )
    return found
