"""Meta's SAM3 video model (PyPI package ``sam3``) run as Medical SAM3 V2 runs it, as a CPU reference.

Test-only helpers for ``test_meta_v2_clips.py``: build Meta's full-size video model
(``sam3.model_builder.build_sam3_video_model``, detector + tracker) at V2's input size with seeded random
weights on a CPU, save it as a V2 trainer checkpoint, drive it with V2's 3D recipe (``docs/V2_3D.md``
section 1, written from that specification: :func:`meta_v2_volume`), and the shims that make medsam3's
clips mode behave as Meta's model does (what ``src/`` should adopt; each documents its cause).

Input size. The PyPI builder has no ``image_size`` argument; V2's fork of it threads one value through
the same constructor arguments that carry 1008 in Meta's builder, and nothing else
(``sam3/model_builder.py`` of AIM-Research-Lab/Medical-SAM3): the ViT's ``img_size``, the sine position
encodings' ``precompute_resolution`` (a cache), the DETR decoder's ``resolution`` (box-relative position
bias), the memory encoder's mask resize ``interpol_size = s * 8 // 7``, the tracker's RoPE
``feat_sizes = s // 14``, and the tracker's and the video model's ``image_size``.
:func:`v2_input_size` makes the PyPI builder do the same by wrapping those constructors while it runs.
No module, parameter or parameter shape changes (the RoPE tables are buffers, recomputed for the grid).

V2's settings. Hot-start off (``hotstart_delay = hotstart_unmatch_thresh = hotstart_dup_thresh = 0``);
the other thresholds are the builder's defaults for the model with temporal disambiguation, which are
V2's (:data:`V2_THRESHOLDS` are checked, not set).

Frames. Meta's loader for a list of PIL images resizes each with PIL's default filter (bicubic) and stores
float16; medsam3 resizes with an antialiased bilinear filter in float32. To compare the models rather than
the resize filters, :func:`meta_volume_state` builds the inference state from the PIL frames (Meta reads
the original size from them) and then replaces its image batch with the float32 tensors medsam3 computes
(:func:`medsam3.model.video.pixel_tensor`); :func:`loader_difference` measures what that replacement
changes.

Running Meta's video model on a CPU (nothing inside the package is edited): :class:`MetaVideoOnCpu`
redirects ``cuda`` and keeps float32 where Meta casts tracker features and memories to bfloat16;
:func:`empty_batch_connected_components` lets Meta's CPU connected components take a frame without new
detections.

Where ``transformers``' video model / medsam3's clips mode differ from Meta's model under V2's recipe
(found with this reference; shims here, fixes for ``src/`` in the report):

1. :func:`transformers_cv_utils` - no NMS and no hole filling unless the hub kernel
   ``kernels-community/cv-utils`` loads (it does not: ``kernels`` 0.19 refuses the untrusted publisher;
   offline it cannot download): every detection above the threshold becomes an object.
2. :func:`meta_text_cls_in_video` - the video detector gets the text alone, Meta's gets ``[text ; CLS]``.
3. :func:`meta_new_object_masks` - new objects are conditioned on the detection logits thresholded at 0.5
   at 144 px (Meta: resized to 576 px, > 0, then to the video size), and their stored output is not
   Meta's video-size mask.
4. :func:`v2_prompted_frame_twice` - V2 runs each clip's first frame twice (``add_prompt`` then
   ``propagate_in_video`` from it) and reports the second run: the tracker's conditioning output.
"""

from __future__ import annotations

import functools
import importlib.util
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F

from .meta_reference import CudaToCpu, clip_bpe_path, randomize_parameters_


