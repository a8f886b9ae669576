"""CPU speed of the bundled medsam3-nano model (and of other model folders, in the same run).

Seconds per ``Segmenter.segment`` call with the defaults of ``medsam3 segment`` (presence threshold 0.5,
volumes in 3D slice mode), after one warm-up call, median and minimum of ``--runs`` calls; the model stays
loaded; the models (and settings) take turns call by call, so that load changes of a shared machine fall
on all of them alike. Cases: two 2D images (HC18 ultrasound, Kvasir-SEG RGB) and two MSD hippocampus
volumes with one and two prompts ("anterior" / "posterior hippocampus") and with "hippocampus".

    OMP_WAIT_POLICY=PASSIVE python benchmarks/nano_speed.py DATA_DIR [--model DIR --name NAME ...] [--tta]

DATA_DIR is the public samples folder (hc18_ultrasound/, kvasir_seg_sample/, msd_hippocampus/). Without
``--model`` the bundled model is measured. ``--tta`` also times each model with test-time mirroring
(``medsam3 segment --tta``; concepts naming a position, such as "anterior hippocampus", are not mirrored,
so those rows cost the same). Prints a Markdown table (one column pair per model and setting).
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch

from medsam3.io.readers import read_image
from medsam3.model.loading import load_sam3
from medsam3.predict.prompts import Prompt
from medsam3.predict.segmenter import Segmenter


def cases(data: Path) -> list[tuple[str, object, list[str]]]:
    out = [
        (
            "2D HC18 400_HC, 800x540, 1 prompt",
            read_image(data / "hc18_ultrasound/training_set/400_HC.png"),
            ["fetal head"],
        ),
        (
            "2D Kvasir-SEG cju0qoxqj9q6s0835b43399p4 (RGB), 1 prompt",
            read_image(data / "kvasir_seg_sample/images/cju0qoxqj9q6s0835b43399p4.jpg"),
            ["polyp"],
        ),
    ]
    for case in ("hippocampus_001", "hippocampus_019"):
        vol = read_image(data / f"msd_hippocampus/images/{case}.nii.gz", modality="MR")
        shape = "x".join(map(str, vol.array.shape))
        out.append((f"3D {case} {shape} (Z,Y,X), 1 prompt", vol, ["anterior hippocampus"]))
        out.append(
            (f"3D {case} {shape} (Z,Y,X), 2 prompts", vol, ["anterior hippocampus", "posterior hippocampus"])
        )
        out.append((f'3D {case} {shape} (Z,Y,X), "hippocampus"', vol, ["hippocampus"]))
    return out


def time_models(
    settings: list[tuple[str | None, bool]], work: list, runs: int
) -> list[tuple[float, int, list[tuple[float, float]]]]:
    """Per setting ``(model folder, mirror)``: load seconds, input side and ``(median, min)`` s per case.

    The settings take turns: for each case, one warm-up call each, then run ``k`` of every setting before
    run ``k + 1`` of any, so that a change of the shared machine's load falls on every column alike.
    """
    segmenters, loads = [], []
    for model, mirror in settings:
        t = time.perf_counter()
        segmenters.append(Segmenter(load_sam3(model, device="cpu", dtype="fp32"), tta=mirror))
        loads.append(time.perf_counter() - t)
    rows: list[list[tuple[float, float]]] = [[] for _ in settings]
    for _, image, prompts in work:
        for seg in segmenters:
            seg.segment(image, [Prompt(text=p) for p in prompts])  # warm-up
        times: list[list[float]] = [[] for _ in settings]
        for _ in range(runs):
            for i, seg in enumerate(segmenters):
                t = time.perf_counter()
                seg.segment(image, [Prompt(text=p) for p in prompts])
                times[i].append(time.perf_counter() - t)
        for i, ts in enumerate(times):
            rows[i].append((float(np.median(ts)), float(min(ts))))
    return [(load, seg.engine.image_size, r) for load, seg, r in zip(loads, segmenters, rows, strict=True)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path)
    ap.add_argument("--model", action="append", default=[], help="model folder (repeatable; default bundled)")
    ap.add_argument("--name", action="append", default=[], help="column name for each --model")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tta", action="store_true", help="also time each model with test-time mirroring")
    args = ap.parse_args()
    models = args.model or [None]
    names = args.name or [Path(m).name if m else "bundled" for m in models]
    if len(names) != len(models):
        ap.error("give one --name per --model")
    work = cases(args.data)
    settings = [(m, n, False) for m, n in zip(models, names, strict=True)]
    if args.tta:
        settings += [(m, f"{n} --tta", True) for m, n in zip(models, names, strict=True)]
    names = [n for _, n, _ in settings]
    results = time_models([(m, mirror) for m, _, mirror in settings], work, args.runs)
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}"
    )
    for name, (load, size, _) in zip(names, results, strict=True):
        print(f"- {name}: {size} px input, model load {load:.2f} s")
    head = " | ".join(f"{n} median s | {n} min s" for n in names)
    print(f"\n| input | {head} |\n|---|" + "---|" * (2 * len(names)))
    for i, (label, _, _) in enumerate(work):
        cells = " | ".join(f"{r[2][i][0]:.3f} | {r[2][i][1]:.3f}" for r in results)
        print(f"| {label} | {cells} |")


if __name__ == "__main__":
    main()
