"""Many cases in one run: a folder of cases or a list file, resumable, one failure never stops the rest.

Cases
-----
* A **folder**: every file directly inside is a case (hidden files and notes, ``.json`` / ``.csv`` /
  ``.txt`` / ``.md`` / ``.log``, are left out), and every sub-folder holding DICOM files is a case (one
  DICOM series). A folder with DICOM files directly inside is itself one DICOM series, not a folder of
  cases (:func:`is_batch_input`).
* A **list file** (``.txt``, ``.lst``, ``.list``): one path per line (a file or a DICOM series folder);
  blank lines and lines starting with ``#`` are ignored; relative paths are relative to the list file.

A case's name is its file name without the extension (``.nii.gz`` counts as one), or the series folder's
name; two cases with the same name are refused before anything runs (their outputs would collide).

Resuming
--------
A case is **done** when its ``<name>.json`` exists and every output file it lists exists; the JSON is
renamed into place after all other outputs (:mod:`medsam3.predict.volume.outputs`), so an interrupted case
is never mistaken for a finished one. Done cases are skipped unless ``overwrite``; a JSON made with other
prompts is not silently reused: that case fails and asks for ``--overwrite`` or another output folder.
Interrupting a run (Ctrl-C, or SIGTERM as sent by ``timeout``, schedulers and service managers) stops
after writing the summary CSV; temporaries of a run killed outright are removed when the next run starts
(:func:`medsam3.io.atomic.remove_stale_temporaries`); re-running the same command redoes only
what was not finished. When several runs share the output folder (parts on other machines, a Ray cluster),
a temporary is only removed once it is also :data:`SHARED_STALE_SECONDS` old
(:func:`remove_stale_temporaries_in`): a process id names a process of one machine only.

The same completion rule holds for the Ray engine (:mod:`medsam3.predict.ray_engine`) and for parts of a
cohort (:mod:`medsam3.predict.parts`): any of them resumes a cohort started by another.

Summary
-------
``summary.csv`` (rewritten atomically after every case): ``case``, ``input``, ``status`` (``ok``,
``skipped``, ``failed``, ``interrupted``), ``error``, ``seconds``, then ``<prompt> voxels`` and
``<prompt> ml`` and ``<prompt> mean`` (mean intensity in the input's units) per prompt (pixels and no ml
for 2D images).

``seconds`` is the case's wall time (reading, segmenting, writing). When the case JSON records its own
time (``case.seconds``, written by ``medsam3 segment``), that number is used, so the CSV and the JSON agree,
and a skipped case shows the time of the run that made it (0 when its JSON records none).

When every case brings its own prompts (``case_columns``: no ``-p``, prompts from ``--prompts-json`` or
the npz's ``text_prompts``), the per-prompt columns give way to ``prompt source``, ``labels`` (``<label
id>=<prompt>:<voxels>`` joined by ``; ``; an instance task: its one prompt with the voxels of all its
instances), ``instance`` (0 / 1) and ``instances`` (the number of instances of an instance task).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medsam3.errors import InputError, MedSam3Error
from medsam3.io import atomic
from medsam3.io.atomic import process_alive, remove_stale_temporaries, write_text_atomic
from medsam3.io.dicom import find_dicom_files
from medsam3.predict.summary import default_stem

log = logging.getLogger(__name__)

#: Suffixes of list files.
LIST_SUFFIXES = (".txt", ".lst", ".list")
#: Files in a case folder that are never cases.
NOT_CASES = (".json", ".csv", ".txt", ".md", ".log", ".lst", ".list")
#: Age (seconds since the last write) past which a temporary of a dead process is removed from an output
#: folder that several machines write (module docstring).
SHARED_STALE_SECONDS = 3600.0


@dataclass(frozen=True)
class Case:
    """One input: ``name`` (output stem) and ``path`` (a file or a DICOM series folder)."""

    name: str
    path: Path


@dataclass
class CaseOutcome:
    """What happened to one case (one row of the summary CSV)."""

    case: Case
    status: str
    error: str = ""
    seconds: float = 0.0
    labels: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


def recorded_seconds(summary: dict, default: float) -> float:
    """The wall time a case JSON records (``case.seconds``), else ``default``."""
    value = (summary.get("case") or {}).get("seconds")
    return float(value) if isinstance(value, (int, float)) else default


def _has_dicom_directly(folder: Path) -> bool:
    return any(p.parent == folder for p in find_dicom_files(folder))


def is_batch_input(path: str | Path) -> bool:
    """True for a folder of cases or a list file; False for one image / volume / DICOM series folder."""
    p = Path(path)
    if p.is_dir():
        return not _has_dicom_directly(p)
    return p.suffix.lower() in LIST_SUFFIXES


def case_name(path: Path) -> str:
    """Output stem of a case: the folder name of a series, else the file name without extension."""
    return path.name if path.is_dir() else default_stem(path)


def discover_cases(source: str | Path, *, exclude: Sequence[str | Path] = ()) -> list[Case]:
    """The cases of a folder or a list file (module docstring), in name order for folders.

    ``exclude``: paths never taken as cases (the output folder, say). Raises :class:`InputError` for a
    missing source, an empty one, or two cases with the same name.
    """
    source = Path(source)
    skip = {Path(p).resolve() for p in exclude}
    if not source.exists():
        raise InputError(source, "no such file or folder")
    paths: list[Path] = []
    if source.is_dir():
        for entry in sorted(source.iterdir()):
            if entry.name.startswith(".") or entry.resolve() in skip:
                continue
            if entry.is_dir():
                if find_dicom_files(entry):
                    paths.append(entry)
                else:
                    log.warning("%s: skipped, a folder without DICOM files", entry)
            elif not entry.name.lower().endswith(NOT_CASES):
                paths.append(entry)
    else:
        try:
            lines = source.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(source, f"cannot be read as a list of paths ({exc})") from exc
        for line in lines:
            line = line.strip()
            if line and not line.startswith("#"):
                p = Path(line).expanduser()
                paths.append(p if p.is_absolute() else source.parent / p)
    if not paths:
        raise InputError(source, "holds no case (no image file, DICOM series folder or listed path)")
    cases = [Case(case_name(p), p) for p in paths]
    seen: dict[str, Path] = {}
    clashes = []
    for c in cases:
        if c.name in seen:
            clashes.append(f"{seen[c.name]} and {c.path} -> {c.name}")
        seen.setdefault(c.name, c.path)
    if clashes:
        raise InputError(
            source, "cases with the same name would write the same outputs: " + "; ".join(clashes)
        )
    return cases


def summary_prompts(summary: dict) -> list[dict]:
    """The prompts a case JSON was made with, one per prompt, in order."""
    by_index: dict[int, dict] = {}
    for e in summary.get("labels", []):
        by_index.setdefault(int(e.get("prompt_index", len(by_index))), e.get("prompt"))
    return [by_index[i] for i in sorted(by_index)]


def existing_summary(out_dir: Path, case: Case) -> dict | None:
    """The case's JSON when the case is done (JSON and every output it lists exist), else ``None``."""
    path = out_dir / f"{case.name}.json"
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    outputs = summary.get("outputs")
    if outputs is None:  # 2D results: the mask PNG is the one output the JSON does not name
        outputs = {"mask": f"{case.name}_mask.png"}
    return summary if all((out_dir / name).exists() for name in outputs.values()) else None


