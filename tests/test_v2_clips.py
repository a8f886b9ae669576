"""Medical SAM3 V2's 3D recipe: converting a V2-layout video checkpoint, and ``--mode clips``.

Three levels: hand-computed clip ranges, V2's intensity rule and its pixel-wise class fusion; a tiny
checkpoint written in Meta's (= V2's) key layout converted with ``--v2`` (configuration checked setting by
setting, loaded with no missing / unexpected keys, run in clips mode); clips mode on the tiny video model,
checked against its definition (independent clips, the fusion rule) on a real sample volume.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import medsam3
from medsam3.cli import main
from medsam3.predict.volume.clips import FUSION_FLOOR, clip_ranges, clips_volume_prompts, fuse_pixel_score
from medsam3.preprocess.intensity import minmax_slice
from model_meta_layout import hf_to_meta, tie_fourier_copies

HIPPO = Path(medsam3.__file__).parent / "assets" / "samples" / "hippocampus_019.nii.gz"


# -- hand-computed ---------------------------------------------------------------------------------------
def test_clip_ranges_are_non_overlapping_and_the_last_may_be_short():
    assert clip_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert clip_ranges(8, 4) == [(0, 4), (4, 8)]
    assert clip_ranges(3, 4) == [(0, 3)]
    assert clip_ranges(5, 1) == [(k, k + 1) for k in range(5)]
    with pytest.raises(ValueError, match="at least 1"):
        clip_ranges(5, 0)


def test_minmax_slice_is_v2s_rule():
    stored = np.array([[0, 7], [200, 255]], dtype=np.uint8)
    assert minmax_slice(stored) is stored  # uint8 as stored
    ct = np.array([[-1000.0, 0.0], [1000.0, np.nan]], dtype=np.float32)
    # nan -> 0, then (x - min) / (max - min) * 255, truncated
    np.testing.assert_array_equal(minmax_slice(ct), np.array([[0, 127], [255, 127]], dtype=np.uint8))
    np.testing.assert_array_equal(minmax_slice(np.full((2, 2), 5.0)), np.zeros((2, 2), np.uint8))
    assert minmax_slice(np.array([[0, 10]], dtype=np.int16)).tolist() == [[0, 255]]


def test_pixel_score_fusion_takes_the_best_probability_above_one_half_inside_each_mask():
    on = np.ones(6, dtype=bool)
    masks = [on.copy(), on.copy(), np.array([1, 1, 1, 1, 1, 0], dtype=bool)]
    probs = [
        np.array([0.9, 0.6, 0.4, 0.7, 0.5, 0.8], dtype=np.float32),  # label 2
        np.array([0.8, 0.6, 0.45, 0.9, 0.2, 0.1], dtype=np.float32),  # label 1
        np.array([0.95, 0.7, 0.3, 0.7, 0.6, 0.99], dtype=np.float32),  # label 5, masked off at the end
    ]
    segs = fuse_pixel_score(masks, probs, [2, 1, 5])
    # voxel 0: 5 wins (0.95); 1: 5 (0.7); 2: nothing above 0.5; 3: 1 (0.9 > 0.7, 0.7 not > 0.9);
    # 4: 5 (0.6; label 2's 0.5 is not above the floor); 5: 2 (label 5 is masked off)
    assert segs.tolist() == [5, 5, 0, 1, 5, 2]
    tie = fuse_pixel_score([on[:1], on[:1]], [np.array([0.7]), np.array([0.7])], [3, 4])
    assert tie.tolist() == [3]  # ties keep the lower label
    assert fuse_pixel_score([on[:1]], [np.array([0.7])], [300]).dtype == np.uint16
    assert FUSION_FLOOR == 0.5


# -- V2 checkpoint -> convert --v2 ------------------------------------------------------------------------
def _tiny_v2_checkpoint(folder: Path) -> Path:
    """A V2 trainer checkpoint of a tiny video model: Meta's key layout under "model", RoPE tables kept."""
    from transformers import Sam3VideoModel

    from medsam3.model.configs import sam3_video_config, small_sam3_config

    detector = small_sam3_config(text_heads=1)
    detector.text_config.hidden_act = "gelu"
    detector.vision_config.backbone_config.layer_norm_eps = 1e-5
    torch.manual_seed(0)
    model = Sam3VideoModel(sam3_video_config(detector, memory_attention_layers=1)).eval()
    tie_fourier_copies(model)
    meta = hf_to_meta(model.state_dict(), model.config)
    assert any(k.endswith("freqs_cis") for k in meta)
    path = folder / "checkpoint_3D.pt"
    torch.save({"model": meta, "optimizer": {}, "epoch": 9}, path)
    return path


