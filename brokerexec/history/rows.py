"""One row per job, folded from its journal entries: what the history store keeps.

Sans-I/O: :func:`fold` takes a job's row as it stands (or None) and one journal entry of that
job, and returns the row after it. The fold is idempotent and order-tolerant within a job
(an entry applied twice, or an older attempt's entry after a newer one's, changes nothing),
so an indexer that crashed between two batches, or two indexers on one store, can apply
the same entries again and come to the same rows; and an empty store rebuilt from the
streams comes to the rows the incremental one holds.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from ..protocol.journal import attempt_of
from ..protocol.names import CHECKPOINT_TYPE, LAUNCH_TYPE, RECORD_TYPE, STARTED_TYPE

__all__ = ["ENDED", "SUMMARY_BYTES", "JobRow", "fold", "replace", "summary"]

#: The states a record gives; a row in one of them changes no more (but by a newer attempt).
ENDED = frozenset({"finished", "failed", "aborted"})
#: A request or a result is kept whole up to this many bytes of JSON, else summarized.
SUMMARY_BYTES = 4096


@dataclass(frozen=True)
class JobRow:
    """A job as the history store keeps it."""

    job_id: str
    service: str
    state: str = "queued"  # queued, running (started, no record yet), finished, failed, aborted
    attempts: int = 0  # executions started
    workers: tuple[str, ...] = ()  # the hosts it ran on, in order
    launched: float | None = None
    started: float | None = None  # the first attempt's start
    ended: float | None = None
    request: str | None = None  # JSON, whole or summarized (SUMMARY_BYTES)
    request_bytes: int = 0
    result: str | None = None  # JSON, whole or summarized
    result_bytes: int = 0
    error_type: str | None = None
    error: str | None = None  # its message
    reason: str | None = None  # e.g. "cancelled while queued"
    last_checkpoint: float | None = None  # when its newest checkpoint was taken
    labels: dict[str, str] = field(default_factory=dict)
    operation: str | None = None
    progress: dict[str, Any] | None = None  # its last progress (from its record)
    improved: dict[str, Any] | None = None  # its best improved value: the last one it sent
    item_key: str | None = None  # the item of its operation it runs (``brokerexec/operations/``)

    @property
    def run_time(self) -> float | None:
        if self.started is None or self.ended is None:
            return None
        return max(self.ended - self.started, 0.0)

    @property
    def at(self) -> float:
        """When it last moved (its end, else its start, else its launch): what pages sort by."""
        return self.ended or self.started or self.launched or 0.0

    def encode(self) -> dict[str, Any]:
        body = asdict(self)
        body["workers"] = list(self.workers)
        body["run_time"] = self.run_time
        return body


def replace(row: JobRow, **changes: Any) -> JobRow:
    """``dataclasses.replace`` without its walk over the fields at every call, which was a
    fifth of the fold's time: a frozen dataclass keeps its fields in its ``__dict__``."""
    new = object.__new__(JobRow)
    new.__dict__.update(row.__dict__, **changes)
    return new


#: One encoder for every summary (``json.dumps`` with ``default`` makes one at each call).
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=str)


def summary(value: Any) -> tuple[str | None, int]:
    """A value's JSON, whole if it fits :data:`SUMMARY_BYTES`, else cut there (marked), and
    its full size in bytes."""
    if value is None:
        return None, 0
    text = _ENCODER.encode(value)
    size = len(text) if text.isascii() else len(text.encode())
    if size <= SUMMARY_BYTES:
        return text, size
    return text.encode()[:SUMMARY_BYTES].decode("utf-8", "ignore") + " …", size



def _number(body: dict[str, Any], key: str) -> float | None:
    value = body.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _host(worker: Any) -> str | None:
    if not isinstance(worker, dict):
        return None
    host = worker.get("hostname") or worker.get("id")
    return str(host) if host else None


def fold(row: JobRow | None, job_id: str, kind: str, body: dict[str, Any]) -> JobRow | None:
    """The row of ``job_id`` after one journal entry (``kind``, ``body``); None if there is
    still no row (an entry that names another job, or a checkpoint of a job never seen)."""
    named = body.get("job_id")
    if named is not None and named != job_id:
        return row  # an entry that names another job in its body is not this job's
    service = body.get("service")
    if row is None:
        if not isinstance(service, str):
            return None
        row = JobRow(job_id, service)
    if kind == LAUNCH_TYPE:
        return _launched(row, body)
    if kind == STARTED_TYPE:
        return _started(row, body)
    if kind == CHECKPOINT_TYPE:  # the newest: a count would not survive an entry read twice
        taken = _number(body, "time")
        if taken is None or (row.last_checkpoint is not None and taken <= row.last_checkpoint):
            return row
        return replace(row, last_checkpoint=taken)
    if kind == RECORD_TYPE:
        return _recorded(row, body)
    return row


def _launched(row: JobRow, body: dict[str, Any]) -> JobRow:
    if row.launched is not None:
        return row  # the first launch entry counts
    request, size = summary(body.get("request"))
    labels = body.get("labels")
    operation, key = body.get("operation"), body.get("key")
    return replace(row, launched=_number(body, "sent"), request=request, request_bytes=size,
                   labels={str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {},
                   operation=operation if isinstance(operation, str) else None,
                   item_key=key if isinstance(key, str) and isinstance(operation, str) else None)


def _started(row: JobRow, body: dict[str, Any]) -> JobRow:
    attempt = attempt_of(body)
    if attempt < row.attempts or (attempt == row.attempts and row.started is not None):
        return row  # older, or seen already
    host = _host(body.get("worker"))
    workers = (*row.workers, host) if host and row.workers[-1:] != (host,) else row.workers
    started = row.started if row.started is not None else _number(body, "time")
    state = row.state if row.state in ENDED and attempt <= _record_attempt(row) else "running"
    return replace(row, attempts=attempt, workers=workers, started=started, state=state)


def _record_attempt(row: JobRow) -> int:
    return row.attempts if row.state in ENDED else 0


def _recorded(row: JobRow, body: dict[str, Any]) -> JobRow:
    attempt = attempt_of(body)
    if row.state in ENDED or attempt < row.attempts:
        return row  # the first record of the newest attempt counts (as readers of the journal)
    state = body.get("state")
    if state not in ENDED:
        return row
    result, size = summary(body.get("result"))
    error: dict[str, Any] = body["error"] if isinstance(body.get("error"), dict) else {}
    host = _host(body.get("worker"))
    workers = (*row.workers, host) if host and row.workers[-1:] != (host,) else row.workers
    return replace(row, state=state, attempts=max(attempt, row.attempts), workers=workers,
                   started=row.started if row.started is not None else _number(body, "start"),
                   ended=_number(body, "end"), result=result, result_bytes=size,
                   error_type=error.get("type"), error=error.get("message"),
                   reason=body.get("reason") if isinstance(body.get("reason"), str) else None,
                   progress=_small(body.get("progress")), improved=_small(body.get("improved")))


def _small(value: Any) -> dict[str, Any] | None:
    """A progress or improved object as kept on the row: whole if it fits
    :data:`SUMMARY_BYTES` of JSON, else its summary under ``"summary"``."""
    if not isinstance(value, dict) or not value:
        return None
    text, size = summary(value)
    return value if size <= SUMMARY_BYTES else {"summary": text, "bytes": size}
