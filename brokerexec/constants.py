"""Every exchange, queue, routing key and default of the wire protocol, in one place.

``docs/protocol.md`` documents each of these; change them together.
"""

from __future__ import annotations

from typing import Final

#: Version of the wire protocol; sent as the ``brokerexec`` header / ``v`` key.
PROTOCOL_VERSION: Final = 1

DEFAULT_URL: Final = "amqp://guest:guest@127.0.0.1:5672/"
MEMORY_URL: Final = "memory://"

# --- kiwipy's shared exchange (declared exactly as kiwipy declares it) ----------------------
#: kiwipy's message exchange: topic, not durable, not auto-deleted (kiwipy.rmq.defaults).
KIWIPY_EXCHANGE: Final = "kiwipy.messages"
#: Routing key prefix of RPCs to one subscriber: ``[rpc].<job id>``.
RPC_TOPIC: Final = "[rpc]"
#: Routing key of kiwipy broadcasts.
BROADCAST_TOPIC: Final = "[broadcast]"
#: kiwipy's queue arguments for RPC and broadcast queues (ms).
KIWIPY_MESSAGE_TTL_MS: Final = 66_000

# --- brokerexec's own objects ---------------------------------------------------------------
#: Durable queue of launch requests, consumed by every worker (default exchange).
LAUNCH_QUEUE: Final = "brokerexec.launch"
#: Where launches that cannot be decoded or run are dead-lettered at once.
DEAD_LETTER_EXCHANGE: Final = "brokerexec.dead"
DEAD_LETTER_QUEUE: Final = "brokerexec.launch.dead"
#: Topic exchange of job events; routing key ``<kind>.<service>.<job id>``.
EVENTS_EXCHANGE: Final = "brokerexec.events"
#: Fanout exchange and stream of retained control messages (pause_all, abort_all, ...).
CONTROL_EXCHANGE: Final = "brokerexec.control"
CONTROL_STREAM: Final = "brokerexec.control"
CONTROL_MAX_AGE: Final = "1h"
#: Fanout exchange on which every worker answers the ``jobs`` query.
WORKERS_EXCHANGE: Final = "brokerexec.workers"
#: Stream of every job's final record (``message_id`` = job id), kept ``RESULTS_MAX_AGE``.
#: One shared structure instead of a queue per job: creating and deleting a queue costs
#: the broker about 2.4 ms of CPU, more than a whole trivial job may (docs/performance.md).
RESULTS_STREAM: Final = "brokerexec.results"
RESULTS_MAX_AGE: Final = "24h"
#: Retention applies per segment: small segments let old records go close to their age.
RESULTS_SEGMENT_BYTES: Final = 8_000_000
#: AMQP ``type`` of a record, and of a probe a reader appends to find the stream's end.
RECORD_TYPE: Final = "brokerexec.record"
PROBE_TYPE: Final = "brokerexec.probe"
#: AMQP ``type`` of the ``state_changed`` broadcasts jobs send for kiwipy tools.
STATE_CHANGED_TYPE: Final = "brokerexec.state_changed"
#: Workers hear kiwipy broadcasts through these, so that the broker, not each worker, drops
#: the ``state_changed`` broadcasts of jobs (two per job, for every worker process): a
#: headers exchange bound to kiwipy's with ``[broadcast]`` sends the messages carrying
#: ``STATE_CHANGED_HEADER`` to a dead end and everything else, unroutable there, to its
#: alternate exchange, a fanout the workers' broadcast queues are bound to.
KIWIPY_FILTER_EXCHANGE: Final = "brokerexec.kiwipy-broadcasts"
KIWIPY_OTHERS_EXCHANGE: Final = "brokerexec.kiwipy-broadcasts.others"
DISCARD_EXCHANGE: Final = "brokerexec.discard"
STATE_CHANGED_HEADER: Final = ("brokerexec-kind", "state_changed")
#: Readers start at the job id's launch time minus this margin (clock skew, seconds).
RECORD_TIME_MARGIN: Final = 60.0
#: Per-job exclusive RPC queue prefix: ``brokerexec.rpc.<job id>`` (its exclusivity is
#: the ownership token of a claimed job).
RPC_QUEUE_PREFIX: Final = "brokerexec.rpc."
#: Headers of a request: the job it is for (when sent to every worker) and its deadline.
JOB_ID_HEADER: Final = "x-job-id"
DEADLINE_HEADER: Final = "x-deadline"  # epoch seconds, int or float
DEADLINE_MS_HEADER: Final = "x-deadline-ms"  # epoch milliseconds, int (pika sends no floats)
#: RabbitMQ's direct reply-to pseudo queue.
DIRECT_REPLY_TO: Final = "amq.rabbitmq.reply-to"

# --- event kinds (first word of an event routing key) ---------------------------------------
EVENT_KINDS: Final = ("state", "progress", "improved", "checkpoint")

# --- limits and defaults --------------------------------------------------------------------
MAX_MESSAGE_BYTES: Final = 1024 * 1024
MAX_JSON_DEPTH: Final = 64
DEFAULT_PROGRESS_DELTA: Final = 1.0
DEFAULT_CHECKPOINT_DELTA: Final = 3600.0
DEFAULT_IMPROVED_DELTA: Final = 0.0
DEFAULT_RPC_TIMEOUT: Final = 10.0
DEFAULT_HEARTBEAT: Final = 10
#: A job is claimed (given its exclusive RPC queue) once it has run this long, or at once
#: when someone asks for it; shorter jobs never pay for a queue (docs/architecture.md).
DEFAULT_CLAIM_AFTER: Final = 1.0
#: How long a client waits for some worker to own up to an unclaimed job (seconds).
DEFAULT_LOCATE_TIMEOUT: Final = 0.5


def rpc_routing_key(job_id: str) -> str:
    """The kiwipy routing key that reaches job ``job_id``."""
    return f"{RPC_TOPIC}.{job_id}"


def event_routing_key(kind: str, service: str, job_id: str) -> str:
    """The events-exchange routing key of one event."""
    return f"{kind}.{service}.{job_id}"


def rpc_queue(job_id: str) -> str:
    """The exclusive queue that receives RPCs for job ``job_id``."""
    return f"{RPC_QUEUE_PREFIX}{job_id}"
