"""``medsam3 evaluate --pred --ref`` end to end: real HC18 masks, hand-made volumes, ``segment`` output."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image as PILImage

from medsam3.cli import main
from medsam3.evaluate.rows import CASE_COLUMNS

HC18 = "hc18_ultrasound/training_set"
REPORT_FILES = (
    "cases.csv",
    "summary.csv",
    "table.md",
    "table.csv",
    "config.json",
    "dice_by_dataset.png",
    "dice_by_modality.png",
    "gallery.html",
)


def evaluate(capsys, *argv):
    code = main(["evaluate", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames) == CASE_COLUMNS
        return list(reader)


def annotation(data_dir: Path, case: str) -> np.ndarray:
    m = np.asarray(PILImage.open(data_dir / HC18 / f"{case}_HC_Annotation.png"))
    return (m[..., 0] if m.ndim == 3 else m) > 127


def save_mask(mask: np.ndarray, path: Path) -> None:
    PILImage.fromarray(mask.astype(np.uint8) * 255).save(path)


def dice_by_formula(p: np.ndarray, r: np.ndarray) -> float:
    return 2 * np.count_nonzero(p & r) / (np.count_nonzero(p) + np.count_nonzero(r))


@pytest.fixture()
def hc18_pair(data_dir, tmp_path):
    """References: 3 HC18 annotations + a hand-made square; predictions for all but case 002."""
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir()
    pred.mkdir()
    for case in ("000", "001", "002"):
        shutil.copy(data_dir / HC18 / f"{case}_HC_Annotation.png", ref / f"{case}_HC_Annotation.png")
    save_mask(annotation(data_dir, "000"), pred / "000_HC_pred.png")  # exact
    half = annotation(data_dir, "001")
    half[:, 400:] = False  # the right half of the head removed
    save_mask(half, pred / "001_HC_mask.png")
    square = np.zeros((60, 80), bool)
    square[10:20, 10:20] = True  # 100 pixels
    save_mask(square, ref / "square.png")
    inner = np.zeros_like(square)
    inner[10:20, 10:15] = True  # 50 of them
    save_mask(inner, pred / "square_seg.png")
    return pred, ref


def test_files_end_to_end(hc18_pair, data_dir, tmp_path, capsys):
    pred, ref = hc18_pair
    out = tmp_path / "report"
    code, stdout, err = evaluate(
        capsys,
        "--pred",
        pred,
        "--ref",
        ref,
        "-o",
        out,
        "--images",
        data_dir / HC18,
        "--dataset-name",
        "HC18",
        "--bootstrap",
        500,
    )
    assert code == 1 and "1 reference label(s) without a prediction" in err and "--allow-missing" in err
    for name in REPORT_FILES:
        assert (out / name).is_file(), name
    rows = {r["case"]: r for r in read_rows(out / "cases.csv")}
    assert sorted(rows) == ["000_HC", "001_HC", "002_HC", "square"]
    assert {r["dataset"] for r in rows.values()} == {"HC18"}
    assert rows["square"]["status"] == "ok"
    assert float(rows["square"]["dice"]) == pytest.approx(2 / 3, abs=1e-6)
    assert float(rows["square"]["iou"]) == pytest.approx(0.5)
    assert float(rows["000_HC"]["dice"]) == 1.0 and float(rows["000_HC"]["hd95"]) == 0.0
    ref001 = annotation(data_dir, "001")
    half = ref001.copy()
    half[:, 400:] = False
    assert float(rows["001_HC"]["dice"]) == pytest.approx(dice_by_formula(half, ref001), abs=1e-6)
    assert int(rows["001_HC"]["pred_voxels"]) == np.count_nonzero(half)
    missing = rows["002_HC"]
    assert missing["status"] == "missing" and float(missing["dice"]) == 0.0
    assert float(missing["hd95"]) == pytest.approx(math.hypot(540, 800), abs=1e-3)
    assert missing["distances_worst_case"] == "true" and missing["distance_unit"] == "px"
    # registry dataset name: HC18 is an external dataset of the ultrasound group
    assert missing["role"] == "external" and missing["group"] == "ultrasound"

    summary = list(csv.DictReader(open(out / "summary.csv")))
    overall = next(s for s in summary if s["level"] == "all")
    assert (overall["n"], overall["n_missing"]) == ("4", "1")
    expected = (1.0 + dice_by_formula(half, ref001) + 0.0 + 2 / 3) / 4
    assert float(overall["dice_mean"]) == pytest.approx(expected, abs=1e-5)
    for s in summary:
        for m in ("dice", "iou", "nsd", "hd95", "assd"):
            assert float(s[f"{m}_low"]) <= float(s[f"{m}_mean"]) + 1e-9 <= float(s[f"{m}_high"]) + 2e-9
    assert "| HC18 | 4 |" in stdout and "*External average (1 dataset)*" in stdout
    html = (out / "gallery.html").read_text()
    links = re.findall(r'src="([^"]+)"', html)
    assert links and all((out / link).is_file() for link in links)
    # the ultrasound image is drawn under the contours (a flat background would be nearly uniform)
    shown = next(link for link in links if "000_HC" in link)
    assert np.asarray(PILImage.open(out / shown).convert("L"), float).std() > 25
    config = json.loads((out / "config.json").read_text())
    assert not any("gallery" in w for w in config["warnings"])
    assert config["missing"] == ["002_HC"] and config["counts"]["missing"] == 1
    assert config["arguments"]["resample"] is False

    code, _, err = evaluate(capsys, "--pred", pred, "--ref", ref, "-o", out, "--allow-missing")
    assert code == 0 and "warning: 1 reference label(s)" in err


def test_unreadable_prediction_is_a_failed_case(hc18_pair, tmp_path, capsys):
    pred, ref = hc18_pair
    (pred / "002_HC_mask.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    code, _, err = evaluate(capsys, "--pred", pred, "--ref", ref, "-o", tmp_path / "r")
    assert code == 1 and "0 reference label(s) without a prediction and 1 failed" in err
    rows = {r["case"]: r for r in read_rows(tmp_path / "r" / "cases.csv")}
    assert rows["002_HC"]["status"] == "failed" and float(rows["002_HC"]["dice"]) == 0.0
    assert "002_HC_mask.png" in rows["002_HC"]["note"]


def write_volume(array, path, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=None):
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(direction)
    sitk.WriteImage(img, str(path))


@pytest.fixture()
def volumes(tmp_path):
    """A 3D reference with two named labels and predictions on other grids."""
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    ref_dir.mkdir()
    pred_dir.mkdir()
    ref = np.zeros((4, 8, 8), np.uint8)
    ref[:, 2:6, 4:8] = 1  # "Kidney_L": 64 voxels
    ref[1:3, 0:2, 0:4] = 2  # "liver": 16 voxels
    write_volume(ref, ref_dir / "case1.nii.gz", spacing=(1.0, 1.0, 2.0))
    (ref_dir / "dataset.json").write_text(
        json.dumps({"labels": {"0": "background", "1": "Kidney_L", "2": "liver"}})
    )
    return ref_dir, pred_dir, ref


def test_named_labels_and_exact_rearrangement(volumes, tmp_path, capsys):
    ref_dir, pred_dir, ref = volumes
    pred = np.zeros_like(ref)
    pred[:, 2:6, 4:6] = 4  # left kidney, half of it: 32 voxels
    pred[1:3, 0:2, 0:4] = 3  # liver: the 16 reference voxels ...
    pred[0, 7, 0] = 3  # ... and one on a slice without liver
    pred[0, 0, 0] = 9  # a label the reference does not name
    # stored with the x axis reversed: the same voxels, no interpolation needed
    write_volume(
        np.ascontiguousarray(pred[:, :, ::-1]),
        pred_dir / "case1_seg.nii.gz",
        spacing=(1.0, 1.0, 2.0),
        origin=(7.0, 0.0, 0.0),
        direction=(-1, 0, 0, 0, 1, 0, 0, 0, 1),
    )
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"3": "Liver", "4": "kidney_left", "9": "spleen"}))
    out = tmp_path / "r"
    code, _, err = evaluate(capsys, "--pred", pred_dir, "--ref", ref_dir, "--label-map", names, "-o", out)
    assert code == 0, err
    rows = {r["concept"]: r for r in read_rows(out / "cases.csv")}
    assert sorted(rows) == ["left kidney", "liver"]
    assert float(rows["liver"]["dice"]) == pytest.approx(2 * 16 / 33, abs=1e-6)
    assert float(rows["left kidney"]["dice"]) == pytest.approx(2 * 32 / 96)
    assert rows["left kidney"]["distance_unit"] == "mm" and rows["left kidney"]["volume_unit"] == "ml"
    assert float(rows["left kidney"]["ref_volume"]) == pytest.approx(64 * 2 / 1000)  # 2 mm³ voxels
    assert "prediction rearranged" in rows["liver"]["note"]
    # liver is absent on slices 0 and 3; one of its predicted voxels lies on slice 0 (of 2 x 64 voxels)
    assert rows["liver"]["empty_slices"] == "2" and rows["liver"]["fp_slices"] == "1"
    assert float(rows["liver"]["fp_pixel_rate"]) == pytest.approx(1 / 128, abs=1e-6)
    assert rows["left kidney"]["empty_slices"] == "0"
    config = json.loads((out / "config.json").read_text())
    assert any("['spleen']" in w for w in config["warnings"])
    assert config["alignment"] == {"rearranged": 1}


def test_other_grid_is_an_error_unless_resampled(volumes, tmp_path, capsys):
    ref_dir, pred_dir, ref = volumes
    coarse = ref[:, ::2, ::2].copy()  # 2 mm in-plane voxels whose centres sit between the fine ones
    write_volume(coarse, pred_dir / "case1.nii.gz", spacing=(2.0, 2.0, 2.0), origin=(0.5, 0.5, 0.0))
    out = tmp_path / "r"
    code, _, err = evaluate(capsys, "--pred", pred_dir, "--ref", ref_dir, "-o", out)
    assert code == 2
    assert "case1.nii.gz" in err and str(ref_dir / "case1.nii.gz") in err and "--resample" in err
    assert not out.exists()  # nothing partial
    code, _, err = evaluate(capsys, "--pred", pred_dir, "--ref", ref_dir, "-o", out, "--resample")
    assert code == 0, err
    rows = read_rows(out / "cases.csv")
    assert [float(r["dice"]) for r in rows] == [1.0, 1.0]
    assert all("prediction resampled" in r["note"] for r in rows)


def test_bad_command_lines(hc18_pair, tmp_path, capsys):
    pred, ref = hc18_pair
    code, _, err = evaluate(capsys, "--pred", pred, "--ref", ref, "-o", pred / "report")
    assert code == 2 and "refusing to write over an input" in err
    code, _, err = evaluate(capsys, "--pred", pred, "--ref", ref, "--absent", "2", "-o", tmp_path / "r")
    assert code == 2 and "--absent cannot be used with --pred" in err
    code, _, err = evaluate(capsys, "--pred", pred, "-o", tmp_path / "r")
    assert code == 2 and "--pred needs --ref" in err
    assert not (tmp_path / "r").exists()


# -- predictions written by `medsam3 segment` ----------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    import torch
    from transformers import Sam3Model

    from medsam3.model.configs import tiny_sam3_config
    from medsam3.model.loading import build_processor, save_sam3

    torch.manual_seed(0)
    model = Sam3Model(tiny_sam3_config()).eval()
    with torch.no_grad():  # presence "yes": the best mask is kept at threshold 0.1
        model.detr_decoder.presence_head.layer3.bias.fill_(20.0)
    out = tmp_path_factory.mktemp("tiny") / "model"
    save_sam3(model, build_processor(model.config), out)
    return out


def test_segment_outputs_matched_by_name(data_dir, model_dir, tmp_path, capsys):
    seg, ref = tmp_path / "seg", tmp_path / "ref"
    ref.mkdir()
    for case in ("000", "001"):
        assert (
            main(
                [
                    "segment",
                    str(data_dir / HC18 / f"{case}_HC.png"),
                    "-p",
                    "fetal head",
                    "--model",
                    str(model_dir),
                    "-o",
                    str(seg),
                ]
            )
            == 0
        )
        shutil.copy(data_dir / HC18 / f"{case}_HC_Annotation.png", ref)
    capsys.readouterr()
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"1": "Fetal Head"}))
    code, _, err = evaluate(
        capsys,
        "--pred",
        seg,
        "--ref",
        ref,
        "--ref-labels",
        names,
        "-o",
        tmp_path / "r",
        "--model-name",
        "tiny",
    )
    assert code == 0, err
    rows = read_rows(tmp_path / "r" / "cases.csv")
    assert [(r["case"], r["concept"], r["model"], r["status"], r["note"]) for r in rows] == [
        ("000_HC", "fetal head", "tiny", "ok", ""),
        ("001_HC", "fetal head", "tiny", "ok", ""),
    ]
    for r, case in zip(rows, ("000", "001"), strict=True):
        mask = np.asarray(PILImage.open(seg / f"{case}_HC_mask.png")) == 1
        summary = json.loads((seg / f"{case}_HC.json").read_text())
        assert float(r["dice"]) == pytest.approx(dice_by_formula(mask, annotation(data_dir, case)), abs=1e-6)
        assert float(r["score"]) == pytest.approx(summary["labels"][0]["score"], abs=1e-5)


def test_dicom_seg_prediction_against_nrrd_reference(data_dir, tmp_path, capsys):
    """The real DICOM SEG of the dcmqi sample (segment "Liver") against the liver NRRD it was made from."""
    src = data_dir / "dcmqi_ct3slice"
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    pred.mkdir()
    ref.mkdir()
    shutil.copy(src / "liver.dcm", pred / "liver.dcm")
    shutil.copy(src / "liver_seg.nrrd", ref / "liver_seg.nrrd")
    code, _, err = evaluate(capsys, "--pred", pred, "--ref", ref, "-o", tmp_path / "r", "--gallery", "1")
    assert code == 0, err
    (r,) = read_rows(tmp_path / "r" / "cases.csv")
    nrrd = sitk.ReadImage(str(src / "liver_seg.nrrd"))
    voxels = int((sitk.GetArrayFromImage(nrrd) > 0).sum())
    ml = voxels * float(np.prod(nrrd.GetSpacing())) / 1000
    assert (r["case"], r["concept"], r["status"], float(r["dice"])) == ("liver", "liver", "ok", 1.0)
    assert r["ref_voxels"] == str(voxels) and float(r["ref_volume"]) == pytest.approx(ml, rel=1e-5)
    assert (r["distance_unit"], r["volume_unit"]) == ("mm", "ml")


def test_overlapping_segments_are_scored_one_by_one(tmp_path, capsys):
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    pred.mkdir()
    ref.mkdir()
    layers = np.zeros((3, 20, 20, 2), np.uint8)
    layers[:, 2:10, 2:10, 0] = 1  # "Liver": 3 x 64 voxels
    layers[:, 5:15, 5:15, 1] = 1  # "Kidney_L": 3 x 100 voxels, overlapping the liver
    seg = sitk.GetImageFromArray(layers, isVector=True)
    for i, name in enumerate(("Liver", "Kidney_L")):
        for key, value in (("ID", f"S{i}"), ("Name", name), ("Layer", str(i)), ("LabelValue", "1")):
            seg.SetMetaData(f"Segment{i}_{key}", value)
    sitk.WriteImage(seg, str(pred / "c1.seg.nrrd"))
    labels = np.zeros((3, 20, 20), np.uint8)
    labels[:, 2:10, 2:10] = 2  # liver, exactly the predicted one
    labels[:, 10:15, 5:15] = 1  # left kidney: 3 x 50 voxels, all inside the predicted kidney
    write_volume(labels, ref / "c1.nii.gz")
    (ref / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "left kidney": 1, "liver": 2}}))
    code, _, err = evaluate(capsys, "--pred", pred, "--ref", ref, "-o", tmp_path / "r")
    assert code == 0, err
    rows = {r["concept"]: r for r in read_rows(tmp_path / "r" / "cases.csv")}
    assert float(rows["liver"]["dice"]) == 1.0
    assert float(rows["left kidney"]["dice"]) == pytest.approx(2 * 150 / (300 + 150))
