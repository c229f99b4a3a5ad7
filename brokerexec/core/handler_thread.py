"""The handler thread's side of a job: every signal is taken, checked and answered here.

The transport's thread calls :meth:`SignalDesk.take` with each signal (park's
``onSignal*`` handlers). One method per intent, found through one table
(:data:`SignalDesk.BY_INTENT`); whether an intent is answered at once or at ``ready()``
is the protocol's table (:data:`brokerexec.protocol.INTENTS`), checked against this one.

* answered at once: ``status``, and ``pause``/``resume``/``abort``, which only raise a flag
  on the :class:`~brokerexec.core.crossing.Crossing` that the next ``ready()`` obeys;
* at ``ready()``: ``set``, ``invoke`` and ``checkpoint``. Everything the declarations
  alone can refuse (an undeclared or private name, a wrong type, a wrong number of
  arguments) is refused here, so the sender learns at once and nothing is half-applied;
  what passes is posted across, and the sender's future resolves once it is applied. What
  depends on the computation's state is checked when it is applied: a ``set`` of a declared
  attribute the service has not made yet (it may make it in ``run()``) is refused then, at
  ``ready()``, as park's handler checks unused attributes (``onReadySet``).

Service code never runs on this thread.
"""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Callable
from typing import Any, ClassVar

from ..errors import SignalRefused
from ..logs import current_job
from ..protocol.intents import Answered, Intent, Signal
from ..protocol.states import JobState
from .crossing import Crossing, Posted, resolved
from .intervals import HANDLER_SETTABLE, Intervals, check_delta
from .service import Service, check_set, prepare_invoke
from .state_machine import StateMachine

__all__ = ["SignalDesk"]

class SignalDesk:
    """See the module docstring.

    Parameters:
        job: the job's name, for messages.
        crossing: where checked signals and requests go.
        states: the job's state machine (read for ``status``).
        intervals: changed by a ``set`` of the handler's own attributes.
        service_class: the running service's class; raises ``InvalidState`` before there is one.
        on_abort: called on the first abort (starts the abort grace).
    """

    def __init__(self, job: str, crossing: Crossing, states: StateMachine, intervals: Intervals,
                 service_class: Callable[[], type[Service]], on_abort: Callable[[], None]) -> None:
        self.job = job
        self._crossing = crossing
        self._states = states
        self._intervals = intervals
        self._service_class = service_class
        self._abort_started = on_abort

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
        # valid before (and without) a service. Names and types only: whether the service
        # has the attribute is its state, checked where it is applied (Computation._assign).
        checked = check_set(self._service_class(), rest) if rest else {}
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

