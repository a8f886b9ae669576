"""bf16 autocast on a CPU: SAM3's geometry encoder runs in float32.

Training with ``mixed_precision: bf16`` and no GPU runs the model under CPU autocast. There, transformers'
``Sam3GeometryEncoder`` (which pools box features with torchvision's ``roi_align``, and also runs for
text-only prompts to make Meta's CLS token) fails: its box coordinates come in as bfloat16, it casts them
to float16 for ``roi_align``, and ``torch.cat`` of float16 tensors inside CPU autocast raises
"Unexpected floating ScalarType in at::autocast::prioritize".

:func:`geometry_encoder_in_fp32` wraps the encoder's ``forward`` on one model instance: while CPU autocast
is on, the encoder runs with autocast off and with its floating-point inputs cast to float32, so it
computes exactly what it computes in a float32 run on those inputs; its outputs are float32 and the rest
of the model stays under autocast. The encoder is a few small layers, so the cost is negligible. Outside
CPU autocast (GPU training, inference) the wrapper calls the original ``forward`` unchanged.
"""

from __future__ import annotations

import functools
from typing import Any

import torch


def _to_float32(value: Any) -> Any:
    """Floating tensors in ``value`` (also inside tuples, lists and dicts) as float32; the rest as is."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_to_float32(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_float32(v) for k, v in value.items()}
    return value


def geometry_encoder_in_fp32(model) -> None:
    """Make ``model.geometry_encoder`` (a ``Sam3Model``'s) run in float32 whenever CPU autocast is on.

    Idempotent: a second call on the same model changes nothing.
    """
    encoder = model.geometry_encoder
    if getattr(encoder, "_medsam3_fp32_on_cpu_autocast", False):
        return
    original = encoder.forward

    @functools.wraps(original)
    def forward(*args, **kwargs):
        if not torch.is_autocast_enabled("cpu"):
            return original(*args, **kwargs)
        with torch.autocast("cpu", enabled=False):
            return original(*_to_float32(args), **_to_float32(kwargs))

    encoder.forward = forward
    encoder._medsam3_fp32_on_cpu_autocast = True
