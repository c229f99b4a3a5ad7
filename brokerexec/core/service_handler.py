"""The service handler: one job's two threads, and ``ready()`` between them (park's
``ServiceHandler``).

::

    handler thread (the transport's)             computation thread
    ───────────────────────────────              ──────────────────
    put(signal) ─► SignalDesk.take ──post──►  Crossing  ──collect──► Computation.at_ready
      status          answered at once           queue, flags,            apply set/invoke/checkpoint
      pause/resume/   a flag, answered at once   wake-up                  hold while paused
      abort                                                               raise Aborted
      set/invoke/     checked here, posted;   ◄──last progress,──        emit progress/checkpoint/
      checkpoint      reply once applied          close at the end        improved when due

:class:`ServiceHandler` is the face of both: the computation calls :meth:`ready`,
:meth:`improved`, :meth:`map` and :meth:`imap` (``service.run(handler, request)``); the
worker calls :meth:`start`, :meth:`put`, :meth:`status` and :meth:`join`. The pieces:
:mod:`~brokerexec.core.handler_thread` (handler thread), :mod:`~brokerexec.core.crossing`
(what crosses), :mod:`~brokerexec.core.computation_thread` (computation thread).

``ready()`` with nothing to do costs one flag test and one clock read. Where the
computation runs is the handler's :class:`~brokerexec.core.runner.Runner`: reused threads
by default (:class:`~brokerexec.core.thread_runner.ThreadRunner`), or a child process of its
own (:class:`~brokerexec.child.runner.ProcessRunner`), whose
:class:`~brokerexec.child.computation.ChildComputation` stands where the ``Computation``
stands: the handler thread's side is the same, and the service, ``ready()`` and a real
``Computation`` run in the child (:mod:`brokerexec.child.main`).
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from ..errors import InvalidState
from ..protocol.intents import Signal
from ..protocol.states import Transition
from .crossing import Crossing
from .handler_thread import SignalDesk
from .intervals import Intervals, check_delta
from .map_pool import WorkerPool
from .map_pool import imap as pool_imap
from .runner import ComputationSide, JobSetup, Note, Outcome, Runner, Store
from .service import Service
from .state_machine import StateMachine
from .thread_runner import THREADS

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
        progress_delta: seconds between progress messages (default 1, as park's).
        checkpoint_delta: seconds between checkpoints (default 3600).
        improved_delta: seconds at least between improved messages (default 0).
        name: names the computation thread and log lines (the worker uses the job id).
        runner: where the computation runs (a :class:`~brokerexec.core.runner.Runner`):
            reused threads (the default, :data:`brokerexec.core.thread_runner.THREADS`), or a
            child process each (a :class:`~brokerexec.child.runner.ProcessRunner`).
        store: stores a checkpoint durably (a worker's; the future fails with
            ``CheckpointFailed``). Without one, checkpoints are only published.
        note: makes each applied set and invoke durable before it is acknowledged (a
            worker's, beside ``store``: :mod:`brokerexec.core.change_log`).
        carried: the change log a resumed job brings from its previous execution, and
            ``carried_after`` the newest change its checkpoint covers.
        max_result_bytes: a larger result (as JSON) fails the job with ``ResultTooLarge``.
    """

    def __init__(self, emit: Emit | None = None, *, workers: WorkerPool | int | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 wallclock: Callable[[], float] = time.time, abort_grace: float = 10.0,
                 progress_delta: float | None = None, checkpoint_delta: float | None = None,
                 improved_delta: float | None = None, name: str = "job",
                 runner: Runner | None = None, store: Store | None = None,
                 note: Note | None = None, carried: Sequence[dict[str, Any]] = (),
                 carried_after: int = 0, max_result_bytes: int | None = None) -> None:
        self._emit_fn: Emit = emit or (lambda kind, data: None)
        self.workers = workers if isinstance(workers, WorkerPool) else WorkerPool(workers)
        self.abort_grace = abort_grace
        self.name = name
        self.intervals = Intervals()
        for attr, value in (("progress_delta", progress_delta),
                            ("checkpoint_delta", checkpoint_delta),
                            ("improved_delta", improved_delta)):
            if value is not None:
                setattr(self.intervals, attr, check_delta(attr, value))
        self._clock = clock
        self._start_lock = threading.Lock()
        self._crossing = Crossing()
        self.states = StateMachine(self._on_transition, wallclock)
        self._service_cls: type[Service] | None = None
        self._computation: ComputationSide = (runner or THREADS).computation(JobSetup(
            name, self._crossing, self.states, self.intervals, self._send, self.workers,
            abort_grace, clock, wallclock, store, note, tuple(carried), carried_after,
            max_result_bytes))
        self.desk = SignalDesk(name, self._crossing, self.states, self.intervals,
                               self._service_class, self._start_abort_grace)
        #: Resolves when the job ends: ``{"state", "result", "error", "start", "end"}``.
        self.outcome: cf.Future[Outcome] = self._computation.outcome
        self.ready = _ready_check(self._crossing, clock, self._computation.at_ready)

    @property
    def service(self) -> Service | None:
        """The running service, once started (None when it runs in a child process)."""
        return self._computation.service

    @property
    def crossing(self) -> Crossing:
        """What crosses to the computation: for a reader standing in for the handler thread
        (the child process's, :mod:`brokerexec.child.main`)."""
        return self._crossing

    # ---- the worker's side -----------------------------------------------------------------

    def start(self, service: Service | type[Service], request: dict[str, Any],
              resume: bool = False, *, state: dict[str, Any] | None = None,
              reapply: dict[str, Any] | None = None) -> None:
        """Run ``request`` through ``service`` in the computation thread; return at once.

        With ``resume=True`` the service's :meth:`~Service.restore` gets ``state`` first.
        ``reapply``: values of settable attributes that a resumed job's senders were told
        were applied (its checkpoint's and those logged since), set again at its first
        ``ready()``.
        ``service`` may be a class: it is made here, and a failing ``__init__`` fails the
        job. In a child process the service is always made anew there, from its class
        (an instance given here is used only for its class).

        Raises:
            InvalidState: a computation was started on this handler already.
        """
        with self._start_lock:
            if self._computation.started:
                raise InvalidState(f"handler {self.name} is busy: one computation per handler")
            self._service_cls = service if isinstance(service, type) else type(service)
            self._computation.start(service, request, resume, state, self, reapply)

    def fail_to_start(self, exc: BaseException) -> None:
        """End the job as failed before it ran (its service could not be made)."""
        log.error("job %s could not start: %r", self.name, exc)
        self._computation.fail_to_start(exc)

    def join(self, timeout: float | None = None) -> Outcome:
        """Wait for the outcome: ``{"state", "result", "error", "start", "end"}``."""
        return self.outcome.result(timeout)

    def put(self, body: dict[str, Any] | Signal) -> Any:
        """Handle one signal (handler thread); return its reply value or a ``Future`` of it.

        ``status`` returns its value; ``pause``/``resume``/``abort`` return a done
        future (so kiwipy sends "pending" first, as plumpy clients expect); ``set``,
        ``invoke`` and ``checkpoint`` return a future resolved once the next ``ready()``
        has applied them.

        Raises:
            DecodeError: not a signal (unknown intent, not an object).
            SignalRefused: a ``set`` or ``invoke`` the service's declarations refuse.
            InvalidState: the job has ended, or has no service yet.
        """
        return self.desk.take(body if isinstance(body, Signal) else Signal.decode(body))

    def status(self) -> dict[str, Any]:
        """A snapshot for ``status`` replies (safe from any thread)."""
        return self.desk.status()

    def hand_over(self) -> bool:
        """The worker stops gracefully: at its next ``ready()`` the job stores a checkpoint
        and ends with the outcome ``{"state": "handed_over"}``, to be resumed elsewhere.
        False if it has ended, or stores no checkpoints (it then runs on)."""
        if not self._computation.stores_checkpoints:
            return False
        return self._crossing.request_handover()

    # ---- the computation's side ------------------------------------------------------------

    # Made per handler (_ready_check): with nothing to do it is one flag test and one clock
    # read, on values held in its closure rather than looked up on ``self``.
    ready: Callable[[], None]
    """``ready()``: apply queued signals, hold while paused, raise ``Aborted``, emit what is due.

    Call it often from ``Service.run`` (the computation thread): it is where ``set``,
    ``invoke`` and ``checkpoint`` are applied, where a pause holds and where an abort raises.
    """

    def improved(self, state: dict[str, Any]) -> None:
        """Report a better intermediate result (computation thread).

        With ``improved_delta == 0`` it is sent at once; otherwise at most one message per
        delta is sent, the latest state wins, and the last one is sent when the job ends.
        """
        self._computation.improved(state)

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

    # ---- the intervals ---------------------------------------------------------------------

    @property
    def progress_delta(self) -> float:
        """Seconds between progress messages."""
        return self.intervals.progress_delta

    @property
    def checkpoint_delta(self) -> float:
        """Seconds between checkpoints."""
        return self.intervals.checkpoint_delta

    @property
    def improved_delta(self) -> float:
        """At least this many seconds between improved messages (0: each at once)."""
        return self.intervals.improved_delta

    # ---- plumbing ----------------------------------------------------------------------------

    def _service_class(self) -> type[Service]:
        if self._service_cls is None:
            raise InvalidState(f"job {self.name} has no service yet")
        return self._service_cls

    def _start_abort_grace(self) -> None:
        if not self._computation.started:
            return
        timer = threading.Timer(self.abort_grace, self._computation.abandon_if_stuck,
                                args=(self.abort_grace,))
        timer.name, timer.daemon = f"brokerexec-abort-{self.name}", True
        timer.start()

    def _on_transition(self, transition: Transition) -> None:
        # Not muted when abandoned: the abandoning transition itself must be reported.
        self._send("state", transition.to_wire())

    def _send(self, kind: str, data: dict[str, Any]) -> None:
        try:
            self._emit_fn(kind, data)
        except Exception:  # a failing transport must not end the computation unreported
            log.exception("job %s: emitting a %s message failed", self.name, kind)


def _ready_check(crossing: Crossing, clock: Callable[[], float],
                 at_ready: Callable[[], None]) -> Callable[[], None]:
    """The ``ready()`` of one handler (see ``ServiceHandler.ready``)."""
    def ready() -> None:
        """Apply queued signals, hold while paused, raise ``Aborted``, emit what is due."""
        if crossing.attention or clock() >= crossing.next_due:
            at_ready()

    return ready
