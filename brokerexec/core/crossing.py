"""What crosses between a job's two threads, and nothing else.

The **handler thread** (the transport's) takes signals at the :class:`~brokerexec.
core.handler_thread.SignalDesk`; the **computation thread** runs the service and calls ``ready()``
(:class:`~brokerexec.core.computation_thread.Computation`). They share one :class:`Crossing`:

* handler → computation: :meth:`Crossing.post` a checked ``set``/``invoke``/``checkpoint``
  for the next ``ready()``; :meth:`~Crossing.request_pause`, :meth:`~Crossing.request_resume`,
  :meth:`~Crossing.request_abort`, :meth:`~Crossing.request_reschedule` (the intervals
  changed), :meth:`~Crossing.request_handover` (the worker stops: checkpoint and go);
* computation → handler: :attr:`~Crossing.last_progress` (for ``status``), and
  :meth:`~Crossing.close` when the job ends, after which posts are refused at once.

``ready()`` with nothing to do reads :attr:`~Crossing.attention` and compares the clock with
:attr:`~Crossing.next_due`: the handler thread raises ``attention`` whenever it posts or
requests something, so everything else stays behind that one test. Those two are read
without the lock (a stale read only delays the work to the next ``ready()``) and written
under it.

A computation in a child process cannot watch ``attention``: its worker-side bridge
(:mod:`brokerexec.child.computation`) asks to be told of every post and request
(:meth:`~Crossing.relay_to`), takes the posted signals across (:meth:`~Crossing.hand_over`)
and raises the same flags on the child's own crossing.
"""

from __future__ import annotations

import concurrent.futures as cf
import math
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from .. import codec
from ..errors import InvalidState, NotApplied
from ..protocol.intents import Intent
from ..protocol.states import JobState

__all__ = ["Crossing", "Posted", "fail_unapplied", "resolved"]


def resolved(value: Any) -> cf.Future[Any]:
    """A future already resolved to ``value``: the reply to a signal handled at once."""
    future: cf.Future[Any] = cf.Future()
    future.set_result(value)
    return future


class Posted:
    """A checked signal waiting for the next ``ready()``, and the future its sender waits on.

    ``payload`` is what the computation needs to apply it, checked already and JSON-able (so
    it can cross to a computation in a child process too): a ``set``'s checked ``attrs`` (and
    the ``handler_attrs`` set at once, for the reply), an ``invoke``'s bound ``method``,
    ``args`` and ``kwargs``, nothing for a ``checkpoint``.
    """

    __slots__ = ("future", "intent", "payload")

    def __init__(self, intent: Intent, payload: dict[str, Any]) -> None:
        self.intent = intent
        self.payload = payload
        self.future: cf.Future[Any] = cf.Future()

    def settle(self, apply: Callable[[Posted], Any]) -> None:
        """``apply(self)`` (computation thread), and resolve the sender's future with its
        value or its error: a failure goes to the sender, never to the computation; a value
        that cannot be sent back fails the signal here."""
        try:
            value = apply(self)
            codec.encode(value)
        except Exception as exc:
            self.future.set_exception(exc)
        else:
            self.future.set_result(value)


