"""How often a text prompt marks pixels on slices where its structure is absent (held-out hippocampus).

For each held-out MSD hippocampus volume of ``configs/nano_split.json``, the model segments the volume the
way ``medsam3 segment`` does (:class:`medsam3.predict.segmenter.Segmenter`, 3D path, presence threshold
0.5) with the prompts "anterior hippocampus" and "posterior hippocampus", and separately "hippocampus".
A slice (array axis 0, the axis the segmenter slices along for these volumes) counts as *empty* for a
prompt when the reference has none of the prompted structure there, and as a *hit* when the prediction
marks any pixel of that prompt on it; hits within ``NEAR`` slices of a slice that holds the structure are
counted apart (the 3D mask reaching a little too far, rather than a detection out of nowhere). Prints a
Markdown table, then the Dice of the two-prompt call per volume: each part against its label, and the
union of the two parts (the whole hippocampus as "anterior + posterior") against labels 1 + 2.

Usage (repository root): ``python benchmarks/nano_empty_slices.py DATA_DIR [--model PATH] [--tta]``
(``DATA_DIR`` holds ``msd_hippocampus/``; default model: the bundled one; ``--tta``: test-time mirroring,
as ``medsam3 segment --tta``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from medsam3.io.readers import read_image
from medsam3.model.loading import load_sam3
from medsam3.predict.prompts import Prompt
from medsam3.predict.segmenter import Segmenter

NAMES = {1: "anterior hippocampus", 2: "posterior hippocampus"}
NEAR = 2


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks (1.0 when both are empty)."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def near(present: np.ndarray, k: int) -> bool:
    """Whether slice ``k`` lies within ``NEAR`` slices of one where ``present`` (per-slice bools) is true."""
    return bool(present[max(0, k - NEAR) : k + NEAR + 1].any())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--model", default=None)
    parser.add_argument("--split", default="configs/nano_split.json")
    parser.add_argument("--tta", action="store_true", help="test-time mirroring")
    args = parser.parse_args()
    seg = Segmenter(load_sam3(args.model, device="cpu", dtype="fp32"), presence_threshold=0.5, tta=args.tta)
    cases = json.loads(Path(args.split).read_text())["datasets"]["MSD-Hippocampus"]["test"]
    parts = {"empty": 0, "hit": 0, "other_part": 0, "near": 0}
    whole = {"empty": 0, "hit": 0, "near": 0}
    dice_rows = []
    for case in cases:
        image = read_image(args.data / "msd_hippocampus/images" / f"{case}.nii.gz", modality="MR")
        ref = read_image(args.data / "msd_hippocampus/labels" / f"{case}.nii.gz").array
        labels = seg.segment(image, [Prompt(text=NAMES[1]), Prompt(text=NAMES[2])]).label_map
        dice_rows.append(
            (case, dice(labels == 1, ref == 1), dice(labels == 2, ref == 2), dice(labels > 0, ref > 0))
        )
        for value in (1, 2):
            present = (ref == value).reshape(ref.shape[0], -1).any(axis=1)
            for k in np.flatnonzero(~present):
                marked = labels[k] == value
                hit = bool(marked.any())
                parts["empty"] += 1
                parts["hit"] += hit
                parts["other_part"] += bool((marked & (ref[k] == 3 - value)).any())
                parts["near"] += hit and near(present, k)
        union = seg.segment(image, [Prompt(text="hippocampus")]).label_map > 0
        present = (ref > 0).reshape(ref.shape[0], -1).any(axis=1)
        for k in np.flatnonzero(~present):
            hit = bool(union[k].any())
            whole["empty"] += 1
            whole["hit"] += hit
            whole["near"] += hit and near(present, k)
    rate = lambda d: f"{100 * d['hit'] / max(d['empty'], 1):.1f}%"  # noqa: E731
    print(
        "| prompt | slices where the prompted structure is absent | slices with marked pixels | rate | "
        f"of them within {NEAR} slices of the structure |"
    )
    print("|---|---|---|---|---|")
    print(
        f'| "anterior hippocampus" / "posterior hippocampus" (each vs its own label) | '
        f"{parts['empty']} | {parts['hit']} ({parts['other_part']} of them on the other part) | "
        f"{rate(parts)} | {parts['near']} |"
    )
    print(
        f'| "hippocampus" (vs labels 1 + 2) | {whole["empty"]} | {whole["hit"]} | {rate(whole)} | '
        f"{whole['near']} |"
    )
    print("\n| volume | anterior Dice | posterior Dice | anterior + posterior (union vs labels 1 + 2) Dice |")
    print("|---|---|---|---|")
    for case, *values in dice_rows:
        print(f"| {case} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
    means = np.mean([row[1:] for row in dice_rows], axis=0)
    print("| mean | " + " | ".join(f"**{v:.3f}**" for v in means) + " |")


if __name__ == "__main__":
    main()
