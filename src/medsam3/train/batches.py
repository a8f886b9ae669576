"""From sampler items to model inputs and loss targets, with the preprocessing ``medsam3 segment`` uses.

An item (:class:`medsam3.data.sampler.SliceSample`: record, slice, concept, negative) becomes one example:

1. **Pixels.** The record's image is read (:func:`medsam3.io.readers.read_image`, first channel file; the
   manifest's modality). A 3D volume and its label map are reoriented to the canonical frame
   (:func:`medsam3.preprocess.to_canonical`) and the item's slice, an index along the file's axis 0, is
   taken along the canonical axis that axis became (mirrored index when that axis was flipped): the slice
   inference sees. Intensities are mapped exactly as :class:`~medsam3.predict.segmenter.Segmenter` does,
   by :func:`~medsam3.preprocess.intensity.intensity_parameters` with the concept (CT windows follow the
   concept; percentiles are taken over the whole volume), then ``slice_to_rgb``, the square resize of
   :class:`~medsam3.preprocess.ResizeTransform` and ``(x / 255 - 0.5) / 0.5``: ``pixel_values`` float32
   ``(3, S, S)``.
2. **Prompt.** The concept, tokenised to 32 CLIP tokens. With probability ``box_prompt_fraction`` (and a
   target present) a noisy ground-truth box of one target object is added: each of ``x1, y1, x2, y2``
   moves by ``N(0, box_noise_std * side)`` pixels, clipped to ``box_noise_max`` and to the image
   (SAM3's ``RandomizeInputBbox``). Box prompts are normalised ``cxcywh`` of the model input.
3. **Targets** (:class:`~medsam3.train.losses.Sam3Loss` conventions): the concept's mask (the union of its
   label values) on the slice, resized to ``S x S`` (nearest). One target object per instance id for
   instance-labelled records, else one object for the whole mask; ``boxes (N, 4)`` normalised ``cxcywh``
   from the resized masks, ``masks (N, S, S)`` bool. A negative item has ``N = 0``.

4. **Augmentation** (training only, when ``augment.enabled``): :mod:`medsam3.train.augment` moves the image
   (in ``[0, 1]``, before normalisation) and its target masks together on the ``S x S`` grid and jitters the
   intensities; objects moved out of view are dropped, boxes are taken from the moved masks (so a box
   prompt follows them). ``reference`` is never augmented. Validation calls :meth:`ItemLoader.plain`.

The randomness of step 2 comes from ``numpy.random.default_rng([seed, 7919, item.index])``, that of step 4
from ``default_rng([seed, 104729, item.index])``: an example depends only on the item, never on worker,
rank or resume point. Loaded volumes are cached per process
(``cache_volumes`` entries, least recently used dropped).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torchvision.ops import box_convert

from medsam3.data.labels import load_label_arrays
from medsam3.data.manifest import Record
from medsam3.data.sampler import SliceSample
from medsam3.errors import InputError
from medsam3.image import MODALITIES
from medsam3.model.forward import BOX_PAD_LABEL
from medsam3.preprocess.intensity import IntensityParams, apply_intensity, intensity_parameters
from medsam3.preprocess.orientation import plan_reorientation
from medsam3.preprocess.resize import ResizeTransform
from medsam3.preprocess.slices import slice_to_rgb, take_slice
from medsam3.train import augment as aug

#: Tokens per prompt of SAM3's text encoder.
TEXT_TOKENS = 32
_BOX_STREAM = 7919
_AUGMENT_STREAM = 104729
_ITEM_KEYS = ("index", "dataset", "concept", "negative", "record", "slice", "reference")


@dataclass
class _Volume:
    """A record's pixels and labels in the canonical frame, ready to slice."""

    image: np.ndarray  # (Z, Y, X[, C]) canonical, or (Y, X[, C]) for 2D
    is_color: bool
    semantic: np.ndarray  # label values, same spatial shape
    instances: np.ndarray | None
    slice_axis: int | None  # canonical axis of the file's axis 0 (None for 2D)
    flipped: bool


def slice_index(k: int, length: int, flipped: bool) -> int:
    """Canonical index of file slice ``k`` along an axis of ``length`` slices (mirrored when flipped)."""
    return length - 1 - k if flipped else k


