"""LoRA fine-tuning of SAM3's encoders (peft), for GPUs with 12-24 GB.

Targets (transformers ``Sam3Model`` names): every attention projection and MLP linear layer of

* the ViT: ``vision_encoder.backbone.layers.N.attention.{q,k,v,o}_proj`` and ``....mlp.fc1 / fc2``;
* the CLIP text encoder: ``text_encoder.text_model.encoder.layers.N.self_attn.{q,k,v,out}_proj`` and
  ``....mlp.fc1 / fc2``.

Each target ``W`` (``d_out x d_in``) gets ``W + (alpha / r) * B A`` with trainable ``A`` (``r x d_in``) and
``B`` (``d_out x r``, zero at the start), i.e. ``r * (d_in + d_out)`` parameters. The encoders' own weights
are frozen; everything after them trains in full: the FPN neck, the text projection, the geometry encoder,
the DETR encoder and decoder, the mask head and the dot-product scoring. For the released SAM3 (ViT 32 x 1024
with MLP 4736, text 24 x 1024 with MLP 4096) at ``r = 16`` the adapters hold
``32 * 16 * (4 * 2048 + 2 * 5760) + 24 * 16 * (4 * 2048 + 2 * 5120) = 17,170,432`` parameters;
:func:`lora_parameter_count` computes it for any configuration, and
:func:`medsam3.train.optim.trainable_summary` reports the total trainable count of a run (57,847,862 for
the released SAM3 in LoRA mode at ``r = 16``: the adapters plus 40.7 M parameters of the parts after the
encoders).

:func:`merge_lora` folds the adapters into the weights and returns a plain ``Sam3Model`` whose keys match a
freshly built one, so the export loads with ``medsam3 segment --model`` like any other SAM3 folder.
"""

from __future__ import annotations

import copy
from typing import TypeVar

from torch import nn

from medsam3.train.config import LoraSection

ModuleT = TypeVar("ModuleT", bound=nn.Module)

#: Adapter targets in the ViT (regular expression over module names, full match).
VISION_TARGETS = r"vision_encoder\.backbone\.layers\.\d+\.(attention\.(q|k|v|o)_proj|mlp\.fc[12])"
#: Adapter targets in the CLIP text encoder.
TEXT_TARGETS = r"text_encoder\.text_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])"
#: Prefixes of the parameters that stay frozen (apart from their adapters) in LoRA mode.
FROZEN_PREFIXES = ("vision_encoder.backbone.", "text_encoder.")


def target_pattern(cfg: LoraSection) -> str:
    """The regular expression of the modules that get adapters."""
    parts = ([VISION_TARGETS] if cfg.vision else []) + ([TEXT_TARGETS] if cfg.text else [])
    if not parts:
        raise ValueError("LoRA needs the vision or the text encoder as target")
    # a video model's detector holds the same modules under ``detector_model.``
    return r"(detector_model\.)?(" + "|".join(parts) + ")"


def lora_parameter_count(model: nn.Module, cfg: LoraSection) -> int:
    """Adapter parameters ``sum r * (d_in + d_out)`` over the target linear layers of ``model``."""
    import re

    rx = re.compile(target_pattern(cfg))
    return sum(
        cfg.rank * (m.in_features + m.out_features)
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and rx.fullmatch(n)
    )


def apply_lora(model: ModuleT, cfg: LoraSection) -> ModuleT:
    """Insert LoRA adapters into ``model`` in place (peft) and set what trains (module docstring).

    Returns the same model object; adapter weights are named ``<target>.lora_A.default.weight`` /
    ``<target>.lora_B.default.weight`` and the wrapped weights ``<target>.base_layer.weight``.
    """
    import peft

    # peft annotates lora_alpha as int; it is only a factor (alpha / r), a float alpha works the same
    lora_config = peft.LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,  # type: ignore[arg-type]
        lora_dropout=cfg.dropout,
        target_modules=target_pattern(cfg),
        bias="none",
    )
    peft.inject_adapter_in_model(lora_config, model)
    for name, param in model.named_parameters():
        is_adapter = ".lora_A." in name or ".lora_B." in name
        frozen = name.removeprefix("detector_model.").startswith(FROZEN_PREFIXES)
        param.requires_grad_(is_adapter or not frozen)
    return model


def has_lora(model: nn.Module) -> bool:
    """True when ``model`` holds LoRA adapters."""
    from peft.tuners.lora import LoraLayer

    return any(isinstance(m, LoraLayer) for m in model.modules())


def merge_lora(model: ModuleT) -> ModuleT:
    """A copy of ``model`` with every adapter merged into its weight and removed (a plain ``Sam3Model``).

    ``model`` itself is not changed (training can go on). Without adapters the copy is returned as is.
    """
    from peft.tuners.lora import LoraLayer

    merged = copy.deepcopy(model)
    targets = [(name, module) for name, module in merged.named_modules() if isinstance(module, LoraLayer)]
    for name, module in targets:
        module.merge()
        parent_name, _, child = name.rpartition(".")
        parent = merged.get_submodule(parent_name) if parent_name else merged
        setattr(parent, child, module.get_base_layer())
    for param in merged.parameters():
        param.requires_grad_(True)
    return merged
