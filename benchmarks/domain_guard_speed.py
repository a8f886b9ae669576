"""Benchmark: the cost of the domain guard (``domain.safetensors``) on in-domain images.

The bundled ``medsam3-nano`` is timed with and without its ``domain.safetensors`` (a copy of the folder
without the file), the two segmenters taking turns on each input (interleaved, so that the load of a shared
machine hits both alike), ``--runs`` times each, with the defaults of ``medsam3 segment``. An in-domain
image costs the descriptors of its encoder passes and one nearest-neighbour distance per prompt; no extra
encoder pass.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/domain_guard_speed.py DATA_DIR [--runs 6]
"""

from __future__ import annotations

import argparse
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from medsam3.io.readers import read_image
from medsam3.model.domain import DOMAIN_FILE
from medsam3.model.resolve import BUNDLED_MODEL_DIR
from medsam3.predict.segmenter import Segmenter


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path)
    ap.add_argument("--runs", type=int, default=6)
    args = ap.parse_args()
    inputs = [
        (
            "2D HC18 400_HC, 1 prompt",
            read_image(args.data / "hc18_ultrasound/training_set/400_HC.png", modality="US"),
            ["fetal head"],
        ),
        (
            "2D Kvasir-SEG cju0qoxqj9q6s0835b43399p4, 1 prompt",
            read_image(args.data / "kvasir_seg_sample/images/cju0qoxqj9q6s0835b43399p4.jpg"),
            ["polyp"],
        ),
        (
            "3D hippocampus_001, 1 prompt",
            read_image(args.data / "msd_hippocampus/images/hippocampus_001.nii.gz"),
            ["anterior hippocampus"],
        ),
        (
            "3D hippocampus_001, 2 prompts",
            read_image(args.data / "msd_hippocampus/images/hippocampus_001.nii.gz"),
            ["anterior hippocampus", "posterior hippocampus"],
        ),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        plain_dir = Path(tmp) / "nano"
        shutil.copytree(BUNDLED_MODEL_DIR, plain_dir)
        (plain_dir / DOMAIN_FILE).unlink()
        plain = Segmenter(str(plain_dir), device="cpu", dtype="fp32")
        guarded = Segmenter(str(BUNDLED_MODEL_DIR), device="cpu", dtype="fp32")
        assert plain.domain is None and guarded.domain is not None
        print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
        print("| input | without domain.safetensors median s | with (domain guard) median s | ratio |")
        print("|---|---|---|---|")
        for name, image, prompts in inputs:
            times: dict[str, list[float]] = {"plain": [], "guarded": []}
            for i in range(args.runs):
                order = [("plain", plain), ("guarded", guarded)]
                for key, seg in order if i % 2 == 0 else order[::-1]:
                    start = time.perf_counter()
                    result = seg.segment(image, prompts)
                    times[key].append(time.perf_counter() - start)
                    assert not any(e.reason == "outside the training domain" for e in result.labels)
            a, b = np.median(times["plain"]), np.median(times["guarded"])
            print(f"| {name} | {a:.3f} | {b:.3f} | {b / a:.2f} |", flush=True)


if __name__ == "__main__":
    main()
