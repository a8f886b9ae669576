"""Volumes through the Segmenter: per-slice rule, 3D post-processing, boxes, feature sharing, track mode.

Three levels: hand-computed label maps from controlled model outputs (the image encoder, text encoder and
prompt forward are replaced by fakes that read the slice and the prompt from their inputs); the tiny
random SAM3 on real volumes (encoder calls counted); and track mode with a tiny random video model.
"""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers.models.sam3.modeling_sam3 import Sam3ImageSegmentationOutput, Sam3VisionEncoderOutput

from medsam3.errors import ModelError, PromptError
from medsam3.image import Image
from medsam3.io.readers import read_image
from medsam3.predict import engine as engine_module
from medsam3.predict.options import VolumeOptions
from medsam3.predict.prompts import Prompt
from medsam3.predict.segmenter import Segmenter
from medsam3.predict.volume.prompts import VolumePrompt
from medsam3.preprocess.resize import resize_bilinear
from video_fixtures import OPEN_THRESHOLDS

HIPPOCAMPUS = "msd_hippocampus/images/hippocampus_019.nii.gz"  # MR (41, 47, 36), RAS


@pytest.fixture(scope="module")
def loaded(tiny_config):
    from transformers import Sam3Model

    from medsam3.model.loading import LoadedSam3, build_processor

    torch.manual_seed(0)
    model = Sam3Model(tiny_config).eval()
    with torch.no_grad():  # random weights: make the concept "present" so masks are kept
        model.detr_decoder.presence_head.layer3.bias.fill_(20.0)
    return LoadedSam3(model, build_processor(tiny_config), torch.device("cpu"), torch.float32, "tiny-present")


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


# --------------------------------------------------------------------------------------------------
# controlled outputs


Q = 4  # queries of the fake model
Z, H, W = 6, 20, 30


def ct_volume(direction=None, spacing=(0.5, 0.5, 2.0)) -> Image:
    """Slice k is constant at -150 + 50 k HU, so the fakes can tell slices apart by their pixels."""
    arr = np.empty((Z, H, W), dtype=np.int16)
    for k in range(Z):
        arr[k] = -150 + 50 * k
    d = np.eye(3) if direction is None else np.asarray(direction, dtype=float)
    return Image(arr, spacing, (0.0, 0.0, 0.0), d, "CT", {"path": "synthetic.nii.gz", "format": "nifti"})


def slice_of_pixel() -> dict[int, int]:
    # abdomen window [-160, 240] HU -> [0, 255]
    return {int(np.rint((-150 + 50 * k + 160) / 400 * 255)): k for k in range(Z)}


class Fakes:
    """Fake encoders and prompt forward; ``spec[(prompt, slice)] = (presence, query logit, 64x64 mask)``."""

    def __init__(self, spec):
        self.spec = spec
        self.calls: list[tuple[int, int, tuple | None]] = []  # (slice, prompt, box row)
        self.encoded: list[int] = []
        self.lookup = slice_of_pixel()

    def encode_image(self, model, pixel_values):
        u8 = np.rint((pixel_values[:, 0, 0, 0].numpy() * 0.5 + 0.5) * 255).astype(int)
        ks = [self.lookup[int(v)] for v in u8]
        self.encoded += ks
        ids = torch.tensor(ks, dtype=torch.float32)[:, None]
        return Sam3VisionEncoderOutput(fpn_hidden_states=(ids,), fpn_position_encoding=(ids,))

    def encode_text(self, model, input_ids, attention_mask=None):
        return SimpleNamespace(pooler_output=torch.arange(len(input_ids), dtype=torch.float32)[:, None, None])

    def predict_prompts(
        self, model, vision, *, text_embeds, attention_mask, boxes, box_labels, meta_text_cls
    ):
        ks = [int(v) for v in vision.fpn_hidden_states[0][:, 0]]
        ps = [int(v) for v in text_embeds[:, 0, 0]]
        n = len(ks)
        logits = np.full((n, Q), -8.0)
        presence = np.full((n, 1), -3.0)
        masks = np.full((n, Q, 64, 64), 10.0)
        for r, (k, p) in enumerate(zip(ks, ps, strict=True)):
            box = None
            if boxes is not None and int(box_labels[r, 0]) != -10:
                box = tuple(round(float(v), 6) for v in boxes[r, 0])
            self.calls.append((k, p, box))
            if (p, k) in self.spec:
                pres, logit, mask = self.spec[(p, k)]
                presence[r, 0], logits[r, 0], masks[r, 0] = pres, logit, mask
        return Sam3ImageSegmentationOutput(
            pred_logits=torch.tensor(logits, dtype=torch.float32),
            presence_logits=torch.tensor(presence, dtype=torch.float32),
            pred_masks=torch.tensor(masks, dtype=torch.float32),
        )

    def install(self, monkeypatch):
        for name in ("encode_image", "encode_text", "predict_prompts"):
            monkeypatch.setattr(engine_module, name, getattr(self, name))


