"""The bodies of brokerexec messages, built and checked in one place.

Every body is a JSON object. ``docs/protocol.md`` is the reference; this module is its code.

* launch (task queue ``brokerexec.launch``)::

    {"v": 1, "job_id": str, "service": str, "request": {...}, "settings": {...}, "sent": float}

* RPC request to one job (kiwipy-compatible, routing key ``[rpc].<job id>``)::

    {"intent": "status" | "pause" | "resume" | "play" | "abort" | "kill" | "set" | "invoke", ...}

* RPC reply (kiwipy's reply format, plus a structured ``error``)::

    {"result": value} | {"pending": null} | {"exception": str, "error": {type, message, traceback}}

* event (topic ``brokerexec.events``, routing key ``<kind>.<service>.<job id>``)::

    {"v": 1, "kind": str, "job_id": str, "service": str, "seq": int, "time": float, "data": {...}}

* final record (queue ``brokerexec.result.<job id>``)::

    {"v": 1, "job_id", "service", "state", "result", "error", "start", "end", "worker"}
"""

from __future__ import annotations

import enum
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

from .constants import EVENT_KINDS, PROTOCOL_VERSION
from .errors import DecodeError, RemoteError, error_to_wire

__all__ = [
    "Event",
    "Intent",
    "deadline_header",
    "job_time",
    "launch_body",
    "new_job_id",
    "parse_launch",
    "parse_signal",
    "reply_error",
    "reply_pending",
    "reply_result",
    "result_from_reply",
]

#: Service names and job ids are single routing-key words: no dots, no wildcards.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_\-]{1,100}$")


class Intent(str, enum.Enum):
    """What an RPC or control message asks of a job."""

    STATUS = "status"
    PAUSE = "pause"
    RESUME = "resume"
    ABORT = "abort"
    SET = "set"
    INVOKE = "invoke"

    @classmethod
    def parse(cls, value: object) -> Intent:
        """Read an intent, accepting plumpy's names (``play`` = resume, ``kill`` = abort)."""
        if isinstance(value, str):
            value = _PLUMPY_ALIASES.get(value, value)
            try:
                return cls(value)
            except ValueError:
                pass
        known = ", ".join(sorted([i.value for i in cls] + list(_PLUMPY_ALIASES)))
        raise DecodeError(f"unknown intent {value!r}; expected one of: {known}")


_PLUMPY_ALIASES = {"play": "resume", "kill": "abort"}


def new_job_id() -> str:
    """A fresh job id: 32 hex digits, one routing-key word.

    The first 12 digits are the launch time in milliseconds (as in UUIDv7), the other 20
    are random: a reader of the records stream starts there instead of at the beginning.
    """
    return f"{int(time.time() * 1000):012x}{secrets.token_hex(10)}"


def job_time(job_id: str) -> float | None:
    """The launch time a brokerexec job id carries, or None (another id format)."""
    if len(job_id) != 32:
        return None
    try:
        stamp = int(job_id[:12], 16) / 1000
    except ValueError:
        return None
    # uuid4 hex also parses: accept only plausible times (2020 .. a day ahead).
    return stamp if 1.5e9 < stamp < time.time() + 86400 else None


def deadline_header(seconds: float) -> int:
    """The ``x-deadline-ms`` header value ``seconds`` from now: epoch milliseconds.

    An integer: pika cannot put floats in headers, and AMQP decimals are too narrow.
    """
    return int((time.time() + seconds) * 1000)


def check_name(kind: str, value: object) -> str:
    """Check a service name or job id is one routing-key word; return it."""
    if not isinstance(value, str) or not NAME_PATTERN.match(value):
        raise DecodeError(
            f"{kind} must be 1-100 letters, digits, '_' or '-'; got {value!r}"
        )
    return value


def launch_body(
    service: str, request: dict[str, Any], *, job_id: str | None = None,
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build the body of a launch message."""
    return {
        "v": PROTOCOL_VERSION,
        "job_id": check_name("job id", job_id or new_job_id()),
        "service": check_name("service name", service),
        "request": dict(request),
        "settings": dict(settings or {}),
        "sent": time.time(),
    }


def parse_launch(body: object) -> dict[str, Any]:
    """Check a decoded launch body; raise ``DecodeError`` naming what is wrong."""
    if not isinstance(body, dict):
        raise DecodeError(f"a launch must be a JSON object, got {type(body).__name__}")
    version = body.get("v", PROTOCOL_VERSION)
    if version != PROTOCOL_VERSION:
        raise DecodeError(f"unsupported protocol version {version!r} (this worker speaks 1)")
    check_name("job id", body.get("job_id"))
    check_name("service name", body.get("service"))
    for key in ("request", "settings"):
        if not isinstance(body.get(key, {}), dict):
            raise DecodeError(f"launch {key!r} must be a JSON object")
    return body


def parse_signal(body: object) -> tuple[Intent, dict[str, Any]]:
    """Check a decoded RPC/control body; return its intent and the body."""
    if not isinstance(body, dict):
        raise DecodeError(f"a signal must be a JSON object, got {type(body).__name__}")
    return Intent.parse(body.get("intent")), body


def reply_result(value: Any) -> dict[str, Any]:
    """The reply carrying a final value."""
    return {"result": value}


def reply_pending() -> dict[str, Any]:
    """The reply saying the final one follows (kiwipy/plumpy clients expect it)."""
    return {"pending": None}


def reply_error(exc: BaseException, traceback_text: str = "") -> dict[str, Any]:
    """The reply carrying an error; ``exception`` is what stock kiwipy clients read."""
    error = error_to_wire(exc, traceback_text)
    return {"exception": f"{error['type']}: {error['message']}", "error": error}


def result_from_reply(reply: object) -> Any:
    """The value of a final reply, or raise the ``RemoteError`` it carries."""
    if not isinstance(reply, dict):
        raise DecodeError(f"a reply must be a JSON object, got {type(reply).__name__}")
    if "result" in reply:
        return reply["result"]
    if "error" in reply:
        raise RemoteError.from_wire(reply["error"])
    if "exception" in reply:
        raise RemoteError("Exception", str(reply["exception"]))
    if "cancelled" in reply:
        raise RemoteError("Cancelled", str(reply.get("cancelled") or "cancelled"))
    raise DecodeError(f"reply has none of result/error/exception: {sorted(reply)}")


@dataclass(frozen=True)
class Event:
    """One job event, as published on the events exchange."""

    kind: str
    job_id: str
    service: str
    seq: int
    time: float
    data: dict[str, Any]

    def encode(self) -> dict[str, Any]:
        """The wire body."""
        return {
            "v": PROTOCOL_VERSION, "kind": self.kind, "job_id": self.job_id,
            "service": self.service, "seq": self.seq, "time": self.time, "data": self.data,
        }

    @classmethod
    def decode(cls, body: object) -> Event:
        """Read a wire body; raise ``DecodeError`` when it is not an event."""
        if not isinstance(body, dict):
            raise DecodeError("an event must be a JSON object")
        try:
            kind = body["kind"]
            if kind not in EVENT_KINDS:
                raise DecodeError(f"unknown event kind {kind!r}")
            return cls(
                kind=kind, job_id=str(body["job_id"]), service=str(body["service"]),
                seq=int(body.get("seq", 0)), time=float(body.get("time", 0.0)),
                data=dict(body.get("data") or {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DecodeError(f"malformed event: {exc}") from exc

    @property
    def routing_key(self) -> str:
        """``<kind>.<service>.<job id>``."""
        return f"{self.kind}.{self.service}.{self.job_id}"
