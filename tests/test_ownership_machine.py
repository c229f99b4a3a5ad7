"""Job ownership's state machine (``protocol/ownership.py``), without a broker.

A :class:`World` answers the machine's actions as a broker would (or fails them, or
reconnects, or delivers again), so each ordering of crash, reconnect and duplicate delivery
is played exactly; the RabbitMQ and memory workers only carry out what the machine says.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from brokerexec.protocol import ownership as own
from brokerexec.protocol.ownership import JobOwnership, Phase

#: The actions a broker answers with an event.
ANSWERED = (own.Lock, own.CheckJournal, own.WriteStarted, own.HoldLease, own.WaitGrace,
            own.ReadResumePoint, own.StoreRecord, own.SendHandOver)


@dataclass
class World:
    """A broker and a journal as one job's machine sees them; it checks, as it goes, what
    must hold whatever the order of events."""

    machine: JobOwnership
    lost: str = ""  # what a fencing read of the journal says
    ended: bool = False  # the journal has a record
    newest: int = 0  # the newest attempt in the journal
    lock_refused: bool = False
    generation: int = 1
    pending: list[own.Action] = field(default_factory=list)
    done: list[own.Action] = field(default_factory=list)
    events: list[Any] = field(default_factory=list)
    lease_held: bool = False  # a lease of this execution exists in the broker
    ending_lease: bool = False  # and it says the record is on the way

    def start(self) -> World:
        self.machine.generation = self.generation
        self.apply(self.machine.start())
        return self

    def feed(self, event: Any) -> None:
        self.events.append(event)
        self.apply(self.machine.handle(event))

    def apply(self, actions: list[own.Action]) -> None:
        for action in actions:
            self.check(action)
            self.done.append(action)
            if isinstance(action, ANSWERED):
                assert not self.pending, f"{action} while {self.pending} is under way"
                self.pending.append(action)
            if isinstance(action, (own.ReleaseLease, own.Supersede)):
                self.lease_held = False

    def check(self, action: own.Action) -> None:
        m, done = self.machine, self.done
        if isinstance(action, own.StoreRecord):
            # A record only once a lease that says so is held, or if no lease ever was.
            assert self.ending_lease or not self.lease_held, "a record under a lease that does not say so"
            assert not any(isinstance(a, own.Supersede) for a in done)
        if isinstance(action, own.Begin):
            assert not any(isinstance(a, (own.Begin, own.Cancel)) for a in done), "begun twice, or cancelled"
        if isinstance(action, own.Cancel):
            assert not any(isinstance(a, (own.Begin, own.Cancel)) for a in done), "cancelled a begun job"
        if isinstance(action, (own.AckLaunch, own.NackLaunch)):
            assert not any(isinstance(a, (own.AckLaunch, own.NackLaunch)) for a in done), "settled twice"
        if isinstance(action, own.Speak):
            assert not m.superseded and not any(isinstance(a, own.Supersede) for a in done)

    def answer(self) -> None:
        """The broker answers the step under way as asked."""
        action = self.pending.pop()
        m = self.machine
        event: Any
        if isinstance(action, own.Lock):
            event = own.LockRefused() if self.lock_refused else own.Locked()
        elif isinstance(action, own.CheckJournal):
            event = own.JournalSays(self.lost)
        elif isinstance(action, own.WriteStarted):
            event = own.StartedWritten()
        elif isinstance(action, own.HoldLease):
            self.lease_held, self.ending_lease = True, m.record_due
            event = own.LeaseHeld(self.generation)
        elif isinstance(action, own.WaitGrace):
            event = own.GraceOver(self.ended)
        elif isinstance(action, own.ReadResumePoint):
            event = own.ResumePointRead(self.ended, self.newest)
        elif isinstance(action, own.StoreRecord):
            event = own.RecordStored()
        else:
            event = own.HandOverSent()
        self.feed(event)

    def fail(self) -> None:
        """The step under way fails (the broker went, refused, timed out)."""
        action = self.pending.pop()
        self.feed(own.StepFailed(type(action).__name__, "broker gone"))

    def reconnect(self) -> None:
        """A new connection; a job's queue is made again on it if the job held one."""
        self.generation += 1
        if self.machine.locked:
            self.feed(own.Reconnected(self.generation))

    def did(self, kind: type) -> int:
        return sum(isinstance(a, kind) for a in self.done)

    def settle(self, end: str = "record", limit: int = 200) -> World:
        """Run to the end: answer steps, end the computation once begun, claim again when
        told to later."""
        for _ in range(limit):
            if self.machine.final and not self.pending:
                return self
            if self.pending:
                self.answer()
            elif self.did(own.Begin) and not self.machine.end:
                self.feed(own.EndDue(handover=end == "handover"))
            elif self.did(own.ClaimLater):
                self.feed(own.ClaimDue("later"))
            else:
                raise AssertionError(f"stuck in {self.machine.phase}: {self.done}")
        raise AssertionError(f"no end after {limit} steps: {self.machine.phase}")

    def check_end(self) -> None:
        m = self.machine
        assert m.final, m.phase
        assert not m.locked, "the job's queue was left behind"
        assert not self.lease_held or (m.phase is Phase.SUPERSEDED and self.did(own.Supersede))
        assert self.did(own.Forget) == 1 or (m.phase is Phase.SUPERSEDED and not m.end)
        if m.phase is Phase.ENDED:
            assert self.did(own.Begin) == 1
            stored = [e for e in self.events if isinstance(e, (own.RecordStored, own.HandOverSent))]
            assert len(stored) == 1
        if m.phase is Phase.DROPPED:
            assert self.did(own.Cancel) == 1 and not self.did(own.Begin)
        if m.launch_valid and m.phase is not Phase.SUPERSEDED:
            assert self.did(own.AckLaunch) + self.did(own.NackLaunch) == 1, self.done


