"""Absent-concept negatives from other modalities for medsam3-nano (issue 20), as a training manifest.

Reads the ``training_pool`` of ``configs/nano_ood_heldout.json`` (images and volumes of other modalities
that may be trained on) and writes a manifest in which each of them names the known concepts as absent,
mixed with an existing nano training manifest:

1. **Licences**: every pool item's source must have a licence in ``licenses`` that allows use for a bundled
   model (one of :data:`ALLOWED`, none of :data:`FORBIDDEN`); otherwise the script stops.
2. **Held-out images stay out**: a pool item must not be, lie inside or contain a held-out item or the
   unseen-source folder, and no pool file may have the bytes of a held-out file (a copy under another name);
   otherwise the script stops.
3. For each pool item, an all-zero label map on the image's grid (``WORK/negatives/<id>.nii.gz``, 2D
   images ``.png``) and ``medsam3 prepare --layout folder2d`` with the labels of
   ``WORK/labels_negatives*.json`` (``{"fetal head": 1, "polyp": 2, "anterior hippocampus": 3, "posterior
   hippocampus": 4, "hippocampus": [3, 4]}``: values that never occur, so every concept is absent on every
   slice; an item's ``not_negative_for`` concepts, with their parts and regions, are left out) into a copy
   of the base manifest, as dataset ``Negatives-<id>``, modality group ``other-modalities`` (one group:
   the sampler's ``group_temperature`` then sets the share of these items, and the in-domain groups keep
   their cross-group negatives), split ``train``, the modality the image reader gives the file (so that
   training normalises it as ``medsam3 segment`` does).
4. Checks the result: the base manifest's records unchanged, one record per pool item, all ``train``,
   no foreground, no held-out file.

Usage (from the repository root; scripts/train_nano.sh runs it in its ``prepare`` stage)::

    python scripts/nano_negatives.py DATA_DIR WORK_DIR --base WORK_DIR/manifest_regions.jsonl \\
        -o WORK_DIR/manifest_ood.jsonl
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

GROUP = "other-modalities"
PREFIX = "Negatives-"
#: The concepts of medsam3-nano and the (never occurring) label values that name them on a negative.
LABELS: dict[str, Any] = {
    "fetal head": 1,
    "polyp": 2,
    "anterior hippocampus": 3,
    "posterior hippocampus": 4,
    "hippocampus": [3, 4],
}
#: Licences that allow training a bundled model and shipping it (with attribution).
ALLOWED = ("Apache-2.0", "BSD-3-Clause", "CC BY 4.0", "CC0", "MIT")
#: Words in a licence note that rule a source out, whatever else it says.
FORBIDDEN = ("evaluation only", "non-commercial", "not verified", "never trained")


def negative_labels(skip: set[str]) -> dict[str, Any]:
    """:data:`LABELS` without the concepts in ``skip`` (they may be visible on the image): a skipped region
    takes its parts along (a visible hippocampus has visible halves), a skipped part its regions."""
    values = {k: set(v) if isinstance(v, list) else {v} for k, v in LABELS.items()}
    gone = set().union(*(values[k] for k in skip if k in values))
    return {k: v for k, v in LABELS.items() if not values[k] & gone}


def licence_problem(source: str, licences: dict[str, str]) -> str | None:
    """Why ``source`` may not be trained on for a bundled model (None: it may)."""
    text = licences.get(source)
    if text is None:
        return f"source {source!r} has no licence entry"
    low = text.lower()
    bad = [w for w in FORBIDDEN if w in low]
    if bad:
        return f"source {source!r}: licence note says {bad[0]!r} ({text})"
    if not any(a.lower() in low for a in ALLOWED):
        return f"source {source!r}: licence {text!r} is none of {ALLOWED}"
    return None


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    return [path] if path.is_file() else []


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def heldout_paths(config: dict[str, Any], data: Path) -> list[Path]:
    """The held-out items and the unseen-source folder, resolved."""
    paths = [(data / it["path"]).resolve() for it in config["heldout"]]
    unseen = config.get("unseen_sources")
    if unseen:
        paths.append((data / unseen["folder"]).resolve())
    return paths


def overlap_problems(config: dict[str, Any], data: Path) -> list[str]:
    """Pool items that are, contain, lie inside or copy a held-out item (empty: none)."""
    held = heldout_paths(config, data)
    held_digests = {_digest(f): f for h in held for f in _files(h)}
    out = []
    for it in config["training_pool"]:
        path = (data / it["path"]).resolve()
        for h in held:
            if path == h or h in path.parents or path in h.parents:
                out.append(f"{it['path']}: is or overlaps the held-out {h.relative_to(data.resolve())}")
        for f in _files(path):
            twin = held_digests.get(_digest(f))
            if twin is not None:
                out.append(f"{it['path']}: {f.name} has the bytes of the held-out {twin}")
    return out


def item_id(item: dict[str, Any]) -> str:
    """A dataset-name-safe id of a pool item: its source and file stem."""
    name = Path(item["path"]).name
    stem = re.sub(r"(\.nii\.gz|\.[A-Za-z0-9]+)$", "", name)
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{item['source']}-{stem}")


def write_empty_label_map(image_path: Path, out_stem: Path) -> tuple[Path, str]:
    """An all-zero label map on the grid of ``image_path`` (``.png`` for 2D, ``.nii.gz`` for 3D), and the
    modality the reader gives the image (what ``medsam3 segment`` normalises it as)."""
    from medsam3.io.readers import read_image
    from medsam3.io.writers import write_label_map

    image = read_image(image_path)
    suffix = ".png" if image.ndim == 2 else ".nii.gz"
    zeros = np.zeros(tuple(image.spatial_shape), np.uint8)
    return write_label_map(zeros, out_stem.with_name(out_stem.name + suffix), image), str(image.modality)


def prepare_item(
    item: dict[str, Any], data: Path, work: Path, manifest: Path, splits: Path, labels: Path
) -> None:
    """``medsam3 prepare`` of one pool item into ``manifest`` (dataset ``Negatives-<id>``)."""
    ident = item_id(item)
    image = (data / item["path"]).resolve()
    mask, modality = write_empty_label_map(image, work / "negatives" / ident)
    mask_suffix = "".join(mask.suffixes[-2:]) if mask.name.endswith(".nii.gz") else mask.suffix
    cmd = [
        sys.executable,
        "-m",
        "medsam3",
        "prepare",
        "--layout",
        "folder2d",
        "--root",
        str(image.parent),
        "--name",
        PREFIX + ident,
        "--images",
        image.name,
        "--mask",
        str(mask.parent.resolve() / f"{ident}{mask_suffix}"),
        "--mask-mode",
        "values",
        "--labels",
        str(labels),
        "--modality",
        modality,
        "--group",
        GROUP,
        "--role",
        "train",
        "--val-fraction",
        "0",
        "--splits",
        str(splits),
        "-o",
        str(manifest),
        "-q",
    ]
    subprocess.run(cmd, check=True)


def _read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_manifest(
    out: list[dict[str, Any]], base: list[dict[str, Any]], config: dict[str, Any], data: Path
) -> list[str]:
    """What is wrong with the mixed manifest (empty: nothing)."""
    problems = []
    kept = [r for r in out if not r["dataset"].startswith(PREFIX)]
    if sorted(json.dumps(r, sort_keys=True) for r in kept) != sorted(
        json.dumps(r, sort_keys=True) for r in base
    ):
        problems.append("the base manifest's records changed")
    negatives = [r for r in out if r["dataset"].startswith(PREFIX)]
    if len(negatives) != len(config["training_pool"]):
        problems.append(f"{len(negatives)} negative records for {len(config['training_pool'])} pool items")
    held = heldout_paths(config, data)
    for r in negatives:
        if r["split"] != "train":
            problems.append(f"{r['dataset']}: split {r['split']!r}, expected 'train'")
        if any(r.get("foreground", {}).values()):
            problems.append(f"{r['dataset']}: has foreground {r['foreground']}")
        for image in r["image"]:
            p = Path(image).resolve()
            if any(p == h or h in p.parents for h in held):
                problems.append(f"{r['dataset']}: held-out image {image}")
    return problems


def build(data: Path, work: Path, heldout: Path, base: Path, output: Path) -> list[dict[str, Any]]:
    """Everything of the module docstring; returns the negative records."""
    config = json.loads(heldout.read_text())
    licences = config["licenses"]
    problems = [p for it in config["training_pool"] if (p := licence_problem(it["source"], licences))]
    problems += overlap_problems(config, data)
    if problems:
        raise SystemExit("error: " + "; ".join(problems))
    (work / "negatives").mkdir(parents=True, exist_ok=True)
    splits = output.with_name(output.stem + ".splits.json")
    base_splits = base.with_name(base.stem + ".splits.json")
    shutil.copyfile(base, output)
    if base_splits.exists():
        shutil.copyfile(base_splits, splits)
    else:
        splits.unlink(missing_ok=True)
    for it in config["training_pool"]:
        skip = set(it.get("not_negative_for", []))
        labels = negative_labels(skip)
        suffix = "" if not skip else "_" + "_".join(sorted(re.sub(r"\W+", "-", s) for s in skip))
        labels_path = work / f"labels_negatives{suffix}.json"
        labels_path.write_text(json.dumps(labels) + "\n")
        prepare_item(it, data, work, output, splits, labels_path.resolve())
    out = _read(output)
    problems = check_manifest(out, _read(base), config, data)
    if problems:
        raise SystemExit("error: " + "; ".join(problems))
    return [r for r in out if r["dataset"].startswith(PREFIX)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, help="the sample data folder")
    parser.add_argument("work", type=Path, help="work folder (label maps and label names go here)")
    parser.add_argument("--heldout", type=Path, default=Path("configs/nano_ood_heldout.json"))
    parser.add_argument("--base", type=Path, required=True, help="manifest to mix the negatives into")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the mixed manifest (.jsonl)")
    args = parser.parse_args(argv)
    negatives = build(args.data, args.work, args.heldout, args.base, args.output)
    for r in negatives:
        shape = "x".join(str(n) for n in r["shape"])
        print(f"{r['dataset']}: {r['modality']} {shape}, absent: {', '.join(sorted(r['labels'].values()))}")
    print(f"{args.output}: {len(negatives)} negative items added to {args.base}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
