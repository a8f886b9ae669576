"""Absent-concept false positives of a model on images unlike its training data.

Every image of the BiomedParse demo sample (``biomedparse_demo/demo/``: 22 images, CT, MRI, X-ray,
pathology, ultrasound, fundus, endoscopy, dermoscopy, OCT) is prompted with each of the concepts below that
its reference masks (``demo_mask/<stem>_<concept>.png``) and its subject do not contain; a false positive
is any pixel given to such a prompt (the defaults of ``medsam3 segment``: confidence > 0.1, presence >=
0.5). Image 12 (brain MRI) shows the hippocampus and 22 (transperineal ultrasound) a fetal head, and 24
(colonoscopy) a polyp: those prompts are skipped there. Prints a Markdown table and the false positives.

Usage (repository root): ``python benchmarks/nano_absent_ood.py DATA_DIR [--model PATH]``
(``DATA_DIR`` holds ``biomedparse_demo/``; default model: the bundled one).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from medsam3.io.modality import modality_from_name
from medsam3.io.readers import read_image
from medsam3.model.loading import load_sam3
from medsam3.predict.prompts import Prompt
from medsam3.predict.segmenter import Segmenter

CONCEPTS = ("fetal head", "polyp", "anterior hippocampus", "posterior hippocampus", "hippocampus")
#: Image stem prefix -> concepts visible there (skipped as prompts).
VISIBLE = {
    "12_": {"anterior hippocampus", "posterior hippocampus", "hippocampus"},
    "22_": {"fetal head"},
    "24_": {"polyp"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    seg = Segmenter(load_sam3(args.model, device="cpu", dtype="fp32"), presence_threshold=0.5)
    images = sorted((args.data / "biomedparse_demo" / "demo").glob("*.png"))
    prompts = hits = 0
    per_concept = {c: [0, 0] for c in CONCEPTS}
    found = []
    for path in images:
        skip = next((v for k, v in VISIBLE.items() if path.stem.startswith(k)), set())
        texts = [c for c in CONCEPTS if c not in skip]
        image = read_image(path, modality=modality_from_name(path.stem) or "OTHER")  # OCT: OTHER
        for text in texts:  # one prompt per call: each is judged on its own
            result = seg.segment(image, [Prompt(text=text)])
            pixels = int((result.label_map > 0).sum())
            prompts += 1
            per_concept[text][0] += 1
            if pixels:
                hits += 1
                per_concept[text][1] += 1
                entry = result.labels[0]
                found.append(
                    f"{path.stem} prompted {text!r}: {pixels} pixels, score {entry.score:.3f}, "
                    f"presence {entry.presence:.3f}"
                )
    print(
        f"{len(images)} images, {prompts} prompts, {hits} with a false positive "
        f"({100 * hits / max(prompts, 1):.1f}%)\n"
    )
    print("| prompt | prompts | with a false positive |")
    print("|---|---|---|")
    for concept, (n, k) in per_concept.items():
        print(f"| {concept} | {n} | {k} |")
    for line in found:
        print(f"- {line}")


if __name__ == "__main__":
    main()
