"""Every name on the wire: exchanges, queues, routing keys, headers, message types, job ids.

``docs/protocol.md`` documents each of these; change them together. The arguments each
object is declared with are in :mod:`brokerexec.protocol.topology`.
"""

from __future__ import annotations

import itertools
import os
import re
import time
import zlib
from collections.abc import Mapping
from typing import Final

from ..errors import DecodeError

#: Version of the wire protocol: the ``v`` key of launches, events and records.
PROTOCOL_VERSION: Final = 1

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
#: Direct exchange of launches, routing key = the service's name, to the service's own
#: durable queue ``brokerexec.launches.<service>``: a worker consumes the queues of the
#: services it offers, so a fleet of workers with different services shares one broker.
LAUNCHES_EXCHANGE: Final = "brokerexec.launches"
LAUNCH_QUEUE_PREFIX: Final = "brokerexec.launches."
#: Where launches that cannot be decoded (and carry no readable job id) are dead-lettered.
DEAD_LETTER_EXCHANGE: Final = "brokerexec.dead"
DEAD_LETTER_QUEUE: Final = "brokerexec.launch.dead"
#: Topic exchange of job events; routing key ``<kind>.<service>.<job id>``.
EVENTS_EXCHANGE: Final = "brokerexec.events"
#: Fanout exchange and stream of retained control messages (pause_all, abort_all, ...).
CONTROL_EXCHANGE: Final = "brokerexec.control"
CONTROL_STREAM: Final = "brokerexec.control"
#: The queue the history indexers consume (``brokerexec history``), for history queries;
#: it goes with the last of them.
HISTORY_QUEUE: Final = "brokerexec.history"
#: Direct exchange of history queries: each indexer binds ``HISTORY_QUEUE`` to it with the
#: queue's name, and nothing else is bound there, so a user who may write here (a watcher)
#: asks the history store and reaches nothing else. Clients send their queries through it;
#: older ones send them through the default exchange, still answered (an indexer answers
#: only what came through one of the two).
HISTORY_EXCHANGE: Final = "brokerexec.history"
#: Fanout exchange on which every worker answers the ``jobs`` query and RPCs to jobs that
#: are not claimed yet.
WORKERS_EXCHANGE: Final = "brokerexec.workers"
#: The journal: every job's life, from its launch to its final record, in one of
#: ``JOURNAL_BUCKETS`` streams ``brokerexec.jobs.<bucket>`` chosen by the job id
#: (:func:`journal_stream`). Shared structures instead of a queue per job (creating and
#: deleting a queue costs the broker about 2.4 ms of CPU, more than a whole trivial job may).
#: A look-up reads its job's stream from the job's launch time up to its record, so its cost
#: does not grow with what ended since. Few of them: each stream holds two files open on the
#: broker, and each reader two more (a broker at the default limit of 1024 runs out of file
#: descriptors with 256 streams and a scan of them all).
JOURNAL_PREFIX: Final = "brokerexec.jobs."
JOURNAL_BUCKETS: Final = 16
#: Direct exchange bound to each journal stream with the stream's name: the only way a
#: reader appends its probe. A reader believes no entry that came through it (the stream
#: reports the exchange of each delivery), so a user who may write here (a watcher) can end
#: a read early at worst, never forge an entry; and it reaches no other queue.
PROBES_EXCHANGE: Final = "brokerexec.probes"
#: Direct exchange of read-only RPCs (``status``): each claimed job's RPC queue is bound to
#: it with the job id, and each worker's queue of the workers exchange with ``""`` (to
#: locate a job not claimed yet, as through ``WORKERS_EXCHANGE``). The worker answers only
#: the intents marked ``read_only`` that came through it, so a user who may write here (a
#: watcher) looks jobs up but cannot steer them.
STATUS_EXCHANGE: Final = "brokerexec.status"
#: Direct exchange of the workers' leases; each worker's lease queue
#: ``brokerexec.leases.<worker id>`` is bound with its own name. A worker holds one lease
#: per claimed job, unacknowledged; when the worker dies they come back, expire at once and
#: are dead-lettered, by their ``CC`` routing key, into the service's launch queue: the job
#: is launched again, to be resumed from its last checkpoint.
LEASES_EXCHANGE: Final = "brokerexec.leases"
LEASE_QUEUE_PREFIX: Final = "brokerexec.leases."
#: Workers hear kiwipy broadcasts through these, so that the broker, not each worker, drops
#: the ``state_changed`` broadcasts of jobs (two per job, for every worker process): a
#: headers exchange bound to kiwipy's with ``[broadcast]`` sends the messages carrying
#: ``STATE_CHANGED_HEADER`` to a dead end and everything else, unroutable there, to its
#: alternate exchange, a fanout the workers' broadcast queues are bound to.
KIWIPY_FILTER_EXCHANGE: Final = "brokerexec.kiwipy-broadcasts"
KIWIPY_OTHERS_EXCHANGE: Final = "brokerexec.kiwipy-broadcasts.others"
DISCARD_EXCHANGE: Final = "brokerexec.discard"
#: Per-job exclusive RPC queue prefix: ``brokerexec.rpc.<job id>`` (its exclusivity is
#: the ownership token of a claimed job).
RPC_QUEUE_PREFIX: Final = "brokerexec.rpc."
#: A client's own queue, named in its launches' ``reply_to``: records are pushed there.
CLIENT_QUEUE_PREFIX: Final = "brokerexec.client."
#: RabbitMQ's direct reply-to pseudo queue.
DIRECT_REPLY_TO: Final = "amq.rabbitmq.reply-to"

