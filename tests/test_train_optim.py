"""Parameter groups, layer-wise decay, weight decay, schedule, modes and LoRA of the training engine."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import Sam3Model

from medsam3.model.configs import tiny_sam3_config
from medsam3.train.config import LoraSection, OptimSection
from medsam3.train.lora import apply_lora, has_lora, lora_parameter_count, merge_lora
from medsam3.train.optim import (
    build_optimizer,
    build_scheduler,
    component_of,
    freeze_for_mode,
    layer_decay_scale,
    lr_factor,
    parameter_groups,
    trainable_summary,
)

RECIPE = OptimSection()


@pytest.fixture()
def model3():
    """A tiny SAM3 with a 3-block ViT (blocks 0, 1, 2; block 2 global)."""
    torch.manual_seed(0)
    return Sam3Model(tiny_sam3_config(vit_layers=3, global_layers=(2,)))


def lr_of(groups, name: str) -> float:
    (group,) = [g for g in groups if name in g.param_names]
    return group.lr


def test_every_trainable_parameter_is_in_exactly_one_group(model3):
    groups = parameter_groups(model3, RECIPE)
    names = [n for g in groups for n in g.param_names]
    assert len(names) == len(set(names))
    assert set(names) == {n for n, _ in model3.named_parameters()}
    ids = [id(p) for g in groups for p in g.params]
    assert len(ids) == len(set(ids)) == len(list(model3.parameters()))
    optimizer = build_optimizer(groups, RECIPE)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(ids)
    assert optimizer.defaults["betas"] == (0.9, 0.999) and optimizer.defaults["eps"] == 1e-8


def test_component_learning_rates_by_hand(model3):
    groups = parameter_groups(model3, RECIPE)
    expected = {
        "detr_decoder.layers.0.mlp.fc1.weight": 3e-4,
        "mask_decoder.pixel_decoder.conv_layers.0.weight": 3e-4,
        "dot_product_scoring.text_proj.weight": 3e-4,
        "text_encoder.text_model.encoder.layers.0.mlp.fc1.weight": 5e-5,
        "text_encoder.text_model.embeddings.token_embedding.weight": 5e-5,
        "text_projection.weight": 5e-5,
        "geometry_encoder.final_proj.weight": 1e-4,
        "detr_encoder.layers.0.mlp.fc1.weight": 1e-5,
    }
    for name, lr in expected.items():
        assert lr_of(groups, name) == pytest.approx(lr, rel=1e-12), name


def test_layer_wise_decay_by_hand(model3):
    # L = 3 blocks, d = 0.85: block i gets d^(3 - i): 0.614125, 0.7225, 0.85 (deeper = larger);
    # embeddings d^4 = 0.52200625; the rest of the vision encoder (pre-block norm, FPN neck) 1.
    groups = parameter_groups(model3, RECIPE)
    base = 5e-5
    expected = {
        "vision_encoder.backbone.layers.0.mlp.fc1.weight": 0.614125,
        "vision_encoder.backbone.layers.1.attention.q_proj.weight": 0.7225,
        "vision_encoder.backbone.layers.2.mlp.fc2.bias": 0.85,
        "vision_encoder.backbone.embeddings.patch_embeddings.projection.weight": 0.52200625,
        "vision_encoder.backbone.embeddings.position_embeddings": 0.52200625,
        "vision_encoder.backbone.layer_norm.weight": 1.0,
        "vision_encoder.neck.fpn_layers.0.proj1.weight": 1.0,
    }
    names = {n for n, _ in model3.named_parameters()}
    for name, scale in expected.items():
        assert name in names, name
        assert lr_of(groups, name) == pytest.approx(base * scale, rel=1e-12), name
        assert layer_decay_scale(name, 3, 0.85) == pytest.approx(scale, rel=1e-12)
    assert layer_decay_scale("detr_decoder.layers.0.mlp.fc1.weight", 3, 0.85) == 1.0
    blocks = [lr_of(groups, f"vision_encoder.backbone.layers.{i}.mlp.fc1.weight") for i in range(3)]
    assert blocks == sorted(blocks) and blocks[0] < blocks[2]


def test_weight_decay_skips_biases_and_layer_norms(model3):
    groups = parameter_groups(model3, RECIPE)
    decay = {n: g.weight_decay for g in groups for n in g.param_names}
    assert decay["detr_decoder.layers.0.mlp.fc1.weight"] == 0.05
    assert decay["detr_decoder.layers.0.mlp.fc1.bias"] == 0.0
    assert decay["vision_encoder.backbone.layers.0.layer_norm1.weight"] == 0.0  # nn.LayerNorm
    assert decay["text_encoder.text_model.final_layer_norm.weight"] == 0.0
    assert decay["vision_encoder.backbone.embeddings.position_embeddings"] == 0.05
    # GroupNorm is not LayerNorm: its weight decays (SAM3's rule names LayerNorm only).
    assert decay["mask_decoder.pixel_decoder.norms.0.weight"] == 0.05
    assert all(g.name.endswith(".no_decay") == (g.weight_decay == 0.0) for g in groups)


def test_unknown_component_is_an_error():
    assert component_of("detr_decoder.x") == "decoder"
    with pytest.raises(ValueError, match="no known SAM3 component"):
        component_of("new_head.weight")


def test_schedule_values_by_hand():
    # warm-up 4, timescale 10, no cool-down
    assert lr_factor(1, 4, 10) == 0.25
    assert lr_factor(3, 4, 10) == 0.75
    assert lr_factor(4, 4, 10) == 1.0
    assert lr_factor(5, 4, 10) == pytest.approx(math.sqrt(10 / 11), rel=1e-12)
    assert lr_factor(14, 4, 10) == pytest.approx(math.sqrt(0.5), rel=1e-12)
    # cool-down 3 over the last updates of 20: factors x1, x2/3, x1/3 at updates 18, 19, 20
    assert lr_factor(18, 4, 10, 3, 20) == pytest.approx(math.sqrt(10 / 24), rel=1e-12)
    assert lr_factor(19, 4, 10, 3, 20) == pytest.approx(math.sqrt(10 / 25) * 2 / 3, rel=1e-12)
    assert lr_factor(20, 4, 10, 3, 20) == pytest.approx(math.sqrt(10 / 26) / 3, rel=1e-12)
    # no warm-up: the decay starts at the first update
    assert lr_factor(1, 0, 10) == pytest.approx(math.sqrt(10 / 11), rel=1e-12)
    assert lr_factor(2, 0, 10) == pytest.approx(math.sqrt(10 / 12), rel=1e-12)
    with pytest.raises(ValueError):
        lr_factor(0, 4, 10)


def test_scheduler_sets_every_group(model3):
    cfg = OptimSection(warmup_steps=2, timescale=10, cooldown_steps=0)
    groups = parameter_groups(model3, cfg)
    optimizer = build_optimizer(groups, cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps=10)
    seen = []
    for _ in range(4):
        seen.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    factors = [0.5, 1.0, math.sqrt(10 / 11), math.sqrt(10 / 12)]
    for lrs, f in zip(seen, factors, strict=True):
        for lr, g in zip(lrs, groups, strict=True):
            assert lr == pytest.approx(g.lr * f, rel=1e-12)


def test_decoder_mode_freezes_the_encoders(model3):
    freeze_for_mode(model3, "decoder")
    groups = parameter_groups(model3, RECIPE)
    names = {n for g in groups for n in g.param_names}
    assert not any(n.startswith(("vision_encoder.", "text_encoder.")) for n in names)
    assert "text_projection.weight" in names and "detr_decoder.layers.0.mlp.fc1.weight" in names
    counts = trainable_summary(model3)
    assert counts["vision"] == 0 and counts["text"] == model3.text_projection.weight.numel() + 128
    freeze_for_mode(model3, "full")
    assert trainable_summary(model3)["trainable"] == trainable_summary(model3)["total"]


def test_lora_trains_adapters_and_heads_only(model3):
    cfg = LoraSection(rank=4, alpha=8, dropout=0.0)
    # tiny ViT: 3 blocks of width 64, MLP 256; text: 1 layer of width 64, MLP 256. Per layer at r = 4:
    # 4 projections 4 * 4 * (64 + 64) + fc1 4 * (64 + 256) + fc2 4 * (256 + 64) = 2048 + 2560 = 4608
    adapters_expected = 4 * 4608
    assert lora_parameter_count(model3, cfg) == adapters_expected
    before = trainable_summary(model3)
    apply_lora(model3, cfg)
    assert has_lora(model3)
    trainable = {n for n, p in model3.named_parameters() if p.requires_grad}
    adapters = {n for n in trainable if ".lora_" in n}
    assert sum(p.numel() for n, p in model3.named_parameters() if n in adapters) == adapters_expected
    frozen_parts = ("vision_encoder.backbone.", "text_encoder.")
    assert not any(n.startswith(frozen_parts) for n in trainable - adapters)
    after = trainable_summary(model3)
    heads = before["decoder"] + before["geometry"] + before["fusion_encoder"]
    neck = sum(p.numel() for n, p in model3.named_parameters() if n.startswith("vision_encoder.neck."))
    text_proj = sum(p.numel() for n, p in model3.named_parameters() if n.startswith("text_projection."))
    assert after["trainable"] == heads + neck + text_proj + adapters_expected
    groups = parameter_groups(model3, RECIPE)
    assert {n for g in groups for n in g.param_names} == trainable
    # LLRD applies to the adapters of each block
    name = "vision_encoder.backbone.layers.0.attention.q_proj.lora_A.default.weight"
    assert lr_of(groups, name) == pytest.approx(5e-5 * 0.85**3, rel=1e-12)


def test_merged_lora_model_matches_and_loads_as_plain_sam3(model3):
    apply_lora(model3, LoraSection(rank=4, alpha=8, dropout=0.0))
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model3.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.05)  # non-zero adapters change the output
    model3.eval()
    merged = merge_lora(model3)
    assert not has_lora(merged) and has_lora(model3)
    fresh_keys = set(Sam3Model(model3.config).state_dict())
    assert set(merged.state_dict()) == fresh_keys
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        a = model3.get_vision_features(pixel_values=x).fpn_hidden_states[-1]
        b = merged.get_vision_features(pixel_values=x).fpn_hidden_states[-1]
        plain = Sam3Model(model3.config).eval()
        plain.load_state_dict(merged.state_dict())
        c = plain.get_vision_features(pixel_values=x).fpn_hidden_states[-1]
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(b, c, atol=1e-6)


def test_activation_checkpointing_recomputes_encoder_layers_with_the_same_gradients(model3):
    from medsam3.train.model import Sam3TrainModule, enable_activation_checkpointing

    model3.train()
    for m in model3.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    x = torch.randn(1, 3, 224, 224)
    ids = torch.randint(0, 49000, (1, 32))
    mask = torch.ones(1, 32, dtype=torch.long)

    def grads():
        model3.zero_grad()
        out = Sam3TrainModule(model3, aux=False)(x, ids, mask)
        (out["pred_masks"].float().mean() + out["pred_logits"].float().mean()).backward()
        return {n: p.grad.clone() for n, p in model3.named_parameters() if p.grad is not None}

    plain = grads()
    assert enable_activation_checkpointing(model3) == 3 + 1  # 3 ViT blocks + 1 text layer
    calls = []
    block = model3.vision_encoder.backbone.layers[0]
    original = block._gradient_checkpointing_func
    block._gradient_checkpointing_func = lambda *a, **k: calls.append(1) or original(*a, **k)
    checkpointed = grads()
    assert calls  # the block ran through torch.utils.checkpoint
    assert plain.keys() == checkpointed.keys()
    for name, g in plain.items():
        torch.testing.assert_close(checkpointed[name], g, rtol=1e-4, atol=1e-6, msg=name)
