"""The protocol, free of I/O: the intent table, the messages, typed errors, and the client's
calls driven by a scripted broker (the sans-I/O style: no sockets, no threads)."""

from __future__ import annotations

import collections
import itertools
import json
import time
from collections.abc import Callable
from typing import Any

import pytest

import brokerexec
from brokerexec.cli import app as cli_module
from brokerexec.client.job import Job
from brokerexec.core.computation_thread import Computation
from brokerexec.core.handler_thread import SignalDesk
from brokerexec.errors import (
    BrokerConnectionError,
    DecodeError,
    InvalidRequest,
    JobNotFound,
    NotApplied,
    RemoteError,
    SignalRefused,
    Timeout,
    UnknownService,
    error_from_wire,
    error_to_wire,
)
from brokerexec.protocol import calls
from brokerexec.protocol.calls import Gather, Incoming, Message, NextReply, QueueExists, Request, Routed
from brokerexec.protocol.intents import INTENTS, Answered, Intent, Signal, intent_for_subject
from brokerexec.protocol.messages import Control, Launch, Record, WorkerJobs
from brokerexec.protocol.names import (
    DEADLINE_MS_HEADER,
    IDS_PER_BUCKET,
    JOB_ID_HEADER,
    JOURNAL_BUCKETS,
    KIWIPY_EXCHANGE,
    STATUS_EXCHANGE,
    WORKERS_EXCHANGE,
    check_name,
    job_time,
    journal_bucket,
    journal_stream,
    new_job_id,
    rpc_routing_key,
)
from brokerexec.protocol.replies import PENDING, Reply
from brokerexec.protocol.states import JobState

# ---- the intent table ----------------------------------------------------------------------


def test_every_intent_has_a_row_a_handler_method_a_client_method_and_a_cli_verb() -> None:
    assert set(INTENTS) == set(Intent)
    assert set(SignalDesk.BY_INTENT) == set(Intent)
    # and what waits for ready() has a way to be applied there
    assert set(Computation.APPLY) == {i for i, s in INTENTS.items() if s.answered is Answered.AT_READY}
    verbs = set(cli_module.cli.commands)
    for intent in Intent:
        assert callable(getattr(Job, intent.value)), intent
        assert callable(getattr(brokerexec.AsyncJob, intent.value)), intent
        assert intent.value in verbs, intent


def test_what_the_table_says() -> None:
    # Answered at once: only what the handler knows without the computation.
    assert {i for i, s in INTENTS.items() if s.answered is Answered.AT_ONCE} == {
        Intent.STATUS, Intent.PAUSE, Intent.RESUME, Intent.ABORT}
    # Never sent twice: what the computation applies and may have applied already.
    assert {i for i, s in INTENTS.items() if not s.resendable} == {Intent.SET, Intent.INVOKE}
    assert [i for i, s in INTENTS.items() if not s.pending_first] == [Intent.STATUS]
    assert {i for i, s in INTENTS.items() if s.to_every_job} == {Intent.PAUSE, Intent.RESUME, Intent.ABORT}


def test_plumpy_names_and_broadcast_subjects() -> None:
    assert Intent.parse("play") is Intent.RESUME and Intent.parse("kill") is Intent.ABORT
    assert Intent.parse("checkpoint") is Intent.CHECKPOINT
    assert [intent_for_subject(s) for s in ("pause", "play", "kill", "state_changed.a.b", None)] == [
        Intent.PAUSE, Intent.RESUME, Intent.ABORT, None, None]
    with pytest.raises(DecodeError, match="unknown intent 'format_disk'; expected one of: abort, "):
        Intent.parse("format_disk")


# ---- messages ----------------------------------------------------------------------------


def test_messages_survive_the_wire() -> None:
    launch = Launch.new("fit", {"points": 3}, settings={"progress_delta": 0.5})
    assert Launch.decode(json.loads(json.dumps(launch.encode()))) == launch
    signal = Signal.of(Intent.SET, attrs={"x": 1})
    assert Signal.decode(signal.encode()) == signal
    assert signal.encode() == {"intent": "set", "attrs": {"x": 1}}
    control = Control(Intent.PAUSE, "fit", 1.5)
    assert Control.decode(control.encode()) == control
    error = {"type": "X", "message": "m", "traceback": ""}
    record = Record(new_job_id(), "fit", JobState.FAILED, None, error, 1.0, 2.0, {"hostname": "h"},
                    abandoned=True)
    assert Record.decode(json.loads(json.dumps(record.encode()))) == record


