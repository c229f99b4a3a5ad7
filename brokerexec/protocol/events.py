"""Job events: what a job tells anyone listening, on the events exchange.

Routing key ``<kind>.<service>.<job id>``; subscribers bind any topic pattern and the
broker filters. Events are best-effort (``docs/protocol.md``): the end of a job that
matters is its :class:`~brokerexec.protocol.messages.Record`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from ..codec import expect_object
from ..errors import DecodeError
from .names import PROTOCOL_VERSION, event_routing_key

__all__ = ["EVENT_KINDS", "Event"]

#: The first word of an event's routing key.
EVENT_KINDS: Final = ("state", "progress", "improved", "checkpoint", "error", "resumed")
_TERMINAL_STATES: Final = frozenset({"finished", "failed", "aborted"})


@dataclass(frozen=True)
class Event:
    """One job event.

    Attributes:
        kind: ``state``, ``progress``, ``improved``, ``checkpoint``, ``error`` (something
            failed that did not end the job: ``{"during": "checkpoint", "error": {...}}``) or
            ``resumed`` (the first event of an execution that resumed the job: what it
            resumed from, the sets applied again, the invokes not replayed).
        seq: counts the job's events from 0 (in each attempt), so readers can drop repeats.
        time: when it was emitted (epoch seconds).
        data: ``state``: ``{"from", "to", "start", "end"}``; ``progress``: the service's
            progress plus ``elapsed``; ``improved`` and ``checkpoint``: ``{"state": ...}``.
    """

    kind: str
    job_id: str
    service: str
    seq: int
    time: float
    data: dict[str, Any]
    #: The execution that sent it: readers drop events of attempts older than one seen.
    attempt: int = 1

    @property
    def routing_key(self) -> str:
        """``<kind>.<service>.<job id>``."""
        return event_routing_key(self.kind, self.service, self.job_id)

    @property
    def ends_job(self) -> bool:
        """True for a job's last event: its state event into a terminal state."""
        return self.kind == "state" and self.data.get("to") in _TERMINAL_STATES

    def encode(self) -> dict[str, Any]:
        return {"v": PROTOCOL_VERSION, "kind": self.kind, "job_id": self.job_id,
                "service": self.service, "seq": self.seq, "time": self.time, "data": self.data,
                "attempt": self.attempt}

    @classmethod
    def decode(cls, body: object) -> Event:
        body = expect_object(body, "an event")
        kind = body.get("kind")
        if kind not in EVENT_KINDS:
            raise DecodeError(f"unknown event kind {kind!r}")
        try:
            return cls(kind=kind, job_id=str(body["job_id"]), service=str(body["service"]),
                       seq=int(body.get("seq", 0)), time=float(body.get("time", 0.0)),
                       data=dict(body.get("data") or {}), attempt=int(body.get("attempt", 1)))
        except (KeyError, TypeError, ValueError) as exc:
            raise DecodeError(f"malformed event: {exc!r}") from exc
