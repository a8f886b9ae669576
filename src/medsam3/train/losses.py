"""SAM3 / Medical SAM3 training loss for transformers ``Sam3Model`` outputs.

``loss = L_find(one-to-one) + o2m_weight * L_find(one-to-many) + L_masks + L_semantic``, as in Meta's
``Sam3LossWrapper`` with the weights of the SAM3 and Medical SAM3 training configurations:

* ``L_find`` (:mod:`medsam3.train.losses_find`) on queries matched by :class:`HungarianMatcher` (costs
  class 2, L1 5, GIoU 2; focal alpha 0.25, gamma 2): ``20 * IoU-aware BCE`` over all queries (positive
  weight 10, negatives down-weighted by ``p^2``, padded to 200 queries) ``+ 20 * presence`` (``0.5 * BCE``
  of the presence logit vs "any target") ``+ 5 * L1(cxcywh) + 2 * (1 - GIoU)`` on matched boxes.
* The one-to-many term needs predictions from separate one-to-many queries: SAM3 trains with DAC-DETR
  duplicates (``pred_logits_o2m``, ``pred_boxes_o2m``, ``pred_masks_o2m``) that skip self-attention.
  transformers' ``Sam3Model`` has no such queries, so the term is computed only when those keys are
  present in ``outputs``; each target then takes up to 4 queries by :class:`OneToManyMatcher`.
* ``L_masks``: ``200 * focal (alpha 0.25, gamma 2) + 10 * Dice`` of matched ``pred_masks`` upsampled to
  the target resolution (SAM3's segmentation recipe). The public Medical SAM3 configuration trains
  without it (:meth:`LossConfig.medical_sam3_public`).
* ``L_semantic`` on ``semantic_seg``: ``20 * focal (alpha 0.6, gamma 2) + 30 * Dice`` on images that
  contain the concept, ``+ 1 * BCE`` of the presence logit (the Medical SAM3 configuration).
* Intermediate decoder layers: ``Sam3Model`` returns the last layer only; pass
  ``outputs["aux_outputs"]`` (see :mod:`medsam3.train.decoder_layers`) to add the find losses of every
  earlier layer, as SAM3 does; without it the losses apply to the final layer only.

Box, L1 and mask terms are divided by the number of target objects (clamped at 1; pass
``num_targets_global`` from :func:`global_num_targets` to use the average over processes). With
``scale_by_batch_size`` (SAM3's ``scale_by_find_batch_size``) every term is multiplied by ``sqrt(B)``.
Images without targets (absent concept) contribute only to the presence terms, unless
``negatives_in_absent_images`` also makes all their queries negatives of the classification loss.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_convert

from medsam3.train.losses_find import box_losses, iou_aware_classification_loss, paired_box_iou, presence_loss
from medsam3.train.losses_seg import SimpleSegLoss, matched_mask_losses, semantic_seg_losses, union_masks
from medsam3.train.matcher import (
    HungarianMatcher,
    MatchIndices,
    OneToManyMatcher,
    prediction_boxes_xyxy,
    prediction_logits,
    target_boxes_cxcywh,
)

__all__ = ["LossConfig", "Sam3Loss", "SimpleSegLoss", "global_num_targets"]

O2M_SUFFIX = "_o2m"


@dataclass(frozen=True)
class LossConfig:
    """Weights and parameters of :class:`Sam3Loss`; defaults are SAM3's / Medical SAM3's values.

    A weight of 0 skips its term (it is then absent from the returned dictionary).
    """

    # One-to-one matching (Hungarian).
    match_cost_class: float = 2.0
    match_cost_bbox: float = 5.0
    match_cost_giou: float = 2.0
    match_alpha: float = 0.25
    match_gamma: float = 2.0
    # One-to-many matching and its weight in the total.
    o2m_weight: float = 2.0
    o2m_topk: int = 4
    o2m_threshold: float = 0.4
    o2m_alpha: float = 0.3
    o2m_matcher_on_aux: bool = False  # SAM3 matches one-to-many queries of earlier layers one-to-one
    # Find loss.
    ce_weight: float = 20.0
    presence_weight: float = 20.0
    bbox_weight: float = 5.0
    giou_weight: float = 2.0
    pos_weight: float = 10.0
    ce_alpha: float = 0.25  # exponent of the score in the IoU-aware soft target p^a * IoU^(1-a)
    ce_gamma: float = 2.0  # negatives weighted by p^gamma
    pad_num_queries: int | None = 200
    presence_alpha: float = 0.5
    presence_gamma: float = 0.0
    negatives_in_absent_images: bool = False
    aux_loss: bool = True  # apply the find losses to outputs["aux_outputs"] when given
    # Matched instance masks.
    mask_focal_weight: float = 200.0
    mask_dice_weight: float = 10.0
    mask_alpha: float = 0.25
    mask_gamma: float = 2.0
    # Semantic-segmentation head.
    semantic_focal_weight: float = 20.0
    semantic_dice_weight: float = 30.0
    semantic_presence_weight: float = 1.0
    semantic_alpha: float = 0.6
    semantic_gamma: float = 2.0
    # Normalisation.
    scale_by_batch_size: bool = True

    @classmethod
    def medical_sam3_public(cls) -> LossConfig:
        """The public Medical SAM3 training configuration: no loss on the matched instance masks."""
        return replace(cls(), mask_focal_weight=0.0, mask_dice_weight=0.0)

    @classmethod
    def sam3(cls) -> LossConfig:
        """Meta's SAM3 segmentation fine-tuning recipe: no separate semantic presence loss."""
        return replace(cls(), semantic_presence_weight=0.0)


