"""Assign predicted queries to ground-truth objects, the way SAM3 training does.

Two matchers, both following Meta's SAM3 training code (``sam3/train/matcher.py``):

* :class:`HungarianMatcher` - one-to-one (``BinaryHungarianMatcherV2`` with ``focal=True``): the optimal
  assignment (``scipy.optimize.linear_sum_assignment``) under the cost
  ``cost_class * focal_cost(p) + cost_bbox * L1(cxcywh) + cost_giou * (-GIoU(xyxy))``, where
  ``focal_cost(p) = alpha * (1 - p)^gamma * (-log p) - (1 - alpha) * p^gamma * (-log(1 - p))`` is the
  focal loss of calling the query positive minus that of calling it negative (``p = sigmoid(logit)``).
* :class:`OneToManyMatcher` - one-to-many (``BinaryOneToManyMatcher``, after DAC-DETR): each target takes
  its ``topk`` queries ranked by the matching quality ``alpha * p + (1 - alpha) * IoU`` and keeps those
  whose quality exceeds the threshold. ``alpha`` (0.3) is that mix of score and IoU; the threshold is
  applied to the mixed quality, not to the IoU alone. As in Meta's code, a query may be selected by
  several targets.

Conventions (shared with :mod:`medsam3.train.losses`):

* ``outputs``: a mapping (dict or transformers ``Sam3ImageSegmentationOutput``) with ``pred_logits``
  float ``(B, Q)`` or ``(B, Q, 1)`` (logits) and ``pred_boxes`` float ``(B, Q, 4)``: boxes **xyxy**
  normalised to [0, 1], the transformers ``Sam3Model`` convention.
* ``targets``: a sequence of ``B`` mappings with ``boxes`` float ``(N, 4)``: **cxcywh** normalised to
  [0, 1] (``N`` may be 0: the concept is absent from the image).
* Result: one ``(query_idx, target_idx)`` pair of int64 tensors per image, on the predictions' device.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torchvision.ops import box_convert, box_iou, generalized_box_iou

MatchIndices = list[tuple[Tensor, Tensor]]


def prediction_logits(outputs: Mapping[str, Any]) -> Tensor:
    """``pred_logits`` as float32 ``(B, Q)`` (a trailing singleton class axis is dropped)."""
    logits = outputs["pred_logits"]
    if logits.dim() == 3 and logits.shape[-1] == 1:
        logits = logits.squeeze(-1)
    if logits.dim() != 2:
        raise ValueError(f"pred_logits must have shape (B, Q) or (B, Q, 1), got {tuple(logits.shape)}")
    return logits.float()


def prediction_boxes_xyxy(outputs: Mapping[str, Any]) -> Tensor:
    """``pred_boxes`` as float32 ``(B, Q, 4)`` xyxy normalised boxes."""
    boxes = outputs["pred_boxes"]
    if boxes.dim() != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"pred_boxes must have shape (B, Q, 4), got {tuple(boxes.shape)}")
    return boxes.float()


def target_boxes_cxcywh(target: Mapping[str, Any], device: torch.device) -> Tensor:
    """The target's ``boxes`` as float32 ``(N, 4)`` cxcywh on ``device`` (``(0, 4)`` when absent)."""
    boxes = target.get("boxes")
    if boxes is None:
        return torch.zeros(0, 4, device=device)
    boxes = torch.as_tensor(boxes, dtype=torch.float32, device=device)
    if boxes.numel() == 0:
        return boxes.reshape(0, 4)
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"target boxes must have shape (N, 4) cxcywh, got {tuple(boxes.shape)}")
    return boxes


def _check_batch(logits: Tensor, targets: Sequence[Mapping[str, Any]]) -> None:
    if len(targets) != logits.shape[0]:
        raise ValueError(f"{len(targets)} targets for a batch of {logits.shape[0]} predictions")


def _empty(device: torch.device) -> tuple[Tensor, Tensor]:
    return (torch.zeros(0, dtype=torch.long, device=device), torch.zeros(0, dtype=torch.long, device=device))


