"""The journal: every job's life in the broker, from its launch to its final record.

Each job's entries go to one of the journal streams, chosen by its id
(:func:`~.names.journal_stream`), with ``message_id`` = the job id, the kind as the AMQP
``type`` and the attempt in the ``x-attempt`` header:

==============  ======================================  =================================
type            body                                    written by
==============  ======================================  =================================
``launch``      the :class:`~.messages.Launch`           the client: the launch itself,
                                                        routed here by its ``CC`` key
``launches``    ``{service, sent, jobs: [job id, …]}``  the client, for the launches of one
                (``message_id``: none of the jobs)      ``launch_many()`` in this stream
``started``     ``{job_id, service, attempt, worker,    the worker, when it claims the job
                time}``                                 (a job that ends sooner has none)
``checkpoint``  ``{job_id, service, attempt, time,      the worker, each checkpoint
                state, settable, covers}``
``record``      the :class:`~.messages.Record`           the worker at the end (or the client
                                                        that cancels a queued job)
==============  ======================================  =================================

:class:`JobHistory` folds one job's entries into what is known of it; newer attempts fence
older ones: an entry of an attempt older than the newest one started is ignored.
:class:`JournalSearch` reads one job's entries and :class:`JournalScan` the records of
every job that ended lately: sans-I/O readers, like the calls of :mod:`.calls`, that a
transport feeds (:class:`~.commands.ReadJournal`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Final

from .. import codec
from ..constants import MAX_ENTRY_BYTES
from ..errors import DecodeError
from .commands import Incoming, Message
from .messages import Launch
from .names import (
    CHECKPOINT_TYPE,
    JOURNAL_BUCKETS,
    LAUNCH_TYPE,
    LAUNCHES_ENTRY_BYTES,
    LAUNCHES_PER_ENTRY,
    LAUNCHES_TYPE,
    PROBE_TYPE,
    PROBES_EXCHANGE,
    RECORD_TIME_MARGIN,
    RECORD_TYPE,
    STARTED_TYPE,
    job_time,
    journal_stream,
    journal_stream_of_bucket,
)

__all__ = [
    "ENTRY_TYPES",
    "STREAM_OFFSET_HEADER",
    "BackSearch",
    "Entry",
    "EveryStream",
    "JobHistory",
    "JournalScan",
    "JournalSearch",
    "JournalWindow",
    "attempt_of",
    "checkpoint_entry",
    "entry_of",
    "is_entry",
    "launch_in",
    "launches_entry",
    "launches_entry_of",
    "launches_in",
    "launches_parts",
    "offset_since",
    "probe_message",
    "started_entry",
]

log = logging.getLogger(__name__)

#: The header in which RabbitMQ gives a stream consumer each message's offset.
STREAM_OFFSET_HEADER: Final = "x-stream-offset"

#: The kinds of journal entry a reader takes in; anything else in the stream is skipped.
ENTRY_TYPES: Final = frozenset({LAUNCH_TYPE, LAUNCHES_TYPE, STARTED_TYPE, CHECKPOINT_TYPE, RECORD_TYPE})


def launches_entry(service: str, sent: float, job_ids: list[str],
                   requests: list[dict[str, Any]] | None = None, *, operation: str | None = None,
                   keys: list[str | None] | None = None) -> dict[str, Any]:
    """The body of a ``launches`` entry: what the journal needs of each launch until its job
    starts (that it was launched, of which service, when, with which request: ``requests``
    in the order of ``job_ids``; of which operation, as which item: ``keys``), for many jobs
    in one entry rather than one per job (each entry costs the broker a stream write)."""
    body: dict[str, Any] = {"v": 1, "service": service, "sent": sent, "jobs": job_ids}
    if requests is not None:
        body["requests"] = requests
    if operation is not None:
        body["operation"] = operation
        body["keys"] = keys if keys is not None else [None] * len(job_ids)
    return body


def launches_entry_of(part: Sequence[Launch]) -> dict[str, Any]:
    """The ``launches`` entry of launches of one service and operation (``launches_parts``)."""
    return launches_entry(part[0].service, min(launch.sent for launch in part),
                          [launch.job_id for launch in part], [launch.request for launch in part],
                          operation=part[0].operation, keys=[launch.key for launch in part])


def launches_parts(launches: Sequence[Launch], sizes: Sequence[int]) -> Iterator[list[Launch]]:
    """``launches`` (of one service, for one stream) in the parts a ``launches`` entry holds:
    at most :data:`LAUNCHES_PER_ENTRY`, and about :data:`LAUNCHES_ENTRY_BYTES` of launches
    (``sizes``: each one's encoded size), one at least."""
    part: list[Launch] = []
    size = 0
    for launch, bytes_ in zip(launches, sizes, strict=True):
        if part and (len(part) == LAUNCHES_PER_ENTRY or size + bytes_ > LAUNCHES_ENTRY_BYTES):
            yield part
            part, size = [], 0
        part.append(launch)
        size += bytes_
    if part:
        yield part


def launches_in(body: Mapping[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Each job a ``launches`` entry lists, with its own ``launch`` entry as the sweep's says
    it (the request too, if the entry has the requests: older clients' entries do not)."""
    jobs = body.get("jobs")
    if not isinstance(jobs, list):
        return
    requests, keys = _listed(body, "requests", len(jobs)), _listed(body, "keys", len(jobs))
    for job_id, request, key in zip(jobs, requests, keys, strict=True):
        if isinstance(job_id, str):
            yield job_id, _launch_in(body, job_id, request, key)


def launch_in(body: Mapping[str, Any], job_id: str) -> dict[str, Any] | None:
    """The ``launch`` entry of ``job_id`` as a ``launches`` entry says it; None if it does
    not list the job."""
    return next((launch for listed, launch in launches_in(body) if listed == job_id), None)


def _listed(body: Mapping[str, Any], name: str, count: int) -> list[Any]:
    """A list of a ``launches`` entry, one value a job (Nones if it has none, or not so many)."""
    values = body.get(name)
    return values if isinstance(values, list) and len(values) == count else [None] * count


def _launch_in(body: Mapping[str, Any], job_id: str, request: Any, key: Any) -> dict[str, Any]:
    entry = {"v": 1, "job_id": job_id, "service": body.get("service"), "sent": body.get("sent")}
    if isinstance(request, dict):
        entry["request"] = request
    if isinstance(body.get("operation"), str):
        entry["operation"] = body["operation"]
        entry["key"] = key if isinstance(key, str) else None
    return entry


def started_entry(job_id: str, service: str, attempt: int, worker: dict[str, Any],
                  time: float) -> dict[str, Any]:
    """The body of a ``started`` entry."""
    return {"v": 1, "job_id": job_id, "service": service, "attempt": attempt, "worker": worker,
            "time": time}


def checkpoint_entry(job_id: str, service: str, attempt: int, time: float, state: Any, *,
                     settable: dict[str, Any] | None = None, covers: int = 0) -> dict[str, Any]:
    """The body of a ``checkpoint`` entry: the service's ``state``, the values of its declared
    settable attributes (set again after ``restore()``), and the newest acknowledged change
    it ``covers`` (``brokerexec.core.change_log``)."""
    return {"v": 1, "job_id": job_id, "service": service, "attempt": attempt, "time": time,
            "state": state, "settable": settable or {}, "covers": covers}


def attempt_of(body: dict[str, Any]) -> int:
    """The attempt an entry names (1 when it names none, or nonsense)."""
    attempt = body.get("attempt", 1)
    return attempt if isinstance(attempt, int) and not isinstance(attempt, bool) and attempt > 0 else 1


@dataclass
class JobHistory:
    """What the journal says of one job (see the module docstring)."""

    job_id: str
    launch: dict[str, Any] | None = None
    started: dict[str, Any] | None = None  # the newest attempt's
    checkpoint: dict[str, Any] | None = None  # the newest, of the newest attempt that has one
    record: dict[str, Any] | None = None
    attempt: int = 0  # the newest attempt started (0: none seen)
    entries: int = field(default=0, repr=False)

    def add(self, kind: str, body: dict[str, Any]) -> None:
        """Take in one entry of this job, in stream order (one that names another job in its
        body is ignored: nobody can make a job resume from another job's checkpoint)."""
        named = body.get("job_id")
        if named is not None and named != self.job_id:
            return
        self.entries += 1
        attempt = attempt_of(body)
        if kind == LAUNCH_TYPE:
            self.launch = self.launch or body
        elif kind == STARTED_TYPE and attempt >= self.attempt:
            self.attempt, self.started = attempt, body
            if self.record is not None and attempt_of(self.record) < attempt:
                self.record = None  # an older attempt's record, fenced off
        elif kind == CHECKPOINT_TYPE and attempt >= self.attempt:
            if self.checkpoint is None or attempt >= attempt_of(self.checkpoint):
                self.checkpoint = body
        elif kind == RECORD_TYPE and attempt >= self.attempt and self.record is None:
            self.record = body  # the first record of the newest attempt: delivered once

    @property
    def known(self) -> bool:
        """True if the journal has anything of the job (it was launched)."""
        return self.entries > 0

    def status(self) -> dict[str, Any] | None:
        """The job's status as the journal tells it, or None if it knows nothing of it.

        ``queued``: launched, not taken yet; ``resuming``: started, no record, and (the
        caller found) no worker answering for it; else the record's state.
        """
        if self.record is not None:
            return {"state": self.record.get("state"), "paused": False, "record": self.record,
                    "attempt": attempt_of(self.record)}
        service = (self.started or self.launch or {}).get("service")
        if self.started is not None:
            return {"state": "resuming", "paused": False, "service": service, "attempt": self.attempt,
                    "since": self.started.get("time"), "worker": self.started.get("worker")}
        if self.launch is not None:
            return {"state": "queued", "paused": False, "service": service, "attempt": 0,
                    "since": self.launch.get("sent")}
        return None


def offset_since(start: float | None) -> datetime | str:
    """Where a reader of entries written since ``start`` (epoch seconds) starts in a stream:
    a little before it (the clocks of hosts differ), or at the first entry for no time."""
    if start is None or start < 1.5e9:  # not a time this century: read it all
        return "first"
    return datetime.fromtimestamp(start - RECORD_TIME_MARGIN, tz=timezone.utc)


def _probe_id() -> str:
    return f"probe-{os.urandom(12).hex()}"


def probe_message(stream: str, probe_id: str) -> Message:
    """The probe a reader appends to ``stream``: a stream has no end marker over AMQP 0-9-1,
    and everything stored before the probe comes before it. Through the probes exchange,
    whose messages no reader takes for an entry (:func:`is_entry`)."""
    return Message(PROBES_EXCHANGE, stream, b"{}", message_id=probe_id, type=PROBE_TYPE)


def is_entry(message: Incoming) -> bool:
    """True if ``message`` may be a journal entry: of an entry's type, and not published to
    the probes exchange, which anyone allowed to probe (a watcher) may write to. The
    exchange is the one the broker stored with the message, not a header its sender chose."""
    return message.type in ENTRY_TYPES and message.exchange != PROBES_EXCHANGE


class JournalSearch:
    """Read job ``job_id``'s entries from its journal stream into :attr:`history`.

    Over at the job's record: what ended since is never read, so a look-up of an ended job
    costs the same whatever the history holds. Without a record, over at the probe, unless
    ``wait``: then at the probe only if the journal knows nothing of the job
    (:attr:`not_found`: never launched, or its history expired). ``since`` starts later than
    the launch (epoch seconds: where a lease says its attempt started or its last checkpoint
    is).
    """

    #: Small: what the broker pushes past the record is read (and parsed) before the end.
    PREFETCH = 200

    def __init__(self, job_id: str, *, wait: bool, since: float | None = None,
                 offset: int | None = None, history: JobHistory | None = None) -> None:
        self.job_id = job_id
        self.stream = journal_stream(job_id)
        self.streams: tuple[str, ...] = (self.stream,)
        self.history = history or JobHistory(job_id)
        self._from = offset
        self.done = False
        self.probe_seen = False
        self._wait = wait
        self._start = since if since is not None else job_time(job_id)
        self._id_bytes = job_id.encode()
        self.probes = {self.stream: _probe_id()}

    @property
    def offset(self) -> datetime | str | int:
        """The ``offset`` given (where an earlier read ended), else ``since``, or the job's
        launch time (from its id), less a margin for clock skew; from the first entry for
        ids that carry no time."""
        return self._from if self._from is not None else offset_since(self._start)

    def feed(self, stream: str, message: Incoming) -> bool:
        """Look at one message of the stream; True once the search is over.

        Raises:
            DecodeError: an entry of this job that cannot be decoded.
        """
        if self.done:
            return True
        if self._from is not None and message.offset is not None and message.offset < self._from:
            return False  # the broker starts at the chunk that holds the offset: read already
        if message.message_id == self.job_id and message.type is not None and is_entry(message):
            entry, _ = codec.decode_object(message.body, message.content_type, max_bytes=MAX_ENTRY_BYTES)
            if message.type == LAUNCH_TYPE and self.history.launch is None:
                self.launch_reply_to = message.reply_to
            self.history.add(message.type, entry)
            if self.history.record is not None:
                self.done = True  # nothing after a record changes how the job ended
        elif (message.type == LAUNCHES_TYPE and self._id_bytes in message.body
              and is_entry(message) and self.history.launch is None):
            self._add_launches(message)
        elif message.message_id == self.probes[self.stream]:
            self.probe_seen = True
            if not self._wait or not self.history.known:
                self.done = True
        return self.done

    def _add_launches(self, message: Incoming) -> None:
        # Only a sweep's entries that hold the id's bytes are decoded (the test above).
        body, _ = codec.decode_object(message.body, message.content_type, max_bytes=MAX_ENTRY_BYTES)
        launch = launch_in(body, self.job_id)
        if launch is not None:
            self.launch_reply_to = message.reply_to
            self.history.add(LAUNCH_TYPE, launch)

    def missing(self, stream: str) -> bool:
        self.probe_seen = self.done = True
        return True

    #: The launching client's queue, from the launch entry (where its record is pushed).
    launch_reply_to: str | None = None

    @property
    def record(self) -> dict[str, Any] | None:
        return self.history.record

    @property
    def not_found(self) -> bool:
        """Read to the probe, and nothing of the job was there."""
        return self.probe_seen and not self.history.known


class EveryStream:
    """What a reader of every journal stream from a time to its end needs (a
    :class:`~.commands.JournalReader`): the streams, a probe for each, where to start, and
    when it is done. A subclass takes each entry in :meth:`take`, never a probe nor what was
    published to the probes exchange (anyone allowed to probe may write there)."""

    PREFETCH = 200

    def __init__(self, since: float | None) -> None:
        self.streams = tuple(journal_stream_of_bucket(b) for b in range(JOURNAL_BUCKETS))
        self.probes = {stream: _probe_id() for stream in self.streams}
        self.done = False
        self._since = since
        self._open = set(self.streams)

    @property
    def offset(self) -> datetime | str:
        return offset_since(self._since)

    def feed(self, stream: str, message: Incoming) -> bool:
        if self.done or stream not in self._open:
            return self.done
        if message.message_id is not None and message.message_id == self.probes[stream]:
            return self.missing(stream)
        if message.exchange != PROBES_EXCHANGE:
            self.take(message)
        return False

    def take(self, message: Incoming) -> None:
        """One message of a stream (not a probe)."""
        raise NotImplementedError

    def missing(self, stream: str) -> bool:
        self._open.discard(stream)
        self.done = not self._open
        return self.done


class JournalScan(EveryStream):
    """The records of every job that ended since ``since`` (epoch seconds), from all the
    journal streams: :attr:`records`, the newest first, at most ``limit`` of them."""

    def __init__(self, since: float, limit: int) -> None:
        super().__init__(since)
        self.limit = limit
        self._after = since
        self._found: dict[str, dict[str, Any]] = {}

    def take(self, message: Incoming) -> None:
        if message.type != RECORD_TYPE or not message.message_id or not is_entry(message):
            return
        try:
            record, _ = codec.decode_object(message.body, message.content_type, max_bytes=MAX_ENTRY_BYTES)
        except DecodeError:
            return  # listing what ended: one bad entry hides nothing else
        end = record.get("end")
        if isinstance(end, int | float) and end >= self._after:
            self._found.setdefault(message.message_id, record)  # the first record counts

    @property
    def records(self) -> list[dict[str, Any]]:
        ordered = sorted(self._found.values(), key=lambda r: r.get("end") or 0.0, reverse=True)
        return ordered[:self.limit]


@dataclass(frozen=True)
class Entry:
    """One entry of a job, as a window read it: where, what, its decoded body (empty if the
    window was told not to decode), and its headers."""

    offset: int | None
    kind: str
    body: dict[str, Any]
    headers: Mapping[str, Any] = field(default_factory=dict)


class JournalWindow:
    """Job ``job_id``'s entries in a stretch of its journal stream: from ``start`` (an
    offset, or ``"last"``: the stream's last chunk) up to offset ``stop``, or, without one,
    up to a probe (then :attr:`end` is the probe's offset: where the stream ended).

    An entry that cannot be decoded, or that names another job in its body, is skipped with
    a log line: a bad entry never stops a read, a resume or a look-up.
    """

    PREFETCH = 200

    def __init__(self, job_id: str, start: int | str, stop: int | None = None, *,
                 decode: bool = True) -> None:
        self.job_id = job_id
        self.decode = decode
        self.stream = journal_stream(job_id)
        self.streams: tuple[str, ...] = (self.stream,)
        self.probes = {} if stop is not None else {self.stream: _probe_id()}
        self.start, self.stop = start, stop
        self.entries: list[Entry] = []
        #: The first offset the broker delivered at or past ``start`` (None: nothing).
        self.first: int | None = None
        self.end: int | None = None
        self.done = False
        self.launch_reply_to: str | None = None
        self._id_bytes = job_id.encode()

    @property
    def offset(self) -> int | str:
        return self.start

    def feed(self, stream: str, message: Incoming) -> bool:
        if self.done:
            return True
        at = message.offset
        if at is not None:
            if isinstance(self.start, int) and at < self.start:
                return False  # the broker starts at the chunk that holds ``start``
            if self.first is None:
                self.first = at
            if self.stop is not None and at >= self.stop:
                self.done = True
                return True
        if message.message_id is not None and message.message_id == self.probes.get(self.stream):
            self.end, self.done = at, True
            return True
        try:
            self._take(message, at)
        except DecodeError as exc:
            log.warning("journal entry of job %s at offset %s skipped: %s", self.job_id, at, exc)
        return False

    def _take(self, message: Incoming, at: int | None) -> None:
        if not self.decode:  # found by its headers: a megabyte checkpoint is not parsed
            if message.message_id == self.job_id and message.type is not None and is_entry(message):
                self.entries.append(Entry(at, message.type, {}, message.headers or {}))
            return
        if message.message_id == self.job_id and message.type is not None and is_entry(message):
            body, _ = codec.decode_object(message.body, message.content_type, max_bytes=MAX_ENTRY_BYTES)
            if body.get("job_id", self.job_id) != self.job_id:
                raise DecodeError(f"it names job {body.get('job_id')!r}")
            if message.type == LAUNCH_TYPE:
                self.launch_reply_to = message.reply_to
            self.entries.append(Entry(at, message.type, body, message.headers or {}))
        elif message.type == LAUNCHES_TYPE and self._id_bytes in message.body and is_entry(message):
            body, _ = codec.decode_object(message.body, message.content_type, max_bytes=MAX_ENTRY_BYTES)
            launch = launch_in(body, self.job_id)
            if launch is not None:
                self.launch_reply_to = message.reply_to
                self.entries.append(Entry(at, LAUNCH_TYPE, launch))

    def missing(self, stream: str) -> bool:
        self.done = True
        return True


class BackSearch:
    """What the journal holds of job ``job_id``, read from the end of its stream backwards,
    in windows that grow four-fold: the last chunk to a probe, then the 1,000 entries before
    it, then 4,000, and so on. It stops at the job's record or its launch (nothing of the job
    is older), at the stream's start, or where ``enough(entries)`` says (entries of one
    window, in stream order).

    So a look-up of a job that ended costs what was written *after* its end, not during its
    life; a fresh client finds a job that ended lately in one or two windows whatever its
    length or the fleet's traffic while it ran (docs/durability.md). Sans-I/O: the driver
    reads each :meth:`next_window` and hands it back to :meth:`took`.
    """

    FIRST_WINDOW = 1_000
    GROWTH = 4

    def __init__(self, job_id: str, *, enough: Callable[[list[Entry]], bool] | None = None,
                 decode: bool = True) -> None:
        self.job_id = job_id
        self.decode = decode
        self.windows: list[JournalWindow] = []  # the newest first
        self.done = False
        #: False if a window was not read to its end (the driver's time ran out).
        self.complete = True
        self._next: JournalWindow | None = JournalWindow(job_id, "last", decode=decode)
        self._size = self.FIRST_WINDOW
        self._enough = enough

    def next_window(self) -> JournalWindow | None:
        """The window to read next; None once the search is over."""
        return None if self.done else self._next

    def took(self, window: JournalWindow) -> None:
        """``window`` was read (to its end, or not: then the search is over, incomplete)."""
        self.windows.append(window)
        start = window.first
        if not window.done:
            self.complete, self.done = False, True
        elif (any(entry.kind in (RECORD_TYPE, LAUNCH_TYPE) for entry in window.entries)
              or (self._enough is not None and self._enough(window.entries))
              or start is None or start <= 0
              or (isinstance(window.start, int) and start > window.start)):  # retention cut it
            self.done = True
        else:
            self._next = JournalWindow(self.job_id, max(0, start - self._size), start, decode=self.decode)
            self._size *= self.GROWTH
        if self.done:
            self._next = None

    @property
    def entries(self) -> list[Entry]:
        """Every entry found, in stream order."""
        return [entry for window in reversed(self.windows) for entry in window.entries]

    @property
    def history(self) -> JobHistory:
        history = JobHistory(self.job_id)
        for entry in self.entries:
            history.add(entry.kind, entry.body)
        return history

    @property
    def end(self) -> int | None:
        """Where the stream ended when the search began (the first probe's offset)."""
        return self.windows[0].end if self.windows else None

    @property
    def launch_reply_to(self) -> str | None:
        return next((w.launch_reply_to for w in self.windows if w.launch_reply_to), None)

    @property
    def not_found(self) -> bool:
        """Searched to the end, and nothing of the job was there."""
        return self.done and self.complete and not any(w.entries for w in self.windows)


def entry_of(entries: list[Entry], kind: str, **fields: Any) -> Entry | None:
    """The newest of ``entries`` of ``kind`` whose body has every one of ``fields``."""
    return next((entry for entry in reversed(entries) if entry.kind == kind
                 and all(entry.body.get(key) == value for key, value in fields.items())), None)
