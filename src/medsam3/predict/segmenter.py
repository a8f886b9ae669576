"""The :class:`Segmenter`: an image and a list of prompts in, a label map on the input grid out.

Flow for a 2D image ``(H, W)`` or ``(H, W, C)``:

1. **Prompts** are validated against the image size (:func:`~medsam3.predict.prompts.validate_prompt`)
   and tokenised (at most 32 tokens) before any model work.
2. **Preprocessing** is chosen per prompt: :func:`~medsam3.preprocess.intensity.intensity_parameters`
   with the segmenter's ``window`` and the prompt's concept. For CT in Hounsfield units the concept picks
   the window ("lung nodule" -> lung window, "liver" -> abdomen window), so prompts of one image may need
   different pixel inputs. Prompts are grouped by their preprocessing and **the image encoder runs once
   per group** (once per image for RGB, ultrasound, 8-bit data, or a fixed ``window``); every prompt of a
   group reuses the cached features. The normalised image becomes 3-channel ``uint8``
   (:func:`~medsam3.preprocess.slices.slice_to_rgb`), is resized to the model's square input
   (:class:`~medsam3.preprocess.resize.ResizeTransform`) and normalised with the processor's mean / std.
3. **Concept prompts** (text, text + boxes, boxes) run in batches on the cached features through
   :func:`medsam3.model.forward.predict_prompts` (Meta's text-only prompt sequence by default).
   **Point prompts** without text run through SAM3's interactive tracker (``Sam3TrackerModel``: points
   and at most one box, SAM2-style), which must be available. **Text + points** runs the concept model on
   the text (and boxes) and keeps the detections that contain a positive point and no negative point.
   With test-time mirroring (``mirror=True``) the image is also encoded mirrored along x, y and both and
   each prompt's four predictions are merged into one candidate (:mod:`medsam3.predict.mirror`).
4. **Decision** per prompt (:mod:`medsam3.predict.postprocess`): presence gate, confidence threshold,
   best mask (semantic mode) or all masks above the threshold (instance mode).
5. **Back to the input grid**: mask logits are resized bilinearly from the model grid to ``(H, W)`` and
   thresholded at 0; overlapping masks are resolved pixel-wise by confidence.

Label values: in semantic mode prompt ``i`` always has value ``i + 1`` (absent prompts mark no pixel); in
instance mode the kept instances are numbered 1, 2, ... in prompt order, best first within a prompt.

3D volumes use the same class: :meth:`Segmenter.segment` dispatches on the image's dimension (a one-slice
volume, such as a single DICOM slice, counts as 2D) and segments volumes as slice sequences, slice-wise
detection (``VolumeOptions(mode="slices")``, :mod:`medsam3.predict.volume`) or SAM3's video tracker
(``mode="track"``, :mod:`medsam3.predict.track`), with 3D post-processing; the label map comes back on
the input volume's grid (:mod:`medsam3.predict.volume_segment`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from medsam3.data.vocabulary import is_positional
from medsam3.errors import ModelError, PromptError
from medsam3.image import Image
from medsam3.model.forward import BOX_PAD_LABEL, encode_image, model_device, model_dtype, predict_prompts
from medsam3.model.input_size import input_size, resize_sam3_input
from medsam3.predict.mirror import (
    MIRRORS,
    merge_mirrored,
    mirror_boxes,
    mirror_grid,
    mirroring_settings,
    mirrors_for,
)
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
from medsam3.preprocess.intensity import IntensityParams, apply_intensity, intensity_parameters
from medsam3.preprocess.resize import ResizeTransform
from medsam3.preprocess.slices import slice_to_rgb

log = logging.getLogger(__name__)

#: Tokens per prompt of SAM3's text encoder.
TEXT_TOKENS = 32
#: Why test-time mirroring is refused ({what}: the request).
MIRROR_REFUSAL = ("test-time mirroring keeps one mask per text or box prompt and does not combine with "
                  "{what}; drop the mirroring (--tta) or that option")


@dataclass
class _Outcome:
    """What one prompt produced before the label map is assembled."""

    selection: Selection
    logits: np.ndarray  # (K, H, W) float32 mask logits of the kept masks on the input grid
    source: str
    preprocessing: str


def _check_unit(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise PromptError(f"{name} must be between 0 and 1, got {value:g}")
    return value


def _is_loaded(obj: Any) -> bool:
    return hasattr(obj, "model") and hasattr(obj, "processor")


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
    return Image(image.array[0], image.spacing[:2], image.origin[:2], image.direction[:2, :2],
                 image.modality, meta)


class Segmenter:
    """Prompt-driven segmentation of medical images with a SAM3 model.

    Args:
        loaded_or_model_path: a loaded model (``LoadedSam3`` from :func:`medsam3.model.loading.load_sam3`,
            or any object with ``model`` and ``processor``), or a model path / id resolved by ``load_sam3``
            (``None``: the configured or bundled default).
        device, dtype: passed to ``load_sam3`` when loading here (``"auto"``, ``"cpu"``, ``"cuda"``,
            ``"mps"``; ``"auto"``, ``"fp32"``, ``"bf16"``, ``"fp16"``).
        threshold: a mask is kept when its confidence ``sigmoid(logit) * presence`` exceeds this (0.1, as
            in Medical SAM3's evaluation).
        presence_threshold: a prompt whose presence probability is below this is reported absent.
        window: CT window for every prompt (name such as ``"lung"`` or ``"width,level"``); ``None`` picks
            it from each prompt's concept. Only valid for CT.
        modality: overrides the image's modality (one of :data:`medsam3.image.MODALITIES`).
        instances: default mode: ``False`` one mask per prompt, ``True`` every instance above threshold.
        meta_text_cls: text-only prompts use Meta's prompt sequence (see :mod:`medsam3.model.forward`).
        prompt_batch_size: prompts run together on the cached image features (memory grows with it).
        tracker: the interactive tracker for point prompts (``load_sam3_tracker`` result or a
            ``Sam3TrackerModel``); loaded on first use from the same source, on the model's device and
            dtype, when omitted.
        volume: how volumes are segmented (:class:`~medsam3.predict.volume.VolumeOptions`; defaults when
            omitted).
        video: SAM3's video model for ``mode="track"`` (a ``LoadedSam3Video`` from
            :func:`medsam3.model.video.load_sam3_video`, or any object with ``model`` and ``processor``);
            loaded on first use from the same source, on the model's device and dtype, when omitted.
        image_size: run the image model at this square input size instead of its own (a multiple of the
            patch size; :func:`medsam3.model.input_size.resize_sam3_input`, the loaded model is not
            changed), e.g. a 1008 px SAM3 at 672 px on a CPU: faster, coarser. Point prompts keep the
            tracker's own size; track mode is refused.
        mirror: test-time mirroring (:mod:`medsam3.predict.mirror`): every image or slice is also
            segmented mirrored along x, y and both, and the four predictions are averaged into one mask per
            prompt (four times the model work). Concepts naming a side or position are not mirrored.
            Refused with instance mode, point prompts and track mode.
    """

    def __init__(
        self,
        loaded_or_model_path: Any = None,
        *,
        device: str = "auto",
        dtype: str = "auto",
        threshold: float = 0.1,
        presence_threshold: float = 0.5,
        window: str | None = None,
        modality: str | None = None,
        instances: bool = False,
        meta_text_cls: bool = True,
        prompt_batch_size: int = 8,
        tracker: Any = None,
        volume: Any = None,
        video: Any = None,
        image_size: int | None = None,
        mirror: bool = False,
    ):
        from medsam3.predict.volume import VolumeOptions

        self.threshold = _check_unit("threshold", threshold)
        self.presence_threshold = _check_unit("presence threshold", presence_threshold)
        self.window = window
        self.modality = modality.upper() if modality else None
        self.instances = bool(instances)
        self.meta_text_cls = bool(meta_text_cls)
        self.prompt_batch_size = max(1, int(prompt_batch_size))
        if _is_loaded(loaded_or_model_path):
            self.loaded = loaded_or_model_path
        else:
            from medsam3.model.loading import load_sam3

            self.loaded = load_sam3(loaded_or_model_path, device=device, dtype=dtype)
        self.model = self.loaded.model.eval()
        self.processor = self.loaded.processor
        self.resized = False
        if image_size is not None and int(image_size) != input_size(self.model):
            self.model = resize_sam3_input(self.model, int(image_size)).eval()
            self.resized = True
        self.image_size = input_size(self.model)
        self.mirror = bool(mirror)
        if self.mirror and self.instances:
            raise PromptError(MIRROR_REFUSAL.format(what="instance mode"))
        #: The mirrors each image goes through (:data:`medsam3.predict.mirror.MIRRORS`; ``((),)``: none).
        self.mirrors = MIRRORS if self.mirror else ((),)
        self._tracker = tracker
        self.volume = volume if volume is not None else VolumeOptions()
        self._video = video

    # -- public --------------------------------------------------------------------------------------
    @property
    def source(self) -> str:
        """Where the model came from (path or id), for reports."""
        return str(getattr(self.loaded, "source", "in-memory model"))

    def segment(
        self, image: Image, prompts: list, *, instances: bool | None = None, volume: Any = None
    ) -> SegmentationResult:
        """Segment ``image`` with ``prompts``.

        Args:
            image: a 2D :class:`~medsam3.image.Image` (grayscale or RGB / RGBA), a one-slice volume
                (segmented as its 2D slice; the result is on that slice's grid), or a 3D volume.
            prompts: one or more prompts: :class:`~medsam3.predict.prompts.Prompt` (coordinates in pixels
                of ``image``); for volumes also :class:`~medsam3.predict.volume_prompts.VolumePrompt`
                (boxes on a key slice or 3D boxes, in input voxels; plain prompts must be text only).
            instances: override the segmenter's mode for this call (2D only).
            volume: :class:`~medsam3.predict.volume.VolumeOptions` for this call (volumes only).

        Returns:
            A :class:`~medsam3.predict.summary.SegmentationResult` on ``image``'s grid.

        Raises:
            PromptError: invalid prompts (points or instance mode on a volume); InputError: a window for
            a non-CT image; ModelError: point prompts without tracker weights, track mode without a
            video model.
        """
        prompts = list(prompts)
        if not prompts:
            raise PromptError("no prompt given")
        instances = self.instances if instances is None else bool(instances)
        if self.mirror:
            if instances:
                raise PromptError(MIRROR_REFUSAL.format(what="instance mode"))
            pointed = next((p for p in prompts if getattr(p, "points", None)), None)
            if pointed is not None:
                raise PromptError(MIRROR_REFUSAL.format(what=f"point prompts ({pointed.display_name})"))
        flat = as_2d(image)
        if flat is not None:
            from medsam3.predict.volume_prompts import VolumePrompt

            if any(isinstance(p, VolumePrompt) for p in prompts):
                raise PromptError("volume prompts (key-slice or 3D boxes) need a 3D volume; this image is 2D")
            return self._segment_2d(flat, prompts, instances)
        return self._segment_volume(image, prompts, instances, volume or self.volume)

    # -- 3D ------------------------------------------------------------------------------------------
    def _segment_volume(self, image: Image, prompts: list, instances: bool, options) -> SegmentationResult:
        from medsam3.predict.volume_segment import segment_volume

        if self.mirror and options.mode == "track":
            raise PromptError(MIRROR_REFUSAL.format(what="track mode (SAM3's video model)"))
        if instances:
            raise PromptError(f"instance mode is for 2D images; a 3D volume {image.spatial_shape} (Z, Y, X) "
                              "is segmented with one label per prompt")
        return segment_volume(self, image, prompts, options)

    def video_model(self):
        """SAM3's video model for track mode (``model`` and ``processor``), loaded on first use."""
        if self.resized:
            raise ModelError(f"track mode runs SAM3's video model at its own input size: drop the input "
                             f"size {self.image_size} or segment the volume in slices mode")
        if self._video is None or not _is_loaded(self._video):
            from medsam3.predict.volume_segment import video_model_for

            self._video = video_model_for(self, self._video)
        return self._video

    # -- 2D ------------------------------------------------------------------------------------------
    def _segment_2d(self, image: Image, prompts: list[Prompt], instances: bool) -> SegmentationResult:
        h, w = image.spatial_shape
        for p in prompts:
            validate_prompt(p, (h, w))
            if p.uses_tracker and p.boxes and (len(p.boxes) > 1 or 0 in p.box_labels):
                raise PromptError(
                    f"point prompt {p.display_name}: the point model takes at most one positive box "
                    "(give a text to use several or negative boxes)"
                )
        if any(p.uses_tracker for p in prompts):
            self._tracker_model()  # fail before any work when the tracker cannot be loaded
        tokens = self._tokenize([p.model_text for p in prompts if not p.uses_tracker])
        modality = self.modality or image.modality
        pixels = image.array[..., :3] if image.is_color else image.array  # alpha is not image content
        groups: dict[IntensityParams, list[int]] = {}
        for i, p in enumerate(prompts):
            params = intensity_parameters(pixels, modality, window=self.window, concept=p.text)
            groups.setdefault(params, []).append(i)

        transform = ResizeTransform((h, w), self.image_size)
        outcomes: dict[int, _Outcome] = {}
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
                    model_pixels = self._pixel_values(transform.image(rgb))
                    mirrors = mirrors_for(self.mirrors, [prompts[i].model_text for i in detector])
                    visions = [encode_image(self.model, mirror_grid(model_pixels, dims)) for dims in mirrors]
                    encoder_runs += len(visions)
                    for start in range(0, len(detector), self.prompt_batch_size):
                        chunk = detector[start : start + self.prompt_batch_size]
                        rows = [det_rows[i] for i in chunk]
                        out = self._detect_mirrored(visions, mirrors, [prompts[i] for i in chunk], tokens,
                                                    rows, transform)
                        for row, i in enumerate(chunk):
                            outcomes[i] = self._decide(out, row, prompts[i], transform, instances, how)
                if tracked:
                    outcomes.update(self._track_group(rgb, [(i, prompts[i]) for i in tracked], (h, w), how))
        return self._assemble(image, prompts, outcomes, instances, display, groups, encoder_runs)

    def _tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        if not texts:
            return {}
        enc = self.processor.tokenizer(
            texts, padding="max_length", max_length=TEXT_TOKENS, return_tensors="pt"
        )
        if enc["input_ids"].shape[1] > TEXT_TOKENS:
            lengths = enc["attention_mask"].sum(dim=1).tolist()
            bad = next(t for t, n in zip(texts, lengths, strict=True) if n > TEXT_TOKENS)
            n = int(max(lengths))
            raise PromptError(f"prompt {bad!r} is too long: {n} tokens, SAM3 reads at most {TEXT_TOKENS}")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def _pixel_values(self, rgb_model: np.ndarray, model=None) -> torch.Tensor:
        """``uint8 (S, S, 3)`` -> ``(1, 3, S, S)`` normalised as the processor does (rescale, mean, std)."""
        ip = self.processor.image_processor
        scale = float(getattr(ip, "rescale_factor", 1 / 255))
        mean = np.asarray(getattr(ip, "image_mean", (0.5, 0.5, 0.5)), dtype=np.float32)
        std = np.asarray(getattr(ip, "image_std", (0.5, 0.5, 0.5)), dtype=np.float32)
        x = (rgb_model.astype(np.float32) * np.float32(scale) - mean) / std
        t = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]
        model = model or self.model
        return t.to(device=model_device(model), dtype=model_dtype(model))

    def _detect_mirrored(self, visions: list, mirrors, prompts: list[Prompt], tokens, rows: list[int],
                         transform: ResizeTransform):
        """:meth:`_detect` on the features ``visions`` of the input mirrored along each of ``mirrors``,
        merged into one candidate per prompt (:func:`~medsam3.predict.mirror.merge_mirrored`) when
        there are several."""
        if len(mirrors) == 1:
            return self._detect(visions[0], prompts, tokens, rows, transform)
        outs = [self._detect(v, prompts, tokens, rows, transform, dims)
                for v, dims in zip(visions, mirrors, strict=True)]
        return merge_mirrored(outs, mirrors, [not is_positional(p.model_text) for p in prompts])

    def _detect(self, vision, prompts: list[Prompt], tokens, rows: list[int], transform: ResizeTransform,
                dims: tuple[int, ...] = ()):
        """The detector's output for ``prompts`` on ``vision``, the features of the model input mirrored
        along ``dims`` (box prompts are mirrored to match)."""
        ids = tokens["input_ids"][rows]
        mask = tokens["attention_mask"][rows]
        n_box = max(len(p.boxes or ()) for p in prompts)
        boxes = labels = None
        if n_box:
            boxes = torch.zeros(len(prompts), n_box, 4, dtype=torch.float32)
            labels = torch.full((len(prompts), n_box), BOX_PAD_LABEL, dtype=torch.long)
            for r, p in enumerate(prompts):
                if not p.boxes:
                    continue
                xyxy = transform.boxes_to_model(np.asarray(p.boxes)) / self.image_size
                cxcywh = np.stack([(xyxy[:, 0] + xyxy[:, 2]) / 2, (xyxy[:, 1] + xyxy[:, 3]) / 2,
                                   xyxy[:, 2] - xyxy[:, 0], xyxy[:, 3] - xyxy[:, 1]], axis=1)
                boxes[r, : len(p.boxes)] = torch.from_numpy(cxcywh).float()
                labels[r, : len(p.boxes)] = torch.tensor(p.box_labels)
        return predict_prompts(self.model, vision, input_ids=ids, attention_mask=mask,
                               boxes=mirror_boxes(boxes, dims), box_labels=labels,
                               meta_text_cls=self.meta_text_cls)

    def _decide(self, out, row: int, prompt: Prompt, transform, instances: bool, how: str) -> _Outcome:
        presence_logits = None if out.presence_logits is None else out.presence_logits[row : row + 1]
        scores, presence = query_scores(
            out.pred_logits[row : row + 1].float().cpu().numpy(),
            None if presence_logits is None else presence_logits.float().cpu().numpy(),
        )
        pres = None if presence_logits is None else float(presence[0])
        # With points, every candidate is looked at: the points choose among them.
        sel = select_queries(scores[0], pres, threshold=self.threshold,
                             presence_threshold=self.presence_threshold,
                             instances=instances or bool(prompt.points))
        logits = self._to_original(out.pred_masks[row, list(sel.queries)], transform)
        if prompt.points and not sel.absent:
            hit = points_select(logits > 0, prompt.points, prompt.point_labels)
            keep = [k for k in range(len(sel.queries)) if hit[k]]
            if not instances:
                keep = keep[:1]
            if not keep:
                sel = Selection((), (), sel.presence, sel.best_score, "points")
            else:
                sel = Selection(tuple(sel.queries[k] for k in keep), tuple(sel.scores[k] for k in keep),
                                sel.presence, sel.best_score, None)
            logits = logits[keep]
        return _Outcome(sel, logits, "detector", how)

    @staticmethod
    def _to_original(masks: torch.Tensor, transform: ResizeTransform) -> np.ndarray:
        """``(K, h, w)`` model-grid logits -> ``(K, H, W)`` float32 logits on the input grid (bilinear)."""
        h, w = transform.orig_hw
        if masks.shape[0] == 0:
            return np.zeros((0, h, w), dtype=np.float32)
        return transform.mask_to_original(masks.float().cpu().numpy()).astype(np.float32, copy=False)

    # -- points: the interactive tracker -------------------------------------------------------------
    def _tracker_model(self):
        if self._tracker is None:
            from medsam3.model.loading import load_sam3_tracker

            source = getattr(self.loaded, "source", None)
            try:
                self._tracker = load_sam3_tracker(
                    source, device=model_device(self.model), dtype=model_dtype(self.model)
                )
            except ModelError as exc:
                raise ModelError(
                    f"point prompts without text need SAM3's interactive tracker, which could not be loaded "
                    f"from {source}: {exc}. Give a text with the points, or use a box prompt."
                ) from exc
        return self._tracker.model if hasattr(self._tracker, "model") else self._tracker

    def _track_group(
        self, rgb: np.ndarray, items: list[tuple[int, Prompt]], hw, how: str
    ) -> dict[int, _Outcome]:
        tracker = self._tracker_model().eval()
        size = int(tracker.config.vision_config.backbone_config.image_size)
        transform = ResizeTransform(hw, size)
        pixels = self._pixel_values(transform.image(rgb), model=tracker)
        embeddings = tracker.get_image_embeddings(pixels)
        return {i: self._track(tracker, embeddings, p, transform, how) for i, p in items}

    def _track(self, tracker, embeddings, prompt: Prompt, transform: ResizeTransform, how: str) -> _Outcome:
        device = model_device(tracker)
        dtype = model_dtype(tracker)
        # SAM's prompt encoder adds half a pixel (pixel index -> pixel centre); our coordinates are
        # continuous, so half a pixel is taken off after scaling.
        pts = transform.points_to_model(np.asarray(prompt.points)) - 0.5
        points = torch.tensor(pts, dtype=dtype, device=device)[None, None]
        labels = torch.tensor(prompt.point_labels, dtype=torch.int32, device=device)[None, None]
        boxes = None
        if prompt.boxes:
            boxes = torch.tensor(transform.boxes_to_model(np.asarray(prompt.boxes)) - 0.5,
                                 dtype=dtype, device=device)[None]
        multimask = len(prompt.points) == 1 and boxes is None
        out = tracker(image_embeddings=embeddings, input_points=points, input_labels=labels,
                      input_boxes=boxes, multimask_output=multimask)
        iou = out.iou_scores[0, 0].float().cpu().numpy()
        best = int(np.argmax(iou))
        presence = float(sigmoid(out.object_score_logits[0, 0].float().cpu().numpy()).reshape(-1)[0])
        score = float(np.clip(iou[best], 0.0, 1.0)) * presence
        sel = select_queries(np.array([score]), presence, threshold=self.threshold,
                             presence_threshold=self.presence_threshold)
        masks = out.pred_masks[0, 0, [best]] if not sel.absent else out.pred_masks[0, 0, []]
        return _Outcome(sel, self._to_original(masks, transform), "tracker", how)

    # -- assembly ------------------------------------------------------------------------------------
    def _assemble(self, image, prompts, outcomes, instances, display, groups, encoder_runs: int
                  ) -> SegmentationResult:
        h, w = image.spatial_shape
        entries: list[LabelEntry] = []
        layers, confidences, layer_values = [], [], []
        next_value = 1
        for i, p in enumerate(prompts):
            oc = outcomes[i]
            sel = oc.selection
            common = dict(prompt_index=i, prompt=p, presence=sel.presence, source=oc.source,
                          preprocessing=oc.preprocessing)
            if sel.absent:
                value = None if instances else i + 1
                entries.append(LabelEntry(value=value, score=sel.best_score, absent=True, reason=sel.reason,
                                          **common))
                continue
            for k, score in enumerate(sel.scores):
                value = next_value if instances else i + 1
                next_value += 1
                entries.append(LabelEntry(value=value, score=score, instance=k + 1 if instances else None,
                                          **common))
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
        settings = {
            "model": self.source,
            "mode": "instances" if instances else "semantic",
            "threshold": self.threshold,
            "presence_threshold": self.presence_threshold,
            "meta_text_cls": self.meta_text_cls,
            "model_input_size": self.image_size,
            "device": str(model_device(self.model)),
            "dtype": str(model_dtype(self.model)).replace("torch.", ""),
            "modality": self.modality or image.modality,
            "window": self.window,
            "preprocessing": [params.to_dict() | {"prompts": members} for params, members in groups.items()],
            "image_encoder_runs": encoder_runs,
            "test_time_mirroring": mirroring_settings(self.mirrors),
        }
        if any(p.uses_tracker for p in prompts):
            settings["tracker"] = str(getattr(self._tracker, "source", "loaded with the model"))
        return SegmentationResult(label_map, entries, image, settings, display=display)

