"""DICOM RT Structure Sets: exact round trips on hand-built series, references, real series, refusals."""

from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

from medsam3.errors import InputError, OutputError
from medsam3.image import Image
from medsam3.io.atomic import _PROTECTED, protect_inputs
from medsam3.io.readers import read_image, read_label_map
from medsam3.io.rtstruct import (
    RTSTRUCT_SOP_CLASS,
    read_rtstruct,
    rtstruct_problem,
    slice_rings,
    write_rtstruct,
)
from medsam3.overlay import label_colors

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
ROOT = "1.2.826.0.1.3680043.8.498.77"

_A, _B = np.deg2rad(30.0), np.deg2rad(20.0)
ORIENTATIONS = {
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
    "oblique": (
        (np.cos(_A), np.sin(_A), 0.0),
        (-np.sin(_A) * np.cos(_B), np.cos(_A) * np.cos(_B), np.sin(_B)),
    ),
}
ORIGIN = np.array([-10.0, 20.0, 30.0])
ROW_SPACING, COL_SPACING, STEP = 0.7, 1.3, 2.5
DEPTH, SIZE = 4, 16


# -- synthetic series --------------------------------------------------------------------------------------
def _geometry(orientation: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r, c = (np.array(v) for v in ORIENTATIONS[orientation])
    return r, c, np.cross(r, c)


def _base(sop_class: str, sop_uid: str, *, uids: bool, frame: bool) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Phantom", "P-1", "19700101", "O"
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240102", "101500", "7", "A-9"
    ds.ReferringPhysicianName = "Ref^Doc"
    ds.StudyInstanceUID = f"{ROOT}.1" if uids else ""
    ds.SeriesInstanceUID = f"{ROOT}.2" if uids else ""
    if frame:
        ds.FrameOfReferenceUID = f"{ROOT}.3"
    ds.Modality = "CT"
    ds.Rows = ds.Columns = SIZE
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    return ds


def _write_series(folder, orientation="axial", *, uids=True, frame=True) -> list[str]:
    """``DEPTH`` slices, file names in reverse position order; returns the SOP Instance UID of slice k."""
    folder.mkdir(parents=True, exist_ok=True)
    r, c, n = _geometry(orientation)
    sops = []
    for k in range(DEPTH):
        sop = f"{ROOT}.10.{k + 1}"
        ds = _base(CT_IMAGE, sop, uids=uids, frame=frame)
        ds.InstanceNumber = k + 1
        ds.ImageOrientationPatient = [*r, *c]
        ds.ImagePositionPatient = list(ORIGIN + k * STEP * n)
        ds.PixelSpacing = [ROW_SPACING, COL_SPACING]
        ds.PixelData = (np.arange(SIZE * SIZE, dtype=np.int16) + k).tobytes()
        ds.save_as(folder / f"im{DEPTH - k:02d}.dcm", enforce_file_format=True)
        sops.append(sop)
    return sops


def _write_enhanced(path, orientation="oblique") -> list[float]:
    """One enhanced multi-frame file whose frames are stored in reverse position order."""
    r, c, n = _geometry(orientation)
    ds = _base(ENHANCED_CT, f"{ROOT}.20", uids=True, frame=True)
    ds.NumberOfFrames = DEPTH
    per_frame = []
    for f in range(DEPTH):
        k = DEPTH - 1 - f
        plane = Dataset()
        plane.ImagePositionPatient = list(ORIGIN + k * STEP * n)
        item = Dataset()
        item.PlanePositionSequence = Sequence([plane])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    orient, measures, shared = Dataset(), Dataset(), Dataset()
    orient.ImageOrientationPatient = [*r, *c]
    measures.PixelSpacing = [ROW_SPACING, COL_SPACING]
    measures.SliceThickness = STEP
    shared.PlaneOrientationSequence = Sequence([orient])
    shared.PixelMeasuresSequence = Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    ds.PixelData = np.zeros((DEPTH, SIZE, SIZE), np.int16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return [float(np.dot(ORIGIN + (DEPTH - 1 - f) * STEP * n, n)) for f in range(DEPTH)]


def _labels() -> np.ndarray:
    """Rectangles, a ring with a hole and an island in it, islands, diagonal pixels, border contact."""
    lab = np.zeros((DEPTH, SIZE, SIZE), np.uint8)
    lab[0, 3:7, 2:10] = 1  # rectangle rows 3..6, columns 2..9
    lab[0, 12, 12] = 2  # one pixel
    lab[1, 2:12, 2:12] = 1
    lab[1, 5:8, 5:8] = 0  # hole
    lab[1, 6, 6] = 1  # island inside the hole
    lab[2, 1:4, 1:4] = 3  # two islands
    lab[2, 9:13, 10:14] = 3
    lab[2, 5, 5] = lab[2, 6, 6] = 2  # touching at a corner only
    lab[3, :, :5] = 1  # touches three borders
    lab[3, 15, 15] = 3  # the far corner
    return lab


def _points(item) -> np.ndarray:
    return np.array([float(v) for v in item.ContourData]).reshape(-1, 3)


def _contours(ds, number):
    roi = next(r for r in ds.ROIContourSequence if int(r.ReferencedROINumber) == number)
    return list(roi.get("ContourSequence") or [])


def _slice_of(points: np.ndarray, orientation: str) -> float:
    _, _, n = _geometry(orientation)
    return float(np.mean((points - ORIGIN) @ n)) / STEP


@pytest.fixture()
def clean_protection():
    saved = set(_PROTECTED)
    yield
    _PROTECTED.clear()
    _PROTECTED.update(saved)


# -- hand-computed -------------------------------------------------------------------------------------------
def test_slice_rings_by_hand():
    one = np.zeros((3, 3), bool)
    one[1, 1] = True
    (ring,) = slice_rings(one)
    assert ring.tolist() == [[1.0, 0.5], [0.5, 1.0], [1.0, 1.5], [1.5, 1.0]]  # (row, col), a diamond
    rect = np.zeros((8, 8), bool)
    rect[2:4, 1:6] = True  # 2 rows x 5 columns: 8 corner-cut vertices
    (ring,) = slice_rings(rect)
    assert len(ring) == 8
    assert ring[:, 0].min() == 1.5 and ring[:, 0].max() == 3.5
    assert ring[:, 1].min() == 0.5 and ring[:, 1].max() == 5.5
    x, y = ring[:, 1], ring[:, 0]
    assert np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y) > 0  # outline counter-clockwise in (col, row)
    assert slice_rings(np.zeros((4, 4), bool)) == []
    border = np.ones((4, 4), bool)
    (ring,) = slice_rings(border)
    assert ring.min() == -0.5 and ring.max() == 3.5


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_round_trip_is_exact(tmp_path, orientation):
    sops = _write_series(tmp_path / "ct", orientation)
    ct = read_image(tmp_path / "ct")
    assert rtstruct_problem(ct) is None
    lab = _labels()
    names = {1: "liver", 2: "lesion", 3: "spleen", 4: "absent"}
    out = write_rtstruct(lab, ct, tmp_path / "rs.dcm", names)
    assert out == tmp_path / "rs.dcm"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct", "rs.dcm"]  # no temporary left
    rs = read_rtstruct(out, ct)
    assert rs.names == names
    np.testing.assert_array_equal(rs.label_map().array, lab)
    masks = rs.masks("name")
    for v, name in names.items():
        assert np.array_equal(masks[name], lab == v)
    assert not masks["absent"].any()
    assert rs.label_map().meta["label_names"] == names
    ds = pydicom.dcmread(out)
    for number in (1, 2, 3):
        for item in _contours(ds, number):
            k = _slice_of(_points(item), orientation)
            assert abs(k - round(k)) < 1e-4  # DS text of the orientation and of the points
            assert item.ContourImageSequence[0].ReferencedSOPInstanceUID == sops[round(k)]
            assert item.ContourImageSequence[0].ReferencedSOPClassUID == CT_IMAGE
            assert "ReferencedFrameNumber" not in item.ContourImageSequence[0]


def test_contour_points_in_patient_millimetres(tmp_path):
    _write_series(tmp_path / "ct", "axial")
    ct = read_image(tmp_path / "ct")
    lab = np.zeros(ct.spatial_shape, np.uint8)
    lab[1, 3:7, 2:10] = 1  # rows 3..6, columns 2..9 on slice 1
    ds = pydicom.dcmread(write_rtstruct(lab, ct, tmp_path / "rs.dcm"))
    (item,) = _contours(ds, 1)
    p = _points(item)
    assert item.ContourGeometricType == "CLOSED_PLANAR" and int(item.NumberOfContourPoints) == len(p) == 8
    # x = -10 + col * 1.3 for columns 1.5 .. 9.5; y = 20 + row * 0.7 for rows 2.5 .. 6.5; z = 30 + 2.5
    np.testing.assert_allclose([p[:, 0].min(), p[:, 0].max()], [-8.05, 2.35], atol=1e-9)
    np.testing.assert_allclose([p[:, 1].min(), p[:, 1].max()], [21.75, 24.55], atol=1e-9)
    np.testing.assert_allclose(p[:, 2], 32.5, atol=1e-9)


def test_contour_points_sagittal_by_hand(tmp_path):
    """Rows run along -z (feet), columns along +y (posterior), slices along -x (the patient's right)."""
    _write_series(tmp_path / "ct", "sagittal")
    ct = read_image(tmp_path / "ct")
    lab = np.zeros(ct.spatial_shape, np.uint8)
    lab[2, 4:6, 7:8] = 5  # rows 4..5, column 7 on slice 2
    ds = pydicom.dcmread(write_rtstruct(lab, ct, tmp_path / "rs.dcm"))
    p = _points(_contours(ds, 5)[0])
    np.testing.assert_allclose(p[:, 0], -10.0 - 2 * 2.5, atol=1e-9)
    np.testing.assert_allclose([p[:, 1].min(), p[:, 1].max()], [20 + 6.5 * 1.3, 20 + 7.5 * 1.3], atol=1e-9)
    np.testing.assert_allclose([p[:, 2].min(), p[:, 2].max()], [30 - 5.5 * 0.7, 30 - 3.5 * 0.7], atol=1e-9)


def test_outlines_counter_clockwise_holes_clockwise_about_the_normal(tmp_path):
    _write_series(tmp_path / "ct", "oblique")
    ct = read_image(tmp_path / "ct")
    lab = np.zeros(ct.spatial_shape, np.uint8)
    lab[1, 2:12, 2:12] = 1
    lab[1, 5:8, 5:8] = 0
    ds = pydicom.dcmread(write_rtstruct(lab, ct, tmp_path / "rs.dcm"))
    _, _, n = _geometry("oblique")
    areas = sorted(
        float(np.dot(np.cross(p, np.roll(p, -1, axis=0)).sum(axis=0), n)) / 2
        for p in (_points(item) for item in _contours(ds, 1))
    )
    pixel = ROW_SPACING * COL_SPACING
    assert len(areas) == 2 and areas[0] < 0 < areas[1]
    # four corners cut by an eighth of a pixel each (coordinates are written to 0.1 micrometre)
    assert areas[1] == pytest.approx((100 - 0.5) * pixel, abs=0.01)
    assert areas[0] == pytest.approx(-(9 - 0.5) * pixel, abs=0.01)


def test_header_and_references(tmp_path):
    sops = _write_series(tmp_path / "ct", "axial")
    ct = read_image(tmp_path / "ct")
    lab = _labels()
    out = write_rtstruct(lab, ct, tmp_path / "rs.dcm", {1: "liver"}, series_number=42)
    ds = pydicom.dcmread(out)
    assert ds.SOPClassUID == RTSTRUCT_SOP_CLASS == ds.file_meta.MediaStorageSOPClassUID
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.Modality == "RTSTRUCT" and ds.Manufacturer == "medsam3" and ds.SeriesNumber == 42
    assert ds.SeriesInstanceUID != f"{ROOT}.2" and ds.SOPInstanceUID not in sops
    assert ds.StudyInstanceUID == f"{ROOT}.1" and ds.PatientName == "Test^Phantom" and ds.PatientID == "P-1"
    assert (ds.StudyID, ds.AccessionNumber, ds.SpecificCharacterSet) == ("7", "A-9", "ISO_IR 100")
    assert ds.FrameOfReferenceUID == f"{ROOT}.3"
    (frame,) = ds.ReferencedFrameOfReferenceSequence
    assert frame.FrameOfReferenceUID == f"{ROOT}.3"
    (study,) = frame.RTReferencedStudySequence
    assert study.ReferencedSOPInstanceUID == f"{ROOT}.1"
    (series,) = study.RTReferencedSeriesSequence
    assert series.SeriesInstanceUID == f"{ROOT}.2"
    listed = [i.ReferencedSOPInstanceUID for i in series.ContourImageSequence]
    assert sorted(listed) == sorted(sops) and len(set(listed)) == len(sops)
    rois = {int(r.ROINumber): r for r in ds.StructureSetROISequence}
    assert sorted(rois) == [1, 2, 3] and rois[1].ROIName == "liver" and rois[2].ROIName == "label 2"
    assert all(r.ROIGenerationAlgorithm == "AUTOMATIC" for r in rois.values())
    assert all(r.ReferencedFrameOfReferenceUID == f"{ROOT}.3" for r in rois.values())
    assert {int(o.ReferencedROINumber) for o in ds.RTROIObservationsSequence} == {1, 2, 3}
    colours = {int(r.ReferencedROINumber): tuple(r.ROIDisplayColor) for r in ds.ROIContourSequence}
    assert colours == label_colors([1, 2, 3])
    counts = {n: len(_contours(ds, n)) for n in (1, 2, 3)}
    assert counts == {1: 1 + 3 + 1, 2: 1 + 2, 3: 2 + 1}  # pixels touching at a corner: two rings
    assert read_rtstruct(out, ct).colors == label_colors([1, 2, 3])


def test_empty_named_roi_and_given_colours(tmp_path):
    _write_series(tmp_path / "ct")
    ct = read_image(tmp_path / "ct")
    lab = np.zeros(ct.spatial_shape, np.uint8)
    lab[0, 1, 1] = 2
    out = write_rtstruct(lab, ct, tmp_path / "rs.dcm", {7: "planned"}, colors={2: (1, 2, 3)})
    ds = pydicom.dcmread(out)
    empty = next(r for r in ds.ROIContourSequence if int(r.ReferencedROINumber) == 7)
    assert "ContourSequence" not in empty
    rs = read_rtstruct(out, ct)
    assert rs.names == {2: "label 2", 7: "planned"} and rs.colors[2] == (1, 2, 3)
    assert rs.colors[7] == label_colors([0, 1])[1]  # after the present ROIs' colours
    assert not rs.masks()[7].any()


def test_overlapping_masks(tmp_path):
    _write_series(tmp_path / "ct")
    ct = read_image(tmp_path / "ct")
    a = np.zeros(ct.spatial_shape, bool)
    b = np.zeros(ct.spatial_shape, bool)
    a[1, 2:8, 2:8] = True
    b[1, 5:10, 5:10] = True
    rs = read_rtstruct(write_rtstruct({1: a, 2: b}, ct, tmp_path / "rs.dcm", {1: "A", 2: "B"}), ct)
    assert rs.overlaps() == {(1, 2): 9}
    np.testing.assert_array_equal(rs.masks()[1], a)
    np.testing.assert_array_equal(rs.masks()[2], b)
    with pytest.raises(InputError, match=r"A \(1\) & B \(2\): 9 voxels"):
        rs.label_map()
    assert np.all(rs.label_map("last").array[a & b] == 2)
    assert np.all(rs.label_map("first").array[a & b] == 1)


def test_enhanced_multiframe_references_frames_in_file_order(tmp_path):
    plane_of_frame = _write_enhanced(tmp_path / "enh.dcm")
    ct = read_image(tmp_path / "enh.dcm")
    assert ct.meta["frame_order"] == [3, 2, 1, 0]
    lab = _labels()
    out = write_rtstruct(lab, ct, tmp_path / "rs.dcm")
    np.testing.assert_array_equal(read_rtstruct(out, ct).label_map().array, lab)
    ds = pydicom.dcmread(out)
    _, _, n = _geometry("oblique")
    for item in _contours(ds, 1) + _contours(ds, 3):
        ref = item.ContourImageSequence[0]
        assert ref.ReferencedSOPInstanceUID == f"{ROOT}.20" and ref.ReferencedSOPClassUID == ENHANCED_CT
        along = float(np.dot(_points(item)[0], n))
        assert plane_of_frame[int(ref.ReferencedFrameNumber) - 1] == pytest.approx(along, abs=1e-3)
    listed = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0]
    assert len(listed.RTReferencedSeriesSequence[0].ContourImageSequence) == 1


