"""The 2D Segmenter: prompts, presence / threshold gating, pixel-wise resolution, cached image features.

Three levels: hand-computed label maps from controlled model outputs (the model's prompt forward is
replaced by fixed logits), the tiny random SAM3 (and tracker) end to end, and prompt parsing by hand.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from transformers.models.sam3.modeling_sam3 import Sam3ImageSegmentationOutput

from medsam3.errors import InputError, PromptError
from medsam3.image import Image
from medsam3.predict import engine as engine_module
from medsam3.predict.prompts import Prompt, parse_box, parse_point, prompts_from_cli, validate_prompt
from medsam3.predict.segmenter import Segmenter

# --------------------------------------------------------------------------------------------------
# fixtures: a tiny model + processor (+ tracker), built offline


@pytest.fixture(scope="module")
def processor(tiny_config):
    from medsam3.model.loading import build_processor

    return build_processor(tiny_config)


@pytest.fixture(scope="module")
def loaded(tiny_model, processor):
    from medsam3.model.loading import LoadedSam3

    return LoadedSam3(tiny_model, processor, torch.device("cpu"), torch.float32, "tiny-test-model")


@pytest.fixture(scope="module")
def tracker(tiny_config):
    from transformers import Sam3TrackerConfig, Sam3TrackerModel

    config = Sam3TrackerConfig(
        vision_config=tiny_config.vision_config.to_dict(),
        prompt_encoder_config={"hidden_size": 128, "image_size": 224, "patch_size": 14},
        mask_decoder_config={
            "hidden_size": 128,
            "mlp_dim": 256,
            "num_attention_heads": 4,
            "iou_head_hidden_dim": 64,
        },
    )
    torch.manual_seed(0)
    model = Sam3TrackerModel(config).eval()
    with torch.no_grad():  # random weights give object scores near 0: make the object "present"
        model.mask_decoder.pred_obj_score_head.proj_out.bias.fill_(6.0)
    return model


def rgb_image(h=40, w=60, spacing=(0.25, 0.5)):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    return Image.from_array(arr, spacing=spacing, modality="RGB", color=True, path="synthetic.png")


# --------------------------------------------------------------------------------------------------
# controlled outputs: hand-checkable label maps


def fake_outputs(pred_logits, presence_logits, masks):
    """Replace the prompt forward by fixed outputs; rows are matched to prompts by their order."""
    calls = []

    def fake(model, vision, *, input_ids, attention_mask, boxes, box_labels, meta_text_cls):
        start = sum(calls)
        n = input_ids.shape[0]
        calls.append(n)
        return Sam3ImageSegmentationOutput(
            pred_logits=torch.tensor(pred_logits[start : start + n], dtype=torch.float32),
            presence_logits=torch.tensor(presence_logits[start : start + n], dtype=torch.float32)[:, None],
            pred_masks=torch.tensor(masks[start : start + n], dtype=torch.float32),
        )

    return fake


def quadrant_case():
    """Three prompts on a 64 x 64 mask grid, 8 queries each.

    Prompt "a": query 2 (logit 2) is +4 in the top-left quadrant, +0.1 in the top-right, -4 below.
    Prompt "b": query 5 (logit 0) is +8 everywhere. Prompt "c": every query at -5 (score 0.0064).
    All presence logits 3. Other queries have logit -6 and masks of +10 (never chosen).
    """
    q = 8
    logits = np.full((3, q), -6.0)
    logits[0, 2], logits[1, 5] = 2.0, 0.0
    logits[2, :] = -5.0
    masks = np.full((3, q, 64, 64), 10.0)
    masks[0, 2] = -4.0
    masks[0, 2, :32, :32] = 4.0
    masks[0, 2, :32, 32:] = 0.1
    masks[1, 5] = 8.0
    return logits, np.full(3, 3.0), masks


def sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def test_pixelwise_resolution_by_hand(loaded, monkeypatch):
    logits, presence, masks = quadrant_case()
    monkeypatch.setattr(engine_module, "predict_prompts", fake_outputs(logits, presence, masks))
    image = rgb_image()  # 40 x 60: mask grid rows 0-31 -> image rows 0-19, cols 0-31 -> image cols 0-29
    result = Segmenter(loaded).segment(image, [Prompt("a"), Prompt("b"), Prompt("c")])

    # Scores: a = sig(2) sig(3) = 0.8390, b = sig(0) sig(3) = 0.4763; c = sig(-5) sig(3) < 0.1 -> absent.
    # Top-left: a 0.8390 sig(4) = 0.824 beats b 0.4763 sig(8) = 0.476.
    # Top-right: a 0.8390 sig(0.1) = 0.440 loses to b 0.476. Bottom: only b is on.
    expected = np.full((40, 60), 2, dtype=np.uint8)
    expected[:20, :30] = 1
    np.testing.assert_array_equal(result.label_map, expected)
    assert result.label_map.dtype == np.uint8

    a, b, c = result.labels
    assert (a.value, b.value, c.value) == (1, 2, 3)
    assert a.score == pytest.approx(sig(2) * sig(3), rel=1e-5)
    assert b.score == pytest.approx(0.5 * sig(3), rel=1e-5)
    assert a.presence == pytest.approx(sig(3), rel=1e-5)
    assert (a.area_px, b.area_px, c.area_px) == (600, 1800, 0)
    assert a.area_mm2 == pytest.approx(600 * 0.125)
    assert a.box == (0, 0, 30, 20) and b.box == (0, 0, 60, 40) and c.box is None
    assert not a.absent and not b.absent
    assert c.absent and c.reason == "score" and c.score == pytest.approx(sig(-5) * sig(3), rel=1e-5)


def test_presence_gates_even_a_confident_query(loaded, monkeypatch):
    logits, presence, masks = quadrant_case()
    logits[0, 2] = 10.0
    presence[0] = -1.0  # presence 0.269 < 0.5; the query score 0.269 would pass the 0.1 threshold
    monkeypatch.setattr(engine_module, "predict_prompts", fake_outputs(logits, presence, masks))
    result = Segmenter(loaded).segment(rgb_image(), [Prompt("a"), Prompt("b")])
    a, b = result.labels
    assert a.absent and a.reason == "presence" and a.area_px == 0
    assert a.presence == pytest.approx(sig(-1.0), rel=1e-5)
    assert (result.label_map == 2).all()

    # A lower presence threshold lets it through; a high score threshold then removes both.
    monkeypatch.setattr(engine_module, "predict_prompts", fake_outputs(logits, presence, masks))
    result = Segmenter(loaded, presence_threshold=0.2).segment(rgb_image(), [Prompt("a"), Prompt("b")])
    assert not result.labels[0].absent
    monkeypatch.setattr(engine_module, "predict_prompts", fake_outputs(logits, presence, masks))
    result = Segmenter(loaded, presence_threshold=0.2, threshold=0.5).segment(
        rgb_image(), [Prompt("a"), Prompt("b")]
    )
    assert [e.reason for e in result.labels] == ["score", "score"]
    assert not result.label_map.any()


def test_instances_mode_keeps_every_query_above_threshold(loaded, monkeypatch):
    logits, presence, masks = quadrant_case()
    logits[0, 6] = 1.0  # a second instance for "a": score sig(1) sig(3) = 0.696
    masks[0, 6] = -4.0
    masks[0, 6, 32:, :] = 6.0  # bottom half, where "b" (0.476 sig(8)) competes and loses
    monkeypatch.setattr(engine_module, "predict_prompts", fake_outputs(logits, presence, masks))
    result = Segmenter(loaded, instances=True).segment(rgb_image(), [Prompt("a"), Prompt("b"), Prompt("c")])
    names = [(e.value, e.name, e.instance, e.absent) for e in result.labels]
    assert names == [
        (1, "a #1", 1, False),
        (2, "a #2", 2, False),
        (3, "b #1", 1, False),
        (None, "c", None, True),
    ]
    expected = np.full((40, 60), 3, dtype=np.uint8)
    expected[:20, :30] = 1
    expected[20:, :] = 2
    np.testing.assert_array_equal(result.label_map, expected)
    assert result.labels[1].score == pytest.approx(sig(1) * sig(3), rel=1e-5)
    # The same outputs in semantic mode keep only the best query of "a".
    monkeypatch.setattr(engine_module, "predict_prompts", fake_outputs(logits, presence, masks))
    semantic = Segmenter(loaded).segment(rgb_image(), [Prompt("a"), Prompt("b"), Prompt("c")])
    assert semantic.labels[0].area_px == 600 and semantic.labels[1].area_px == 1800


def test_text_with_points_selects_the_detection_under_the_point(loaded, monkeypatch):
    logits, presence, masks = quadrant_case()
    logits[0, 6] = 1.0  # second candidate of "a", bottom half
    masks[0, 6] = -4.0
    masks[0, 6, 32:, :] = 6.0
    monkeypatch.setattr(engine_module, "predict_prompts", fake_outputs(logits, presence, masks))
    prompt = Prompt("a", points=[(10.5, 30.5)])  # row 30 is in the bottom half: picks query 6
    result = Segmenter(loaded).segment(rgb_image(), [prompt])
    (a,) = result.labels
    assert a.score == pytest.approx(sig(1) * sig(3), rel=1e-5)
    assert a.box == (0, 20, 60, 40)
    # A negative point on that instance and a positive one on nothing: absent, reason "points".
    monkeypatch.setattr(engine_module, "predict_prompts", fake_outputs(logits, presence, masks))
    prompt = Prompt("a", points=[(10, 30), (45, 5)], point_labels=[0, 0])
    with pytest.raises(PromptError, match="positive point"):
        Segmenter(loaded).segment(rgb_image(), [prompt])
    prompt = Prompt("a", points=[(10, 30), (45, 25)], point_labels=[0, 1])
    result = Segmenter(loaded).segment(rgb_image(), [prompt])
    assert result.labels[0].absent and result.labels[0].reason == "points"


# --------------------------------------------------------------------------------------------------
# the tiny random SAM3 end to end


def count_vision_calls(model):
    calls = []
    handle = model.vision_encoder.register_forward_hook(lambda *a: calls.append(1))
    return calls, handle


def test_many_prompts_encode_the_image_once(loaded):
    image = rgb_image(50, 70)
    prompts = [
        Prompt("polyp"),
        Prompt("liver"),
        Prompt("left kidney", boxes=[(5, 5, 40, 30)]),
        Prompt(boxes=[(10, 12, 60, 45)]),
        Prompt("spleen", boxes=[(1, 2, 20, 20), (30, 30, 69, 49)], box_labels=[1, 0]),
    ]
    calls, handle = count_vision_calls(loaded.model)
    try:
        result = Segmenter(loaded, prompt_batch_size=2).segment(image, prompts)
    finally:
        handle.remove()
    assert len(calls) == 1
    assert result.settings["image_encoder_runs"] == 1
    assert result.label_map.shape == (50, 70)
    assert [e.value for e in result.labels] == [1, 2, 3, 4, 5]
    assert set(np.unique(result.label_map)) <= {0, 1, 2, 3, 4, 5}
    assert result.labels[3].prompt.kind == "box" and result.labels[3].name == "1 box"


def test_ct_windows_one_encoder_run_per_distinct_window(loaded):
    hu = np.linspace(-1000, 1000, 48 * 64, dtype=np.float32).reshape(48, 64)
    image = Image.from_array(hu, modality="CT")
    calls, handle = count_vision_calls(loaded.model)
    try:
        same = Segmenter(loaded).segment(image, [Prompt("liver"), Prompt("spleen"), Prompt("pancreas")])
        assert len(calls) == 1  # all three use the default abdomen window
        mixed = Segmenter(loaded).segment(image, [Prompt("liver"), Prompt("lung nodule"), Prompt("spleen")])
        assert len(calls) == 3  # abdomen + lung
        fixed = Segmenter(loaded, window="bone").segment(image, [Prompt("liver"), Prompt("lung")])
        assert len(calls) == 4
    finally:
        handle.remove()
    assert same.settings["image_encoder_runs"] == 1 and mixed.settings["image_encoder_runs"] == 2
    windows = {e.name: e.preprocessing.split(" (")[0] for e in mixed.labels}
    assert windows == {
        "liver": "CT window abdomen",
        "lung nodule": "CT window lung",
        "spleen": "CT window abdomen",
    }
    assert all("window bone" in e.preprocessing for e in fixed.labels)
    with pytest.raises(InputError, match="CT only"):
        Segmenter(loaded, window="lung").segment(rgb_image(), [Prompt("polyp")])


def test_absent_when_presence_head_says_so(loaded):
    model = copy.deepcopy(loaded.model)
    with torch.no_grad():
        model.detr_decoder.presence_head.layer3.bias.fill_(-20.0)  # presence clamps at sigmoid(-10)
    absent = dataclasses.replace(loaded, model=model, source="biased")
    prompts = [Prompt("polyp"), Prompt("liver", boxes=[(0, 0, 30, 20)])]
    result = Segmenter(absent).segment(rgb_image(), prompts)
    assert all(e.absent and e.reason == "presence" for e in result.labels)
    assert all(e.presence == pytest.approx(sig(-10.0), rel=1e-4) for e in result.labels)
    assert not result.label_map.any()

    with torch.no_grad():
        model.detr_decoder.presence_head.layer3.bias.fill_(20.0)
    result = Segmenter(absent, threshold=0.0).segment(rgb_image(), [Prompt("polyp")])
    (e,) = result.labels
    assert not e.absent and e.presence == pytest.approx(sig(10.0), rel=1e-4)
    assert e.area_px == int((result.label_map == 1).sum())


def test_masks_come_back_on_the_original_grid(loaded, monkeypatch):
    """Real model outputs: the kept mask is the chosen query's logits resized to (H, W), threshold 0."""
    from medsam3.preprocess.resize import resize_bilinear

    captured = {}
    real = engine_module.predict_prompts

    def spy(*args, **kwargs):
        captured["out"] = real(*args, **kwargs)
        return captured["out"]

    monkeypatch.setattr(engine_module, "predict_prompts", spy)
    image = rgb_image(37, 91)
    result = Segmenter(loaded, threshold=0.0, presence_threshold=0.0).segment(image, [Prompt("polyp")])
    out = captured["out"]
    scores = torch.sigmoid(out.pred_logits[0]) * torch.sigmoid(out.presence_logits[0])
    best = int(scores.argmax())
    logits = out.pred_masks[0, best].float().numpy()
    assert logits.shape == (64, 64)
    expected = resize_bilinear(logits, (37, 91)) > 0
    np.testing.assert_array_equal(result.label_map == 1, expected)
    assert result.labels[0].score == pytest.approx(float(scores[best]), rel=1e-5)


