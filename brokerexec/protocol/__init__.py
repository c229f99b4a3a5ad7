"""The wire protocol, written once and free of I/O.

* :mod:`.names` — every exchange, queue, header, message type and routing key; job ids.
* :mod:`.intents` — the intents and the one table of how each behaves.
* :mod:`.messages`, :mod:`.events`, :mod:`.replies` — the messages, as frozen dataclasses
  with ``encode()`` / ``decode()``.
* :mod:`.topology` — every object brokerexec declares, with its arguments, as data.
* :mod:`.calls` — the client's decisions (locate a job, read a record) as generators that
  the blocking and asyncio transports drive.

``docs/protocol.md`` is the reference for all of it.
"""

from __future__ import annotations

import importlib as _importlib
import typing as _typing

if _typing.TYPE_CHECKING:
    from .events import EVENT_KINDS, Event
    from .intents import INTENTS, Answered, Intent, IntentSpec, Signal
    from .messages import Control, JobsQuery, JobSummary, Launch, Record, WorkerJobs
    from .names import PROTOCOL_VERSION, check_name, job_time, new_job_id
    from .replies import Reply

__all__ = ["EVENT_KINDS", "INTENTS", "PROTOCOL_VERSION", "Answered", "Control", "Event", "Intent",
           "IntentSpec", "JobSummary", "JobsQuery", "Launch", "Record", "Reply", "Signal",
           "WorkerJobs", "check_name", "job_time", "new_job_id"]

#: Where each name lives: imported on first use, so that importing one module of the
#: protocol (``names``, say) does not load them all (a one-shot CLI verb feels that).
_WHERE = {
    "EVENT_KINDS": "events", "Event": "events", "INTENTS": "intents", "Answered": "intents",
    "Intent": "intents", "IntentSpec": "intents", "Control": "messages", "JobsQuery": "messages",
    "JobSummary": "messages", "Launch": "messages", "Record": "messages", "Signal": "intents",
    "WorkerJobs": "messages", "PROTOCOL_VERSION": "names", "check_name": "names",
    "job_time": "names", "new_job_id": "names", "Reply": "replies",
}


def __getattr__(name: str) -> object:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'brokerexec.protocol' has no attribute {name!r}")
    value = getattr(_importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
