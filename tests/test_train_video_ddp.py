"""Data-parallel clip training on the CPU: 2 gloo processes (``torchrun`` + ``medsam3 train``) give the
parameters of 1 process with the same global batch of clips.

Two MSD hippocampus volumes, clips of 3 slices (every clip has 3 frames, so per-frame averages of the
detector's classification and presence terms agree between one batch of 2 clips and two processes of 1);
negatives and frame-0 box prompts make the processes' clips differ in targets and in the parameters they
use. The detector's box / mask terms are normalised by the global number of target objects and the
tracker's terms by the global number of tracked frames, so the gradients add up to the one-process
gradient. SAM3's sqrt(batch) scaling and the semantic head's per-batch averages depend on the cut of a
batch and are off here, as in the 2D test; dropout is off.

The same holds sharded (FSDP2 through accelerate's launch variables, one unit per transformer layer of the
detector and per memory-attention layer of the tracker, the rest in the root unit): the tracker's own
steps (``_use_mask_as_output``, ``_encode_new_memory``, the object pointer) read parameters of the root
unit, which are gathered for the whole forward of the wrapped training module.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml

from medsam3.train.checkpoint import load_checkpoint
from medsam3.train.config import build_config
from medsam3.train.loop import read_metrics, train

sys.path.insert(0, str(Path(__file__).parent))
from test_train_ddp import launch_two, manifest  # noqa: E402,F401 (the fixture)
from test_train_fsdp import LAYERS, launch_two_fsdp  # noqa: E402

VIDEO_LAYERS = (*LAYERS, "Sam3TrackerVideoMemoryAttentionLayer")

SETTINGS = {
    "model": {"kind": "video", "size": {"image_size": 112}, "dropout": 0.0},
    "clips": {"length": 3, "gt_init_fraction": 0.5},
    "optim": {"lr_decoder": 1e-3, "lr_vision": 1e-3, "lr_tracker": 1e-3, "warmup_steps": 1},
    "data": {"negative_fraction": 0.4, "val_max_items": 0},
    "loss": {
        "overrides": {"scale_by_batch_size": False, "semantic_focal_weight": 0.0, "semantic_dice_weight": 0.0}
    },
    "box_prompt_fraction": 0.5,
    "batch_size": 1,
    "max_steps": 2,
    "export": "none",
    "mixed_precision": "no",
    "progress": False,
    "tensorboard": False,
}


def one_process(config: Path, tmp_path: Path) -> tuple[dict, dict]:
    """The single-process run with the global batch (2 clips) and the initial state of the model."""
    from medsam3.train.loop import build_model

    assert train(build_config(config, [f"run_dir={tmp_path / 'one'}", "batch_size=2"])).finished
    initial = build_model(build_config(config, [f"run_dir={tmp_path / 'unused'}"]))[0].state_dict()
    return load_checkpoint(tmp_path / "one" / "checkpoints" / "last.pt"), initial


def compare_runs(two_dir: Path, one: dict, initial: dict, tmp_path: Path) -> None:
    two = load_checkpoint(two_dir / "checkpoints" / "last.pt")
    assert two["sampler"]["position"] == one["sampler"]["position"] == 2 * 2
    moved = {"tracker": 0, "detector": 0}
    for key, value in one["model"].items():
        torch.testing.assert_close(two["model"][key], value, rtol=1e-4, atol=2e-6, msg=key)
        if not torch.equal(value, initial[key]):
            moved["tracker" if key.startswith("tracker") else "detector"] += 1
    assert moved["tracker"] > 20 and moved["detector"] > 50, moved  # both parts trained and compared
    loss_one = [r["loss"] for r in read_metrics(tmp_path / "one") if "loss" in r]
    loss_two = [r["loss"] for r in read_metrics(two_dir) if "loss" in r]
    assert len(loss_one) == len(loss_two) == 2
    assert loss_one == pytest.approx(loss_two, rel=1e-5)


def write_config(manifest_path: Path, tmp_path: Path) -> Path:
    config = tmp_path / "ddp.yaml"
    data = {**SETTINGS["data"], "manifest": str(manifest_path)}
    config.write_text(yaml.safe_dump({**SETTINGS, "data": data}))
    return config


def test_two_processes_match_one_process_with_the_same_global_batch_of_clips(manifest, tmp_path):  # noqa: F811
    config = write_config(manifest, tmp_path)
    launch_two(config, tmp_path / "two", tmp_path)
    compare_runs(tmp_path / "two", *one_process(config, tmp_path), tmp_path)


def test_two_sharded_processes_match_one_process_with_the_same_global_batch_of_clips(manifest, tmp_path):  # noqa: F811
    config = write_config(manifest, tmp_path)
    launch_two_fsdp(config, tmp_path / "two", tmp_path, layers=VIDEO_LAYERS)
    compare_runs(tmp_path / "two", *one_process(config, tmp_path), tmp_path)
