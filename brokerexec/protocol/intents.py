"""What a signal asks of a job, the one table that says how each intent behaves, and the
:class:`Signal` message itself (an RPC to one job).

Every other module asks :data:`INTENTS` instead of testing intent names: the handler
(answered at once, or queued until ``ready()``), the transports (may a call be sent again
when its connection broke; does a "pending" reply go out first), the worker (may it be
sent to every job at once), the kiwipy broadcast reader (which plumpy subject means it).
Adding an intent is a row here, a handler method, a client method and a CLI verb
(``docs/architecture.md``, *Where to change what*).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, NamedTuple

from ..codec import expect_object
from ..errors import DecodeError

__all__ = ["INTENTS", "Answered", "Intent", "IntentSpec", "Signal", "intent_for_subject"]


class Intent(str, enum.Enum):
    """What an RPC or control message asks of a job."""

    STATUS = "status"
    PAUSE = "pause"
    RESUME = "resume"
    ABORT = "abort"
    SET = "set"
    INVOKE = "invoke"
    CHECKPOINT = "checkpoint"

    @classmethod
    def parse(cls, value: object) -> Intent:
        """Read an intent, accepting plumpy's names (``play`` = resume, ``kill`` = abort)."""
        if isinstance(value, str):
            found = _BY_WIRE_NAME.get(value)
            if found is not None:
                return found
        raise DecodeError(f"unknown intent {value!r}; expected one of: {', '.join(sorted(_BY_WIRE_NAME))}")

    @property
    def spec(self) -> IntentSpec:
        """This intent's row of :data:`INTENTS`."""
        return INTENTS[self]


class Answered(str, enum.Enum):
    """When a job answers an intent."""

    AT_ONCE = "at once"  # on the handler thread, from the handler's own state
    AT_READY = "at ready()"  # queued; the computation thread applies it at its next ready()


class IntentSpec(NamedTuple):
    """How one intent behaves.

    Attributes:
        answered: on the handler thread at once, or at the computation's next ``ready()``.
        resendable: sending it twice does no harm, so a client may send it again when its
            connection broke before the answer came (a ``set`` or ``invoke`` may have been
            applied already: it is never sent again).
        pending_first: the worker replies ``{"pending": null}`` before the value, as plumpy's
            asyncio controller expects of everything but ``status``.
        to_every_job: it may be sent to every job at once (``pause_all`` and friends).
        plumpy_name: the name plumpy's controllers send for it, if another.
        broadcast_subject: the subject of the kiwipy broadcast that means it for every job
            (plumpy's ``pause_all`` / ``play_all`` / ``kill_all``), if any.
        read_only: answered at once and changes nothing: sent through the status exchange,
            the only intents a worker answers from there (``docs/security.md``, watcher).
    """

    answered: Answered
    resendable: bool
    pending_first: bool
    to_every_job: bool = False
    plumpy_name: str | None = None
    broadcast_subject: str | None = None
    read_only: bool = False


_AT_ONCE, _AT_READY = Answered.AT_ONCE, Answered.AT_READY

#: The table. ``tests/test_protocol.py`` checks every intent has a row, a handler and a verb.
INTENTS: Final[Mapping[Intent, IntentSpec]] = MappingProxyType({
    Intent.STATUS: IntentSpec(_AT_ONCE, resendable=True, pending_first=False, read_only=True),
    Intent.PAUSE: IntentSpec(_AT_ONCE, resendable=True, pending_first=True, to_every_job=True,
                             broadcast_subject="pause"),
    Intent.RESUME: IntentSpec(_AT_ONCE, resendable=True, pending_first=True, to_every_job=True,
                              plumpy_name="play", broadcast_subject="play"),
    Intent.ABORT: IntentSpec(_AT_ONCE, resendable=True, pending_first=True, to_every_job=True,
                             plumpy_name="kill", broadcast_subject="kill"),
    Intent.SET: IntentSpec(_AT_READY, resendable=False, pending_first=True),
    Intent.INVOKE: IntentSpec(_AT_READY, resendable=False, pending_first=True),
    # One checkpoint more than asked for does no harm: safe to send again.
    Intent.CHECKPOINT: IntentSpec(_AT_READY, resendable=True, pending_first=True),
})

_BY_WIRE_NAME: Final[dict[str, Intent]] = {
    **{intent.value: intent for intent in Intent},
    **{spec.plumpy_name: intent for intent, spec in INTENTS.items() if spec.plumpy_name},
}
_BY_SUBJECT: Final[dict[str, Intent]] = {
    spec.broadcast_subject: intent for intent, spec in INTENTS.items() if spec.broadcast_subject}


def intent_for_subject(subject: object) -> Intent | None:
    """The intent a kiwipy broadcast subject stands for (``pause``, ``play``, ``kill``), or None."""
    return _BY_SUBJECT.get(subject) if isinstance(subject, str) else None


_EMPTY: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True)
class Signal:
    """An RPC to one job: an intent and the keys that go with it (``docs/protocol.md``).

    ``set``: ``attrs``; ``invoke``: ``method``, ``args``, ``kwargs``; ``pause``/``abort``:
    an optional ``message``. The handler checks those keys; other keys are ignored.
    """

    intent: Intent
    fields: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)

    @classmethod
    def of(cls, intent: Intent, **fields: Any) -> Signal:
        return cls(intent, MappingProxyType(fields))

    def get(self, key: str, default: Any = None) -> Any:
        """One of the signal's keys."""
        return self.fields.get(key, default)

    def encode(self) -> dict[str, Any]:
        return {"intent": self.intent.value, **self.fields}

    def describe(self) -> str:
        """For messages: the intent, and the method of an ``invoke``."""
        method = self.fields.get("method")
        return f"{self.intent.value!r} of {method!r}" if method is not None else repr(self.intent.value)

    @classmethod
    def decode(cls, body: object) -> Signal:
        body = expect_object(body, "a signal")
        intent = Intent.parse(body.get("intent"))
        return cls(intent, MappingProxyType({k: v for k, v in body.items() if k != "intent"}))
