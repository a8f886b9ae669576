"""``medsam3 evaluate --protocol cvpr25 | v2-window``: values by hand, MONAI cross-checks, CLI end to end."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from medsam3.cli import main
from medsam3.errors import InputError
from medsam3.evaluate.challenge import (
    ChallengeOptions,
    dice_or_nan,
    match_instances,
    neighbour_codes,
    normalized_surface_dice,
    parse_prompts,
    prediction_instances,
    relabel_sequential,
    score_challenge,
    surfel_area_table,
    v2_window,
    window_dice,
)

RECIST = "medsam2_recist_npz"


# -- helpers ------------------------------------------------------------------------------------------------
def prompts(labels: dict[int, str], instance: int = 0) -> np.ndarray:
    """``text_prompts`` exactly as the challenge stores it: a pickled dict in a 0-d object array."""
    value: dict = {str(k): v for k, v in labels.items()}
    value["instance_label"] = instance
    return np.array(value, dtype=object)


def write_ref(path: Path, gts: np.ndarray, spacing_xyz, labels: dict[int, str], instance: int = 0) -> Path:
    imgs = np.zeros(gts.shape, dtype=np.uint8)
    np.savez(
        path,
        imgs=imgs,
        gts=gts,
        spacing=np.asarray(spacing_xyz, float),
        text_prompts=prompts(labels, instance),
    )
    return path


def write_pred(path: Path, segs: np.ndarray) -> Path:
    np.savez(path, segs=segs.astype(np.uint8))
    return path


def score_one(tmp_path: Path, gts, segs, spacing_xyz, labels, instance=0, **options):
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    ref_dir.mkdir(exist_ok=True)
    pred_dir.mkdir(exist_ok=True)
    write_ref(ref_dir / "CT_case.npz", gts, spacing_xyz, labels, instance)
    if segs is not None:
        write_pred(pred_dir / "CT_case.npz", segs)
    result = score_challenge(pred_dir, ref_dir, ChallengeOptions(**options))
    return result, result.cases[0]


def box(shape, *ranges) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[tuple(slice(a, b) for a, b in ranges)] = True
    return m


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# -- surfel definitions ------------------------------------------------------------------------------------
def test_neighbour_codes_are_deepminds_correlation():
    """Codes equal DeepMind's: the mask padded at the high end, correlated with the 2x2x2 bit kernel."""
    mask = np.random.default_rng(0).random((5, 6, 7)) > 0.5
    crop = np.zeros(np.array(mask.shape) + 1, dtype=np.uint8)
    crop[:-1, :-1, :-1] = mask
    kernel = np.array([[[128, 64], [32, 16]], [[8, 4], [2, 1]]])
    expected = ndimage.correlate(crop, kernel, mode="constant", cval=0)
    np.testing.assert_array_equal(neighbour_codes(mask), expected)


def test_surfel_areas_by_hand():
    """Flat face, edge and corner surfels for spacing (3, 1, 1) mm (array order)."""
    table = surfel_area_table((3.0, 1.0, 1.0))
    assert table[0] == 0 and table[255] == 0
    assert table[0b00001111] == pytest.approx(1.0)  # face across axis 0: s1 * s2
    assert table[0b11001100] == pytest.approx(3.0)  # face across axis 1: s0 * s2
    assert table[0b00000011] == pytest.approx(0.5 * math.sqrt(10))  # edge along axis 2: s2 sqrt(s0²+s1²) / 2
    assert table[0b10001000] == pytest.approx(1.5 * math.sqrt(2))  # edge along axis 0
    assert table[0b00000001] == pytest.approx(math.sqrt(19) / 8)  # corner


def test_surfel_table_matches_monai():
    pytest.importorskip("monai")
    from monai.metrics.utils import create_table_neighbour_code_to_surface_area

    for spacing in ((1.0, 1.0, 1.0), (3.0, 0.7, 0.7), (0.5, 1.3, 2.9)):
        monai_table = create_table_neighbour_code_to_surface_area(spacing)[0].numpy()
        np.testing.assert_allclose(surfel_area_table(spacing), monai_table, rtol=1e-6)