def left_half():
    m = np.full((64, 64), -5.0)
    m[:, :32] = 5.0  # -> image columns 0..14 (column 14 samples grid 30.4, column 15 grid 32.6)
    return m


def right_part():
    m = np.full((64, 64), -5.0)
    m[:, 22:] = 5.0  # -> image columns 10..29 (column 10 samples grid 21.9: 0.1 * -5 + 0.9 * 5 > 0)
    return m


def scenario():
    """Prompt 0 "liver": slices 1-4 (hole on slice 2), absent by presence on 0, low score on 5.
    Prompt 1 "spleen": slices 3-5, plus an 8-voxel speck on slice 0 (rows 0-1, columns 26-29).
    Prompt 2 "kidney": slice 2 only (too few slices)."""
    spec = {}
    for k in (1, 2, 3, 4):
        spec[(0, k)] = (3.0, 2.0, left_half())
    holed = left_half()
    holed[24:40, 8:24] = -5.0
    spec[(0, 2)] = (3.0, 2.0, holed)
    spec[(0, 5)] = (3.0, -5.0, left_half())  # sig(-5) sig(3) = 0.0064 < 0.1
    for k in (3, 4, 5):
        spec[(1, k)] = (3.0, 0.0, right_part())
    speck = np.full((64, 64), -5.0)
    speck[0:7, 56:] = 5.0
    spec[(1, 0)] = (3.0, 0.0, speck)
    spec[(2, 2)] = (3.0, 1.0, np.full((64, 64), 5.0))
    return spec, holed


PROMPTS = [Prompt("liver"), Prompt("spleen"), Prompt("kidney")]
OPTIONS = VolumeOptions(min_slices=2, min_component_voxels=10)


def expected_canonical():
    out = np.zeros((Z, H, W), dtype=np.uint8)
    out[1:5, :, 0:15] = 1
    out[3:5, :, 15:] = 2  # liver (0.839 sig(5)) beats spleen (0.476 sig(5)) on columns 10..14
    out[5, :, 10:] = 2
    return out


