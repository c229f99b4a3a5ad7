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
#: Per-job durable result queue prefix: ``brokerexec.result.<job id>``.
RESULT_QUEUE_PREFIX: Final = "brokerexec.result."
#: Per-job exclusive RPC queue prefix: ``brokerexec.rpc.<job id>`` (its exclusivity is
#: the ownership token of the job).
RPC_QUEUE_PREFIX: Final = "brokerexec.rpc."
#: How long a result stays retrievable after the job ended (ms).
RESULT_TTL_MS: Final = 24 * 3600 * 1000
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


def rpc_routing_key(job_id: str) -> str:
    """The kiwipy routing key that reaches job ``job_id``."""
    return f"{RPC_TOPIC}.{job_id}"


def event_routing_key(kind: str, service: str, job_id: str) -> str:
    """The events-exchange routing key of one event."""
    return f"{kind}.{service}.{job_id}"


def result_queue(job_id: str) -> str:
    """The durable queue that keeps the final record of job ``job_id``."""
    return f"{RESULT_QUEUE_PREFIX}{job_id}"


def rpc_queue(job_id: str) -> str:
    """The exclusive queue that receives RPCs for job ``job_id``."""
    return f"{RPC_QUEUE_PREFIX}{job_id}"
