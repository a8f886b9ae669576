"""The ``medsam3`` command line: ``medsam3 <command> ...``.

Each subcommand lives in :mod:`medsam3.commands` and is registered here. A user error
(:class:`~medsam3.errors.MedSam3Error`) prints ``error: <message>`` and exits with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
import threading
from collections.abc import Callable

from medsam3 import __version__
from medsam3.errors import MedSam3Error

#: Subcommand modules, in the order ``medsam3 --help`` lists them.
COMMANDS = ("info", "preview", "segment", "watch", "convert", "prepare", "train", "evaluate", "serve")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medsam3", description="Prompt-driven medical image segmentation with SAM3."
    )
    parser.add_argument("--version", action="version", version=f"medsam3 {__version__}")
    _add_verbosity(parser, default=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"medsam3.commands.{name}")
        except ModuleNotFoundError as exc:  # a command whose module is not part of this build
            if exc.name == f"medsam3.commands.{name}":
                continue
            raise
        module.register(sub)
    for command in sub.choices.values():  # -v / -q also after the subcommand: medsam3 segment ... -v
        _add_verbosity(command, default=argparse.SUPPRESS)
    return parser


def _add_verbosity(parser: argparse.ArgumentParser, default: object) -> None:
    """``-v/--verbose`` and ``-q/--quiet``; on subcommands with ``SUPPRESS`` defaults, so that a flag given
    before the subcommand is not reset by the subcommand's parser."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="store_true", default=default, help="log debug messages")
    group.add_argument(
        "-q", "--quiet", action="store_true", default=default, help="log warnings and errors only"
    )


def _quiet_libraries() -> None:
    """Silence transformers' weight-loading progress bars and info logs, and the per-request / per-module
    info logs of the DICOM libraries (all kept with ``--verbose``)."""
    for name in ("dicomweb_client", "highdicom"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except (
        SystemExit
    ) as exc:  # --help / --version (0), a usage error (2, message printed): a status, as below
        return exc.code if isinstance(exc.code, int) else 2
    if args.verbose and args.quiet:  # one before the subcommand, the other after it
        print("error: -v/--verbose and -q/--quiet cannot be combined", file=sys.stderr)
        return 2
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        _quiet_libraries()
    received: list[int] = []
    restore = _terminate_as_interrupt(received)
    try:
        return int(args.func(args) or 0)
    except MedSam3Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted" + (" (SIGTERM)" if received else ""), file=sys.stderr)
        return 128 + (received[0] if received else signal.SIGINT)
    finally:
        restore()


def _terminate_as_interrupt(received: list[int]) -> Callable[[], None]:
    """Handle SIGTERM (sent by ``timeout``, schedulers, container and service managers) like Ctrl-C: the
    command stops cleanly (no temporary left, a folder run writes its summary). Returns the function that
    puts the previous handler back. Only the main thread can install handlers; elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def interrupt(signum: int, frame: object) -> None:
        received.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)

    def restore() -> None:
        signal.signal(signal.SIGTERM, previous)

    return restore


if __name__ == "__main__":
    sys.exit(main())