def test_a_control_of_an_operation_reaches_its_jobs_launched_before_it_and_no_other() -> None:
    operation, other = new_job_id(), new_job_id()
    control = Control(Intent.SET, "fit", 100.0, operation=operation, attrs={"step": 2})
    body = json.loads(json.dumps(control.encode()))
    assert Control.decode(body) == control
    # its jobs: by when they were launched (its clients' clock), not when they started
    assert control.applies_to(new_job_id(), "fit", 150.0, operation=operation, launched=99.0)
    assert not control.applies_to(new_job_id(), "fit", 50.0, operation=operation, launched=101.0)  # a re-run
    assert not control.applies_to(new_job_id(), "fit", 50.0, operation=other, launched=99.0)
    assert not control.applies_to(new_job_id(), "fit", 50.0)  # a job of no operation
    assert not control.applies_to(new_job_id(), "other", 50.0, operation=operation, launched=99.0)
    # a worker older than operations reads a control of one job that no job is: it leaves all alone
    pause = Control(Intent.PAUSE, None, 100.0, operation=operation)
    older = {key: value for key, value in pause.encode().items() if key != "operation"}
    assert Control.decode(older) == Control(Intent.PAUSE, None, 100.0, job_id=operation)
    assert not Control.decode(older).applies_to(new_job_id(), "fit", 50.0)


def test_a_record_carries_progress_and_improved_only_when_there_are_some() -> None:
    job_id = new_job_id()
    outcome = {"state": "aborted", "result": None, "error": None, "start": 1.0, "end": 2.0,
               "progress": {"fraction": 0.5, "elapsed": 1.0}, "improved": {"cost": 0.25}}
    record = Record.of_outcome(job_id, "fit", {"hostname": "h"}, outcome)
    body = record.encode()
    assert body["progress"] == {"fraction": 0.5, "elapsed": 1.0} and body["improved"] == {"cost": 0.25}
    assert Record.decode(json.loads(json.dumps(body))) == record
    # An empty improved state is one the service sent: it is kept, as sent.
    empty = Record.of_outcome(job_id, "fit", {}, {**outcome, "improved": {}})
    assert Record.decode(empty.encode()).improved == {}
    # None: neither key on the wire, as attempt and reason at their defaults.
    plain = Record.of_outcome(job_id, "fit", {}, {"state": "finished", "result": 1})
    assert set(plain.encode()) == {"v", "job_id", "service", "state", "result", "error", "start",
                                   "end", "worker"}
    assert Record.decode(plain.encode()) == plain
    # A reader ignores either key when it is not an object (the record itself still counts).
    odd = Record.decode({**plain.encode(), "progress": [1], "improved": "best"})
    assert odd.progress is None and odd.improved is None and odd == plain
    assert Record.of_outcome(job_id, "fit", {}, {**outcome, "improved": 3}).improved is None


def test_a_record_the_broker_refuses_as_too_large_goes_again_without_what_made_it_so() -> None:
    outcome = {"state": "finished", "result": "r" * 10, "progress": {"i": 1}, "improved": {"i": 2}}
    record = Record.of_outcome(new_job_id(), "fit", {}, outcome, attempt=2)
    smaller = record.too_large("too large for the broker")
    assert smaller is not None and smaller.state is JobState.FAILED and smaller.attempt == 2
    assert (smaller.result, smaller.progress, smaller.improved) == (None, None, None)
    assert smaller.error is not None and smaller.error["type"] == "brokerexec.ResultTooLarge"
    assert smaller.too_large("still") is None  # nothing left to leave out: the refusal is another's


@pytest.mark.parametrize(("decode", "body", "says"), [
    (Launch.decode, [], "a launch must be a JSON object, got list"),
    (Launch.decode, {"v": 2, "job_id": "a", "service": "b"}, "unsupported protocol version 2"),
    (Launch.decode, {"job_id": "a.b", "service": "s"}, "job id must be 1-100 letters"),
    (Launch.decode, {"job_id": "a", "service": "s", "request": [1]},
     "launch 'request' must be a JSON object"),
    (Launch.decode, {"job_id": "a", "service": "s", "sent": "now"}, "'sent' must be a number"),
    (Signal.decode, {"intent": 3}, "unknown intent 3"),
    (Control.decode, {"intent": "invoke"}, "may pause, resume or abort every job, not invoke"),
    (Control.decode, {"intent": "set"}, "sets attributes of an operation's jobs only"),
    (Control.decode, {"intent": "set", "operation": "0" * 32, "attrs": [1]}, "attrs must be a JSON object"),
    (Control.decode, {"intent": "pause", "service": "a b"}, "service name must be"),
    (Record.decode, {"job_id": "a", "state": "running"},
     "finished, failed or aborted, not running"),
    (Reply.decode, {"weird": 1}, "none of result/error/exception/pending"),
])
def test_decode_says_what_was_wrong(decode: Callable[[Any], Any], body: Any, says: str) -> None:
    with pytest.raises(DecodeError, match=says):
        decode(body)