def launch(**kwargs: Any) -> World:
    return World(JobOwnership.of_launch("j", **{k: v for k, v in kwargs.items() if k in (
        "redelivered", "claim_first", "check_first")}),
        **{k: v for k, v in kwargs.items() if k not in ("redelivered", "claim_first", "check_first")}).start()


def lease(attempt: int = 2, *, handed_over: bool = False, **kwargs: Any) -> World:
    return World(JobOwnership.of_lease("j", attempt, handed_over=handed_over), **kwargs).start()


def kinds(world: World) -> list[str]:
    return [type(a).__name__ for a in world.done]


# ---- the plain ways -------------------------------------------------------------------------

def test_a_short_job_runs_on_its_launch_and_stores_its_record_without_a_claim() -> None:
    world = launch()
    assert kinds(world) == ["Begin", "ClaimLater"] and world.machine.phase is Phase.TAKEN
    world.feed(own.EndDue())
    world.settle().check_end()
    assert kinds(world)[2:] == ["StoreRecord", "AckLaunch", "Forget"]


def test_a_job_claimed_after_claim_after_locks_writes_started_holds_its_lease_then_acks() -> None:
    world = launch()
    world.feed(own.ClaimDue("its time came"))
    world.settle()
    assert kinds(world) == ["Begin", "ClaimLater", "Lock", "WriteStarted", "HoldLease", "AckLaunch",
                            # the end: its lease says so first, then the record
                            "HoldLease", "StoreRecord", "ReleaseLease", "Unlock", "Forget"]
    world.check_end()


def test_claim_after_zero_claims_before_it_begins() -> None:
    world = launch(claim_first=True).settle()
    assert kinds(world)[:5] == ["Lock", "WriteStarted", "HoldLease", "AckLaunch", "Begin"]
    world.check_end()


def test_a_redelivered_launch_reads_the_journal_before_its_started_entry() -> None:
    world = launch(redelivered=True).settle()
    assert kinds(world)[:3] == ["Lock", "CheckJournal", "WriteStarted"]
    world.check_end()


@pytest.mark.parametrize("lost", ["it ended already (finished)", "it was resumed elsewhere (attempt 3, on b)",
                                  "another worker (b) started it"])
def test_a_redelivered_launch_whose_job_ran_elsewhere_never_begins_here(lost: str) -> None:
    world = launch(redelivered=True, lost=lost).settle()
    assert world.machine.phase is Phase.DROPPED and world.machine.why == lost
    assert kinds(world) == ["Lock", "CheckJournal", "AckLaunch", "Unlock", "Forget", "Cancel"]
    world.check_end()


def test_a_launch_whose_queue_another_holds_is_acked_and_given_up() -> None:
    world = launch(claim_first=True, lock_refused=True).settle()
    assert kinds(world) == ["Lock", "AckLaunch", "Forget", "Cancel"]


def test_a_lease_waits_the_grace_locks_reads_its_resume_point_and_runs_as_the_next_attempt() -> None:
    world = lease(2).settle()
    assert kinds(world)[:6] == ["WaitGrace", "Lock", "ReadResumePoint", "WriteStarted", "HoldLease",
                                "AckLaunch"]
    assert world.machine.attempt == 3
    world.check_end()


def test_a_handed_over_lease_skips_the_grace_and_tries_the_lock_a_few_times() -> None:
    world = lease(2, handed_over=True)
    assert world.done == [own.Lock(tries=5)]
    world.settle().check_end()


def test_a_handover_lets_go_of_the_queue_before_it_sends_the_lease() -> None:
    world = launch(claim_first=True).settle(end="handover")
    assert kinds(world)[-4:] == ["Unlock", "SendHandOver", "ReleaseLease", "Forget"]
    world.check_end()