def global_num_targets(targets: Sequence[Mapping[str, Any]], device: torch.device | str = "cpu") -> Tensor:
    """Number of target objects per process, averaged over the default process group, clamped at 1.

    Without an initialised ``torch.distributed`` group this is the local count. Every process must call
    it (it all-reduces). Returns a float32 scalar on ``device`` for ``Sam3Loss(num_targets_global=...)``.
    """
    local = sum(
        0 if t.get("boxes") is None else torch.as_tensor(t["boxes"]).reshape(-1, 4).shape[0] for t in targets
    )
    count = torch.tensor(float(local), device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(count)
        count = count / torch.distributed.get_world_size()
    return count.clamp(min=1.0)


def _one_to_many_view(outputs: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ``*_o2m`` predictions renamed to the plain keys, or None when the model has none."""
    view = {k[: -len(O2M_SUFFIX)]: v for k, v in outputs.items() if k.endswith(O2M_SUFFIX) and v is not None}
    return view if "pred_logits" in view and "pred_boxes" in view else None


def _flatten_indices(indices: MatchIndices, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Per-image (query, target) pairs -> flat ``(batch_idx, query_idx, target_idx)`` int64 ``(M,)``."""
    if not indices:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty, empty
    batch = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(indices)]).to(device)
    query = torch.cat([q for q, _ in indices]).to(device)
    target = torch.cat([t for _, t in indices]).to(device)
    return batch, query, target


