"""Detection ("find") loss terms of SAM3: IoU-aware classification, presence, box L1 and GIoU.

Element functions with the definitions of Meta's SAM3 training code (``sam3/train/loss/loss_fns.py``:
``sigmoid_focal_loss``, ``IABCEMdetr``, ``Boxes``). All inputs are float tensors; boxes are normalised to
[0, 1], ``cxcywh`` for L1 and ``xyxy`` for (G)IoU. Reductions and normalisations are stated per function;
:class:`medsam3.train.losses.Sam3Loss` applies the weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import generalized_box_iou_loss


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Element-wise sigmoid focal loss (RetinaNet), same shape as ``logits``.

    ``FL = alpha_t * (1 - p_t)^gamma * BCE(logit, t)`` with ``p_t = p t + (1 - p)(1 - t)`` and
    ``alpha_t = alpha t + (1 - alpha)(1 - t)``; a negative ``alpha`` disables the class weighting.
    ``targets`` may be soft (in [0, 1]).
    """
    prob = logits.sigmoid()
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = bce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


def paired_box_iou(boxes1_xyxy: Tensor, boxes2_xyxy: Tensor) -> Tensor:
    """IoU of corresponding boxes: ``(M, 4)`` and ``(M, 4)`` xyxy -> ``(M,)`` (0 for empty unions)."""
    top_left = torch.maximum(boxes1_xyxy[:, :2], boxes2_xyxy[:, :2])
    bottom_right = torch.minimum(boxes1_xyxy[:, 2:], boxes2_xyxy[:, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=1)
    area1 = (boxes1_xyxy[:, 2:] - boxes1_xyxy[:, :2]).clamp(min=0).prod(dim=1)
    area2 = (boxes2_xyxy[:, 2:] - boxes2_xyxy[:, :2]).clamp(min=0).prod(dim=1)
    union = area1 + area2 - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(union))


def iou_aware_classification_loss(
    logits: Tensor,
    batch_idx: Tensor,
    query_idx: Tensor,
    matched_iou: Tensor,
    has_target: Tensor,
    pos_weight: float = 10.0,
    alpha: float = 0.25,
    gamma: float = 2.0,
    pad_num_queries: int | None = 200,
    negatives_in_absent_images: bool = False,
) -> Tensor:
    """SAM3's IoU-aware BCE on query scores (``IABCEMdetr``, ``pos_focal=False``), a scalar.

    * Positives (matched queries) get plain BCE against the soft target ``t = p^alpha * IoU^(1 - alpha)``
      (detached, clamped at 0.01; ``p = sigmoid(logit)``, IoU of the matched boxes), times ``pos_weight``.
    * Negatives get ``BCE(logit, 0) * p^gamma`` (a focal-style down-weighting of easy negatives).
    * Images without any target contribute nothing (``has_target`` False) unless
      ``negatives_in_absent_images``: absence is taught by the presence loss, as in SAM3 with the
      presence token.
    * Reduction: mean over all ``B * Q`` entries, or ``sum / (pad_num_queries * B)`` when the model has
      fewer than ``pad_num_queries`` queries (keeps the scale of a 200-query model).

    Args:
        logits: float ``(B, Q)`` query logits.
        batch_idx, query_idx: int64 ``(M,)`` matched (image, query) pairs.
        matched_iou: float ``(M,)`` IoU between each matched query's box and its target box.
        has_target: bool ``(B,)``, whether the image has at least one target.
    """
    prob = logits.sigmoid()
    with torch.no_grad():
        positive = torch.zeros_like(logits)
        positive[batch_idx, query_idx] = 1.0
        soft = torch.zeros_like(logits)
        quality = prob[batch_idx, query_idx] ** alpha * matched_iou.clamp(min=0) ** (1 - alpha)
        soft[batch_idx, query_idx] = quality.clamp(min=0.01)
    loss = F.binary_cross_entropy_with_logits(logits, soft, reduction="none") * positive * pos_weight
    negative_bce = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    loss = loss + negative_bce * (1 - positive) * prob**gamma
    if not negatives_in_absent_images:
        loss = loss * has_target.to(loss.dtype)[:, None]
    batch, num_queries = logits.shape
    if pad_num_queries is not None and num_queries < pad_num_queries:
        return loss.sum() / (pad_num_queries * batch)
    return loss.mean()


def presence_loss(
    presence_logits: Tensor, has_target: Tensor, alpha: float = 0.5, gamma: float = 0.0
) -> Tensor:
    """Image-level presence loss, a scalar: focal loss of the presence logit vs "any target present".

    With SAM3's defaults (``alpha=0.5``, ``gamma=0``) this is ``0.5 * BCE``, averaged over the batch.
    ``presence_logits``: float ``(B,)`` or ``(B, 1)``; ``has_target``: bool ``(B,)``.
    """
    logits = presence_logits.reshape(-1)
    return sigmoid_focal_loss(logits, has_target.to(logits.dtype), alpha=alpha, gamma=gamma).mean()


def box_losses(
    pred_cxcywh: Tensor,
    pred_xyxy: Tensor,
    target_cxcywh: Tensor,
    target_xyxy: Tensor,
    num_targets: Tensor | float,
) -> tuple[Tensor, Tensor]:
    """Summed L1 (cxcywh, 4 coordinates) and GIoU losses of matched pairs, each divided by ``num_targets``.

    All boxes are ``(M, 4)`` float; returns ``(loss_l1, loss_giou)`` scalars (0 when ``M == 0``).
    """
    loss_l1 = F.l1_loss(pred_cxcywh, target_cxcywh, reduction="none").sum() / num_targets
    if len(pred_xyxy) == 0:
        loss_giou = pred_xyxy.sum() * 0.0
    else:
        loss_giou = generalized_box_iou_loss(pred_xyxy, target_xyxy, reduction="sum") / num_targets
    return loss_l1, loss_giou
