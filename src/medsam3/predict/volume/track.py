"""The ``track`` mode of volume inference: SAM3's video model carries text concepts through the slices.

:func:`track_slices` is the mode as :func:`medsam3.predict.volume.segment.segment_volume` runs it; the
functions below it work on any ``Sam3VideoModel`` and its processor.

A volume's canonical slices ``(Z, H, W)`` are treated as the frames of a video. Flow, per call:

1. **Start slices.** Unless the caller gives them (e.g. from its own slice-wise detection), the video
   model's detector (a ``Sam3Model``) scores each prompt on ``probes`` evenly spaced slices (image
   features computed once per probed slice and shared by all prompts); the best-scoring probed slice is
   the prompt's start. A prompt whose best probe score is below ``score_threshold`` is reported absent
   and not tracked. The score is SAM3's detection confidence ``sigmoid(logit) * sigmoid(presence)``,
   computed as the video model computes it on every frame.
2. **Segments.** The start slices, sorted, split the volume at the midpoints between them; each segment
   is one video session that runs **forward** from its start to its last slice and then **reverse** from
   the slice before its start down to its first slice (the video model's reverse propagation from
   ``s`` processes ``s - 1`` down to the first frame). Every slice is processed exactly once.
3. **Per slice**, the video model detects every prompt, propagates the objects it tracks (memory of the
   previous slices) and turns unmatched detections into new object ids. All prompts share one session,
   so each slice's image features are computed once for all prompts (``Sam3VideoModel`` runs its
   detector for every prompt on the same features); object ids never mix prompts.
4. **Merging.** The objects of one prompt on a slice (one structure often gets several ids across
   slices) are merged into one mask: their union, at the slice grid ``(H, W)`` (low-resolution mask
   logits resized bilinearly and thresholded at 0 by ``Sam3VideoProcessor.postprocess_outputs``, which
   also hides objects suppressed or removed by the model's hot-start heuristics). Small holes and
   specks are then cleaned here at the slice grid, with the model's ``fill_hole_area`` scaled to it
   (the video model's own hole filling works on its low-resolution masks).

The video model runs as Meta's (:mod:`medsam3.model.video_meta`): NMS of the detections and hole filling
even without ``transformers``' optional hub kernel, Meta's text prompt sequence in the detector (probes
included), and new objects started as in Meta's model.

Memory stays bounded for long volumes: frames are converted when the model reads them and never stored
(:class:`medsam3.model.video.StreamedFrames`), and after every slice
:func:`medsam3.model.video.prune_session` deletes the per-slice state the tracker can no longer read
(lossless with the default window). The output arrays are the only thing that grows with ``Z``.

Sharing image features: one session for all prompts gives each prompt exactly the masks it gets in a
session of its own (tests check this) while encoding each slice once instead of once per prompt
(``benchmarks/bench_track.py --prompts 3``), so prompts are tracked together. What cannot be shared:
``Sam3VideoModel`` always encodes a frame itself (its feature cache holds only the tracker's features of
the current frame), so features computed for probing, or by a slice-wise pass of the caller, cannot be
handed to the session; probed slices are encoded twice (``probes / Z`` extra encoder work). The shared
session has one set of start slices; with probing, each prompt's best slice is one of them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy import ndimage

from medsam3.errors import PromptError
from medsam3.model.video import (
    frames_held,
    open_session,
    pixel_tensor,
    prune_session,
    session_tensor_bytes,
    tracker_reach,
    video_input_size,
)
from medsam3.model.video_meta import no_reconditioning, runs_as_meta
from medsam3.predict.engine import Engine
from medsam3.predict.options import VolumeOptions, default_of
from medsam3.predict.prompts import brief
from medsam3.predict.volume.plan import KEPT, LOW_SCORE, ConceptSlices
from medsam3.predict.volume.prompts import VolumePrompt
from medsam3.preprocess.intensity import IntensityParams, apply_intensity, minmax_slice
from medsam3.preprocess.slices import slice_to_rgb, take_slice

if TYPE_CHECKING:
    from transformers import Sam3VideoModel, Sam3VideoProcessor
    from transformers.models.sam3_video.modeling_sam3_video import (
        Sam3VideoInferenceSession,
        Sam3VideoSegmentationOutput,
    )

log = logging.getLogger(__name__)

#: Tokens per prompt of SAM3's text encoder.
TEXT_TOKENS = 32


@dataclass
class TrackResult:
    """One prompt tracked through a volume.

    Attributes:
        prompt: the concept text.
        masks: ``(Z, H, W)`` bool on the slice grid: the union of the prompt's objects on each slice.
        scores: ``(Z,)`` float32 per-slice confidence: the highest tracker score (probability that the
            object is present; the detection score on the slice where an object is created) among the
            prompt's objects visible on the slice; 0 where the mask is empty.
        presence: the best detection confidence seen for the prompt (probed slices and object creations);
            below the threshold the prompt was not tracked.
        object_ids_merged: ids of the tracked objects merged into the masks, numbered per call.
        start_frame: the slice the prompt's tracking started from: its best probed slice, or the first of
            the caller's start slices; ``None`` when the prompt was not tracked.
        start_frames: the start slices of all segments of the call.
    """

    prompt: str
    masks: np.ndarray
    scores: np.ndarray
    presence: float
    object_ids_merged: tuple[int, ...]
    start_frame: int | None
    start_frames: tuple[int, ...]

    @property
    def found(self) -> bool:
        """Whether any slice has a mask."""
        return bool(self.masks.any())


@dataclass(frozen=True)
class TrackProgress:
    """Reported after every processed slice: counts, and what the session holds (for monitoring)."""

    done: int
    total: int
    frame: int
    reverse: bool
    frames_held: int
    state_bytes: int


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or 0 in frames.shape:
        raise ValueError(f"expected slices as uint8 (Z, H, W, 3), got {frames.dtype} {frames.shape}")
    return frames


def _check_prompts(processor: Sam3VideoProcessor, prompts: Sequence[str]) -> list[str]:
    texts = [str(p).strip() for p in prompts]
    if not texts:
        raise PromptError("no prompt to track")
    for text in texts:
        if not text:
            raise PromptError("empty text prompt")
        n = len(processor.tokenizer(text)["input_ids"])
        if n > TEXT_TOKENS:
            raise PromptError(
                f"prompt {brief(text)} is too long: {n} tokens, SAM3 reads at most {TEXT_TOKENS}"
            )
    if len(set(texts)) != len(texts):
        raise PromptError(f"duplicate prompts in {texts}")
    return texts


# --------------------------------------------------------------------------------------------------
# Start slices


def probe_indices(n_frames: int, probes: int) -> list[int]:
    """``probes`` slice indices at the centres of equal bins of ``range(n_frames)`` (all when fewer)."""
    if probes >= n_frames:
        return list(range(n_frames))
    return sorted({int((2 * i + 1) * n_frames // (2 * probes)) for i in range(probes)})


@torch.inference_mode()
@runs_as_meta
def probe_scores(
    video_model: Sam3VideoModel,
    processor: Sam3VideoProcessor,
    frames: np.ndarray,
    prompts: Sequence[str],
    indices: Sequence[int],
    *,
    batch_size: int = 4,
) -> np.ndarray:
    """Detection confidence of each prompt on the slices ``indices``: ``(P, len(indices))`` float32.

    The confidence is SAM3's ``max_q sigmoid(logit_q) * sigmoid(presence)`` from the video model's
    detector on text alone, as ``Sam3VideoModel`` computes it per frame. Image features are computed once
    per slice and shared by the prompts.
    """
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    detector = video_model.detector_model
    param = next(detector.parameters())
    size = video_input_size(video_model)
    ip = processor.image_processor
    norm = (
        float(getattr(ip, "rescale_factor", 1 / 255)),
        getattr(ip, "image_mean", (0.5,) * 3),
        getattr(ip, "image_std", (0.5,) * 3),
    )
    tokens = processor.tokenizer(
        list(prompts), padding="max_length", max_length=TEXT_TOKENS, return_tensors="pt"
    )
    ids, mask = tokens["input_ids"].to(param.device), tokens["attention_mask"].to(param.device)
    text = detector.get_text_features(input_ids=ids, attention_mask=mask, return_dict=True).pooler_output
    out = np.zeros((len(prompts), len(indices)), dtype=np.float32)
    for start in range(0, len(indices), batch_size):
        chunk = list(indices[start : start + batch_size])
        pixels = torch.stack([pixel_tensor(frames[i], size, *norm) for i in chunk])
        vision = detector.get_vision_features(pixel_values=pixels.to(device=param.device, dtype=param.dtype))
        for p in range(len(prompts)):
            emb = text[p : p + 1].expand(len(chunk), -1, -1)
            det = detector(
                vision_embeds=vision,
                attention_mask=mask[p : p + 1].expand(len(chunk), -1),
                text_embeds=BaseModelOutputWithPooling(last_hidden_state=emb, pooler_output=emb),
            )
            conf = det.pred_logits.sigmoid() * det.presence_logits.sigmoid()
            out[p, start : start + len(chunk)] = conf.max(dim=1).values.float().cpu().numpy()
    return out


def segments(starts: Sequence[int], n_frames: int) -> list[tuple[int, int, int]]:
    """Split ``range(n_frames)`` at the midpoints between sorted start slices: ``[(first, stop, start)]``."""
    starts = sorted(set(int(s) for s in starts))
    cuts = [0] + [(a + b + 1) // 2 for a, b in zip(starts, starts[1:], strict=False)] + [n_frames]
    return [(cuts[k], cuts[k + 1], s) for k, s in enumerate(starts)]


# --------------------------------------------------------------------------------------------------
# Post-processing on the slice grid


def clean_mask(mask: np.ndarray, max_area: float) -> np.ndarray:
    """Fill holes and drop specks of a 2D bool mask, as SAM3's video post-processing does.

    Background components of at most ``max_area`` pixels become foreground; then foreground components
    of at most ``min(max_area, foreground area // 2)`` pixels become background (so a small object that
    is the whole mask survives). Components are 8-connected. Returns a new array.
    """
    mask = np.asarray(mask, dtype=bool)
    if max_area <= 0 or not mask.any():
        return mask.copy()
    eight = np.ones((3, 3), dtype=bool)

    def small(binary: np.ndarray, limit: float) -> np.ndarray:
        labels, n = ndimage.label(binary, structure=eight)
        if n == 0:
            return np.zeros_like(binary)
        areas = np.bincount(labels.ravel())
        areas[0] = np.iinfo(areas.dtype).max
        return (areas <= limit)[labels]

    mask = mask | small(~mask, max_area)
    return mask & ~small(mask, min(max_area, int(mask.sum()) // 2))


class _PromptOutput:
    """Accumulates the merged masks and scores of one prompt across segments."""

    def __init__(self, prompt: str, shape: tuple[int, int, int]):
        self.prompt = prompt
        self.masks = np.zeros(shape, dtype=bool)
        self.scores = np.zeros(shape[0], dtype=np.float32)
        self.ids: set[int] = set()
        self.presence = 0.0
        self.start: tuple[float, int] | None = None


def _collect(
    processor: Sam3VideoProcessor,
    session: Sam3VideoInferenceSession,
    out: Sam3VideoSegmentationOutput,
    hw: tuple[int, int],
    offset: int,
    first: int,
    results: dict[str, _PromptOutput],
) -> None:
    """Merge one finished frame's objects by prompt into ``results`` (frame ``first + out.frame_idx``)."""
    assert out.frame_idx is not None and out.obj_id_to_score is not None  # set for every processed frame
    pp = processor.postprocess_outputs(session, out, original_sizes=[list(hw)])
    obj_ids = pp["object_ids"].tolist()
    masks = pp["masks"].cpu().numpy()
    tracker = out.obj_id_to_tracker_score or {}
    z = first + int(out.frame_idx)
    for text, ids in pp["prompt_to_obj_ids"].items():
        acc = results[text]
        rows = [obj_ids.index(i) for i in ids]
        acc.masks[z] |= masks[rows].any(axis=0)
        acc.scores[z] = max([acc.scores[z], *(float(tracker.get(i, 0.0)) for i in ids)])
        acc.ids.update(offset + i for i in ids)
        scores = [float(out.obj_id_to_score.get(i, 0.0)) for i in ids]
        acc.presence = max([acc.presence, *scores])


