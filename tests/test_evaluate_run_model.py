"""``medsam3 evaluate --manifest``: models run on manifest records (tiny random SAM3, real samples)."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from data_fixtures import KVASIR_CASES, hc18_folder, kvasir_folder
from medsam3.cli import main
from medsam3.data.manifest import Record, read_manifest
from medsam3.errors import InputError
from medsam3.evaluate.figures import GalleryCollector
from medsam3.evaluate.rows import CASE_COLUMNS
from medsam3.evaluate.run_model import (
    ModelSpec,
    RunOptions,
    absent_concepts,
    absent_pools,
    box_of,
    evaluation_options,
    interior_point,
    load_record,
    reference_prompt,
    run_models,
    select_records,
)


# -- prompts from the reference, by hand ---------------------------------------------------------------
def test_box_and_point_from_the_reference():
    mask = np.zeros((30, 40), bool)
    mask[2:5, 3:8] = True  # rows 2..4, columns 3..7
    assert box_of(mask) == (3.0, 2.0, 8.0, 5.0)
    block = np.zeros((30, 40), bool)
    block[10:15, 20:27] = True  # 5 x 7: the centre pixel (row 12, column 23) is farthest from the border
    assert interior_point(block) == (23.5, 12.5)
    edge = np.zeros((6, 6), bool)
    edge[0:3, 0:6] = True  # touching the image border, which counts as background
    assert interior_point(edge) == (2.5, 1.5)

    both = mask | block
    p = reference_prompt("box", "polyp", both)
    assert p.text is None and p.boxes == [(3.0, 2.0, 27.0, 15.0)]
    p = reference_prompt("text+box", "polyp", both, geometry="objects")
    assert p.text == "polyp" and p.boxes == [(20.0, 10.0, 27.0, 15.0), (3.0, 2.0, 8.0, 5.0)]  # largest first
    p = reference_prompt("point", "polyp", both, geometry="objects")
    assert p.text is None and p.points == [(23.5, 12.5), (5.5, 3.5)]
    assert reference_prompt("text", "polyp", np.zeros((4, 4), bool)).text == "polyp"
    assert reference_prompt("box", "polyp", np.zeros((4, 4), bool)) is None


def rec(dataset, case, split, group="g", concepts=("a",)):
    return Record(
        dataset,
        case,
        [f"/x/{case}.png"],
        [f"/x/{case}_m.png"],
        dict(enumerate(concepts, 1)),
        split=split,
        group=group,
        shape=[4, 4],
        dims=2,
    )


def test_select_records():
    records = [rec("A", "2", "val"), rec("A", "1", "test"), rec("A", "3", "train"), rec("B", "1", "val")]
    assert [(r.dataset, r.case_id) for r in select_records(records, "eval")] == [
        ("A", "1"),
        ("A", "2"),
        ("B", "1"),
    ]
    assert [r.case_id for r in select_records(records, "val", ["a"])] == ["2"]
    assert len(select_records(records, "all", limit=1)) == 2
    with pytest.raises(InputError, match=r"datasets \['c'\] are not in the manifest"):
        select_records(records, "eval", ["C"])


def test_absent_concepts_come_from_the_group_and_skip_the_dataset():
    records = [
        rec("US1", "1", "val", "ultrasound", ("fetal head",)),
        rec("US2", "1", "val", "ultrasound", ("breast lesion", "fetal head")),
    ]
    pools = absent_pools(records)
    assert "kidney" in pools["ultrasound"]  # from the registry's ultrasound datasets
    named = {"fetal head"}
    a = absent_concepts(records[0], pools, named, 3, seed=0)
    assert len(a) == 3 and "fetal head" not in a and a == sorted(a)
    assert absent_concepts(records[0], pools, named, 3, seed=0) == a  # seeded per case
    assert set(absent_concepts(records[0], pools, named, 100)) == set(pools["ultrasound"]) - named


# -- the command on real samples -----------------------------------------------------------------------
def _build(out: Path, seed: int) -> Path:
    from transformers import Sam3Model

    from medsam3.model.configs import tiny_sam3_config
    from medsam3.model.loading import build_processor, save_sam3

    torch.manual_seed(seed)
    model = Sam3Model(tiny_sam3_config()).eval()
    save_sam3(model, build_processor(model.config), out)
    return out


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("models")
    return _build(root / "tiny-a", 0), _build(root / "tiny-b", 1)


@pytest.fixture(scope="module")
def manifest(data_dir, tmp_path_factory) -> Path:
    """4 HC18 cases (external: test split) + 4 Kvasir-SEG cases (prepared as external)."""
    root = tmp_path_factory.mktemp("data")
    hc = hc18_folder(data_dir, root / "HC18", n=4)
    kv = kvasir_folder(data_dir, root / "Kvasir-SEG", cases=KVASIR_CASES[:4])
    out = root / "manifest.jsonl"
    assert main(["prepare", "--dataset", "HC18", "--root", str(hc), "-o", str(out)]) == 0
    assert (
        main(["prepare", "--dataset", "Kvasir-SEG", "--root", str(kv), "--role", "external", "-o", str(out)])
        == 0
    )
    return out


def test_manifest_two_models_text_prompts(manifest, model_dirs, tmp_path, capsys):
    out = tmp_path / "report"
    argv = [
        "evaluate",
        "--manifest",
        str(manifest),
        "--model",
        str(model_dirs[0]),
        "--model-name",
        "A",
        "--model",
        str(model_dirs[1]),
        "--model-name",
        "B",
        "--prompt-mode",
        "text",
        "--absent",
        "2",
        "--device",
        "cpu",
        "--bootstrap",
        "300",
        "-o",
        str(out),
    ]
    capsys.readouterr()
    assert main(argv) == 0, capsys.readouterr().err
    stdout = capsys.readouterr().out
    with open(out / "cases.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames) == CASE_COLUMNS
        rows = list(reader)
    assert len(rows) == 16  # 8 records x 1 concept x 2 models
    assert {(r["dataset"], r["concept"], r["group"]) for r in rows} == {
        ("HC18", "fetal head", "ultrasound"),
        ("Kvasir-SEG", "polyp", "endoscopy"),
    }
    assert {r["model"] for r in rows} == {"A", "B"} and {r["status"] for r in rows} == {"ok"}
    assert {r["prompt_mode"] for r in rows} == {"text"} and {r["role"] for r in rows} == {"external"}
    assert all(0.0 <= float(r["dice"]) <= 1.0 and r["score"] != "" for r in rows)

    # one case by hand: the segmenter's own output, scored with the Dice formula
    from medsam3.predict.prompts import Prompt
    from medsam3.predict.segmenter import Segmenter

    record = next(r for r in read_manifest(manifest) if r.dataset == "Kvasir-SEG")
    image, semantic = load_record(record)
    seg = Segmenter(str(model_dirs[0]), device="cpu", threshold=0.1, presence_threshold=0.0)
    pred = seg.segment(image, [Prompt("polyp")]).label_map == 1
    ref = semantic == 1
    expected = 2 * np.count_nonzero(pred & ref) / (np.count_nonzero(pred) + np.count_nonzero(ref))
    got = next(r for r in rows if r["case"] == record.case_id and r["model"] == "A")
    assert float(got["dice"]) == pytest.approx(expected, abs=1e-6)

    summary = list(csv.DictReader(open(out / "summary.csv")))
    assert {(s["level"], s["name"]) for s in summary} >= {
        ("dataset", "HC18"),
        ("group", "endoscopy"),
        ("all", "all"),
    }
    for s in summary:
        assert float(s["dice_low"]) <= float(s["dice_mean"]) + 1e-9 <= float(s["dice_high"]) + 2e-9
        assert s["n"] == "4" or s["level"] == "all"
    table = (out / "table.md").read_text()
    assert "| A Dice % | A IoU % | B Dice % | B IoU % |" in table and "| HC18 | 4 |" in table
    assert "Absent-concept test" in stdout
    absent = list(csv.DictReader(open(out / "absent.csv")))
    assert len(absent) == 2 * 8 * 2
    hc_absent = {r["concept"] for r in absent if r["dataset"] == "HC18"}
    assert "fetal head" not in hc_absent
    assert hc_absent <= set(absent_pools(read_manifest(manifest))["ultrasound"])
    # the same absent concepts for both models
    pick = {(r["case"], r["concept"]) for r in absent if r["model"] == "A"}
    assert pick == {(r["case"], r["concept"]) for r in absent if r["model"] == "B"}
    html = (out / "gallery.html").read_text()
    links = re.findall(r'src="([^"]+)"', html)
    assert len(links) == 12 and all((out / link).is_file() for link in links)  # 3 best + 3 worst per model
    config = json.loads((out / "config.json").read_text())
    assert [m["name"] for m in config["models"]] == ["A", "B"]
    assert config["threshold"] == 0.1 and config["presence_threshold"] == 0.0
    assert {"torch", "transformers", "medsam3"} <= set(config["versions"])


def test_manifest_box_prompts_and_unreadable_image(manifest, model_dirs, tmp_path, capsys):
    records = read_manifest(manifest)
    broken = tmp_path / "broken.jsonl"
    lines = manifest.read_text().splitlines()
    doc = json.loads(lines[0])
    doc["image"] = [str(tmp_path / "gone.png")]
    broken.write_text("\n".join([json.dumps(doc)] + lines[1:]) + "\n")
    out = tmp_path / "r"
    code = main(
        [
            "evaluate",
            "--manifest",
            str(broken),
            "--model",
            str(model_dirs[0]),
            "--prompt-mode",
            "box",
            "--limit",
            "2",
            "--device",
            "cpu",
            "--gallery",
            "0",
            "-o",
            str(out),
        ]
    )
    err = capsys.readouterr().err
    assert code == 1 and "1 failed" in err
    rows = list(csv.DictReader(open(out / "cases.csv")))
    assert len(rows) == 4 and {r["prompt_mode"] for r in rows} == {"box"}
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["case"] == records[0].case_id and float(failed[0]["dice"]) == 0.0
    assert "gone.png" in failed[0]["note"]
    assert "No case to show" in (out / "gallery.html").read_text()


def test_point_prompts_use_the_tracker(manifest, tiny_config):
    from transformers import Sam3TrackerConfig, Sam3TrackerModel

    from medsam3.model.loading import LoadedSam3, build_processor
    from medsam3.predict.segmenter import Segmenter

    config = Sam3TrackerConfig(
        vision_config=tiny_config.vision_config.to_dict(),
        prompt_encoder_config={"hidden_size": 128, "image_size": 224, "patch_size": 14},
        mask_decoder_config={
            "hidden_size": 128,
            "mlp_dim": 256,
            "num_attention_heads": 4,
            "iou_head_hidden_dim": 64,
        },
    )
    torch.manual_seed(0)
    tracker = Sam3TrackerModel(config).eval()
    with torch.no_grad():
        tracker.mask_decoder.pred_obj_score_head.proj_out.bias.fill_(6.0)
    from transformers import Sam3Model

    model = Sam3Model(tiny_config).eval()
    loaded = LoadedSam3(model, build_processor(tiny_config), torch.device("cpu"), torch.float32, "tiny")
    seg = Segmenter(loaded, tracker=tracker, threshold=0.0)
    records = select_records(read_manifest(manifest), "eval", ["HC18"], limit=1)
    result = run_models(records, [ModelSpec("points", seg)], RunOptions(prompt_mode="point"))
    (row,) = result.rows
    assert row.status == "ok" and row.prompt_mode == "point" and row.concept == "fetal head"
    assert row.metrics["pred_voxels"] > 0 and row.score is not None


def hippocampus_slab(data_dir: Path, folder: Path, z0: int, z1: int) -> np.ndarray:
    """Axial slices ``z0:z1`` (array axis 0 = ITK z) of hippocampus_001 as ``folder/img.nii.gz`` and
    ``folder/lab.nii.gz``; returns the label array ``(z1 - z0, Y, X)``."""
    src = data_dir / "msd_hippocampus"
    image = sitk.ReadImage(str(src / "images" / "hippocampus_001.nii.gz"))
    label = sitk.ReadImage(str(src / "labels" / "hippocampus_001.nii.gz"))
    sitk.WriteImage(image[:, :, z0:z1], str(folder / "img.nii.gz"))
    sitk.WriteImage(label[:, :, z0:z1], str(folder / "lab.nii.gz"))
    return sitk.GetArrayFromImage(label[:, :, z0:z1])


def test_volume_records_are_scored_in_3d(data_dir, model_dirs, tmp_path):
    arr = hippocampus_slab(data_dir, tmp_path, 4, 8)  # 4 slices around the start of the hippocampus
    present = {v: np.flatnonzero((arr == v).reshape(4, -1).any(axis=1)) for v in (1, 2)}
    record = Record(
        "Hippocampus",
        "h001",
        [str(tmp_path / "img.nii.gz")],
        [str(tmp_path / "lab.nii.gz")],
        {1: "anterior hippocampus", 2: "posterior hippocampus"},
        modality="MR",
        dims=3,
        split="val",
        group="MR",
        shape=list(arr.shape),
        foreground={"anterior hippocampus": [[int(present[1][0]), 4]]},
    )
    gallery = GalleryCollector(1)
    result = run_models(
        [record],
        [ModelSpec("tiny", str(model_dirs[0]))],
        RunOptions(prompt_mode="box", device="cpu"),
        gallery,
    )
    (row,) = result.rows
    assert row.concept == "anterior hippocampus" and row.metrics["distance_unit"] == "mm"
    assert row.metrics["ref_voxels"] == int((arr == 1).sum())
    assert row.metrics["volume_unit"] == "ml"
    # box prompts exist only where the reference is: nothing is predicted on the empty slices
    assert row.slices == {"empty_slices": int(4 - present[1].size), "fp_slices": 0, "fp_pixel_rate": 0.0}
    (item,) = gallery.items()
    assert item.slice_index is not None and item.ref.any()


def test_disjoint_groups_by_hand():
    from medsam3.evaluate.run_model import disjoint_groups

    values = {"anterior": [1], "posterior": [2], "whole": [1, 2], "other": [3], "core": [1, 3]}
    assert disjoint_groups(values, ["anterior", "whole", "posterior", "other"]) == [[0, 2, 3], [1]]
    assert disjoint_groups(values, ["whole", "core", "anterior", "other"]) == [[0, 3], [1], [2]]
    assert disjoint_groups(values, ["anterior", "posterior"]) == [[0, 1]]


def test_region_concepts_are_scored_on_their_own_masks(data_dir, model_dirs, tmp_path):
    """A region and its parts are segmented in separate calls: the region's mask is what it gets alone."""
    from medsam3.evaluate.run_model import build_segmenter
    from medsam3.io.readers import read_image
    from medsam3.predict.prompts import Prompt

    arr = hippocampus_slab(data_dir, tmp_path, 8, 12)
    names = ("anterior hippocampus", "hippocampus", "posterior hippocampus")
    record = Record(
        "Hippocampus",
        "h001",
        [str(tmp_path / "img.nii.gz")],
        [str(tmp_path / "lab.nii.gz")],
        {1: names[0], 2: names[2]},
        modality="MR",
        dims=3,
        split="val",
        group="MR",
        shape=list(arr.shape),
        regions={"hippocampus": [1, 2]},
        foreground={c: [[0, 4]] for c in names},
    )
    options = RunOptions(
        prompt_mode="text", device="cpu", volume_mode="volume", inference=evaluation_options(threshold=0.0)
    )
    result = run_models([record], [ModelSpec("tiny", str(model_dirs[0]))], options, None)
    rows = {r.concept: r for r in result.rows}
    assert sorted(rows) == sorted(names)
    assert rows["hippocampus"].metrics["ref_voxels"] == int((arr > 0).sum())
    # The region's prediction equals a segmentation with its prompt alone (nothing taken by the parts).
    seg = build_segmenter(ModelSpec("tiny", str(model_dirs[0])), options)
    alone = seg.segment(read_image(tmp_path / "img.nii.gz", modality="MR"), [Prompt(text="hippocampus")])
    assert rows["hippocampus"].metrics["pred_voxels"] == int((alone.label_map > 0).sum()) > 0


