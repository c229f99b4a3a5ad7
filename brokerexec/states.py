"""Job states and the table of allowed transitions.

::

    created ──▶ running ◀──▶ paused
       │          │            │
       ▼          ▼            ▼
    aborted   finished | failed | aborted      (terminal)

A :class:`StateMachine` records when each state was entered, so every transition can be
reported with the start and end clock times of the state it leaves.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import InvalidState

__all__ = ["TERMINAL", "TRANSITIONS", "JobState", "StateMachine", "Transition"]


class JobState(str, enum.Enum):
    """The life of a job."""

    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    FINISHED = "finished"
    FAILED = "failed"
    ABORTED = "aborted"

    @property
    def terminal(self) -> bool:
        """True for finished, failed and aborted."""
        return self in TERMINAL


TERMINAL = frozenset({JobState.FINISHED, JobState.FAILED, JobState.ABORTED})

TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.CREATED: frozenset({JobState.RUNNING, JobState.FAILED, JobState.ABORTED}),
    JobState.RUNNING: frozenset({JobState.PAUSED, *TERMINAL}),
    JobState.PAUSED: frozenset({JobState.RUNNING, *TERMINAL}),
    JobState.FINISHED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.ABORTED: frozenset(),
}


@dataclass(frozen=True)
class Transition:
    """One change of state; ``start``/``end`` are the wall-clock bounds of the state left."""

    previous: JobState
    state: JobState
    start: float
    end: float

    def to_wire(self) -> dict[str, Any]:
        """The ``data`` of a state event."""
        return {"from": self.previous.value, "to": self.state.value,
                "start": self.start, "end": self.end}


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
