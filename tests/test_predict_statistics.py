"""Per-label statistics in the input's units: by hand, and in the JSON / CSV of real runs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np

import medsam3
from medsam3.cli import main
from medsam3.image import Image
from medsam3.predict.statistics import label_statistics

SAMPLES = Path(medsam3.__file__).parent / "assets" / "samples"


def test_statistics_by_hand():
    hu = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6) - 100  # (Z, Y, X)
    image = Image.from_array(hu, spacing=(0.5, 0.8, 2.0), modality="CT")  # ITK order x, y, z
    labels = np.zeros(hu.shape, np.uint8)
    labels[1:3, 2:4, 1:4] = 1  # 2 slices x 2 rows x 3 columns, inside
    labels[3, 0, 5] = 2  # one voxel in a corner
    one = label_statistics(labels, 1, image)
    values = hu[1:3, 2:4, 1:4].astype(float)
    assert one["intensity"] == {
        "mean": round(values.mean(), 4),
        "median": round(float(np.median(values)), 4),
        "std": round(values.std(), 4),
        "min": values.min(),
        "max": values.max(),
    }
    assert one["extent"] == [3 * 0.5, 2 * 0.8, 2 * 2.0] and one["extent_unit"] == "mm"
    assert one["touches_border"] is False
    two = label_statistics(labels, 2, image)
    assert two["touches_border"] is True and two["intensity"]["mean"] == hu[3, 0, 5]
    assert label_statistics(labels, 3, image) is None
    picture = Image.from_array(np.zeros((6, 7, 3), np.uint8), color=True, spacing_known=False)
    flat = np.zeros((6, 7), np.uint8)
    flat[2:4, 3:5] = 1
    stats = label_statistics(flat, 1, picture)
    assert stats["intensity"] is None and stats["extent"] == [2.0, 2.0] and stats["extent_unit"] == "px"


def test_statistics_in_the_json_and_the_csv(tmp_path, capsys):
    cases = tmp_path / "cases"
    cases.mkdir()
    source = SAMPLES / "hippocampus_019.nii.gz"
    (cases / "hippo.nii.gz").write_bytes(source.read_bytes())
    out = tmp_path / "out"
    assert main(["segment", str(cases), "-p", "hippocampus", "-o", str(out), "--device", "cpu"]) == 0
    summary = json.loads((out / "hippo.json").read_text())
    entry = summary["labels"][0]
    labels = np.asarray(nib.load(str(out / "hippo_seg.nii.gz")).dataobj)
    values = np.asarray(nib.load(str(source)).dataobj)[labels == 1].astype(float)
    assert entry["statistics"]["intensity"]["mean"] == round(values.mean(), 4)
    assert entry["statistics"]["extent_unit"] == "mm" and len(entry["statistics"]["extent"]) == 3
    with open(out / "summary.csv", newline="") as fh:
        row = next(csv.DictReader(fh))
    assert float(row["hippocampus mean"]) == float(f"{values.mean():.6g}")
