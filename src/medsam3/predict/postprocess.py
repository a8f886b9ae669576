"""From SAM3 outputs to kept masks and one label map: scores, presence gating, pixel-wise resolution.

Scores follow SAM3 (Meta's ``Sam3Processor`` and transformers' ``post_process_instance_segmentation``):
the confidence of query ``q`` for a prompt is ``sigmoid(pred_logits[q]) * sigmoid(presence_logit)``.

The inference rule (Medical SAM3, paper section 3), per prompt:

1. ``presence = sigmoid(presence_logit)``. Below ``presence_threshold`` the prompt is reported **absent**
   (empty mask): the model says the concept is not in the image, and no mask is guessed.
2. Otherwise the queries whose confidence exceeds ``threshold`` are candidates; none -> absent.
3. Semantic mode keeps the single best candidate; instance mode keeps all candidates (best first).

Several kept masks are then resolved **pixel-wise**: every pixel where at least one kept mask is on
(mask logit > 0 on the original grid) goes to the mask with the highest pixel confidence
``confidence * sigmoid(mask_logit)`` there; ties go to the earlier mask.

All arrays here are numpy on the CPU; masks are logits on the original image grid ``(H, W)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function, float32 (float64 input stays float64)."""
    x = np.asarray(x)
    if x.dtype.kind != "f":
        x = x.astype(np.float32)
    out = np.empty_like(x)
    pos = x >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-x[pos]))
    e = np.exp(x[~pos])
    out[~pos] = e / (1.0 + e)
    return out


def query_scores(
    pred_logits: np.ndarray, presence_logits: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Confidence of every query and the presence probability of every prompt.

    Args:
        pred_logits: ``(N, Q)`` query logits.
        presence_logits: ``(N, 1)`` or ``(N,)`` presence logits, or ``None`` (presence taken as 1).

    Returns:
        ``(scores (N, Q), presence (N,))`` with ``scores = sigmoid(pred_logits) * presence[:, None]``.
    """
    logits = np.asarray(pred_logits, dtype=np.float32)
    if presence_logits is None:
        presence = np.ones(logits.shape[0], dtype=np.float32)
    else:
        presence = sigmoid(np.asarray(presence_logits, dtype=np.float32).reshape(logits.shape[0]))
    return sigmoid(logits) * presence[:, None], presence


@dataclass(frozen=True)
class Selection:
    """The queries kept for one prompt.

    Attributes:
        queries: kept query indices, best first (empty when absent).
        scores: their confidences.
        presence: the prompt's presence probability (``None`` when the model has no presence head).
        best_score: the highest confidence over all queries (reported even when below the threshold).
        reason: ``None`` when something was kept, ``"presence"`` or ``"score"`` when absent.
    """

    queries: tuple[int, ...]
    scores: tuple[float, ...]
    presence: float | None
    best_score: float
    reason: str | None

    @property
    def absent(self) -> bool:
        return not self.queries


def select_queries(
    scores: np.ndarray,
    presence: float | None,
    *,
    threshold: float,
    presence_threshold: float,
    instances: bool = False,
) -> Selection:
    """Apply the inference rule to one prompt's query confidences ``scores (Q,)``.

    A query is a candidate when its confidence is strictly above ``threshold`` (as in SAM3's
    post-processing); the prompt is absent when ``presence < presence_threshold``.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    best = float(scores.max()) if scores.size else 0.0
    if presence is not None and presence < presence_threshold:
        return Selection((), (), presence, best, "presence")
    order = np.argsort(-scores, kind="stable")
    keep = [int(q) for q in order if scores[q] > threshold]
    if not keep:
        return Selection((), (), presence, best, "score")
    if not instances:
        keep = keep[:1]
    return Selection(tuple(keep), tuple(float(scores[q]) for q in keep), presence, best, None)


def resolve_pixelwise(mask_logits: np.ndarray, confidences: np.ndarray) -> np.ndarray:
    """Assign each pixel to at most one of ``K`` masks.

    Args:
        mask_logits: ``(K, H, W)`` mask logits on the output grid; mask ``k`` is on where its logit > 0.
        confidences: ``(K,)`` confidence of each mask.

    Returns:
        ``(H, W)`` int32: the index ``k`` of the winning mask, ``-1`` where no mask is on. The winner has
        the largest ``confidences[k] * sigmoid(mask_logits[k])`` among the masks that are on; ties go to the
        lower ``k``.
    """
    logits = np.asarray(mask_logits, dtype=np.float32)
    if logits.ndim != 3:
        raise ValueError(f"expected mask logits (K, H, W), got shape {logits.shape}")
    k, h, w = logits.shape
    out = np.full((h, w), -1, dtype=np.int32)
    if k == 0:
        return out
    conf = np.asarray(confidences, dtype=np.float32).reshape(k, 1, 1)
    # Row blocks keep the temporaries to about 4 M values whatever the image size.
    step = max(1, (1 << 22) // max(1, k * w))
    for top in range(0, h, step):
        block = logits[:, top : top + step]
        pixel_conf = np.where(block > 0, conf * sigmoid(block), -np.inf)
        winner = np.argmax(pixel_conf, axis=0).astype(np.int32)
        on = np.isfinite(np.take_along_axis(pixel_conf, winner[None], axis=0)[0])
        out[top : top + step][on] = winner[on]
    return out


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Pixel extent of a binary mask ``(H, W)`` as ``(x1, y1, x2, y2)`` with exclusive ends, or ``None``.

    ``x2 - x1`` and ``y2 - y1`` are the width and height in pixels (the same continuous-coordinate
    convention as box prompts).
    """
    mask = np.asarray(mask, dtype=bool)
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def label_dtype(max_value: int) -> np.dtype:
    """``uint8`` when labels fit, else ``uint16``."""
    if max_value > 65535:
        raise ValueError(f"{max_value} labels do not fit a uint16 label map")
    return np.dtype(np.uint8) if max_value <= 255 else np.dtype(np.uint16)


def points_select(masks: np.ndarray, points: Sequence[Sequence[float]], labels: Sequence[int]) -> np.ndarray:
    """Which of ``K`` binary masks ``(K, H, W)`` a point set selects.

    A mask is selected when it contains at least one positive point and no negative point. A point
    ``(x, y)`` in continuous pixel coordinates falls in pixel ``(row floor(y), column floor(x))``, clipped to
    the grid. Returns a ``(K,)`` bool array.
    """
    masks = np.asarray(masks, dtype=bool)
    k, h, w = masks.shape
    pos = np.zeros(k, dtype=bool)
    neg = np.zeros(k, dtype=bool)
    for (x, y), label in zip(points, labels, strict=True):
        col = min(max(int(np.floor(x)), 0), w - 1)
        row = min(max(int(np.floor(y)), 0), h - 1)
        hit = masks[:, row, col]
        if label == 1:
            pos |= hit
        else:
            neg |= hit
    return pos & ~neg