def test_rtstruct_beside_the_series_is_set_aside(tmp_path):
    _write_series(tmp_path / "ct")
    ct = read_image(tmp_path / "ct")
    write_rtstruct(_labels(), ct, tmp_path / "ct" / "rs.dcm")
    again = read_image(tmp_path / "ct")
    np.testing.assert_array_equal(again.array, ct.array)


# -- errors ------------------------------------------------------------------------------------------------
def test_refuses_non_dicom_and_anonymised_references(tmp_path):
    plain = Image.from_array(np.zeros((2, 4, 4), np.int16))
    assert rtstruct_problem(plain) == "the input is not DICOM"
    with pytest.raises(OutputError, match=r"rs\.dcm: no DICOM RT Structure Set .*not DICOM"):
        write_rtstruct(np.ones((2, 4, 4), np.uint8), plain, tmp_path / "rs.dcm")
    _write_series(tmp_path / "anon", uids=False)
    anon = read_image(tmp_path / "anon")
    with pytest.raises(OutputError, match="lacks StudyInstanceUID, SeriesInstanceUID \\(anonymised"):
        write_rtstruct(_labels(), anon, tmp_path / "rs.dcm")
    _write_series(tmp_path / "nofor", frame=False)
    nofor = read_image(tmp_path / "nofor")
    assert "lacks FrameOfReferenceUID" in (rtstruct_problem(nofor) or "")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["anon", "nofor"]


