"""The messages between clients and workers, as frozen dataclasses.

Each has ``encode()`` (the JSON object that goes on the wire) and ``decode(body)`` (which
raises :class:`~brokerexec.DecodeError` saying what was wrong). ``docs/protocol.md`` is the
reference; this module is its code. Events and replies are in :mod:`.events` and
:mod:`.replies`; the RPC to one job, :class:`~.intents.Signal`, in :mod:`.intents`.

* :class:`Launch` — exchange ``brokerexec.launches``, key = service: start a job.
* :class:`Lease` — a worker's proof of a claimed job, and the launch it becomes again if
  the worker dies (with the attempt and where its last checkpoint is).
* :class:`Control` — exchange ``brokerexec.control``: pause, resume or abort every job.
* :class:`JobsQuery` / :class:`WorkerJobs` / :class:`JobSummary` — the ``jobs`` query.
* :class:`Record` — a job's final record: the one builder of every record.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from ..codec import expect_object
from ..errors import DecodeError, ResultTooLarge, error_to_wire
from .intents import Intent
from .names import PROTOCOL_VERSION, check_item_key, check_name, new_job_id
from .states import TERMINAL, JobState

__all__ = ["Control", "JobSummary", "JobsQuery", "Launch", "Lease", "Record", "WorkerJobs"]

def _check_version(body: dict[str, Any], what: str) -> None:
    version = body.get("v", PROTOCOL_VERSION)
    if version != PROTOCOL_VERSION:
        raise DecodeError(f"unsupported protocol version {version!r} of a {what} "
                          f"(this side speaks {PROTOCOL_VERSION})")


def _number(body: dict[str, Any], key: str, default: float | None = None) -> float | None:
    value = body.get(key, default)
    if value is None or (isinstance(value, int | float) and not isinstance(value, bool)):
        return None if value is None else float(value)
    raise DecodeError(f"{key!r} must be a number, got {value!r:.60}")


def _object(body: Mapping[str, Any], key: str) -> dict[str, Any] | None:
    """``body[key]`` if it is an object; None if it is absent, or anything else (an optional
    key that is not what it should be is ignored, not a reason to refuse the whole)."""
    value = body.get(key)
    return value if isinstance(value, dict) else None


@dataclass(frozen=True)
class Launch:
    """A request to run ``request`` through service ``service`` as job ``job_id``."""

    job_id: str
    service: str
    request: dict[str, Any]
    #: The handler's intervals for this job: ``progress_delta``, ``checkpoint_delta``,
    #: ``improved_delta`` (checked by the worker, which refuses bad values).
    settings: dict[str, Any]
    sent: float

    #: The operation it is an item of (``brokerexec/operations/``), and the item's key.
    operation: str | None = None
    key: str | None = None

    @classmethod
    def new(cls, service: str, request: Mapping[str, Any] | None = None, *,
            job_id: str | None = None, settings: Mapping[str, Any] | None = None,
            operation: str | None = None, key: str | None = None) -> Launch:
        """A launch sent now, with a fresh job id unless one is given."""
        return cls(check_name("job id", job_id or new_job_id()), check_name("service name", service),
                   dict(request or {}), dict(settings or {}), time.time(),
                   None if operation is None else check_name("operation id", operation),
                   None if key is None else check_item_key(key))

    def encode(self) -> dict[str, Any]:
        body = {"v": PROTOCOL_VERSION, "job_id": self.job_id, "service": self.service,
                "request": self.request, "settings": self.settings, "sent": self.sent}
        if self.operation is not None:  # only then: a launch of no operation is as it always was
            body["operation"] = self.operation
            body["key"] = self.key
        return body

    @classmethod
    def decode(cls, body: object) -> Launch:
        body = expect_object(body, "a launch")
        _check_version(body, "launch")
        job_id = check_name("job id", body.get("job_id"))
        service = check_name("service name", body.get("service"))
        parts = {}
        for key in ("request", "settings"):
            part = body.get(key, {})
            if part is None:
                part = {}
            if not isinstance(part, dict):
                raise DecodeError(f"launch {key!r} must be a JSON object")
            parts[key] = part
        sent = _number(body, "sent", 0.0)
        operation, item_key = body.get("operation"), body.get("key")
        return cls(job_id, service, parts["request"], parts["settings"], sent or 0.0,
                   None if operation is None else check_name("operation id", operation),
                   None if item_key is None else check_item_key(item_key))


@dataclass(frozen=True)
class Lease:
    """A claimed job's lease (see ``names.LEASES_EXCHANGE``): what a worker that resumes the
    job needs, should its holder die; and, sent straight to the launch queue, a job handed
    over by a worker that stops gracefully (``handed_over``).

    ``attempt`` is the holder's execution; ``started`` when that execution began (epoch
    seconds); ``checkpoint`` where the job's newest stored checkpoint is in the journal
    (``{"time", "attempt", "covers"}``), or None; ``reply_to`` the launching client's queue;
    ``changes`` the sets and invokes applied since that checkpoint
    (:mod:`brokerexec.core.change_log`), made durable here before they were acknowledged;
    ``ending`` True once its holder is about to write the job's record (no record is written
    before its lease says so: a resumer looks for one only then), None in a lease from a
    worker that did not say (a resumer then looks).
    """

    launch: Launch
    attempt: int
    worker: dict[str, Any]
    started: float
    reply_to: str | None = None
    checkpoint: dict[str, Any] | None = None
    handed_over: bool = False
    changes: list[dict[str, Any]] = field(default_factory=list)
    ending: bool | None = False

    @property
    def since(self) -> float:
        """Where a resuming worker starts reading the job's journal: the holder's start, or
        its checkpoint if older (one of an earlier attempt)."""
        if self.checkpoint is not None:
            return min(self.started, float(self.checkpoint["time"]))
        return self.started

    def encode(self) -> dict[str, Any]:
        body = {"v": PROTOCOL_VERSION, "launch": self.launch.encode(), "attempt": self.attempt,
                "worker": self.worker, "started": self.started, "reply_to": self.reply_to,
                "checkpoint": self.checkpoint}
        if self.handed_over:
            body["handed_over"] = True
        if self.changes:
            body["changes"] = self.changes
        if self.ending is not None:
            body["ending"] = self.ending
        return body

    @classmethod
    def decode(cls, body: object) -> Lease:
        body = expect_object(body, "a lease")
        _check_version(body, "lease")
        attempt = body.get("attempt")
        if not isinstance(attempt, int) or isinstance(attempt, bool) or attempt < 1:
            raise DecodeError(f"a lease's attempt must be a positive integer, got {attempt!r}")
        reply_to, checkpoint, worker = body.get("reply_to"), body.get("checkpoint"), body.get("worker")
        if reply_to is not None and not isinstance(reply_to, str):
            raise DecodeError("a lease's reply_to must be a string or null")
        if checkpoint is not None and not (isinstance(checkpoint, dict)
                                           and isinstance(checkpoint.get("time"), int | float)):
            raise DecodeError("a lease's checkpoint must be null or an object with a time")
        started = _number(body, "started")
        if started is None:
            raise DecodeError("a lease must say when its execution started")
        changes = body.get("changes") or []
        if not (isinstance(changes, list) and all(isinstance(change, dict) for change in changes)):
            raise DecodeError("a lease's changes must be a list of objects")
        ending = body.get("ending")
        return cls(Launch.decode(body.get("launch")), attempt, worker if isinstance(worker, dict) else {},
                   started, reply_to, checkpoint, bool(body.get("handed_over", False)), changes,
                   ending if isinstance(ending, bool) else None)


@dataclass(frozen=True)
class Control:
    """Pause, resume or abort every job (of one service, or of one operation), on every worker;
    or set attributes of every job of one operation.

    ``sent`` limits it to jobs that started before it: a worker reading the retained
    control stream after a reconnect does not pause jobs launched since.

    One of an operation (``operation``) reaches its jobs wherever they are: running, queued
    (remembered for its launches still queued, as an abort of a service is) or resuming on
    another worker. It compares ``sent`` with when each job was *launched*, both times of
    the operation's clients (a job that started after the control left, but was launched
    before it, is reached); a job launched after it (a re-run) is not. On the wire it also
    carries its operation's id as ``job_id``: a worker older than controls of operations
    reads it as a control of one job that does not exist, and leaves every job alone.
    """

    intent: Intent
    service: str | None = None
    sent: float | None = None
    #: One job only (an abort of a job that is still queued: its launch must never run).
    job_id: str | None = None
    #: Every job of this operation only (``brokerexec/operations/``).
    operation: str | None = None
    #: For a set (of an operation's jobs): the attributes and their values.
    attrs: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.intent is Intent.SET:
            if self.operation is None or not isinstance(self.attrs, dict) or not self.attrs:
                raise DecodeError("a control message sets attributes of an operation's jobs only: "
                                  "it needs an operation and its attrs")
        elif not self.intent.spec.to_every_job:
            raise DecodeError(f"a control message may pause, resume or abort every job, "
                              f"not {self.intent.value}")

    def applies_to(self, job_id: str, service: str, started: float, *, operation: str | None = None,
                   launched: float | None = None) -> bool:
        """True for job ``job_id`` of ``service``, started (or launched) at ``started``, an
        item of ``operation`` (if any) launched at ``launched``.

        One job's own control applies whatever the times: they are two hosts' clocks (the
        launcher's and the sender's), and a job named was launched before. For many jobs,
        "started before it" compares those clocks: within their skew it may go either way
        (docs/durability.md)."""
        if self.job_id is not None:
            return self.job_id == job_id and (self.service is None or self.service == service)
        if self.service is not None and self.service != service:
            return False
        if self.operation is not None:
            if self.operation != operation:
                return False
            started = launched if launched is not None else started
        return self.sent is None or started <= self.sent

    def encode(self) -> dict[str, Any]:
        body: dict[str, Any] = {"intent": self.intent.value}
        if self.service is not None:
            body["service"] = self.service
        if self.sent is not None:
            body["sent"] = self.sent
        if self.job_id is not None:
            body["job_id"] = self.job_id
        if self.operation is not None:
            body["operation"] = self.operation
            body.setdefault("job_id", self.operation)  # an older worker: one job, not every one
        if self.attrs is not None:
            body["attrs"] = self.attrs
        return body

    @classmethod
    def decode(cls, body: object) -> Control:
        body = expect_object(body, "a control message")
        service, job_id, operation = body.get("service"), body.get("job_id"), body.get("operation")
        if service is not None:
            check_name("service name", service)
        if job_id is not None:
            check_name("job id", job_id)
        if operation is not None:
            check_name("operation id", operation)
            if job_id == operation:  # what it says to an older worker (see encode)
                job_id = None
        attrs = body.get("attrs")
        if attrs is not None and not isinstance(attrs, dict):
            raise DecodeError(f"a control message's attrs must be a JSON object, not {attrs!r:.60}")
        return cls(Intent.parse(body.get("intent")), service, _number(body, "sent"), job_id,
                   operation, attrs)


@dataclass(frozen=True)
class JobsQuery:
    """The ``jobs`` query, sent to every worker; each replies with :class:`WorkerJobs`."""

    INTENT: ClassVar[str] = "jobs"

    def encode(self) -> dict[str, Any]:
        return {"intent": self.INTENT}

    @classmethod
    def is_query(cls, body: object) -> bool:
        """True if ``body`` is a ``jobs`` query."""
        return isinstance(body, dict) and body.get("intent") == cls.INTENT


@dataclass(frozen=True)
class JobSummary:
    """One job in an answer to the ``jobs`` query."""

    job_id: str
    service: str
    state: str
    started: float
    worker: dict[str, Any]
    progress: dict[str, Any] = field(default_factory=dict)
    attempt: int = 1

    def encode(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "service": self.service, "state": self.state,
                "started": self.started, "worker": self.worker, "progress": self.progress,
                "attempt": self.attempt}


@dataclass(frozen=True)
class WorkerJobs:
    """One worker's answer to the ``jobs`` query: who it is and what it runs."""

    worker: dict[str, Any]
    jobs: list[dict[str, Any]]
    #: The services it offers.
    services: list[str] = field(default_factory=list)
    #: What each of them declares (``Service.describe()``: inputs, settable, invokable), by name.
    descriptions: dict[str, dict[str, Any]] = field(default_factory=dict)

    def encode(self) -> dict[str, Any]:
        body = {"worker": self.worker, "jobs": self.jobs, "services": self.services}
        if self.descriptions:
            body["descriptions"] = self.descriptions
        return body

    @classmethod
    def decode(cls, value: object) -> WorkerJobs:
        """Read an answer; jobs that are not objects are dropped, each names its worker."""
        body = expect_object(value, "an answer to the jobs query")
        worker = body["worker"] if isinstance(body.get("worker"), dict) else {}
        jobs = [{**job, "worker": job.get("worker") or worker}
                for job in body.get("jobs") or [] if isinstance(job, dict)]
        services = [name for name in body.get("services") or [] if isinstance(name, str)]
        described = body.get("descriptions")
        descriptions = {name: value for name, value in described.items()
                        if isinstance(name, str) and isinstance(value, dict)} \
            if isinstance(described, dict) else {}
        return cls(worker, jobs, services, descriptions)