# --- headers and message types --------------------------------------------------------------
#: Headers of a request: the job it is for (when sent to every worker) and its deadline.
JOB_ID_HEADER: Final = "x-job-id"
DEADLINE_HEADER: Final = "x-deadline"  # epoch seconds, int or float
DEADLINE_MS_HEADER: Final = "x-deadline-ms"  # epoch milliseconds, int (pika sends no floats)
#: RabbitMQ's sender-selected distribution: extra routing keys (``CC`` kept, ``BCC`` stripped
#: before delivery; both used again when a message is dead-lettered).
CC_HEADER: Final = "CC"
BCC_HEADER: Final = "BCC"
#: The attempt (execution epoch) a journal entry, lease or event belongs to.
ATTEMPT_HEADER: Final = "x-attempt"
#: A checkpoint entry's time, in integer microseconds: with its attempt, it finds the entry
#: in the stream without parsing its (maybe large) body.
CHECKPOINT_TIME_HEADER: Final = "x-checkpoint-us"
#: The header of the jobs' ``state_changed`` broadcasts that the workers' filter drops.
STATE_CHANGED_HEADER: Final = ("brokerexec-kind", "state_changed")
#: AMQP ``type`` of each kind of journal entry, and of a probe a reader appends to find a
#: stream's end (``protocol/journal.py``).
LAUNCH_TYPE: Final = "brokerexec.launch"
#: One entry for many launches of one ``launch_many()`` (their ids in its body).
LAUNCHES_TYPE: Final = "brokerexec.launches"
#: At most this many job ids in one ``launches`` entry (about 34 KiB, and their requests).
LAUNCHES_PER_ENTRY: Final = 1000
#: A ``launches`` entry holds about this many bytes of launches at most (at least one): a
#: reader looking for one job decodes the entry whole.
LAUNCHES_ENTRY_BYTES: Final = 1024 * 1024
STARTED_TYPE: Final = "brokerexec.started"
CHECKPOINT_TYPE: Final = "brokerexec.checkpoint"
RECORD_TYPE: Final = "brokerexec.record"
PROBE_TYPE: Final = "brokerexec.probe"
#: AMQP ``type`` of an operation's header entry (``protocol/operation_log.py``): not a job's.
OPERATION_TYPE: Final = "brokerexec.operation"
#: AMQP ``type`` of a lease (and of the launch it becomes when its worker dies).
LEASE_TYPE: Final = "brokerexec.lease"
#: AMQP ``type`` of the ``state_changed`` broadcasts jobs send for kiwipy tools.
STATE_CHANGED_TYPE: Final = "brokerexec.state_changed"
#: Content type of every body brokerexec sends.
JSON_CONTENT_TYPE: Final = "application/json"

# --- job ids and service names --------------------------------------------------------------
#: Service names and job ids are single routing-key words: no dots, no wildcards.
NAME_PATTERN: Final = re.compile(r"^[A-Za-z0-9_\-]{1,100}$")
#: Readers of the journal start at the job id's launch time minus this: the launch time is
#: the client's clock, the stream's timestamps the broker's. Clocks further apart than this
#: make a queued job look unknown (its launch entry is before where the reader starts);
#: every entry the reader passes before the job's own costs the look-up its time.
RECORD_TIME_MARGIN: Final = 10.0


def check_name(kind: str, value: object) -> str:
    """Check a service name or job id is one routing-key word; return it."""
    if not isinstance(value, str) or not NAME_PATTERN.match(value):
        raise DecodeError(f"{kind} must be 1-100 letters, digits, '_' or '-'; got {value!r}")
    return value


#: An operation's item key (``brokerexec/operations/``): 1-200 characters, none a control
#: character (a hash of the service and request by default, else the caller's own).
ITEM_KEY_PATTERN: Final = re.compile(r"[^\x00-\x1f\x7f]{1,200}")


def check_item_key(value: object) -> str:
    """Check an operation's item key; return it."""
    if not isinstance(value, str) or not ITEM_KEY_PATTERN.fullmatch(value):
        raise DecodeError(f"an item's key must be 1-200 characters, none a control character; "
                          f"got {value!r:.80}")
    return value


