"""A PACS node: follow an Orthanc server's change feed, segment the series it selects, store the results.

The loop (:class:`Watcher`):

1. **Feed.** ``GET /changes?since=N`` pages through Orthanc's change log; each ``StableSeries`` change
   (a series that received no instance for Orthanc's ``StableAge`` seconds) is looked up (``/series/ID``
   and its study) and, when :class:`Selection` accepts it, recorded as *pending*. The series and the feed
   position ``N`` are committed in one transaction, so a restart neither skips a change nor records it
   twice.
2. **Work.** The due series are handled one at a time, oldest first: marked *running* (the attempt is
   counted first), handed to the ``handle`` callable (download, segment, store), then marked *done* with
   what was written and stored. A failure is logged with the Series Instance UID and retried after
   ``retry_delay x 2^(attempt-1)`` seconds; after ``max_attempts`` attempts the series is *parked* and
   listed (``medsam3 watch --status``) until someone looks at it.
3. **Restart.** A series left *running* by a killed process is pending again (its attempt stays counted,
   which bounds a series that crashes the process every time). Results carry UIDs derived from the
   result itself (:func:`medsam3.predict.volume.outputs.derived_uids`), so a result stored just before a
   kill and stored again after the restart is one object on the server.

The state is a small SQLite file (transactions make every update atomic; ``synchronous=FULL``).
Series whose modality is a derived object (SEG, RTSTRUCT, SR, ...) are never selected: the results the
watcher stores come back through the feed and are ignored.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medsam3.errors import MedSam3Error, OptionError
from medsam3.pacs.dicomweb import (
    PASSWORD_ENV,
    TOKEN_ENV,
    USER_ENV,
    DicomwebError,
    SeriesRef,
    base_url,
    session_from_env,
)

log = logging.getLogger(__name__)

#: Modalities of derived objects, never segmented.
NOT_IMAGES = frozenset({"SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "SR", "PR", "KO", "REG", "DOC"})
#: Series statuses in the state file.
STATUSES = ("pending", "running", "done", "failed", "parked")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS feed (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS series (
    series_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    orthanc_id TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_try REAL NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    result TEXT NOT NULL DEFAULT '',
    added REAL NOT NULL,
    updated REAL NOT NULL
);
"""


@dataclass
class SeriesRow:
    """One series in the state file (columns of the ``series`` table)."""

    series_uid: str
    study_uid: str
    orthanc_id: str
    description: str
    status: str
    attempts: int
    next_try: float
    last_error: str
    result: str
    added: float
    updated: float


