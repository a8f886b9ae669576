"""Run a SAM3 image model at another square input size (fine-tuning or inference at a new resolution).

The ViT of SAM3 has one learnt absolute position embedding of ``pretrain_image_size / patch_size`` squared
positions, and axial RoPE whose positions are scaled to the window size (so RoPE itself adapts to any
grid). What changes with the input size is how the position embedding covers the token grid:

* **tiled** models (Meta's SAM3: a 24 x 24 embedding learnt at 336 px, tiled 3 x 3 over the 72 x 72 grid
  at 1008 px) keep their embedding and their own rule: only the input size changes, and the embedding is
  tiled over the new grid as before;
* **matched** models, whose embedding already covers the whole grid (``pretrain_image_size ==
  image_size``, e.g. ``medsam3-nano``), get their embedding resampled to the new grid (bicubic on the
  ``(g, g)`` grid of positions), so that every token keeps a position from the same smooth field instead
  of a repeated copy; ``pretrain_image_size`` becomes the new size.

Every other weight is shape-independent of the input size and is kept as it is. The processor's image
size and mask size (4 x the ViT grid) follow.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F

from medsam3.errors import ModelError

POSITION_KEY = "vision_encoder.backbone.embeddings.position_embeddings"


def _backbone(config: Any) -> Any:
    return config.vision_config.backbone_config


def input_size(model: Any) -> int:
    """The square input size (pixels) of a ``Sam3Model``."""
    return int(_backbone(model.config).image_size)


def resample_grid(embedding: torch.Tensor, grid: int) -> torch.Tensor:
    """Bicubic resampling of a square position embedding.

    Args:
        embedding: ``(1, g0 * g0, C)`` positions in row-major order of a ``(g0, g0)`` grid.
        grid: the new side ``g``.

    Returns:
        ``(1, g * g, C)`` in the input's dtype (computed in float32; ``align_corners=False``).
    """
    n, channels = embedding.shape[1], embedding.shape[2]
    side = int(round(n**0.5))
    if side * side != n or embedding.shape[0] != 1:
        raise ValueError(f"position embedding of shape {tuple(embedding.shape)} is not (1, g*g, C)")
    if side == grid:
        return embedding.clone()
    field = embedding.float().reshape(1, side, side, channels).permute(0, 3, 1, 2)
    field = F.interpolate(field, size=(grid, grid), mode="bicubic", align_corners=False)
    return field.permute(0, 2, 3, 1).reshape(1, grid * grid, channels).to(embedding.dtype)


def resize_sam3_input(model: Any, image_size: int) -> Any:
    """A copy of ``model`` (``Sam3Model``) that takes ``image_size`` x ``image_size`` inputs.

    The new model is on the same device and dtype and in the same train / eval mode; ``model`` is not
    changed. Matched position embeddings are resampled, tiled ones kept (module docstring).

    Raises:
        ModelError: ``image_size`` not a positive multiple of the patch size, or not a ``Sam3Model``.
    """
    from transformers import Sam3Model

    if type(model).__name__ != "Sam3Model":
        raise ModelError(f"the input size can be changed on a Sam3Model only, not {type(model).__name__}")
    backbone = _backbone(model.config)
    patch = int(backbone.patch_size)
    size = int(image_size)
    if size <= 0 or size % patch:
        raise ModelError(f"input size {image_size} must be a positive multiple of the patch size {patch}")
    if size == int(backbone.image_size):
        return model
    config = copy.deepcopy(model.config)
    new_backbone = _backbone(config)
    grid = size // patch
    state = model.state_dict()
    matched = int(backbone.pretrain_image_size) == int(backbone.image_size)
    if matched:
        state[POSITION_KEY] = resample_grid(state[POSITION_KEY], grid)
        new_backbone.pretrain_image_size = size
    new_backbone.image_size = size
    config.vision_config.backbone_feature_sizes = [[4 * grid, 4 * grid], [2 * grid, 2 * grid], [grid, grid]]
    param = next(model.parameters())
    resized = Sam3Model(config)
    missing, unexpected = resized.load_state_dict(state, strict=False)
    if missing or unexpected:  # the architecture is the same: only a transformers change could do this
        raise ModelError(f"resizing the input: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    # transformers declares PreTrainedModel.to through functools.wraps(nn.Module.to), which types it unbound
    resized.to(device=param.device, dtype=param.dtype)  # type: ignore[call-arg]
    resized.train(model.training)
    for p_new, p_old in zip(resized.parameters(), model.parameters(), strict=True):
        p_new.requires_grad_(p_old.requires_grad)
    return resized


def resize_processor(processor: Any, image_size: int, patch_size: int) -> Any:
    """Set a ``Sam3Processor``'s image size and mask size (4 x the grid) in place; returns it."""
    grid = int(image_size) // int(patch_size)
    ip = processor.image_processor
    ip.size = {"height": int(image_size), "width": int(image_size)}
    ip.mask_size = {"height": 4 * grid, "width": 4 * grid}
    if hasattr(processor, "target_size"):
        processor.target_size = int(image_size)
    return processor


def reduced_input_size(model: Any, scale: float) -> int | None:
    """A smaller square input size for ``model`` (``Sam3Model``): ``scale`` x its own, on its patch grid.

    The size is the multiple of ``patch_size x window_size`` (whole attention windows, no padded tokens)
    nearest to ``scale x image_size``; when none lies between one window and the model's own size, the
    multiple of ``patch_size`` nearest to it. For SAM3 (1008 px, patches of 14, windows of 24) and 2/3:
    672 px; for ``medsam3-nano`` (336 px, windows of 8): 224 px.

    Returns:
        The size in pixels, or ``None`` when no multiple of the patch size below the model's own size
        exists (``scale >= 1``, or a model of one patch).
    """
    backbone = _backbone(model.config)
    size, patch = int(backbone.image_size), int(backbone.patch_size)
    window = int(getattr(backbone, "window_size", 0) or 0)
    target = float(scale) * size
    if window > 0:
        tile = patch * window
        out = int(round(target / tile)) * tile
        if tile <= out < size:
            return out
    out = max(1, int(round(target / patch))) * patch
    return out if out < size else None
