"""bf16 autocast on a CPU (``mixed_precision: bf16`` without a GPU): the geometry encoder runs in float32.

Levels: the wrapped encoder under CPU autocast gives exactly the float32 result (tiny random SAM3), and a
short bf16 training run on real HC18 images finishes with losses close to a float32 run.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from medsam3.model.forward import encode_image, geometry_cls_token
from medsam3.train.cpu_autocast import _to_float32, geometry_encoder_in_fp32


def test_to_float32_by_hand():
    half = torch.tensor([1.5], dtype=torch.bfloat16)
    ids = torch.tensor([3])
    out = _to_float32({"a": (half, ids), "b": [half], "c": "text"})
    assert out["a"][0].dtype == torch.float32 and out["a"][0].item() == 1.5
    assert out["a"][1] is ids and out["b"][0].dtype == torch.float32 and out["c"] == "text"
    assert isinstance(out["a"], tuple) and isinstance(out["b"], list)


def test_geometry_encoder_under_cpu_autocast_equals_float32(tiny_model):
    model = copy.deepcopy(tiny_model)
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        vision = encode_image(model, pixels)
        reference, ref_mask = geometry_cls_token(model, vision)
        geometry_encoder_in_fp32(model)
        geometry_encoder_in_fp32(model)  # idempotent
        same, _ = geometry_cls_token(model, vision)  # no autocast: the original forward
        torch.testing.assert_close(same, reference, rtol=0, atol=0)
        bf16_vision = type(vision)(
            **{k: (tuple(t.bfloat16() for t in v) if isinstance(v, tuple) else v) for k, v in vision.items()}
        )
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, mask = geometry_cls_token(model, vision)
            from_bf16, _ = geometry_cls_token(model, bf16_vision)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, reference, rtol=0, atol=0)
    assert torch.equal(mask, ref_mask)
    # bfloat16 features in: the encoder still runs in float32 on them (close to, not equal to, float32)
    assert from_bf16.dtype == torch.float32
    torch.testing.assert_close(from_bf16, reference, rtol=0.05, atol=0.05)


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state whose precision cannot change: reset it around a test
    that trains in another precision, so that the tests before and after keep theirs."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def test_bf16_training_on_cpu_runs_and_tracks_float32(tmp_path, data_dir, fresh_accelerate_state):
    from accelerate.state import AcceleratorState

    from medsam3.train.loop import train
    from test_train_loop import config, hc18_manifest

    manifest, _ = hc18_manifest(data_dir, tmp_path)
    losses = {}
    for precision in ("no", "bf16"):
        AcceleratorState._reset_state(True)
        cfg = config(
            tmp_path / precision,
            manifest,
            max_steps=2,
            val_every=0,
            export="final",
            mixed_precision=precision,
        )
        result = train(cfg)
        assert result.finished
        losses[precision] = [h["loss"] for h in result.history]
    assert all(math.isfinite(v) for v in losses["bf16"])
    for a, b in zip(losses["bf16"], losses["no"], strict=True):
        assert a == pytest.approx(b, rel=0.05)
