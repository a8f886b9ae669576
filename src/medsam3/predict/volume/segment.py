"""Segment a volume: the steps of :mod:`medsam3.predict.volume` put together, in either mode.

:func:`segment_volume` is what :meth:`medsam3.predict.segmenter.Segmenter.segment` runs for a 3D image. It
returns a :class:`~medsam3.predict.summary.SegmentationResult` whose label map lies on the **input** grid
(same shape, spacing, origin and direction as the input volume), with one entry per prompt carrying voxel
counts, volume in ml and slice ranges in input voxel indices.
"""

from __future__ import annotations

import numpy as np

from medsam3.errors import ModelError
from medsam3.image import Image
from medsam3.model.forward import model_device, model_dtype
from medsam3.predict.mirror import mirroring_settings
from medsam3.predict.summary import LabelEntry, SegmentationResult
from medsam3.predict.volume import (
    KEPT,
    LOW_SCORE,
    NOT_SEARCHED,
    ConceptSlices,
    VolumeOptions,
    detect_slices,
    group_prompts,
    postprocess_concept,
    prepare,
    voxel_confidence,
)
from medsam3.predict.volume_post import assign_labels, slice_counts
from medsam3.preprocess.intensity import apply_intensity
from medsam3.preprocess.orientation import PLANE_OF_AXIS
from medsam3.preprocess.resize import ResizeTransform
from medsam3.preprocess.slices import slice_to_rgb, take_slice

#: How boxes are given on volumes (recorded in every result's settings).
BOX_FRAME = ("input array voxels: x along axis 2, y along axis 1, z along axis 0 (the stored slice index); "
             "continuous coordinates, exclusive ends")


def video_model_for(seg, video=None):
    """The video model for ``seg``'s track mode: ``video`` wrapped with its processor when it is a bare
    ``Sam3VideoModel``, else loaded from the segmenter's model source on its device and dtype.

    Raises:
        ModelError: the source holds no video model (an image-only SAM3 cannot track).
    """
    if video is not None:
        from types import SimpleNamespace

        from medsam3.model.loading import build_processor

        net = video.eval()
        return SimpleNamespace(model=net, processor=build_processor(net.config, video=True),
                               source="in-memory video model")
    from medsam3.model.video import load_sam3_video

    source = getattr(seg.loaded, "source", None)
    try:
        return load_sam3_video(source, device=model_device(seg.model), dtype=model_dtype(seg.model))
    except ModelError as exc:
        raise ModelError(f"track mode needs SAM3's video model, which could not be loaded from {source}: "
                         f"{exc}. Use --mode slices, or a video model folder.") from exc


def track_slices(seg, volume: np.ndarray, axis: int, prompts, groups, options: VolumeOptions,
                 display: np.ndarray) -> tuple[list[ConceptSlices], int]:
    """Track mode: each intensity group's slices go through SAM3's video model as one frame sequence.

    Fills ``display`` like :func:`~medsam3.predict.volume.detect_slices`. Returns per-prompt
    :class:`ConceptSlices` (masks on the displayed slice grid, the tracker's per-slice score) and the
    number of slices handed to the video model.
    """
    from medsam3.predict.track import track_volume_prompts

    video = seg.video_model()
    n = volume.shape[axis]
    results: list[ConceptSlices] = [ConceptSlices.empty(n) for _ in prompts]
    passes = 0
    for g, (params, members) in enumerate(groups.items()):
        frames = np.stack([slice_to_rgb(apply_intensity(take_slice(volume, axis, k, display=True), params))
                           for k in range(n)])
        if g == 0:
            for k in range(n):
                take_slice(display, axis, k, display=True)[...] = frames[k, ..., 0]
        texts = list(dict.fromkeys(prompts[i].text for i in members))
        tracked = track_volume_prompts(video.model, video.processor, frames, texts, probes=options.probes)
        passes += n
        for i in members:
            tr = tracked[prompts[i].text]
            res = results[i]
            on = tr.masks.reshape(n, -1).any(axis=1)
            res.outcome[:] = np.where(on, KEPT, LOW_SCORE)
            res.scores[:] = tr.scores
            res.presence[:] = tr.presence
            res.masks = {int(k): tr.masks[k] for k in np.flatnonzero(on)}
    return results, passes


def _box3d(mask: np.ndarray) -> tuple[int, ...]:
    """``(x1, y1, z1, x2, y2, z2)`` extent of a non-empty ``(Z, Y, X)`` mask, exclusive ends."""
    lo, hi = [], []
    for axis in (2, 1, 0):
        idx = np.flatnonzero(slice_counts(mask, axis))
        lo.append(int(idx[0]))
        hi.append(int(idx[-1]) + 1)
    return (*lo, *hi)


