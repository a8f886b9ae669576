"""Reorientation to the canonical LPS frame: hand-built cases, real volumes, permuted / oblique copies.

SimpleITK's ``DICOMOrient(image, "LPS")`` (an independent implementation) is the reference for the
canonical array and geometry of axis-aligned volumes.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import SimpleITK as sitk

from medsam3.image import Image
from medsam3.preprocess.orientation import orientation_code, plan_reorientation, to_canonical


def sitk_to_image(img: sitk.Image, modality: str = "OTHER") -> Image:
    return Image(
        sitk.GetArrayFromImage(img),
        img.GetSpacing(),
        img.GetOrigin(),
        np.array(img.GetDirection()).reshape(img.GetDimension(), -1),
        modality,
    )


def assert_same_geometry_exact(a: Image, b: Image) -> None:
    assert a.array.dtype == b.array.dtype
    np.testing.assert_array_equal(a.array, b.array)
    assert a.spacing == b.spacing
    assert a.origin == b.origin
    np.testing.assert_array_equal(a.direction, b.direction)


def physical_point(image: Image, index_zyx) -> np.ndarray:
    k, j, i = index_zyx
    return image.affine()[:3] @ np.array([i, j, k, 1.0])


# -- hand-computed ---------------------------------------------------------------------------------------
def test_orientation_codes_by_hand():
    assert orientation_code(np.eye(3)) == "LPS"
    assert orientation_code(np.diag([-1.0, -1.0, 1.0])) == "RAS"
    sagittal = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])  # x->P, y->I, z->L
    assert orientation_code(sagittal) == "PIL"


def test_ras_volume_flips_y_and_x_by_hand():
    arr = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    img = Image(arr, (1.0, 2.0, 3.0), (10.0, 20.0, 30.0), np.diag([-1.0, -1.0, 1.0]))
    canon, reo = to_canonical(img)
    np.testing.assert_array_equal(canon.array, arr[:, ::-1, ::-1])
    # first voxel is now the old last one along x and y: 10 - 1*(4-1), 20 - 2*(3-1)
    assert canon.origin == (7.0, 16.0, 30.0)
    assert canon.spacing == (1.0, 2.0, 3.0)
    np.testing.assert_array_equal(canon.direction, np.eye(3))
    assert reo.flipped == (1, 2)
    assert reo.source_axes == (0, 1, 2)
    assert reo.through_plane_axis == 0
    assert reo.original_code == "RAS" and reo.canonical_code == "LPS"


def test_sagittal_stack_is_permuted_by_hand():
    # ITK x points S, y points P, z points L: slices (ITK k) are sagittal.
    direction = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    arr = np.arange(5 * 3 * 4).reshape(5, 3, 4)  # (k, j, i)
    img = Image(arr, (0.5, 1.0, 2.0), (0.0, 0.0, 0.0), direction)
    canon, reo = to_canonical(img)
    assert reo.source_axes == (2, 1, 0)
    assert reo.flipped == ()
    assert reo.through_plane_axis == 2  # acquisition slices are now sagittal (canonical X)
    assert canon.array.shape == (4, 3, 5)
    for k, j, i in [(0, 0, 0), (4, 2, 3), (1, 2, 0)]:
        assert canon.array[i, j, k] == arr[k, j, i]
    assert canon.spacing == (2.0, 1.0, 0.5)
    np.testing.assert_array_equal(canon.direction, np.eye(3))


def test_2d_image_is_identity():
    img = Image.from_array(np.arange(12, dtype=np.uint8).reshape(3, 4))
    canon, reo = to_canonical(img)
    assert reo.is_identity and reo.through_plane_axis is None
    np.testing.assert_array_equal(canon.array, img.array)
    assert_same_geometry_exact(reo.invert_image(canon), img)
    rgb = Image.from_array(np.zeros((3, 4, 3), np.uint8), color=True)
    assert to_canonical(rgb)[0].array.shape == (3, 4, 3)


def test_apply_invert_checks_shape_and_keeps_trailing_axes():
    img = Image(np.zeros((2, 3, 4)), (1, 1, 1), (0, 0, 0), np.diag([1.0, -1.0, -1.0]))
    _, reo = to_canonical(img)
    probs = np.random.default_rng(0).random((2, 3, 4, 5))
    moved = reo.apply(probs)
    assert moved.shape == (2, 3, 4, 5)
    np.testing.assert_array_equal(moved, probs[::-1, ::-1])
    np.testing.assert_array_equal(reo.invert(moved), probs)
    with pytest.raises(ValueError, match="shape"):
        reo.apply(np.zeros((3, 2, 4)))


# -- real volumes ----------------------------------------------------------------------------------------
REAL = [
    ("msd_hippocampus/images/hippocampus_003.nii.gz", "MR"),  # stored RAS
    ("totalsegmentator/example_ct_sm.nii.gz", "CT"),  # stored RAS
    ("totalsegmentator/example_mr_sm.nii.gz", "MR"),  # stored LPS
    ("pyradiomics/brain1_image.nrrd", "MR"),  # stored LAS
]


@pytest.mark.parametrize(("rel", "modality"), REAL)
def test_real_volume_matches_simpleitk_and_inverts_exactly(data_dir, rel, modality):
    src = sitk.ReadImage(str(data_dir / rel))
    img = sitk_to_image(src, modality)
    canon, reo = to_canonical(img)
    ref = sitk.DICOMOrient(src, "LPS")
    np.testing.assert_array_equal(canon.array, sitk.GetArrayFromImage(ref))
    np.testing.assert_allclose(canon.origin, ref.GetOrigin(), atol=1e-9)
    np.testing.assert_allclose(canon.spacing, ref.GetSpacing())
    np.testing.assert_allclose(canon.direction.ravel(), ref.GetDirection(), atol=1e-12)
    assert canon.modality == modality
    assert_same_geometry_exact(reo.invert_image(canon), img)


def test_label_map_follows_its_image(data_dir):
    img = sitk_to_image(sitk.ReadImage(str(data_dir / "msd_hippocampus/images/hippocampus_003.nii.gz")))
    lab = sitk_to_image(sitk.ReadImage(str(data_dir / "msd_hippocampus/labels/hippocampus_003.nii.gz")))
    canon, reo = to_canonical(img)
    canon_lab, _ = to_canonical(lab)
    np.testing.assert_array_equal(reo.apply(lab.array), canon_lab.array)
    np.testing.assert_array_equal(reo.invert(canon_lab.array), lab.array)
    assert set(np.unique(canon_lab.array)) == {0, 1, 2}


@pytest.mark.parametrize(
    "rel", ["msd_hippocampus/images/hippocampus_003.nii.gz", "totalsegmentator/example_ct_sm.nii.gz"]
)
def test_every_permutation_and_flip_reaches_the_same_canonical_volume(data_dir, rel):
    src = sitk.ReadImage(str(data_dir / rel))
    reference, _ = to_canonical(sitk_to_image(src))
    seen_axes = set()
    for perm in itertools.permutations(range(3)):
        for flips in [(False, False, False), (True, False, False), (False, True, True), (True, True, True)]:
            variant = sitk.Flip(sitk.PermuteAxes(src, perm), flips)
            img = sitk_to_image(variant)
            canon, reo = to_canonical(img)
            seen_axes.add(reo.through_plane_axis)
            np.testing.assert_array_equal(canon.array, reference.array)
            np.testing.assert_allclose(canon.origin, reference.origin, atol=1e-6)
            np.testing.assert_allclose(canon.spacing, reference.spacing)
            np.testing.assert_allclose(canon.direction, np.eye(3), atol=1e-12)
            assert_same_geometry_exact(reo.invert_image(canon), img)
            # The acquisition's slice axis (original k) is where through_plane_axis says.
            k_len = img.array.shape[0]
            assert canon.array.shape[reo.through_plane_axis] == k_len
    assert seen_axes == {0, 1, 2}


def _rotation(axis: str, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    return {
        "z": np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]),
        "x": np.array([[1, 0, 0], [0, c, -s], [0, s, c]]),
    }[axis]


@pytest.mark.parametrize(("axis", "degrees"), [("z", 20.0), ("x", -35.0), ("z", 44.0)])
def test_oblique_volume_keeps_residual_rotation_and_physical_positions(data_dir, axis, degrees):
    src = sitk.ReadImage(str(data_dir / "msd_hippocampus/images/hippocampus_003.nii.gz"))
    src = sitk.PermuteAxes(src, (2, 0, 1))
    direction = _rotation(axis, degrees) @ np.array(src.GetDirection()).reshape(3, 3)
    src.SetDirection(tuple(direction.ravel()))
    img = sitk_to_image(src)
    canon, reo = to_canonical(img)
    # closest axes chosen, as SimpleITK does; the remaining rotation stays in the direction matrix
    ref = sitk.DICOMOrient(src, "LPS")
    np.testing.assert_array_equal(canon.array, sitk.GetArrayFromImage(ref))
    np.testing.assert_allclose(canon.direction, _rotation(axis, degrees), atol=1e-9)
    assert reo.canonical_code == "LPS"
    # every voxel keeps its physical position
    rng = np.random.default_rng(1)
    for _ in range(20):
        idx = [int(rng.integers(n)) for n in canon.array.shape]
        src_idx = np.unravel_index(
            np.flatnonzero(
                reo.invert(np.arange(canon.array.size).reshape(canon.array.shape))
                == np.ravel_multi_index(idx, canon.array.shape)
            )[0],
            img.array.shape,
        )
        np.testing.assert_allclose(physical_point(canon, idx), physical_point(img, src_idx), atol=1e-9)
        assert canon.array[tuple(idx)] == img.array[tuple(src_idx)]
    assert_same_geometry_exact(reo.invert_image(canon), img)


def test_plan_does_not_touch_the_input(data_dir):
    src = sitk.ReadImage(str(data_dir / "totalsegmentator/example_ct_sm.nii.gz"))
    img = sitk_to_image(src, "CT")
    before = img.array.copy()
    reo = plan_reorientation(img)
    to_canonical(img)
    np.testing.assert_array_equal(img.array, before)
    assert "RAS -> LPS" in reo.describe()
