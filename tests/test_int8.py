"""``--dtype int8``: dynamic int8 quantization of the linear layers on the CPU (``medsam3.model.quantize``).

The bounds come from ``benchmarks/results/int8_cpu.md``: on the bundled model the Dice of every sample
prompt moved by at most 0.002 with int8, so 0.02 leaves room for other CPUs' kernels while still catching a
broken quantization (which drops the Dice far more).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

import medsam3
from medsam3.cli import main
from medsam3.errors import ModelError
from medsam3.model.quantize import (
    INT8_ALL_LABEL,
    INT8_LABEL,
    count_linear,
    dequantized_copy,
    dtype_label,
    is_int8,
    quantize_int8,
    quantized_linear_type,
)

SAMPLES = Path(medsam3.__file__).resolve().parent / "assets" / "samples"


class Small(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.norm = torch.nn.LayerNorm(8)
        self.head = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.conv(x).permute(0, 2, 3, 1))
        return self.head(y)


def test_linear_layers_are_replaced_and_the_rest_untouched():
    torch.manual_seed(0)
    model = Small().eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
    conv, norm = model.conv.weight.clone(), model.norm.weight.clone()
    quantize_int8(model, "all")
    kind = quantized_linear_type()
    assert isinstance(model.head[0], kind) and isinstance(model.head[2], kind)
    assert type(model.conv) is torch.nn.Conv2d and type(model.norm) is torch.nn.LayerNorm
    assert torch.equal(model.conv.weight, conv) and torch.equal(model.norm.weight, norm)
    assert count_linear(model) == {"int8": 2, "float": 0}
    assert is_int8(model) and dtype_label(model) == INT8_ALL_LABEL
    with torch.no_grad():
        got = model(x)
    # measured here: max |d| / max |ref| about 1e-2 (8-bit weights and activations, two layers)
    assert (got - ref).abs().max() <= 0.03 * ref.abs().max()
    back = dequantized_copy(model)
    assert count_linear(back) == {"int8": 0, "float": 2} and is_int8(model)
    with torch.no_grad():
        assert (back(x) - ref).abs().max() <= 0.03 * ref.abs().max()


def test_only_the_named_part_is_quantized_and_bad_inputs_are_refused():
    model = Small()
    quantize_int8(model, "head")
    assert count_linear(model) == {"int8": 2, "float": 0}
    model = Small()
    quantize_int8(model, "head.2")  # a bare linear layer as the part: one of two quantized
    assert dtype_label(model) == "int8 (dynamic): 1 of 2 linear layers; the rest float32"
    with pytest.raises(ModelError, match="no part 'nope'"):
        quantize_int8(Small(), "nope")
    with pytest.raises(ModelError, match="no quantization plan"):
        quantize_int8(Small())
    with pytest.raises(ModelError, match="float32"):
        quantize_int8(Small().to(torch.bfloat16), "all")
    assert dtype_label(Small()) == "float32"


def test_sam3_vision_encoder_only(tiny_config):
    from transformers import Sam3Model

    torch.manual_seed(0)
    model = Sam3Model(tiny_config).eval()
    size = int(tiny_config.vision_config.backbone_config.image_size)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        ref = model.get_vision_features(pixel_values=x)
    total = count_linear(model)["float"]
    quantize_int8(model)
    assert dtype_label(model) == INT8_LABEL
    assert INT8_LABEL == "int8 (dynamic): vision encoder's linear layers; the rest float32"
    inside = count_linear(model.vision_encoder)
    assert inside["float"] == 0 and inside["int8"] > 0
    assert count_linear(model) == {"int8": inside["int8"], "float": total - inside["int8"]}
    convs = [m for m in model.vision_encoder.modules() if "Conv" in type(m).__name__]
    assert convs and all(type(m) in (torch.nn.Conv2d, torch.nn.ConvTranspose2d) for m in convs)
    with torch.no_grad():
        got = model.get_vision_features(pixel_values=x)
    a, b = ref.last_hidden_state, got.last_hidden_state
    assert (a - b).abs().max() <= 0.05 * a.abs().max()


def test_int8_names_and_devices():
    from medsam3.model.loading import parse_dtype, pick_dtype

    assert pick_dtype("int8", torch.device("cpu")) == torch.float32
    for device in ("cuda", "cuda:1", "mps"):
        with pytest.raises(ModelError, match=f"CPU only, not on {device}"):
            pick_dtype("int8", torch.device(device))
    with pytest.raises(ModelError, match="unknown as a tensor dtype"):
        parse_dtype("int8")


def test_int8_on_auto_device_names_the_choice(monkeypatch, tmp_path):
    import medsam3.model.loading as loading

    monkeypatch.setattr(loading, "pick_device", lambda device="auto": torch.device("cuda"))
    monkeypatch.setattr(loading, "resolve_model", lambda source: None)
    monkeypatch.setattr(loading, "model_directory", lambda resolved: tmp_path)
    with pytest.raises(ModelError, match=r"not on cuda \(chosen by --device auto\): .*Add --device cpu"):
        loading.load_pretrained(None, "image", device="auto", dtype="int8")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny random SAM3 folder whose presence head says "present"."""
    from transformers import Sam3Model

    from medsam3.model.configs import tiny_sam3_config
    from medsam3.model.loading import build_processor, save_sam3

    torch.manual_seed(0)
    model = Sam3Model(tiny_sam3_config()).eval()
    with torch.no_grad():
        model.detr_decoder.presence_head.layer3.bias.fill_(20.0)
    return save_sam3(model, build_processor(model.config), tmp_path_factory.mktemp("tiny") / "model")


