"""Losses on the tracker's per-frame outputs (frames 1..n-1 of a clip), for video-model training.

The tracker follows one object per clip: the object it was started from on frame 0 (the detector's top
mask, or the ground truth). Its target on a later frame is the concept's mask on that frame (the union of
the concept's objects, which is what ``--mode track`` / ``--mode clips`` report per prompt). Per tracked
frame ``t`` it predicts low-resolution mask logits, an IoU estimate of that mask (the multimask output it
selected) and an object-score logit (whether the object is visible on the frame).

Terms, each summed over tracked frames and divided by ``num_frames`` (the global number of tracked frames
of the step, so that processes and accumulation give the gradient of one batch):

* ``loss_track_mask``: sigmoid focal loss of the mask logits, bilinearly upsampled to the target size and
  clamped to ``[-20, 20]``, averaged over pixels (``alpha``, ``gamma``), on frames where the object is
  present. (Where its object score says "absent", the tracker writes -1024 into every mask logit; no
  gradient flows through those values, and the clamp keeps that constant from swamping the logged loss.
  Nothing else changes: sigmoid is saturated beyond 20.);
* ``loss_track_dice``: Dice loss (:func:`~medsam3.train.losses_seg.dice_loss`) on the same frames;
* ``loss_track_iou``: ``|IoU estimate - IoU(mask > 0, target)|`` (SAM2's L1 IoU loss; the actual IoU is
  taken without gradient) on the same frames;
* ``loss_track_object``: binary cross-entropy of the object-score logit against "present on the frame",
  on every tracked frame.

Why these: Medical SAM3 V2 applies the detector's semantic terms to the tracker's masks (focal ``alpha 0.6``
x20 + Dice x30, presence x1) and no SAM-style term. The tracker has no queries, so the detector's box and
IoU-aware classification terms have nothing to attach to here. The IoU and object-score heads are read at
inference (the IoU picks among the multimask outputs on every tracked slice; the object score decides
whether a tracked object is visible and stays alive), so the default also trains them, with SAM2's weights
(1 each). Presets: :meth:`TrackLossConfig.v2` (V2's terms only) and :meth:`TrackLossConfig.sam2` (SAM2's
mask focal ``alpha 0.25`` x20 + Dice x1 + IoU x1 + object x1).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from medsam3.train.losses_find import sigmoid_focal_loss
from medsam3.train.losses_seg import dice_loss, upsample_logits


@dataclass(frozen=True)
class TrackLossConfig:
    """Weights of the tracker terms (a weight of 0 leaves its term out). Defaults: V2's semantic terms plus
    SAM2's IoU and object-score terms (module docstring)."""

    mask_focal_weight: float = 20.0
    mask_dice_weight: float = 30.0
    iou_weight: float = 1.0
    object_weight: float = 1.0
    alpha: float = 0.6
    gamma: float = 2.0

    @classmethod
    def v2(cls) -> TrackLossConfig:
        """Medical SAM3 V2: the detector's semantic focal / Dice and presence weights, no IoU term."""
        return replace(cls(), iou_weight=0.0)

    @classmethod
    def sam2(cls) -> TrackLossConfig:
        """SAM2's video losses: mask focal x20 (alpha 0.25), Dice x1, IoU x1, object score x1."""
        return cls(
            mask_focal_weight=20.0, mask_dice_weight=1.0, iou_weight=1.0, object_weight=1.0, alpha=0.25
        )


#: Mask logits are clamped to this magnitude before the mask terms (module docstring).
LOGIT_CLAMP = 20.0

TRACK_LOSS_PRESETS = {"default": TrackLossConfig, "v2": TrackLossConfig.v2, "sam2": TrackLossConfig.sam2}


def _spatial(t: Tensor) -> tuple[int, int]:
    height, width = t.shape[-2:]
    return height, width


def mask_iou(logits: Tensor, targets: Tensor) -> Tensor:
    """IoU of ``logits > 0`` with bool ``targets``, per frame: ``(T, H, W)`` -> float ``(T,)`` (1 when both
    are empty)."""
    pred = logits > 0
    inter = (pred & targets).flatten(1).sum(-1).float()
    union = (pred | targets).flatten(1).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def track_losses(
    mask_logits: Tensor,
    iou_pred: Tensor,
    object_logits: Tensor,
    targets: Tensor,
    num_frames: Tensor | float,
    config: TrackLossConfig | None = None,
) -> dict[str, Tensor]:
    """The tracker terms (module docstring) of ``T`` tracked frames.

    Args:
        mask_logits: ``(T, h, w)`` low-resolution mask logits of the tracked object.
        iou_pred: ``(T,)`` the tracker's IoU estimate of that mask.
        object_logits: ``(T,)`` object-score logits.
        targets: ``(T, H, W)`` bool masks of the object on each frame (model input frame).
        num_frames: normaliser (global tracked frames of the step; clamped at 1).
        config: weights.

    Returns:
        ``loss_track_mask``, ``loss_track_dice``, ``loss_track_iou``, ``loss_track_object`` (those with a
        non-zero weight), weighted scalars.
    """
    c = config or TrackLossConfig()
    norm = torch.as_tensor(num_frames, dtype=torch.float32, device=mask_logits.device).clamp(min=1.0)
    targets = targets.bool()
    present = targets.flatten(1).any(dim=1)
    zero = mask_logits.sum() * 0.0 + iou_pred.sum() * 0.0 + object_logits.sum() * 0.0
    terms: dict[str, Tensor] = {}
    if c.mask_focal_weight or c.mask_dice_weight or c.iou_weight:
        if bool(present.any()):
            logits = upsample_logits(mask_logits[present][:, None], _spatial(targets))[:, 0]
            logits = logits.clamp(-LOGIT_CLAMP, LOGIT_CLAMP)
        else:  # no frame to score (also T = 0): empty sums
            logits = torch.zeros(0, *targets.shape[-2:], device=mask_logits.device)
        target, iou = targets[present], iou_pred.float()[present]
        if c.mask_focal_weight:
            focal = sigmoid_focal_loss(logits, target.float(), c.alpha, c.gamma).flatten(1).mean(-1)
            terms["loss_track_mask"] = c.mask_focal_weight * (focal.sum() + zero) / norm
        if c.mask_dice_weight:
            terms["loss_track_dice"] = c.mask_dice_weight * (dice_loss(logits, target).sum() + zero) / norm
        if c.iou_weight:
            actual = mask_iou(logits.detach(), target)
            terms["loss_track_iou"] = c.iou_weight * ((iou - actual).abs().sum() + zero) / norm
    if c.object_weight:
        bce = F.binary_cross_entropy_with_logits(object_logits.float(), present.float(), reduction="sum")
        terms["loss_track_object"] = c.object_weight * (bce + zero) / norm
    return terms
