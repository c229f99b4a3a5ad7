"""Who owns a job, decided once and free of I/O: one state machine per job a worker holds.

A worker's transports (RabbitMQ's ``transport/rabbitmq/worker/ownership.py``, the in-memory
``transport/memory/worker.py``) feed :class:`JobOwnership` the **events** that happen to a
job (its launch taken, its queue locked, its journal read, its lease held, a reconnect, a
duplicate delivery, a failure) and carry out the **actions** it returns; they decide
nothing themselves. As :mod:`.calls` is for a client, this is the one place where the
rules of ownership live, and where they are tested without a broker
(``tests/test_ownership_machine.py``):

* A job is first held on its unacknowledged launch (``TAKEN``): a job shorter than
  ``claim_after`` never pays for a claim. A launch its broker *redelivered* (someone had it
  before), and every launch when ``claim_after`` is 0, is claimed before it begins.
* **Claiming** takes, in order: the job's exclusive queue (:class:`Lock`); the journal,
  read for a newer execution or a record when an earlier one may exist
  (:class:`CheckJournal`: a redelivered launch, a reconnect, a lost launch channel); a
  ``started`` entry (:class:`WriteStarted`); the lease (:class:`HoldLease`). Only then is
  the launch acknowledged, the events held meanwhile published (:class:`Speak`), and, for a
  claim made before it began, the computation begun (:class:`Begin`).
* A job taken from a **lease** (``RESUMING``: its worker died, or handed it over) waits the
  resume grace (its worker may only be reconnecting; a record found meanwhile drops the
  lease at once), locks, reads where to resume (:class:`ReadResumePoint`), and is claimed
  as the next attempt, past any ``started`` entry newer than its lease (a worker killed
  between its ``started`` entry and its lease). A status asked meanwhile does not claim it:
  the journal answers ``resuming`` until the resume does.
* A claim that **fails** before the job began gives the launch back (:class:`NackLaunch`)
  and lets go of the queue: never locked without a lease. One that fails while the job runs
  is tried again a second later (:class:`ClaimLater`).
* Another holder of the queue, or a journal that shows a record or a newer execution,
  **supersedes** this copy: it is muted and stopped, and stores nothing from then on.
* The **end**: a record is stored only once a lease that says so is held (a resumer looks
  for a record only then); a job never claimed stores it on the strength of its launch (or
  of its queue, if the launch channel was lost). A handover lets go of the queue, then sends
  the lease.
* After a **reconnect** a claim is verified again (the journal first), and its events are
  held until it is: a copy superseded meanwhile never speaks.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "AckLaunch",
    "Action",
    "Begin",
    "Cancel",
    "CheckJournal",
    "ClaimDue",
    "ClaimLater",
    "EndDue",
    "Event",
    "Forget",
    "GraceOver",
    "HandOverSent",
    "HoldLease",
    "JobOwnership",
    "JournalSays",
    "LaunchChannelLost",
    "LeaseHeld",
    "Lock",
    "LockRefused",
    "Locked",
    "NackLaunch",
    "Phase",
    "ReadResumePoint",
    "Reconnected",
    "RecordStored",
    "ReleaseLease",
    "ResumePointRead",
    "SendHandOver",
    "Speak",
    "StartedWritten",
    "StepFailed",
    "StoreRecord",
    "Supersede",
    "Unlock",
    "WaitGrace",
]


class Phase(enum.Enum):
    """Where a job stands with the worker that holds it."""

    TAKEN = "taken"  # runs on its unacknowledged launch, not claimed (yet)
    RESUMING = "resuming"  # from a lease: the grace, the lock and the journal, before it runs
    CLAIMING = "claiming"  # the claim's steps are under way
    CLAIMED = "claimed"  # queue, started entry and lease held: the job is this execution's
    ENDING = "ending"  # its record or its handover is on the way
    ENDED = "ended"  # let go: its record stored, or handed over
    SUPERSEDED = "superseded"  # another execution owns it: this copy is mute
    DROPPED = "dropped"  # it never ran here (it ended, another holds it, its claim failed)


#: The phases a job never leaves.
FINAL = frozenset({Phase.ENDED, Phase.SUPERSEDED, Phase.DROPPED})


# ---- events: what happened -------------------------------------------------------------------

@dataclass(frozen=True)
class ClaimDue:
    """Claim the job now: ``claim_after`` passed, a client asked for it, a checkpoint or a
    change needs a lease, or its launch came back while it runs here."""

    why: str = ""


@dataclass(frozen=True)
class LaunchChannelLost:
    """The channel its launch came on closed: the delivery is void (the broker gives it to
    another worker), so the job is claimed now, its journal read first."""


@dataclass(frozen=True)
class GraceOver:
    """The resume grace passed; ``ended``: a record was found meanwhile."""

    ended: bool = False


@dataclass(frozen=True)
class Locked:
    """The job's exclusive queue is this worker's."""


@dataclass(frozen=True)
class LockRefused:
    """Another connection holds the job's queue."""