def test_refuses_bad_labels(tmp_path):
    _write_series(tmp_path / "ct")
    ct = read_image(tmp_path / "ct")
    with pytest.raises(OutputError, match="shape"):
        write_rtstruct(np.zeros((2, 2, 2), np.uint8), ct, tmp_path / "rs.dcm")
    with pytest.raises(OutputError, match="nothing to write"):
        write_rtstruct(np.zeros(ct.spatial_shape, np.uint8), ct, tmp_path / "rs.dcm")
    with pytest.raises(OutputError, match="integers"):
        write_rtstruct(np.zeros(ct.spatial_shape, np.float32), ct, tmp_path / "rs.dcm")
    with pytest.raises(OutputError, match=">= 1"):
        write_rtstruct({0: np.zeros(ct.spatial_shape, bool)}, ct, tmp_path / "rs.dcm")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct"]


def test_refuses_to_overwrite_an_input(tmp_path, clean_protection):
    _write_series(tmp_path / "ct")
    ct = read_image(tmp_path / "ct")
    source = tmp_path / "ct" / "im01.dcm"
    before = source.read_bytes()
    with pytest.raises(OutputError, match="source file of the reference"):
        write_rtstruct(_labels(), ct, source)
    protect_inputs([source])
    with pytest.raises(OutputError, match="refusing to write over an input"):
        write_rtstruct(_labels(), ct, source)
    assert source.read_bytes() == before


