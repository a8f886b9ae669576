"""Volumes as slice sequences: concept detection on every slice, 3D post-processing, the input's grid.

Flow of :func:`segment_volume` for a ``(Z, Y, X)`` volume and prompts (text, text + key-slice box, 3D box;
see :mod:`medsam3.predict.volume_prompts`):

1. **Canonical frame.** :func:`~medsam3.preprocess.orientation.to_canonical` (LPS, permutation and flips
   only). Slices are taken along ``axis``: by default the acquisition's through-plane axis
   (:attr:`~medsam3.preprocess.orientation.Reorientation.through_plane_axis`), so slices are the ones the
   scanner acquired; coronal / sagittal slices are shown to the model with superior at the top.
2. **Intensities** are mapped once for the whole volume
   (:func:`~medsam3.preprocess.intensity.intensity_parameters`: MR / PET percentiles over the whole
   volume, CT windows per concept). Prompts are grouped by mapping; each group is one pass over the slices.
3. **Image features** are computed in batches of ``slice_batch`` slices and reused by every prompt of the
   group: the vision encoder sees each slice exactly once per distinct mapping, whatever the number of
   prompts (slices on which no prompt of the group is searched, outside every 3D box, are not encoded;
   batches are made of the slices that are).
   Text features are computed once per volume. Slice x prompt rows run through
   :func:`~medsam3.model.forward.predict_prompts` in chunks of ``Segmenter.prompt_batch_size`` rows.
   With test-time mirroring (``Segmenter(mirror=True)``) each batch is also encoded mirrored along x, y
   and both, and each row's four predictions are merged into one candidate
   (:mod:`medsam3.predict.mirror`) before step 4.
4. **Per slice** the paper's rule (:func:`~medsam3.predict.postprocess.select_queries`): presence gate,
   then the best query whose confidence ``sigmoid(logit) * presence`` exceeds the threshold; its mask
   logits are resized bilinearly to the slice grid and thresholded at 0.
5. **Per concept in 3D** (:mod:`medsam3.predict.volume_post`): the concept is **absent** from the volume
   when fewer than ``min_slices`` slices pass the rule (reason ``"presence"`` when no slice passed the
   presence gate, ``"score"`` when none passed the threshold, ``"slices"`` when too few did); then the
   key-slice chain (box prompts on a key slice), hole filling per slice, 3D connected components (drop
   those under ``min_component_voxels`` / ``min_component_ml``, optionally keep the largest); a concept
   emptied by these steps is absent with reason ``"size"`` (``"key slice"`` when the key slice has no
   detection).
6. **One label map**: voxels claimed by several concepts go to the highest voxel confidence
   ``slice score * sigmoid(mask logit)``; prompt ``i`` has value ``i + 1``; the map is returned to the
   input grid exactly (:meth:`~medsam3.preprocess.orientation.Reorientation.invert`).

``mode="track"`` replaces steps 3-4 by SAM3's video model (:mod:`medsam3.predict.track`), text prompts
only, one tracking run per intensity group; its per-slice tracker score is the slice confidence.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

from medsam3.data.vocabulary import is_positional
from medsam3.errors import PromptError
from medsam3.image import Image
from medsam3.model.forward import BOX_PAD_LABEL, encode_image, encode_text, model_device, predict_prompts
from medsam3.predict.mirror import merge_mirrored, mirror_boxes, mirror_grid, mirrors_for
from medsam3.predict.postprocess import query_scores, select_queries, sigmoid
from medsam3.predict.prompts import Prompt
from medsam3.predict.volume_post import chain_from_key, fill_holes_in_slices, filter_components
from medsam3.predict.volume_prompts import (
    VolumePrompt,
    canonical_box,
    covered_slices,
    slice_plane_box,
    validate_volume_prompt,
)
from medsam3.preprocess.intensity import IntensityParams, apply_intensity, intensity_parameters
from medsam3.preprocess.orientation import PLANE_OF_AXIS, Reorientation, plan_reorientation, to_canonical
from medsam3.preprocess.resize import ResizeTransform
from medsam3.preprocess.slices import slice_to_rgb, take_slice

log = logging.getLogger(__name__)

MODES = ("slices", "track")
#: Per-slice outcome codes of :class:`ConceptSlices`.
KEPT, NO_PRESENCE, LOW_SCORE, NOT_SEARCHED = 0, 1, 2, 3


@dataclass(frozen=True)
class VolumeOptions:
    """How volumes are segmented (module docstring); defaults follow the paper's per-slice rule.

    Attributes:
        mode: ``"slices"`` (detection on every slice) or ``"track"`` (SAM3's video model).
        axis: canonical array axis to slice along (0 axial, 1 coronal, 2 sagittal); ``None``: the
            acquisition's through-plane axis.
        slice_batch: slices encoded together (memory grows with it).
        min_slices: a concept found on fewer slices is absent from the volume.
        min_component_voxels, min_component_ml: 3D components below either size are removed.
        keep_largest: keep only each concept's largest 3D component.
        fill_holes: fill enclosed holes per slice; ``max_hole_pixels`` limits the hole size (``None``: any).
        probes: track mode: slices probed for each prompt's start slice.
    """

    mode: str = "slices"
    axis: int | None = None
    slice_batch: int = 4
    min_slices: int = 1
    min_component_voxels: int = 0
    min_component_ml: float = 0.0
    keep_largest: bool = False
    fill_holes: bool = True
    max_hole_pixels: int | None = None
    probes: int = 8

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise PromptError(f"volume mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.axis is not None and self.axis not in (0, 1, 2):
            raise PromptError(f"slice axis must be 0, 1, 2 or auto, got {self.axis!r}")
        for name in ("slice_batch", "min_slices", "probes"):
            if int(getattr(self, name)) < 1:
                raise PromptError(f"{name.replace('_', ' ')} must be at least 1, got {getattr(self, name)}")
        if self.min_component_voxels < 0 or self.min_component_ml < 0:
            raise PromptError("minimum component sizes must be >= 0")
        if self.max_hole_pixels is not None and self.max_hole_pixels < 1:
            raise PromptError(f"max hole pixels must be at least 1, got {self.max_hole_pixels}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ConceptSlices:
    """Per-slice outcome of one prompt along the slicing axis (``n`` slices).

    Attributes:
        outcome: ``(n,)`` int8: :data:`KEPT`, :data:`NO_PRESENCE`, :data:`LOW_SCORE` or :data:`NOT_SEARCHED`.
        scores: ``(n,)`` float32: the kept mask's confidence, else the best confidence seen (0 unsearched).
        presence: ``(n,)`` float32 presence probability (NaN when unknown or unsearched).
        logits: kept slice -> ``(h, w)`` float32 mask logits on the model's mask grid (slices mode), or
            ``None`` in track mode (the mask is in ``masks``).
        masks: track mode: kept slice -> ``(H, W)`` bool mask on the slice grid.
    """

    outcome: np.ndarray
    scores: np.ndarray
    presence: np.ndarray
    logits: dict[int, np.ndarray] = field(default_factory=dict)
    masks: dict[int, np.ndarray] = field(default_factory=dict)

    @classmethod
    def empty(cls, n: int) -> ConceptSlices:
        return cls(np.full(n, NOT_SEARCHED, np.int8), np.zeros(n, np.float32), np.full(n, np.nan, np.float32))

    @property
    def kept(self) -> np.ndarray:
        return np.flatnonzero(self.outcome == KEPT)


@dataclass(frozen=True)
class SlicePlan:
    """Where one prompt is searched along the slicing axis, and with which boxes (displayed slice pixels)."""

    slices: range
    boxes: tuple[tuple[float, float, float, float], ...] = ()
    box_labels: tuple[int, ...] = ()
    key: int | None = None


def as_volume_prompt(prompt: Prompt | VolumePrompt) -> VolumePrompt:
    """A 2D :class:`Prompt` as a volume prompt (text only; boxes need a key slice, points are 2D only)."""
    if isinstance(prompt, VolumePrompt):
        return prompt
    if prompt.points:
        raise PromptError(f"prompt {prompt.display_name!r}: points are for 2D images; on a volume use a box "
                          "on a key slice or a 3D box")
    if prompt.boxes:
        raise PromptError(f"prompt {prompt.display_name!r}: a box on a volume needs its key slice "
                          "(VolumePrompt(box_slice=K), --box-slice K) or a 3D box (--box3d)")
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
    k = int(prompt.box_slice)
    boxes, key = [], None
    for x1, y1, x2, y2 in prompt.boxes:
        lo, hi = canonical_box((k, y1, x1), (k + 1, y2, x2), reo.source_axes, reo.flipped, shape)
        covered = covered_slices(lo, hi, axis, n)
        if len(covered) != 1:
            raise PromptError(
                f"the box of {prompt.display_name!r} lies on input slice {k} (array axis 0), which is not a "
                f"slice along the chosen {PLANE_OF_AXIS[axis]} axis; use --axis auto or a 3D box (--box3d)")
        key = covered[0]
        boxes.append(slice_plane_box(lo, hi, axis, shape))
    return SlicePlan(range(n), tuple(boxes), tuple(prompt.box_labels), key)


def group_prompts(volume: np.ndarray, modality: str, window: str | None, prompts: list[VolumePrompt]
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


def _vision_rows(vision: Sam3VisionEncoderOutput, rows: list[int]) -> Sam3VisionEncoderOutput:
    """The features of slices ``rows`` (one per prompt row): the batch itself or a gather."""
    batch = vision.fpn_hidden_states[0].shape[0]
    if rows == list(range(batch)):
        return vision
    index = torch.tensor(rows, device=vision.fpn_hidden_states[0].device)

    def pick(value):
        if isinstance(value, torch.Tensor):
            return value.index_select(0, index.to(value.device))
        if isinstance(value, (tuple, list)):
            return tuple(pick(v) for v in value)
        return value

    return Sam3VisionEncoderOutput(**{key: pick(value) for key, value in vision.items()})


def _box_tensors(plans: list[SlicePlan], size: int, transform: ResizeTransform):
    n_box = max(len(p.boxes) for p in plans)
    if not n_box:
        return None, None
    boxes = torch.zeros(len(plans), n_box, 4, dtype=torch.float32)
    labels = torch.full((len(plans), n_box), BOX_PAD_LABEL, dtype=torch.long)
    for r, p in enumerate(plans):
        if not p.boxes:
            continue
        xyxy = transform.boxes_to_model(np.asarray(p.boxes)) / size
        cxcywh = np.stack([(xyxy[:, 0] + xyxy[:, 2]) / 2, (xyxy[:, 1] + xyxy[:, 3]) / 2,
                           xyxy[:, 2] - xyxy[:, 0], xyxy[:, 3] - xyxy[:, 1]], axis=1)
        boxes[r, : len(p.boxes)] = torch.from_numpy(cxcywh).float()
        labels[r, : len(p.boxes)] = torch.tensor(p.box_labels)
    return boxes, labels


def detect_slices(seg, volume: np.ndarray, axis: int, prompts: list[VolumePrompt], plans: list[SlicePlan],
                  groups: dict[IntensityParams, list[int]], options: VolumeOptions, display: np.ndarray
                  ) -> tuple[list[ConceptSlices], int]:
    """Steps 3-4 of the module docstring on a canonical ``volume``; fills ``display`` (uint8, canonical).

    Returns the per-prompt :class:`ConceptSlices` and the number of slice encodings run.
    """
    n = volume.shape[axis]
    hw = take_slice(volume, axis, 0, display=True).shape
    transform = ResizeTransform(hw, seg.image_size)
    tokens = seg._tokenize([p.model_text for p in prompts])
    device = model_device(seg.model)
    ids, att = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
    results = [ConceptSlices.empty(n) for _ in prompts]
    encoded = 0
    first = next(iter(groups))
    for k in range(n):  # the picture drawn under overlays: the first group's mapping
        take_slice(display, axis, k, display=True)[...] = slice_to_rgb(
            apply_intensity(take_slice(volume, axis, k, display=True), first))[..., 0]
    with torch.inference_mode():
        text = encode_text(seg.model, ids, att).pooler_output
        for params, members in groups.items():
            needed = [k for k in range(n) if any(k in plans[i].slices for i in members)]
            mirrors = mirrors_for(seg.mirrors, [prompts[i].model_text for i in members])
            for start in range(0, len(needed), options.slice_batch):
                ks = needed[start : start + options.slice_batch]
                rgb = [slice_to_rgb(apply_intensity(take_slice(volume, axis, k, display=True), params))
                       for k in ks]
                pixels = torch.cat([seg._pixel_values(transform.image(r)) for r in rgb])
                visions = [encode_image(seg.model, mirror_grid(pixels, dims)) for dims in mirrors]
                encoded += len(ks) * len(mirrors)
                rows = [(b, i) for b, k in enumerate(ks) for i in members if k in plans[i].slices]
                for c in range(0, len(rows), seg.prompt_batch_size):
                    chunk = rows[c : c + seg.prompt_batch_size]
                    prompt_rows = torch.tensor([i for _, i in chunk], device=device)
                    boxes, labels = _box_tensors([plans[i] for _, i in chunk], seg.image_size, transform)
                    outs = [predict_prompts(seg.model, _vision_rows(vision, [b for b, _ in chunk]),
                                            text_embeds=text.index_select(0, prompt_rows),
                                            attention_mask=att.index_select(0, prompt_rows),
                                            boxes=mirror_boxes(boxes, dims), box_labels=labels,
                                            meta_text_cls=seg.meta_text_cls)
                            for vision, dims in zip(visions, mirrors, strict=True)]
                    out = outs[0] if len(outs) == 1 else merge_mirrored(
                        outs, mirrors, [not is_positional(prompts[i].model_text) for _, i in chunk])
                    _decide_rows(seg, out, [(ks[b], i) for b, i in chunk], results)
    return results, encoded


def _decide_rows(seg, out, rows: list[tuple[int, int]], results: list[ConceptSlices]) -> None:
    pres_logits = None if out.presence_logits is None else out.presence_logits.float().cpu().numpy()
    scores, presence = query_scores(out.pred_logits.float().cpu().numpy(), pres_logits)
    for r, (k, i) in enumerate(rows):
        pres = None if pres_logits is None else float(presence[r])
        sel = select_queries(scores[r], pres, threshold=seg.threshold,
                             presence_threshold=seg.presence_threshold)
        res = results[i]
        res.presence[k] = np.nan if pres is None else pres
        if sel.absent:
            res.outcome[k] = NO_PRESENCE if sel.reason == "presence" else LOW_SCORE
            res.scores[k] = sel.best_score
            continue
        res.outcome[k] = KEPT
        res.scores[k] = sel.scores[0]
        res.logits[k] = out.pred_masks[r, sel.queries[0]].float().cpu().numpy()


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


def postprocess_concept(res: ConceptSlices, plan: SlicePlan, transform: ResizeTransform, axis: int, shape,
                        options: VolumeOptions, voxel_ml: float | None) -> ConceptVolume:
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


def voxel_confidence(res: ConceptSlices, transform: ResizeTransform, k: int) -> np.ndarray | float:
    """Confidence of one prompt's voxels on slice ``k`` (displayed slice layout): score x mask probability."""
    if k in res.logits:
        return res.scores[k] * sigmoid(transform.mask_to_original(res.logits[k]))
    return float(res.scores[k]) if res.outcome[k] == KEPT else 0.0


def check_volume_request(image: Image, prompts, options: VolumeOptions
                         ) -> tuple[list[VolumePrompt], Reorientation, int, list[SlicePlan]]:
    """Everything that can be checked without the model: prompts against the volume, the mode, the axis.

    Returns the volume prompts, the reorientation plan (no data moved), the slicing axis and each
    prompt's :class:`SlicePlan`. Raises :class:`~medsam3.errors.PromptError`.
    """
    prompts = [as_volume_prompt(p) for p in prompts]
    if not prompts:
        raise PromptError("no prompt given")
    for p in prompts:
        validate_volume_prompt(p, image.spatial_shape)
    if options.mode == "track" and any(p.boxes or p.box3d is not None or not p.text for p in prompts):
        raise PromptError("track mode takes text prompts only; use --mode slices for boxes")
    reo = plan_reorientation(image)
    axis = reo.through_plane_axis if options.axis is None else int(options.axis)
    return prompts, reo, axis, [plan_prompt(p, reo, axis) for p in prompts]


def prepare(image: Image, prompts, options: VolumeOptions, seg
            ) -> tuple[list[VolumePrompt], Image, Reorientation, int, list[SlicePlan]]:
    """:func:`check_volume_request`, the token limit, then the canonical volume (no model work yet)."""
    prompts, _, axis, plans = check_volume_request(image, prompts, options)
    seg._tokenize([p.model_text for p in prompts])  # too long -> PromptError before any work
    canonical, reo = to_canonical(image)
    return prompts, canonical, reo, axis, plans
