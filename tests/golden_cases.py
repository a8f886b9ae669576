"""Label maps that must not change when the inference code is reshaped: cases, runner and fingerprints.

Each case is a ``medsam3 segment`` command line (the command line is the most stable public surface) on
the two samples the package ships (``medsam3.assets.samples``) or on a synthetic CT volume written by
:func:`synthetic_ct`, with the bundled ``medsam3-nano`` model or the tiny random video model of
``serve_fixtures.build_model`` (detector, point tracker and video tracker; thresholds 0 so that masks are
kept). A case's fingerprint is the SHA-256 of every written label map's decoded array (with its shape and
dtype), plus the JSON summary's label entries (value, name, absent, reason, voxel / pixel counts).

The expected fingerprints in ``golden/segment_outputs.json`` were computed by this module with the code as
it was before the inference engine was reshaped; ``tests/test_golden_outputs.py`` recomputes them.
Regenerate (only after an intended change of results, and say why in the commit)::

    python tests/golden_cases.py --write [CASE ...]

(with case names: only those are recomputed, the others kept as they are).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "golden" / "segment_outputs.json"

#: case name -> (model: "nano" | "tiny", input: "hc18" | "hippo" | "ct", arguments after INPUT).
CASES: dict[str, tuple[str, str, list[str]]] = {
    "nano-hc18-text": ("nano", "hc18", ["-p", "fetal head", "--modality", "US"]),
    "nano-hc18-tta": ("nano", "hc18", ["-p", "fetal head", "--modality", "US", "--tta"]),
    "nano-hc18-instances": (
        "nano",
        "hc18",
        ["-p", "fetal head", "-p", "polyp", "--instances", "--threshold", "0.05"],
    ),
    "nano-hc18-box": (
        "nano",
        "hc18",
        ["-p", "fetal head", "--box", "250,120,650,470", "--box", "600,20,700,80,neg"],
    ),
    "nano-hc18-box-only": ("nano", "hc18", ["--box", "250,120,650,470"]),
    "nano-hippo-parts": ("nano", "hippo", ["-p", "anterior hippocampus", "-p", "posterior hippocampus"]),
    "nano-hippo-whole": ("nano", "hippo", ["-p", "hippocampus"]),
    "nano-hippo-tta-size": (
        "nano",
        "hippo",
        ["-p", "hippocampus", "--tta", "--image-size", "224", "--slice-batch", "3"],
    ),
    "nano-hippo-post": (
        "nano",
        "hippo",
        [
            "-p",
            "hippocampus",
            "--box3d",
            "5,5,10,30,45,30",
            "--min-component-voxels",
            "20",
            "--keep-largest",
            "--no-fill-holes",
            "-p",
            "anterior hippocampus",
            "--min-slices",
            "2",
        ],
    ),
    "nano-hippo-keyslice": (
        "nano",
        "hippo",
        ["-p", "hippocampus", "--box", "5,10,30,45", "--box-slice", "17", "--max-hole-pixels", "4"],
    ),
    "tiny-hc18-instances": (
        "tiny",
        "hc18",
        ["-p", "liver", "-p", "polyp", "--instances", "--threshold", "0"],
    ),
    "tiny-hc18-points": ("tiny", "hc18", ["--point", "400,260", "--point", "100,60,0", "--threshold", "0"]),
    "tiny-hc18-text-point": (
        "tiny",
        "hc18",
        ["-p", "nucleus", "--point", "400,260", "--threshold", "0", "--presence-threshold", "0"],
    ),
    "tiny-hippo-track": (
        "tiny",
        "hippo",
        ["-p", "liver", "--mode", "track", "--probes", "2", "--threshold", "0"],
    ),
    "tiny-ct-windows": (
        "tiny",
        "ct",
        ["-p", "liver", "-p", "lung nodule", "--threshold", "0", "--axis", "1"],
    ),
    "tiny-ct-window-fixed": (
        "tiny",
        "ct",
        [
            "-p",
            "liver",
            "--box",
            "4,4,20,18",
            "--box-slice",
            "3",
            "--window",
            "400,40",
            "--threshold",
            "0",
            "--tta",
        ],
    ),
}


def samples() -> Path:
    import medsam3

    return Path(medsam3.__file__).parent / "assets" / "samples"


def synthetic_ct(path: Path) -> Path:
    """A seeded ``(8, 24, 28)`` CT volume in HU, oblique-free but flipped (LAS-like), as NIfTI."""
    import nibabel as nib

    rng = np.random.default_rng(7)
    data = rng.normal(-200, 300, size=(28, 24, 8)).astype(np.int16)  # NIfTI (x, y, z)
    data[8:20, 6:18, 2:6] = 60  # a soft-tissue block
    affine = np.diag([-0.8, 0.8, 2.5, 1.0])
    affine[:3, 3] = (10.0, -20.0, 5.0)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def _input(kind: str, work: Path) -> Path:
    if kind == "hc18":
        return samples() / "hc18_400_HC.png"
    if kind == "hippo":
        return samples() / "hippocampus_019.nii.gz"
    ct = work / "synthetic_ct.nii.gz"
    return ct if ct.exists() else synthetic_ct(ct)


def _array(path: Path) -> np.ndarray:
    if path.suffix == ".png":
        from PIL import Image as PILImage

        return np.asarray(PILImage.open(path))
    import nibabel as nib

    return np.asarray(nib.load(str(path)).dataobj)


def fingerprint(out: Path) -> dict:
    """Hashes of the label maps written in ``out`` and the label entries of its JSON summary."""
    maps = sorted(list(out.glob("*_mask.png")) + list(out.glob("*_seg.nii.gz")))
    if not maps:
        raise AssertionError(f"no label map written in {out}")
    hashes = {}
    for path in maps:
        arr = np.ascontiguousarray(_array(path))
        digest = hashlib.sha256(arr.tobytes()).hexdigest()
        hashes[path.name] = f"{arr.dtype.str}{list(arr.shape)}:{digest}"
    (summary,) = [p for p in out.glob("*.json") if not p.name.endswith("_seg.json")]  # not the sidecar
    labels = json.loads(summary.read_text(encoding="utf-8"))["labels"]
    keep = ("value", "name", "absent", "reason", "area_px", "voxels", "instance")
    entries = [{k: e.get(k) for k in keep} for e in labels]
    return {"label_maps": hashes, "labels": entries}


def run_case(name: str, work: Path, tiny_model: Path) -> dict:
    """Run one case through ``medsam3 segment`` into a fresh folder under ``work``; its fingerprint."""
    from medsam3.cli import main

    model, kind, args = CASES[name]
    out = work / name
    argv = ["segment", str(_input(kind, work)), *args, "-o", str(out), "--no-overlay", "--device", "cpu"]
    if model == "tiny":
        argv += ["--model", str(tiny_model)]
    code = main(argv)
    if code != 0:
        raise AssertionError(f"{name}: medsam3 segment exited {code}")
    return fingerprint(out)


def main(argv: list[str]) -> int:
    import os
    import tempfile

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.path.insert(0, str(HERE))
    from serve_fixtures import build_model

    names = argv[1:] or list(CASES)
    if argv[:1] != ["--write"] or set(names) - set(CASES):
        print(__doc__)
        return 2
    results = json.loads(GOLDEN.read_text(encoding="utf-8")) if argv[1:] and GOLDEN.exists() else {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tiny = build_model(work / "tiny-model")
        results.update({name: run_case(name, work, tiny) for name in names})
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(
        json.dumps({n: results[n] for n in CASES if n in results}, indent=1) + "\n", encoding="utf-8"
    )
    print(f"wrote {len(names)} of {len(CASES)} cases to {GOLDEN}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