def new_job_id() -> str:
    """A fresh job id: 32 hex digits, one routing-key word.

    The first 12 digits are the launch time in milliseconds (as in UUIDv7), the other 20
    are random: a reader of the journal starts there instead of at the beginning.
    The last two are chosen so that the ids a process makes in a row share a journal stream
    (:data:`IDS_PER_BUCKET` of them, then the next stream): see :func:`_in_bucket`.
    """
    count = next(_ids_made)
    bucket = (_first_bucket + count // IDS_PER_BUCKET) % JOURNAL_BUCKETS
    # os.urandom, not secrets: the same source, without importing hashlib and random.
    return _in_bucket(f"{int(time.time() * 1000):012x}{os.urandom(9).hex()}", bucket)


#: How many ids in a row :func:`new_job_id` puts in one journal stream.
IDS_PER_BUCKET: Final = 64
_ids_made = itertools.count()  # next() on it is atomic: ids may come from any thread
_first_bucket = os.urandom(1)[0] % JOURNAL_BUCKETS  # processes start at different streams
_LAST_DIGITS: Final = tuple(f"{n:02x}".encode() for n in range(256))


def _in_bucket(prefix: str, bucket: int) -> str:
    """``prefix`` and two more hex digits, such that the id is in journal ``bucket``.

    Why: a worker writes the records of the jobs that end together in one batch, and
    RabbitMQ writes what reaches one stream together as one chunk, with one confirm. Spread
    over every stream, a batch cost the broker a chunk, and the worker a confirm frame, per
    record: about a fifth of the broker's CPU per trivial job (``docs/performance.md``).
    Ids made in a row end up together; over time each stream still gets its share.
    """
    start = zlib.crc32(prefix.encode("ascii"))
    for digits in _LAST_DIGITS:  # each hit with odds 1/16: a few tries
        if zlib.crc32(digits, start) % JOURNAL_BUCKETS == bucket:
            return prefix + digits.decode("ascii")
    return prefix + os.urandom(1).hex()  # no two digits do it (never seen): any stream


def job_time(job_id: str) -> float | None:
    """The launch time a brokerexec job id carries, or None (another id format)."""
    if len(job_id) != 32:
        return None
    try:
        stamp = int(job_id[:12], 16) / 1000
    except ValueError:
        return None
    # uuid4 hex also parses: accept only plausible times (2020 .. a day ahead).
    return stamp if 1.5e9 < stamp < time.time() + 86400 else None


def launch_queue(service: str) -> str:
    """The durable queue of service ``service``'s launches."""
    return f"{LAUNCH_QUEUE_PREFIX}{service}"


def journal_bucket(job_id: str) -> int:
    """Which journal stream holds job ``job_id``'s entries (crc32: any id, evenly)."""
    return zlib.crc32(job_id.encode("utf-8")) % JOURNAL_BUCKETS


def journal_stream(job_id: str) -> str:
    """The journal stream of job ``job_id``."""
    return journal_stream_of_bucket(journal_bucket(job_id))


def journal_stream_of_bucket(bucket: int) -> str:
    return f"{JOURNAL_PREFIX}{bucket:02x}"


def lease_queue(worker_id: str) -> str:
    """The lease queue of one worker."""
    return f"{LEASE_QUEUE_PREFIX}{worker_id}"


def rpc_routing_key(job_id: str) -> str:
    """The kiwipy routing key that reaches job ``job_id``."""
    return f"{RPC_TOPIC}.{job_id}"


def rpc_queue(job_id: str) -> str:
    """The exclusive queue that receives RPCs for job ``job_id``."""
    return f"{RPC_QUEUE_PREFIX}{job_id}"


def event_routing_key(kind: str, service: str, job_id: str) -> str:
    """The events-exchange routing key of one event: ``<kind>.<service>.<job id>``."""
    return f"{kind}.{service}.{job_id}"


def job_events_pattern(job_id: str, kind: str = "*") -> str:
    """The topic pattern of one job's events (of one kind, or ``*`` for all)."""
    return f"{kind}.*.{job_id}"


def deadline_ms(seconds: float) -> int:
    """The ``x-deadline-ms`` header value ``seconds`` from now: epoch milliseconds.

    An integer: pika cannot put floats in headers, and AMQP decimals are too narrow.
    """
    return int((time.time() + seconds) * 1000)


#: How far apart two hosts' clocks may be (seconds): no decision brokerexec makes compares
#: one host's time with another's closer than this (docs/durability.md).
CLOCK_SKEW_MARGIN: Final = 60.0


def expired(headers: Mapping[str, object] | None, now: float | None = None,
            margin: float = CLOCK_SKEW_MARGIN) -> bool:
    """True if ``x-deadline`` or ``x-deadline-ms`` in ``headers`` passed over ``margin``
    seconds ago: the deadline is the sender's clock, ``now`` this host's. (What must expire
    on time expires in the broker, by its ``expiration``.)"""
    if not headers:
        return False
    now = (time.time() if now is None else now) - margin
    deadline, deadline_in_ms = headers.get(DEADLINE_HEADER), headers.get(DEADLINE_MS_HEADER)
    return ((isinstance(deadline, int | float) and deadline < now)
            or (isinstance(deadline_in_ms, int) and deadline_in_ms < now * 1000))
