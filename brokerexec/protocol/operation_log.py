"""An operation in the journal: its header entry, and what a reader finds of it again.

The client that starts an operation (``client.operation()``) writes one **header** entry to
the journal stream of the operation's id (type ``brokerexec.operation``, ``message_id`` the
id): its name, service, failure policy and, when it could count them first, how many
requests it has. Everything else is in the journal already: its items in the ``launches``
(and ``launch``) entries of their jobs, which carry the operation's id, each item's key and
request; their runs in the jobs' ``started`` entries; their ends in the jobs' records.

An operation's id is made as a job id is (:func:`~.names.new_job_id`): it starts with the
time it was made, so :class:`OperationScan` reads every stream from then to its end, and
gathers the operation again (:class:`FoundOperation`): any client, also after the one that
launched it was killed, reattaches by id. :class:`OperationsScan` lists the headers written
since a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .. import codec
from ..constants import MAX_ENTRY_BYTES
from ..errors import DecodeError, Timeout
from .commands import Call, Incoming, Message, Publish, ReadJournal
from .journal import EveryStream, launches_in
from .names import (
    LAUNCH_TYPE,
    LAUNCHES_EXCHANGE,
    LAUNCHES_TYPE,
    OPERATION_TYPE,
    RECORD_TYPE,
    STARTED_TYPE,
    check_name,
    journal_stream,
)

__all__ = ["FoundItem", "FoundOperation", "OperationHeader", "OperationScan", "OperationsScan",
           "find", "find_all", "header_message", "note", "time_of_id"]

#: How long a read of every stream may take at most (seconds) by default.
READ_LIMIT = 60.0


def time_of_id(operation_id: str) -> float | None:
    """When an id of :func:`~.names.new_job_id` was made (epoch seconds); None if it is not one."""
    try:
        seconds = int(operation_id[:12], 16) / 1000
    except ValueError:
        return None
    return seconds if len(operation_id) == 32 and 1.5e9 < seconds < 1e11 else None


@dataclass(frozen=True)
class OperationHeader:
    """What an operation is, as its header entry says."""

    id: str
    service: str
    name: str
    created: float
    policy: Mapping[str, Any] = field(default_factory=dict)  # on_error, max_failures
    max_in_flight: int | None = None
    expected: int | None = None  # its requests, when they could be counted first
    #: Its jobs' handler intervals (a launch's ``settings``: ``progress_delta``, ...).
    settings: Mapping[str, Any] = field(default_factory=dict)

    def encode(self) -> dict[str, Any]:
        body = {"v": 1, "operation": self.id, "service": self.service, "name": self.name,
                "created": self.created, "policy": dict(self.policy),
                "max_in_flight": self.max_in_flight, "expected": self.expected}
        if self.settings:  # only then: as a header was before it had them
            body["settings"] = dict(self.settings)
        return body

    @classmethod
    def decode(cls, body: Mapping[str, Any]) -> OperationHeader:
        """Raises: DecodeError: not a header :meth:`encode` wrote."""
        try:
            policy = body.get("policy") or {}
            created = body["created"]
            if not isinstance(policy, dict) or not isinstance(created, int | float):
                raise TypeError("policy or created")
            expected, in_flight = body.get("expected"), body.get("max_in_flight")
            settings = body.get("settings") or {}
            return cls(check_name("operation id", body["operation"]),
                       check_name("service name", body["service"]), str(body.get("name") or ""),
                       float(created), policy,
                       in_flight if isinstance(in_flight, int) else None,
                       expected if isinstance(expected, int) else None,
                       settings if isinstance(settings, dict) else {})
        except (KeyError, TypeError) as exc:
            raise DecodeError(f"not an operation's header ({exc}): {dict(body)!r:.200}") from None


def header_message(header: OperationHeader) -> Message:
    """The header entry, published through the launches exchange to the id's stream."""
    return Message(LAUNCHES_EXCHANGE, journal_stream(header.id), codec.encode(header.encode()),
                   persistent=True, message_id=header.id, type=OPERATION_TYPE)


@dataclass
class FoundItem:
    """An item as the journal has it: its newest job (of ``runs`` launched for it)."""

    key: str
    job_id: str
    request: dict[str, Any] | None
    sent: float
    runs: int = 1
    #: Where its first launch was: when (its launches entry's time), and its place there.
    first: tuple[float, int] = (0.0, 0)


@dataclass
class FoundOperation:
    """An operation as the journal has it: its header (None if it has none: an older client,
    or an id that names no operation), its items in the order they were launched, and of
    their jobs the ``started`` entries (the newest attempt's) and the records."""

    header: OperationHeader | None = None
    service: str | None = None  # as its launches say
    items: dict[str, FoundItem] = field(default_factory=dict)
    started: dict[str, dict[str, Any]] = field(default_factory=dict)
    records: dict[str, dict[str, Any]] = field(default_factory=dict)

    def launched(self, key: str, job_id: str, request: dict[str, Any] | None, sent: float,
                 place: int = 0) -> None:
        """An item's job was launched (``place``: its place among the launches sent at
        ``sent``): it is the item's newest if launched last."""
        item = self.items.get(key)
        if item is None:
            self.items[key] = FoundItem(key, job_id, request, sent, first=(sent, place))
        elif item.job_id != job_id:
            newer = sent >= item.sent
            self.items[key] = FoundItem(key, job_id if newer else item.job_id,
                                        request if request is not None else item.request,
                                        max(sent, item.sent), item.runs + 1, min(item.first, (sent, place)))

    def ordered(self) -> list[FoundItem]:
        """The items in the order their first job was launched, which is the order of the
        requests (a re-run keeps its place): the streams are read side by side, so the order
        they were found in is not."""
        return sorted(self.items.values(), key=lambda item: item.first)


