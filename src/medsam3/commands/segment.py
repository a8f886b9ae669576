"""``medsam3 segment INPUT -p TEXT [...] -o OUT_DIR``: prompt-driven segmentation of images and volumes.

INPUT is one of:

* a **2D image**: writes ``<stem>_mask.png`` (label map on the image's grid), ``<stem>_overlay.png`` and
  ``<stem>.json`` (label value -> prompt, score, presence, area, box, absent; model, thresholds,
  preprocessing, versions);
* a **volume** (NIfTI, NRRD, MHA, BiomedSegFM npz, a DICOM series folder or file): writes the label map in
  the input's format and geometry, a DICOM SEG for DICOM input, overlays and ``<stem>.json``
  (:mod:`medsam3.predict.volume.outputs`);
* a **folder of cases** or a **list file**: every case as above, resumable, with ``summary.csv``
  (:mod:`medsam3.predict.batch_cases`); exits 1 when a case failed. ``--num-parts K --part-id I`` runs a
  deterministic share of the cases (:mod:`medsam3.predict.parts`); ``--engine ray`` runs the cases on a
  Ray cluster (:mod:`medsam3.predict.ray_engine`) with the same per-case function and outputs.

Prompts come from ``-p`` (``-p LABEL=TEXT`` numbers them), else ``--prompts-json``, else the npz's own
``text_prompts`` (the CVPR 2025 text-guided 3D challenge format), case by case
(:mod:`medsam3.predict.case_prompts`): the label map holds each prompt's label id, an instance task its
6-connected instances ``1..K``; ``--normalize-prompts`` maps sentences to vocabulary concepts; each case's
JSON records the prompts' source, label ids, instances and wall time. ``--output-type challenge-npz``
writes the challenge's ``<stem>.npz`` with ``segs`` only.

All outputs of a case appear together or not at all, never over an input. Everything that can be checked
without the model (the input, the prompts against its size, the CT window, the output names) is checked
first.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medsam3.commands.inference_options import (
    add_model_arguments,
    add_option_arguments,
    input_argument,
    options_from_args,
    resolve_input,
)
from medsam3.errors import OptionError, OutputError, PromptError
from medsam3.image import Image
from medsam3.io.atomic import check_not_input, protect_inputs, write_error
from medsam3.model.domain import OUTSIDE_DOMAIN
from medsam3.predict.case_prompts import PromptSources, apply_case_prompts
from medsam3.predict.options import VolumeOptions, check_request
from medsam3.predict.prompts import Prompt, prompts_from_cli, validate_prompt
from medsam3.predict.volume.outputs import CHALLENGE_TYPE, OUTPUT_TYPES
from medsam3.preprocess.intensity import intensity_parameters

if TYPE_CHECKING:
    from medsam3.predict.batch_cases import Case, CaseOutcome
    from medsam3.predict.segmenter import Segmenter
    from medsam3.predict.volume.prompts import VolumePrompt

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

volumes (NIfTI, NRRD, MHA, npz, DICOM series): the volume is reoriented to LPS and cut into slices
along --axis (default: the acquisition's slice axis). --mode slices finds each concept on every slice
(image features computed once per slice, in batches of --slice-batch, shared by all prompts), then in 3D:
a concept found on fewer than --min-slices slices is absent; holes are filled per slice
(--no-fill-holes); 3D components under --min-component-voxels / --min-component-ml are dropped
(--keep-largest keeps one). --mode track carries each concept through the slices with SAM3's video model
(text prompts only; needs a video model folder). Prompt i has value i in the label map (its label id
with -p LABEL=TEXT or per-case prompts, below).
  -p liver -p "left kidney"                         two concepts
  -p tumour --box 120,80,190,150 --box-slice 42     refine with a box on input slice 42
  -p tumour --box3d 120,80,30,190,150,55            search only inside a 3D box
  Box coordinates are voxels of the input array: x = axis 2, y = axis 1, z = axis 0 (the slice index
  viewers show); ends exclusive (z1=30, z2=55 covers slices 30..54). A key-slice box is given on every
  slice and the structure is followed from the key slice through overlapping neighbours.
  outputs: <case>_seg.nii.gz (NIfTI and DICOM input), .nrrd, .mha or .npz (as the input),
  <case>_seg.dcm (DICOM SEG, DICOM input), <case>_overlay.png, <case>_montage.png, <case>.json.

many cases: INPUT a folder (each file, and each DICOM series sub-folder, is a case) or a list file
(.txt/.lst/.list, one path per line). Finished cases (their <case>.json and outputs exist) are skipped
unless --overwrite; a failed case does not stop the others; OUT_DIR/summary.csv lists every case (with
its wall time in seconds); the exit status is 1 when a case failed. Interrupting and re-running redoes
only unfinished cases.
  --num-parts K --part-id I   this run's share of the cases (a hash of each case's name: the same on every
                              run, whatever cases are added); parts share OUT_DIR, each writes
                              summary.part-I-of-K.csv and merges the parts found into summary.csv
    for i in 0 1 2 3; do medsam3 segment cases/ -p liver -o out --num-parts 4 --part-id $i \\
      --device cuda:$i & done; wait
  --engine ray                the cases on a Ray cluster (pip install "medsam3[distributed]"): reading in
                              CPU tasks, --workers model actors (--gpus-per-worker, --cpus-per-worker),
                              --address auto or ray://HOST:10001 (default: a local instance); a worker that
                              dies has its case retried elsewhere (--retries); same outputs and resuming
                              as without Ray, either engine resumes the other's OUT_DIR

per-case prompts (CVPR 2025 text-guided 3D challenge): without -p each case takes, first that applies,
  --prompts-json FILE   {"1": "liver", "2": "spleen"} for every case, or keyed by file name, then by
                        name without extension: {"CT_x.npz": {"1": "liver", "instance_label": 0}} (a
                        plain text is label 1)
  the npz's text_prompts {"1": "CT imaging of the spleen within the abdomen", "instance_label": 0}
and -p LABEL=TEXT (e.g. -p 1=liver -p 5=spleen) numbers command-line prompts. The label map holds each
prompt's label id (uint8, uint16 past 255). instance_label 1 (exactly one prompt): the mask is split into
6-connected components numbered 1..K. A case without any prompt fails alone. The JSON's "case" record
gives the prompt source, texts, label ids, instance flag, number of instances and wall time.
  medsam3 segment val_npz/ -o preds/ --output-type challenge-npz --no-overlay --normalize-prompts
  writes preds/CT_x.npz (key segs, the input's (D, H, W)) per case, resumable; OUT_DIR must not be the
  input folder (the prediction has the input's file name). --normalize-prompts maps each sentence to a
  vocabulary concept ("Visualization of the left kidney in MRI" -> left kidney; rule in
  medsam3.data.vocabulary); an unmapped sentence is used as written; the JSON reports both.
"""


