"""Model resolution order, strict loading, atomic saving, device / dtype choice, the tracker loader."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch

from medsam3.errors import ModelError, OutputError
from medsam3.model import resolve
from medsam3.model.resolve import ResolvedModel, model_directory, resolve_model


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No MEDSAM3_MODEL, a config path that does not exist, no bundled model."""
    monkeypatch.delenv(resolve.ENV_MODEL, raising=False)
    monkeypatch.delenv(resolve.ENV_CONFIG, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(resolve, "BUNDLED_MODEL_DIR", tmp_path / "not-installed" / "medsam3-nano")
    return monkeypatch


def _fake_model_folder(path):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "sam3"}))
    (path / "model.safetensors").write_bytes(b"0")
    return path


def test_resolve_order(clean_env, tmp_path):
    explicit = _fake_model_folder(tmp_path / "explicit")
    from_env = _fake_model_folder(tmp_path / "from_env")
    from_cfg = _fake_model_folder(tmp_path / "cfgdir" / "from_cfg")
    cfg = tmp_path / "cfgdir" / "config.toml"
    cfg.write_text('model = "from_cfg"\n')  # relative to the config file's folder
    clean_env.setenv(resolve.ENV_CONFIG, str(cfg))
    assert resolve_model() == ResolvedModel(str(from_cfg.resolve()), "local", f"configuration file {cfg}")
    clean_env.setenv(resolve.ENV_MODEL, str(from_env))
    assert resolve_model().source == str(from_env.resolve())
    assert resolve_model().origin == "environment variable MEDSAM3_MODEL"
    chosen = resolve_model(explicit)
    assert (chosen.source, chosen.kind, chosen.origin) == (str(explicit.resolve()), "local", "--model")


def test_default_config_file_location(clean_env, tmp_path):
    folder = _fake_model_folder(tmp_path / "m")
    cfg = tmp_path / "xdg" / "medsam3" / "config.toml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text(f'model = "{folder}"\n')
    assert resolve_model().source == str(folder.resolve())


def test_bundled_model_used_last(clean_env, tmp_path):
    bundled = _fake_model_folder(tmp_path / "assets" / "medsam3-nano")
    clean_env.setattr(resolve, "BUNDLED_MODEL_DIR", bundled)
    assert resolve_model() == ResolvedModel(str(bundled), "bundled", "bundled model")


def test_missing_bundled_model_says_how_to_get_one(clean_env):
    with pytest.raises(ModelError) as info:
        resolve_model()
    msg = str(info.value)
    assert "medsam3-nano" in msg and "medsam3 convert" in msg and "--model" in msg and "MEDSAM3_MODEL" in msg


def test_bad_choices_are_explained(clean_env, tmp_path):
    ckpt = tmp_path / "sam3.pt"
    ckpt.write_bytes(b"x")
    with pytest.raises(ModelError, match="convert it first with `medsam3 convert"):
        resolve_model(ckpt)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="config.json is missing"):
        resolve_model(empty)
    with pytest.raises(ModelError, match="model folder not found"):
        resolve_model(tmp_path / "nope")
    cfg = tmp_path / "bad.toml"
    cfg.write_text("model = [1, 2]\n")
    clean_env.setenv(resolve.ENV_CONFIG, str(cfg))
    with pytest.raises(ModelError, match="must be a non-empty string"):
        resolve_model()
    clean_env.setenv(resolve.ENV_CONFIG, str(tmp_path / "absent.toml"))
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model()


def test_hub_id_is_not_downloaded_offline(clean_env, tmp_path):
    chosen = resolve_model("medsam3-tests/no-such-model")
    assert (chosen.kind, chosen.source) == ("hub", "medsam3-tests/no-such-model")
    clean_env.setenv("HF_HUB_OFFLINE", "1")
    clean_env.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    with pytest.raises(ModelError) as info:
        model_directory(chosen)
    msg = str(info.value)
    assert "medsam3-tests/no-such-model" in msg and "offline" in msg and "medsam3 convert" in msg


# --------------------------------------------------------------------------------------------------
# device and dtype


def test_dtype_choice_on_cpu(caplog):
    from medsam3.model.loading import parse_dtype, pick_device, pick_dtype

    cpu = torch.device("cpu")
    assert pick_dtype("auto", cpu) == torch.float32
    assert pick_dtype("fp32", cpu) == torch.float32
    with pytest.raises(ModelError, match="fp16 on the CPU"):
        pick_dtype("fp16", cpu)
    with caplog.at_level(logging.WARNING):
        assert pick_dtype("bf16", cpu) == torch.bfloat16
    assert "bfloat16 on the CPU" in caplog.text
    assert parse_dtype(torch.float16) == torch.float16 and parse_dtype("bfloat16") == torch.bfloat16
    with pytest.raises(ModelError, match="unknown"):
        parse_dtype("int8")
    assert pick_device("cpu") == cpu
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="no CUDA GPU"):
            pick_device("cuda")
        assert pick_device("auto").type in ("cpu", "mps")


