"""Record medsam3-nano's training domain (``domain.safetensors``) in a model folder.

The training cases are split ``train`` of ``configs/nano_split.json`` (the held-out ``test`` cases are
never used): the HC18 images for "fetal head", the Kvasir-SEG images for "polyp", the MSD hippocampus
volumes for "hippocampus" and its two parts. The negatives are the ``training_pool`` of
``configs/nano_ood_heldout.json`` (images of other modalities that may be trained on; its held-out items
are never used). Each is segmented by the model in the folder with the
defaults of ``medsam3 segment``, and the descriptors of its encoder passes are fitted per concept
(:mod:`medsam3.model.domain`).

    python scripts/nano_domain.py MODEL_DIR DATA_DIR
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from medsam3.io.readers import read_image
from medsam3.predict.domain_fit import DomainCase, fit_domain
from medsam3.predict.segmenter import Segmenter

REPO = Path(__file__).resolve().parents[1]
HIPPOCAMPUS = ("hippocampus", "anterior hippocampus", "posterior hippocampus")


def training_cases(data: Path, split: dict):
    train = {name: ds["train"] for name, ds in split["datasets"].items()}
    for case in train["HC18"]:
        image = read_image(data / f"hc18_ultrasound/training_set/{case}.png", modality="US")
        yield DomainCase(case, ("fetal head",), image)
    for case in train["Kvasir-SEG"]:
        yield DomainCase(case, ("polyp",), read_image(data / f"kvasir_seg_sample/images/{case}.jpg"))
    for case in train["MSD-Hippocampus"]:
        yield DomainCase(case, HIPPOCAMPUS, read_image(data / f"msd_hippocampus/images/{case}.nii.gz"))


def negative_cases(data: Path, heldout: dict):
    """The bundle-compatible images of other modalities left for training (``training_pool``): negatives
    for every concept but those it may show (``not_negative_for``)."""
    concepts = ("fetal head", "polyp", *HIPPOCAMPUS)
    for it in heldout["training_pool"]:
        skip = set(it.get("not_negative_for", ()))
        yield DomainCase(
            it["path"], tuple(c for c in concepts if c not in skip), read_image(data / it["path"])
        )


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    model, data = Path(sys.argv[1]), Path(sys.argv[2])
    split = json.loads((REPO / "configs/nano_split.json").read_text())
    start = time.perf_counter()
    segmenter = Segmenter(str(model), device="cpu", dtype="fp32", concepts=None)  # no guard while fitting
    domain = fit_domain(
        segmenter,
        training_cases(data, split),
        negatives=negative_cases(data, json.loads((REPO / "configs/nano_ood_heldout.json").read_text())),
        info={
            "split": "configs/nano_split.json (train)",
            "datasets": ["HC18", "Kvasir-SEG", "MSD-Hippocampus"],
        },
    )
    path = domain.write(model)
    for name, dom in domain.concepts.items():
        print(
            f"{name}: {len(set(dom.cases.tolist()))} cases, {len(dom.features)} rows, "
            f"threshold {dom.threshold:.4f} (spread {dom.spread:.4f}, nearest negative "
            f"{dom.nearest_negative if dom.nearest_negative is None else round(dom.nearest_negative, 4)})"
        )
    print(f"wrote {path} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
