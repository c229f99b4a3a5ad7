"""Replies to RPCs: kiwipy's reply objects, with a structured error beside kiwipy's text.

::

    {"pending": null, "attempt": 2}            the final reply follows (from attempt 2)
    {"result": <value>}                        done
    {"exception": "<type>: <message>", "error": {"type", "message", "traceback"}}

Stock kiwipy clients read ``exception``; brokerexec reads ``error`` and raises it typed
(:func:`~brokerexec.errors.error_from_wire`).
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from typing import Any

from ..codec import expect_object
from ..errors import BrokerExecError, DecodeError, RemoteError, error_from_wire, error_to_wire

__all__ = ["Reply"]


@dataclass(frozen=True)
class Reply:
    """One reply: pending, a result, or an error."""

    pending: bool = False
    value: Any = None
    error: dict[str, str] | None = None
    #: Of a pending reply: the job's execution that holds the signal (None: not said). If
    #: the job's attempt has changed when the final reply is due, it will never come.
    attempt: int | None = None

    @classmethod
    def pending_in(cls, attempt: int | None) -> Reply:
        """The pending reply of a job's execution ``attempt``."""
        return PENDING if attempt is None else cls(pending=True, attempt=attempt)

    @classmethod
    def result(cls, value: Any) -> Reply:
        return cls(value=value)

    @classmethod
    def failure(cls, exc: BaseException) -> Reply:
        """The reply for ``exc``; with its traceback unless it is one of brokerexec's refusals."""
        text = ""
        if exc.__traceback__ is not None and not isinstance(exc, BrokerExecError):
            text = "".join(traceback.format_exception(exc))
        return cls(error=error_to_wire(exc, text))

    def encode(self) -> dict[str, Any]:
        if self.pending:
            return {"pending": None} if self.attempt is None else {"pending": None,
                                                                   "attempt": self.attempt}
        if self.error is not None:
            return {"exception": f"{self.error['type']}: {self.error['message']}", "error": self.error}
        return {"result": self.value}

    @classmethod
    def decode(cls, body: object) -> Reply:
        reply = expect_object(body, "a reply")
        if "pending" in reply:
            attempt = reply.get("attempt")
            return Reply.pending_in(attempt if isinstance(attempt, int) and attempt > 0 else None)
        if "result" in reply:
            return cls(value=reply["result"])
        if isinstance(reply.get("error"), dict):
            return cls(error=reply["error"])
        if "exception" in reply:  # a stock kiwipy server: text only
            return cls(error={"type": "Exception", "message": str(reply["exception"]), "traceback": ""})
        if "cancelled" in reply:
            return cls(error={"type": "Cancelled", "message": str(reply.get("cancelled") or "cancelled"),
                              "traceback": ""})
        raise DecodeError(f"a reply has none of result/error/exception/pending: {sorted(reply)}")

    def outcome(self) -> Any:
        """The value of a final reply, or raise the (typed) error it carries."""
        if self.error is not None:
            raise self.remote_error()
        return self.value

    def remote_error(self) -> RemoteError:
        """The exception this reply's error stands for."""
        return error_from_wire(self.error)


#: The one pending reply.
PENDING = Reply(pending=True)
