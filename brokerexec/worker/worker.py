"""The worker: takes launches from a transport and runs each job through a ServiceHandler.

The worker is transport-agnostic logic; the transport drives it through the
:class:`~brokerexec.transport.WorkerHooks` methods, which run on the transport's thread and
never block. Each job gets its own :class:`~brokerexec.core.service_handler.ServiceHandler` and so its own
computation thread, or, with ``runner="process"`` (or a service declaring
``runner = "process"``), a child process of its own; the worker keeps at most
``concurrency`` of them.

A job resumed after its worker was lost (``PreparedJob.resumed``) continues from its
newest stored checkpoint through ``service.restore(state)``; a service that cannot, or a
job that never stored one, restarts from the beginning or fails, as the service's
``on_lost`` says.

Shutdown (SIGTERM, :meth:`Worker.stop`): stop taking launches; jobs whose service can resume
are *handed over* at their next ``ready()`` (checkpoint, then back to the launch queue for
another worker); the others finish within the grace period or are aborted after it. Every
record and handover is stored before the connection closes, so nothing is lost. No child
process outlives the stop.

Control messages are remembered for the launches still queued (:mod:`.controls`): a launch
older than an abort that applies to it is never started, and one older than a pause starts
paused.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..child.processes import Limits
from ..child.runner import ProcessRunner
from ..core.intervals import HANDLER_SETTABLE, check_delta
from ..core.map_pool import WorkerPool
from ..core.registry import ServiceRegistry
from ..core.service import Service
from ..core.service_handler import ServiceHandler
from ..errors import BrokerExecError, JobNotFound, WorkerLost
from ..protocol.changes import invokes_of, sets_of
from ..protocol.events import Event
from ..protocol.intents import Intent, Signal
from ..protocol.messages import Control, JobSummary, Launch, Record
from ..protocol.names import CLOCK_SKEW_MARGIN
from ..protocol.states import JobState, Transition
from ..settings import WorkerSettings
from ..transport.base import PreparedJob, WorkerTransport
from .controls import CONTROLS_KEPT, RememberedControls

__all__ = ["Worker", "host_info"]

log = logging.getLogger(__name__)

def host_info() -> dict[str, Any]:
    """Who this worker is: host name, process id and a random id of this worker process."""
    return {"hostname": socket.gethostname(), "pid": os.getpid(), "id": os.urandom(6).hex()}


@dataclass
class _Prepared(PreparedJob):
    """A launch this worker accepted: the service to make and the checked request."""

    service_cls: type[Service] = Service
    request: dict[str, Any] = field(default_factory=dict)
    intervals: dict[str, float] = field(default_factory=dict)


class _RunningJob:
    """One job on this worker: its handler, and when it started."""

    def __init__(self, job: _Prepared, handler: ServiceHandler,
                 emit: Callable[[str, dict[str, Any]], None]) -> None:
        self.job_id = job.job_id
        self.emit = emit
        self.service = job.service
        self.attempt = job.attempt
        self.handler = handler
        self.started = time.time()
        self.launched = job.launch.sent or self.started
        self.operation = job.launch.operation
        #: What it resumed from, for its status (None: its first execution).
        self.resumed: dict[str, Any] | None = None


def _extra(job: _RunningJob) -> dict[str, Any]:
    """The fields a log formatter may show with a job's lines."""
    return {"job_id": job.job_id, "service": job.service}


def _log_end(job: _RunningJob, ended: dict[str, Any]) -> None:
    """One line per job end: INFO, or WARNING with the error's first line if it failed."""
    state, took = ended["state"], max(0.0, ended.get("end", time.time()) - job.started)
    if state != "failed":
        log.info("job %s of %s %s after %.1f s", job.job_id, job.service, state, took,
                 extra=_extra(job))
        return
    error = ended.get("error") or {}
    first = (str(error.get("message", "")).strip().splitlines() or [""])[0]
    log.warning("job %s of %s failed after %.1f s: %s: %s", job.job_id, job.service, took,
                error.get("type", "Exception"), first, extra=_extra(job))


