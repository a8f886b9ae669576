"""The coarse-to-fine slice search of slices mode (``search="coarse"``) and its guarantee.

Three levels: the probes and the range growth by hand (a per-slice presence profile in, the slices
searched out); the real detection path with the tiny random SAM3 whose presence is driven by a known
per-slice profile (label maps byte-identical to the full pass when every run of passing slices holds a
probe, exact encoder passes; the thin structure between probes that is missed); and ``medsam3 segment``
with the bundled model on the bundled hippocampus sample.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from medsam3.errors import OptionError
from medsam3.image import Image
from medsam3.predict.options import VolumeOptions
from medsam3.predict.prompts import Prompt
from medsam3.predict.segmenter import Segmenter
from medsam3.predict.volume import slices as slices_module
from medsam3.predict.volume.prompts import VolumePrompt
from medsam3.predict.volume.search import (
    SliceSearch,
    probe_slices,
    probe_step,
    run_rounds,
    runs,
    search_profile,
)


def profile(n: int, *extents: tuple[int, int]) -> list[bool]:
    """Presence passes on the inclusive slice ranges ``extents`` of ``n`` slices."""
    out = [False] * n
    for a, b in extents:
        for k in range(a, b + 1):
            out[k] = True
    return out


def span(a: int, b: int) -> set[int]:
    return set(range(a, b + 1))


# --------------------------------------------------------------------------------------------------
# by hand


@pytest.mark.parametrize(
    "spacing, step_mm, step",
    [(1.0, 10, 10), (3.0, 10, 3), (2.5, 10, 4), (5.0, 10, 2), (0.8, 10, 12), (0.7, 10, 14), (12.0, 10, 1)],
)
def test_probe_step_keeps_probes_at_most_the_step_apart(spacing, step_mm, step):
    assert probe_step(spacing, step_mm) == step
    assert step == 1 or step * spacing <= step_mm + 1e-9


def test_probe_step_needs_positive_lengths():
    with pytest.raises(ValueError, match="positive"):
        probe_step(0.0, 10.0)


def test_probe_slices():
    assert probe_slices(range(41), 10) == (0, 10, 20, 30, 40)
    assert probe_slices(range(36), 10) == (0, 10, 20, 30, 35)  # the last slice is always probed
    assert probe_slices(range(5, 17), 4) == (5, 9, 13, 16)  # a 3D box's slices
    assert probe_slices(range(20), 10, key=7) == (0, 7, 10, 19)  # the key slice of a box prompt
    assert probe_slices(range(6), 1) == tuple(range(6))
    assert probe_slices(range(3, 3), 4) == ()


N = 30  # probes every 10 slices: 0, 10, 20, 29
PROBES = {0, 10, 20, 29}


def test_a_structure_starting_between_probes_is_found_whole():
    # passes on 6..14: only probe 10 sees it; growth reaches 6 and 14 and stops at 5 and 15
    assert set(search_profile(profile(N, (6, 14)), 10)) == PROBES | span(5, 15)


def test_two_separate_extents_each_grow_from_their_probe():
    # probes every 5: 0, 5, 10, 15, 20, 25, 29; extents 3..7 (probe 5) and 18..23 (probe 20)
    got = search_profile(profile(N, (3, 7), (18, 23)), 5)
    assert set(got) == {0, 10, 15, 25, 29} | span(2, 8) | span(17, 24)
    assert len(got) == 20


def test_between_two_passing_probes_every_slice_is_searched():
    # extents 3..12 and 18..24: probes 10 and 20 pass, so 11..19 is searched, the gap 13..17 included
    got = set(search_profile(profile(N, (3, 12), (18, 24)), 10))
    assert got == {0, 29} | span(2, 25)


def test_structures_at_the_volume_ends():
    assert set(search_profile(profile(N, (0, 3), (26, 29)), 10)) == span(0, 4) | {10, 20} | span(25, 29)


def test_a_thin_structure_between_probes_is_missed():
    """The documented limit: an extent shorter than the step that holds no probe is never searched."""
    thin = profile(N, (12, 15))  # 4 slices between probes 10 and 20
    assert set(search_profile(thin, 10)) == PROBES
    # a finer step probes it (here slice 14) and finds it whole
    assert span(12, 15) <= set(search_profile(thin, 4))
    # so does a key slice inside it
    assert set(search_profile(thin, 10, key=13)) == PROBES | span(11, 16)


def test_a_plan_limits_the_search():
    # a 3D box over slices 8..21: probes 8, 13, 18, 21; growth stops at the box
    got = search_profile(profile(N, (10, 29)), 5, slices=range(8, 22))
    assert set(got) == span(8, 21)
    assert set(search_profile(profile(N, (10, 29)), 1)) == set(range(N))  # step 1: the full pass


@pytest.mark.parametrize("seed", range(20))
def test_every_extent_holding_a_probe_is_searched_whole(seed):
    rng = np.random.default_rng(seed)
    n, step = int(rng.integers(5, 60)), int(rng.integers(1, 12))
    passes = list(rng.random(n) < rng.uniform(0.1, 0.9))
    got = set(search_profile(passes, step))
    probes = set(probe_slices(range(n), step))
    assert probes <= got
    for a, b in runs([k for k in range(n) if passes[k]]):
        extent = span(a, b)
        if extent & probes:
            assert extent <= got
            assert {a - 1, b + 1} & set(range(n)) <= got  # it stopped where presence failed
        if b - a + 1 >= step:
            assert extent & probes  # an extent of at least `step` slices always holds a probe


def test_rounds_encode_each_slice_once_and_decide_every_prompt_covering_it():
    n = 20
    calls: list[tuple[list[int], list[tuple[int, int]]]] = []
    passes = {0: profile(n, (3, 6)), 1: profile(n, (7, 10))}

    def evaluate(ks, rows):
        calls.append((list(ks), list(rows)))
        return [passes[i][ks[b]] for b, i in rows]

    searches = {0: SliceSearch.coarse(n, range(n), 10), 1: SliceSearch.coarse(n, range(5, 15), 10)}
    count = run_rounds(searches, 3, evaluate)
    encoded = [k for ks, _ in calls for k in ks]
    assert len(encoded) == len(set(encoded)) == count
    assert calls[0][0] == [0, 5, 10] and calls[1][0] == [14, 19]  # round 0: both prompts' probes
    assert searches[0].searched_slices == sorted(encoded)
    assert searches[1].searched_slices == [k for k in sorted(encoded) if 5 <= k < 15]
    # prompt 0: probe 5 passes -> 2..7 (2 and 7 fail); prompt 1: probe 10 passes -> 6..11 (6 and 11 fail;
    # 6 and 7 were encoded for prompt 0's growth and decided for both prompts then)
    assert sorted(encoded) == [0, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 14, 19]
    assert [ks for ks, _ in calls[2:]] == [[4, 6, 9], [11], [3, 7, 8], [2]]

    full = {0: SliceSearch.full(n, range(n)), 1: SliceSearch.full(n, range(5, 15))}
    calls.clear()
    assert run_rounds(full, 8, evaluate) == n
    assert [ks for ks, _ in calls] == [list(range(0, 8)), list(range(8, 16)), list(range(16, 20))]
    assert calls[0][1][:7] == [(0, 0), (1, 0), (2, 0), (3, 0), (4, 0), (5, 0), (5, 1)]


def test_runs():
    assert runs([5, 0, 1, 2, 7, 8]) == [(0, 2), (5, 5), (7, 8)]
    assert runs([]) == []


def test_the_options():
    o = VolumeOptions()
    assert (o.search, o.search_step_mm) == ("full", 10.0)
    assert VolumeOptions(search="coarse", search_step_mm="5").search_step_mm == 5.0
    with pytest.raises(OptionError, match="search must be one of full, coarse, got 'fine'"):
        VolumeOptions(search="fine")
    with pytest.raises(OptionError, match="search_step_mm must be at least"):
        VolumeOptions(search_step_mm=0)
    for mode in ("track", "clips"):
        with pytest.raises(OptionError, match="search coarse is for mode slices"):
            VolumeOptions(search="coarse", mode=mode)


# --------------------------------------------------------------------------------------------------
# the tiny random SAM3 with a controlled presence

Z = 40  # slices of 2.5 mm: the 10 mm step probes every 4th slice, 0, 4, ..., 36 and 39
LIVER, SPLEEN, NODULE = (5, 17), (22, 24), (29, 31)  # NODULE lies between probes 28 and 32


@pytest.fixture(scope="module")
def loaded(tiny_model, tiny_config):
    from medsam3.model.loading import LoadedSam3, build_processor

    return LoadedSam3(tiny_model, build_processor(tiny_config), torch.device("cpu"), torch.float32, "tiny")


@pytest.fixture(scope="module")
def volume() -> Image:
    rng = np.random.default_rng(3)
    arr = rng.normal(100.0, 30.0, size=(Z, 20, 24)).astype(np.float32)
    return Image.from_array(arr, spacing=(0.8, 0.8, 2.5), modality="MR")


def drive_presence(monkeypatch, profiles: list[list[bool]]) -> None:
    """Presence of prompt ``i`` on slice ``k`` passes exactly when ``profiles[i][k]``: the presence logits
    the model gave are replaced by +-10 before the per-slice rule; the queries and masks are the model's."""
    original = slices_module._decide_rows

    def decide(options, out, rows, results):
        logits = torch.tensor([[10.0 if profiles[i][k] else -10.0] for k, i in rows])
        driven = SimpleNamespace(
            pred_logits=out.pred_logits, presence_logits=logits, pred_masks=out.pred_masks
        )
        original(options, driven, rows, results)

    monkeypatch.setattr(slices_module, "_decide_rows", decide)


