"""History queries over the broker: the question, the page that answers it, and the call.

A client asks whichever history indexer consumes the queue ``brokerexec.history`` (several may:
any one answers) with one request and direct reply-to, so it needs only the broker's URL;
none consuming is :class:`~brokerexec.errors.HistoryUnavailable` at once (the request comes
back unroutable: the queue goes with its last indexer). The request goes through the exchange
``brokerexec.history``, to which the indexers bind their queue and nothing else is bound, so
that a user without write on the default exchange (a watcher) may ask too. That exchange
missing (no worker or indexer of this version ever ran on the broker), or the queue not bound
to it (only older indexers run), is the same as no indexer: the request comes back, at once.
Sans-I/O, like :mod:`.calls`.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from .. import codec
from ..errors import DecodeError, HistoryUnavailable, Timeout
from .calls import read_reply
from .commands import Call, Message, Request, Routed
from .names import DIRECT_REPLY_TO, HISTORY_EXCHANGE, HISTORY_QUEUE

__all__ = ["LOOKUP_TIMEOUT", "HistoryPage", "HistoryQuery", "ask", "decode_cursor", "encode_cursor",
           "stored_record"]

#: How long a status or result waits for the history store before it reads the journal
#: instead (seconds): a store that is down or slow never holds them up for longer.
LOOKUP_TIMEOUT = 1.0
#: The most rows one page holds.
MAX_LIMIT = 1000
_TEXT = ("service", "state", "worker", "operation", "text", "cursor", "job_id", "name")
_TIMES = ("since", "until")
#: The filters of jobs only (not of operations).
_JOBS_ONLY = ("state", "worker", "operation", "text", "count", "job_id", "record", "by_state")


@dataclass(frozen=True)
class HistoryQuery:
    """Which jobs: every filter is optional and they all apply; ``job_id`` asks for one."""

    service: str | None = None
    state: str | None = None
    since: float | None = None  # epoch seconds: moved at or after
    until: float | None = None  # and before
    worker: str | None = None
    operation: str | None = None
    text: str | None = None  # in the id, request, result or error
    limit: int = 50
    cursor: str | None = None  # the page after the one that gave it
    count: bool = False  # also count every match
    job_id: str | None = None
    record: bool = False  # with job_id: its whole final record too, under "record"
    by_state: bool = False  # with operation: its jobs counted by state too, under "states"
    #: Operations, not jobs: their headers, newest first (filters: since, until, service,
    #: name, limit, cursor), under "operations".
    operations: bool = False
    name: str | None = None  # with operations: those of this name

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raises:
            DecodeError: a filter of the wrong type, or a limit out of 1..1000."""
        for name in _TEXT:
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or len(value) > 1000):
                raise DecodeError(f"history filter {name!r} must be text (at most 1000 characters), "
                                  f"not {value!r}")
        for name in _TIMES:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise DecodeError(f"history filter {name!r} must be a time (epoch seconds), not {value!r}")
        limit = self.limit
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
            raise DecodeError(f"history limit must be 1 to {MAX_LIMIT}, not {self.limit!r}")
        for name in ("count", "record", "by_state", "operations"):
            if not isinstance(getattr(self, name), bool):
                raise DecodeError(f"history {name} must be true or false, not {getattr(self, name)!r}")
        if self.cursor is not None:
            decode_cursor(self.cursor)
        self._check_together()

    def _check_together(self) -> None:
        """The filters that go only with others."""
        if self.record and self.job_id is None:
            raise DecodeError("a history query asks for a record only with a job_id")
        if self.by_state and self.operation is None:
            raise DecodeError("a history query counts by state only an operation's jobs: give its operation")
        if self.name is not None and not self.operations:
            raise DecodeError("a history query filters by name only operations: ask for operations")
        if self.operations and any(getattr(self, name) not in (None, False) for name in _JOBS_ONLY):
            raise DecodeError(f"a history query of operations filters by since, until, service and name "
                              f"only, not by {', '.join(n for n in _JOBS_ONLY if getattr(self, n))}")

    def encode(self) -> dict[str, Any]:
        return {"intent": "history", **{k: v for k, v in asdict(self).items() if v not in (None, False)}}

    @classmethod
    def decode(cls, body: dict[str, Any]) -> HistoryQuery:
        if body.get("intent") != "history":
            raise DecodeError(f"not a history query: intent {body.get('intent')!r}")
        known = {k: v for k, v in body.items() if k != "intent"}
        unknown = set(known) - set(cls.__dataclass_fields__)
        if unknown:
            raise DecodeError(f"unknown history filter(s): {', '.join(sorted(unknown))}")
        return cls(**known)

    def filters(self) -> dict[str, Any]:
        """The store's keyword arguments for a page."""
        return {name: getattr(self, name) for name in ("service", "state", "since", "until", "worker",
                                                        "operation", "text", "limit", "cursor", "count")}


