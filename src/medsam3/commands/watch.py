"""``medsam3 watch ORTHANC_URL -p TEXT [...] -o OUT_DIR``: a PACS node that segments new series.

Follows the Orthanc server's change feed, segments every stable series the ``--select`` rules accept with
the configured prompts (the model loaded once), writes the outputs to ``OUT_DIR`` as ``medsam3 segment``
does for a series (``<SeriesInstanceUID>_seg.nii.gz``, ``..._seg.dcm``, ...) and stores the DICOM SEG /
RTSTRUCT back in the series' study by STOW-RS. Progress lives in a SQLite state file (default
``OUT_DIR/watch.sqlite``): a restart neither skips nor repeats a series; a failing series is retried with
back-off and parked after ``--max-attempts`` (``--status`` lists them). Loop and guarantees:
:mod:`medsam3.pacs.watch`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medsam3.commands.inference_options import add_model_arguments, add_option_arguments, options_from_args
from medsam3.commands.segment import PromptItem
from medsam3.errors import OptionError
from medsam3.predict.volume.outputs import OUTPUT_TYPES

EPILOG = """\
example (Orthanc with its DICOMweb plugin on this machine; credentials from the environment):
  export MEDSAM3_DICOMWEB_USER=medsam3 MEDSAM3_DICOMWEB_PASSWORD=...
  medsam3 watch http://localhost:8042 -p liver -p spleen --select Modality=CT \\
      --select "SeriesDescription=*abdomen*" -o /data/medsam3-results
  medsam3 watch http://localhost:8042 -o /data/medsam3-results --status     # what was done / parked
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "watch",
        help="follow an Orthanc server, segment new series and store the results back",
        description="Follow an Orthanc server's change feed: segment each new stable series that the "
        "--select rules accept with the given prompts, write the outputs to OUT_DIR and store the DICOM "
        "SEG / RTSTRUCT back by STOW-RS. Credentials: MEDSAM3_DICOMWEB_TOKEN, or MEDSAM3_DICOMWEB_USER "
        "and MEDSAM3_DICOMWEB_PASSWORD.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("server", metavar="ORTHANC_URL", help="Orthanc's base URL, http(s)://HOST:PORT")
    p.add_argument(
        "-p",
        "--prompt",
        dest="prompt_items",
        action=PromptItem,
        const="text",
        metavar="TEXT",
        help="a concept to segment in every series; repeat for several",
    )
    p.add_argument("-o", "--out", type=Path, required=True, metavar="OUT_DIR", help="output folder")
    p.add_argument(
        "--select",
        action="append",
        metavar="TAG=PATTERN",
        help="segment only series whose DICOM TAG matches PATTERN (shell pattern, case-insensitive); "
        "repeat: all must match (e.g. Modality=CT, 'SeriesDescription=*abdomen*')",
    )
    p.add_argument(
        "--dicomweb-root",
        default="/dicom-web",
        metavar="PATH",
        help="path of the DICOMweb plugin (/dicom-web)",
    )
    p.add_argument("--state", type=Path, metavar="FILE", help="state file (default OUT_DIR/watch.sqlite)")
    p.add_argument("--no-store", action="store_true", help="write the outputs locally only, store nothing")
    p.add_argument("--once", action="store_true", help="stop when every selected series is done or parked")
    p.add_argument("--status", action="store_true", help="print the state (done, failed, parked) and exit")
    p.add_argument("--poll", type=_positive, default=5.0, metavar="S", help="seconds between feed reads (5)")
    p.add_argument("--max-attempts", type=int, default=3, metavar="N", help="attempts before parking (3)")
    p.add_argument(
        "--retry-delay", type=_positive, default=30.0, metavar="S", help="first retry delay, doubling (30)"
    )
    add_model_arguments(
        p, model_help="model folder or id (default: the configured model, else the bundled one)"
    )
    p.add_argument("--no-overlay", action="store_true", help="do not write the overlay PNGs")
    p.add_argument(
        "--output-type",
        nargs="+",
        choices=OUTPUT_TYPES,
        metavar="TYPE",
        help=f"label-map files, one or more of {', '.join(OUTPUT_TYPES)} (default nifti and dicom-seg)",
    )
    p.add_argument("--per-prompt", action="store_true", help="also one binary file per concept")
    add_option_arguments(p, "segment", p.add_argument_group("volumes"))
    p.set_defaults(func=run, prompt_items=None)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of seconds")
    return value


def run(args: argparse.Namespace) -> int:
    from medsam3.pacs.watch import Orthanc, Selection, Watcher, WatchState, status_table

    state = WatchState(args.state or args.out / "watch.sqlite")
    if args.status:
        print(status_table(state.rows()))
        return 0
    if args.max_attempts < 1:
        raise OptionError("--max-attempts must be at least 1")
    if not any(kind == "text" for kind, _ in args.prompt_items or []):
        raise OptionError("give at least one prompt: -p TEXT")
    selection = Selection.parse(args.select)
    options = options_from_args(args, "segment")
    if not args.no_store:
        from medsam3.pacs.remote import check_storable

        check_storable(args.output_type)
    orthanc = Orthanc(args.server, args.dicomweb_root)
    handle = _handler(args, options, store=not args.no_store)
    watcher = Watcher(
        orthanc,
        state,
        selection,
        handle,
        max_attempts=args.max_attempts,
        retry_delay=args.retry_delay,
        poll=args.poll,
        echo=_echo,
    )
    print(f"watching {orthanc.url} (state {state.path}); Ctrl-C stops")
    parked = watcher.run(once=args.once)
    if parked:
        print(status_table(state.rows("parked")), file=sys.stderr)
        return 1
    return 0


def _echo(line: str) -> None:
    print(line)
    sys.stdout.flush()


def _handler(args: argparse.Namespace, options, *, store: bool):
    """The per-series work: download, segment (one model for all series), write, store."""
    from medsam3.commands.segment import _run_single, _segmenter
    from medsam3.pacs.dicomweb import Server
    from medsam3.pacs.remote import downloaded_series, results_to_store

    segmenter = _segmenter(args, options)
    servers: dict[str, Server] = {}

    def handle(ref) -> dict:
        server = servers.setdefault(ref.base_url, Server(ref.base_url))
        case = argparse.Namespace(**vars(args))
        with downloaded_series(server, ref) as folder:
            case.input = folder
            case.source_url = ref.url
            paths = _run_single(case, options, segmenter)
        stored = server.store(results_to_store(paths)) if store else []
        return {"outputs": {k: p.name for k, p in paths.items()}, "stored": stored}

    return handle
