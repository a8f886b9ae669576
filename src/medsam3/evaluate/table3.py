"""Reproduce the Medical SAM3 paper's Table 3: vanilla SAM3 vs Medical SAM3, text prompts only.

One call prepares the paper's 17 evaluation datasets from their registry entries
(:mod:`medsam3.data.registry`): the 10 internal tasks are the 15% validation split (seed 42, the split of
``medsam3 prepare``) of their training datasets, the 7 external datasets are evaluated whole. Both models run
text-only with the paper's rule (:mod:`medsam3.evaluate.run_model`: best mask above confidence 0.1); the
external datasets get the paper's prompts (:data:`EXTERNAL_PROMPTS`, e.g. "Polyp"), the internal ones their
canonical concepts. The report folder gets the usual files (:mod:`medsam3.evaluate.report`) plus
``table3.md`` / ``table3.csv``: per dataset the paper's Dice beside ours and the difference, and the
Internal / External averages (Dice and IoU), ours against the paper's over the same datasets.

Data root: one folder per dataset directly under it, named like the registry entry (case, spaces, ``-``
and ``_`` ignored: ``HC18``, ``cvc_clinicdb``, ``PS-FH-AOP-2023``), holding the release as downloaded. A
dataset whose folder is absent, or whose release has no reader (PAPILA ships contour text files: convert it
first, see ``medsam3 prepare --list``), appears in the table as not run, with the reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medsam3.data import registry
from medsam3.data.indexing import prepare_dataset
from medsam3.data.manifest import Record, manifest_text
from medsam3.errors import InputError
from medsam3.evaluate.figures import GalleryCollector
from medsam3.evaluate.report import csv_text, write_report
from medsam3.evaluate.rows import CaseRow
from medsam3.evaluate.run_model import ModelSpec, RunOptions, run_models

log = logging.getLogger(__name__)

VANILLA, MEDICAL = "SAM3", "Medical SAM3"


@dataclass(frozen=True)
class PaperRow:
    """One dataset of the paper's Table 3 (Dice %, text prompts only)."""

    dataset: str  # registry name
    section: str  # internal / external
    sam3_dice: float
    medsam3_dice: float


#: The paper's Table 3 (arXiv 2601.10880): Dice % of vanilla SAM3 and Medical SAM3, text prompts only.
PAPER_TABLE3: tuple[PaperRow, ...] = (
    PaperRow("PS-FH-AOP-2023", "internal", 65.7, 91.6),
    PaperRow("DRIVE", "internal", 24.8, 55.8),
    PaperRow("COph100", "internal", 34.1, 63.1),
    PaperRow("Breast Cancer Segmentation", "internal", 16.3, 43.8),
    PaperRow("Intraretinal Cystoid Fluid", "internal", 62.0, 85.0),
    PaperRow("m2caiSeg", "internal", 67.7, 88.1),
    PaperRow("FetoPlac", "internal", 56.6, 77.0),
    PaperRow("GlaS 2015", "internal", 68.9, 88.2),
    PaperRow("SegThy", "internal", 57.3, 78.5),
    PaperRow("PAPILA", "internal", 86.2, 99.4),
    PaperRow("TN3K", "external", 4.2, 40.8),
    PaperRow("HC18", "external", 23.9, 92.6),
    PaperRow("CVC-ClinicDB", "external", 0.0, 87.9),
    PaperRow("ETIS-Larib", "external", 0.0, 86.1),
    PaperRow("PH2", "external", 18.4, 92.7),
    PaperRow("CHASE_DB1", "external", 17.9, 62.6),
    PaperRow("STARE", "external", 18.6, 54.4),
)

#: The paper's section averages (Dice % and IoU %): (vanilla SAM3, Medical SAM3).
PAPER_AVERAGES: dict[str, dict[str, tuple[float, float]]] = {
    "internal": {"dice": (54.0, 77.0), "iou": (43.3, 67.3)},
    "external": {"dice": (11.9, 73.9), "iou": (8.0, 64.4)},
}

#: Prompts the paper used on the external datasets, by canonical concept.
EXTERNAL_PROMPTS: dict[str, str] = {
    "retinal blood vessel": "Retinal Blood Vessel",
    "polyp": "Polyp",
    "skin lesion": "Skin Lesion",
    "thyroid nodule": "thyroid nodule",
    "fetal head": "fetal head",
    "cell nucleus": "cell nucleus",
}


