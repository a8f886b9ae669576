"""Changing a SAM3 model's input size: position embeddings resampled or tiled, every other weight kept.

Hand-checked resampling (constant and linear fields), tiny random SAM3 models of both kinds (matched
embedding as medsam3-nano, tiled as Meta's SAM3), a save / load round trip, and ``model.image_size`` in a
training run.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medsam3.errors import ModelError
from medsam3.model.configs import small_sam3_config
from medsam3.model.input_size import (
    POSITION_KEY,
    input_size,
    resample_grid,
    resize_processor,
    resize_sam3_input,
)


def test_same_grid_is_a_copy_and_constant_fields_stay_constant():
    emb = torch.randn(1, 16, 5)
    same = resample_grid(emb, 4)
    assert torch.equal(same, emb) and same.data_ptr() != emb.data_ptr()
    const = torch.tensor([1.5, -2.0, 0.25]).repeat(1, 9, 1)  # (1, 3*3, 3), every position equal
    for grid in (1, 2, 5, 7):
        out = resample_grid(const, grid)
        assert out.shape == (1, grid * grid, 3)
        torch.testing.assert_close(out, const[:, :1].expand(1, grid * grid, 3), rtol=0, atol=1e-5)


@pytest.mark.parametrize(("g0", "g"), [(12, 6), (4, 12)])
def test_a_linear_field_is_resampled_at_the_pixel_centres(g0, g):
    """New position j takes the field at source coordinate (j + 0.5) * g0 / g - 0.5 (pixel centres,
    align_corners=False). Where that coordinate is a source position or half-way between two, the 4-tap
    cubic kernel is symmetric about it and returns a linear field's value exactly (inside the grid)."""
    rows, cols = np.meshgrid(np.arange(g0), np.arange(g0), indexing="ij")
    field = np.stack([2.0 * cols + 1.0, -0.5 * rows], axis=-1).reshape(1, g0 * g0, 2)
    out = resample_grid(torch.tensor(field, dtype=torch.float32), g).numpy().reshape(g, g, 2)
    src = (np.arange(g) + 0.5) * g0 / g - 0.5
    exact = ((src * 2) % 1 == 0) & (src >= 1) & (src <= g0 - 2)
    assert exact.sum() >= 2
    np.testing.assert_allclose(
        out[np.ix_(exact, exact)][..., 0],
        np.broadcast_to(2.0 * src[exact] + 1.0, (exact.sum(),) * 2),
        atol=1e-4,
    )
    np.testing.assert_allclose(
        out[np.ix_(exact, exact)][..., 1],
        np.broadcast_to(-0.5 * src[exact][:, None], (exact.sum(),) * 2),
        atol=1e-4,
    )


def test_resample_refuses_a_non_square_embedding():
    with pytest.raises(ValueError, match="not \\(1, g\\*g, C\\)"):
        resample_grid(torch.zeros(1, 10, 4), 3)


def _model(**size):
    from transformers import Sam3Model

    torch.manual_seed(0)
    return Sam3Model(small_sam3_config(**size)).eval()


def _forward(model, size: int):
    torch.manual_seed(1)
    pixels = torch.randn(1, 3, size, size)
    ids = torch.tensor([[49406, 1929, 49407]])
    with torch.inference_mode():
        return model(pixel_values=pixels, input_ids=ids, attention_mask=torch.ones_like(ids))


def test_a_matched_model_gets_its_embedding_resampled_and_keeps_every_other_weight():
    model = _model(image_size=112)  # 8 x 8 grid, embedding learnt on the whole grid
    before = {k: v.clone() for k, v in model.state_dict().items()}
    resized = resize_sam3_input(model, 168)
    assert input_size(resized) == 168 and input_size(model) == 112  # the original is untouched
    bb = resized.config.vision_config.backbone_config
    assert bb.pretrain_image_size == 168
    assert resized.config.vision_config.backbone_feature_sizes == [[48, 48], [24, 24], [12, 12]]
    new = resized.state_dict()
    assert torch.equal(new[POSITION_KEY], resample_grid(before[POSITION_KEY], 12))
    assert new[POSITION_KEY].shape == (1, 144, before[POSITION_KEY].shape[2])
    assert all(torch.equal(new[k], v) for k, v in before.items() if k != POSITION_KEY)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert not resized.training
    out = _forward(resized, 168)
    assert out.pred_masks.shape[-2:] == (48, 48) and torch.isfinite(out.pred_masks).all()


