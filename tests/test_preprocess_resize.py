"""Square resize to the model size and back; slice extraction / stacking; 3-channel conversion."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image as PILImage

from medsam3.preprocess.resize import (
    ResizeTransform,
    nearest_indices,
    resize_bilinear,
    resize_nearest,
)
from medsam3.preprocess.slices import iter_slices, slice_to_rgb, stack_slices, take_slice


# -- pixel-centre alignment by hand ------------------------------------------------------------------------
def test_nearest_indices_by_hand():
    # output pixel d samples input position (d + 0.5) * n_in / n_out
    np.testing.assert_array_equal(nearest_indices(2, 4), [0, 0, 1, 1])  # 0.25 0.75 1.25 1.75
    np.testing.assert_array_equal(nearest_indices(4, 2), [1, 3])  # 1.0 3.0
    np.testing.assert_array_equal(nearest_indices(3, 2), [0, 2])  # 0.75 2.25
    np.testing.assert_array_equal(nearest_indices(3, 5), [0, 0, 1, 2, 2])  # 0.3 0.9 1.5 2.1 2.7


def test_bilinear_by_hand():
    row = np.array([[0.0, 10.0]])
    # centres at -0.25 (clamped to 0), 0.25, 0.75, 1.25 (clamped to 1)
    np.testing.assert_allclose(resize_bilinear(row, (1, 4)), [[0.0, 2.5, 7.5, 10.0]])
    col = np.array([[0.0], [4.0], [8.0], [12.0]])
    np.testing.assert_allclose(resize_bilinear(col, (2, 1))[:, 0], [2.0, 10.0])  # centres 0.5 and 2.5


def test_tiny_label_map_up_and_down_by_hand():
    lab = np.array([[1, 2], [3, 0]], np.uint8)
    up = resize_nearest(lab, (4, 6))
    np.testing.assert_array_equal(
        up, [[1, 1, 1, 2, 2, 2], [1, 1, 1, 2, 2, 2], [3, 3, 3, 0, 0, 0], [3, 3, 3, 0, 0, 0]]
    )
    assert up.dtype == np.uint8
    np.testing.assert_array_equal(resize_nearest(up, (2, 2)), lab)


@pytest.mark.parametrize(("hw", "size"), [((7, 13), 16), ((101, 122), 1008), ((5, 5), 5), ((1, 9), 9)])
def test_label_map_round_trip_is_identity_when_enlarging(hw, size):
    lab = np.random.default_rng(0).integers(0, 5, hw).astype(np.int16)
    t = ResizeTransform(hw, size)
    up = t.mask_to_model(lab)
    assert up.shape == (size, size) and up.dtype == np.int16
    np.testing.assert_array_equal(t.mask_to_original(up), lab)


def test_real_mask_logits_come_back(data_dir):
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(data_dir / "totalsegmentator/example_seg.nii.gz")))
    liver = seg[15] == 5
    assert liver.sum() > 100
    t = ResizeTransform(liver.shape, 1008)
    logits = np.where(t.mask_to_model(liver), 6.0, -6.0).astype(np.float32)
    back = t.mask_to_original(logits)
    assert back.dtype == np.float32 and back.shape == liver.shape
    np.testing.assert_array_equal(back > 0, liver)
    # lower resolution logits (as the model's 288 x 288 masks) cover the same image
    small = resize_bilinear(logits, (288, 288))
    agree = (t.mask_to_original(small) > 0) == liver
    assert agree.mean() > 0.99


def test_batched_masks():
    t = ResizeTransform((3, 4), 8)
    masks = np.stack([np.eye(8, dtype=bool), ~np.eye(8, dtype=bool)])
    out = t.mask_to_original(masks)
    assert out.shape == (2, 3, 4) and out.dtype == bool
    np.testing.assert_array_equal(out[0], ~out[1])
    with pytest.raises(ValueError):
        t.mask_to_original(np.zeros((1, 2, 3, 4)))


# -- coordinates -------------------------------------------------------------------------------------------
def test_boxes_and_points_by_hand_and_round_trip():
    t = ResizeTransform((100, 200), 1000)  # sx = 5, sy = 10
    np.testing.assert_allclose(t.boxes_to_model([10, 20, 30, 40]), [50, 200, 150, 400])
    np.testing.assert_allclose(t.points_to_model([[0.5, 0.5], [200, 100]]), [[2.5, 5.0], [1000, 1000]])
    rng = np.random.default_rng(0)
    for hw in [(512, 512), (333, 517), (1350, 1080), (35, 51)]:
        t = ResizeTransform(hw, 1008)
        boxes = rng.uniform(0, max(hw), (7, 4))
        points = rng.uniform(0, max(hw), (3, 5, 2))
        np.testing.assert_allclose(t.boxes_to_original(t.boxes_to_model(boxes)), boxes, rtol=0, atol=1e-6)
        np.testing.assert_allclose(t.points_to_original(t.points_to_model(points)), points, rtol=0, atol=1e-6)
    with pytest.raises(ValueError):
        t.boxes_to_model([1, 2, 3])


def test_image_resize_shape_and_content():
    rgb = np.zeros((30, 40, 3), np.uint8)
    rgb[:, :20] = (255, 0, 0)
    rgb[:, 20:] = (0, 0, 255)
    t = ResizeTransform((30, 40), 64)
    out = t.image(rgb)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[:, :30], np.broadcast_to([255, 0, 0], (64, 30, 3)))
    np.testing.assert_array_equal(out[:, 34:], np.broadcast_to([0, 0, 255], (64, 30, 3)))
    same = ResizeTransform((30, 40), 40)
    with pytest.raises(ValueError, match="shape"):
        same.image(rgb[:, :30])


def test_real_png_at_model_size_is_unchanged(data_dir):
    path = data_dir / "biomedparse_demo/demo/04_CT_liver.png"
    rgb = np.asarray(PILImage.open(path).convert("RGB"))
    t = ResizeTransform(rgb.shape[:2], rgb.shape[0])
    np.testing.assert_array_equal(t.image(rgb), rgb)


# -- slices ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("display", [False, True])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_iter_and_stack_slices_are_inverse(axis, display):
    vol = np.arange(3 * 4 * 5).reshape(3, 4, 5)
    slices = list(iter_slices(vol, axis, display=display))
    assert len(slices) == vol.shape[axis]
    np.testing.assert_array_equal(stack_slices(slices, axis, display=display), vol)


def test_display_slices_put_superior_on_top_by_hand():
    vol = np.arange(3 * 4 * 5).reshape(3, 4, 5)  # z = 0 is inferior
    np.testing.assert_array_equal(take_slice(vol, 0, 1, display=True), vol[1])
    coronal = take_slice(vol, 1, 2, display=True)
    assert coronal.shape == (3, 5)
    np.testing.assert_array_equal(coronal[0], vol[2, 2])  # top row = most superior slice
    sagittal = take_slice(vol, 2, 4, display=True)
    np.testing.assert_array_equal(sagittal[:, 0], vol[::-1, 0, 4])
    with pytest.raises(IndexError):
        take_slice(vol, 0, 3)
    with pytest.raises(ValueError):
        take_slice(vol, 3, 0)


def test_slice_to_rgb_by_hand():
    gray = np.array([[0.0, 0.5], [1.0, 2.0]], np.float32)
    out = slice_to_rgb(gray)
    assert out.shape == (2, 2, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[..., 0], [[0, 128], [255, 255]])
    np.testing.assert_array_equal(out[..., 0], out[..., 2])
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 10, 255
    np.testing.assert_array_equal(slice_to_rgb(rgba), rgba[..., :3])
    np.testing.assert_array_equal(slice_to_rgb(np.full((2, 3), 7, np.uint8)), np.full((2, 3, 3), 7))
    with pytest.raises(ValueError):
        slice_to_rgb(np.zeros((2, 2, 2)))
    with pytest.raises(ValueError):
        slice_to_rgb(np.zeros((2, 2), np.int32))