def test_an_unclaimed_job_handed_over_is_claimed_first() -> None:
    world = launch()
    world.feed(own.EndDue(handover=True))
    world.settle().check_end()
    assert kinds(world)[2:] == ["Lock", "WriteStarted", "HoldLease", "AckLaunch", "Unlock", "SendHandOver",
                                "ReleaseLease", "Forget"]


# ---- the windows the issue names --------------------------------------------------------------

def test_a_worker_killed_between_its_started_entry_and_its_lease_is_resumed_past_not_dropped() -> None:
    # The lease is of attempt 2; attempt 3 wrote its started entry and died before its lease.
    world = lease(2, newest=3).settle()
    assert world.machine.phase is Phase.ENDED and world.machine.attempt == 4
    world.check_end()


@pytest.mark.parametrize("failing", [own.WriteStarted, own.HoldLease, own.ReadResumePoint])
def test_an_exception_while_claiming_during_a_resume_never_leaves_the_job_locked(failing: type) -> None:
    world = lease(2)
    while not isinstance(world.pending[0], failing):
        world.answer()
    world.fail()
    assert world.machine.phase is Phase.DROPPED and not world.machine.locked
    assert kinds(world)[-4:] == ["Unlock", "NackLaunch", "Forget", "Cancel"]
    assert world.done[-3] == own.NackLaunch(delay=1.0)  # not at once: it would come straight back


def test_a_status_during_the_grace_does_not_claim_the_job() -> None:
    world = lease(2)
    world.feed(own.ClaimDue("asked"))
    assert kinds(world) == ["WaitGrace"] and world.machine.resuming
    assert world.machine.settled() is None
    world.answer()  # the grace ends: only now the lock
    world.feed(own.ClaimDue("asked"))
    assert kinds(world) == ["WaitGrace", "Lock"]
    world.settle().check_end()
    assert world.machine.attempt == 3


def test_a_duplicate_lease_after_a_broker_restart_runs_nowhere_twice() -> None:
    # Two copies of one lease reach two workers: the queue decides; the loser begins nothing.
    first, second = lease(2), lease(2, lock_refused=True)
    first.answer(), second.answer()  # both graces end
    first.answer()  # the first locks
    second.answer()  # the second is refused
    assert second.machine.phase is Phase.DROPPED and second.machine.why == "its worker still holds it"
    assert kinds(second) == ["WaitGrace", "Lock", "AckLaunch", "Forget", "Cancel"]
    first.settle().check_end()
    # A copy that comes after the job ended finds its record during the grace.
    late = lease(2, ended=True).settle()
    assert late.machine.why == "it ended already"
    assert kinds(late) == ["WaitGrace", "AckLaunch", "Forget", "Cancel"]


def test_a_launch_that_comes_back_while_the_job_runs_only_claims_it() -> None:
    world = launch()
    world.feed(own.ClaimDue("its launch came back"))
    world.feed(own.ClaimDue("its launch came back"))  # a second copy: the claim under way stands
    assert kinds(world) == ["Begin", "ClaimLater", "Lock"]
    world.settle().check_end()


def test_a_reconnect_holds_the_events_until_the_journal_and_the_lease_say_it_is_still_ours() -> None:
    world = launch(claim_first=True)
    for _ in range(3):
        world.answer()
    assert world.machine.may_speak(world.generation)
    world.reconnect()
    assert not world.machine.may_speak(world.generation) and world.pending == [own.CheckJournal()]
    world.answer()
    assert not world.machine.may_speak(world.generation) and world.pending == [own.HoldLease()]
    world.answer()
    assert world.machine.may_speak(world.generation) and kinds(world)[-1] == "Speak"


def test_a_reconnect_that_finds_the_job_resumed_elsewhere_supersedes_this_copy() -> None:
    world = launch(claim_first=True)
    for _ in range(3):
        world.answer()
    world.lost = "it was resumed elsewhere (attempt 2, on b)"
    world.reconnect()
    world.answer()
    assert world.machine.superseded and kinds(world)[-2:] == ["Supersede", "Unlock"]
    world.feed(own.EndDue())  # its computation stops: nothing stored
    assert kinds(world)[-1] == "Forget" and not world.did(own.StoreRecord)
    world.check_end()


def test_a_reconnect_locked_out_waits_for_the_queue_and_speaks_only_after() -> None:
    world = launch(claim_first=True)
    for _ in range(3):
        world.answer()
    world.generation += 1
    world.feed(own.Reconnected(world.generation, locked_out=True))
    world.answer()  # the journal says it is still ours; the queue is not made yet
    assert not world.pending and not world.machine.may_speak(world.generation)
    world.feed(own.Reconnected(world.generation))  # the broker let go of the old queue
    world.answer(), world.answer()
    assert world.machine.may_speak(world.generation)


