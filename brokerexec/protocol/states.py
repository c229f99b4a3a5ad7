"""Job states as the wire names them, and the table of allowed transitions.

::

    created ──▶ running ◀──▶ paused
       │          │            │
       ▼          ▼            ▼
    aborted   finished | failed | aborted      (terminal)

A job's own state holder, which refuses what this table does not allow, is
:class:`brokerexec.core.state_machine.StateMachine`; every transition it makes is reported
as a :class:`Transition`, with the start and end clock times of the state it leaves.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

__all__ = ["TERMINAL", "TRANSITIONS", "JobState", "Transition"]


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
