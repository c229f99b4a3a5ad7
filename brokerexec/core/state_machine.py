"""One job's state, held for both of its threads: the protocol's table, enforced.

:class:`StateMachine` moves a job through the states of :mod:`brokerexec.protocol.states`,
refuses a transition the table does not allow, and records when each state was entered, so
every transition is reported with the start and end clock times of the state it leaves.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from ..errors import InvalidState
from ..protocol.states import TRANSITIONS, JobState, Transition

__all__ = ["StateMachine"]


class StateMachine:
    """A thread-safe state holder that refuses transitions the table does not allow."""

    def __init__(self, on_transition: Callable[[Transition], None] | None = None,
                 wallclock: Callable[[], float] = time.time) -> None:
        self._lock = threading.Lock()
        self._wallclock = wallclock
        self._state = JobState.CREATED
        self._entered = wallclock()
        self._on_transition = on_transition
        self.history: list[Transition] = []

    @property
    def state(self) -> JobState:
        """The current state."""
        return self._state

    @property
    def entered(self) -> float:
        """Wall-clock time the current state was entered."""
        return self._entered

    def transition(self, new: JobState) -> Transition:
        """Move to ``new``; raise ``InvalidState`` if the table forbids it."""
        with self._lock:
            transition = self._move(new)
        if self._on_transition is not None:
            self._on_transition(transition)
        return transition

    def try_transition(self, new: JobState) -> Transition | None:
        """Move to ``new`` if allowed; return None (and change nothing) otherwise."""
        with self._lock:
            if new not in TRANSITIONS[self._state]:
                return None
            transition = self._move(new)
        if self._on_transition is not None:
            self._on_transition(transition)
        return transition

    def _move(self, new: JobState) -> Transition:
        if new not in TRANSITIONS[self._state]:
            raise InvalidState(f"cannot go from {self._state.value} to {new.value}")
        now = self._wallclock()
        transition = Transition(self._state, new, self._entered, now)
        self._state, self._entered = new, now
        self.history.append(transition)
        return transition