def test_point_prompts_use_the_tracker(loaded, tracker):
    image = rgb_image(45, 80)
    seg = Segmenter(loaded, tracker=tracker, threshold=0.0)
    calls, handle = count_vision_calls(tracker)
    try:
        result = seg.segment(
            image,
            [
                Prompt(points=[(20.5, 10.5)]),
                Prompt(points=[(5, 5), (60, 30)], point_labels=[1, 0], boxes=[(0, 0, 70, 40)]),
                Prompt("polyp"),
            ],
        )
    finally:
        handle.remove()
    assert len(calls) == 1  # one tracker image encoding for both point prompts
    assert [e.source for e in result.labels] == ["tracker", "tracker", "detector"]
    assert result.label_map.shape == (45, 80)
    first = result.labels[0]
    assert not first.absent and 0.0 <= first.score <= 1.0
    assert first.presence == pytest.approx(sig(6.0), abs=0.05)
    with pytest.raises(PromptError, match="at most one positive box"):
        seg.segment(image, [Prompt(points=[(5, 5)], boxes=[(0, 0, 9, 9), (1, 1, 8, 8)])])


def test_3d_volumes_are_segmented_but_not_in_instance_mode(loaded):
    vol = Image.from_array(np.zeros((4, 16, 16), dtype=np.int16), modality="CT", path="ct.nii.gz")
    result = Segmenter(loaded).segment(vol, [Prompt("liver")])  # volumes: tests/test_volume_*.py
    assert result.label_map.shape == (4, 16, 16) and result.labels[0].voxels is not None
    with pytest.raises(PromptError, match="instances is for 2D images: a volume gets one label per prompt"):
        Segmenter(loaded, instances=True).segment(vol, [Prompt("liver")])