# -- data --------------------------------------------------------------------------------------------------
def find_dataset_folders(data_root: str | Path) -> dict[str, Path]:
    """Registry name -> folder, for the sub-folders of ``data_root`` named like a Table 3 dataset."""
    root = Path(data_root)
    if not root.is_dir():
        raise InputError(root, "data root folder not found")
    wanted = {row.dataset for row in PAPER_TABLE3}
    out: dict[str, Path] = {}
    for child in sorted(root.iterdir()):
        if not child.is_dir():
            continue
        try:
            entry = registry.get(child.name)
        except InputError:
            continue
        if entry.name in wanted:
            if entry.name in out:
                raise InputError(child, f"is a second folder for {entry.name} (first: {out[entry.name]})")
            out[entry.name] = child
    return out


def prepare_registry_dataset(name: str, folder: Path) -> list[Record]:
    """Records of one registry dataset, with its layout, options, labels and split rule
    (what ``medsam3 prepare --dataset NAME`` produces)."""
    entry = registry.get(name)
    if entry.layout is None:
        raise InputError(folder, f"no reader for the {entry.name} release format. {entry.notes}")
    options = dict(entry.options)
    labels = None
    if entry.labels is not None:
        if entry.layout == "folder2d":
            options.setdefault("labels", entry.labels)
        else:
            labels = entry.labels
    drop_empty = bool(options.pop("drop_empty", False))
    records, _, _ = prepare_dataset(
        entry.name,
        entry.layout,
        folder,
        options=options,
        labels=labels,
        modality=entry.modality,
        group=entry.group,
        role=entry.split_role,
        drop_empty=drop_empty,
    )
    return records


def evaluation_records(
    data_root: str | Path, datasets: list[str] | None = None
) -> tuple[list[Record], dict[str, str]]:
    """Records of the Table 3 datasets found under ``data_root`` (internal: val split; external: all)
    and, for every dataset not run, the reason."""
    folders = find_dataset_folders(data_root)
    wanted = None if datasets is None else {registry.get(d).name for d in datasets}
    known = {r.dataset for r in PAPER_TABLE3}
    if wanted is not None and not wanted <= known:
        raise InputError(None, f"{sorted(wanted - known)} are not Table 3 datasets")
    chosen = [r for r in PAPER_TABLE3 if wanted is None or r.dataset in wanted]
    records: list[Record] = []
    skipped: dict[str, str] = {}
    for row in chosen:
        folder = folders.get(row.dataset)
        if folder is None:
            skipped[row.dataset] = f"no folder named {row.dataset!r} under {data_root}"
            continue
        try:
            found = prepare_registry_dataset(row.dataset, folder)
        except InputError as exc:
            skipped[row.dataset] = f"cannot prepare: {exc}"
            continue
        split = "val" if row.section == "internal" else "test"
        kept = [r for r in found if r.split == split]
        if not kept:
            skipped[row.dataset] = f"no {split} records"
            continue
        records.extend(kept)
    return records, skipped


def prompt_overrides(records: list[Record]) -> dict[str, str]:
    """``"dataset:concept" -> text``: the paper's external prompts, for the external datasets only."""
    external = {r.dataset for r in PAPER_TABLE3 if r.section == "external"}
    out = {}
    for rec in records:
        if rec.dataset in external:
            for c in rec.concepts:
                if c in EXTERNAL_PROMPTS:
                    out[f"{rec.dataset}:{c}"] = EXTERNAL_PROMPTS[c]
    return out


# -- the table ---------------------------------------------------------------------------------------------
def _means(rows: list[CaseRow], dataset: str, model: str) -> tuple[float, float, int] | None:
    sel = [r for r in rows if r.dataset == dataset and r.model == model]
    if not sel:
        return None
    return (
        100 * float(np.mean([r.value("dice") for r in sel])),
        100 * float(np.mean([r.value("iou") for r in sel])),
        len(sel),
    )