@pytest.mark.parametrize("flipped", [False, True])
def test_slice_rule_and_3d_post_processing_by_hand(loaded, monkeypatch, flipped):
    spec, _ = scenario()
    fakes = Fakes(spec)
    fakes.install(monkeypatch)
    direction = np.diag([-1.0, -1.0, 1.0]) if flipped else None  # stored R, A, S: canonical flips y, x
    image = ct_volume(direction)
    result = Segmenter(loaded, options=OPTIONS).segment(image, PROMPTS)

    expected = expected_canonical()
    if flipped:
        expected = expected[:, ::-1, ::-1]
    np.testing.assert_array_equal(result.label_map, expected)
    assert result.label_map.dtype == np.uint8 and result.to_image().same_geometry(image)
    liver, spleen, kidney = result.labels
    assert (liver.value, spleen.value, kidney.value) == (1, 2, 3)
    assert liver.voxels == 4 * 20 * 15 and spleen.voxels == 2 * 20 * 15 + 20 * 20
    assert liver.volume_ml == pytest.approx(1200 * 0.5 * 0.5 * 2.0 / 1000)
    assert liver.score == pytest.approx(sig(2) * sig(3), rel=1e-5)
    assert spleen.score == pytest.approx(sig(0) * sig(3), rel=1e-5)
    assert liver.presence == pytest.approx(sig(3), rel=1e-5)
    assert liver.slice_range == (1, 4) and spleen.slice_range == (3, 5)
    assert liver.box3d == ((15, 0, 1, 30, 20, 5) if flipped else (0, 0, 1, 15, 20, 5))
    assert (liver.slices_detected, spleen.slices_detected, kidney.slices_detected) == (4, 4, 1)
    assert spleen.post["components_found"] == 2 and spleen.post["voxels_removed"] == 8
    assert kidney.absent and kidney.reason == "slices" and kidney.voxels == 0
    assert kidney.score == pytest.approx(sig(1) * sig(3), rel=1e-5)
    # every slice encoded once for the three prompts (one CT window), one row per slice and prompt
    assert sorted(fakes.encoded) == list(range(Z))
    assert sorted((k, p) for k, p, _ in fakes.calls) == [(k, p) for k in range(Z) for p in range(3)]
    assert result.settings["image_encoder_runs"] == Z and result.settings["slice_axis"] == 0


def test_holes_stay_without_filling_and_absent_reasons(loaded, monkeypatch):
    spec, holed = scenario()
    Fakes(spec).install(monkeypatch)
    options = dataclasses.replace(OPTIONS, fill_holes=False, min_slices=1)
    result = Segmenter(loaded, options=options).segment(ct_volume(), PROMPTS)
    slice2 = resize_bilinear(holed, (H, W)) > 0  # what the hole looks like on the slice grid
    assert not slice2[9, 7]
    np.testing.assert_array_equal(result.label_map[2] == 1, slice2)
    kidney = result.labels[2]  # everywhere on slice 2; liver (0.839) beats it (0.698) where liver is on
    assert not kidney.absent and kidney.voxels == int((~slice2).sum())

    # presence everywhere below the gate -> "presence"; scores below the threshold -> "score"
    gated = {(0, k): (-3.0, 5.0, left_half()) for k in range(Z)}
    gated.update({(1, k): (3.0, -6.0, left_half()) for k in range(Z)})
    Fakes(gated).install(monkeypatch)
    result = Segmenter(loaded).segment(ct_volume(), PROMPTS[:2])
    assert [(e.absent, e.reason) for e in result.labels] == [(True, "presence"), (True, "score")]
    assert not result.label_map.any()