def segment(loaded, volume, prompts, **options):
    rows: list[int] = []
    handle = loaded.model.vision_encoder.register_forward_hook(lambda m, a, o: rows.append(a[0].shape[0]))
    try:  # threshold 0: every slice where presence passes keeps its best mask
        result = Segmenter(loaded, options=VolumeOptions(threshold=0.0, **options)).segment(volume, prompts)
    finally:
        handle.remove()
    assert sum(rows) == result.settings["image_encoder_runs"]
    return result


def entries(result):
    keys = ("absent", "reason", "voxels", "score", "presence", "slice_range", "slices_detected")
    return [{k: getattr(e, k) for k in keys} for e in result.labels]


def test_coarse_equals_full_when_every_extent_holds_a_probe(loaded, volume, monkeypatch):
    drive_presence(monkeypatch, [profile(Z, LIVER), profile(Z, SPLEEN)])
    prompts = [Prompt("liver"), Prompt("spleen")]
    full = segment(loaded, volume, prompts)
    coarse = segment(loaded, volume, prompts, search="coarse")
    assert full.label_map.dtype == coarse.label_map.dtype
    assert full.label_map.tobytes() == coarse.label_map.tobytes()
    assert set(np.unique(full.label_map)) == {0, 1, 2}
    assert entries(full) == entries(coarse)
    assert full.settings["image_encoder_runs"] == Z
    # 11 probes; liver (probes 8, 12, 16 pass): 5..18 besides them; spleen (probe 24): 21..25
    assert coarse.settings["image_encoder_runs"] == 26
    report = coarse.settings["slice_search"]
    assert (report["search"], report["step_slices"], report["slice_spacing_mm"]) == ("coarse", 4, 2.5)
    assert report["encoder_runs_full"] == Z and report["input_axis"] == 0
    searched = [[0, 0], [4, 18], [20, 25], [28, 28], [32, 32], [36, 36], [39, 39]]
    for p in report["prompts"]:  # one intensity mapping: both prompts decided on every encoded slice
        assert p["searched"] == searched and p["slices_searched"] == 26
        assert p["probes"] == [0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 39]
    assert full.settings["slice_search"]["prompts"][0]["searched"] == [[0, Z - 1]]