class PromptItem(argparse.Action):
    """Collect -p / --box / --point in command-line order as ``(kind, value)`` pairs."""

    def __call__(self, parser, namespace, values, option_string=None):
        items = list(getattr(namespace, "prompt_items", None) or [])
        items.append((self.const, values))
        namespace.prompt_items = items


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "segment",
        help="segment images, volumes or folders of cases from text / box / point prompts",
        description="Segment a 2D medical image (PNG, JPEG, TIFF, DICOM, ...), a 3D volume (NIfTI, NRRD, "
        "MHA, npz, DICOM series) or a folder / list of cases with SAM3 from concept prompts, boxes and "
        "points. Writes label maps with the input's geometry, overlays and JSON summaries.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    input_argument(p, "2D image, volume, DICOM series folder, folder of cases or list file")
    p.add_argument(
        "-p",
        "--prompt",
        dest="prompt_items",
        action=PromptItem,
        const="text",
        metavar="TEXT",
        help="a concept to segment; repeat for several (see prompts below); LABEL=TEXT gives it label id "
        "LABEL in the label map",
    )
    p.add_argument(
        "--box",
        dest="prompt_items",
        action=PromptItem,
        const="box",
        metavar="X1,Y1,X2,Y2[,neg]",
        help="a box in pixels, for the preceding -p",
    )
    p.add_argument(
        "--point",
        dest="prompt_items",
        action=PromptItem,
        const="point",
        metavar="X,Y[,LABEL]",
        help="a point in pixels (label 1 positive, 0 negative), for the preceding -p (2D)",
    )
    p.add_argument(
        "--box-slice",
        dest="prompt_items",
        action=PromptItem,
        const="box_slice",
        metavar="K",
        help="volumes: the input slice (array axis 0) the preceding prompt's --box lies on",
    )
    p.add_argument(
        "--box3d",
        dest="prompt_items",
        action=PromptItem,
        const="box3d",
        metavar="X1,Y1,Z1,X2,Y2,Z2",
        help="volumes: a 3D box in input voxels for the preceding -p",
    )
    p.add_argument("-o", "--out", type=Path, required=True, metavar="OUT_DIR", help="output folder")
    add_model_arguments(
        p,
        model_help="model folder or id (default: $MEDSAM3_MODEL, the configured model, else the bundled one)",
    )
    p.add_argument("--no-overlay", action="store_true", help="do not write the overlay PNGs")
    p.add_argument(
        "--output-type",
        nargs="+",
        choices=OUTPUT_TYPES,
        metavar="TYPE",
        help=f"volumes: label-map files to write, one or more of {', '.join(OUTPUT_TYPES)} (default: the "
        "input's own format, plus dicom-seg for DICOM input)",
    )
    p.add_argument(
        "--reference-series",
        type=Path,
        metavar="DICOM_DIR",
        help="volumes: the DICOM series a DICOM SEG / RTSTRUCT reference when the input is not DICOM (a "
        "NIfTI converted from that series): same grid voxel for voxel, checked before any work",
    )
    p.add_argument(
        "--per-prompt",
        action="store_true",
        help="volumes: also one binary file per concept, <case>_<concept> in the first output type",
    )
    add_option_arguments(p, "segment", p.add_argument_group("volumes"))
    w = p.add_argument_group(
        "PACS (DICOMweb)",
        "INPUT may be a series on a DICOMweb server: dicomweb+http(s)://HOST[:PORT]/ROOT/studies/UID/"
        "series/UID (or --dicomweb ROOT --study UID --series UID). Credentials come from the environment: "
        "MEDSAM3_DICOMWEB_TOKEN (bearer), or MEDSAM3_DICOMWEB_USER and MEDSAM3_DICOMWEB_PASSWORD (basic).",
    )
    w.add_argument(
        "--dicomweb", metavar="ROOT_URL", help="the DICOMweb root of the server holding the series"
    )
    w.add_argument("--study", metavar="UID", help="with --dicomweb: the Study Instance UID")
    w.add_argument("--series", metavar="UID", help="with --dicomweb: the Series Instance UID")
    w.add_argument(
        "--store",
        nargs="?",
        const="source",
        default=None,
        metavar="ROOT_URL",
        help="send the DICOM SEG / RTSTRUCT by STOW-RS to the series' server (or to ROOT_URL); also for a "
        "local DICOM series with ROOT_URL",
    )
    b = p.add_argument_group("many cases (a folder or a list file as INPUT)")
    b.add_argument("--overwrite", action="store_true", help="redo cases whose outputs exist")
    b.add_argument(
        "--max-cases",
        type=_count,
        default=None,
        metavar="N",
        help="process at most N unfinished cases, leave the rest for a later run",
    )
    b.add_argument(
        "--summary",
        type=Path,
        default=None,
        metavar="CSV",
        help="per-case summary CSV (default OUT_DIR/summary.csv)",
    )
    b.add_argument(
        "--num-parts",
        type=_positive,
        default=None,
        metavar="K",
        help="split the cases into K parts by a hash of their names; run one part with --part-id",
    )
    b.add_argument(
        "--part-id",
        type=_count,
        default=None,
        metavar="I",
        help="with --num-parts: the part to run, 0..K-1 (its CSV: summary.part-I-of-K.csv)",
    )
    b.add_argument(
        "--merge-parts",
        action="store_true",
        help="with --num-parts: merge the part CSVs found into the summary CSV and exit (no segmentation)",
    )
    b.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="local: this process (default); ray: a Ray cluster (the distributed extra)",
    )
    r = p.add_argument_group("Ray (--engine ray)")
    r.add_argument(
        "--address",
        default=None,
        metavar="auto|ray://HOST:PORT",
        help="the Ray cluster to join (default: $RAY_ADDRESS, else a new local instance)",
    )
    r.add_argument(
        "--workers",
        type=_positive,
        default=None,
        metavar="N",
        help="model actors (default: one per --gpus-per-worker GPUs of the cluster, 1 without GPUs)",
    )
    r.add_argument(
        "--gpus-per-worker",
        type=_fraction,
        default=None,
        metavar="G",
        help="GPUs each actor takes (default 1 on a cluster with GPUs and --device not cpu, else 0)",
    )
    r.add_argument(
        "--cpus-per-worker",
        type=_fraction,
        default=1.0,
        metavar="C",
        help="CPUs each actor takes, also its number of threads (default 1)",
    )
    r.add_argument(
        "--retries",
        type=_count,
        default=2,
        metavar="R",
        help="times a case whose worker died is sent again to another worker (default 2)",
    )
    c = p.add_argument_group("per-case prompts (without -p; see below)")
    c.add_argument(
        "--prompts-json",
        type=Path,
        default=None,
        metavar="FILE",
        help='prompts for every case ({"1": "liver"}) or by file name / name; used before the npz\'s '
        "text_prompts",
    )
    c.add_argument(
        "--normalize-prompts",
        action="store_true",
        help="map each prompt sentence to a vocabulary concept (unmapped sentences are used as written)",
    )
    p.set_defaults(func=run, prompt_items=None)