def test_key_slice_box_follows_overlap_and_3d_box_limits_slices(loaded, monkeypatch):
    spec = {(0, k): (3.0, 2.0, left_half()) for k in (1, 2, 3, 4)}
    far = np.full((64, 64), -5.0)
    far[:, 44:] = 5.0  # right side only: no overlap with the left half
    spec[(0, 0)] = spec[(0, 5)] = (3.0, 2.0, far)
    spec.update({(1, k): (3.0, 1.0, np.full((64, 64), 5.0)) for k in range(Z)})
    fakes = Fakes(spec)
    fakes.install(monkeypatch)
    prompts = [
        VolumePrompt("liver", boxes=[(3, 4, 12, 16)], box_slice=2),
        VolumePrompt("spleen", box3d=(0, 0, 3, 30, 20, 5)),
    ]
    result = Segmenter(loaded).segment(ct_volume(), prompts)
    liver = np.zeros((Z, H, W), bool)
    liver[1:5, :, :15] = True  # slices 0 and 5 do not overlap their neighbours: the chain stops
    np.testing.assert_array_equal(result.label_map == 1, liver)
    assert set(np.unique(result.label_map[3:5])) == {1, 2} and not (result.label_map[[0, 1, 2, 5]] == 2).any()
    # the key-slice box is given on every slice; the 3D box only on the slices it covers (3, 4)
    key_box = (7.5 / 30, 10 / 20, 9 / 30, 12 / 20)  # cx, cy, w, h of (3, 4, 12, 16) on a 30 x 20 slice
    assert sorted(k for k, p, _ in fakes.calls if p == 0) == list(range(Z))
    assert all(box == pytest.approx(key_box, abs=1e-5) for _, p, box in fakes.calls if p == 0)
    assert sorted(k for k, p, _ in fakes.calls if p == 1) == [3, 4]
    assert all(box == pytest.approx((0.5, 0.5, 1.0, 1.0)) for _, p, box in fakes.calls if p == 1)
    assert result.labels[1].slice_range == (3, 4)
    assert result.labels[0].prompt.to_dict()["box_slice"] == 2

    # only the 3D box: only its slices are encoded
    fakes = Fakes(spec)
    fakes.install(monkeypatch)
    result = Segmenter(loaded).segment(ct_volume(), prompts[1:])
    assert sorted(fakes.encoded) == [3, 4] and result.settings["image_encoder_runs"] == 2
    # nothing on the key slice: absent, reason "key slice"
    spec[(0, 2)] = (3.0, -8.0, left_half())
    Fakes(spec).install(monkeypatch)
    result = Segmenter(loaded).segment(ct_volume(), prompts[:1])
    assert result.labels[0].absent and result.labels[0].reason == "key slice"


def test_volume_prompt_errors(loaded):
    vol = ct_volume()
    seg = Segmenter(loaded)
    with pytest.raises(PromptError, match="points are for 2D images"):
        seg.segment(vol, [Prompt("liver", points=[(1, 1)])])
    with pytest.raises(PromptError, match="needs its key slice"):
        seg.segment(vol, [Prompt("liver", boxes=[(1, 1, 5, 5)])])
    with pytest.raises(PromptError, match=r"outside the 6 slices"):
        seg.segment(vol, [VolumePrompt("liver", boxes=[(1, 1, 5, 5)], box_slice=6)])
    with pytest.raises(PromptError, match="need a 3D volume"):
        seg.segment(
            Image.from_array(np.zeros((8, 8), np.uint8)), [VolumePrompt("a", box3d=(0, 0, 0, 1, 1, 1))]
        )


# --------------------------------------------------------------------------------------------------
# the tiny random SAM3 on real volumes


def encoder_rows(model):
    rows = []
    handle = model.vision_encoder.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[0]))
    return rows, handle


@pytest.mark.parametrize("n_prompts", [1, 3])
def test_encoder_runs_once_per_slice_whatever_the_prompts(loaded, data_dir, n_prompts):
    image = read_image(data_dir / "msd_hippocampus/images/hippocampus_015.nii.gz")  # MR (28, 51, 42)
    prompts = [Prompt(t) for t in ["hippocampus", "anterior hippocampus", "brain"]]
    rows, handle = encoder_rows(loaded.model)
    try:
        result = Segmenter(loaded, options=VolumeOptions(slice_batch=8)).segment(image, prompts[:n_prompts])
    finally:
        handle.remove()
    assert rows == [8, 8, 8, 4]  # each of the 28 slices once, in batches of 8
    assert result.settings["image_encoder_runs"] == 28
    assert result.label_map.shape == image.spatial_shape
    assert result.to_image().same_geometry(image)
    assert set(np.unique(result.label_map)) <= set(range(n_prompts + 1))
    for e in result.labels:
        assert e.voxels == int((result.label_map == e.value).sum())
        if e.voxels:
            zs = np.flatnonzero((result.label_map == e.value).any(axis=(1, 2)))
            assert e.slice_range == (zs[0], zs[-1])
    assert any(e.voxels for e in result.labels)  # presence biased: something is kept


