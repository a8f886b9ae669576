"""Intensity normalisation: hand-computed CT windows and percentiles, concept rules, errors, real CT."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from medsam3.errors import InputError
from medsam3.preprocess.intensity import (
    CT_WINDOWS,
    apply_intensity,
    intensity_parameters,
    normalize_intensity,
    parse_window,
    window_for_concept,
)


@pytest.mark.parametrize(
    ("window", "hu", "expected"),
    [
        ("abdomen", [-1000, -160, 40, 140, 240, 3000], [0.0, 0.0, 0.5, 0.75, 1.0, 1.0]),
        ("soft_tissue", [-160, 40, 240], [0.0, 0.5, 1.0]),
        ("liver", [-45, 30, 105], [0.0, 0.5, 1.0]),
        ("lung", [-1350, -975, -600, 150], [0.0, 0.25, 0.5, 1.0]),
        ("mediastinum", [-125, 50, 225], [0.0, 0.5, 1.0]),
        ("bone", [-500, 400, 1300], [0.0, 0.5, 1.0]),
        ("brain", [0, 20, 40, 80, 100], [0.0, 0.25, 0.5, 1.0, 1.0]),
    ],
)
def test_ct_windows_by_hand(window, hu, expected):
    out = normalize_intensity(np.array(hu, dtype=np.int16), "CT", window=window)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_window_table_values():
    assert CT_WINDOWS["abdomen"] == (400, 40)
    assert CT_WINDOWS["liver"] == (150, 30)
    assert CT_WINDOWS["lung"] == (1500, -600)
    assert CT_WINDOWS["mediastinum"] == (350, 50)
    assert CT_WINDOWS["bone"] == (1800, 400)
    assert CT_WINDOWS["brain"] == (80, 40)


def test_custom_window_and_parameters_reported():
    assert parse_window("400,40") == ("custom", 400.0, 40.0)
    assert parse_window("Soft-Tissue") == ("soft_tissue", 400.0, 40.0)
    p = intensity_parameters(np.zeros(3, np.int16), "CT", window="1000/0")
    assert (p.method, p.window, p.low, p.high, p.source) == ("window", "custom", -500.0, 500.0, "requested")
    d = intensity_parameters(np.zeros(3, np.int16), "ct")
    assert (d.window, d.width, d.level, d.source) == ("abdomen", 400.0, 40.0, "default")
    assert "W400 L40" in d.describe()


@pytest.mark.parametrize(
    ("concept", "window"),
    [
        ("lung nodule", "lung"),
        ("pulmonary nodule", "lung"),
        ("COVID-19 infection", "lung"),
        ("trachea", "lung"),
        ("liver tumor", "liver"),
        ("Liver_Tumour", "liver"),
        ("hepatic metastasis", "liver"),
        ("tumor in the liver", "liver"),
        ("liver", None),
        ("vertebra", "bone"),
        ("ribs", "bone"),
        ("left femur", "bone"),
        ("hip", "bone"),
        ("brain", "brain"),
        ("intracranial hemorrhage", "brain"),
        ("heart", "mediastinum"),
        ("left heart ventricle", "mediastinum"),
        ("aorta", "mediastinum"),
        ("pulmonary artery", "mediastinum"),
        ("pulmonary embolism", "mediastinum"),
        ("spleen", None),
        ("left kidney", None),
        ("spinal cord", None),
        ("iliac artery", None),
        ("", None),
        (None, None),
    ],
)
def test_window_for_concept(concept, window):
    assert window_for_concept(concept) == window


def test_concept_picks_window_and_explicit_window_wins():
    hu = np.array([-1350, -600, 150], np.int16)
    p = intensity_parameters(hu, "CT", concept="lung nodule")
    assert (p.window, p.source) == ("lung", "concept")
    np.testing.assert_allclose(normalize_intensity(hu, "CT", concept="lung nodule"), [0, 0.5, 1], atol=1e-6)
    q = intensity_parameters(hu, "CT", window="bone", concept="lung nodule")
    assert (q.window, q.source) == ("bone", "requested")
    # concept ignored outside CT
    assert intensity_parameters(np.arange(10.0), "MR", concept="lung").method == "percentiles"


def test_ct_uint8_is_already_windowed():
    a = np.array([0, 51, 255], np.uint8)
    p = intensity_parameters(a, "CT")
    assert p.method == "uint8"
    np.testing.assert_allclose(apply_intensity(a, p), [0.0, 0.2, 1.0], atol=1e-7)


def test_mr_percentiles_by_hand():
    a = np.arange(1000, dtype=np.float32)  # percentile q of 0..999 is q/100 * 999
    p = intensity_parameters(a, "MR")
    assert p.percentiles == (0.5, 99.5)
    assert p.low == pytest.approx(4.995) and p.high == pytest.approx(994.005)
    out = apply_intensity(np.array([0.0, 4.995, 499.5, 994.005, 999.0]), p)
    np.testing.assert_allclose(out, [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)


def test_mr_stored_as_8_bit_still_uses_percentiles():
    a = np.arange(201, dtype=np.uint8)
    p = intensity_parameters(a, "MR")
    assert p.method == "percentiles" and (p.low, p.high) == pytest.approx((1.0, 199.0))


def test_percentiles_over_the_whole_volume_not_per_slice():
    vol = np.stack([np.linspace(0, 10, 100), np.linspace(100, 110, 100)]).reshape(2, 10, 10)
    out = normalize_intensity(vol, "MR", percentiles=(0, 100))
    np.testing.assert_allclose(out[0].max(), 10 / 110, atol=1e-6)
    np.testing.assert_allclose(out[1].min(), 100 / 110, atol=1e-6)


def test_modality_rules_for_other_data():
    rgb = np.random.default_rng(0).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    for modality in ("RGB", "US", "XR", "OTHER", "MICROSCOPY"):
        out = normalize_intensity(rgb, modality)
        assert out.shape == rgb.shape
        np.testing.assert_array_equal(np.rint(out * 255).astype(np.uint8), rgb)
    micro = np.arange(1001, dtype=np.uint16)
    p = intensity_parameters(micro, "MICROSCOPY")
    assert p.percentiles == (1.0, 99.8)
    assert (p.low, p.high) == pytest.approx((10.0, 998.0))
    pet = intensity_parameters(np.arange(201, dtype=np.float32), "PT")
    assert pet.percentiles == (0.0, 99.5) and (pet.low, pet.high) == pytest.approx((0.0, 199.0))
    xr16 = intensity_parameters(np.arange(1001, dtype=np.uint16), "XR")
    assert (xr16.low, xr16.high) == pytest.approx((5.0, 995.0))


def test_degenerate_inputs():
    np.testing.assert_array_equal(normalize_intensity(np.full((3, 3), 7.0), "MR"), np.zeros((3, 3)))
    out = normalize_intensity(np.array([np.nan, 0.0, 5.0, 10.0, np.inf]), "MR", percentiles=(0, 100))
    np.testing.assert_allclose(out, [0.0, 0.0, 0.5, 1.0, 0.0])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"modality": "CAT"}, "unknown modality 'CAT'"),
        ({"modality": "CT", "window": "lungs2"}, "unknown window 'lungs2'"),
        ({"modality": "CT", "window": "0,40"}, "width must be positive"),
        ({"modality": "MR", "window": "lung"}, "windows apply to CT only"),
        ({"modality": "MR", "percentiles": (50, 10)}, "percentiles"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, message):
    with pytest.raises(InputError, match=message):
        intensity_parameters(np.zeros(4, np.int16), **kwargs)


def test_real_ct_abdomen_window_puts_liver_mid_grey(data_dir):
    ct = sitk.GetArrayFromImage(sitk.ReadImage(str(data_dir / "totalsegmentator/example_ct_sm.nii.gz")))
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(data_dir / "totalsegmentator/example_seg.nii.gz")))
    out = normalize_intensity(ct, "CT")
    assert out.dtype == np.float32 and out.shape == ct.shape
    assert out.min() == 0.0 and out.max() == 1.0
    liver = float(np.median(out[seg == 5]))  # liver tissue is ~40-120 HU: 0.5-0.7 in W400 L40
    assert 0.45 < liver < 0.75
    assert float(np.median(out[ct < -900])) == 0.0  # air
    lung_win = normalize_intensity(ct, "CT", concept="lung nodule")
    assert float(np.median(lung_win[seg == 5])) > 0.9  # soft tissue is bright in the lung window
