"""Clip training against slice training on MSD hippocampus volumes: the same wall-clock budget, then held-out
3D Dice per case of ``--mode slices`` (2D-trained) against ``--mode track`` / ``--mode clips`` (clip-trained).

The model is the smallest video model transformers' ``Sam3VideoModel`` accepts (tiny detector at 112 px,
FPN and tracker width 128, one memory-attention layer), trained from scratch; the 2D arm trains the same
detector architecture as an image model. Configurations: ``configs/clips_vs_slices_2d.yaml`` and
``configs/clips_vs_slices_clips.yaml``. Split (fixed): the 18 sample volumes sorted by case id, the first 12
train, the last 6 held out (``hippocampus_023 .. 034``).

Stages (each skipped when its outputs exist, so the script can be re-run after an interruption):

1. ``prepare``: an nnU-Net folder of links to the sample volumes and the manifest (splits ``train`` /
   ``test``) in ``WORK``.
2. ``train``: both arms at once (one process each, ``OMP_NUM_THREADS=1``, so both see the same machine
   load), each ``medsam3 train <config> stop_after_minutes=BUDGET``; then each run is finished at the step
   it reached (``max_steps=<step>``, resumed) to export its final model.
3. ``evaluate``: ``medsam3 segment`` on the held-out volumes in each mode (both concepts per call), Dice
   per case and concept against the reference labels, wall time per case from the segment summary.
4. ``report``: a Markdown table (``WORK/report.md``) with the commands.

Usage::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/clip_vs_slice_training.py --work runs/clip_vs_slice \
        --data <sample data folder> --budget-minutes 15
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CASES = sorted(
    f"hippocampus_{n:03d}" for n in (1, 3, 4, 6, 7, 8, 11, 14, 15, 17, 19, 20, 23, 24, 25, 26, 33, 34)
)
TRAIN, HELD_OUT = CASES[:12], CASES[12:]
CONCEPTS = {"anterior hippocampus": 1, "posterior hippocampus": 2}
#: Dice of both concepts' union against both labels' union
WHOLE = "either (union)"
ARMS = {"slices": "configs/clips_vs_slices_2d.yaml", "clips": "configs/clips_vs_slices_clips.yaml"}
#: mode -> arm whose model it runs
MODES = {"slices": "slices", "track": "clips", "clips": "clips"}


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def run(cmd: list[str], work: Path, env: dict[str, str] | None = None) -> None:
    """Run ``cmd`` (recorded in ``WORK/commands.txt``), fail on a non-zero exit."""
    with (work / "commands.txt").open("a") as f:
        f.write(shlex.join(cmd) + "\n")
    log("$ " + shlex.join(cmd))
    subprocess.run(cmd, check=True, env=env, cwd=REPO)


def prepare(work: Path, data: Path) -> Path:
    from medsam3.data.indexing import prepare_dataset
    from medsam3.data.manifest import write_manifest

    manifest = work / "manifest.jsonl"
    if manifest.is_file():
        return manifest
    root = work / "Task04_Hippocampus"
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    src = data / "msd_hippocampus"
    for case in CASES:
        for sub, kind in (("imagesTr", "images"), ("labelsTr", "labels")):
            link = root / sub / f"{case}.nii.gz"
            if not link.exists():
                link.symlink_to((src / kind / f"{case}.nii.gz").resolve())
    doc = {
        "name": "Hippocampus",
        "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "Anterior", "2": "Posterior"},
        "numTraining": len(CASES),
        "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in CASES],
    }
    (root / "dataset.json").write_text(json.dumps(doc))
    records, _, _ = prepare_dataset("Task04_Hippocampus", "nnunet", root)
    for r in records:
        r.split = "train" if r.case_id in TRAIN else "test"
    held = work / "held_out"
    held.mkdir(exist_ok=True)
    for case in HELD_OUT:
        link = held / f"{case}.nii.gz"
        if not link.exists():
            link.symlink_to((src / "images" / f"{case}.nii.gz").resolve())
    return write_manifest(manifest, records)


def last_step(run_dir: Path) -> int:
    from medsam3.train.loop import read_metrics

    return max((r["step"] for r in read_metrics(run_dir) if "loss" in r), default=0)


def train(work: Path, manifest: Path, budget: float) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1"}
    base = [sys.executable, "-m", "medsam3.commands.train"]
    pending = {arm: work / arm for arm in ARMS if not (work / arm / "budget_done").is_file()}
    procs = {}
    for arm, run_dir in pending.items():
        cmd = [*base, ARMS[arm], f"data.manifest={manifest}", f"run_dir={run_dir}"]
        cmd += [f"stop_after_minutes={budget}"]
        with (work / "commands.txt").open("a") as f:
            f.write(shlex.join(cmd) + "\n")
        log("$ " + shlex.join(cmd) + " &")
        run_dir.mkdir(parents=True, exist_ok=True)
        out = (work / f"train_{arm}.log").open("a")
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        procs[arm] = (proc, time.time())
    for arm, (proc, start) in procs.items():
        if proc.wait() != 0:
            raise SystemExit(f"{arm} training failed (see {work / f'train_{arm}.log'})")
        (work / arm / "budget_done").write_text(json.dumps({"wall_s": time.time() - start}))
    for arm in ARMS:
        run_dir = work / arm
        if not (run_dir / "export" / "final").is_dir():
            step = last_step(run_dir)
            cmd = [*base, ARMS[arm], f"data.manifest={manifest}", f"run_dir={run_dir}", f"max_steps={step}"]
            run(cmd, work, env)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    from medsam3.evaluate.metrics import dice as metric

    return float(metric(a, b))


def evaluate(work: Path, data: Path) -> dict:
    import nibabel as nib

    results_path = work / "results.json"
    if results_path.is_file():
        return json.loads(results_path.read_text())
    env = {**os.environ, "OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"}
    prompts = [a for c in CONCEPTS for a in ("-p", c)]
    results: dict = {"cases": {}, "seconds": {}}
    for mode, arm in MODES.items():
        out = work / "segment" / mode
        cmd = ["medsam3", "segment", str(work / "held_out"), *prompts, "--mode", mode]
        cmd += ["--model", str(work / arm / "export" / "final"), "-o", str(out), "--no-overlay"]
        run(cmd, work, env)
        with (out / "summary.csv").open() as f:
            assert all(r["status"] in ("ok", "skipped") for r in csv.DictReader(f))
        results["seconds"][mode] = {}
        for case in HELD_OUT:
            # the case's own wall time (reading, segmenting, writing), kept when a re-run skips it
            summary = json.loads((out / f"{case}.json").read_text())
            results["seconds"][mode][case] = float(summary["case"]["seconds"])
            pred = np.asarray(nib.load(next(out.rglob(f"{case}_seg.nii.gz"))).dataobj)
            ref = np.asarray(nib.load(data / "msd_hippocampus" / "labels" / f"{case}.nii.gz").dataobj)
            scores = results["cases"].setdefault(case, {}).setdefault(mode, {})
            for concept, value in CONCEPTS.items():
                # prompt i has value i in the prediction; the reference labels are 1 / 2 in the same order
                scores[concept] = dice(pred == value, ref == value)
            # the whole hippocampus, whichever concept a voxel went to (localisation without the split)
            scores[WHOLE] = dice(pred > 0, ref > 0)
    results["steps"] = {arm: last_step(work / arm) for arm in ARMS}
    results["train_wall_s"] = {
        arm: json.loads((work / arm / "budget_done").read_text())["wall_s"] for arm in ARMS
    }
    results_path.write_text(json.dumps(results, indent=1))
    return results


def report(work: Path, results: dict, budget: float) -> str:
    modes = list(MODES)
    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs (shared), load average at the end "
        f"{os.getloadavg()[0]:.1f}; budget {budget} min per arm, both arms at once, 1 thread each.",
        "",
        "| arm | steps in the budget | frames per step | wall s |",
        "|---|---|---|---|",
    ]
    frames = {"slices": 4, "clips": 4}
    for arm in ARMS:
        lines.append(
            f"| {arm} | {results['steps'][arm]} | {frames[arm]} | {results['train_wall_s'][arm]:.0f} |"
        )
    lines += ["", "| case | concept | " + " | ".join(modes) + " |", "|---|---|" + "---|" * len(modes)]
    means: dict[str, dict[str, list[float]]] = {c: {m: [] for m in modes} for c in [*CONCEPTS, WHOLE]}
    for case, per_mode in results["cases"].items():
        for concept in [*CONCEPTS, WHOLE]:
            vals = [per_mode[m][concept] for m in modes]
            for m, v in zip(modes, vals, strict=True):
                means[concept][m].append(v)
            lines.append(f"| {case} | {concept} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
    for concept in [*CONCEPTS, WHOLE]:
        cells = " | ".join(f"**{np.mean(means[concept][m]):.3f}**" for m in modes)
        lines.append(f"| **mean** | {concept} | {cells} |")
    lines += ["", "| mode | seconds per case (mean) |", "|---|---|"]
    for m in modes:
        secs = list(results["seconds"][m].values())
        lines.append(f"| {m} | {np.mean(secs):.1f} |")
    text = "\n".join(lines) + "\n"
    (work / "report.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "clip_vs_slice")
    default_data = os.environ.get("MEDSAM3_DATA") or str(REPO.parent / "shared" / "data")
    parser.add_argument("--data", type=Path, default=Path(default_data))
    parser.add_argument("--budget-minutes", type=float, default=15.0)
    parser.add_argument("--stage", choices=("all", "prepare", "train", "evaluate"), default="all")
    args = parser.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    manifest = prepare(work, args.data)
    if args.stage in ("all", "train"):
        train(work, manifest, args.budget_minutes)
    if args.stage in ("all", "evaluate"):
        print(report(work, evaluate(work, args.data), args.budget_minutes))


if __name__ == "__main__":
    main()
