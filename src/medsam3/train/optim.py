"""Optimizer and learning-rate schedule of the SAM3 / Medical SAM3 recipe, for transformers ``Sam3Model``.

Parameter groups
----------------
Every trainable parameter belongs to exactly one component, found from its name (the ``Sam3Model``
attribute it lives under):

==================  ========================================================  ==========================
component           ``Sam3Model`` attributes                                   learning rate
==================  ========================================================  ==========================
``decoder``         ``detr_decoder``, ``mask_decoder``, ``dot_product_scoring``  ``lr_decoder`` (3e-4)
``vision``          ``vision_encoder`` (ViT and FPN neck)                      ``lr_vision`` (5e-5) x LLRD
``text``            ``text_encoder``, ``text_projection``                      ``lr_text`` (5e-5)
``geometry``        ``geometry_encoder``                                       ``lr_geometry`` (1e-4)
``fusion_encoder``  ``detr_encoder``                                           ``lr_fusion_encoder`` (1e-5)
==================  ========================================================  ==========================

A parameter under any other attribute is an error, so that a new module never trains at a silent default.

The video model (``Sam3VideoModel``): its detector's parameters (``detector_model.<attribute>``) take the
groups above; the tracker (``tracker_model.*``: memory attention, memory encoder, prompt encoder, SAM mask
decoder, object pointers and embeddings) is the ``tracker`` component at ``lr_tracker`` (3e-4); the
tracker's FPN neck on the shared ViT (``tracker_neck.*``) is a vision part outside the ViT blocks, like the
detector's neck (``lr_vision``, no layer decay).

Layer-wise learning-rate decay (LLRD, SAM3's ``layer_decay_param_modifier`` with its ViT ``get_layer_id``):
with ``L`` ViT blocks and decay ``d``, block ``i`` (0-based, ``vision_encoder.backbone.layers.i``) trains at
``lr_vision * d ** (L - i)``, so the deepest block gets ``d`` and the first ``d ** L``; the patch and
position embeddings (``vision_encoder.backbone.embeddings``) get ``d ** (L + 1)``; every other vision
parameter (the layer norm before the blocks, the FPN neck) gets ``d ** 0 = 1``.

Weight decay (SAM3's configuration): ``weight_decay`` for every parameter except biases (names ending in
``bias``) and the parameters of ``torch.nn.LayerNorm`` modules, which get 0.

Schedule
--------
:func:`lr_factor` multiplies every group's learning rate; for the ``n``-th optimizer update (1-based) with
warm-up ``W``, timescale ``T``, cool-down ``C`` and ``N`` updates in all (Meta's
``InverseSquareRootParamScheduler``)::

    factor(n) = min(1, n / W)                           (linear warm-up; 1 when W = 0)
              * sqrt(T / (n - W + T))   if n > W        (inverse square root decay)
              * min(1, (N - n + 1) / C) if C > 0        (linear cool-down over the last C updates)
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from medsam3.model.configs import vit_config
from medsam3.train.config import OptimSection

if TYPE_CHECKING:
    from transformers import Sam3Model

COMPONENTS = ("decoder", "vision", "text", "geometry", "fusion_encoder", "tracker")
#: Prefix of the detector's parameters inside a ``Sam3VideoModel``.
DETECTOR_PREFIX = "detector_model."

_COMPONENT_OF_ATTRIBUTE = {
    "detr_decoder": "decoder",
    "mask_decoder": "decoder",
    "dot_product_scoring": "decoder",
    "vision_encoder": "vision",
    "text_encoder": "text",
    "text_projection": "text",
    "geometry_encoder": "geometry",
    "detr_encoder": "fusion_encoder",
}

_VIT_BLOCK = re.compile(r"^vision_encoder\.backbone\.layers\.(\d+)\.")
_VIT_STEM = "vision_encoder.backbone.embeddings."


def component_of(name: str) -> str:
    """Component (see the module docstring) of a ``Sam3Model`` or ``Sam3VideoModel`` parameter name."""
    if name.startswith("tracker_model."):
        return "tracker"
    if name.startswith("tracker_neck."):
        return "vision"
    top = name.removeprefix(DETECTOR_PREFIX).split(".", 1)[0]
    if top not in _COMPONENT_OF_ATTRIBUTE:
        raise ValueError(f"parameter {name!r} belongs to no known SAM3 component ({', '.join(COMPONENTS)})")
    return _COMPONENT_OF_ATTRIBUTE[top]


def num_vit_blocks(model: Sam3Model) -> int:
    """Number of ViT blocks of a ``Sam3Model`` (or of a ``Sam3VideoModel``'s detector)."""
    config = getattr(model.config, "detector_config", None) or model.config
    return int(vit_config(config).num_hidden_layers)


def vision_layer_id(name: str, num_blocks: int) -> int:
    """SAM3's ViT layer id: 0 for the embeddings, ``i + 1`` for block ``i``, ``L + 1`` for the rest."""
    name = name.removeprefix(DETECTOR_PREFIX)
    if name.startswith(_VIT_STEM):
        return 0
    match = _VIT_BLOCK.match(name)
    if match:
        return int(match.group(1)) + 1
    return num_blocks + 1


def layer_decay_scale(name: str, num_blocks: int, decay: float) -> float:
    """LLRD multiplier ``decay ** (L + 1 - layer_id)`` of a vision parameter (1 outside the vision part)."""
    if component_of(name) != "vision":
        return 1.0
    return decay ** (num_blocks + 1 - vision_layer_id(name, num_blocks))


def _no_weight_decay_names(model: nn.Module) -> set[str]:
    names = set()
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            if param_name.endswith("bias") or isinstance(module, nn.LayerNorm):
                names.add(full)
    return names


@dataclass
class ParamGroup:
    """One optimizer parameter group: a component (and ViT layer), with or without weight decay."""

    name: str
    component: str
    lr: float
    scale: float
    weight_decay: float
    param_names: list[str] = field(default_factory=list)
    params: list[nn.Parameter] = field(default_factory=list)


def _group_label(component: str, name: str, num_blocks: int) -> str:
    if component != "vision":
        return component
    layer = vision_layer_id(name, num_blocks)
    if layer == 0:
        return "vision.embeddings"
    if layer <= num_blocks:
        return f"vision.block{layer - 1:02d}"
    return "vision.other"


def parameter_groups(model: Sam3Model, cfg: OptimSection) -> list[ParamGroup]:
    """Trainable parameters of a ``Sam3Model`` (optionally with LoRA adapters) in their groups.

    Frozen parameters (``requires_grad=False``) are left out. Groups are in the order their first
    parameter appears in ``model.named_parameters()``; names are ``<component>[.<vit layer>][.no_decay]``.
    """
    base_lr = {
        "decoder": cfg.lr_decoder,
        "vision": cfg.lr_vision,
        "text": cfg.lr_text,
        "geometry": cfg.lr_geometry,
        "fusion_encoder": cfg.lr_fusion_encoder,
        "tracker": cfg.lr_tracker,
    }
    blocks = num_vit_blocks(model)
    no_decay = _no_weight_decay_names(model)
    groups: dict[str, ParamGroup] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        component = component_of(name)
        scale = layer_decay_scale(name, blocks, cfg.layer_decay)
        decay = 0.0 if name in no_decay else cfg.weight_decay
        label = _group_label(component, name, blocks) + (".no_decay" if decay == 0.0 else "")
        group = groups.get(label)
        if group is None:
            group = groups[label] = ParamGroup(label, component, base_lr[component] * scale, scale, decay)
        group.param_names.append(name)
        group.params.append(param)
    return list(groups.values())


def build_optimizer(
    groups: Iterable[ParamGroup], cfg: OptimSection, device_type: str | None = None
) -> torch.optim.AdamW:
    """AdamW over ``groups`` (betas, eps, fused kernel from ``cfg``); each torch group keeps its ``name``.

    ``device_type`` is where the parameters will train (default: where they are now); the fused kernel is
    used on ``cpu`` and ``cuda`` only.
    """
    torch_groups: list[dict[str, Any]] = [
        {"params": g.params, "lr": g.lr, "weight_decay": g.weight_decay, "name": g.name}
        for g in groups
        if g.params
    ]
    if not torch_groups:
        raise ValueError("no trainable parameters")
    devices = {device_type} if device_type else {p.device.type for g in torch_groups for p in g["params"]}
    fused = cfg.fused and devices <= {"cpu", "cuda"}
    beta1, beta2 = cfg.betas  # two numbers (checked by the configuration)
    return torch.optim.AdamW(torch_groups, betas=(beta1, beta2), eps=cfg.eps, fused=fused or None)


def lr_factor(n: int, warmup: int, timescale: int, cooldown: int = 0, total: int | None = None) -> float:
    """Learning-rate multiplier of the ``n``-th update (1-based); see the module docstring."""
    if n < 1:
        raise ValueError(f"update index starts at 1, got {n}")
    factor = min(1.0, n / warmup) if warmup > 0 else 1.0
    if n > warmup:
        factor *= math.sqrt(timescale / (n - warmup + timescale))
    if cooldown > 0 and total is not None:
        factor *= min(1.0, max(0.0, (total - n + 1) / cooldown))
    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimSection, total_steps: int):
    """``LambdaLR`` applying :func:`lr_factor`; call ``step()`` once after every optimizer update."""

    def factor(done: int) -> float:
        return lr_factor(done + 1, cfg.warmup_steps, cfg.timescale, cfg.cooldown_steps, total_steps)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def freeze_for_mode(model: nn.Module, mode: str) -> None:
    """Set ``requires_grad`` for ``full`` (everything) or ``decoder`` (vision and text encoders frozen).

    ``decoder`` keeps ``text_projection`` (the text-to-detector projection) trainable. ``lora`` is set up by
    :func:`medsam3.train.lora.apply_lora`.
    """
    if mode not in ("full", "decoder"):
        raise ValueError(f"freeze_for_mode handles 'full' and 'decoder', not {mode!r}")
    for name, param in model.named_parameters():
        top = name.removeprefix(DETECTOR_PREFIX).split(".", 1)[0]
        param.requires_grad_(not (mode == "decoder" and top in ("vision_encoder", "text_encoder")))


def trainable_summary(model: nn.Module) -> dict[str, int]:
    """Trainable and total parameter counts, and trainable counts per component."""
    out = {"trainable": 0, "total": 0, **{c: 0 for c in COMPONENTS}}
    for name, param in model.named_parameters():
        out["total"] += param.numel()
        if param.requires_grad:
            out["trainable"] += param.numel()
            out[component_of(name)] += param.numel()
    return out
