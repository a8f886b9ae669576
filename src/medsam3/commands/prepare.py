"""``medsam3 prepare``: turn dataset folders into a training manifest (JSONL) and a splits file.

Examples::

    medsam3 prepare --list
    medsam3 prepare --dataset Kvasir-SEG --root ~/data/Kvasir-SEG -o manifest.jsonl
    medsam3 prepare --layout nnunet --root ~/data/Task04_Hippocampus --name Hippocampus -o manifest.jsonl
    medsam3 prepare --layout folder2d --root ~/data/polyps --name MyPolyps --labels names.json \\
        --images 'img/*.png' --mask '../gt/{stem}_mask.png' --modality RGB -o manifest.jsonl

One dataset per run; running again with the same ``-o`` adds or replaces that dataset's records and keeps
the others, so several datasets build one manifest. Splits (85/15, seed 42) are kept in
``<manifest stem>.splits.json`` and respected when a dataset is prepared again.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medsam3.data import registry
from medsam3.data.indexing import DatasetReport, prepare_dataset
from medsam3.data.labels import read_label_map_json
from medsam3.data.layouts import LAYOUTS
from medsam3.data.manifest import check_records, merge_records, read_manifest, write_manifest
from medsam3.data.splits import read_splits, write_splits
from medsam3.data.vocabulary import Vocabulary
from medsam3.errors import InputError
from medsam3.image import MODALITIES
from medsam3.io.atomic import protect_inputs

MASK_MODES = ("auto", "binary", "values", "instances", "palette")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "prepare",
        help="build a training manifest from dataset folders",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--list", action="store_true", help="print the registry of the paper's datasets")
    what.add_argument("--dataset", help="registry name (see --list), e.g. Kvasir-SEG")
    what.add_argument("--layout", choices=LAYOUTS + ("msd",), help="read any folder in this layout")
    p.add_argument("--root", type=Path, help="the dataset folder")
    p.add_argument("--name", help="dataset name in the manifest (--layout; default: the folder name)")
    p.add_argument("-o", "--output", type=Path, help="manifest to create or update (.jsonl)")
    p.add_argument("--splits", type=Path, help="splits file (default: <manifest stem>.splits.json)")
    p.add_argument(
        "--labels",
        type=Path,
        help='JSON naming mask values: {"1": "polyp"} or {"polyp": 1}; a list value is a region, '
        'a concept made of several labels: {"anterior hippocampus": 1, "posterior '
        'hippocampus": 2, "hippocampus": [1, 2]}',
    )
    p.add_argument("--modality", choices=MODALITIES, help="image modality (overrides the guess)")
    p.add_argument("--group", help="modality group used to balance sampling (default: the modality)")
    p.add_argument(
        "--role",
        choices=("train", "external"),
        default=None,
        help="train: split 85/15; external: every case is test (default: registry role or train)",
    )
    p.add_argument("--vocabulary", type=Path, help="concept vocabulary JSON merged over the bundled one")
    p.add_argument("--seed", type=int, default=42, help="split seed (default 42)")
    p.add_argument("--val-fraction", type=float, default=0.15, help="validation fraction (default 0.15)")
    folder = p.add_argument_group("folder2d options")
    folder.add_argument("--images", help="glob of image files under the root, e.g. 'images/*.png'")
    folder.add_argument(
        "--mask", help="mask path template relative to each image, e.g. '../masks/{stem}.png'"
    )
    folder.add_argument("--mask-mode", choices=MASK_MODES, help="how mask pixels become label values")
    folder.add_argument("--threshold", type=int, help="binary masks: foreground above this value")
    folder.add_argument("--palette", type=Path, help='JSON {"r,g,b": label value} for colour masks')
    folder.add_argument("--fill-holes", action="store_true", help="fill closed outlines (e.g. HC18)")
    folder.add_argument("--drop-empty", action="store_true", help="leave out images whose mask is empty")
    other = p.add_argument_group("coco / npz options")
    other.add_argument("--annotations", help="coco: glob of annotation JSON files under the root")
    other.add_argument("--image-dir", help="coco: folder of the images, relative to the JSON file")
    other.add_argument(
        "--prompts", type=Path, help="npz: prompts JSON (CVPR25_TextSegFMData_with_class.json form)"
    )
    p.set_defaults(func=run)


def _overrides(args) -> dict:
    opts: dict = {}
    for arg, key in (
        ("images", "images"),
        ("mask", "mask"),
        ("mask_mode", "mode"),
        ("threshold", "threshold"),
        ("annotations", "annotations"),
        ("image_dir", "image_dir"),
    ):
        value = getattr(args, arg)
        if value is not None:
            opts[key] = value
    if args.fill_holes:
        opts["fill_holes"] = True
    if args.drop_empty:
        opts["drop_empty"] = True
    if args.prompts:
        opts["prompts"] = str(args.prompts.resolve())
    if args.palette:
        try:
            opts["palette"] = json.loads(args.palette.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(args.palette, f"cannot read the palette JSON ({exc})") from None
        opts.setdefault("mode", "palette")
    return opts


def _print_report(rep: DatasetReport, root: Path) -> None:
    print(f"{rep.dataset} ({rep.layout}, {root}): {rep.cases} cases, {rep.records} records")
    print("  labels:   " + ", ".join(f"{v}={n}" for v, n in sorted(rep.label_names.items())))
    print("  concepts: " + ", ".join(f"{c} ({n} records)" for c, n in sorted(rep.concepts.items())))
    print("  split:    " + ", ".join(f"{s} {n}" for s, n in rep.splits.items()))
    if rep.skipped:
        print(f"  skipped:  {len(rep.skipped)}")
        for line in rep.skipped[:10]:
            print(f"    {line}")
        if len(rep.skipped) > 10:
            print(f"    ... and {len(rep.skipped) - 10} more")
    if rep.unknown_names:
        print(
            "  warning:  label names not in the vocabulary, kept as written (normalised): "
            + ", ".join(repr(n) for n in rep.unknown_names)
        )
    for note in rep.notes:
        print(f"  note:     {note}")


def run(args) -> int:
    if args.list:
        print(registry.format_table())
        return 0
    if args.root is None or args.output is None:
        raise InputError(None, "--root and -o/--output are required (or use --list)")
    root = args.root.resolve()
    inputs = [root] + [p for p in (args.labels, args.vocabulary, args.prompts, args.palette) if p]
    protect_inputs(inputs)
    vocab = Vocabulary.default(args.vocabulary)
    label_names, regions = read_label_map_json(args.labels) if args.labels else ({}, {})
    labels: dict[int, str] | None = label_names or None
    overrides = _overrides(args)
    if args.dataset:
        entry = registry.get(args.dataset)
        if entry.layout is None:
            raise InputError(None, f"{entry.name}: no reader for this release format. {entry.notes}")
        name, layout = entry.name, entry.layout
        options = {**entry.options, **overrides}
        if "images" in overrides or "mask" in overrides:  # the user's pairing replaces the entry's rules
            options.pop("pairs", None)
        if labels is None and entry.labels is not None:
            if layout == "folder2d":  # pair rules may name their own values; the entry's table is the default
                options.setdefault("labels", entry.labels)
            else:
                labels = entry.labels
        modality = args.modality or entry.modality
        group, role = args.group or entry.group, args.role or entry.split_role
    else:
        name, layout = args.name or root.name, args.layout
        options, modality = overrides, args.modality
        group, role = args.group or "", args.role or "train"
    splits_path = args.splits or args.output.with_name(args.output.name.split(".")[0] + ".splits.json")
    all_splits = read_splits(splits_path)
    drop_empty = bool(options.pop("drop_empty", False))
    records, report, dataset_splits = prepare_dataset(
        name,
        layout,
        root,
        options=options,
        labels=labels,
        modality=modality,
        group=group,
        role=role,
        vocabulary=vocab,
        existing_splits=all_splits.get(name),
        seed=args.seed,
        regions=regions or None,
        val_fraction=args.val_fraction,
        drop_empty=drop_empty,
    )
    existing = read_manifest(args.output) if args.output.exists() else []
    merged = merge_records(existing, records)
    check_records(merged, check_files=True)
    all_splits[name] = dataset_splits
    write_manifest(args.output, merged)
    write_splits(splits_path, all_splits, args.seed, args.val_fraction)
    _print_report(report, root)
    datasets = sorted({r.dataset for r in merged})
    noun = "dataset" if len(datasets) == 1 else "datasets"
    print(f"manifest: {args.output} ({len(merged)} records, {len(datasets)} {noun}: {', '.join(datasets)})")
    print(f"splits:   {splits_path}")
    return 0
