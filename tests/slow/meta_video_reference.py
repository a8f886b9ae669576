"""Meta's SAM3 video model (PyPI package ``sam3``) run as Medical SAM3 V2 runs it, as a CPU reference.

Test-only helpers for ``test_meta_v2_clips.py``: build Meta's full-size video model
(``sam3.model_builder.build_sam3_video_model``, detector + tracker) at V2's input size with seeded random
weights on a CPU, save it as a V2 trainer checkpoint, drive it with V2's 3D recipe (``docs/V2_3D.md``
section 1, written from that specification: :func:`meta_v2_volume`).

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

Where ``transformers``' video model differs from Meta's model under V2's recipe (found with this
reference; medsam3 runs the video model as Meta's, :mod:`medsam3.model.video_meta`): no NMS and no hole
filling without the hub kernel ``kernels-community/cv-utils`` (:func:`transformers_cv_utils` measures
it), the text alone in the video detector, new objects started from other masks and pointers; and V2
runs each clip's first frame twice (``add_prompt`` then ``propagate_in_video`` from it).
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
# transformers with and without NMS / hole filling


@contextmanager
def transformers_cv_utils(fallback: bool):
    """Run ``transformers``' SAM3 video model with medsam3's :class:`~medsam3.model.video_meta.PlainCvUtils`
    (``True``) or, as it runs when its hub kernel does not load, without NMS and hole filling (``False``)."""
    import transformers.models.sam3_video.modeling_sam3_video as msv

    from medsam3.model.video_meta import PlainCvUtils

    with mock.patch.object(msv, "cv_utils_kernel", PlainCvUtils() if fallback else False):
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
