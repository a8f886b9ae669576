"""End to end on what the package ships: the two bundled samples and the bundled default model, by the CLI.

Needs no ``../shared/data``, so this tier runs on every checkout. ``test_nano_model.py`` checks the model
through the Python API (default resolution, weights, absent concepts, mirroring); here the command line is
checked as users run it: ``medsam3 info`` and ``medsam3 preview`` with the reference labels, ``medsam3
segment`` writing a mask, an overlay and a JSON summary on the input's grid, and ``medsam3 evaluate --pred
--ref`` scoring those files. Dice values are computed here from the files themselves (PIL / nibabel), not
with medsam3's readers; the floors sit below the values measured on the samples (MODEL_CARD.md).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image as PILImage

import medsam3
from medsam3.cli import main

SAMPLES = Path(medsam3.__file__).resolve().parent / "assets" / "samples"

#: Per sample: the segment command's arguments, its outputs and the Dice floor against the reference.
CASES = {
    "fetal_head": {
        "image": "hc18_400_HC.png",
        "reference": "hc18_400_HC_mask.png",
        "names": "hc18_400_HC_mask.json",
        "modality": "US",
        "prompt": "fetal head",
        "mask": "hc18_400_HC_mask.png",
        "summary": "hc18_400_HC.json",
        "pictures": ["hc18_400_HC_overlay.png"],
        "floor": 0.80,  # measured 0.91
    },
    "hippocampus": {
        "image": "hippocampus_019.nii.gz",
        "reference": "hippocampus_019_labels.nii.gz",
        "names": "hippocampus_019_labels.json",
        "modality": "MR",
        "prompt": "hippocampus",  # the whole hippocampus: reference labels 1 (anterior) and 2 (posterior)
        "mask": "hippocampus_019_seg.nii.gz",
        "summary": "hippocampus_019.json",
        "pictures": ["hippocampus_019_overlay.png", "hippocampus_019_montage.png"],
        "floor": 0.75,  # measured 0.86
    },
}


def run_cli(args: list[str]) -> str:
    """``medsam3 ARGS`` in this process; its standard output (the exit status must be 0)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main([str(a) for a in args])
    assert status == 0, f"medsam3 {' '.join(map(str, args))} exited {status}:\n{out.getvalue()}"
    return out.getvalue()


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def reference_mask(name: str) -> np.ndarray:
    """The sample's target as a boolean array in its file's own layout (PNG rows x columns, NIfTI x, y, z)."""
    path = SAMPLES / CASES[name]["reference"]
    if name == "fetal_head":
        ref = np.asarray(PILImage.open(path))
        return (ref[..., 0] if ref.ndim == 3 else ref) > 127
    return np.asarray(nib.load(path).dataobj) > 0


def predicted_mask(name: str, folder: Path) -> np.ndarray:
    """The prompt's mask in the segment output, by the label value its JSON summary gives the prompt."""
    case = CASES[name]
    summary = json.loads((folder / case["summary"]).read_text(encoding="utf-8"))
    (entry,) = [e for e in summary["labels"] if e["name"] == case["prompt"]]
    assert not entry["absent"]
    path = folder / case["mask"]
    array = np.asarray(PILImage.open(path)) if name == "fetal_head" else np.asarray(nib.load(path).dataobj)
    return array == entry["value"]


@pytest.fixture(scope="module")
def segmented(tmp_path_factory) -> dict[str, Path]:
    """``medsam3 segment`` on both samples with the default model (no --model, MEDSAM3_MODEL or config)."""
    root = tmp_path_factory.mktemp("segment")
    config = root / "config.toml"
    config.write_text("# no model configured\n", encoding="utf-8")
    folders = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MEDSAM3_MODEL", raising=False)
        mp.setenv("MEDSAM3_CONFIG", str(config))
        for name, case in CASES.items():
            folders[name] = root / name
            printed = run_cli(
                [
                    "segment",
                    SAMPLES / case["image"],
                    "-p",
                    case["prompt"],
                    "--modality",
                    case["modality"],
                    "-o",
                    folders[name],
                ]
            )
            assert "medsam3-nano" in printed  # the bundled model did the work
    return folders