def _body(message: Incoming) -> dict[str, Any] | None:
    try:
        body, _ = codec.decode_object(message.body, message.content_type, max_bytes=MAX_ENTRY_BYTES)
    except DecodeError:
        return None  # one bad entry hides nothing else
    return body


class OperationScan(EveryStream):
    """Every stream from when the operation was made to its end (a probe), gathering it
    (:class:`FoundOperation`: :attr:`found`)."""

    def __init__(self, operation_id: str) -> None:
        super().__init__(time_of_id(operation_id))
        self.operation_id = operation_id
        self.found = FoundOperation()
        self._jobs: dict[str, str] = {}  # job id -> key, of every job launched for an item

    def take(self, message: Incoming) -> None:
        job_id = message.message_id or ""
        wanted = {OPERATION_TYPE: job_id == self.operation_id, LAUNCHES_TYPE: True, LAUNCH_TYPE: True,
                  STARTED_TYPE: job_id in self._jobs, RECORD_TYPE: job_id in self._jobs}
        if not wanted.get(message.type or ""):
            return
        body = _body(message)
        if body is not None:
            self._gather(message.type or "", job_id, body)

    def _gather(self, kind: str, job_id: str, body: dict[str, Any]) -> None:
        if kind == OPERATION_TYPE:
            if self.found.header is None:
                with contextlib.suppress(DecodeError):
                    self.found.header = OperationHeader.decode(body)
        elif kind in (LAUNCHES_TYPE, LAUNCH_TYPE):
            if body.get("operation") != self.operation_id:
                return
            launches = (launches_in(body) if kind == LAUNCHES_TYPE
                        else [(str(body.get("job_id") or job_id), body)])
            for place, (listed, launch) in enumerate(launches):
                self._launched(listed, launch, place)
            if isinstance(body.get("service"), str):
                self.found.service = self.found.service or body["service"]
        elif kind == STARTED_TYPE:
            self.found.started[job_id] = body  # the newest attempt's comes last
        else:
            self.found.records.setdefault(job_id, body)  # the first record counts

    def _launched(self, job_id: str, launch: Mapping[str, Any], place: int) -> None:
        key = launch.get("key")
        if not isinstance(key, str) or not job_id:
            return
        request = launch.get("request")
        sent = launch.get("sent")
        self._jobs[job_id] = key
        self.found.launched(key, job_id, request if isinstance(request, dict) else None,
                            float(sent) if isinstance(sent, int | float) else 0.0, place)


class OperationsScan(EveryStream):
    """The headers of the operations made since ``since`` (epoch seconds), newest first, at
    most ``limit``: :attr:`headers`."""

    def __init__(self, since: float, limit: int) -> None:
        super().__init__(since)
        self.limit = limit
        self._after = since
        self._found: dict[str, OperationHeader] = {}

    def take(self, message: Incoming) -> None:
        if message.type != OPERATION_TYPE:
            return
        body = _body(message)
        if body is None:
            return
        with contextlib.suppress(DecodeError):
            header = OperationHeader.decode(body)
            if header.created >= self._after:
                self._found.setdefault(header.id, header)

    @property
    def headers(self) -> list[OperationHeader]:
        return sorted(self._found.values(), key=lambda header: header.created, reverse=True)[:self.limit]


# ---- the calls (sans-I/O, as ``calls.py``'s) --------------------------------------------------


def note(header: OperationHeader) -> Call[None]:
    """Write the operation's header entry (confirmed)."""
    yield Publish([header_message(header)])


def find(operation_id: str, seconds: float = READ_LIMIT) -> Call[FoundOperation]:
    """The operation as the journal has it (an empty one if it has nothing of that id).

    Raises:
        Timeout: the streams were not read to their ends within ``seconds``.
    """
    scan = yield ReadJournal(OperationScan(operation_id), seconds)
    assert isinstance(scan, OperationScan)
    if not scan.done:
        raise Timeout(f"the journal was not read to its end within {seconds} s")
    return scan.found


def find_all(since: float, limit: int, seconds: float = READ_LIMIT) -> Call[list[OperationHeader]]:
    """The headers of the operations made since ``since``, newest first.

    Raises:
        Timeout: the streams were not read to their ends within ``seconds``.
    """
    scan = yield ReadJournal(OperationsScan(since, limit), seconds)
    assert isinstance(scan, OperationsScan)
    if not scan.done:
        raise Timeout(f"the journal was not read to its end within {seconds} s")
    return scan.headers
