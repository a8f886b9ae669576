"""Checkpoints: atomic writes, contents, and a run stopped mid-epoch that resumes on the same loss curve."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from medsam3.data.indexing import prepare_dataset
from medsam3.data.manifest import write_manifest
from medsam3.errors import InputError
from medsam3.train.checkpoint import (
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    write_run_checkpoint,
)
from medsam3.train.config import build_config, config_to_dict
from medsam3.train.loop import build_model, read_metrics, train
from medsam3.train.optim import parameter_groups

RUN = {
    "model": {"size": {"image_size": 112}},
    "optim": {"lr_decoder": 1e-3, "lr_vision": 1e-3, "warmup_steps": 2, "cooldown_steps": 2},
    # negatives, box prompts and dropout are all random: they must resume exactly too
    "data": {"negative_fraction": 0.3, "val_split": "train", "val_max_items": 2},
    "box_prompt_fraction": 0.5,
    "max_steps": 5,
    "val_every": 2,
    "export": "none",
    "mixed_precision": "no",
    "progress": False,
    "tensorboard": False,
}


@pytest.fixture(scope="module")
def manifest(data_dir, tmp_path_factory) -> Path:
    opts = {"images": "training_set/*_HC.png", "mask": "{stem}_Annotation.png"}
    records, _, _ = prepare_dataset(
        "HC18",
        "folder2d",
        data_dir / "hc18_ultrasound",
        options=opts,
        labels={1: "fetal head"},
        modality="US",
    )
    records = sorted(records, key=lambda r: r.case_id)[:3]
    for r in records:
        r.split = "train"
    return write_manifest(tmp_path_factory.mktemp("resume") / "manifest.jsonl", records)


def cfg_for(manifest: Path, run_dir: Path, **extra):
    doc = {**RUN, "data": {**RUN["data"], "manifest": str(manifest)}, "run_dir": str(run_dir), **extra}
    return build_config(None, doc)


def losses(run_dir: Path) -> list[tuple]:
    return [(r["step"], r.get("loss"), json.dumps(r.get("val"))) for r in read_metrics(run_dir)]


def test_stopped_run_resumes_on_the_same_losses(manifest, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="medsam3.train.loop")
    whole = train(cfg_for(manifest, tmp_path / "whole"))
    assert whole.finished and whole.step == 5
    first = train(cfg_for(manifest, tmp_path / "split", stop_after=2))  # 3 steps per epoch: mid-epoch
    assert not first.finished and first.step == 2
    assert "resuming from step" not in caplog.text  # fresh runs start at step 0
    # a process killed after logging step 3 but before its checkpoint leaves a line the resume drops
    with open(tmp_path / "split" / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"step": 3, "loss": -1.0}) + "\n")
    second = train(cfg_for(manifest, tmp_path / "split"))
    assert second.finished and second.step == 5
    last = tmp_path / "split" / "checkpoints" / "last.pt"
    assert f"resuming from step 2 (checkpoint {last})" in caplog.text
    assert losses(tmp_path / "split") == losses(tmp_path / "whole")
    assert len([r for r in read_metrics(tmp_path / "whole") if "loss" in r]) == 5
    a = load_checkpoint(tmp_path / "whole" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["sampler"] == b["sampler"] and a["best_step"] == b["best_step"]


def test_checkpoint_contents(manifest, tmp_path):
    cfg = cfg_for(manifest, tmp_path / "run", max_steps=4)
    result = train(cfg)
    folder = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["best.pt", "last.pt"]  # no temporary files left
    last = load_checkpoint(folder / "last.pt")
    assert {
        "model",
        "optimizer",
        "scheduler",
        "scaler",
        "sampler",
        "rng",
        "step",
        "epoch",
        "best_metric",
        "best_step",
        "metrics",
        "config",
        "version",
    } <= set(last)
    assert last["step"] == 4 and last["epoch"] == 1  # 3 steps per epoch
    assert last["sampler"]["position"] == 4  # 4 steps x 1 item x 1 process
    assert last["config"] == config_to_dict(cfg)
    assert len(last["rng"]) == 1 and last["scaler"] is None
    assert last["scheduler"]["last_epoch"] == 4
    names = [g.name for g in parameter_groups(build_model(cfg)[0], cfg.optim)]
    assert [g["name"] for g in last["optimizer"]["param_groups"]] == names
    assert max(int(s["step"]) for s in last["optimizer"]["state"].values()) == 4
    best = load_checkpoint(folder / "best.pt")
    assert best["step"] == result.best_step and best["best_metric"] == result.best_metric
    assert (tmp_path / "run" / "config.yaml").is_file()


def test_resume_refuses_another_configuration(manifest, tmp_path):
    train(cfg_for(manifest, tmp_path / "run", stop_after=1))
    with pytest.raises(InputError, match="optim.lr_decoder"):
        train(cfg_for(manifest, tmp_path / "run", optim={**RUN["optim"], "lr_decoder": 5e-4}))
    with pytest.raises(InputError, match="already holds a training run"):
        train(cfg_for(manifest, tmp_path / "run", resume="never"))
    # run-control settings may change: a longer run continues
    assert train(cfg_for(manifest, tmp_path / "run", max_steps=2, val_every=0)).step == 2


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "c" / "last.pt", {"model": {"w": torch.ones(2)}, "step": 1})
    assert torch.load(path, weights_only=True)["step"] == 1

    def broken(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"model": {}, "step": 2})
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]


def test_numbered_checkpoints_keep_the_newest(tmp_path):
    for step in range(1, 5):
        write_run_checkpoint(tmp_path, {"step": step}, is_best=step == 2, keep_last=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["best.pt", "last.pt", "step_0000003.pt", "step_0000004.pt"]
    assert torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=True)["step"] == 2


def test_rng_state_round_trip():
    state = rng_state()
    a = (random.random(), np.random.random(), torch.rand(3))  # noqa: NPY002 (the global generators)
    set_rng_state(state)
    b = (random.random(), np.random.random(), torch.rand(3))  # noqa: NPY002
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"nonsense")
    with pytest.raises(InputError, match="cannot read the training checkpoint"):
        load_checkpoint(tmp_path / "x.pt")
    with pytest.raises(InputError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_time_limit_stops_with_a_checkpoint_and_the_run_resumes(manifest, tmp_path):
    whole = train(cfg_for(manifest, tmp_path / "whole", max_steps=3))
    # A budget shorter than any step: the first step ends past it, is checkpointed, and the invocation ends.
    first = train(cfg_for(manifest, tmp_path / "split", max_steps=3, stop_after_minutes=1e-6, export="final"))
    assert not first.finished and first.step == 1 and not first.exports
    assert load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")["step"] == 1
    second = train(cfg_for(manifest, tmp_path / "split", max_steps=3, stop_after_minutes=60, export="final"))
    assert second.finished and second.step == 3 and second.exports
    assert losses(tmp_path / "split") == losses(tmp_path / "whole") and whole.finished
    with pytest.raises(InputError, match="stop_after_minutes"):
        cfg_for(manifest, tmp_path / "bad", stop_after_minutes=0)