def label_rows(summary: dict) -> list[dict[str, Any]]:
    """Per-label ``value``, ``name``, ``voxels`` (pixels in 2D), ``ml`` (``None`` in 2D), ``mean``, and why
    an absent label is absent (``reason``, ``known_concepts`` of an unknown concept) from a case JSON."""
    rows = []
    for e in summary.get("labels", []):
        voxels = e.get("voxels", e.get("area_px"))
        intensity = (e.get("statistics") or {}).get("intensity") or {}
        rows.append(
            {
                "value": e.get("value"),
                "name": e.get("name"),
                "voxels": voxels,
                "ml": e.get("volume_ml"),
                "mean": intensity.get("mean"),
                "reason": e.get("reason"),
                "known_concepts": e.get("known_concepts"),
            }
        )
    return rows


#: Columns of the summary CSV when every case brings its own prompts (module docstring).
CASE_COLUMNS = ("prompt source", "labels", "instance", "instances")


def _case_cells(o: CaseOutcome) -> list[Any]:
    info = o.info
    if info.get("instance") and isinstance(
        info.get("prompts"), dict
    ):  # one prompt: its voxels, all instances
        total = sum(r.get("voxels") or 0 for r in o.labels)
        labels = "; ".join(f"{k}={text}:{total}" for k, text in info["prompts"].items())
    else:
        labels = "; ".join(
            f"{r['value'] if r.get('value') is not None else '-'}={r.get('name')}:{r.get('voxels') or 0}"
            for r in o.labels
        )
    instance = info.get("instance")
    instances = info.get("instances")
    return [
        info.get("prompt_source") or "",
        labels,
        "" if instance is None else int(bool(instance)),
        "" if instances is None else instances,
    ]