@dataclass(frozen=True)
class Record:
    """A job's final record: how it ended, with its result or error.

    ``abandoned`` marks an aborted job whose computation never reached ``ready()`` within
    the abort grace (``docs/architecture.md``). ``progress`` and ``improved`` are what the
    execution that ended reported last, each when it reported one (``docs/protocol.md``,
    *Final record*).
    """

    job_id: str
    service: str
    state: JobState
    result: Any = None
    error: dict[str, str] | None = None
    start: float = 0.0
    end: float = 0.0
    worker: dict[str, Any] = field(default_factory=dict)
    abandoned: bool = False
    #: The execution that ended (1 unless the job was resumed after losing its worker).
    attempt: int = 1
    #: Why it ended so, where that is not in ``error`` (``"cancelled while queued"``).
    reason: str | None = None
    #: Its last progress (what ``status`` showed: the service's ``progress()`` and ``elapsed``).
    progress: dict[str, Any] | None = None
    #: The last state its service passed to ``handler.improved()``: the best it found.
    improved: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.state not in TERMINAL:
            raise DecodeError(f"a record's state must be finished, failed or aborted, not {self.state.value}")

    @classmethod
    def refusal(cls, job_id: str, service: str, worker: dict[str, Any], exc: BaseException) -> Record:
        """The record of a launch refused before it ran (unknown service, invalid request)."""
        now = time.time()
        return cls(job_id, service, JobState.FAILED, None, error_to_wire(exc), now, now, worker)

    @classmethod
    def of_outcome(cls, job_id: str, service: str, worker: dict[str, Any],
                   outcome: Mapping[str, Any], attempt: int = 1) -> Record:
        """The record of a job that ran, from its handler's outcome."""
        return cls(job_id, service, JobState(outcome["state"]), outcome.get("result"),
                   outcome.get("error"), float(outcome.get("start") or 0.0),
                   float(outcome.get("end") or 0.0), worker, bool(outcome.get("abandoned")),
                   attempt, outcome.get("reason"), _object(outcome, "progress"),
                   _object(outcome, "improved"))

    @classmethod
    def cancelled(cls, job_id: str, service: str, by: dict[str, Any], attempt: int = 1) -> Record:
        """The record of a job aborted while no worker held it (queued, or resuming)."""
        now = time.time()
        return cls(job_id, service, JobState.ABORTED, None, None, now, now, by,
                   attempt=max(attempt, 1), reason="cancelled while queued")

    def too_large(self, why: str) -> Record | None:
        """This record for a broker that refused it as too large: failed, with
        ``ResultTooLarge`` (``why``), and without its result, last progress and improved
        value, which count against that limit; None if it has none of them (nothing of it
        could be left out)."""
        if self.result is None and self.progress is None and self.improved is None:
            return None
        return replace(self, state=JobState.FAILED, result=None, progress=None, improved=None,
                       error=error_to_wire(ResultTooLarge(why)))

    def encode(self) -> dict[str, Any]:
        body = {"v": PROTOCOL_VERSION, "job_id": self.job_id, "service": self.service,
                "state": self.state.value, "result": self.result, "error": self.error,
                "start": self.start, "end": self.end, "worker": self.worker}
        if self.abandoned:
            body["abandoned"] = True
        if self.attempt != 1:
            body["attempt"] = self.attempt
        if self.reason is not None:
            body["reason"] = self.reason
        if self.progress is not None:
            body["progress"] = self.progress
        if self.improved is not None:
            body["improved"] = self.improved
        return body

    @classmethod
    def decode(cls, body: object) -> Record:
        body = expect_object(body, "a record")
        _check_version(body, "record")
        try:
            state = JobState(body.get("state"))
        except ValueError:
            raise DecodeError(f"a record's state must be finished, failed or aborted, "
                              f"not {body.get('state')!r}") from None
        error = body.get("error")
        if error is not None and not isinstance(error, dict):
            raise DecodeError("a record's error must be an object or null")
        worker, attempt, reason = body.get("worker"), body.get("attempt", 1), body.get("reason")
        return cls(check_name("job id", body.get("job_id")), str(body.get("service", "")), state,
                   body.get("result"), error, _number(body, "start", 0.0) or 0.0,
                   _number(body, "end", 0.0) or 0.0, worker if isinstance(worker, dict) else {},
                   bool(body.get("abandoned", False)),
                   attempt if isinstance(attempt, int) and attempt > 0 else 1,
                   reason if isinstance(reason, str) else None,
                   _object(body, "progress"), _object(body, "improved"))
