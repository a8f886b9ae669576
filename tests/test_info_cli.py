"""``medsam3 info``: values equal to what SimpleITK / nibabel / numpy report for the same files."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from medsam3.cli import main
from medsam3.info import describe, looks_like_labels


def _info_json(capsys, *args) -> dict:
    code = main(["info", *map(str, args), "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads(out.out)


def _sitk_orientation(direction) -> str:
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(list(np.ravel(direction)))


@pytest.mark.parametrize(
    "rel",
    [
        "msd_hippocampus/images/hippocampus_003.nii.gz",
        "totalsegmentator/example_ct_sm.nii.gz",
        "pyradiomics/brain1_image.nrrd",
        "nilearn_mni152/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    ],
)
def test_info_equals_simpleitk(data_dir, capsys, rel):
    path = data_dir / rel
    info = _info_json(capsys, path)
    ref = sitk.ReadImage(str(path))
    arr = sitk.GetArrayFromImage(ref)
    assert info["kind"] == "image"
    assert info["shape"] == list(arr.shape)
    assert info["dtype"] == str(arr.dtype)
    assert info["spacing"] == pytest.approx(ref.GetSpacing(), abs=1e-12)
    assert info["origin"] == pytest.approx(ref.GetOrigin(), abs=1e-12)
    assert np.ravel(info["direction"]) == pytest.approx(ref.GetDirection(), abs=1e-12)
    assert info["orientation"] == _sitk_orientation(ref.GetDirection())
    lo, hi = np.percentile(arr, [0.5, 99.5])
    assert info["intensity"]["min"] == pytest.approx(float(arr.min()))
    assert info["intensity"]["max"] == pytest.approx(float(arr.max()))
    assert info["intensity"]["p0_5"] == pytest.approx(float(lo))
    assert info["intensity"]["p99_5"] == pytest.approx(float(hi))
    if rel.endswith(".nii.gz"):
        assert info["orientation"] == "".join(nib.aff2axcodes(nib.load(str(path)).affine))


def test_info_orientation_codes_by_hand(data_dir, capsys):
    hippo = _info_json(capsys, data_dir / "msd_hippocampus" / "images" / "hippocampus_001.nii.gz")
    assert hippo["orientation"] == "RAS"  # direction diag(-1, -1, 1) in LPS: x -> right, y -> anterior
    brain = _info_json(capsys, data_dir / "pyradiomics" / "brain1_image.nrrd")
    assert brain["orientation"] == "LAS"  # direction diag(1, -1, 1)
    assert hippo["modality"] == "MR" and hippo["modality_source"] == "guessed"


def test_info_label_map_counts_and_volumes(data_dir, capsys):
    path = data_dir / "totalsegmentator" / "example_seg.nii.gz"
    info = _info_json(capsys, path)
    ref = sitk.ReadImage(str(path))
    values, counts = np.unique(sitk.GetArrayFromImage(ref), return_counts=True)
    assert info["kind"] == "label map"
    rows = {r["value"]: r for r in info["labels"]}
    assert sorted(rows) == [int(v) for v in values if v != 0]
    voxel_ml = float(np.prod(ref.GetSpacing())) / 1000.0
    for v, c in zip(values, counts, strict=True):
        if v:
            assert rows[int(v)]["voxels"] == int(c)
            assert rows[int(v)]["volume_ml"] == pytest.approx(c * voxel_ml)


def test_info_hippocampus_labels_by_flag_and_heuristic(data_dir, capsys):
    path = data_dir / "msd_hippocampus" / "labels" / "hippocampus_001.nii.gz"
    info = _info_json(capsys, path, "--labels")
    arr = np.asanyarray(nib.load(str(path)).dataobj)
    assert [r["value"] for r in info["labels"]] == [1, 2]
    assert [r["voxels"] for r in info["labels"]] == [int((arr == 1).sum()), int((arr == 2).sum())]
    assert _info_json(capsys, path)["kind"] == "label map"
    image = data_dir / "msd_hippocampus" / "images" / "hippocampus_001.nii.gz"
    assert _info_json(capsys, image)["kind"] == "image"


def test_info_dicom_series_is_one_image(data_dir, capsys):
    folder = data_dir / "dcmqi_ct3slice" / "ct-3slice"
    info = _info_json(capsys, folder)
    first = pydicom.dcmread(sorted(folder.glob("*.dcm"))[0])
    assert info["format"] == "dicom-folder" and info["kind"] == "image"
    assert info["shape"] == [3, 512, 512]
    assert info["modality"] == "CT" and info["modality_source"] == "DICOM tag"
    assert info["dicom"]["series_uid"] == str(first.SeriesInstanceUID)
    assert info["dicom"]["files"] == 3
    assert info["spacing"][:2] == pytest.approx([float(first.PixelSpacing[1]), float(first.PixelSpacing[0])])
    assert info["orientation"] == "LPS"


def test_info_dicom_seg_with_overlap_free_counts(data_dir, capsys):
    info = _info_json(capsys, data_dir / "dcmqi_ct3slice" / "liver.dcm")
    liver = sitk.GetArrayFromImage(sitk.ReadImage(str(data_dir / "dcmqi_ct3slice" / "liver_seg.nrrd")))
    assert info["kind"] == "segmentation"
    assert info["labels"][0]["name"] == "Liver"
    assert info["labels"][0]["voxels"] == int((liver == 1).sum())
    expected_ml = int((liver == 1).sum()) * 0.810547**2 * 1.0 / 1000
    assert info["labels"][0]["volume_ml"] == pytest.approx(expected_ml, rel=1e-6)
    assert info["overlaps"] == []


def test_info_npz_and_2d(data_dir, capsys):
    path = data_dir / "medsam2_recist_npz" / "CT_Lesion_000002_03_01_035-047.npz"
    raw = np.load(path)
    info = _info_json(capsys, path)
    assert info["shape"] == list(raw["imgs"].shape)
    assert info["spacing"] == pytest.approx(raw["spacing"].tolist())
    assert info["labels"][0]["voxels"] == int(raw["gts"].sum())
    assert info["labels"][0]["volume_ml"] == pytest.approx(raw["gts"].sum() * np.prod(raw["spacing"]) / 1000)
    png = _info_json(capsys, data_dir / "hc18_ultrasound" / "training_set" / "000_HC_Annotation.png")
    assert png["kind"] == "label map" and png["orientation"] is None and not png["spacing_known"]
    assert "area_px" in png["labels"][0]
    tif = _info_json(capsys, data_dir / "stardist_pkg" / "img2d.tif")
    assert tif["modality"] == "MICROSCOPY" and tif["kind"] == "image"


def test_info_table_output(data_dir, capsys):
    assert main(["info", str(data_dir / "dcmqi_ct3slice" / "liver.dcm")]) == 0
    out = capsys.readouterr().out
    assert "kind         segmentation" in out
    assert "Liver" in out and "volume ml" in out
    ct = data_dir / "totalsegmentator" / "example_ct_sm.nii.gz"
    assert main(["info", str(ct), "--modality", "mr"]) == 0
    out = capsys.readouterr().out
    assert "MR (given)" in out and "orientation  RAS" in out


def test_info_series_option_and_multi_series_error(data_dir, tmp_path, capsys):
    for f in sorted((data_dir / "dcmqi_ct3slice" / "ct-3slice").glob("*.dcm")):
        shutil.copy(f, tmp_path / f.name)
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.5"
        ds.SOPInstanceUID = ds.SOPInstanceUID + ".3"
        ds.save_as(tmp_path / f"b_{f.name}")
    assert main(["info", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "holds 2 DICOM series" in err and "1.2.826.0.1.3680043.8.498.5" in err
    info = _info_json(capsys, tmp_path, "--series", "1.2.826.0.1.3680043.8.498.5")
    assert info["dicom"]["series_uid"] == "1.2.826.0.1.3680043.8.498.5"


def test_looks_like_labels_by_hand():
    img = np.random.default_rng(0).integers(0, 200, (20, 20), dtype=np.uint8)
    assert not looks_like_labels(img)
    lab = np.zeros((20, 20), np.uint8)
    lab[5:15, 5:15] = 3
    lab[7:9, 7:9] = 4
    assert looks_like_labels(lab)
    assert looks_like_labels(np.array([[0, 255], [255, 0]], np.uint8))  # binary
    assert not looks_like_labels(lab.astype(np.int16) - 1)  # negative
    assert not looks_like_labels(lab + 0.5)


def test_describe_is_json_serialisable(data_dir):
    json.dumps(describe(data_dir / "kvasir_seg_sample" / "images" / "cju0qoxqj9q6s0835b43399p4.jpg"))