def encode_cursor(at: float, job_id: str) -> str:
    """The cursor of the page after a row (keyset paging: when it last moved, and its id)."""
    return base64.urlsafe_b64encode(json.dumps([at, job_id]).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str]:
    """Raises:
        DecodeError: not a cursor a page gave."""
    try:
        at, job_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if isinstance(at, bool) or not isinstance(at, (int, float)) or not isinstance(job_id, str):
            raise ValueError(cursor)
    except (ValueError, TypeError, binascii.Error) as exc:
        raise DecodeError(f"not a history cursor: {cursor!r} (give the cursor a page ended with)") from exc
    return float(at), job_id


@dataclass(frozen=True)
class HistoryPage:
    """A page of jobs, newest first: each a row of the history store (``docs/history.md``);
    ``cursor`` gives the next page (None: no more); ``total`` every match, when counted;
    ``states`` an operation's jobs by state, when asked (``by_state``); ``operations`` the
    headers of operations, when asked for them (``rows`` is then empty)."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    cursor: str | None = None
    total: int | None = None
    states: dict[str, int] | None = None
    operations: list[dict[str, Any]] | None = None

    def encode(self) -> dict[str, Any]:
        body: dict[str, Any] = {"rows": self.rows, "cursor": self.cursor, "total": self.total}
        if self.states is not None:
            body["states"] = self.states
        if self.operations is not None:
            body["operations"] = self.operations
        return body

    @classmethod
    def decode(cls, body: Any) -> HistoryPage:
        if not isinstance(body, dict) or not isinstance(body.get("rows"), list):
            raise DecodeError(f"not a history page: {str(body)[:200]}")
        cursor, total, states = body.get("cursor"), body.get("total"), body.get("states")
        if isinstance(states, dict):
            states = {state: n for state, n in states.items() if type(n) is int}  # not a bool
        operations = body.get("operations")
        return cls([row for row in body["rows"] if isinstance(row, dict)],
                   cursor if isinstance(cursor, str) else None, total if isinstance(total, int) else None,
                   states if isinstance(states, dict) else None,
                   [header for header in operations if isinstance(header, dict)]
                   if isinstance(operations, list) else None)


def ask(query: HistoryQuery, *, timeout: float, max_bytes: int) -> Call[HistoryPage]:
    """Ask the history indexers.

    Raises:
        HistoryUnavailable: none runs on this broker (or only indexers older than the
            exchange ``brokerexec.history``).
        Timeout: none answered within ``timeout`` s.
        DecodeError: the indexer refused the query (a bad filter or cursor).
    """
    message = Message(HISTORY_EXCHANGE, HISTORY_QUEUE, codec.encode(query.encode()),
                      correlation_id=uuid.uuid4().hex, reply_to=DIRECT_REPLY_TO)
    incoming = yield Request(message, timeout)
    if incoming in (Routed.RETURNED, Routed.NO_EXCHANGE):
        raise HistoryUnavailable("no history indexer runs on this broker (or only older ones, deaf to "
                                 "brokerexec.history): start `brokerexec history` (docs/history.md)")
    if incoming is None:
        raise Timeout(f"no history indexer answered within {timeout} s")
    assert not isinstance(incoming, Routed)
    return HistoryPage.decode(read_reply(incoming, max_bytes).outcome())


def stored_record(job_id: str, *, timeout: float, max_bytes: int) -> Call[dict[str, Any] | None]:
    """The final record of an ended job as the history store keeps it, or None: no indexer
    runs, none answered within ``timeout`` s (at most :data:`LOOKUP_TIMEOUT`), the store
    cannot answer, or it has no record of the job (running, unknown, or pruned). Never
    raises: the journal is the fallback."""
    query = HistoryQuery(job_id=job_id, record=True)
    try:
        page = yield from ask(query, timeout=min(timeout, LOOKUP_TIMEOUT), max_bytes=max_bytes)
    except (HistoryUnavailable, Timeout, DecodeError):
        return None
    for row in page.rows:
        record = row.get("record")
        if isinstance(record, dict) and record.get("job_id") == job_id:
            return record
    return None
