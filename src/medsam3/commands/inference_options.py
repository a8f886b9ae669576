"""Command-line options generated from :mod:`medsam3.predict.options`, and the model / device options.

:func:`add_option_arguments` adds one argparse option per inference option a front end offers (flag
``--threshold`` for the field ``threshold``, type, default, range and help from the declaration), so
``medsam3 segment`` and ``medsam3 evaluate`` cannot drift from the Python API; :func:`options_from_args`
builds the options back from the parsed arguments. A bad value is refused by argparse with the same
message Python gives (:class:`~medsam3.errors.OptionError`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from medsam3.errors import OptionError
from medsam3.predict.options import (
    OptionInfo,
    SegmentOptions,
    VolumeOptions,
    check_value,
    default_of,
    option_fields,
    option_names,
)

#: ``--device`` values: any of these, or ``cuda:N``.
DEVICES = ("auto", "cpu", "cuda", "mps")
#: ``--dtype`` values (``int8``: dynamic int8 linear layers, CPU only; see :mod:`medsam3.model.quantize`).
DTYPES = ("auto", "fp32", "bf16", "fp16", "int8")


def flag_of(name: str) -> str:
    """The command-line flag of option ``name`` (``min_slices`` -> ``--min-slices``)."""
    return "--" + name.replace("_", "-")


def device_name(text: str) -> str:
    """An argparse type for ``--device``: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (checked
    against the machine when the model is loaded)."""
    if text in DEVICES:
        return text
    head, _, index = text.partition(":")
    if head == "cuda" and index.isdigit():
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: expected auto, cpu, cuda, cuda:N or mps")


def add_model_arguments(parser: argparse.ArgumentParser | Any, *, model_help: str | None = None) -> None:
    """``--model``, ``--device`` and ``--dtype`` (``model_help=None``: no ``--model``)."""
    if model_help is not None:
        parser.add_argument("--model", help=model_help)
    parser.add_argument(
        "--device",
        type=device_name,
        default="auto",
        metavar="auto|cpu|cuda|cuda:N|mps",
        help="where the model runs (default auto: CUDA, else MPS, else CPU)",
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="model precision (default auto: bf16 on CUDA, fp32 elsewhere); int8: the vision encoder's "
        "linear layers dynamically quantized to int8, CPU only (faster, slightly less accurate)",
    )


def _arg_type(name: str, annotation: Any, info: OptionInfo) -> Any:
    def convert(text: str) -> Any:
        try:
            return check_value(name, text, annotation, info)
        except OptionError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = name  # argparse names the type in some messages
    return convert


def _shown(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


def add_option_arguments(
    parser: argparse.ArgumentParser | Any,
    front: str,
    volume_group: argparse.ArgumentParser | Any | None = None,
) -> None:
    """One argparse option per inference option that ``front`` offers; the options only volumes have go
    to ``volume_group`` when given."""
    plain = set(option_names(SegmentOptions))
    for f, info in option_fields(VolumeOptions, front):
        target = parser if volume_group is None or f.name in plain else volume_group
        default = default_of(f.name, front)
        flag = flag_of(f.name)
        if str(f.type) == "bool":
            if info.negatable:
                target.add_argument(
                    flag,
                    action=argparse.BooleanOptionalAction,
                    default=default,
                    help=f"{info.help} (default {_shown(default)})",
                )
            else:
                target.add_argument(flag, action="store_true", default=default, help=info.help)
            continue
        metavar = info.metavar
        if metavar is None and info.choices is not None:
            metavar = "|".join(map(str, info.choices))
        shown = "" if "default" in info.help else f" (default {_shown(default)})"
        target.add_argument(
            flag,
            type=_arg_type(f.name, f.type, info),
            default=default,
            metavar=metavar,
            help=info.help + shown,
        )


def options_from_args(args: argparse.Namespace, front: str, cls: type[SegmentOptions] = VolumeOptions) -> Any:
    """``cls`` from the parsed options of ``front`` (other fields keep their defaults)."""
    values = {f.name: getattr(args, f.name) for f, _ in option_fields(cls, front) if hasattr(args, f.name)}
    return cls(**values)


def given_options(args: argparse.Namespace, front: str) -> list[str]:
    """The flags of ``front``'s inference options set to something other than their default."""
    return [
        flag_of(f.name)
        for f, _ in option_fields(VolumeOptions, front)
        if getattr(args, f.name, default_of(f.name, front)) != default_of(f.name, front)
    ]


def input_value(text: str) -> Path | str:
    """An input path as a :class:`~pathlib.Path`; a ``dicomweb+http(s)://`` URL stays a string (a ``Path``
    would fold its ``//``)."""
    if text.lower().startswith(("dicomweb+http://", "dicomweb+https://")):
        return text
    return Path(text)


def input_argument(parser: argparse.ArgumentParser, help: str) -> None:
    """The input as a positional argument or ``-i/--input`` (nnU-Net's and TotalSegmentator's spelling)."""
    parser.add_argument("input", type=input_value, nargs="?", metavar="INPUT", help=help + " (or -i INPUT)")
    parser.add_argument(
        "-i",
        "--input",
        dest="input_flag",
        type=input_value,
        metavar="INPUT",
        default=None,
        help="the input, as an option",
    )


def resolve_input(args: argparse.Namespace) -> Path | str:
    """The input given positionally or with ``-i``; exactly one of them.

    Raises:
        OptionError: none or both given.
    """
    given = [p for p in (args.input, args.input_flag) if p is not None]
    if len(given) != 1:
        raise OptionError(
            "give the input once: as INPUT or with -i/--input" + ("" if given else " (none given)")
        )
    args.input = given[0]
    return given[0]
