"""Who owns a job, and the proof of it in the broker: the one home of job ownership.

A job belongs to exactly one execution, numbered by its **attempt**; the proof lives in the
broker, so it dies with the worker's connection: at first the unacknowledged delivery of its
launch; once **claimed**, the exclusive queue ``brokerexec.rpc.<job id>`` (which receives the
job's RPCs), a ``started`` entry in the journal and a held **lease** (``leases.py``) that
comes back as a launch to resume the job if this worker dies. The launch is acked then.

A job is claimed when it has run ``claim_after`` seconds, when a client asks for it, when it
checkpoints, when its launch comes back redelivered or as a lease (before it starts), and
after a reconnect. A job shorter than ``claim_after`` never pays for a queue, an entry or a
lease (together they cost the broker more than a trivial job).

**Fencing.** An exclusive queue alone is a hint, not a fence: after a reconnect (a network
cut healed, a SIGSTOPped process continued) this worker may claim again a job that was
resumed, and maybe finished, elsewhere meanwhile. So a claim made again reads the job's
journal first: a record, or a ``started`` entry of a newer attempt (or of the same attempt
by another worker), means this copy is **superseded**: it stops at its next ``ready()``,
publishes nothing (no events, record or checkpoint) and lets its lease go. Until its claim
is verified again on the new connection, a job's events are held.

Everything runs on the connection's loop thread, but :meth:`Ownership.speak` and ``silenced``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from typing import Any

import aio_pika.abc
import aiormq.abc
import aiormq.exceptions

from ....errors import BrokerConnectionError
from ....protocol import topology
from ....protocol.journal import Entry
from ....protocol.messages import Lease
from ....protocol.names import (
    CHECKPOINT_TYPE,
    KIWIPY_EXCHANGE,
    STARTED_TYPE,
    STATUS_EXCHANGE,
    rpc_queue,
    rpc_routing_key,
)
from ...base import PreparedJob
from ..connection import AmqpConnection, Outgoing
from ..delivery import Delivery
from ..setups import Setup
from .journal_writer import JournalWriter
from .leases import Leases
from .owned_job import OwnedJob

__all__ = ["OwnedJob", "Ownership"]  # OwnedJob: owned_job.py

log = logging.getLogger(__name__)

#: How many ended job ids a worker remembers, to drop their launches if they come back.
ENDED_KEPT = 10_000

#: Delivers one RPC message to a claimed job (the signal server's).
DeliverRpc = Callable[[str, aiormq.abc.DeliveredMessage], Coroutine[Any, Any, None]]
#: Stops this worker's copy of a job, silently (the worker's hooks).
AbortCopy = Callable[[str, str], None]


class Ownership:
    """See the module docstring.

    Parameters:
        connection: the worker's connection.
        claim_after: seconds a job runs before it is claimed (0: claim before it starts).
        deliver_rpc: where a claimed job's RPC queue delivers.
        abort_copy: stops this worker's copy of a job that another execution owns.
        leases: this worker's leases.
        journal: this worker's writes to the journal.
    """

    def __init__(self, connection: AmqpConnection, *, claim_after: float, deliver_rpc: DeliverRpc,
                 abort_copy: AbortCopy, leases: Leases, journal: JournalWriter) -> None:
        self.connection = connection
        self.claim_after = claim_after
        self.leases = leases
        self.journal = journal
        self._deliver_rpc = deliver_rpc
        self._abort_copy = abort_copy
        self._owned: dict[str, OwnedJob] = {}
        self._silenced: set[str] = set()  # superseded jobs; read from computation threads
        # Jobs that ended here: their launch may still come back (redelivered after a
        # reconnect, or held while the job ran) and must not run them again.
        self._ended: OrderedDict[str, None] = OrderedDict()
        self._launch_channel: aio_pika.abc.AbstractChannel | None = None
        self._launch_generation = 0

    # ---- what is known ---------------------------------------------------------------------

    def get(self, job_id: str) -> OwnedJob | None:
        """The job, if it runs here."""
        return self._owned.get(job_id)

    def jobs(self) -> list[OwnedJob]:
        return list(self._owned.values())  # every job owned here now

    def ran_here(self, job_id: str) -> bool:
        """True if the job runs here now or ended here."""
        return job_id in self._owned or job_id in self._ended

    def silenced(self, job_id: str) -> bool:
        """True for a copy that lost its claim: the owner speaks for the job (any thread)."""
        return job_id in self._silenced

    def attempt_of(self, job_id: str) -> int | None:
        """The execution of the job that runs here."""
        owned = self._owned.get(job_id)
        return owned.job.attempt if owned is not None else None

    def speak(self, job_id: str, items: list[Outgoing]) -> None:
        """Publish the job's events (any thread): now while its proof holds on this connection;
        held while its claim is verified again after a reconnect; dropped if superseded."""
        owned = self._owned.get(job_id)
        if owned is None:
            if job_id not in self._silenced:
                for item in items:
                    self.connection.post(item)
            return
        owned.speak(items, lambda: self._proof_valid(owned), self.connection.post)

    def _verified(self, owned: OwnedJob) -> None:
        """The claim holds on this connection: the job may speak, what it held goes out."""
        owned.verified = self.connection.generation
        owned.changed.set()
        owned.flush(self.connection.post)

    def _proof_valid(self, owned: OwnedJob) -> bool:
        if owned.claimed:
            return owned.verified == self.connection.generation
        if owned.locked:
            return not owned.check_journal
        return self._delivery_valid(owned)

    # ---- taking jobs -----------------------------------------------------------------------

    def launch_channel_opened(self, channel: aio_pika.abc.AbstractChannel) -> None:
        """The launch channel is (re)opened: deliveries of the old one are void, so every job
        that ran on one is claimed now, its journal read first (another may have run it)."""
        self._launch_channel = channel
        self._launch_generation += 1
        for owned in list(self._owned.values()):
            if not owned.locked and not owned.superseded:
                owned.check_journal = True
                self.claim_later(owned, 0)

    def take(self, job: PreparedJob, delivery: Delivery,
             reply_to: str | None = None) -> OwnedJob:
        """Own ``job`` on the strength of its unacknowledged launch ``delivery``."""
        owned = OwnedJob(job, delivery, self._launch_generation, reply_to or delivery.reply_to)
        self._owned[job.job_id] = owned
        return owned

    def drop(self, job_id: str) -> None:
        """Forget a job that will not run here after all."""
        owned = self._owned.pop(job_id, None)
        self._silenced.discard(job_id)
        if owned is not None:
            self._ack_launch(owned)
            if owned.locked:
                self.connection.spawn(self.connection.setups.remove(_claim_key(job_id)))

    def _delivery_valid(self, owned: OwnedJob) -> bool:
        channel = self._launch_channel
        return (owned.delivery is not None and owned.generation == self._launch_generation
                and channel is not None and not channel.is_closed)

    def _ack_launch(self, owned: OwnedJob) -> None:
        valid = self._delivery_valid(owned)
        delivery, owned.delivery = owned.delivery, None
        if delivery is not None and valid:  # with the next outbox batch
            self.connection.ack(delivery)

    # ---- claims ----------------------------------------------------------------------------

    async def lock(self, owned: OwnedJob, *, tries: int = 1) -> bool:
        """Take the job's exclusive queue (callers share the attempt); False (and the copy
        superseded) if another holds it after ``tries`` attempts, half a second apart."""
        if owned.locking is None and not owned.locked:
            owned.locking = asyncio.get_running_loop().create_task(self._lock(owned, tries))
        if owned.locking is None:
            return True
        try:
            return await asyncio.shield(owned.locking)
        finally:
            if owned.locking is not None and owned.locking.done():
                owned.locking = None

    async def _lock(self, owned: OwnedJob, tries: int) -> bool:
        await self.connection.wait_connected()
        for attempt in range(tries):
            try:
                await self.connection.setups.add(_claim_key(owned.job_id), self._claim_setup(owned))
                owned.locked = True
                return True
            except aiormq.exceptions.ChannelLockedResource:
                if attempt + 1 < tries:
                    await asyncio.sleep(0.5)
        self.supersede(owned, "another worker claimed it")
        self._ack_launch(owned)  # a duplicate launch, or a lease its holder still holds
        return False

    def _claim_setup(self, owned: OwnedJob) -> Setup:
        job_id = owned.job_id

        async def setup(channel: aio_pika.abc.AbstractChannel) -> None:
            rerun = owned.lock_runs > 0
            owned.lock_runs += 1
            try:
                queue = await channel.declare_queue(rpc_queue(job_id), exclusive=True, auto_delete=True,
                                                    arguments=dict(topology.RPC_QUEUE_ARGUMENTS))
            except aiormq.exceptions.ChannelLockedResource:
                if rerun:  # our dead connection's, not let go yet, or another execution's
                    self.connection.spawn(self._reverify(owned, locked_out=True))
                raise
            await queue.bind(KIWIPY_EXCHANGE, rpc_routing_key(job_id))
            await queue.bind(STATUS_EXCHANGE, job_id)  # read-only RPCs only (SignalServer)
            # Consumed through aiormq's own basic_consume: one task per message, not two.
            underlay = await channel.get_underlay_channel()
            await underlay.basic_consume(queue.name, lambda message: self._deliver_rpc(job_id, message),
                                         no_ack=True)
            if rerun and owned.claimed:
                self.connection.spawn(self._reverify(owned, locked_out=False))

        return setup

    async def ensure_claimed(self, owned: OwnedJob) -> bool:
        """Claim ``owned`` once (callers share the attempt); False if it is someone else's."""
        if owned.claimed:
            return True
        if owned.superseded:
            return False
        if owned.claiming is None:
            owned.claiming = asyncio.get_running_loop().create_task(self._claim(owned))
        try:
            return await asyncio.shield(owned.claiming)
        finally:
            if owned.claiming is not None and owned.claiming.done() and not owned.claimed:
                owned.claiming = None  # a failed attempt may be tried again

    async def _claim(self, owned: OwnedJob) -> bool:
        if not await self.lock(owned):
            return False
        if owned.check_journal:
            lost = await self._lost_to_another(owned)
            if lost:
                await self._let_go(owned, lost)
                return False
            owned.check_journal = False
        if owned.ending or self._owned.get(owned.job_id) is not owned:
            return True  # it ends now: its record needs the lock, not a lease
        job = owned.job
        if not owned.started_at:
            owned.started_at = await self.journal.started(job.job_id, job.service, job.attempt)
        await self.leases.hold(job.job_id, self.lease_of(owned))
        owned.claimed = True
        self._verified(owned)
        if owned.timer is not None:
            owned.timer.cancel()
        self._ack_launch(owned)
        return True

    async def _reverify(self, owned: OwnedJob, *, locked_out: bool) -> None:
        """The claim's setup ran again (a reconnect): is the job still this execution's?"""
        try:
            lost = await self._lost_to_another(owned)
            if lost:
                await self._let_go(owned, lost)
                return
            if locked_out:
                return  # still ours: the setup retries until the broker lets go of the old queue
            await self.leases.hold(owned.job_id, self.lease_of(owned))
            self._verified(owned)
        except Exception as exc:  # the journal or the lease could not be reached: again soon
            if owned.job_id in self._owned and not owned.superseded:
                log.warning("verifying the claim of %s failed (%r); again in 1 s", owned.job_id, exc)
                self.connection.loop.call_later(1.0, lambda: self.connection.spawn(
                    self._reverify(owned, locked_out=locked_out)))

    async def _lost_to_another(self, owned: OwnedJob) -> str:
        """Why the job is not this execution's any more, as the journal shows it ("" if it is):
        it ended, or it ran in another execution since ours."""
        attempt, me = owned.job.attempt, self.journal.worker.get("id")

        def mine(entries: list[Entry]) -> bool:
            # Our own newest entry: written while this execution was the job's; whatever
            # made it someone else's came after it. So the read costs what was written
            # since then, not since the job began.
            return any(e.body.get("attempt") == attempt and (
                e.kind == CHECKPOINT_TYPE
                or (e.kind == STARTED_TYPE and (e.body.get("worker") or {}).get("id") == me))
                for e in entries)

        search = await self.journal.search_back(owned.job_id, mine)
        history = search.history
        if history.record is not None:
            return f"it ended already ({history.record.get('state')})"
        worker = (history.started or {}).get("worker") or {}
        if history.attempt > owned.job.attempt:
            return f"it was resumed elsewhere (attempt {history.attempt}, on {worker.get('hostname', '?')})"
        if history.attempt == owned.job.attempt and worker.get("id") != self.journal.worker.get("id"):
            return f"another worker ({worker.get('hostname', '?')}) started it"
        return ""

    async def _let_go(self, owned: OwnedJob, reason: str) -> None:
        self.supersede(owned, reason)
        await self.unlock(owned)

    def lease_of(self, owned: OwnedJob, *, handed_over: bool = False) -> Lease:
        """The job's lease as it stands (its attempt, its newest checkpoint)."""
        job = owned.job
        return Lease(job.launch, job.attempt, self.journal.worker, owned.started_at, owned.reply_to,
                     owned.checkpoint, handed_over, owned.changes, owned.record_due and not handed_over)

    async def locate(self, job_id: str) -> bool:
        """An RPC came for ``job_id`` through every worker: claim it if it runs here, so it
        can answer; False if it does not run here (or is someone else's)."""
        owned = self._owned.get(job_id)
        if owned is not None and owned.resuming:
            return False  # the journal answers ("resuming") until the resume claims it
        try:
            return owned is not None and await self.ensure_claimed(owned)
        except Exception as exc:
            log.warning("claim of %s on request failed: %r", job_id, exc)
            return False

    def claim_later(self, owned: OwnedJob, delay: float) -> None:
        """Claim ``owned`` in ``delay`` seconds (again a second after a failed attempt)."""
        async def claim() -> None:
            if owned.resuming:
                return  # its resume claims it, as the attempt the journal says
            try:
                await self.ensure_claimed(owned)
            except Exception as exc:
                if owned.job_id in self._owned and not owned.superseded:
                    log.warning("claim of %s failed (%r); again in 1 s", owned.job_id, exc)
                    self.claim_later(owned, 1.0)

        if owned.timer is not None:
            owned.timer.cancel()
        owned.timer = self.connection.loop.call_later(delay, lambda: self.connection.spawn(claim()))

    def supersede(self, owned: OwnedJob, reason: str) -> None:
        """Another execution owns the job: stop this copy, which publishes nothing from now on."""
        if owned.superseded:
            return
        owned.mute(reason)
        self._silenced.add(owned.job_id)
        self.leases.release(owned.job_id)
        if owned.timer is not None:
            owned.timer.cancel()
        log.warning("job %s stopped here: %s", owned.job_id, reason)
        with contextlib.suppress(Exception):
            self._abort_copy(owned.job_id, reason)

    async def until_valid(self, owned: OwnedJob) -> bool:
        """Wait until this copy may publish for the job; False if it is superseded."""
        while not owned.superseded:
            if self.connection.closing:
                raise BrokerConnectionError("the connection is closing")
            if self._proof_valid(owned):
                return True
            if not owned.claimed:
                if not await self.ensure_claimed(owned):
                    return False
                continue
            owned.changed.clear()  # a claim verified again on the new connection sets it
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(owned.changed.wait(), 1.0)
        return False

    # ---- the end of a job here (owner_writes.py) -------------------------------------------

    async def unlock(self, owned: OwnedJob) -> None:
        """Let go of the job's queue, deleted before this returns: the job id is unroutable
        and free to claim from here on (closing its channel alone would delete it a moment
        later, as an auto-delete queue whose consumer went)."""
        if owned.locked:
            name = rpc_queue(owned.job_id)

            async def delete(channel: aio_pika.abc.AbstractChannel) -> None:
                await (await channel.get_underlay_channel()).queue_delete(name)

            await self.connection.setups.remove(_claim_key(owned.job_id), delete)
            owned.locked = False

    async def release(self, owned: OwnedJob | None) -> None:
        """Let go of the job's proofs: its lease, its queue (or its launch's delivery)."""
        if owned is None:
            return
        self.leases.release(owned.job_id)
        if owned.locked:
            await self.unlock(owned)
        else:
            self._ack_launch(owned)

    def forget(self, job_id: str, owned: OwnedJob | None) -> None:
        """The job ended here (or went elsewhere): remember it ended, forget the rest."""
        if owned is not None:
            if owned.timer is not None:
                owned.timer.cancel()
            if self._owned.get(job_id) is owned:
                del self._owned[job_id]
            if not owned.superseded:  # a superseded copy may still be running: it stays mute
                self._silenced.discard(job_id)
        self._ended[job_id] = None
        if len(self._ended) > ENDED_KEPT:
            self._ended.popitem(last=False)


def _claim_key(job_id: str) -> str:
    """The setup key of a job's claim."""
    return f"job:{job_id}"