def test_a_thin_structure_between_probes_is_missed_unless_the_step_is_finer(loaded, volume, monkeypatch):
    drive_presence(monkeypatch, [profile(Z, LIVER), profile(Z, SPLEEN), profile(Z, NODULE)])
    prompts = [Prompt("liver"), Prompt("spleen"), Prompt("nodule")]
    full = segment(loaded, volume, prompts)
    coarse = segment(loaded, volume, prompts, search="coarse")
    assert (full.label_map == 3).any() and not (coarse.label_map == 3).any()
    assert (coarse.labels[2].absent, coarse.labels[2].reason) == (True, "presence")
    np.testing.assert_array_equal(coarse.label_map, np.where(full.label_map == 3, 0, full.label_map))
    assert coarse.settings["image_encoder_runs"] == 26

    # 5 mm: probes every 2nd slice (21 of them) hold slice 30; liver adds 7 slices, spleen 3, nodule 2
    fine = segment(loaded, volume, prompts, search="coarse", search_step_mm=5.0)
    assert fine.label_map.tobytes() == full.label_map.tobytes() and entries(fine) == entries(full)
    assert fine.settings["image_encoder_runs"] == 33


def test_boxes_are_searched_inside_their_slices(loaded, volume, monkeypatch):
    drive_presence(monkeypatch, [profile(Z, LIVER), profile(Z, NODULE)])
    prompts = [
        VolumePrompt("liver", box3d=(0, 0, 10, 24, 20, 30)),  # slices 10..29: probes 10, 14, 18, 22, 26, 29
        VolumePrompt("nodule", boxes=[(2, 2, 12, 12)], box_slice=30),  # the key slice is probed
    ]
    full = segment(loaded, volume, prompts)
    coarse = segment(loaded, volume, prompts, search="coarse")
    assert full.label_map.tobytes() == coarse.label_map.tobytes() and entries(full) == entries(coarse)
    assert full.settings["image_encoder_runs"] == Z
    # round 0: the union of both prompts' probes (18 slices); round 1: liver 11, 13, 15, 17 and nodule 31;
    # growth then stops at probes 18 (liver) and 32 (nodule), already searched, where presence fails
    assert coarse.settings["image_encoder_runs"] == 23
    liver, nodule = coarse.settings["slice_search"]["prompts"]
    assert liver["probes"] == [10, 14, 18, 22, 26, 29]
    assert liver["searched"] == [[10, 18], [20, 20], [22, 22], [24, 24], [26, 26], [28, 29]]
    assert 30 in nodule["probes"] and [28, 32] in nodule["searched"]


