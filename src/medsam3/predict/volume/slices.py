"""Slices mode: concept detection on the slices of a volume (every slice, or coarse to fine), image
features shared by every prompt.

The volume flow (:func:`medsam3.predict.volume.segment.segment_volume`) for a ``(Z, Y, X)`` volume and
prompts (text, text + key-slice box, 3D box; see :mod:`medsam3.predict.volume.prompts`):

1. **Canonical frame.** :func:`~medsam3.preprocess.orientation.to_canonical` (LPS, permutation and flips
   only). Slices are taken along ``axis``: by default the acquisition's through-plane axis
   (:attr:`~medsam3.preprocess.orientation.Reorientation.through_plane_axis`), so slices are the ones the
   scanner acquired; coronal / sagittal slices are shown to the model with superior at the top.
2. **Intensities** are mapped once for the whole volume
   (:func:`~medsam3.preprocess.intensity.intensity_parameters`: MR / PET percentiles over the whole
   volume, CT windows per concept). Prompts are grouped by mapping; each group is one pass over the slices.
3. **Image features** are computed in batches of ``slice_batch`` slices and reused by every prompt of the
   group: the vision encoder sees each slice at most once per distinct mapping, whatever the number of
   prompts; every prompt of the group whose plan covers an encoded slice is decided on it. Which slices
   are encoded is the ``search`` (:mod:`~medsam3.predict.volume.search`):

   * ``"full"`` (default): every slice on which some prompt of the group is searched (slices outside
     every 3D box are not encoded; batches are made of the slices that are), in one round;
   * ``"coarse"``: in rounds (:func:`~medsam3.predict.volume.search.run_rounds`), first the probes
     (every ``search_step_mm``, the first and last slice of each plan, key slices), then the slices
     between two probes where a prompt's presence passes and the neighbours of every slice where it
     passes, until presence fails on both sides. It gives the full pass's result whenever every run of
     slices where a prompt's presence passes holds a probe; a structure thinner than the step that falls
     between two probes is missed (the guarantee and its limits are stated in that module).

   A result's settings report the encoder passes (``image_encoder_runs``; ``encoder_runs_full`` under
   ``slice_search`` for the full pass) and, per prompt, the slices searched (``slice_search``, input
   array indices along the sliced input axis).
   Text features are computed once per volume. Slice x prompt rows run through
   :meth:`Engine.detect <medsam3.predict.engine.Engine.detect>` in chunks of ``prompt_batch_size`` rows.
   With test-time mirroring (``tta``) each batch is also encoded mirrored along x, y
   and both, and each row's four predictions are merged into one candidate
   (:mod:`medsam3.predict.tta`) before step 4.
4. **Per slice** the paper's rule (:func:`~medsam3.predict.postprocess.select_queries`): presence gate,
   then the best query whose confidence ``sigmoid(logit) * presence`` exceeds the threshold; its mask
   logits are resized bilinearly to the slice grid and thresholded at 0.
5. **Per concept in 3D** (:mod:`medsam3.predict.volume.post`): the concept is **absent** from the volume
   when fewer than ``min_slices`` slices pass the rule (reason ``"presence"`` when no slice passed the
   presence gate, ``"score"`` when none passed the threshold, ``"slices"`` when too few did); then the
   key-slice chain (box prompts on a key slice), hole filling per slice, 3D connected components (drop
   those under ``min_component_voxels`` / ``min_component_ml``, optionally keep the largest); a concept
   emptied by these steps is absent with reason ``"size"`` (``"key slice"`` when the key slice has no
   detection).
6. **One label map**: voxels claimed by several concepts go to the highest voxel confidence
   ``slice score * sigmoid(mask logit)``; prompt ``i`` has value ``i + 1``; the map is returned to the
   input grid exactly (:meth:`~medsam3.preprocess.orientation.Reorientation.invert`).

``mode="track"`` replaces steps 3-4 by SAM3's video model (:mod:`medsam3.predict.volume.track`), text prompts
only, one tracking run per intensity group; its per-slice tracker score is the slice confidence.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

from medsam3.data.vocabulary import is_positional
from medsam3.predict.engine import Engine, box_tensors
from medsam3.predict.options import VolumeOptions
from medsam3.predict.postprocess import query_scores, select_queries
from medsam3.predict.tta import MIRRORS, merge_mirrored, mirror_boxes, mirror_grid, mirrors_for
from medsam3.predict.volume.plan import KEPT, LOW_SCORE, NO_PRESENCE, ConceptSlices, SlicePlan
from medsam3.predict.volume.prompts import VolumePrompt
from medsam3.predict.volume.search import SliceSearch, run_rounds
from medsam3.preprocess.intensity import IntensityParams, apply_intensity
from medsam3.preprocess.resize import ResizeTransform
from medsam3.preprocess.slices import slice_to_rgb, take_slice


def _vision_rows(vision: Sam3VisionEncoderOutput, rows: list[int]) -> Sam3VisionEncoderOutput:
    """The features of slices ``rows`` (one per prompt row): the batch itself or a gather."""
    batch = vision.fpn_hidden_states[0].shape[0]
    if rows == list(range(batch)):
        return vision
    index = torch.tensor(rows, device=vision.fpn_hidden_states[0].device)

    def pick(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.index_select(0, index.to(value.device))
        if isinstance(value, (tuple, list)):
            return tuple(pick(v) for v in value)
        return value

    return Sam3VisionEncoderOutput(**{key: pick(value) for key, value in vision.items()})


def detect_slices(
    engine: Engine,
    volume: np.ndarray,
    axis: int,
    prompts: list[VolumePrompt],
    plans: list[SlicePlan],
    groups: dict[IntensityParams, list[int]],
    options: VolumeOptions,
    display: np.ndarray,
    searches: list[SliceSearch] | None = None,
) -> tuple[list[ConceptSlices], int]:
    """Steps 3-4 of the module docstring on a canonical ``volume``; fills ``display`` (uint8, canonical).

    Args:
        volume: canonical ``(Z, Y, X)`` volume, sliced along ``axis``.
        plans: per prompt, where it may be searched (:class:`SlicePlan`).
        groups: intensity mapping -> prompt indices (one image-feature pass each).
        display: ``uint8`` array of ``volume``'s shape, filled with the first group's mapping.
        searches: per prompt, how its slices are searched (:mod:`~medsam3.predict.volume.search`; filled
            in place); default every slice of its plan.

    Returns:
        The per-prompt :class:`ConceptSlices` and the number of slice encodings run.
    """
    n = volume.shape[axis]
    hw = take_slice(volume, axis, 0, display=True).shape
    transform = ResizeTransform(hw, engine.image_size)
    tokens = engine.tokenize([p.model_text for p in prompts])
    device = engine.device
    att = tokens.attention_mask.to(device)
    mirrors_all = MIRRORS if options.tta else ((),)
    results = [ConceptSlices.empty(n) for _ in prompts]
    if searches is None:
        searches = [SliceSearch.full(n, plan.slices) for plan in plans]
    encoded = 0
    first = next(iter(groups))
    for k in range(n):  # the picture drawn under overlays: the first group's mapping
        take_slice(display, axis, k, display=True)[...] = slice_to_rgb(
            apply_intensity(take_slice(volume, axis, k, display=True), first)
        )[..., 0]
    with torch.inference_mode():
        text = engine.encode_texts(tokens)
        for params, members in groups.items():
            mirrors = mirrors_for(mirrors_all, [prompts[i].model_text for i in members])

            def evaluate(
                ks: list[int],
                rows: list[tuple[int, int]],
                params: IntensityParams = params,
                mirrors: Sequence[tuple[int, ...]] = mirrors,
            ) -> list[bool]:
                """Encode slices ``ks`` (one batch) and decide ``rows`` ``(position, prompt)`` on them."""
                nonlocal encoded
                rgb = [
                    slice_to_rgb(apply_intensity(take_slice(volume, axis, k, display=True), params))
                    for k in ks
                ]
                pixels = torch.cat([engine.pixel_values(transform.image(r)) for r in rgb])
                visions = [engine.encode_images(mirror_grid(pixels, dims)) for dims in mirrors]
                encoded += len(ks) * len(mirrors)
                for c in range(0, len(rows), options.prompt_batch_size):
                    chunk = rows[c : c + options.prompt_batch_size]
                    prompt_rows = torch.tensor([i for _, i in chunk], device=device)
                    chunk_plans = [plans[i] for _, i in chunk]
                    boxes, labels = box_tensors(
                        [p.boxes for p in chunk_plans],
                        [p.box_labels for p in chunk_plans],
                        transform.boxes_to_model,
                        engine.image_size,
                    )
                    outs = [
                        engine.detect(
                            _vision_rows(vision, [b for b, _ in chunk]),
                            text_embeds=text.index_select(0, prompt_rows),
                            attention_mask=att.index_select(0, prompt_rows),
                            boxes=mirror_boxes(boxes, dims),
                            box_labels=labels,
                            meta_text_cls=options.meta_text_cls,
                        )
                        for vision, dims in zip(visions, mirrors, strict=True)
                    ]
                    out = (
                        outs[0]
                        if len(outs) == 1
                        else merge_mirrored(
                            outs, mirrors, [not is_positional(prompts[i].model_text) for _, i in chunk]
                        )
                    )
                    _decide_rows(options, out, [(ks[b], i) for b, i in chunk], results)
                return [bool(results[i].outcome[ks[b]] != NO_PRESENCE) for b, i in rows]

            run_rounds({i: searches[i] for i in members}, options.slice_batch, evaluate)
    return results, encoded


def full_pass_runs(
    prompts: list[VolumePrompt], plans: list[SlicePlan], groups: dict[IntensityParams, list[int]], tta: bool
) -> int:
    """The slice encodings the full pass runs: per intensity group, the slices some member's plan covers,
    times the group's mirrored passes."""
    total = 0
    for members in groups.values():
        covered = set().union(*(set(plans[i].slices) for i in members))
        mirrors = mirrors_for(MIRRORS if tta else ((),), [prompts[i].model_text for i in members])
        total += len(covered) * len(mirrors)
    return total


def _decide_rows(
    options: VolumeOptions, out: Any, rows: list[tuple[int, int]], results: list[ConceptSlices]
) -> None:
    pres_logits = None if out.presence_logits is None else out.presence_logits.float().cpu().numpy()
    scores, presence = query_scores(out.pred_logits.float().cpu().numpy(), pres_logits)
    for r, (k, i) in enumerate(rows):
        pres = None if pres_logits is None else float(presence[r])
        sel = select_queries(
            scores[r], pres, threshold=options.threshold, presence_threshold=options.presence_threshold
        )
        res = results[i]
        res.presence[k] = np.nan if pres is None else pres
        if sel.absent:
            res.outcome[k] = NO_PRESENCE if sel.reason == "presence" else LOW_SCORE
            res.scores[k] = sel.best_score
            continue
        res.outcome[k] = KEPT
        res.scores[k] = sel.scores[0]
        res.logits[k] = out.pred_masks[r, sel.queries[0]].float().cpu().numpy()
