"""``medsam3 evaluate``: score segmentations and write a report folder people can read.

Three forms::

    # (a) prediction files against reference files (any format the readers know)
    medsam3 evaluate --pred PRED_DIR --ref REF_DIR -o REPORT_DIR [--label-map map.json]
        [--ref-labels names.json] [--spacing-from ref|pred|none] [--nsd-tolerance 2.0] [--resample]

    # (a) with a challenge protocol: BiomedSegFM .npz predictions (segs) against references (gts,
    # spacing, text_prompts) of the same file name
    medsam3 evaluate --protocol cvpr25 --pred PRED_DIR --ref REF_DIR -o REPORT_DIR
        [--nsd-tolerance 2.0] [--spacing-order xyz|zyx]
    # V2's own window Dice, NOT the challenge metric
    medsam3 evaluate --protocol v2-window --pred PRED_DIR --ref REF_DIR -o REPORT_DIR

    # (b) run models on a manifest (from `medsam3 prepare`) and score them
    medsam3 evaluate --manifest manifest.jsonl --model A_DIR --model-name A --model B_DIR --model-name B
        --prompt-mode text|box|text+box|point [--split val|test|eval|all] [--absent 3] -o REPORT_DIR

    # the paper's Table 3 (vanilla SAM3 vs Medical SAM3, text only)
    medsam3 evaluate --table3 --data-root ROOT --vanilla SAM3_DIR --medical MEDSAM3_DIR -o REPORT_DIR

Protocols (--protocol, form (a)): files (default, as above); cvpr25 = the CVPR 2025 text-guided 3D
challenge (per prompted id DSC and NSD at 2 mm with surfel areas, nanmean per case; instance cases F1 at
IoU 0.5; always beside them the rate of prompted ids absent from the reference that the prediction marks);
v2-window = Medical SAM3 V2's own 3D evaluation (label 1, one 8-slice window around the largest reference
slice, per-slice Dice), NOT the challenge metric. Definitions: medsam3.evaluate.challenge. Their reports
hold cases.csv, summary.csv (per modality = file-name prefix, and overall), table.md and config.json.

Report files: cases.csv, summary.csv, table.md, table.csv, config.json, dice_by_dataset.png,
dice_by_modality.png, gallery.html + gallery/*.png (and absent*.csv, table3.*). They are written together
at the end; an error leaves none of them.

Missing predictions: a reference without a prediction is a row with status "missing", scored as a failure
(Dice 0, distances worst-case); a prediction that cannot be read or made is "failed", scored the same. The
report is written either way; the command then exits with status 1 and says how many cases are missing or
failed, unless --allow-missing is given (exit 0 with a warning). Bad inputs (a prediction on another grid,
an unreadable reference, unknown datasets) stop with an error and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medsam3.commands.inference_options import (
    add_model_arguments,
    add_option_arguments,
    flag_of,
    options_from_args,
)
from medsam3.errors import InputError
from medsam3.io.atomic import check_not_input, protect_inputs
from medsam3.predict.options import VolumeOptions, default_of, option_fields

EPILOG = """\
pairing (form a): files are paired by name without extension and without one trailing _mask, _pred,
  _prediction, _seg, _segmentation, _label, _labels, _gt or _annotation (case-insensitive): case7_mask.png
  pairs with case7.png. Labels are matched by name: prediction names from --label-map, else the JSON
  summary that `medsam3 segment` writes beside each mask, else the file's own names (DICOM SEG, .seg.nrrd);
  reference names from --ref-labels, else REF_DIR/dataset.json, else the file's own names. A prediction
  without names is read in the reference's label values; a binary reference matches the prediction's
  single label.

prompts (form b): text = the concept; box = the reference's bounding box alone (the paper's vanilla-SAM3
  control); text+box = both; point = one positive point at the reference's most interior pixel (needs the
  tracker weights). --geometry objects: one box / point per connected component instead of one for the
  whole mask. Rule: the best mask whose confidence sigmoid(logit) x presence exceeds --threshold (0.1),
  else an empty mask; --presence-threshold adds a presence gate (default 0: none, as in the paper).

units: distances (HD95, ASSD) and the NSD tolerance are in mm when the pixel size is known, in pixels for
  PNG / JPEG (column distance_unit). Means come with 95% bootstrap intervals (2000 resamples, seeded).