# Reference: a 3 x 2 x 2 voxel box; prediction: the same box one slice further (axis 0). With 3 mm slices
# and a 2 mm tolerance the bottom face of the reference and the top face of the prediction (both 3 mm from
# the other surface) are the only surfels out of tolerance. Per level of corners (3 x 3 corners in-plane):
#   bottom / top level: 1 face corner (1 x 1 mm²), 4 edge corners (0.5 * 1 * sqrt(3² + 1²)), 4 box corners
#   (sqrt((1*1)² + (3*1)² + (3*1)²) / 8); each side level: 4 vertical-edge corners (0.5 * 3 * sqrt(2)) and
#   4 side-face corners (3 * 1).
CAP = 1 + 4 * 0.5 * math.sqrt(10) + 4 * math.sqrt(19) / 8
SIDE = 4 * 1.5 * math.sqrt(2) + 4 * 3.0
SHIFTED_BOX_NSD = 1 - CAP / (2 * CAP + 2 * SIDE)  # 2 side levels for a 3-slice box; = 0.8415...


def test_nsd_cube_shifted_one_slice_by_hand():
    ref = box((8, 6, 6), (2, 5), (2, 4), (2, 4))
    pred = np.roll(ref, 1, axis=0)
    assert dice_or_nan(ref, pred) == pytest.approx(2 * 8 / 24)
    assert normalized_surface_dice(ref, pred, (3.0, 1.0, 1.0), 2.0) == pytest.approx(
        SHIFTED_BOX_NSD, abs=1e-12
    )
    assert normalized_surface_dice(ref, pred, (1.0, 1.0, 1.0), 2.0) == 1.0  # 1 mm apart: all within 2 mm
    assert normalized_surface_dice(ref, ref, (3.0, 1.0, 1.0), 2.0) == 1.0


def test_empty_masks_are_nan_or_zero():
    empty, cube = np.zeros((4, 4, 4), bool), box((4, 4, 4), (1, 3), (1, 3), (1, 3))
    assert math.isnan(dice_or_nan(empty, empty))
    assert math.isnan(normalized_surface_dice(empty, empty, (1, 1, 1)))
    assert dice_or_nan(cube, empty) == 0 and normalized_surface_dice(cube, empty, (1, 1, 1)) == 0
    assert normalized_surface_dice(empty, cube, (1, 1, 1)) == 0


def blob(seed: int, shape=(24, 40, 40), keep: float = 0.15) -> np.ndarray:
    field = ndimage.gaussian_filter(np.random.default_rng(seed).random(shape), 3)
    return field > np.quantile(field, 1 - keep)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI's own deprecated argument
def test_nsd_agrees_with_monai_surface_dice():
    """Random smooth blobs, anisotropic spacing: MONAI with sub-voxels is the same surfel definition.

    Found: differences below 1e-7 (MONAI's float32 table); MONAI's default voxel-based NSD (use_subvoxels
    False, also :mod:`medsam3.evaluate.surface`) differs by 0.02 to 0.07 on these pairs.
    """
    torch = pytest.importorskip("torch")
    pytest.importorskip("monai")
    from monai.metrics import compute_surface_dice

    def onehot(mask):
        t = torch.from_numpy(mask.astype(np.float32))[None]
        return torch.cat([1 - t, t])[None]

    spacing = (2.5, 0.8, 0.8)
    a = blob(0)
    pairs = [(a, ndimage.binary_dilation(a)), (a, blob(1) | np.roll(a, (1, 2), axis=(0, 2)))]
    for ref, pred in pairs:
        ours = normalized_surface_dice(ref, pred, spacing, 2.0)
        theirs = compute_surface_dice(onehot(pred), onehot(ref), [2.0], spacing=spacing, use_subvoxels=True)
        assert ours == pytest.approx(float(theirs.item()), abs=1e-6)
        voxels = compute_surface_dice(onehot(pred), onehot(ref), [2.0], spacing=spacing, use_subvoxels=False)
        assert 0 < abs(ours - float(voxels.item())) < 0.1


# -- semantic cases ---------------------------------------------------------------------------------------
def test_spacing_order_xyz_reverses_onto_array_axes(tmp_path):
    gts = box((8, 6, 6), (2, 5), (2, 4), (2, 4)).astype(np.uint8)
    segs = np.roll(gts, 1, axis=0)
    _, case = score_one(tmp_path, gts, segs, (1.0, 1.0, 3.0), {1: "a box"}, spacing_order="xyz")
    assert case.dsc == pytest.approx(2 / 3)
    assert case.nsd == pytest.approx(SHIFTED_BOX_NSD)
    # the default, as stored on the array axes (the organisers' script): 1 mm slices, all within 2 mm
    _, as_stored = score_one(tmp_path, gts, segs, (1.0, 1.0, 3.0), {1: "a box"})
    assert as_stored.nsd == 1.0