class HungarianMatcher:
    """One-to-one optimal matching of queries to targets (SAM3's focal Hungarian matcher).

    Args:
        cost_class: weight of the focal classification cost.
        cost_bbox: weight of the L1 distance between cxcywh boxes.
        cost_giou: weight of the negative generalised IoU between xyxy boxes.
        alpha, gamma: focal parameters of the classification cost.
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        alpha: float = 0.25,
        gamma: float = 2.0,
    ) -> None:
        if min(cost_class, cost_bbox, cost_giou) < 0 or cost_class == cost_bbox == cost_giou == 0:
            raise ValueError(
                f"matching costs must be >= 0 and not all 0, got class={cost_class}, bbox={cost_bbox}, "
                f"giou={cost_giou}"
            )
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.alpha = alpha
        self.gamma = gamma

    def class_cost(self, logits: Tensor) -> Tensor:
        """Focal positive-minus-negative cost per query: float ``(Q,)`` from logits ``(Q,)``."""
        prob = logits.sigmoid()
        positive = -self.alpha * (1 - prob) ** self.gamma * F.logsigmoid(logits)
        negative = -(1 - self.alpha) * prob**self.gamma * F.logsigmoid(-logits)
        return positive - negative

    def cost_matrix(self, logits: Tensor, boxes_xyxy: Tensor, target_cxcywh: Tensor) -> Tensor:
        """Matching cost, float ``(Q, N)``, for one image (lower is better)."""
        boxes_cxcywh = box_convert(boxes_xyxy, "xyxy", "cxcywh")
        cost = self.cost_bbox * torch.cdist(boxes_cxcywh, target_cxcywh, p=1)
        target_xyxy = box_convert(target_cxcywh, "cxcywh", "xyxy")
        cost = cost - self.cost_giou * generalized_box_iou(boxes_xyxy, target_xyxy)
        return cost + self.cost_class * self.class_cost(logits)[:, None]

    @torch.no_grad()
    def __call__(self, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, Any]]) -> MatchIndices:
        return _match_each_image(outputs, targets, self._match_one)

    def _match_one(self, b: int, logits: Tensor, boxes_xyxy: Tensor, target_cxcywh: Tensor):
        cost = self.cost_matrix(logits, boxes_xyxy, target_cxcywh)
        if not torch.isfinite(cost).all():
            raise ValueError(f"non-finite matching cost for image {b}: check the predictions for NaN")
        rows, cols = linear_sum_assignment(cost.cpu().numpy())
        query_idx = torch.as_tensor(rows, dtype=torch.long)
        target_idx = torch.as_tensor(cols, dtype=torch.long)
        order = torch.argsort(target_idx)
        return query_idx[order].to(logits.device), target_idx[order].to(logits.device)


class OneToManyMatcher:
    """One-to-many matching: each target takes its best ``topk`` queries above a quality threshold.

    Args:
        topk: queries considered per target (capped at the number of queries).
        iou_threshold: minimum matching quality ``alpha * p + (1 - alpha) * IoU`` (strictly greater);
            named after the IoU because IoU dominates the mix, as in Meta's ``threshold``.
        alpha: weight of the query probability ``p = sigmoid(logit)`` in the quality; ``1 - alpha`` weighs
            the IoU between the xyxy boxes.
    """

    def __init__(self, topk: int = 4, iou_threshold: float = 0.4, alpha: float = 0.3) -> None:
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.topk = topk
        self.iou_threshold = iou_threshold
        self.alpha = alpha

    def quality(self, logits: Tensor, boxes_xyxy: Tensor, target_cxcywh: Tensor) -> Tensor:
        """Matching quality, float ``(Q, N)``, for one image (higher is better)."""
        iou = box_iou(boxes_xyxy, box_convert(target_cxcywh, "cxcywh", "xyxy"))
        return self.alpha * logits.sigmoid()[:, None] + (1 - self.alpha) * iou

    @torch.no_grad()
    def __call__(self, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, Any]]) -> MatchIndices:
        return _match_each_image(outputs, targets, self._match_one)

    def _match_one(self, b: int, logits: Tensor, boxes_xyxy: Tensor, target_cxcywh: Tensor):
        quality = self.quality(logits, boxes_xyxy, target_cxcywh)
        k = min(self.topk, quality.shape[0])
        top = quality.topk(k, dim=0).indices  # (k, N)
        selected = torch.zeros_like(quality, dtype=torch.bool)
        selected.scatter_(0, top, True)
        selected &= quality > self.iou_threshold
        return selected.nonzero(as_tuple=True)


def _match_each_image(
    outputs: Mapping[str, Any], targets: Sequence[Mapping[str, Any]], match_one
) -> MatchIndices:
    """Run ``match_one(b, logits (Q,), boxes_xyxy (Q,4), targets_cxcywh (N,4))`` on every image with targets;
    images without targets get empty index pairs."""
    logits = prediction_logits(outputs)
    boxes = prediction_boxes_xyxy(outputs)
    _check_batch(logits, targets)
    indices: MatchIndices = []
    for b, target in enumerate(targets):
        target_boxes = target_boxes_cxcywh(target, logits.device)
        if len(target_boxes) == 0:
            indices.append(_empty(logits.device))
        else:
            indices.append(match_one(b, logits[b], boxes[b], target_boxes))
    return indices
