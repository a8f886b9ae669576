"""Validation during training: Dice per dataset with the inference rule of ``medsam3 segment``.

Items: for every record of the validation split and every concept present in it, one text-only prompt on
one slice (2D: the image; 3D: the middle of the slices where the concept is present). With more than
``max_items`` items a seeded subset is used, the same at every validation of a run.

Each item goes through the training preprocessing (:class:`~medsam3.train.batches.ItemLoader`, without box
prompts) and the same forward as training and inference (:func:`medsam3.model.forward.predict_prompts`,
Meta's text-only sequence). The prediction is what ``medsam3 segment`` keeps for one prompt
(:mod:`medsam3.predict.postprocess`): confidences ``sigmoid(logit) * presence``; below the presence
threshold (0.5) or with no query above the confidence threshold (0.1) the mask is empty; otherwise the
mask of the most confident query, resized bilinearly to the slice's own grid and thresholded at 0. Dice
(:func:`medsam3.evaluate.metrics.dice`) is taken against the concept's mask on that grid.

The score of a run is the mean over datasets of each dataset's mean Dice (every dataset counts the same).
Items are split over processes and the results gathered, so every process gets the same result.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from medsam3.data.manifest import Record
from medsam3.data.sampler import SliceSample
from medsam3.evaluate.metrics import dice
from medsam3.predict.postprocess import query_scores, select_queries
from medsam3.preprocess.resize import ResizeTransform

#: Confidence and presence thresholds of ``medsam3 segment`` (Medical SAM3's evaluation).
THRESHOLD = 0.1
PRESENCE_THRESHOLD = 0.5


def validation_items(
    records: Sequence[Record], split: str, max_items: int, seed: int = 0
) -> list[SliceSample]:
    """One item per (record of ``split``, present concept); a seeded subset of ``max_items`` at most.

    ``SliceSample.record`` indexes ``records``; ``index`` numbers the items 0, 1, ...
    """
    found: list[tuple[int, str, int, str]] = []
    for i, r in enumerate(records):
        if r.split != split:
            continue
        for concept in sorted(r.foreground):
            slices = r.foreground_slices(concept)
            if slices.size:
                found.append((i, concept, int(slices[slices.size // 2]), r.dataset))
    if max_items and len(found) > max_items:
        keep = np.sort(np.random.default_rng(seed).choice(len(found), size=max_items, replace=False))
        found = [found[k] for k in keep]
    return [SliceSample(n, i, k, c, False, d) for n, (i, c, k, d) in enumerate(found)]


def predicted_mask(
    pred_logits: np.ndarray,
    presence_logit: np.ndarray | None,
    pred_masks: torch.Tensor,
    orig_hw: tuple[int, int],
    size: int,
) -> np.ndarray:
    """The inference rule for one prompt (module docstring): bool mask on the ``orig_hw`` grid.

    Args:
        pred_logits: ``(Q,)`` query logits; presence_logit: ``(1,)`` or None.
        pred_masks: ``(Q, h, w)`` mask logits on the model grid.
        orig_hw: the slice's own height and width; size: the model input side.
    """
    presence_in = None if presence_logit is None else presence_logit[None]
    scores, presence = query_scores(pred_logits[None], presence_in)
    sel = select_queries(
        scores[0],
        None if presence_logit is None else float(presence[0]),
        threshold=THRESHOLD,
        presence_threshold=PRESENCE_THRESHOLD,
    )
    if sel.absent:
        return np.zeros(orig_hw, bool)
    logits = pred_masks[sel.queries[0]].float().cpu().numpy()
    return ResizeTransform(orig_hw, size).mask_to_original(logits) > 0


@dataclass
class ValidationResult:
    """Dice per item and per dataset, and the run's score ``mean`` (mean of the dataset means)."""

    per_dataset: dict[str, float] = field(default_factory=dict)
    mean: float = float("nan")
    items: int = 0
    per_item: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"dice_mean": self.mean, "dice_per_dataset": dict(self.per_dataset), "items": self.items}


def _gather(values: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        parts: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, values)
        return [v for part in parts for v in part]
    return values


def run_validation(
    forward: Callable[[dict[str, Any]], Any],
    load: Callable[[SliceSample], dict[str, Any]],
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]],
    items: Sequence[SliceSample],
    image_size: int,
    batch_size: int = 1,
    rank: int = 0,
    world_size: int = 1,
) -> ValidationResult:
    """Validate ``items``; every process calls this and gets the same :class:`ValidationResult`.

    ``forward(batch)`` runs the model on a collated batch (text prompts only) and returns outputs with
    ``pred_logits (B, Q)``, ``presence_logits (B, 1)`` and ``pred_masks (B, Q, h, w)``. Each process
    handles ``items[rank::world_size]``, padded so that every process runs the same number of batches.
    """
    mine = list(items[rank::world_size])
    per_rank = math.ceil(len(items) / world_size) if items else 0
    padded = mine + [None] * (per_rank - len(mine))
    results: list[dict[str, Any]] = []
    with torch.no_grad():
        for start in range(0, len(padded), batch_size):
            chunk = padded[start : start + batch_size]
            real = [it for it in chunk if it is not None]
            examples = [load(it) for it in (real or [items[0]])]
            for e in examples:
                e["prompt_box"] = None
            batch = collate(examples)
            out = forward(batch)
            logits = out["pred_logits"].float().cpu().numpy()
            presence = out.get("presence_logits")
            presence = None if presence is None else presence.float().cpu().numpy()
            for row, item in enumerate(real):
                ref = batch["items"][row]["reference"]
                pred = predicted_mask(
                    logits[row],
                    None if presence is None else presence[row],
                    out["pred_masks"][row],
                    ref.shape,
                    image_size,
                )
                results.append(
                    {
                        "index": item.index,
                        "dataset": item.dataset,
                        "concept": item.concept,
                        "dice": float(dice(pred, ref)),
                    }
                )
    results = sorted(_gather(results), key=lambda r: r["index"])
    by_dataset: dict[str, list[float]] = {}
    for r in results:
        by_dataset.setdefault(r["dataset"], []).append(r["dice"])
    per_dataset = {d: float(np.mean(v)) for d, v in sorted(by_dataset.items())}
    mean = float(np.mean(list(per_dataset.values()))) if per_dataset else float("nan")
    return ValidationResult(per_dataset, mean, len(results), results)


def validate_now(
    acc, module, load, collate_fn, items: Sequence[SliceSample], image_size: int, batch_size: int = 1
) -> ValidationResult:
    """:func:`run_validation` through the prepared training module (eval mode, the run's autocast)."""
    was_training = module.training
    module.eval()

    def forward(batch: dict[str, Any]) -> dict[str, Any]:
        inputs = {k: batch[k].to(acc.device) for k in ("pixel_values", "input_ids", "attention_mask")}
        with acc.autocast():
            return module(**inputs)

    try:
        return run_validation(
            forward, load, collate_fn, items, image_size, batch_size, acc.process_index, acc.num_processes
        )
    finally:
        module.train(was_training)