def _run_pass(
    video_model: Sam3VideoModel,
    processor: Sam3VideoProcessor,
    session: Sam3VideoInferenceSession,
    order: Sequence[int],
    *,
    reverse: bool,
    window: int,
    keep: set[int],
    finish: Callable,
    report: Callable,
    prompted_twice: bool = False,
) -> None:
    """Process ``order`` (local frame indices) in one direction, finishing frames after the hot-start delay.

    Mirrors ``Sam3VideoModel.propagate_in_video_iterator``: outputs are held for ``hotstart_delay`` frames
    so that objects the hot-start heuristics remove meanwhile are hidden; then pruned state is dropped.

    ``prompted_twice``: run the first frame twice and keep the second run, as ``add_prompt`` followed by
    ``propagate_in_video`` from the same frame does in Meta's video model (Medical SAM3 V2's recipe): the
    first run creates the objects from the detections, the second returns the tracker's conditioning
    output for them and re-encodes the frame's memory. The second run makes no periodic reconditioning
    (in Meta's model it would re-add the same detection mask the objects were just created from).
    """
    delay = int(video_model.hotstart_delay)
    tracker = video_model.tracker_model.config
    limits = {"max_cond_frames": int(tracker.max_cond_frame_num), "memory_frames": int(tracker.num_maskmem)}
    buffer = []
    if prompted_twice and len(order):
        video_model(inference_session=session, frame_idx=order[0], reverse=reverse)
    for n, frame in enumerate(order):
        if prompted_twice and n == 0:
            with no_reconditioning(session):
                out = video_model(inference_session=session, frame_idx=frame, reverse=reverse)
        else:
            out = video_model(inference_session=session, frame_idx=frame, reverse=reverse)
        prune_session(session, frame, reverse=reverse, window=window, keep=keep, **limits)
        if delay > 0:
            buffer.append(out)
            session.hotstart_removed_obj_ids.update(out.removed_obj_ids)
            ready = buffer if n == len(order) - 1 else buffer[:1] if len(buffer) >= delay else []
            buffer = buffer[len(ready) :]
        else:
            ready = [out]
        for item in ready:
            finish(item)
        report(frame, reverse)


