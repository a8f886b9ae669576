"""Volume requests before any model work: prompts checked and planned on the slices, intensity groups.

:func:`check_volume_request` checks everything that can be checked without the model (the options' rules
for volumes, each prompt against the volume, the mode) and plans, per prompt, where it is searched along
the slicing axis of the canonical volume (:class:`SlicePlan`); :func:`group_prompts` groups prompts by
intensity mapping (one image-feature pass per group). :class:`ConceptSlices` is the per-slice outcome of
one prompt that the slices and track modes fill and :mod:`medsam3.predict.volume.post` reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from medsam3.errors import PromptError
from medsam3.image import Image
from medsam3.predict.engine import Engine
from medsam3.predict.options import VolumeOptions, check_request
from medsam3.predict.prompts import Prompt
from medsam3.predict.volume.prompts import (
    VolumePrompt,
    canonical_box,
    covered_slices,
    slice_plane_box,
    validate_volume_prompt,
)
from medsam3.preprocess.intensity import IntensityParams, intensity_parameters
from medsam3.preprocess.orientation import PLANE_OF_AXIS, Reorientation, plan_reorientation, to_canonical

#: Per-slice outcome codes of :class:`ConceptSlices`.
KEPT, NO_PRESENCE, LOW_SCORE, NOT_SEARCHED = 0, 1, 2, 3


@dataclass
class ConceptSlices:
    """Per-slice outcome of one prompt along the slicing axis (``n`` slices).

    Attributes:
        outcome: ``(n,)`` int8: :data:`KEPT`, :data:`NO_PRESENCE`, :data:`LOW_SCORE` or :data:`NOT_SEARCHED`
            (outside the prompt's plan, or skipped by the coarse slice search,
            :mod:`~medsam3.predict.volume.search`).
        scores: ``(n,)`` float32: the kept mask's confidence, else the best confidence seen (0 unsearched).
        presence: ``(n,)`` float32 presence probability (NaN when unknown or unsearched).
        logits: kept slice -> ``(h, w)`` float32 mask logits on the model's mask grid (slices mode), or
            ``None`` in track mode (the mask is in ``masks``).
        masks: track and clips modes: kept slice -> ``(H, W)`` bool mask on the slice grid.
        probs: clips mode: kept slice -> ``(H, W)`` float32 mask probability on the slice grid.
    """

    outcome: np.ndarray
    scores: np.ndarray
    presence: np.ndarray
    logits: dict[int, np.ndarray] = field(default_factory=dict)
    masks: dict[int, np.ndarray] = field(default_factory=dict)
    probs: dict[int, np.ndarray] = field(default_factory=dict)

    @classmethod
    def empty(cls, n: int) -> ConceptSlices:
        return cls(np.full(n, NOT_SEARCHED, np.int8), np.zeros(n, np.float32), np.full(n, np.nan, np.float32))

    @property
    def kept(self) -> np.ndarray:
        return np.flatnonzero(self.outcome == KEPT)


@dataclass(frozen=True)
class SlicePlan:
    """Where one prompt may be searched along the slicing axis, and with which boxes (displayed slice pixels).

    ``slices``: every slice, or those a 3D box covers; ``key``: the key slice of a key-slice box prompt. The
    slices mode searches all of ``slices`` or, with the coarse search, the part of it that
    :class:`~medsam3.predict.volume.search.SliceSearch` reaches from probes (the key slice is one).
    """

    slices: range
    boxes: tuple[tuple[float, float, float, float], ...] = ()
    box_labels: tuple[int, ...] = ()
    key: int | None = None


def as_volume_prompt(prompt: Prompt | VolumePrompt) -> VolumePrompt:
    """A 2D :class:`Prompt` as a volume prompt (text only; boxes need a key slice, points are 2D only)."""
    if isinstance(prompt, VolumePrompt):
        return prompt
    if prompt.points:
        raise PromptError(
            f"prompt {prompt.display_name!r}: points are for 2D images; on a volume use a box "
            "on a key slice or a 3D box"
        )
    if prompt.boxes:
        raise PromptError(
            f"prompt {prompt.display_name!r}: a box on a volume needs its key slice "
            "(VolumePrompt(box_slice=K), --box-slice K) or a 3D box (--box3d)"
        )
    return VolumePrompt(prompt.text)


def plan_prompt(prompt: VolumePrompt, reo: Reorientation, axis: int) -> SlicePlan:
    """Map a prompt's boxes from input voxels to the slices along ``axis`` of the canonical volume."""
    shape = reo.canonical_shape
    n = shape[axis]
    if prompt.box3d is not None:
        x1, y1, z1, x2, y2, z2 = prompt.box3d
        lo, hi = canonical_box((z1, y1, x1), (z2, y2, x2), reo.source_axes, reo.flipped, shape)
        return SlicePlan(covered_slices(lo, hi, axis, n), (slice_plane_box(lo, hi, axis, shape),), (1,))
    if not prompt.boxes:
        return SlicePlan(range(n))
    assert prompt.box_slice is not None and prompt.box_labels is not None  # a validated prompt with boxes
    k = int(prompt.box_slice)
    boxes, key = [], None
    for x1, y1, x2, y2 in prompt.boxes:
        lo, hi = canonical_box((k, y1, x1), (k + 1, y2, x2), reo.source_axes, reo.flipped, shape)
        covered = covered_slices(lo, hi, axis, n)
        if len(covered) != 1:
            raise PromptError(
                f"the box of {prompt.display_name!r} lies on input slice {k} (array axis 0), which is not a "
                f"slice along the chosen {PLANE_OF_AXIS[axis]} axis; use --axis auto or a 3D box (--box3d)"
            )
        key = covered[0]
        boxes.append(slice_plane_box(lo, hi, axis, shape))
    return SlicePlan(range(n), tuple(boxes), tuple(prompt.box_labels), key)