def test_bad_prompts_fail_before_the_model_runs(loaded):
    calls, handle = count_vision_calls(loaded.model)
    seg = Segmenter(loaded)
    try:
        with pytest.raises(PromptError, match=r"box \(10, 10, 70, 20\) lies outside the image of 60 x 40"):
            seg.segment(rgb_image(), [Prompt("liver"), Prompt("polyp", boxes=[(10, 10, 70, 20)])])
        with pytest.raises(PromptError, match="empty text"):
            seg.segment(rgb_image(), [Prompt("   ")])
        with pytest.raises(PromptError, match="too long"):
            seg.segment(rgb_image(), [Prompt(" ".join(["lesion"] * 40))])
        with pytest.raises(PromptError, match="no prompt"):
            seg.segment(rgb_image(), [])
    finally:
        handle.remove()
    assert calls == []
    with pytest.raises(PromptError, match="threshold"):
        Segmenter(loaded, threshold=1.5)


# --------------------------------------------------------------------------------------------------
# prompts by hand


def test_parse_box_and_point():
    assert parse_box("1,2,30.5,40") == ((1.0, 2.0, 30.5, 40.0), 1)
    assert parse_box("1, 2, 3, 4, neg") == ((1.0, 2.0, 3.0, 4.0), 0)
    assert parse_point("5,6") == ((5.0, 6.0), 1)
    assert parse_point("5,6,0") == ((5.0, 6.0), 0)
    for bad in ("1,2,3", "1,2,3,x", "1,2,3,4,maybe", "1,2,3,4,neg,7"):
        with pytest.raises(PromptError, match="box"):
            parse_box(bad)
    with pytest.raises(PromptError, match="point"):
        parse_point("5")