def write_summary_csv(
    path: Path, outcomes: Sequence[CaseOutcome], label_names: Sequence[str], *, case_columns: bool = False
) -> Path:
    """The per-case summary CSV (module docstring), written atomically; ``case_columns``: the columns of
    runs whose cases bring their own prompts instead of per-prompt ones."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    extra = (
        list(CASE_COLUMNS)
        if case_columns
        else [f"{n} {unit}" for n in label_names for unit in ("voxels", "ml", "mean")]
    )
    writer.writerow(["case", "input", "status", "error", "seconds", *extra])
    for o in outcomes:
        cells: list[Any] = []
        if case_columns:
            cells = _case_cells(o)
        else:
            by_name = {r["name"]: r for r in o.labels}
            for n in label_names:
                r = by_name.get(n, {})
                ml, mean = r.get("ml"), r.get("mean")
                cells += [
                    "" if r.get("voxels") is None else r["voxels"],
                    "" if ml is None else f"{ml:.6g}",
                    "" if mean is None else f"{mean:.6g}",
                ]
        writer.writerow([o.case.name, str(o.case.path), o.status, o.error, f"{o.seconds:.2f}", *cells])
    return write_text_atomic(path, buf.getvalue())


def remove_stale_temporaries_in(out_dir: str | Path, *, shared: bool = False) -> list[Path]:
    """Remove the temporaries that runs killed outright left in ``out_dir``; returns what was removed.

    ``shared``: other machines may write the folder now (parts, a Ray cluster), so a temporary whose
    process id names no process here may still be written elsewhere; only those untouched for
    :data:`SHARED_STALE_SECONDS` are removed then.
    """
    if not shared:
        removed = remove_stale_temporaries(out_dir)
    else:
        removed = []
        folder = Path(out_dir)
        now = time.time()
        for item in folder.iterdir() if folder.is_dir() else ():
            match = atomic._TEMPORARY.match(item.name)
            if match is None or process_alive(int(match.group(1))):
                continue
            with contextlib.suppress(OSError):
                if now - item.lstat().st_mtime < SHARED_STALE_SECONDS:
                    continue
                if item.is_dir() and not item.is_symlink():
                    shutil.rmtree(item)
                else:
                    item.unlink()
                removed.append(item)
    for stale in removed:
        log.info("removed %s, a temporary file of a run that no longer runs", stale.name)
    return removed


#: The error of a done case made with other prompts.
OTHER_PROMPTS = "outputs exist from a run with other prompts; use --overwrite or another output folder"


def done_outcome(
    case: Case,
    out_dir: Path,
    *,
    overwrite: bool,
    same_prompts: Callable[[dict], bool] | None = None,
    same_case_prompts: Callable[[dict, Case], bool] | None = None,
) -> CaseOutcome | None:
    """The outcome of a case that needs no work: ``skipped`` (done with this run's prompts) or ``failed``
    (done with other prompts, or its prompts cannot be read); ``None`` when the case is to be segmented.

    ``same_prompts`` / ``same_case_prompts``: as for :func:`run_cases`.
    """
    done = None if overwrite else existing_summary(out_dir, case)
    if done is None:
        return None
    try:
        if same_case_prompts is not None:
            same = same_case_prompts(done, case)
        else:
            assert same_prompts is not None
            same = same_prompts(done)
    except MedSam3Error as exc:
        return CaseOutcome(case, "failed", error=str(exc))
    if not same:
        return CaseOutcome(case, "failed", error=OTHER_PROMPTS)
    return CaseOutcome(
        case,
        "skipped",
        seconds=recorded_seconds(done, 0.0),
        labels=label_rows(done),
        info=dict(done.get("case") or {}),
    )


def ok_outcome(case: Case, summary: dict, elapsed: float) -> CaseOutcome:
    """The outcome of a case segmented now, from the JSON summary it wrote (``elapsed``: its wall time,
    used when the JSON records none)."""
    return CaseOutcome(
        case,
        "ok",
        seconds=recorded_seconds(summary, elapsed),
        labels=label_rows(summary),
        info=dict(summary.get("case") or {}),
    )


def error_text(exc: BaseException) -> str:
    """The CSV's ``error`` for a failed case: a user error's message, else the exception's type and text."""
    if isinstance(exc, MedSam3Error):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def run_cases(
    cases: Sequence[Case],
    segment_case: Callable[[Case], dict],
    out_dir: str | Path,
    *,
    same_prompts: Callable[[dict], bool] | None = None,
    label_names: Sequence[str],
    overwrite: bool = False,
    max_cases: int | None = None,
    summary_csv: str | Path | None = None,
    show_progress: bool = True,
    same_case_prompts: Callable[[dict, Case], bool] | None = None,
    case_columns: bool = False,
    shared_folder: bool = False,
) -> list[CaseOutcome]:
    """Run ``segment_case`` on every case not done yet; never stop on a failed case.

    Args:
        segment_case: segments one case and writes its outputs into ``out_dir`` (the JSON last); returns
            the JSON summary it wrote. A :class:`~medsam3.errors.MedSam3Error` or any other exception
            marks the case failed (message in the CSV); ``KeyboardInterrupt`` stops the run.
        same_prompts: tells whether a done case's JSON summary was made with this run's prompts (see
            :func:`summary_prompts`); a done case made with other prompts fails instead of being skipped.
        same_case_prompts: the same check for runs whose prompts depend on the case (``(summary, case)``);
            used instead of ``same_prompts`` when given. A :class:`~medsam3.errors.MedSam3Error` it raises
            (the case's prompts cannot be read) marks the case failed with that message.
        label_names: prompt display names, for the CSV columns.
        case_columns: the CSV columns of runs whose cases bring their own prompts (module docstring).
        max_cases: process at most this many cases that are not done (skipped ones do not count); the
            rest are left for a later run.
        summary_csv: where to write the CSV (default ``out_dir / "summary.csv"``).
        shared_folder: other runs may write ``out_dir`` at the same time (parts on other machines; see
            :func:`remove_stale_temporaries_in`).

    Returns:
        One :class:`CaseOutcome` per case that was looked at, in order. Re-raises ``KeyboardInterrupt``
        after writing the CSV.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if same_prompts is None and same_case_prompts is None:
        raise TypeError("run_cases needs same_prompts or same_case_prompts")
    out_dir = Path(out_dir)
    csv_path = Path(summary_csv) if summary_csv is not None else out_dir / "summary.csv"

    def write_csv() -> None:
        write_summary_csv(csv_path, outcomes, label_names, case_columns=case_columns)

    remove_stale_temporaries_in(out_dir, shared=shared_folder)
    outcomes: list[CaseOutcome] = []
    processed = 0
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        disable=not show_progress,
    )
    with progress:
        task = progress.add_task("cases", total=len(cases))
        for case in cases:
            progress.update(task, description=case.name)
            known = done_outcome(
                case,
                out_dir,
                overwrite=overwrite,
                same_prompts=same_prompts,
                same_case_prompts=same_case_prompts,
            )
            if known is not None:
                outcomes.append(known)
                progress.advance(task)
                write_csv()
                continue
            if max_cases is not None and processed >= max_cases:
                break
            processed += 1
            start = time.perf_counter()
            try:
                summary = segment_case(case)
                outcome = ok_outcome(case, summary, time.perf_counter() - start)
            except KeyboardInterrupt:
                outcomes.append(
                    CaseOutcome(case, "interrupted", "interrupted by the user", time.perf_counter() - start)
                )
                write_csv()
                raise
            except Exception as exc:  # a bug or a library failure on this case: record it, go on
                if not isinstance(exc, MedSam3Error):
                    log.debug("case %s failed", case.name, exc_info=True)
                outcome = CaseOutcome(case, "failed", error_text(exc), time.perf_counter() - start)
            outcomes.append(outcome)
            write_csv()
            progress.advance(task)
    if not outcomes:
        write_csv()
    return outcomes
