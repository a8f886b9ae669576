"""The ``fast`` preset (``--fast``): an explicit bundle of existing options, expanded once the model is known.

Three levels: the input size it picks and its expansion by hand (which options it sets, which a caller's
value keeps, what it cannot apply); the tiny random SAM3 (``fast=True`` runs exactly what the expanded
options run, and reports them); and ``medsam3 segment --fast`` with the bundled model on the bundled
hippocampus sample, plus the HTTP request model.
"""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from medsam3.errors import OptionError
from medsam3.model.input_size import reduced_input_size
from medsam3.predict.options import FAST, SegmentOptions, VolumeOptions, expand_preset


def _model(size: int, patch: int, window: int) -> SimpleNamespace:
    backbone = SimpleNamespace(image_size=size, patch_size=patch, window_size=window)
    return SimpleNamespace(config=SimpleNamespace(vision_config=SimpleNamespace(backbone_config=backbone)))


# -- by hand -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "size, patch, window, scale, expected",
    [
        (1008, 14, 24, 2 / 3, 672),  # SAM3: 48 x 48 tokens, 2 x 2 windows of 24
        (336, 14, 8, 2 / 3, 224),  # medsam3-nano: 16 x 16 tokens, 2 x 2 windows of 8
        (224, 14, 8, 2 / 3, 112),  # tiny: 149.3 px -> one window of 8 x 8 patches (112 px), not 154 px
        (1008, 14, 24, 0.5, 672),  # 504 px is 1.5 windows: the nearest whole windows (672, 2 of them)
        (1008, 14, 0, 0.5, 504),  # no windows: the nearest multiple of the patch
        (336, 14, 100, 2 / 3, 224),  # a window larger than the grid: the patch grid
        (336, 14, 8, 1.0, None),  # nothing smaller than the model's own size
        (14, 14, 8, 2 / 3, None),  # one patch
    ],
)
def test_reduced_input_size(size, patch, window, scale, expected):
    assert reduced_input_size(_model(size, patch, window), scale) == expected


def test_the_preset_is_declared_once_with_its_reasons():
    assert FAST.values == {"search": "coarse", "search_step_mm": 20.0}
    assert FAST.input_scale == pytest.approx(2 / 3)
    assert FAST.names == ("search", "search_step_mm", "image_size")
    assert set(FAST.why) == set(FAST.names)


def test_expansion_sets_the_defaults_and_keeps_what_the_caller_gave():
    options, report = expand_preset(VolumeOptions(fast=True), FAST, 224)
    assert (options.search, options.search_step_mm, options.image_size) == ("coarse", 20.0, 224)
    assert options.fast
    assert report == {
        "name": "fast",
        "set": {"search": "coarse", "search_step_mm": 20.0, "image_size": 224},
        "kept": {},
        "not_applied": {},
    }
    given = VolumeOptions(fast=True, search_step_mm=5.0, image_size=280, threshold=0.3)
    options, report = expand_preset(given, FAST, 224)
    assert (options.search, options.search_step_mm, options.image_size) == ("coarse", 5.0, 280)
    assert options.threshold == 0.3
    assert report["set"] == {"search": "coarse"}
    assert report["kept"] == {"search_step_mm": 5.0, "image_size": 280}
    again, second = expand_preset(options, FAST, 224)  # expanding twice changes nothing
    assert again == options and second["set"] == {}


def test_expansion_says_what_it_cannot_apply():
    options, report = expand_preset(VolumeOptions(fast=True), FAST, None)  # no smaller input size
    assert options.image_size is None and options.search == "coarse"
    assert "image_size" in report["not_applied"] and "image_size" not in report["set"]
    options, report = expand_preset(VolumeOptions(fast=True), FAST, 224, volume=False)  # a 2D image
    assert options.search == "full" and options.image_size == 224
    assert set(report["not_applied"]) == {"search", "search_step_mm"}
    options, report = expand_preset(SegmentOptions(fast=True), FAST, 224)
    assert options.image_size == 224 and set(report["not_applied"]) == {"search", "search_step_mm"}


def test_off_is_a_no_op():
    options = VolumeOptions(search_step_mm=7.0)
    assert expand_preset(options, FAST, 224) == (options, None)


@pytest.mark.parametrize("mode", ["track", "clips"])
def test_fast_is_refused_with_the_video_modes(mode):
    with pytest.raises(OptionError, match="fast is for mode slices and 2D images: modes track and clips"):
        VolumeOptions(fast=True, mode=mode)


def test_every_front_offers_it():
    import argparse

    from medsam3.commands.inference_options import add_option_arguments, options_from_args
    from medsam3.serve.schemas import API_OPTIONS, SegmentIn

    for front in ("segment", "evaluate"):
        parser = argparse.ArgumentParser()
        add_option_arguments(parser, front)
        assert "--fast" in parser.format_help()
        assert options_from_args(parser.parse_args(["--fast"]), front).fast is True
    assert "fast" in API_OPTIONS
    body = SegmentIn.model_validate({"prompts": [{"text": "x"}], "fast": True})
    assert body.options().fast is True


