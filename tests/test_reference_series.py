"""``--reference-series``: a DICOM SEG and an RTSTRUCT for a NIfTI input that was converted from a DICOM
series, referencing that series; refused (before any work) for a series on another grid."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from medsam3.cli import main
from medsam3.io.dicom_seg import read_seg
from medsam3.io.readers import read_image, read_label_map
from medsam3.io.rtstruct import read_rtstruct
from medsam3.io.writers import write_image

SERIES = "dcmqi_ct3slice/ct-3slice"


@pytest.fixture
def converted(data_dir, tmp_path):
    """The dcmqi CT series and a NIfTI copy of it (as a conversion tool would write it)."""
    series = read_image(data_dir / SERIES)
    nifti = write_image(series, tmp_path / "ct.nii.gz")
    return data_dir / SERIES, series, nifti


def test_seg_and_rtstruct_of_a_nifti_reference_the_series_it_came_from(
    converted, serve_model, tmp_path, capsys
):
    folder, series, nifti = converted
    out = tmp_path / "out"
    code = main(
        [
            "segment",
            str(nifti),
            "-p",
            "liver",
            "-o",
            str(out),
            "--model",
            str(serve_model),
            "--device",
            "cpu",
            "--reference-series",
            str(folder),
            "--output-type",
            "nifti",
            "dicom-seg",
            "rtstruct",
        ]
    )
    assert code == 0, capsys.readouterr().err
    labels = read_label_map(out / "ct_seg.nii.gz", reference=read_image(nifti)).array
    assert labels.any()
    seg = pydicom.dcmread(out / "ct_seg.dcm")
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series.meta["series_uid"]
    assert np.array_equal(read_seg(out / "ct_seg.dcm", reference=series).label_map().array, labels)
    structure = read_rtstruct(out / "ct_rtstruct.dcm", series)
    assert np.array_equal(structure.mask(1), labels == 1)
    rt = pydicom.dcmread(out / "ct_rtstruct.dcm")
    assert (
        rt.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID == series.meta["frame_of_reference_uid"]
    )


def test_a_reference_series_on_another_grid_is_refused_before_any_work(data_dir, tmp_path, capsys):
    import medsam3

    hippocampus = medsam3.__path__[0] + "/assets/samples/hippocampus_019.nii.gz"
    out = tmp_path / "out"
    code = main(
        [
            "segment",
            hippocampus,
            "-p",
            "hippocampus",
            "-o",
            str(out),
            "--device",
            "cpu",
            "--reference-series",
            str(data_dir / SERIES),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "does not match the reference image voxel for voxel" in err, err
    assert not out.exists()


def test_reference_series_must_be_dicom(data_dir, tmp_path, capsys):
    import medsam3

    hippocampus = medsam3.__path__[0] + "/assets/samples/hippocampus_019.nii.gz"
    code = main(
        ["segment", hippocampus, "-p", "x", "-o", str(tmp_path / "o"), "--reference-series", hippocampus]
    )
    assert code == 2
    assert "--reference-series takes a DICOM series" in capsys.readouterr().err
