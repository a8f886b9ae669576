"""The ``medsam3`` command line: ``medsam3 <command> ...``.

Each subcommand lives in :mod:`medsam3.commands` and is registered here. A user error
(:class:`~medsam3.errors.MedSam3Error`) prints ``error: <message>`` and exits with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from medsam3 import __version__
from medsam3.errors import MedSam3Error

#: Subcommand modules, in the order ``medsam3 --help`` lists them.
COMMANDS = ("info", "preview", "segment", "convert", "prepare", "train", "evaluate", "serve")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medsam3", description="Prompt-driven medical image segmentation with SAM3."
    )
    parser.add_argument("--version", action="version", version=f"medsam3 {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"medsam3.commands.{name}")
        except ModuleNotFoundError as exc:  # a command whose module is not part of this build
            if exc.name == f"medsam3.commands.{name}":
                continue
            raise
        module.register(sub)
    return parser


def _quiet_libraries() -> None:
    """Silence transformers' weight-loading progress bars and info logs (kept with ``--verbose``)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    if not args.verbose:
        _quiet_libraries()
    try:
        return int(args.func(args) or 0)
    except MedSam3Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