def test_read_refuses_another_frame_of_reference(tmp_path):
    _write_series(tmp_path / "ct")
    ct = read_image(tmp_path / "ct")
    out = write_rtstruct(_labels(), ct, tmp_path / "rs.dcm")
    other = ct.with_array(ct.array)
    other.meta["frame_of_reference_uid"] = "1.2.3.4"
    with pytest.raises(InputError, match=r"rs\.dcm: belongs to frame of reference .*\.3, but the reference"):
        read_rtstruct(out, other)
    unknown = ct.with_array(ct.array)
    unknown.meta["frame_of_reference_uid"] = ""
    np.testing.assert_array_equal(read_rtstruct(out, unknown).label_map().array, _labels())


def test_read_refuses_contours_off_the_slices(tmp_path):
    _write_series(tmp_path / "ct")
    ct = read_image(tmp_path / "ct")
    out = write_rtstruct(_labels(), ct, tmp_path / "rs.dcm")

    def moved(name, dz_first, dz_rest):
        """A copy whose first contour of ROI 1 is moved along z (axial: the slice normal), mm."""
        ds = pydicom.dcmread(out)
        item = _contours(ds, 1)[0]
        p = _points(item)
        p[:, 2] += dz_rest
        p[0, 2] += dz_first - dz_rest
        item.ContourData = [f"{v:.4f}" for v in p.ravel()]
        ds.save_as(tmp_path / name)
        return tmp_path / name

    with pytest.raises(
        InputError, match=r"shift\.dcm: contour 1 of ROI 1 .* 1\.000 mm from the nearest slice"
    ):
        read_rtstruct(moved("shift.dcm", 1.0, 1.0), ct)
    with pytest.raises(
        InputError, match=r"bent\.dcm: contour 1 of ROI 1 .*not in a slice plane .* 0\.500 mm"
    ):
        read_rtstruct(moved("bent.dcm", 0.5, 0.0), ct)
    with pytest.raises(InputError, match="outside the reference image's slices 0..3"):
        read_rtstruct(moved("out.dcm", -10 * STEP, -10 * STEP), ct)
    small = moved("small.dcm", 0.05, 0.05)  # within the tolerance (5 % of the 2.5 mm step)
    np.testing.assert_array_equal(read_rtstruct(small, ct).label_map().array, _labels())
    with pytest.raises(InputError, match="not a DICOM RT Structure Set"):
        read_rtstruct(tmp_path / "ct" / "im01.dcm", ct)


