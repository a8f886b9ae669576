"""3D post-processing of slice-wise masks: key-slice chains, holes, connected components, one label map.

Every function works on canonical ``(Z, Y, X)`` boolean volumes (see
:mod:`medsam3.preprocess.orientation`) and a slicing ``axis`` (0, 1 or 2): slice ``k`` is
``volume[(slice(None),) * axis + (k,)]``. Nothing here resamples; the inputs are never modified.

Rules, in the order :func:`postprocess_concept` applies them to each concept:

1. :func:`chain_from_key` (key-slice box prompts only): starting at the key slice, a neighbouring slice's
   mask is kept while it overlaps (shares at least one pixel with) the kept mask of the slice before it on
   the way out; the chain stops at the first slice where the structure is lost, in each direction.
2. :func:`fill_holes_in_slices`: background regions enclosed by the mask **within a slice** (not
   connected to the slice border through 4-connected background) become foreground, optionally only up
   to ``max_area`` pixels. Slice-wise masks leave holes in the slicing plane; cavities closed in 3D only
   are rare in anatomy, so holes are filled per slice.
3. :func:`filter_components`: 3D connected components (26-connectivity: voxels touching by a face, an
   edge or a corner) smaller than ``min_voxels`` are removed; ``keep_largest`` keeps only the largest.

Concepts are then combined by :func:`assign_labels`: a voxel claimed by several concepts goes to the one
with the highest voxel confidence (as :func:`medsam3.predict.postprocess.resolve_pixelwise` does in 2D;
ties go to the earlier prompt).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from medsam3.predict.options import VolumeOptions
from medsam3.predict.postprocess import label_dtype, sigmoid
from medsam3.predict.volume.plan import KEPT, NO_PRESENCE, NOT_SEARCHED, ConceptSlices, SlicePlan
from medsam3.preprocess.resize import ResizeTransform
from medsam3.preprocess.slices import take_slice

#: 26-connectivity in 3D.
FULL_3D = ndimage.generate_binary_structure(3, 3)
#: 4-connectivity in 2D (background paths for holes).
CROSS_2D = ndimage.generate_binary_structure(2, 1)


def _slice(volume: np.ndarray, axis: int, k: int) -> np.ndarray:
    return volume[(slice(None),) * axis + (k,)]


def slice_counts(mask: np.ndarray, axis: int) -> np.ndarray:
    """Foreground pixels per slice along ``axis``: ``(n,)`` int64."""
    other = tuple(a for a in range(3) if a != axis)
    return np.asarray(mask, dtype=bool).sum(axis=other)


def chain_from_key(mask: np.ndarray, axis: int, key: int) -> np.ndarray:
    """The slices of ``mask`` reached from slice ``key`` through overlapping neighbours (rule 1).

    Returns a new boolean volume: ``mask`` on the chained slices, empty elsewhere (and empty when the key
    slice itself is empty).
    """
    mask = np.asarray(mask, dtype=bool)
    out = np.zeros_like(mask)
    n = mask.shape[axis]
    if not _slice(mask, axis, key).any():
        return out
    _slice(out, axis, key)[...] = _slice(mask, axis, key)
    for step in (1, -1):
        prev = _slice(mask, axis, key)
        k = key + step
        while 0 <= k < n:
            cur = _slice(mask, axis, k)
            if not (cur & prev).any():
                break
            _slice(out, axis, k)[...] = cur
            prev = cur
            k += step
    return out


def fill_holes_2d(mask: np.ndarray, max_area: int | None = None) -> np.ndarray:
    """Fill the enclosed background regions of a 2D mask (all, or those of at most ``max_area`` pixels)."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask.copy()
    if max_area is None:
        return ndimage.binary_fill_holes(mask, structure=CROSS_2D)
    labels, n = ndimage.label(~mask, structure=CROSS_2D)
    if n == 0:
        return mask.copy()
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    areas = np.bincount(labels.ravel(), minlength=n + 1)
    fill = areas <= int(max_area)
    fill[0] = False
    fill[border] = False
    return mask | fill[labels]


def fill_holes_in_slices(mask: np.ndarray, axis: int, max_area: int | None = None) -> np.ndarray:
    """Rule 2 on every non-empty slice along ``axis``; returns a new volume."""
    mask = np.asarray(mask, dtype=bool)
    out = mask.copy()
    for k in np.flatnonzero(slice_counts(mask, axis)):
        _slice(out, axis, int(k))[...] = fill_holes_2d(_slice(mask, axis, int(k)), max_area)
    return out


@dataclass(frozen=True)
class ComponentReport:
    """What :func:`filter_components` did: components found and kept, voxels removed."""

    found: int
    kept: int
    removed_voxels: int

    def to_dict(self) -> dict:
        return {
            "components_found": self.found,
            "components_kept": self.kept,
            "voxels_removed": self.removed_voxels,
        }


def filter_components(
    mask: np.ndarray, *, min_voxels: int = 0, keep_largest: bool = False
) -> tuple[np.ndarray, ComponentReport]:
    """Rule 3: drop 26-connected components under ``min_voxels``; optionally keep only the largest.

    Ties for the largest go to the component met first in array order. Returns ``(new mask, report)``.
    """
    mask = np.asarray(mask, dtype=bool)
    labels, n = ndimage.label(mask, structure=FULL_3D)
    if n == 0:
        return mask.copy(), ComponentReport(0, 0, 0)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= max(0, int(min_voxels))
    keep[0] = False
    if keep_largest and keep.any():
        best = int(np.argmax(np.where(keep, sizes, -1)))
        keep[:] = False
        keep[best] = True
    out = keep[labels]
    return out, ComponentReport(int(n), int(keep.sum()), int(mask.sum() - out.sum()))


