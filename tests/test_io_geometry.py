"""Hand-computed checks of the modality rules, label-grid placement and DICOM rescale."""

from __future__ import annotations

import numpy as np
import pytest

from medsam3.errors import InputError
from medsam3.image import Image
from medsam3.io.dicom import apply_rescale
from medsam3.io.geometry import place_on_grid
from medsam3.io.modality import guess_modality, modality_from_name, normalise_modality


# -- modality ----------------------------------------------------------------------------------------------
def test_guess_modality_rules():
    vol = np.zeros((4, 5, 6), np.int16)
    assert guess_modality(vol - 1000) == "CT"
    assert guess_modality(vol - 150) == "MR"  # slight negatives (interpolated MR) are not HU
    assert guess_modality(np.ones((4, 5, 6), np.float32)) == "MR"
    assert guess_modality(np.ones((4, 5, 6), np.uint16), file_format="tiff") == "MICROSCOPY"
    assert guess_modality(np.full((5, 6), 100, np.uint16), file_format="png") == "MICROSCOPY"
    assert guess_modality(np.full((5, 6), 100, np.uint8), file_format="png") == "OTHER"
    assert guess_modality(np.full((5, 6), 100, np.int16), file_format="nifti") == "MR"
    assert guess_modality(np.zeros((5, 6, 3), np.uint8), is_color=True) == "RGB"
    assert guess_modality(vol - 1000, dicom_modality="MR") == "MR"  # the tag wins
    assert guess_modality(vol, dicom_modality="DX") == "XR"
    assert guess_modality(vol, dicom_modality="NM") == "PT"
    assert guess_modality(np.zeros((5, 6, 3), np.uint8), dicom_modality="SM", is_color=True) == "RGB"
    assert guess_modality(np.zeros((5, 6), np.uint16), dicom_modality="SM") == "MICROSCOPY"
    assert guess_modality(vol, dicom_modality="OT") == "MR"  # OT falls through
    assert guess_modality(np.full((5, 6), 9, np.uint8), name="CT_Lesion_001.npz") == "CT"


def test_modality_from_file_names():
    assert modality_from_name("CT_Lesion_000001_02.npz") == "CT"
    assert modality_from_name("08_MRI_heart.png") == "MR"
    assert modality_from_name("16_X-Ray_chest_lung.png") == "XR"
    assert modality_from_name("24_endoscope_colon_polyp.png") == "RGB"
    assert modality_from_name("us_states.png") is None  # short codes must be upper case
    assert modality_from_name("patient_ctscan.nii.gz") is None
    assert modality_from_name("PET_case.nii.gz") == "PT"


def test_normalise_modality():
    assert normalise_modality("mri") == "MR"
    assert normalise_modality("ct") == "CT"
    assert normalise_modality("CR") == "XR"
    with pytest.raises(ValueError, match="unknown modality"):
        normalise_modality("photo")


# -- placing labels on a reference grid ---------------------------------------------------------------------
def _ref() -> Image:
    return Image(np.zeros((4, 5, 6), np.int16), (1.0, 2.0, 3.0), (10.0, 20.0, 30.0), np.eye(3))


def test_place_identical_grid_returns_array():
    ref = _ref()
    lab = ref.with_array(np.arange(120, dtype=np.uint8).reshape(4, 5, 6))
    np.testing.assert_array_equal(place_on_grid(lab, ref), lab.array)


def test_place_y_flipped_grid():
    """Same voxel centres, y axis stored the other way round (RAS-style file of an LPS series)."""
    ref = _ref()
    arr = np.arange(120, dtype=np.uint8).reshape(4, 5, 6)
    # y index j in labels sits at reference y index 4 - j: origin y = 20 + 4*2, direction y = -1
    lab = Image(arr, (1.0, 2.0, 3.0), (10.0, 28.0, 30.0), np.diag([1.0, -1.0, 1.0]))
    np.testing.assert_array_equal(place_on_grid(lab, ref), arr[:, ::-1, :])


def test_place_permuted_axes():
    ref = _ref()
    arr = np.arange(120, dtype=np.uint8).reshape(4, 6, 5)  # stored with x and y swapped
    direction = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    lab = Image(arr, (2.0, 1.0, 3.0), (10.0, 20.0, 30.0), direction)
    np.testing.assert_array_equal(place_on_grid(lab, ref), arr.transpose(0, 2, 1))


def test_place_sub_grid_with_offset():
    ref = _ref()
    arr = np.ones((2, 5, 6), np.uint8)
    lab = Image(arr, (1.0, 2.0, 3.0), (10.0, 20.0, 36.0), np.eye(3))  # starts at slice 2
    out = place_on_grid(lab, ref)
    assert out.shape == (4, 5, 6)
    assert out[:2].sum() == 0 and out[2:].sum() == 60


def test_place_refuses_half_voxel_shift_and_other_spacing():
    ref = _ref()
    shifted = Image(np.ones((4, 5, 6), np.uint8), (1.0, 2.0, 3.0), (10.5, 20.0, 30.0), np.eye(3))
    with pytest.raises(InputError, match="does not match the reference"):
        place_on_grid(shifted, ref, path="lab.nii.gz")
    finer = Image(np.ones((4, 5, 6), np.uint8), (0.5, 2.0, 3.0), (10.0, 20.0, 30.0), np.eye(3))
    with pytest.raises(InputError, match="lab.nii.gz"):
        place_on_grid(finer, ref, path="lab.nii.gz")


def test_place_refuses_labels_outside_reference():
    ref = _ref()
    lab = Image(np.ones((2, 5, 6), np.uint8), (1.0, 2.0, 3.0), (10.0, 20.0, 39.0), np.eye(3))  # slices 3, 4
    with pytest.raises(InputError, match="30 labelled voxels lie outside"):
        place_on_grid(lab, ref)


# -- DICOM rescale ----------------------------------------------------------------------------------------
def test_apply_rescale_dtypes():
    raw = np.array([[[0, 10]], [[20, 4095]]], dtype=np.uint16)
    ct = apply_rescale(raw, [(1.0, -1024.0), (1.0, -1024.0)])
    assert ct.dtype == np.int16
    np.testing.assert_array_equal(ct, [[[-1024, -1014]], [[-1004, 3071]]])
    same = apply_rescale(raw, [(1.0, 0.0), (1.0, 0.0)])
    assert same is raw
    pet = apply_rescale(raw, [(0.5, 0.0), (2.0, 1.0)])
    assert pet.dtype == np.float32
    np.testing.assert_allclose(pet, [[[0.0, 5.0]], [[41.0, 8191.0]]])