@dataclass(frozen=True)
class JournalSays:
    """The journal read for fencing: ``lost`` says why the job is not this execution's any
    more (a record, a newer attempt, another worker's start), or is empty if it still is."""

    lost: str = ""


@dataclass(frozen=True)
class ResumePointRead:
    """Where a resume starts: ``ended`` if the job has a record; ``newest``, the newest
    attempt the journal shows (a started entry may be newer than the lease)."""

    ended: bool = False
    newest: int = 0


@dataclass(frozen=True)
class StartedWritten:
    """This attempt's ``started`` entry is in the journal."""


@dataclass(frozen=True)
class LeaseHeld:
    """The lease, as :meth:`JobOwnership.lease_says_ending` says, is held on connection
    ``generation``."""

    generation: int


@dataclass(frozen=True)
class StepFailed:
    """An action failed (the broker refused or could not be reached): ``step`` names it."""

    step: str
    error: str = ""


@dataclass(frozen=True)
class Reconnected:
    """A new connection (number ``generation``) made the job's queue again, or was
    ``locked_out`` of it (the old connection's queue not gone yet, or another's)."""

    generation: int
    locked_out: bool = False


@dataclass(frozen=True)
class EndDue:
    """The computation ended: store its record, or (``handover``) hand the job over."""

    handover: bool = False


@dataclass(frozen=True)
class RecordStored:
    """The job's record is in the journal."""


@dataclass(frozen=True)
class HandOverSent:
    """The handed-over lease is in the job's launch queue."""


Event = (ClaimDue | LaunchChannelLost | GraceOver | Locked | LockRefused | JournalSays
         | ResumePointRead | StartedWritten | LeaseHeld | StepFailed | Reconnected | EndDue
         | RecordStored | HandOverSent)


# ---- actions: what to do -----------------------------------------------------------------

@dataclass(frozen=True)
class WaitGrace:
    """Wait the resume grace, looking for a record meanwhile; then :class:`GraceOver`."""


@dataclass(frozen=True)
class Lock:
    """Take the job's exclusive queue (``tries`` times, half a second apart): then
    :class:`Locked` or :class:`LockRefused`."""

    tries: int = 1


@dataclass(frozen=True)
class CheckJournal:
    """Read the journal back to this execution's newest entry: then :class:`JournalSays`."""


@dataclass(frozen=True)
class ReadResumePoint:
    """Read the checkpoint the lease points at and look for a record: then
    :class:`ResumePointRead`."""


@dataclass(frozen=True)
class WriteStarted:
    """Write the ``started`` entry of :attr:`JobOwnership.attempt`: then :class:`StartedWritten`."""


@dataclass(frozen=True)
class HoldLease:
    """Hold (or replace) the job's lease: then :class:`LeaseHeld`."""


@dataclass(frozen=True)
class AckLaunch:
    """Acknowledge the launch (or lease) delivery: the claim stands for the job now."""


@dataclass(frozen=True)
class NackLaunch:
    """Give the delivery back to its queue, after ``delay`` seconds (a failure that came
    at once would come straight back)."""

    delay: float = 0.0


@dataclass(frozen=True)
class Begin:
    """Begin the computation, as attempt :attr:`JobOwnership.attempt`."""


@dataclass(frozen=True)
class Cancel:
    """The job will not run here: give its slot back, saying why."""

    reason: str


@dataclass(frozen=True)
class Supersede:
    """Another execution owns the job: mute this copy (nothing published from now on),
    let its lease go and stop its computation."""

    reason: str


@dataclass(frozen=True)
class Speak:
    """The claim holds on this connection: publish the events held meanwhile."""


@dataclass(frozen=True)
class ClaimLater:
    """Claim again in ``delay`` seconds (None: ``claim_after``): :class:`ClaimDue` then."""

    delay: float | None = None


@dataclass(frozen=True)
class StoreRecord:
    """Store the job's record (retried until stored): then :class:`RecordStored`."""


