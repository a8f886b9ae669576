"""2D segmentation: an image and a list of prompts in, a label map on the input grid out.

Flow of :func:`segment_image` for a 2D image ``(H, W)`` or ``(H, W, C)``:

1. **Prompts** are validated against the image size (:func:`~medsam3.predict.prompts.validate_prompt`)
   and tokenised (at most 32 tokens) before any model work.
2. **Preprocessing** is chosen per prompt: :func:`~medsam3.preprocess.intensity.intensity_parameters`
   with the options' ``window`` and the prompt's concept. For CT in Hounsfield units the concept picks
   the window ("lung nodule" -> lung window, "liver" -> abdomen window), so prompts of one image may need
   different pixel inputs. Prompts are grouped by their preprocessing and **the image encoder runs once
   per group** (once per image for RGB, ultrasound, 8-bit data, or a fixed ``window``); every prompt of a
   group reuses the cached features. The normalised image becomes 3-channel ``uint8``
   (:func:`~medsam3.preprocess.slices.slice_to_rgb`), is resized to the model's square input
   (:class:`~medsam3.preprocess.resize.ResizeTransform`) and normalised with the processor's mean / std.
3. **Concept prompts** (text, text + boxes, boxes) run in batches on the cached features through
   :meth:`Engine.detect <medsam3.predict.engine.Engine.detect>` (Meta's text-only prompt sequence by
   default). **Point prompts** without text run through SAM3's interactive tracker (``Sam3TrackerModel``:
   points and at most one box, SAM2-style), which must be available. **Text + points** runs the concept
   model on the text (and boxes) and keeps the detections that contain a positive point and no negative
   point. With test-time mirroring (``tta``) the image is also encoded mirrored along x, y and both and
   each prompt's four predictions are merged into one candidate (:mod:`medsam3.predict.tta`).
4. **Decision** per prompt (:mod:`medsam3.predict.postprocess`): presence gate, confidence threshold,
   best mask (semantic mode) or all masks above the threshold (instance mode).
5. **Back to the input grid**: mask logits are resized bilinearly from the model grid to ``(H, W)`` and
   thresholded at 0; overlapping masks are resolved pixel-wise by confidence.

Label values: in semantic mode prompt ``i`` always has value ``i + 1`` (absent prompts mark no pixel); in
instance mode the kept instances are numbered 1, 2, ... in prompt order, best first within a prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from medsam3.data.vocabulary import is_positional
from medsam3.errors import PromptError
from medsam3.image import Image
from medsam3.model.forward import model_device, model_dtype
from medsam3.predict.engine import Engine, Tokens, box_tensors
from medsam3.predict.fast import apply_presets
from medsam3.predict.options import SegmentOptions
from medsam3.predict.postprocess import (
    Selection,
    label_dtype,
    mask_box,
    points_select,
    query_scores,
    resolve_pixelwise,
    select_queries,
    sigmoid,
)
from medsam3.predict.prompts import Prompt, validate_prompt
from medsam3.predict.summary import LabelEntry, SegmentationResult
from medsam3.predict.tta import (
    MIRRORS,
    merge_mirrored,
    mirror_boxes,
    mirror_grid,
    mirroring_settings,
    mirrors_for,
)
from medsam3.preprocess.intensity import IntensityParams, apply_intensity, intensity_parameters
from medsam3.preprocess.resize import ResizeTransform
from medsam3.preprocess.slices import slice_to_rgb

if TYPE_CHECKING:
    from transformers import Sam3TrackerModel
    from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput


@dataclass
class Outcome:
    """What one prompt produced before the label map is assembled."""

    selection: Selection
    logits: np.ndarray  # (K, H, W) float32 mask logits of the kept masks on the input grid
    source: str
    preprocessing: str


def as_2d(image: Image) -> Image | None:
    """``image`` as a 2D image: itself when 2D, its only slice for a one-slice volume, else ``None``.

    A single DICOM slice is read as a ``(1, Y, X)`` volume; its slice keeps the in-plane geometry (the
    first two ITK axes: spacing, origin and the 2 x 2 block of the direction) and is segmented as stored.
    """
    if image.ndim == 2:
        return image
    if image.spatial_shape[0] != 1 or image.is_color:
        return None
    meta = dict(image.meta, slice_of_volume=list(image.spatial_shape))
    return Image(
        image.array[0], image.spacing[:2], image.origin[:2], image.direction[:2, :2], image.modality, meta
    )


def check_image_prompts(prompts: Sequence[Prompt], hw: tuple[int, int]) -> None:
    """Prompts against a 2D image of ``hw`` pixels (coordinates inside it; the point model's box rule).

    Raises:
        PromptError: the first invalid prompt.
    """
    for p in prompts:
        validate_prompt(p, hw)
        if p.uses_tracker and p.boxes and (len(p.boxes) > 1 or 0 in (p.box_labels or ())):
            raise PromptError(
                f"point prompt {p.display_name}: the point model takes at most one positive box "
                "(give a text to use several or negative boxes)"
            )


def segment_image(
    engine: Engine, image: Image, prompts: list[Prompt], options: SegmentOptions
) -> SegmentationResult:
    """Segment a 2D ``image`` (module docstring); ``options.image_size`` picks the model's input size."""
    options, preset = apply_presets(engine, options, volume=False)
    engine = engine.at_size(options.image_size)
    h, w = image.spatial_shape
    check_image_prompts(prompts, (h, w))
    if any(p.uses_tracker for p in prompts):
        engine.tracker()  # fail before any work when the tracker cannot be loaded
    tokens = engine.tokenize([p.model_text for p in prompts if not p.uses_tracker])
    modality = options.modality or image.modality
    pixels = image.array[..., :3] if image.is_color else image.array  # alpha is not image content
    groups: dict[IntensityParams, list[int]] = {}
    for i, p in enumerate(prompts):
        params = intensity_parameters(pixels, modality, window=options.window, concept=p.text)
        groups.setdefault(params, []).append(i)

    transform = ResizeTransform((h, w), engine.image_size)
    mirrors_all = MIRRORS if options.tta else ((),)
    outcomes: dict[int, Outcome] = {}
    display = None
    encoder_runs = 0
    det_rows = {i: r for r, i in enumerate(i for i, p in enumerate(prompts) if not p.uses_tracker)}
    with torch.inference_mode():
        for params, members in groups.items():
            rgb = slice_to_rgb(apply_intensity(pixels, params))
            if display is None:
                display = rgb
            how = params.describe()
            detector = [i for i in members if not prompts[i].uses_tracker]
            tracked = [i for i in members if prompts[i].uses_tracker]
            if detector:
                model_pixels = engine.pixel_values(transform.image(rgb))
                mirrors = mirrors_for(mirrors_all, [prompts[i].model_text for i in detector])
                visions = [engine.encode_images(mirror_grid(model_pixels, dims)) for dims in mirrors]
                encoder_runs += len(visions)
                for start in range(0, len(detector), options.prompt_batch_size):
                    chunk = detector[start : start + options.prompt_batch_size]
                    chunk_tokens = tokens.rows([det_rows[i] for i in chunk])
                    out = _detect_mirrored(
                        engine,
                        visions,
                        mirrors,
                        [prompts[i] for i in chunk],
                        chunk_tokens,
                        transform,
                        options,
                    )
                    for row, i in enumerate(chunk):
                        outcomes[i] = _decide(out, row, prompts[i], transform, options, how)
            if tracked:
                outcomes.update(
                    _track_group(engine, rgb, [(i, prompts[i]) for i in tracked], (h, w), options, how)
                )
    result = _assemble(engine, image, prompts, outcomes, options, display, groups, encoder_runs, mirrors_all)
    if preset is not None:
        result.settings["preset"] = preset
    return result


def _detect_mirrored(
    engine: Engine,
    visions: list[Sam3VisionEncoderOutput],
    mirrors: Sequence[tuple[int, ...]],
    prompts: list[Prompt],
    tokens: Tokens,
    transform: ResizeTransform,
    options: SegmentOptions,
) -> Any:
    """The detector's output on the features ``visions`` of the input mirrored along each of ``mirrors``,
    merged into one candidate per prompt (:func:`~medsam3.predict.tta.merge_mirrored`) when there are
    several. Box prompts are mirrored with the features."""
    boxes, labels = box_tensors(
        [tuple(p.boxes or ()) for p in prompts],
        [tuple(p.box_labels or ()) for p in prompts],
        transform.boxes_to_model,
        engine.image_size,
    )
    outs = [
        engine.detect(
            v,
            tokens=tokens,
            boxes=mirror_boxes(boxes, dims),
            box_labels=labels,
            meta_text_cls=options.meta_text_cls,
        )
        for v, dims in zip(visions, mirrors, strict=True)
    ]
    if len(outs) == 1:
        return outs[0]
    return merge_mirrored(outs, mirrors, [not is_positional(p.model_text) for p in prompts])


def _decide(
    out: Any, row: int, prompt: Prompt, transform: ResizeTransform, options: SegmentOptions, how: str
) -> Outcome:
    presence_logits = None if out.presence_logits is None else out.presence_logits[row : row + 1]
    scores, presence = query_scores(
        out.pred_logits[row : row + 1].float().cpu().numpy(),
        None if presence_logits is None else presence_logits.float().cpu().numpy(),
    )
    pres = None if presence_logits is None else float(presence[0])
    # With points, every candidate is looked at: the points choose among them.
    sel = select_queries(
        scores[0],
        pres,
        threshold=options.threshold,
        presence_threshold=options.presence_threshold,
        instances=options.instances or bool(prompt.points),
    )
    logits = to_original(out.pred_masks[row, list(sel.queries)], transform)
    if prompt.points and not sel.absent:
        assert prompt.point_labels is not None  # set with the points in Prompt.__post_init__
        hit = points_select(logits > 0, prompt.points, prompt.point_labels)
        keep = [k for k in range(len(sel.queries)) if hit[k]]
        if not options.instances:
            keep = keep[:1]
        if not keep:
            sel = Selection((), (), sel.presence, sel.best_score, "points")
        else:
            sel = Selection(
                tuple(sel.queries[k] for k in keep),
                tuple(sel.scores[k] for k in keep),
                sel.presence,
                sel.best_score,
                None,
            )
        logits = logits[keep]
    return Outcome(sel, logits, "detector", how)


def to_original(masks: torch.Tensor, transform: ResizeTransform) -> np.ndarray:
    """``(K, h, w)`` model-grid logits -> ``(K, H, W)`` float32 logits on the input grid (bilinear)."""
    h, w = transform.orig_hw
    if masks.shape[0] == 0:
        return np.zeros((0, h, w), dtype=np.float32)
    return transform.mask_to_original(masks.float().cpu().numpy()).astype(np.float32, copy=False)


# -- points: the interactive tracker ---------------------------------------------------------------------
def _track_group(
    engine: Engine,
    rgb: np.ndarray,
    items: list[tuple[int, Prompt]],
    hw: tuple[int, int],
    options: SegmentOptions,
    how: str,
) -> dict[int, Outcome]:
    tracker = engine.tracker()
    transform = ResizeTransform(hw, engine.tracker_size())
    pixels = engine.pixel_values(transform.image(rgb), model=tracker)
    embeddings = tracker.get_image_embeddings(pixels)
    return {i: _track(tracker, embeddings, p, transform, options, how) for i, p in items}


def _track(
    tracker: Sam3TrackerModel,
    embeddings: list[torch.Tensor],
    prompt: Prompt,
    transform: ResizeTransform,
    options: SegmentOptions,
    how: str,
) -> Outcome:
    assert prompt.points is not None  # a tracker prompt has points (Prompt.uses_tracker)
    device, dtype = model_device(tracker), model_dtype(tracker)
    # SAM's prompt encoder adds half a pixel (pixel index -> pixel centre); our coordinates are
    # continuous, so half a pixel is taken off after scaling.
    pts = transform.points_to_model(np.asarray(prompt.points)) - 0.5
    points = torch.tensor(pts, dtype=dtype, device=device)[None, None]
    labels = torch.tensor(prompt.point_labels, dtype=torch.int32, device=device)[None, None]
    boxes = None
    if prompt.boxes:
        boxes = torch.tensor(
            transform.boxes_to_model(np.asarray(prompt.boxes)) - 0.5, dtype=dtype, device=device
        )[None]
    multimask = len(prompt.points) == 1 and boxes is None
    out = tracker(
        image_embeddings=embeddings,
        input_points=points,
        input_labels=labels,
        input_boxes=boxes,
        multimask_output=multimask,
    )
    iou = out.iou_scores[0, 0].float().cpu().numpy()
    best = int(np.argmax(iou))
    presence = float(sigmoid(out.object_score_logits[0, 0].float().cpu().numpy()).reshape(-1)[0])
    score = float(np.clip(iou[best], 0.0, 1.0)) * presence
    sel = select_queries(
        np.array([score]),
        presence,
        threshold=options.threshold,
        presence_threshold=options.presence_threshold,
    )
    masks = out.pred_masks[0, 0, [best]] if not sel.absent else out.pred_masks[0, 0, []]
    return Outcome(sel, to_original(masks, transform), "tracker", how)


# -- assembly ----------------------------------------------------------------------------------------------
def _assemble(
    engine: Engine,
    image: Image,
    prompts: list[Prompt],
    outcomes: dict[int, Outcome],
    options: SegmentOptions,
    display: np.ndarray | None,
    groups: dict[IntensityParams, list[int]],
    encoder_runs: int,
    mirrors: Sequence[tuple[int, ...]],
) -> SegmentationResult:
    h, w = image.spatial_shape
    instances = options.instances
    entries: list[LabelEntry] = []
    layers, confidences, layer_values = [], [], []
    next_value = 1
    for i, p in enumerate(prompts):
        oc = outcomes[i]
        sel = oc.selection
        common: dict[str, Any] = dict(
            prompt_index=i, prompt=p, presence=sel.presence, source=oc.source, preprocessing=oc.preprocessing
        )
        if sel.absent:
            value = None if instances else i + 1
            entries.append(
                LabelEntry(value=value, score=sel.best_score, absent=True, reason=sel.reason, **common)
            )
            continue
        for k, score in enumerate(sel.scores):
            value = next_value if instances else i + 1
            next_value += 1
            entries.append(
                LabelEntry(value=value, score=score, instance=k + 1 if instances else None, **common)
            )
            layers.append(oc.logits[k])
            confidences.append(score)
            layer_values.append(value)
    max_value = max([e.value for e in entries if e.value is not None], default=0)
    label_map = np.zeros((h, w), dtype=label_dtype(max_value))
    if layers:
        winner = resolve_pixelwise(np.stack(layers), np.asarray(confidences))
        lut = np.asarray(layer_values, dtype=label_map.dtype)
        on = winner >= 0
        label_map[on] = lut[winner[on]]
    # Pictures without a physical pixel size (PNG, JPEG) have spacing 1 in pixel units: no mm².
    known = image.meta.get("spacing_known", True) is not False
    pixel_mm2 = float(image.spacing[0] * image.spacing[1])
    for e in entries:
        e.area_mm2 = 0.0 if known else None
        if e.value is None or e.absent:
            continue
        m = label_map == e.value
        e.area_px = int(m.sum())
        e.area_mm2 = e.area_px * pixel_mm2 if known else None
        e.box = mask_box(m)
    settings = run_settings(engine, options, image, groups, encoder_runs, mirrors)
    settings["mode"] = "instances" if instances else "semantic"
    if any(p.uses_tracker for p in prompts):
        settings["tracker"] = engine.tracker_source
    return SegmentationResult(label_map, entries, image, settings, display=display)


def run_settings(
    engine: Engine,
    options: SegmentOptions,
    image: Image,
    groups: dict[IntensityParams, list[int]],
    encoder_runs: int | None,
    mirrors: Sequence[tuple[int, ...]],
) -> dict[str, Any]:
    """The settings every result records (model, rule, preprocessing, work done), in a fixed key order."""
    described = engine.describe()
    return {
        "model": described["model"],
        "mode": None,
        "threshold": options.threshold,
        "presence_threshold": options.presence_threshold,
        "meta_text_cls": options.meta_text_cls,
        "model_input_size": described["model_input_size"],
        "device": described["device"],
        "dtype": described["dtype"],
        "modality": options.modality or image.modality,
        "window": options.window,
        "preprocessing": [params.to_dict() | {"prompts": members} for params, members in groups.items()],
        "image_encoder_runs": encoder_runs,
        "test_time_mirroring": mirroring_settings(mirrors),
    }
