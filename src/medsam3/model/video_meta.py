"""Meta's SAM3 video behaviour in ``transformers``' ``Sam3VideoModel``, where the two differ.

``transformers``' video model departs from Meta's (the code the released and the Medical SAM3 V2 weights
were trained and evaluated with) in three places that change masks, scores and which objects exist.
medsam3's volume modes (``--mode track`` and ``--mode clips``) run the video model inside
:func:`meta_video_behaviour`, which makes all three Meta's (proven against Meta's model in
``tests/slow/test_meta_v2_clips.py``; the numbers in ``benchmarks/results/v2_clips_meta_equivalence.md``):

1. **NMS and hole filling.** ``transformers`` takes the detections' mask NMS (``generic_nms``) and the
   connected components of its hole filling and speck removal (``cc_2d``) from the hub kernel
   ``kernels-community/cv-utils``; when that kernel does not load (offline, no ``kernels`` package, an
   untrusted publisher, no CUDA build) it silently keeps every detection above the threshold - a
   hundred overlapping objects where Meta keeps one - and fills no hole. :class:`PlainCvUtils` is the same
   pair of operations in PyTorch / SciPy (greedy NMS over the IoU matrix as Meta's
   ``generic_nms_cpu``; 8-connected components with sizes as Meta's CPU path), installed whenever no
   kernel is loaded. The hub is never contacted.
2. **Meta's text prompt sequence.** Meta's detector appends the geometry encoder's CLS token to a
   text-only prompt (:mod:`medsam3.model.forward`); ``Sam3VideoModel.run_detection`` calls its detector
   with the text alone. While active, the detector's text-only calls get the CLS token.
3. **How a new object starts.** For a detection that becomes a new object, Meta (``Sam3VideoBase.
   _tracker_add_new_objects`` and the tracker's ``add_new_mask``) conditions the tracker on the detection
   logits resized bilinearly to ``4 x low_res_mask_size`` and thresholded at 0 (``transformers``: the
   low-resolution logits thresholded at 0.5), stores as the object's output on that frame the mask at the
   video size as +-1024 resized back to ``low_res_mask_size`` (``transformers``: the input mask at model
   resolution), and computes its object pointer with one single-mask decoder pass on that mask
   downsampled by the tracker's ``mask_downsample`` (``transformers``: a multi-mask pass on a mask
   resized to the input size first, a different output token). While active, new objects start as in
   Meta's model. (Not reproduced: the memory encoded on the frame an object is created, Meta's from the
   video-size mask binarised then resized, ``transformers``' resized then binarised.)

Known remaining difference (not reached by V2's 4-slice clips): periodic reconditioning
(``recondition_every_nth_frame``, every 16th frame of a pass) outputs the detection's mask for a
reconditioned object in ``transformers``, where Meta re-adds it as a new mask input and keeps the tracker's.

The overrides are per model instance and reference-counted (threads running volumes on the same model
share one installation); outside the ``with`` block the model is ``transformers``' again, so training code
and other callers see the plain modules.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

#: Meta's mask score for "certainly background" (``sam3.model.sam3_tracker_base.NO_OBJ_SCORE``).
NO_OBJ_SCORE = -1024.0

T = TypeVar("T")
#: Session attribute set by :func:`no_reconditioning`.
_NO_RECONDITION = "medsam3_no_reconditioning"
_LOCK = threading.Lock()
#: id(video model) -> [active count, the instance attributes installed].
_ACTIVE: dict[int, list[Any]] = {}


# --------------------------------------------------------------------------------------------------
# 1. NMS and connected components without the hub kernel


class PlainCvUtils:
    """The two operations ``transformers``' SAM3 video model expects of ``kernels-community/cv-utils``."""

    @staticmethod
    def generic_nms(
        ious: torch.Tensor, scores: torch.Tensor, iou_threshold: float, use_iou_matrix: bool = True
    ) -> torch.Tensor:
        """Greedy NMS on a pairwise IoU matrix.

        Args:
            ious: ``(N, N)`` IoU of the candidates.
            scores: ``(N,)``; candidates are taken highest first (ties: lower index first).
            iou_threshold: a candidate is dropped when its IoU with a kept one is above this.

        Returns:
            ``(K,)`` int64 indices of the kept candidates, in the order they were kept.
        """
        iou = ious.float().cpu().numpy()
        order = np.argsort(-scores.float().cpu().numpy(), kind="stable")
        kept = []
        while order.size:
            i = int(order[0])
            kept.append(i)
            order = order[1:][iou[i, order[1:]] <= iou_threshold]
        return torch.tensor(kept, dtype=torch.int64, device=scores.device)

    @staticmethod
    def cc_2d(mask: torch.Tensor, get_counts: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """8-connected components of each ``(H, W)`` plane of ``mask`` ``(..., H, W)``.

        Returns:
            ``(labels, counts)``, both int32 of ``mask``'s shape: the component number of each foreground
            pixel (0 on background), and the size of its component (0 on background).
        """
        from scipy import ndimage

        planes = mask.detach().cpu().numpy().astype(bool)
        labels = np.zeros(planes.shape, np.int32)
        counts = np.zeros(planes.shape, np.int32)
        eight = np.ones((3, 3), bool)
        for idx in np.ndindex(*planes.shape[:-2]):
            lab, n = ndimage.label(planes[idx], structure=eight)
            labels[idx] = lab
            if n:
                sizes = np.bincount(lab.ravel())
                sizes[0] = 0
                counts[idx] = sizes[lab]
        return torch.from_numpy(labels).to(mask.device), torch.from_numpy(counts).to(mask.device)


def install_cv_utils() -> None:
    """Give ``transformers``' video model :class:`PlainCvUtils` unless a cv-utils kernel is loaded."""
    import transformers.models.sam3_video.modeling_sam3_video as msv

    if not msv.cv_utils_kernel:  # None: not tried yet (it would go to the hub); False: failed
        msv.cv_utils_kernel = PlainCvUtils()  # type: ignore[assignment]


# --------------------------------------------------------------------------------------------------
# 2. Meta's text prompt sequence in the video detector


class MetaTextDetectorForward:
    """Stands in for a detector's ``forward``: text-only calls get Meta's ``[text ; CLS]`` sequence."""

    def __init__(self, detector: torch.nn.Module):
        self.detector = detector

    def plain(self, **kwargs: Any) -> Any:
        """``Sam3Model.forward`` itself."""
        return type(self.detector).forward(self.detector, **kwargs)

    def __call__(self, **kwargs: Any) -> Any:
        from medsam3.model.forward import _text_with_cls

        text_only = set(kwargs) == {"vision_embeds", "text_embeds", "attention_mask"}
        if not text_only:
            return self.plain(**kwargs)
        return _text_with_cls(
            _PlainDetector(self), kwargs["vision_embeds"], kwargs["text_embeds"], kwargs["attention_mask"]
        )


class _PlainDetector:
    """The detector as :func:`medsam3.model.forward._text_with_cls` uses it, calling the plain forward."""

    def __init__(self, forward: MetaTextDetectorForward):
        self.geometry_encoder = forward.detector.geometry_encoder
        self._forward = forward

    def __call__(self, **kwargs: Any) -> Any:
        return self._forward.plain(**kwargs)


# --------------------------------------------------------------------------------------------------
# 3. New objects as Meta starts them


def conditioning_masks(
    det_logits: torch.Tensor, hw: tuple[int, int], low_res: int, groups: list[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The masks Meta's video model starts new objects from, given their detection logits.

    Meta resizes the low-resolution logits bilinearly to the tracker's input-mask size ``4 low_res`` and
    thresholds them at 0: the tracker's input. The tracker then resizes that mask to the video size ``hw``
    (bilinear, antialiased) and thresholds it at 0.5; an object added later on the same frame for the
    same prompt (``groups``) takes its pixels from earlier ones. The object's stored low-resolution output
    is that video-size mask as +-1024, resized back to ``low_res``.

    Args:
        det_logits: ``(N, low_res, low_res)`` detection mask logits of the new objects.
        hw: video (slice) size ``(H, W)`` in pixels.
        low_res: the tracker's low-resolution mask side (``low_res_mask_size``).
        groups: prompt id of each object (default: all one prompt).

    Returns:
        ``(inputs (N, 1, 4 low_res, 4 low_res) in det_logits' dtype (0 / 1), video (N, H, W) bool,
        low (N, 1, low_res, low_res) float32 scores)``.
    """
    size = 4 * low_res
    up = F.interpolate(
        det_logits.unsqueeze(1).float(), size=(size, size), mode="bilinear", align_corners=False
    )
    inputs = up > 0
    video = F.interpolate(inputs.float(), size=hw, mode="bilinear", align_corners=False, antialias=True) > 0.5
    video = video[:, 0].clone()
    groups = groups if groups is not None else [0] * len(video)
    for i in range(len(video)):
        for j in range(i):
            if groups[j] == groups[i]:
                video[j] &= ~video[i]
    scores = torch.where(video, -NO_OBJ_SCORE, NO_OBJ_SCORE).unsqueeze(1)
    low = F.interpolate(scores, size=(low_res, low_res), mode="bilinear", align_corners=False, antialias=True)
    return inputs.to(det_logits.dtype), video, low


def _object_pointer(tracker: Any, session: Any, frame_idx: int, mask: torch.Tensor) -> torch.Tensor:
    """Meta's object pointer of a new object: one single-mask decoder pass on its ``(1, 1, 4 low, 4 low)``
    input mask downsampled by the tracker's ``mask_downsample``; the no-object pointer for an empty mask."""
    feats, _ = tracker._prepare_vision_features(session, frame_idx, batch_size=1)
    sizes = tracker.backbone_feature_sizes
    high = [
        x.permute(1, 2, 0).view(x.size(1), x.size(2), *s) for x, s in zip(feats[:-1], sizes[:-1], strict=True)
    ]
    pix = feats[-1].permute(1, 2, 0).view(-1, tracker.hidden_dim, *sizes[-1])
    mask = mask.to(pix.dtype)
    pointer = tracker._single_frame_forward(
        input_masks=tracker.mask_downsample(mask), image_embeddings=[*high, pix], multimask_output=False
    ).object_pointer
    if not bool(mask.any()):
        pointer = tracker.no_object_pointer.expand_as(pointer)
    return pointer


def _store_new_object(
    session: Any, frame_idx: int, obj_id: int, low: torch.Tensor, pointer: torch.Tensor
) -> None:
    """Set a new object's output on its first frame: low-resolution scores and object pointer."""
    out = session.output_dict_per_obj[session.obj_id_to_idx(obj_id)]["cond_frame_outputs"][frame_idx]
    out["pred_masks"] = low.unsqueeze(0).to(out["pred_masks"].dtype)
    out["object_pointer"] = pointer.reshape(out["object_pointer"].shape)


def _meta_add_new_objects(
    video_model: Any,
    original: Any,
    inference_session: Any,
    frame_idx: int,
    new_obj_ids: list[int],
    new_obj_masks: torch.Tensor,
    reverse: bool = False,
) -> None:
    """``Sam3VideoModel._tracker_add_new_objects`` as Meta's model starts new objects (module docstring).

    ``new_obj_masks``: ``(N, low_res, low_res)`` detection logits. Falls back to ``transformers``' own
    method when the session does not know the video size.
    """
    height, width = inference_session.video_height, inference_session.video_width
    if height is None or width is None:
        return original(inference_session, frame_idx, new_obj_ids, new_obj_masks, reverse=reverse)
    low_res = int(video_model.low_res_mask_size)
    groups = [inference_session.obj_id_to_prompt_id[i] for i in new_obj_ids]
    inputs, _, low = conditioning_masks(new_obj_masks, (int(height), int(width)), low_res, groups)
    for obj_id, mask in zip(new_obj_ids, inputs, strict=True):
        inference_session.add_mask_inputs(
            inference_session.obj_id_to_idx(obj_id), frame_idx, mask.unsqueeze(0)
        )
    inference_session.obj_with_new_inputs = list(new_obj_ids)
    tracker = video_model.tracker_model
    tracker(inference_session=inference_session, frame_idx=frame_idx, reverse=reverse, run_mem_encoder=True)
    for k, obj_id in enumerate(new_obj_ids):
        pointer = _object_pointer(tracker, inference_session, frame_idx, inputs[k : k + 1])
        _store_new_object(inference_session, frame_idx, obj_id, low[k], pointer)


# --------------------------------------------------------------------------------------------------
# Installation


@contextmanager
def meta_video_behaviour(video_model: Any) -> Iterator[Any]:
    """Run ``video_model`` (a ``transformers.Sam3VideoModel``) as Meta's video model (module docstring).

    Installs :class:`PlainCvUtils` (kept afterwards: it only replaces "no NMS, no hole filling"), and for
    the duration of the block, on this instance only, Meta's text prompt sequence in the detector and
    Meta's start of new objects. Re-entrant and thread-safe: nested or concurrent blocks on the same
    model share one installation, removed when the last one exits. Yields the model.
    """
    install_cv_utils()
    key = id(video_model)
    with _LOCK:
        entry = _ACTIVE.get(key)
        if entry is None:
            detector = video_model.detector_model
            original = video_model._tracker_add_new_objects

            def add_new_objects(inference_session, frame_idx, new_obj_ids, new_obj_masks, reverse=False):
                _meta_add_new_objects(
                    video_model, original, inference_session, frame_idx, new_obj_ids, new_obj_masks, reverse
                )

            recondition = video_model._prepare_recondition_masks

            def prepare_recondition_masks(inference_session, *args, **kwargs):
                if getattr(inference_session, _NO_RECONDITION, False):
                    return {}, set()
                return recondition(inference_session, *args, **kwargs)

            saved = {
                "detector": detector.__dict__.get("forward"),
                "model": video_model.__dict__.get("_tracker_add_new_objects"),
                "recondition": video_model.__dict__.get("_prepare_recondition_masks"),
            }
            detector.forward = MetaTextDetectorForward(detector)
            video_model._tracker_add_new_objects = add_new_objects
            video_model._prepare_recondition_masks = prepare_recondition_masks
            entry = _ACTIVE[key] = [0, saved]
        entry[0] += 1
    try:
        yield video_model
    finally:
        with _LOCK:
            entry[0] -= 1
            if entry[0] == 0:
                del _ACTIVE[key]
                saved = entry[1]
                _restore(video_model.detector_model, "forward", saved["detector"])
                _restore(video_model, "_tracker_add_new_objects", saved["model"])
                _restore(video_model, "_prepare_recondition_masks", saved["recondition"])


@contextmanager
def no_reconditioning(session: Any) -> Iterator[None]:
    """Within :func:`meta_video_behaviour`: frames processed in this block in ``session`` make no periodic
    reconditioning (as if ``recondition_every_nth_frame`` were 0, for this session only)."""
    setattr(session, _NO_RECONDITION, True)
    try:
        yield
    finally:
        setattr(session, _NO_RECONDITION, False)


def _restore(obj: Any, name: str, value: Any) -> None:
    """Put back an instance attribute as it was (absent: the class's method again)."""
    if value is None:
        obj.__dict__.pop(name, None)
    else:
        setattr(obj, name, value)


def runs_as_meta(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorate a function whose first argument is a ``Sam3VideoModel``: it runs in
    :func:`meta_video_behaviour` of that model."""

    @functools.wraps(fn)
    def wrapper(video_model: Any, *args: Any, **kwargs: Any) -> T:
        with meta_video_behaviour(video_model):
            return fn(video_model, *args, **kwargs)

    return wrapper
