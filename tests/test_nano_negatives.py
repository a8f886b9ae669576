"""scripts/nano_negatives.py: licences checked, held-out images never in the negatives manifest."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from medsam3.data.manifest import Record
from medsam3.data.sampler import SliceSampler

REPO = Path(__file__).resolve().parents[1]
HELDOUT = REPO / "configs" / "nano_ood_heldout.json"


def _script():
    spec = importlib.util.spec_from_file_location("nano_negatives", REPO / "scripts" / "nano_negatives.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


neg = _script()


def test_licences_of_the_pool_allow_a_bundled_model_and_evaluation_only_sources_do_not():
    config = json.loads(HELDOUT.read_text())
    assert config["training_pool"]
    for item in config["training_pool"]:
        assert neg.licence_problem(item["source"], config["licenses"]) is None, item
    for source in ("medsam2_recist_npz", "biomedparse_demo"):
        assert "licence note says" in neg.licence_problem(source, config["licenses"])
    assert "no licence entry" in neg.licence_problem("unknown_source", config["licenses"])
    assert "is none of" in neg.licence_problem("x", {"x": "Kvasir-SEG research/education terms"})


def test_real_pool_is_disjoint_from_the_held_out_items(data_dir):
    config = json.loads(HELDOUT.read_text())
    assert neg.overlap_problems(config, data_dir) == []
    held = {it["path"] for it in config["heldout"]}
    assert not held & {it["path"] for it in config["training_pool"]}


def _png(path: Path, value: int, size: tuple[int, int] = (24, 20)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = (np.arange(size[0] * size[1]).reshape(size) * 7 + value) % 251
    PILImage.fromarray(arr.astype(np.uint8)).save(path)


def _synthetic(tmp_path: Path) -> tuple[Path, dict]:
    data = tmp_path / "data"
    _png(data / "ct" / "heldout.png", 1)
    _png(data / "ct" / "pool.png", 2)
    _png(data / "mr" / "brain.png", 3, (16, 18))
    _png(data / "unseen" / "a.png", 4)
    config = {
        "licenses": {"ok": "Apache-2.0", "bsd": "BSD-3-Clause", "eval": "Apache-2.0 code; evaluation only"},
        "heldout": [{"id": "h", "group": "CT", "source": "ok", "path": "ct/heldout.png", "kind": "2d"}],
        "unseen_sources": {"source": "eval", "folder": "unseen", "pattern": "*.png"},
        "training_pool": [
            {"group": "CT", "source": "ok", "path": "ct/pool.png"},
            {"group": "MR", "source": "bsd", "path": "mr/brain.png", "not_negative_for": ["hippocampus"]},
        ],
    }
    return data, config


def test_overlaps_are_found_by_path_folder_and_bytes(tmp_path):
    data, config = _synthetic(tmp_path)
    assert neg.overlap_problems(config, data) == []
    shutil.copyfile(data / "ct" / "heldout.png", data / "ct" / "renamed_copy.png")
    _png(data / "unseen" / "b.png", 5)
    shutil.copyfile(data / "unseen" / "b.png", data / "mr" / "b_copy.png")
    bad = dict(config)
    bad["training_pool"] = [
        {"group": "CT", "source": "ok", "path": "ct/heldout.png"},  # the held-out image itself
        {"group": "CT", "source": "ok", "path": "ct"},  # a folder holding it
        {"group": "CT", "source": "ok", "path": "ct/renamed_copy.png"},  # a copy under another name
        {"group": "MR", "source": "ok", "path": "mr/b_copy.png"},  # a copy of an unseen-source image
        {"group": "X", "source": "ok", "path": "unseen/a.png"},  # inside the unseen-source folder
    ]
    problems = neg.overlap_problems(bad, data)
    joined = "\n".join(problems)
    assert "ct/heldout.png: is or overlaps the held-out ct/heldout.png" in joined
    assert "ct: is or overlaps the held-out ct/heldout.png" in joined
    assert "ct/renamed_copy.png: renamed_copy.png has the bytes of the held-out" in joined
    assert "mr/b_copy.png: b_copy.png has the bytes of the held-out" in joined
    assert "unseen/a.png: is or overlaps the held-out unseen" in joined


def test_build_refuses_a_held_out_image_or_a_forbidden_licence(tmp_path):
    data, config = _synthetic(tmp_path)
    base = tmp_path / "base.jsonl"
    base.write_text("")
    for pool in (
        [{"group": "CT", "source": "ok", "path": "ct/heldout.png"}],
        [{"group": "CT", "source": "eval", "path": "ct/pool.png"}],
    ):
        heldout = tmp_path / "heldout.json"
        heldout.write_text(json.dumps({**config, "training_pool": pool}))
        with pytest.raises(SystemExit, match="error: "):
            neg.build(data, tmp_path / "work", heldout, base, tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()  # nothing written before the checks pass


def test_build_mixes_negative_only_records_into_the_base_manifest(tmp_path):
    data, config = _synthetic(tmp_path)
    heldout = tmp_path / "heldout.json"
    heldout.write_text(json.dumps(config))
    # a base manifest with one in-domain image (a positive "fetal head")
    _png(data / "us" / "head.png", 9)
    mask = np.zeros((24, 20), np.uint8)
    mask[5:15, 4:12] = 1
    PILImage.fromarray(mask).save(data / "us" / "head_mask.png")
    base_record = Record(
        dataset="HC18",
        case_id="head",
        image=[str(data / "us" / "head.png")],
        label=[str(data / "us" / "head_mask.png")],
        labels={1: "fetal head"},
        modality="US",
        group="US",
        shape=[24, 20],
        foreground={"fetal head": [[0, 1]]},
    )
    base = tmp_path / "manifest_regions.jsonl"
    base.write_text(json.dumps(base_record.to_json()) + "\n")
    out = tmp_path / "manifest_ood.jsonl"
    negatives = neg.build(data, tmp_path / "work", heldout, base, out)

    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0] == base_record.to_json() or base_record.to_json() in rows
    assert sorted(r["dataset"] for r in negatives) == ["Negatives-bsd-brain", "Negatives-ok-pool"]
    images = {p for r in rows for p in r["image"]}
    assert str((data / "ct" / "heldout.png").resolve()) not in images
    assert not any("unseen" in p for p in images)
    by_name = {r["dataset"]: r for r in negatives}
    ct, mr = by_name["Negatives-ok-pool"], by_name["Negatives-bsd-brain"]
    for r in (ct, mr):
        assert r["split"] == "train" and r["group"] == "other-modalities" and r["foreground"] == {}
        label = np.asarray(PILImage.open(r["label"][0]))
        assert label.shape == tuple(r["shape"]) and not label.any()
    assert sorted(set(ct["labels"].values()) | set(ct["regions"])) == [
        "anterior hippocampus",
        "fetal head",
        "hippocampus",
        "polyp",
        "posterior hippocampus",
    ]
    assert sorted(set(mr["labels"].values()) | set(mr["regions"])) == ["fetal head", "polyp"]

    # the sampler draws every item of the negative records as a negative; the in-domain image as before
    records = [Record.from_json(r) for r in rows]
    sampler = SliceSampler(records, "train", seed=0, negative_fraction=0.0, group_temperature=10.0)
    items = [sampler.sample(i) for i in range(300)]
    drawn = {records[s.record].dataset for s in items}
    assert drawn == {"HC18", "Negatives-ok-pool", "Negatives-bsd-brain"}
    for s in items:
        if s.dataset.startswith("Negatives-"):
            assert s.negative
        else:
            assert not s.negative and s.concept == "fetal head"
    mr_concepts = {s.concept for s in items if s.dataset == "Negatives-bsd-brain"}
    assert mr_concepts == {"fetal head", "polyp"}


def test_skipped_concepts_take_their_parts_and_regions_along():
    assert neg.negative_labels(set()) == neg.LABELS
    whole = neg.negative_labels({"hippocampus"})
    assert whole == {"fetal head": 1, "polyp": 2}
    half = neg.negative_labels({"anterior hippocampus"})
    assert half == {"fetal head": 1, "polyp": 2, "posterior hippocampus": 4}