def test_a_jobs_answer_names_the_worker_of_each_job() -> None:
    answer = WorkerJobs.decode({"worker": {"hostname": "h"}, "jobs": [{"job_id": "a"}, "junk",
                                                                      {"job_id": "b", "worker": {"x": 1}}]})
    assert answer.jobs == [{"job_id": "a", "worker": {"hostname": "h"}}, {"job_id": "b", "worker": {"x": 1}}]


# ---- typed errors --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [SignalRefused, UnknownService, InvalidRequest, JobNotFound, Timeout,
                                  DecodeError, brokerexec.InvalidState])
def test_our_errors_raised_remotely_raise_as_themselves(kind: type[Exception]) -> None:
    raised = error_from_wire(error_to_wire(kind("no"), "Traceback ..."))
    assert isinstance(raised, kind) and isinstance(raised, RemoteError)
    assert (raised.remote_type, raised.remote_message, raised.remote_traceback) == (
        f"brokerexec.{kind.__name__}", "no", "Traceback ...")
    # and pass through a second hop unchanged
    assert error_to_wire(raised) == error_to_wire(kind("no"), "Traceback ...")


def test_a_users_own_exception_stays_a_remote_error() -> None:
    raised = error_from_wire(error_to_wire(KeyError("k")))
    assert type(raised) is RemoteError and raised.remote_type == "KeyError"
    assert not isinstance(raised, brokerexec.ServiceError)


def test_the_cli_maps_classes_to_exit_codes() -> None:
    from brokerexec.cli.output import exit_code

    assert exit_code(error_from_wire(error_to_wire(JobNotFound("x")))) == 3
    assert exit_code(error_from_wire(error_to_wire(SignalRefused("x")))) == 1
    assert exit_code(brokerexec.JobAborted("x")) == 130
    assert exit_code(Timeout("x")) == 4 and exit_code(BrokerConnectionError("x")) == 5
    assert exit_code(DecodeError("x")) == 2 and exit_code(brokerexec.ConfigurationError("x")) == 2


# ---- the client's calls, against a scripted broker ----------------------------------------


class Script:
    """Answers a call's commands from a list, and records them."""

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.commands: list[Any] = []

    def __call__(self, command: Any) -> Any:
        self.commands.append(command)
        assert self.answers, f"unexpected command {command}"
        return self.answers.pop(0)


def reply(body: dict[str, Any]) -> Incoming:
    return Incoming(json.dumps(body).encode(), "application/json")


def rpc(job_id: str, signal: Signal, script: Script, timeout: float = 5.0, **more: Any) -> Any:
    return calls.drive(calls.rpc(job_id, signal, timeout=timeout, locate_timeout=0.5, max_bytes=10_000,
                                 correlation_id="c1", **more), script)


def test_an_rpc_to_a_claimed_job_skips_pending_and_returns_the_value() -> None:
    job_id = new_job_id()
    script = Script(reply(PENDING.encode()), reply({"result": {"x": 2}}))
    assert rpc(job_id, Signal.of(Intent.SET, attrs={"x": 2}), script) == {"x": 2}
    request = script.commands[0]
    assert isinstance(request, Request) and request.seconds == 5.0
    message = request.message
    assert (message.exchange, message.routing_key, message.correlation_id) == (
        KIWIPY_EXCHANGE, rpc_routing_key(job_id), "c1")
    assert json.loads(message.body) == {"intent": "set", "attrs": {"x": 2}}
    assert all(isinstance(c, NextReply) and c.correlation_id == "c1" for c in script.commands[1:])


@pytest.mark.parametrize(("intent", "exchange"), [(Intent.STATUS, STATUS_EXCHANGE),
                                                  (Intent.PAUSE, WORKERS_EXCHANGE)])
