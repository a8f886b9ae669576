"""Segment a volume: the steps of :mod:`medsam3.predict.volume` put together, in either mode.

:func:`segment_volume` is what :meth:`medsam3.predict.segmenter.Segmenter.segment` runs for a 3D image
(slices mode: :mod:`~medsam3.predict.volume.slices`; track mode: :mod:`~medsam3.predict.volume.track`). It
returns a :class:`~medsam3.predict.summary.SegmentationResult` whose label map lies on the **input** grid
(same shape, spacing, origin and direction as the input volume), with one entry per prompt carrying voxel
counts, volume in ml and slice ranges in input voxel indices. Its settings record how it was made; in
slices mode ``slice_search`` (:func:`~medsam3.predict.volume.search.search_report`) says how the slices
were searched, the encoder passes a full pass needs, and per prompt the probes and the slices searched.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from medsam3.image import Image
from medsam3.predict.engine import Engine
from medsam3.predict.fast import apply_presets
from medsam3.predict.options import VolumeOptions
from medsam3.predict.prompts import Prompt
from medsam3.predict.segment_2d import run_settings
from medsam3.predict.summary import LabelEntry, SegmentationResult
from medsam3.predict.tta import MIRRORS
from medsam3.predict.volume.clips import clip_ranges, clip_slices
from medsam3.predict.volume.plan import KEPT, NOT_SEARCHED, group_prompts, prepare
from medsam3.predict.volume.post import (
    assign_labels,
    postprocess_concept,
    raw_concept,
    slice_counts,
    voxel_confidence,
)
from medsam3.predict.volume.prompts import VolumePrompt
from medsam3.predict.volume.search import plan_searches, probe_step, search_report
from medsam3.predict.volume.slices import detect_slices, full_pass_runs
from medsam3.predict.volume.track import track_slices
from medsam3.preprocess.orientation import PLANE_OF_AXIS
from medsam3.preprocess.resize import ResizeTransform
from medsam3.preprocess.slices import take_slice

#: How boxes are given on volumes (recorded in every result's settings).
BOX_FRAME = (
    "input array voxels: x along axis 2, y along axis 1, z along axis 0 (the stored slice index); "
    "continuous coordinates, exclusive ends"
)


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


def segment_volume(
    engine: Engine, image: Image, prompts: Sequence[Prompt | VolumePrompt], options: VolumeOptions
) -> SegmentationResult:
    """Segment a 3D ``image`` with volume ``prompts`` (module docstring of :mod:`medsam3.predict.volume`)."""
    options, preset = apply_presets(engine, options)
    engine = engine.at_size(options.image_size)
    checked, canonical, reo, axis, plans = prepare(engine, image, prompts, options)
    modality = options.modality or image.modality
    volume = canonical.array
    groups = group_prompts(volume, modality, options.window, checked)
    display = np.zeros(volume.shape, dtype=np.uint8)
    if options.mode == "track":
        results, encoded = track_slices(engine, volume, axis, checked, groups, options, display)
    elif options.mode == "clips":
        results, encoded = clip_slices(engine, volume, axis, checked, groups, options, display)
    else:
        n = int(volume.shape[axis])
        spacing = float(canonical.spacing_array_order[axis])
        step = probe_step(spacing if spacing > 0 else 1.0, options.search_step_mm)
        searches = plan_searches(plans, n, options.search, step)
        results, encoded = detect_slices(
            engine, volume, axis, checked, plans, groups, options, display, searches
        )

    hw = take_slice(volume, axis, 0, display=True).shape
    transform = ResizeTransform(hw, engine.image_size)
    known = image.meta.get("spacing_known", True) is not False
    voxel_ml = image.voxel_volume_ml if known else None
    if options.mode == "clips" and not options.clip_post_process:
        concepts = [raw_concept(res, transform, axis, volume.shape) for res in results]
    else:
        concepts = [
            postprocess_concept(res, plan, transform, axis, volume.shape, options, voxel_ml)
            for res, plan in zip(results, plans, strict=True)
        ]

    def confidence(i: int, k: int) -> Any:
        c = voxel_confidence(results[i], transform, k)
        return c[::-1] if axis != 0 and isinstance(c, np.ndarray) else c  # displayed -> stored rows

    canonical_labels = assign_labels(
        [c.mask for c in concepts], [i + 1 for i in range(len(checked))], axis, confidence, volume.shape
    )
    label_map = reo.invert(canonical_labels)

    how = {i: params.describe() for params, members in groups.items() for i in members}
    source = {"track": "video tracker", "clips": "video model (clips)"}.get(options.mode, "detector")
    entries = []
    for i, (p, res, con) in enumerate(zip(checked, results, concepts, strict=True)):
        searched = res.outcome != NOT_SEARCHED
        common: dict[str, Any] = dict(
            value=i + 1,
            prompt_index=i,
            prompt=p,
            presence=_max_or_none(res.presence[searched]),
            source=source,
            preprocessing=how[i],
            slices_detected=con.slices_detected,
            post=con.components,
            area_mm2=None,
        )
        if con.mask is None:
            best = float(res.scores[searched].max()) if searched.any() else None
            entries.append(
                LabelEntry(
                    score=best,
                    absent=True,
                    reason=con.reason,
                    voxels=0,
                    volume_ml=0.0 if voxel_ml else None,
                    **common,
                )
            )
            continue
        on = slice_counts(con.mask, axis) > 0
        kept = (res.outcome == KEPT) & on
        score = float(res.scores[kept].max()) if kept.any() else float(res.scores[res.outcome == KEPT].max())
        mask = label_map == i + 1
        voxels = int(mask.sum())
        entry = LabelEntry(
            score=score, voxels=voxels, volume_ml=voxels * voxel_ml if voxel_ml else None, **common
        )
        if voxels:
            entry.box3d = _box3d(mask)
            entry.slice_range = (entry.box3d[2], entry.box3d[5] - 1)
        else:  # every voxel went to other prompts
            entry.absent, entry.reason = True, "overlap"
        entries.append(entry)

    settings = run_settings(engine, options, image, groups, encoded, MIRRORS if options.tta else ((),))
    settings.update(
        {
            "mode": f"volume ({options.mode})",
            "orientation": reo.describe(),
            "slice_axis": axis,
            "slice_plane": PLANE_OF_AXIS[axis],
            "slices": int(volume.shape[axis]),
            "volume": volume_settings(options),
            "box_frame": BOX_FRAME,
        }
    )
    if options.mode == "slices":
        input_axis = reo.source_axes[axis]
        last = int(volume.shape[axis]) - 1
        settings["slice_search"] = search_report(
            searches,
            search=options.search,
            step_mm=options.search_step_mm,
            step=step,
            spacing_mm=spacing if known and spacing > 0 else None,
            to_input=(lambda k: last - k) if axis in reo.flipped else (lambda k: k),
            input_axis=input_axis,
            encoder_runs_full=full_pass_runs(checked, plans, groups, options.tta),
        )
    if options.mode in ("track", "clips"):
        settings["video_model"] = str(getattr(engine.video(), "source", "in-memory video model"))
        settings["image_encoder_runs"] = None
        settings["slices_tracked"] = encoded
    if options.mode == "clips":
        settings["clips"] = {
            "length": options.clip_length,
            "count": len(clip_ranges(int(volume.shape[axis]), options.clip_length)),
            "fusion": "pixel_score (V2): highest probability above 0.5 inside each class's mask",
            "post_processing_3d": options.clip_post_process,
        }
    if options.intensity == "minmax":
        settings["intensity"] = "minmax (V2): uint8 slices as stored, others min-max scaled per slice"
    if preset is not None:
        settings["preset"] = preset
    return SegmentationResult(
        label_map, entries, image, settings, display=display, reorientation=reo, slice_axis=axis
    )


def volume_settings(options: VolumeOptions) -> dict[str, Any]:
    """The volume options of a result's settings (``"volume"``): those :class:`VolumeOptions` adds."""
    from medsam3.predict.options import SegmentOptions, option_names

    plain = set(option_names(SegmentOptions))
    return {k: v for k, v in options.to_dict().items() if k not in plain}
