"""The model a training run optimises: the ``Sam3Model`` to train (:func:`build_model`) and the training
forward around it (:class:`Sam3TrainModule`), shared by the loop (:mod:`medsam3.train.loop`) and the export
of trained models (:mod:`medsam3.train.checkpoint`).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import Sam3Model

from medsam3.errors import InputError, ModelError
from medsam3.model.forward import encode_image, predict_prompts
from medsam3.model.input_size import input_size
from medsam3.train.config import TrainConfig
from medsam3.train.decoder_layers import record_decoder_layers

if TYPE_CHECKING:
    from transformers import Sam3Processor

_OUTPUT_FIELDS = ("pred_logits", "pred_boxes", "pred_masks", "presence_logits", "semantic_seg")


class Sam3TrainModule(nn.Module):
    """``Sam3Model`` forward for training and validation: images, prompts -> outputs (+ per-layer outputs).

    ``forward(pixel_values (B, 3, S, S), input_ids (B, 32), attention_mask (B, 32), boxes (B, 1, 4) | None,
    box_labels (B, 1) | None)`` runs the image encoder and :func:`~medsam3.model.forward.predict_prompts`
    (the path of ``medsam3 segment``, Meta's text-only sequence when ``meta_text_cls``) and returns a dict
    with ``pred_logits (B, Q)``, ``pred_boxes (B, Q, 4)`` xyxy, ``pred_masks (B, Q, h, w)``,
    ``presence_logits (B, 1)``, ``semantic_seg (B, 1, h, w)`` and, with ``aux``, ``aux_outputs``.
    """

    def __init__(self, sam3: Sam3Model, meta_text_cls: bool = True, aux: bool = True):
        super().__init__()
        self.sam3 = sam3
        self.meta_text_cls = meta_text_cls
        self.aux = aux

    def forward(self, pixel_values, input_ids, attention_mask, boxes=None, box_labels=None) -> dict[str, Any]:
        recorder = record_decoder_layers(self.sam3) if self.aux else contextlib.nullcontext()
        with recorder as layers:
            vision = encode_image(self.sam3, pixel_values)
            out = predict_prompts(
                self.sam3,
                vision,
                input_ids=input_ids,
                attention_mask=attention_mask,
                boxes=boxes,
                box_labels=box_labels,
                meta_text_cls=self.meta_text_cls,
            )
        result = {k: getattr(out, k) for k in _OUTPUT_FIELDS if getattr(out, k, None) is not None}
        if layers is not None:  # recorded when self.aux
            result["aux_outputs"] = layers.aux_outputs()
        return result


def enable_activation_checkpointing(sam3: nn.Module) -> int:
    """Recompute the ViT and text-encoder layers in the backward pass; returns how many layers.

    ``Sam3Model`` does not declare activation checkpointing as a whole (``gradient_checkpointing_enable``
    refuses it), but its ViT layers and CLIP encoder layers are transformers ``GradientCheckpointingLayer``
    modules; they are switched on here the way ``PreTrainedModel`` does it (non-reentrant
    ``torch.utils.checkpoint``).
    """
    from functools import partial

    from torch.utils.checkpoint import checkpoint
    from transformers.modeling_layers import GradientCheckpointingLayer

    func = partial(checkpoint, use_reentrant=False)
    count = 0
    for name, module in sam3.named_modules():
        if isinstance(module, GradientCheckpointingLayer) and name.startswith(
            ("vision_encoder.backbone.", "text_encoder.")
        ):
            # set as PreTrainedModel does; the layer class does not declare the attribute
            module._gradient_checkpointing_func = func  # type: ignore[assignment]
            module.gradient_checkpointing = True
            count += 1
    return count


def training_input_size(model: nn.Module) -> int:
    """Square input side of the model being trained (``Sam3Model`` or ``Sam3VideoModel``)."""
    if hasattr(model, "detector_model"):
        from medsam3.model.video import video_input_size

        return video_input_size(model)
    return input_size(model)


def _apply_mode(model: nn.Module, cfg: TrainConfig) -> None:
    """Frozen parts or LoRA adapters, activation checkpointing and dropout of ``cfg`` on ``model``."""
    from medsam3.train.lora import apply_lora
    from medsam3.train.optim import freeze_for_mode

    model.train()
    if cfg.mode == "lora":
        apply_lora(model, cfg.lora)
    else:
        freeze_for_mode(model, cfg.mode)
    if cfg.model.activation_checkpointing:
        enable_activation_checkpointing(getattr(model, "detector_model", model))
    if cfg.model.dropout is not None:
        for name, module in model.named_modules():
            if isinstance(module, nn.Dropout):
                module.p = cfg.model.dropout
            elif name.startswith("tracker_model.") and isinstance(getattr(module, "dropout_p", None), float):
                module.dropout_p = cfg.model.dropout  # the memory attention's attention-probability dropout


def build_video_model(cfg: TrainConfig) -> tuple[Any, Any]:
    """The ``Sam3VideoModel`` to train (``model.kind: video``; mode applied) and its ``Sam3VideoProcessor``.

    ``tiny`` / ``small``: random weights, the detector of :func:`~medsam3.model.configs.tiny_sam3_config` /
    :func:`~medsam3.model.configs.small_sam3_config` (``model.size``) with a tracker fitted to it
    (:func:`~medsam3.model.configs.sam3_video_config`; FPN width 128 or more), V2's inference settings with
    ``clips.v2_settings``. Otherwise a video-model folder (``load_sam3_video``). ``clips.video_settings``
    are set on either (config and model), so validation and the export use them.
    """
    from transformers import Sam3VideoModel

    from medsam3.model.configs import (
        apply_v2_settings,
        sam3_video_config,
        small_sam3_config,
        tiny_sam3_config,
    )
    from medsam3.model.loading import build_processor
    from medsam3.model.video import load_sam3_video

    source = cfg.model.source
    if source in ("tiny", "small"):
        try:
            detector = (tiny_sam3_config if source == "tiny" else small_sam3_config)(**cfg.model.size)
            config = sam3_video_config(detector, memory_attention_layers=1 if source == "tiny" else 4)
        except (TypeError, ValueError) as exc:
            raise InputError(None, f"config: model.size {cfg.model.size}: {exc}") from None
        if cfg.clips.v2_settings:
            apply_v2_settings(config)
        for key, value in cfg.clips.video_settings.items():
            setattr(config, key, value)
        torch.manual_seed(cfg.seed)
        try:
            video = Sam3VideoModel(config)
        except (RuntimeError, ValueError) as exc:
            raise InputError(
                None, f"config: model.size {cfg.model.size} gives no valid video model ({exc})"
            ) from None
        processor = build_processor(config, video=True)
    else:
        if cfg.model.size:
            raise InputError(None, "config: model.size applies to model.source tiny / small only")
        loaded = load_sam3_video(source, device="cpu", dtype="fp32")
        video, processor = loaded.model, loaded.processor
        for key, value in cfg.clips.video_settings.items():  # the model reads its copies of the config's
            setattr(video.config, key, value)
            setattr(video, key, value)
    if cfg.model.image_size is not None and cfg.model.image_size != training_input_size(video):
        raise InputError(
            None, "config: model.image_size cannot change a video model's input size (train at its own)"
        )
    _apply_mode(video, cfg)
    return video, processor


def build_model(cfg: TrainConfig) -> tuple[Any, Any]:
    """The model to train (mode applied: frozen parts, LoRA adapters) and its processor: a ``Sam3Model`` and
    ``Sam3Processor``, or with ``model.kind: video`` a ``Sam3VideoModel`` and ``Sam3VideoProcessor``."""
    if cfg.model.kind == "video":
        return build_video_model(cfg)
    return build_image_model(cfg)


def build_image_model(cfg: TrainConfig) -> tuple[Sam3Model, Sam3Processor]:
    """The ``Sam3Model`` to train (mode applied: frozen parts, LoRA adapters) and its processor."""
    from medsam3.model.configs import small_sam3_config, tiny_sam3_config, vit_sizes
    from medsam3.model.input_size import resize_processor, resize_sam3_input
    from medsam3.model.loading import build_processor, load_sam3

    source = cfg.model.source
    if source in ("tiny", "small"):
        try:
            config = (tiny_sam3_config if source == "tiny" else small_sam3_config)(**cfg.model.size)
        except (TypeError, ValueError) as exc:
            raise InputError(None, f"config: model.size {cfg.model.size}: {exc}") from None
        torch.manual_seed(cfg.seed)
        sam3, processor = Sam3Model(config), build_processor(config)
    else:
        if cfg.model.size:
            raise InputError(None, "config: model.size applies to model.source tiny / small only")
        loaded = load_sam3(source, device="cpu", dtype="fp32")
        sam3, processor = loaded.model, loaded.processor
    if cfg.model.image_size is not None and cfg.model.image_size != input_size(sam3):
        try:
            sam3 = resize_sam3_input(sam3, cfg.model.image_size)
        except ModelError as exc:
            raise InputError(None, f"config: model.image_size: {exc}") from None
        resize_processor(processor, cfg.model.image_size, int(vit_sizes(sam3.config)[1]))
    _apply_mode(sam3, cfg)
    return sam3, processor