def segment(capsys, *argv) -> tuple[int, str, str]:
    code = main(["segment", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_segment_cli_with_int8(tiny_dir, tmp_path, capsys):
    image = SAMPLES / "hc18_400_HC.png"
    code, out, err = segment(
        capsys, image, "-p", "fetal head", "--model", tiny_dir, "--device", "cpu", "--dtype", "int8",
        "--threshold", "0", "-o", tmp_path,
    )  # fmt: skip
    assert code == 0, err
    assert INT8_LABEL in out
    mask = np.asarray(PILImage.open(tmp_path / "hc18_400_HC_mask.png"))
    assert mask.shape == (540, 800)
    summary = json.loads((tmp_path / "hc18_400_HC.json").read_text())
    assert summary["settings"]["dtype"] == INT8_LABEL and summary["settings"]["device"] == "cpu"


def test_segment_cli_int8_off_the_cpu_is_refused(tiny_dir, tmp_path, capsys, monkeypatch):
    import medsam3.model.loading as loading

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    code, _, err = segment(
        capsys, SAMPLES / "hc18_400_HC.png", "-p", "x", "--model", tiny_dir, "--device", "cuda",
        "--dtype", "int8", "-o", tmp_path / "out",
    )  # fmt: skip
    assert code != 0 and "--dtype int8 runs on the CPU only, not on cuda" in err
    assert not (tmp_path / "out").exists()
    assert loading.pick_dtype("fp32", torch.device("cpu")) == torch.float32


def test_resized_int8_engine_stays_int8(tiny_dir):
    from medsam3.predict.engine import Engine

    engine = Engine.from_pretrained(str(tiny_dir), device="cpu", dtype="int8")
    assert engine.describe()["dtype"] == INT8_LABEL
    small = engine.at_size(engine.image_size - 14)
    assert small.image_size == engine.image_size - 14 and small.describe()["dtype"] == INT8_LABEL
    assert count_linear(small.model) == count_linear(engine.model)


def test_track_mode_quantizes_the_video_model(tmp_path_factory):
    from transformers import Sam3VideoModel

    from medsam3.model.configs import tiny_sam3_video_config
    from medsam3.model.loading import build_processor, save_sam3
    from medsam3.predict.engine import Engine

    torch.manual_seed(0)
    config = tiny_sam3_video_config()
    folder = save_sam3(
        Sam3VideoModel(config).eval(), build_processor(config, video=True), tmp_path_factory.mktemp("v") / "m"
    )
    engine = Engine.from_pretrained(str(folder), device="cpu", dtype="int8")
    video = engine.video().model
    assert is_int8(video.detector_model.vision_encoder)
    assert count_linear(video.tracker_model)["int8"] == 0


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def test_bundled_model_dice_with_int8_is_close_to_fp32():
    from medsam3.model.loading import load_sam3
    from medsam3.predict.segmenter import Segmenter

    ref = np.asarray(PILImage.open(SAMPLES / "hc18_400_HC_mask.png"))
    ref = (ref[..., 0] if ref.ndim == 3 else ref) > 127
    scores = {}
    for dtype in ("fp32", "int8"):
        seg = Segmenter(load_sam3(None, device="cpu", dtype=dtype))
        result = seg.segment(SAMPLES / "hc18_400_HC.png", "fetal head", modality="US")
        (entry,) = result.labels
        assert not entry.absent
        scores[dtype] = _dice(np.asarray(result.label_map) == entry.value, ref)
        assert result.settings["dtype"] == (INT8_LABEL if dtype == "int8" else "float32")
    assert scores["fp32"] > 0.85  # measured 0.913
    assert scores["int8"] >= scores["fp32"] - 0.02  # measured 0.9127 (-0.0003)


def test_the_server_reports_int8(tiny_dir, tmp_path):
    """``/api/info`` names the int8 layers (the loaded model's parameter dtype alone says float32)."""
    from serve_fixtures import client_for, make_settings

    settings = make_settings(tiny_dir, tmp_path / "work", dtype="int8")
    with client_for(settings) as client:
        info = client.get("/api/info").json()
    assert info["dtype"] == INT8_LABEL and info["device"] == "cpu"
    with client_for(make_settings(tiny_dir, tmp_path / "work32")) as client:
        assert client.get("/api/info").json()["dtype"] == "float32"