def assign_labels(
    masks: Sequence[np.ndarray | None],
    values: Sequence[int],
    axis: int,
    confidence: Callable[[int, int], np.ndarray | float],
    shape: Sequence[int],
) -> np.ndarray:
    """One canonical label map from per-concept masks, overlaps resolved voxel-wise by confidence.

    Args:
        masks: one boolean ``(Z, Y, X)`` volume per concept (``None`` for an absent concept).
        values: label value of each concept.
        axis: slicing axis; overlaps are resolved one slice at a time.
        confidence: ``confidence(concept index, slice index)`` -> the concept's voxel confidence on that
            slice, an array of the slice's shape or a scalar. Only called where concepts overlap.
        shape: the canonical shape.

    Returns:
        ``(Z, Y, X)`` ``uint8`` / ``uint16`` label map, 0 = background. Where several concepts are on, the
        highest confidence wins; ties go to the earlier concept.
    """
    shape = tuple(int(s) for s in shape)
    out = np.zeros(shape, dtype=label_dtype(max([int(v) for v in values], default=0)))
    present = {i: m for i, m in enumerate(masks) if m is not None and m.any()}
    counts = {i: slice_counts(m, axis) for i, m in present.items()}
    for k in range(shape[axis]):
        on = [i for i in present if counts[i][k]]
        if not on:
            continue
        target = _slice(out, axis, k)
        if len(on) == 1:
            target[_slice(present[on[0]], axis, k)] = values[on[0]]
            continue
        stack = np.stack([_slice(present[i], axis, k) for i in on])
        many = stack.sum(axis=0) > 1
        for row, i in enumerate(on):  # voxels claimed once: no contest
            target[stack[row] & ~many] = values[i]
        if not many.any():
            continue
        conf = np.full((len(on), int(many.sum())), -np.inf, dtype=np.float32)
        for row, i in enumerate(on):
            c = np.broadcast_to(np.asarray(confidence(i, k), dtype=np.float32), many.shape)[many]
            conf[row] = np.where(stack[row][many], c, -np.inf)
        winner = np.argmax(conf, axis=0)
        lut = np.asarray([values[i] for i in on], dtype=out.dtype)
        target[many] = lut[winner]
    return out


@dataclass
class ConceptVolume:
    """One prompt after 3D post-processing, on the canonical grid."""

    mask: np.ndarray | None  # (Z, Y, X) bool, None when absent
    reason: str | None
    slices_detected: int
    components: dict | None = None


def concept_mask(res: ConceptSlices, transform: ResizeTransform, axis: int, shape) -> np.ndarray:
    """The kept slices of one prompt stacked into a canonical boolean volume."""
    mask = np.zeros(shape, dtype=bool)
    for k in res.kept:
        k = int(k)
        m = res.masks[k] if k in res.masks else transform.mask_to_original(res.logits[k]) > 0
        take_slice(mask, axis, k, display=True)[...] = m
    return mask


def postprocess_concept(
    res: ConceptSlices,
    plan: SlicePlan,
    transform: ResizeTransform,
    axis: int,
    shape,
    options: VolumeOptions,
    voxel_ml: float | None,
) -> ConceptVolume:
    """Step 5 of the module docstring for one prompt."""
    found = len(res.kept)
    if found == 0:
        searched = res.outcome != NOT_SEARCHED
        only_presence = searched.any() and bool((res.outcome[searched] == NO_PRESENCE).all())
        return ConceptVolume(None, "presence" if only_presence else "score", 0)
    if found < options.min_slices:
        return ConceptVolume(None, "slices", found)
    mask = concept_mask(res, transform, axis, shape)
    if plan.key is not None:
        mask = chain_from_key(mask, axis, plan.key)
        if not mask.any():
            return ConceptVolume(None, "key slice", found)
    if options.fill_holes:
        mask = fill_holes_in_slices(mask, axis, options.max_hole_pixels)
    min_voxels = options.min_component_voxels
    if options.min_component_ml > 0 and voxel_ml:
        min_voxels = max(min_voxels, math.ceil(options.min_component_ml / voxel_ml - 1e-9))
    report = None
    if min_voxels > 0 or options.keep_largest:
        mask, rep = filter_components(mask, min_voxels=min_voxels, keep_largest=options.keep_largest)
        report = rep.to_dict() | {"min_voxels": int(min_voxels), "keep_largest": options.keep_largest}
    if not mask.any():
        return ConceptVolume(None, "size", found, report)
    return ConceptVolume(mask, None, found, report)


def raw_concept(res: ConceptSlices, transform: ResizeTransform, axis: int, shape) -> ConceptVolume:
    """One prompt's kept slices as they are, without 3D post-processing (clips mode, as V2)."""
    found = len(res.kept)
    if found == 0:
        return ConceptVolume(None, "score", 0)
    return ConceptVolume(concept_mask(res, transform, axis, shape), None, found)


def voxel_confidence(res: ConceptSlices, transform: ResizeTransform, k: int) -> np.ndarray | float:
    """Confidence of one prompt's voxels on slice ``k`` (displayed slice layout): score x mask probability
    (slices mode), the mask probability (clips mode), the slice's tracker score (track mode)."""
    if k in res.probs:
        return res.probs[k]
    if k in res.logits:
        return res.scores[k] * sigmoid(transform.mask_to_original(res.logits[k]))
    return float(res.scores[k]) if res.outcome[k] == KEPT else 0.0