def group_prompts(
    volume: np.ndarray, modality: str, window: str | None, prompts: list[VolumePrompt]
) -> dict[IntensityParams, list[int]]:
    """Prompts grouped by intensity mapping (computed on the whole volume): one image-feature pass each.

    Only CT mappings depend on the concept (its window); other modalities get one mapping for all.
    """
    if modality != "CT":
        return {intensity_parameters(volume, modality, window=window): list(range(len(prompts)))}
    groups: dict[IntensityParams, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(intensity_parameters(volume, modality, window=window, concept=p.text), []).append(i)
    return groups


def check_volume_request(
    image: Image, prompts: Sequence[Prompt | VolumePrompt], options: VolumeOptions
) -> tuple[list[VolumePrompt], Reorientation, int, list[SlicePlan]]:
    """Everything that can be checked without the model: prompts against the volume, the mode, the axis.

    Returns the volume prompts, the reorientation plan (no data moved), the slicing axis and each
    prompt's :class:`SlicePlan`. Raises :class:`~medsam3.errors.PromptError`.
    """
    checked = [as_volume_prompt(p) for p in prompts]
    if not checked:
        raise PromptError("no prompt given")
    for p in checked:
        validate_volume_prompt(p, image.spatial_shape)
    check_request(options, volume=True)
    if options.mode == "track" and any(p.boxes or p.box3d is not None or not p.text for p in checked):
        raise PromptError("track mode takes text prompts only; use --mode slices for boxes")
    reo = plan_reorientation(image)
    axis = reo.through_plane_axis if options.axis is None else int(options.axis)
    assert axis is not None  # a volume: validate_volume_prompt took its (Z, Y, X) shape
    return checked, reo, axis, [plan_prompt(p, reo, axis) for p in checked]


def prepare(
    engine: Engine, image: Image, prompts: Sequence[Prompt | VolumePrompt], options: VolumeOptions
) -> tuple[list[VolumePrompt], Image, Reorientation, int, list[SlicePlan]]:
    """:func:`check_volume_request`, the token limit, then the canonical volume (no model work yet)."""
    prompts, _, axis, plans = check_volume_request(image, prompts, options)
    engine.tokenize([p.model_text for p in prompts])  # too long -> PromptError before any work
    canonical, reo = to_canonical(image)
    return prompts, canonical, reo, axis, plans