def test_semantic_nan_ids_skipped_and_absent_prompt_penalised(tmp_path):
    shape = (6, 10, 10)
    gts = box(shape, (1, 4), (1, 4), (1, 4)).astype(np.uint8)  # only label 1 in the reference
    segs = gts.copy()
    segs[box(shape, (1, 3), (6, 9), (6, 9))] = 3  # a mask for prompted label 3, absent from the reference
    result, case = score_one(tmp_path, gts, segs, (1, 1, 1), {1: "one", 2: "two", 3: "three"})
    by_id = {s.label: s for s in case.labels}
    assert by_id[1].dsc == 1.0 and by_id[1].nsd == 1.0
    assert math.isnan(by_id[2].dsc) and math.isnan(by_id[2].nsd)  # absent from both: skipped
    assert by_id[3].dsc == 0.0 and by_id[3].nsd == 0.0  # predicted but absent: penalised
    assert case.dsc == pytest.approx(0.5) and case.nsd == pytest.approx(0.5)
    assert (case.absent_prompts, case.absent_with_fp) == (2, 1)
    assert [s.false_positive for s in case.labels] == [False, False, True]
    assert result.missing == [] and case.status == "ok"


def test_all_ids_empty_case_is_nan(tmp_path):
    gts = np.zeros((4, 5, 5), np.uint8)
    _, case = score_one(tmp_path, gts, gts, (1, 1, 1), {1: "one"})
    assert math.isnan(case.dsc) and "left out" in case.note
    assert (case.absent_prompts, case.absent_with_fp) == (1, 0)


def test_uint8_cast_wraps_like_the_organisers(tmp_path):
    gts = np.zeros((4, 6, 6), np.int32)
    gts[1:3, 1:3, 1:3] = 257  # becomes 1 after the uint8 cast
    segs = np.zeros_like(gts)
    segs[1:3, 1:3, 1:3] = 1
    result, case = score_one(tmp_path, gts, segs.astype(np.uint8), (1, 1, 1), {1: "one", 300: "big"})
    assert case.labels[0].dsc == 1.0
    assert math.isnan(case.labels[1].dsc)  # id 300 can never match a uint8 map
    assert any("wrapped" in w for w in result.warnings) and any("exceed 255" in w for w in result.warnings)


def test_missing_and_failed_predictions_score_zero(tmp_path):
    gts = box((4, 6, 6), (1, 3), (1, 3), (1, 3)).astype(np.uint8)
    result, case = score_one(tmp_path, gts, None, (1, 1, 1), {1: "one", 2: "two"})
    assert (case.status, case.dsc, case.nsd) == ("missing", 0.0, 0.0)
    assert result.missing == ["CT_case.npz"] and case.absent_prompts == 0
    np.savez(tmp_path / "pred" / "CT_case.npz", segs=np.zeros((3, 6, 6), np.uint8))  # wrong shape
    result = score_challenge(tmp_path / "pred", tmp_path / "ref", ChallengeOptions())
    case = result.cases[0]
    assert (case.status, case.dsc) == ("failed", 0.0) and result.failed == ["CT_case.npz"]
    assert "shape" in case.note
    (tmp_path / "pred" / "CT_case.npz").write_bytes(b"not an npz")
    case = score_challenge(tmp_path / "pred", tmp_path / "ref", ChallengeOptions()).cases[0]
    assert (case.status, case.dsc) == ("failed", 0.0) and "cannot be read" in case.note


def test_prompt_entries():
    labels, instance, notes = parse_prompts(
        {"2": ["", "liver"], "01": "spleen", "instance_label": "1"}, Path("x")
    )
    assert (labels, instance, notes) == ({1: "spleen", 2: "liver"}, True, [])
    labels, instance, notes = parse_prompts({"0": "background", "3": "kidney"}, Path("x"))
    assert (labels, instance) == ({3: "kidney"}, False) and len(notes) == 2  # no flag; label 0 left out
    for bad in (
        {"1": "a", "instance_label": 2},
        {"1": "a", "01": "b"},
        {"liver": "a"},
        {"instance_label": 0},
    ):
        with pytest.raises(InputError):
            parse_prompts(bad, Path("x"))


