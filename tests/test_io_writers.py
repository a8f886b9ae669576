"""Write -> read round trips keep array and geometry; writers refuse what they cannot store."""

from __future__ import annotations

import shutil

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from medsam3.errors import OutputError
from medsam3.image import Image
from medsam3.io.atomic import _PROTECTED, protect_inputs
from medsam3.io.readers import read_image, read_label_map, read_segments
from medsam3.io.writers import write_dicom_seg, write_image, write_label_map


@pytest.fixture(scope="module")
def dcmqi(data_dir):
    return data_dir / "dcmqi_ct3slice"


@pytest.fixture(scope="module")
def dcmqi_ct(dcmqi):
    return read_image(dcmqi / "ct-3slice")


@pytest.fixture()
def clean_protection():
    saved = set(_PROTECTED)
    yield
    _PROTECTED.clear()
    _PROTECTED.update(saved)


def _oblique_reference() -> Image:
    """A volume with an oblique direction and non-trivial spacing / origin (exact in float32 terms)."""
    a = np.deg2rad(30.0)
    rot = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
    arr = (np.arange(5 * 6 * 7) % 11).reshape(5, 6, 7).astype(np.int16) - 3
    return Image(arr, (0.8125, 0.6875, 2.5), (-120.25, 35.5, 18.0), rot, "MR", {"path": "ref"})


@pytest.mark.parametrize(
    "suffix,atol", [(".nii.gz", 1e-5), (".nii", 1e-5), (".nrrd", 0.0), (".mha", 1e-12), (".npz", 0.0)]
)
def test_label_round_trip_keeps_array_and_geometry(tmp_path, suffix, atol):
    ref = _oblique_reference()
    labels = np.zeros(ref.spatial_shape, np.int64)
    labels[1:4, 2:5, 1:6] = 3
    labels[0, 0, 0] = 7
    out = write_label_map(labels, tmp_path / f"lab{suffix}", ref, {3: "liver", 7: "lesion"})
    assert out == tmp_path / f"lab{suffix}"
    back = read_label_map(out, ref)
    np.testing.assert_array_equal(back.array, labels)
    assert back.array.dtype == np.uint8
    raw = read_label_map(out)  # its own geometry as stored
    np.testing.assert_allclose(raw.spacing, ref.spacing, atol=atol)
    np.testing.assert_allclose(raw.origin, ref.origin, atol=max(atol, 1e-12) * 100)
    np.testing.assert_allclose(raw.direction, ref.direction, atol=max(atol, 1e-12))
    if suffix in (".nrrd", ".npz"):
        assert raw.meta["label_names"] == {3: "liver", 7: "lesion"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"lab{suffix}"]  # no temporary left


def test_image_round_trips(tmp_path, data_dir):
    ref = _oblique_reference()
    for suffix in (".nii.gz", ".nrrd", ".mha", ".npz"):
        back = read_image(write_image(ref, tmp_path / f"img{suffix}"))
        np.testing.assert_array_equal(back.array, ref.array)
        assert back.array.dtype == ref.array.dtype
        assert back.same_geometry(ref, atol=1e-5)
    ct = read_image(data_dir / "totalsegmentator" / "example_ct_sm.nii.gz")
    back = read_image(write_image(ct, tmp_path / "ct.nrrd"))
    np.testing.assert_array_equal(back.array, ct.array)
    assert back.same_geometry(ct, atol=1e-9) and back.modality == "CT"


def test_png_round_trips(tmp_path, data_dir):
    grey = read_image(data_dir / "hc18_ultrasound" / "training_set" / "000_HC.png")
    np.testing.assert_array_equal(read_image(write_image(grey, tmp_path / "g.png")).array, grey.array)
    sixteen = read_image(data_dir / "stardist_pkg" / "img2d.tif")
    back = read_image(write_image(sixteen, tmp_path / "s.png"))
    assert back.array.dtype == np.uint16
    np.testing.assert_array_equal(back.array, sixteen.array)
    colour = read_image(data_dir / "kvasir_seg_sample" / "images" / "cju0qoxqj9q6s0835b43399p4.jpg")
    np.testing.assert_array_equal(read_image(write_image(colour, tmp_path / "c.png")).array, colour.array)
    lab = np.zeros(grey.spatial_shape, np.int32)
    lab[10:20, 30:40] = 2
    lab[50, 60] = 300  # needs 16 bits
    back = read_label_map(write_label_map(lab, tmp_path / "l.png", grey), grey)
    assert back.array.dtype == np.uint16
    np.testing.assert_array_equal(back.array, lab)


def test_tiff_label_stack_round_trip(tmp_path):
    ref = _oblique_reference()
    lab = np.zeros(ref.spatial_shape, np.uint32)
    lab[2, 3, 4] = 70000
    back = read_label_map(write_label_map(lab, tmp_path / "l.tif", ref))
    assert back.array.dtype == np.uint32
    np.testing.assert_array_equal(back.array, lab)