class WatchState:
    """The watcher's progress in a SQLite file: the feed position and every selected series.

    Args:
        path: the state file (created with its folder when missing).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, isolation_level=None, timeout=30)
        try:
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            self.db.close()
            raise MedSam3Error(f"{self.path}: not a usable watch state file ({exc})") from None

    def close(self) -> None:
        self.db.close()

    def _write(self, statements: Iterable[tuple[str, Sequence[Any]]]) -> None:
        with self.db:  # one transaction
            self.db.execute("BEGIN IMMEDIATE")
            for sql, params in statements:
                self.db.execute(sql, params)

    @property
    def last_seq(self) -> int:
        """The last change of the feed already read (0 before the first)."""
        row = self.db.execute("SELECT value FROM feed WHERE key = 'last_seq'").fetchone()
        return int(row[0]) if row else 0

    def record(self, found: Sequence[Mapping[str, str]], last_seq: int) -> list[str]:
        """Add the selected series of a feed page (``series_uid``, ``study_uid``, ``orthanc_id``,
        ``description``) as pending, unless known, and move the feed to ``last_seq``, in one transaction.
        Returns the UIDs of the series added."""
        now = time.time()
        uids = list(dict.fromkeys(s["series_uid"] for s in found))
        known = {
            r[0]
            for r in self.db.execute(
                f"SELECT series_uid FROM series WHERE series_uid IN ({', '.join('?' * len(uids))})", uids
            )
        }
        self._write(
            [
                *(
                    (
                        "INSERT OR IGNORE INTO series (series_uid, study_uid, orthanc_id, description,"
                        " status, added, updated) VALUES (?, ?, ?, ?, 'pending', ?, ?)",
                        (
                            s["series_uid"],
                            s["study_uid"],
                            s["orthanc_id"],
                            s.get("description", ""),
                            now,
                            now,
                        ),
                    )
                    for s in found
                ),
                ("INSERT OR REPLACE INTO feed (key, value) VALUES ('last_seq', ?)", (int(last_seq),)),
            ]
        )
        return [uid for uid in uids if uid not in known]

    def requeue_running(self) -> list[str]:
        """Series left running by a stopped process become pending again; returns their UIDs."""
        uids = [r[0] for r in self.db.execute("SELECT series_uid FROM series WHERE status = 'running'")]
        self._write([("UPDATE series SET status = 'pending', next_try = 0 WHERE status = 'running'", ())])
        return uids

    def next_due(self, now: float) -> SeriesRow | None:
        """The oldest pending or failed series whose retry time has come."""
        row = self.db.execute(
            "SELECT * FROM series WHERE status IN ('pending', 'failed') AND next_try <= ? "
            "ORDER BY added, rowid LIMIT 1",
            (now,),
        ).fetchone()
        return SeriesRow(*row) if row else None

    def next_retry(self) -> float | None:
        """When the earliest waiting series is due (``None`` when none waits)."""
        row = self.db.execute(
            "SELECT MIN(next_try) FROM series WHERE status IN ('pending', 'failed')"
        ).fetchone()
        return None if row[0] is None else float(row[0])

    def start(self, uid: str) -> int:
        """Mark ``uid`` running and count the attempt; returns the attempt number."""
        self._write(
            [
                (
                    "UPDATE series SET status = 'running', attempts = attempts + 1, updated = ? "
                    "WHERE series_uid = ?",
                    (time.time(), uid),
                )
            ]
        )
        return int(self.db.execute("SELECT attempts FROM series WHERE series_uid = ?", (uid,)).fetchone()[0])

    def finish(self, uid: str, result: Mapping[str, Any]) -> None:
        """Mark ``uid`` done with what was written and stored."""
        self._write(
            [
                (
                    "UPDATE series SET status = 'done', last_error = '', result = ?, updated = ? "
                    "WHERE series_uid = ?",
                    (json.dumps(result, default=str), time.time(), uid),
                )
            ]
        )

    def fail(self, uid: str, error: str, *, max_attempts: int, retry_delay: float) -> tuple[str, float]:
        """Record a failed attempt: ``failed`` with a back-off, or ``parked`` after ``max_attempts``.
        Returns the new status and the retry time (0 when parked)."""
        attempts = int(
            self.db.execute("SELECT attempts FROM series WHERE series_uid = ?", (uid,)).fetchone()[0]
        )
        now = time.time()
        if attempts >= max_attempts:
            status, next_try = "parked", 0.0
        else:
            status, next_try = "failed", now + retry_delay * 2 ** max(attempts - 1, 0)
        self._write(
            [
                (
                    "UPDATE series SET status = ?, next_try = ?, last_error = ?, updated = ? "
                    "WHERE series_uid = ?",
                    (status, next_try, error, now, uid),
                )
            ]
        )
        return status, next_try

    def rows(self, status: str | None = None) -> list[SeriesRow]:
        """Every series (or those with ``status``), oldest first."""
        if status is None:
            cursor = self.db.execute("SELECT * FROM series ORDER BY added, rowid")
        else:
            cursor = self.db.execute("SELECT * FROM series WHERE status = ? ORDER BY added, rowid", (status,))
        return [SeriesRow(*r) for r in cursor]


@dataclass
class Selection:
    """Which series to segment: every ``TAG=PATTERN`` must match (shell patterns, case-insensitive).

    ``TAG`` is a DICOM keyword (``Modality``, ``SeriesDescription``, ``BodyPartExamined``, ...), looked up in
    the series', study's and patient's main tags, then in the tags all instances share.
    """

    rules: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def parse(cls, texts: Sequence[str] | None) -> Selection:
        """Rules from ``TAG=PATTERN`` strings; :class:`OptionError` for a malformed rule or unknown tag."""
        from pydicom.datadict import tag_for_keyword

        rules = []
        for text in texts or ():
            tag, sep, pattern = text.partition("=")
            tag = tag.strip()
            if not sep or not tag or not pattern:
                raise OptionError(f"--select {text!r}: expected TAG=PATTERN, e.g. Modality=CT")
            if tag_for_keyword(tag) is None:
                raise OptionError(
                    f"--select {text!r}: {tag!r} is not a DICOM keyword (e.g. SeriesDescription)"
                )
            rules.append((tag, pattern))
        return cls(rules)

    def accepts(self, tags: Mapping[str, str], more: Callable[[], Mapping[str, str]] | None = None) -> bool:
        """Whether ``tags`` (keyword -> value) match every rule; ``more()`` supplies tags ``tags`` lacks."""
        extra: Mapping[str, str] | None = None
        for tag, pattern in self.rules:
            value = tags.get(tag)
            if value is None and more is not None:
                extra = more() if extra is None else extra
                value = extra.get(tag)
            if value is None or not fnmatch.fnmatchcase(str(value).lower(), pattern.lower()):
                return False
        return True


class Orthanc:
    """Orthanc's REST API for the change feed and series tags (credentials as for DICOMweb).

    Args:
        url: Orthanc's base URL, ``http(s)://HOST:PORT``.
        dicomweb_root: the path of its DICOMweb plugin (``/dicom-web``).
    """

    def __init__(self, url: str, dicomweb_root: str = "/dicom-web", session=None):
        self.url = base_url(url)
        self.dicomweb = base_url(self.url + "/" + dicomweb_root.strip("/"))
        self.session = session if session is not None else session_from_env()

    def get(self, path: str, **params: Any) -> Any:
        """``GET`` a REST resource as JSON; :class:`DicomwebError` on any failure."""
        import requests

        try:
            response = self.session.get(self.url + path, params=params or None, timeout=(10, 120))
        except requests.RequestException as exc:
            raise DicomwebError(f"{self.url}: the server cannot be reached ({type(exc).__name__})") from None
        if response.status_code in (401, 403):
            raise DicomwebError(
                f"{self.url}{path}: the server refused the credentials (HTTP {response.status_code}); set "
                f"{TOKEN_ENV}, or {USER_ENV} and {PASSWORD_ENV}"
            )
        if response.status_code == 404:
            raise DicomwebError(f"{self.url}{path}: not found (HTTP 404)")
        if not response.ok:
            raise DicomwebError(f"{self.url}{path}: the server answered HTTP {response.status_code}")
        try:
            return response.json()
        except ValueError:
            raise DicomwebError(f"{self.url}{path}: the answer is not JSON") from None

    def changes(self, since: int, limit: int = 100) -> tuple[list[dict], int, bool]:
        """One page of the change feed after ``since``: the changes, the last sequence number, done."""
        page = self.get("/changes", since=since, limit=limit)
        return list(page.get("Changes", [])), int(page.get("Last", since)), bool(page.get("Done", True))

    def series_info(self, orthanc_id: str) -> dict[str, Any]:
        """Main tags of a series with its study's and patient's (keyword -> value), and the ids."""
        series = self.get(f"/series/{orthanc_id}")
        study = self.get(f"/studies/{series['ParentStudy']}")
        tags: dict[str, Any] = {}
        tags.update(study.get("PatientMainDicomTags", {}))
        tags.update(study.get("MainDicomTags", {}))
        tags.update(series.get("MainDicomTags", {}))
        return tags

    def shared_tags(self, orthanc_id: str) -> dict[str, str]:
        """The tags every instance of the series shares (keyword -> value as text)."""
        shared = self.get(f"/series/{orthanc_id}/shared-tags", simplify="")
        return {k: v for k, v in shared.items() if isinstance(v, str)}


@dataclass
class Watcher:
    """The loop of the module docstring.

    Args:
        orthanc: the server.
        state: the state file.
        selection: the rules series must match.
        handle: called with each selected series; returns what was written / stored (recorded in the state)
            and raises on failure.
        max_attempts: attempts before a series is parked.
        retry_delay: seconds before the first retry (doubling after each failure).
        poll: seconds between feed reads when idle.
        echo: where progress lines go (``print`` by default).
    """

    orthanc: Orthanc
    state: WatchState
    selection: Selection
    handle: Callable[[SeriesRef], Mapping[str, Any]]
    max_attempts: int = 3
    retry_delay: float = 30.0
    poll: float = 5.0
    echo: Callable[[str], None] = print
    sleep: Callable[[float], None] = time.sleep

    def read_feed(self) -> int:
        """Read the feed to its end; returns the number of series added."""
        added = 0
        while True:
            since = self.state.last_seq
            changes, last, done = self.orthanc.changes(since)
            found = []
            for change in changes:
                if change.get("ChangeType") != "StableSeries":
                    continue
                info = self._selected(str(change.get("ID")))
                if info is not None:
                    found.append(info)
            new = set(self.state.record(found, last))
            added += len(new)
            for info in found:
                if info["series_uid"] in new:
                    new.discard(info["series_uid"])
                    self.echo(f"queued {info['series_uid']} ({info['description'] or 'no description'})")
            if done or last <= since:
                return added

    def _selected(self, orthanc_id: str) -> dict[str, str] | None:
        try:
            tags = self.orthanc.series_info(orthanc_id)
        except DicomwebError as exc:
            if "HTTP 404" in str(exc):  # deleted since the change
                return None
            raise
        if str(tags.get("Modality", "")).upper() in NOT_IMAGES:
            return None
        if not self.selection.accepts(tags, lambda: self.orthanc.shared_tags(orthanc_id)):
            log.debug("series %s not selected", tags.get("SeriesInstanceUID"))
            return None
        return {
            "series_uid": str(tags["SeriesInstanceUID"]),
            "study_uid": str(tags["StudyInstanceUID"]),
            "orthanc_id": orthanc_id,
            "description": str(tags.get("SeriesDescription", "")),
        }

    def work_one(self, now: float | None = None) -> bool:
        """Handle the next due series, if any; returns whether one was handled."""
        row = self.state.next_due(time.time() if now is None else now)
        if row is None:
            return False
        attempt = self.state.start(row.series_uid)
        ref = SeriesRef(self.orthanc.dicomweb, row.study_uid, row.series_uid)
        self.echo(f"segmenting {row.series_uid} (attempt {attempt}/{self.max_attempts})")
        try:
            result = self.handle(ref)
        except Exception as exc:  # one series' failure never stops the node
            error = str(exc) or type(exc).__name__
            if not isinstance(exc, MedSam3Error):
                error = f"{type(exc).__name__}: {error}"
                log.debug("series %s", row.series_uid, exc_info=True)
            log.error(
                "series %s failed (attempt %d/%d): %s", row.series_uid, attempt, self.max_attempts, error
            )
            status, next_try = self.state.fail(
                row.series_uid, error, max_attempts=self.max_attempts, retry_delay=self.retry_delay
            )
            if status == "parked":
                self.echo(f"parked {row.series_uid} after {attempt} attempts: {error}")
            else:
                self.echo(f"failed {row.series_uid}, retry in {next_try - time.time():.0f} s: {error}")
            return True
        self.state.finish(row.series_uid, result)
        self.echo(f"done {row.series_uid}")
        return True

    def run(self, *, once: bool = False) -> int:
        """Follow the feed (``once``: until every selected series is done or parked); returns the number of
        parked series."""
        for uid in self.state.requeue_running():
            self.echo(f"requeued {uid} (left running by a stopped watcher)")
        while True:
            self.read_feed()
            while self.work_one():
                self.read_feed()
            next_retry = self.state.next_retry()
            if once and next_retry is None:
                return len(self.state.rows("parked"))
            wait = self.poll if next_retry is None else max(0.0, min(self.poll, next_retry - time.time()))
            self.sleep(wait)


def status_table(rows: Sequence[SeriesRow]) -> str:
    """The state as a table: status, attempts, series UID, description, last error."""
    if not rows:
        return "no series recorded yet"
    lines = [f"{'status':8} {'tries':>5}  series"]
    for r in rows:
        lines.append(f"{r.status:8} {r.attempts:>5}  {r.series_uid}  {r.description}".rstrip())
        if r.last_error and r.status in ("failed", "parked"):
            lines.append(f"{'':16}{r.last_error}")
    counts = {s: sum(r.status == s for r in rows) for s in STATUSES}
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items() if n))
    return "\n".join(lines)
