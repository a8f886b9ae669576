"""Segmentation metrics: hand-computed values, empty-mask policy, spacing, label maps, bootstrap."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medsam3.errors import InputError
from medsam3.evaluate import (
    assd,
    bootstrap_ci,
    compute_all,
    dice,
    hausdorff,
    hd95,
    iou,
    mask_edges,
    normalized_surface_dice,
    per_label_metrics,
    percentile_hausdorff,
    precision,
    recall,
    surface_distances,
    worst_case_distance,
)


def _box(shape, *slices):
    m = np.zeros(shape, dtype=bool)
    m[tuple(slices)] = True
    return m


# -- overlap -------------------------------------------------------------------------------------------


def test_two_squares_overlap_by_hand():
    # 4x4 squares offset by one pixel in y and x: intersection 3x3 = 9, |P| = |R| = 16.
    p = _box((10, 10), slice(2, 6), slice(2, 6))
    r = _box((10, 10), slice(3, 7), slice(3, 7))
    assert dice(p, r) == pytest.approx(2 * 9 / 32)
    assert iou(p, r) == pytest.approx(9 / 23)
    assert precision(p, r) == pytest.approx(9 / 16)
    assert recall(p, r) == pytest.approx(9 / 16)


def test_precision_and_recall_are_not_symmetric():
    # Prediction 2x2 inside a 4x4 reference: every predicted pixel is right, a quarter is found.
    r = _box((8, 8), slice(2, 6), slice(2, 6))
    p = _box((8, 8), slice(3, 5), slice(3, 5))
    assert precision(p, r) == 1.0
    assert recall(p, r) == pytest.approx(4 / 16)
    assert dice(p, r) == pytest.approx(8 / 20)
    assert iou(p, r) == pytest.approx(4 / 16)


def test_numeric_zero_one_masks_are_accepted():
    p = _box((6, 6), slice(1, 3), slice(1, 3)).astype(np.uint8)
    r = _box((6, 6), slice(1, 3), slice(1, 4)).astype(np.float32)
    assert dice(p, r) == pytest.approx(8 / 10)


# -- surfaces and distances ---------------------------------------------------------------------------


def test_surface_is_the_eroded_away_ring():
    m = _box((5, 5), slice(1, 4), slice(1, 4))
    edges = mask_edges(m)
    assert edges.sum() == 8 and not edges[2, 2]
    # Face connectivity: a diamond of radius 2 keeps its radius-1 diamond (5 pixels) as interior.
    yy, xx = np.mgrid[-3:4, -3:4]
    diamond = (abs(yy) + abs(xx)) <= 2
    edges = mask_edges(diamond)
    assert edges.sum() == 8
    assert np.array_equal(diamond & ~edges, (abs(yy) + abs(xx)) <= 1)
    # Touching the array border counts as surface (outside the array is background).
    full = np.ones((3, 3, 3), dtype=bool)
    e3 = mask_edges(full)
    assert e3.sum() == 26 and not e3[1, 1, 1]


def test_parallel_lines_at_anisotropic_spacing():
    # Two 1-pixel-wide horizontal lines three rows apart: every distance is 3 * sy.
    p = _box((6, 8), slice(0, 1), slice(1, 7))
    r = _box((6, 8), slice(3, 4), slice(1, 7))
    for fn in (hd95, hausdorff, assd):
        assert fn(p, r, (2.0, 0.5)) == pytest.approx(6.0)
        assert fn(p, r, (0.5, 2.0)) == pytest.approx(1.5)
    assert normalized_surface_dice(p, r, (2.0, 0.5), 6.0) == 1.0
    assert normalized_surface_dice(p, r, (2.0, 0.5), 5.9) == 0.0


def test_line_overhang_gives_hand_computed_percentiles():
    # Prediction extends the reference line by two voxels along x (spacing sx = 0.8 mm).
    sx = 0.8
    r = _box((3, 10), slice(1, 2), slice(0, 6))
    p = _box((3, 10), slice(1, 2), slice(0, 8))
    d_pr, d_rp = surface_distances(p, r, (1.7, sx))
    np.testing.assert_allclose(np.sort(d_pr), [0] * 6 + [sx, 2 * sx])
    np.testing.assert_allclose(d_rp, [0] * 6)
    assert hausdorff(p, r, (1.7, sx)) == pytest.approx(2 * sx)
    # 95th percentile of 8 sorted values: position 0.95 * 7 = 6.65 between sx and 2 sx.
    assert hd95(p, r, (1.7, sx)) == pytest.approx(1.65 * sx)
    assert percentile_hausdorff(p, r, (1.7, sx), 50) == pytest.approx(0.0)
    assert assd(p, r, (1.7, sx)) == pytest.approx(3 * sx / 14)
    assert normalized_surface_dice(p, r, (1.7, sx), 0.5 * sx) == pytest.approx(12 / 14)
    assert normalized_surface_dice(p, r, (1.7, sx), sx) == pytest.approx(13 / 14)
    assert normalized_surface_dice(p, r, (1.7, sx), 2 * sx) == 1.0


def test_nsd_of_square_shifted_by_one_column():
    # 6x6 squares, the prediction shifted by one column; spacing sy = 1.0, sx = 1.5 mm.
    # Each ring has 20 surface pixels; by hand, in each direction 10 are at 0 mm (shared top/bottom
    # rows), 2 at 1.0 mm (side pixels next to a shared corner row) and 8 at 1.5 mm (one column away).
    sp = (1.0, 1.5)
    r = _box((12, 12), slice(2, 8), slice(2, 8))
    p = _box((12, 12), slice(2, 8), slice(3, 9))
    d_pr, d_rp = surface_distances(p, r, sp)
    for d in (d_pr, d_rp):
        np.testing.assert_allclose(np.sort(d), [0.0] * 10 + [1.0] * 2 + [1.5] * 8)
    assert normalized_surface_dice(p, r, sp, 0.99) == pytest.approx(20 / 40)
    assert normalized_surface_dice(p, r, sp, 1.0) == pytest.approx(24 / 40)
    assert normalized_surface_dice(p, r, sp, 1.49) == pytest.approx(24 / 40)
    assert normalized_surface_dice(p, r, sp, 1.5) == 1.0
    assert hausdorff(p, r, sp) == pytest.approx(1.5)
    assert hd95(p, r, sp) == pytest.approx(1.5)
    assert assd(p, r, sp) == pytest.approx(2 * (2 * 1.0 + 8 * 1.5) / 40)


def test_nsd_tolerance_exactly_at_a_distance_counts_despite_rounding():
    # Lines three rows apart at sy = 0.1 mm: the distance is 3 * 0.1 = 0.30000000000000004 in floating
    # point, and a tolerance written as 0.3 mm must still include it.
    p = _box((5, 4), slice(0, 1), slice(0, 4))
    r = _box((5, 4), slice(3, 4), slice(0, 4))
    assert normalized_surface_dice(p, r, (0.1, 1.0), 0.3) == 1.0
    assert normalized_surface_dice(p, r, (0.1, 1.0), 0.299) == 0.0
    assert normalized_surface_dice(p, r, (0.7, 1.0), 2.1) == 1.0


def test_slab_shift_along_z_scales_with_z_spacing_only():
    # A slab shifted by two slices: distances depend on sz only, whatever sy and sx are.
    r = _box((8, 6, 6), slice(2, 4), slice(1, 5), slice(1, 5))
    p = _box((8, 6, 6), slice(4, 6), slice(1, 5), slice(1, 5))
    base = hd95(p, r, (1.0, 0.7, 0.7))
    assert base == pytest.approx(2.0)
    assert hd95(p, r, (3.0, 0.7, 0.7)) == pytest.approx(3.0 * base)
    assert hd95(p, r, (1.0, 0.3, 1.9)) == pytest.approx(base)
    assert hausdorff(p, r, (2.5, 0.7, 0.7)) == pytest.approx(2.5 * 2.0)


def test_uniform_spacing_scale_scales_all_distances():
    rng = np.random.default_rng(3)
    p = rng.random((9, 12, 11)) > 0.6
    r = rng.random((9, 12, 11)) > 0.6
    sp = np.array([2.0, 0.8, 0.6])
    a = compute_all(p, r, sp, nsd_tolerance_mm=1.1)
    b = compute_all(p, r, 2.5 * sp, nsd_tolerance_mm=2.5 * 1.1)
    for key in ("hd95", "hausdorff", "assd", "worst_case_mm"):
        assert b[key] == pytest.approx(2.5 * a[key])
    assert b["nsd"] == pytest.approx(a["nsd"])
    assert b["dice"] == a["dice"]


def test_isotropic_scalar_spacing_equals_tuple():
    p = _box((7, 7), slice(1, 4), slice(1, 5))
    r = _box((7, 7), slice(2, 6), slice(2, 5))
    assert hd95(p, r, 1.3) == hd95(p, r, (1.3, 1.3))


def test_worst_case_distance_is_image_diagonal_and_bounds_distances():
    assert worst_case_distance((10, 20), (2.0, 0.5)) == pytest.approx(math.sqrt(20**2 + 10**2))
    assert worst_case_distance((4, 5, 6), (3.0, 1.0, 2.0)) == pytest.approx(math.sqrt(144 + 25 + 144))
    # Opposite corner voxels: the largest distance on the grid stays below the bound.
    p = np.zeros((10, 20), dtype=bool)
    r = np.zeros((10, 20), dtype=bool)
    p[0, 0] = True
    r[-1, -1] = True
    assert hausdorff(p, r, (2.0, 0.5)) == pytest.approx(math.sqrt(18**2 + 9.5**2))
    assert hausdorff(p, r, (2.0, 0.5)) < worst_case_distance(p.shape, (2.0, 0.5))


# -- empty masks ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(6, 7), (4, 6, 7)])
def test_both_empty_is_a_perfect_answer(shape):
    z = np.zeros(shape, dtype=bool)
    out = compute_all(z, z, 1.0)
    for key in ("dice", "iou", "precision", "recall", "nsd"):
        assert out[key] == 1.0, key
    for key in ("hd95", "hausdorff", "assd"):
        assert out[key] == 0.0, key
    assert out["pred_voxels"] == out["ref_voxels"] == 0
    assert dice(z, z) == iou(z, z) == precision(z, z) == recall(z, z) == 1.0
    assert hd95(z, z, 1.0) == hausdorff(z, z, 1.0) == assd(z, z, 1.0) == 0.0
    assert normalized_surface_dice(z, z, 1.0, 2.0) == 1.0


@pytest.mark.parametrize("shape", [(6, 7), (4, 6, 7)])
def test_reference_empty_is_a_false_detection(shape):
    z = np.zeros(shape, dtype=bool)
    p = z.copy()
    p[(1,) * len(shape)] = True
    out = compute_all(p, z, 1.0)
    assert out["dice"] == out["iou"] == out["precision"] == out["nsd"] == 0.0
    assert out["recall"] == 1.0
    for key in ("hd95", "hausdorff", "assd"):
        assert out[key] == math.inf, key
    assert out["pred_voxels"] == 1 and out["ref_voxels"] == 0
    assert hd95(p, z, 1.0) == math.inf and normalized_surface_dice(p, z, 1.0, 5.0) == 0.0


@pytest.mark.parametrize("shape", [(6, 7), (4, 6, 7)])
def test_prediction_empty_is_a_miss(shape):
    z = np.zeros(shape, dtype=bool)
    r = z.copy()
    r[(slice(1, 3),) * len(shape)] = True
    out = compute_all(z, r, 1.0)
    assert out["dice"] == out["iou"] == out["recall"] == out["nsd"] == 0.0
    assert out["precision"] == 1.0
    for key in ("hd95", "hausdorff", "assd"):
        assert out[key] == math.inf, key
    assert assd(z, r, 1.0) == math.inf and recall(z, r) == 0.0


def test_compute_all_reports_volumes_and_worst_case():
    p = _box((4, 10, 10), slice(0, 2), slice(2, 6), slice(2, 6))
    r = _box((4, 10, 10), slice(0, 2), slice(3, 7), slice(3, 7))
    out = compute_all(p, r, (2.0, 0.5, 0.5), nsd_tolerance_mm=1.0)
    assert out["pred_voxels"] == out["ref_voxels"] == 32
    assert out["pred_volume_ml"] == pytest.approx(32 * 0.5 / 1000)
    assert out["dice"] == pytest.approx(2 * 18 / 64)
    assert out["nsd_tolerance_mm"] == 1.0
    assert out["worst_case_mm"] == pytest.approx(math.sqrt(8**2 + 5**2 + 5**2))


# -- errors --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda: dice(np.zeros((4, 4), bool), np.zeros((4, 5), bool)), "differs"),
        (lambda: hd95(np.zeros((4, 4), bool), np.zeros((4, 4), bool), (1.0, 1.0, 1.0)), "3 values"),
        (lambda: hd95(np.zeros((4, 4), bool), np.zeros((4, 4), bool), (1.0, 0.0)), "positive"),
        (lambda: hd95(np.zeros((4, 4), bool), np.zeros((4, 4), bool), (1.0, math.nan)), "positive"),
        (lambda: dice(np.full((4, 4), 2), np.zeros((4, 4), bool)), "binary"),
        (lambda: dice(np.zeros(5, bool), np.zeros(5, bool)), "2D"),
        (lambda: normalized_surface_dice(np.zeros((3, 3), bool), np.zeros((3, 3), bool), 1.0, -1), ">= 0"),
        (lambda: percentile_hausdorff(np.zeros((3, 3), bool), np.zeros((3, 3), bool), 1.0, 101), "between"),
        (lambda: worst_case_distance((4,), 1.0), "shape"),
    ],
)
def test_invalid_inputs_raise_input_error(call, words):
    with pytest.raises(InputError, match=words):
        call()


# -- label maps ----------------------------------------------------------------------------------------


def test_per_label_metrics_by_hand():
    ref = np.zeros((10, 10), dtype=np.int16)
    pred = np.zeros_like(ref)
    ref[2:6, 2:6] = 3
    pred[3:7, 3:7] = 3
    ref[8, 0:4] = 1  # label 1 missed entirely
    pred[0, 8] = 7  # label 7 only predicted
    rows = per_label_metrics(pred, ref, (1.0, 1.0), label_names={3: "liver"})
    assert [row["label"] for row in rows] == [1, 3, 7]
    assert [row["name"] for row in rows] == [None, "liver", None]
    by = {row["label"]: row for row in rows}
    assert by[3]["dice"] == pytest.approx(0.5625)
    assert by[1]["dice"] == 0.0 and by[1]["recall"] == 0.0 and by[1]["hd95"] == math.inf
    assert by[7]["dice"] == 0.0 and by[7]["precision"] == 0.0 and by[7]["recall"] == 1.0
    # An explicitly requested label present in neither map is a correct "absent" answer.
    only = per_label_metrics(pred, ref, 1.0, labels=[5, 3], nsd_tolerance_mm={5: 1.0, 3: 0.5})
    assert [row["label"] for row in only] == [5, 3]
    assert only[0]["dice"] == 1.0 and only[0]["hd95"] == 0.0
    assert only[1]["nsd_tolerance_mm"] == 0.5


def test_per_label_metrics_accepts_integral_floats_and_rejects_bad_labels():
    ref = np.zeros((6, 6), dtype=np.float64)
    ref[1:3, 1:3] = 2.0
    rows = per_label_metrics(ref, ref, 1.0)
    assert len(rows) == 1 and rows[0]["label"] == 2 and rows[0]["dice"] == 1.0
    with pytest.raises(InputError, match="integer"):
        per_label_metrics(ref + 0.5, ref, 1.0)
    with pytest.raises(InputError, match="non-zero"):
        per_label_metrics(ref, ref, 1.0, labels=[0, 2])
    with pytest.raises(InputError, match="tolerance"):
        per_label_metrics(ref, ref, 1.0, nsd_tolerance_mm={3: 1.0})


# -- bootstrap -----------------------------------------------------------------------------------------


def test_bootstrap_constant_and_nan_values():
    assert bootstrap_ci([0.8, 0.8, 0.8]) == pytest.approx((0.8, 0.8, 0.8))
    assert bootstrap_ci([1.0, math.nan, 1.0]) == pytest.approx((1.0, 1.0, 1.0))
    assert bootstrap_ci([0.3]) == pytest.approx((0.3, 0.3, 0.3))
    assert all(math.isnan(v) for v in bootstrap_ci([math.nan, math.nan]))
    assert all(math.isnan(v) for v in bootstrap_ci([]))


def test_bootstrap_two_values_interval_by_hand():
    # Resampled means of [0, 1] are 0, 0.5, 1 with probability 1/4, 1/2, 1/4: the 2.5% and 97.5%
    # percentiles of 2000 draws are 0 and 1.
    assert bootstrap_ci([0.0, 1.0]) == (0.5, 0.0, 1.0)


def test_bootstrap_interval_width_matches_normal_theory():
    rng = np.random.default_rng(11)
    values = rng.normal(0.7, 0.1, size=400)
    mean, low, high = bootstrap_ci(values, n_boot=4000, alpha=0.05, seed=5)
    se = values.std(ddof=1) / math.sqrt(values.size)
    assert mean == pytest.approx(values.mean())
    assert low < mean < high
    assert (high - low) == pytest.approx(2 * 1.96 * se, rel=0.1)
    assert bootstrap_ci(values, seed=5) == bootstrap_ci(values, seed=5)
    assert bootstrap_ci(values, seed=5) != bootstrap_ci(values, seed=6)


def test_bootstrap_rejects_inf_and_bad_parameters():
    with pytest.raises(InputError, match="worst_case_distance"):
        bootstrap_ci([1.0, math.inf])
    with pytest.raises(InputError, match="alpha"):
        bootstrap_ci([1.0, 2.0], alpha=1.5)
    with pytest.raises(InputError, match="n_boot"):
        bootstrap_ci([1.0, 2.0], n_boot=0)
