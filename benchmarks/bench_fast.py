"""``--fast``: what the preset costs in accuracy and what it gains in time.

1. **Accuracy and time with a trained model**: the bundled ``medsam3-nano`` on every MSD hippocampus
   volume of the sample data (prompt "hippocampus", labels 1 + 2; and "anterior hippocampus" /
   "posterior hippocampus" together) and every HC18 fetal-head image (prompt "fetal head"), Dice against
   the references with the defaults, with ``fast=True``, and with ``fast=True`` on a model loaded with
   ``--dtype int8``; CPU seconds per call (``time.process_time``, all threads) and encoder passes.
2. **Time on the full-size architecture**: ``Sam3Model(full_sam3_config())`` with random weights
   (seed 0), the vision encoder on ``--slices`` random slices at 1008 px (its own size) and at the preset's
   672 px (``reduced_input_size``), float32, then at 672 px with the vision encoder in int8; seconds per
   slice. The search's pass reduction is a property of the volume and the structure (part 1 and
   ``slice_search.md``), so the preset's speed-up on a full-size model is the per-slice ratio times the
   pass ratio.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_fast.py [--slices 1] [--skip-full] [--skip-accuracy]
        [--out benchmarks/results/fast_cpu.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEDSAM3_DATA") or REPO.parent / "shared" / "data")
#: Cases the bundled model was not trained on (its model card).
HELD_OUT = {
    "hippocampus_003",
    "hippocampus_011",
    "hippocampus_019",
    "hippocampus_024",
    "005_HC",
    "010_HC",
    "150_HC",
    "200_HC",
    "400_HC",
}
#: The configurations of part 1: (label, load dtype, options).
VARIANTS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("default", "fp32", {}),
    ("fast", "fp32", {"fast": True}),
    ("fast + int8", "int8", {"fast": True}),
)
#: Hippocampus prompt sets: prompts -> reference label values of each.
HIPPO_TASKS: tuple[dict[str, tuple[int, ...]], ...] = (
    {"hippocampus": (1, 2)},
    {"anterior hippocampus": (1,), "posterior hippocampus": (2,)},
)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks (1 when both are empty)."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def cases() -> list[tuple[str, Path, Path, str, dict[str, tuple[int, ...]]]]:
    """(case, image, reference, modality, prompts -> label values) for every task of part 1."""
    out = []
    hippo = DATA / "msd_hippocampus"
    for image in sorted((hippo / "images").glob("*.nii.gz")):
        ref = hippo / "labels" / image.name
        if ref.exists():
            for task in HIPPO_TASKS:
                out.append((image.name.removesuffix(".nii.gz"), image, ref, "MR", task))
    hc18 = DATA / "hc18_ultrasound" / "training_set"
    for image in sorted(hc18.glob("*_HC.png")):
        ref = image.with_name(image.stem + "_Annotation.png")
        out.append((image.stem, image, ref, "US", {"fetal head": (255,)}))
    return out


def reference(path: Path) -> np.ndarray:
    """A reference label map in its file's layout (PNG rows x columns, NIfTI x, y, z)."""
    if path.suffix == ".png":
        from PIL import Image as PILImage

        ref = np.asarray(PILImage.open(path))
        return ref[..., 0] if ref.ndim == 3 else ref
    import nibabel as nib

    return np.asarray(nib.load(path).dataobj)


def run_case(
    seg: Any, image: Path, modality: str, prompts: dict[str, tuple[int, ...]], ref: np.ndarray, **opts: Any
) -> tuple[list[float], float, float, int, int | None, Any]:
    """Dice per prompt, CPU and wall seconds, encoder passes (and the full pass's) of one call."""
    cpu, wall = time.process_time(), time.perf_counter()
    result = seg.segment(image, list(prompts), modality=modality, **opts)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    labels = np.asarray(result.to_nibabel().dataobj) if result.is_volume else np.asarray(result.label_map)
    scores = []
    for prompt, values in prompts.items():
        (entry,) = [e for e in result.labels if e.concept == prompt]
        mask = np.zeros(labels.shape, bool) if entry.absent else labels == entry.value
        want = ref > 127 if values == (255,) else np.isin(ref, values)
        scores.append(dice(mask, want))
    search = result.settings.get("slice_search") or {}
    return scores, cpu, wall, result.settings["image_encoder_runs"], search.get("encoder_runs_full"), result


