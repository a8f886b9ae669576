"""Segmentation losses: SAM3's matched-instance-mask and semantic-head terms, and :class:`SimpleSegLoss`.

Definitions follow Meta's SAM3 training code (``sam3/train/loss/loss_fns.py``: ``dice_loss``, ``Masks``
without point sampling, ``SemanticSegCriterion`` with ``downsample=False`` and a presence head):
predicted mask logits are bilinearly upsampled (``align_corners=False``) to the resolution of the
ground-truth masks and the losses are taken over every pixel.

Masks: predictions are float logits ``(M, h, w)`` / ``(B, 1, h, w)``; targets are bool or float
``(M, H, W)`` / ``(B, H, W)`` in the same image frame (the model input frame, row = y, column = x).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from medsam3.train.losses_find import sigmoid_focal_loss
from medsam3.train.matcher import prediction_logits


def dice_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-mask Dice loss ``1 - (2 sum(p t) + 1) / (sum(p) + sum(t) + 1)``, ``p = sigmoid(logits)``.

    ``logits`` and ``targets``: ``(M, ...)``, flattened per mask; returns float ``(M,)``.
    """
    prob = logits.sigmoid().flatten(1)
    targets = targets.flatten(1).to(prob.dtype)
    numerator = 2 * (prob * targets).sum(-1)
    denominator = prob.sum(-1) + targets.sum(-1)
    return 1 - (numerator + 1) / (denominator + 1)


def _spatial_size(t: Tensor) -> tuple[int, int]:
    """``(H, W)``: the last two axes of ``t``."""
    height, width = t.shape[-2:]
    return height, width