_VOLUME_ITEMS = ("box_slice", "box3d")


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def _positive(text: str) -> int:
    value = _count(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number >= 0")
    return value


def _options(args: argparse.Namespace) -> VolumeOptions:
    return options_from_args(args, "segment")


def _segmenter(args: argparse.Namespace, options: VolumeOptions) -> Segmenter:
    from medsam3.predict.segmenter import Segmenter

    return Segmenter(args.model, device=args.device, dtype=args.dtype, options=options)


def _check_out_dir(out: Path) -> None:
    try:
        is_file = out.exists() and not out.is_dir()
    except OSError as exc:  # a name the system refuses (too long, ...)
        raise write_error(out, exc) from None
    if is_file:
        raise OutputError(f"{out}: output folder is an existing file")


def _check_window(array: np.ndarray, modality: str, window: str | None, prompts) -> None:
    """The window / modality checks of the preprocessing, on one value (no work on the image)."""
    for prompt in prompts:
        intensity_parameters(np.zeros(1, dtype=array.dtype), modality, window=window, concept=prompt.text)


def _print_unknown_concepts(result) -> None:
    """One line per prompt the model does not know (reported absent, not segmented), naming what it knows."""
    from medsam3.predict.vocabulary_guard import UNKNOWN_CONCEPT

    unknown = [e for e in result.labels if e.reason == UNKNOWN_CONCEPT]
    if unknown:
        known = ", ".join(getattr(unknown[0], "known_concepts", ()))
        names = ", ".join(repr(e.name) for e in unknown)
        print(
            f"{UNKNOWN_CONCEPT}: {names} not segmented: the model knows only {known} "
            "(--allow-unknown-concepts segments any prompt)"
        )
    _print_outside_domain(
        [(e.name, e.domain_distance, e.domain_threshold) for e in result.labels if e.reason == OUTSIDE_DOMAIN]
    )


def _print_outside_domain(hits: list[tuple[str, float | None, float | None]], cases: int = 0) -> None:
    """One line for the known prompts not segmented because the image lies outside their training domain."""
    if not hits:
        return
    names = ", ".join(dict.fromkeys(repr(name) for name, _, _ in hits))
    where = f" in {cases} case(s)" if cases else ""
    name, distance, threshold = hits[0]
    detail = (
        f" (distance {distance:.3f} > {threshold:.3f} for {name!r})"
        if distance is not None and threshold is not None
        else ""
    )
    print(
        f"{OUTSIDE_DOMAIN}: {names} not segmented{where}: the image is unlike the images the model learnt "
        f"it on{detail}; --allow-out-of-domain segments it anyway"
    )


def _prompts_2d(items):
    if any(kind in _VOLUME_ITEMS for kind, _ in items):
        raise PromptError("--box-slice and --box3d are for volumes; this input is a 2D image")
    return prompts_from_cli(items)


def _print_result(result, segmenter, paths) -> None:
    print(result.table())
    _print_unknown_concepts(result)
    print(f"model: {segmenter.source}  ({result.settings['device']}, {result.settings['dtype']})")
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    sys.stdout.flush()


def _sources(args: argparse.Namespace) -> PromptSources:
    """The run's prompt sources (-p with its label ids, --prompts-json, the normaliser), checked."""
    return PromptSources.from_args(
        args.prompt_items, getattr(args, "prompts_json", None), getattr(args, "normalize_prompts", False)
    )


def run(args: argparse.Namespace) -> int:
    from medsam3.pacs.remote import check_storable, series_ref, store_target
    from medsam3.predict.batch_cases import is_batch_input

    given = [p for p in (args.input, args.input_flag) if p is not None]
    ref = series_ref(given[0] if len(given) == 1 else None, args.dicomweb, args.study, args.series)
    if ref is None or len(given) > 1:
        resolve_input(args)  # a local input, or the error for two inputs
    options = _options(args)  # the option rules, before any file is read
    target = store_target(args.store, ref)
    if target is not None:
        check_storable(args.output_type)
    many = _many_case_flags(args)
    if ref is not None or not is_batch_input(args.input):
        if many:
            raise OptionError(
                f"{', '.join(many)}: for many cases (a folder of cases or a list file as INPUT)"
            )
    if ref is not None:
        return _run_remote(args, options, ref, target)
    if is_batch_input(args.input):
        if target is not None or args.reference_series:
            raise OptionError(
                "--store and --reference-series take one series (a DICOMweb URL, a DICOM series folder or "
                "one volume), not many cases"
            )
        return _run_batch(args, options)
    paths = _run_single(args, options)
    if target is not None:
        _store(target, paths)
    return 0


def _run_remote(args: argparse.Namespace, options: VolumeOptions, ref, target: str | None) -> int:
    """Segment a series downloaded from a DICOMweb server; store the results back with ``--store``."""
    from medsam3.pacs.dicomweb import Server
    from medsam3.pacs.remote import downloaded_series
    from medsam3.predict.volume.prompts import volume_prompts_from_cli

    sources = _sources(args)
    if sources.from_cli or sources.table is None:
        volume_prompts_from_cli(list(sources.items))  # the prompts parse, before the download
    _check_out_dir(args.out)
    server = Server(ref.base_url)
    store = None if target is None else server if target == server.base_url else Server(target)
    print(f"downloading {ref}")
    sys.stdout.flush()
    with downloaded_series(server, ref) as folder:
        args.input = folder
        args.source_url = ref.url
        paths = _run_single(args, options)
    if store is not None:
        _store(store, paths)
    return 0


def _store(target, paths) -> None:
    from medsam3.pacs.dicomweb import Server
    from medsam3.pacs.remote import results_to_store

    server = target if isinstance(target, Server) else Server(target)
    files = results_to_store(paths)
    uids = server.store(files)
    for path, uid in zip(files, uids, strict=True):
        print(f"stored: {path.name} -> {server.base_url} (SOP Instance {uid})")
    sys.stdout.flush()


def _protect(args: argparse.Namespace, inputs) -> None:
    protected = list(inputs)
    if args.model and Path(args.model).exists():
        protected.append(args.model)
    protect_inputs(protected)


def _run_single(
    args: argparse.Namespace, options: VolumeOptions, segmenter: Segmenter | None = None
) -> dict[str, Path]:
    """Segment one image or volume; returns the written paths by kind."""
    from medsam3.io.readers import check_segmentable, read_image
    from medsam3.predict.batch_cases import case_name
    from medsam3.predict.segmenter import as_2d

    start = time.perf_counter()
    sources = _sources(args)
    _protect(args, [args.input])
    volume = check_segmentable(read_image(args.input, modality=args.modality), args.input)
    if getattr(args, "source_url", None):
        volume.meta["path"] = args.source_url  # the JSON names the series on its server
    image = as_2d(volume)
    if image is None:
        return _run_volume(args, volume, options, segmenter, sources, start)
    if args.mode == "track":
        raise PromptError(f"{args.input}: --mode track is for volumes; this is a 2D image")
    if args.output_type or args.per_prompt or getattr(args, "reference_series", None):
        raise OutputError(
            f"{args.input}: --output-type, --per-prompt and --reference-series are for volumes; a 2D mask "
            "is a PNG"
        )
    stem = case_name(args.input)  # a DICOM folder keeps its whole name (a Series UID has dots)
    cli = _prompts_2d(list(sources.items)) if sources.from_cli else None
    case = sources.for_case(args.input, stem, cli)
    prompts = [p for p in case.prompts(cli, volume=False) if isinstance(p, Prompt)]
    check_request(options, points=any(p.points for p in prompts))
    pixels = image.array[..., :3] if image.is_color else image.array
    for prompt in prompts:
        validate_prompt(prompt, image.spatial_shape)
        intensity_parameters(pixels, args.modality or image.modality, window=args.window, concept=prompt.text)
    _check_out_dir(args.out)
    for path in (args.out / f"{stem}_mask.png", args.out / f"{stem}_overlay.png", args.out / f"{stem}.json"):
        check_not_input(path)
    segmenter = segmenter or _segmenter(args, options)
    result, instances = apply_case_prompts(segmenter.segment(image, prompts), case)
    result.case = case.record(instances, time.perf_counter() - start)
    paths = result.write(args.out, stem, overlay=not args.no_overlay)
    _print_result(result, segmenter, paths)
    return paths


def _run_volume(
    args: argparse.Namespace,
    volume: Image,
    options: VolumeOptions,
    segmenter: Segmenter | None,
    sources: PromptSources,
    start: float,
) -> dict[str, Path]:
    from medsam3.predict.batch_cases import case_name
    from medsam3.predict.volume.outputs import check_output_types, volume_output_paths
    from medsam3.predict.volume.plan import check_volume_request
    from medsam3.predict.volume.prompts import volume_prompts_from_cli

    stem = case_name(args.input)
    cli = volume_prompts_from_cli(list(sources.items)) if sources.from_cli else None
    case = sources.for_case(args.input, stem, cli)
    prompts, *_ = check_volume_request(volume, case.prompts(cli, volume=True), options)
    _check_window(volume.array, args.modality or volume.modality, args.window, prompts)
    _check_out_dir(args.out)
    source = _reference_series(getattr(args, "reference_series", None), volume)
    check_output_types(volume, args.output_type, source)
    names = (
        dict(zip(case.label_ids, (p.display_name for p in prompts), strict=True))
        if args.per_prompt and not case.instance
        else None
    )
    paths = volume_output_paths(
        volume,
        args.out,
        stem,
        overlay=not args.no_overlay,
        output_types=args.output_type,
        per_prompt=names,
        dicom_source=source,
    )
    for path in paths.values():
        check_not_input(path)
    segmenter = segmenter or _segmenter(args, options)
    result, instances = apply_case_prompts(segmenter.segment(volume, prompts), case)
    result.case = case.record(instances, time.perf_counter() - start)
    written = result.write(
        args.out,
        stem,
        overlay=not args.no_overlay,
        output_types=args.output_type,
        per_prompt=args.per_prompt,
        dicom_source=source,
    )
    _print_result(result, segmenter, written)
    return written


def _reference_series(folder: Path | None, volume: Image) -> Image | None:
    """The DICOM series ``--reference-series`` names, checked to hold ``volume``'s grid voxel for voxel."""
    if folder is None:
        return None
    from medsam3.io.geometry import place_on_grid
    from medsam3.io.readers import read_image

    series = read_image(folder)
    if series.meta.get("format") != "dicom":
        raise OutputError(f"{folder}: --reference-series takes a DICOM series (folder or file)")
    place_on_grid(volume.with_array(np.zeros(volume.spatial_shape, dtype=np.uint8)), series, path=folder)
    return series


def _values_fit(summary: dict, label_ids: tuple[int, ...], instance: bool) -> bool:
    """Whether a case JSON's label values are those of ``label_ids`` (or of an instance task)."""
    entries = [e for e in summary.get("labels", []) if e.get("value") is not None]
    if instance:
        return all(str(e.get("name", "")).endswith(f" #{e['value']}") for e in entries)
    if list(label_ids) == list(range(1, len(label_ids) + 1)):
        return True  # the segmenter's own numbering (also 2D --instances results)
    return all(
        0 <= int(e.get("prompt_index", -1)) < len(label_ids)
        and e["value"] == label_ids[int(e["prompt_index"])]
        for e in entries
    )


#: The options of the Ray engine, by their flags.
_RAY_FLAGS = {
    "address": "--address",
    "workers": "--workers",
    "gpus_per_worker": "--gpus-per-worker",
    "cpus_per_worker": "--cpus-per-worker",
    "retries": "--retries",
}
_RAY_DEFAULTS = {
    "address": None,
    "workers": None,
    "gpus_per_worker": None,
    "cpus_per_worker": 1.0,
    "retries": 2,
}


def _many_case_flags(args: argparse.Namespace) -> list[str]:
    """The many-case options given (parts, the engine and its options), checked against each other."""
    given = [
        flag
        for name, flag in (("num_parts", "--num-parts"), ("part_id", "--part-id"))
        if getattr(args, name, None) is not None
    ]
    if getattr(args, "merge_parts", False):
        given.append("--merge-parts")
    ray_given = [f for n, f in _RAY_FLAGS.items() if getattr(args, n, _RAY_DEFAULTS[n]) != _RAY_DEFAULTS[n]]
    engine = getattr(args, "engine", "local")
    if ray_given and engine != "ray":
        raise OptionError(f"{', '.join(ray_given)}: options of --engine ray")
    if engine != "local":
        given.append(f"--engine {engine}")
    if (getattr(args, "part_id", None) is not None or getattr(args, "merge_parts", False)) and getattr(
        args, "num_parts", None
    ) is None:
        raise OptionError("--part-id and --merge-parts go with --num-parts K")
    if getattr(args, "num_parts", None) is not None:
        from medsam3.predict.parts import check_part

        if args.part_id is None and not args.merge_parts and args.num_parts > 1:
            raise OptionError("--num-parts K needs --part-id I (0..K-1), or --merge-parts")
        check_part(args.num_parts, args.part_id or 0)
    if engine == "ray" and str(args.device).startswith("cuda:"):
        raise OptionError(
            "--device cuda:N with --engine ray: Ray gives each worker its own GPUs (--gpus-per-worker); "
            "use --device cuda or auto"
        )
    return ray_given + given


@dataclass
class CaseJob:
    """How a batch run segments one case: the per-case function of ``medsam3 segment CASES``.

    The folder loop calls it as ``job(case)``; the Ray engine reads in one task (:meth:`read`) and segments
    in a model actor (:meth:`segment`), so both engines run the same code and write the same files. It
    pickles without its loaded model (:meth:`segmenter` loads it where it runs, once).
    """

    out: Path
    model: str | None
    device: str
    dtype: str
    options: VolumeOptions
    sources: PromptSources
    volume_prompts: list[VolumePrompt] | None
    prompts_2d: list[Prompt] | None
    modality: str | None = None
    output_type: list[str] | None = None
    per_prompt: bool = False
    overlay: bool = True
    protected: tuple[Path, ...] = ()
    loaded: Segmenter | None = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["loaded"] = None
        return state

    def segmenter(self) -> Segmenter:
        """The model, loaded on first use."""
        if self.loaded is None:
            from medsam3.predict.segmenter import Segmenter

            self.loaded = Segmenter(self.model, device=self.device, dtype=self.dtype, options=self.options)
        return self.loaded

    def read(self, case: Case) -> Image:
        """Read and check a case's image (the work that needs no model)."""
        from medsam3.io.readers import check_segmentable, read_image

        return check_segmentable(read_image(case.path, modality=self.modality), case.path)

    def segment(self, case: Case, loaded: Image, elapsed: float = 0.0) -> dict:
        """Segment a case read by :meth:`read` and write its outputs (the JSON last); returns the JSON
        summary. ``elapsed``: seconds already spent on the case (reading), counted in its wall time."""
        from medsam3.predict.segmenter import as_2d
        from medsam3.predict.volume.plan import check_volume_request

        start = time.perf_counter() - elapsed
        sources = self.sources
        image = as_2d(loaded)
        if image is None:
            if sources.from_cli and self.volume_prompts is None:
                raise PromptError("points are for 2D images; this case is a volume")
            wanted = sources.for_case(case.path, case.name, self.volume_prompts)
            prompts, *_ = check_volume_request(
                loaded, wanted.prompts(self.volume_prompts, volume=True), self.options
            )
            result = self.segmenter().segment(loaded, prompts)
        else:
            if sources.from_cli and self.prompts_2d is None:
                raise PromptError("--box-slice / --box3d are for volumes; this case is a 2D image")
            wanted = sources.for_case(case.path, case.name, self.prompts_2d)
            flat = [p for p in wanted.prompts(self.prompts_2d, volume=False) if isinstance(p, Prompt)]
            for prompt in flat:
                validate_prompt(prompt, image.spatial_shape)
            result = self.segmenter().segment(image, flat)
        result, instances = apply_case_prompts(result, wanted)
        volume_files: dict[str, Any] = (
            {"output_types": self.output_type, "per_prompt": self.per_prompt} if result.is_volume else {}
        )
        result.case = wanted.record(instances, time.perf_counter() - start)
        paths = result.write(self.out, case.name, overlay=self.overlay, **volume_files)
        return json.loads(paths["json"].read_text(encoding="utf-8"))

    def __call__(self, case: Case) -> dict:
        """Read, segment and write one case; returns its JSON summary."""
        start = time.perf_counter()
        loaded = self.read(case)
        return self.segment(case, loaded, time.perf_counter() - start)

    def same_prompts(self, summary: dict, case: Case) -> bool:
        """Whether a done case's JSON was made with the prompts this run gives that case."""
        from medsam3.predict.batch_cases import summary_prompts

        sources = self.sources
        volume = any("voxels" in e for e in summary.get("labels", []))
        cli: list[VolumePrompt] | list[Prompt] | None = self.volume_prompts if volume else self.prompts_2d
        if sources.from_cli and cli is None:
            return False
        wanted = sources.for_case(case.path, case.name, cli)
        made = [p.to_dict() for p in wanted.prompts(cli, volume=volume)]
        if summary_prompts(summary) != json.loads(json.dumps(made)):
            return False
        record = summary.get("case")
        if record is None:  # no case record (an older run, or stopped just before adding it): the values
            return _values_fit(summary, wanted.label_ids, wanted.instance)
        return record.get("label_ids") == list(wanted.label_ids) and bool(record.get("instance")) == (
            wanted.instance
        )


def _run_batch(args: argparse.Namespace, options: VolumeOptions) -> int:
    from medsam3.predict.batch_cases import discover_cases, run_cases
    from medsam3.predict.parts import merge_part_summaries, part_summary_path, select_part
    from medsam3.predict.volume.prompts import volume_prompts_from_cli

    sources = _sources(args)
    cases = discover_cases(args.input, exclude=[args.out])
    cohort_csv: Path = args.summary or args.out / "summary.csv"
    num_parts = getattr(args, "num_parts", None) or 1
    part_id = getattr(args, "part_id", None) or 0
    if getattr(args, "merge_parts", False):
        report = merge_part_summaries(cohort_csv, num_parts, cases)
        _print_merge(report, num_parts)
        return 0
    # the cases (and a list file) are protected, not the folder holding them: OUT_DIR may lie inside it
    _protect(args, [*(c.path for c in cases), *([args.input] if args.input.is_file() else [])])
    _check_out_dir(args.out)
    check_not_input(cohort_csv)
    part_csv = part_summary_path(cohort_csv, part_id, num_parts) if num_parts > 1 else cohort_csv
    check_not_input(part_csv)
    if CHALLENGE_TYPE in (args.output_type or ()):
        for c in cases:  # <name>.npz: the input's own name when OUT_DIR is the input folder
            try:
                check_not_input(args.out / f"{c.name}.npz")
            except OutputError as exc:
                raise OutputError(
                    f"{exc}: --output-type {CHALLENGE_TYPE} names each prediction like its input; choose an "
                    "OUT_DIR other than the input folder"
                ) from None
    if (
        not sources.from_cli
        and sources.table is None
        and not any(c.path.suffix.lower() == ".npz" for c in cases)
    ):
        raise PromptError(
            "no prompt given: use -p TEXT, --prompts-json FILE, or npz cases holding text_prompts"
        )
    items = list(sources.items)
    has_points = any(kind == "point" for kind, _ in items)
    has_volume_items = any(kind in _VOLUME_ITEMS for kind, _ in items)
    if has_points and has_volume_items:
        raise PromptError("points (2D images) and --box-slice / --box3d (volumes) cannot be mixed")
    volume_prompts: list[VolumePrompt] | None = None
    prompts_2d: list[Prompt] | None = None
    names: list[str] = []
    if sources.from_cli:
        volume_prompts = None if has_points else volume_prompts_from_cli(items)
        prompts_2d = None if has_volume_items else prompts_from_cli(items)
        given = volume_prompts or prompts_2d
        assert given is not None  # points and --box-slice / --box3d together were refused above
        names = [p.display_name for p in given]
    check_request(options, points=has_points)
    protected = [*(c.path for c in cases), *([args.input] if args.input.is_file() else [])]
    if args.model and Path(args.model).exists():
        protected.append(Path(args.model))
    job = CaseJob(
        out=args.out,
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        options=options,
        sources=sources,
        volume_prompts=volume_prompts,
        prompts_2d=prompts_2d,
        modality=args.modality,
        output_type=args.output_type,
        per_prompt=args.per_prompt,
        overlay=not args.no_overlay,
        protected=tuple(protected),
    )
    todo = select_part(cases, num_parts, part_id) if num_parts > 1 else cases
    common: dict[str, Any] = dict(
        same_case_prompts=job.same_prompts,
        label_names=names,
        overwrite=args.overwrite,
        max_cases=args.max_cases,
        summary_csv=part_csv,
        case_columns=not sources.from_cli,
    )
    if getattr(args, "engine", "local") == "ray":
        from medsam3.predict.ray_engine import RaySettings, run_cases_ray

        settings = RaySettings(
            address=args.address,
            workers=args.workers,
            gpus_per_worker=args.gpus_per_worker,
            cpus_per_worker=args.cpus_per_worker,
            retries=args.retries,
            cpu_only=args.device == "cpu",
        )
        outcomes = run_cases_ray(
            todo, job, args.out, settings=settings, shared_folder=num_parts > 1, **common
        )
    else:
        job.segmenter()  # the model loads (or fails) before any case is looked at
        outcomes = run_cases(todo, job, args.out, shared_folder=num_parts > 1, **common)
    return _report_batch(outcomes, len(todo), part_csv, cohort_csv, cases, num_parts, part_id)


def _print_merge(report, num_parts: int) -> None:
    print(
        f"merged {len(report.parts)} of {num_parts} part summaries ({report.rows} cases) into {report.path}"
        + (f"; no summary yet from part(s) {', '.join(map(str, report.missing))}" if report.missing else "")
    )


def _print_batch_unknown_concepts(outcomes: list[CaseOutcome]) -> None:
    """One line when some cases' prompts were unknown to the model (reported absent, not segmented)."""
    from medsam3.predict.vocabulary_guard import UNKNOWN_CONCEPT

    hits = [(o, e) for o in outcomes for e in o.labels if e.get("reason") == UNKNOWN_CONCEPT]
    if hits:
        names = ", ".join(sorted({repr(e.get("name")) for _, e in hits}))
        known = ", ".join(hits[0][1].get("known_concepts") or ())
        cases = len({o.case.name for o, _ in hits})
        print(
            f"{UNKNOWN_CONCEPT}: {names} not segmented in {cases} case(s): the model knows only {known} "
            "(--allow-unknown-concepts segments any prompt)"
        )
    outside = [(o, e) for o in outcomes for e in o.labels if e.get("reason") == OUTSIDE_DOMAIN]
    _print_outside_domain(
        [(str(e.get("name")), e.get("domain_distance"), e.get("domain_threshold")) for _, e in outside],
        cases=len({o.case.name for o, _ in outside}),
    )


def _report_batch(
    outcomes: list[CaseOutcome],
    total: int,
    part_csv: Path,
    cohort_csv: Path,
    cases: list[Case],
    num_parts: int,
    part_id: int,
) -> int:
    """Print the run's counts (and merge the part summaries); the exit status: 1 when a case failed."""
    counts = {s: sum(o.status == s for o in outcomes) for s in ("ok", "skipped", "failed")}
    left = total - len(outcomes)
    head = (
        f"part {part_id} of {num_parts}: {total} of {len(cases)} cases" if num_parts > 1 else f"{total} cases"
    )
    print(
        f"{head}: {counts['ok']} ok, {counts['skipped']} skipped (already done), "
        f"{counts['failed']} failed" + (f", {left} left for a later run" if left else "")
    )
    _print_batch_unknown_concepts(outcomes)
    print(f"summary: {part_csv}")
    if num_parts > 1:
        from medsam3.predict.parts import merge_part_summaries

        _print_merge(merge_part_summaries(cohort_csv, num_parts, cases), num_parts)
    sys.stdout.flush()
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:
        print("failed cases:", file=sys.stderr)
        for o in failed:
            print(f"  {o.case.name} ({o.case.path}): {o.error}", file=sys.stderr)
        return 1
    return 0