@dataclass(frozen=True)
class SendHandOver:
    """Send the handed-over lease to the launch queue: then :class:`HandOverSent`."""


@dataclass(frozen=True)
class Unlock:
    """Delete the job's queue: its id is unroutable and free to claim from here on."""


@dataclass(frozen=True)
class ReleaseLease:
    """Stop holding the job's lease (acked: it never comes back)."""


@dataclass(frozen=True)
class Forget:
    """The job is done with here: remember only that it ran here."""


Action = (WaitGrace | Lock | CheckJournal | ReadResumePoint | WriteStarted | HoldLease | AckLaunch
          | NackLaunch | Begin | Cancel | Supersede | Speak | ClaimLater | StoreRecord | SendHandOver
          | Unlock | ReleaseLease | Forget)


# ---- the machine -----------------------------------------------------------------------------

@dataclass(eq=False)
class JobOwnership:
    """One job's ownership by this worker (see the module docstring).

    Make one with :meth:`of_launch` or :meth:`of_lease`, take its first actions from
    :meth:`start`, then feed it each event with :meth:`handle` and carry out what it returns,
    in order. Every action that names a result event is answered with it (or with
    :class:`StepFailed`). Not thread-safe: one driver (a loop thread) feeds it.
    """

    job_id: str
    attempt: int
    #: Came from a lease: ``"lease"``, ``"handover"``; or a launch: ``"launch"``, ``"redelivered"``.
    origin: str
    resuming: bool = False  # from a lease, not claimed yet: a status is answered by the journal
    claim_wanted: bool = False  # claim it (now, or once the claim under way is done)
    locked: bool = False  # holds the job's exclusive queue
    must_check: bool = False  # an earlier execution may exist: read the journal first
    started: bool = False  # this attempt's started entry is written
    claimed: bool = False  # and its lease held (once: after a reconnect it is verified again)
    verified: int | None = None  # the connection generation its lease was last held on
    generation: int = 0  # the connection's, as last told
    locked_out: bool = False  # a reconnect could not make the queue again yet
    launch_valid: bool = True  # its launch delivery still stands for it
    acked: bool = False  # the delivery is acknowledged (or given back)
    begun: bool = False
    step: str = ""  # the step under way, answered by its event ("": none)
    end: str = ""  # "record" or "handover", once the computation ended
    record_due: bool = False  # its leases say its record is on the way
    ending_held: bool = False  # and such a lease is held: the record may be written
    ended_as: Phase | None = None  # ENDED, SUPERSEDED or DROPPED
    why: str = ""  # why it was superseded or dropped
    failures: int = 0  # steps failed so far (a waiter learns of one by this)

    # ---- making one ------------------------------------------------------------------------

    @classmethod
    def of_launch(cls, job_id: str, *, redelivered: bool = False, claim_first: bool = False,
                  check_first: bool = False) -> JobOwnership:
        """A job taken from its launch; ``claim_first``: claimed before it begins (a
        ``claim_after`` of 0); a ``redelivered`` launch always is, its journal read first
        (``check_first`` asks for that read for any launch)."""
        return cls(job_id, 1, "redelivered" if redelivered else "launch",
                   claim_wanted=claim_first or redelivered or check_first,
                   must_check=redelivered or check_first)

    @classmethod
    def of_lease(cls, job_id: str, attempt: int, *, handed_over: bool = False) -> JobOwnership:
        """A job taken from a lease of execution ``attempt`` (its worker died, or, if
        ``handed_over``, stopped gracefully); it runs as the next attempt once claimed."""
        return cls(job_id, attempt, "handover" if handed_over else "lease", resuming=True)

    def start(self) -> list[Action]:
        """The first actions."""
        if self.resuming:
            # A handed-over job's queue is gone before its lease is sent: no grace, and a
            # few tries ride out a broker a moment behind.
            self.step = "lock" if self.origin == "handover" else "grace"
            return [Lock(tries=5)] if self.origin == "handover" else [WaitGrace()]
        if self.claim_wanted:
            return self._next()
        self.begun = True
        return [Begin(), ClaimLater()]

    # ---- what it says ------------------------------------------------------------------------

    @property
    def phase(self) -> Phase:
        if self.ended_as is not None:
            return self.ended_as
        if self.resuming:
            return Phase.RESUMING
        if self.end:
            return Phase.ENDING
        if self.claimed:
            return Phase.CLAIMED
        return Phase.CLAIMING if self.claim_wanted else Phase.TAKEN

    @property
    def final(self) -> bool:
        return self.ended_as is not None

    @property
    def superseded(self) -> bool:
        return self.ended_as is Phase.SUPERSEDED

    def may_speak(self, generation: int) -> bool:
        """True if the job's events may go out on connection ``generation`` now."""
        if self.ended_as in (Phase.SUPERSEDED, Phase.DROPPED):
            return False
        if self.claimed:
            return self.verified == generation and not self.must_check
        if self.locked:
            return not self.must_check
        return self.launch_valid

    def settled(self) -> bool | None:
        """For a waiter of a claim: True once the job is this execution's (or its end no
        longer needs a claim), False if it never will be here, None while undecided."""
        if self.ended_as in (Phase.SUPERSEDED, Phase.DROPPED):
            return False
        if self.ended_as is Phase.ENDED or self.claimed:
            return True
        if self.end and self.locked and not self.must_check:
            return True
        return None

    # ---- events ------------------------------------------------------------------------------

    def handle(self, event: Event) -> list[Action]:
        """Take one event; return the actions to carry out, in order."""
        if self.final:
            if isinstance(event, EndDue) and self.ended_as is Phase.SUPERSEDED:
                return [Forget()]  # a superseded copy's end stores nothing
            return []
        could_speak = self.may_speak(self.generation)
        actions = _HANDLERS[type(event)](self, event)
        if not could_speak and self.begun and self.may_speak(self.generation):
            actions.insert(0, Speak())  # verified (again): what it held goes out first
        return actions

    def _next(self) -> list[Action]:
        """The next step, from what is done so far (none while one is under way)."""
        if self.final or self.resuming or self.step:
            return []
        return self._next_claimed() if self.claimed else self._next_unclaimed()

    def _next_unclaimed(self) -> list[Action]:
        if not self.claim_wanted:
            if self.end == "record":  # never claimed: its launch stands for it
                return self._do("record", StoreRecord())
            return []
        if not self.locked:
            return self._do("lock", Lock())
        if self.must_check:
            return self._do("journal", CheckJournal())
        if self.end == "record":  # it ends now: its record needs the queue, not a lease
            return self._do("record", StoreRecord())
        if not self.started:
            return self._do("started", WriteStarted())
        return self._do("lease", HoldLease())

    def _next_claimed(self) -> list[Action]:
        if self.must_check:  # a reconnect: verified again, the journal first
            return self._do("journal", CheckJournal())
        if self.locked_out:
            return []  # still ours: the queue's setup retries until the broker lets go
        if self.verified != self.generation:
            return self._do("lease", HoldLease())
        if self.end == "handover":
            self.locked = False
            return self._do("handover", Unlock(), SendHandOver())
        if self.end == "record":
            if not self.ending_held:
                # Said in its lease first, and held: a resumer looks for a record only then.
                self.record_due = True
                return self._do("lease", HoldLease())
            return self._do("record", StoreRecord())
        return []

    def _do(self, step: str, *actions: Action) -> list[Action]:
        self.step = step
        return list(actions)

    # -- claims

    def _on_claim_due(self, event: ClaimDue) -> list[Action]:
        if not self.resuming:
            self.claim_wanted = True
        return self._next()

    def _on_launch_channel_lost(self, event: LaunchChannelLost) -> list[Action]:
        self.launch_valid = False
        if self.resuming or self.locked or self.claimed:
            return []
        self.must_check = self.claim_wanted = True
        return self._next()

    def _on_locked(self, event: Locked) -> list[Action]:
        self.locked, self.step = True, ""
        if self.resuming:
            return self._do("resume point", ReadResumePoint())
        return self._next()

    def _on_lock_refused(self, event: LockRefused) -> list[Action]:
        self.step = ""
        if self.resuming or not self.begun:
            return self._drop("another worker holds it" if not self.resuming else "its worker still holds it")
        return self._supersede("another worker claimed it")

    def _on_journal(self, event: JournalSays) -> list[Action]:
        self.step = ""
        if event.lost:
            return self._supersede(event.lost) if self.begun else self._drop(event.lost)
        self.must_check = False
        return self._next()

    def _on_started(self, event: StartedWritten) -> list[Action]:
        self.started, self.step = True, ""
        return self._next()

    def _on_lease_held(self, event: LeaseHeld) -> list[Action]:
        self.step = ""
        self.generation = max(self.generation, event.generation)
        self.verified = event.generation
        if self.record_due:
            self.ending_held = True
        actions: list[Action] = []
        if not self.claimed:
            self.claimed = True
            actions += self._let_go_of_launch()
        if not self.begun:
            self.begun = True
            actions.append(Begin())
        return actions + self._next()

    def _on_reconnected(self, event: Reconnected) -> list[Action]:
        self.generation = max(self.generation, event.generation)
        self.locked_out = event.locked_out
        if self.claimed:
            self.must_check = True
        return self._next()  # a step under way goes on, then this

    # -- resumes

    def _on_grace_over(self, event: GraceOver) -> list[Action]:
        self.step = ""
        if event.ended:
            return self._drop("it ended already")
        return self._do("lock", Lock())

    def _on_resume_point(self, event: ResumePointRead) -> list[Action]:
        self.step = ""
        if event.ended:
            return self._drop("it ended already")
        # Past any started entry newer than the lease: one whose worker died before it held
        # its lease is resumed past, not dropped.
        self.attempt = max(event.newest, self.attempt) + 1
        self.resuming, self.claim_wanted = False, True
        return self._next()

    # -- the end

    def _on_end_due(self, event: EndDue) -> list[Action]:
        if not self.end:
            self.end = "handover" if event.handover else "record"
            if event.handover or not self.launch_valid:
                self.claim_wanted = True  # the queue (or a lease) stands for it, not the launch
        return self._next()

    def _on_record_stored(self, event: RecordStored) -> list[Action]:
        self.ended_as, self.step = Phase.ENDED, ""
        actions: list[Action] = [ReleaseLease()] if self.claimed else []
        if self.locked:
            self.locked = False
            actions.append(Unlock())
        return [*actions, *self._let_go_of_launch(), Forget()]

    def _on_handed_over(self, event: HandOverSent) -> list[Action]:
        self.ended_as, self.step = Phase.ENDED, ""
        return [ReleaseLease(), Forget()]

    # -- failures

    def _on_failed(self, event: StepFailed) -> list[Action]:
        self.failures += 1
        self.step = ""
        if self.resuming or not self.begun:
            # Never left locked without a lease; the launch (or lease) goes back, not at once.
            self.ended_as, self.why = Phase.DROPPED, f"{event.step} failed: {event.error}"
            actions: list[Action] = []
            if self.locked:
                self.locked = False
                actions.append(Unlock())
            if not self.acked:
                self.acked = True
                actions.append(NackLaunch(delay=1.0 if self.origin in ("lease", "handover") else 0.0))
            return [*actions, Forget(), Cancel(self.why)]
        return [ClaimLater(delay=1.0)]  # then ClaimDue: the next step is tried again

    # -- helpers

    def _supersede(self, reason: str) -> list[Action]:
        self.ended_as, self.why, self.step = Phase.SUPERSEDED, reason, ""
        actions: list[Action] = [Supersede(reason), *self._let_go_of_launch()]
        if self.locked:
            self.locked = False
            actions.append(Unlock())
        if self.end:
            actions.append(Forget())  # its end was under way: nothing more to store
        return actions

    def _drop(self, reason: str) -> list[Action]:
        self.ended_as, self.why, self.step = Phase.DROPPED, reason, ""
        actions: list[Action] = list(self._let_go_of_launch())
        if self.locked:
            self.locked = False
            actions.append(Unlock())
        return [*actions, Forget(), Cancel(reason)]

    def _let_go_of_launch(self) -> list[Action]:
        if self.acked:
            return []
        self.acked = True
        return [AckLaunch()] if self.launch_valid else []


_HANDLERS: dict[type, Callable[[JobOwnership, Any], list[Action]]] = {
    ClaimDue: JobOwnership._on_claim_due,
    LaunchChannelLost: JobOwnership._on_launch_channel_lost,
    GraceOver: JobOwnership._on_grace_over,
    Locked: JobOwnership._on_locked,
    LockRefused: JobOwnership._on_lock_refused,
    JournalSays: JobOwnership._on_journal,
    ResumePointRead: JobOwnership._on_resume_point,
    StartedWritten: JobOwnership._on_started,
    LeaseHeld: JobOwnership._on_lease_held,
    StepFailed: JobOwnership._on_failed,
    Reconnected: JobOwnership._on_reconnected,
    EndDue: JobOwnership._on_end_due,
    RecordStored: JobOwnership._on_record_stored,
    HandOverSent: JobOwnership._on_handed_over,
}
