"""From clip items to video-model inputs and per-frame loss targets, with the preprocessing of inference.

A :class:`medsam3.data.clips.ClipSample` (record, start, length, stride, concept) becomes one example:

1. **Frames.** Every slice of the clip goes through the slice loader of 2D training
   (:class:`~medsam3.train.batches.ItemLoader`, without its augmentation and box prompt): canonical slice,
   intensity mapped as ``medsam3 segment`` maps it (CT windows follow the concept, MR percentiles over the
   whole volume, the same for every frame), RGB, square resize to the model input, ``(x / 255 - 0.5) / 0.5``.
   Per frame the targets are the concept's objects (``boxes (N, 4)`` normalised ``cxcywh``,
   ``masks (N, S, S)`` bool); a frame where the concept is absent has ``N = 0``.
2. **Augmentation** (training only, ``augment.enabled``). By default **one draw per clip**, applied to every
   frame: the slices of a volume are aligned, so a clip keeps the geometry inference sees, and the tracker's
   memory learns from consistent motion; only the pixel noise differs per frame. With ``per_frame`` each frame
   gets its own draw (closer to Medical SAM3 V2, which resizes every frame to its own random square size):
   frames then move independently, which no volume does at inference.
3. **Prompt.** The concept, tokenised once for the clip. With probability ``box_prompt_fraction`` (and an
   object on frame 0) the box of one object on frame 0 is added, jittered by ``box_noise_std`` (0: the clean
   box, as V2); it is given to the detector on frame 0 only.
4. **Tracker start.** ``init_masks (S, S)`` is the concept's mask on frame 0; with probability
   ``gt_init_fraction`` (``init_from_gt``) the tracker starts from it instead of the detector's top mask.

Randomness: augmentation from ``default_rng([seed, 104729, index])`` (per frame ``[seed, 104729, index,
frame]``), the box from ``[seed, 7919, index]``, the tracker start from ``[seed, 15485863, index]``: an
example depends only on the clip, never on worker, rank or resume point.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from medsam3.data.clips import ClipSample
from medsam3.data.sampler import SliceSample
from medsam3.train import augment as aug
from medsam3.train.batches import ItemLoader, mask_boxes_cxcywh, noisy_box_cxcywh, prompt_boxes

_BOX_STREAM = 7919
_AUGMENT_STREAM = 104729
_INIT_STREAM = 15485863
_ITEM_KEYS = ("index", "dataset", "concept", "negative", "record", "start", "length", "stride")


class ClipLoader:
    """Callable ``ClipSample -> example dict`` (picklable, for DataLoader workers).

    Args:
        frames: the slice loader (its records, input size, tokenizer, volume cache); its own augmentation
            and box prompts are not used.
        seed: seed of the clip randomness.
        box_prompt_fraction, box_noise_std, box_noise_max: the frame-0 box prompt (module docstring).
        augment: augmentation settings (None or disabled: none); per_frame: one draw per frame.
        gt_init_fraction: probability that the tracker starts from the ground-truth mask of frame 0.

    Example keys: ``pixel_values (n, 3, S, S)`` float32; ``input_ids``, ``attention_mask`` ``(32,)`` int64;
    ``prompt_box`` ``(4,)`` float32 or None; ``targets``: n dicts with ``boxes (N, 4)``, ``masks (N, S, S)``;
    ``init_masks (S, S)`` bool; ``init_from_gt`` bool; ``references``: n ``(H, W)`` bool numpy masks on the
    slices' own grid; and the clip's fields (``index``, ``dataset``, ``concept``, ``negative``, ``record``,
    ``start``, ``length``, ``stride``).
    """

    def __init__(
        self,
        frames: ItemLoader,
        *,
        seed: int = 0,
        box_prompt_fraction: float = 0.0,
        box_noise_std: float = 0.0,
        box_noise_max: float = 20.0,
        augment: aug.AugmentSettings | None = None,
        per_frame: bool = False,
        gt_init_fraction: float = 0.0,
    ):
        self.frames = frames
        self.seed = int(seed)
        self.box_prompt_fraction = float(box_prompt_fraction)
        self.box_noise_std = float(box_noise_std)
        self.box_noise_max = float(box_noise_max)
        self.augment = augment if augment is not None and augment.enabled else None
        self.per_frame = bool(per_frame)
        self.gt_init_fraction = float(gt_init_fraction)

    @property
    def image_size(self) -> int:
        return self.frames.image_size

    def plain(self, clip: ClipSample) -> dict[str, Any]:
        """The example of ``clip`` without augmentation."""
        return self(clip, augment=False)

    def __call__(self, clip: ClipSample, augment: bool = True) -> dict[str, Any]:
        s = self.image_size
        pixels, targets, references, unions = [], [], [], []
        draws = None
        if augment and self.augment is not None:
            is_color = bool(self.frames.volume(clip.record).is_color)
            allow_flip = not aug.is_positional(clip.concept)
            if self.per_frame:
                draws = [
                    aug.draw(
                        self.augment,
                        np.random.default_rng([self.seed, _AUGMENT_STREAM, int(clip.index), j]),
                        allow_flip=allow_flip,
                        is_color=is_color,
                    )
                    for j in range(clip.length)
                ]
            else:
                one = aug.draw(
                    self.augment,
                    np.random.default_rng([self.seed, _AUGMENT_STREAM, int(clip.index)]),
                    allow_flip=allow_flip,
                    is_color=is_color,
                )
                draws = [replace(one, noise_seed=(one.noise_seed + j) % 2**31) for j in range(clip.length)]
        for j, k in enumerate(clip.slices):
            ex = self.frames.plain(SliceSample(clip.index, clip.record, k, clip.concept, False, clip.dataset))
            pv, masks = ex["pixel_values"], ex["masks"]
            if draws is not None:
                image01 = pv * self.frames.std + self.frames.mean
                image01, masks = aug.apply(image01, masks, draws[j])
                masks = masks[masks.flatten(1).any(dim=1)] if len(masks) else masks
                pv = ((image01 - self.frames.mean) / self.frames.std).float().contiguous()
            boxes = torch.from_numpy(mask_boxes_cxcywh(masks.numpy()))
            pixels.append(pv)
            targets.append({"boxes": boxes, "masks": masks.bool()})
            references.append(ex["reference"])
            unions.append(masks.any(dim=0) if len(masks) else torch.zeros(s, s, dtype=torch.bool))

        prompt_box = None
        rng = np.random.default_rng([self.seed, _BOX_STREAM, int(clip.index)])
        first = targets[0]["boxes"].numpy()
        if len(first) and rng.random() < self.box_prompt_fraction:
            j = int(rng.integers(len(first)))
            prompt_box = torch.from_numpy(
                noisy_box_cxcywh(first[j], s, rng, self.box_noise_std, self.box_noise_max)
            )
        init_rng = np.random.default_rng([self.seed, _INIT_STREAM, int(clip.index)])
        input_ids, attention_mask = self.frames.tokens(clip.concept)
        return {
            "pixel_values": torch.stack(pixels),
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "prompt_box": prompt_box,
            "targets": targets,
            "init_masks": unions[0],
            "init_from_gt": bool(init_rng.random() < self.gt_init_fraction),
            "references": references,
            "index": int(clip.index),
            "dataset": clip.dataset,
            "concept": clip.concept,
            "negative": bool(clip.negative),
            "record": int(clip.record),
            "start": int(clip.start),
            "length": int(clip.length),
            "stride": int(clip.stride),
        }


def collate_clips(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack clip examples into a batch of ``B`` clips of up to ``n`` frames.

    Returns ``pixel_values (B, n, 3, S, S)`` (frames past a clip's length are zeros), ``num_frames (B,)``
    int64, ``input_ids`` / ``attention_mask`` ``(B, 32)``, ``boxes (B, 1, 4)`` / ``box_labels (B, 1)`` for
    frame 0 (label 1, or -10 for clips without a box; both None when no clip has one), ``init_masks (B, S,
    S)`` bool, ``init_from_gt (B,)`` bool, ``targets`` (B lists of per-frame dicts) and ``items`` (the clips'
    other keys, with ``references``).
    """
    n = max(e["pixel_values"].shape[0] for e in examples)
    first = examples[0]["pixel_values"]
    pixel_values = first.new_zeros((len(examples), n, *first.shape[1:]))
    for i, e in enumerate(examples):
        pixel_values[i, : e["pixel_values"].shape[0]] = e["pixel_values"]
    batch: dict[str, Any] = {
        "pixel_values": pixel_values,
        "num_frames": torch.tensor([e["pixel_values"].shape[0] for e in examples], dtype=torch.long),
        "input_ids": torch.stack([e["input_ids"] for e in examples]),
        "attention_mask": torch.stack([e["attention_mask"] for e in examples]),
        "boxes": None,
        "box_labels": None,
        "init_masks": torch.stack([e["init_masks"] for e in examples]),
        "init_from_gt": torch.tensor([e["init_from_gt"] for e in examples], dtype=torch.bool),
        "targets": [e["targets"] for e in examples],
        "items": [{**{k: e[k] for k in _ITEM_KEYS}, "references": e["references"]} for e in examples],
    }
    batch["boxes"], batch["box_labels"] = prompt_boxes(examples)
    return batch


