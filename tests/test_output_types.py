"""Outputs users choose: ``--output-type`` (one or more label-map formats) and ``--per-prompt`` files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import medsam3
from medsam3.cli import main
from medsam3.io.label_names import read_label_table
from medsam3.io.readers import read_image, read_label_map

HIPPO = Path(medsam3.__file__).parent / "assets" / "samples" / "hippocampus_019.nii.gz"
HC18 = Path(medsam3.__file__).parent / "assets" / "samples" / "hc18_400_HC.png"


def _segment(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_every_output_type_holds_the_same_labels_on_the_input_grid(tmp_path, capsys):
    out = tmp_path / "out"
    code, err = _segment(
        capsys,
        "segment",
        HIPPO,
        "-p",
        "anterior hippocampus",
        "-p",
        "posterior hippocampus",
        "-o",
        out,
        "--device",
        "cpu",
        "--output-type",
        "nrrd",
        "nifti",
        "mha",
        "npz",
        "--per-prompt",
        "--no-overlay",
    )
    assert code == 0, err
    source = read_image(HIPPO)
    summary = json.loads((out / "hippocampus_019.json").read_text())
    assert summary["outputs"] == {
        "labels": "hippocampus_019_seg.nrrd",
        "labels_nifti": "hippocampus_019_seg.nii.gz",
        "labels_mha": "hippocampus_019_seg.mha",
        "labels_npz": "hippocampus_019_seg.npz",
        "prompt_1": "hippocampus_019_anterior_hippocampus.nrrd",
        "prompt_2": "hippocampus_019_posterior_hippocampus.nrrd",
        "label_names": "hippocampus_019_seg.json",
    }
    names = {1: "anterior hippocampus", 2: "posterior hippocampus"}
    table = read_label_table(out / "hippocampus_019_seg.nii.gz")
    assert table.names == names and table.source == "nifti extension" and not table.warnings
    sidecar = json.loads((out / "hippocampus_019_seg.json").read_text())
    assert {e["value"]: e["name"] for e in sidecar["labels"]} == names
    assert {e["value"]: tuple(e["color"]) for e in sidecar["labels"]} == table.colors
    maps = [read_label_map(out / name, source) for name in list(summary["outputs"].values())[:4]]
    for m in maps:
        assert m.same_geometry(source, atol=1e-4)
        np.testing.assert_array_equal(m.array, maps[0].array)
    assert set(np.unique(maps[0].array)) == {0, 1, 2}
    for value in (1, 2):
        part = read_label_map(out / summary["outputs"][f"prompt_{value}"], source)
        np.testing.assert_array_equal(part.array > 0, maps[0].array == value)


def test_output_type_refusals_before_any_work(tmp_path, capsys):
    code, err = _segment(
        capsys, "segment", HIPPO, "-p", "hippocampus", "-o", tmp_path / "a", "--output-type", "dicom-seg"
    )
    assert code == 2 and "a DICOM SEG cannot be written: the input is not DICOM" in err
    code, err = _segment(capsys, "segment", HC18, "-p", "fetal head", "-o", tmp_path / "b", "--per-prompt")
    assert code == 2 and "--per-prompt and --reference-series are for volumes" in err
    code, err = _segment(
        capsys,
        "segment",
        HIPPO,
        "-p",
        "hippocampus",
        "-o",
        tmp_path / "d",
        "--output-type",
        "nifti",
        "rtstruct",
    )
    assert code == 2 and "an RTSTRUCT cannot be written: the input is not DICOM" in err
    code, err = _segment(capsys, "segment", HIPPO, "-p", "x", "-o", tmp_path / "c", "--output-type", "png")
    assert code == 2 and "invalid choice: 'png'" in err
    assert not any((tmp_path / name).exists() for name in "abcd")


def test_dicom_series_with_chosen_outputs(data_dir, tmp_path, capsys, serve_model):
    series = data_dir / "dcmqi_ct3slice" / "ct-3slice"
    out = tmp_path / "out"
    code, err = _segment(
        capsys,
        "segment",
        series,
        "-p",
        "liver",
        "-o",
        out,
        "--model",
        serve_model,
        "--threshold",
        "0",
        "--device",
        "cpu",
        "--output-type",
        "nrrd",
        "dicom-seg",
    )
    assert code == 0, err
    outputs = json.loads((out / "ct-3slice.json").read_text())["outputs"]
    assert outputs["labels"] == "ct-3slice_seg.nrrd" and outputs["dicom_seg"] == "ct-3slice_seg.dcm"
    source = read_image(series)
    labels = read_label_map(out / outputs["labels"], source)
    np.testing.assert_array_equal(read_label_map(out / outputs["dicom_seg"], source).array, labels.array)