class MetaVideoOnCpu(CudaToCpu):
    """:class:`~meta_reference.CudaToCpu`, and Meta's bfloat16 storage casts made float32.

    Meta's video model casts three kinds of tensors to bfloat16 whatever the model's dtype: the tracker's
    backbone features (``Sam3ImageOnVideoMultiGPU``, for the all-gather between GPUs; on a GPU they are
    bfloat16 already under autocast) and the memory features it stores (``Sam3TrackerPredictor``, twice).
    On a CPU without autocast the first breaks the next convolution (bfloat16 input, float32 weights).

    ``bf16="off"``: the casts return the float32 tensor unchanged (float32 throughout, as medsam3 runs);
    ``bf16="round"``: they return the tensor rounded to bfloat16 and back to float32 (the values Meta stores,
    computed in float32), to measure what that rounding alone changes.
    """

    def __init__(self, bf16: str = "off"):
        super().__init__()
        if bf16 not in ("off", "round"):
            raise ValueError(bf16)
        self.bf16 = bf16

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to:
            target = kwargs.get("dtype", next((a for a in args[1:] if isinstance(a, torch.dtype)), None))
            if target is torch.bfloat16 and args[0].dtype == torch.float32:
                return args[0].clone() if self.bf16 == "off" else args[0].to(torch.bfloat16).float()
        return super().__torch_function__(func, types, args, kwargs)


#: Medical SAM3 V2's input size.
V2_SIZE = 504
#: Meta's builder defaults for the video model with temporal disambiguation that V2 keeps.
V2_THRESHOLDS = {
    "score_threshold_detection": 0.5,
    "new_det_thresh": 0.7,
    "assoc_iou_thresh": 0.1,
    "det_nms_thresh": 0.1,
    "fill_hole_area": 16,
    "recondition_every_nth_frame": 16,
    "min_trk_keep_alive": -1,
    "max_trk_keep_alive": 30,
    "init_trk_keep_alive": 30,
}
#: V2's hot-start settings (off).
V2_HOTSTART = {"hotstart_delay": 0, "hotstart_unmatch_thresh": 0, "hotstart_dup_thresh": 0}
#: ViT patch size.
PATCH = 14


def skimage_available() -> bool:
    """Whether scikit-image is importable (Meta's CPU connected components, used for hole filling)."""
    return importlib.util.find_spec("skimage") is not None


def _replace(cls, **changes):
    """``cls`` with keyword arguments rewritten by ``changes`` (name -> function of the given value)."""

    @functools.wraps(cls, updated=())
    def build(*args, **kwargs):
        for name, change in changes.items():
            if name in kwargs:
                kwargs[name] = change(kwargs[name])
        return cls(*args, **kwargs)

    return build


