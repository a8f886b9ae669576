"""``--dtype int8`` on the CPU: what dynamic int8 quantization of the linear layers costs and gains.

Two measurements, printed as Markdown:

1. **Accuracy with a trained model**: the bundled ``medsam3-nano`` on the bundled samples (HC18 fetal head
   PNG; MSD hippocampus_019 NIfTI with the whole hippocampus, and with "anterior" / "posterior
   hippocampus"), Dice against the samples' references in float32, with the vision encoder's linear
   layers in int8 (what ``--dtype int8`` does), and with every linear layer in int8; seconds per
   ``Segmenter.segment`` call (median of ``--runs`` after one warm-up).
2. **Speed on the full-size architecture**: ``Sam3Model(full_sam3_config())`` with random weights (seed 0),
   the vision encoder (``get_vision_features``) on ``--slices`` random 1008 px slices, batch 1, in float32,
   then with the vision encoder's linear layers in int8; seconds per slice, and the deviation of the
   int8 features from the float32 ones (ViT output and the FPN levels).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_int8.py [--slices 1] [--runs 3] [--skip-full]

Writes ``--out`` (default ``benchmarks/results/int8_cpu.md``) with the command, the machine and the load
average at start and end.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from PIL import Image as PILImage

import medsam3
from medsam3.model.loading import load_sam3
from medsam3.model.quantize import count_linear, quantize_int8
from medsam3.predict.segmenter import Segmenter

SAMPLES = Path(medsam3.__file__).resolve().parent / "assets" / "samples"

#: (name, image file, reference file, modality, {prompt: reference label values})
CASES: list[tuple[str, str, str, str, dict[str, tuple[int, ...]]]] = [
    ("HC18 400_HC (2D US)", "hc18_400_HC.png", "hc18_400_HC_mask.png", "US", {"fetal head": (255,)}),
    (
        "hippocampus_019 (3D MR), 1 prompt",
        "hippocampus_019.nii.gz",
        "hippocampus_019_labels.nii.gz",
        "MR",
        {"hippocampus": (1, 2)},
    ),
    (
        "hippocampus_019 (3D MR), 2 prompts",
        "hippocampus_019.nii.gz",
        "hippocampus_019_labels.nii.gz",
        "MR",
        {"anterior hippocampus": (1,), "posterior hippocampus": (2,)},
    ),
]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks (1 when both are empty)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def reference(file: str) -> np.ndarray:
    """A reference label map in its file's layout (PNG rows x columns, NIfTI x, y, z)."""
    path = SAMPLES / file
    if file.endswith(".png"):
        ref = np.asarray(PILImage.open(path))
        return ref[..., 0] if ref.ndim == 3 else ref
    volume: Any = nib.load(path)
    return np.asarray(volume.dataobj)


def predicted(result: Any) -> np.ndarray:
    """The result's label map in the input file's layout."""
    if result.is_volume:
        return np.asarray(result.to_nibabel().dataobj)
    return np.asarray(result.label_map)


def case_dice(seg: Segmenter, runs: int) -> dict[str, tuple[list[float], float]]:
    """Per case: the Dice of each prompt and the median seconds per call."""
    out = {}
    for name, image, ref_file, modality, prompts in CASES:
        ref = reference(ref_file)
        path = SAMPLES / image
        result = seg.segment(path, list(prompts), modality=modality)  # warm-up, and the result scored
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            seg.segment(path, list(prompts), modality=modality)
            times.append(time.perf_counter() - start)
        labels = predicted(result)
        scores = []
        for prompt, values in prompts.items():
            (entry,) = [e for e in result.labels if e.concept == prompt]
            mask = np.zeros(labels.shape, bool) if entry.absent else labels == entry.value
            want = np.isin(ref, values) if values != (255,) else ref > 127
            scores.append(dice(mask, want))
        out[name] = (scores, statistics.median(times))
    return out


def accuracy(runs: int) -> list[str]:
    """Markdown rows: Dice and time of the bundled model in float32 and int8."""
    variants = {}
    for label, parts in (("fp32", None), ("int8 (vision encoder)", "default"), ("int8 (all linear)", "all")):
        loaded = load_sam3(None, device="cpu", dtype="fp32")
        if parts is not None:
            quantize_int8(loaded.model, None if parts == "default" else parts)
        counts = count_linear(loaded.model)
        print(f"{label}: {counts['int8']} int8 linear layers, {counts['float']} float", flush=True)
        variants[label] = case_dice(Segmenter(loaded, device="cpu"), runs)
    head = "| case | prompt | " + " | ".join(f"{v} Dice" for v in variants) + " | "
    head += " | ".join(f"{v} s/call" for v in variants) + " |"
    rows = [head, "|" + "---|" * (2 + 2 * len(variants))]
    for name, _, _, _, prompts in CASES:
        for i, prompt in enumerate(prompts):
            cells = [f"{variants[v][name][0][i]:.4f}" for v in variants]
            times = [f"{variants[v][name][1]:.3f}" if i == 0 else "" for v in variants]
            rows.append(f"| {name} | {prompt} | " + " | ".join(cells + times) + " |")
    return rows


def deviation(ref: torch.Tensor, got: torch.Tensor) -> str:
    """``max |d|``, ``max |d| / max |ref|`` and ``||d|| / ||ref||`` of ``got - ref``."""
    d = (got.float() - ref.float()).abs()
    return (
        f"{d.max().item():.4g} | {(d.max() / ref.abs().max()).item():.2%} | "
        f"{(torch.linalg.vector_norm(d) / torch.linalg.vector_norm(ref.float())).item():.2%}"
    )


