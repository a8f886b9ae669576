"""``medsam3 convert CKPT OUT_DIR``: a Meta-format SAM3 checkpoint -> a transformers model folder.

Examples::

    medsam3 convert sam3.pt models/sam3
    medsam3 convert checkpoint_2D.pt models/medical-sam3 --dtype bf16 --report convert.json
    medsam3 convert checkpoint_3D.pt models/medical-sam3-v2 --v2      # then: segment --mode clips

Accepts Meta's ``sam3.pt`` and Medical SAM3 / SAM3 trainer checkpoints (``{"model": ..., "optimizer": ...}``),
loaded without running code from the file. With tracker keys the folder holds the video model (usable for
text, box and point prompts and volumes), else the image model. Prints counts per category (converted,
deliberately dropped with the reason, unexpected, missing, mis-shaped) and exits with status 2 on any
problem; OUT_DIR appears only once complete.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medsam3.io.atomic import protect_inputs, write_text_atomic


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert a Meta-format SAM3 / Medical SAM3 checkpoint into a model folder",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", metavar="CKPT", help="sam3.pt or a trainer checkpoint (.pt)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="new folder for the converted model")
    p.add_argument(
        "--dtype",
        choices=("fp32", "bf16", "fp16"),
        default="fp32",
        help="storage type of the weights (default fp32)",
    )
    p.add_argument("--report", metavar="JSON", help="also write the full key-by-key report as JSON")
    p.add_argument(
        "--config",
        metavar="CONFIG_JSON",
        help="transformers config.json of the architecture (default: read from the tensor shapes)",
    )
    p.add_argument(
        "--image-only",
        action="store_true",
        help="write only the image model (Sam3Model), dropping the tracker weights",
    )
    p.add_argument(
        "--v2",
        action="store_true",
        help="a Medical SAM3 V2 (3D) video checkpoint: configure the video model as V2 runs it (504 px input "
        "and every size that depends on it, hot-start off, V2's thresholds); use with segment --mode clips",
    )
    p.add_argument(
        "--image-size",
        type=int,
        metavar="PX",
        help="video models: the input size to configure (a multiple of the patch size), with every size "
        "that depends on it; with --v2 it replaces 504",
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists and is not empty")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medsam3.model.convert import ConversionError, convert_meta_checkpoint

    inputs = [args.checkpoint] + ([args.config] if args.config else [])
    protect_inputs(inputs)
    try:
        report = convert_meta_checkpoint(
            args.checkpoint,
            args.out_dir,
            dtype=args.dtype,
            config=args.config,
            with_tracker=False if args.image_only else None,
            overwrite=args.overwrite,
            recipe="v2" if args.v2 else None,
            image_size=args.image_size,
        )
    except ConversionError as exc:
        if args.report:
            _write_report(args.report, exc.report.to_dict())
        raise
    print(report.summary())
    print(f"wrote {Path(args.out_dir)} ({report.model_class}, {report.dtype})")
    if args.report:
        _write_report(args.report, report.to_dict())
    return 0


def _write_report(path: str, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")
