"""Aggregate scored cases and write the evaluation report folder, all files at once.

Files of ``REPORT_DIR`` (every one through :func:`medsam3.io.atomic.atomic_path`; they are renamed into
place together at the end, so an error leaves none of them):

* ``cases.csv``: one row per case x reference label x model (:data:`~medsam3.evaluate.rows.CASE_COLUMNS`);
* ``summary.csv``: per dataset, per modality group and overall (``level`` column), per model and prompt
  mode: ``n`` rows (``n_ok``, ``n_missing``, ``n_failed``) and for each of Dice, IoU, NSD, HD95, ASSD,
  precision and recall the mean with its 95% percentile-bootstrap interval (``<metric>_mean``,
  ``_low``, ``_high``; 2000 resamples, seeded). Missing and failed cases are included as failures;
  distances of empty masks as the worst-case distance;
* ``table.md`` + ``table.csv``: the paper's layout (rows: datasets grouped Internal / External with each
  group's average; one Dice % and one IoU % column per model). A group's average is the mean of its
  datasets' means (every dataset counts the same, as in the paper), not the mean over cases;
* ``absent.csv`` + ``absent_summary.csv`` (with the absent-concept test): every absent-concept prompt, and
  per model the rate of images where anything was predicted, with its bootstrap interval;
* ``config.json``: the resolved configuration (command line, models, thresholds, prompt mode, versions)
  and every warning;
* ``dice_by_dataset.png``, ``dice_by_modality.png``, ``gallery/*.png`` and ``gallery.html``.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import platform
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medsam3.evaluate.figures import GalleryItem, dice_by_dataset, dice_by_modality, gallery_html, render_case
from medsam3.evaluate.metrics import bootstrap_ci
from medsam3.evaluate.rows import ABSENT_COLUMNS, CASE_COLUMNS, SUMMARY_METRICS, AbsentRow, CaseRow
from medsam3.io.atomic import atomic_path, check_not_input

SECTIONS = (("internal", "Internal"), ("external", "External"), ("", "Datasets"))
N_BOOT = 2000


# -- aggregation -------------------------------------------------------------------------------------------
def _column_key(row: CaseRow, modes: int) -> str:
    return row.model if modes <= 1 else f"{row.model} ({row.prompt_mode})"


def model_columns(rows: Sequence[CaseRow]) -> list[str]:
    """Column names, one per model (per model and prompt mode when several modes were run), in order."""
    modes = len({r.prompt_mode for r in rows})
    return list(dict.fromkeys(_column_key(r, modes) for r in rows))


def summarize(rows: Sequence[CaseRow], n_boot: int = N_BOOT, seed: int = 0) -> list[dict[str, Any]]:
    """Summary rows per dataset, modality group and overall (see the module docstring)."""
    levels = (
        ("dataset", lambda r: r.dataset),
        ("group", lambda r: r.group or "unknown"),
        ("all", lambda r: "all"),
    )
    out = []
    for level, key in levels:
        groups: dict[tuple, list[CaseRow]] = {}
        for r in rows:
            groups.setdefault((key(r), r.model, r.prompt_mode), []).append(r)
        for (name, model, mode), members in groups.items():
            entry: dict[str, Any] = {
                "level": level,
                "name": name,
                "model": model,
                "prompt_mode": mode,
                "n": len(members),
                "n_ok": sum(r.status == "ok" for r in members),
                "n_missing": sum(r.status == "missing" for r in members),
                "n_failed": sum(r.status == "failed" for r in members),
            }
            if level == "dataset":
                entry["role"] = members[0].role
                entry["group"] = members[0].group
            for metric in SUMMARY_METRICS:
                mean, low, high = bootstrap_ci([r.value(metric) for r in members], n_boot=n_boot, seed=seed)
                entry[f"{metric}_mean"], entry[f"{metric}_low"], entry[f"{metric}_high"] = mean, low, high
            out.append(entry)
    return out


SUMMARY_COLUMNS = (
    "level",
    "name",
    "role",
    "group",
    "model",
    "prompt_mode",
    "n",
    "n_ok",
    "n_missing",
    "n_failed",
) + tuple(f"{m}_{s}" for m in SUMMARY_METRICS for s in ("mean", "low", "high"))


def dataset_table(rows: Sequence[CaseRow]) -> dict[str, Any]:
    """The paper-layout table as data.

    Returns ``{"columns": [...], "sections": [{"title", "role", "datasets": [{"name", "n", "cells":
    {column: (dice %, iou %)}}], "average": {column: (dice %, iou %)}}]}``; a cell is ``None`` when the
    model has no row for that dataset; averages are means of the dataset means.
    """
    modes = len({r.prompt_mode for r in rows})
    columns = model_columns(rows)
    sections = []
    for role, title in SECTIONS:
        members = [r for r in rows if (r.role if r.role in ("internal", "external") else "") == role]
        if not members:
            continue
        datasets = list(dict.fromkeys(r.dataset for r in members))
        entries: list[dict[str, Any]] = []
        for d in datasets:
            cells = {}
            n = 0
            for col in columns:
                sel = [r for r in members if r.dataset == d and _column_key(r, modes) == col]
                n = max(n, len(sel))
                cells[col] = (
                    (
                        100 * float(np.mean([r.value("dice") for r in sel])),
                        100 * float(np.mean([r.value("iou") for r in sel])),
                    )
                    if sel
                    else None
                )
            entries.append({"name": d, "n": n, "cells": cells})
        average = {}
        for col in columns:
            vals = [e["cells"][col] for e in entries if e["cells"][col] is not None]
            average[col] = (
                (float(np.mean([v[0] for v in vals])), float(np.mean([v[1] for v in vals]))) if vals else None
            )
        sections.append({"title": title, "role": role, "datasets": entries, "average": average})
    return {"columns": columns, "sections": sections}


def _pct(v: float | None) -> str:
    return "–" if v is None or math.isnan(v) else f"{v:.1f}"


def table_markdown(table: Mapping[str, Any], title: str = "Dice and IoU (%) per dataset") -> str:
    """``table.md``: one Dice % and one IoU % column per model; section averages in italics."""
    cols = table["columns"]
    head = ["Dataset", "n"] + [f"{c} {m} %" for c in cols for m in ("Dice", "IoU")]
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for sec in table["sections"]:
        lines.append("| **" + sec["title"] + "** |" + " |" * (len(head) - 1))
        for e in sec["datasets"]:
            cells = []
            for c in cols:
                v = e["cells"][c]
                cells += [_pct(v[0]), _pct(v[1])] if v else ["–", "–"]
            lines.append("| " + " | ".join([e["name"], str(e["n"])] + cells) + " |")
        avg = []
        for c in cols:
            v = sec["average"][c]
            avg += [f"*{_pct(v[0])}*", f"*{_pct(v[1])}*"] if v else ["–", "–"]
        n_ds = len(sec["datasets"])
        noun = "dataset" if n_ds == 1 else "datasets"
        lines.append("| " + " | ".join([f"*{sec['title']} average ({n_ds} {noun})*", ""] + avg) + " |")
    lines += [
        "",
        "n: scored (case, label) pairs per dataset. An average is the mean of the dataset means.",
        "Missing and failed predictions count as Dice 0 (see cases.csv, column status).",
    ]
    return "\n".join(lines) + "\n"


def table_csv(table: Mapping[str, Any]) -> str:
    """``table.csv``: ``section, dataset, n`` then ``<model> dice %`` and ``<model> iou %`` per model."""
    cols = table["columns"]
    header = ["section", "dataset", "n"] + [f"{c} {m} %" for c in cols for m in ("dice", "iou")]
    body = []
    for sec in table["sections"]:
        for e in sec["datasets"]:
            cells = []
            for c in cols:
                v = e["cells"][c]
                cells += [round(v[0], 2), round(v[1], 2)] if v else ["", ""]
            body.append([sec["title"], e["name"], e["n"]] + cells)
        avg = []
        for c in cols:
            v = sec["average"][c]
            avg += [round(v[0], 2), round(v[1], 2)] if v else ["", ""]
        body.append([sec["title"], "average", len(sec["datasets"])] + avg)
    return csv_text(header, body)


def absent_summary(rows: Sequence[AbsentRow], n_boot: int = N_BOOT, seed: int = 0) -> list[dict[str, Any]]:
    """False-positive rates of the absent-concept test per model, overall and per dataset.

    ``image_fp_rate``: share of images where at least one absent concept got pixels (bootstrap CI over
    images); ``prompt_fp_rate``: share of absent-concept prompts that got pixels.
    """
    out = []
    by_scope: dict[tuple[str, str], list[AbsentRow]] = {}
    for r in rows:
        by_scope.setdefault((r.model, "all"), []).append(r)
        by_scope.setdefault((r.model, r.dataset), []).append(r)
    for (model, scope), members in by_scope.items():
        images: dict[tuple[str, str], bool] = {}
        for r in members:
            images[(r.dataset, r.case)] = images.get((r.dataset, r.case), False) or r.predicted
        flags = [1.0 if v else 0.0 for v in images.values()]
        mean, low, high = bootstrap_ci(flags, n_boot=n_boot, seed=seed)
        out.append(
            {
                "model": model,
                "dataset": scope,
                "images": len(flags),
                "images_with_fp": int(sum(flags)),
                "image_fp_rate": mean,
                "image_fp_low": low,
                "image_fp_high": high,
                "prompts": len(members),
                "prompts_with_fp": sum(r.predicted for r in members),
                "prompt_fp_rate": sum(r.predicted for r in members) / len(members),
            }
        )
    return out


ABSENT_SUMMARY_COLUMNS = (
    "model",
    "dataset",
    "images",
    "images_with_fp",
    "image_fp_rate",
    "image_fp_low",
    "image_fp_high",
    "prompts",
    "prompts_with_fp",
    "prompt_fp_rate",
)


# -- text helpers ------------------------------------------------------------------------------------------
def _cell(v: Any) -> Any:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else float(f"{v:.6g}")
    return v


def csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for row in rows:
        w.writerow([_cell(v) for v in row])
    return buf.getvalue()


def dict_csv(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str:
    return csv_text(columns, [[r.get(c, "") for c in columns] for r in rows])


def versions() -> dict[str, str]:
    """Versions of the packages that shape an evaluation (torch / transformers when loaded)."""
    import scipy

    from medsam3 import __version__

    out = {
        "medsam3": __version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "python": platform.python_version(),
    }
    for name in ("SimpleITK", "torch", "transformers"):
        mod = sys.modules.get(name)
        if mod is not None:
            out[name] = str(getattr(mod, "__version__", getattr(mod, "Version", lambda: "?")()))
    return out


# -- writing -----------------------------------------------------------------------------------------------
def write_files(out_dir: str | Path, files: Mapping[str, str | bytes | Callable[[Path], None]]) -> list[Path]:
    """Write ``{relative path: text | bytes | writer(tmp_path)}`` under ``out_dir``, all or nothing.

    Each file is produced under a temporary name beside its target; only when every one has been
    produced are they all renamed into place.
    """
    out_dir = Path(out_dir)
    targets = [out_dir / rel for rel in files]
    for t in targets:
        check_not_input(t)
    created = _missing_folders({t.parent for t in targets})
    try:
        with contextlib.ExitStack() as stack:
            for content, target in zip(files.values(), targets, strict=True):
                tmp = stack.enter_context(atomic_path(target))
                if isinstance(content, str):
                    tmp.write_text(content, encoding="utf-8")
                elif isinstance(content, bytes):
                    tmp.write_bytes(content)
                else:
                    content(tmp)
    except BaseException:
        for folder in sorted(created, key=lambda p: len(p.parts), reverse=True):  # deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if still empty: nothing of anyone else's is removed
        raise
    return targets


def _missing_folders(folders: set[Path]) -> set[Path]:
    """The folders (and their missing parents) that writing into ``folders`` would create."""
    missing: set[Path] = set()
    for folder in folders:
        for p in (folder, *folder.parents):
            try:
                if p.exists():
                    break
            except OSError:
                break
            missing.add(p)
    return missing


def report_files(
    rows: Sequence[CaseRow],
    config: Mapping[str, Any],
    gallery: Sequence[GalleryItem] = (),
    absent: Sequence[AbsentRow] = (),
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> dict[str, str | bytes]:
    """Every file of the report folder as ``{relative path: content}`` (see the module docstring)."""
    if not rows:
        from medsam3.errors import InputError

        raise InputError(None, "nothing was scored: no case pairs a prediction with a reference")
    summary = summarize(rows, n_boot=n_boot, seed=seed)
    table = dataset_table(rows)
    files: dict[str, str | bytes] = {
        "cases.csv": dict_csv(CASE_COLUMNS, [r.to_csv() for r in rows]),
        "summary.csv": dict_csv(SUMMARY_COLUMNS, summary),
        "table.csv": table_csv(table),
    }
    md = table_markdown(table)
    if absent:
        abs_summary = absent_summary(absent, n_boot=n_boot, seed=seed)
        files["absent.csv"] = dict_csv(ABSENT_COLUMNS, [r.to_csv() for r in absent])
        files["absent_summary.csv"] = dict_csv(ABSENT_SUMMARY_COLUMNS, abs_summary)
        md += (
            "\n## Absent-concept test (false positives)\n\n| model | images | with a false positive | "
            "rate % (95% CI) |\n|---|---|---|---|\n"
        )
        for s in abs_summary:
            if s["dataset"] == "all":
                md += (
                    f"| {s['model']} | {s['images']} | {s['images_with_fp']} | "
                    f"{100 * s['image_fp_rate']:.1f} ({100 * s['image_fp_low']:.1f}–"
                    f"{100 * s['image_fp_high']:.1f}) |\n"
                )
    files["table.md"] = md
    cfg = dict(config)
    cfg.setdefault("versions", versions())
    cfg["counts"] = {
        "rows": len(rows),
        "missing": sum(r.status == "missing" for r in rows),
        "failed": sum(r.status == "failed" for r in rows),
        "absent_prompts": len(absent),
    }
    files["config.json"] = json.dumps(cfg, indent=2, default=str) + "\n"
    columns = model_columns(rows)
    modes = len({r.prompt_mode for r in rows})
    keyed = list(rows)
    if modes > 1:  # one bar / box per model and prompt mode
        from dataclasses import replace

        keyed = [replace(r, model=_column_key(r, modes)) for r in rows]
        stats = summarize(keyed, n_boot=n_boot, seed=seed)
    else:
        stats = summary
    datasets = list(dict.fromkeys(r.dataset for r in rows))
    files["dice_by_dataset.png"] = dice_by_dataset(
        [s for s in stats if s["level"] == "dataset"], columns, datasets
    )
    files["dice_by_modality.png"] = dice_by_modality(keyed, columns)
    for item in gallery:
        files[f"gallery/{item.file_name}"] = render_case(item)
    files["gallery.html"] = gallery_html(gallery, "gallery")
    return files


def write_report(
    out_dir: str | Path,
    rows: Sequence[CaseRow],
    config: Mapping[str, Any],
    gallery: Sequence[GalleryItem] = (),
    absent: Sequence[AbsentRow] = (),
    extra: Mapping[str, str | bytes] | None = None,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> Path:
    """Compute and write the report folder (all files at once); ``extra`` adds more files. Returns it."""
    files = report_files(rows, config, gallery, absent, n_boot=n_boot, seed=seed)
    files.update(extra or {})
    write_files(out_dir, files)
    stale = Path(out_dir) / "gallery"
    for old in stale.glob("*.png"):  # pictures of an earlier report in the same folder
        if f"gallery/{old.name}" not in files:
            old.unlink()
    return Path(out_dir)
