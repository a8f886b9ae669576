"""medsam3-nano out of its domain: false positives on other modalities, unknown prompts, in-domain Dice.

For each model folder given (``--model NAME=DIR``, several compare in one run: the model before and after
a retraining), with the defaults of ``medsam3 segment`` (confidence > 0.1, presence >= 0.5; volumes whole,
slices mode), every prompt in its own call:

1. **Out-of-domain matrix**: every known prompt (the five concepts of ``medsam3-nano``) on every held-out
   item of another modality of ``configs/nano_ood_heldout.json`` (CT, MR, microscopy: never trained on,
   also not as negatives), and on the images of an unseen source (``biomedparse_demo``: evaluation only).
   Any pixel / voxel given to such a prompt is a false positive, except where the list says the concept
   may be visible (the hippocampus in whole-brain MRI, the fetal head in the transperineal ultrasound, the
   polyp in the colonoscopy image): those pairs are skipped.
   A model that records its training domain (``domain.safetensors``, :mod:`medsam3.model.domain`) is
   also run with ``allow_out_of_domain`` (column "NAME, network alone"): what the network answers when
   the domain guard does not stop it.
2. **Unknown prompts on in-domain images**: concepts the model never learnt (``liver``, ``kidney``, ...) on
   the held-out in-domain cases, as users run them (the vocabulary guard of a model with ``concepts.json``
   reports them absent) and with ``allow_unknown_concepts`` (what the network itself answers).
3. **In-domain Dice per case**: the held-out cases of ``configs/nano_split.json`` (split ``test``): HC18
   fetal head, MSD hippocampus as 3D volumes (whole, anterior, posterior), Kvasir-SEG polyp.

Writes a Markdown report (``--out``) with the exact command, the machine and its load, and the numbers,
and (``--json``) the raw records.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/nano_ood_matrix.py DATA_DIR \
        [--model before=src/medsam3/assets/models/medsam3-nano \
         --model after=outputs/nano/stage6/export/final] \
        [--out benchmarks/results/nano_ood.md] [--json outputs/nano_ood.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image as PILImage

from medsam3.evaluate.metrics import dice
from medsam3.image import Image
from medsam3.io.modality import modality_from_name
from medsam3.io.readers import read_image
from medsam3.model.concepts import ModelConcepts
from medsam3.model.loading import load_sam3
from medsam3.model.resolve import BUNDLED_MODEL_DIR
from medsam3.predict.segmenter import Segmenter

REPO = Path(__file__).resolve().parents[1]
#: The concepts medsam3-nano was trained on (the prompts of the matrix when a model records none).
NANO_CONCEPTS = ("fetal head", "polyp", "hippocampus", "anterior hippocampus", "posterior hippocampus")
#: Concepts no version of medsam3-nano learnt, prompted on the in-domain images.
UNKNOWN = ("liver", "kidney", "brain tumor", "lung nodule", "heart")
#: Hippocampus references: concept -> label values of the MSD label map.
HIPPO_VALUES = {"hippocampus": (1, 2), "anterior hippocampus": (1,), "posterior hippocampus": (2,)}


def crop(image: Image, box: list[int]) -> Image:
    """A 2D image cut to rows ``y0:y1`` and columns ``x0:x1`` (geometry kept; the origin is not moved)."""
    y0, y1, x0, x1 = box
    return Image(
        image.array[y0:y1, x0:x1],
        image.spacing,
        image.origin,
        image.direction,
        image.modality,
        dict(image.meta),
    )


def ood_items(data: Path, heldout: dict) -> list[dict[str, Any]]:
    """The held-out items and the unseen-source images: id, group, source, image, prompts skipped."""
    items = []
    for it in heldout["heldout"]:
        image = read_image(data / it["path"])
        if it.get("crop"):
            image = crop(image, it["crop"])
        items.append({**it, "image": image, "skip": set(it.get("visible", ()))})
    unseen = heldout["unseen_sources"]
    for path in sorted((data / unseen["folder"]).glob(unseen["pattern"])):
        skip = next((set(v) for k, v in unseen["visible"].items() if path.stem.startswith(k)), set())
        group = path.stem.split("_")[1]
        image = read_image(path, modality=modality_from_name(path.stem) or "OTHER")
        items.append(
            {
                "id": path.stem,
                "group": f"{group} (unseen source)",
                "source": unseen["source"],
                "kind": "2d",
                "image": image,
                "skip": skip,
            }
        )
    return items


def in_domain_cases(data: Path, split: dict) -> list[dict[str, Any]]:
    """The held-out in-domain cases with their references (boolean masks per concept, on the input grid)."""
    test = {name: ds["test"] for name, ds in split["datasets"].items()}
    out = []
    for case in test["HC18"]:
        ref = np.asarray(PILImage.open(data / f"hc18_ultrasound/training_set/{case}_Annotation.png"))
        ref = (ref[..., 0] if ref.ndim == 3 else ref) > 127
        image = read_image(data / f"hc18_ultrasound/training_set/{case}.png", modality="US")
        out.append({"dataset": "HC18", "case": case, "image": image, "refs": {"fetal head": ref}})
    for case in test["MSD-Hippocampus"]:
        image = read_image(data / f"msd_hippocampus/images/{case}.nii.gz")
        labels = read_image(data / f"msd_hippocampus/labels/{case}.nii.gz").array
        refs = {c: np.isin(labels, v) for c, v in HIPPO_VALUES.items()}
        out.append({"dataset": "MSD-Hippocampus", "case": case, "image": image, "refs": refs})
    for case in test["Kvasir-SEG"]:
        ref = np.asarray(PILImage.open(data / f"kvasir_seg_sample/masks/{case}.jpg").convert("L")) > 127
        image = read_image(data / f"kvasir_seg_sample/images/{case}.jpg")
        out.append({"dataset": "Kvasir-SEG", "case": case, "image": image, "refs": {"polyp": ref}})
    return out


def marked(seg: Segmenter, image: Image, text: str, **options: Any) -> tuple[int, dict[str, Any]]:
    """Pixels / voxels ``text`` gets on ``image`` in a call of its own, and its label entry."""
    result = seg.segment(image, [text], **options)
    entry = result.labels[0]
    return int((result.label_map > 0).sum()), {
        "score": entry.score,
        "presence": entry.presence,
        "reason": entry.reason,
    }


def run_model(
    name: str, folder: str, items: list[dict], cases: list[dict], *, network: bool = False
) -> dict[str, Any]:
    """Every part for one model folder; ``network``: with ``allow_out_of_domain`` (the domain guard off:
    what the network answers on every image)."""
    options = {"allow_out_of_domain": True} if network else {}
    seg = Segmenter(load_sam3(folder, device="cpu", dtype="fp32"), presence_threshold=0.5, **options)
    recorded = ModelConcepts.of_model(folder)
    known = tuple(recorded.names) if recorded is not None else NANO_CONCEPTS
    out: dict[str, Any] = {
        "name": name,
        "model": folder,
        "concepts": list(known),
        "guard": bool(recorded is not None and recorded.restricts),
        "domain": seg.domain is not None and not network,
        "seconds": {},
    }
    start = time.perf_counter()
    matrix = []
    for it in items:
        for text in known:
            if text in it["skip"]:
                continue
            n, entry = marked(seg, it["image"], text)
            matrix.append(
                {
                    "id": it["id"],
                    "group": it["group"],
                    "source": it["source"],
                    "prompt": text,
                    "marked": n,
                    **entry,
                }
            )
    out["matrix"] = matrix
    out["seconds"]["matrix"] = time.perf_counter() - start

    start = time.perf_counter()
    unknown = []
    for c in cases:
        for text in UNKNOWN:
            guarded, g_entry = marked(seg, c["image"], text)
            raw, r_entry = marked(seg, c["image"], text, allow_unknown_concepts=True)
            unknown.append(
                {
                    "dataset": c["dataset"],
                    "case": c["case"],
                    "prompt": text,
                    "guarded": guarded,
                    "guarded_reason": g_entry["reason"],
                    "raw": raw,
                    "raw_score": r_entry["score"],
                    "raw_presence": r_entry["presence"],
                }
            )
    out["unknown"] = unknown
    out["seconds"]["unknown"] = time.perf_counter() - start

    start = time.perf_counter()
    dices = []
    for c in cases:
        for text, ref in c["refs"].items():
            result = seg.segment(c["image"], [text])
            pred = result.label_map > 0
            dices.append(
                {
                    "dataset": c["dataset"],
                    "case": c["case"],
                    "prompt": text,
                    "dice": float(dice(pred, ref)),
                    "reason": result.labels[0].reason,
                }
            )
    out["dice"] = dices
    out["seconds"]["dice"] = time.perf_counter() - start
    return out


# -- report ---------------------------------------------------------------------------------------------
def _rate(rows: list[dict], key: str = "marked") -> str:
    hits = sum(r[key] > 0 for r in rows)
    return f"{hits} / {len(rows)} ({100 * hits / max(len(rows), 1):.1f}%)"


def report(runs: list[dict], command: str, heldout_path: str, items: list[dict]) -> str:
    names = [r["name"] for r in runs]
    lines = [
        "# medsam3-nano out of its domain: false positives, unknown prompts, in-domain Dice",
        "",
        f"Written by `benchmarks/nano_ood_matrix.py` on {dt.date.today().isoformat()}. Models: "
        + ", ".join(
            f"**{r['name']}** (`{r['model']}`, "
            f"{'vocabulary guard on' if r['guard'] else 'no concepts.json'}, "
            f"{'domain guard on' if r['domain'] else 'no domain guard'})"
            for r in runs
        )
        + ".",
        "",
        "## Command",
        "",
        "```",
        command,
        "```",
        "",
        f"Machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPU cores shared with "
        f"other users, load average at the end {', '.join(f'{v:.1f}' for v in os.getloadavg())}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, Python {platform.python_version()}. "
        "Settings: the defaults of `medsam3 segment` (confidence > 0.1, presence >= 0.5), fp32 on the CPU, "
        "each prompt in its own call, volumes whole (slices mode, 3D post-processing).",
        "",
        f"Held-out list: `{heldout_path}` ({sum(1 for i in items if i['source'] != 'biomedparse_demo')} "
        "items of other modalities, never trained on; their licences are recorded there) and the "
        f"{sum(1 for i in items if i['source'] == 'biomedparse_demo')} images of `biomedparse_demo/demo` "
        "(an unseen source, evaluation only).",
        "",
        "## 1. Known prompts on other modalities (each mask is a false positive)",
        "",
        "| set | " + " | ".join(f"{n}: (image, prompt) pairs with a mask" for n in names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for label, pick in (
        ("held-out list (CT, MR, microscopy)", lambda r: r["source"] != "biomedparse_demo"),
        ("unseen source (biomedparse_demo)", lambda r: r["source"] == "biomedparse_demo"),
        ("all", lambda r: True),
    ):
        lines.append(
            f"| {label} | " + " | ".join(_rate([m for m in r["matrix"] if pick(m)]) for r in runs) + " |"
        )
    lines += ["", "Per group and prompt (pairs with a mask / pairs):", ""]
    prompts = runs[0]["concepts"]
    groups = sorted({m["group"] for m in runs[0]["matrix"]})
    lines.append("| group | model | " + " | ".join(prompts) + " |")
    lines.append("|---|---|" + "---|" * len(prompts))
    for g in groups:
        for r in runs:
            cells = []
            for p in prompts:
                rows = [m for m in r["matrix"] if m["group"] == g and m["prompt"] == p]
                cells.append(f"{sum(m['marked'] > 0 for m in rows)} / {len(rows)}" if rows else "-")
            lines.append(f"| {g} | {r['name']} | " + " | ".join(cells) + " |")
    lines += ["", "False positives (item, prompt: pixels or voxels, score, presence):", ""]
    for r in runs:
        hits = [m for m in r["matrix"] if m["marked"]]
        lines.append(
            f"- **{r['name']}**: "
            + (
                "none"
                if not hits
                else "; ".join(
                    f"{m['id']} / {m['prompt']}: {m['marked']}, {m['score']:.2f}, {m['presence']:.2f}"
                    for m in hits
                )
            )
        )
    lines += [
        "",
        "## 2. Unknown prompts on in-domain images",
        "",
        "Prompts: "
        + ", ".join(f"`{u}`" for u in UNKNOWN)
        + " on each held-out in-domain case. *As run*: the "
        "defaults (a model with `concepts.json` reports them as `unknown concept`); *network*: with "
        "`allow_unknown_concepts` (what the network answers when asked).",
        "",
        "| dataset | model | as run: prompts with a mask | network: prompts with a mask |",
        "|---|---|---|---|",
    ]
    for ds in ("HC18", "MSD-Hippocampus", "Kvasir-SEG"):
        for r in runs:
            rows = [u for u in r["unknown"] if u["dataset"] == ds]
            lines.append(f"| {ds} | {r['name']} | {_rate(rows, 'guarded')} | {_rate(rows, 'raw')} |")
    lines += ["", "Network answers per prompt (cases with a mask / cases, median presence):", ""]
    lines.append("| prompt | " + " | ".join(names) + " |")
    lines.append("|---|" + "---|" * len(names))
    for u in UNKNOWN:
        cells = []
        for r in runs:
            rows = [x for x in r["unknown"] if x["prompt"] == u]
            pres = [x["raw_presence"] for x in rows if x["raw_presence"] is not None]
            cells.append(
                f"{sum(x['raw'] > 0 for x in rows)} / {len(rows)}, "
                f"{np.median(pres) if pres else float('nan'):.2f}"
            )
        lines.append(f"| {u} | " + " | ".join(cells) + " |")
    lines += ["", "## 3. In-domain Dice per case (held-out split of `configs/nano_split.json`)", ""]
    lines.append("| dataset | case | prompt | " + " | ".join(names) + " |")
    lines.append("|---|---|---|" + "---|" * len(names))
    for i, d in enumerate(runs[0]["dice"]):
        lines.append(
            f"| {d['dataset']} | {d['case']} | {d['prompt']} | "
            + " | ".join(f"{r['dice'][i]['dice']:.3f}" for r in runs)
            + " |"
        )
    refused = [
        f"{r['name']}: {sum(d.get('reason') == 'outside the training domain' for d in r['dice'])} of "
        f"{len(r['dice'])}"
        for r in runs
    ]
    lines += [
        "",
        "Held-out in-domain prompts reported outside the training domain: " + "; ".join(refused) + ".",
    ]
    lines += ["", "Means:", "", "| dataset | prompt | " + " | ".join(names) + " |"]
    lines.append("|---|---|" + "---|" * len(names))
    keys = list(dict.fromkeys((d["dataset"], d["prompt"]) for d in runs[0]["dice"]))
    for ds, p in keys:
        means = [
            np.mean([d["dice"] for d in r["dice"] if (d["dataset"], d["prompt"]) == (ds, p)]) for r in runs
        ]
        lines.append(f"| {ds} | {p} | " + " | ".join(f"**{m:.3f}**" for m in means) + " |")
    lines += [
        "",
        "Seconds per part: "
        + "; ".join(
            f"{r['name']}: " + ", ".join(f"{k} {v:.0f}" for k, v in r["seconds"].items()) for r in runs
        )
        + ".",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, help="the public samples folder (../shared/data)")
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="a model folder to measure, named in the report (repeat to compare; "
        "default: the bundled model as 'before')",
    )
    parser.add_argument("--heldout", default="configs/nano_ood_heldout.json")
    parser.add_argument("--split", default="configs/nano_split.json")
    parser.add_argument("--out", type=Path, default=None, help="Markdown report (default: print it)")
    parser.add_argument("--json", type=Path, default=None, help="raw records")
    args = parser.parse_args()
    models = [m.split("=", 1) if "=" in m else (Path(m).name, m) for m in args.model] or [
        ("before", str(BUNDLED_MODEL_DIR.relative_to(REPO)))
    ]
    heldout = json.loads((REPO / args.heldout).read_text(encoding="utf-8"))
    split = json.loads((REPO / args.split).read_text(encoding="utf-8"))
    items = ood_items(args.data, heldout)
    cases = in_domain_cases(args.data, split)
    runs = []
    for name, folder in models:
        runs.append(run_model(name, folder, items, cases))
        if runs[-1]["domain"]:  # the same model without its domain guard, in the same run
            runs.append(run_model(f"{name}, network alone", folder, items, cases, network=True))
    command = "OMP_WAIT_POLICY=PASSIVE python " + " ".join(
        shlex.quote(a) for a in [os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]]
    )
    text = report(runs, command, args.heldout, items)
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    else:
        print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(runs, indent=1, default=str) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
