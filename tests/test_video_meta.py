"""Meta's video behaviour in transformers' ``Sam3VideoModel`` (``medsam3.model.video_meta``).

Hand-computed NMS, connected components and new-object masks; on a tiny random video model: NMS and
hole filling are active, the detector's text-only prompts carry Meta's CLS token, new objects start from
Meta's masks, the overrides leave the model as it was, and clips mode runs each clip's first slice twice.
(The proof against Meta's own video model is ``tests/slow/test_meta_v2_clips.py``.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medsam3.model.configs import tiny_sam3_video_config
from medsam3.model.forward import encode_image, encode_text, predict_prompts
from medsam3.model.loading import build_processor
from medsam3.model.video import open_session, pixel_tensor
from medsam3.model.video_meta import (
    NO_OBJ_SCORE,
    MetaTextDetectorForward,
    PlainCvUtils,
    conditioning_masks,
    meta_video_behaviour,
    no_reconditioning,
)
from medsam3.predict.volume.clips import clips_volume_prompts
from video_fixtures import OPEN_THRESHOLDS, first_frame_new_objects


def _model(**overrides):
    from transformers import Sam3VideoModel

    torch.manual_seed(0)
    model = Sam3VideoModel(tiny_sam3_video_config(**OPEN_THRESHOLDS, **overrides)).eval()
    with torch.no_grad():
        model.tracker_model.mask_decoder.pred_obj_score_head.proj_out.bias.fill_(10.0)
    return model


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.fixture(scope="module")
def processor():
    return build_processor(tiny_sam3_video_config(), video=True)


@pytest.fixture(scope="module")
def frames():
    return np.random.default_rng(5).integers(0, 256, (5, 40, 50, 3), dtype=np.uint8)


# --------------------------------------------------------------------------------------------------
# hand-computed


def test_generic_nms_keeps_the_best_and_drops_overlaps_above_the_threshold():
    ious = torch.tensor([[1.0, 0.6, 0.05], [0.6, 1.0, 0.3], [0.05, 0.3, 1.0]])
    scores = torch.tensor([0.7, 0.9, 0.8])
    # 1 first (0.9): drops 0 (0.6 > 0.5), keeps 2 (0.3)
    assert PlainCvUtils.generic_nms(ious, scores, 0.5).tolist() == [1, 2]
    # threshold 0.2: 1 drops 0 and 2
    assert PlainCvUtils.generic_nms(ious, scores, 0.2).tolist() == [1]
    # equal scores: the lower index first
    assert PlainCvUtils.generic_nms(ious, torch.ones(3), 0.5).tolist() == [0, 2]


def test_cc_2d_is_8_connected_with_component_sizes():
    plane = torch.tensor(
        [
            [1, 0, 0, 0, 1],
            [0, 1, 0, 0, 1],
            [0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
        ],
        dtype=torch.uint8,
    )
    labels, counts = PlainCvUtils.cc_2d(plane[None, None])
    assert labels.shape == counts.shape == (1, 1, 4, 5)
    lab, cnt = labels[0, 0], counts[0, 0]
    assert lab[0, 0] == lab[1, 1] != 0  # diagonal neighbours: one component
    assert len({int(lab[0, 0]), int(lab[0, 4]), int(lab[3, 0])}) == 3
    expected = np.array([[2, 0, 0, 0, 2], [0, 2, 0, 0, 2], [0, 0, 0, 0, 0], [2, 2, 0, 0, 0]])
    np.testing.assert_array_equal(cnt.numpy(), expected)
    assert (lab[plane == 0] == 0).all()


def test_conditioning_masks_threshold_at_zero_and_later_objects_take_overlaps():
    low = 4
    left = torch.full((low, low), -5.0)
    left[:, :2] = 5.0  # left half on
    everything = torch.full((low, low), 5.0)
    inputs, video, scores = conditioning_masks(torch.stack([left, everything]), (8, 8), low, groups=[0, 0])
    assert inputs.shape == (2, 1, 16, 16)
    assert inputs[0, 0, :, :8].all() and not inputs[0, 0, :, 8:].any()  # resized, then > 0
    assert inputs[1].all()
    assert not video[0].any() and video[1].all()  # the later object of the same prompt takes the pixels
    assert torch.equal(scores[0], torch.full((1, low, low), NO_OBJ_SCORE))
    assert torch.equal(scores[1], torch.full((1, low, low), -NO_OBJ_SCORE))
    _, apart, _ = conditioning_masks(torch.stack([left, everything]), (8, 8), low, groups=[0, 1])
    assert apart[0][:, :4].all() and not apart[0][:, 4:].any()  # other prompts keep their overlap


# --------------------------------------------------------------------------------------------------
# tiny random video model


def test_overrides_are_per_instance_reference_counted_and_removed(model):
    import transformers.models.sam3_video.modeling_sam3_video as msv

    other = _model()
    detector = model.detector_model
    with meta_video_behaviour(model):
        assert isinstance(detector.__dict__["forward"], MetaTextDetectorForward)
        assert "_tracker_add_new_objects" in model.__dict__
        with meta_video_behaviour(model):
            pass
        assert isinstance(detector.__dict__["forward"], MetaTextDetectorForward)  # still the outer block's
        assert "forward" not in other.detector_model.__dict__
        assert isinstance(msv.cv_utils_kernel, PlainCvUtils)
    for name in ("_tracker_add_new_objects", "_prepare_recondition_masks"):
        assert name not in model.__dict__
    assert "forward" not in detector.__dict__


def _tokens(processor, text):
    tok = processor.tokenizer([text], padding="max_length", max_length=32, return_tensors="pt")
    return tok["input_ids"], tok["attention_mask"]


@torch.inference_mode()
def test_video_detector_uses_metas_text_sequence(model, processor, frames):
    detector = model.detector_model
    pixels = pixel_tensor(frames[0], 224, 1 / 255, (0.5,) * 3, (0.5,) * 3)[None]
    vision = encode_image(detector, pixels)
    ids, mask = _tokens(processor, "liver")
    text = encode_text(detector, ids, mask)
    meta = predict_prompts(detector, vision, text_embeds=text, attention_mask=mask, meta_text_cls=True)
    plain = predict_prompts(detector, vision, text_embeds=text, attention_mask=mask, meta_text_cls=False)
    assert not torch.allclose(meta.pred_logits, plain.pred_logits)
    with meta_video_behaviour(model):
        got = detector(
            vision_embeds=vision, text_embeds=text, attention_mask=mask
        )  # as run_detection calls it
    torch.testing.assert_close(got.pred_logits, meta.pred_logits)
    torch.testing.assert_close(got.pred_masks, meta.pred_masks)
    after = detector(vision_embeds=vision, text_embeds=text, attention_mask=mask)
    torch.testing.assert_close(after.pred_logits, plain.pred_logits)


@torch.inference_mode()
def test_nms_keeps_one_of_overlapping_detections(processor, frames, monkeypatch):
    import transformers.models.sam3_video.modeling_sam3_video as msv

    model = _model(det_nms_thresh=0.1)
    model.detector_model.config.detr_decoder_config.num_queries = 8
    session = open_session(model, processor, frames[:1], ["liver"])
    vision = model.detector_model.get_vision_features(pixel_values=session.processed_frames[0][None])
    monkeypatch.setattr(msv, "cv_utils_kernel", False)  # as transformers runs without its hub kernel
    without = model.run_detection(session, vision)[0]["scores"]
    with meta_video_behaviour(model):
        kept = model.run_detection(session, vision)[0]["scores"]
    assert len(without) == int(model.detector_model.config.detr_decoder_config.num_queries)
    assert 1 <= len(kept) < len(without)


@torch.inference_mode()
def test_new_objects_store_metas_video_size_mask(model, processor, frames):
    session = open_session(model, processor, frames[:1], ["liver"])
    ids, logits = first_frame_new_objects(model, session)
    assert ids and len(logits) == len(ids)
    _, _, low = conditioning_masks(logits, (40, 50), int(model.low_res_mask_size))
    for k, obj in enumerate(ids):
        out = session.output_dict_per_obj[session.obj_id_to_idx(obj)]["cond_frame_outputs"][0]
        torch.testing.assert_close(out["pred_masks"][0].float(), low[k])


def test_no_reconditioning_applies_to_its_session_only(model, processor, frames):
    a = open_session(model, processor, frames[:1], ["liver"])
    b = open_session(model, processor, frames[:1], ["liver"])
    with meta_video_behaviour(model), no_reconditioning(a):
        assert model._prepare_recondition_masks(a, 0, {}, None, {}, None) == ({}, set())
        # session b reconditions as usual (no detections matched here: nothing to recondition either way)
        assert model._prepare_recondition_masks(b, 0, {}, None, {}, None) == ({}, set())
        assert getattr(b, "medsam3_no_reconditioning", False) is False
    assert a.medsam3_no_reconditioning is False


def test_clips_run_each_clips_first_slice_twice(model, processor, frames):
    calls: list[int] = []
    plain = type(model).forward

    def counting(*args, **kwargs):
        calls.append(int(kwargs["frame_idx"]))
        return plain(model, *args, **kwargs)

    model.forward = counting
    try:
        clips_volume_prompts(model, processor, frames, ["liver"], clip_length=3)
    finally:
        del model.forward
    assert calls == [0, 0, 1, 2, 0, 0, 1]