def count_clip_targets(batches: Sequence[dict[str, Any]]) -> list[float]:
    """``[detector target objects over all frames, tracked frames]`` of a list of collated clip batches.

    Tracked frames are frames 1..n-1 of every clip (frame 0 starts the tracker).
    """
    objects = sum(int(t["boxes"].shape[0]) for b in batches for clip in b["targets"] for t in clip)
    tracked = sum(max(0, int(n) - 1) for b in batches for n in b["num_frames"])
    return [float(objects), float(tracked)]


def clips_to_device(batch: dict[str, Any], device) -> dict[str, Any]:
    """Model inputs of a clip batch on ``device`` and its targets (frames of all clips, then tracked frames).

    ``targets`` lists the per-frame target dicts of every clip's frames in order (the detector's batch);
    ``track_targets`` is ``(T, S, S)`` bool: the concept's mask on frames 1..n-1 of every clip, in order.
    """
    keys = ("pixel_values", "num_frames", "input_ids", "attention_mask", "boxes", "box_labels")
    inputs = {k: (batch[k].to(device) if isinstance(batch[k], torch.Tensor) else batch[k]) for k in keys}
    inputs["init_masks"] = batch["init_masks"].to(device)
    inputs["init_from_gt"] = batch["init_from_gt"].to(device)
    frames = [{k: v.to(device) for k, v in t.items()} for clip in batch["targets"] for t in clip]
    s = batch["pixel_values"].shape[-1]
    unions = []
    for clip in batch["targets"]:
        for t in clip[1:]:
            m = t["masks"]
            unions.append(m.any(dim=0) if len(m) else torch.zeros(s, s, dtype=torch.bool))
    track = (
        torch.stack(unions).to(device) if unions else torch.zeros(0, s, s, dtype=torch.bool, device=device)
    )
    return {"inputs": inputs, "targets": frames, "track_targets": track}