def test_a_launch_channel_lost_before_the_claim_claims_the_job_reading_the_journal_first() -> None:
    world = launch()
    world.feed(own.LaunchChannelLost())
    assert world.pending == [own.Lock()] and not world.machine.may_speak(world.generation)
    world.answer()
    assert world.pending == [own.CheckJournal()]
    world.settle().check_end()
    assert not world.did(own.AckLaunch)  # the void delivery is never acked


def test_a_short_job_whose_launch_channel_was_lost_stores_its_record_on_the_strength_of_its_queue() -> None:
    world = launch()
    world.feed(own.LaunchChannelLost())
    world.feed(own.EndDue())
    world.answer(), world.answer()  # locked, the journal read
    assert world.pending == [own.StoreRecord()] and not world.did(own.HoldLease)
    world.settle().check_end()


def test_the_record_waits_for_a_reconnect_to_be_verified() -> None:
    world = launch(claim_first=True)
    for _ in range(3):
        world.answer()
    world.reconnect()
    world.feed(own.EndDue())
    assert world.pending == [own.CheckJournal()]  # not the record: verified first
    world.settle().check_end()


def test_a_claim_that_fails_while_the_job_runs_is_tried_again_later() -> None:
    world = launch()
    world.feed(own.ClaimDue())
    world.answer()  # locked
    world.fail()  # the started entry could not be written
    assert world.done[-1] == own.ClaimLater(delay=1.0) and world.machine.failures == 1
    world.feed(own.ClaimDue("later"))
    assert world.pending == [own.WriteStarted()]  # the lock is kept: on from where it was
    world.settle().check_end()


# ---- every ordering ---------------------------------------------------------------------------

#: What may happen to a job between any two steps.
DISTURBANCES: dict[str, Callable[[World], None]] = {
    "reconnect": World.reconnect,
    "launch channel lost": lambda w: w.feed(own.LaunchChannelLost()),
    "asked (a status)": lambda w: w.feed(own.ClaimDue("asked")),
    "came back (a duplicate delivery)": lambda w: w.feed(own.ClaimDue("its launch came back")),
    "step failed": lambda w: w.fail() if w.pending else None,
    "ended": lambda w: w.feed(own.EndDue()) if w.did(own.Begin) and not w.machine.end else None,
    "ended again": lambda w: w.feed(own.EndDue()) if w.machine.end else None,
    "handover": lambda w: (w.feed(own.EndDue(handover=True))
                           if w.did(own.Begin) and not w.machine.end else None),
}

STARTS: dict[str, Callable[[], World]] = {
    "launch": lambda: launch(),
    "launch claimed first": lambda: launch(claim_first=True),
    "redelivered launch": lambda: launch(redelivered=True),
    "lease": lambda: lease(2),
    "lease, a newer started entry": lambda: lease(2, newest=3),
    "handed-over lease": lambda: lease(2, handed_over=True),
}


def play(start: str, script: list[tuple[int, str]]) -> World:
    """Start ``start``; before step k (an answer), do the disturbances scripted for k."""
    world = STARTS[start]()
    for step in range(40):
        for at, name in script:
            if at == step:
                DISTURBANCES[name](world)
        if world.machine.final and not world.pending:
            break
        if world.pending:
            world.answer()
        elif world.did(own.Begin) and not world.machine.end:
            world.feed(own.EndDue())
        elif world.did(own.ClaimLater) or world.machine.failures:
            world.feed(own.ClaimDue("later"))
    return world.settle()


@pytest.mark.parametrize("start", list(STARTS))
def test_every_ordering_of_two_disturbances_keeps_ownership_whole(start: str) -> None:
    runs = 0
    for (a, first), (b, second) in itertools.combinations_with_replacement(
            itertools.product(range(9), DISTURBANCES), 2):
        world = play(start, [(a, first), (b, second)])
        world.check_end()
        runs += 1
    assert runs > 2000


def test_the_machine_is_the_same_for_both_workers() -> None:
    # Both drivers import it; neither decides on its own (what test_shape checks of layers,
    # this checks of the decisions: the drivers name no phase but through the machine).
    from pathlib import Path

    import brokerexec

    root = Path(brokerexec.__file__).parent
    for driver in ("transport/rabbitmq/worker/ownership.py", "transport/memory/worker.py"):
        text = (root / driver).read_text()
        assert "JobOwnership" in text and "handle(" in text
        flags = ("owned.check_journal", "owned.ending_held", "owned.record_due", "owned.locked =",
                 "owned.claimed =")
        assert not any(flag in text for flag in flags)


def test_durability_md_names_every_phase() -> None:
    from pathlib import Path

    text = (Path(__file__).parent.parent / "docs" / "durability.md").read_text()
    table = text[text.index("| phase | the job |"):]
    assert {phase.value for phase in Phase} <= set(re.findall(r"`(\w+)`", table[:table.index("\n\n")]))
