"""The handler thread's side of a job: every signal is taken, checked and answered here.

The transport's thread calls :meth:`SignalDesk.take` with each signal (park's
``onSignal*`` handlers). One method per intent, found through one table
(:data:`SignalDesk.BY_INTENT`); whether an intent is answered at once or at ``ready()``
is the protocol's table (:data:`brokerexec.protocol.INTENTS`), checked against this one.

* answered at once: ``status``, and ``pause``/``resume``/``abort``, which only raise a flag
  on the :class:`~brokerexec.crossing.Crossing` that the next ``ready()`` obeys;
* at ``ready()``: ``set``, ``invoke`` and ``checkpoint``. Everything that can be refused
  without the computation (an undeclared or private name, a wrong type, a wrong number of
  arguments) is refused here, so the sender learns at once and nothing is half-applied;
  what passes is posted across, and the sender's future resolves once it is applied.

Service code never runs on this thread.
"""

from __future__ import annotations

import concurrent.futures as cf
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from .constants import DEFAULT_CHECKPOINT_DELTA, DEFAULT_IMPROVED_DELTA, DEFAULT_PROGRESS_DELTA
from .crossing import Crossing, Posted, resolved
from .errors import SignalRefused
from .logs import current_job
from .ports import check_type
from .protocol.intents import Answered, Intent, Signal
from .service import Service, check_set, prepare_invoke
from .states import JobState, StateMachine

__all__ = ["HANDLER_SETTABLE", "Intervals", "SignalDesk", "check_delta"]

#: Attributes a ``set`` may change on the handler itself (park's onSignalSet).
HANDLER_SETTABLE = ("progress_delta", "checkpoint_delta", "improved_delta")


def check_delta(name: str, value: Any) -> float:
    """Check one of :data:`HANDLER_SETTABLE`; return it as a float.

    Raises:
        SignalRefused: ``value`` is not a number, or is negative, infinite or NaN.
    """
    try:
        number = check_type(value, float)
    except TypeError as exc:
        raise SignalRefused(f"{name}: {exc}") from exc
    if not math.isfinite(number) or number < 0:
        raise SignalRefused(f"{name} must be a finite number >= 0, got {value!r}")
    return float(number)


@dataclass
class Intervals:
    """A job's periodic messages, in seconds: written by ``set`` on the handler thread, read
    by the computation thread when it schedules (after a reschedule request)."""

    progress_delta: float = DEFAULT_PROGRESS_DELTA
    checkpoint_delta: float = DEFAULT_CHECKPOINT_DELTA
    improved_delta: float = DEFAULT_IMPROVED_DELTA


class SignalDesk:
    """See the module docstring.

    Parameters:
        job: the job's name, for messages.
        crossing: where checked signals and requests go.
        states: the job's state machine (read for ``status``).
        intervals: changed by a ``set`` of the handler's own attributes.
        service_class: the running service's class; raises ``InvalidState`` before there is one.
        service: the running service instance, when this process holds it (not with a child
            process runner): a ``set`` of an attribute it lacks is refused at once.
        on_abort: called on the first abort (starts the abort grace).
    """

    def __init__(self, job: str, crossing: Crossing, states: StateMachine, intervals: Intervals,
                 service_class: Callable[[], type[Service]], on_abort: Callable[[], None],
                 service: Callable[[], Service | None] = lambda: None) -> None:
        self.job = job
        self._crossing = crossing
        self._states = states
        self._intervals = intervals
        self._service_class = service_class
        self._abort_started = on_abort
        self._service = service

    def take(self, signal: Signal) -> Any:
        """Handle one signal: return its reply value, or a ``Future`` of it.

        Intents answered at once return their value, wrapped in a done future when the
        protocol replies "pending" first (as plumpy's clients expect); the others return
        the future of their posted signal.
        """
        token = current_job.set(self.job)  # what is logged while it is handled names the job
        try:
            answer = self.BY_INTENT[signal.intent](self, signal)
        finally:
            current_job.reset(token)
        spec = signal.intent.spec
        if spec.answered is Answered.AT_ONCE and spec.pending_first:
            return resolved(answer)
        return answer

    # ---- answered at once ----------------------------------------------------------------

    def _on_status(self, signal: Signal) -> dict[str, Any]:
        return self.status()

    def _on_pause(self, signal: Signal) -> bool:
        return self._crossing.request_pause()

    def _on_resume(self, signal: Signal) -> bool:
        return self._crossing.request_resume()

    def _on_abort(self, signal: Signal) -> bool:
        outcome = self._crossing.request_abort()
        if outcome is True:
            self._abort_started()
        return outcome is not False

    # ---- checked here, applied at ready() ------------------------------------------------

    def _on_set(self, signal: Signal) -> cf.Future[Any]:
        attrs = signal.get("attrs")
        if not isinstance(attrs, dict) or not attrs:
            raise SignalRefused("set needs a non-empty object 'attrs'")
        mine = {key: check_delta(key, value) for key, value in attrs.items() if key in HANDLER_SETTABLE}
        rest = {key: value for key, value in attrs.items() if key not in HANDLER_SETTABLE}
        # Refused whole, before anything is set: a set of the handler's intervals alone is
        # valid before (and without) a service.
        checked = check_set(self._service_class(), rest, self._service()) if rest else {}
        if mine:
            for key, value in mine.items():
                setattr(self._intervals, key, value)
            self._crossing.request_reschedule()
        if not checked:
            return resolved(mine)
        return self._post(Intent.SET, {"attrs": checked, "handler_attrs": mine})

    def _on_invoke(self, signal: Signal) -> cf.Future[Any]:
        method = signal.get("method")
        args, kwargs = signal.get("args") or [], signal.get("kwargs") or {}
        if not isinstance(method, str) or not isinstance(args, list) or not isinstance(kwargs, dict):
            raise SignalRefused("invoke needs 'method' (string), 'args' (list), 'kwargs' (object)")
        prepared = prepare_invoke(self._service_class(), method, args, kwargs)
        return self._post(Intent.INVOKE, {"method": prepared.method, "args": list(prepared.args),
                                          "kwargs": prepared.kwargs})

    def _on_checkpoint(self, signal: Signal) -> cf.Future[Any]:
        self._service_class()  # refused before there is a service
        return self._post(Intent.CHECKPOINT, {})

    def _post(self, intent: Intent, payload: dict[str, Any]) -> cf.Future[Any]:
        return self._crossing.post(Posted(intent, payload), self.job)

    BY_INTENT: ClassVar[dict[Intent, Callable[[SignalDesk, Signal], Any]]] = {
        Intent.STATUS: _on_status, Intent.PAUSE: _on_pause, Intent.RESUME: _on_resume,
        Intent.ABORT: _on_abort, Intent.SET: _on_set, Intent.INVOKE: _on_invoke,
        Intent.CHECKPOINT: _on_checkpoint,
    }

    # ---- status ------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The reply to ``status`` (the status object of ``docs/protocol.md``), from any thread.

        Built from values read without the lock: a snapshot, not a transaction.
        """
        crossing, intervals = self._crossing, self._intervals
        state = self._states.state
        return {
            "state": state.value,
            "paused": state is JobState.PAUSED,
            "pause_requested": crossing.pause_requested,
            "abort_requested": crossing.abort_requested,
            "handover_requested": crossing.handover_requested,
            "since": self._states.entered,
            "queued_signals": crossing.queued,
            "progress": crossing.last_progress,
            "progress_delta": intervals.progress_delta,
            "checkpoint_delta": intervals.checkpoint_delta,
            "improved_delta": intervals.improved_delta,
        }