# -- instance cases ---------------------------------------------------------------------------------------
def test_instance_f1_two_references_three_predictions(tmp_path):
    shape = (6, 20, 20)
    gts = np.zeros(shape, np.uint8)
    gts[box(shape, (1, 5), (1, 5), (1, 5))] = 3  # instance A (ids need not be sequential)
    gts[box(shape, (1, 5), (10, 14), (10, 14))] = 7  # instance B
    segs = np.zeros(shape, np.uint8)
    segs[box(shape, (1, 4), (1, 5), (1, 5))] = 1  # A': 48 of A's 64 voxels, IoU 0.75, Dice 6/7
    segs[box(shape, (2, 3), (10, 14), (10, 14))] = 1  # B': one slice of B, IoU 0.25: no match
    segs[4, 5, 5] = 1  # C: touches A' only at a corner (26- but not 6-connected): its own instance
    _, case = score_one(tmp_path, gts, segs, (1, 1, 1), {1: "lesions"}, instance=1)
    inst = case.instances
    assert (inst.ref_instances, inst.pred_instances) == (2, 3)
    assert (inst.tp, inst.fp, inst.fn) == (1, 2, 1)
    assert inst.precision == pytest.approx(1 / 3) and inst.recall == pytest.approx(1 / 2)
    assert inst.f1 == pytest.approx(0.4)
    assert inst.dsc_tp == pytest.approx(6 / 7)
    assert case.dsc is None and case.nsd is None and case.task == "instance"


def test_instance_empty_cases():
    empty = np.zeros((3, 4, 4), np.int32)
    one = empty.copy()
    one[1, 1:3, 1:3] = 1
    both = match_instances(empty, 0, empty, 0)
    assert (both.tp, both.fp, both.fn, both.f1) == (0, 0, 0, 0.0) and math.isnan(both.dsc_tp)
    only_pred = match_instances(empty, 0, one, 1)
    assert (only_pred.fp, only_pred.precision, only_pred.f1) == (1, 0.0, 0.0)
    only_ref = match_instances(one, 1, empty, 0)
    assert (only_ref.fn, only_ref.recall, only_ref.f1) == (1, 0.0, 0.0)


def test_prediction_with_several_values_is_read_as_instances():
    segs = np.zeros((3, 6, 6), np.uint8)
    segs[1, 1:3, 1:5] = 4
    segs[1, 3:5, 1:5] = 9  # touches the first: two instances all the same
    labels, n, how = prediction_instances(segs)
    assert (n, how) == (2, "values") and set(np.unique(labels)) == {0, 1, 2}
    labels, n, how = prediction_instances((segs > 0).astype(np.uint8))
    assert (n, how) == (1, "components")
    relabelled, count = relabel_sequential(np.array([0, 7, 3, 7]))
    assert count == 2 and relabelled.tolist() == [0, 2, 1, 2]


def test_instance_case_without_reference_instances(tmp_path):
    gts = np.zeros((3, 6, 6), np.uint8)
    segs = gts.copy()
    segs[1, 1:3, 1:3] = 1
    _, case = score_one(tmp_path, gts, segs, (1, 1, 1), {1: "cells"}, instance=1)
    assert case.instances.f1 == 0.0 and (case.absent_prompts, case.absent_with_fp) == (1, 1)
    _, case = score_one(tmp_path, gts, gts, (1, 1, 1), {1: "cells"}, instance=1)
    assert case.instances.f1 == 0.0 and "official rule" in case.note


# -- V2 window ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("depth", "init", "expected"),
    [(20, 0, (0, 7)), (20, 2, (0, 7)), (20, 3, (0, 7)), (20, 4, (1, 8)), (20, 10, (7, 14)),
     (20, 15, (12, 19)), (20, 19, (12, 19)), (8, 6, (0, 7)), (5, 4, (0, 4))],
)  # fmt: skip
def test_v2_window_placement(depth, init, expected):
    window = v2_window(depth, init)
    assert (window.start, window.stop - 1) == expected


def test_v2_window_dice_by_hand():
    ref = np.zeros((12, 4, 4), bool)
    pred = np.zeros_like(ref)
    ref[10, :2, :2] = True  # the largest slice (4 pixels), near the end: window 4..11
    ref[9, 0, 0] = True
    pred[10, :2, :1] = True  # Dice 2*2 / (4+2) = 2/3
    pred[8, 3, 3] = True  # a false positive slice: Dice 0
    pred[2, 0, 0] = True  # outside the window: not scored
    out = window_dice(ref, pred)
    assert (out["init"], out["start"], out["stop"]) == (10, 4, 11)
    assert out["slices_scored"] == 3  # slices 8, 9, 10; the five both-empty slices are skipped
    assert out["dice"] == pytest.approx((0 + 0 + 2 / 3) / 3)
    assert window_dice(np.zeros_like(ref), pred) is None  # no label 1: skipped, as V2


