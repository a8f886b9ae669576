"""Builders of small datasets in the layouts users have, made from the real samples in ``data_dir``.

Used by the ``test_data_*`` modules; every builder writes under a temporary folder, never into the samples.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

HIPPO_CASES = ("hippocampus_001", "hippocampus_003", "hippocampus_004", "hippocampus_006")
KVASIR_CASES = (
    "cju0qoxqj9q6s0835b43399p4",
    "cju0sxqiclckk08551ycbwhno",
    "cju0tl3uz8blh0993wxvn7ly3",
    "cju13hp5rnbjx0835bf0jowgx",
    "cju14g8o4xui30878gkgbrvqj",
)


def msd_hippocampus(data_dir: Path, dest: Path, cases=HIPPO_CASES, v2: bool = False) -> Path:
    """An MSD Task04 folder (``training`` list, ``{"0": "background", ...}`` labels) or, with ``v2``, the
    nnU-Net v2 form (``_0000`` channel files, ``{"background": 0, ...}`` labels, ``channel_names``)."""
    src = data_dir / "msd_hippocampus"
    (dest / "imagesTr").mkdir(parents=True)
    (dest / "labelsTr").mkdir()
    training = []
    for case in cases:
        image_name = f"{case}_0000.nii.gz" if v2 else f"{case}.nii.gz"
        shutil.copy(src / "images" / f"{case}.nii.gz", dest / "imagesTr" / image_name)
        shutil.copy(src / "labels" / f"{case}.nii.gz", dest / "labelsTr" / f"{case}.nii.gz")
        training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
    if v2:
        doc = {
            "channel_names": {"0": "T1"},
            "labels": {"background": 0, "Anterior": 1, "Posterior": 2},
            "numTraining": len(cases),
            "file_ending": ".nii.gz",
            "name": "Dataset004_Hippocampus",
        }
    else:
        doc = {
            "name": "Hippocampus",
            "modality": {"0": "MRI"},
            "labels": {"0": "background", "1": "Anterior", "2": "Posterior"},
            "numTraining": len(cases),
            "training": training,
        }
    (dest / "dataset.json").write_text(json.dumps(doc))
    return dest


def kvasir_folder(data_dir: Path, dest: Path, cases=KVASIR_CASES) -> Path:
    """Kvasir-SEG layout: ``images/<id>.jpg`` + ``masks/<id>.jpg`` (JPEG masks)."""
    src = data_dir / "kvasir_seg_sample"
    (dest / "images").mkdir(parents=True)
    (dest / "masks").mkdir()
    for case in cases:
        shutil.copy(src / "images" / f"{case}.jpg", dest / "images" / f"{case}.jpg")
        shutil.copy(src / "masks" / f"{case}.jpg", dest / "masks" / f"{case}.jpg")
    return dest


def hc18_folder(data_dir: Path, dest: Path, n: int = 5) -> Path:
    """HC18 layout: ``training_set/<id>_HC.png`` + ``<id>_HC_Annotation.png`` in the same folder."""
    src = data_dir / "hc18_ultrasound" / "training_set"
    (dest / "training_set").mkdir(parents=True)
    for image in sorted(src.glob("*_HC.png"))[:n]:
        shutil.copy(image, dest / "training_set" / image.name)
        mask = image.with_name(image.stem + "_Annotation.png")
        shutil.copy(mask, dest / "training_set" / mask.name)
    return dest


def recist_npz(data_dir: Path, dest: Path, n: int = 2) -> list[Path]:
    """Copies of the first ``n`` BiomedSegFM npz files (no text prompts, as shipped)."""
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for f in sorted((data_dir / "medsam2_recist_npz").glob("*.npz"))[:n]:
        shutil.copy(f, dest / f.name)
        out.append(dest / f.name)
    return out


def stardist_instances(data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The real 2D fluorescence image (uint16) and its instance label map (0 background, 1..N nuclei)."""
    import tifffile

    src = data_dir / "stardist_pkg"
    return tifffile.imread(src / "img2d.tif"), tifffile.imread(src / "mask2d.tif")


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE of a binary mask: run lengths in column-major order, starting with zeros."""
    flat = mask.T.reshape(-1).astype(np.uint8)
    counts, current, run = [], 0, 0
    for v in flat:
        if v == current:
            run += 1
        else:
            counts.append(run)
            current, run = int(v), 1
    counts.append(run)
    return {"counts": counts, "size": [int(mask.shape[0]), int(mask.shape[1])]}
