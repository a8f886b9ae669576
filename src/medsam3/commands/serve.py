"""``medsam3 serve``: the HTTP API and the web viewer (see :mod:`medsam3.serve`).

The model is loaded once before the server listens; a model that cannot be loaded, a bad setting or a
missing web package is an ``error: ...`` with exit status 2. The server listens on the loopback address
unless told otherwise; listening elsewhere without a token prints a loud warning.
"""

from __future__ import annotations

import argparse
import logging
import sys

from medsam3.commands.inference_options import add_model_arguments, add_option_arguments
from medsam3.errors import MedSam3Error

log = logging.getLogger("medsam3.serve")

EPILOG = """\
examples:
  medsam3 serve                               viewer at http://127.0.0.1:8000/ (API docs at /docs)
  medsam3 serve --model ./my-model --workers 2 --result-ttl 600
  MEDSAM3_TOKEN=... medsam3 serve --host 0.0.0.0   reachable from other machines, token required

API in short (JSON errors {"error": "..."}):
  curl -F file=@scan.nii.gz http://127.0.0.1:8000/api/images            -> {"image_id": ...}
  curl -H 'Content-Type: application/json' -d '{"prompts": [{"text": "liver"}]}' \\
       http://127.0.0.1:8000/api/images/IMAGE_ID/segment                 -> {"job_id": ...}
  curl http://127.0.0.1:8000/api/jobs/JOB_ID                             -> status queued/running/done/failed
  curl -OJ http://127.0.0.1:8000/api/jobs/JOB_ID/mask                    -> label map (upload's format)
"""


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text} must be positive")
        return value

    return parse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="HTTP API and web viewer: upload, segment, review, download",
        description="Serve the segmentation model over HTTP with a web viewer: upload an image or volume "
        "(NIfTI, NRRD, DICOM series as .zip, PNG, JPEG), segment it from text / box / point prompts, "
        "review the overlay and download the label map in the upload's format.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--max-storage-mb",
        type=_positive(float),
        default=20480.0,
        metavar="MB",
        help="disk budget of the work folder (uploads and results, default 20480); the oldest idle images "
        "expire first when an upload needs room, then uploads get 507",
    )
    p.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a Host name the server also answers as (repeat; besides localhost, loopback and --host); "
        "requests naming another host are refused (DNS rebinding)",
    )
    add_model_arguments(
        p,
        model_help="model folder or id (default: $MEDSAM3_MODEL, the configured model, else the bundled one)",
    )
    p.add_argument(
        "--max-upload-mb",
        type=_positive(float),
        default=512.0,
        help="largest upload in MB (default 512); larger ones get 413",
    )
    p.add_argument(
        "--max-voxels",
        type=_positive(int),
        default=2**27,
        help="largest image in voxels, judged from its header (default 134217728)",
    )
    p.add_argument(
        "--workers", type=_positive(int), default=1, help="segmentations running at once (default 1)"
    )
    p.add_argument(
        "--queue-size",
        type=_positive(int),
        default=16,
        help="segmentations waiting at most; beyond it requests get 503 (default 16)",
    )
    p.add_argument(
        "--result-ttl",
        type=_positive(float),
        default=3600.0,
        metavar="SECONDS",
        help="results and unused uploads are removed after this many seconds (default 3600)",
    )
    p.add_argument(
        "--token",
        help="access token required by every endpoint (default: $MEDSAM3_TOKEN; none: no authentication)",
    )
    p.add_argument(
        "--work-dir", help="folder for uploads and results (default: a temporary folder removed at exit)"
    )
    p.add_argument(
        "--cache-items",
        type=_positive(int),
        default=8,
        help="images whose vision features are kept (default 8)",
    )
    p.add_argument(
        "--cache-mb",
        type=_positive(float),
        default=2048.0,
        help="memory for cached vision features in MB (default 2048)",
    )
    # the server's defaults for requests that leave them out (declared in medsam3.predict.options)
    add_option_arguments(p, "serve")
    p.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace):
    """:class:`~medsam3.serve.settings.ServeSettings` from the parsed arguments (token from the env too)."""
    from medsam3.serve.settings import ServeSettings, token_from_env

    return ServeSettings(
        host=args.host,
        port=args.port,
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        token=token_from_env(args.token),
        work_dir=args.work_dir,
        max_upload_mb=args.max_upload_mb,
        max_voxels=args.max_voxels,
        workers=args.workers,
        queue_size=args.queue_size,
        result_ttl=args.result_ttl,
        cache_items=args.cache_items,
        cache_mb=args.cache_mb,
        allowed_hosts=tuple(args.allowed_host),
        max_storage_mb=args.max_storage_mb,
        threshold=args.threshold,
        presence_threshold=args.presence_threshold,
    )


def exposure_warning(settings) -> str | None:
    """The warning for a server reachable from other machines without a token (``None`` when fine)."""
    if settings.is_loopback or settings.token is not None:
        return None
    bar = "!" * 78
    return (
        f"{bar}\nWARNING: listening on {settings.host}:{settings.port} WITHOUT A TOKEN.\n"
        "Anyone who can reach this address can upload images, run the model and read results.\n"
        "Set --token (or $MEDSAM3_TOKEN), or listen on 127.0.0.1.\n" + bar
    )


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from medsam3.serve.app import create_app
    except ModuleNotFoundError as exc:
        raise MedSam3Error(
            f"`medsam3 serve` needs the web packages ({exc.name} is missing): "
            "pip install fastapi uvicorn python-multipart"
        ) from None
    settings = settings_from_args(args)
    warning = exposure_warning(settings)
    if warning:
        print(warning, file=sys.stderr, flush=True)
        log.warning("listening on %s without a token", settings.host)
    app = create_app(settings)
    where = f"http://{settings.host if ':' not in settings.host else f'[{settings.host}]'}:{settings.port}/"
    print(
        f"medsam3 serve: viewer at {where}  API docs at {where}docs  (Ctrl+C stops)",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info", access_log=False)
    return 0