def test_an_unroutable_rpc_goes_to_every_worker_with_the_job_id_and_a_deadline(
        intent: Intent, exchange: str) -> None:
    job_id = new_job_id()
    script = Script(Routed.RETURNED, reply({"result": "ok"}))
    assert rpc(job_id, Signal.of(intent), script) == "ok"
    located = script.commands[1].message
    assert (located.exchange, located.routing_key) == (exchange, "")
    assert located.headers[JOB_ID_HEADER] == job_id
    assert isinstance(located.headers[DEADLINE_MS_HEADER], int)
    assert script.commands[1].seconds == pytest.approx(0.5 + calls.LOCATE_SLACK)


def test_only_read_only_intents_go_through_the_status_exchange() -> None:
    assert [i for i, spec in INTENTS.items() if spec.read_only] == [Intent.STATUS]
    job_id = new_job_id()
    script = Script(reply({"result": {"state": "running"}}))
    assert rpc(job_id, Signal.of(Intent.STATUS), script) == {"state": "running"}
    message = script.commands[0].message
    assert (message.exchange, message.routing_key) == (STATUS_EXCHANGE, job_id)
    script = Script(reply(PENDING.encode()), reply({"result": True}))
    assert rpc(job_id, Signal.of(Intent.ABORT), script) is True
    assert script.commands[0].message.exchange == KIWIPY_EXCHANGE


def test_a_status_goes_through_kiwipy_when_the_workers_are_older() -> None:
    job_id = new_job_id()  # no status exchange: no worker of this version has run
    script = Script(Routed.NO_EXCHANGE, reply({"result": {"state": "running"}}))
    assert rpc(job_id, Signal.of(Intent.STATUS), script) == {"state": "running"}
    message = script.commands[1].message
    assert (message.exchange, message.routing_key) == (KIWIPY_EXCHANGE, rpc_routing_key(job_id))


@pytest.mark.parametrize(("answers", "says"), [
    ((Routed.RETURNED, None), "it ended, is still queued, or never existed"),  # none owned up
    ((Routed.RETURNED, Routed.RETURNED), "it ended, is still queued, or never existed"),  # no worker
    ((Routed.NO_EXCHANGE, Routed.NO_EXCHANGE), "no worker has run on this broker yet"),
])
def test_no_worker_owning_up_is_job_not_found(answers: tuple[Any, ...], says: str) -> None:
    with pytest.raises(JobNotFound, match=says):
        rpc(new_job_id(), Signal.of(Intent.STATUS), Script(*answers))


def test_an_rpc_without_a_final_reply_times_out_naming_the_job_and_the_intent() -> None:
    job_id = new_job_id()
    with pytest.raises(Timeout, match=f"job {job_id} did not answer 'invoke' of 'slow' within 5.0 s"):
        rpc(job_id, Signal.of(Intent.INVOKE, method="slow"),
            Script(reply(PENDING.encode()), None), probe_every=0)