@pytest.mark.parametrize("top,dtype", [(1, np.uint8), (255, np.uint8), (256, np.uint16), (70000, np.uint32)])
def test_smallest_unsigned_label_dtype(tmp_path, top, dtype):
    ref = _oblique_reference()
    lab = np.zeros(ref.spatial_shape, np.int64)
    lab[0, 0, 0] = top
    path = write_label_map(lab, tmp_path / "l.nrrd", ref)
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(path))).dtype == dtype


def test_dicom_seg_round_trip_label_map(tmp_path, dcmqi, dcmqi_ct):
    liver = read_label_map(dcmqi / "liver_spine_seg.nrrd", dcmqi_ct).array
    out = write_label_map(liver, tmp_path / "seg.dcm", dcmqi_ct, {1: "liver", 2: "thoracic spine"})
    ds = pydicom.dcmread(out)
    assert ds.Modality == "SEG" and ds.SegmentationType == "BINARY"
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == dcmqi_ct.meta["series_uid"]
    assert ds.FrameOfReferenceUID == dcmqi_ct.meta["frame_of_reference_uid"]
    assert [s.SegmentLabel for s in ds.SegmentSequence] == ["liver", "thoracic spine"]
    assert ds.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Liver"
    back = read_label_map(out, dcmqi_ct)
    np.testing.assert_array_equal(back.array, liver)
    assert back.meta["label_names"] == {1: "liver", 2: "thoracic spine"}
    assert back.same_geometry(dcmqi_ct)


def test_dicom_seg_overlapping_segments(tmp_path, dcmqi, dcmqi_ct):
    masks = {
        1: read_label_map(dcmqi / "liver_seg.nrrd", dcmqi_ct).array > 0,
        2: read_label_map(dcmqi / "spine_seg.nrrd", dcmqi_ct).array > 0,
        3: read_label_map(dcmqi / "heart_seg.nrrd", dcmqi_ct).array > 0,
    }
    names = {1: "Liver", 2: "Thoracic spine", 3: "Heart"}
    out = write_dicom_seg(masks, dcmqi_ct, tmp_path / "three.dcm", names)
    segments = read_segments(out, dcmqi_ct)
    assert sorted(segments) == [1, 2, 3]
    for v, mask in masks.items():
        np.testing.assert_array_equal(segments[v].array.astype(bool), mask)
    assert segments[3].meta["label_names"] == {3: "Heart"}
    with pytest.raises(Exception, match=r"Liver \(1\) & Heart \(3\): 522 voxels"):
        read_label_map(out, dcmqi_ct)
    last = read_label_map(out, dcmqi_ct, overlap="last").array
    first = read_label_map(out, dcmqi_ct, overlap="first").array
    both = masks[1] & masks[3]
    assert np.all(last[both] == 3) and np.all(first[both] == 1)
    assert int((last == 1).sum()) == int(masks[1].sum()) - 522


def test_dicom_seg_refuses_non_dicom_and_anonymised_sources(tmp_path, data_dir):
    ref = _oblique_reference()
    with pytest.raises(OutputError, match="needs a DICOM source series"):
        write_label_map(np.ones(ref.spatial_shape, np.uint8), tmp_path / "x.dcm", ref)
    folder = tmp_path / "anon"
    folder.mkdir()
    for f in sorted((data_dir / "totalsegmentator" / "example_ct_dicom").iterdir())[:2]:
        shutil.copy(f, folder / f.name)
    anon = read_image(folder)
    with pytest.raises(OutputError, match="lacks StudyInstanceUID, SeriesInstanceUID"):
        write_label_map(np.ones(anon.spatial_shape, np.uint8), tmp_path / "y.dcm", anon)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["anon"]


def test_writer_errors(tmp_path):
    ref = _oblique_reference()
    good = np.zeros(ref.spatial_shape, np.uint8)
    with pytest.raises(OutputError, match="shape"):
        write_label_map(np.zeros((2, 2, 2), np.uint8), tmp_path / "a.nii.gz", ref)
    with pytest.raises(OutputError, match=">= 0"):
        write_label_map(good.astype(np.int8) - 1, tmp_path / "a.nii.gz", ref)
    with pytest.raises(OutputError, match="integers"):
        write_label_map(good + 0.5, tmp_path / "a.nii.gz", ref)
    with pytest.raises(OutputError, match="JPEG is lossy"):
        write_label_map(good, tmp_path / "a.jpg", ref)
    with pytest.raises(OutputError, match="PNG holds 2D"):
        write_label_map(good, tmp_path / "a.png", ref)
    with pytest.raises(OutputError, match="PNG holds"):
        write_image(ref, tmp_path / "a.png")
    with pytest.raises(OutputError, match="single-file .mha"):
        write_label_map(good, tmp_path / "a.mhd", ref)
    assert list(tmp_path.iterdir()) == []


def test_writer_never_overwrites_an_input(tmp_path, clean_protection):
    ref = _oblique_reference()
    target = tmp_path / "input.nii.gz"
    write_image(ref, target)
    before = target.read_bytes()
    protect_inputs([target])
    with pytest.raises(OutputError, match="refusing to write over an input"):
        write_label_map(np.zeros(ref.spatial_shape, np.uint8), target, ref)
    with pytest.raises(OutputError, match="refusing to write over an input"):
        write_image(ref, target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input.nii.gz"]