@pytest.fixture(scope="module")
def v2_model(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("v2")
    ckpt = _tiny_v2_checkpoint(folder)
    out = folder / "medsam3-v2"
    code = main(["convert", str(ckpt), str(out), "--v2", "--report", str(folder / "report.json")])
    assert code == 0
    return out, json.loads((folder / "report.json").read_text())


def test_v2_conversion_configures_the_video_model_as_v2_runs_it(v2_model):
    out, report = v2_model
    config = json.loads((out / "config.json").read_text())
    assert report["ok"] and report["recipe"] == "v2"
    assert not report["missing"] and not report["unexpected"] and not report["mis_shaped"]
    assert any("freqs_cis" in d["meta"] for d in report["dropped"])
    det_vit = config["detector_config"]["vision_config"]["backbone_config"]
    assert det_vit["image_size"] == 504
    assert config["detector_config"]["vision_config"]["backbone_feature_sizes"] == [
        [144, 144],
        [72, 72],
        [36, 36],
    ]
    tracker = config["tracker_config"]
    assert tracker["image_size"] == 504
    assert tracker["vision_config"]["backbone_feature_sizes"] == [[144, 144], [72, 72], [36, 36]]
    assert tracker["memory_attention_rope_feat_sizes"] == [36, 36]
    assert config["low_res_mask_size"] == 144
    for key in ("hotstart_delay", "hotstart_unmatch_thresh", "hotstart_dup_thresh"):
        assert config[key] == 0
    assert config["score_threshold_detection"] == 0.5 and config["new_det_thresh"] == 0.7
    assert report["sizes"]["image_size"] == {
        "from": 224,
        "to": 504,
        "why": "Medical SAM3 V2 runs the video model at 504 px",
    }
    assert "position_embeddings" in report["sizes"]  # the tiny model's embedding spans its whole grid
    processor = json.loads((out / "processor_config.json").read_text())
    assert "504" in json.dumps(processor)


def test_v2_model_loads_strictly_and_its_memory_sizes_follow_the_input(v2_model):
    from medsam3.model.video import load_sam3_video

    out, _ = v2_model
    model = load_sam3_video(out, device="cpu").model
    assert model.tracker_model.prompt_encoder.mask_input_size == (144, 144)
    assert model.low_res_mask_size == 144
    assert model.hotstart_delay == 0


def test_v2_model_runs_in_clips_mode(v2_model, tmp_path, capsys):
    out, _ = v2_model
    code = main(
        [
            "segment",
            str(HIPPO),
            "-p",
            "hippocampus",
            "--mode",
            "clips",
            "--model",
            str(out),
            "-o",
            str(tmp_path),
        ]
    )
    assert code == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "hippocampus_019.json").read_text())
    assert summary["settings"]["mode"] == "volume (clips)"
    assert summary["settings"]["clips"]["length"] == 4


