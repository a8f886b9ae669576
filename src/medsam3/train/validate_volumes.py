"""Validation of video-model training: 3D Dice through the volume inference of ``--mode track`` / ``clips``.

Items: for every 3D record of the validation split and every concept present in it, one text prompt over
the whole volume (a seeded subset of ``max_items`` when there are more). Each volume is read and sliced as
training reads it (:class:`~medsam3.train.batches.ItemLoader`: canonical frame, slices along the acquired
axis), its slices are windowed as ``medsam3 segment`` windows them for the concept
(:func:`medsam3.predict.volume.track.video_frames` with the concept's intensity parameters), and the video
model segments the concept through

* ``track``: :func:`medsam3.predict.volume.track.track_volume_prompts` (start slices from probing, forward
  and reverse tracking, the union of the prompt's objects per slice, small holes and specks cleaned), or
* ``clips``: :func:`medsam3.predict.volume.clips.clips_volume_prompts` (V2's non-overlapping clips), a voxel
  kept where the mask is on and its probability above V2's fusion floor (0.5), as ``--mode clips`` keeps it.

Dice (:func:`medsam3.evaluate.metrics.dice`) is taken over the volume against the concept's mask. The score
is the mean over datasets of each dataset's mean Dice, as 2D validation; items are split over processes
and the results gathered.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from medsam3.data.manifest import Record
from medsam3.evaluate.metrics import dice
from medsam3.preprocess.slices import take_slice
from medsam3.train.batches import ItemLoader
from medsam3.train.validate import ValidationResult, _gather


def volume_items(
    records: Sequence[Record], split: str, max_items: int, seed: int = 0
) -> list[tuple[int, str]]:
    """``(record index, concept)`` for every 3D record of ``split`` and concept present in it; a seeded
    subset of ``max_items`` at most."""
    found = [
        (i, concept)
        for i, r in enumerate(records)
        if r.split == split and r.dims == 3
        for concept in sorted(r.foreground)
        if r.foreground_slices(concept).size
    ]
    if max_items and len(found) > max_items:
        keep = np.sort(np.random.default_rng(seed).choice(len(found), size=max_items, replace=False))
        found = [found[k] for k in keep]
    return found


def volume_case(loader: ItemLoader, record: int, concept: str) -> tuple[np.ndarray, np.ndarray]:
    """``(frames (Z, H, W, 3) uint8, reference (Z, H, W) bool)`` of one volume and concept, slices along the
    acquired axis of the canonical volume, windowed for the concept as inference windows them."""
    from medsam3.predict.volume.track import video_frames

    vol = loader.volume(record)
    if vol.slice_axis is None:
        raise ValueError(f"record {record} is not a volume")
    params = loader.intensity(record, concept)
    frames = video_frames(vol.image, vol.slice_axis, params)
    values = loader.records[record].concept_values().get(concept, [])
    mask = np.isin(vol.semantic, values)
    n = mask.shape[vol.slice_axis]
    reference = np.stack([take_slice(mask, vol.slice_axis, k, display=True) for k in range(n)])
    return frames, reference


def predict_volume(
    video_model, processor, frames: np.ndarray, concept: str, mode: str, clip_length: int, probes: int
) -> np.ndarray:
    """``(Z, H, W)`` bool prediction of ``concept`` by ``track`` or ``clips`` volume inference."""
    if mode == "track":
        from medsam3.predict.volume.track import track_volume_prompts

        result = track_volume_prompts(video_model, processor, frames, [concept], probes=probes)
        return next(iter(result.values())).masks
    from medsam3.predict.volume.clips import FUSION_FLOOR, clips_volume_prompts

    clipped = clips_volume_prompts(video_model, processor, frames, [concept], clip_length=clip_length)
    found = next(iter(clipped.values()))
    return found.masks & (found.probs > FUSION_FLOOR)


def run_volume_validation(
    video_model,
    processor,
    loader: ItemLoader,
    items: Sequence[tuple[int, str]],
    *,
    mode: str = "track",
    clip_length: int = 4,
    probes: int = 5,
    rank: int = 0,
    world_size: int = 1,
) -> ValidationResult:
    """3D Dice of ``items`` (module docstring); every process calls this and gets the same result.

    ``video_model`` is put in eval mode for the call and returned to its previous mode.
    """
    was_training = video_model.training
    video_model.eval()
    results: list[dict[str, Any]] = []
    try:
        with torch.no_grad():
            for n in range(rank, len(items), world_size):
                record, concept = items[n]
                frames, reference = volume_case(loader, record, concept)
                pred = predict_volume(video_model, processor, frames, concept, mode, clip_length, probes)
                results.append(
                    {
                        "index": n,
                        "dataset": loader.records[record].dataset,
                        "case": loader.records[record].case_id,
                        "concept": concept,
                        "dice": float(dice(pred, reference)),
                    }
                )
    finally:
        video_model.train(was_training)
    results = sorted(_gather(results), key=lambda r: r["index"])
    by_dataset: dict[str, list[float]] = {}
    for r in results:
        by_dataset.setdefault(r["dataset"], []).append(r["dice"])
    per_dataset = {d: float(np.mean(v)) for d, v in sorted(by_dataset.items())}
    mean = float(np.mean(list(per_dataset.values()))) if per_dataset else math.nan
    return ValidationResult(per_dataset, mean, len(results), results)
