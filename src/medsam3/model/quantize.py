"""int8 on the CPU: dynamic quantization of a SAM3 model's linear layers with PyTorch's own tools.

:func:`quantize_int8` replaces the ``torch.nn.Linear`` layers of chosen parts of a model by
``torch.ao.nn.quantized.dynamic.Linear`` (``torch.ao.quantization.quantize_dynamic``, ``qint8``): weights
stored as int8 with one scale per tensor, activations quantized per call from their own range, the product
accumulated in int32 and returned in float32. Convolutions, normalisations, embeddings and every other
module keep their float32 weights. The quantized kernels (fbgemm / qnnpack) exist on the CPU only.

What is quantized (:data:`INT8_PARTS`): the vision encoder's linear layers, which do most of the work of a
slice (the ViT's attention projections and MLPs, about 5 TFLOP per 1008 px slice at full size); with
``parts="all"`` every linear layer of the model (text encoder, DETR encoder and decoder, heads too).

:func:`dtype_label` names a model's precision for the settings of a result, the server's ``/api/info``
and ``Engine.describe()``: ``"float32"``, or for a quantized model which linear layers are int8
(:data:`INT8_LABEL`: ``"int8 (dynamic): vision encoder's linear layers; the rest float32"``, what
``--dtype int8`` does); :func:`dequantized_copy` gives back a float32 copy (used to build an image model
at another input size, which is then quantized again).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from medsam3.errors import ModelError

#: The ``--dtype`` value of dynamic int8 quantization.
INT8 = "int8"
#: How a result's settings name the precision of a model quantized by ``--dtype int8`` (its vision encoder's
#: linear layers; :func:`dtype_label`).
INT8_LABEL = "int8 (dynamic): vision encoder's linear layers; the rest float32"
#: The same for a model whose every linear layer is int8 (``quantize_int8(model, "all")``).
INT8_ALL_LABEL = "int8 (dynamic): every linear layer; the rest float32"
#: Which parts of each model kind :func:`quantize_int8` quantizes by default: the vision encoder
#: (``Sam3Model`` and ``Sam3TrackerModel``: ``vision_encoder``; ``Sam3VideoModel``: its detector's).
INT8_PARTS: dict[str, tuple[str, ...]] = {
    "Sam3Model": ("vision_encoder",),
    "Sam3TrackerModel": ("vision_encoder",),
    "Sam3VideoModel": ("detector_model.vision_encoder",),
}


def is_int8_name(dtype: object) -> bool:
    """Whether a ``--dtype`` value asks for int8 (``"int8"``, ``"qint8"``, any case)."""
    return isinstance(dtype, str) and dtype.strip().lower() in ("int8", "qint8")


def check_int8_device(device: torch.device, asked: object = None) -> None:
    """Refuse int8 on anything but the CPU.

    Raises:
        ModelError: ``device`` is not the CPU (the message names it, and ``asked`` when it was ``auto``).
    """
    if device.type != "cpu":
        how = f" (chosen by --device {asked})" if asked is not None and str(asked) != str(device) else ""
        raise ModelError(
            f"--dtype int8 runs on the CPU only, not on {device}{how}: PyTorch's dynamic int8 kernels are "
            "CPU kernels. Add --device cpu, or use --dtype bf16 / fp16 on a GPU"
        )


def quantized_linear_type() -> type[torch.nn.Module]:
    """PyTorch's dynamically quantized linear layer class."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return DynamicLinear


def is_int8(model: torch.nn.Module) -> bool:
    """Whether ``model`` holds dynamically quantized linear layers."""
    kind = quantized_linear_type()
    return any(isinstance(m, kind) for m in model.modules())


