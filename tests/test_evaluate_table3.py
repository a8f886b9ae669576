"""Table 3 reproduction end to end: tiny random models on HC18-, CVC-ClinicDB- and FetoPlac-like folders."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from data_fixtures import hc18_folder
from medsam3.cli import main
from medsam3.evaluate.table3 import PAPER_TABLE3, evaluation_records, find_dataset_folders


def _polyp_folder(data_dir: Path, dest: Path, images: str, masks: str, names: list[str]) -> None:
    """Kvasir samples at a quarter size, saved as PNG image / 0-255 mask pairs in another dataset's layout."""
    src = data_dir / "kvasir_seg_sample"
    (dest / images).mkdir(parents=True)
    (dest / masks).mkdir(parents=True)
    for name in names:
        im = PILImage.open(src / "images" / f"{name}.jpg").convert("RGB")
        im = im.resize((im.width // 4, im.height // 4))
        m = np.asarray(PILImage.open(src / "masks" / f"{name}.jpg").convert("L").resize(im.size)) > 127
        im.save(dest / images / f"{name}.png")
        PILImage.fromarray(m.astype(np.uint8) * 255).save(dest / masks / f"{name}.png")


@pytest.fixture(scope="module")
def data_root(data_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("table3") / "data"
    names = sorted(p.stem for p in (data_dir / "kvasir_seg_sample" / "images").glob("*.jpg"))
    hc18_folder(data_dir, root / "HC18", n=3)  # external: every case
    _polyp_folder(data_dir, root / "cvc_clinicdb", "PNG/Original", "PNG/Ground Truth", names[:2])  # external
    _polyp_folder(data_dir, root / "FetoPlac", "images", "masks", names[2:9])  # internal: 7 -> 2 val cases
    (root / "PAPILA").mkdir()  # no reader for this release
    (root / "notes").mkdir()  # not a dataset
    return root


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    from transformers import Sam3Model

    from medsam3.model.configs import tiny_sam3_config
    from medsam3.model.loading import build_processor, save_sam3

    out = []
    for seed, name in ((3, "vanilla"), (4, "medical")):
        torch.manual_seed(seed)
        model = Sam3Model(tiny_sam3_config()).eval()
        out.append(save_sam3(model, build_processor(model.config), tmp_path_factory.mktemp(name) / name))
    return out[0], out[1]


def test_dataset_folders_and_splits(data_root):
    folders = find_dataset_folders(data_root)
    assert sorted(folders) == ["CVC-ClinicDB", "FetoPlac", "HC18", "PAPILA"]
    records, skipped = evaluation_records(data_root)
    counts = {d: sum(r.dataset == d for r in records) for d in ("HC18", "CVC-ClinicDB", "FetoPlac")}
    assert counts == {"HC18": 3, "CVC-ClinicDB": 2, "FetoPlac": 2}  # ceil(7 x 0.15) = 2 val cases
    assert {r.split for r in records if r.dataset == "FetoPlac"} == {"val"}
    assert "no reader" in skipped["PAPILA"] and "no folder" in skipped["TN3K"]
    assert len(skipped) == 17 - 3


def test_table3_end_to_end(data_root, models, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(
        [
            "evaluate",
            "--table3",
            "--data-root",
            str(data_root),
            "--vanilla",
            str(models[0]),
            "--medical",
            str(models[1]),
            "--device",
            "cpu",
            "--bootstrap",
            "200",
            "-o",
            str(out),
        ]
    )
    stdout = capsys.readouterr().out
    assert code == 0 and "3 of 17 datasets run" in stdout
    for name in (
        "table3.md",
        "table3.csv",
        "table.md",
        "table.csv",
        "cases.csv",
        "summary.csv",
        "config.json",
        "manifest.jsonl",
        "gallery.html",
        "dice_by_dataset.png",
    ):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader(open(out / "table3.csv")))
    assert [r["dataset"] for r in rows[:17]] == [p.dataset for p in PAPER_TABLE3]
    assert [r["dataset"] for r in rows[17:]] == ["average (1 of 10)", "average (2 of 7)"]
    by = {r["dataset"]: r for r in rows}
    assert (by["HC18"]["paper_sam3_dice"], by["HC18"]["paper_medsam3_dice"]) == ("23.9", "92.6")
    for name, n in (("HC18", "3"), ("CVC-ClinicDB", "2"), ("FetoPlac", "2")):
        r = by[name]
        assert r["n"] == n and r["ours_sam3_dice"] and r["ours_medsam3_dice"]
        assert float(r["diff_medsam3_dice"]) == pytest.approx(
            float(r["ours_medsam3_dice"]) - float(r["paper_medsam3_dice"]), abs=0.02
        )
    assert by["STARE"]["ours_sam3_dice"] == "" and "no folder" in by["STARE"]["note"]
    # averages of the paper over the datasets run: external = (23.9 + 0.0) / 2, (92.6 + 87.9) / 2
    ext = by["average (2 of 7)"]
    assert (float(ext["paper_sam3_dice"]), float(ext["paper_medsam3_dice"])) == (11.95, 90.25)

    cases = list(csv.DictReader(open(out / "cases.csv")))
    assert len(cases) == 2 * (3 + 2 + 2) and {c["model"] for c in cases} == {"SAM3", "Medical SAM3"}
    assert {c["role"] for c in cases if c["dataset"] == "FetoPlac"} == {"internal"}
    polyp = [c for c in cases if c["dataset"] == "CVC-ClinicDB"]
    assert all(c["note"] == "prompt 'Polyp'" for c in polyp)  # the paper's external prompt
    table = (out / "table.md").read_text()
    assert "| SAM3 Dice % | SAM3 IoU % | Medical SAM3 Dice % | Medical SAM3 IoU % |" in table
    assert table.index("**Internal**") < table.index("FetoPlac") < table.index("**External**")
    config = json.loads((out / "config.json").read_text())
    assert config["prompts"] == {"CVC-ClinicDB:polyp": "Polyp", "HC18:fetal head": "fetal head"}
    assert set(config["skipped_datasets"]) == {p.dataset for p in PAPER_TABLE3} - {
        "HC18",
        "CVC-ClinicDB",
        "FetoPlac",
    }


def test_cli_reports_errors(tmp_path, capsys):
    out = tmp_path / "o"
    code = main(
        [
            "evaluate",
            "--table3",
            "--data-root",
            str(tmp_path / "none"),
            "--vanilla",
            "a",
            "--medical",
            "b",
            "-o",
            str(out),
        ]
    )
    assert code == 2 and "data root folder not found" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    code = main(
        [
            "evaluate",
            "--table3",
            "--data-root",
            str(empty),
            "--vanilla",
            "a",
            "--medical",
            "b",
            "-o",
            str(out),
        ]
    )
    assert code == 2 and "no Table 3 dataset could be prepared" in capsys.readouterr().err
    assert not out.exists()
