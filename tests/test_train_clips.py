"""Clip data for video-model training: the clip sampler (hand-made manifests) and the clip loader (real
MSD hippocampus volumes)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medsam3.data.clips import ClipSample, ClipSampler, clip_frames, window_starts_without
from medsam3.data.manifest import Record
from medsam3.data.sampler import SliceSampleDataset
from medsam3.errors import InputError

sys.path.insert(0, str(Path(__file__).parent))
from data_fixtures import msd_hippocampus  # noqa: E402


def volume(case: str, z: int, foreground: dict[str, list[list[int]]], split: str = "train") -> Record:
    return Record(
        dataset="Vol",
        case_id=case,
        image=[f"/nowhere/{case}.nii.gz"],
        label=[f"/nowhere/{case}_seg.nii.gz"],
        labels={1: "liver", 2: "spleen"},
        modality="CT",
        dims=3,
        split=split,
        shape=[z, 10, 10],
        foreground=foreground,
    )


def image2d(case: str, present: list[str]) -> Record:
    return Record(
        dataset="Flat",
        case_id=case,
        image=[f"/nowhere/{case}.png"],
        label=[f"/nowhere/{case}_m.png"],
        labels={1: "polyp", 2: "instrument"},
        modality="ENDO",
        dims=2,
        shape=[10, 10],
        foreground={c: [[0, 1]] for c in present},
    )


def present_slices(record: Record, concept: str) -> set[int]:
    return set(record.foreground_slices(concept).tolist())


RECORDS = [
    volume("a", 40, {"liver": [[10, 25]], "spleen": [[20, 30]]}),
    volume("b", 5, {"liver": [[1, 4]]}),
    image2d("c", ["polyp"]),
    image2d("d", ["polyp", "instrument"]),
]


def test_clip_frames_and_absent_windows_by_hand():
    assert clip_frames(40, 8, 1) == 8
    assert clip_frames(5, 8, 1) == 5  # a short volume gives a shorter clip
    assert clip_frames(5, 8, 2) == 3  # slices 0, 2, 4
    assert clip_frames(1, 8, 1) == 1  # a 2D image is a clip of one frame
    # present on slices 2 and 3 of 8; clips of 3 consecutive slices: only starts 4 and 5 avoid them
    assert window_starts_without(np.array([2, 3]), 8, 3, 1).tolist() == [4, 5]
    # present on slice 3; 2 frames with stride 2 (s, s + 2): starts 1 and 3 hit it
    assert window_starts_without(np.array([3]), 8, 2, 2).tolist() == [0, 2, 4, 5]
    assert window_starts_without(np.array([0, 7]), 8, 8, 1).tolist() == []


def test_clips_follow_the_rules_of_the_stream():
    sampler = ClipSampler(RECORDS, seed=3, negative_fraction=0.3, length=8)
    seen = {"neg3d": 0, "pos3d": 0, "2d": 0, "short": 0}
    for i in range(400):
        clip = sampler.sample(i)
        record = RECORDS[clip.record]
        assert clip.index == i and clip.concept in record.concepts
        z = record.num_slices
        assert clip.slices[0] >= 0 and clip.slices[-1] < z
        assert clip.length == min(8, z) and clip.stride == 1
        present = present_slices(record, clip.concept)
        on = [k in present for k in clip.slices]
        if record.dims == 2:
            seen["2d"] += 1
            assert clip.slices == (0,) and on[0] == (not clip.negative)
        elif clip.negative:
            seen["neg3d"] += 1
            assert not any(on)  # absent from every frame
        else:
            seen["pos3d"] += 1
            # a random annotated start, moved back only when the clip would run past the last slice
            assert on[0] or clip.start == z - clip.length
            seen["short"] += clip.length < 8
    assert min(seen.values()) > 0, seen


def test_stream_is_seeded_and_resumes_exactly():
    a = ClipSampler(RECORDS, seed=1, negative_fraction=0.3)
    b = ClipSampler(RECORDS, seed=1, negative_fraction=0.3)
    c = ClipSampler(RECORDS, seed=2, negative_fraction=0.3)
    first = [a.sample(i) for i in range(50)]
    assert first == [b.sample(i) for i in range(50)]
    assert first != [c.sample(i) for i in range(50)]
    whole = list(SliceSampleDataset(a, batch_size=2, rank=0, world_size=1, num_items=20))
    resumed_sampler = ClipSampler(RECORDS, seed=1, negative_fraction=0.3)
    resumed_sampler.load_state_dict({**a.state_dict(), "position": 8})
    resumed = list(SliceSampleDataset(resumed_sampler, batch_size=2, rank=0, world_size=1, num_items=12))
    assert resumed == whole[8:]
    # two ranks together draw exactly the one-process stream
    ranks = [list(SliceSampleDataset(a, batch_size=2, rank=r, world_size=2, num_items=10)) for r in (0, 1)]
    assert sorted(x.index for part in ranks for x in part) == [x.index for x in whole]


def test_state_of_another_clip_shape_is_refused():
    state = ClipSampler(RECORDS, seed=1, length=8).state_dict()
    with pytest.raises(InputError, match="cannot resume"):
        ClipSampler(RECORDS, seed=1, length=4).load_state_dict(state)
    with pytest.raises(InputError, match="must be >= 1"):
        ClipSampler(RECORDS, length=0)


def test_clips_per_epoch_counts_foreground_over_clip_length():
    # volume a: foreground slices 10..29 (20) -> 3 clips of 8; b: 3 slices -> 1 clip of 5; 2 images
    assert ClipSampler(RECORDS, length=8).clips_per_epoch() == 3 + 1 + 2


# --------------------------------------------------------------------------------------------------
# the loader, on real volumes


@pytest.fixture(scope="module")
def hippo(data_dir, tmp_path_factory):
    from medsam3.data.indexing import prepare_dataset
    from medsam3.model.configs import tiny_sam3_config
    from medsam3.model.loading import build_processor

    root = msd_hippocampus(data_dir, tmp_path_factory.mktemp("clips") / "Task04_Hippocampus")
    records, _, _ = prepare_dataset("Task04_Hippocampus", "nnunet", root)
    return records, build_processor(tiny_sam3_config()).tokenizer


def clip_loader(records, tokenizer, **kw):
    from medsam3.train.batches import ItemLoader
    from medsam3.train.clips import ClipLoader

    return ClipLoader(ItemLoader(records, 112, tokenizer), **kw)


def test_loader_gives_every_frame_as_2d_training_sees_its_slice(hippo):
    from medsam3.data.sampler import SliceSample
    from medsam3.train.batches import ItemLoader

    records, tokenizer = hippo
    r = next(i for i, rec in enumerate(records) if rec.case_id == "hippocampus_001")
    clip = ClipSample(7, r, 12, 8, 1, "anterior hippocampus", False, records[r].dataset)
    ex = clip_loader(records, tokenizer, seed=0)(clip)
    assert ex["pixel_values"].shape == (8, 3, 112, 112) and len(ex["targets"]) == 8
    slices = ItemLoader(records, 112, tokenizer)
    present = present_slices(records[r], "anterior hippocampus")
    for j, k in enumerate(clip.slices):
        plain = slices.plain(SliceSample(0, r, k, "anterior hippocampus", False, records[r].dataset))
        assert torch.equal(ex["pixel_values"][j], plain["pixel_values"])
        assert torch.equal(ex["targets"][j]["masks"], plain["masks"])
        assert (len(ex["targets"][j]["boxes"]) > 0) == (k in present)  # slices 12..16 present, 17..19 not
    assert torch.equal(ex["init_masks"], ex["targets"][0]["masks"].any(dim=0))
    assert ex["prompt_box"] is None and ex["init_from_gt"] is False


def test_one_augmentation_per_clip_moves_every_frame_alike(hippo):
    from medsam3.train import augment as aug
    from medsam3.train.augment import AugmentSettings

    records, tokenizer = hippo
    clip = ClipSample(3, 0, 10, 4, 1, "posterior hippocampus", False, records[0].dataset)
    rotate = AugmentSettings(enabled=True, probability=1.0, rotate=30.0, scale=[0.8, 1.2])
    plain = clip_loader(records, tokenizer).plain(clip)
    moved = clip_loader(records, tokenizer, seed=4, augment=rotate)(clip)
    # the clip's one draw (documented stream [seed, 104729, index]; no flips of a positional concept)
    d = aug.draw(rotate, np.random.default_rng([4, 104729, 3]), allow_flip=False, is_color=False)
    assert d.angle != 0.0
    for j in range(4):
        image, masks = aug.apply(plain["pixel_values"][j] * 0.5 + 0.5, plain["targets"][j]["masks"], d)
        torch.testing.assert_close(moved["pixel_values"][j], (image - 0.5) / 0.5, atol=1e-5, rtol=0)
        assert torch.equal(moved["targets"][j]["masks"], masks[masks.flatten(1).any(dim=1)])
    rotate = AugmentSettings(enabled=True, probability=1.0, rotate=30.0)
    shared = clip_loader(records, tokenizer, augment=rotate)(clip)
    again = clip_loader(records, tokenizer, augment=rotate)(clip)
    assert torch.equal(shared["pixel_values"], again["pixel_values"])  # seeded by the clip
    per_frame = clip_loader(records, tokenizer, augment=rotate, per_frame=True)(clip)
    # per frame, each frame turns by its own angle: the frames' masks no longer move alike
    turned = [shared["targets"][j]["masks"].any(dim=0) for j in range(4)]
    own = [per_frame["targets"][j]["masks"].any(dim=0) for j in range(4)]
    assert any(not torch.equal(a, b) for a, b in zip(turned[1:], own[1:], strict=True))


def test_box_on_frame_zero_and_tracker_start_fractions(hippo):
    from medsam3.train.clips import collate_clips, count_clip_targets

    records, tokenizer = hippo
    loader = clip_loader(records, tokenizer, seed=5, box_prompt_fraction=0.5, gt_init_fraction=0.25)
    clips = [
        ClipSample(i, 0, 12, 3, 1, "posterior hippocampus", False, records[0].dataset) for i in range(80)
    ]
    examples = [loader(c) for c in clips]
    boxes = [e["prompt_box"] is not None for e in examples]
    starts = [e["init_from_gt"] for e in examples]
    assert 25 <= sum(boxes) <= 55 and 8 <= sum(starts) <= 35
    boxed = next(e for e in examples if e["prompt_box"] is not None)
    # the clean box (box_noise_std 0) of the object on frame 0
    torch.testing.assert_close(boxed["prompt_box"], boxed["targets"][0]["boxes"][0])
    short = loader(ClipSample(999, 0, 0, 1, 1, "posterior hippocampus", True, records[0].dataset))
    batch = collate_clips([boxed, short])
    assert batch["pixel_values"].shape == (2, 3, 3, 112, 112)
    assert batch["num_frames"].tolist() == [3, 1] and batch["box_labels"].tolist() == [[1], [-10]]
    assert torch.count_nonzero(batch["pixel_values"][1, 1:]) == 0  # padding frames
    objects = sum(len(t["boxes"]) for t in boxed["targets"]) + sum(len(t["boxes"]) for t in short["targets"])
    assert count_clip_targets([batch]) == [float(objects), 2.0]