class Crossing:
    """See the module docstring."""

    __slots__ = ("_away", "_closed_as", "_lock", "_posted", "_relay", "_wake", "abort_requested",
                 "attention", "handover_requested", "last_progress", "next_due", "pause_requested",
                 "reschedule")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._posted: deque[Posted] = deque()
        self._closed_as: str | None = None
        self._relay: Callable[[], None] | None = None
        self._away = 0
        self.attention = False
        self.next_due = math.inf
        self.pause_requested = False
        self.abort_requested = False
        self.handover_requested = False
        self.reschedule = False
        self.last_progress: dict[str, Any] = {}

    @property
    def closed(self) -> bool:
        """True once the job has ended: nothing more is applied."""
        return self._closed_as is not None

    @property
    def queued(self) -> int:
        """How many signals wait for ``ready()`` (here, or handed over and not yet settled)."""
        return len(self._posted) + self._away

    def relay_to(self, relay: Callable[[], None]) -> None:
        """Call ``relay()`` after every post and request, on the thread that made it: for a
        computation elsewhere (a child process), which cannot poll :attr:`attention`."""
        self._relay = relay

    def _relayed(self) -> None:
        relay = self._relay
        if relay is not None:
            relay()

    # ---- handler thread -> computation thread ----------------------------------------------

    def post(self, posted: Posted, job: str) -> cf.Future[Any]:
        """Queue ``posted`` for the next ``ready()``; return its sender's future.

        Raises:
            InvalidState: the job has ended.
        """
        with self._lock:
            if self._closed_as is not None:
                raise InvalidState(f"job {job} has ended ({self._closed_as})")
            self._posted.append(posted)
            self.attention = True
            self._wake.notify_all()  # a paused computation applies it while holding
        self._relayed()
        return posted.future

    def request_pause(self) -> bool:
        """Hold at the next ``ready()``; False if the job has ended."""
        with self._lock:
            if self._closed_as is not None:
                return False
            self.pause_requested = self.attention = True
        self._relayed()
        return True

    def request_resume(self) -> bool:
        """Let a held computation go on; False if the job has ended."""
        with self._lock:
            if self._closed_as is not None:
                return False
            self.pause_requested = False
            self._wake.notify_all()
        self._relayed()
        return True

    def request_abort(self) -> bool | None:
        """Raise ``Aborted`` at the next ``ready()``: True the first time, None after that,
        False if the job has ended."""
        with self._lock:
            if self._closed_as is not None:
                return False
            first = not self.abort_requested
            self.abort_requested = self.attention = True
            self._wake.notify_all()
        self._relayed()
        return True if first else None

    def request_handover(self) -> bool:
        """Checkpoint at the next ``ready()`` and end, to be resumed elsewhere (a graceful stop
        of the worker); False if the job has ended."""
        with self._lock:
            if self._closed_as is not None:
                return False
            self.handover_requested = self.attention = True
            self._wake.notify_all()  # a paused job is handed over too
        self._relayed()
        return True

    def request_reschedule(self) -> None:
        """The intervals changed: the next ``ready()`` schedules the periodic messages anew."""
        with self._lock:
            self.reschedule = self.attention = True
        self._relayed()

    # ---- handler thread -> a computation elsewhere -----------------------------------------

    def hand_over(self) -> deque[Posted]:
        """Take every posted signal, in arrival order, to carry to a computation elsewhere;
        each still counts in :attr:`queued` until its future is settled."""
        with self._lock:
            batch, self._posted = self._posted, deque()
            self._away += len(batch)
        for posted in batch:
            posted.future.add_done_callback(self._settled_away)
        return batch

    def _settled_away(self, _: cf.Future[Any]) -> None:
        with self._lock:
            self._away -= 1

    # ---- computation thread ----------------------------------------------------------------

    def collect(self) -> deque[Posted]:
        """Take every posted signal, in arrival order; lower ``attention`` unless a pause,
        abort or reschedule still wants the next ``ready()``."""
        with self._lock:
            batch, self._posted = self._posted, deque()
            self.attention = (self.pause_requested or self.abort_requested or self.reschedule
                              or self.handover_requested)
        return batch

    def wait_while_paused(self) -> bool:
        """Block until something is posted, or a resume or abort comes; False once the
        pause is over (resumed or aborted)."""
        with self._lock:
            if self.abort_requested or self.handover_requested or not self.pause_requested:
                return False
            if not self._posted:
                self._wake.wait()
            return True

    def close(self, state: str) -> list[Posted]:
        """The job ended in ``state``: refuse posts from now on; return what was never applied."""
        with self._lock:
            self._closed_as = state
            pending, self._posted = list(self._posted), deque()
            self.attention = False
            self._wake.notify_all()
        return pending


def fail_unapplied(pending: list[Posted], job: str, final: JobState | None) -> None:
    """Fail what a job ended before applying, so its senders do not wait for their time-out
    (``final`` None: the job was handed over, to go on elsewhere without them)."""
    for posted in pending:
        posted.future.set_exception(
            NotApplied(f"job {job} was handed over to another worker before the "
                       f"{posted.intent.value} was applied: it was not applied")
            if final is None else
            InvalidState(f"job {job} ended ({final.value}) before the {posted.intent.value} was applied"))