"""


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"{text} must be positive")
    return v


def register(subparsers) -> None:
    from medsam3.evaluate.challenge import PROTOCOLS, SPACING_ORDERS
    from medsam3.evaluate.run_model import GEOMETRIES, PROMPT_MODES, SPLIT_CHOICES, VOLUME_MODES
    from medsam3.evaluate.score_files import SPACING_SOURCES

    p = subparsers.add_parser(
        "evaluate",
        help="score predictions against references, or run models on a manifest",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--pred", type=Path, metavar="PRED_DIR", help="(a) folder of prediction files")
    what.add_argument("--manifest", type=Path, help="(b) manifest JSONL written by `medsam3 prepare`")
    what.add_argument("--table3", action="store_true", help="reproduce the paper's Table 3")
    p.add_argument("-o", "--out", type=Path, required=True, metavar="REPORT_DIR", help="report folder")
    p.add_argument(
        "--nsd-tolerance",
        type=_positive_float,
        default=2.0,
        help="NSD tolerance in mm (pixels for pictures without pixel size); default 2.0",
    )
    p.add_argument(
        "--allow-missing",
        action="store_true",
        help="exit 0 (with a warning) when cases are missing or failed",
    )
    p.add_argument("--gallery", type=int, default=3, metavar="N", help="best and worst N cases per model (3)")
    p.add_argument("--bootstrap", type=int, default=2000, metavar="N", help="bootstrap resamples (2000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and the absent concepts (0)")
    p.add_argument(
        "--model-name",
        action="append",
        metavar="NAME",
        help="report name of the predictions (a) or of each --model, in order (b)",
    )
    a = p.add_argument_group("(a) prediction files")
    a.add_argument("--ref", type=Path, metavar="REF_DIR", help="folder of reference label files")
    a.add_argument(
        "--protocol",
        choices=("files",) + PROTOCOLS,
        default="files",
        help="files (default): any label files; cvpr25: the CVPR 2025 text-guided 3D challenge on npz "
        "files; v2-window: V2's 8-slice window Dice on npz files (not the challenge metric)",
    )
    a.add_argument(
        "--spacing-order",
        choices=SPACING_ORDERS,
        default="zyx",
        help="--protocol cvpr25: how the npz spacing meets the (D, H, W) arrays: zyx (default: as stored, "
        "as the organisers' script does, so NSD matches the challenge's) or xyz (the stored ITK x, y, z "
        "reversed onto the axes: physically correct distances)",
    )
    a.add_argument("--label-map", type=Path, help='prediction value -> name JSON, e.g. {"1": "liver"}')
    a.add_argument(
        "--ref-labels", type=Path, help="reference value -> name JSON (default: REF_DIR/dataset.json)"
    )
    a.add_argument(
        "--spacing-from",
        choices=SPACING_SOURCES,
        default="ref",
        help="voxel size for distances: ref (default), pred, none (voxel units)",
    )
    a.add_argument(
        "--resample",
        action="store_true",
        help="resample predictions on another grid onto the reference grid (nearest neighbour)",
    )
    a.add_argument("--images", type=Path, help="folder of the images, for the gallery (paired like the refs)")
    a.add_argument("--dataset-name", help="dataset name in the report (default: the REF_DIR folder name)")
    a.add_argument("--role", choices=("internal", "external"), help="table section of the dataset")
    a.add_argument("--group", default="", help="modality group of the dataset")
    b = p.add_argument_group("(b) models on a manifest")
    b.add_argument("--model", action="append", metavar="PATH", help="model folder or id; repeat to compare")
    b.add_argument("--prompt-mode", choices=PROMPT_MODES, default="text")
    b.add_argument(
        "--geometry",
        choices=GEOMETRIES,
        default="whole",
        help="box / point prompts: one for the whole mask (default) or one per object",
    )
    b.add_argument(
        "--split",
        choices=SPLIT_CHOICES,
        default="eval",
        help="records to evaluate: val, test, eval = val + test (default), all",
    )
    b.add_argument("--datasets", nargs="+", metavar="NAME", help="only these datasets of the manifest")
    b.add_argument("--limit", type=int, metavar="N", help="at most N records per dataset")
    b.add_argument(
        "--absent",
        type=int,
        default=0,
        metavar="N",
        help="also prompt each image with N concepts it does not contain (false-positive rate)",
    )
    b.add_argument(
        "--include-empty",
        action="store_true",
        help="also score concepts the dataset names but the image lacks",
    )
    b.add_argument(
        "--prompt-text",
        action="append",
        metavar="CONCEPT=TEXT",
        help="prompt TEXT instead of CONCEPT (DATASET:CONCEPT=TEXT for one dataset)",
    )
    b.add_argument(
        "--volume-mode",
        choices=VOLUME_MODES,
        default="slices",
        help="3D records: segment axial slices (default) or hand the volume to the segmenter",
    )
    add_model_arguments(b)
    add_option_arguments(b, "evaluate")
    t = p.add_argument_group("--table3")
    t.add_argument("--data-root", type=Path, help="folder with one sub-folder per Table 3 dataset")
    t.add_argument("--vanilla", help="vanilla SAM3 model folder or id")
    t.add_argument("--medical", help="Medical SAM3 model folder")
    p.set_defaults(func=run)


def _exit_status(rows, allow_missing: bool) -> int:
    missing = sum(r.status == "missing" for r in rows)
    failed = sum(r.status == "failed" for r in rows)
    return _exit_status_counts(missing, failed, allow_missing)


def _exit_status_counts(missing: int, failed: int, allow_missing: bool) -> int:
    if not missing and not failed:
        return 0
    msg = (
        f"{missing} reference label(s) without a prediction and {failed} failed, scored as failures "
        "(status column of cases.csv)"
    )
    if allow_missing:
        print(f"warning: {msg}", file=sys.stderr)
        return 0
    print(f"error: {msg}; pass --allow-missing to accept", file=sys.stderr)
    return 1


def _print_summary(out: Path, warnings: list[str]) -> None:
    print((out / "table.md").read_text(encoding="utf-8"))
    for w in warnings[:20]:
        print(f"warning: {w}", file=sys.stderr)
    if len(warnings) > 20:
        print(f"warning: ... and {len(warnings) - 20} more (config.json)", file=sys.stderr)
    print(f"report: {out}")


def _arguments(args) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}


def _run_files(args) -> int:
    from medsam3.data import registry
    from medsam3.evaluate.figures import GalleryCollector
    from medsam3.evaluate.report import write_report
    from medsam3.evaluate.score_files import FolderOptions, score_folders

    if args.ref is None:
        raise InputError(None, "--pred needs --ref REF_DIR")
    if args.model_name and len(args.model_name) > 1:
        raise InputError(None, "--pred takes one --model-name")
    protect_inputs([p for p in (args.pred, args.ref, args.label_map, args.ref_labels, args.images) if p])
    check_not_input(args.out / "cases.csv")
    dataset = args.dataset_name or args.ref.resolve().name
    role, group = args.role or "", args.group
    try:
        entry = registry.get(dataset)
        role = role or {"internal-eval": "internal", "external": "external"}.get(entry.role, "")
        group = group or entry.group
    except InputError:
        pass
    options = FolderOptions(
        label_map=args.label_map,
        ref_labels=args.ref_labels,
        spacing_from=args.spacing_from,
        nsd_tolerance=args.nsd_tolerance,
        resample=args.resample,
        dataset=dataset,
        role=role,
        group=group,
        model=(args.model_name or ["prediction"])[0],
        images=args.images,
    )
    gallery = GalleryCollector(args.gallery)
    result = score_folders(args.pred, args.ref, options, gallery)
    config = {
        "form": "files",
        "arguments": _arguments(args),
        "dataset": dataset,
        "role": role,
        "group": group,
        "label_names": result.name_sources,
        "alignment": result.alignment,
        "missing": result.missing,
        "failed": result.failed,
        "predictions_without_reference": result.orphans,
        "warnings": result.warnings,
    }
    write_report(args.out, result.rows, config, gallery.items(), n_boot=args.bootstrap, seed=args.seed)
    _print_summary(args.out, result.warnings)
    return _exit_status(result.rows, args.allow_missing)


def _run_challenge(args) -> int:
    from medsam3.evaluate.challenge import ChallengeOptions, score_challenge, write_challenge_report

    if args.ref is None:
        raise InputError(None, f"--protocol {args.protocol} needs --pred PRED_DIR and --ref REF_DIR")
    if args.model_name and len(args.model_name) > 1:
        raise InputError(None, "--pred takes one --model-name")
    if args.protocol == "v2-window" and (args.nsd_tolerance != 2.0 or args.spacing_order != "zyx"):
        raise InputError(None, "--nsd-tolerance and --spacing-order do not apply to --protocol v2-window")
    protect_inputs([args.pred, args.ref])
    check_not_input(args.out / "cases.csv")
    model = (args.model_name or ["prediction"])[0]
    options = ChallengeOptions(
        protocol=args.protocol,
        nsd_tolerance=args.nsd_tolerance,
        spacing_order=args.spacing_order,
        model=model,
    )
    result = score_challenge(args.pred, args.ref, options)
    config = {
        "form": "files",
        "arguments": _arguments(args),
        "model": model,
        "nsd_tolerance_mm": options.nsd_tolerance if args.protocol == "cvpr25" else None,
        "spacing_order": options.spacing_order if args.protocol == "cvpr25" else None,
    }
    write_challenge_report(args.out, result, config, model, n_boot=args.bootstrap, seed=args.seed)
    _print_summary(args.out, result.warnings)
    return _exit_status_counts(len(result.missing), len(result.failed), args.allow_missing)


def _prompt_overrides(items: list[str] | None) -> dict[str, str]:
    out = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep or not key.strip() or not text.strip():
            raise InputError(None, f"--prompt-text {item!r}: expected CONCEPT=TEXT or DATASET:CONCEPT=TEXT")
        out[key.strip()] = text.strip()
    return out


def _run_manifest(args) -> int:
    from medsam3.data.manifest import read_manifest
    from medsam3.evaluate.figures import GalleryCollector
    from medsam3.evaluate.report import write_report
    from medsam3.evaluate.run_model import ModelSpec, RunOptions, run_models, select_records

    models = args.model or [None]
    names = args.model_name or []
    if names and len(names) != len(models):
        raise InputError(None, f"{len(names)} --model-name for {len(models)} --model: one name per model")
    if not names:
        names = [Path(m).name if m else "default" for m in models]
    if len(set(names)) != len(names):
        raise InputError(None, f"model names {names} must be distinct (use --model-name)")
    protect_inputs([args.manifest] + [m for m in models if m and Path(m).exists()])
    check_not_input(args.out / "cases.csv")
    all_records = read_manifest(args.manifest)
    records = select_records(all_records, args.split, args.datasets, args.limit)
    if not records:
        raise InputError(
            args.manifest,
            f"has no record in split {args.split!r}"
            + (f" of datasets {args.datasets}" if args.datasets else ""),
        )
    protect_inputs([p for r in records for p in (*r.image, *r.label)])
    options = RunOptions(
        prompt_mode=args.prompt_mode,
        geometry=args.geometry,
        nsd_tolerance=args.nsd_tolerance,
        absent=args.absent,
        seed=args.seed,
        include_empty=args.include_empty,
        prompt_text=_prompt_overrides(args.prompt_text),
        volume_mode=args.volume_mode,
        device=args.device,
        dtype=args.dtype,
        inference=options_from_args(args, "evaluate"),
    )
    options.check()
    gallery = GalleryCollector(args.gallery)
    specs = [ModelSpec(n, m) for n, m in zip(names, models, strict=True)]
    result = run_models(records, specs, options, gallery, all_records=all_records)
    config = {
        "form": "manifest",
        "arguments": _arguments(args),
        "models": result.models,
        "prompt_mode": options.prompt_mode,
        "geometry": options.geometry,
        "threshold": options.inference.threshold,
        "presence_threshold": options.inference.presence_threshold,
        "nsd_tolerance": options.nsd_tolerance,
        "absent": options.absent,
        "volume_mode": options.volume_mode,
        "prompts": options.prompt_text,
        "instances": options.inference.instances,
        "records": len(records),
        "datasets": sorted({r.dataset for r in records}),
        "warnings": result.warnings,
    }
    write_report(
        args.out, result.rows, config, gallery.items(), result.absent, n_boot=args.bootstrap, seed=args.seed
    )
    _print_summary(args.out, result.warnings)
    return _exit_status(result.rows, args.allow_missing)


def _run_table3(args) -> int:
    from medsam3.evaluate.table3 import PAPER_TABLE3, run_table3

    needed = ("data_root", "vanilla", "medical")
    missing = [f"--{n.replace('_', '-')}" for n in needed if not getattr(args, n)]
    if missing:
        raise InputError(None, f"--table3 needs {', '.join(missing)}")
    protect_inputs([args.data_root] + [m for m in (args.vanilla, args.medical) if Path(m).exists()])
    check_not_input(args.out / "cases.csv")
    comp = run_table3(
        args.data_root,
        args.vanilla,
        args.medical,
        args.out,
        datasets=args.datasets,
        limit=args.limit,
        device=args.device,
        dtype=args.dtype,
        gallery=args.gallery,
        n_boot=args.bootstrap,
        command={"arguments": _arguments(args)},
    )
    print((args.out / "table3.md").read_text(encoding="utf-8"))
    ran = sum(1 for e in comp["datasets"] if e["ours_medsam3"] is not None)
    print(f"{ran} of {len(PAPER_TABLE3)} datasets run; report: {args.out}")
    return 0


#: Options that belong to one form only: option -> (attribute, default, forms that take it).
_FORM_OPTIONS = {
    "--ref": ("ref", None, ("files", "challenge")),
    "--protocol": ("protocol", "files", ("files", "challenge")),
    "--spacing-order": ("spacing_order", "zyx", ("challenge",)),
    "--label-map": ("label_map", None, ("files",)),
    "--ref-labels": ("ref_labels", None, ("files",)),
    "--resample": ("resample", False, ("files",)),
    "--images": ("images", None, ("files",)),
    "--dataset-name": ("dataset_name", None, ("files",)),
    "--role": ("role", None, ("files",)),
    "--spacing-from": ("spacing_from", "ref", ("files",)),
    "--model": ("model", None, ("manifest",)),
    "--prompt-mode": ("prompt_mode", "text", ("manifest",)),
    "--geometry": ("geometry", "whole", ("manifest",)),
    "--split": ("split", "eval", ("manifest",)),
    "--absent": ("absent", 0, ("manifest",)),
    "--include-empty": ("include_empty", False, ("manifest",)),
    "--prompt-text": ("prompt_text", None, ("manifest",)),
    "--volume-mode": ("volume_mode", "slices", ("manifest",)),
    "--datasets": ("datasets", None, ("manifest", "table3")),
    "--limit": ("limit", None, ("manifest", "table3")),
    "--device": ("device", "auto", ("manifest", "table3")),
    "--dtype": ("dtype", "auto", ("manifest", "table3")),
    "--data-root": ("data_root", None, ("table3",)),
    "--vanilla": ("vanilla", None, ("table3",)),
    "--medical": ("medical", None, ("table3",)),
    "--model-name": ("model_name", None, ("files", "manifest", "challenge")),
    # the inference options (medsam3.predict.options) belong to the manifest form
    **{
        flag_of(f.name): (f.name, default_of(f.name, "evaluate"), ("manifest",))
        for f, _ in option_fields(VolumeOptions, "evaluate")
    },
}


def _check_options(args, form: str) -> None:
    """Refuse options of another form instead of ignoring them silently."""
    flag = {"files": "--pred", "manifest": "--manifest", "table3": "--table3", "challenge": "--protocol"}[
        form
    ]
    wrong = [
        opt
        for opt, (attr, default, forms) in _FORM_OPTIONS.items()
        if form not in forms and getattr(args, attr, default) not in (default, None, False)
    ]
    if wrong:
        raise InputError(None, f"{', '.join(wrong)} cannot be used with {flag}")


def run(args: argparse.Namespace) -> int:
    form = "files" if args.pred is not None else "manifest" if args.manifest is not None else "table3"
    if form == "files" and args.protocol != "files":
        form = "challenge"
    _check_options(args, form)
    if form == "challenge":
        return _run_challenge(args)
    if args.pred is not None:
        return _run_files(args)
    if args.manifest is not None:
        return _run_manifest(args)
    return _run_table3(args)
