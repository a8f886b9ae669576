"""Parts of a cohort: ``--num-parts K --part-id I`` runs a deterministic share of the cases.

A case belongs to part ``int(sha256(name)[:8]) mod K`` (its name: the output stem,
:func:`~medsam3.predict.batch_cases.case_name`). The share depends on the case's own name only: the same
case lands in the same part on every run, whatever the order of the list and whatever cases are added or
removed, and parts ``0..K-1`` together hold every case exactly once. Parts may run at the same time (one
per GPU with ``--device cuda:N``, or one per scheduler job) into the same output folder: each case's
outputs are its own files, and a case is done when its JSON exists
(:mod:`medsam3.predict.batch_cases`), so any part, or a run without parts, resumes the others' work.

Summaries
---------
Part ``I`` of ``K`` writes its rows to ``summary.part-I-of-K.csv`` beside the cohort CSV (``summary.csv``,
or ``--summary``), and when it ends merges every part CSV of the same ``K`` found there into the cohort
CSV, in the order of the case list (:func:`merge_part_summaries`). Merges run one at a time (a lock file
beside the CSV), so the part that ends last leaves the complete cohort CSV; ``medsam3 segment CASES -o
OUT_DIR --num-parts K --merge-parts`` merges again without segmenting.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from medsam3.errors import InputError, OptionError
from medsam3.io.atomic import write_text_atomic
from medsam3.predict.batch_cases import Case

log = logging.getLogger(__name__)


def check_part(num_parts: int, part_id: int) -> None:
    """Raise :class:`~medsam3.errors.OptionError` unless ``0 <= part_id < num_parts``."""
    if num_parts < 1:
        raise OptionError(f"--num-parts must be at least 1, not {num_parts}")
    if not 0 <= part_id < num_parts:
        raise OptionError(f"--part-id must be 0..{num_parts - 1} with --num-parts {num_parts}, not {part_id}")


def part_of(name: str, num_parts: int) -> int:
    """The part (``0..num_parts-1``) of the case named ``name``: a hash of the name, not its position."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % num_parts


def select_part(cases: Iterable[Case], num_parts: int, part_id: int) -> list[Case]:
    """The cases of part ``part_id`` of ``num_parts``, in their order."""
    check_part(num_parts, part_id)
    return [c for c in cases if part_of(c.name, num_parts) == part_id]


def part_summary_path(cohort_csv: str | Path, part_id: int, num_parts: int) -> Path:
    """Where part ``part_id`` of ``num_parts`` writes its CSV: ``summary.csv`` ->
    ``summary.part-0-of-4.csv``."""
    cohort_csv = Path(cohort_csv)
    stem = cohort_csv.name[: -len(".csv")] if cohort_csv.name.lower().endswith(".csv") else cohort_csv.name
    return cohort_csv.with_name(f"{stem}.part-{part_id}-of-{num_parts}.csv")


@contextlib.contextmanager
def _merge_lock(cohort_csv: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``.<csv name>.lock`` beside the CSV (no lock where ``fcntl`` is missing)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: merges are not serialised
        yield
        return
    lock = cohort_csv.with_name(f".{cohort_csv.name}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@dataclass
class MergeReport:
    """What :func:`merge_part_summaries` found: the parts merged, the parts without a CSV yet, the rows."""

    path: Path
    parts: list[int] = field(default_factory=list)
    missing: list[int] = field(default_factory=list)
    rows: int = 0


def _read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
            return list(reader.fieldnames or []), rows
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(path, f"cannot be read as a part summary ({exc})") from None


def merge_part_summaries(cohort_csv: str | Path, num_parts: int, cases: Sequence[Case] = ()) -> MergeReport:
    """Merge the CSVs of parts ``0..num_parts-1`` found beside ``cohort_csv`` into ``cohort_csv``.

    Rows follow the order of ``cases`` (the cohort's list), then any other case by name; the columns are
    those of the part CSVs in order of appearance (the same for parts run with the same prompts). Runs
    under a lock, so that concurrent merges cannot leave an older one last.

    Raises:
        InputError: a part CSV that cannot be read.
    """
    cohort_csv = Path(cohort_csv)
    report = MergeReport(cohort_csv)
    with _merge_lock(cohort_csv):
        columns: list[str] = []
        by_name: dict[str, dict[str, str]] = {}
        for part in range(num_parts):
            path = part_summary_path(cohort_csv, part, num_parts)
            if not path.exists():
                report.missing.append(part)
                continue
            report.parts.append(part)
            header, rows = _read_rows(path)
            columns += [c for c in header if c not in columns]
            for row in rows:
                name = row.get("case", "")
                if name in by_name:
                    log.warning("%s: case %s is also in another part; the first row is kept", path, name)
                    continue
                by_name[name] = row
        order = [c.name for c in cases if c.name in by_name]
        listed = set(order)
        order += sorted(n for n in by_name if n not in listed)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns or ["case"], lineterminator="\n", restval="")
        writer.writeheader()
        for name in order:
            writer.writerow(by_name[name])
        write_text_atomic(cohort_csv, buf.getvalue())
        report.rows = len(order)
    return report
