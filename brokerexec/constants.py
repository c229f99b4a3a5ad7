"""Defaults and limits: the numbers brokerexec runs with unless told otherwise.

Names on the wire (exchanges, queues, headers, routing keys) live in
:mod:`brokerexec.protocol.names`; this module holds only what a user may tune.
"""

from __future__ import annotations

from typing import Final

DEFAULT_URL: Final = "amqp://guest:guest@127.0.0.1:5672/"
MEMORY_URL: Final = "memory://"

# --- limits ---------------------------------------------------------------------------------
#: The largest message a worker or client takes from *others*: a launch, a signal, an RPC
#: reply. What workers write for readers (journal entries, records, leases, events) is read
#: up to :data:`MAX_ENTRY_BYTES` instead: its writer checked it against its own limit.
MAX_MESSAGE_BYTES: Final = 1024 * 1024
#: The largest checkpoint a worker stores (its JSON, with the entry's few fields), and the
#: largest result (its record's JSON): both below RabbitMQ's own ``max_message_size``
#: (128 MiB by default on 3.10), which refuses larger messages whatever brokerexec says.
MAX_CHECKPOINT_BYTES: Final = 64 * 1024 * 1024
MAX_RESULT_BYTES: Final = 64 * 1024 * 1024
#: What a reader accepts of what a worker wrote: RabbitMQ's ceiling for ``max_message_size``
#: (512 MiB), so a reader never refuses an entry its writer could store, whatever the
#: writer's limits (the broker enforces its own on the way in).
MAX_ENTRY_BYTES: Final = 512 * 1024 * 1024
MAX_JSON_DEPTH: Final = 64

#: How long the journal keeps its entries (seconds), when a worker makes its streams.
JOURNAL_MAX_AGE: Final = 7 * 86_400.0
#: How far back ``client.operation(..., name=N)`` looks for an operation named N to resume
#: (seconds; it reads the journal from then), and how long it may take.
OPERATION_RESUME_WITHIN: Final = 86_400.0
OPERATION_SEARCH_TIMEOUT: Final = 60.0

# --- a job's periodic messages (seconds; park's ServiceHandler defaults) --------------------
DEFAULT_PROGRESS_DELTA: Final = 1.0
DEFAULT_CHECKPOINT_DELTA: Final = 3600.0
DEFAULT_IMPROVED_DELTA: Final = 0.0

# --- clients and workers --------------------------------------------------------------------
DEFAULT_RPC_TIMEOUT: Final = 10.0
DEFAULT_HEARTBEAT: Final = 10
#: A job is claimed (given its exclusive RPC queue) once it has run this long, or at once
#: when someone asks for it; shorter jobs never pay for a queue (docs/architecture.md).
DEFAULT_CLAIM_AFTER: Final = 1.0
#: A worker replaces each lease it holds this often (seconds): a delivery held longer than
#: RabbitMQ's ``consumer_timeout`` (30 min by default) closes its channel.
DEFAULT_LEASE_RENEW: Final = 300.0
#: How long a worker waits before it claims a job whose worker was lost (seconds): a worker
#: that only reconnects (a broker restart) claims its jobs again within that time.
DEFAULT_RESUME_GRACE: Final = 2.0
#: How long a client waits for some worker to own up to an unclaimed job (seconds).
DEFAULT_LOCATE_TIMEOUT: Final = 0.5
#: How long the ``jobs`` query gathers the workers' answers (seconds).
DEFAULT_JOBS_TIMEOUT: Final = 0.5
