"""Who owns a job, and the proof of it in the broker: the driver of ownership's state machine.

What to do, and when, is decided by :class:`~brokerexec.protocol.ownership.JobOwnership`,
one per job, free of I/O; this module feeds it the events of the broker and carries out its
actions (:meth:`Ownership.feed`). What follows is what those actions do here.

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
from ....protocol import ownership as own
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
from ...base import PreparedJob, WorkerHooks
from ..connection import AmqpConnection, Outgoing
from ..delivery import Delivery
from ..setups import Setup
from . import resume_point
from .journal_writer import JournalWriter
from .leases import Leases
from .owned_job import OwnedJob

__all__ = ["OwnedJob", "Ownership"]  # OwnedJob: owned_job.py

log = logging.getLogger(__name__)

class NotYet(BrokerConnectionError):
    """A step that needs the job's claim verified on this connection, tried before it is."""


#: How RabbitMQ words its refusal of a message over its ``max_message_size``.
_TOO_LARGE = "larger than configured max size"

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
        resume_grace: seconds before a job taken from a lost worker's lease is claimed.
    """

    def __init__(self, connection: AmqpConnection, *, claim_after: float, deliver_rpc: DeliverRpc,
                 abort_copy: AbortCopy, leases: Leases, journal: JournalWriter,
                 resume_grace: float = 0.0) -> None:
        self.connection = connection
        self.claim_after = claim_after
        self.resume_grace = resume_grace
        self.leases = leases
        self.journal = journal
        self.hooks: WorkerHooks | None = None
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

    def _proof_valid(self, owned: OwnedJob) -> bool:
        machine = owned.machine
        if not machine.may_speak(self.connection.generation):
            return False
        return machine.claimed or machine.locked or self._delivery_valid(owned)

    # ---- taking jobs -----------------------------------------------------------------------

    def launch_channel_opened(self, channel: aio_pika.abc.AbstractChannel) -> None:
        """The launch channel is (re)opened: deliveries of the old one are void, so every job
        that ran on one is claimed now, its journal read first (another may have run it)."""
        self._launch_channel = channel
        self._launch_generation += 1
        for owned in list(self._owned.values()):
            self.feed(owned, own.LaunchChannelLost())

    def take(self, job: PreparedJob, delivery: Delivery, lease: Lease | None = None) -> OwnedJob:
        """Own ``job`` on the strength of ``delivery`` (its launch, or ``lease``), and start
        its state machine."""
        if lease is not None:
            machine = own.JobOwnership.of_lease(job.job_id, lease.attempt, handed_over=lease.handed_over)
        else:
            machine = own.JobOwnership.of_launch(job.job_id, redelivered=delivery.redelivered,
                                                 claim_first=self.claim_after <= 0,
                                                 check_first=job.check_journal)
        owned = OwnedJob(job, machine, delivery, self._launch_generation,
                         lease.reply_to if lease is not None else delivery.reply_to, lease=lease)
        self._owned[job.job_id] = owned
        self._run(owned, machine.start())
        return owned

    def came_back(self, job_id: str) -> None:
        """A launch (or lease) of a job that runs here came again: it is claimed now."""
        owned = self._owned.get(job_id)
        if owned is not None:
            self.feed(owned, own.ClaimDue("its launch came back"))

    def _delivery_valid(self, owned: OwnedJob) -> bool:
        channel = self._launch_channel
        return (owned.delivery is not None and owned.generation == self._launch_generation
                and channel is not None and not channel.is_closed)

    def _ack_launch(self, owned: OwnedJob) -> None:
        valid = self._delivery_valid(owned)
        delivery, owned.delivery = owned.delivery, None
        if delivery is not None and valid:  # with the next outbox batch
            self.connection.ack(delivery)

    # ---- the machine's driver --------------------------------------------------------------

    def feed(self, owned: OwnedJob, event: own.Event) -> None:
        """One event of ``owned``: its machine decides, its actions are carried out (loop thread)."""
        self._run(owned, self._decide(owned, event))

    def _run(self, owned: OwnedJob, actions: list[own.Action]) -> None:
        """Carry out ``actions``: those without I/O at once, the rest in order in a task."""
        for index, action in enumerate(actions):
            if type(action) in _WITH_IO:
                self.connection.spawn(self._carry_out(owned, actions[index:]))
                return
            self._do_now_safely(owned, action)

    async def _carry_out(self, owned: OwnedJob, actions: list[own.Action]) -> None:
        """Carry out ``actions`` in order; what one of them answers goes to the machine."""
        for action in actions:
            if type(action) not in _WITH_IO:
                self._do_now_safely(owned, action)
                continue
            try:
                event = await self._perform(owned, action)
            except asyncio.CancelledError as exc:
                if self.connection.closing:
                    raise
                # aiormq cancels what waits on a connection that dies (a channel being
                # opened, a confirm): a failed step, which the machine tries again.
                cut = BrokerConnectionError(f"the connection went during {type(action).__name__} "
                                            f"of {owned.job_id}")
                cut.__cause__ = exc
                event = self._failed(owned, action, cut)
            except Exception as exc:
                event = self._failed(owned, action, exc)
            if event is not None:
                await self._carry_out(owned, self._decide(owned, event))

    def _decide(self, owned: OwnedJob, event: own.Event) -> list[own.Action]:
        actions = owned.machine.handle(event)
        log.debug("job %s: %s -> %s", owned.job_id, event, actions)
        owned.changed.set()  # its waiters look again
        return actions

    def _failed(self, owned: OwnedJob, action: own.Action, exc: BaseException) -> own.Event | None:
        """The event of an action that raised: a failed step, or None for an action that
        answers nothing (logged, and the next goes on)."""
        step = _STEPS.get(type(action))
        (log.info if isinstance(exc, NotYet) else log.warning)(
            "job %s: %s failed: %s", owned.job_id, step or type(action).__name__, exc)
        if step is None:
            return None
        owned.error = exc
        return own.StepFailed(step, repr(exc))

    async def _perform(self, owned: OwnedJob, action: own.Action) -> own.Event | None:
        """One action with I/O; the event that answers it."""
        job = owned.job
        job.attempt = owned.machine.attempt
        if isinstance(action, own.Lock):
            return await self._lock(owned, action.tries)
        if isinstance(action, own.CheckJournal):
            return own.JournalSays(await self._lost_to_another(owned))
        if isinstance(action, own.WriteStarted):
            owned.started_at = await self.journal.started(job.job_id, job.service, job.attempt)
            return own.StartedWritten()
        if isinstance(action, own.HoldLease):
            await self.leases.hold(job.job_id, self.lease_of(owned))
            return own.LeaseHeld(self.connection.generation)
        if isinstance(action, own.WaitGrace):
            return own.GraceOver(await self._grace(owned))
        if isinstance(action, own.ReadResumePoint):
            assert owned.lease is not None
            point = await resume_point.read(self.journal, job.job_id, owned.lease)
            if not point.ended:
                resume_point.apply(owned, owned.lease, point)
            return own.ResumePointRead(point.ended, point.newest)
        if isinstance(action, own.StoreRecord):
            return own.RecordStored() if await self._store_record(owned) else None
        if isinstance(action, own.SendHandOver):
            lease = self.lease_of(owned, handed_over=True)
            await self.journal.hand_over(lease)
            log.info("job %s handed over (attempt %d, %s)", job.job_id, lease.attempt,
                     "from its checkpoint" if lease.checkpoint else "no checkpoint: it restarts")
            return own.HandOverSent()
        if isinstance(action, own.Unlock):
            await self.unlock(owned)
        elif isinstance(action, own.NackLaunch):
            await self._nack_launch(owned, action.delay)
        return None

    def _do_now_safely(self, owned: OwnedJob, action: own.Action) -> None:
        try:
            self._do_now(owned, action)
        except Exception:  # a hook that failed: the job's next actions still happen
            log.exception("job %s: %s failed", owned.job_id, type(action).__name__)

    def _do_now(self, owned: OwnedJob, action: own.Action) -> None:
        """One action without I/O."""
        if isinstance(action, own.AckLaunch):
            self._ack_launch(owned)
        elif isinstance(action, own.ReleaseLease):
            self.leases.release(owned.job_id)
        elif isinstance(action, own.Speak):
            owned.flush(self.connection.post)
        elif isinstance(action, own.Begin):
            self._begin(owned)
        elif isinstance(action, own.Cancel):
            assert self.hooks is not None
            self.hooks.cancel(owned.job, action.reason)
        elif isinstance(action, own.Supersede):
            self._supersede(owned, action.reason)
        elif isinstance(action, own.ClaimLater):
            self.claim_later(owned, self.claim_after if action.delay is None else action.delay)
        elif isinstance(action, own.Forget):
            self._forget(owned)

    def _begin(self, owned: OwnedJob) -> None:
        assert self.hooks is not None
        lease = owned.lease
        if lease is not None:
            lost = lease.worker.get("hostname", "its worker")
            before = "a handover" if lease.handed_over else f"losing {lost}"
            resumed = owned.job.resumed
            start = "from its checkpoint" if resumed and resumed.has_checkpoint else "from the start"
            log.info("job %s resumed here as attempt %d (%s), after %s", owned.job_id, owned.job.attempt,
                     start, before)
        self.hooks.begin(owned.job)

    async def _nack_launch(self, owned: OwnedJob, delay: float) -> None:
        if delay:
            await asyncio.sleep(delay)  # not at once: the same failure would come straight back
        valid = self._delivery_valid(owned)
        delivery, owned.delivery = owned.delivery, None
        if delivery is not None and valid:
            await delivery.nack(requeue=True)

    # ---- claims ----------------------------------------------------------------------------

    async def ensure_claimed(self, owned: OwnedJob) -> bool:
        """Claim ``owned`` (callers share the attempt); False if it is someone else's, or
        being resumed (its resume claims it).

        Raises:
            whatever made the claim fail (it is tried again a second later).
        """
        machine = owned.machine
        failures = machine.failures
        self.feed(owned, own.ClaimDue("asked"))
        while (settled := machine.settled()) is None:
            if machine.failures != failures:
                raise owned.error or BrokerConnectionError(f"the claim of {owned.job_id} failed")
            if machine.resuming:
                return False
            owned.changed.clear()
            await owned.changed.wait()
        return settled

    async def until_valid(self, owned: OwnedJob) -> bool:
        """Wait until this copy may publish for the job; False once it is let go here."""
        while not owned.machine.final:
            if self.connection.closing:
                raise BrokerConnectionError("the connection is closing")
            if self._proof_valid(owned):
                return True
            owned.changed.clear()  # a claim verified again on the new connection sets it
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(owned.changed.wait(), 1.0)
        return False

    async def _lock(self, owned: OwnedJob, tries: int) -> own.Event:
        await self.connection.wait_connected()
        for attempt in range(tries):
            try:
                await self.connection.setups.add(_claim_key(owned.job_id), self._claim_setup(owned))
                return own.Locked()
            except aiormq.exceptions.ChannelLockedResource:
                if attempt + 1 < tries:
                    await asyncio.sleep(0.5)
        return own.LockRefused()

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
                    self.feed(owned, own.Reconnected(self.connection.generation, locked_out=True))
                raise
            await queue.bind(KIWIPY_EXCHANGE, rpc_routing_key(job_id))
            await queue.bind(STATUS_EXCHANGE, job_id)  # read-only RPCs only (SignalServer)
            # Consumed through aiormq's own basic_consume: one task per message, not two.
            underlay = await channel.get_underlay_channel()
            await underlay.basic_consume(queue.name, lambda message: self._deliver_rpc(job_id, message),
                                         no_ack=True)
            if rerun:
                self.feed(owned, own.Reconnected(self.connection.generation))

        return setup

    def claim_later(self, owned: OwnedJob, delay: float) -> None:
        """Claim ``owned`` in ``delay`` seconds (its machine says whether and how)."""
        if owned.timer is not None:
            owned.timer.cancel()
        owned.timer = self.connection.loop.call_later(
            delay, lambda: self.feed(owned, own.ClaimDue("its time came")))

    def _supersede(self, owned: OwnedJob, reason: str) -> None:
        """Another execution owns the job: stop this copy, which publishes nothing from now on."""
        owned.mute(reason)
        self._silenced.add(owned.job_id)
        self.leases.release(owned.job_id)
        if owned.timer is not None:
            owned.timer.cancel()
        log.warning("job %s stopped here: %s", owned.job_id, reason)
        with contextlib.suppress(Exception):
            self._abort_copy(owned.job_id, reason)

    async def _grace(self, owned: OwnedJob) -> bool:
        """Wait the resume grace (the lease's worker may only be reconnecting), looking for
        the job's record meanwhile: True if it ended (a stale copy of a lease goes at once,
        not after the grace)."""
        assert owned.lease is not None
        loop = asyncio.get_running_loop()
        until = loop.time() + self.resume_grace
        early = asyncio.ensure_future(resume_point.read(self.journal, owned.job_id, owned.lease))
        await asyncio.wait({early}, timeout=self.resume_grace)
        if early.done() and not early.cancelled() and early.exception() is None and early.result().ended:
            return True
        # Not cancelled if still reading: closing a stream consumer's channel in the middle
        # of its deliveries is how a worker's connection got closed (504).
        early.add_done_callback(lambda done: done.cancelled() or done.exception())
        await asyncio.sleep(max(until - loop.time(), 0.0))
        return False

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

    def lease_of(self, owned: OwnedJob, *, handed_over: bool = False) -> Lease:
        """The job's lease as it stands (its attempt, its newest checkpoint)."""
        job = owned.job
        return Lease(job.launch, job.attempt, self.journal.worker, owned.started_at, owned.reply_to,
                     owned.checkpoint, handed_over, owned.changes,
                     owned.machine.record_due and not handed_over)

    async def locate(self, job_id: str) -> bool:
        """An RPC came for ``job_id`` through every worker: claim it if it runs here, so it
        can answer; False if it does not run here (or is someone else's)."""
        owned = self._owned.get(job_id)
        if owned is None or owned.resuming:
            return False  # the journal answers ("resuming") until the resume claims it
        try:
            return await self.ensure_claimed(owned)
        except Exception as exc:
            log.warning("claim of %s on request failed: %r", job_id, exc)
            return False

    # ---- the end of a job here -------------------------------------------------------------

    async def end(self, owned: OwnedJob, *, handover: bool = False) -> None:
        """The computation ended: store its record (``owned.record``) or hand it over, as its
        machine says; return once the job is let go here."""
        # Carried out here, not in a task: a short job's end is on the hot path.
        await self._carry_out(owned, self._decide(owned, own.EndDue(handover=handover)))
        while not owned.machine.final:
            if self.connection.closing:
                raise BrokerConnectionError("the connection is closing")
            await asyncio.wait({owned.let_go}, timeout=1.0)

    async def _store_record(self, owned: OwnedJob) -> bool:
        """Store the job's record; False if this copy was superseded (it stores nothing).

        Raises:
            NotYet: its claim is not verified on this connection yet (a reconnect): the
                machine tries again in a second, verifying it first.
        """
        assert owned.record is not None
        if owned.machine.superseded:
            return False
        if not self._proof_valid(owned):
            raise NotYet(f"the claim of {owned.job_id} is not verified on this connection yet")
        while True:
            try:
                await self.journal.record(owned.record, owned.reply_to)
                return True
            except Exception as exc:
                # The broker's max_message_size is below --max-result-bytes: retrying would
                # never end. The job fails, saying so, in a record that fits.
                smaller = owned.record.too_large(
                    f"the record of job {owned.job_id} with its result, last progress and "
                    f"improved value is larger than the broker takes: {exc}"
                ) if _TOO_LARGE in str(exc) else None
                if smaller is None:
                    raise
                owned.record = smaller
                log.warning("the record of %s was refused as too large; failing the job", owned.job_id)

    async def unlock(self, owned: OwnedJob) -> None:
        """Let go of the job's queue, deleted before this returns: the job id is unroutable
        and free to claim from here on (closing its channel alone would delete it a moment
        later, as an auto-delete queue whose consumer went)."""
        name = rpc_queue(owned.job_id)

        async def delete(channel: aio_pika.abc.AbstractChannel) -> None:
            await (await channel.get_underlay_channel()).queue_delete(name)

        await self.connection.setups.remove(_claim_key(owned.job_id), delete)

    def _forget(self, owned: OwnedJob) -> None:
        """The job is done with here: if it ran here, remember that (its launch may come
        back); one dropped before it ran may come back to run here after all."""
        job_id = owned.job_id
        if owned.timer is not None:
            owned.timer.cancel()
        if self._owned.get(job_id) is owned:
            del self._owned[job_id]
        if not owned.let_go.done():
            owned.let_go.set_result(None)
        if not owned.machine.superseded:  # a superseded copy may still be running: it stays mute
            self._silenced.discard(job_id)
        if owned.machine.phase is own.Phase.DROPPED:
            return
        self._ended[job_id] = None
        if len(self._ended) > ENDED_KEPT:
            self._ended.popitem(last=False)


#: The actions that do I/O (carried out in a task); the others are done at once.
_WITH_IO: frozenset[type] = frozenset({own.Lock, own.CheckJournal, own.WriteStarted, own.HoldLease,
                                       own.WaitGrace, own.ReadResumePoint, own.StoreRecord,
                                       own.SendHandOver, own.Unlock, own.NackLaunch})

#: The actions answered by an event, and the step a failure of each is named by.
_STEPS: dict[type, str] = {
    own.Lock: "lock", own.CheckJournal: "journal", own.WriteStarted: "started", own.HoldLease: "lease",
    own.WaitGrace: "grace", own.ReadResumePoint: "resume point", own.StoreRecord: "record",
    own.SendHandOver: "handover"}


def _claim_key(job_id: str) -> str:
    """The setup key of a job's claim."""
    return f"job:{job_id}"