def mask_boxes_cxcywh(masks: np.ndarray) -> np.ndarray:
    """Tight boxes of ``(N, S, S)`` bool masks as normalised ``cxcywh`` float32 ``(N, 4)``.

    A box spans pixel edges: a mask covering columns ``a..b`` has ``x1 = a``, ``x2 = b + 1`` (pixels),
    divided by the mask width (and likewise rows by the height).
    """
    n, h, w = masks.shape
    xyxy = torch.zeros((n, 4), dtype=torch.float64)
    for i in range(n):
        rows = np.flatnonzero(masks[i].any(axis=1))
        cols = np.flatnonzero(masks[i].any(axis=0))
        xyxy[i] = torch.tensor([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=torch.float64)
    scale = torch.tensor([w, h, w, h], dtype=torch.float64)
    return (box_convert(xyxy, "xyxy", "cxcywh") / scale).to(torch.float32).numpy()


def noisy_box_cxcywh(
    box: np.ndarray, size: int, rng: np.random.Generator, std: float, max_px: float
) -> np.ndarray:
    """A normalised ``cxcywh`` box jittered as SAM3's ``RandomizeInputBbox`` (module docstring)."""
    cxcywh = torch.tensor([float(v) * size for v in box], dtype=torch.float64)
    xyxy = box_convert(cxcywh, "cxcywh", "xyxy").numpy()
    w, h = float(cxcywh[2]), float(cxcywh[3])
    noise = rng.normal(0.0, std, 4) * np.array([w, h, w, h])
    xyxy = np.clip(xyxy + np.clip(noise, -max_px, max_px), 0.0, float(size))
    x1, x2 = sorted(xyxy[[0, 2]])
    y1, y2 = sorted(xyxy[[1, 3]])
    x2, y2 = max(x2, min(size, x1 + 1.0)), max(y2, min(size, y1 + 1.0))
    jittered = torch.tensor([x1, y1, x2, y2], dtype=torch.float64)
    return (box_convert(jittered, "xyxy", "cxcywh").to(torch.float32) / size).numpy()


class ItemLoader:
    """Callable ``SliceSample -> example dict`` (picklable, for DataLoader workers).

    Args:
        records: the manifest records the sampler indexes (``item.record`` is an index into them).
        image_size: the model's square input size ``S``.
        tokenizer: SAM3's CLIP tokenizer (``processor.tokenizer``).
        seed: seed of the box-prompt randomness.
        box_prompt_fraction, box_noise_std, box_noise_max: the box prompt (module docstring).
        cache_volumes: decoded records kept in memory.
        mean, std: pixel normalisation (SAM3: 0.5, 0.5).
        augment: training augmentation (:class:`medsam3.train.augment.AugmentSettings`; None: none).

    Example keys: ``pixel_values (3, S, S)`` float32; ``input_ids``, ``attention_mask`` ``(32,)`` int64;
    ``prompt_box`` ``(4,)`` float32 or None; ``boxes (N, 4)``, ``masks (N, S, S)`` torch tensors;
    ``reference (H, W)`` bool numpy, the concept's mask on the slice's own grid (for validation);
    ``index``, ``dataset``, ``concept``, ``negative``, ``record``, ``slice``.
    """

    def __init__(
        self,
        records: Sequence[Record],
        image_size: int,
        tokenizer: Any,
        *,
        seed: int = 0,
        box_prompt_fraction: float = 0.0,
        box_noise_std: float = 0.1,
        box_noise_max: float = 20.0,
        cache_volumes: int = 4,
        mean: float = 0.5,
        std: float = 0.5,
        augment: aug.AugmentSettings | None = None,
    ):
        self.records = list(records)
        self.image_size = int(image_size)
        self.tokenizer = tokenizer
        self.seed = int(seed)
        self.box_prompt_fraction = float(box_prompt_fraction)
        self.box_noise_std = float(box_noise_std)
        self.box_noise_max = float(box_noise_max)
        self.cache_volumes = max(0, int(cache_volumes))
        self.mean, self.std = float(mean), float(std)
        self.augment = augment if augment is not None and augment.enabled else None
        self._cache: OrderedDict[int, _Volume] = OrderedDict()
        self._tokens: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._intensity: dict[tuple[int, str], IntensityParams] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cache"], state["_tokens"], state["_intensity"] = OrderedDict(), {}, {}
        return state

    # -- reading -------------------------------------------------------------------------------------
    def _read(self, index: int) -> _Volume:
        from medsam3.io.readers import read_image

        record = self.records[index]
        modality = record.modality if record.modality in MODALITIES else None
        image = read_image(record.image[0], modality=modality)
        labels = load_label_arrays(record)
        spatial = image.spatial_shape
        if tuple(labels.semantic.shape) != tuple(spatial):
            raise InputError(
                record.label[0],
                f"label map of shape {labels.semantic.shape} does not match "
                f"its image {record.image[0]} of shape {spatial}",
            )
        if image.ndim == 3:
            reo = plan_reorientation(image)
            axis = reo.through_plane_axis
            return _Volume(
                reo.apply(image.array),
                image.is_color,
                reo.apply(labels.semantic),
                None if labels.instances is None else reo.apply(labels.instances),
                axis,
                axis in reo.flipped,
            )
        return _Volume(image.array, image.is_color, labels.semantic, labels.instances, None, False)

    def volume(self, index: int) -> _Volume:
        """The decoded record ``index`` (cached)."""
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        vol = self._read(index)
        if self.cache_volumes:
            self._cache[index] = vol
            while len(self._cache) > self.cache_volumes:
                self._cache.popitem(last=False)
        return vol

    def _slice(self, vol: _Volume, k: int, array: np.ndarray) -> np.ndarray:
        if vol.slice_axis is None:
            return array
        length = array.shape[vol.slice_axis]
        return take_slice(array, vol.slice_axis, slice_index(k, length, vol.flipped))

    def tokens(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)`` int64 ``(32,)`` of a prompt text (cached)."""
        if text not in self._tokens:
            enc = self.tokenizer(
                [text], padding="max_length", max_length=TEXT_TOKENS, truncation=True, return_tensors="pt"
            )
            self._tokens[text] = (enc["input_ids"][0].long(), enc["attention_mask"][0].long())
        return self._tokens[text]

    def intensity(self, index: int, concept: str) -> IntensityParams:
        """Intensity mapping of record ``index`` for ``concept``, chosen as ``medsam3 segment`` does."""
        key = (index, concept)
        if key not in self._intensity:
            record = self.records[index]
            vol = self.volume(index)
            self._intensity[key] = intensity_parameters(
                vol.image[..., :3] if vol.is_color else vol.image,
                record.modality if record.modality in MODALITIES else "OTHER",
                concept=concept,
            )
        return self._intensity[key]

    # -- one example ---------------------------------------------------------------------------------
    def plain(self, item: SliceSample) -> dict[str, Any]:
        """The example of ``item`` without augmentation (validation)."""
        return self(item, augment=False)

    def __call__(self, item: SliceSample, augment: bool = True) -> dict[str, Any]:
        record = self.records[item.record]
        vol = self.volume(item.record)
        pixels_all = vol.image[..., :3] if vol.is_color else vol.image
        params = self.intensity(item.record, item.concept)
        pixels = self._slice(vol, item.slice, pixels_all)
        semantic = self._slice(vol, item.slice, vol.semantic)
        h, w = semantic.shape
        transform = ResizeTransform((h, w), self.image_size)
        rgb = transform.image(slice_to_rgb(apply_intensity(pixels, params)))
        image01 = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))).float() / 255.0

        values = record.concept_values().get(item.concept, [])
        reference = np.isin(semantic, values) if values else np.zeros((h, w), bool)
        if record.instances and vol.instances is not None:
            inst = self._slice(vol, item.slice, vol.instances)
            ids = np.unique(inst[reference & (inst > 0)])
            objects = [reference & (inst == i) for i in ids]
        else:
            objects = [reference] if reference.any() else []
        resized = [transform.mask_to_model(m.astype(np.uint8)).astype(bool) for m in objects]
        masks = np.stack(resized) if resized else np.zeros((0, self.image_size, self.image_size), bool)
        if augment and self.augment is not None:
            arng = np.random.default_rng([self.seed, _AUGMENT_STREAM, int(item.index)])
            choice = aug.draw(
                self.augment,
                arng,
                allow_flip=not aug.is_positional(item.concept),
                is_color=bool(vol.is_color),
            )
            moved, moved_masks = aug.apply(image01, torch.from_numpy(masks), choice)
            image01, masks = moved, moved_masks.numpy()
        masks = masks[masks.any(axis=(1, 2))]
        boxes = mask_boxes_cxcywh(masks)
        pixel_values = ((image01 - self.mean) / self.std).float().contiguous()

        prompt_box = None
        rng = np.random.default_rng([self.seed, _BOX_STREAM, int(item.index)])
        if len(boxes) and rng.random() < self.box_prompt_fraction:
            j = int(rng.integers(len(boxes)))
            prompt_box = noisy_box_cxcywh(
                boxes[j], self.image_size, rng, self.box_noise_std, self.box_noise_max
            )
        input_ids, attention_mask = self.tokens(item.concept)
        return {
            "pixel_values": pixel_values,
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "prompt_box": None if prompt_box is None else torch.from_numpy(prompt_box),
            "boxes": torch.from_numpy(boxes),
            "masks": torch.from_numpy(masks),
            "reference": reference,
            "index": int(item.index),
            "dataset": item.dataset,
            "concept": item.concept,
            "negative": bool(item.negative),
            "record": int(item.record),
            "slice": int(item.slice),
        }


def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack examples into a batch.

    Returns ``pixel_values (B, 3, S, S)``, ``input_ids`` / ``attention_mask`` ``(B, 32)``, ``boxes`` /
    ``box_labels`` ``(B, 1, 4)`` / ``(B, 1)`` (label 1, or -10 padding for text-only rows; both None when
    no row has a box), ``targets`` (B dicts with ``boxes``, ``masks``) and ``items`` (the other keys).
    """
    batch = {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
        "input_ids": torch.stack([e["input_ids"] for e in examples]),
        "attention_mask": torch.stack([e["attention_mask"] for e in examples]),
        "boxes": None,
        "box_labels": None,
        "targets": [{"boxes": e["boxes"], "masks": e["masks"]} for e in examples],
        "items": [{k: e[k] for k in _ITEM_KEYS} for e in examples],
    }
    batch["boxes"], batch["box_labels"] = prompt_boxes(examples)
    return batch


def prompt_boxes(examples: Sequence[dict[str, Any]]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The examples' ``prompt_box`` (normalised cxcywh or ``None``) as ``boxes (B, 1, 4)`` and
    ``box_labels (B, 1)`` (1, or -10 padding for rows without one); ``(None, None)`` when no row has one."""
    if all(e["prompt_box"] is None for e in examples):
        return None, None
    boxes = torch.zeros(len(examples), 1, 4)
    labels = torch.full((len(examples), 1), BOX_PAD_LABEL, dtype=torch.long)
    for i, e in enumerate(examples):
        if e["prompt_box"] is not None:
            boxes[i, 0] = e["prompt_box"]
            labels[i, 0] = 1
    return boxes, labels


def count_targets(batches: Sequence[dict[str, Any]]) -> int:
    """Number of target objects in a list of collated batches."""
    return sum(int(t["boxes"].shape[0]) for b in batches for t in b["targets"])


def _shape_of(header_shape: tuple[int, ...], dims: int) -> tuple[int, ...]:
    return tuple(header_shape[:dims])


def verify_records(records: Sequence[Record], level: str) -> None:
    """Check records before training starts; raise :class:`InputError` naming the file and the problem.

    ``level``: ``none``; ``files`` (every listed image and label file exists, the manifest is consistent:
    :func:`medsam3.data.manifest.check_records`); ``headers`` (+ the image and label grids agree: shape,
    spacing, origin, direction, read from the headers only; no multi-channel volume files); ``full`` (+
    every label map is read, and a label value that the record's labels (the dataset's ``dataset.json``
    names) do not list is an error).
    """
    from medsam3.data.indexing import check_geometry
    from medsam3.data.labels import npz_member_header, read_header
    from medsam3.data.manifest import check_records

    if level == "none":
        return
    check_records(records, check_files=True)
    if level == "files":
        return
    for r in records:
        if r.layout == "coco":
            continue
        if r.layout == "npz":
            image = npz_member_header(r.image[0], r.source.get("image_key", "imgs"))
            label = npz_member_header(r.label[0], r.source.get("label_key", "gts"))
        else:
            image, label = read_header(r.image[0]), read_header(r.label[0])
        check_geometry(image, label, r.image[0], r.label[0])
        if r.dims == 3 and image.channels > 1:
            raise InputError(
                r.image[0],
                f"is a volume with {image.channels} channels in one file; training "
                "reads single-channel volumes (give one file per channel, nnU-Net style)",
            )
        if _shape_of(label.shape, r.dims) != tuple(r.shape):
            raise InputError(
                r.label[0],
                f"label grid {label.shape} differs from the manifest's shape "
                f"{r.shape} (the file changed since `medsam3 prepare`)",
            )
        if level != "full":
            continue
        semantic = load_label_arrays(r).semantic
        allowed = set(r.labels) | {v for vs in r.regions.values() for v in vs}
        unknown = sorted(set(np.unique(semantic).tolist()) - allowed - {0})
        if unknown:
            names = ", ".join(f"{k}={v!r}" for k, v in sorted(r.label_names.items())) or "none"
            raise InputError(
                r.label[0], f"label value {unknown[0]} is not among the dataset's labels ({names})"
            )
