"""Many cases on a Ray cluster: ``medsam3 segment CASES --engine ray``.

Ray is optional (``pip install "medsam3[distributed]"``). The run has three stages, all Ray's own
primitives:

* **reading**: one Ray task per case reads and checks the image (the job's ``read``: decoding, the checks
  that need no model) on a CPU; the image waits in Ray's object store, never on the driver. When the
  workers take every CPU of the cluster, the worker reads its case itself instead: Ray keeps no idle
  process beyond the cluster's CPUs, so each read task would start (and import) a new Python process,
  which took a quarter of the CPU from the workers on a 2-core machine
  (``benchmarks/results/distributed.md``);
* **segmenting and writing**: ``workers`` model actors (:class:`CaseWorker`, each with
  ``gpus_per_worker`` GPUs and ``cpus_per_worker`` CPUs) load the model once and run the job's
  ``segment``, the same per-case function as the single-process folder loop
  (:func:`medsam3.predict.batch_cases.run_cases`), writing through the same atomic writers, the case's JSON
  last; a :class:`ray.util.ActorPool` hands each free actor the next case;
* **the driver** walks the case list once, skips the cases already done (the folder loop's rule,
  :func:`~medsam3.predict.batch_cases.done_outcome`), keeps at most ``workers + prefetch`` cases between
  reading and writing (so its memory and the object store's do not grow with the cohort), shows progress
  and rewrites the summary CSV (the folder loop's columns and row order) every few seconds and at the end.

Completion is the folder mode's: a case is done when its JSON and every output it lists exist. Either
engine resumes a cohort the other started, and parts (:mod:`medsam3.predict.parts`) combine with both.

Failures
--------
* A case that fails (unreadable, bad prompts, any exception) is recorded with the folder loop's message;
  the others go on; the CLI lists the failed cases and exits 1.
* A worker that dies (killed, out of memory, its node lost) loses only the case it held: that case is sent
  again to another worker, at most ``retries`` times (then it fails, naming the deaths), and a new worker
  takes the dead one's place (at most ``workers x (retries + 1)`` replacements in a run). A case is sent
  again with a fresh read. When the dead worker had finished writing the case (its JSON exists, written
  during this run, with this run's prompts), the case is not segmented again: every case is written once.
* Ctrl-C marks the cases in flight ``interrupted``, writes the CSV and stops the workers; their
  temporaries are removed by the next run.

Without ``address`` (and without ``$RAY_ADDRESS``) a local Ray instance is started on 127.0.0.1 and shut
down at the end; with ``address="auto"`` or ``"ray://HOST:PORT"`` the run joins that cluster, whose nodes
must have medsam3 installed and see the cases and the output folder at the same paths (shared storage).
When Ray is already initialised in this process (a notebook, the tests), that session is used as it is.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from medsam3.errors import MedSam3Error, OptionError
from medsam3.predict.batch_cases import (
    Case,
    CaseOutcome,
    done_outcome,
    error_text,
    existing_summary,
    ok_outcome,
    remove_stale_temporaries_in,
    write_summary_csv,
)

log = logging.getLogger(__name__)

#: The message when Ray is missing.
INSTALL_HINT = 'the Ray engine needs Ray: pip install "medsam3[distributed]"'


class CaseJob(Protocol):
    """What the engine needs of a batch run's per-case function (``medsam3.commands.segment.CaseJob``)."""

    out: Path
    protected: tuple[Path, ...]

    def segmenter(self) -> Any: ...

    def read(self, case: Case) -> Any: ...

    def segment(self, case: Case, loaded: Any, elapsed: float = 0.0) -> dict: ...

    def same_prompts(self, summary: dict, case: Case) -> bool: ...


