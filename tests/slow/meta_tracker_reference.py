"""Meta's SAM3 interactive tracker (PyPI package ``sam3``) as a CPU reference for the conversion tests.

Test-only helpers: build Meta's image model *with* its instance-interactivity head (the SAM-style tracker
that takes point and box prompts, ``enable_inst_interactivity=True``) at full size with seeded random
weights on a CPU, save it in the key layout of Meta's ``sam3.pt`` (``detector.*`` + ``tracker.*``), and
run Meta's own single-image interactive prediction (``Sam3Processor.set_image`` then
``Sam3Image.predict_inst``, which drives ``SAM3InteractiveImagePredictor``).

That model holds exactly the weights of ``sam3.pt``: the image model's keys (with the tracker's FPN neck
``backbone.vision_backbone.sam2_convs``) become ``detector.<key>`` and the tracker's keys
(``inst_interactive_predictor.model.<key>``) become ``tracker.<key>``, the renaming Meta's own loader
undoes (``sam3.model_builder._load_checkpoint``).

Frames and shapes: the input image is ``(1008, 1008, 3)`` uint8 RGB, so Meta's original frame and its
model frame coincide. Prompts are in Meta's pixel-index frame of that image: a point ``(x, y)`` names
pixel column ``x`` and row ``y`` (Meta's prompt encoder adds 0.5 to reach the pixel centre), a box is
``(x0, y0, x1, y1)`` in the same frame. Outputs are at the low resolution of the mask decoder:
``(1, M, 288, 288)`` mask logits (stride 3.5 on the 1008 input), ``(1, M)`` IoU predictions (sigmoid
outputs) and ``(1, 1)`` object-score logits, where ``M = 3`` with ``multimask_output=True`` and 1
otherwise.
"""

from __future__ import annotations

import numpy as np
import torch

from .meta_reference import CudaToCpu, build_meta_image_model

#: Where the tracker sits inside Meta's image model, and its prefix in ``sam3.pt``.
TRACKER_MODULE = "inst_interactive_predictor.model."


def build_meta_interactive_model(seed: int = 0) -> torch.nn.Module:
    """Meta's full-size SAM3 image model with its interactive tracker; random weights, CPU, float32, eval.

    ``torch.manual_seed(seed)`` precedes the build; :func:`meta_reference.randomize_parameters_` then gives
    every parameter (detector and tracker) distinct values. The tracker is
    ``model.inst_interactive_predictor.model`` (a ``Sam3TrackerPredictor``, 11.7 M parameters); the vision
    backbone is shared, with a second FPN neck (``sam2_convs``) for the tracker.
    """
    return build_meta_image_model(seed, interactive=True)


def sam3_pt_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict under the keys of Meta's ``sam3.pt`` (``detector.*`` and ``tracker.*``)."""
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith(TRACKER_MODULE):
            out["tracker." + key[len(TRACKER_MODULE) :]] = value
        else:
            out["detector." + key] = value
    return out


def save_sam3_pt(model: torch.nn.Module, path) -> dict[str, int]:
    """Save ``model`` as ``sam3.pt`` is stored (a bare state dict); returns the key counts per part."""
    state = sam3_pt_state_dict(model)
    torch.save(state, path)
    return {
        "detector": sum(k.startswith("detector.") for k in state),
        "tracker": sum(k.startswith("tracker.") for k in state),
    }


@torch.inference_mode()
def meta_set_image(model: torch.nn.Module, image: np.ndarray) -> dict:
    """Meta's ``Sam3Processor.set_image`` on a ``(H, W, 3)`` uint8 RGB image: the inference state.

    The state's ``backbone_out["sam2_backbone_out"]["backbone_fpn"]`` holds the tracker's three feature
    maps, ``(1, 256, 288, 288)``, ``(1, 256, 144, 144)``, ``(1, 256, 72, 72)``, of which Meta's processor
    already projects the first two with the mask decoder's ``conv_s0`` / ``conv_s1`` (to 32 and 64
    channels). The image goes in as a PIL image (Meta reads the original size from it).
    """
    from PIL import Image
    from sam3.model.sam3_image_processor import Sam3Processor

    processor = Sam3Processor(model, resolution=image.shape[0], device="cpu")
    with CudaToCpu():
        return processor.set_image(Image.fromarray(image))