class Clock:
    """A clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(("probe", "lost"), [
    ((reply({"result": {"state": "running", "attempt": 3}}),), True),  # resumed meanwhile: attempt 3
    ((Routed.NO_EXCHANGE, Routed.NO_EXCHANGE), True),  # no worker holds it
    ((reply({"result": {"state": "running", "attempt": 2}}),), False),  # still the same execution
])
def test_a_set_whose_execution_is_lost_while_it_waits_is_not_applied(probe: Any, lost: bool) -> None:
    job_id, clock = new_job_id(), Clock()
    pending = reply(Reply.pending_in(2).encode())
    script = Script(pending, None, *probe, reply({"result": {"x": 1}}))
    call = calls.rpc(job_id, Signal.of(Intent.SET, attrs={"x": 1}), timeout=30, locate_timeout=0.5,
                     max_bytes=10_000, clock=clock, correlation_id="c1")
    if lost:
        with pytest.raises(NotApplied, match=f"job {job_id}'s execution was lost before the 'set'"):
            calls.drive(call, script)
    else:
        assert calls.drive(call, script) == {"x": 1}
    waits = [c for c in script.commands if isinstance(c, NextReply) and c.correlation_id != "c1"]
    assert script.commands[1].seconds == calls.PROBE_EVERY and not waits
    assert json.loads(script.commands[2].message.body) == {"intent": "status"}


def test_status_and_pause_never_probe() -> None:
    script = Script(reply(PENDING.encode()), None)
    with pytest.raises(Timeout):
        rpc(new_job_id(), Signal.of(Intent.PAUSE), script)
    assert script.commands[1].seconds == pytest.approx(5.0, abs=0.1)


def test_a_request_answered_at_once_that_gets_no_reply_at_all_is_sent_again_afresh() -> None:
    # Routed to the job's queue just as the job ended, it went with the queue: asked again,
    # it is found where the job is now (here: the journal, once the queue is gone).
    job_id, clock = new_job_id(), Clock()

    def unclaimed() -> Any:
        clock.now += 0.1
        return {"state": "aborted"}
        yield  # a call

    script = Script(None, Routed.RETURNED)
    call = calls.rpc(job_id, Signal.of(Intent.STATUS), timeout=10, locate_timeout=0.5,
                     max_bytes=10_000, clock=clock, correlation_id="c1", unclaimed=unclaimed)
    assert calls.drive(call, script) == {"state": "aborted"}
    first, again = script.commands
    assert first.seconds == calls.RESEND_AFTER and first.message.correlation_id == "c1"
    assert again.message.correlation_id != "c1" and again.message.body == first.message.body
    # A pause is resent too; a set is not (it may wait for ready(), and must not apply twice).
    script = Script(None, reply({"result": True}))
    assert rpc(job_id, Signal.of(Intent.PAUSE), script) is True
    assert len({c.message.correlation_id for c in script.commands}) == 2
    script = Script(None)
    with pytest.raises(Timeout):
        rpc(job_id, Signal.of(Intent.SET, attrs={"x": 1}), script, probe_every=0)
    assert script.commands[0].seconds == 5.0


def test_a_refusal_comes_back_typed_and_an_undecodable_reply_says_so() -> None:
    refusal = Reply.failure(SignalRefused("cannot set 'x'")).encode()
    with pytest.raises(SignalRefused, match="cannot set 'x'"):
        rpc(new_job_id(), Signal.of(Intent.SET, attrs={"x": 1}), Script(reply(refusal)))
    with pytest.raises(DecodeError, match="undecodable reply"):
        rpc(new_job_id(), Signal.of(Intent.STATUS),
            Script(Incoming(b"\x80", "application/json")))


def test_the_jobs_query_gathers_every_answer() -> None:
    fit = {"name": "fit", "settable": {"rate": "float"}, "invokable": []}
    answers = [reply({"result": {"worker": {"pid": n}, "jobs": [{"job_id": f"j{n}"}], "services": ["fit"],
                                 **({"descriptions": {"fit": fit}} if n == 1 else {})}})  # 2: an older worker
               for n in (1, 2)]
    script = Script(answers[0], [answers[1], reply({"exception": "x"})])
    fleet = calls.drive(calls.fleet_query(timeout=0.5, max_bytes=10_000), script)
    assert fleet.jobs == [{"job_id": "j1", "worker": {"pid": 1}}, {"job_id": "j2", "worker": {"pid": 2}}]
    assert fleet.workers == [{"pid": 1, "services": ["fit"], "running": 1, "descriptions": {"fit": fit}},
                             {"pid": 2, "services": ["fit"], "running": 1, "descriptions": {}}]
    assert fleet.services == {"fit"}
    assert isinstance(script.commands[1], Gather) and 0 < script.commands[1].seconds <= 0.5
    # No worker there (returned), none ever (no exchange), none answering: nothing, at once.
    for first in (Routed.RETURNED, Routed.NO_EXCHANGE, None):
        assert calls.drive(calls.fleet_query(timeout=0.5, max_bytes=10_000), Script(first)).jobs == []


def test_a_launch_goes_to_its_services_queue_and_by_its_cc_key_to_its_journal_stream() -> None:
    (launch,) = batch = [Launch.new("fit")]
    offered: set[str] = set()
    script = Script(True, [Routed.DELIVERED])
    calls.drive(calls.launches(batch, reply_to="brokerexec.client.me", offered=offered), script)
    assert script.commands[0] == QueueExists("brokerexec.launches.fit") and offered == {"fit"}
    (message,) = script.commands[1].messages
    assert message.message_id == launch.job_id and message.type == "brokerexec.launch"
    assert message.persistent and message.reply_to == "brokerexec.client.me"
    assert (message.exchange, message.routing_key) == ("brokerexec.launches", "fit")
    assert message.headers == {"CC": [journal_stream(launch.job_id)]}
    # Known offered now: the next launch asks nothing first.
    again = Script([Routed.DELIVERED])
    calls.drive(calls.launches([Launch.new("fit")], offered=offered), again)
    assert len(again.commands) == 1


def test_many_launches_write_one_journal_entry_per_stream_not_one_per_job() -> None:
    batch = [Launch.new("fit") for _ in range(2500)] + [Launch.new("other") for _ in range(3)]
    entries_for = 16 + len({journal_stream(launch.job_id) for launch in batch[-3:]})
    published: list[Message] = []

    def broker(command: Any) -> Any:
        if isinstance(command, QueueExists):
            return True
        published.extend(command.messages)
        return [Routed.DELIVERED] * len(command.messages)

    calls.drive(calls.launches(batch, reply_to="brokerexec.client.me"), broker)
    messages = published
    entries, launches = messages[:-len(batch)], messages[-len(batch):]
    # The launches themselves, to their services' queues, with no CC key
    assert [m.message_id for m in launches] == [launch.job_id for launch in batch]
    assert all(m.headers is None and m.routing_key == launch.service
               for m, launch in zip(launches, batch, strict=True))
    # before them, per stream and service, one entry of at most 1,000 ids (2,500 of "fit"
    # over 16 streams: about 156 each), sent to that stream, with the launching client's queue
    assert all(m.type == "brokerexec.launches" and m.persistent and m.exchange == "brokerexec.launches"
               and m.reply_to == "brokerexec.client.me" for m in entries)
    assert len(entries) == entries_for < 40
    listed: dict[str, str] = {}
    for m in entries:
        body = json.loads(m.body)
        assert len(body["jobs"]) <= 1000
        assert all(journal_stream(job_id) == m.routing_key for job_id in body["jobs"])
        listed.update((job_id, body["service"]) for job_id in body["jobs"])
    assert listed == {launch.job_id: launch.service for launch in batch}


def test_a_service_no_worker_ever_offered_is_refused_before_anything_is_sent() -> None:
    script = Script(False)
    with pytest.raises(UnknownService, match="no worker has ever offered service 'nosuch'"):
        calls.drive(calls.launches([Launch.new("nosuch")]), script)
    assert len(script.commands) == 1
    with pytest.raises(UnknownService, match="not routed"):
        calls.drive(calls.launches([Launch.new("fit")], offered={"fit"}), Script([Routed.RETURNED]))
    batch = [Launch.new("fit"), Launch.new("fit")]
    with pytest.raises(UnknownService, match=f"the launch of job {batch[1].job_id} was not routed"):
        entries = len({journal_stream(launch.job_id) for launch in batch})
        calls.drive(calls.launches(batch, offered={"fit"}),
                    Script([Routed.DELIVERED] * entries + [Routed.DELIVERED, Routed.RETURNED]))


def test_job_ids_made_in_a_row_share_a_journal_stream_and_every_stream_gets_its_share() -> None:
    made = [new_job_id() for _ in range(IDS_PER_BUCKET * JOURNAL_BUCKETS * 2)]
    buckets = [journal_bucket(job_id) for job_id in made]
    # The runs of one stream are IDS_PER_BUCKET long (the first may be cut by ids made before).
    changes = [i for i in range(1, len(buckets)) if buckets[i] != buckets[i - 1]]
    assert len(changes) in (2 * JOURNAL_BUCKETS - 1, 2 * JOURNAL_BUCKETS)
    assert all(b - a == IDS_PER_BUCKET for a, b in itertools.pairwise(changes))
    assert sorted(collections.Counter(buckets).values()) == [2 * IDS_PER_BUCKET] * JOURNAL_BUCKETS
    for job_id in made[:50]:  # still 32 hex digits, with their launch time, one routing word
        assert len(job_id) == 32 and int(job_id, 16) >= 0 and check_name("job id", job_id)
        stamp = job_time(job_id)
        assert stamp is not None and abs(stamp - time.time()) < 60
    assert len(set(made)) == len(made)


def test_a_launch_of_an_operations_item_carries_its_operation_and_key_and_others_do_not() -> None:
    plain = Launch.new("fit", {"x": 1})
    assert "operation" not in plain.encode() and "key" not in plain.encode()  # as it always was
    assert (Launch.decode(plain.encode()).operation, Launch.decode(plain.encode()).key) == (None, None)
    item = Launch.new("fit", {"x": 1}, operation="op-1", key="seed 3 / lr 0.1")
    again = Launch.decode(json.loads(json.dumps(item.encode())))
    assert (again.operation, again.key) == ("op-1", "seed 3 / lr 0.1") and again == item
    for bad in ({"operation": "no spaces allowed"}, {"operation": "op", "key": "a\nb"},
                {"operation": "op", "key": "k" * 201}):
        with pytest.raises(DecodeError):
            Launch.decode({**plain.encode(), **bad})