def test_image_size_option_and_refusals(tmp_path, capsys):
    ckpt = _tiny_v2_checkpoint(tmp_path)
    code = main(["convert", str(ckpt), str(tmp_path / "m112"), "--v2", "--image-size", "112"])
    assert code == 0
    config = json.loads((tmp_path / "m112" / "config.json").read_text())
    assert config["low_res_mask_size"] == 32 and config["tracker_config"]["image_size"] == 112
    capsys.readouterr()
    assert main(["convert", str(ckpt), str(tmp_path / "bad"), "--v2", "--image-size", "100"]) == 2
    assert "not a positive multiple of the patch size 14" in capsys.readouterr().err
    assert main(["convert", str(ckpt), str(tmp_path / "img"), "--v2", "--image-only"]) == 2
    assert "video model" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists() and not (tmp_path / "img").exists()


# -- clips mode on the tiny video model -------------------------------------------------------------------
def _frames(n: int = 7) -> np.ndarray:
    from medsam3.io.readers import read_image
    from medsam3.preprocess.intensity import normalize_intensity
    from medsam3.preprocess.slices import slice_to_rgb

    volume = read_image(HIPPO).array[:n].astype(np.float32)
    grey = normalize_intensity(volume, "MR")
    return np.stack([slice_to_rgb(s) for s in grey])


def test_clips_are_independent_sessions(serve_model):
    from medsam3.model.video import load_sam3_video

    video = load_sam3_video(serve_model, device="cpu")
    model, processor = video.model, video.processor
    frames = _frames(7)
    whole = clips_volume_prompts(model, processor, frames, ["hippocampus", "liver"], clip_length=3)
    assert whole["hippocampus"].masks.any()
    for first, stop in clip_ranges(7, 3):
        alone = clips_volume_prompts(
            model, processor, frames[first:stop], ["hippocampus", "liver"], clip_length=3
        )
        for text in ("hippocampus", "liver"):
            np.testing.assert_array_equal(alone[text].masks, whole[text].masks[first:stop])
            np.testing.assert_allclose(alone[text].probs, whole[text].probs[first:stop], atol=1e-6)
    # one prompt alone gives what it gets beside another (prompts share a session, never objects)
    single = clips_volume_prompts(model, processor, frames, ["liver"], clip_length=3)
    np.testing.assert_array_equal(single["liver"].masks, whole["liver"].masks)
    res = whole["hippocampus"]
    assert res.probs[res.masks].min() > 0.5 - 1e-6 or not res.masks.any()


def test_segment_clips_label_map_is_the_pixel_score_fusion(serve_model, tmp_path, capsys):
    from medsam3.io.readers import read_image, read_label_map

    out = tmp_path / "out"
    argv = [
        "segment",
        str(HIPPO),
        "-p",
        "anterior hippocampus",
        "-p",
        "posterior hippocampus",
        "-o",
        str(out),
    ]
    argv += ["--model", str(serve_model), "--mode", "clips", "--clip-length", "5", "--no-overlay"]
    assert main(argv) == 0, capsys.readouterr().err
    labels = read_label_map(out / "hippocampus_019_seg.nii.gz", reference=read_image(HIPPO)).array
    summary = json.loads((out / "hippocampus_019.json").read_text())
    assert summary["settings"]["clips"] == {
        "length": 5,
        "count": len(clip_ranges(summary["settings"]["slices"], 5)),
        "fusion": "pixel_score (V2): highest probability above 0.5 inside each class's mask",
        "post_processing_3d": False,
    }
    assert set(np.unique(labels)) <= {0, 1, 2} and labels.any()


def test_clips_option_rules(tmp_path, capsys):
    for extra, message in (
        (["--clip-length", "0"], "clip-length"),
        (["--tta"], "mode clips"),
        (["--image-size", "448"], "image_size cannot be combined with mode clips"),
    ):
        code = main(["segment", str(HIPPO), "-p", "x", "--mode", "clips", "-o", str(tmp_path / "o"), *extra])
        assert code == 2 and message in capsys.readouterr().err
    code = main(["segment", str(HIPPO), "-p", "x", "--intensity", "minmax", "-o", str(tmp_path / "o")])
    assert code == 2 and "intensity minmax" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
