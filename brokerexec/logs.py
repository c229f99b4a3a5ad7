"""The worker's log lines: which job a line is about, in text or as one JSON object per line.

A line names its job when it can: from ``extra={"job_id": ...}`` given by the logging call
(the worker's own start and end lines), else from :data:`current_job`, a context variable
that the computation sets while a job's ``run`` executes, so that lines logged by a
service's own code in the computation thread carry the job id without the service knowing
about brokerexec's logging. Other ``extra`` fields (``service``, ``state``, ...) are shown
too: a reader should not need the code to learn what the worker knew.

Text: ``2026-12-01 23:01:46,512 INFO [brokerexec-job-ab12] brokerexec.worker job=ab12: ...``.
JSON: ``{"time": ..., "level": ..., "logger": ..., "message": ..., "thread": ..., "job_id": ...}``.
"""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import Any, Literal

__all__ = ["JobFilter", "JsonFormatter", "TextFormatter", "configure_logging",
           "configured_format", "current_job"]

#: The job whose computation (or handler code) runs in this context; ``None`` elsewhere.
#: A context variable rather than a thread-local: each thread starts with its own context,
#: and code run through ``contextvars.copy_context()`` keeps the job it was started for.
current_job: ContextVar[str | None] = ContextVar("brokerexec_current_job", default=None)

#: The attributes every LogRecord has: whatever else a record carries came from ``extra``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "job_id", "taskName"}
_configured = "text"
TEXT_FORMAT = "%(asctime)s %(levelname)s [%(threadName)s] %(name)s%(context)s: %(message)s"


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and k != "context"}


class JobFilter(logging.Filter):
    """Gives every record a ``job_id`` (its ``extra``, else :data:`current_job`, else
    ``None``) and a ``context`` text (`` job=<id> key=value ...``, or empty)."""

    def filter(self, record: logging.LogRecord) -> bool:
        job_id = getattr(record, "job_id", None)
        if job_id is None:
            job_id = record.job_id = current_job.get()
        parts = [f"job={job_id}"] if job_id else []
        parts += [f"{key}={value}" for key, value in _extras(record).items()]
        record.context = (" " + " ".join(parts)) if parts else ""
        return True


class TextFormatter(logging.Formatter):
    """The text lines: time, level, thread, logger, the job and extras, the message."""

    def __init__(self, fmt: str = TEXT_FORMAT) -> None:
        super().__init__(fmt)

    def format(self, record: logging.LogRecord) -> str:
        if not hasattr(record, "context"):  # a handler without JobFilter
            JobFilter().filter(record)
        return super().format(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (ISO 8601, UTC), level, logger, message, thread,
    job_id, any ``extra`` fields, and the traceback as ``exc_info`` when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        if not hasattr(record, "context"):
            JobFilter().filter(record)
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(),
            "level": record.levelname, "logger": record.name, "message": record.getMessage(),
            "thread": record.threadName, "job_id": getattr(record, "job_id", None)}
        for key, value in _extras(record).items():
            line.setdefault(key, value)
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        # default=str: an extra that is not JSON must not lose the line
        return json.dumps(line, default=str)


def configure_logging(level: str | int, fmt: Literal["text", "json"] | str = "text",
                      text_format: str = TEXT_FORMAT) -> None:
    """Log to stderr at ``level`` in ``fmt`` (``text``, laid out by ``text_format``, which
    may use ``%(context)s``, or ``json``), with job ids."""
    global _configured
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(JobFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter(text_format))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper() if isinstance(level, str) else level)
    _configured = "json" if fmt == "json" else "text"


def configured_format() -> str:
    """The format :func:`configure_logging` set last (``text`` if never called): a child
    process that runs a computation logs in it too."""
    return _configured