@contextmanager
def v2_input_size(size: int = V2_SIZE):
    """While active, ``sam3.model_builder`` builds models for a ``size`` x ``size`` input (see the module
    docstring)."""
    import sam3.model_builder as mb

    grid = size // PATCH
    patches = {
        "ViT": _replace(mb.ViT, img_size=lambda _: size),
        "PositionEmbeddingSine": _replace(
            mb.PositionEmbeddingSine, precompute_resolution=lambda r: None if r is None else size
        ),
        "TransformerDecoder": _replace(mb.TransformerDecoder, resolution=lambda _: size),
        "SimpleMaskDownSampler": _replace(
            mb.SimpleMaskDownSampler, interpol_size=lambda _: [size * 8 // 7, size * 8 // 7]
        ),
        "RoPEAttention": _replace(mb.RoPEAttention, feat_sizes=lambda _: [grid, grid]),
        "Sam3TrackerPredictor": _replace(mb.Sam3TrackerPredictor, image_size=lambda _: size),
        "Sam3VideoInferenceWithInstanceInteractivity": _replace(
            mb.Sam3VideoInferenceWithInstanceInteractivity, image_size=lambda _: size
        ),
    }
    with ExitStack() as stack:
        for name, new in patches.items():
            stack.enter_context(mock.patch.object(mb, name, new))
        yield


def build_meta_video_model(seed: int = 0, size: int = V2_SIZE) -> torch.nn.Module:
    """Meta's full-size SAM3 video model as V2 runs it: ``size`` px, hot-start off; CPU, float32, eval.

    ``torch.manual_seed(seed)`` precedes the build; :func:`meta_reference.randomize_parameters_` then gives
    every parameter distinct values (``model.fill_report``).
    """
    from sam3.model_builder import build_sam3_video_model

    torch.manual_seed(seed)
    with CudaToCpu(), v2_input_size(size):
        model = build_sam3_video_model(
            checkpoint_path=None,
            load_from_HF=False,
            bpe_path=clip_bpe_path(),
            apply_temporal_disambiguation=True,
            device="cpu",
        )
    for key, value in V2_HOTSTART.items():
        setattr(model, key, value)
    wrong = {k: getattr(model, k) for k, v in V2_THRESHOLDS.items() if getattr(model, k) != v}
    if wrong:
        raise AssertionError(f"Meta's builder defaults changed: {wrong}")
    model = model.float().eval()
    model.fill_report = randomize_parameters_(model, seed=seed + 1)
    return model


#: Biases that make the random-weight model find and keep objects, by Meta key: the detector's presence
#: head (presence probability ~1) and the tracker's object-score head (objects stay "present").
DETECTION_BIASES = {
    "detector.transformer.decoder.presence_token_head.layers.2.bias": 20.0,
    "tracker.sam_mask_decoder.pred_obj_score_head.layers.2.bias": 10.0,
}
#: The detector's score head: ``logit = (hs_proj(query) . prompt_proj(pooled prompt)) / sqrt(256)``.
HS_PROJ_BIAS = "detector.dot_prod_scoring.hs_proj.bias"


@torch.no_grad()
def bias_for_detections(
    model: torch.nn.Module,
    state: dict,
    prompts: dict[str, float],
    biases: dict[str, float] = DETECTION_BIASES,
) -> dict[str, dict]:
    """Make the random-weight model detect each prompt with about the given score, in place.

    With random weights the 200 queries of a prompt score almost alike (a spread of about 0.01 in logit)
    and below any threshold, and the presence score is random. This fills :data:`DETECTION_BIASES`, then
    shifts every query's logit of prompt ``t`` by ``logit(prompts[t]) - (its best logit now)`` through the
    one bias of the score head that reaches them all (``hs_proj.bias`` += ``d``, the shortest ``d`` with
    ``d . q_t / 16`` = the shift for every prompt, ``q_t`` the projected pooled prompt measured on frame 0
    of ``state``, a one-frame state). The queries keep their order and spread; the shift varies a little
    between frames (the pooled prompt includes the geometry encoder's image-dependent token).

    Returns per prompt the best detection score on frame 0 before, and the detection scores and mask
    logits of all queries there (for the NMS check).
    """
    params = dict(model.named_parameters())
    for name, value in biases.items():
        params[name].fill_(value)
    before = {t: _frame0_scores(model, state, t) for t in prompts}
    q = torch.stack([before[t][1] for t in prompts]).double()  # (P, 256)
    best = torch.tensor([float(before[t][0].max()) for t in prompts], dtype=torch.float64)
    goal = torch.logit(torch.tensor(list(prompts.values()), dtype=torch.float64))
    scale = float(model.detector.dot_prod_scoring.scale)
    shift = (goal - torch.logit(best)) / scale  # d . q_t = shift_t
    d = q.T @ torch.linalg.solve(q @ q.T, shift)
    params[HS_PROJ_BIAS].add_(d.float())
    return {t: {"before": float(before[t][0].max())} for t in prompts}


@torch.inference_mode()
def _frame0_scores(model, state, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Detection scores of all queries of ``text`` on frame 0 of ``state`` and the projected pooled prompt."""
    from sam3.model.sam3_image import Sam3ImageOnVideoMultiGPU

    captured = {}

    def on_prompt(_module, _args, output):
        captured.setdefault("q", output.detach()[0].clone())

    original = Sam3ImageOnVideoMultiGPU.forward_grounding

    def forward_grounding(self, **kw):
        out = original(self, **kw)
        captured.setdefault("logits", out["pred_logits"].detach().clone())
        return out

    hook = model.detector.dot_prod_scoring.prompt_proj.register_forward_hook(on_prompt)
    try:
        with (
            MetaVideoOnCpu(),
            empty_batch_connected_components(),
            mock.patch.object(Sam3ImageOnVideoMultiGPU, "forward_grounding", forward_grounding),
        ):
            model.add_prompt(inference_state=state, frame_idx=0, text_str=text)
    finally:
        hook.remove()
    return captured["logits"][0, :, 0].sigmoid(), captured["q"]


def save_v2_checkpoint(model: torch.nn.Module, path) -> dict[str, int]:
    """Save ``model`` as a V2 trainer checkpoint: ``{"model": {detector.*, tracker.*}, ...}``.

    Meta's video model's own state-dict keys are already ``detector.*`` / ``tracker.*`` (the names of
    ``sam3.pt``). Returns the key counts per part.
    """
    state = {k: v for k, v in model.state_dict().items()}
    torch.save({"model": state, "epoch": 9, "steps": {"train": 1000}}, path)
    return {
        "detector": sum(k.startswith("detector.") for k in state),
        "tracker": sum(k.startswith("tracker.") for k in state),
        "freqs_cis": sum(k.endswith("freqs_cis") for k in state),
    }


# --------------------------------------------------------------------------------------------------
# transformers' missing NMS and hole filling


class CvUtilsFallback:
    """What ``transformers``' SAM3 video model expects of the hub kernel ``kernels-community/cv-utils``.

    ``transformers.models.sam3_video.modeling_sam3_video`` loads that kernel for the detections' mask NMS
    (``generic_nms``) and the connected components of its hole filling (``cc_2d``); when it cannot (no
    ``kernels`` package, no network, no CUDA build, or - with ``kernels`` 0.19 - an untrusted publisher),
    it silently keeps every detection above the threshold and fills no hole. Meta's model does both on
    any device. These are the same operations in plain PyTorch / SciPy:

    * ``generic_nms``: greedy NMS over a pairwise IoU matrix, highest score first, dropping the others
      whose IoU with it is above the threshold (Meta's ``sam3.perflib.nms.generic_nms_cpu``);
    * ``cc_2d``: 8-connected components of each ``(1, H, W)`` plane, with every pixel's component size
      (Meta's CPU path uses ``skimage.measure.label``, 8-connected in 2D; ``cc_torch`` likewise).
    """

    @staticmethod
    def generic_nms(ious, scores, iou_threshold, use_iou_matrix=True):
        iou = ious.float().cpu().numpy()
        order = np.argsort(-scores.float().cpu().numpy(), kind="stable")
        kept = []
        while order.size:
            i = int(order[0])
            kept.append(i)
            order = order[1:][iou[i, order[1:]] <= iou_threshold]
        return torch.tensor(kept, dtype=torch.int64, device=scores.device)

    @staticmethod
    def cc_2d(mask, get_counts=True):
        from scipy import ndimage

        planes = mask.cpu().numpy().astype(bool)
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


@contextmanager
def transformers_cv_utils(fallback: bool):
    """Run ``transformers``' SAM3 video model with :class:`CvUtilsFallback` (``True``) or, as it runs when its
    hub kernel does not load, without NMS and hole filling (``False``)."""
    import transformers.models.sam3_video.modeling_sam3_video as msv

    with mock.patch.object(msv, "cv_utils_kernel", CvUtilsFallback() if fallback else False):
        yield


@contextmanager
def meta_text_cls_in_video(video_model):
    """Make ``transformers``' video model detect text prompts with Meta's prompt sequence.

    ``Sam3VideoModel.run_detection`` calls its detector with the text alone; Meta's detector (image and
    video model alike) appends the geometry encoder's CLS token to a text-only prompt, which changes the
    scores and the masks (``medsam3.model.forward``'s module docstring; medsam3's image path restores it
    with ``predict_prompts(..., meta_text_cls=True)``). While active, the detector's text-only calls go
    through ``medsam3.model.forward._text_with_cls``, which appends it.
    """
    from medsam3.model.forward import _text_with_cls

    detector = video_model.detector_model
    plain = type(detector).forward

    class _Plain:
        geometry_encoder = detector.geometry_encoder

        def __call__(self, **kwargs):
            return plain(detector, **kwargs)

    def forward(*, vision_embeds, text_embeds, attention_mask, **kwargs):
        if kwargs.get("input_boxes") is not None or set(kwargs) - {"input_boxes", "input_boxes_labels"}:
            return plain(
                detector,
                vision_embeds=vision_embeds,
                text_embeds=text_embeds,
                attention_mask=attention_mask,
                **kwargs,
            )
        return _text_with_cls(_Plain(), vision_embeds, text_embeds, attention_mask)

    with mock.patch.object(detector, "forward", forward):
        yield


#: Meta's mask score for "certainly background" (``sam3.model.sam3_tracker_base.NO_OBJ_SCORE``).
NO_OBJ_SCORE = -1024.0


def meta_conditioning_masks(
    det_logits: torch.Tensor, hw: tuple[int, int], low_res: int, groups: list[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The masks Meta's video model conditions a new object's tracking on, from its detection logits.

    ``Sam3VideoBase._tracker_add_new_objects`` resizes the low-resolution logits ``(N, low, low)``
    bilinearly to the tracker's input-mask size ``4 low`` and thresholds them at 0; the tracker's
    ``add_new_mask`` then resizes that mask to the video size ``hw`` (bilinear, antialiased) and thresholds
    it at 0.5, and a later object added on the same frame (same prompt) takes its pixels from earlier
    ones. The object's stored low-resolution output is that video-size mask as -1024 / +1024, resized
    back to ``low`` (``_consolidate_temp_output_across_obj``); its memory is encoded from it.

    Returns ``(binary (N, H, W) bool, low-resolution scores (N, 1, low, low) float32)``.
    """
    size = 4 * low_res
    up = F.interpolate(
        det_logits.unsqueeze(1).float(), size=(size, size), mode="bilinear", align_corners=False
    )
    video = (
        F.interpolate((up > 0).float(), size=hw, mode="bilinear", align_corners=False, antialias=True) > 0.5
    )
    video = video[:, 0].clone()
    groups = groups if groups is not None else [0] * len(video)
    for i in range(len(video)):
        for j in range(i):
            if groups[j] == groups[i]:
                video[j] &= ~video[i]
    scores = torch.where(video, -NO_OBJ_SCORE, NO_OBJ_SCORE).unsqueeze(1)
    low = F.interpolate(scores, size=(low_res, low_res), mode="bilinear", align_corners=False, antialias=True)
    return video, low


@contextmanager
def meta_new_object_masks(video_model, hw: tuple[int, int], pointers: list | None = None):
    """Start ``transformers``' tracker on new objects the way Meta's video model does.

    Three differences of ``transformers`` 5.x (``Sam3VideoModel._tracker_add_new_objects`` and the tracker's
    ``_use_mask_as_output``) from Meta's model, for an object created from a detection:

    * the mask handed to the tracker: the low-resolution logits thresholded at 0.5, where Meta resizes
      them bilinearly to the tracker's input-mask size ``4 x low_res_mask_size`` (576 at 504 px) and
      thresholds at 0 (that mask decides whether the object appears, and gives its pointer);
    * the object's stored output (what the tracker returns for it on that frame, read again when V2 runs
      the frame a second time): Meta's is the mask at the *video* size, as +-1024 resized to the
      low-resolution grid (:func:`meta_conditioning_masks`), ``transformers``' the input mask at model
      resolution;
    * the object pointer: Meta runs the SAM decoder once on the 576 px mask downsampled 4x by the
      tracker's ``mask_downsample`` convolution, single-mask (``_forward_sam_heads(multimask_output=False)``:
      output token 0); ``transformers`` first resizes the mask to the input size (504), downsamples that,
      resizes it to the decoder's mask size, and decodes multi-mask (``_single_frame_forward``'s default
      ``multimask_output=True``: the token of the best predicted IoU), a different token.

    While active, all three are made Meta's. Not emulated: the memory encoded when the object is created
    (Meta: from the video-size mask, binarised, then resized; ``transformers``: resized, then binarised).
    V2's second run of a clip's first frame re-encodes that frame's memory the same way on both sides
    (``v2_prompted_frame_twice``), so it matters only for objects created on a later frame of a clip.
    ``pointers``, if given, receives ``(prompt, frame, object pointer)`` of every new object.
    """
    model_type = type(video_model)

    def add_new_objects(self, inference_session, frame_idx, new_obj_ids, new_obj_masks, reverse=False):
        low = int(self.low_res_mask_size)
        size = 4 * low
        groups = [inference_session.obj_id_to_prompt_id[i] for i in new_obj_ids]
        up = F.interpolate(
            new_obj_masks.unsqueeze(1).float(), size=(size, size), mode="bilinear", align_corners=False
        )
        inputs = (up > 0).to(new_obj_masks.dtype)  # (N, 1, 4 low, 4 low), Meta's tracker input
        _, low_scores = meta_conditioning_masks(new_obj_masks, hw, low, groups)
        for obj_id, mask in zip(new_obj_ids, inputs, strict=True):
            obj_idx = inference_session.obj_id_to_idx(obj_id)
            inference_session.add_mask_inputs(obj_idx, frame_idx, mask.unsqueeze(0))
        inference_session.obj_with_new_inputs = list(new_obj_ids)
        tracker = self.tracker_model
        tracker(
            inference_session=inference_session, frame_idx=frame_idx, reverse=reverse, run_mem_encoder=True
        )

        feats, _ = tracker._prepare_vision_features(inference_session, frame_idx, batch_size=1)
        sizes = tracker.backbone_feature_sizes
        high = [
            x.permute(1, 2, 0).view(x.size(1), x.size(2), *s)
            for x, s in zip(feats[:-1], sizes[:-1], strict=True)
        ]
        pix = feats[-1].permute(1, 2, 0).view(-1, tracker.hidden_dim, *sizes[-1])
        for k, (obj_id, scores) in enumerate(zip(new_obj_ids, low_scores, strict=True)):
            obj_idx = inference_session.obj_id_to_idx(obj_id)
            out = inference_session.output_dict_per_obj[obj_idx]["cond_frame_outputs"][frame_idx]
            out["pred_masks"] = scores.unsqueeze(0).to(out["pred_masks"].dtype)
            mask = inputs[k : k + 1].to(pix.dtype)
            pointer = tracker._single_frame_forward(
                input_masks=tracker.mask_downsample(mask),
                image_embeddings=[*high, pix],
                multimask_output=False,
            ).object_pointer
            if not bool(mask.any()):
                pointer = tracker.no_object_pointer.expand_as(pointer)
            out["object_pointer"] = pointer.reshape(out["object_pointer"].shape)
            if pointers is not None:
                text = inference_session.prompts[inference_session.obj_id_to_prompt_id[obj_id]]
                pointers.append((text, frame_idx, out["object_pointer"].detach().clone()))

    with mock.patch.object(model_type, "_tracker_add_new_objects", add_new_objects):
        yield


@contextmanager
def v2_prompted_frame_twice():
    """Run the first frame of each clip twice in medsam3's clips mode, as V2's recipe does on Meta's model.

    V2 calls ``add_prompt(frame_idx=s)`` - which runs the model on frame ``s`` (detections become new
    objects, conditioned on their masks) - and then ``propagate_in_video(start_frame_idx=s)``, which runs
    frame ``s`` again (the tracker returns its conditioning output for the objects, the detections match
    them, frame ``s``'s memory is re-encoded) before frames ``s + 1 ...``. V2 keeps the outputs of the
    second run. medsam3's ``clips_volume_prompts`` runs frame ``s`` once. While active, each clip's pass
    (``medsam3.predict.volume.clips._run_pass``) first runs the model on its first frame and drops that
    output.

    The second run of frame ``s`` (local index 0) is also a periodic reconditioning frame (``0 % 16 == 0``).
    In Meta's model that re-adds each matched object's detection mask to the tracker - the detection
    that created the object a moment before, so the same mask - and leaves the frame's output and memory
    to the tracker's masks. ``transformers`` instead outputs the detection mask for a reconditioned object
    and encodes its memory from it (thresholded at 0.5). So the second run is made without
    reconditioning; no other frame of a clip shorter than 17 slices is a reconditioning frame.
    """
    import medsam3.predict.volume.clips as clips

    original = clips._run_pass

    def run_pass(video_model, processor, session, order, **kwargs):
        video_model(inference_session=session, frame_idx=order[0], reverse=kwargs["reverse"])
        every = video_model.recondition_every_nth_frame
        if len(order) > every > 0:
            raise AssertionError(f"a clip of {len(order)} frames reaches a reconditioning frame")
        video_model.recondition_every_nth_frame = 0
        try:
            return original(video_model, processor, session, order, **kwargs)
        finally:
            video_model.recondition_every_nth_frame = every

    with mock.patch.object(clips, "_run_pass", run_pass):
        yield


# --------------------------------------------------------------------------------------------------
# V2's recipe on Meta's model


@dataclass
class FrameOutput:
    """One frame of one prompt, as V2 reads it from Meta's model."""

    obj_ids: list[int]
    binary: np.ndarray  # (H, W) bool: union of the post-processed masks
    prob: np.ndarray  # (H, W) float32: max over kept objects of sigmoid(logits), 0 without objects
    det_score: float  # max detection score of the kept objects (0 without)
    tracker_score: float  # max tracker score of the kept objects (0 without)
    per_object: dict[int, np.ndarray] = field(default_factory=dict)  # obj id -> (H, W) bool


class LogitTap:
    """Records, per frame, the pre-threshold mask logits of every object Meta's output builder returns.

    ``Sam3VideoBase.build_outputs`` thresholds three sources at 0 after a bilinear resize to the original
    size: the tracker's low-resolution logits of existing objects, the detector's logits of new objects
    (after Meta's hole filling), and detector logits that replace reconditioned objects. The tap wraps
    the method, recomputes the same logits from its arguments (the same calls, so the same values) and
    checks that thresholding them gives exactly the binary masks Meta returns.
    """

    def __init__(self, model):
        self.model = model
        self.logits: dict[int, dict[int, torch.Tensor]] = {}
        self._original = type(model).build_outputs

    def __enter__(self):
        from sam3.model.sam3_tracker_utils import fill_holes_in_mask_scores

        original = self._original
        tap = self

        def build_outputs(model_self, **kw):
            masks = original(model_self, **kw)
            size = (kw["orig_vid_height"], kw["orig_vid_width"])
            plan = kw["tracker_update_plan"]
            logits = {}
            existing = F.interpolate(
                kw["tracker_low_res_masks_global"].unsqueeze(1),
                size=size,
                mode="bilinear",
                align_corners=False,
            )
            for obj_id, logit in zip(kw["tracker_metadata_prev"]["obj_ids_all_gpu"], existing, strict=True):
                logits[int(obj_id)] = logit
            det = kw["det_out"]["mask"][torch.from_numpy(plan["new_det_fa_inds"])].unsqueeze(1)
            det = fill_holes_in_mask_scores(
                det, max_area=model_self.fill_hole_area, fill_holes=True, remove_sprinkles=True
            )
            det = F.interpolate(det, size=size, mode="bilinear", align_corners=False)
            for obj_id, logit in zip(plan["new_det_obj_ids"], det, strict=True):
                logits[int(obj_id)] = logit
            for obj_id in kw.get("reconditioned_obj_ids") or ():
                idx = plan.get("trk_id_to_max_iou_high_conf_det", {}).get(obj_id)
                if idx is not None:
                    one = kw["det_out"]["mask"][idx][None, None].float()
                    logits[int(obj_id)] = F.interpolate(one, size=size, mode="bilinear", align_corners=False)[
                        0
                    ]
            for obj_id, mask in masks.items():
                if not torch.equal(logits[int(obj_id)] > 0, mask):
                    raise AssertionError(f"logit tap disagrees with Meta's mask of object {obj_id}")
            tap.logits[int(kw["frame_idx"])] = logits
            return masks

        self._patch = mock.patch.object(type(self.model), "build_outputs", build_outputs)
        self._patch.start()
        return self

    def __exit__(self, *exc):
        self._patch.stop()


@contextmanager
def empty_batch_connected_components():
    """Meta's CPU connected components (``sam3.perflib.connected_components.connected_components_cpu``,
    used by its hole filling) stacks an empty list when a frame has no new detection and fails; on a GPU
    ``cc_torch`` returns empty tensors. While active, an empty batch gets empty results the same way."""
    import sam3.perflib.connected_components as cc

    original = cc.connected_components_cpu

    def connected_components_cpu(input_tensor):
        if input_tensor.shape[0] == 0:
            return torch.zeros_like(input_tensor, dtype=torch.int64), torch.zeros_like(
                input_tensor, dtype=torch.int64
            )
        return original(input_tensor)

    with mock.patch.object(cc, "connected_components_cpu", connected_components_cpu):
        yield


@torch.inference_mode()
def meta_volume_state(model, pil_frames, pixels: torch.Tensor | None) -> dict:
    """Meta's inference state over all slices (as V2 makes it, once per volume); its images replaced by
    ``pixels`` (``(Z, 3, s, s)`` float32, what medsam3 feeds its model) if given.

    ``init_state`` reads the original size ``(H, W)`` from the PIL frames and loads them with Meta's own
    resize (kept in ``state["meta_pixels"]``, float32, for :func:`loader_difference`).
    """
    with MetaVideoOnCpu():
        state = model.init_state(resource_path=list(pil_frames), offload_video_to_cpu=True)
    batch = state["input_batch"]
    state["meta_pixels"] = batch.img_batch.float().clone()
    if pixels is not None:
        assert tuple(batch.img_batch.shape) == tuple(pixels.shape), (batch.img_batch.shape, pixels.shape)
        batch.img_batch = pixels.to(torch.float32).contiguous()
    return state


@torch.inference_mode()
def meta_v2_volume(
    model, state, text: str, clip_length: int, *, bf16: str = "off"
) -> tuple[dict[int, FrameOutput], dict[int, dict[int, torch.Tensor]]]:
    """V2's recipe for one prompt over all slices of ``state`` (``docs/V2_3D.md`` section 1).

    Per clip ``[s, e)``: ``add_prompt(frame_idx=s, text_str=text)`` (which resets the state: nothing is
    carried between clips), then ``propagate_in_video(start_frame_idx=s, max_frame_num_to_track=e-s-1)``
    forward; the outputs of the propagation are kept. Per frame: the union of Meta's post-processed
    masks, the probability map (max over the kept objects of sigmoid of the logits :class:`LogitTap`
    records, before Meta's non-overlap step), the best detection score (``out_probs``) and the best
    tracker score of the kept objects.

    Returns the frame outputs by slice, and per clip start ``s`` the object pointers the tracker stored
    for the objects created on ``s`` (obj id -> ``(1, 256)``).
    """
    depth = state["num_frames"]
    hw = (state["orig_height"], state["orig_width"])
    out: dict[int, FrameOutput] = {}
    pointers: dict[int, dict[int, torch.Tensor]] = {}
    with MetaVideoOnCpu(bf16), empty_batch_connected_components(), LogitTap(model) as tap:
        for first in range(0, depth, clip_length):
            stop = min(depth, first + clip_length)
            model.add_prompt(inference_state=state, frame_idx=first, text_str=text)
            for frame, post in model.propagate_in_video(
                state, start_frame_idx=first, max_frame_num_to_track=stop - first - 1, reverse=False
            ):
                frame = int(frame)
                assert first <= frame < stop and frame not in out, (first, stop, frame)
                ids = [int(i) for i in post["out_obj_ids"]]
                masks = np.asarray(post["out_binary_masks"], dtype=bool)
                prob = np.zeros(hw, np.float32)
                if ids:
                    logits = torch.cat([tap.logits[frame][i] for i in ids], dim=0)
                    prob = torch.sigmoid(logits).amax(dim=0).float().numpy()
                trk = state["tracker_metadata"]["obj_id_to_tracker_score_frame_wise"][frame]
                out[frame] = FrameOutput(
                    obj_ids=ids,
                    binary=masks.any(axis=0) if ids else np.zeros(hw, bool),
                    prob=prob,
                    det_score=max([0.0, *(float(v) for v in post["out_probs"])]),
                    tracker_score=max([0.0, *(float(trk.get(i, 0.0)) for i in ids)]),
                    per_object={i: masks[k] for k, i in enumerate(ids)},
                )
            pointers[first] = {
                int(obj_id): ts["output_dict_per_obj"][k]["cond_frame_outputs"][first]["obj_ptr"].clone()
                for ts in state["tracker_inference_states"]
                for k, obj_id in enumerate(ts["obj_ids"])
                if first in ts["output_dict_per_obj"][k]["cond_frame_outputs"]
            }
    assert sorted(out) == list(range(depth)), sorted(out)
    return out, pointers


def loader_difference(state: dict, pixels: torch.Tensor) -> dict[str, float]:
    """How Meta's own frame loading (PIL default filter = bicubic, float16) differs from medsam3's
    (antialiased bilinear, float32), in normalised pixel units (the range is [-1, 1])."""
    diff = (state["meta_pixels"] - pixels.float()).abs()
    return {"max": float(diff.max()), "mean": float(diff.mean())}