def meta_tracker_features(model: torch.nn.Module, state: dict) -> list[torch.Tensor]:
    """The three maps Meta's predictor hands the mask decoder, in ``Sam3TrackerModel``'s layout.

    ``[(1, 32, 288, 288), (1, 64, 144, 144), (1, 256, 72, 72)]``: the high-resolution maps after
    ``conv_s0`` / ``conv_s1`` and the lowest-resolution map plus the tracker's ``no_mem_embed`` (what
    ``Sam3Image.predict_inst`` builds before calling the predictor).
    """
    fpn = state["backbone_out"]["sam2_backbone_out"]["backbone_fpn"]
    no_mem = model.inst_interactive_predictor.model.no_mem_embed.detach().reshape(1, -1, 1, 1)
    return [fpn[0].detach().clone(), fpn[1].detach().clone(), (fpn[2] + no_mem).detach().clone()]


def meta_predict_inst(
    model: torch.nn.Module,
    state: dict,
    point_xy: tuple[float, float] | None = None,
    point_label: int = 1,
    box_xyxy: tuple[float, float, float, float] | None = None,
    multimask_output: bool = True,
) -> dict[str, torch.Tensor]:
    """Meta's interactive prediction on one image: ``model.predict_inst(state, ...)``.

    Args:
        point_xy: one point ``(x, y)`` in Meta's pixel-index frame of the input image, or None.
        point_label: 1 (positive) or 0 (negative).
        box_xyxy: one box ``(x0, y0, x1, y1)`` in the same frame, or None.
        multimask_output: Meta's flag: 3 masks (tokens 1..3) when True; else one mask chosen by the
            decoder (``dynamic_multimask_via_stability``: token 0, or the best of 1..3 when token 0's
            mask is unstable).

    Returns float32 tensors, captured from the modules Meta's predictor calls (forward hooks, nothing is
    patched):

    * ``pred_masks (1, M, 288, 288)``: the mask decoder's low-resolution logits, unclamped;
    * ``iou_scores (1, M)``, ``object_score_logits (1, 1)``: the decoder's other outputs;
    * ``low_res_masks (M, 288, 288)``: what ``predict_inst`` returns (the same logits clamped to
      [-32, 32]);
    * ``predict_iou (M,)``: the IoU scores ``predict_inst`` returns;
    * ``sparse_embeddings (1, N, 256)``: the prompt encoder's tokens, boxes first (corner labels 2, 3),
      then points, then one padding token (label -1); ``dense_embeddings (1, 256, 72, 72)``;
    * ``image_pe (1, 256, 72, 72)``: the dense positional encoding the decoder gets.
    """
    tracker = model.inst_interactive_predictor.model
    captured: dict[str, torch.Tensor] = {}

    def on_prompt(_module, _args, _kwargs, output):
        captured["sparse_embeddings"], captured["dense_embeddings"] = output

    def on_decoder(_module, _args, kwargs, output):
        captured["pred_masks"], captured["iou_scores"], _, captured["object_score_logits"] = output
        captured["image_pe"] = kwargs["image_pe"]

    kwargs = {"multimask_output": multimask_output, "return_logits": True, "normalize_coords": True}
    if point_xy is not None:
        kwargs["point_coords"] = np.asarray([point_xy], dtype=np.float32)
        kwargs["point_labels"] = np.asarray([point_label], dtype=np.int32)
    if box_xyxy is not None:
        kwargs["box"] = np.asarray(box_xyxy, dtype=np.float32)
    hooks = [
        tracker.sam_prompt_encoder.register_forward_hook(on_prompt, with_kwargs=True),
        tracker.sam_mask_decoder.register_forward_hook(on_decoder, with_kwargs=True),
    ]
    try:
        with torch.inference_mode(), CudaToCpu():
            _masks, iou, low_res = model.predict_inst(state, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    result = {
        **captured,
        "low_res_masks": torch.from_numpy(np.array(low_res)),
        "predict_iou": torch.from_numpy(np.array(iou)),
    }
    return {k: v.detach().clone().float() for k, v in result.items()}