def test_validate_prompt_by_hand():
    validate_prompt(Prompt("x", boxes=[(0, 0, 60, 40)]), (40, 60))  # the whole image is fine
    validate_prompt(Prompt(points=[(60, 40)]), (40, 60))
    cases = [
        (Prompt("x", boxes=[(5, 5, 5, 9)]), "degenerate"),
        (Prompt("x", boxes=[(-1, 0, 9, 9)]), "outside"),
        (Prompt("x", boxes=[(0, 0, 9, 41)]), r"outside the image of 60 x 40"),
        (Prompt(points=[(61, 3)]), "outside"),
        (Prompt("x", boxes=[(0, 0, 9, 9)], box_labels=[2]), "label 2"),
        (Prompt(boxes=[(0, 0, 9, 9)], box_labels=[0]), "positive box"),
        (Prompt(), "needs a text"),
        (Prompt(""), "empty text"),
    ]
    for prompt, message in cases:
        with pytest.raises(PromptError, match=message):
            validate_prompt(prompt, (40, 60))


def test_cli_items_attach_geometry_to_the_preceding_text():
    prompts = prompts_from_cli(
        [
            ("box", "1,1,5,5"),
            ("point", "2,2"),
            ("text", "liver"),
            ("box", "0,0,10,10"),
            ("box", "3,3,4,4,neg"),
            ("text", "spleen"),
            ("text", "kidney"),
            ("point", "7,8,0"),
            ("point", "9,9"),
        ]
    )
    assert [(p.text, p.kind) for p in prompts] == [
        (None, "box+point"),
        ("liver", "text+box"),
        ("spleen", "text"),
        ("kidney", "text+point"),
    ]
    assert prompts[1].box_labels == [1, 0]
    assert prompts[3].points == [(7.0, 8.0), (9.0, 9.0)] and prompts[3].point_labels == [0, 1]
    with pytest.raises(PromptError, match="no prompt"):
        prompts_from_cli([])