class Sam3Loss:
    """SAM3 training loss (see the module docstring); callable on ``Sam3Model`` outputs.

    ``__call__(outputs, targets, num_targets_global=None)``:

    * ``outputs``: mapping with ``pred_logits (B, Q)``, ``pred_boxes (B, Q, 4)`` xyxy normalised,
      ``presence_logits (B, 1)``, ``pred_masks (B, Q, h, w)`` and ``semantic_seg (B, 1, h, w)`` logits;
      optionally ``*_o2m`` one-to-many predictions and ``aux_outputs`` (list of mappings with
      ``pred_logits``, ``pred_boxes`` and optionally ``presence_logits``, earliest layer first).
    * ``targets``: ``B`` mappings with ``boxes (N, 4)`` cxcywh normalised and optionally ``masks (N, H, W)``
      bool in the model input frame (same ``H, W`` for every image of the batch); ``N`` may be 0.

    Returns a dict of weighted scalar terms (``loss_ce``, ``loss_presence``, ``loss_bbox``, ``loss_giou``,
    ``loss_mask``, ``loss_dice``, the same with ``_o2m`` / ``_aux{i}`` suffixes, ``loss_semantic_seg``,
    ``loss_semantic_dice``, ``loss_semantic_presence``) and ``loss``, their sum.
    """

    def __init__(self, config: LossConfig | None = None) -> None:
        self.config = config or LossConfig()
        c = self.config
        self.matcher = HungarianMatcher(
            c.match_cost_class, c.match_cost_bbox, c.match_cost_giou, c.match_alpha, c.match_gamma
        )
        self.o2m_matcher = OneToManyMatcher(c.o2m_topk, c.o2m_threshold, c.o2m_alpha)

    def __call__(
        self,
        outputs: Mapping[str, Any],
        targets: Sequence[Mapping[str, Any]],
        num_targets_global: Tensor | float | None = None,
    ) -> dict[str, Tensor]:
        c = self.config
        logits = prediction_logits(outputs)
        batch, device = logits.shape[0], logits.device
        if len(targets) != batch:
            raise ValueError(f"{len(targets)} targets for a batch of {batch} predictions")
        boxes = [target_boxes_cxcywh(t, device) for t in targets]
        has_target = torch.tensor([len(b) > 0 for b in boxes], device=device)
        if num_targets_global is None:
            num_targets = torch.tensor(float(sum(len(b) for b in boxes)), device=device).clamp(min=1.0)
        else:
            num_targets = torch.as_tensor(num_targets_global, dtype=torch.float32, device=device)
            num_targets = num_targets.clamp(min=1.0)
        masks = self._target_masks(targets, device)

        terms: dict[str, Tensor] = {}
        common: dict[str, Any] = dict(
            targets=targets, boxes=boxes, has_target=has_target, num_targets=num_targets
        )
        self._find_terms(terms, outputs, self.matcher, "", 1.0, masks=masks, **common)
        one_to_many = _one_to_many_view(outputs)
        if one_to_many is not None and c.o2m_weight:
            self._find_terms(
                terms,
                one_to_many,
                self.o2m_matcher,
                O2M_SUFFIX,
                c.o2m_weight,
                masks=masks,
                presence=False,
                **common,
            )
        for i, aux in enumerate((outputs.get("aux_outputs") or []) if c.aux_loss else []):
            self._find_terms(terms, aux, self.matcher, f"_aux{i}", 1.0, **common)
            aux_o2m = _one_to_many_view(aux)
            if aux_o2m is not None and c.o2m_weight:
                matcher = self.o2m_matcher if c.o2m_matcher_on_aux else self.matcher
                self._find_terms(
                    terms, aux_o2m, matcher, f"_aux{i}{O2M_SUFFIX}", c.o2m_weight, presence=False, **common
                )
        self._semantic_terms(terms, outputs, masks, has_target)

        if c.scale_by_batch_size:
            terms = {k: v * math.sqrt(batch) for k, v in terms.items()}
        total = sum(terms.values(), start=logits.sum() * 0.0)
        return {**terms, "loss": total}

    @staticmethod
    def _target_masks(targets: Sequence[Mapping[str, Any]], device: torch.device) -> list[Tensor | None]:
        """Per image: bool ``(N, H, W)`` masks on ``device``, or None when the image has no masks."""
        masks: list[Tensor | None] = []
        sizes = set()
        for target in targets:
            m = target.get("masks")
            if m is None:
                masks.append(None)
                continue
            m = torch.as_tensor(m, device=device)
            if m.dim() != 3 or len(m) != len(target_boxes_cxcywh(target, device)):
                raise ValueError(
                    f"target masks must have shape (N, H, W) with N = number of boxes, got "
                    f"{tuple(m.shape)} for {len(target_boxes_cxcywh(target, device))} boxes"
                )
            sizes.add(tuple(m.shape[-2:]))
            masks.append(m.bool())
        if len(sizes) > 1:
            raise ValueError(f"target masks of one batch must share one size, got {sorted(sizes)}")
        return masks

    def _find_terms(
        self,
        terms: dict[str, Tensor],
        out: Mapping[str, Any],
        matcher: HungarianMatcher | OneToManyMatcher,
        suffix: str,
        weight: float,
        *,
        targets: Sequence[Mapping[str, Any]],
        boxes: list[Tensor],
        has_target: Tensor,
        num_targets: Tensor,
        masks: list[Tensor | None] | None = None,
        presence: bool = True,
    ) -> None:
        """Add the classification, presence, box and (optionally) mask terms of one prediction set."""
        c = self.config
        logits = prediction_logits(out)
        pred_boxes = prediction_boxes_xyxy(out)
        batch_idx, query_idx, target_idx = _flatten_indices(matcher(out, targets), logits.device)
        pred_xyxy = pred_boxes[batch_idx, query_idx]
        target_cxcywh = torch.cat([boxes[b][target_idx[batch_idx == b]] for b in range(len(boxes))])
        target_xyxy = box_convert(target_cxcywh, "cxcywh", "xyxy")
        if c.ce_weight:
            iou = paired_box_iou(pred_xyxy.detach(), target_xyxy)
            ce = iou_aware_classification_loss(
                logits,
                batch_idx,
                query_idx,
                iou,
                has_target,
                c.pos_weight,
                c.ce_alpha,
                c.ce_gamma,
                c.pad_num_queries,
                c.negatives_in_absent_images,
            )
            terms["loss_ce" + suffix] = weight * c.ce_weight * ce
        if presence and c.presence_weight and out.get("presence_logits") is not None:
            presence_logits = out["presence_logits"].float()
            loss = presence_loss(presence_logits, has_target, c.presence_alpha, c.presence_gamma)
            terms["loss_presence" + suffix] = weight * c.presence_weight * loss
        if c.bbox_weight or c.giou_weight:
            pred_cxcywh = box_convert(pred_xyxy, "xyxy", "cxcywh")
            l1, giou = box_losses(pred_cxcywh, pred_xyxy, target_cxcywh, target_xyxy, num_targets)
            if c.bbox_weight:
                terms["loss_bbox" + suffix] = weight * c.bbox_weight * l1
            if c.giou_weight:
                terms["loss_giou" + suffix] = weight * c.giou_weight * giou
        if masks is None or out.get("pred_masks") is None or not (c.mask_focal_weight or c.mask_dice_weight):
            return
        with_masks = {b: m for b, m in enumerate(masks) if m is not None}
        if not with_masks:
            return
        keep = torch.isin(batch_idx, torch.tensor(list(with_masks), device=batch_idx.device))
        pred = out["pred_masks"][batch_idx[keep], query_idx[keep]]
        size = next(iter(with_masks.values())).shape[-2:]
        parts = [m[target_idx[batch_idx == b]] for b, m in with_masks.items()]
        target = torch.cat(parts) if parts else torch.zeros(0, *size, dtype=torch.bool, device=pred.device)
        focal, dice = matched_mask_losses(pred, target, num_targets, c.mask_alpha, c.mask_gamma)
        if c.mask_focal_weight:
            terms["loss_mask" + suffix] = weight * c.mask_focal_weight * focal
        if c.mask_dice_weight:
            terms["loss_dice" + suffix] = weight * c.mask_dice_weight * dice

    def _semantic_terms(
        self,
        terms: dict[str, Tensor],
        outputs: Mapping[str, Any],
        masks: list[Tensor | None],
        has_target: Tensor,
    ) -> None:
        """Add the semantic-segmentation focal / Dice terms and the semantic presence term."""
        c = self.config
        presence_logits = outputs.get("presence_logits")
        if c.semantic_presence_weight and presence_logits is not None:
            loss = F.binary_cross_entropy_with_logits(presence_logits.float().reshape(-1), has_target.float())
            terms["loss_semantic_presence"] = c.semantic_presence_weight * loss
        semantic = outputs.get("semantic_seg")
        if semantic is None or not (c.semantic_focal_weight or c.semantic_dice_weight):
            return
        known = [m for m in masks if m is not None]
        if not known:
            return
        size = known[0].shape[-2:]
        union = torch.stack(
            [
                union_masks(m)
                if m is not None
                else torch.zeros(size, dtype=torch.bool, device=semantic.device)
                for m in masks
            ]
        )
        valid = torch.tensor([m is not None for m in masks], device=semantic.device)
        focal, dice = semantic_seg_losses(semantic, union, valid, c.semantic_alpha, c.semantic_gamma)
        if c.semantic_focal_weight:
            terms["loss_semantic_seg"] = c.semantic_focal_weight * focal
        if c.semantic_dice_weight:
            terms["loss_semantic_dice"] = c.semantic_dice_weight * dice