@runs_as_meta
def track_volume_prompts(
    video_model: Sam3VideoModel,
    video_processor: Sam3VideoProcessor,
    frames: np.ndarray,
    prompts: Sequence[str],
    *,
    start_frames: Sequence[int] | None = None,
    score_threshold: float | None = None,
    max_frames_in_memory: int | None = None,
    probes: int = default_of("probes"),
    clean: bool = True,
    progress: Callable[[TrackProgress], None] | None = None,
) -> dict[str, TrackResult]:
    """Track several text concepts through a volume in shared sessions (see the module docstring).

    Args:
        video_model: a ``transformers.Sam3VideoModel`` in eval mode (its thresholds, hot-start delay and
            tracker settings apply).
        video_processor: the matching ``Sam3VideoProcessor`` (tokenizer, normalisation).
        frames: ``(Z, H, W, 3)`` ``uint8`` canonical slices, already windowed to RGB; read, never copied
            whole and never modified.
        prompts: concept texts (at most 32 tokens each, no duplicates).
        start_frames: start slices given by the caller (e.g. the best slice of each run of its slice-wise
            detections); all prompts are then tracked and no probing is done. ``None``: each prompt
            starts from its best probed slice.
        score_threshold: probe confidence below which a prompt is absent (not tracked); default the
            video model's ``score_threshold_detection``.
        max_frames_in_memory: slices of per-slice tracker state kept behind the current one. Default: the
            tracker's reach (:func:`~medsam3.model.video.tracker_reach`, 16 slices for SAM3), which changes
            no result; a larger value only holds more; a smaller one saves memory at the cost of the
            tracker's temporal context.
        probes: number of evenly spaced slices probed for start slices (at least 1).
        clean: fill small holes and drop specks on the slice grid (``fill_hole_area`` of the model).
        progress: called after every processed slice with a :class:`TrackProgress`.

    Returns:
        ``{prompt: TrackResult}`` in the order of ``prompts``.
    """
    frames = _check_frames(frames)
    texts = _check_prompts(video_processor, prompts)
    z, h, w = frames.shape[:3]
    reach = tracker_reach(video_model)
    window = reach if max_frames_in_memory is None else int(max_frames_in_memory)
    if window < 1:
        raise ValueError(f"max_frames_in_memory must be at least 1, got {max_frames_in_memory}")
    if probes < 1:
        raise ValueError(f"probes must be at least 1, got {probes}")
    threshold = float(video_model.score_threshold_detection if score_threshold is None else score_threshold)
    results = {t: _PromptOutput(t, (z, h, w)) for t in texts}

    if start_frames is None:
        indices = probe_indices(z, probes)
        scores = probe_scores(video_model, video_processor, frames, texts, indices)
        for t, row in zip(texts, scores, strict=True):
            best = int(np.argmax(row))
            results[t].presence = float(row[best])
            results[t].start = (float(row[best]), indices[best])
        tracked = [t for t in texts if results[t].presence >= threshold]
        starts = sorted({probe[1] for t in tracked if (probe := results[t].start) is not None})
        log.info("probe slices %s: best %s", indices, {t: results[t].start for t in texts})
    else:
        starts = sorted(set(int(s) for s in start_frames))
        bad = [s for s in starts if not 0 <= s < z]
        if not starts or bad:
            raise PromptError(
                f"start slices {bad or list(start_frames)} are not within the volume's {z} slices"
            )
        tracked = list(texts)
        for t in texts:
            results[t].start = (0.0, starts[0])

    done, offset = 0, 0
    for first, stop, start in segments(starts, z) if tracked else []:
        session = open_session(video_model, video_processor, frames[first:stop], tracked)
        local = start - first

        def finish(out, s=session, o=offset, f=first) -> None:
            _collect(video_processor, s, out, (h, w), o, f, results)

        def report(frame: int, reverse: bool, s=session, f=first) -> None:
            nonlocal done
            done += 1
            if progress is not None:
                progress(
                    TrackProgress(done, z, f + frame, reverse, len(frames_held(s)), session_tensor_bytes(s))
                )

        keep = set(range(local, min(local + window, stop - first))) if local > 0 else set()
        _run_pass(
            video_model,
            video_processor,
            session,
            range(local, stop - first),
            reverse=False,
            window=window,
            keep=keep,
            finish=finish,
            report=report,
        )
        if local > 0:
            _run_pass(
                video_model,
                video_processor,
                session,
                range(local - 1, -1, -1),
                reverse=True,
                window=window,
                keep=set(),
                finish=finish,
                report=report,
            )
        offset += int(session.max_obj_id) + 1
        del session

    area = float(video_model.fill_hole_area) * h * w / float(video_model.low_res_mask_size) ** 2
    out: dict[str, TrackResult] = {}
    for t in texts:
        acc = results[t]
        if clean and area > 0:
            for k in np.flatnonzero(acc.masks.reshape(z, -1).any(axis=1)):
                acc.masks[k] = clean_mask(acc.masks[k], area)
        acc.scores[~acc.masks.reshape(z, -1).any(axis=1)] = 0.0
        is_tracked = t in tracked
        out[t] = TrackResult(
            prompt=t,
            masks=acc.masks,
            scores=acc.scores,
            presence=float(acc.presence),
            object_ids_merged=tuple(sorted(acc.ids)),
            start_frame=acc.start[1] if is_tracked and acc.start is not None else None,
            start_frames=tuple(starts) if is_tracked else (),
        )
    return out


