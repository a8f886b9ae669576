"""Sharded training (FSDP2) on the CPU: 2 gloo processes (``torchrun`` + ``medsam3 train`` with accelerate's
FSDP launch variables) give the parameters of 1 process with the same global batch, through a checkpoint
written and resumed under FSDP, and the exported model loads with :func:`medsam3.model.loading.load_sam3`.

The data, settings and comparison are those of ``test_train_ddp.py``: the only difference is that the model
and the optimizer state are sharded over the processes (``fully_shard`` on every transformer layer and on
the whole model), so the checkpoint and the export gather the full state dicts and the resume scatters
them back.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from medsam3.model.loading import load_sam3
from medsam3.train.checkpoint import load_checkpoint
from medsam3.train.config import build_config
from medsam3.train.loop import read_metrics, train
from test_train_ddp import SETTINGS, compare, free_port, load_initial, manifest  # noqa: F401 (fixture)

# what ``accelerate launch`` sets for an FSDP config (``fsdp_version: 2``, one unit per transformer layer;
# size-based wrapping cannot work: it picks ``ModuleList`` containers, which ``fully_shard`` rejects)
LAYERS = (
    "Sam3ViTLayer",
    "CLIPEncoderLayer",
    "Sam3GeometryEncoderLayer",
    "Sam3DetrEncoderLayer",
    "Sam3DetrDecoderLayer",
)
FSDP_ENV = {
    "ACCELERATE_USE_FSDP": "true",
    "FSDP_VERSION": "2",
    "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
    "FSDP_TRANSFORMER_CLS_TO_WRAP": ",".join(LAYERS),
    "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT",
    "FSDP_RESHARD_AFTER_FORWARD": "true",
}


def launch_two_fsdp(
    config: Path, run_dir: Path, cwd: Path, *overrides: str, layers: tuple[str, ...] = LAYERS
) -> str:
    """``medsam3 train`` on 2 gloo processes under FSDP2, one unit per module of the ``layers`` classes."""
    env = {**os.environ, **FSDP_ENV, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env["FSDP_TRANSFORMER_CLS_TO_WRAP"] = ",".join(layers)
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
        *overrides,
    ]
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "on 2 process(es)" in proc.stderr
    # the engine ran sharded, not data-parallel
    assert "FSDP: checkpoints gather the full model" in proc.stderr, proc.stderr[-3000:]
    return proc.stderr


def test_sharded_run_resumed_midway_matches_one_process_and_exports(manifest, tmp_path):  # noqa: F811
    settings = {**SETTINGS, "export": "final", "data": {**SETTINGS["data"], "manifest": str(manifest)}}
    config = tmp_path / "fsdp.yaml"
    config.write_text(yaml.safe_dump(settings))
    two = tmp_path / "two"

    # steps 1-2 sharded, checkpoint (gathered model + optimizer state), then step 3 resumed from it
    launch_two_fsdp(config, two, tmp_path, "stop_after=2")
    first = load_checkpoint(two / "checkpoints" / "last.pt")
    assert first["step"] == 2 and first["sampler"]["position"] == 2 * 4
    assert len(first["optimizer"]["state"]) > 100  # full (gathered) Adam state of every trained tensor
    assert not (two / "export").exists()
    launch_two_fsdp(config, two, tmp_path, "resume=auto")
    assert [r["step"] for r in read_metrics(two) if "loss" in r] == [1, 2, 3]

    initial = load_initial(config, tmp_path)
    assert train(build_config(config, [f"run_dir={tmp_path / 'batch4'}", "batch_size=4"])).finished
    compare(two, tmp_path / "batch4", initial, "fsdp resumed vs batch4")

    # the Adam state went through the gather, the resume and the scatter: the same parameters hold state
    # (none for the parameters that the forward never uses), with the same step counts and moments
    last = load_checkpoint(two / "checkpoints" / "last.pt")
    compare_optimizer(
        last["optimizer"], load_checkpoint(tmp_path / "batch4" / "checkpoints" / "last.pt")["optimizer"]
    )

    # the exported model is the final sharded state, gathered, and loads like any model folder
    loaded = load_sam3(two / "export" / "final", device="cpu")
    exported = loaded.model.state_dict()
    for key, value in last["model"].items():
        assert torch.equal(exported[key].float(), value.float()), key


def compare_optimizer(sharded: dict, single: dict) -> None:
    """The gathered optimizer state (keys: parameter names) against ``optimizer.state_dict()`` (indices)."""
    assert len(sharded["param_groups"]) == len(single["param_groups"])
    with_state = 0
    for group_fsdp, group in zip(sharded["param_groups"], single["param_groups"], strict=True):
        assert group_fsdp["lr"] == group["lr"] and group_fsdp["weight_decay"] == group["weight_decay"]
        for name, index in zip(group_fsdp["params"], group["params"], strict=True):
            assert (name in sharded["state"]) == (index in single["state"]), name
            if index not in single["state"]:
                continue
            with_state += 1
            mine, ref = sharded["state"][name], single["state"][index]
            assert float(mine["step"]) == float(ref["step"]), name
            torch.testing.assert_close(mine["exp_avg"], ref["exp_avg"], rtol=1e-3, atol=1e-7, msg=name)
            torch.testing.assert_close(mine["exp_avg_sq"], ref["exp_avg_sq"], rtol=1e-3, atol=1e-10, msg=name)
    assert with_state > 100
