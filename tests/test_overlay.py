"""Overlays: contour pixels by hand, PNG files of the expected size, plane / montage choices, real volumes."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image as PILImage

from medsam3.overlay import (
    PALETTE,
    contour_mask,
    label_colors,
    overlay_2d,
    overlay_volume,
    render_overlay,
)
from medsam3.preprocess.intensity import normalize_intensity
from medsam3.preprocess.orientation import to_canonical


def read_png(path) -> np.ndarray:
    with PILImage.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def crop(png: np.ndarray, box) -> np.ndarray:
    x0, y0, x1, y1 = box
    return png[y0:y1, x0:x1]


def colour_count(pixels: np.ndarray, colour) -> int:
    return int(np.all(pixels == np.array(colour, np.uint8), axis=-1).sum())


def test_contour_mask_by_hand():
    lab = np.zeros((5, 5), np.int32)
    lab[1:4, 1:4] = 1
    expected = lab.astype(bool).copy()
    expected[2, 2] = False  # only the centre has all neighbours inside
    np.testing.assert_array_equal(contour_mask(lab, 1), expected)
    touching = np.array([[1, 1, 2, 2]] * 3)
    # every pixel is within one pixel of the other label or of the border
    assert contour_mask(touching, 1).all()


def test_render_overlay_exact_colours():
    img = np.full((6, 6), 0.5, np.float32)
    lab = np.zeros((6, 6), np.int64)
    lab[1:5, 1:5] = 3
    colours = {3: (200, 10, 20)}
    out = render_overlay(img, lab, colours, (6, 6), thickness=1, fill_alpha=0.5)
    assert out.shape == (6, 6, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[1, 1], (200, 10, 20))  # contour
    np.testing.assert_array_equal(out[1, 3], (200, 10, 20))
    np.testing.assert_array_equal(out[2, 2], (164, 69, 74))  # 128 * 0.5 + colour * 0.5, rounded
    np.testing.assert_array_equal(out[0, 0], (128, 128, 128))  # background untouched


def test_label_colours_distinct_and_stable():
    colours = label_colors(range(1, 61))
    assert len(set(colours.values())) == 60
    assert colours[1] == PALETTE[0] and colours[2] == PALETTE[1]
    assert all(len(set(c)) > 1 for c in colours.values())  # no grey: never confused with the image
    assert label_colors([7, 3])[3] == PALETTE[0]


def test_overlay_2d_pixels_by_hand(tmp_path):
    img = np.full((10, 10), 0.5, np.float32)
    lab = np.zeros((10, 10), np.int32)
    lab[2:6, 3:7] = 1  # rows 2-5, cols 3-6
    lab[7:9, 1:3] = 2
    res = overlay_2d(img, lab, {1: "liver", 2: "spleen"}, tmp_path / "o.png", title="test")
    png = read_png(res.path)
    assert png.shape[1::-1] == res.size
    assert list(tmp_path.iterdir()) == [tmp_path / "o.png"]  # no temporary file left
    (panel,) = res.panels
    view = crop(png, panel.box)
    k = view.shape[0] // 10
    assert view.shape == (10 * k, 10 * k, 3) and k >= 10  # small images are enlarged by an integer zoom
    red, green = PALETTE[0], PALETTE[1]
    np.testing.assert_array_equal(view[2 * k, 5 * k], red)  # top edge of label 1
    np.testing.assert_array_equal(view[4 * k, 3 * k], red)  # left edge
    np.testing.assert_array_equal(view[6 * k - 1, 4 * k], red)  # bottom edge
    np.testing.assert_array_equal(view[7 * k, 2 * k - 1], green)  # label 2
    centre = view[4 * k, 5 * k].astype(int)  # inside: tinted, not the pure contour colour
    assert tuple(centre) != red and centre[0] > centre[1] + 20
    np.testing.assert_array_equal(view[k // 2, k // 2], (128, 128, 128))  # background
    # contour colours appear inside the label's area only (legend swatches lie outside the panel)
    lab_up = np.kron(lab, np.ones((k, k), int))
    is_red = np.all(view == red, axis=-1)
    assert is_red.sum() > 4 * 4 * k and (lab_up[is_red] == 1).all()
    assert colour_count(png, red) > is_red.sum()  # plus the legend swatch
    assert res.note is None


def test_overlay_2d_rgb_and_aspect(tmp_path):
    rgb = np.zeros((20, 40, 3), np.uint8)
    rgb[..., 2] = 255
    res = overlay_2d(rgb, np.zeros((20, 40), np.uint8), {}, tmp_path / "rgb.png", spacing_yx=(2.0, 1.0))
    (panel,) = res.panels
    x0, y0, x1, y1 = panel.box
    assert (x1 - x0) == (y1 - y0)  # 20 rows of 2 mm = 40 columns of 1 mm
    view = crop(read_png(res.path), panel.box)
    assert np.all(view == (0, 0, 255))
    assert res.note == "no foreground"
    with pytest.raises(ValueError, match="shape"):
        overlay_2d(rgb, np.zeros((20, 41), np.uint8), {}, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_overlay_volume_planes_centre_and_aspect(tmp_path):
    vol = np.random.default_rng(0).random((10, 20, 30)).astype(np.float32)
    lab = np.zeros(vol.shape, np.uint8)
    lab[2:5, 12:16, 3:9] = 4  # centre of mass z=3, y=13.5->14 (rounded), x=5.5->6 (rounded)
    res = overlay_volume(vol, lab, {4: "tumour"}, tmp_path / "p.png", spacing_zyx=(5.0, 1.0, 1.0))
    captions = [p.caption for p in res.panels]
    assert captions == ["axial z=3", "coronal y=14", "sagittal x=6"]
    png = read_png(res.path)
    assert png.shape[1::-1] == res.size
    for panel in res.panels:
        assert colour_count(crop(png, panel.box), PALETTE[0]) > 0
    axial, coronal, sagittal = (p.box for p in res.panels)
    # physical aspect: coronal is 10 slices x 5 mm high, 30 mm wide
    h, w = coronal[3] - coronal[1], coronal[2] - coronal[0]
    assert h / w == pytest.approx(50 / 30, rel=0.02)
    h, w = axial[3] - axial[1], axial[2] - axial[0]
    assert h / w == pytest.approx(20 / 30, rel=0.02)
    # coronal display puts superior (high z) on top: slices z=2..4 of 10 are display rows 5..7 of 10
    view = crop(png, coronal)
    rows = np.flatnonzero(np.all(view == PALETTE[0], axis=-1).any(axis=1))
    assert rows.min() == view.shape[0] * 5 // 10 and rows.max() == view.shape[0] * 8 // 10 - 1


def test_overlay_volume_montage_picks_foreground_slices(tmp_path):
    vol = np.zeros((9, 8, 8), np.float32)
    lab = np.zeros(vol.shape, np.int16)
    lab[3, 2:5, 2:5] = 1
    lab[7, 1:7, 1:7] = 2
    res = overlay_volume(vol, lab, None, tmp_path / "m.png", mode="montage", n_slices=12)
    assert [p.caption for p in res.panels] == ["axial z=3", "axial z=7"]
    res = overlay_volume(vol, lab, None, tmp_path / "m1.png", mode="montage", n_slices=1)
    assert [p.caption for p in res.panels] == ["axial z=7"]
    res = overlay_volume(vol, lab, None, tmp_path / "m2.png", mode="montage", n_slices=4, axis=2)
    assert all(p.caption.startswith("sagittal") for p in res.panels)


def test_overlay_volume_empty_labels_shows_middle_slices(tmp_path):
    vol = np.random.default_rng(1).random((11, 12, 13)).astype(np.float32)
    empty = np.zeros(vol.shape, np.uint8)
    res = overlay_volume(vol, empty, {1: "x"}, tmp_path / "e.png")
    assert [p.caption for p in res.panels] == ["axial z=5", "coronal y=6", "sagittal x=6"]
    assert res.note == "no foreground"
    res = overlay_volume(vol, empty, {}, tmp_path / "e2.png", mode="montage", n_slices=3)
    assert [p.caption for p in res.panels] == ["axial z=2", "axial z=5", "axial z=8"]
    assert read_png(res.path).shape[1::-1] == res.size
    with pytest.raises(ValueError, match="mode"):
        overlay_volume(vol, empty, {}, tmp_path / "x.png", mode="cube")


def test_real_hippocampus_overlay(data_dir, tmp_path):
    def load(rel):
        s = sitk.ReadImage(str(data_dir / rel))
        from medsam3.image import Image

        return Image(
            sitk.GetArrayFromImage(s),
            s.GetSpacing(),
            s.GetOrigin(),
            np.array(s.GetDirection()).reshape(3, 3),
            "MR",
        )

    img = load("msd_hippocampus/images/hippocampus_003.nii.gz")
    lab = load("msd_hippocampus/labels/hippocampus_003.nii.gz")
    canon, reo = to_canonical(img)
    vol = normalize_intensity(canon.array, "MR")
    names = {1: "anterior hippocampus", 2: "posterior hippocampus"}
    for mode in ("planes", "montage"):
        res = overlay_volume(
            vol,
            reo.apply(lab.array),
            names,
            tmp_path / f"{mode}.png",
            canon.spacing_array_order,
            mode,
            title="hippocampus_003",
        )
        png = read_png(res.path)
        assert png.shape[1::-1] == res.size
        inside = np.concatenate([crop(png, p.box).reshape(-1, 3) for p in res.panels])
        assert colour_count(inside, PALETTE[0]) > 50 and colour_count(inside, PALETTE[1]) > 50


def test_thin_volume_views_are_stretched_not_slivers(tmp_path):
    vol = np.random.default_rng(2).random((2, 50, 60)).astype(np.float32)
    res = overlay_volume(vol, None, None, tmp_path / "thin.png", spacing_zyx=(1.0, 1.0, 1.0))
    axial, coronal, sagittal = res.panels
    assert axial.caption == "axial z=1"
    assert coronal.caption == "coronal y=25 (stretched)" and coronal.box[3] - coronal.box[1] == 48
    assert sagittal.caption.endswith("(stretched)")
    assert res.note is None  # no labels given: nothing to report missing
