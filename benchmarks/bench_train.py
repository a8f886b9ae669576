"""Benchmark: training throughput (images / second) and peak memory (RSS) on the CPU, tiny configuration.

Runs ``medsam3.train.loop.train`` with ``configs/tiny_cpu.yaml`` (tiny random SAM3, 224 px, 6.6 M
parameters) on real HC18 ultrasound images (a manifest built by the data module in a temporary folder).
Each variant runs in its own fresh subprocess, so that its peak resident memory (``ru_maxrss``) is its
own: ``--warmup`` steps, then ``--steps`` timed steps. Throughput counts training images (items) per
second between the end of the warm-up and the last step, from the per-step ``time`` of ``metrics.jsonl``:
data loading (PNG decode, intensity, resize), forward, SAM3 loss, backward, clipping and AdamW are all
inside. No validation, checkpoints only at the end (outside the timed span).

Variants: ``full`` with batch 1 and 4, ``full`` + activation checkpointing, ``decoder`` (encoders frozen)
and ``lora`` (rank 16), batch 4.

Usage::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_train.py [--steps 12] [--warmup 3] [--threads N]

Writes ``benchmarks/results/train_cpu.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from machine import cpu_name

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
VARIANTS = {
    "full, batch 1": ["batch_size=1"],
    "full, batch 4": ["batch_size=4"],
    "full, batch 4, activation checkpointing": ["batch_size=4", "model.activation_checkpointing=true"],
    "full, batch 4, bf16 autocast": ["batch_size=4", "mixed_precision=bf16"],
    "decoder, batch 4": ["batch_size=4", "mode=decoder"],
    "lora r16, batch 4": ["batch_size=4", "mode=lora"],
}


def data_root() -> Path:
    return Path(os.environ.get("MEDSAM3_DATA", REPO.parent / "shared" / "data"))


def build_manifest(out: Path, n: int = 8) -> Path:
    from medsam3.data.indexing import prepare_dataset
    from medsam3.data.manifest import write_manifest

    opts = {"images": "training_set/*_HC.png", "mask": "{stem}_Annotation.png"}
    records, _, _ = prepare_dataset(
        "HC18",
        "folder2d",
        data_root() / "hc18_ultrasound",
        options=opts,
        labels={1: "fetal head"},
        modality="US",
    )
    records = sorted(records, key=lambda r: r.case_id)[:n]
    for r in records:
        r.split = "train"
    return write_manifest(out / "manifest.jsonl", records)


def child(args: argparse.Namespace) -> None:
    """One variant in this process; prints a JSON line with the result."""
    import torch

    from medsam3.train.config import build_config
    from medsam3.train.loop import read_metrics, train

    torch.set_num_threads(args.threads)
    overrides = [
        f"data.manifest={args.manifest}",
        f"run_dir={args.run_dir}",
        f"max_steps={args.warmup + args.steps}",
        "data.val_max_items=0",
        "progress=false",
        "tensorboard=false",
        "export=none",
        *args.overrides,
    ]
    cfg = build_config(REPO / "configs" / "tiny_cpu.yaml", overrides)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # libraries imported
    result = train(cfg)
    steps = [r for r in read_metrics(args.run_dir) if "loss" in r]
    t0 = steps[args.warmup - 1]["time"]
    t1 = steps[-1]["time"]
    images = args.steps * cfg.batch_size
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(
        json.dumps(
            {
                "images_per_s": images / (t1 - t0),
                "s_per_step": (t1 - t0) / args.steps,
                "peak_rss_mib": rss,
                "rss_before_mib": before,
                "steps": result.step,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--manifest", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    import accelerate
    import peft
    import torch
    import transformers

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        manifest = build_manifest(Path(tmp))
        for name, overrides in VARIANTS.items():
            cmd = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--child",
                "--manifest",
                str(manifest),
                "--run-dir",
                str(Path(tmp) / name.replace(" ", "_").replace(",", "")),
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
                "--threads",
                str(args.threads),
                "--",
                *overrides,
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append((name, result))
            print(
                f"{name:45s} {result['images_per_s']:7.2f} img/s  {result['s_per_step']:6.3f} s/step  "
                f"peak RSS {result['peak_rss_mib']:7.0f} MiB",
                flush=True,
            )

    command = "OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_train.py " + " ".join(sys.argv[1:])
    lines = [
        "# Training throughput on the CPU (tiny configuration)",
        "",
        f"Command: `{command.strip()}`",
        "",
        f"- CPU: {cpu_name(platform.machine())}, {os.cpu_count()} logical cores visible, "
        f"{args.threads} torch threads",
        f"- Python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, accelerate {accelerate.__version__}, peft {peft.__version__}",
        "- Model: `configs/tiny_cpu.yaml` (tiny random SAM3, 224 px, 6.6 M parameters), fp32 unless the "
        "variant says bf16 autocast (the geometry encoder then stays in fp32: `medsam3.train.cpu_autocast`), "
        "SAM3 loss "
        "with auxiliary terms; data: 8 HC18 ultrasound images (800 x 540 PNG, decoded and preprocessed "
        "every step, no worker processes)",
        f"- {args.warmup} warm-up steps, then {args.steps} timed steps; each variant in a fresh process "
        "(peak RSS = that process's high-water mark, including Python, torch and the data; RSS before "
        "training = the same after importing torch, transformers and medsam3)",
        "",
        "| variant | images / s | s / step | peak RSS (MiB) | RSS before training (MiB) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in rows:
        lines.append(
            f"| {name} | {r['images_per_s']:.2f} | {r['s_per_step']:.3f} | "
            f"{r['peak_rss_mib']:.0f} | {r['rss_before_mib']:.0f} |"
        )
    lines += [
        "",
        "The tiny model says nothing about the speed of the released 848M SAM3 at 1008 px (GPU work); the",
        "numbers compare the modes and batch sizes of the training engine on one machine. The machine was",
        "shared with other jobs while measuring, so expect run-to-run differences of tens of percent.",
        "",
    ]
    out = HERE / "results" / "train_cpu.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