@dataclass(frozen=True)
class RaySettings:
    """How the cases are spread over the cluster.

    Attributes:
        address: the cluster (``"auto"``, ``"ray://HOST:PORT"``); ``None``: ``$RAY_ADDRESS``, else a new
            local instance.
        workers: model actors; ``None``: one per ``gpus_per_worker`` GPUs of the cluster, else 1.
        gpus_per_worker: GPUs per actor (fractions share a GPU); ``None``: 1 on a cluster with GPUs unless
            ``cpu_only``, else 0.
        cpus_per_worker: CPUs per actor, also its number of PyTorch threads (at least 1).
        retries: times a case whose worker died is sent again.
        cpu_only: the model runs on CPUs (``--device cpu``).
        prefetch: cases read ahead of the free workers (``None``: as many as workers).
        csv_interval: seconds between rewrites of the summary CSV while the run goes on.
    """

    address: str | None = None
    workers: int | None = None
    gpus_per_worker: float | None = None
    cpus_per_worker: float = 1.0
    retries: int = 2
    cpu_only: bool = False
    prefetch: int | None = None
    csv_interval: float = 5.0


def import_ray() -> Any:
    """The ``ray`` module, or :class:`~medsam3.errors.OptionError` with the install command."""
    try:
        import ray
    except ImportError:
        raise OptionError(INSTALL_HINT) from None
    return ray


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[Any]:
    """Ray, initialised for the run: the session already open in this process, the cluster at ``address``
    (or ``$RAY_ADDRESS``), else a local instance on 127.0.0.1; what is started here is shut down here."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address or None)
    else:
        ray.init(include_dashboard=False, _node_ip_address="127.0.0.1")
    try:
        yield ray
    finally:
        ray.shutdown()


@dataclass
class ReadResult:
    """A case read by :func:`read_case`: the image, or the error of a case that cannot be read."""

    image: Any
    error: str
    seconds: float


def read_case(job: CaseJob, case: Case) -> ReadResult:
    """Read one case (a Ray task): failures come back as an error message, as the folder loop records them."""
    start = time.perf_counter()
    try:
        image = job.read(case)
    except Exception as exc:
        return ReadResult(None, error_text(exc), time.perf_counter() - start)
    return ReadResult(image, "", time.perf_counter() - start)


def _record(index: int, outcome: CaseOutcome) -> dict[str, Any]:
    """A worker's answer for one case: the outcome without the case (the driver has it)."""
    return {
        "index": index,
        "status": outcome.status,
        "error": outcome.error,
        "seconds": outcome.seconds,
        "labels": outcome.labels,
        "info": outcome.info,
        "pid": os.getpid(),
    }


class CaseWorker:
    """A model actor: loads the model once (:meth:`load`) and segments the cases it is handed.

    Args:
        job: the run's per-case function (its loaded model stays here).
        threads: PyTorch threads of this process.
    """

    def __init__(self, job: CaseJob, threads: int):
        import torch

        from medsam3.io.atomic import protect_inputs

        torch.set_num_threads(max(1, threads))
        protect_inputs(job.protected)  # the driver's inputs are this process's inputs too
        with contextlib.suppress(ImportError):  # no weight-loading bars from every worker
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            hf_logging.set_verbosity_error()
        self.job = job

    def load(self) -> int:
        """Load the model now (errors surface here); returns this process's id."""
        self.job.segmenter()
        return os.getpid()

    def pid(self) -> int:
        """This worker's process id (also tells whether it is alive)."""
        return os.getpid()

    def segment(
        self, index: int, case: Case, read: ReadResult | None, attempt: int, overwrite: bool, started: float
    ) -> dict[str, Any]:
        """Segment and write one case; never raises (a failure is the answer's ``error``).

        ``read``: the case read by a read task, ``None``: read it here. ``attempt`` > 0: the case was sent
        before to a worker that died; when that worker finished the case during this run (``started``: the
        run's start, wall clock), its outputs are kept.
        """
        if read is None:
            read = read_case(self.job, case)
        start = time.perf_counter()
        if read.error:
            return _record(index, CaseOutcome(case, "failed", read.error, read.seconds))
        if attempt > 0:
            earlier = self._finished_before(case, overwrite, started)
            if earlier is not None:
                return _record(index, ok_outcome(case, earlier, read.seconds))
        try:
            summary = self.job.segment(case, read.image, read.seconds)
            return _record(index, ok_outcome(case, summary, read.seconds + time.perf_counter() - start))
        except Exception as exc:
            if not isinstance(exc, MedSam3Error):
                log.debug("case %s failed", case.name, exc_info=True)
            seconds = read.seconds + time.perf_counter() - start
            return _record(index, CaseOutcome(case, "failed", error_text(exc), seconds))

    def _finished_before(self, case: Case, overwrite: bool, started: float) -> dict | None:
        """The JSON of ``case`` when a worker that died finished it during this run, else ``None``."""
        summary = existing_summary(self.job.out, case)
        if summary is None:
            return None
        try:
            if overwrite and (self.job.out / f"{case.name}.json").stat().st_mtime < started:
                return None  # an earlier run's outputs, which --overwrite redoes
            return summary if self.job.same_prompts(summary, case) else None
        except (OSError, MedSam3Error):
            return None


