"""The ``clips`` mode of volume inference: Medical SAM3 V2's 3D recipe.

A volume's canonical slices ``(Z, H, W)`` are cut into **non-overlapping clips** of ``L`` slices
(``[(s, min(Z, s + L)) for s in range(0, Z, L)]``, the last one may be shorter; V2's default ``L = 4``).
Each clip is a fresh video session of SAM3's video model: nothing is carried from one clip to the next.
The text prompts are added to the session (the detector runs on every slice of the clip), and the clip
is propagated **forward only**, from its first slice to its last. As V2 calls ``add_prompt`` on the first
slice and then ``propagate_in_video`` from it, that slice runs twice and the second run is kept (the
tracker's conditioning output for the objects just created). The video model runs as Meta's
(:mod:`medsam3.model.video_meta`: NMS and hole filling, Meta's text prompt sequence, Meta's start of new
objects), which ``tests/slow/test_meta_v2_clips.py`` checks against Meta's own video model.

Per slice and prompt (:func:`_collect`):

* the **binary mask** is the union of the prompt's objects as the video processor post-processes them
  (low-resolution logits resized bilinearly to ``(H, W)``, thresholded at 0, objects hidden by the
  model's suppression / hot-start rules dropped, objects made non-overlapping within the prompt);
* the **probability** is the maximum over the same kept objects of ``sigmoid`` of their mask logits
  resized bilinearly to ``(H, W)``, taken before the non-overlap step (V2 exposes exactly these).

Classes are fused pixel by pixel (:func:`fuse_pixel_score`, V2's default ``pixel_score`` policy): in
ascending label order, a voxel takes a label where that label's mask is on and its probability is above
the best probability so far, which starts at 0.5; so a voxel gets the class with the highest probability
above 0.5 inside its mask, ties keeping the lower label. No 3D post-processing is applied (unless the
caller asks: :attr:`~medsam3.predict.options.VolumeOptions.clip_post_process`).

Intensities: V2 feeds ``uint8`` slices as stored and min-max scales any other slice to 0-255 on its own
(``--intensity minmax``, :func:`medsam3.preprocess.intensity.minmax_slice`); medsam3's default keeps its
modality-aware windowing (CT windows, MR percentiles), which gives the same grey levels on every slice of a
volume instead of rescaling each slice (a slice's brightest tissue always becomes white under V2's rule).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from medsam3.model.video import open_session, tracker_reach
from medsam3.model.video_meta import runs_as_meta
from medsam3.predict.engine import Engine
from medsam3.predict.options import VolumeOptions
from medsam3.predict.volume.plan import KEPT, LOW_SCORE, ConceptSlices
from medsam3.predict.volume.prompts import VolumePrompt
from medsam3.predict.volume.track import _check_frames, _check_prompts, _run_pass, video_sequences
from medsam3.preprocess.intensity import IntensityParams

if TYPE_CHECKING:
    from transformers import Sam3VideoModel, Sam3VideoProcessor

#: V2's fusion floor: a voxel is labelled only where a class's probability exceeds it.
FUSION_FLOOR = 0.5


def clip_ranges(n_slices: int, length: int) -> list[tuple[int, int]]:
    """Non-overlapping ``[start, stop)`` clips of ``length`` slices covering ``n_slices`` (the last may be
    shorter)."""
    if length < 1:
        raise ValueError(f"clip length must be at least 1, got {length}")
    return [(s, min(n_slices, s + length)) for s in range(0, n_slices, length)]


def fuse_pixel_score(
    masks: Sequence[np.ndarray | None], probs: Sequence[np.ndarray | None], labels: Sequence[int]
) -> np.ndarray:
    """V2's ``pixel_score`` fusion of per-class masks into one label map (module docstring).

    Args:
        masks: per class a bool array (any shape, the same for all) or ``None`` (absent class).
        probs: per class the probability array of the same shape, or ``None``.
        labels: per class its label value; processed in ascending order.

    Returns:
        The label map, ``uint8`` (``uint16`` past 255), 0 where no class passes.
    """
    shape = next((m.shape for m in masks if m is not None), None)
    if shape is None:
        raise ValueError("no class has a mask")
    top = max(int(v) for v in labels)
    segs = np.zeros(shape, dtype=np.uint8 if top <= 255 else np.uint16)
    priority = np.full(shape, FUSION_FLOOR, dtype=np.float32)
    for i in sorted(range(len(labels)), key=lambda j: int(labels[j])):
        mask, given = masks[i], probs[i]
        if mask is None or given is None:
            continue
        prob = np.asarray(given, dtype=np.float32)  # compared in the priority's float32
        update = mask & (prob > priority)
        priority[update] = prob[update]
        segs[update] = labels[i]
    return segs


@dataclass
class ClipResult:
    """One prompt through all clips of a volume.

    Attributes:
        prompt: the concept text.
        masks: ``(Z, H, W)`` bool, the union of the prompt's kept objects per slice.
        probs: ``(Z, H, W)`` float32, the maximum object probability per pixel (0 where no object).
        det_scores: ``(Z,)`` float32, the best detection score of the prompt's objects on each slice.
        tracker_scores: ``(Z,)`` float32, the best tracker score of its objects on each slice.
    """

    prompt: str
    masks: np.ndarray
    probs: np.ndarray
    det_scores: np.ndarray
    tracker_scores: np.ndarray


def _collect(
    processor, session, out, hw: tuple[int, int], first: int, results: dict[str, ClipResult]
) -> None:
    """Masks, probabilities and scores of one processed slice, by prompt (module docstring)."""
    assert out.frame_idx is not None and out.obj_id_to_mask is not None
    pp = processor.postprocess_outputs(session, out, original_sizes=[list(hw)])
    obj_ids = pp["object_ids"].tolist()
    masks = pp["masks"].cpu().numpy()
    z = first + int(out.frame_idx)
    for text, ids in pp["prompt_to_obj_ids"].items():
        acc = results[text]
        rows = [obj_ids.index(i) for i in ids]
        acc.masks[z] |= masks[rows].any(axis=0)
        logits = torch.cat([out.obj_id_to_mask[i] for i in ids], dim=0).float()
        up = torch.nn.functional.interpolate(logits[:, None], size=hw, mode="bilinear", align_corners=False)
        prob = torch.sigmoid(up[:, 0]).amax(dim=0).cpu().numpy()
        np.maximum(acc.probs[z], prob, out=acc.probs[z])
        det = out.obj_id_to_score or {}
        trk = out.obj_id_to_tracker_score or {}
        acc.det_scores[z] = max([float(acc.det_scores[z]), *(float(det.get(i, 0.0)) for i in ids)])
        acc.tracker_scores[z] = max([float(acc.tracker_scores[z]), *(float(trk.get(i, 0.0)) for i in ids)])


@runs_as_meta
def clips_volume_prompts(
    video_model: Sam3VideoModel,
    video_processor: Sam3VideoProcessor,
    frames: np.ndarray,
    prompts: Sequence[str],
    *,
    clip_length: int = 4,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, ClipResult]:
    """Run V2's clip recipe for several text prompts over ``frames`` (module docstring).

    All prompts share each clip's session (the image features of a slice are computed once for all of
    them; object ids never mix prompts, as in track mode).

    Args:
        video_model: a ``transformers.Sam3VideoModel`` in eval mode (its thresholds apply).
        video_processor: the matching ``Sam3VideoProcessor``.
        frames: ``(Z, H, W, 3)`` ``uint8`` slices; read, never modified.
        prompts: concept texts (at most 32 tokens each, no duplicates).
        clip_length: slices per clip.
        progress: called with ``(slices done, total)`` after every slice.

    Returns:
        ``{prompt: ClipResult}`` in the order of ``prompts``.
    """
    frames = _check_frames(frames)
    texts = _check_prompts(video_processor, prompts)
    z, h, w = frames.shape[:3]
    results = {
        t: ClipResult(
            t,
            np.zeros((z, h, w), bool),
            np.zeros((z, h, w), np.float32),
            np.zeros(z, np.float32),
            np.zeros(z, np.float32),
        )
        for t in texts
    }
    window = tracker_reach(video_model)
    done = 0
    for first, stop in clip_ranges(z, clip_length):
        session = open_session(video_model, video_processor, frames[first:stop], texts)

        def finish(out, s=session, f=first) -> None:
            _collect(video_processor, s, out, (h, w), f, results)

        def report(frame: int, reverse: bool) -> None:
            nonlocal done
            done += 1
            if progress is not None:
                progress(done, z)

        _run_pass(
            video_model,
            video_processor,
            session,
            range(stop - first),
            reverse=False,
            window=window,
            keep=set(),
            finish=finish,
            report=report,
            prompted_twice=True,
        )
        del session
    return results


def clip_slices(
    engine: Engine,
    volume: np.ndarray,
    axis: int,
    prompts: list[VolumePrompt],
    groups: dict[IntensityParams, list[int]],
    options: VolumeOptions,
    display: np.ndarray,
) -> tuple[list[ConceptSlices], int]:
    """Clips mode as :func:`~medsam3.predict.volume.segment.segment_volume` runs it.

    Each intensity group's slices (or, with ``options.intensity == "minmax"``, all prompts on V2's
    per-slice min-max slices) go through :func:`clips_volume_prompts`. Fills ``display``. Returns per
    prompt a :class:`ConceptSlices` whose ``masks`` are the binary masks on kept slices and ``probs`` the
    probability maps there (outcome :data:`KEPT` where the mask is non-empty), and the number of slices
    handed to the video model.
    """
    video = engine.video()
    n = volume.shape[axis]
    results: list[ConceptSlices] = [ConceptSlices.empty(n) for _ in prompts]
    passes = 0
    for frames, members, texts in video_sequences(volume, axis, prompts, groups, options, display):
        clipped = clips_volume_prompts(
            video.model, video.processor, frames, texts, clip_length=options.clip_length
        )
        passes += n
        for i in members:
            cr = clipped[prompts[i].model_text]
            res = results[i]
            eligible = cr.masks & (cr.probs > FUSION_FLOOR)  # where fusion can give this class a voxel
            on = eligible.reshape(n, -1).any(axis=1)
            res.outcome[:] = np.where(on, KEPT, LOW_SCORE)
            res.scores[:] = cr.det_scores
            res.presence[:] = cr.det_scores
            res.masks = {int(k): eligible[k] for k in np.flatnonzero(on)}
            res.probs = {int(k): cr.probs[k] for k in np.flatnonzero(on)}
    return results, passes
