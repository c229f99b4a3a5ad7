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

from .events import EVENT_KINDS, Event
from .intents import INTENTS, Answered, Intent, IntentSpec
from .messages import Control, JobsQuery, JobSummary, Launch, Record, Signal, WorkerJobs
from .names import PROTOCOL_VERSION, check_name, job_time, new_job_id
from .replies import Reply

__all__ = ["EVENT_KINDS", "INTENTS", "PROTOCOL_VERSION", "Answered", "Control", "Event", "Intent",
           "IntentSpec", "JobSummary", "JobsQuery", "Launch", "Record", "Reply", "Signal",
           "WorkerJobs", "check_name", "job_time", "new_job_id"]