def track_volume(
    video_model: Sam3VideoModel,
    video_processor: Sam3VideoProcessor,
    frames: np.ndarray,
    prompt: str,
    *,
    start_frames: list[int] | None = None,
    score_threshold: float | None = None,
    max_frames_in_memory: int | None = None,
    probes: int = default_of("probes"),
    clean: bool = True,
    progress: Callable[[TrackProgress], None] | None = None,
) -> TrackResult:
    """Track one text concept through a volume: :func:`track_volume_prompts` for a single prompt."""
    return track_volume_prompts(
        video_model,
        video_processor,
        frames,
        [prompt],
        start_frames=start_frames,
        score_threshold=score_threshold,
        max_frames_in_memory=max_frames_in_memory,
        probes=probes,
        clean=clean,
        progress=progress,
    )[str(prompt).strip()]


def intensity_runs(
    groups: dict[IntensityParams, list[int]], options: VolumeOptions, n_prompts: int
) -> list[tuple[IntensityParams | None, list[int]]]:
    """The frame sequences a video mode runs: one per intensity group, or with ``intensity == "minmax"``
    one for all prompts on V2's per-slice min-max slices (``params`` ``None``)."""
    if getattr(options, "intensity", "auto") == "minmax":
        return [(None, list(range(n_prompts)))]
    return list(groups.items())


