"""The computation thread's side of a job: the service runs here, and so does ``ready()``.

:class:`Computation` runs ``service.run(handler, request)`` in a thread of the default runner
and does everything that happens at ``ready()`` (park's ``ready`` and ``onReady*``):

* apply the signals posted across the :class:`~brokerexec.core.crossing.Crossing`, in arrival
  order (a ``set`` assigns, an ``invoke`` calls, a ``checkpoint`` takes one);
* hold while paused (still applying what is posted), raise :class:`~brokerexec.Aborted` on
  abort (resuming first if paused, as park does);
* emit progress every ``progress_delta``, a checkpoint every ``checkpoint_delta`` (and on
  pause), and improved values at most once per ``improved_delta``;
* hand the job over when the worker stops gracefully: checkpoint, then end without a final
  state, to be resumed elsewhere.

A checkpoint goes to the handler's ``store`` when it has one (a worker's: durably, in the
broker), with the values of the service's declared settable attributes, and its event is
published once it is stored; without one it is only published. With a store, each ``set``
and ``invoke`` applied at ``ready()`` is made durable (the handler's ``note``) before its
sender is told it was applied (:mod:`.change_log`). A result larger than ``max_result_bytes``
(as JSON) fails the job with :class:`~brokerexec.ResultTooLarge`.

A computation that never calls ``ready()`` cannot be stopped from outside in thread mode.
On abort the handler waits ``abort_grace`` seconds; if the computation has not ended by
then it is *abandoned*: the job is reported ``aborted``, its queued signals fail, and the
thread runs on unobserved, its later messages and result dropped.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import math
import threading
import traceback
from collections.abc import Callable
from typing import Any, ClassVar

from .. import codec
from ..errors import Aborted, CheckpointFailed, InvalidState, NotDurable, ResultTooLarge, error_to_wire
from ..logs import current_job
from ..protocol.intents import Intent
from ..protocol.states import JobState
from .change_log import ChangeLog
from .crossing import Posted, fail_unapplied
from .runner import JobSetup, Outcome, Running, last_reports
from .service import Handler, Service, check_present

__all__ = ["Computation", "HandedOver"]

log = logging.getLogger(__name__)

#: Set by brokerexec.worker.metrics when a worker serves metrics: given the seconds between two
#: consecutive ready() calls of a job, sampled at most every READY_SAMPLE_PERIOD seconds.
ready_interval_observer: Callable[[float], None] | None = None
READY_SAMPLE_PERIOD = 1.0

#: How long a checkpoint that must be stored before going on may take (seconds).
STORE_TIMEOUT = 60.0


class HandedOver(BaseException):
    """Raised by ``ready()`` when the job is handed over (like ``Aborted``, outside the tree:
    user code cannot swallow it)."""


class Computation:
    """See the module docstring. Made by :class:`~brokerexec.core.thread_runner.ThreadRunner`."""

    def __init__(self, setup: JobSetup,
                 start_thread: Callable[[Callable[[], None], str], Running]) -> None:
        self.job = setup.job
        self.outcome: cf.Future[Outcome] = cf.Future()
        self.service: Service | None = None
        self._crossing = setup.crossing
        self._states = setup.states
        self._intervals = setup.intervals
        self._send = setup.send
        self._clock = setup.clock
        self._wallclock = setup.wallclock
        self._start_thread = start_thread
        self._store = setup.store
        self._note = setup.note
        self._changes = ChangeLog(setup.carried, setup.carried_after)
        self._max_result_bytes = setup.max_result_bytes
        self._running: Running | None = None
        self._end_lock = threading.Lock()
        self._sampled_at: float | None = None
        self._next_sample = 0.0
        self._ended = self._abandoned = False
        self._progress_due = self._checkpoint_due = self._improved_due = math.inf
        self._improved_pending: dict[str, Any] | None = None
        self._improved_latest: dict[str, Any] | None = None  # for the outcome, sent or not
        self._last_improved = -math.inf

    @property
    def started(self) -> bool:
        return self._running is not None

    def start(self, service: Service | type[Service], request: dict[str, Any], resume: bool,
              state: dict[str, Any] | None, handler: Handler,
              reapply: dict[str, Any] | None = None) -> None:
        """Run ``service.run(handler, request)`` in a thread, after ``service.restore(state)``
        if ``resume``. ``service`` may be a class: it is made here, and a failing
        ``__init__`` fails the job, not the worker. ``reapply`` is set at the first
        ``ready()``, like a set (the attributes may be made by ``run()``).

        Raises:
            InvalidState: started already.
        """
        if self._running is not None:
            raise InvalidState(f"handler {self.job} is busy: one computation per handler")
        if isinstance(service, type):
            try:
                service = service()
            except Exception as exc:  # a failed job, not a dead worker
                log.error("job %s could not start: %r", self.job, exc)
                self.fail_to_start(exc)
                return
        made = service
        self.service = made
        if reapply:
            self._reapply(reapply)
        self._running = self._start_thread(
            lambda: self._logged(made, lambda: made.run(handler, request), resume, state), self.job)

    def _reapply(self, values: dict[str, Any]) -> None:
        # Durable already (in the checkpoint, or in the log carried here): not noted again.
        posted = Posted(Intent.SET, {"attrs": dict(values), "replayed": True})

        def done(future: cf.Future[Any]) -> None:
            if future.exception() is not None:
                log.warning("job %s: the values set before it resumed could not be set again: %s",
                            self.job, future.exception())

        self._crossing.post(posted, self.job).add_done_callback(done)

    def _logged(self, service: Service, run: Callable[[], Any], resume: bool,
                state: dict[str, Any] | None) -> None:
        # The job id on every line logged while it runs, the service's own lines included;
        # reset after, because the runner reuses the thread for other jobs.
        token = current_job.set(self.job)
        try:
            self._run(service, run, resume, state)
        finally:
            current_job.reset(token)

    # ---- the life of the computation (computation thread) ----------------------------------

    def _run(self, service: Service, run: Callable[[], Any], resume: bool,
             state: dict[str, Any] | None) -> None:
        start = self._wallclock()
        self._states.transition(JobState.RUNNING)
        self._schedule(self._clock())
        result: Any = None
        error: dict[str, str] | None = None
        final = JobState.FINISHED
        try:
            if resume:
                service.restore(state or {})
            result = run()
        except Aborted:
            final = JobState.ABORTED
        except HandedOver:
            self._end_handed_over(start)
            return
        except BaseException as exc:  # the handler never dies with the computation
            final, error = JobState.FAILED, error_to_wire(exc, traceback.format_exc())
            # The worker logs the failure (WARNING, one line); its traceback is for debugging.
            log.debug("job %s failed:\n%s", self.job, error["traceback"])
        reports, reported = self._reports()
        if final is JobState.FINISHED:
            final, result, error = self._sendable(result, reported)
        self._end(final, result, error, start, reports)

    def _sendable(self, result: Any, reported: int) -> tuple[JobState, Any, dict[str, str] | None]:
        """The end of a job whose ``run()`` returned ``result``: finished, or failed if the
        result cannot be sent, or if with the ``reported`` bytes of its last progress and
        improved value it is over the limit (the record carries them all)."""
        try:  # a result that cannot be sent is the service's failure, reported as such
            size = len(codec.encode(result))
        except (TypeError, ValueError) as exc:
            error = error_to_wire(exc, "")
            error["message"] = f"result is not JSON-able: {exc}"
            return JobState.FAILED, None, error
        limit = self._max_result_bytes
        if limit is None or size + reported <= limit:
            return JobState.FINISHED, result, None
        more = f", and its last progress and improved value {reported:,}" if reported else ""
        return JobState.FAILED, None, error_to_wire(ResultTooLarge(
            f"the result of job {self.job} is {size:,} bytes as JSON{more}, over the limit of "
            f"{limit:,} (--max-result-bytes): not sent"), "")

    def _reports(self) -> tuple[dict[str, Any], int]:
        """The outcome's last progress and improved value, and their size as JSON (see
        :func:`~brokerexec.core.runner.last_reports`). The last improved state counts whether
        or not ``improved_delta`` let it be sent: that throttles the events, not what the job
        found."""
        return last_reports(self.job, self._crossing.last_progress, self._improved_latest,
                            self._max_result_bytes)

    def _end(self, final: JobState, result: Any, error: dict[str, str] | None, start: float,
             reports: dict[str, Any]) -> None:
        with self._end_lock:
            if self._abandoned:
                return
            self._ended = True
        pending = self._crossing.close(final.value)
        if final is not JobState.ABORTED and self._improved_pending is not None:
            self._send_improved(self._clock())  # the last improvement is never lost
        fail_unapplied(pending, self.job, final)
        self._states.try_transition(final)
        self.outcome.set_result({"state": final.value, "result": result, "error": error,
                                 "start": start, "end": self._wallclock(), **reports})

    def _end_handed_over(self, start: float) -> None:
        with self._end_lock:
            if self._abandoned:
                return
            self._ended = True
        fail_unapplied(self._crossing.close("handed over"), self.job, None)
        self.outcome.set_result({"state": "handed_over", "result": None, "error": None,
                                 "start": start, "end": self._wallclock()})

    def fail_to_start(self, exc: BaseException) -> None:
        """The service could not even be made (its ``__init__`` raised): a failed job."""
        now = self._wallclock()
        with self._end_lock:
            self._ended = True
        self._crossing.close(JobState.FAILED.value)
        self._states.try_transition(JobState.FAILED)
        self.outcome.set_result({"state": "failed", "result": None, "start": now, "end": now,
                                 "error": error_to_wire(exc, traceback.format_exc())})

    def abandon_if_stuck(self, grace: float) -> None:
        """The abort grace is over: if the computation still runs, report it aborted and let
        its thread run on unobserved (called from a timer thread)."""
        with self._end_lock:
            running = self._running
            if self._ended or running is None or not running.is_alive():
                return
            self._abandoned = True
        pending = self._crossing.close(JobState.ABORTED.value)
        log.warning("job %s did not reach ready() within %.1f s of abort: abandoned", self.job, grace)
        fail_unapplied(pending, self.job, JobState.ABORTED)  # no ready() will apply them now
        if self._states.state is JobState.PAUSED:
            self._states.try_transition(JobState.RUNNING)
        if self._states.try_transition(JobState.ABORTED) is not None:
            history = self._states.history
            start = history[0].end if history else self._wallclock()
            # What it reported until now: it runs on, but nothing of it is heard any more.
            self.outcome.set_result({"state": "aborted", "result": None, "start": start,
                                     "error": None, "end": self._wallclock(), "abandoned": True,
                                     **self._reports()[0]})

    # ---- ready() (computation thread) ------------------------------------------------------

    def at_ready(self) -> None:
        """What ``ready()`` does when its one test says there is something to do."""
        crossing = self._crossing
        self._apply_posted()
        if crossing.abort_requested:
            raise Aborted(f"job {self.job} aborted")
        if crossing.handover_requested:
            self._hand_over()
        if crossing.pause_requested:
            self._hold()
            self._sampled_at = None  # the time held paused is no interval between ready()s
        now = self._clock()
        if crossing.reschedule:
            crossing.reschedule = False
            self._schedule(now)
        if now >= crossing.next_due:
            self._emit_due(now)
        self._update_next_due()
        observe = ready_interval_observer
        if observe is not None:
            self._sample_ready(observe, now)

    def _sample_ready(self, observe: Callable[[float], None], now: float) -> None:
        # ready() stays one test, with no clock of its own: to sample the interval between
        # two calls, this one makes the next call come here at once, and that one measures.
        if self._sampled_at is not None:
            observe(now - self._sampled_at)
            self._sampled_at, self._next_sample = None, now + READY_SAMPLE_PERIOD
        elif now >= self._next_sample:
            self._sampled_at = self._clock()
            self._crossing.next_due = -math.inf

    def _apply_posted(self) -> None:
        for posted in self._crossing.collect():  # arrival order
            posted.settle(self.apply)

    def apply(self, posted: Posted) -> Any:
        """Carry out one posted signal, checked already (computation thread); its value, once
        a set or invoke is made durable (when the job's checkpoints are stored)."""
        value = self.APPLY[posted.intent](self, posted.payload)
        if (posted.intent in (Intent.SET, Intent.INVOKE) and self.stores_changes
                and not posted.payload.get("replayed")):
            self._make_durable(posted)
        return value

    @property
    def stores_changes(self) -> bool:
        """True if applied sets and invokes are made durable: the worker stores this job's
        checkpoints (whether or not the service takes any: one that restarts from scratch
        gets its sets again too)."""
        return self._store is not None and self._note is not None

    def _make_durable(self, posted: Posted) -> None:
        now = self._wallclock()
        if posted.intent is Intent.SET:
            entries = self._changes.applied_set(posted.payload["attrs"], now)
            what = f"set of {', '.join(posted.payload['attrs'])}"
        else:
            entries = self._changes.applied_invoke(posted.payload["method"], now)
            what = f"invoke of {posted.payload['method']}"
        assert self._note is not None
        try:
            self._note(entries).result(STORE_TIMEOUT)
        except Exception as exc:
            raise NotDurable(f"job {self.job}: the {what} was applied, but could not be made "
                             f"durable ({exc}): a crash before the next checkpoint would undo it") from exc

    def _assign(self, payload: dict[str, Any]) -> dict[str, Any]:
        assert self.service is not None
        # The service's state, so checked here, at ready(), before any is set: it may make a
        # declared attribute in run(), after a set of it was taken (names and types were
        # checked on the handler thread).
        check_present(self.service, payload["attrs"])
        for attr, value in payload["attrs"].items():
            setattr(self.service, attr, value)
        return {**payload["attrs"], **payload.get("handler_attrs", {})}

    def _invoke(self, payload: dict[str, Any]) -> Any:
        assert self.service is not None
        return getattr(self.service, payload["method"])(*payload["args"], **payload["kwargs"])

    def _checkpoint(self, payload: dict[str, Any]) -> dict[str, Any]:
        return self.checkpoint_now(wait=True)  # its sender learns it is stored

    #: What ``ready()`` does with each intent that waits for it (``INTENTS``' ``AT_READY`` rows).
    APPLY: ClassVar[dict[Intent, Callable[[Computation, dict[str, Any]], Any]]] = {
        Intent.SET: _assign, Intent.INVOKE: _invoke, Intent.CHECKPOINT: _checkpoint,
    }

    def _hold(self) -> None:
        """Paused: stay here, still applying what is posted, until resume or abort."""
        if self._states.try_transition(JobState.PAUSED) is None:
            return
        if self.stores_checkpoints:
            self.checkpoint_now()  # a paused job may well be resumed elsewhere
        self._apply_posted()
        while self._crossing.wait_while_paused():
            self._apply_posted()
        self._states.try_transition(JobState.RUNNING)  # abort resumes first, as park does
        if self._crossing.abort_requested:
            raise Aborted(f"job {self.job} aborted")
        if self._crossing.handover_requested:
            self._hand_over()

    def _hand_over(self) -> None:
        """The worker stops: store a checkpoint, then end (``HandedOver``) to be resumed by
        another worker. If the checkpoint cannot be stored, the job runs on here."""
        self._crossing.handover_requested = False
        try:
            self.checkpoint_now(wait=True)
        except CheckpointFailed as exc:
            log.warning("job %s not handed over: %s", self.job, exc)
            return
        raise HandedOver(self.job)

    # ---- periodic messages -------------------------------------------------------------------

    def _schedule(self, now: float) -> None:
        self._progress_due = now + self._intervals.progress_delta
        self._checkpoint_due = now + self._intervals.checkpoint_delta
        self._update_next_due()

    def _update_next_due(self) -> None:
        self._crossing.next_due = min(self._progress_due, self._checkpoint_due, self._improved_due)

    def _emit_due(self, now: float) -> None:
        if now >= self._progress_due:
            self._progress_due = now + self._intervals.progress_delta
            self._send_progress()
        if now >= self._checkpoint_due:
            self._checkpoint_due = now + self._intervals.checkpoint_delta
            self.checkpoint_now()
        if now >= self._improved_due:
            self._send_improved(now)

    def _send_progress(self) -> None:
        assert self.service is not None
        data = dict(self.service.progress())
        data.setdefault("elapsed", self._wallclock() - self._states.history[0].end)
        self._crossing.last_progress = data
        self._emit("progress", data)

    @property
    def stores_checkpoints(self) -> bool:
        """True if checkpoints are stored: the handler has a store, the service a state."""
        return (self._store is not None and self.service is not None
                and type(self.service).checkpoint is not Service.checkpoint)

    def checkpoint_now(self, *, wait: bool = False) -> dict[str, Any]:
        """Take the service's checkpoint, store it (waiting for that with ``wait``) and
        publish it; return when it was taken.

        Raises:
            CheckpointFailed: with ``wait``, it could not be stored. Without, the failure is
                logged and published as an ``error`` event, and the job goes on.
        """
        assert self.service is not None
        taken = self._wallclock()
        covers = self._changes.last
        data = {"state": self.service.checkpoint()}
        if not self.stores_checkpoints:
            self._emit("checkpoint", data)
            return {"time": taken}
        assert self._store is not None
        stored = self._store(data["state"], self._settable_values(), covers)
        stored.add_done_callback(
            lambda done: self._changes.covered(covers) if done.exception() is None else None)
        if not wait:
            stored.add_done_callback(lambda done: self._stored(done, data))
            return {"time": taken}
        try:
            stored.result(STORE_TIMEOUT)
        except cf.TimeoutError:
            raise CheckpointFailed(f"job {self.job}: storing the checkpoint took over "
                                   f"{STORE_TIMEOUT:.0f} s") from None
        except CheckpointFailed:
            raise
        except Exception as exc:
            raise CheckpointFailed(f"job {self.job}: the checkpoint was not stored: {exc}") from exc
        self._emit("checkpoint", data)
        return {"time": taken, "stored": True}

    def _settable_values(self) -> dict[str, Any]:
        """The values of the service's declared settable attributes it has now, those that
        can be sent (part of every stored checkpoint: set again after ``restore()``)."""
        values: dict[str, Any] = {}
        assert self.service is not None
        for attr in type(self.service).settable:
            if hasattr(self.service, attr):
                value = getattr(self.service, attr)
                try:
                    codec.encode(value)
                except (TypeError, ValueError):
                    continue
                values[attr] = value
        return values

    def _stored(self, done: cf.Future[None], data: dict[str, Any]) -> None:
        error = done.exception()
        if error is None:
            self._emit("checkpoint", data)
            return
        log.warning("job %s: checkpoint not stored: %s", self.job, error)
        self._emit("error", {"during": "checkpoint", "error": error_to_wire(error)})

    def improved(self, state: dict[str, Any]) -> None:
        """Report a better intermediate result (see ``ServiceHandler.improved``)."""
        now = self._clock()
        self._improved_pending = self._improved_latest = state
        delta = self._intervals.improved_delta
        if delta <= 0 or now - self._last_improved >= delta:
            self._send_improved(now)
        else:
            self._improved_due = self._last_improved + delta
            self._crossing.next_due = min(self._crossing.next_due, self._improved_due)

    def _send_improved(self, now: float) -> None:
        state, self._improved_pending = self._improved_pending, None
        self._improved_due = math.inf
        if state is not None:
            self._last_improved = now
            self._emit("improved", {"state": state})

    def _emit(self, kind: str, data: dict[str, Any]) -> None:
        if not self._abandoned:
            self._send(kind, data)
