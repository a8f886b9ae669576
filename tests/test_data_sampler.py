"""Slice sampler: foreground weighting, negatives, temperature balancing, determinism and resuming."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from data_fixtures import kvasir_folder, msd_hippocampus
from medsam3.data.indexing import prepare_dataset
from medsam3.data.manifest import Record
from medsam3.data.sampler import SliceSampleDataset, SliceSampler
from medsam3.errors import InputError


@pytest.fixture(scope="module")
def hippo_records(data_dir, tmp_path_factory):
    root = msd_hippocampus(data_dir, tmp_path_factory.mktemp("s") / "Task04_Hippocampus")
    records, _, _ = prepare_dataset("Task04_Hippocampus", "nnunet", root)
    for r in records:
        r.split = "train"
    return records


def _fake(dataset: str, n: int, group: str = "US") -> list[Record]:
    return [
        Record(
            dataset,
            f"{dataset}_{i}",
            [f"/x/{dataset}/{i}.png"],
            [f"/x/{dataset}/{i}_m.png"],
            {1: "thing"},
            dims=2,
            shape=[8, 8],
            foreground={"thing": [[0, 1]]},
            group=group,
        )
        for i in range(n)
    ]


def test_positives_on_foreground_negatives_on_absent_slices(hippo_records):
    sampler = SliceSampler(hippo_records, seed=3, negative_fraction=0.2)
    labels = {i: sitk.GetArrayFromImage(sitk.ReadImage(r.label[0])) for i, r in enumerate(hippo_records)}
    value = {"anterior hippocampus": 1, "posterior hippocampus": 2}
    n = 4000
    negatives = 0
    for i in range(n):
        s = sampler.sample(i)
        present = bool((labels[s.record][s.slice] == value[s.concept]).any())
        assert present != s.negative
        negatives += s.negative
    # binomial(4000, 0.2): sd 0.0063, tolerance 4 sd
    assert abs(negatives / n - 0.2) < 0.025


def test_negative_fraction_setting_and_zero(hippo_records):
    for frac in (0.0, 0.5):
        sampler = SliceSampler(hippo_records, seed=1, negative_fraction=frac)
        got = np.mean([sampler.sample(i).negative for i in range(2000)])
        assert abs(got - frac) < 0.045


def test_absent_classes_of_2d_images_are_negatives(data_dir, tmp_path):
    root = kvasir_folder(data_dir, tmp_path / "k")
    records, _, _ = prepare_dataset("kvasir", "folder2d", root, labels={1: "polyp"}, modality="RGB")
    for r in records:
        r.split = "train"
    # polyp is on every image: no absent concept, so every item is a positive
    sampler = SliceSampler(records, negative_fraction=0.5)
    assert not any(sampler.sample(i).negative for i in range(200))
    # a concept of another group becomes a negative only when asked for
    other = _fake("fundus", 3, group="fundus")
    for r in other:
        r.labels, r.foreground = {1: "optic disc"}, {"optic disc": [[0, 1]]}
    mixed = SliceSampler(records + other, negative_fraction=0.5, cross_group_negatives=True, seed=2)
    items = [mixed.sample(i) for i in range(600)]
    kv_neg = [s for s in items if s.dataset == "kvasir" and s.negative]
    assert kv_neg and {s.concept for s in kv_neg} == {"optic disc"}
    assert {s.concept for s in items if s.dataset == "fundus" and s.negative} == {"polyp"}


@pytest.mark.parametrize("temperature", [1.0, 2.0, 1000.0])
def test_temperature_balancing(temperature):
    records = _fake("big", 1000) + _fake("small", 10)
    sampler = SliceSampler(records, temperature=temperature, negative_fraction=0.0, seed=0)
    w_big, w_small = 1000 ** (1 / temperature), 10 ** (1 / temperature)
    expected = w_big / (w_big + w_small)  # T=1: 0.990, T=2: 0.909, T=1000: ~0.501
    assert sampler.probabilities["big"] == pytest.approx(expected)
    n = 4000
    got = sum(sampler.sample(i).dataset == "big" for i in range(n)) / n
    assert abs(got - expected) < 4 * np.sqrt(expected * (1 - expected) / n) + 1e-3


def test_group_temperature_balances_groups_first():
    records = _fake("a", 300, "US") + _fake("b", 100, "US") + _fake("c", 4, "CT")
    sampler = SliceSampler(records, temperature=1.0, group_temperature=1e6, negative_fraction=0.0)
    p = sampler.probabilities
    assert p["c"] == pytest.approx(0.5, abs=1e-4)
    assert p["a"] == pytest.approx(0.5 * 300 / 400, abs=1e-4) and p["b"] == pytest.approx(
        0.5 * 100 / 400, abs=1e-4
    )


def test_deterministic_and_resumable(hippo_records):
    a = SliceSampler(hippo_records, seed=11)
    b = SliceSampler(list(hippo_records), seed=11)
    first = [next(iter(a)) for _ in range(30)]
    assert first == [b.sample(i) for i in range(30)]
    state = a.state_dict()
    assert state["position"] == 30
    tail = [next(iter(a)) for _ in range(20)]
    c = SliceSampler(hippo_records, seed=11)
    c.load_state_dict(state)
    assert [next(iter(c)) for _ in range(20)] == tail
    other = SliceSampler(hippo_records, seed=12)
    assert [other.sample(i) for i in range(30)] != first
    with pytest.raises(InputError, match="cannot resume"):
        other.load_state_dict(state)
    with pytest.raises(InputError, match="cannot resume"):
        SliceSampler(hippo_records[:3], seed=11).load_state_dict(state)


def _collate(batch):
    return batch


@pytest.mark.parametrize("workers", [0, 2])
def test_dataloader_shards_batches_and_resumes(hippo_records, workers):
    sampler = SliceSampler(hippo_records, seed=5)
    ds = SliceSampleDataset(sampler, batch_size=4, num_items=40)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=workers, collate_fn=_collate)
    batches = list(loader)
    assert [s.index for b in batches for s in b] == list(range(40))
    assert [s for b in batches for s in b] == [sampler.sample(i) for i in range(40)]
    # resume after 3 steps: the continuation is items 12, 13, ...
    state = ds.state_at(3)
    resumed = SliceSampler(hippo_records, seed=5)
    resumed.load_state_dict(state)
    ds2 = SliceSampleDataset(resumed, batch_size=4, num_items=8)
    got = [s.index for b in torch.utils.data.DataLoader(ds2, batch_size=4, collate_fn=_collate) for s in b]
    assert got == list(range(12, 20))


def test_two_ranks_take_disjoint_batches(hippo_records):
    sampler = SliceSampler(hippo_records, seed=5)
    r0 = list(SliceSampleDataset(sampler, batch_size=2, rank=0, world_size=2, num_items=6).indices())
    r1 = list(SliceSampleDataset(sampler, batch_size=2, rank=1, world_size=2, num_items=6).indices())
    assert r0 == [0, 1, 4, 5, 8, 9] and r1 == [2, 3, 6, 7, 10, 11]
    assert collections.Counter(r0 + r1) == collections.Counter(range(12))


def test_bad_settings(hippo_records):
    with pytest.raises(InputError, match="negative fraction"):
        SliceSampler(hippo_records, negative_fraction=1.0)
    with pytest.raises(InputError, match="no records in split 'val'"):
        SliceSampler(hippo_records, split="val")


def test_cross_group_share_gives_other_groups_concepts_to_images_with_their_own_negatives(hippo_records):
    others = _fake("HC18", 3, group="US")
    records = hippo_records + others
    for r in others:
        r.split = "train"
    base = dict(seed=5, negative_fraction=0.5, temperature=1e6, cross_group_negatives=True)
    plain = SliceSampler(records, **base)
    zero = SliceSampler(records, **base, cross_group_share=0.0)
    # share 0 keeps the stream (and its fingerprint) exactly as before
    assert [plain.sample(i) for i in range(300)] == [zero.sample(i) for i in range(300)]
    assert plain.fingerprint() == zero.fingerprint()
    hippo = {"anterior hippocampus", "posterior hippocampus"}
    mr_negatives = [s for s in (plain.sample(i) for i in range(2000)) if s.negative and s.dataset != "HC18"]
    assert mr_negatives and all(s.concept in hippo for s in mr_negatives)  # never "thing" on MR without it
    shared = SliceSampler(records, **base, cross_group_share=0.4)
    assert shared.fingerprint() != plain.fingerprint()
    mr_negatives = [s for s in (shared.sample(i) for i in range(4000)) if s.negative and s.dataset != "HC18"]
    cross = np.mean([s.concept == "thing" for s in mr_negatives])
    # binomial(~1000, 0.4): sd 0.016; tolerance 4 sd
    assert abs(cross - 0.4) < 0.065
    with pytest.raises(InputError, match="cross-group share"):
        SliceSampler(records, **base, cross_group_share=1.5)
