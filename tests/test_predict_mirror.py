"""Test-time mirroring (medsam3.predict.tta): hand-computed merges, the segmenter with controlled model
outputs, the tiny random SAM3 (mirror equivariance, positional concepts, volumes, refusals) and the CLIs.
The bundled model with mirroring on the real samples: tests/test_nano_model.py.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from transformers.models.sam3.modeling_sam3 import Sam3ImageSegmentationOutput

from medsam3.errors import OptionError
from medsam3.image import Image
from medsam3.predict import engine as engine_module
from medsam3.predict.options import VolumeOptions
from medsam3.predict.prompts import Prompt
from medsam3.predict.segmenter import Segmenter
from medsam3.predict.tta import (
    MIRRORS,
    merge_mirrored,
    mirror_boxes,
    mirror_grid,
    mirroring_settings,
    mirrors_for,
)


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def sig(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


@pytest.fixture(scope="module")
def loaded(tiny_model, tiny_config):
    from medsam3.model.loading import LoadedSam3, build_processor

    return LoadedSam3(tiny_model, build_processor(tiny_config), torch.device("cpu"), torch.float32, "tiny")


def rgb_image(h=40, w=60, seed=0):
    arr = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    return Image.from_array(arr, spacing=(1.0, 1.0), modality="RGB", color=True, path="synthetic.png")


# ------------------------------------------------------------------------------------------------------
# hand-computed values


def test_mirror_grid_and_boxes_by_hand():
    grid = torch.tensor([[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]])  # (1, y=2, x=3)
    assert mirror_grid(grid, ()) is grid
    assert mirror_grid(grid, (-1,)).tolist() == [[[3.0, 2.0, 1.0], [6.0, 5.0, 4.0]]]
    assert mirror_grid(grid, (-2,)).tolist() == [[[4.0, 5.0, 6.0], [1.0, 2.0, 3.0]]]
    assert mirror_grid(grid, (-2, -1)).tolist() == [[[6.0, 5.0, 4.0], [3.0, 2.0, 1.0]]]
    boxes = torch.tensor([[[0.25, 0.125, 0.5, 0.25]]])  # cx, cy, w, h
    assert mirror_boxes(None, (-1,)) is None
    assert mirror_boxes(boxes, ()) is boxes
    assert mirror_boxes(boxes, (-1,)).tolist() == [[[0.75, 0.125, 0.5, 0.25]]]
    assert mirror_boxes(boxes, (-2,)).tolist() == [[[0.25, 0.875, 0.5, 0.25]]]
    assert mirror_boxes(boxes, (-2, -1)).tolist() == [[[0.75, 0.875, 0.5, 0.25]]]
    assert boxes.tolist() == [[[0.25, 0.125, 0.5, 0.25]]]  # the input is not changed


def test_settings_and_passes_by_hand():
    assert mirroring_settings(((),)) is None
    assert mirroring_settings(MIRRORS) == ["none", "x", "y", "xy"]
    assert mirrors_for(MIRRORS, ["fetal head", "left kidney"]) == MIRRORS
    assert mirrors_for(MIRRORS, ["left kidney", "anterior hippocampus"]) == ((),)
    assert mirrors_for(((),), ["fetal head"]) == ((),)


def _pass(logits, presence, masks):
    return Sam3ImageSegmentationOutput(
        pred_logits=torch.tensor(logits, dtype=torch.float32),
        presence_logits=torch.tensor(presence, dtype=torch.float32)[:, None],
        pred_masks=torch.tensor(masks, dtype=torch.float32),
    )


def test_merge_by_hand():
    """Two rows, two queries, masks 1 x 2 (x = 0, 1). Row 0 is mirrored, row 1 is not.

    Row 0: best query per pass has probability 0.8, 0.6, 0.4, 0.2 (mean 0.5 -> logit 0), presence 0.9,
    0.7, 0.5, 0.3 (mean 0.6); its mask probabilities on the pass's own grid are (0.9, 0.1), (0.9, 0.1),
    (0.3, 0.5), (0.3, 0.5); mirrored back along x in passes 1 and 3: (0.9, 0.1), (0.1, 0.9), (0.3, 0.5),
    (0.5, 0.3), mean (0.45, 0.45).
    Row 1: the first pass alone: best query 1 (probability 0.7), presence 0.8, mask (0.2, 0.6).
    """
    p = [[0.8, 0.6, 0.4, 0.2], [0.7, 0.1, 0.3, 0.2]]  # row 0's best per pass; row 1 first pass, others
    outs = []
    for f in range(4):
        other = 0.05  # the other query of each row, never the best
        logits = [[logit(p[0][f]), logit(other)], [logit(other), logit(p[1][f])]]
        presence = [logit([0.9, 0.7, 0.5, 0.3][f]), logit([0.8, 0.2, 0.2, 0.2][f])]
        own = [(0.9, 0.1), (0.9, 0.1), (0.3, 0.5), (0.3, 0.5)][f]
        masks = np.full((2, 2, 1, 2), logit(0.99))  # never-chosen queries: confident, must not leak in
        masks[0, 0, 0] = [logit(v) for v in own]
        masks[1, 1, 0] = [logit(0.2), logit(0.6)] if f == 0 else [logit(0.99), logit(0.01)]
        outs.append(_pass(logits, presence, masks))
    merged = merge_mirrored(outs, MIRRORS, [True, False])
    assert merged.pred_logits.shape == (2, 1) and merged.pred_masks.shape == (2, 1, 1, 2)
    np.testing.assert_allclose(sig(merged.pred_logits.numpy())[:, 0], [0.5, 0.7], atol=1e-6)
    np.testing.assert_allclose(sig(merged.presence_logits.numpy())[:, 0], [0.6, 0.8], atol=1e-6)
    np.testing.assert_allclose(sig(merged.pred_masks.numpy())[:, 0, 0], [[0.45, 0.45], [0.2, 0.6]], atol=1e-6)


def test_merge_rejects_bad_inputs():
    out = _pass([[0.0]], [0.0], np.zeros((1, 1, 1, 1)))
    with pytest.raises(ValueError, match="one output per mirror"):
        merge_mirrored([out, out], [(-1,), ()], [True])
    with pytest.raises(ValueError, match="mirrored_rows"):
        merge_mirrored([out], [()], [True, True])


# ------------------------------------------------------------------------------------------------------
# the segmenter with controlled model outputs


def test_segmenter_merges_the_four_passes_by_hand(loaded, monkeypatch):
    """Prompt "polyp" (mirrored) with a box, "left polyp" (positional, not mirrored), on a 4 x 4 mask grid.

    "polyp" mask logits +5 on columns 0-1 in the plain pass, and on the column that maps back to column 0
    in the three mirrored passes (column 3 on the x-mirrored grids): mean probabilities sigmoid(5) on
    column 0, (sigmoid(5) + 3 sigmoid(-5)) / 4 on column 1, sigmoid(-5) elsewhere. The merged result must
    equal a plain run whose model gives those logits.
    """
    calls = []

    def fake(model, vision, *, input_ids, attention_mask, boxes, box_labels, meta_text_cls):
        f = len(calls)
        calls.append(None if boxes is None else boxes.clone())
        n = input_ids.shape[0]
        masks = np.full((n, 1, 4, 4), -5.0)
        col = 3 if MIRRORS[f] in ((-1,), (-2, -1)) else 0
        masks[0, 0, :, col] = 5.0
        if f == 0:
            masks[0, 0, :, 1] = 5.0
            masks[1, 0, :, 2:] = 5.0
        else:
            masks[1, 0] = 5.0  # the positional prompt's mirrored passes, if any, would fill the image
        return Sam3ImageSegmentationOutput(
            pred_logits=torch.full((n, 1), [2.0, 1.0, 0.0, -1.0][f]),
            presence_logits=torch.full((n, 1), 3.0),
            pred_masks=torch.tensor(masks, dtype=torch.float32),
        )

    monkeypatch.setattr(engine_module, "predict_prompts", fake)
    image = rgb_image(8, 8)
    prompts = [Prompt("polyp", boxes=[(0.0, 0.0, 2.0, 4.0)]), Prompt("left polyp")]
    result = Segmenter(loaded, threshold=0.0, tta=True).segment(image, prompts)
    assert len(calls) == 4
    # the box (normalised cxcywh (0.125, 0.25, 0.25, 0.5)) is mirrored with the image in each pass
    centres = [tuple(round(v, 6) for v in c[0, 0, :2].tolist()) for c in calls]
    assert centres == [(0.125, 0.25), (0.875, 0.25), (0.125, 0.75), (0.875, 0.75)]
    assert result.settings["test_time_mirroring"] == ["none", "x", "y", "xy"]
    assert result.settings["image_encoder_runs"] == 4

    col1 = float(np.log((sig(5) + 3 * sig(-5)) / 4 / (1 - (sig(5) + 3 * sig(-5)) / 4)))
    expected = np.full((2, 1, 4, 4), -5.0)
    expected[0, 0, :, 0] = 5.0
    expected[0, 0, :, 1] = col1
    expected[1, 0, :, 2:] = 5.0
    mean_score = float(np.mean(sig([2.0, 1.0, 0.0, -1.0])))

    def plain(model, vision, *, input_ids, attention_mask, boxes, box_labels, meta_text_cls):
        return Sam3ImageSegmentationOutput(
            pred_logits=torch.tensor([[logit(mean_score)], [2.0]]),
            presence_logits=torch.full((2, 1), 3.0),
            pred_masks=torch.tensor(expected, dtype=torch.float32),
        )

    monkeypatch.setattr(engine_module, "predict_prompts", plain)
    reference = Segmenter(loaded, threshold=0.0).segment(image, prompts)
    np.testing.assert_array_equal(result.label_map, reference.label_map)
    assert (result.label_map == 1).any() and (result.label_map == 2).any()
    for got, want in zip(result.labels, reference.labels, strict=True):
        assert got.score == pytest.approx(want.score, rel=1e-5)
    assert result.labels[0].score == pytest.approx(mean_score * sig(3.0), rel=1e-5)
    assert result.labels[1].score == pytest.approx(sig(2.0) * sig(3.0), rel=1e-5)  # the plain pass only


# ------------------------------------------------------------------------------------------------------
# the tiny random SAM3


def test_tiny_model_mirroring_is_mirror_equivariant(loaded):
    """Mirroring averages over a group of mirrors: segmenting the x-mirrored image gives the mirrored
    result (the same passes in another order). Without mirroring the tiny model is not equivariant."""
    seg = Segmenter(loaded, threshold=0.0, presence_threshold=0.0, tta=True)
    image = rgb_image(40, 60)
    flipped = Image.from_array(
        image.array[:, ::-1].copy(), spacing=(1.0, 1.0), modality="RGB", color=True, path="flipped.png"
    )
    a = seg.segment(image, [Prompt("polyp")])
    b = seg.segment(flipped, [Prompt("polyp")])
    assert a.settings["image_encoder_runs"] == 4
    assert 0 < (a.label_map == 1).sum() < a.label_map.size
    mismatch = (a.label_map[:, ::-1] != b.label_map).sum()
    assert mismatch <= 2  # float summation order may move a pixel whose mean probability is 0.5
    assert a.labels[0].score == pytest.approx(b.labels[0].score, rel=1e-4)
    plain = Segmenter(loaded, threshold=0.0, presence_threshold=0.0)
    pa, pb = plain.segment(image, [Prompt("polyp")]), plain.segment(flipped, [Prompt("polyp")])
    assert (pa.label_map[:, ::-1] != pb.label_map).sum() > 10 * max(mismatch, 1)


def test_tiny_model_positional_concepts_are_not_mirrored(loaded):
    image = rgb_image(40, 60, seed=3)
    prompts = [Prompt("left kidney"), Prompt("anterior hippocampus")]
    mirrored = Segmenter(loaded, threshold=0.0, presence_threshold=0.0, tta=True).segment(image, prompts)
    plain = Segmenter(loaded, threshold=0.0, presence_threshold=0.0).segment(image, prompts)
    assert mirrored.settings["image_encoder_runs"] == 1  # no prompt to mirror: one pass
    np.testing.assert_array_equal(mirrored.label_map, plain.label_map)
    for got, want in zip(mirrored.labels, plain.labels, strict=True):
        assert got.score == pytest.approx(want.score, rel=1e-5)
        assert got.presence == pytest.approx(want.presence, rel=1e-5)


def test_tiny_model_volume_mirroring(loaded):
    """A volume: four encodings per slice, mirror equivariance along x, and positional prompts as without
    mirroring (one label map, prompt values 1 and 2)."""
    rng = np.random.default_rng(5)
    arr = rng.normal(100, 30, size=(3, 24, 32)).astype(np.float32)
    vol = Image.from_array(arr, spacing=(2.0, 1.0, 1.0), modality="MR", path="synthetic.nii.gz")
    vol_x = Image.from_array(
        arr[:, :, ::-1].copy(), spacing=(2.0, 1.0, 1.0), modality="MR", path="synthetic_x.nii.gz"
    )
    options = VolumeOptions(fill_holes=False)
    seg = Segmenter(loaded, threshold=0.0, presence_threshold=0.0, tta=True, options=options)
    a = seg.segment(vol, [Prompt("hippocampus")])
    b = seg.segment(vol_x, [Prompt("hippocampus")])
    assert a.settings["image_encoder_runs"] == 12 and a.settings["test_time_mirroring"] == [
        "none",
        "x",
        "y",
        "xy",
    ]
    assert 0 < (a.label_map == 1).sum() < a.label_map.size
    assert (a.label_map[:, :, ::-1] != b.label_map).sum() <= 3
    both = [Prompt("hippocampus"), Prompt("posterior hippocampus")]
    m = seg.segment(vol, both)
    p = Segmenter(loaded, threshold=0.0, presence_threshold=0.0, options=options).segment(vol, both)
    assert m.settings["image_encoder_runs"] == 12
    assert m.labels[1].score == pytest.approx(p.labels[1].score, rel=1e-5)
    only = [Prompt("posterior hippocampus")]
    np.testing.assert_array_equal(
        seg.segment(vol, only).label_map,
        Segmenter(loaded, threshold=0.0, presence_threshold=0.0, options=options)
        .segment(vol, only)
        .label_map,
    )


def test_mirroring_refusals(loaded):
    with pytest.raises(OptionError, match="cannot be combined with instances"):
        Segmenter(loaded, tta=True, instances=True)
    seg = Segmenter(loaded, tta=True)
    image = rgb_image()
    with pytest.raises(OptionError, match="cannot be combined with instances"):
        seg.segment(image, [Prompt("polyp")], instances=True)
    with pytest.raises(OptionError, match="cannot be combined with point prompts"):
        seg.segment(image, [Prompt("polyp", points=[(3.0, 4.0)], point_labels=[1])])
    vol = Image.from_array(
        np.zeros((2, 8, 8), np.float32), spacing=(1.0, 1.0, 1.0), modality="MR", path="v.nii.gz"
    )
    with pytest.raises(OptionError, match="cannot be combined with mode track"):
        seg.segment(vol, [Prompt("polyp")], mode="track")


# ------------------------------------------------------------------------------------------------------
# the CLIs


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, loaded):
    from medsam3.model.loading import save_sam3

    folder = tmp_path_factory.mktemp("tiny_model")
    save_sam3(loaded.model, loaded.processor, folder)
    return folder


def test_segment_cli_tta(tiny_folder, tmp_path):
    from PIL import Image as PILImage

    from medsam3.cli import main

    path = tmp_path / "in.png"
    PILImage.fromarray(rgb_image(30, 40).array).save(path)
    before = path.read_bytes()
    out = tmp_path / "out"
    assert (
        main(
            [
                "segment",
                str(path),
                "-p",
                "polyp",
                "-o",
                str(out),
                "--model",
                str(tiny_folder),
                "--tta",
                "--threshold",
                "0",
                "--presence-threshold",
                "0",
            ]
        )
        == 0
    )
    summary = json.loads((out / "in.json").read_text())
    assert summary["settings"]["test_time_mirroring"] == ["none", "x", "y", "xy"]
    assert summary["settings"]["image_encoder_runs"] == 4
    bad = tmp_path / "bad"
    assert (
        main(
            [
                "segment",
                str(path),
                "-p",
                "polyp",
                "-o",
                str(bad),
                "--model",
                str(tiny_folder),
                "--tta",
                "--instances",
            ]
        )
        == 2
    )
    assert not bad.exists() or not any(bad.iterdir())
    assert path.read_bytes() == before


def test_evaluate_refuses_tta_with_instances_or_points():
    from medsam3.evaluate.run_model import RunOptions, evaluation_options

    RunOptions(inference=evaluation_options(tta=True)).check()
    with pytest.raises(OptionError, match="cannot be combined with instances"):
        RunOptions(inference=evaluation_options(tta=True, instances=True)).check()
    with pytest.raises(OptionError, match="cannot be combined with point prompts"):
        RunOptions(inference=evaluation_options(tta=True), prompt_mode="point").check()