def upsample_logits(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of mask logits ``(N, C, h, w)`` to ``size`` (float32; identity when equal)."""
    logits = logits.float()
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def matched_mask_losses(
    pred_masks: Tensor,
    target_masks: Tensor,
    num_targets: Tensor | float,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> tuple[Tensor, Tensor]:
    """Focal and Dice losses of matched masks, each summed over masks and divided by ``num_targets``.

    The focal loss of a mask is its mean over pixels. ``pred_masks``: logits ``(M, h, w)``;
    ``target_masks``: ``(M, H, W)``. Returns ``(loss_focal, loss_dice)`` scalars (0 when ``M == 0``).
    """
    if len(pred_masks) == 0:
        zero = pred_masks.float().sum() * 0.0
        return zero, zero
    logits = upsample_logits(pred_masks[:, None], _spatial_size(target_masks))[:, 0].flatten(1)
    targets = target_masks.flatten(1).to(logits.dtype)
    focal = sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma).mean(1).sum() / num_targets
    dice = dice_loss(logits, targets).sum() / num_targets
    return focal, dice


def semantic_seg_losses(
    semantic_logits: Tensor,
    semantic_targets: Tensor,
    valid: Tensor | None = None,
    alpha: float = 0.6,
    gamma: float = 2.0,
) -> tuple[Tensor, Tensor]:
    """Focal and Dice losses of the semantic-segmentation head, averaged over images with a target.

    Args:
        semantic_logits: float ``(B, 1, h, w)`` (``Sam3Model`` ``semantic_seg``).
        semantic_targets: ``(B, H, W)``, the union of the image's instance masks.
        valid: bool ``(B,)``, images whose masks are known (default: all).

    Images whose target is empty (concept absent) are skipped, as with SAM3's presence head: their
    absence is supervised by the presence loss. Returns ``(loss_focal, loss_dice)``; the focal loss of an
    image is its mean over pixels; both are ``sum over kept images / (kept + 1e-6)``.
    """
    logits = upsample_logits(semantic_logits, _spatial_size(semantic_targets))[:, 0].flatten(1)
    targets = semantic_targets.flatten(1).to(logits.dtype)
    keep = targets.amax(dim=1) > 0
    if valid is not None:
        keep = keep & valid.to(keep.device)
    keep = keep.to(logits.dtype)
    denominator = keep.sum() + 1e-6
    focal = (sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma).mean(1) * keep).sum() / denominator
    dice = (dice_loss(logits, targets) * keep).sum() / denominator
    return focal, dice


def union_masks(masks: Tensor) -> Tensor:
    """Union of an image's instance masks: ``(N, H, W)`` -> bool ``(H, W)`` (all False when ``N == 0``)."""
    if masks.dim() != 3:
        raise ValueError(f"target masks must have shape (N, H, W), got {tuple(masks.shape)}")
    return masks.bool().any(dim=0)


class SimpleSegLoss:
    """A compact segmentation loss for small models trained without detection supervision.

    Not part of the SAM3 recipe: a short alternative to :class:`medsam3.train.losses.Sam3Loss` when only
    masks matter (one concept per image, no box or matching supervision). Per image, with ``U`` the union
    of its target masks:

    * ``semantic_seg`` vs ``U``: pixel loss (BCE, or focal with ``focal=True``) over all images, Dice over
      images containing the concept;
    * the best-matching query vs ``U``: the same pixel + Dice losses at the target resolution. The query
      is chosen without gradient by the highest ``soft Dice(query, U) + match_score_weight *
      sigmoid(score)`` (soft Dice on the prediction grid). With the score in the choice the same query
      stays chosen once several draw a similar mask; by Dice alone the choice flips between look-alike
      queries and every score settles near ``1 / (number of look-alikes)``;
    * ``pred_logits``: BCE with the best query as the only positive (all negative in absent images), so
      that the top-scoring query, which inference keeps, is the one trained on the mask;
    * ``presence_logits``: BCE vs "concept present".

    ``outputs`` as for ``Sam3Loss``; every target needs ``masks (N, H, W)`` (``N`` may be 0; boxes
    are not used). Returns weighted terms ``loss_semantic_pixel``, ``loss_semantic_dice``,
    ``loss_query_pixel``, ``loss_query_dice``, ``loss_score``, ``loss_presence`` (those whose outputs
    exist and whose weight is not 0) and their sum ``loss``.
    """

    def __init__(
        self,
        pixel_weight: float = 1.0,
        dice_weight: float = 1.0,
        score_weight: float = 1.0,
        presence_weight: float = 1.0,
        focal: bool = False,
        alpha: float = 0.25,
        gamma: float = 2.0,
        match_score_weight: float = 1.0,
    ) -> None:
        self.match_score_weight = match_score_weight
        self.pixel_weight = pixel_weight
        self.dice_weight = dice_weight
        self.score_weight = score_weight
        self.presence_weight = presence_weight
        self.focal = focal
        self.alpha = alpha
        self.gamma = gamma

    def _pixel(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Per-row mean pixel loss: ``(M, P)`` logits and targets -> ``(M,)``."""
        if self.focal:
            return sigmoid_focal_loss(logits, targets, self.alpha, self.gamma).mean(1)
        return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(1)

    def _mask_terms(self, logits: Tensor, union: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        """Pixel loss over all rows, Dice over present rows: logits ``(M, 1, h, w)``, union ``(M, H, W)``."""
        flat = upsample_logits(logits, _spatial_size(union))[:, 0].flatten(1)
        targets = union.flatten(1).float()
        pixel = self._pixel(flat, targets).mean()
        weights = present.float()
        dice = (dice_loss(flat, targets) * weights).sum() / weights.sum().clamp(min=1.0)
        return pixel, dice

    def __call__(self, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
        logits = prediction_logits(outputs)
        batch, device = logits.shape[0], logits.device
        if len(targets) != batch:
            raise ValueError(f"{len(targets)} targets for a batch of {batch} predictions")
        if any(t.get("masks") is None for t in targets):
            raise ValueError("SimpleSegLoss needs target masks (N, H, W) for every image")
        union = torch.stack([union_masks(torch.as_tensor(t["masks"], device=device)) for t in targets])
        present = union.flatten(1).any(1)
        terms: dict[str, Tensor] = {}
        semantic = outputs.get("semantic_seg")
        if semantic is not None and (self.pixel_weight or self.dice_weight):
            pixel, dice = self._mask_terms(semantic, union, present)
            terms["loss_semantic_pixel"] = self.pixel_weight * pixel
            terms["loss_semantic_dice"] = self.dice_weight * dice
        pred_masks = outputs.get("pred_masks")
        best = torch.zeros(batch, dtype=torch.long, device=device)
        if pred_masks is not None:
            with torch.no_grad():
                grid = F.interpolate(union[:, None].float(), size=pred_masks.shape[-2:], mode="area")
                soft = pred_masks.float().sigmoid().flatten(2)
                overlap = 2 * (soft * grid.flatten(2)).sum(-1) + 1
                cost = overlap / (soft.sum(-1) + grid.flatten(2).sum(-1) + 1)
                if self.match_score_weight:
                    cost = cost + self.match_score_weight * logits.detach().float().sigmoid()
                best = cost.argmax(dim=1)
            if self.pixel_weight or self.dice_weight:
                chosen = pred_masks[torch.arange(batch, device=device), best][:, None]
                pixel, dice = self._mask_terms(chosen, union, present)
                terms["loss_query_pixel"] = self.pixel_weight * pixel
                terms["loss_query_dice"] = self.dice_weight * dice
        if self.score_weight:
            score_target = torch.zeros_like(logits)
            score_target[torch.arange(batch, device=device), best] = present.float()
            terms["loss_score"] = self.score_weight * F.binary_cross_entropy_with_logits(logits, score_target)
        presence_logits = outputs.get("presence_logits")
        if presence_logits is not None and self.presence_weight:
            loss = F.binary_cross_entropy_with_logits(presence_logits.float().reshape(-1), present.float())
            terms["loss_presence"] = self.presence_weight * loss
        total = sum(terms.values(), start=logits.sum() * 0.0)
        return {**terms, "loss": total}