# -- the CLI on challenge files built from the real sample volumes ------------------------------------------
def _shift(mask: np.ndarray, dx: int) -> np.ndarray:
    return np.roll(mask, dx, axis=2)


def _erode(mask: np.ndarray, n: int) -> np.ndarray:
    return ndimage.binary_erosion(mask, structure=np.ones((1, 3, 3), bool), iterations=n)


@pytest.fixture(scope="module")
def challenge_folders(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("cvpr25")
    ref_dir, pred_dir = root / "ref", root / "pred"
    ref_dir.mkdir()
    pred_dir.mkdir()
    samples = {p.name.split("_")[2]: p for p in sorted((data_dir / RECIST).glob("CT_Lesion_*.npz"))}
    lesion = {1: "CT imaging of a lesion"}
    plan = {  # case -> (sample, prompts, prediction from the lesion mask, or None: no prediction)
        "CT_L01-exact.npz": ("000001", lesion, lambda m: m),
        "CT_L01-shift1.npz": ("000001", lesion, lambda m: _shift(m, 1)),  # 0.31 mm: NSD 1
        "CT_L01-shift8.npz": ("000001", lesion, lambda m: _shift(m, 8)),  # 2.5 mm: NSD < 1
        "MR_L09-erode1.npz": ("000009", lesion, lambda m: _erode(m, 1)),  # 0.79 mm: NSD 1
        "MR_L09-erode3.npz": ("000009", lesion, lambda m: _erode(m, 3)),  # 2.4 mm: NSD < 1
        "CT_L02-absent.npz": ("000002", {**lesion, 2: "CT imaging of the liver", 3: "the spleen"}, None),
        "CT_L15-missing.npz": ("000015", lesion, None),
    }
    for case, (sample, labels, make) in plan.items():
        with np.load(samples[sample]) as z:
            gts, imgs, spacing = z["gts"], z["imgs"], z["spacing"]
        np.savez(ref_dir / case, imgs=imgs, gts=gts, spacing=spacing, text_prompts=prompts(labels))
        if make is not None:
            write_pred(pred_dir / case, make(gts == 1))
    gts = np.load(samples["000002"])["gts"]  # the prediction of CT_L02-absent: exact, plus a "liver"
    segs = gts.copy()
    segs[4:7, 100:120, 100:120] = 2
    write_pred(pred_dir / "CT_L02-absent.npz", segs)
    with np.load(samples["000009"]) as z:  # instance task: the lesion and a copy 120 voxels to the right
        gts, imgs, spacing = z["gts"], z["imgs"], z["spacing"]
    instances = gts.astype(np.uint8) + 2 * np.roll(gts, 120, axis=2)
    np.savez(
        ref_dir / "CT_L09-instances.npz",
        imgs=imgs,
        gts=instances,
        spacing=spacing,
        text_prompts=prompts({1: "lesions"}, 1),
    )
    write_pred(pred_dir / "CT_L09-instances.npz", gts == 1)  # finds the first lesion only
    return ref_dir, pred_dir


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(["evaluate", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_cvpr25_end_to_end(challenge_folders, tmp_path, capsys):
    ref_dir, pred_dir = challenge_folders
    out = tmp_path / "report"
    code, stdout, stderr = run_cli(
        capsys, "--protocol", "cvpr25", "--pred", pred_dir, "--ref", ref_dir, "-o", out
    )
    assert code == 1 and "1 reference label(s) without a prediction" in stderr
    assert {p.name for p in out.iterdir()} == {"cases.csv", "summary.csv", "table.md", "config.json"}
    rows = read_csv(out / "cases.csv")
    cases = {r["case"]: r for r in rows if r["level"] == "case"}
    labels = {(r["case"], r["label"]): r for r in rows if r["level"] == "label"}
    dsc = {k: float(v["dsc"]) for k, v in cases.items() if v["task"] == "semantic"}
    nsd = {k: float(v["nsd"]) for k, v in cases.items() if v["task"] == "semantic"}
    assert dsc["CT_L01-exact.npz"] == 1.0 and nsd["CT_L01-exact.npz"] == 1.0
    assert 1.0 > dsc["CT_L01-shift1.npz"] > dsc["CT_L01-shift8.npz"] > 0
    # one voxel off along the 5 mm axis: within 2 mm except where the stored spacing (applied as the
    # organisers do) makes the shifted axis coarser than the tolerance
    assert 1.0 >= nsd["CT_L01-shift1.npz"] > 0.99 > nsd["CT_L01-shift8.npz"]
    assert 1.0 > dsc["MR_L09-erode1.npz"] > dsc["MR_L09-erode3.npz"]
    assert 1.0 >= nsd["MR_L09-erode1.npz"] > 0.99 > nsd["MR_L09-erode3.npz"]
    # absent prompts: label 2 predicted (0, a false positive), label 3 absent from both (NaN, skipped)
    assert dsc["CT_L02-absent.npz"] == 0.5
    assert labels[("CT_L02-absent.npz", "2")]["false_positive"] == "True"
    assert labels[("CT_L02-absent.npz", "3")]["dsc"] == "nan"
    assert cases["CT_L15-missing.npz"]["status"] == "missing" and dsc["CT_L15-missing.npz"] == 0.0
    inst = cases["CT_L09-instances.npz"]
    assert (inst["task"], inst["tp"], inst["fp"], inst["fn"]) == ("instance", "1", "0", "1")
    assert float(inst["f1"]) == pytest.approx(2 / 3) and float(inst["dsc_tp"]) == 1.0
    summary = {r["name"]: r for r in read_csv(out / "summary.csv")}
    assert set(summary) == {"CT", "MR", "all"}
    assert (summary["all"]["n_cases"], summary["all"]["n_missing"], summary["all"]["n_instance"]) == (
        "8",
        "1",
        "1",
    )
    assert float(summary["MR"]["dsc_mean"]) == pytest.approx(
        np.mean([dsc["MR_L09-erode1.npz"], dsc["MR_L09-erode3.npz"]])
    )
    assert float(summary["all"]["dsc_mean"]) == pytest.approx(np.mean(list(dsc.values())))
    assert (summary["all"]["absent_prompts"], summary["all"]["absent_with_fp"]) == ("2", "1")
    assert float(summary["all"]["absent_fp_rate"]) == 0.5
    config = json.loads((out / "config.json").read_text())
    assert config["protocol"] == "cvpr25" and config["missing"] == ["CT_L15-missing.npz"]
    assert "CVPR 2025" in stdout
    code, _, stderr = run_cli(
        capsys, "--protocol", "cvpr25", "--pred", pred_dir, "--ref", ref_dir, "-o", out, "--allow-missing"
    )
    assert code == 0 and "warning" in stderr


def test_cli_v2_window_end_to_end(challenge_folders, tmp_path, capsys):
    ref_dir, pred_dir = challenge_folders
    out = tmp_path / "v2"
    argv = ("--protocol", "v2-window", "--pred", pred_dir, "--ref", ref_dir, "-o", out, "--allow-missing")
    code, stdout, _ = run_cli(capsys, *argv)
    assert code == 0 and "Not the challenge metric" in stdout
    rows = {r["case"]: r for r in read_csv(out / "cases.csv")}
    exact = rows["CT_L01-exact.npz"]
    assert float(exact["dice"]) == 1.0
    # lesion areas per slice peak at slice 9 of 16: window 6..13
    assert (exact["init_slice"], exact["window_start"], exact["window_stop"]) == ("9", "6", "13")
    assert float(rows["CT_L01-shift1.npz"]["dice"]) > float(rows["CT_L01-shift8.npz"]["dice"])
    assert (
        rows["CT_L15-missing.npz"]["status"] == "missing" and float(rows["CT_L15-missing.npz"]["dice"]) == 0
    )
    assert json.loads((out / "config.json").read_text())["challenge_metric"] is False


def test_cli_refuses_options_of_other_forms(tmp_path, capsys):
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir()
    pred.mkdir()
    common = ("--pred", pred, "--ref", ref, "-o", tmp_path / "out")
    code, _, stderr = run_cli(capsys, "--protocol", "cvpr25", "--label-map", tmp_path / "m.json", *common)
    assert code == 2 and "--label-map cannot be used with --protocol" in stderr
    code, _, stderr = run_cli(capsys, "--protocol", "v2-window", "--spacing-order", "xyz", *common)
    assert code == 2 and "do not apply" in stderr
    code, _, stderr = run_cli(capsys, "--protocol", "cvpr25", *common)
    assert code == 2 and "no reference .npz" in stderr
    np.savez(ref / "CT_x.npz", gts=np.zeros((2, 3, 3), np.uint8), spacing=np.ones(3))
    code, _, stderr = run_cli(capsys, "--protocol", "cvpr25", *common)
    assert code == 2 and "has no text_prompts" in stderr