def _max_or_none(values: np.ndarray) -> float | None:
    values = values[np.isfinite(values)]
    return float(values.max()) if values.size else None


def segment_volume(seg, image: Image, prompts, options: VolumeOptions) -> SegmentationResult:
    """Segment a 3D ``image`` with volume ``prompts`` (module docstring of :mod:`medsam3.predict.volume`)."""
    prompts, canonical, reo, axis, plans = prepare(image, prompts, options, seg)
    modality = seg.modality or image.modality
    volume = canonical.array
    groups = group_prompts(volume, modality, seg.window, prompts)
    display = np.zeros(volume.shape, dtype=np.uint8)
    if options.mode == "track":
        results, encoded = track_slices(seg, volume, axis, prompts, groups, options, display)
    else:
        results, encoded = detect_slices(seg, volume, axis, prompts, plans, groups, options, display)

    hw = take_slice(volume, axis, 0, display=True).shape
    transform = ResizeTransform(hw, seg.image_size)
    known = image.meta.get("spacing_known", True) is not False
    voxel_ml = image.voxel_volume_ml if known else None
    concepts = [postprocess_concept(res, plan, transform, axis, volume.shape, options, voxel_ml)
                for res, plan in zip(results, plans, strict=True)]

    def confidence(i: int, k: int):
        c = voxel_confidence(results[i], transform, k)
        return c[::-1] if axis != 0 and isinstance(c, np.ndarray) else c  # displayed -> stored rows

    canonical_labels = assign_labels([c.mask for c in concepts], [i + 1 for i in range(len(prompts))], axis,
                                     confidence, volume.shape)
    label_map = reo.invert(canonical_labels)

    how = {i: params.describe() for params, members in groups.items() for i in members}
    source = "video tracker" if options.mode == "track" else "detector"
    entries = []
    for i, (p, res, con) in enumerate(zip(prompts, results, concepts, strict=True)):
        searched = res.outcome != NOT_SEARCHED
        common = dict(value=i + 1, prompt_index=i, prompt=p, presence=_max_or_none(res.presence[searched]),
                      source=source, preprocessing=how[i], slices_detected=con.slices_detected,
                      post=con.components, area_mm2=None)
        if con.mask is None:
            best = float(res.scores[searched].max()) if searched.any() else None
            entries.append(LabelEntry(score=best, absent=True, reason=con.reason, voxels=0,
                                      volume_ml=0.0 if voxel_ml else None, **common))
            continue
        on = slice_counts(con.mask, axis) > 0
        kept = (res.outcome == KEPT) & on
        score = float(res.scores[kept].max()) if kept.any() else float(res.scores[res.outcome == KEPT].max())
        mask = label_map == i + 1
        voxels = int(mask.sum())
        entry = LabelEntry(score=score, voxels=voxels, volume_ml=voxels * voxel_ml if voxel_ml else None,
                           **common)
        if voxels:
            entry.box3d = _box3d(mask)
            entry.slice_range = (entry.box3d[2], entry.box3d[5] - 1)
        else:  # every voxel went to other prompts
            entry.absent, entry.reason = True, "overlap"
        entries.append(entry)

    settings = {
        "model": seg.source,
        "mode": f"volume ({options.mode})",
        "threshold": seg.threshold,
        "presence_threshold": seg.presence_threshold,
        "meta_text_cls": seg.meta_text_cls,
        "model_input_size": seg.image_size,
        "device": str(model_device(seg.model)),
        "dtype": str(model_dtype(seg.model)).replace("torch.", ""),
        "modality": modality,
        "window": seg.window,
        "preprocessing": [params.to_dict() | {"prompts": members} for params, members in groups.items()],
        "image_encoder_runs": encoded,
        "test_time_mirroring": mirroring_settings(seg.mirrors),
        "orientation": reo.describe(),
        "slice_axis": axis,
        "slice_plane": PLANE_OF_AXIS[axis],
        "slices": int(volume.shape[axis]),
        "volume": options.to_dict(),
        "box_frame": BOX_FRAME,
    }
    if options.mode == "track":
        settings["video_model"] = str(getattr(seg.video_model(), "source", "in-memory video model"))
        settings["image_encoder_runs"] = None
        settings["slices_tracked"] = encoded
    return SegmentationResult(label_map, entries, image, settings, display=display, reorientation=reo,
                              slice_axis=axis)