def accuracy() -> tuple[list[str], dict[str, Any]]:
    """Markdown lines of part 1, and the preset settings one run reported."""
    from medsam3.model.loading import load_sam3
    from medsam3.predict.segmenter import Segmenter

    todo = cases()
    refs = {(name, str(ref)): reference(ref) for name, _, ref, _, _ in todo}
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    preset: dict[str, Any] = {}
    for label, dtype, opts in VARIANTS:
        seg = Segmenter(load_sam3(None, device="cpu", dtype=dtype))
        seg.segment(todo[0][1], list(todo[0][4]), modality=todo[0][3], **opts)  # warm-up
        print(f"{label}: {len(todo)} calls", flush=True)
        for name, image, ref, modality, prompts in todo:
            scores, cpu, wall, passes, full, result = run_case(
                seg, image, modality, prompts, refs[(name, str(ref))], **opts
            )
            if opts.get("fast") and result.is_volume and not preset:
                preset = result.settings["preset"]
            key = (name, " + ".join(prompts))
            rows.setdefault(key, {})[label] = (scores, cpu, wall, passes, full)
    labels = [v[0] for v in VARIANTS]
    lines = [
        "| case | prompt(s) | "
        + " | ".join(f"Dice {v}" for v in labels)
        + " | "
        + " | ".join(f"CPU s {v}" for v in labels)
        + " | passes default | passes fast |",
        "|---|---|" + "---:|" * (2 * len(labels) + 2),
    ]
    groups: dict[str, dict[str, list[float]]] = {}
    times: dict[str, dict[str, list[float]]] = {}
    passes_sum: dict[str, dict[str, int]] = {}
    for (name, task), by in rows.items():
        star = "*" if name in HELD_OUT else ""
        dices = [" / ".join(f"{d:.4f}" for d in by[v][0]) for v in labels]
        cpus = [f"{by[v][1]:.2f}" for v in labels]
        pd, pf = by["default"][3], by["fast"][3]
        lines.append(f"| {name}{star} | {task} | " + " | ".join(dices + cpus) + f" | {pd} | {pf} |")
        kind = "fetal head (HC18, 2D)" if task == "fetal head" else f"{task} (MSD, 3D)"
        for subset in ("all", "held out") if name in HELD_OUT else ("all",):
            g = groups.setdefault(f"{kind}, {subset}", {})
            t = times.setdefault(f"{kind}, {subset}", {})
            p = passes_sum.setdefault(f"{kind}, {subset}", {})
            for v in labels:
                g.setdefault(v, []).extend(by[v][0])
                t.setdefault(v, []).append(by[v][1])
                p[v] = p.get(v, 0) + int(by[v][3])
    summary = [
        "| cases | n | " + " | ".join(f"mean Dice {v}" for v in labels) + " | Dice change fast | "
        "worst case change fast | " + " | ".join(f"CPU s {v}" for v in labels) + " | CPU speed-up fast | "
        "passes default | passes fast |",
        "|---|---:|" + "---:|" * (2 * len(labels) + 5),
    ]
    for kind, g in groups.items():
        n = len(g["default"])
        diffs = [f - d for f, d in zip(g["fast"], g["default"], strict=True)]
        tot = {v: sum(times[kind][v]) for v in labels}
        summary.append(
            f"| {kind} | {n} | "
            + " | ".join(f"{statistics.mean(g[v]):.4f}" for v in labels)
            + f" | {statistics.mean(diffs):+.4f} | {min(diffs):+.4f} | "
            + " | ".join(f"{tot[v]:.1f}" for v in labels)
            + f" | {tot['default'] / tot['fast']:.2f}x | {passes_sum[kind]['default']} | "
            f"{passes_sum[kind]['fast']} |"
        )
    per_case = ["", "Per case (`*` held out from the model's training; Dice per prompt):", ""]
    return summary + per_case + lines, preset