# --------------------------------------------------------------------------------------------------
# medsam3 segment with the bundled model


def test_cli_search_coarse_on_the_bundled_sample(tmp_path, capsys):
    from importlib.resources import files

    from medsam3.cli import main
    from medsam3.io.readers import read_label_map

    sample = files("medsam3") / "assets" / "samples" / "hippocampus_019.nii.gz"  # MR (41, 47, 36), 1 mm
    out = {}
    for search in ("full", "coarse"):
        code = main(
            ["segment", str(sample), "-p", "hippocampus", "--search", search, "-o", str(tmp_path / search)]
        )
        assert code == 0, capsys.readouterr().err
        summary = json.loads((tmp_path / search / "hippocampus_019.json").read_text())
        out[search] = (read_label_map(tmp_path / search / summary["outputs"]["labels"]).array, summary)
    (full, full_summary), (coarse, coarse_summary) = out["full"], out["coarse"]
    assert full.dtype == coarse.dtype and full.tobytes() == coarse.tobytes() and full.any()
    assert [e["voxels"] for e in full_summary["labels"]] == [e["voxels"] for e in coarse_summary["labels"]]
    assert full_summary["settings"]["image_encoder_runs"] == 41
    assert full_summary["settings"]["slice_search"]["search"] == "full"
    settings = coarse_summary["settings"]
    assert settings["volume"]["search"] == "coarse" and settings["volume"]["search_step_mm"] == 10.0
    report = settings["slice_search"]
    assert report["step_slices"] == 10 and report["encoder_runs_full"] == 41
    (prompt,) = report["prompts"]
    assert prompt["probes"] == [0, 10, 20, 30, 40]
    # the bundled model's presence for "hippocampus" passes on probes 10, 20 and 30: 11..29 lie between
    # passing probes, growth outwards adds 4..9 and 31..36 and stops at the first failing slice each side
    # (4 and 36; with the stage-6 model they were 3 and 35)
    assert prompt["searched"] == [[0, 0], [4, 36], [40, 40]]
    assert settings["image_encoder_runs"] == prompt["slices_searched"] == 35

    code = main(
        [
            "segment",
            str(sample),
            "-p",
            "x",
            "--search",
            "coarse",
            "--mode",
            "track",
            "-o",
            str(tmp_path / "t"),
        ]
    )
    assert code == 2 and "search coarse is for mode slices" in capsys.readouterr().err