def test_a_tiled_model_keeps_its_embedding_and_tiles_it_over_the_new_grid():
    from transformers import Sam3Model

    cfg = small_sam3_config(image_size=112)
    cfg.vision_config.backbone_config.pretrain_image_size = 56  # a 4 x 4 embedding tiled 2 x 2, as SAM3
    torch.manual_seed(0)
    model = Sam3Model(cfg).eval()
    resized = resize_sam3_input(model, 168)
    bb = resized.config.vision_config.backbone_config
    assert (bb.image_size, bb.pretrain_image_size) == (168, 56)
    assert torch.equal(resized.state_dict()[POSITION_KEY], model.state_dict()[POSITION_KEY])
    emb = resized.vision_encoder.backbone.embeddings
    tiled = emb._tile_position_embeddings(emb.position_embeddings, 12, 12)
    grid = model.state_dict()[POSITION_KEY].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    torch.testing.assert_close(tiled.reshape(1, 12, 12, -1).permute(0, 3, 1, 2), grid.tile(1, 1, 3, 3))
    assert _forward(resized, 168).pred_masks.shape[-2:] == (48, 48)


def test_bad_sizes_and_models_are_refused():
    model = _model(image_size=112)
    assert resize_sam3_input(model, 112) is model
    for bad in (0, -14, 100):
        with pytest.raises(ModelError, match="multiple of the patch size 14"):
            resize_sam3_input(model, bad)
    with pytest.raises(ModelError, match="Sam3Model only"):
        resize_sam3_input(torch.nn.Linear(2, 2), 112)


def test_trainable_flags_and_mode_follow_and_the_resized_model_round_trips(tmp_path):
    from medsam3.model.loading import build_processor, load_sam3, save_sam3

    model = _model(image_size=112).train()
    for p in model.text_encoder.parameters():
        p.requires_grad_(False)
    resized = resize_sam3_input(model, 140)
    assert resized.training
    assert not any(p.requires_grad for p in resized.text_encoder.parameters())
    assert all(p.requires_grad for p in resized.vision_encoder.parameters())
    processor = resize_processor(build_processor(model.config), 140, 14)
    assert processor.image_processor.size == {"height": 140, "width": 140}
    assert processor.image_processor.mask_size == {"height": 40, "width": 40}
    save_sam3(resized.eval(), processor, tmp_path / "m")
    loaded = load_sam3(tmp_path / "m", device="cpu", dtype="fp32")
    assert input_size(loaded.model) == 140
    assert loaded.processor.image_processor.size == {"height": 140, "width": 140}
    a, b = _forward(resized, 140), _forward(loaded.model, 140)
    torch.testing.assert_close(a.pred_masks, b.pred_masks)


def test_training_at_another_input_size_exports_that_size(tmp_path, data_dir):
    from medsam3.model.loading import load_sam3
    from medsam3.train.loop import train
    from test_train_loop import config, hc18_manifest

    manifest, _ = hc18_manifest(data_dir, tmp_path, n=2)
    cfg = config(
        tmp_path,
        manifest,
        max_steps=2,
        export="final",
        data={"val_max_items": 0},
        model={"size": {"image_size": 112}, "image_size": 126},
    )
    result = train(cfg)
    loaded = load_sam3(result.exports["final"], device="cpu", dtype="fp32")
    assert input_size(loaded.model) == 126
    assert loaded.model.state_dict()[POSITION_KEY].shape[1] == 81
    assert loaded.processor.image_processor.mask_size == {"height": 36, "width": 36}


def test_a_bad_training_input_size_is_a_config_error(tmp_path, data_dir):
    from medsam3.errors import InputError
    from medsam3.train.loop import build_model
    from test_train_loop import config, hc18_manifest

    manifest, _ = hc18_manifest(data_dir, tmp_path, n=1)
    with pytest.raises(InputError, match="model.image_size.*multiple of the patch size"):
        build_model(config(tmp_path, manifest, model={"size": {"image_size": 112}, "image_size": 120}))
    with pytest.raises(InputError, match="model.image_size"):
        config(tmp_path, manifest, model={"image_size": 0})