# --------------------------------------------------------------------------------------------------
# saving and loading real (tiny) models


@pytest.fixture(scope="module")
def tiny_image_folder(tmp_path_factory, tiny_model):
    from medsam3.model.loading import build_processor, save_sam3

    folder = tmp_path_factory.mktemp("image") / "model"
    save_sam3(tiny_model, build_processor(tiny_model.config), folder)
    return folder


def _inputs(processor, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = (torch.rand(3, 180, 260, generator=g) * 255).to(torch.uint8)
    return processor(images=image, text=["left kidney"], return_tensors="pt")


OUTPUTS = ("pred_masks", "pred_boxes", "pred_logits", "presence_logits", "semantic_seg")


def assert_same_outputs(model, reference, inputs) -> None:
    """Outputs equal: bit for bit once the weights sit in freshly allocated memory, and within 1e-6 as loaded.

    Weights memory-mapped from a safetensors file can be aligned differently from freshly allocated ones,
    which changes the summation order of some CPU matrix kernels (differences of ~1e-9).
    """
    kwargs = {k: inputs[k] for k in ("pixel_values", "input_ids", "attention_mask")}
    with torch.inference_mode():
        ref = reference(**kwargs)
        loaded = model(**kwargs)
        with torch.no_grad():
            for p in model.parameters():
                p.data = p.data.clone()
        fresh = model(**kwargs)
    for name in OUTPUTS:
        assert torch.equal(getattr(fresh, name), getattr(ref, name)), name
        torch.testing.assert_close(getattr(loaded, name), getattr(ref, name), rtol=1e-5, atol=1e-6)


def test_save_load_round_trip_identical_outputs(tiny_image_folder, tiny_model):
    from transformers import Sam3Model, Sam3Processor

    from medsam3.model.loading import build_processor, load_sam3

    assert sorted(p.name for p in tiny_image_folder.iterdir()) == [
        "config.json",
        "model.safetensors",
        "processor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert not [p for p in tiny_image_folder.parent.iterdir() if p.name.startswith(".")]  # no temp left
    assert "\n" not in (tiny_image_folder / "tokenizer.json").read_text(encoding="utf-8")  # compact
    mode = tiny_image_folder.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o777 & ~umask

    model = Sam3Model.from_pretrained(tiny_image_folder).eval()
    processor = Sam3Processor.from_pretrained(tiny_image_folder)
    ref_inputs = _inputs(build_processor(tiny_model.config))
    inputs = _inputs(processor)
    for key in ("pixel_values", "input_ids", "attention_mask"):
        assert torch.equal(inputs[key], ref_inputs[key])
    assert inputs["pixel_values"].shape == (1, 3, 224, 224) and inputs["input_ids"].shape == (1, 32)
    sd = tiny_model.state_dict()
    assert set(model.state_dict()) == set(sd)
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
    assert_same_outputs(model, tiny_model, inputs)

    loaded = load_sam3(tiny_image_folder, device="cpu")
    assert (loaded.device, loaded.dtype, loaded.source) == (
        torch.device("cpu"),
        torch.float32,
        str(tiny_image_folder.resolve()),
    )
    assert not loaded.model.training
    assert all(torch.equal(v, sd[k]) for k, v in loaded.model.state_dict().items())


def test_save_refuses_non_empty_folder_and_leaves_nothing_on_failure(tmp_path, tiny_model):
    from medsam3.model.loading import build_processor, save_sam3

    target = tmp_path / "occupied"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="not empty"):
        save_sam3(tiny_model, build_processor(tiny_model.config), target)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]

    class Broken:
        def save_pretrained(self, path):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_sam3(tiny_model, Broken(), tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["occupied"]


def test_loading_fails_loudly_on_bad_weights(tmp_path, tiny_image_folder):
    import shutil

    from safetensors.torch import load_file, save_file

    from medsam3.model.loading import load_sam3

    folder = tmp_path / "bad"
    shutil.copytree(tiny_image_folder, folder)
    state = load_file(folder / "model.safetensors")
    del state["text_projection.bias"]
    state["detr_decoder.query_embed.weight"] = torch.zeros(3, 128)
    state["not.a.weight"] = torch.zeros(2)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError) as info:
        load_sam3(folder, device="cpu")
    msg = str(info.value)
    for key in ("text_projection.bias", "detr_decoder.query_embed.weight", "not.a.weight"):
        assert key in msg
    assert "missing" in msg and "mis-shaped" in msg and "unexpected" in msg


