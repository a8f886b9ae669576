"""``benchmarks/gpu.sh`` (``benchmarks/bench_gpu.py``): arguments, the refusal without CUDA, and the CPU
dry run of every section on the tiny random model.

The GPU numbers themselves come from running the script on a GPU; here it is checked that it parses,
refuses clearly, and runs each section end to end (the volume section's encoder passes are checked
against the search computed by hand from the same presence profile).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_gpu  # noqa: E402


def test_full_run_defaults():
    args = bench_gpu.parse_args([])
    assert (args.device, args.tiny, args.dry_run, args.dtype) == ("cuda", False, False, None)
    assert (args.slices, args.track_slices, args.repeats, args.train_batch) == (300, 100, 10, 4)
    assert args.sections == ("encoder", "prompts", "volume", "track", "train", "clip_train")
    assert args.sections == tuple(bench_gpu.SECTIONS)


def test_dry_run_is_the_tiny_model_on_the_cpu_with_short_runs():
    args = bench_gpu.parse_args(["--dry-run"])
    assert (args.device, args.tiny) == ("cpu", True)
    assert (args.slices, args.track_slices, args.repeats, args.train_batch) == (8, 4, 1, 2)
    args = bench_gpu.parse_args(["--dry-run", "--slices", "5", "--sections", "train,encoder"])
    assert args.slices == 5 and args.sections == ("encoder", "train")  # the sections' own order


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--sections", "encoder,nope"], "unknown section 'nope'; sections: encoder, prompts, volume"),
        (["--slices", "0"], "0 must be at least 1"),
        (["--device", "cpu"], "add --tiny"),
        (["--dry-run", "--device", "cuda:1"], "--dry-run runs on the CPU"),
        (["--dtype", "int8"], "invalid choice: 'int8'"),
    ],
)
def test_bad_arguments_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench_gpu.parse_args(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_without_cuda_it_stops_at_once(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "gpu.md"
    assert bench_gpu.main(["--out", str(out)]) == bench_gpu.NO_GPU
    err = capsys.readouterr().err
    assert "no CUDA GPU is available" in err and "benchmarks/gpu.sh --dry-run" in err
    assert not out.exists()


def test_results_are_named_after_the_gpu():
    path = bench_gpu.results_path("NVIDIA H100 80GB HBM3")
    assert path == REPO / "benchmarks" / "results" / "gpu_NVIDIA_H100_80GB_HBM3.md"


def test_gpu_sh_runs_the_driver():
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu.sh"), "--help"], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr
    assert "--dry-run" in done.stdout and "encoder:" in done.stdout and "train:" in done.stdout


def test_dry_run_runs_every_section(tmp_path):
    from medsam3.predict.volume.search import probe_step, search_profile

    out = tmp_path / "dry.md"
    assert bench_gpu.main(["--dry-run", "--out", str(out)]) == 0
    text = out.read_text()
    for name in bench_gpu.SECTIONS:
        assert f"## {name}: " in text
    assert "tiny SAM3 architecture" in text and "Command: `benchmarks/gpu.sh --dry-run" in text
    rows = re.findall(r"^\| (\d) \| (full|coarse) \| (\d+) \| ([\d.]+) \|", text, re.MULTILINE)
    passes = {(int(n), search): int(p) for n, search, p, _ in rows}
    assert set(passes) == {(1, "full"), (1, "coarse"), (5, "full"), (5, "coarse")}
    assert passes[1, "full"] == passes[5, "full"] == 8
    profile = bench_gpu.organ_profiles(8, 1)[0]
    assert passes[1, "coarse"] == len(search_profile(list(profile), probe_step(1.5, 10.0)))
    assert re.search(r"^\| full \(\d+ checkpointed layers\) \| [\d.]+ M \| [\d.]+ \| [\d.]+ \|", text, re.M)
    assert re.search(r"^\| lora \(\d+ checkpointed layers\) \|", text, re.M)
