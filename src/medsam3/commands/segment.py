"""``medsam3 segment IMAGE -p TEXT [...] -o OUT_DIR``: prompt-driven segmentation of a 2D image.

Writes ``<stem>_mask.png`` (label map on the image's grid), ``<stem>_overlay.png`` and ``<stem>.json``
(label value -> prompt, score, presence, area, box, absent; model, thresholds, preprocessing, versions)
into OUT_DIR, all or nothing, never over an input. Everything that can be checked without the model
(the image, the prompts against its size, the CT window, the output names) is checked first.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medsam3.errors import InputError, OutputError
from medsam3.image import MODALITIES
from medsam3.io.atomic import check_not_input, protect_inputs
from medsam3.predict.prompts import prompts_from_cli, validate_prompt
from medsam3.predict.summary import default_stem
from medsam3.preprocess.intensity import CT_WINDOWS, intensity_parameters

EPILOG = """\
prompts:
  -p TEXT starts a prompt (a concept such as "polyp" or "left kidney"). --box and --point attach to
  the -p given just before them; boxes / points given before any -p form one prompt of their own.
    -p liver --box 100,80,300,260            liver, with a box around it (exemplar)
    -p polyp -p "skin lesion"                two concepts, resolved pixel-wise
    --box 10,10,200,180                      box only (SAM3's visual prompt)
    --point 120,90 --point 40,40,0           points only: the interactive tracker (needs its weights)
    -p nucleus --point 55,60                 text + point: the detection that contains the point
  Coordinates are pixels of the input image (x right, y down); boxes x1,y1,x2,y2, add ",neg" for a
  negative box; points x,y with an optional label ",1" (positive, default) or ",0" (negative).

rule (per prompt): presence below --presence-threshold -> absent (empty); otherwise the best mask whose
score sigmoid(logit) x presence exceeds --threshold (every such mask with --instances). Overlaps go to
the mask with the highest score x mask probability at each pixel.

outputs: <stem>_mask.png, values listed in <stem>.json: without --instances prompt i (in the order
given, from 1) always has value i, absent prompts mark no pixel; with --instances the kept instances are
numbered 1, 2, ... in prompt order, best first.
"""


class _PromptItem(argparse.Action):
    """Collect -p / --box / --point in command-line order as ``(kind, value)`` pairs."""

    def __call__(self, parser, namespace, values, option_string=None):
        items = list(getattr(namespace, "prompt_items", None) or [])
        items.append((self.const, values))
        namespace.prompt_items = items


def _unit_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1")
    return value


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "segment",
        help="segment a 2D image from text / box / point prompts",
        description="Segment a 2D medical image (PNG, JPEG, TIFF, DICOM, ...) with SAM3 from concept "
        "prompts, boxes and points. Writes a label map, an overlay and a JSON summary.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("image", type=Path, help="2D image file")
    p.add_argument("-p", "--prompt", dest="prompt_items", action=_PromptItem, const="text", metavar="TEXT",
                   help="a concept to segment; repeat for several (see prompts below)")
    p.add_argument("--box", dest="prompt_items", action=_PromptItem, const="box",
                   metavar="X1,Y1,X2,Y2[,neg]", help="a box in pixels, for the preceding -p")
    p.add_argument("--point", dest="prompt_items", action=_PromptItem, const="point", metavar="X,Y[,LABEL]",
                   help="a point in pixels (label 1 positive, 0 negative), for the preceding -p")
    p.add_argument("-o", "--out", type=Path, required=True, metavar="OUT_DIR", help="output folder")
    p.add_argument("--instances", action="store_true",
                   help="keep every instance above the threshold (one label each) instead of one mask "
                   "per prompt")
    p.add_argument("--threshold", type=_unit_float, default=0.1, help="score threshold (default 0.1)")
    p.add_argument("--presence-threshold", type=_unit_float, default=0.5,
                   help="below this presence probability a prompt is reported absent (default 0.5)")
    p.add_argument("--modality", type=str.upper, choices=MODALITIES, help="override the guessed modality")
    p.add_argument("--window", help=f"CT window for every prompt: {', '.join(CT_WINDOWS)} or WIDTH,LEVEL "
                   "(default: chosen from each prompt's concept, else abdomen)")
    p.add_argument("--model", help="model folder or id (default: $MEDSAM3_MODEL, the configured model, "
                   "else the bundled one)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    p.add_argument("--no-overlay", action="store_true", help="do not write the overlay PNG")
    p.set_defaults(func=run, prompt_items=None)


def run(args: argparse.Namespace) -> int:
    from medsam3.io.readers import read_image
    from medsam3.predict.segmenter import Segmenter, as_2d

    prompts = prompts_from_cli(args.prompt_items or [])
    protected = [args.image]
    if args.model and Path(args.model).exists():
        protected.append(args.model)
    protect_inputs(protected)

    volume = read_image(args.image, modality=args.modality)
    image = as_2d(volume)
    if image is None:
        raise InputError(args.image,
                         f"is a 3D volume {volume.spatial_shape}; `segment` handles 2D images only")
    pixels = image.array[..., :3] if image.is_color else image.array
    for prompt in prompts:
        validate_prompt(prompt, image.spatial_shape)
        intensity_parameters(pixels, args.modality or image.modality, window=args.window,
                             concept=prompt.text)
    if args.out.exists() and not args.out.is_dir():
        raise OutputError(f"{args.out}: output folder is an existing file")
    stem = default_stem(args.image)
    for path in (args.out / f"{stem}_mask.png", args.out / f"{stem}_overlay.png", args.out / f"{stem}.json"):
        check_not_input(path)

    segmenter = Segmenter(args.model, device=args.device, dtype=args.dtype, threshold=args.threshold,
                          presence_threshold=args.presence_threshold, window=args.window,
                          modality=args.modality, instances=args.instances)
    result = segmenter.segment(image, prompts)
    paths = result.write(args.out, stem, overlay=not args.no_overlay)

    print(result.table())
    print(f"model: {segmenter.source}  ({result.settings['device']}, {result.settings['dtype']})")
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    sys.stdout.flush()
    return 0
