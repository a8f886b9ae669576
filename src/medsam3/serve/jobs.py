"""Segmentation jobs: ids, states, and a bounded queue served by a fixed number of worker threads.

A job goes ``queued -> running -> done`` or ``-> failed`` (with a message for the client). At most
``workers`` jobs run at once and at most ``queue_size`` wait; :meth:`JobQueue.submit` on a full queue raises
:class:`QueueFull` with a ``Retry-After`` estimate (seconds: the mean run time so far times the jobs ahead
per worker, at least 1; 1 before any job has finished, when there is nothing to estimate from). Jobs
are never dropped silently: each submitted job ends ``done`` or ``failed``, also when the server shuts
down (queued jobs then fail with a message saying so).
"""

from __future__ import annotations

import logging
import math
import queue
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("medsam3.serve")

QUEUED, RUNNING, DONE, FAILED = "queued", "running", "done", "failed"
STATES = (QUEUED, RUNNING, DONE, FAILED)


def new_id() -> str:
    """A fresh server-generated id: 32 lowercase hex digits (128 random bits)."""
    return secrets.token_hex(16)


def is_valid_id(value: str) -> bool:
    """True for ids of the form :func:`new_id` makes (checked before an id touches the file system)."""
    return len(value) == 32 and all(c in "0123456789abcdef" for c in value)


@dataclass
class Job:
    """One segmentation request and its outcome.

    Attributes:
        id: server-generated id; ``folder`` holds the job's result files.
        image_id: the uploaded image it segments.
        request: the validated request (prompts, scope, thresholds) as plain data.
        status: one of :data:`STATES`; ``error`` is the client-facing message of a failed job.
        result: what the job produced (label values, file names, summary), set when done.
        created, started, finished: ``time.time()`` stamps (``None`` until reached).
    """

    id: str
    image_id: str
    request: dict[str, Any]
    folder: Path
    status: str = QUEUED
    error: str | None = None
    result: dict[str, Any] | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None

    @property
    def ended(self) -> bool:
        return self.status in (DONE, FAILED)

    def to_dict(self) -> dict[str, Any]:
        """The public status record (no server paths)."""
        out = {
            "job_id": self.id,
            "image_id": self.image_id,
            "status": self.status,
            "error": self.error,
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
            "seconds": None
            if self.started is None or self.finished is None
            else round(self.finished - self.started, 4),
            "request": self.request,
        }
        if self.result is not None:
            out["result"] = self.result
        return out


class QueueFull(Exception):
    """The queue holds ``queue_size`` waiting jobs; retry after ``retry_after`` seconds."""

    def __init__(self, retry_after: int, waiting: int):
        super().__init__(f"the work queue is full ({waiting} jobs waiting)")
        self.retry_after = int(retry_after)
        self.waiting = waiting


class JobQueue:
    """A bounded FIFO of jobs served by ``workers`` threads calling ``execute(job) -> result``.

    ``describe_error(job, exc) -> str`` turns an exception of ``execute`` into the job's message.
    """

    def __init__(
        self,
        execute: Callable[[Job], dict[str, Any]],
        describe_error: Callable[[Job, BaseException], str],
        *,
        workers: int = 1,
        queue_size: int = 16,
        on_change: Callable[[Job], None] | None = None,
    ):
        if workers < 1 or queue_size < 1:
            raise ValueError("workers and queue_size must be >= 1")
        self.execute = execute
        self.describe_error = describe_error
        self.on_change = on_change
        self.workers = int(workers)
        self.queue_size = int(queue_size)
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=self.queue_size)
        self._waiting: list[str] = []
        self._running = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._durations: list[float] = []
        self.completed = 0
        self.failed = 0
        self._threads = [
            threading.Thread(target=self._work, name=f"medsam3-worker-{i}", daemon=True)
            for i in range(self.workers)
        ]
        for t in self._threads:
            t.start()

    # -- submitting ----------------------------------------------------------------------------------
    def retry_after(self) -> int:
        """Seconds a client should wait before submitting again (see the module docstring)."""
        with self._lock:
            if not self._durations:  # nothing measured yet: no estimate better than "soon"
                return 1
            mean = sum(self._durations) / len(self._durations)
            ahead = len(self._waiting) + self._running
        return max(1, min(600, math.ceil(mean * max(ahead, 1) / self.workers)))

    def submit(self, job: Job) -> None:
        """Queue ``job``; raises :class:`QueueFull` when ``queue_size`` jobs already wait."""
        if self._stop.is_set():
            raise QueueFull(self.retry_after(), self.queue_size)
        with self._lock:
            try:
                self._queue.put_nowait(job)
            except queue.Full:
                waiting = len(self._waiting)
                full = True
            else:
                self._waiting.append(job.id)
                full = False
        if full:
            raise QueueFull(self.retry_after(), waiting)

    def position(self, job_id: str) -> int | None:
        """1-based place of a waiting job in the queue, ``None`` when it is not waiting."""
        with self._lock:
            try:
                return self._waiting.index(job_id) + 1
            except ValueError:
                return None

    def load(self) -> dict[str, int]:
        """Jobs waiting and running, and the limits."""
        with self._lock:
            return {
                "waiting": len(self._waiting),
                "running": self._running,
                "workers": self.workers,
                "queue_size": self.queue_size,
                "completed": self.completed,
                "failed": self.failed,
            }

    # -- working -------------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            try:
                job = self._queue.get(timeout=0.1)
            except queue.Empty:
                if self._stop.is_set():
                    return
                continue
            with self._lock:
                self._waiting.remove(job.id)
                stopped = self._stop.is_set()
                if stopped:
                    job.status, job.finished = FAILED, time.time()
                    job.error = "the server shut down before this job ran"
                    self.failed += 1
                else:
                    self._running += 1
            if stopped:
                self._changed(job)
                continue
            self._run(job)

    def _changed(self, job: Job) -> None:
        if self.on_change is not None:
            try:
                self.on_change(job)
            except Exception:  # recording a transition must never lose the job itself
                log.exception("could not record the state of job %s", job.id)

    def _run(self, job: Job) -> None:
        job.started = time.time()
        job.status = RUNNING
        self._changed(job)
        try:
            result = self.execute(job)
        except BaseException as exc:  # every failure becomes the job's message
            try:
                message = self.describe_error(job, exc)
            except Exception:  # the describer must never lose a job
                message = "the job failed"
            job.error = message
            job.finished = time.time()
            job.status = FAILED
            with self._lock:
                self._running -= 1
                self.failed += 1
            self._changed(job)
            if not isinstance(exc, Exception):
                raise
            return
        job.result = result
        job.finished = time.time()
        job.status = DONE
        with self._lock:
            self._running -= 1
            self.completed += 1
            self._durations = (self._durations + [job.finished - job.started])[-20:]
        self._changed(job)

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop taking jobs; queued jobs fail with a message; wait up to ``timeout`` s for running ones."""
        self._stop.set()
        deadline = time.time() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.time()))