def comparison(rows: list[CaseRow], skipped: dict[str, str]) -> dict[str, Any]:
    """Per dataset and per section: the paper's numbers, ours and the differences (Dice %, IoU %)."""
    out: dict[str, Any] = {"datasets": [], "averages": []}
    for section in ("internal", "external"):
        members = [r for r in PAPER_TABLE3 if r.section == section]
        ran = []
        for p in members:
            v, m = _means(rows, p.dataset, VANILLA), _means(rows, p.dataset, MEDICAL)
            entry = {
                "section": section,
                "dataset": p.dataset,
                "paper_sam3": p.sam3_dice,
                "paper_medsam3": p.medsam3_dice,
                "ours_sam3": v[0] if v else None,
                "ours_medsam3": m[0] if m else None,
                "n": max(v[2] if v else 0, m[2] if m else 0),
                "note": skipped.get(p.dataset, ""),
            }
            out["datasets"].append(entry)
            if v and m:
                ran.append((p, v, m))
        paper = PAPER_AVERAGES[section]
        avg = {
            "section": section,
            "datasets_run": len(ran),
            "datasets_total": len(members),
            "paper_sam3_dice": paper["dice"][0],
            "paper_medsam3_dice": paper["dice"][1],
            "paper_sam3_iou": paper["iou"][0],
            "paper_medsam3_iou": paper["iou"][1],
        }
        if ran:
            avg.update(
                ours_sam3_dice=float(np.mean([v[0] for _, v, _ in ran])),
                ours_medsam3_dice=float(np.mean([m[0] for _, _, m in ran])),
                ours_sam3_iou=float(np.mean([v[1] for _, v, _ in ran])),
                ours_medsam3_iou=float(np.mean([m[1] for _, _, m in ran])),
                paper_same_sam3_dice=float(np.mean([p.sam3_dice for p, _, _ in ran])),
                paper_same_medsam3_dice=float(np.mean([p.medsam3_dice for p, _, _ in ran])),
            )
        out["averages"].append(avg)
    return out


def _f(v: float | None) -> str:
    return "–" if v is None else f"{v:.1f}"


def _d(ours: float | None, paper: float | None) -> str:
    return "–" if ours is None or paper is None else f"{ours - paper:+.1f}"


def table3_markdown(comp: dict[str, Any]) -> str:
    """``table3.md``: paper vs ours per dataset and per section average."""
    head = (
        "| Dataset | n | SAM3 paper | SAM3 ours | Δ | Medical SAM3 paper | Medical SAM3 ours | Δ "
        "| note |\n|---|---|---|---|---|---|---|---|---|"
    )
    lines = ["# Table 3: Dice % with text prompts only, the paper's numbers beside ours", "", head]
    for section, title in (("internal", "Internal"), ("external", "External")):
        lines.append(f"| **{title}** |" + " |" * 8)
        for e in (e for e in comp["datasets"] if e["section"] == section):
            lines.append(
                f"| {e['dataset']} | {e['n'] or ''} | {_f(e['paper_sam3'])} | {_f(e['ours_sam3'])} | "
                f"{_d(e['ours_sam3'], e['paper_sam3'])} | {_f(e['paper_medsam3'])} | "
                f"{_f(e['ours_medsam3'])} | "
                f"{_d(e['ours_medsam3'], e['paper_medsam3'])} | {e['note']} |"
            )
        a = next(a for a in comp["averages"] if a["section"] == section)
        k, n = a["datasets_run"], a["datasets_total"]
        lines.append(
            f"| *{title} average, Dice ({k} of {n} run; paper over the same)* | | "
            f"{_f(a.get('paper_same_sam3_dice'))} | {_f(a.get('ours_sam3_dice'))} | "
            f"{_d(a.get('ours_sam3_dice'), a.get('paper_same_sam3_dice'))} | "
            f"{_f(a.get('paper_same_medsam3_dice'))} | {_f(a.get('ours_medsam3_dice'))} | "
            f"{_d(a.get('ours_medsam3_dice'), a.get('paper_same_medsam3_dice'))} | |"
        )
        lines.append(
            f"| *{title} average, Dice (paper, all {n})* | | {_f(a['paper_sam3_dice'])} | | | "
            f"{_f(a['paper_medsam3_dice'])} | | | |"
        )
        lines.append(
            f"| *{title} average, IoU (paper all {n}; ours {k})* | | {_f(a['paper_sam3_iou'])} | "
            f"{_f(a.get('ours_sam3_iou'))} | | {_f(a['paper_medsam3_iou'])} | {_f(a.get('ours_medsam3_iou'))}"
            " | | |"
        )
    lines += [
        "",
        "Δ = ours − paper (percentage points). Averages are means of dataset means. The paper "
        "gives IoU only as section averages.",
    ]
    return "\n".join(lines) + "\n"


