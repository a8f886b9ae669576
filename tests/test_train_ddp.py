"""Data-parallel training on the CPU: 2 gloo processes (``torchrun`` + ``medsam3 train``) give the
parameters of 1 process with the same global batch.

Data: two MSD hippocampus volumes; slices where a concept is absent are negatives, so micro-batches hold 0, 1
or 2 target objects. Against one batch of 4 the box and mask terms agree only because they are normalised by
the global number of targets of the step (a per-process count moves parameters by ~2e-4 here). SAM3's
sqrt(batch) scaling, its per-batch semantic-head averages and dropout masks (drawn per micro-batch) depend on
how a global batch is cut, so that comparison runs without them; against 2 accumulated micro-batches of 2
the runs agree with all of them (the slow test).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from medsam3.data.indexing import prepare_dataset
from medsam3.data.manifest import write_manifest
from medsam3.train.checkpoint import load_checkpoint
from medsam3.train.config import build_config
from medsam3.train.loop import read_metrics, train

SETTINGS = {
    "model": {"size": {"image_size": 112}, "dropout": 0.0},
    "optim": {"lr_decoder": 1e-3, "lr_vision": 1e-3, "warmup_steps": 1},
    # negatives (no target) and box prompts make the micro-batches differ in their number of targets and in
    # the parameters they use; both must still add up to the single-process gradient
    "data": {"negative_fraction": 0.4, "val_max_items": 0},
    "loss": {
        "overrides": {"scale_by_batch_size": False, "semantic_focal_weight": 0.0, "semantic_dice_weight": 0.0}
    },
    "box_prompt_fraction": 0.5,
    "batch_size": 2,
    "max_steps": 3,
    "export": "none",
    "mixed_precision": "no",
    "progress": False,
    "tensorboard": False,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def manifest(data_dir, tmp_path) -> Path:
    """Two hippocampus volumes in an nnU-Net folder (copied to ``tmp_path``), prepared by the data module."""
    src, root = data_dir / "msd_hippocampus", tmp_path / "Task04_Hippocampus"
    cases = ("hippocampus_001", "hippocampus_003")
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True)
    for case in cases:
        shutil.copy(src / "images" / f"{case}.nii.gz", root / "imagesTr" / f"{case}.nii.gz")
        shutil.copy(src / "labels" / f"{case}.nii.gz", root / "labelsTr" / f"{case}.nii.gz")
    doc = {
        "name": "Hippocampus",
        "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "Anterior", "2": "Posterior"},
        "numTraining": len(cases),
        "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in cases],
    }
    (root / "dataset.json").write_text(json.dumps(doc))
    records, _, _ = prepare_dataset("Task04_Hippocampus", "nnunet", root)
    for r in records:
        r.split = "train"
    return write_manifest(tmp_path / "manifest.jsonl", records)


def launch_two(config: Path, run_dir: Path, cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "-m",
        "medsam3.commands.train",
        str(config),
        f"run_dir={run_dir}",
    ]
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "on 2 process(es)" in proc.stderr


def compare(two_dir: Path, one_dir: Path, initial: dict, label: str) -> None:
    two = load_checkpoint(two_dir / "checkpoints" / "last.pt")
    one = load_checkpoint(one_dir / "checkpoints" / "last.pt")
    assert len(two["rng"]) == 2 and len(one["rng"]) == 1
    assert two["sampler"]["position"] == one["sampler"]["position"] == 3 * 4
    moved = 0
    for key, value in one["model"].items():
        torch.testing.assert_close(two["model"][key], value, rtol=1e-4, atol=2e-6, msg=f"{label}: {key}")
        moved += not torch.equal(value, initial[key])
    assert moved > 100  # trained parameters are compared, not only untouched ones
    loss_one = [(r["step"], r["loss"]) for r in read_metrics(one_dir) if "loss" in r]
    loss_two = [(r["step"], r["loss"]) for r in read_metrics(two_dir) if "loss" in r]
    assert [s for s, _ in loss_one] == [s for s, _ in loss_two] == [1, 2, 3]
    for (_, a), (_, b) in zip(loss_one, loss_two, strict=True):
        assert a == pytest.approx(b, rel=1e-5), label


def test_two_processes_match_one_process_with_the_same_global_batch(manifest, tmp_path):
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump({**SETTINGS, "data": {**SETTINGS["data"], "manifest": str(manifest)}}))
    launch_two(config, tmp_path / "two", tmp_path)
    lines = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(line)["step"] == i + 1 for i, line in enumerate(lines))
    initial = load_initial(config, tmp_path)
    assert train(build_config(config, [f"run_dir={tmp_path / 'batch4'}", "batch_size=4"])).finished
    compare(tmp_path / "two", tmp_path / "batch4", initial, "batch4")


@pytest.mark.slow
def test_accumulation_matches_processes_with_the_whole_loss_and_dropout(manifest, tmp_path):
    settings = {k: v for k, v in SETTINGS.items() if k != "loss"}
    settings["model"] = {"size": {"image_size": 112}}  # the model's own dropout (0.1)
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump({**settings, "data": {**settings["data"], "manifest": str(manifest)}}))
    launch_two(config, tmp_path / "two", tmp_path)
    assert train(build_config(config, [f"run_dir={tmp_path / 'accum2'}", "grad_accum=2"])).finished
    compare(tmp_path / "two", tmp_path / "accum2", load_initial(config, tmp_path), "accum2")


def load_initial(config: Path, tmp_path: Path) -> dict:
    """The parameters every run started from (same seed)."""
    from medsam3.train.loop import build_model

    cfg = build_config(config, [f"run_dir={tmp_path / 'unused'}"])
    return build_model(cfg)[0].state_dict()