# -- real series ---------------------------------------------------------------------------------------------
def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


@pytest.fixture(scope="module")
def totalseg(data_dir, tmp_path_factory):
    """The TotalSegmentator sample series (anonymised: Study / Series UIDs blank) with UIDs put back."""
    folder = tmp_path_factory.mktemp("totalseg") / "ct"
    folder.mkdir()
    for f in sorted((data_dir / "totalsegmentator" / "example_ct_dicom").iterdir()):
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = f"{ROOT}.30", f"{ROOT}.31"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.save_as(folder / f.name)
    return read_image(folder)


def test_totalsegmentator_series_round_trip(data_dir, totalseg, tmp_path):
    ts = data_dir / "totalsegmentator"
    labels = read_label_map(ts / "example_seg_dicom.nii.gz", totalseg).array
    names = {
        int(k): v for k, v in json.loads((ts / "labels_total_and_total_mr.json").read_text())["total"].items()
    }
    chosen = {
        v: names[v] for v in (1, 5, 6, 7, 32, 52, 79, 98, 117)
    }  # spleen .. pancreas .. costal cartilages
    kept = np.where(np.isin(labels, list(chosen)), labels, 0)
    out = write_rtstruct(kept, totalseg, tmp_path / "rs.dcm", chosen)
    rs = read_rtstruct(out, totalseg)
    masks = rs.masks("name")
    dice = {name: _dice(masks[name], kept == v) for v, name in chosen.items()}
    print("Dice per structure:", {k: round(v, 6) for k, v in dice.items()})
    assert min(dice.values()) >= 0.98, dice
    np.testing.assert_array_equal(rs.label_map().array, kept)
    ds = pydicom.dcmread(out, stop_before_pixels=True)
    series = (
        ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    )
    assert sorted(i.ReferencedSOPInstanceUID for i in series.ContourImageSequence) == sorted(
        totalseg.meta["sop_instance_uids"]
    )
    assert ds.FrameOfReferenceUID == totalseg.meta["frame_of_reference_uid"]


def test_dcmqi_series_round_trip(data_dir, tmp_path):
    dcmqi = data_dir / "dcmqi_ct3slice"
    ct = read_image(dcmqi / "ct-3slice")
    labels = read_label_map(dcmqi / "liver_spine_seg.nrrd", ct).array
    out = write_rtstruct(labels, ct, tmp_path / "rs.dcm", {1: "liver", 2: "thoracic spine"})
    rs = read_rtstruct(out, ct)
    np.testing.assert_array_equal(rs.label_map().array, labels)
    assert rs.names == {1: "liver", 2: "thoracic spine"}
    ds = pydicom.dcmread(out)
    assert ds.StudyInstanceUID == ct.meta["study_uid"] and ds.PatientName == "JANCT000"
    for number in (1, 2):
        for item in _contours(ds, number):
            z = float(item.ContourData[2])
            k = round((z - ct.origin[2]) / ct.spacing[2])
            assert item.ContourImageSequence[0].ReferencedSOPInstanceUID == ct.meta["sop_instance_uids"][k]