# -- tiny random SAM3 ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def loaded(tiny_model, tiny_config):
    from medsam3.model.loading import LoadedSam3, build_processor

    return LoadedSam3(tiny_model, build_processor(tiny_config), torch.device("cpu"), torch.float32, "tiny")


@pytest.fixture(scope="module")
def volume():
    from medsam3.image import Image

    rng = np.random.default_rng(5)
    array = rng.normal(100, 30, (30, 20, 24)).astype(np.float32)
    return Image.from_array(array, spacing=(1, 1, 2.0), modality="MR")


def test_fast_runs_exactly_the_expanded_options(loaded, volume):
    from medsam3.predict.segmenter import Segmenter

    seg = Segmenter(loaded, threshold=0.0, presence_threshold=0.0)
    fast = seg.segment(volume, ["liver", "spleen"], fast=True)
    spelled = seg.segment(volume, ["liver", "spleen"], search="coarse", search_step_mm=20.0, image_size=112)
    assert fast.label_map.tobytes() == spelled.label_map.tobytes()
    assert [e.score for e in fast.labels] == [e.score for e in spelled.labels]
    s = fast.settings
    assert s["preset"]["set"] == {"search": "coarse", "search_step_mm": 20.0, "image_size": 112}
    assert s["preset"]["kept"] == {} and set(s["preset"]["why"]) == set(s["preset"]["set"])
    assert s["model_input_size"] == 112
    assert (s["slice_search"]["search"], s["slice_search"]["step_slices"]) == ("coarse", 10)
    assert "preset" not in spelled.settings

    kept = seg.segment(volume, "liver", fast=True, search_step_mm=4.0)
    assert kept.settings["preset"]["kept"] == {"search_step_mm": 4.0}
    assert kept.settings["slice_search"]["step_slices"] == 2


def test_fast_on_a_2d_image_only_shrinks_the_input(loaded):
    from medsam3.image import Image
    from medsam3.predict.segmenter import Segmenter

    pixels = np.random.default_rng(1).integers(0, 255, (40, 60), dtype=np.uint8)
    image = Image.from_array(pixels, modality="US")
    result = Segmenter(loaded).segment(image, "polyp", fast=True)
    assert result.settings["model_input_size"] == 112
    assert result.settings["preset"]["set"] == {"image_size": 112}
    assert set(result.settings["preset"]["not_applied"]) == {"search", "search_step_mm"}


# -- the bundled model, end to end ---------------------------------------------------------------------
def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * int((a & b).sum()) / (int(a.sum()) + int(b.sum()))


def test_cli_fast_on_the_bundled_hippocampus(tmp_path, capsys):
    from medsam3.cli import main
    from medsam3.io.readers import read_image, read_label_map

    samples = files("medsam3") / "assets" / "samples"
    image = samples / "hippocampus_019.nii.gz"
    code = main(["segment", str(image), "-p", "hippocampus", "--fast", "-o", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "hippocampus_019.json").read_text())
    settings = summary["settings"]
    assert settings["preset"]["set"] == {"search": "coarse", "search_step_mm": 20.0, "image_size": 224}
    assert settings["model_input_size"] == 224 and settings["slice_search"]["search"] == "coarse"
    got = read_image(tmp_path / "hippocampus_019_seg.nii.gz").array == 1
    ref = read_label_map(samples / "hippocampus_019_labels.nii.gz").array > 0
    # measured 0.8338 with --fast against 0.8575 by default (benchmarks/results/fast_cpu.md)
    assert _dice(got, ref) > 0.80

    argv = [
        "segment",
        str(image),
        "-p",
        "hippocampus",
        "--fast",
        "--mode",
        "track",
        "-o",
        str(tmp_path / "t"),
    ]
    code = main(argv)
    assert code == 2 and "fast is for mode slices" in capsys.readouterr().err


def test_evaluate_reports_the_input_size_fast_runs_at(loaded):
    from medsam3.evaluate.run_model import run_options
    from medsam3.predict.segmenter import Segmenter

    assert run_options(Segmenter(loaded, fast=True)).image_size == 112
    assert run_options(Segmenter(loaded)).image_size is None


def test_the_http_api_takes_fast(serve_model, tmp_path):
    """``"fast": true`` in a request: the bundled sample volume segmented with the preset, reported."""
    from serve_fixtures import client_for, make_settings, segment, upload

    samples = files("medsam3") / "assets" / "samples"
    with client_for(make_settings(serve_model, tmp_path / "work")) as client:
        image_id = upload(client, Path(str(samples / "hippocampus_019.nii.gz"))).json()["image_id"]
        status = segment(client, image_id, {"prompts": [{"text": "hippocampus"}], "fast": True})
        assert status["status"] == "done", status
        settings = client.get(f"/api/jobs/{status['job_id']}/summary").json()["settings"]
    assert settings["preset"]["set"] == {"search": "coarse", "search_step_mm": 20.0, "image_size": 112}
    assert settings["model_input_size"] == 112 and settings["slice_search"]["search"] == "coarse"
