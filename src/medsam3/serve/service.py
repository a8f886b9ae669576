"""The server's state: the model (loaded once), the feature cache, the images, the jobs and their expiry.

:class:`Service` is what the HTTP routes call; it holds no HTTP logic itself apart from raising
:class:`~medsam3.serve.errors.ApiError`:

* :meth:`Service.add_upload` checks and reads an upload (:mod:`medsam3.serve.uploads`), stores it
  (:mod:`medsam3.serve.store`) and returns its public description;
* :meth:`Service.submit` validates a segmentation request against the image (bad prompts are refused at
  once with 422, not as failed jobs; :func:`medsam3.serve.results.request_prompts`, which also maps boxes
  drawn on a displayed slice to key-slice boxes for ``propagate``) and queues a
  :class:`~medsam3.serve.jobs.Job` (503 when the queue is full);
* :meth:`Service.execute` runs in a worker thread: a :class:`~medsam3.predict.segmenter.Segmenter` with the
  request's options around the shared :class:`~medsam3.predict.engine.Engine` (the model, loaded once; its
  point tracker loaded on first use), and :func:`medsam3.serve.results.segment_job`;
* :meth:`Service.cleanup` removes jobs ``result_ttl`` seconds after they ended and images ``result_ttl``
  seconds after their last use (never while a job of theirs waits or runs), files included.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from fastapi import Request

from medsam3.errors import InputError, MedSam3Error
from medsam3.io.atomic import write_error
from medsam3.predict.engine import Engine
from medsam3.predict.segmenter import Segmenter
from medsam3.preprocess.intensity import parse_window
from medsam3.serve.cache import FeatureCache, install_feature_cache
from medsam3.serve.durable import (
    StateStore,
    sweep_dead_temporary_work_dirs,
    sweep_unknown,
    temporary_work_dir,
)
from medsam3.serve.errors import ApiError, public_message
from medsam3.serve.jobs import FAILED, QUEUED, RUNNING, Job, JobQueue, QueueFull, is_valid_id, new_id
from medsam3.serve.results import request_prompts, segment_job
from medsam3.serve.schemas import SegmentIn
from medsam3.serve.settings import ServeSettings
from medsam3.serve.store import ImageRecord, ImageStore
from medsam3.serve.uploads import receive_upload, store_upload

log = logging.getLogger("medsam3.serve")


class Service:
    """Everything a running server holds (see the module docstring)."""

    def __init__(self, settings: ServeSettings, loaded: Any):
        self.settings = settings
        self.loaded = loaded
        self._own_work_dir = settings.work_dir is None
        if self._own_work_dir:
            for gone in sweep_dead_temporary_work_dirs():
                log.info("removed %s, the work folder of a server that no longer runs", gone)
        self.work_dir = temporary_work_dir() if settings.work_dir is None else Path(settings.work_dir)
        self.jobs_dir = self.work_dir / "jobs"
        try:
            for folder in (self.work_dir, self.work_dir / "images", self.jobs_dir):
                folder.mkdir(parents=True, exist_ok=True)
                probe = tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-")  # writable, not just there
                probe.close()
        except OSError as exc:
            raise write_error(folder, exc) from None
        self.images = ImageStore(self.work_dir / "images", memory_bytes=settings.image_memory_bytes)
        self.cache = FeatureCache(settings.cache_items, settings.cache_bytes)
        install_feature_cache(loaded.model, self.cache)
        self.model_name = Path(str(getattr(loaded, "source", "model"))).name or "model"
        self._jobs: dict[str, Job] = {}
        self._expired_jobs: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()
        self.engine = Engine(loaded)
        self.state = StateStore(self.work_dir)
        self.images.state = self.state
        self.queue = JobQueue(
            self.execute,
            self.describe_error,
            workers=settings.workers,
            queue_size=settings.queue_size,
            on_change=self.state.put_job,
        )
        self.started = time.time()
        self._restore()

    def _restore(self) -> None:
        """Take over the images and jobs recorded by a server on this work folder
        (:mod:`medsam3.serve.durable`)."""
        known: set[str] = set()
        for rec in self.state.images():
            if rec.folder.is_dir():
                self.images.restore(rec)
                known.add(rec.id)
            else:
                self.state.drop_image(rec.id)
        requeued = failed = 0
        for job in self.state.jobs():
            with self._lock:
                self._jobs[job.id] = job
            if job.ended:
                continue
            shutil.rmtree(job.folder, ignore_errors=True)  # a partial result of a run that was cut short
            job.status, job.started, job.finished = QUEUED, None, None
            reason = None if job.image_id in known else "its image was lost when the server restarted"
            if reason is None:
                try:
                    self.queue.submit(job)
                    requeued += 1
                except QueueFull:
                    reason = "it could not be queued again after the server restarted (the queue was full)"
            if reason is not None:
                job.status, job.error, job.finished = FAILED, f"{reason}; submit it again", time.time()
                failed += 1
            self.state.put_job(job)
        ttl = self.settings.result_ttl
        swept = sweep_unknown(self.work_dir / "images", known, ttl)
        swept += sweep_unknown(self.jobs_dir, set(self._jobs), ttl)
        if known or self._jobs or swept:
            log.info(
                "restored %d image(s), %d job(s) (%d queued again, %d failed); removed %d unknown folder(s)",
                len(known),
                len(self._jobs),
                requeued,
                failed,
                len(swept),
            )

    # -- messages --------------------------------------------------------------------------------------
    @property
    def hidden_paths(self) -> tuple[str, ...]:
        """Server folders never shown to clients."""
        return (str(self.work_dir), str(getattr(self.loaded, "source", "")))

    def describe_error(self, job: Job, exc: BaseException) -> str:
        if isinstance(exc, ApiError):
            return exc.message
        if isinstance(exc, MedSam3Error):
            rec = self.images.find(job.image_id)
            return public_message(exc, name=rec.name if rec else None, hide=self.hidden_paths)
        log.error("job %s failed unexpectedly", job.id, exc_info=exc)
        return "internal error while segmenting (details are in the server log)"

    # -- uploads ---------------------------------------------------------------------------------------
    async def add_upload(self, request: Request) -> dict[str, Any]:
        """Receive, check, read and store an upload; returns its public description (ApiError on refusal)."""
        from starlette.concurrency import run_in_threadpool

        length = request.headers.get("content-length")
        incoming = int(length) if length and length.isdigit() else self.settings.max_upload_bytes
        await run_in_threadpool(self.make_room, incoming)
        image_id = new_id()
        folder = self.images.new_folder(image_id)
        try:
            received = await receive_upload(request, folder, self.settings)
            rec = await run_in_threadpool(self._read_upload, image_id, folder, received)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        try:  # what it takes once stored (the upload, its display copy) must fit too
            await run_in_threadpool(self.make_room, 0, image_id)
        except ApiError:
            self.images.remove(image_id)
            raise
        return rec.info

    def _read_upload(self, image_id: str, folder: Path, received) -> ImageRecord:
        from medsam3.io.readers import NOT_AN_IMAGE, read_image

        stored = store_upload(received, folder, self.settings)
        try:
            image = read_image(stored.source, series_uid=received.series_uid, modality=received.modality)
        except InputError as exc:
            raise ApiError(400, public_message(exc, name=received.name, hide=self.hidden_paths)) from None
        if image.meta.get("is_label"):
            raise ApiError(400, f"{received.name}: {NOT_AN_IMAGE}")
        image.meta["display_name"] = received.name
        return self.images.add(
            image_id, folder, received.name, stored, image, received.series_uid, received.modality
        )

    # -- storage ---------------------------------------------------------------------------------------
    def storage_bytes(self) -> int:
        """Bytes the work folder holds (images, their copies, results)."""
        return _folder_bytes(self.work_dir)

    def make_room(self, incoming: int, keep: str | None = None) -> None:
        """Make room for ``incoming`` more bytes within the storage budget: expire the least recently used
        idle images (and their jobs' results) first, never ``keep``; 507 when that is not enough."""
        budget = self.settings.max_storage_bytes
        used = self.storage_bytes()
        if used + incoming <= budget:
            return
        with self._lock:
            busy = {j.image_id for j in self._jobs.values() if not j.ended} | {keep}
        for rec in sorted(self.images.records(), key=lambda r: r.last_used):
            if used + incoming <= budget:
                return
            if rec.id in busy:
                continue
            with self._lock:
                jobs = [j for j in self._jobs.values() if j.image_id == rec.id]
            for job in jobs:
                used -= _folder_bytes(job.folder)
                self.cleanup_job(job)
            used -= _folder_bytes(rec.folder)
            self.images.remove(rec.id, expired=True)
            log.info("expired image %s early to stay within the storage budget", rec.id)
        if used + incoming > budget:
            raise ApiError(
                507,
                f"not enough storage for this upload ({incoming / 2**20:.1f} MB): {used / 2**20:.1f} of "
                f"{budget / 2**20:.1f} MB are in use by images being segmented (option --max-storage-mb)",
            )

    # -- jobs ------------------------------------------------------------------------------------------
    def get_job(self, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id) if is_valid_id(job_id) else None
            if job is None:
                if job_id in self._expired_jobs:
                    raise ApiError(
                        410,
                        f"the result of job {job_id} has expired and was removed; run the segmentation again",
                    )
                raise ApiError(404, f"unknown job id {job_id[:40]!r}")
            return job

    def job_status(self, job: Job) -> dict[str, Any]:
        out = job.to_dict()
        out["queue_position"] = self.queue.position(job.id) if job.status == QUEUED else None
        if job.ended and job.finished is not None:
            out["expires"] = job.finished + self.settings.result_ttl
        return out

    def submit(self, image_id: str, body: SegmentIn) -> Job:
        """Validate ``body`` against the image and queue a job (ApiError 4xx / 503)."""
        rec = self.images.get(image_id)
        if body.slice is not None:
            if rec.info["ndim"] != 3:
                what = "'slice' and 'propagate' apply" if body.propagate else "'slice' applies"
                raise ApiError(422, f"{what} to volumes only; this image is 2D")
            from medsam3.serve.store import check_plane

            check_plane(rec.info, body.slice.plane, body.slice.index)
        try:
            body.options(self.option_defaults)  # values and rules: the same messages as the CLI's
            request_prompts(body, rec)
            window = body.given_options().get("window")
            if window is not None:
                if rec.info["modality"] != "CT":
                    raise ApiError(
                        422,
                        f"a CT window was given for a {rec.info['modality']} image; windows apply to CT only",
                    )
                parse_window(window)
        except MedSam3Error as exc:
            raise ApiError(422, public_message(exc, name=rec.name, hide=self.hidden_paths)) from None
        job = Job(new_id(), image_id, body.model_dump(), self.jobs_dir)
        job.folder = self.jobs_dir / job.id
        with self._lock:
            self._jobs[job.id] = job
        self.state.put_job(job)  # recorded before it can run: a restart finds it
        try:
            self.queue.submit(job)
        except QueueFull as exc:
            with self._lock:
                self._jobs.pop(job.id, None)
            self.state.drop_job(job.id)
            raise ApiError(
                503,
                f"the server is busy: {exc} (server options --workers / --queue-size); "
                f"retry in {exc.retry_after} s",
                headers={"Retry-After": str(exc.retry_after)},
            ) from None
        return job

    @property
    def option_defaults(self) -> dict[str, Any]:
        """The server's defaults for the options a request leaves out (its thresholds)."""
        s = self.settings
        return {"threshold": s.threshold, "presence_threshold": s.presence_threshold}

    def execute(self, job: Job) -> dict[str, Any]:
        """Run ``job`` (worker thread): segment and write its files."""
        from medsam3.preprocess.orientation import plan_reorientation

        rec = self.images.get(job.image_id)
        image = self.images.load_image(rec)
        body = SegmentIn.model_validate(job.request)
        prompts = request_prompts(body, rec, plan_reorientation(image) if image.ndim == 3 else None)
        segmenter = Segmenter(self.engine, options=body.options(self.option_defaults))
        job.folder.mkdir(parents=True, exist_ok=False)
        try:
            return segment_job(segmenter, image, rec, prompts, job.request, job.folder, self.model_name)
        except BaseException:
            shutil.rmtree(job.folder, ignore_errors=True)
            raise

    def pending_jobs(self, image_id: str) -> int:
        """How many jobs of ``image_id`` are queued or running."""
        with self._lock:
            return sum(1 for j in self._jobs.values() if j.image_id == image_id and not j.ended)

    def job_file(self, job: Job, kind: str) -> Path:
        """A result file of a finished job (409 while it is not done, 404 when it has no such file)."""
        if job.status in (QUEUED, RUNNING):
            raise ApiError(409, f"job {job.id} is {job.status}; its result is not ready yet")
        if job.status == FAILED:
            raise ApiError(409, f"job {job.id} failed: {job.error}")
        name = (job.result or {}).get("files", {}).get(kind)
        if name is None:
            raise ApiError(404, f"job {job.id} has no {kind.replace('_', ' ')} file")
        return job.folder / name

    def cleanup_job(self, job: Job) -> None:
        """Forget an ended job and remove its files."""
        with self._lock:
            self._jobs.pop(job.id, None)
        self.state.drop_job(job.id)
        shutil.rmtree(job.folder, ignore_errors=True)

    # -- expiry ----------------------------------------------------------------------------------------
    def cleanup(self, now: float | None = None) -> dict[str, int]:
        """Remove ended jobs and unused images older than ``result_ttl``; returns what was removed."""
        now = time.time() if now is None else now
        ttl = self.settings.result_ttl
        gone_jobs = []
        with self._lock:
            for job in list(self._jobs.values()):
                if job.ended and job.finished is not None and job.finished + ttl <= now:
                    del self._jobs[job.id]
                    self._expired_jobs[job.id] = now
                    gone_jobs.append(job)
            while len(self._expired_jobs) > 10000:
                self._expired_jobs.popitem(last=False)
            busy = {j.image_id for j in self._jobs.values() if not j.ended}
        for job in gone_jobs:
            self.state.drop_job(job.id)
            shutil.rmtree(job.folder, ignore_errors=True)
        gone_images = [r.id for r in self.images.records() if r.id not in busy and r.last_used + ttl <= now]
        for image_id in gone_images:
            self.images.remove(image_id, expired=True)
        if gone_jobs or gone_images:
            log.info("expired %d job(s) and %d image(s)", len(gone_jobs), len(gone_images))
        return {"jobs": len(gone_jobs), "images": len(gone_images)}

    def info(self) -> dict[str, Any]:
        from medsam3 import __version__

        s = self.settings
        return {
            "version": __version__,
            "model": self.model_name,
            "device": str(getattr(self.loaded, "device", "cpu")),
            "dtype": self.engine.describe()["dtype"],  # names int8 layers (the loaded dtype says float32)
            "auth": s.token is not None,
            "limits": {
                "max_upload_mb": s.max_upload_mb,
                "max_voxels": s.max_voxels,
                "max_zip_entries": s.max_zip_entries,
                "max_unzipped_mb": s.max_unzipped_mb,
                "max_zip_ratio": s.max_zip_ratio,
                "result_ttl_s": s.result_ttl,
            },
            "defaults": {"threshold": s.threshold, "presence_threshold": s.presence_threshold},
            "concepts": self.concepts_info(),
            "queue": self.queue.load(),
            "feature_cache": self.cache.snapshot(),
            "images": len(self.images.records()),
            "uptime_s": round(time.time() - self.started, 1),
        }

    def concepts_info(self) -> dict[str, Any] | None:
        """The concepts the model records (``concepts.json``, :mod:`medsam3.model.concepts`): ``known`` and
        ``open_vocabulary``, and ``training_domain``: concept -> distance threshold of its training domain
        (``domain.safetensors``, :mod:`medsam3.model.domain`; ``None`` without one); ``None`` when it
        records no concepts (any prompt is segmented)."""
        from medsam3.model.concepts import ModelConcepts
        from medsam3.model.domain import ModelDomain

        concepts = ModelConcepts.of_model(self.engine.source)
        if concepts is None:
            return None
        domain = ModelDomain.of_model(self.engine.source)
        return {
            "known": concepts.names,
            "open_vocabulary": concepts.open_vocabulary,
            "training_domain": None
            if domain is None
            else {name: round(d.threshold, 6) for name, d in sorted(domain.concepts.items())},
        }

    def close(self) -> None:
        """Stop the workers and remove a work folder the service created itself."""
        self.queue.shutdown()
        self.state.close()
        if self._own_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)


def _folder_bytes(folder: Path) -> int:
    """Bytes of the files below ``folder`` (0 when it is gone)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total
