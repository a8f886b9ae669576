"""Data-parallel clip training on the CPU: 2 gloo processes (``torchrun`` + ``medsam3 train``) give the
parameters of 1 process with the same global batch of clips.

Two MSD hippocampus volumes, clips of 3 slices (every clip has 3 frames, so per-frame averages of the
detector's classification and presence terms agree between one batch of 2 clips and two processes of 1);
negatives and frame-0 box prompts make the processes' clips differ in targets and in the parameters they
use. The detector's box / mask terms are normalised by the global number of target objects and the
tracker's terms by the global number of tracked frames, so the gradients add up to the one-process
gradient. SAM3's sqrt(batch) scaling and the semantic head's per-batch averages depend on the cut of a
batch and are off here, as in the 2D test; dropout is off.
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

SETTINGS = {
    "model": {"kind": "video", "meta_text_cls": False, "size": {"image_size": 112}, "dropout": 0.0},
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


def test_two_processes_match_one_process_with_the_same_global_batch_of_clips(manifest, tmp_path):  # noqa: F811
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump({**SETTINGS, "data": {**SETTINGS["data"], "manifest": str(manifest)}}))
    launch_two(config, tmp_path / "two", tmp_path)
    assert train(build_config(config, [f"run_dir={tmp_path / 'one'}", "batch_size=2"])).finished
    two = load_checkpoint(tmp_path / "two" / "checkpoints" / "last.pt")
    one = load_checkpoint(tmp_path / "one" / "checkpoints" / "last.pt")
    assert two["sampler"]["position"] == one["sampler"]["position"] == 2 * 2
    from medsam3.train.loop import build_model

    initial = build_model(build_config(config, [f"run_dir={tmp_path / 'unused'}"]))[0].state_dict()
    moved = {"tracker": 0, "detector": 0}
    for key, value in one["model"].items():
        torch.testing.assert_close(two["model"][key], value, rtol=1e-4, atol=2e-6, msg=key)
        if not torch.equal(value, initial[key]):
            moved["tracker" if key.startswith("tracker") else "detector"] += 1
    assert moved["tracker"] > 20 and moved["detector"] > 50, moved  # both parts trained and compared
    loss_one = [r["loss"] for r in read_metrics(tmp_path / "one") if "loss" in r]
    loss_two = [r["loss"] for r in read_metrics(tmp_path / "two") if "loss" in r]
    assert len(loss_one) == len(loss_two) == 2
    assert loss_one == pytest.approx(loss_two, rel=1e-5)
