"""The worker: takes launches from a transport and runs each job through a ServiceHandler.

The worker is transport-agnostic logic; the transport drives it through the
:class:`~brokerexec.transport.WorkerHooks` methods, which run on the transport's thread and
never block. Each job gets its own :class:`~brokerexec.handler.ServiceHandler` and so its own
computation thread, or, with ``runner="process"`` (or a service declaring
``runner = "process"``), a child process of its own; the worker keeps at most
``concurrency`` of them.

Shutdown (SIGTERM, :meth:`Worker.stop`): stop taking launches, let running jobs finish
within the grace period, then abort what remains; every job's final record is stored before
the connection closes, so nothing is lost. No child process outlives the stop.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from .child_runner import Limits, ProcessRunner
from .errors import BrokerExecError, ConfigurationError, JobNotFound
from .handler import HANDLER_SETTABLE, ServiceHandler, check_delta
from .pool import PoolKind, WorkerPool
from .protocol.events import Event
from .protocol.intents import Intent, Signal
from .protocol.messages import Control, JobSummary, Launch, Record
from .registry import ServiceRegistry
from .service import Service
from .transport.base import PreparedJob, WorkerTransport

__all__ = ["RunnerKind", "Worker", "WorkerSettings", "host_info"]

log = logging.getLogger(__name__)

#: Where a worker runs its computations: threads of its own, or a child process each.
RunnerKind = Literal["thread", "process"]


def host_info() -> dict[str, Any]:
    """Who this worker is: host name and process id."""
    return {"hostname": socket.gethostname(), "pid": os.getpid()}


@dataclass(frozen=True)
class WorkerSettings:
    """How a worker runs its jobs.

    ``runner="process"`` runs every computation in a child process of its own (a service
    declaring ``runner = "process"`` gets one on any worker); only those have limits:
    ``job_time_limit`` (seconds of wall time, then aborted and killed ``abort_grace``
    later; the record fails with ``brokerexec.LimitExceeded``) and ``job_memory_limit_mb``
    (address space, ``RLIMIT_AS``; past it allocations raise ``MemoryError``, and the
    record's message names the limit). See ``brokerexec.child_runner.Limits``.
    """

    concurrency: int = 1
    pool_size: int | None = None
    pool_kind: PoolKind = "thread"
    abort_grace: float = 10.0
    shutdown_grace: float = 30.0
    handler_defaults: dict[str, float] = field(default_factory=dict)
    runner: RunnerKind = "thread"
    job_time_limit: float | None = None
    job_memory_limit_mb: float | None = None

    def __post_init__(self) -> None:
        if self.runner not in ("thread", "process"):
            raise ConfigurationError(f"runner must be 'thread' or 'process', not {self.runner!r}")
        self.limits()  # checked now, not at the first job

    def limits(self) -> Limits:
        """The limits of each computation run in a child process."""
        memory = self.job_memory_limit_mb
        return Limits(self.job_time_limit, None if memory is None else int(memory * 2**20))


@dataclass
class _Prepared(PreparedJob):
    """A launch this worker accepted: the service to make and the checked request."""

    service_cls: type[Service] = Service
    request: dict[str, Any] = field(default_factory=dict)
    intervals: dict[str, float] = field(default_factory=dict)


class _RunningJob:
    """One job on this worker: its handler, and when it started."""

    def __init__(self, job: _Prepared, handler: ServiceHandler) -> None:
        self.job_id = job.job_id
        self.service = job.service
        self.handler = handler
        self.started = time.time()


class Worker:
    """Runs the jobs a transport hands it; see the module docstring."""

    def __init__(self, transport: WorkerTransport, registry: ServiceRegistry,
                 settings: WorkerSettings | None = None) -> None:
        self.transport = transport
        self.registry = registry
        self.settings = settings or WorkerSettings()
        self.host = host_info()
        self._lock = threading.Lock()
        self._reserved = 0
        self._jobs: dict[str, _RunningJob] = {}
        self._pool = WorkerPool(self.settings.pool_size, self.settings.pool_kind)
        self._idle = threading.Condition(self._lock)
        self._stopping = False
        self._children: ProcessRunner | None = None

    # ---- life cycle ----------------------------------------------------------------------

    def start(self) -> Worker:
        """Start consuming launches; return once the transport consumes."""
        self.transport.serve(self, self.settings.concurrency)
        log.info("worker %s ready: services %s, concurrency %d", self.host["hostname"],
                 ", ".join(self.registry.names()) or "none", self.settings.concurrency)
        return self

    def stop(self, grace: float | None = None) -> None:
        """Stop gracefully: no new launches, running jobs finish or are aborted after ``grace``."""
        grace = self.settings.shutdown_grace if grace is None else grace
        with self._lock:
            self._stopping = True
        self.transport.stop_taking_work()
        if not self.wait_idle(grace):
            with self._lock:
                running = list(self._jobs.values())
            log.warning("shutdown grace of %.1f s over: aborting %d job(s)", grace, len(running))
            for job in running:
                job.handler.put(Signal.of(Intent.ABORT, message="worker shutting down"))
            self.wait_idle(self.settings.abort_grace + 5)
        if self._children is not None:
            self._children.close()  # no child process outlives its worker
            self.wait_idle(5)  # the records of the jobs it killed
        self.transport.close()
        self._pool.shutdown()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no job runs and every final record is stored."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._reserved:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._idle.wait(remaining)
        return True

    @property
    def running(self) -> int:
        """Number of jobs holding a slot."""
        return self._reserved

    # ---- hooks (transport thread, must not block) ----------------------------------------

    def prepare(self, launch: Launch) -> PreparedJob | None:
        """Check a launch and reserve a slot; record refusals as failed jobs."""
        try:
            service_cls = self.registry.get(launch.service)
            request = service_cls.validate(launch.request)
            intervals = {key: check_delta(key, value) for key, value in launch.settings.items()
                         if key in HANDLER_SETTABLE}
        except BrokerExecError as exc:
            log.warning("launch %s of %r refused: %s", launch.job_id, launch.service, exc)
            self._record_refusal(launch, exc)
            return None
        with self._lock:
            self._reserved += 1
            free = self.settings.concurrency - self._reserved
        self.transport.set_free_capacity(max(free, 0))
        return _Prepared(launch.job_id, launch.service, launch, service_cls, request, intervals)

    def begin(self, job: PreparedJob) -> None:
        """The claim succeeded: start the computation."""
        assert isinstance(job, _Prepared)
        seq = itertools.count()

        def emit(kind: str, data: dict[str, Any]) -> None:
            self.transport.publish_event(Event(kind, job.job_id, job.service, next(seq), time.time(), data))

        intervals = {**self.settings.handler_defaults, **job.intervals}
        handler = ServiceHandler(emit, workers=self._pool, abort_grace=self.settings.abort_grace,
                                 name=job.job_id, progress_delta=intervals.get("progress_delta"),
                                 checkpoint_delta=intervals.get("checkpoint_delta"),
                                 improved_delta=intervals.get("improved_delta"),
                                 runner=self._runner_for(job.service_cls))
        running = _RunningJob(job, handler)
        with self._lock:
            self._jobs[job.job_id] = running
        handler.outcome.add_done_callback(lambda outcome: self._on_outcome(running, outcome))
        # The service is made where it runs: a failing __init__ fails the job, not the worker.
        handler.start(job.service_cls, job.request)

    def _runner_for(self, service_cls: type[Service]) -> ProcessRunner | None:
        """The child-process runner if ``service_cls`` runs in one here; None: threads."""
        if self.settings.runner != "process" and service_cls.runner != "process":
            return None
        with self._lock:
            if self._children is None:
                self._children = ProcessRunner(self.settings.limits())
            return self._children

    def cancel(self, job: PreparedJob, reason: str) -> None:
        """The claim failed: give the slot back."""
        log.warning("job %s not run here: %s", job.job_id, reason)
        self._release_slot()

    def on_rpc(self, job_id: str, signal: Signal) -> Any:
        """An RPC for one job goes to its handler."""
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise JobNotFound(f"job {job_id} is not running on this worker")
        return job.handler.put(signal)

    def on_control(self, control: Control) -> None:
        """Apply pause/resume/abort to every job here (of one service, if named)."""
        with self._lock:
            jobs = [job for job in self._jobs.values() if control.applies_to(job.service, job.started)]
        signal = Signal.of(control.intent)
        for job in jobs:
            job.handler.put(signal)
        log.info("control %s (service %s) applied to %d job(s)", control.intent.value,
                 control.service or "any", len(jobs))

    def describe_jobs(self) -> list[JobSummary]:
        """A summary of every job on this worker."""
        with self._lock:
            jobs = list(self._jobs.values())
        summaries = []
        for job in jobs:
            status = job.handler.status()
            summaries.append(JobSummary(job.job_id, job.service, status["state"], job.started,
                                        self.host, status.get("progress") or {}))
        return summaries

    # ---- job ends ------------------------------------------------------------------------

    def _on_outcome(self, job: _RunningJob, outcome: cf.Future[dict[str, Any]]) -> None:
        stored = self.transport.finish(Record.of_outcome(job.job_id, job.service, self.host,
                                                         outcome.result()))

        def done(_: cf.Future[None]) -> None:
            with self._lock:
                self._jobs.pop(job.job_id, None)
            self._release_slot()

        stored.add_done_callback(done)

    def _record_refusal(self, launch: Launch, exc: BaseException) -> None:
        record = Record.refusal(launch.job_id, launch.service, self.host, exc)
        self.transport.publish_event(Event("state", launch.job_id, launch.service, 0, record.end, {
            "from": "created", "to": "failed", "start": record.start, "end": record.end}))
        self.transport.finish(record)

    def _release_slot(self) -> None:
        with self._lock:
            self._reserved -= 1
            free = self.settings.concurrency - self._reserved
            stopping = self._stopping
            self._idle.notify_all()
        if not stopping:
            self.transport.set_free_capacity(free)