def full_size(slices: int) -> list[str]:
    """Markdown lines: vision-encoder seconds per 1008 px slice, fp32 vs int8, and the feature deviation."""
    from transformers import Sam3Model

    from medsam3.model.configs import full_sam3_config

    torch.manual_seed(0)
    start = time.perf_counter()
    model = Sam3Model(full_sam3_config()).eval()
    built = time.perf_counter() - start
    size = int(model.config.vision_config.backbone_config.image_size)
    pixels = [
        torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(i)) for i in range(slices)
    ]

    def run() -> tuple[list[float], list[Any]]:
        times, outs = [], []
        with torch.inference_mode():
            for x in pixels:
                start = time.perf_counter()
                outs.append(model.get_vision_features(pixel_values=x))
                times.append(time.perf_counter() - start)
                print(f"  {times[-1]:.1f} s", flush=True)
        return times, outs

    print(f"full size: built in {built:.0f} s; fp32", flush=True)
    fp32_times, fp32_out = run()
    start = time.perf_counter()
    quantize_int8(model)
    quantized = time.perf_counter() - start
    counts = count_linear(model)
    print(f"int8 ({counts['int8']} int8 linear layers, quantized in {quantized:.1f} s)", flush=True)
    int8_times, int8_out = run()
    lines = [
        f"Full-size `Sam3Model(full_sam3_config())`, random weights (seed 0), {size} px, batch 1, "
        f"{slices} slice(s) each; the vision encoder's {counts['int8']} linear layers quantized in "
        f"{quantized:.1f} s ({counts['float']} linear layers elsewhere stay float32).",
        "",
        "| vision encoder | s per slice (each slice) | mean s per slice |",
        "|---|---|---|",
        f"| fp32 | {', '.join(f'{t:.1f}' for t in fp32_times)} | {statistics.mean(fp32_times):.1f} |",
        f"| int8 | {', '.join(f'{t:.1f}' for t in int8_times)} | {statistics.mean(int8_times):.1f} |",
        "",
        f"Speed-up: {statistics.mean(fp32_times) / statistics.mean(int8_times):.2f}x.",
        "",
        "Deviation of the int8 features from the fp32 ones (all slices):",
        "",
        "| features | shape | max abs | max abs / max abs(fp32) | relative L2 |",
        "|---|---|---|---|---|",
    ]

    def pick(level: int | None) -> Callable[[Any], torch.Tensor]:
        return lambda o: o.last_hidden_state if level is None else o.fpn_hidden_states[level]

    levels = len(fp32_out[0].fpn_hidden_states)
    named = [("ViT output (last_hidden_state)", pick(None))]
    named += [(f"FPN level {i}", pick(i)) for i in range(levels)]
    for label, get in named:
        ref = torch.cat([get(o) for o in fp32_out])
        got = torch.cat([get(o) for o in int8_out])
        lines.append(f"| {label} | {tuple(ref.shape)} | {deviation(ref, got)} |")
    return lines


INTRO = """\
`--dtype int8` loads the model in float32 and replaces the **vision encoder's `torch.nn.Linear` layers** by
PyTorch's dynamically quantized ones (`torch.ao.quantization.quantize_dynamic(..., {torch.nn.Linear},
dtype=torch.qint8)`: int8 weights, one scale per tensor, activations quantized per call); convolutions,
norms, embeddings and the rest of the model (text encoder, DETR encoder / decoder, heads) stay float32.
CPU only. Results record `dtype: int8 (dynamic): vision encoder's linear layers; the rest float32`."""

ACCURACY = """\
Dice against the samples' references (`Segmenter.segment` with the defaults of `medsam3 segment`);
"int8 (vision encoder)" is what `--dtype int8` does, "int8 (all linear)" quantizes every linear layer
(`quantize_int8(model, "all")`, not offered on the command line). Seconds per call: median of the timed
calls after a warm-up; the machine is shared, so the times are only indicative."""


def _load() -> str:
    return ", ".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=1, help="full-size slices per precision (default 1)")
    parser.add_argument("--runs", type=int, default=3, help="timed calls per sample case (default 3)")
    parser.add_argument("--skip-full", action="store_true", help="only the bundled-model accuracy")
    parser.add_argument("--skip-accuracy", action="store_true", help="only the full-size timing")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent / "results" / "int8_cpu.md"
    )
    args = parser.parse_args()
    load = _load()
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s), torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, quantized engine "
        f"{torch.backends.quantized.engine}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}"
    )
    print(f"machine: {machine}", flush=True)
    body: list[str] = []
    if not args.skip_accuracy:
        body += ["", "## Accuracy with a trained model (bundled `medsam3-nano`, 336 px, bundled samples)", ""]
        body += [ACCURACY, "", *accuracy(args.runs)]
        print("\n".join(body), flush=True)
    if not args.skip_full:
        body += ["", "## Speed on the full-size architecture (random weights)", "", *full_size(args.slices)]
    command = " ".join(["OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_int8.py", *sys.argv[1:]])
    head = [
        "# `--dtype int8` on the CPU: accuracy and speed",
        "",
        INTRO,
        "",
        f"Command: `{command}`",
        "",
        f"- machine: {machine}; shared with other jobs",
        f"- load average (1, 5, 15 min) at start: {load}; at end: {_load()}",
    ]
    text = "\n".join(head + body) + "\n"
    args.out.write_text(text)
    print(text, flush=True)


if __name__ == "__main__":
    main()
