"""Cross-check of the metrics against MONAI on random and real masks (non-empty masks only).

MONAI takes one-hot ``(B, C, *spatial)`` tensors; a binary mask becomes channels ``[background, mask]``
with ``include_background=False``, and spacing is given in the same (array) axis order as the masks.
MONAI works in float32, so values agree to a relative and absolute 1e-6.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from scipy import ndimage

from medsam3.evaluate import compute_all, per_label_metrics

torch = pytest.importorskip("torch")
monai_metrics = pytest.importorskip("monai.metrics")

TOL = {"rtol": 1e-6, "atol": 1e-6}


def _one_hot(mask: np.ndarray):
    t = torch.from_numpy(np.ascontiguousarray(mask))
    return torch.stack([~t, t])[None].float()


def monai_values(pred: np.ndarray, ref: np.ndarray, spacing, tolerances) -> dict[str, float]:
    """The same metrics computed by MONAI."""
    p, r = _one_hot(pred), _one_hot(ref)
    sp = [float(s) for s in spacing]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = {
            "dice": monai_metrics.compute_dice(p, r, include_background=False).item(),
            "iou": monai_metrics.compute_iou(p, r, include_background=False).item(),
            "hd95": monai_metrics.compute_hausdorff_distance(p, r, percentile=95, spacing=sp).item(),
            "hausdorff": monai_metrics.compute_hausdorff_distance(p, r, spacing=sp).item(),
            "assd": monai_metrics.compute_average_surface_distance(p, r, symmetric=True, spacing=sp).item(),
        }
        for tol in tolerances:
            out[f"nsd@{tol}"] = monai_metrics.compute_surface_dice(
                p, r, [tol], spacing=sp, use_subvoxels=False
            ).item()
    return out


def assert_matches_monai(pred, ref, spacing, tolerances=(1.0, 2.5)) -> dict[str, float]:
    expected = monai_values(pred, ref, spacing, tolerances)
    ours = {}
    for tol in tolerances:
        row = compute_all(pred, ref, spacing, nsd_tolerance_mm=tol)
        ours[f"nsd@{tol}"] = row["nsd"]
    ours.update({k: row[k] for k in ("dice", "iou", "hd95", "hausdorff", "assd")})
    for key, value in expected.items():
        np.testing.assert_allclose(ours[key], value, **TOL, err_msg=key)
    return expected


def _blob(rng, shape, sigma, fraction):
    field = ndimage.gaussian_filter(rng.random(shape), sigma)
    return field > np.quantile(field, 1.0 - fraction)


def _random_pair(kind: str, shape, seed: int):
    rng = np.random.default_rng(seed)
    if kind == "blob":
        return _blob(rng, shape, 3.0, 0.35), _blob(rng, shape, 3.0, 0.35)
    if kind == "noisy":
        # A smooth reference; the prediction is a dilated copy with 8% of voxels flipped (islands, holes).
        ref = _blob(rng, shape, 2.5, 0.3)
        pred = ndimage.binary_dilation(ref) ^ (rng.random(shape) < 0.08)
        return pred, ref
    if kind == "sparse":
        return rng.random(shape) < 0.03, rng.random(shape) < 0.05
    raise AssertionError(kind)


CASES = [
    ((48, 40), (0.7, 1.3)),
    ((14, 30, 26), (2.5, 0.8, 0.6)),
    ((20, 18, 22), (1.0, 1.0, 1.0)),
]


@pytest.mark.parametrize("shape, spacing", CASES, ids=["2d", "3d-aniso", "3d-iso"])
@pytest.mark.parametrize("kind", ["blob", "noisy", "sparse"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_masks_match_monai(shape, spacing, kind, seed):
    pred, ref = _random_pair(kind, shape, seed)
    assert pred.any() and ref.any() and not np.array_equal(pred, ref)
    assert_matches_monai(pred, ref, spacing)


def test_masks_filling_the_array_border_match_monai():
    # Surfaces on the array border (MONAI crops with a margin and pads; outside counts as background).
    rng = np.random.default_rng(7)
    ref = np.ones((12, 16, 10), dtype=bool)
    ref[:, :3] = False
    pred = rng.random(ref.shape) < 0.9
    assert_matches_monai(pred, ref, (3.0, 0.9, 1.1))


# -- real masks ----------------------------------------------------------------------------------------


def _read_labels(path):
    sitk = pytest.importorskip("SimpleITK")
    img = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(img), tuple(reversed(img.GetSpacing()))


def _shift(mask: np.ndarray, axis: int) -> np.ndarray:
    """``mask`` moved by one voxel towards higher indices along ``axis`` (zero filled)."""
    out = np.zeros_like(mask)
    src = [slice(None)] * mask.ndim
    dst = [slice(None)] * mask.ndim
    src[axis], dst[axis] = slice(0, -1), slice(1, None)
    out[tuple(dst)] = mask[tuple(src)]
    return out


def _check_one_voxel_shifts(ref: np.ndarray, spacing) -> None:
    """Shift ``ref`` by one voxel along each axis and compare with MONAI and with the exact bound.

    When a mask that does not touch the array border is translated by one voxel of length ``s``, every
    surface voxel of either mask lies within ``s`` of the other surface (the voxel one step back or
    forward is a surface voxel of the other mask), and the ends of the mask move by exactly ``s``: the
    Hausdorff distance is ``s`` and the NSD at tolerance ``s`` is 1.
    """
    ref = np.pad(ref, 2)
    for axis in range(ref.ndim):
        s = spacing[axis]
        values = assert_matches_monai(_shift(ref, axis), ref, spacing, tolerances=(s, 0.99 * s))
        assert values["hausdorff"] == pytest.approx(s, rel=1e-6)
        assert values[f"nsd@{s}"] == pytest.approx(1.0)
        assert values[f"nsd@{0.99 * s}"] < 1.0
        assert 0.0 < values["hd95"] <= values["hausdorff"] + 1e-6


@pytest.mark.parametrize("label", [1, 2])
def test_hippocampus_shifted_by_one_voxel_matches_monai(data_dir, label):
    labels, spacing = _read_labels(data_dir / "msd_hippocampus" / "labels" / "hippocampus_003.nii.gz")
    ref = labels == label
    assert ref.sum() > 500
    _check_one_voxel_shifts(ref, spacing)


def test_anisotropic_ct_aorta_shifted_by_one_voxel_matches_monai(data_dir):
    labels, spacing = _read_labels(data_dir / "totalsegmentator" / "example_seg_dicom.nii.gz")
    assert spacing[0] == pytest.approx(2.0) and spacing[1] == pytest.approx(spacing[2]) and spacing[1] < 1.0
    ref = labels == 52  # aorta, crossing all 20 slices
    zyx = np.argwhere(ref)
    box = tuple(slice(int(a), int(b) + 1) for a, b in zip(zyx.min(0), zyx.max(0), strict=True))
    _check_one_voxel_shifts(ref[box], spacing)


def test_per_label_metrics_of_two_ct_segmentations_match_monai(data_dir):
    folder = data_dir / "totalsegmentator"
    ref, spacing = _read_labels(folder / "example_seg.nii.gz")
    pred, spacing_fast = _read_labels(folder / "example_seg_fast.nii.gz")
    assert spacing == pytest.approx(spacing_fast)
    names = {
        int(k): v
        for k, v in json.loads((folder / "labels_total_and_total_mr.json").read_text())["total"].items()
    }
    wanted = [1, 2, 3, 5, 52]
    rows = per_label_metrics(pred, ref, spacing, labels=wanted, label_names=names, nsd_tolerance_mm=3.0)
    assert [r["name"] for r in rows] == ["spleen", "kidney_right", "kidney_left", "liver", "aorta"]
    for row in rows:
        label = row["label"]
        expected = monai_values(pred == label, ref == label, spacing, (3.0,))
        for key in ("dice", "iou", "hd95", "hausdorff", "assd"):
            np.testing.assert_allclose(row[key], expected[key], **TOL, err_msg=f"{label} {key}")
        np.testing.assert_allclose(row["nsd"], expected["nsd@3.0"], **TOL, err_msg=f"{label} nsd")
        # Two runs of the same model family on one scan: close agreement, but not identical.
        assert 0.8 < row["dice"] <= 1.0