def video_frames(volume: np.ndarray, axis: int, params: IntensityParams | None) -> np.ndarray:
    """``(Z, H, W, 3)`` ``uint8`` displayed slices along ``axis``, windowed by ``params``, or by V2's
    per-slice min-max (:func:`~medsam3.preprocess.intensity.minmax_slice`) when ``params`` is ``None``."""
    n = volume.shape[axis]
    slices = (take_slice(volume, axis, k, display=True) for k in range(n))
    if params is None:
        return np.stack([slice_to_rgb(minmax_slice(s)) for s in slices])
    return np.stack([slice_to_rgb(apply_intensity(s, params)) for s in slices])


def video_sequences(
    volume: np.ndarray,
    axis: int,
    prompts: list[VolumePrompt],
    groups: dict[IntensityParams, list[int]],
    options: VolumeOptions,
    display: np.ndarray,
) -> Iterator[tuple[np.ndarray, list[int], list[str]]]:
    """The frame sequences of a video mode (track, clips): per :func:`intensity_runs` entry the
    ``(Z, H, W, 3)`` frames, the prompt indices it serves and their distinct model texts. The first
    sequence's grey levels fill ``display`` (displayed slices along ``axis``)."""
    n = volume.shape[axis]
    for g, (params, members) in enumerate(intensity_runs(groups, options, len(prompts))):
        frames = video_frames(volume, axis, params)
        if g == 0:
            for k in range(n):
                take_slice(display, axis, k, display=True)[...] = frames[k, ..., 0]
        yield frames, members, list(dict.fromkeys(prompts[i].model_text for i in members))