def table3_csv(comp: dict[str, Any]) -> str:
    """``table3.csv``: one row per dataset and one per section average."""
    header = [
        "section",
        "dataset",
        "n",
        "paper_sam3_dice",
        "ours_sam3_dice",
        "diff_sam3_dice",
        "paper_medsam3_dice",
        "ours_medsam3_dice",
        "diff_medsam3_dice",
        "paper_sam3_iou",
        "ours_sam3_iou",
        "paper_medsam3_iou",
        "ours_medsam3_iou",
        "note",
    ]

    def diff(o, p):
        return "" if o is None or p is None else round(o - p, 2)

    def r(v):
        return "" if v is None else round(v, 2)

    body = []
    for e in comp["datasets"]:
        body.append(
            [
                e["section"],
                e["dataset"],
                e["n"],
                e["paper_sam3"],
                r(e["ours_sam3"]),
                diff(e["ours_sam3"], e["paper_sam3"]),
                e["paper_medsam3"],
                r(e["ours_medsam3"]),
                diff(e["ours_medsam3"], e["paper_medsam3"]),
                "",
                "",
                "",
                "",
                e["note"],
            ]
        )
    for a in comp["averages"]:
        body.append(
            [
                a["section"],
                f"average ({a['datasets_run']} of {a['datasets_total']})",
                "",
                r(a.get("paper_same_sam3_dice")),
                r(a.get("ours_sam3_dice")),
                diff(a.get("ours_sam3_dice"), a.get("paper_same_sam3_dice")),
                r(a.get("paper_same_medsam3_dice")),
                r(a.get("ours_medsam3_dice")),
                diff(a.get("ours_medsam3_dice"), a.get("paper_same_medsam3_dice")),
                a["paper_sam3_iou"],
                r(a.get("ours_sam3_iou")),
                a["paper_medsam3_iou"],
                r(a.get("ours_medsam3_iou")),
                "paper columns: mean over the datasets run",
            ]
        )
    return csv_text(header, body)


# -- driver ------------------------------------------------------------------------------------------------
def run_table3(
    data_root: str | Path,
    vanilla: Any,
    medical: Any,
    out_dir: str | Path,
    *,
    datasets: list[str] | None = None,
    limit: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    gallery: int = 3,
    n_boot: int = 2000,
    command: dict | None = None,
) -> dict[str, Any]:
    """Prepare, run both models, write the report and ``table3.md`` / ``table3.csv``; returns the
    comparison (see :func:`comparison`)."""
    from medsam3.evaluate.run_model import select_records

    records, skipped = evaluation_records(data_root, datasets)
    if not records:
        reasons = "; ".join(f"{k}: {v}" for k, v in skipped.items())
        raise InputError(data_root, f"no Table 3 dataset could be prepared ({reasons})")
    if limit:
        records = select_records(records, "all", None, limit)
    options = RunOptions(
        prompt_mode="text", prompt_text=prompt_overrides(records), device=device, dtype=dtype
    )
    collector = GalleryCollector(gallery)
    result = run_models(
        records, [ModelSpec(VANILLA, vanilla), ModelSpec(MEDICAL, medical)], options, collector
    )
    comp = comparison(result.rows, skipped)
    config = {
        "form": "table3",
        "data_root": str(data_root),
        "models": result.models,
        "prompt_mode": "text",
        "threshold": options.inference.threshold,
        "presence_threshold": options.inference.presence_threshold,
        "prompts": options.prompt_text,
        "limit_per_dataset": limit,
        "skipped_datasets": skipped,
        "warnings": result.warnings,
        **(command or {}),
    }
    extra = {
        "table3.md": table3_markdown(comp),
        "table3.csv": table3_csv(comp),
        "manifest.jsonl": manifest_text(records),
    }
    write_report(out_dir, result.rows, config, collector.items(), result.absent, extra=extra, n_boot=n_boot)
    for name, reason in skipped.items():
        log.warning("%s not run: %s", name, reason)
    return comp