def test_tracker_loads_from_video_folder_and_refuses_image_folder(tmp_path, tiny_image_folder):
    from transformers import Sam3VideoModel

    from medsam3.model.configs import tiny_sam3_video_config
    from medsam3.model.loading import build_processor, load_sam3, load_sam3_tracker, save_sam3

    torch.manual_seed(1)
    video = Sam3VideoModel(tiny_sam3_video_config()).eval()
    folder = save_sam3(video, build_processor(video.config, video=True), tmp_path / "video")
    sd = video.state_dict()

    tracker = load_sam3_tracker(folder, device="cpu")
    assert type(tracker.model).__name__ == "Sam3TrackerModel"
    assert type(tracker.processor).__name__ == "Sam3TrackerProcessor"
    for key, value in tracker.model.state_dict().items():
        if key.startswith("vision_encoder.backbone."):
            source = "detector_model." + key
        elif key.startswith("vision_encoder.neck."):
            source = "tracker_neck." + key[len("vision_encoder.neck.") :]
        else:
            source = "tracker_model." + key
        assert torch.equal(value, sd[source]), key

    detector = load_sam3(folder, device="cpu")  # the same folder serves the image model
    assert all(torch.equal(v, sd["detector_model." + k]) for k, v in detector.model.state_dict().items())

    # Meta's interactive tracker reads three FPN levels and adds its no-memory embedding to the third
    # (stride 16): the loaded tracker keeps three levels, so that is where Sam3TrackerModel adds it.
    vision = tracker.model.config.vision_config
    assert len(vision.scale_factors) == len(vision.backbone_feature_sizes) == 3
    assert len(video.config.tracker_config.vision_config.scale_factors) == 4  # what the folder says
    pixels = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        embeddings = tracker.model.get_image_embeddings(pixels)
        level2 = tracker.model.vision_encoder(pixels).fpn_hidden_states[2]  # (1, C, 16, 16)
    expected = level2 + tracker.model.no_memory_embedding.reshape(1, -1, 1, 1)
    assert embeddings[-1].shape == expected.shape == (1, 128, 16, 16)
    torch.testing.assert_close(embeddings[-1], expected, rtol=1e-6, atol=1e-6)

    with pytest.raises(ModelError, match="without tracker weights"):
        load_sam3_tracker(tiny_image_folder, device="cpu")


def test_load_pretrained_gives_each_kind_and_refuses_other_folders(tmp_path, tiny_image_folder):
    import shutil

    from transformers import Sam3VideoModel

    from medsam3.model.configs import tiny_sam3_video_config
    from medsam3.model.loading import (
        LoadedSam3,
        LoadedSam3Tracker,
        LoadedSam3Video,
        build_processor,
        load_pretrained,
        save_sam3,
    )
    from medsam3.model.video import load_sam3_video

    torch.manual_seed(2)
    video = Sam3VideoModel(tiny_sam3_video_config()).eval()
    folder = save_sam3(video, build_processor(video.config, video=True), tmp_path / "video")
    kinds = (
        ("image", LoadedSam3, "Sam3Model", "Sam3Processor"),
        ("tracker", LoadedSam3Tracker, "Sam3TrackerModel", "Sam3TrackerProcessor"),
        ("video", LoadedSam3Video, "Sam3VideoModel", "Sam3VideoProcessor"),
    )
    for kind, record, model_class, processor_class in kinds:
        loaded = load_pretrained(folder, kind, device="cpu")
        assert type(loaded) is record, kind
        names = (type(loaded.model).__name__, type(loaded.processor).__name__)
        assert names == (model_class, processor_class), kind
        assert (loaded.device, loaded.dtype, loaded.source) == (
            torch.device("cpu"),
            torch.float32,
            str(folder.resolve()),
        )
        assert not loaded.model.training
        assert loaded.resolved is not None and loaded.resolved.origin == "--model"
    sd = video.state_dict()
    same = load_sam3_video(folder, device="cpu")
    assert all(torch.equal(v, sd[k]) for k, v in same.model.state_dict().items())

    with pytest.raises(ModelError, match="a 'sam3' model has no tracker; tracking through a volume needs"):
        load_pretrained(tiny_image_folder, "video", device="cpu")
    other = tmp_path / "other"
    shutil.copytree(tiny_image_folder, other)
    (other / "config.json").write_text(json.dumps({"model_type": "sam2"}))
    with pytest.raises(ModelError, match="model_type 'sam2' is not a SAM3 image or video model"):
        load_pretrained(other, "image", device="cpu")


def test_overwrite_replaces_folder_only_when_complete(tmp_path, tiny_model):
    from medsam3.model.loading import atomic_directory, build_processor, save_sam3

    target = tmp_path / "model"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="interrupted"), atomic_directory(target, overwrite=True) as tmp:
        (tmp / "half.bin").write_bytes(b"1")
        raise RuntimeError("interrupted")
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    save_sam3(tiny_model, build_processor(tiny_model.config), target, overwrite=True)
    assert not (target / "old.txt").exists() and (target / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
