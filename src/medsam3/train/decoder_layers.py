"""Per-layer DETR-decoder predictions of a transformers ``Sam3Model``, for SAM3's auxiliary losses.

``Sam3Model`` computes query scores and boxes for every decoder layer but returns the last layer only.
:func:`record_decoder_layers` captures the per-layer values with forward hooks during one forward pass:

* the decoder's own output (``Sam3DETRDecoderOutput``: per-layer ``reference_boxes`` and
  ``presence_logits``),
* the dot-product scoring head, called once on all layers (``(L, B, Q, 1)`` logits),
* the decoder box head, called once on all layers by ``Sam3Model`` (``(L, B, Q, 4)`` offsets).

Boxes are rebuilt exactly as ``Sam3Model`` does: ``sigmoid(inverse_sigmoid(reference) + offset)`` in
cxcywh, returned as xyxy normalised boxes. The recorded tensors keep their autograd graph.

Usage::

    with record_decoder_layers(model) as layers:
        outputs = model(pixel_values=..., input_ids=...)
    loss = Sam3Loss()({**outputs, "aux_outputs": layers.aux_outputs()}, targets)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert

if TYPE_CHECKING:
    from transformers import Sam3Model


def _inverse_sigmoid(x: Tensor, eps: float = 1e-3) -> Tensor:
    """Logit of ``x`` clamped to [0, 1] with ``eps`` guards (the convention of SAM3's box refinement)."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class DecoderLayers:
    """Per-layer decoder tensors recorded during one ``Sam3Model`` forward (see the module docstring)."""

    def __init__(self) -> None:
        self.scores: Tensor | None = None  # (L, B, Q, 1)
        self.box_offsets: Tensor | None = None  # (L, B, Q, 4)
        self.reference_boxes: Tensor | None = None  # (L, B, Q, 4) cxcywh in [0, 1]
        self.presence_logits: Tensor | None = None  # (L, B, 1)

    def _on_decoder(self, module: nn.Module, args: Any, output: Any) -> None:
        self.reference_boxes = output.reference_boxes
        self.presence_logits = output.presence_logits

    def _on_scoring(self, module: nn.Module, args: Any, output: Tensor) -> None:
        self.scores = output

    def _on_box_head(self, module: nn.Module, args: Any, output: Tensor) -> None:
        if output.dim() == 4:  # the model-level call on all layers; per-layer calls inside are 3-D
            self.box_offsets = output

    def layer_outputs(self) -> list[dict[str, Tensor]]:
        """Every layer's ``pred_logits (B, Q)``, ``pred_boxes (B, Q, 4)`` xyxy, ``presence_logits (B, 1)``."""
        if self.scores is None or self.box_offsets is None or self.reference_boxes is None:
            raise RuntimeError("no decoder forward recorded: run the model inside record_decoder_layers()")
        boxes = (_inverse_sigmoid(self.reference_boxes) + self.box_offsets).sigmoid()
        boxes = box_convert(boxes, "cxcywh", "xyxy")
        layers = []
        for i in range(boxes.shape[0]):
            layer = {"pred_logits": self.scores[i].squeeze(-1), "pred_boxes": boxes[i]}
            if self.presence_logits is not None:
                layer["presence_logits"] = self.presence_logits[i]
            layers.append(layer)
        return layers

    def aux_outputs(self) -> list[dict[str, Tensor]]:
        """The layers before the last (earliest first): the ``aux_outputs`` of :class:`Sam3Loss`."""
        return self.layer_outputs()[:-1]


@contextmanager
def record_decoder_layers(model: Sam3Model) -> Iterator[DecoderLayers]:
    """Record the per-layer decoder predictions of ``model`` (a ``Sam3Model``) inside the ``with`` block."""
    for name in ("detr_decoder", "dot_product_scoring"):
        if not hasattr(model, name):
            raise TypeError(f"{type(model).__name__} has no '{name}': expected a transformers Sam3Model")
    layers = DecoderLayers()
    handles = [
        model.detr_decoder.register_forward_hook(layers._on_decoder),
        model.dot_product_scoring.register_forward_hook(layers._on_scoring),
        model.detr_decoder.box_head.register_forward_hook(layers._on_box_head),
    ]
    try:
        yield layers
    finally:
        for handle in handles:
            handle.remove()