class Worker:
    """Runs the jobs a transport hands it; see the module docstring."""

    def __init__(self, transport: WorkerTransport, registry: ServiceRegistry,
                 settings: WorkerSettings | None = None) -> None:
        self.transport = transport
        self.registry = registry
        self._descriptions: dict[str, dict[str, Any]] | None = None
        self.settings = settings or WorkerSettings()
        # The transport's identity if it has one: its leases and journal entries name it.
        self.host = dict(getattr(transport, "host_info", None) or host_info())
        self._lock = threading.Lock()
        self._reserved = 0
        self._jobs: dict[str, _RunningJob] = {}
        self._pool = WorkerPool(self.settings.pool_size, self.settings.pool_kind)
        self._idle = threading.Condition(self._lock)
        self._stopping = False
        self._controls = RememberedControls()
        self._children: ProcessRunner | None = None

    # ---- life cycle ----------------------------------------------------------------------

    def start(self) -> Worker:
        """Start consuming launches; return once the transport consumes."""
        self.transport.serve(self, self.settings.concurrency, self.registry.names())
        log.info("worker %s ready: services %s, concurrency %d", self.host["hostname"],
                 ", ".join(self.registry.names()) or "none", self.settings.concurrency)
        return self

    def stop(self, grace: float | None = None) -> None:
        """Stop gracefully: no new launches, running jobs finish or are aborted after ``grace``."""
        grace = self.settings.shutdown_grace if grace is None else grace
        with self._lock:
            self._stopping = True
            running = list(self._jobs.values())
        self.transport.stop_taking_work()
        handed = sum(job.handler.hand_over() for job in running) if grace > 0 else 0
        if handed:
            log.info("stopping: %d job(s) to hand over at their next ready()", handed)
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
        """Check a launch and reserve a slot; record refusals as failed jobs, and launches
        aborted while they were queued as aborted ones."""
        cancelled = self._controls.aborted_while_queued(launch)
        if cancelled is not None:
            log.info("job %s of %s not started: aborted while queued", launch.job_id, launch.service)
            if cancelled.job_id is None:  # an abort of many: this worker writes the record
                record = Record.cancelled(launch.job_id, launch.service, self.host)
                self.transport.finish(record)
                # ... and says so, as a job that ran would: an operation waits for its items.
                ended = Transition(JobState.CREATED, JobState.ABORTED, launch.sent or record.end, record.end)
                self.transport.publish_event(Event("state", launch.job_id, launch.service, 0, record.end,
                                                   ended.to_wire(), 1))
            return None  # one aborted by id has its record from the client that aborted it
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
        # Queued longer than the controls are kept (less the clocks' margin: the launch's
        # time is its client's clock): a cancel may be forgotten, the journal keeps it.
        old = 0 < launch.sent < time.time() - CONTROLS_KEPT + CLOCK_SKEW_MARGIN
        return _Prepared(launch.job_id, launch.service, launch, service_cls=service_cls,
                         request=request, intervals=intervals, check_journal=old)

    def begin(self, job: PreparedJob) -> None:
        """The claim succeeded: start the computation (from its checkpoint, if resumed)."""
        assert isinstance(job, _Prepared)
        seq = itertools.count()
        attempt = job.attempt

        def emit(kind: str, data: dict[str, Any]) -> None:
            self.transport.publish_event(Event(kind, job.job_id, job.service, next(seq), time.time(),
                                               data, attempt))

        def store(state: Any, settable: dict[str, Any], covers: int) -> cf.Future[None]:
            return self.transport.store_checkpoint(job.job_id, state, settable, covers)

        def note(changes: list[dict[str, Any]]) -> cf.Future[None]:
            return self.transport.note_changes(job.job_id, changes)

        resumed = job.resumed
        carried = resumed.changes if resumed is not None else []
        carried_after = resumed.covers if resumed is not None else 0

        defaults = self.settings
        intervals = {"progress_delta": defaults.progress_delta,
                     "checkpoint_delta": defaults.checkpoint_delta,
                     "improved_delta": defaults.improved_delta, **job.intervals}
        handler = ServiceHandler(emit, workers=self._pool, abort_grace=self.settings.abort_grace,
                                 name=job.job_id, progress_delta=intervals.get("progress_delta"),
                                 checkpoint_delta=intervals.get("checkpoint_delta"),
                                 improved_delta=intervals.get("improved_delta"), store=store,
                                 note=note, carried=carried, carried_after=carried_after,
                                 max_result_bytes=self.settings.max_result_bytes,
                                 runner=self._runner_for(job.service_cls))
        running = _RunningJob(job, handler, emit)
        with self._lock:
            self._jobs[job.job_id] = running
        handler.outcome.add_done_callback(lambda outcome: self._on_outcome(running, outcome))
        resume, state, reapply = False, None, None
        if resumed is not None:
            resume = resumed.has_checkpoint and job.service_cls.can_resume()
            state = resumed.state if resume else None
            if not resume and job.service_cls.on_lost == "fail":
                lost = resumed.previous_worker or {}
                handler.fail_to_start(WorkerLost(
                    f"the worker running job {job.job_id} ({lost.get('hostname', '?')}, pid "
                    f"{lost.get('pid', '?')}) was lost, and service {job.service} does not restart "
                    "(on_lost = 'fail')"))
                return
            reapply = {**(resumed.settable if resume else {}), **sets_of(resumed.changes)}
            running.resumed = {
                "from_checkpoint": resume, "checkpoint_time": resumed.checkpoint_time if resume else None,
                "previous_worker": resumed.previous_worker, "handed_over": resumed.handed_over,
                "set_again": reapply, "invokes_not_replayed": invokes_of(resumed.changes)}
            emit("resumed", running.resumed)
        if self._controls.paused_while_queued(job.launch):
            handler.put(Signal.of(Intent.PAUSE))
        log.info("job %s of %s started (attempt %d%s)", job.job_id, job.service, attempt,
                 ", from its checkpoint" if resume else "", extra=_extra(running))
        # The service is made where it runs: a failing __init__ fails the job, not the worker.
        handler.start(job.service_cls, job.request, resume, state=state, reapply=reapply)
        for attrs in self._controls.set_while_queued(job.launch):  # its operation's, meanwhile
            self._put_control(running, Signal.of(Intent.SET, attrs=attrs))

    def _runner_for(self, service_cls: type[Service]) -> ProcessRunner | None:
        """The child-process runner if ``service_cls`` runs in one here; None: threads."""
        settings = self.settings
        if settings.runner != "process" and settings.child_python is None and not service_cls.runs_in_child():
            return None
        with self._lock:
            if self._children is None:
                memory = settings.job_memory_limit_mb
                self._children = ProcessRunner(
                    Limits(settings.job_time_limit, None if memory is None else int(memory * 2**20)),
                    python=settings.child_python or sys.executable)
            return self._children

    def cancel(self, job: PreparedJob, reason: str) -> None:
        """The claim failed: give the slot back."""
        log.warning("job %s not run here: %s", job.job_id, reason)
        self._release_slot()

    def on_rpc(self, job_id: str, signal: Signal) -> Any:
        """An RPC for one job goes to its handler; a status says which execution answers."""
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise JobNotFound(f"job {job_id} is not running on this worker")
        answer = job.handler.put(signal)
        if signal.intent is Intent.STATUS and isinstance(answer, dict):
            answer = {**answer, "attempt": job.attempt, "worker": self.host}
            if job.resumed is not None:
                answer["resumed"] = job.resumed
        return answer

    def superseded(self, job_id: str, reason: str) -> None:
        """Another execution owns the job: abort this copy (the transport mutes it)."""
        with self._lock:
            job = self._jobs.get(job_id)
        if job is not None:
            job.handler.put(Signal.of(Intent.ABORT, message=reason))

    def on_control(self, control: Control) -> None:
        """Apply pause/resume/abort (or an operation's set) to every job here it is for (of
        one service, or one operation, if named); remember it for the launches still queued."""
        self._controls.remember(control)
        with self._lock:
            jobs = [job for job in self._jobs.values()
                    if control.applies_to(job.job_id, job.service, job.started, operation=job.operation,
                                          launched=job.launched)]
        signal = Signal.of(control.intent, attrs=control.attrs) if control.intent is Intent.SET \
            else Signal.of(control.intent)
        for job in jobs:
            self._put_control(job, signal)
        reach = (f"job {control.job_id}" if control.job_id else f"operation {control.operation}"
                 if control.operation else f"service {control.service or 'any'}")
        log.info("control %s (%s) applied to %d job(s)", control.intent.value, reach, len(jobs))

    def _put_control(self, job: _RunningJob, signal: Signal) -> None:
        """A control message's signal to one job: one it refuses (an operation's set of a
        value its service does not take, a job that just ended) is logged, not raised."""
        try:
            job.handler.put(signal)
        except BrokerExecError as exc:
            log.warning("control %s not applied to job %s: %s", signal.intent.value, job.job_id, exc,
                        extra=_extra(job))

    def describe_services(self) -> dict[str, dict[str, Any]]:
        """What each service it offers declares, for the ``jobs`` query (the web view's
        forms for settable attributes and invokable methods)."""
        if self._descriptions is None:
            self._descriptions = {name: self.registry.get(name).describe() for name in self.registry.names()}
        return self._descriptions

    def describe_jobs(self) -> list[JobSummary]:
        """A summary of every job on this worker."""
        with self._lock:
            jobs = list(self._jobs.values())
        summaries = []
        for job in jobs:
            status = job.handler.status()
            summaries.append(JobSummary(job.job_id, job.service, status["state"], job.started,
                                        self.host, status.get("progress") or {}, job.attempt))
        return summaries

    # ---- job ends ------------------------------------------------------------------------

    def _on_outcome(self, job: _RunningJob, outcome: cf.Future[dict[str, Any]]) -> None:
        ended = outcome.result()
        _log_end(job, ended)
        if ended["state"] == "handed_over":
            # Not a final state: its watchers see the job go on, as another attempt.
            job.emit("state", {"from": job.handler.states.state.value, "to": "resuming",
                               "start": job.handler.states.entered, "end": ended["end"]})
            stored = self.transport.hand_over(job.job_id)
        else:
            stored = self.transport.finish(Record.of_outcome(job.job_id, job.service, self.host,
                                                             ended, job.attempt))

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
