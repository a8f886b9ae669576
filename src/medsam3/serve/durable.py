"""What survives a restart of the server: image and job records in SQLite beside their files.

The server's work folder holds ``state.sqlite3`` with one row per uploaded image and per job (JSON
records). Rows are written when an image is added or removed and at every job transition (queued, running,
done, failed), in one transaction each. A server started on the same ``--work-dir`` reads them back:

* images whose folder is still there are known again (their files were never moved);
* finished jobs are answered (status, result files) until they expire, as before the restart;
* queued and running jobs are queued again from the start (a running job's partial folder is removed):
  every accepted job ends ``done`` or ``failed`` with a reason, none is forgotten;
* folders under ``images/`` and ``jobs/`` that no row knows and that are older than the results' lifetime
  (left by a server killed between creating a folder and recording it) are removed.

A server without ``--work-dir`` works in a fresh temporary folder removed at exit; the folders of such
servers that were killed outright (their process id is in the folder name, ``medsam3-serve-<pid>-*``) are
removed when the next one starts on this machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from medsam3.serve.jobs import Job
from medsam3.serve.store import ImageRecord
from medsam3.serve.uploads import Stored

#: The state file inside the work folder.
STATE_FILE = "state.sqlite3"
#: Prefix of the temporary work folders (followed by the process id).
TEMP_PREFIX = "medsam3-serve-"


def _image_row(rec: ImageRecord) -> dict[str, Any]:
    return {
        "id": rec.id,
        "name": rec.name,
        "folder": str(rec.folder),
        "stored": {
            "source": str(rec.stored.source),
            "kind": rec.stored.kind,
            "declared_voxels": rec.stored.declared_voxels,
        },
        "info": rec.info,
        "series_uid": rec.series_uid,
        "modality": rec.modality,
        "created": rec.created,
        "last_used": rec.last_used,
    }


def _image_from_row(row: dict[str, Any]) -> ImageRecord:
    stored = Stored(
        Path(row["stored"]["source"]), row["stored"]["kind"], int(row["stored"]["declared_voxels"])
    )
    return ImageRecord(
        row["id"],
        row["name"],
        Path(row["folder"]),
        stored,
        row["info"],
        row["series_uid"],
        row["modality"],
        float(row["created"]),
        float(row["last_used"]),
    )


def _job_row(job: Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "image_id": job.image_id,
        "request": job.request,
        "folder": str(job.folder),
        "status": job.status,
        "error": job.error,
        "result": job.result,
        "created": job.created,
        "started": job.started,
        "finished": job.finished,
    }


def _job_from_row(row: dict[str, Any]) -> Job:
    return Job(
        row["id"],
        row["image_id"],
        row["request"],
        Path(row["folder"]),
        row["status"],
        row["error"],
        row["result"],
        float(row["created"]),
        row["started"],
        row["finished"],
    )


class StateStore:
    """Image and job records in ``<work folder>/state.sqlite3`` (module docstring). Thread-safe."""

    def __init__(self, work_dir: Path):
        self.path = Path(work_dir) / STATE_FILE
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS images (id TEXT PRIMARY KEY, record TEXT NOT NULL)")
            self._db.execute("CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, record TEXT NOT NULL)")

    def _write(self, sql: str, args: tuple[Any, ...]) -> None:
        with self._lock:
            self._db.execute(sql, args)

    def put_image(self, rec: ImageRecord) -> None:
        self._write("INSERT OR REPLACE INTO images VALUES (?, ?)", (rec.id, json.dumps(_image_row(rec))))

    def drop_image(self, image_id: str) -> None:
        self._write("DELETE FROM images WHERE id = ?", (image_id,))

    def put_job(self, job: Job) -> None:
        self._write("INSERT OR REPLACE INTO jobs VALUES (?, ?)", (job.id, json.dumps(_job_row(job))))

    def drop_job(self, job_id: str) -> None:
        self._write("DELETE FROM jobs WHERE id = ?", (job_id,))

    def images(self) -> list[ImageRecord]:
        with self._lock:
            rows = self._db.execute("SELECT record FROM images").fetchall()
        return [_image_from_row(json.loads(r[0])) for r in rows]

    def jobs(self) -> list[Job]:
        with self._lock:
            rows = self._db.execute("SELECT record FROM jobs").fetchall()
        return sorted((_job_from_row(json.loads(r[0])) for r in rows), key=lambda j: j.created)

    def close(self) -> None:
        with self._lock:
            self._db.close()


def sweep_unknown(folder: Path, known: set[str], older_than: float, now: float | None = None) -> list[Path]:
    """Remove the entries of ``folder`` whose names are not in ``known`` and that were last modified more
    than ``older_than`` seconds ago; returns what was removed."""
    now = time.time() if now is None else now
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for item in folder.iterdir():
        if item.name in known or item.name.startswith("."):
            continue
        with contextlib.suppress(OSError):
            if item.stat().st_mtime + older_than <= now:
                shutil.rmtree(item) if item.is_dir() else item.unlink()
                removed.append(item)
    return removed


def temporary_work_dir() -> Path:
    """A fresh temporary work folder named with this process id (``medsam3-serve-<pid>-*``)."""
    return Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-"))


def sweep_dead_temporary_work_dirs() -> list[Path]:
    """Remove the temporary work folders of servers that no longer run on this machine."""
    from medsam3.io.atomic import process_alive

    removed: list[Path] = []
    root = Path(tempfile.gettempdir())
    for item in root.glob(f"{TEMP_PREFIX}*-*"):
        pid_text = item.name[len(TEMP_PREFIX) :].split("-", 1)[0]
        if not pid_text.isdigit() or process_alive(int(pid_text)) or not item.is_dir():
            continue
        shutil.rmtree(item, ignore_errors=True)
        removed.append(item)
    return removed
