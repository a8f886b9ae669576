"""DICOM variants built from the real dcmqi CT: enhanced multi-frame, projection images, mixed folders,
fractional SEG, Slicer multi-layer ``.seg.nrrd``."""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from medsam3.errors import InputError
from medsam3.io.readers import read_image, read_label_map, read_segments
from medsam3.io.writers import write_label_map


@pytest.fixture(scope="module")
def dcmqi(data_dir):
    return data_dir / "dcmqi_ct3slice"


@pytest.fixture(scope="module")
def dcmqi_ct(dcmqi):
    return read_image(dcmqi / "ct-3slice")


def test_enhanced_multiframe_equals_the_series(dcmqi, dcmqi_ct, tmp_path):
    import highdicom as hd

    legacy = [pydicom.dcmread(f) for f in sorted((dcmqi / "ct-3slice").glob("*.dcm"))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
            legacy,
            series_instance_uid=hd.UID(),
            series_number=9,
            sop_instance_uid=hd.UID(),
            instance_number=1,
        )
    enhanced.save_as(tmp_path / "enhanced.dcm")
    image = read_image(tmp_path / "enhanced.dcm")
    np.testing.assert_array_equal(image.array, dcmqi_ct.array)
    assert image.same_geometry(dcmqi_ct, atol=1e-5)
    assert image.modality == "CT"
    assert sorted(image.meta["frame_order"]) == [0, 1, 2]


def test_projection_image_is_2d_with_pixel_spacing(dcmqi, tmp_path):
    ds = pydicom.dcmread(sorted((dcmqi / "ct-3slice").glob("*.dcm"))[0])
    raw = ds.pixel_array
    del ds.ImagePositionPatient
    del ds.ImageOrientationPatient
    ds.Modality = "DX"
    ds.PixelSpacing = [0.25, 0.5]  # row spacing (y), column spacing (x)
    ds.RescaleIntercept = 0
    ds.save_as(tmp_path / "xray.dcm")
    image = read_image(tmp_path / "xray.dcm")
    assert image.ndim == 2 and image.array.shape == raw.shape
    assert image.spacing == (0.5, 0.25)
    assert image.modality == "XR"
    np.testing.assert_array_equal(image.array, raw)


def test_folder_with_series_seg_and_other_files(dcmqi, dcmqi_ct):
    """The dcmqi folder holds the CT series (in a sub-folder), a SEG and NRRD files: the CT is the image."""
    image = read_image(dcmqi)
    np.testing.assert_array_equal(image.array, dcmqi_ct.array)
    assert image.meta["series_uid"] == dcmqi_ct.meta["series_uid"]


def test_folder_with_only_a_seg(dcmqi, tmp_path):
    shutil.copy(dcmqi / "liver.dcm", tmp_path / "liver.dcm")
    with pytest.raises(InputError, match=r"no DICOM image series, only 1 non-image object\(s\) \(SEG\)"):
        read_image(tmp_path)


def test_seg_refuses_a_reference_of_another_frame_of_reference(dcmqi, dcmqi_ct):
    other = dcmqi_ct.with_array(dcmqi_ct.array)
    other.meta["frame_of_reference_uid"] = "1.2.3.4"
    with pytest.raises(InputError, match="liver.dcm: belongs to frame of reference"):
        read_label_map(dcmqi / "liver.dcm", other)


def test_fractional_seg_is_thresholded_at_one_half(dcmqi, dcmqi_ct, tmp_path):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in dcmqi_ct.meta["files"]]
    prob = np.zeros(dcmqi_ct.spatial_shape, np.float32)
    prob[1, 100:110, 200:220] = 0.8
    prob[1, 100:110, 220:230] = 0.3  # below one half: background
    desc = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="lesion",
        segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.Lesion,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seg = hd.seg.Segmentation(
            source_images=sources,
            pixel_array=prob,
            segmentation_type="FRACTIONAL",
            segment_descriptions=[desc],
            series_instance_uid=hd.UID(),
            series_number=5,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="test",
            manufacturer_model_name="test",
            software_versions="1",
            device_serial_number="1",
            max_fractional_value=100,
            specific_character_set=None,
        )
    seg.save_as(tmp_path / "frac.dcm")
    labels = read_label_map(tmp_path / "frac.dcm", dcmqi_ct)
    expected = (prob >= 0.5).astype(np.uint8)
    np.testing.assert_array_equal(labels.array, expected)
    assert labels.meta["label_names"] == {1: "lesion"}


def _layered_seg_nrrd(path, ref, liver, heart):
    """A Slicer-style .seg.nrrd with overlapping liver / heart in two layers (both label value 1)."""
    layers = np.stack([liver.astype(np.uint8), heart.astype(np.uint8)], axis=-1)
    image = sitk.GetImageFromArray(layers, isVector=True)
    image.SetSpacing(ref.spacing)
    image.SetOrigin(ref.origin)
    image.SetDirection(tuple(ref.direction.ravel()))
    fields = {
        "Segment0_ID": "Segment_1",
        "Segment0_Name": "liver",
        "Segment0_LabelValue": "1",
        "Segment0_Layer": "0",
        "Segment1_ID": "Segment_2",
        "Segment1_Name": "heart",
        "Segment1_LabelValue": "1",
        "Segment1_Layer": "1",
    }
    for k, v in fields.items():
        image.SetMetaData(k, v)
    sitk.WriteImage(image, str(path), True)


def test_multilayer_seg_nrrd(dcmqi, dcmqi_ct, tmp_path):
    liver = read_label_map(dcmqi / "liver_seg.nrrd", dcmqi_ct).array > 0
    heart = read_label_map(dcmqi / "heart_seg.nrrd", dcmqi_ct).array > 0
    path = tmp_path / "organs.seg.nrrd"
    _layered_seg_nrrd(path, dcmqi_ct, liver, heart)
    masks = read_segments(path, dcmqi_ct)
    assert sorted(masks) == [1, 2]
    np.testing.assert_array_equal(masks[1].array.astype(bool), liver)
    np.testing.assert_array_equal(masks[2].array.astype(bool), heart)
    assert masks[2].meta["label_names"] == {2: "heart"}
    with pytest.raises(InputError, match=r"overlapping segments \(heart \(2\): 522 voxels"):
        read_label_map(path)
    merged = read_label_map(path, overlap="last")
    assert merged.meta["label_names"] == {1: "liver", 2: "heart"}
    assert int((merged.array == 2).sum()) == int(heart.sum())


def test_single_layer_seg_nrrd_names_round_trip(dcmqi, dcmqi_ct, tmp_path):
    both = read_label_map(dcmqi / "liver_spine_seg.nrrd", dcmqi_ct)
    out = write_label_map(both.array, tmp_path / "ls.seg.nrrd", dcmqi_ct, {1: "liver", 2: "thoracic spine"})
    image = read_image(out)
    assert image.meta["is_label"] and image.meta["label_names"] == {1: "liver", 2: "thoracic spine"}
    back = read_label_map(out, dcmqi_ct)
    np.testing.assert_array_equal(back.array, both.array)