def full_size(slices: int) -> list[str]:
    """Markdown lines of part 2: vision-encoder seconds per slice at 1008 and 672 px (fp32, int8)."""
    from transformers import Sam3Model

    from medsam3.model.configs import full_sam3_config
    from medsam3.model.input_size import reduced_input_size, resize_sam3_input
    from medsam3.model.quantize import quantize_int8
    from medsam3.predict.options import FAST

    assert FAST.input_scale is not None
    torch.manual_seed(0)
    start = time.perf_counter()
    model = Sam3Model(full_sam3_config()).eval()
    built = time.perf_counter() - start
    size = int(model.config.vision_config.backbone_config.image_size)
    small = reduced_input_size(model, FAST.input_scale)
    assert small is not None

    def timed(net: Any, side: int) -> list[float]:
        out = []
        with torch.inference_mode():
            for i in range(slices):
                x = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(i))
                start = time.perf_counter()
                net.get_vision_features(pixel_values=x)
                out.append(time.perf_counter() - start)
                print(f"  {side} px: {out[-1]:.1f} s", flush=True)
        return out

    print(f"full size built in {built:.0f} s", flush=True)
    results = {f"{size} px fp32 (default)": timed(model, size)}
    resized = resize_sam3_input(model, small).eval()
    del model
    results[f"{small} px fp32 (`--fast`)"] = timed(resized, small)
    quantize_int8(resized)
    results[f"{small} px int8 (`--fast --dtype int8`)"] = timed(resized, small)
    base = statistics.mean(next(iter(results.values())))
    lines = [
        f"`Sam3Model(full_sam3_config())`, random weights (seed 0), vision encoder (`get_vision_features`), "
        f"batch 1, {slices} random slice(s) per configuration, one after the other in one process (no "
        f"warm-up: each slice is seconds of work); the model built in {built:.0f} s.",
        "",
        "| vision encoder | s per slice (each) | mean | speed-up per slice |",
        "|---|---|---:|---:|",
    ]
    for label, ts in results.items():
        mean = statistics.mean(ts)
        lines.append(f"| {label} | {', '.join(f'{t:.1f}' for t in ts)} | {mean:.1f} | {base / mean:.2f}x |")
    return lines


def _load() -> str:
    return ", ".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=1, help="full-size slices per configuration (1)")
    parser.add_argument("--skip-full", action="store_true", help="only part 1 (bundled model)")
    parser.add_argument("--skip-accuracy", action="store_true", help="only part 2 (full-size timing)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "fast_cpu.md")
    args = parser.parse_args()
    loads = [_load()]
    lines = [
        "# `--fast` on the CPU: accuracy cost and speed-up",
        "",
        f"Command: `OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_fast.py {' '.join(sys.argv[1:])}`",
        "",
        f"- machine: {platform.machine()}, {os.cpu_count()} logical CPUs, Python "
        f"{platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; shared with other jobs",
    ]
    body: list[str] = []
    if not args.skip_accuracy:
        table, preset = accuracy()
        body += [
            "",
            "## Accuracy and time with the bundled model (`medsam3-nano`, 336 px)",
            "",
            "`Segmenter.segment` with the defaults of `medsam3 segment` (default), with `fast=True`, and "
            'with `fast=True` on the model loaded with `dtype="int8"`; one warm-up call per configuration, '
            "then each case once. Volumes: slices mode, passes = encoder passes (`image_encoder_runs`). What "
            f"`fast` set on these volumes (the result's `preset` settings): `{preset.get('set')}`.",
            "",
            *table,
        ]
    if not args.skip_full:
        body += ["", "## Time on the full-size architecture (random weights)", "", *full_size(args.slices)]
    lines.append(f"- load average (1, 5, 15 min) at start: {loads[0]}; at end: {_load()}")
    text = "\n".join(lines + body) + "\n"
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
