"""Readers on every format of the real samples, checked against SimpleITK / nibabel / pydicom directly."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from medsam3.image import Image
from medsam3.io.readers import read_image, read_label_map, read_npz_case, read_segments
from medsam3.io.sniff import detect_format


def _sitk_geometry(path):
    im = sitk.ReadImage(str(path))
    d = im.GetDimension()
    return im, sitk.GetArrayFromImage(im), np.array(im.GetDirection()).reshape(d, d)


def _assert_matches_sitk(image: Image, path, atol=1e-9):
    ref, arr, direction = _sitk_geometry(path)
    np.testing.assert_array_equal(image.array, arr)
    assert image.array.dtype == arr.dtype
    np.testing.assert_allclose(image.spacing, ref.GetSpacing(), atol=atol)
    np.testing.assert_allclose(image.origin, ref.GetOrigin(), atol=atol)
    np.testing.assert_allclose(image.direction, direction, atol=atol)


@pytest.fixture(scope="module")
def dcmqi(data_dir):
    return data_dir / "dcmqi_ct3slice"


@pytest.fixture(scope="module")
def dcmqi_ct(dcmqi):
    return read_image(dcmqi / "ct-3slice")


@pytest.fixture(scope="module")
def totalseg_ct(data_dir):
    return read_image(data_dir / "totalsegmentator" / "example_ct_dicom")


# -- volumes ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "rel",
    [
        "msd_hippocampus/images/hippocampus_001.nii.gz",
        "msd_hippocampus/images/hippocampus_003.nii.gz",
        "msd_hippocampus/labels/hippocampus_003.nii.gz",
        "totalsegmentator/example_ct_sm.nii.gz",
        "totalsegmentator/example_mr_sm.nii.gz",
        "totalsegmentator/pulmonary_report/ct_cropped.nii.gz",
        "pyradiomics/brain1_image.nrrd",
        "pyradiomics/breast1_label.nrrd",
        "pyradiomics/prostate_phantom_subvolume.nrrd",
        "dcmqi_ct3slice/liver_spine_seg.nrrd",
    ],
)
def test_volume_readers_equal_simpleitk(data_dir, rel):
    path = data_dir / rel
    image = read_image(path)
    _assert_matches_sitk(image, path)
    assert image.meta["path"] == str(path)
    assert image.meta["format"] == ("nifti" if rel.endswith(".nii.gz") else "nrrd")


def test_nifti_geometry_matches_nibabel_affine(data_dir):
    path = data_dir / "totalsegmentator" / "example_ct_sm.nii.gz"
    image = read_image(path)
    lps_from_ras = np.diag([-1.0, -1.0, 1.0, 1.0])
    np.testing.assert_allclose(image.affine(), lps_from_ras @ nib.load(str(path)).affine, atol=1e-4)
    np.testing.assert_array_equal(image.array, np.asanyarray(nib.load(str(path)).dataobj).T)


def test_modality_guesses_on_real_volumes(data_dir):
    assert read_image(data_dir / "totalsegmentator" / "example_ct_sm.nii.gz").modality == "CT"
    assert read_image(data_dir / "totalsegmentator" / "example_mr_sm.nii.gz").modality == "MR"
    assert read_image(data_dir / "msd_hippocampus" / "images" / "hippocampus_001.nii.gz").modality == "MR"
    forced = read_image(data_dir / "totalsegmentator" / "example_mr_sm.nii.gz", modality="pet")
    assert forced.modality == "PT"


# -- DICOM series ----------------------------------------------------------------------------------------
def test_dicom_series_equals_simpleitk_series_reader(dcmqi, dcmqi_ct):
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(dcmqi / "ct-3slice")))
    ref = reader.Execute()
    np.testing.assert_array_equal(dcmqi_ct.array, sitk.GetArrayFromImage(ref))
    np.testing.assert_allclose(dcmqi_ct.spacing, ref.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(dcmqi_ct.origin, ref.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(dcmqi_ct.direction.ravel(), ref.GetDirection(), atol=1e-6)
    assert dcmqi_ct.modality == "CT"


def test_dicom_series_order_rescale_and_meta(dcmqi, dcmqi_ct):
    datasets = [pydicom.dcmread(p) for p in sorted((dcmqi / "ct-3slice").glob("*.dcm"))]
    z = [float(ds.ImagePositionPatient[2]) for ds in datasets]
    ordered = [datasets[i] for i in np.argsort(z)]  # normal is +z for this axial series
    for k, ds in enumerate(ordered):
        expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(dcmqi_ct.array[k], expected)
    meta = dcmqi_ct.meta
    assert meta["sop_instance_uids"] == [str(ds.SOPInstanceUID) for ds in ordered]
    assert [pydicom.dcmread(f).SOPInstanceUID for f in meta["files"]] == meta["sop_instance_uids"]
    assert meta["series_uid"] == str(datasets[0].SeriesInstanceUID)
    assert meta["study_uid"] == str(datasets[0].StudyInstanceUID)
    assert meta["frame_of_reference_uid"] == str(datasets[0].FrameOfReferenceUID)
    assert meta["dicom"]["Modality"] == "CT"
    assert dcmqi_ct.array.dtype == np.int16
    assert dcmqi_ct.origin[2] == pytest.approx(min(z))


def test_dicom_slice_order_ignores_file_names(dcmqi, dcmqi_ct, tmp_path):
    files = sorted((dcmqi / "ct-3slice").glob("*.dcm"))
    for i, f in enumerate(files):  # reverse the name order
        shutil.copy(f, tmp_path / f"slice_{len(files) - i:02d}")
    image = read_image(tmp_path)
    np.testing.assert_array_equal(image.array, dcmqi_ct.array)
    assert image.same_geometry(dcmqi_ct, atol=1e-9)


def test_totalsegmentator_dicom_agrees_with_its_nifti_segmentation(data_dir, totalseg_ct):
    """The DICOM series and the NIfTI TotalSegmentator wrote for it share one grid (stored flipped in y)."""
    ts = data_dir / "totalsegmentator"
    assert totalseg_ct.array.shape == (20, 512, 512)
    assert totalseg_ct.modality == "CT"
    nii = sitk.DICOMOrient(sitk.ReadImage(str(ts / "example_seg_dicom.nii.gz")), "LPS")
    assert nii.GetSize() == tuple(reversed(totalseg_ct.array.shape))
    np.testing.assert_allclose(totalseg_ct.spacing, nii.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(totalseg_ct.origin, nii.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(totalseg_ct.direction.ravel(), nii.GetDirection(), atol=1e-6)
    labels = read_label_map(ts / "example_seg_dicom.nii.gz", totalseg_ct)
    np.testing.assert_array_equal(labels.array, sitk.GetArrayFromImage(nii))
    names = json.loads((ts / "labels_total_and_total_mr.json").read_text())["total"]
    assert names["5"] == "liver"
    liver_hu = totalseg_ct.array[labels.array == 5].mean()
    assert 40 < liver_hu < 160  # soft tissue: the labels sit on the liver, not on a mirrored region


def test_dicom_single_file_is_a_one_slice_volume(dcmqi, dcmqi_ct):
    path = sorted((dcmqi / "ct-3slice").glob("*.dcm"))[0]
    one = read_image(path)
    assert one.array.shape == (1, 512, 512)
    k = dcmqi_ct.meta["files"].index(str(path))
    np.testing.assert_array_equal(one.array[0], dcmqi_ct.array[k])
    expected = np.array(dcmqi_ct.origin) + k * dcmqi_ct.spacing[2] * dcmqi_ct.direction[:, 2]
    np.testing.assert_allclose(one.origin, expected, atol=1e-6)


def test_dicom_series_uid_chooses_one_of_several(dcmqi, dcmqi_ct, tmp_path):
    for f in sorted((dcmqi / "ct-3slice").glob("*.dcm")):
        shutil.copy(f, tmp_path / f.name)
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.1"
        ds.SOPInstanceUID = ds.SOPInstanceUID + ".9"
        ds.SeriesDescription = "copy"
        ds.save_as(tmp_path / f"copy_{f.name}")
    chosen = read_image(tmp_path, series_uid="1.2.826.0.1.3680043.8.498.1")
    assert chosen.meta["series_uid"] == "1.2.826.0.1.3680043.8.498.1"
    np.testing.assert_array_equal(chosen.array, dcmqi_ct.array)


# -- DICOM SEG and NRRD labels -----------------------------------------------------------------------------
def test_seg_equals_nrrd_labels_on_the_source_grid(dcmqi, dcmqi_ct):
    seg = read_label_map(dcmqi / "liver.dcm", dcmqi_ct)
    nrrd = read_label_map(dcmqi / "liver_seg.nrrd", dcmqi_ct)
    assert seg.meta["label_names"] == {1: "Liver"}
    assert seg.array.dtype == np.uint8
    np.testing.assert_array_equal(seg.array, nrrd.array)
    assert int(seg.array.sum()) == int(
        (sitk.GetArrayFromImage(sitk.ReadImage(str(dcmqi / "liver_seg.nrrd"))) == 1).sum()
    )
    assert seg.same_geometry(dcmqi_ct)


def test_seg_finds_its_source_series_without_reference(dcmqi, dcmqi_ct):
    seg = read_image(dcmqi / "liver.dcm")
    assert seg.meta["grid_source"] == "source series"
    assert seg.meta["is_label"]
    assert seg.same_geometry(dcmqi_ct)
    masks = read_segments(dcmqi / "liver.dcm")
    assert list(masks) == [1]
    np.testing.assert_array_equal(masks[1].array, seg.array)


def test_nrrd_label_files_and_their_overlap(dcmqi, dcmqi_ct):
    liver = read_label_map(dcmqi / "liver_seg.nrrd", dcmqi_ct).array == 1
    spine = read_label_map(dcmqi / "spine_seg.nrrd", dcmqi_ct).array == 2
    heart = read_label_map(dcmqi / "heart_seg.nrrd", dcmqi_ct).array == 3
    both = read_label_map(dcmqi / "liver_spine_seg.nrrd", dcmqi_ct).array
    np.testing.assert_array_equal(both == 1, liver)
    np.testing.assert_array_equal(both == 2, spine)
    assert int((liver & heart).sum()) == 522


# -- npz -------------------------------------------------------------------------------------------------
def test_npz_case_layout_and_spacing_order(data_dir):
    path = data_dir / "medsam2_recist_npz" / "CT_Lesion_000001_02_01_008-023.npz"
    raw = np.load(path)
    image, labels, prompts = read_npz_case(path)
    np.testing.assert_array_equal(image.array, raw["imgs"])
    np.testing.assert_array_equal(labels.array, raw["gts"])
    assert image.array.shape == (16, 512, 512)
    # ITK order: in-plane pixel size first, 5 mm slice step last
    assert image.spacing == pytest.approx(tuple(raw["spacing"]))
    assert image.spacing_array_order == pytest.approx((5.0, raw["spacing"][1], raw["spacing"][0]))
    np.testing.assert_array_equal(image.direction, raw["direction"].reshape(3, 3))
    assert image.modality == "CT"  # BiomedSegFM file-name prefix
    assert prompts == {}
    assert read_label_map(path).array.sum() == raw["gts"].sum()


def test_npz_text_prompts_pickled_dict_and_json(tmp_path):
    img = np.zeros((4, 8, 8), np.uint8)
    img[1:3, 2:6, 2:6] = 200
    gts = (img > 0).astype(np.uint8) * 2
    prompts = {"2": "left kidney", "instance_label": 0}
    np.savez(
        tmp_path / "MR_case.npz",
        imgs=img,
        gts=gts,
        spacing=np.array([0.5, 0.5, 2.0]),
        text_prompts=np.array(prompts, dtype=object),
    )
    image, labels, got = read_npz_case(tmp_path / "MR_case.npz")
    assert got == {2: "left kidney"}
    assert labels.meta["label_names"] == {2: "left kidney"}
    assert image.modality == "MR"
    np.savez(tmp_path / "b.npz", imgs=img, text_prompts=np.array(json.dumps({"1": "liver"})))
    assert read_npz_case(tmp_path / "b.npz")[2] == {1: "liver"}


# -- 2D pictures and TIFF --------------------------------------------------------------------------------
def test_png_grey_and_colour_collapse(data_dir):
    from PIL import Image as PILImage

    hc = data_dir / "hc18_ultrasound" / "training_set"
    grey = read_image(hc / "000_HC.png")
    np.testing.assert_array_equal(grey.array, np.asarray(PILImage.open(hc / "000_HC.png")))
    assert grey.spacing == (1.0, 1.0) and grey.meta["spacing_known"] is False
    assert grey.modality == "OTHER"  # 8-bit grey picture: no reliable modality evidence
    ann = read_label_map(hc / "000_HC_Annotation.png")
    rgb = np.asarray(PILImage.open(hc / "000_HC_Annotation.png"))
    np.testing.assert_array_equal(ann.array, (rgb[..., 0] == 255).astype(np.uint8))
    bp = data_dir / "biomedparse_demo"
    ct = read_image(bp / "demo" / "00_CT_lung.png")
    rgba = np.asarray(PILImage.open(bp / "demo" / "00_CT_lung.png"))
    assert ct.array.shape == rgba.shape[:2] and ct.modality == "CT"
    np.testing.assert_array_equal(ct.array, rgba[..., 0])
    path = bp / "examples" / "Part_1_516_pathology_breast.png"
    colour = read_image(path)
    assert colour.is_color and colour.array.shape[-1] == 4 and colour.modality == "RGB"
    np.testing.assert_array_equal(colour.array, np.asarray(PILImage.open(path)))


def test_jpeg_image_and_mask(data_dir):
    from PIL import Image as PILImage

    kv = data_dir / "kvasir_seg_sample"
    name = "cju0qoxqj9q6s0835b43399p4.jpg"
    image = read_image(kv / "images" / name)
    assert image.is_color and image.modality == "RGB"
    np.testing.assert_array_equal(image.array, np.asarray(PILImage.open(kv / "images" / name)))
    mask = read_label_map(kv / "masks" / name)
    np.testing.assert_array_equal(mask.array, (np.asarray(PILImage.open(kv / "masks" / name)) > 127))
    assert set(np.unique(mask.array)) == {0, 1}


def test_sam_med2d_png(data_dir):
    from PIL import Image as PILImage

    sm = data_dir / "sam_med2d_demo"
    image = read_image(sm / "images" / "amos_0004_75.png")
    assert image.array.shape == (512, 512) and image.meta["collapsed_channels"]
    mask = read_label_map(sm / "masks" / "amos_0004_75_liver_000.png", image)
    raw = np.asarray(PILImage.open(sm / "masks" / "amos_0004_75_liver_000.png"))
    np.testing.assert_array_equal(mask.array, raw // 255)


def test_tiff_16bit_2d_and_stack(data_dir):
    import tifffile

    sd = data_dir / "stardist_pkg"
    img = read_image(sd / "img2d.tif")
    assert img.array.dtype == np.uint16 and img.array.shape == (512, 512) and img.modality == "MICROSCOPY"
    np.testing.assert_array_equal(img.array, tifffile.imread(sd / "img2d.tif"))
    mask = read_label_map(sd / "mask2d.tif", img)
    raw = tifffile.imread(sd / "mask2d.tif")
    np.testing.assert_array_equal(mask.array, raw)
    assert mask.array.dtype == np.uint8  # max 183 fits
    stack = read_image(sd / "img3d.tif")
    assert stack.ndim == 3 and stack.array.shape == (31, 61, 57) and stack.modality == "MICROSCOPY"


def test_detect_format_by_content(data_dir):
    ts = data_dir / "totalsegmentator"
    dcm = sorted((ts / "example_ct_dicom").iterdir())[0]
    assert detect_format(dcm) == "dicom"  # no .dcm extension
    assert detect_format(ts / "example_ct_sm.nii.gz") == "nifti"
    assert detect_format(data_dir / "pyradiomics" / "brain1_image.nrrd") == "nrrd"
    assert detect_format(data_dir / "stardist_pkg" / "img2d.tif") == "tiff"
    assert detect_format(data_dir / "medsam2_recist_npz" / "CT_Lesion_000001_02_01_008-023.npz") == "npz"
    assert detect_format(ts / "example_ct_dicom") == "dicom-folder"


def test_synthetic_bmp_palette_and_16bit_png(tmp_path):
    from PIL import Image as PILImage

    rgb = np.zeros((6, 7, 3), np.uint8)
    rgb[1:4, 2:5] = (200, 30, 10)
    PILImage.fromarray(rgb).save(tmp_path / "a.bmp")
    bmp = read_image(tmp_path / "a.bmp")
    assert bmp.is_color and bmp.meta["format"] == "bmp"
    np.testing.assert_array_equal(bmp.array, rgb)
    idx = np.zeros((6, 7), np.uint8)
    idx[2:4, 1:3] = 2
    pal = PILImage.fromarray(idx, mode="P")
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))
    pal.save(tmp_path / "p.png")
    as_image = read_image(tmp_path / "p.png")
    assert as_image.is_color
    np.testing.assert_array_equal(as_image.array[2, 1], (0, 255, 0))
    np.testing.assert_array_equal(read_label_map(tmp_path / "p.png").array, idx)  # indices are the labels
    deep = np.arange(42, dtype=np.uint16).reshape(6, 7) * 1000
    PILImage.fromarray(deep).save(tmp_path / "d.png")
    png16 = read_image(tmp_path / "d.png")
    assert png16.array.dtype == np.uint16 and png16.modality == "MICROSCOPY"
    np.testing.assert_array_equal(png16.array, deep)


def test_tiff_physical_pixel_size(tmp_path):
    import tifffile

    a = np.arange(3 * 4 * 5, dtype=np.uint16).reshape(3, 4, 5)
    tifffile.imwrite(
        tmp_path / "ij.tif",
        a,
        imagej=True,
        resolution=(1 / 0.5, 1 / 0.25),
        metadata={"spacing": 2.0, "unit": "um", "axes": "ZYX"},
    )
    stack = read_image(tmp_path / "ij.tif")
    assert stack.spacing == pytest.approx((0.5e-3, 0.25e-3, 2e-3))  # µm -> mm, ITK order x, y, z
    assert stack.meta["spacing_known"]
    tifffile.imwrite(tmp_path / "cm.tif", a[0], resolution=(100, 50), resolutionunit="CENTIMETER")
    assert read_image(tmp_path / "cm.tif").spacing == pytest.approx((0.1, 0.2))
    tifffile.imwrite(tmp_path / "dpi.tif", a[0], resolution=(300, 300), resolutionunit="INCH")
    dpi = read_image(tmp_path / "dpi.tif")  # screen DPI is not a pixel size
    assert dpi.spacing == (1.0, 1.0) and not dpi.meta["spacing_known"]
