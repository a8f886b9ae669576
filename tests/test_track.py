"""Track mode: SAM3's video model carrying text concepts through the slices of a volume.

Three levels: hand-computed helpers (probe slices, segments, mask cleaning); a tiny random
``Sam3VideoModel`` (224 px) checked against transformers' own unbounded ``propagate_in_video_iterator``;
and a real MRI volume from the sample data.

Random weights with the model's default thresholds find nothing. For tracking tests the thresholds are
opened (detection 0, new object 0, no hot-start, association 0, one query) and the tracker's object-score
head is biased up, otherwise random weights blank the tracked masks after the first slice.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medsam3.errors import ModelError, PromptError
from medsam3.model.configs import tiny_sam3_video_config
from medsam3.model.loading import build_processor, save_sam3
from medsam3.model.video import (
    frames_held,
    load_sam3_video,
    open_session,
    pixel_tensor,
    prune_session,
    session_tensor_bytes,
    tracker_reach,
)
from medsam3.model.video_meta import meta_video_behaviour
from medsam3.predict.volume.track import (
    clean_mask,
    probe_indices,
    probe_scores,
    segments,
    track_volume,
    track_volume_prompts,
)
from video_fixtures import OPEN_THRESHOLDS

PROMPT = "hippocampus"


def video_model(queries: int | None = None, object_bias: float | None = None, **overrides):
    from transformers import Sam3VideoModel

    config = tiny_sam3_video_config(**overrides)
    if queries is not None:
        config.detector_config.detr_decoder_config.num_queries = queries
    torch.manual_seed(0)
    model = Sam3VideoModel(config).eval()
    if object_bias is not None:
        with torch.no_grad():
            model.tracker_model.mask_decoder.pred_obj_score_head.proj_out.bias.fill_(object_bias)
    return model


@pytest.fixture(scope="module")
def processor():
    return build_processor(tiny_sam3_video_config(), video=True)


@pytest.fixture(scope="module")
def default_model():
    return video_model()


@pytest.fixture(scope="module")
def tracking_model():
    return video_model(queries=1, object_bias=10.0, **OPEN_THRESHOLDS)


@pytest.fixture(scope="module")
def frames():
    return np.random.default_rng(0).integers(0, 256, (8, 40, 50, 3), dtype=np.uint8)


def reference(model, processor, frames, prompt, start):
    """transformers' own path: all frames preloaded, forward then reverse, nothing freed; run with the
    same Meta behaviour medsam3 installs (``medsam3.model.video_meta``), so that only the streaming, the
    pruning and medsam3's pass order are compared.

    Returns the per-slice union of the prompt's objects, the per-object masks and the session.
    """
    from transformers.models.sam3_video.modeling_sam3_video import Sam3VideoInferenceSession

    session = Sam3VideoInferenceSession(
        video=None, dtype=torch.float32, video_height=frames.shape[1], video_width=frames.shape[2]
    )
    for i, frame in enumerate(frames):
        session.add_new_frame(pixel_tensor(frame, 224, 1 / 255, (0.5,) * 3, (0.5,) * 3), i)
    processor.add_text_prompt(session, prompt)
    union = np.zeros(frames.shape[:3], dtype=bool)
    per_object: dict[int, np.ndarray] = {}
    with meta_video_behaviour(model):
        for reverse in (False, True):
            for out in model.propagate_in_video_iterator(session, start_frame_idx=start, reverse=reverse):
                pp = processor.postprocess_outputs(session, out, original_sizes=[list(frames.shape[1:3])])
                for obj, mask in zip(pp["object_ids"].tolist(), pp["masks"].numpy(), strict=True):
                    per_object.setdefault(obj, np.zeros(frames.shape[:3], dtype=bool))[out.frame_idx] = mask
                    union[out.frame_idx] |= mask
    return union, per_object, session


# --------------------------------------------------------------------------------------------------
# hand-computed helpers


def test_probe_indices_are_bin_centres():
    assert probe_indices(10, 4) == [1, 3, 6, 8]  # bins of 2.5 slices, centres 1.25, 3.75, 6.25, 8.75
    assert probe_indices(3, 8) == [0, 1, 2]
    assert probe_indices(35, 1) == [17]


def test_segments_split_at_midpoints():
    assert segments([12, 4], 20) == [(0, 8, 4), (8, 20, 12)]
    assert segments([5], 9) == [(0, 9, 5)]
    assert segments([3, 4, 4], 6) == [(0, 4, 3), (4, 6, 4)]
    assert segments([0, 5], 6) == [(0, 3, 0), (3, 6, 5)]


def test_clean_mask_fills_holes_and_drops_specks():
    mask = np.zeros((7, 7), dtype=bool)
    mask[1:4, 1:4] = True
    mask[2, 2] = False  # a one-pixel hole
    mask[6, 6] = True  # a one-pixel speck
    out = clean_mask(mask, max_area=1)
    expected = np.zeros((7, 7), dtype=bool)
    expected[1:4, 1:4] = True
    np.testing.assert_array_equal(out, expected)
    assert mask[2, 2] == 0 and mask[6, 6] == 1  # input untouched
    # a mask that is only a small object is kept (specks must be under half the foreground)
    lone = np.zeros((5, 5), dtype=bool)
    lone[2, 2] = True
    np.testing.assert_array_equal(clean_mask(lone, max_area=4), lone)
    # diagonal neighbours are connected: the two pixels form one component of area 2
    pair = np.zeros((6, 6), dtype=bool)
    pair[0:3, 0:3] = True
    pair[4, 4] = pair[5, 5] = True
    np.testing.assert_array_equal(clean_mask(pair, max_area=1), pair)
    assert not clean_mask(pair, max_area=2)[4:, 4:].any()


def test_prune_session_rules_on_a_hand_built_state():
    from types import SimpleNamespace

    t = torch.zeros(2)

    def entry():
        return {
            "maskmem_features": t,
            "maskmem_pos_enc": t,
            "object_pointer": t,
            "pred_masks": t,
            "high_res_masks": t,
        }

    cond = {f: entry() for f in range(0, 101, 10)}  # conditioning slices 0, 10, ..., 100
    session = SimpleNamespace(
        output_dict_per_obj={
            0: {"cond_frame_outputs": cond, "non_cond_frame_outputs": {f: entry() for f in range(94, 100)}}
        },
        mask_inputs_per_obj={0: {50: t, 100: t}},
        frames_tracked_per_obj={0: {f: {} for f in range(94, 101)}},
        obj_id_to_tracker_score_frame_wise={99: {0: 0.5}, 100: {0: 0.6}},
        suppressed_obj_ids={99: set(), 100: set()},
        cache=SimpleNamespace(_vision_features={100: {}}),
        processed_frames=None,
    )
    prune_session(session, 100, reverse=False, window=3, keep={94}, max_cond_frames=2, memory_frames=2)
    outputs = session.output_dict_per_obj[0]
    assert sorted(outputs["non_cond_frame_outputs"]) == [94, 98, 99]  # window 98..100, and kept 94
    assert sorted(cond) == list(range(0, 101, 10))  # conditioning slices stay (their object pointers)
    with_memory = sorted(f for f, e in cond.items() if "maskmem_features" in e)
    assert with_memory == [0, 10, 90, 100]  # the 2 lowest and 2 highest: the only ones selectable
    assert all("object_pointer" in e for e in cond.values())
    masks = [f for f, e in [*cond.items(), *outputs["non_cond_frame_outputs"].items()] if "pred_masks" in e]
    assert masks == [100]
    assert session.mask_inputs_per_obj[0].keys() == {100}
    assert sorted(session.frames_tracked_per_obj[0]) == [94, 98, 99, 100]
    assert list(session.obj_id_to_tracker_score_frame_wise) == [100]
    assert list(session.suppressed_obj_ids) == [100]
    assert frames_held(session) == {0, 10, 90, 94, 98, 99, 100}
    # in reverse the same rules look the other way: slice 10 is 2 behind slice 8
    prune_session(session, 8, reverse=True, window=3, max_cond_frames=1, memory_frames=1)
    assert sorted(f for f, e in cond.items() if "maskmem_features" in e) == [0, 10, 100]
    assert outputs["non_cond_frame_outputs"] == {}


# --------------------------------------------------------------------------------------------------
# tiny random video model


def test_default_thresholds_probe_finds_nothing_and_skips_tracking(default_model, processor, frames):
    reports = []
    result = track_volume(default_model, processor, frames, PROMPT, progress=reports.append)
    assert result.masks.shape == frames.shape[:3] and result.masks.dtype == bool
    assert not result.found and result.start_frame is None and result.object_ids_merged == ()
    assert 0.0 < result.presence < default_model.score_threshold_detection
    assert reports == []  # absent after probing: no slice tracked


def test_default_thresholds_forced_start_runs_empty(default_model, processor, frames):
    reports = []
    result = track_volume(default_model, processor, frames, PROMPT, start_frames=[3], progress=reports.append)
    assert result.masks.shape == frames.shape[:3] and not result.found
    assert result.scores.shape == (len(frames),) and not result.scores.any()
    assert sorted(r.frame for r in reports) == list(range(len(frames)))
    assert [r.frame for r in reports if r.reverse] == [2, 1, 0]
    assert result.start_frame == 3 and result.object_ids_merged == ()


@pytest.mark.parametrize("queries, short_memory", [(1, True), (3, False)])
def test_tracking_equals_transformers_unbounded_run(processor, queries, short_memory):
    # short_memory: a tracker that reads 2 slices back, so that 12 slices exercise the pruning
    memory = {}
    if short_memory:
        memory = dict(num_maskmem=3, tracker_overrides={"max_object_pointers_in_encoder": 3})
    if queries > 1:  # several objects of one prompt: no NMS, which would keep one of these overlapping masks
        memory["det_nms_thresh"] = 0.0
    model = video_model(queries=queries, object_bias=10.0, **OPEN_THRESHOLDS, **memory)
    frames = np.random.default_rng(3).integers(0, 256, (12 if short_memory else 8, 40, 50, 3), dtype=np.uint8)
    start = 3
    expected, per_object, ref_session = reference(model, processor, frames, PROMPT, start)
    reports = []
    result = track_volume(
        model, processor, frames, PROMPT, start_frames=[start], clean=False, progress=reports.append
    )
    np.testing.assert_array_equal(result.masks, expected)
    assert result.object_ids_merged == tuple(sorted(per_object))
    # both directions tracked: masks before and after the start slice, the reverse pass below it
    assert result.masks[:start].any(axis=(1, 2)).all() and result.masks[start + 1 :].any(axis=(1, 2)).all()
    assert sorted(r.frame for r in reports if r.reverse) == list(range(start))
    assert (result.scores > 0).all() and result.start_frame == start
    assert len(frames_held(ref_session)) == len(frames)  # the unbounded session holds every slice
    if short_memory:
        assert tracker_reach(model) == 3
        assert max(r.frames_held for r in reports) <= 3 + 3  # window + the slices kept for the reverse pass
    if queries > 1:
        assert len(per_object) >= 2  # several ids for one prompt, merged into one mask
        sizes = {obj: m.sum(axis=(1, 2)) for obj, m in per_object.items()}
        merged = result.masks.sum(axis=(1, 2))
        assert (merged >= np.max(list(sizes.values()), axis=0)).all()
        assert any((merged > s).any() for s in sizes.values())


def test_hotstart_buffer_equals_transformers(processor, frames):
    # unmatched tracks (association IoU 0.9) are removed during a 2-slice hot-start: outputs held back
    model = video_model(
        queries=2,
        object_bias=10.0,
        score_threshold_detection=0.0,
        new_det_thresh=0.0,
        hotstart_delay=2,
        hotstart_unmatch_thresh=1,
        hotstart_dup_thresh=1,
        assoc_iou_thresh=0.5,
        trk_assoc_iou_thresh=0.9,
    )
    expected, _, ref_session = reference(model, processor, frames[:6], PROMPT, 2)
    assert ref_session.hotstart_removed_obj_ids  # the heuristics did remove objects
    result = track_volume(model, processor, frames[:6], PROMPT, start_frames=[2], clean=False)
    np.testing.assert_array_equal(result.masks, expected)


def test_probe_score_is_the_video_models_detection_score(tracking_model, processor, frames):
    tracked = track_volume(tracking_model, processor, frames, PROMPT, start_frames=[5])
    # one query: the object created on slice 5 carries the detection score of slice 5
    probed = probe_scores(tracking_model, processor, frames, [PROMPT], [1, 5, 6])
    assert probed.shape == (1, 3)
    np.testing.assert_allclose(probed[0, 1], tracked.presence, rtol=1e-4)


def test_probing_starts_at_the_best_probed_slice(tracking_model, processor, frames):
    indices = probe_indices(len(frames), 4)
    scores = probe_scores(tracking_model, processor, frames, [PROMPT], indices)[0]
    result = track_volume(tracking_model, processor, frames, PROMPT, probes=4, score_threshold=0.0)
    assert result.start_frame == indices[int(np.argmax(scores))]
    assert result.start_frames == (result.start_frame,)
    assert result.found and result.masks.any(axis=(1, 2)).all()
    # an impossible threshold reports the prompt absent without tracking
    absent = track_volume(tracking_model, processor, frames, PROMPT, probes=4, score_threshold=0.99)
    assert not absent.found and absent.start_frame is None


def test_state_held_is_bounded_by_the_window(tracking_model, processor):
    rng = np.random.default_rng(1)
    peak = {}
    for z in (8, 16):
        frames = rng.integers(0, 256, (z, 24, 24, 3), dtype=np.uint8)
        reports = []
        track_volume(
            tracking_model,
            processor,
            frames,
            PROMPT,
            start_frames=[2],
            max_frames_in_memory=2,
            progress=reports.append,
        )
        assert len(reports) == z
        # window 2 behind the current slice + 2 slices kept after the start for the reverse pass
        assert max(r.frames_held for r in reports) <= 4
        peak[z] = max(r.state_bytes for r in reports)
    assert peak[16] == peak[8]  # twice the slices, not one byte more


def test_session_streams_frames_and_prune_frees_them(tracking_model, processor):
    frames = np.random.default_rng(2).integers(0, 256, (10, 24, 24, 3), dtype=np.uint8)
    held = {}
    for window in (None, 3):
        session = open_session(tracking_model, processor, frames, [PROMPT])
        assert len(session.processed_frames) == 10 and session.processed_frames.produced == 0
        counts, sizes = [], []
        for frame in range(10):
            tracking_model(inference_session=session, frame_idx=frame)
            if window is not None:
                prune_session(session, frame, reverse=False, window=window)
            counts.append(len(frames_held(session)))
            sizes.append(session_tensor_bytes(session))
        assert session.processed_frames.produced == 10  # each slice converted once, never stored
        held[window] = (counts, sizes)
    assert held[None][0] == list(range(1, 11))  # nothing freed by default
    assert all(b > a for a, b in zip(held[None][1][1:], held[None][1][2:], strict=False))
    # the window of 3 slices, plus slice 0: the object's conditioning slice, read by every later slice
    assert held[3][0] == [1, 2, 3, 4, 4, 4, 4, 4, 4, 4]
    assert len(set(held[3][1][3:])) == 1  # no growth once the window is full
    assert tracker_reach(tracking_model) == 16


def test_prompts_share_one_session_and_image_features(processor, frames, monkeypatch):
    model = video_model(queries=1, object_bias=10.0, **OPEN_THRESHOLDS)
    calls = []
    original = model.detector_model.get_vision_features
    monkeypatch.setattr(
        model.detector_model, "get_vision_features", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    prompts = ["left hippocampus", "liver"]
    shared = track_volume_prompts(model, processor, frames, prompts, start_frames=[4])
    assert len(calls) == len(frames)  # image encoder once per slice for both prompts
    assert list(shared) == prompts
    for prompt in prompts:
        alone = track_volume(model, processor, frames, prompt, start_frames=[4])
        np.testing.assert_array_equal(shared[prompt].masks, alone.masks)
        np.testing.assert_allclose(shared[prompt].scores, alone.scores, rtol=1e-5)
    assert set(shared[prompts[0]].object_ids_merged).isdisjoint(shared[prompts[1]].object_ids_merged)


def test_several_start_slices_make_segments(tracking_model, processor, frames):
    reports = []
    result = track_volume(
        tracking_model, processor, frames, PROMPT, start_frames=[6, 1], progress=reports.append
    )
    assert result.start_frames == (1, 6) and result.masks.shape == frames.shape[:3]
    # segments [0, 4) from 1 and [4, 8) from 6: each slice once; reverse below each start
    assert sorted(r.frame for r in reports) == list(range(8))
    assert [r.frame for r in reports if r.reverse] == [0, 5, 4]
    assert len(result.object_ids_merged) == 2  # one object per segment, numbered apart


def test_bad_inputs_are_refused(tracking_model, processor, frames):
    with pytest.raises(PromptError, match="empty"):
        track_volume(tracking_model, processor, frames, "  ")
    with pytest.raises(PromptError, match="too long"):
        track_volume(tracking_model, processor, frames, " ".join(["kidney"] * 40))
    with pytest.raises(PromptError, match="within the volume"):
        track_volume(tracking_model, processor, frames, PROMPT, start_frames=[8])
    with pytest.raises(ValueError, match="uint8"):
        track_volume(tracking_model, processor, frames.astype(np.float32), PROMPT)
    with pytest.raises(ValueError, match="max_frames_in_memory"):
        track_volume(tracking_model, processor, frames, PROMPT, start_frames=[0], max_frames_in_memory=0)


def test_load_sam3_video_round_trip(tmp_path, tracking_model, processor, tiny_model):
    folder = save_sam3(tracking_model, processor, tmp_path / "video")
    loaded = load_sam3_video(folder, device="cpu")
    assert loaded.model.config.hotstart_delay == 0 and loaded.dtype == torch.float32
    assert loaded.processor.image_processor.size["height"] == 224
    state = loaded.model.state_dict()
    for name, value in tracking_model.state_dict().items():
        assert torch.equal(value, state[name]), name
    frames = np.random.default_rng(4).integers(0, 256, (3, 20, 20, 3), dtype=np.uint8)
    a = track_volume(tracking_model, processor, frames, PROMPT, start_frames=[1])
    b = track_volume(loaded.model, loaded.processor, frames, PROMPT, start_frames=[1])
    np.testing.assert_array_equal(a.masks, b.masks)
    image_only = save_sam3(tiny_model, processor, tmp_path / "image")
    with pytest.raises(ModelError, match="no tracker"):
        load_sam3_video(image_only, device="cpu")


# --------------------------------------------------------------------------------------------------
# real volume


def test_real_mri_volume(tracking_model, processor, data_dir):
    from medsam3.io.readers import read_image

    image = read_image(data_dir / "msd_hippocampus" / "images" / "hippocampus_003.nii.gz")
    volume = image.array.astype(np.float32)
    lo, hi = np.percentile(volume, [0.5, 99.5])
    grey = np.rint(np.clip((volume - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
    frames = np.repeat(grey[..., None], 3, axis=-1)
    reports = []
    result = track_volume(
        tracking_model, processor, frames, PROMPT, score_threshold=0.0, progress=reports.append
    )
    assert result.masks.shape == image.array.shape and result.masks.dtype == bool
    assert result.scores.shape == (image.array.shape[0],)
    s = result.start_frame
    assert 0 <= s < image.array.shape[0]
    assert result.masks[:s].any() and result.masks[s + 1 :].any()
    assert len(reports) == image.array.shape[0]
    assert max(r.frames_held for r in reports) <= 2 * tracker_reach(tracking_model)