def dtype_label(model: torch.nn.Module) -> str:
    """The precision of ``model``: its float dtype (``"float32"``) when nothing is quantized; else which
    linear layers are int8: :data:`INT8_LABEL` (those of the vision encoder, :data:`INT8_PARTS`),
    :data:`INT8_ALL_LABEL` (every one), or ``"int8 (dynamic): N of M linear layers; ..."``."""
    kind = quantized_linear_type()
    quantized = [name for name, m in model.named_modules() if isinstance(m, kind)]
    if not quantized:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        return str(dtype).replace("torch.", "")
    counts = count_linear(model)
    if counts["float"] == 0:
        return INT8_ALL_LABEL
    parts = INT8_PARTS.get(type(model).__name__, ())
    inside = [m for part in parts for m in _linear_names(model, part)]
    if parts and sorted(inside) == sorted(quantized):
        return INT8_LABEL
    total = len(quantized) + counts["float"]
    return f"int8 (dynamic): {len(quantized)} of {total} linear layers; the rest float32"


def _linear_names(model: torch.nn.Module, part: str) -> list[str]:
    """Qualified names of the linear layers (float or int8) inside ``model``'s submodule ``part``."""
    kind = quantized_linear_type()
    try:
        sub = model.get_submodule(part)
    except AttributeError:
        return []
    return [
        f"{part}.{name}" if name else part
        for name, m in sub.named_modules()
        if isinstance(m, kind) or type(m) is torch.nn.Linear
    ]


def _parts_of(model: torch.nn.Module, parts: str | Sequence[str] | None) -> list[tuple[str, torch.nn.Module]]:
    if parts == "all":
        return [("", model)]
    if parts is None:
        name = type(model).__name__
        if name not in INT8_PARTS:
            raise ModelError(f"--dtype int8: no quantization plan for a {name} (expected a SAM3 model)")
        parts = INT8_PARTS[name]
    if isinstance(parts, str):
        parts = (parts,)
    out = []
    for part in parts:
        try:
            out.append((part, model.get_submodule(part)))
        except AttributeError as exc:
            raise ModelError(f"--dtype int8: {type(model).__name__} has no part {part!r}") from exc
    return out


def quantize_int8(model: Any, parts: str | Sequence[str] | None = None) -> Any:
    """Quantize the linear layers of ``model`` (float32, on the CPU) to dynamic int8, in place; returns it.

    Args:
        model: a SAM3 model (``Sam3Model``, ``Sam3TrackerModel``, ``Sam3VideoModel``) or any module.
        parts: dotted names of the submodules to quantize (``None``: :data:`INT8_PARTS` of the model's
            class; ``"all"``: every linear layer of ``model``).

    Raises:
        ModelError: the model is not float32 on the CPU, or a part does not exist.
    """
    params = [p for p in model.parameters() if p.is_floating_point()]
    if params and params[0].device.type != "cpu":
        check_int8_device(params[0].device)
    if any(p.dtype != torch.float32 for p in params):
        raise ModelError("--dtype int8: quantize a float32 model (its non-linear layers stay float32)")
    model.eval()
    for name, part in _parts_of(model, parts):
        with warnings.catch_warnings():
            # torch.ao.quantization announces its move to torchao; the eager API still works in torch 2.x
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", UserWarning)
            # quantize_dynamic swaps children only: a part that is itself a linear layer goes in a holder
            holder = torch.nn.ModuleDict({"part": part})
            torch.ao.quantization.quantize_dynamic(holder, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
        done = holder["part"]
        if done is not part:  # a bare nn.Linear is replaced, not changed in place
            if name == "":
                return done
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, done)
    return model


def dequantized_copy(model: Any) -> Any:
    """A float32 copy of ``model`` with each quantized linear layer back as ``torch.nn.Linear`` holding the
    dequantized int8 weights (``model`` is not changed)."""
    kind = quantized_linear_type()
    out = copy.deepcopy(model)
    for name, module in list(out.named_modules()):
        if not isinstance(module, kind):
            continue
        weight, bias = module.weight().dequantize(), module.bias()  # type: ignore[operator]  # methods
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(bias)
        parent, _, child = name.rpartition(".")
        setattr(out.get_submodule(parent) if parent else out, child, linear)
    return out.eval()


def count_linear(model: torch.nn.Module) -> dict[str, int]:
    """How many linear layers ``model`` holds: ``{"int8": ..., "float": ...}``."""
    kind = quantized_linear_type()
    mods = list(model.modules())
    return {
        "int8": sum(isinstance(m, kind) for m in mods),
        "float": sum(type(m) is torch.nn.Linear for m in mods),
    }