@dataclass
class _Ticket:
    """A case on its way through the cluster."""

    index: int
    case: Case
    read: Any
    attempt: int = 0
    ref: Any = None
    actor: Any = None
    deaths: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Plan:
    """Workers, each one's GPUs and CPUs, and the CPUs of a read task (0: the workers read their cases)."""

    workers: int
    gpus: float
    cpus: float
    read_cpus: float


def plan_workers(resources: dict[str, float], settings: RaySettings) -> _Plan:
    """Workers and their resources on a cluster with ``resources`` (``ray.cluster_resources()``).

    Raises:
        OptionError: the workers asked for do not fit the cluster (no GPU, too few CPUs, ...).
    """
    gpus_total = float(resources.get("GPU", 0.0))
    cpus_total = float(resources.get("CPU", 0.0))
    gpus = settings.gpus_per_worker
    if gpus is None:
        gpus = 1.0 if gpus_total >= 1 and not settings.cpu_only else 0.0
    if settings.cpu_only and gpus > 0:
        raise OptionError("--device cpu with --gpus-per-worker above 0: the model would not use the GPUs")
    workers = settings.workers or (max(1, int(gpus_total // gpus)) if gpus > 0 else 1)
    cpus = settings.cpus_per_worker
    if gpus * workers > gpus_total + 1e-9:
        raise OptionError(
            f"{workers} worker(s) x {gpus:g} GPU(s) need {gpus * workers:g} GPUs; the Ray cluster has "
            f"{gpus_total:g} (see --workers, --gpus-per-worker)"
        )
    if cpus * workers > cpus_total + 1e-9:
        raise OptionError(
            f"{workers} worker(s) x {cpus:g} CPU(s) need {cpus * workers:g} CPUs; the Ray cluster has "
            f"{cpus_total:g} (see --workers, --cpus-per-worker)"
        )
    read_cpus = 1.0 if cpus_total - cpus * workers >= 1 else 0.0
    return _Plan(workers, gpus, cpus, read_cpus)


class RayRun:
    """One run of the cases on Ray (module docstring); :func:`run_cases_ray` makes and runs it.

    ``on_outcome(outcome, run)`` is called for every case as its outcome is known (tests use it to kill a
    worker in the middle of a run). ``inflight`` holds the cases handed to workers by index (each with its
    ``actor`` and result ``ref``), ``attempts`` the times a case was sent again by name, ``replacements``
    the workers started in place of dead ones.
    """

    def __init__(
        self,
        ray: Any,
        cases: Sequence[Case],
        job: CaseJob,
        out_dir: Path,
        *,
        settings: RaySettings,
        same_case_prompts: Callable[[dict, Case], bool],
        label_names: Sequence[str],
        overwrite: bool,
        max_cases: int | None,
        summary_csv: Path,
        case_columns: bool,
        show_progress: bool,
        shared_folder: bool,
        on_outcome: Callable[[CaseOutcome, RayRun], None] | None,
    ):
        self.ray = ray
        self.cases = cases
        self.job = job
        self.out_dir = out_dir
        self.settings = settings
        self.same_case_prompts = same_case_prompts
        self.label_names = label_names
        self.overwrite = overwrite
        self.max_cases = max_cases
        self.summary_csv = summary_csv
        self.case_columns = case_columns
        self.show_progress = show_progress
        self.shared_folder = shared_folder
        self.on_outcome = on_outcome
        self.outcomes: dict[int, CaseOutcome] = {}
        self.inflight: dict[int, _Ticket] = {}
        self.queue: deque[_Ticket] = deque()
        self.actors: list[Any] = []
        self.attempts: dict[str, int] = {}
        self.replacements = 0
        self.started = time.time()
        self._written = 0.0
        self._advance: Callable[[], None] = lambda: None

    # ---------------------------------------------------------------------------------------------------
    # set-up

    def _start(self) -> None:
        """Check the plan against the cluster and put the job in the object store (no worker yet)."""
        ray = self.ray
        nodes = [n for n in ray.nodes() if n.get("Alive", True)]
        remove_stale_temporaries_in(self.out_dir, shared=self.shared_folder or len(nodes) > 1)
        plan = plan_workers(ray.cluster_resources(), self.settings)
        self.plan = plan
        reader = copy.copy(self.job)
        reader.protected = ()  # reading writes nothing
        self.job_ref = ray.put(self.job)
        self.reader_ref = ray.put(reader)
        self.worker_class = ray.remote(CaseWorker).options(
            num_cpus=plan.cpus, num_gpus=plan.gpus, max_restarts=0, max_task_retries=0
        )
        self.read_task = ray.remote(read_case).options(
            num_cpus=plan.read_cpus, max_retries=self.settings.retries
        )
        self.prefetch = self.settings.prefetch if self.settings.prefetch is not None else plan.workers
        self.max_replacements = plan.workers * (self.settings.retries + 1)

    def _start_workers(self) -> None:
        """Start the model actors and wait until each has loaded the model (once, when a case needs it)."""
        from ray.util import ActorPool

        ray, plan = self.ray, self.plan
        log.info("starting %d Ray worker(s) (each loads the model once)", plan.workers)
        self.actors = [self._new_actor() for _ in range(plan.workers)]
        try:
            ray.get([a.load.remote() for a in self.actors])
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, MedSam3Error):  # the model cannot be loaded: the CLI's error
                raise exc.cause from None
            raise
        self.pool = ActorPool(list(self.actors))
        log.info(
            "Ray: %d worker(s), %g GPU(s) and %g CPU(s) each; %s",
            plan.workers,
            plan.gpus,
            plan.cpus,
            f"reading with {plan.read_cpus:g} CPU(s) per case"
            if plan.read_cpus > 0
            else "each worker reads its cases (no CPU left for read tasks)",
        )

    def _new_actor(self) -> Any:
        return self.worker_class.remote(self.job_ref, int(max(1, round(self.plan.cpus))))

    def _stop_actors(self) -> None:
        for actor in self.actors:
            with contextlib.suppress(Exception):
                self.ray.kill(actor)

    # ---------------------------------------------------------------------------------------------------
    # the stream of cases

    def _tickets(self) -> Iterator[_Ticket]:
        """The cases to segment, in order, each with its read started; done cases are recorded here."""
        processed = 0
        for index, case in enumerate(self.cases):
            known = done_outcome(
                case, self.out_dir, overwrite=self.overwrite, same_case_prompts=self.same_case_prompts
            )
            if known is not None:
                self._record(index, known)
                continue
            if self.max_cases is not None and processed >= self.max_cases:
                return
            processed += 1
            yield _Ticket(index, case, self._read(case))

    def _read(self, case: Case) -> Any:
        """The read of ``case``: a read task's result, or ``None`` when its worker reads it (no spare CPU)."""
        if self.plan.read_cpus <= 0:
            return None
        return self.read_task.remote(self.reader_ref, case)

    def _submit(self, ticket: _Ticket) -> None:
        def call(actor: Any, t: _Ticket) -> Any:
            t.actor = actor
            t.ref = actor.segment.remote(t.index, t.case, t.read, t.attempt, self.overwrite, self.started)
            return t.ref

        self.inflight[ticket.index] = ticket
        self.pool.submit(call, ticket)

    # ---------------------------------------------------------------------------------------------------
    # outcomes and failures

    def _record(self, index: int, outcome: CaseOutcome) -> None:
        self.outcomes[index] = outcome
        self._advance()
        if time.monotonic() - self._written >= self.settings.csv_interval:
            self._write_csv()
        if self.on_outcome is not None:
            self.on_outcome(outcome, self)

    def _write_csv(self) -> None:
        rows = [self.outcomes[i] for i in sorted(self.outcomes)]
        write_summary_csv(self.summary_csv, rows, self.label_names, case_columns=self.case_columns)
        self._written = time.monotonic()

    def _finish(self, answer: dict[str, Any]) -> None:
        ticket = self.inflight.pop(answer["index"], None)
        if ticket is None:  # cannot happen: a case answers once
            return
        outcome = CaseOutcome(
            ticket.case,
            answer["status"],
            answer["error"],
            answer["seconds"],
            answer["labels"],
            answer["info"],
        )
        self._record(ticket.index, outcome)

    def _lost(self, exc: BaseException) -> None:
        """A worker's call failed (the worker died, or its case's read was lost): find the cases whose call
        failed, send them again, and replace a dead worker."""
        ray = self.ray
        # a dead worker (not one that is only unreachable for a moment) is replaced
        if isinstance(exc, getattr(ray.exceptions, "ActorDiedError", ray.exceptions.RayActorError)):
            self._drop_dead_idle()
            self._replace()
        tickets = [t for t in self.inflight.values() if t.ref is not None]
        refs = [t.ref for t in tickets]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0) if refs else ([], [])
        ready_set = set(ready)
        for t in tickets:
            if t.ref not in ready_set:
                continue
            try:
                ray.get(t.ref, timeout=0)
            except Exception as err:
                del self.inflight[t.index]
                self._retry(t, err)

    def _retry(self, ticket: _Ticket, err: BaseException) -> None:
        ray = self.ray
        if isinstance(err, ray.exceptions.RayActorError):
            reason = "its worker died"
        else:
            reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        ticket.deaths.append(reason)
        log.warning("case %s: %s", ticket.case.name, reason)
        if ticket.attempt >= self.settings.retries:
            reasons = "; ".join(dict.fromkeys(ticket.deaths))
            error = f"lost {len(ticket.deaths)} time(s) on Ray ({reasons}); not sent again (--retries)"
            self._record(ticket.index, CaseOutcome(ticket.case, "failed", error))
            return
        ticket.attempt += 1
        self.attempts[ticket.case.name] = ticket.attempt
        ticket.read = self._read(ticket.case)
        ticket.ref = ticket.actor = None
        self.queue.appendleft(ticket)

    def _drop_dead_idle(self) -> None:
        """Take dead workers out of the pool's free ones (Ray versions whose pool keeps them)."""
        ray = self.ray
        idle = []
        while (actor := self.pool.pop_idle()) is not None:
            idle.append(actor)
        pings = [actor.pid.remote() for actor in idle]
        answered, _ = ray.wait(pings, num_returns=len(pings), timeout=10) if pings else ([], [])
        answered_set = set(answered)
        for actor, ping in zip(idle, pings, strict=True):
            if ping in answered_set:
                try:
                    ray.get(ping)
                except ray.exceptions.RayActorError:
                    continue  # dead: left out
            self.pool.push(actor)  # alive, or still starting

    def _replace(self) -> bool:
        """Start a worker in place of a dead one (bounded); ``False`` when no more may be started."""
        if self.replacements >= self.max_replacements:
            return False
        self.replacements += 1
        actor = self._new_actor()
        actor.load.remote()  # loads the model now; an error shows on its first case
        self.actors.append(actor)
        self.pool.push(actor)
        return True

    def _fail_rest(self, tickets: Iterator[_Ticket], reason: str) -> None:
        for ticket in [*self.queue, *tickets]:
            self._record(ticket.index, CaseOutcome(ticket.case, "failed", reason))
        self.queue.clear()

    # ---------------------------------------------------------------------------------------------------
    # the run

    def run(self) -> list[CaseOutcome]:
        """Segment every case not done yet; returns one outcome per case looked at, in order."""
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            disable=not self.show_progress,
        )
        try:
            self._start()
            with progress:
                task = progress.add_task(f"ray, {self.plan.workers} worker(s)", total=len(self.cases))
                self._advance = lambda: progress.advance(task)
                self._loop()
        except KeyboardInterrupt:
            for ticket in self.inflight.values():
                self.outcomes[ticket.index] = CaseOutcome(
                    ticket.case, "interrupted", "interrupted by the user"
                )
            self._write_csv()
            raise
        finally:
            self._stop_actors()
        self._write_csv()
        return [self.outcomes[i] for i in sorted(self.outcomes)]

    def _loop(self) -> None:
        ray = self.ray
        tickets = self._tickets()
        exhausted = False
        while True:
            while not exhausted and len(self.queue) < self.prefetch:
                ticket = next(tickets, None)
                if ticket is None:
                    exhausted = True
                else:
                    self.queue.append(ticket)
            if not self.actors:
                if not self.queue:  # every case was done already: no worker needed
                    return
                self._start_workers()
            while self.queue and self.pool.has_free():
                self._submit(self.queue.popleft())
            if not self.pool.has_next():
                if not self.queue and exhausted:
                    return
                if not self._replace():  # cases wait and no worker is left
                    self._fail_rest(tickets, "no Ray worker left: too many workers died")
                    return
                continue
            try:
                answer = self.pool.get_next_unordered(timeout=1.0)
            except TimeoutError:
                if time.monotonic() - self._written >= self.settings.csv_interval and self.outcomes:
                    self._write_csv()
                continue
            except ray.exceptions.RayError as exc:
                self._lost(exc)
                continue
            self._finish(answer)