def track_slices(
    engine: Engine,
    volume: np.ndarray,
    axis: int,
    prompts: list[VolumePrompt],
    groups: dict[IntensityParams, list[int]],
    options: VolumeOptions,
    display: np.ndarray,
) -> tuple[list[ConceptSlices], int]:
    """Track mode: each intensity group's slices go through SAM3's video model as one frame sequence.

    Fills ``display`` like :func:`~medsam3.predict.volume.slices.detect_slices`. Returns per-prompt
    :class:`ConceptSlices` (masks on the displayed slice grid, the tracker's per-slice score) and the
    number of slices handed to the video model.
    """
    video = engine.video()
    n = volume.shape[axis]
    results: list[ConceptSlices] = [ConceptSlices.empty(n) for _ in prompts]
    passes = 0
    for frames, members, texts in video_sequences(volume, axis, prompts, groups, options, display):
        tracked = track_volume_prompts(video.model, video.processor, frames, texts, probes=options.probes)
        passes += n
        for i in members:
            tr = tracked[prompts[i].model_text]
            res = results[i]
            on = tr.masks.reshape(n, -1).any(axis=1)
            res.outcome[:] = np.where(on, KEPT, LOW_SCORE)
            res.scores[:] = tr.scores
            res.presence[:] = tr.presence
            res.masks = {int(k): tr.masks[k] for k in np.flatnonzero(on)}
    return results, passes