# --------------------------------------------------------------------------------------------------
# post-processing by hand


def test_select_queries_rule():
    from medsam3.predict.postprocess import select_queries

    scores = [0.05, 0.3, 0.2]
    best = select_queries(scores, 0.9, threshold=0.1, presence_threshold=0.5)
    assert best.queries == (1,) and best.scores == (0.3,) and best.reason is None
    every = select_queries(scores, 0.9, threshold=0.1, presence_threshold=0.5, instances=True)
    assert every.queries == (1, 2)
    gone = select_queries(scores, 0.4, threshold=0.1, presence_threshold=0.5)
    assert gone.absent and gone.reason == "presence" and gone.best_score == pytest.approx(0.3)
    strict = select_queries(scores, 0.9, threshold=0.3, presence_threshold=0.5)  # strictly above
    assert strict.absent and strict.reason == "score"


def test_resolve_pixelwise_and_boxes_by_hand():
    from medsam3.predict.postprocess import label_dtype, mask_box, resolve_pixelwise

    logits = np.array([[[1.0, -1.0, 2.0, -3.0]], [[1.0, 3.0, -1.0, -2.0]]])
    # pixel 0: tie (0.5 sig(1) both) -> the earlier mask; 1 and 2: the only mask on; 3: none.
    assert resolve_pixelwise(logits, [0.5, 0.5]).tolist() == [[0, 1, 0, -1]]
    # A higher confidence wins where both are on, whatever the mask logit order.
    assert resolve_pixelwise(logits, [0.4, 0.9]).tolist() == [[1, 1, 0, -1]]
    assert resolve_pixelwise(np.zeros((0, 2, 3)), []).tolist() == [[-1] * 3] * 2
    mask = np.zeros((6, 7), bool)
    mask[2:4, 1:5] = True
    assert mask_box(mask) == (1, 2, 5, 4) and mask_box(np.zeros((3, 3), bool)) is None
    assert label_dtype(255) == np.uint8 and label_dtype(256) == np.uint16