def run_cases_ray(
    cases: Sequence[Case],
    job: CaseJob,
    out_dir: str | Path,
    *,
    settings: RaySettings | None = None,
    same_case_prompts: Callable[[dict, Case], bool],
    label_names: Sequence[str],
    overwrite: bool = False,
    max_cases: int | None = None,
    summary_csv: str | Path | None = None,
    case_columns: bool = False,
    show_progress: bool = True,
    shared_folder: bool = False,
    on_outcome: Callable[[CaseOutcome, RayRun], None] | None = None,
) -> list[CaseOutcome]:
    """:func:`medsam3.predict.batch_cases.run_cases` on a Ray cluster (module docstring).

    Takes the same arguments as ``run_cases`` (with ``job`` in place of ``segment_case``) and returns the
    same outcomes, in case order; the summary CSV is the same file.

    Raises:
        OptionError: Ray is not installed, or the workers do not fit the cluster; the model's error when
        it cannot be loaded; ``KeyboardInterrupt`` after writing the CSV.
    """
    settings = settings or RaySettings()
    out_dir = Path(out_dir)
    csv_path = Path(summary_csv) if summary_csv is not None else out_dir / "summary.csv"
    if not cases:  # an empty part: nothing to start a cluster for
        write_summary_csv(csv_path, [], label_names, case_columns=case_columns)
        return []
    with ray_session(settings.address) as ray:
        run = RayRun(
            ray,
            cases,
            job,
            out_dir,
            settings=settings,
            same_case_prompts=same_case_prompts,
            label_names=label_names,
            overwrite=overwrite,
            max_cases=max_cases,
            summary_csv=csv_path,
            case_columns=case_columns,
            show_progress=show_progress,
            shared_folder=shared_folder,
            on_outcome=on_outcome,
        )
        return run.run()