def test_the_absent_test_on_a_volume_takes_the_scored_path(data_dir, model_dirs, tmp_path):
    """With ``volume_mode="volume"`` an absent concept is segmented as the scored prompts are (the whole
    volume through the segmenter); with ``"slices"`` slice by slice. The two paths differ on this volume."""
    from medsam3.evaluate.run_model import build_segmenter, load_record
    from medsam3.io.readers import read_image
    from medsam3.predict.prompts import Prompt

    arr = hippocampus_slab(data_dir, tmp_path, 8, 12)
    names = {1: "anterior hippocampus", 2: "posterior hippocampus"}
    record = Record(
        "Hippocampus",
        "h001",
        [str(tmp_path / "img.nii.gz")],
        [str(tmp_path / "lab.nii.gz")],
        names,
        modality="MR",
        dims=3,
        split="val",
        group="MR",
        shape=list(arr.shape),
        foreground={c: [[0, 4]] for c in names.values()},
    )
    # Another record of the group only lends its concept to the pool of absent concepts.
    other = Record(
        "Other",
        "o1",
        ["unused.nii.gz"],
        ["unused_lab.nii.gz"],
        {1: "brain tumour"},
        modality="MR",
        dims=3,
        split="val",
        group="MR",
        shape=[1, 1, 1],
    )
    spec = ModelSpec("tiny", str(model_dirs[0]))
    image = read_image(tmp_path / "img.nii.gz", modality="MR")
    got = {}
    for mode in ("volume", "slices"):
        options = RunOptions(
            prompt_mode="text",
            device="cpu",
            volume_mode=mode,
            absent=1,
            inference=evaluation_options(threshold=0.0),
        )
        (row,) = run_models([record], [spec], options, None, all_records=[record, other]).absent
        got[mode] = row
        seg = build_segmenter(spec, options)
        if mode == "volume":
            expect = int((seg.segment(image, [Prompt(text=row.concept)]).label_map > 0).sum())
        else:
            canonical = load_record(record)[0]  # slices of the canonical frame, as the evaluation cuts them
            prompt = [Prompt(text=row.concept)]
            expect = sum(
                int((seg.segment(_slice(canonical, z), prompt).label_map > 0).sum())
                for z in range(canonical.spatial_shape[0])
            )
        assert row.predicted_pixels == expect
    assert got["volume"].concept == got["slices"].concept
    assert got["volume"].predicted_pixels != got["slices"].predicted_pixels


def _slice(volume, z: int):
    from medsam3.evaluate.run_model import _slice_image

    return _slice_image(volume, z)


def test_models_can_be_evaluated_at_another_input_size(model_dirs):
    from medsam3.errors import OptionError
    from medsam3.evaluate.run_model import build_segmenter

    spec = ModelSpec("tiny", str(model_dirs[0]))
    plain = build_segmenter(spec, RunOptions(device="cpu"))
    assert plain.engine.at_size(plain.options.image_size).image_size == 224
    seg = build_segmenter(spec, RunOptions(device="cpu", inference=evaluation_options(image_size=168)))
    assert seg.engine.at_size(seg.options.image_size).image_size == 168
    assert seg.engine.image_size == 224  # the loaded model itself is not changed
    with pytest.raises(OptionError, match="image_size must be at least 1, got 0"):
        evaluation_options(image_size=0)