def test_info_on_both_samples_and_their_reference_labels():
    fetal = json.loads(run_cli(["info", "--json", SAMPLES / "hc18_400_HC.png"]))
    assert (fetal["kind"], fetal["shape"], fetal["channels"]) == ("image", [540, 800], 1)

    hippo_nifti = nib.load(SAMPLES / "hippocampus_019.nii.gz")
    hippo = json.loads(run_cli(["info", "--json", SAMPLES / "hippocampus_019.nii.gz"]))
    assert (hippo["kind"], hippo["format"], hippo["modality"]) == ("image", "nifti", "MR")
    assert hippo["shape"] == list(hippo_nifti.shape[::-1])  # array order z, y, x
    assert hippo["spacing"] == pytest.approx([1.0, 1.0, 1.0]) and hippo["spacing_known"]

    labels = json.loads(run_cli(["info", "--json", "--labels", SAMPLES / "hippocampus_019_labels.nii.gz"]))
    reference = np.asarray(nib.load(SAMPLES / "hippocampus_019_labels.nii.gz").dataobj)
    assert labels["kind"] == "label map" and labels["shape"] == hippo["shape"]
    assert {e["value"]: e["voxels"] for e in labels["labels"]} == {
        1: int((reference == 1).sum()),
        2: int((reference == 2).sum()),
    }

    table = run_cli(["info", SAMPLES / "hc18_400_HC.png", "--modality", "US"])  # the table form
    assert "US" in table


@pytest.mark.parametrize("name", list(CASES))
def test_preview_with_the_reference_labels(name, tmp_path):
    case = CASES[name]
    out = tmp_path / "preview"
    run_cli(
        [
            "preview",
            SAMPLES / case["image"],
            "--modality",
            case["modality"],
            "--labels",
            SAMPLES / case["reference"],
            "--label-names",
            SAMPLES / case["names"],
            "-o",
            out,
        ]
    )
    report = json.loads((out / "preview.json").read_text(encoding="utf-8"))
    names = json.loads((SAMPLES / case["names"]).read_text(encoding="utf-8"))
    assert report["labels"]["present"] == names
    overlays = ["overlay.png"] if name == "fetal_head" else ["overlay_planes.png", "overlay_montage.png"]
    assert set(overlays) <= set(report["files"])
    for file in report["files"]:
        with PILImage.open(out / file) as picture:
            assert picture.format == "PNG" and min(picture.size) > 0


@pytest.mark.parametrize("name", list(CASES))
def test_segment_writes_mask_overlay_and_json_on_the_input_grid(name, segmented):
    case, folder = CASES[name], segmented[name]
    for file in (case["mask"], case["summary"], *case["pictures"]):
        assert (folder / file).is_file(), file
    for picture in case["pictures"]:
        with PILImage.open(folder / picture) as overlay:
            assert overlay.format == "PNG"
    summary = json.loads((folder / case["summary"]).read_text(encoding="utf-8"))
    assert [(e["name"], e["value"], e["absent"]) for e in summary["labels"]] == [(case["prompt"], 1, False)]

    if name == "fetal_head":
        with PILImage.open(SAMPLES / case["image"]) as image, PILImage.open(folder / case["mask"]) as mask:
            assert mask.size == image.size and mask.mode == "L"
    else:
        image, mask = nib.load(SAMPLES / case["image"]), nib.load(folder / case["mask"])
        assert mask.shape == image.shape
        np.testing.assert_allclose(mask.affine, image.affine, atol=1e-5)
    assert predicted_mask(name, folder).shape == reference_mask(name).shape


@pytest.mark.parametrize("name", list(CASES))
def test_segment_dice_against_the_bundled_reference(name, segmented):
    assert dice(predicted_mask(name, segmented[name]), reference_mask(name)) >= CASES[name]["floor"]


@pytest.mark.parametrize("name", list(CASES))
def test_evaluate_files_form_reports_the_dice_of_the_files(name, segmented, tmp_path):
    """``medsam3 evaluate --pred --ref`` on the segment output; the whole hippocampus is scored against
    the union of the reference's labels 1 and 2, written as a one-label reference on the same grid."""
    case, folder = CASES[name], segmented[name]
    refs = tmp_path / "reference"
    refs.mkdir()
    if name == "fetal_head":
        shutil.copy(SAMPLES / case["reference"], refs / case["reference"])
        ref_names = SAMPLES / case["names"]
    else:
        source = nib.load(SAMPLES / case["reference"])
        whole = reference_mask(name).astype(np.uint8)
        nib.save(nib.Nifti1Image(whole, source.affine, source.header), refs / "hippocampus_019.nii.gz")
        ref_names = tmp_path / "names.json"
        ref_names.write_text(json.dumps({"1": case["prompt"]}), encoding="utf-8")

    report = tmp_path / "report"
    run_cli(
        [
            "evaluate",
            "--pred",
            folder,
            "--ref",
            refs,
            "--ref-labels",
            ref_names,
            "-o",
            report,
            "--bootstrap",
            "20",
            "--gallery",
            "0",
        ]
    )
    with open(report / "cases.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [(r["concept"], r["status"]) for r in rows] == [(case["prompt"], "ok")]
    expected = dice(predicted_mask(name, folder), reference_mask(name))
    assert float(rows[0]["dice"]) == pytest.approx(expected, abs=1e-5)
