"""The service handler: a computation thread, a handler thread, and ``ready()`` between them.

After park's ``ServiceHandler``. Two threads share one handler:

* the **handler thread** (the transport's) calls :meth:`ServiceHandler.put` with each
  signal. ``status``, ``pause``, ``resume`` and ``abort`` are answered there at once;
  ``set`` and ``invoke`` are queued and their futures resolve once applied.
* the **computation thread** runs ``service.run(handler, request)`` and calls
  :meth:`ServiceHandler.ready` often. ``ready()`` applies queued signals in arrival order,
  holds while paused, raises :class:`~brokerexec.Aborted` on abort, and emits progress,
  checkpoint and improved messages when they are due.

``ready()`` with nothing to do costs one flag test and one clock read: the handler thread
raises ``_attention`` whenever it queues work, and ``_next_due`` is the earliest time any
periodic message is due.

A computation that never calls ``ready()`` cannot be stopped from outside in thread mode
(Python threads cannot be killed). On abort the handler waits ``abort_grace`` seconds; if
the computation has not ended by then, the job is reported ``aborted`` and the thread is
abandoned: it runs on as a daemon, its result is discarded and its messages are dropped.
Where the computation runs is the handler's :class:`~brokerexec.runner.Runner`: threads by
default; a child-process runner can stand in behind the same seam.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import math
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from . import codec
from ._signals import HANDLER_SETTABLE as HANDLER_SETTABLE  # re-exported: the worker's import
from ._signals import QueuedSignal, apply_queued, check_invoke, fail_pending, resolved, split_set, status_body
from ._signals import check_delta as check_delta  # re-exported: the worker's import
from .constants import DEFAULT_CHECKPOINT_DELTA, DEFAULT_IMPROVED_DELTA, DEFAULT_PROGRESS_DELTA
from .errors import Aborted, InvalidState, error_to_wire
from .pool import WorkerPool
from .pool import imap as pool_imap
from .protocol import Intent, parse_signal
from .runner import THREADS, Computation, Runner
from .service import Service
from .states import JobState, StateMachine, Transition

__all__ = ["Emit", "ServiceHandler"]

log = logging.getLogger(__name__)

#: ``emit(kind, data)``: called with "state", "progress", "improved" or "checkpoint".
Emit = Callable[[str, dict[str, Any]], None]


class ServiceHandler:
    """Runs one service at a time and routes signals to it.

    Parameters:
        emit: receives every outgoing message; called from either thread, must not block.
        workers: pool for :meth:`map`/:meth:`imap` (an int means that many threads).
        clock: monotonic clock for the periodic messages (a fake one in tests).
        wallclock: wall clock for the times reported in messages.
        abort_grace: seconds an aborted computation may take to reach ``ready()`` before
            it is reported aborted and abandoned.
        progress_delta, checkpoint_delta, improved_delta: see the class attributes.
        name: names the computation thread and log lines (the worker uses the job id).
        runner: where the computation runs (default: reused threads,
            :data:`brokerexec.runner.THREADS`).
    """

    progress_delta: float = DEFAULT_PROGRESS_DELTA
    checkpoint_delta: float = DEFAULT_CHECKPOINT_DELTA
    improved_delta: float = DEFAULT_IMPROVED_DELTA

    def __init__(self, emit: Emit | None = None, *, workers: WorkerPool | int | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 wallclock: Callable[[], float] = time.time, abort_grace: float = 10.0,
                 progress_delta: float | None = None, checkpoint_delta: float | None = None,
                 improved_delta: float | None = None, name: str = "job",
                 runner: Runner | None = None) -> None:
        self._emit_fn: Emit = emit or (lambda kind, data: None)
        self._runner: Runner = runner or THREADS
        self.workers = workers if isinstance(workers, WorkerPool) else WorkerPool(workers)
        self._clock = clock
        self._wallclock = wallclock
        self.abort_grace = abort_grace
        self.name = name
        for attr, value in (("progress_delta", progress_delta),
                            ("checkpoint_delta", checkpoint_delta),
                            ("improved_delta", improved_delta)):
            if value is not None:
                setattr(self, attr, check_delta(attr, value))
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._queue: deque[QueuedSignal] = deque()
        # Read without the lock on the hot path; written under it.
        self._attention = False
        self._next_due = math.inf
        self._pause_requested = False
        self._abort_requested = False
        self._reschedule = False
        self._progress_due = self._checkpoint_due = self._improved_due = math.inf
        self._improved_pending: dict[str, Any] | None = None
        self._last_improved = -math.inf
        self._last_progress: dict[str, Any] = {}
        self._abandoned = False
        self.service: Service | None = None
        self.states = StateMachine(self._on_transition, wallclock)
        self.outcome: cf.Future[dict[str, Any]] = cf.Future()
        self._computation: Computation | None = None

    # ---- the computation -----------------------------------------------------------------

    def start(self, service: Service, request: dict[str, Any], resume: bool = False, *,
              state: dict[str, Any] | None = None) -> None:
        """Run ``request`` through ``service`` in the computation thread; return at once.

        With ``resume=True`` the service's :meth:`~Service.restore` gets ``state`` first.

        Raises:
            InvalidState: a computation was started on this handler already.
        """
        with self._lock:
            if self._computation is not None:
                raise InvalidState(f"handler {self.name} is busy: one computation per handler")
            self.service = service
            self._computation = self._runner.start(
                lambda: self._compute(service, request, resume, state), self.name)

    def _compute(self, service: Service, request: dict[str, Any], resume: bool,
                 state: dict[str, Any] | None) -> None:
        start = self._wallclock()
        self.states.transition(JobState.RUNNING)
        now = self._clock()
        with self._lock:
            self._progress_due = now + self.progress_delta
            self._checkpoint_due = now + self.checkpoint_delta
            self._update_next_due()
        result: Any = None
        error: dict[str, str] | None = None
        final = JobState.FINISHED
        try:
            if resume:
                service.restore(state or {})
            result = service.run(self, request)
        except Aborted:
            final = JobState.ABORTED
        except BaseException as exc:  # the handler never dies with the computation
            final, error = JobState.FAILED, error_to_wire(exc, traceback.format_exc())
            log.info("job %s failed: %s", self.name, error["message"])
        else:
            try:  # a result that cannot be sent is the service's failure, reported as such
                codec.encode(result)
            except (TypeError, ValueError) as exc:
                final, result = JobState.FAILED, None
                error = error_to_wire(exc, "")
                error["message"] = f"result is not JSON-able: {exc}"
        self._finish(final, result, error, start)

    def _finish(self, final: JobState, result: Any, error: dict[str, str] | None,
                start: float) -> None:
        with self._lock:
            if self._abandoned:
                return
            pending, self._queue = list(self._queue), deque()
            self._attention = False
        if final is not JobState.ABORTED and self._improved_pending is not None:
            self._send_improved(self._clock())  # the last improvement is never lost
        fail_pending(pending, self.name, final)
        self.states.try_transition(final)
        self.outcome.set_result({"state": final.value, "result": result, "error": error,
                                 "start": start, "end": self._wallclock()})

    def _abandon_if_stuck(self) -> None:
        """Abort deadline passed: report aborted and let the thread run on unobserved."""
        with self._lock:
            computation = self._computation
            if computation is None or not computation.is_alive() or self.outcome.done():
                return
            self._abandoned = True
            pending, self._queue = list(self._queue), deque()
        log.warning("job %s did not reach ready() within %.1f s of abort: abandoned",
                    self.name, self.abort_grace)
        fail_pending(pending, self.name, JobState.ABORTED)  # no ready() will apply them now
        if self.states.state is JobState.PAUSED:
            self.states.try_transition(JobState.RUNNING)
        if self.states.try_transition(JobState.ABORTED) is not None:
            start = self.states.history[0].end if self.states.history else self._wallclock()
            self.outcome.set_result({"state": "aborted", "result": None, "start": start,
                                     "error": None, "end": self._wallclock(), "abandoned": True})

    def join(self, timeout: float | None = None) -> dict[str, Any]:
        """Wait for the outcome: ``{"state", "result", "error", "start", "end"}``."""
        return self.outcome.result(timeout)

    # ---- called from the computation thread ------------------------------------------

    def ready(self) -> None:
        """Apply queued signals, hold while paused, raise ``Aborted``, emit what is due."""
        if self._attention or self._clock() >= self._next_due:
            self._ready_slow()

    def _ready_slow(self) -> None:
        self._apply_signals()
        if self._abort_requested:
            raise Aborted(f"job {self.name} aborted")
        if self._pause_requested:
            self._hold()
        now = self._clock()
        if self._reschedule:
            self._reschedule = False
            with self._lock:
                self._progress_due = now + self.progress_delta
                self._checkpoint_due = now + self.checkpoint_delta
        if now >= self._next_due:
            self._emit_due(now)
        with self._lock:
            self._update_next_due()

    def _apply_signals(self) -> None:
        with self._lock:
            batch, self._queue = self._queue, deque()
            self._attention = self._pause_requested or self._abort_requested or self._reschedule
        for queued in batch:  # arrival order
            assert self.service is not None
            apply_queued(self.service, queued)

    def _hold(self) -> None:
        """Paused: stay here, still applying set/invoke, until resume or abort."""
        if self.states.try_transition(JobState.PAUSED) is None:
            return
        while True:
            self._apply_signals()
            with self._lock:
                if self._abort_requested or not self._pause_requested:
                    break
                if not self._queue:
                    self._wake.wait()
        self.states.try_transition(JobState.RUNNING)  # abort resumes first, as park does
        if self._abort_requested:
            raise Aborted(f"job {self.name} aborted")

    def _emit_due(self, now: float) -> None:
        if now >= self._progress_due:
            self._progress_due = now + self.progress_delta
            self._send_progress()
        if now >= self._checkpoint_due:
            self._checkpoint_due = now + self.checkpoint_delta
            assert self.service is not None
            self._emit("checkpoint", {"state": self.service.checkpoint()})
        if now >= self._improved_due:
            self._send_improved(now)

    def _send_progress(self) -> None:
        assert self.service is not None
        data = dict(self.service.progress())
        data.setdefault("elapsed", self._wallclock() - self.states.history[0].end)
        self._last_progress = data
        self._emit("progress", data)

    def _update_next_due(self) -> None:
        self._next_due = min(self._progress_due, self._checkpoint_due, self._improved_due)

    def improved(self, state: dict[str, Any]) -> None:
        """Report a better intermediate result (computation thread).

        With ``improved_delta == 0`` it is sent at once; otherwise at most one message per
        delta is sent, the latest state wins, and the last one is sent when the job ends.
        """
        now = self._clock()
        self._improved_pending = state
        if self.improved_delta <= 0 or now - self._last_improved >= self.improved_delta:
            self._send_improved(now)
        else:
            self._improved_due = self._last_improved + self.improved_delta
            self._next_due = min(self._next_due, self._improved_due)

    def _send_improved(self, now: float) -> None:
        state, self._improved_pending = self._improved_pending, None
        self._improved_due = math.inf
        if state is not None:
            self._last_improved = now
            self._emit("improved", {"state": state})

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
        """``[fn(x) for x in items]`` on the worker pool, calling ``ready()`` meanwhile."""
        return list(self.imap(fn, items))

    def imap(self, fn: Callable[[Any], Any], items: Iterable[Any], enumerated: bool = False,
             ordered: bool = True) -> Iterator[Any]:
        """Yield ``fn(x)`` for x in items as they are ready (input order if ``ordered``).

        With ``enumerated``, yield ``(i, fn(x))`` where ``i`` is the input position.
        """
        return pool_imap(self.workers, self.ready, fn, items, enumerated=enumerated,
                         ordered=ordered)

    # ---- called from the handler thread -------------------------------------------

    def put(self, body: dict[str, Any]) -> Any:
        """Handle one signal; return its reply value or a ``Future`` of it.

        ``status`` returns its value; ``pause``/``resume``/``abort`` return a done
        future (so kiwipy sends "pending" first, as plumpy clients expect); ``set`` and
        ``invoke`` return a future resolved when the next ``ready()`` has applied them.
        """
        intent, body = parse_signal(body)
        return self._SIGNALS[intent](self, body)

    def _on_status(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.status()

    def _on_pause(self, body: dict[str, Any]) -> cf.Future[Any]:
        with self._lock:
            if self.states.state.terminal:
                return resolved(False)
            self._pause_requested = self._attention = True
        return resolved(True)

    def _on_resume(self, body: dict[str, Any]) -> cf.Future[Any]:
        with self._lock:
            if self.states.state.terminal:
                return resolved(False)
            self._pause_requested = False
            self._wake.notify_all()
        return resolved(True)

    def _on_abort(self, body: dict[str, Any]) -> cf.Future[Any]:
        with self._lock:
            if self.states.state.terminal:
                return resolved(False)
            first = not self._abort_requested
            self._abort_requested = self._attention = True
            self._wake.notify_all()
        if first and self._computation is not None:
            timer = threading.Timer(self.abort_grace, self._abandon_if_stuck)
            timer.name, timer.daemon = f"brokerexec-abort-{self.name}", True
            timer.start()
        return resolved(True)

    def _on_set(self, body: dict[str, Any]) -> cf.Future[Any]:
        mine, rest = split_set(body, self._service_class)  # refused here, or applied whole
        for key, value in mine.items():
            setattr(self, key, value)
        if mine:
            with self._lock:
                self._reschedule = self._attention = True
        if not rest:
            return resolved(mine)
        return self._enqueue(Intent.SET, {"attrs": rest, "handler_attrs": mine})

    def _on_invoke(self, body: dict[str, Any]) -> cf.Future[Any]:
        return self._enqueue(Intent.INVOKE, check_invoke(body, self._service_class))

    def _service_class(self) -> type[Service]:
        if self.service is None:
            raise InvalidState(f"job {self.name} has no service yet")
        return type(self.service)

    def _enqueue(self, intent: Intent, body: dict[str, Any]) -> cf.Future[Any]:
        queued = QueuedSignal(intent, body)
        with self._lock:
            if self.states.state.terminal:
                raise InvalidState(f"job {self.name} has ended ({self.states.state.value})")
            self._queue.append(queued)
            self._attention = True
            self._wake.notify_all()  # a paused computation applies it while holding
        return queued.future

    _SIGNALS: dict[Intent, Callable[[ServiceHandler, dict[str, Any]], Any]] = {
        Intent.STATUS: _on_status, Intent.PAUSE: _on_pause, Intent.RESUME: _on_resume,
        Intent.ABORT: _on_abort, Intent.SET: _on_set, Intent.INVOKE: _on_invoke,
    }

    def status(self) -> dict[str, Any]:
        """A snapshot for ``status`` replies (safe from any thread)."""
        return status_body(self.states, pause_requested=self._pause_requested,
                           abort_requested=self._abort_requested, queued_signals=len(self._queue),
                           progress=self._last_progress, progress_delta=self.progress_delta,
                           checkpoint_delta=self.checkpoint_delta,
                           improved_delta=self.improved_delta)

    # ---- outgoing messages ------------------------------------------------------------

    def _emit(self, kind: str, data: dict[str, Any]) -> None:
        if not self._abandoned:
            self._send(kind, data)

    def _on_transition(self, transition: Transition) -> None:
        # Not muted when abandoned: the abandoning transition itself must be reported.
        self._send("state", transition.to_wire())

    def _send(self, kind: str, data: dict[str, Any]) -> None:
        try:
            self._emit_fn(kind, data)
        except Exception:  # a failing transport must not end the computation unreported
            log.exception("job %s: emitting a %s message failed", self.name, kind)