def test_ct_windows_one_pass_per_distinct_window(loaded, data_dir):
    image = read_image(data_dir / "dcmqi_ct3slice" / "ct-3slice")  # 3 slices of 512 x 512, HU
    rows, handle = encoder_rows(loaded.model)
    try:
        result = Segmenter(loaded).segment(image, [Prompt("liver"), Prompt("lung nodule"), Prompt("spleen")])
    finally:
        handle.remove()
    assert sum(rows) == 2 * 3 and result.settings["image_encoder_runs"] == 6
    windows = [e.preprocessing.split(" (")[0] for e in result.labels]
    assert windows == ["CT window abdomen", "CT window lung", "CT window abdomen"]
    assert result.label_map.shape == (3, 512, 512)


def test_slicing_along_another_axis(loaded, data_dir):
    image = read_image(data_dir / HIPPOCAMPUS)
    rows, handle = encoder_rows(loaded.model)
    try:
        result = Segmenter(loaded, options=VolumeOptions(axis=2)).segment(image, [Prompt("hippocampus")])
    finally:
        handle.remove()
    assert sum(rows) == image.spatial_shape[2] and result.settings["slice_plane"] == "sagittal"
    assert result.label_map.shape == image.spatial_shape


# --------------------------------------------------------------------------------------------------
# track mode


@pytest.fixture(scope="module")
def video():
    from transformers import Sam3VideoModel

    from medsam3.model.configs import tiny_sam3_video_config
    from medsam3.model.loading import build_processor

    config = tiny_sam3_video_config(**OPEN_THRESHOLDS)
    config.detector_config.detr_decoder_config.num_queries = 1
    torch.manual_seed(0)
    model = Sam3VideoModel(config).eval()
    with torch.no_grad():  # random weights blank tracked masks after the first slice otherwise
        model.tracker_model.mask_decoder.pred_obj_score_head.proj_out.bias.fill_(10.0)
    return SimpleNamespace(model=model, processor=build_processor(config, video=True), source="tiny-video")


def test_track_mode_maps_tracked_slices_back_to_the_input_grid(loaded, video, data_dir):
    from medsam3.predict.volume.track import track_volume_prompts
    from medsam3.preprocess.intensity import apply_intensity, intensity_parameters
    from medsam3.preprocess.orientation import to_canonical
    from medsam3.preprocess.slices import slice_to_rgb

    image = read_image(data_dir / "totalsegmentator" / "example_ct_sm.nii.gz")  # (30, 101, 122), RAS
    options = VolumeOptions(mode="track", fill_holes=False, probes=2)
    result = Segmenter(loaded, video=video, options=options).segment(image, [Prompt("liver")])

    canonical, reo = to_canonical(image)
    assert reo.flipped == (1, 2)  # the input grid differs from the canonical one
    params = intensity_parameters(canonical.array, "CT", concept="liver")
    frames = np.stack([slice_to_rgb(apply_intensity(s, params)) for s in canonical.array])
    direct = track_volume_prompts(video.model, video.processor, frames, ["liver"], probes=2)["liver"]
    assert direct.found
    np.testing.assert_array_equal(result.label_map == 1, reo.invert(direct.masks))
    (entry,) = result.labels
    assert entry.source == "video tracker" and entry.voxels == int(direct.masks.sum())
    assert entry.score == pytest.approx(float(direct.scores.max()), rel=1e-5)
    assert result.settings["mode"] == "volume (track)" and result.settings["slices_tracked"] == 30
    assert result.to_image().same_geometry(image)
    with pytest.raises(PromptError, match="text prompts only"):
        Segmenter(loaded, video=video, options=options).segment(
            image, [VolumePrompt("liver", box3d=(0, 0, 0, 5, 5, 5))]
        )
    bare = Segmenter(loaded, video=video.model).engine.video()  # a bare Sam3VideoModel gets its processor
    assert bare.model is video.model and bare.processor.tokenizer("liver")["input_ids"][1] > 0
    with pytest.raises(ModelError, match="track mode needs SAM3's video model"):
        Segmenter(loaded).engine.video()  # an in-memory image model has no source to load a video model from
