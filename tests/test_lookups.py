"""The journal and the calls that read it, free of I/O: against a scripted broker."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from brokerexec.errors import DecodeError, InvalidState, JobNotFound
from brokerexec.protocol import lookups
from brokerexec.protocol.calls import Browse, Incoming, Publish, ReadJournal, Request, Routed, drive
from brokerexec.protocol.history import LOOKUP_TIMEOUT
from brokerexec.protocol.intents import Intent
from brokerexec.protocol.journal import (
    JobHistory,
    JournalScan,
    JournalSearch,
    checkpoint_entry,
    launches_entry,
    probe_message,
    started_entry,
)
from brokerexec.protocol.messages import Control, Launch, Lease, Record
from brokerexec.protocol.names import (
    CHECKPOINT_TYPE,
    HISTORY_EXCHANGE,
    HISTORY_QUEUE,
    JOURNAL_BUCKETS,
    LAUNCH_TYPE,
    LAUNCHES_TYPE,
    LEASE_TYPE,
    PROBES_EXCHANGE,
    RECORD_TIME_MARGIN,
    RECORD_TYPE,
    STARTED_TYPE,
    journal_bucket,
    journal_stream,
    new_job_id,
)
from brokerexec.protocol.states import JobState

WORKER_A, WORKER_B = {"hostname": "a", "id": "aaaa"}, {"hostname": "b", "id": "bbbb"}


def entry(kind: str, body: dict[str, Any], job_id: str, reply_to: str | None = None) -> Incoming:
    return Incoming(json.dumps(body).encode(), "application/json", job_id, kind, reply_to)


def record(job_id: str, attempt: int = 1, state: JobState = JobState.FINISHED) -> dict[str, Any]:
    return Record(job_id, "fit", state, 42, None, 1.0, 2.0, WORKER_A, attempt=attempt).encode()


# ---- a job's history -------------------------------------------------------------------------


def test_newer_attempts_fence_older_ones() -> None:
    job_id = new_job_id()
    history = JobHistory(job_id)
    history.add(LAUNCH_TYPE, Launch.new("fit", job_id=job_id).encode())
    history.add(STARTED_TYPE, started_entry(job_id, "fit", 1, WORKER_A, 10.0))
    history.add(CHECKPOINT_TYPE, checkpoint_entry(job_id, "fit", 1, 11.0, {"i": 1}))
    history.add(STARTED_TYPE, started_entry(job_id, "fit", 2, WORKER_B, 20.0))
    # The lost attempt 1, still running somewhere, writes on: ignored.
    history.add(CHECKPOINT_TYPE, checkpoint_entry(job_id, "fit", 1, 21.0, {"i": 9}))
    history.add(RECORD_TYPE, record(job_id, attempt=1, state=JobState.FAILED))
    assert history.attempt == 2 and history.record is None
    assert history.checkpoint is not None and history.checkpoint["state"] == {"i": 1}
    assert history.status()["state"] == "resuming"  # type: ignore[index]
    history.add(CHECKPOINT_TYPE, checkpoint_entry(job_id, "fit", 2, 22.0, {"i": 5}))
    history.add(RECORD_TYPE, record(job_id, attempt=2))
    history.add(RECORD_TYPE, record(job_id, attempt=2, state=JobState.ABORTED))  # the first counts
    assert history.checkpoint["state"] == {"i": 5}
    assert history.status() == {"state": "finished", "paused": False, "record": history.record, "attempt": 2}


def test_an_entry_naming_another_job_in_its_body_is_ignored() -> None:
    job_id, other = new_job_id(), new_job_id()
    history = JobHistory(job_id)
    history.add(CHECKPOINT_TYPE, checkpoint_entry(other, "fit", 1, 1.0, {"stolen": True}))
    assert history.checkpoint is None and not history.known


def test_a_search_stops_at_its_probe_and_says_when_nothing_is_known() -> None:
    job_id = new_job_id()
    search = JournalSearch(job_id, wait=False)
    assert search.streams == (journal_stream(job_id),)
    assert journal_stream(job_id) == f"brokerexec.jobs.{journal_bucket(job_id):02x}"
    offset = search.offset
    assert not isinstance(offset, str) and abs(offset.timestamp() - (time.time() - RECORD_TIME_MARGIN)) < 2
    stream, probe = search.stream, search.probes[search.stream]
    assert not search.feed(stream, entry(RECORD_TYPE, record(new_job_id()), new_job_id()))
    assert search.feed(stream, Incoming(b"{}", None, probe, "brokerexec.probe"))
    assert search.not_found and search.record is None


def test_a_search_stops_at_the_record_whatever_ended_since() -> None:
    job_id = new_job_id()
    search = JournalSearch(job_id, wait=False)
    assert search.feed(search.stream, entry(RECORD_TYPE, record(job_id), job_id))
    assert search.record is not None and not search.probe_seen


def test_a_waiting_search_reads_past_its_probe_to_the_record() -> None:
    job_id = new_job_id()
    search = JournalSearch(job_id, wait=True)
    stream, probe = search.stream, search.probes[search.stream]
    launch = Launch.new("fit", job_id=job_id).encode()
    assert not search.feed(stream, entry(LAUNCH_TYPE, launch, job_id, reply_to="brokerexec.client.x"))
    assert not search.feed(stream, Incoming(b"{}", None, probe, "brokerexec.probe"))
    assert search.launch_reply_to == "brokerexec.client.x" and not search.not_found
    assert search.feed(stream, entry(RECORD_TYPE, record(job_id), job_id))
    assert search.record is not None and search.record["result"] == 42


def test_a_job_launched_in_a_sweep_is_found_in_its_streams_launches_entry() -> None:
    job_id, neighbour = new_job_id(), new_job_id()
    search = JournalSearch(job_id, wait=False)
    stream, probe = search.stream, search.probes[search.stream]
    # An entry of other jobs, one that holds the id elsewhere than in its list, a forged one
    others = entry(LAUNCHES_TYPE, launches_entry("fit", 1.0, [neighbour]), "sweep-0")
    decoy = entry(LAUNCHES_TYPE, {**launches_entry("fit", 1.0, [neighbour]), "note": job_id}, "sweep-1")
    forged = entry(LAUNCHES_TYPE, launches_entry("evil", 1.0, [job_id]), "x")._replace(
        exchange=PROBES_EXCHANGE)
    for message in (others, decoy, forged):
        assert not search.feed(stream, message)
    assert not search.history.known
    sweep = entry(LAUNCHES_TYPE, launches_entry("fit", 123.0, [neighbour, job_id], [{"n": 1}, {"n": 2}]),
                  "sweep-2", reply_to="brokerexec.client.me")
    assert not search.feed(stream, sweep)
    assert search.feed(stream, Incoming(b"{}", None, probe, "brokerexec.probe"))
    assert search.history.status() == {"state": "queued", "paused": False, "service": "fit",
                                       "attempt": 0, "since": 123.0}
    assert search.launch_reply_to == "brokerexec.client.me" and not search.not_found
    assert search.history.launch is not None and search.history.launch["request"] == {"n": 2}


def test_no_entry_that_came_through_the_probes_exchange_is_believed() -> None:
    """Whoever may probe (a watcher) can append anything there: it is never an entry."""
    job_id = new_job_id()
    assert probe_message("s", "p").exchange == PROBES_EXCHANGE
    search = JournalSearch(job_id, wait=True)
    stream, probe = search.stream, search.probes[search.stream]
    forged = [entry(kind, body, job_id)._replace(exchange=PROBES_EXCHANGE) for kind, body in (
        (LAUNCH_TYPE, Launch.new("fit", job_id=job_id).encode()),
        (CHECKPOINT_TYPE, checkpoint_entry(job_id, "fit", 1, 1.0, {"forged": True})),
        (RECORD_TYPE, record(job_id)))]
    for message in forged:
        assert not search.feed(stream, message)
    assert search.feed(stream, Incoming(b"{}", None, probe, "brokerexec.probe", exchange=PROBES_EXCHANGE))
    assert search.not_found and search.history.checkpoint is None
    scan = JournalScan(time.time() - 100, limit=5)
    scan.feed(scan.streams[0], forged[2])
    assert scan.records == []


def test_an_undecodable_entry_of_the_job_is_an_error_not_a_wait() -> None:
    job_id = new_job_id()
    search = JournalSearch(job_id, wait=True)
    with pytest.raises(DecodeError):
        search.feed(search.stream, Incoming(b"\x80", "application/json", job_id, RECORD_TYPE))


def test_a_scan_collects_the_records_since_a_time_from_every_stream() -> None:
    since = time.time() - 100
    scan = JournalScan(since, limit=2)
    assert len(scan.streams) == JOURNAL_BUCKETS
    old, new, newer = (Record(new_job_id(), "fit", JobState.FINISHED, end=end).encode()
                       for end in (since - 1, since + 1, since + 2))
    first = scan.streams[0]
    for body in (old, new, newer):
        scan.feed(first, entry(RECORD_TYPE, body, body["job_id"]))
    for stream in scan.streams[:-1]:
        assert not scan.feed(stream, Incoming(b"{}", None, scan.probes[stream], "brokerexec.probe"))
    assert scan.missing(scan.streams[-1])
    assert [r["job_id"] for r in scan.records] == [newer["job_id"], new["job_id"]]


# ---- status, abort, result -----------------------------------------------------------------


class Broker:
    """Answers a call's commands: RPCs and requests from a list, journal reads from a job's
    entries (the reader is fed them, then its probe)."""

    def __init__(self, *answers: Any, entries: list[Incoming] = ()) -> None:  # type: ignore[assignment]
        self.answers = list(answers)
        self.entries = list(entries)
        self.commands: list[Any] = []

    def __call__(self, command: Any) -> Any:
        self.commands.append(command)
        if isinstance(command, ReadJournal):
            reader = command.reader
            for stream in reader.streams:
                for incoming in self.entries:
                    if reader.feed(stream, incoming):
                        return reader
                if reader.feed(stream, Incoming(b"{}", None, reader.probes[stream], "brokerexec.probe")):
                    return reader
            return reader
        assert self.answers, f"unexpected command {command}"
        return self.answers.pop(0)


def status(job_id: str, broker: Broker) -> dict[str, Any]:
    return drive(lookups.status(job_id, timeout=5, locate_timeout=0.5, max_bytes=10_000), broker)


def test_an_ended_job_is_answered_from_the_journal_without_asking_every_worker() -> None:
    job_id = new_job_id()
    # no worker claims it; no indexer on the broker (the store's look-up is returned)
    broker = Broker(Routed.RETURNED, Routed.RETURNED, entries=[entry(RECORD_TYPE, record(job_id), job_id)])
    assert status(job_id, broker)["state"] == "finished"
    assert [type(c) for c in broker.commands] == [Request, Request, ReadJournal]  # no fan-out


def _stored(job_id: str, with_record: bool = True) -> Incoming:
    """An indexer's answer to a look-up of one job: its row, with its record if it ended."""
    row = {"job_id": job_id, "state": "finished" if with_record else "running"}
    if with_record:
        row["record"] = record(job_id)
    return Incoming(json.dumps({"result": {"rows": [row], "cursor": None, "total": 1}}).encode(),
                    "application/json")


def test_an_ended_job_is_answered_by_the_history_store_before_the_journal_is_read() -> None:
    job_id = new_job_id()
    # no worker holds it: the history store has its record, and the journal is not read
    broker = Broker(Routed.RETURNED, _stored(job_id))
    answer = status(job_id, broker)
    assert answer["state"] == "finished" and answer["record"]["result"] == 42
    assert [type(c) for c in broker.commands] == [Request, Request]
    # through the history exchange, which a watcher may write to (not the default one)
    asked = broker.commands[-1].message
    assert (asked.exchange, asked.routing_key) == (HISTORY_EXCHANGE, HISTORY_QUEUE)
    broker = Broker(_stored(job_id))
    assert drive(lookups.result(job_id, None, max_bytes=10_000), broker) == record(job_id)
    assert [type(c) for c in broker.commands] == [Request]  # the store first, and enough
    # a job the store has no record of yet (it ended a moment ago, or runs): the journal's
    broker = Broker(_stored(job_id, with_record=False), entries=[entry(RECORD_TYPE, record(job_id), job_id)])
    assert drive(lookups.result(job_id, None, max_bytes=10_000), broker) == record(job_id)
    assert [type(c) for c in broker.commands] == [Request, ReadJournal]


def test_a_store_without_the_jobs_record_or_slow_to_answer_is_not_found_at_once() -> None:
    job_id = new_job_id()
    # no rows; silence; no indexer (or only older ones: the queue is not bound to the
    # exchange); no exchange at all (no worker or indexer of this version ever ran)
    for store_says in (_stored(job_id, with_record=False), None, Routed.RETURNED, Routed.NO_EXCHANGE):
        broker = Broker(Routed.RETURNED, store_says, None)  # no worker claims it, nor answers
        with pytest.raises(JobNotFound):
            status(job_id, broker)
        history_request = broker.commands[1]
        assert isinstance(history_request, Request) and history_request.seconds <= LOOKUP_TIMEOUT
        assert isinstance(broker.commands[2], ReadJournal)  # then the journal, which has no trace


def test_a_queued_job_says_queued_and_a_lost_one_resuming() -> None:
    job_id = new_job_id()
    launch = entry(LAUNCH_TYPE, Launch.new("fit", job_id=job_id).encode(), job_id)
    queued = status(job_id, Broker(Routed.RETURNED, Routed.RETURNED, None, entries=[launch]))
    assert queued["state"] == "queued" and queued["service"] == "fit" and queued["attempt"] == 0
    started = entry(STARTED_TYPE, started_entry(job_id, "fit", 3, WORKER_A, 10.0), job_id)
    lost = status(job_id, Broker(Routed.RETURNED, Routed.RETURNED, None, entries=[launch, started]))
    assert lost["state"] == "resuming" and lost["attempt"] == 3 and lost["worker"] == WORKER_A


def test_a_job_nobody_knows_is_not_found() -> None:
    with pytest.raises(JobNotFound, match="never launched"):
        status(new_job_id(), Broker(Routed.RETURNED, None, Routed.RETURNED))
    with pytest.raises(JobNotFound):  # no worker has ever run: no exchange, no journal
        status(new_job_id(), Broker(Routed.NO_EXCHANGE, Routed.NO_EXCHANGE, Routed.NO_EXCHANGE))


def abort(job_id: str, broker: Broker) -> bool:
    return drive(lookups.abort(job_id, timeout=5, locate_timeout=0.5, max_bytes=10_000,
                               by={"client": True}), broker)


def test_aborting_a_queued_job_cancels_it_for_every_worker_and_records_it() -> None:
    job_id = new_job_id()
    launch = entry(LAUNCH_TYPE, Launch.new("fit", job_id=job_id).encode(), job_id, "brokerexec.client.me")
    broker = Broker(Routed.RETURNED, None, [Routed.DELIVERED, Routed.DELIVERED], entries=[launch])
    assert abort(job_id, broker) is True
    publish = broker.commands[-1]
    assert isinstance(publish, Publish)
    control, cancelled = publish.messages
    assert Control.decode(json.loads(control.body)).applies_to(job_id, "fit", time.time() - 1)
    assert not Control.decode(json.loads(control.body)).applies_to(new_job_id(), "fit", 0)
    body = json.loads(cancelled.body)
    assert (cancelled.routing_key, cancelled.type) == (journal_stream(job_id), RECORD_TYPE)
    assert body["state"] == "aborted" and body["reason"] == "cancelled while queued"
    assert cancelled.headers == {"BCC": ["brokerexec.client.me"]}  # its launcher learns it too


def test_an_ended_job_cannot_be_aborted_and_an_unknown_one_is_not_found() -> None:
    job_id = new_job_id()
    with pytest.raises(InvalidState, match="has ended"):
        abort(job_id, Broker(Routed.RETURNED, None, entries=[entry(RECORD_TYPE, record(job_id), job_id)]))
    with pytest.raises(JobNotFound):
        abort(new_job_id(), Broker(Routed.RETURNED, None))


def test_the_result_of_an_unknown_job_is_not_found_at_once() -> None:
    job_id = new_job_id()
    with pytest.raises(JobNotFound):
        drive(lookups.result(job_id, None, max_bytes=10_000), Broker(Routed.RETURNED))  # not a wait
    found = drive(lookups.result(job_id, None, max_bytes=10_000),  # no indexer: the journal's
                  Broker(Routed.RETURNED, entries=[entry(RECORD_TYPE, record(job_id), job_id)]))
    assert found is not None and found["result"] == 42


def test_the_listing_browses_the_launch_queues_of_the_services_offered() -> None:
    queued, resuming = Launch.new("fit"), Launch.new("fit")
    lease = Lease(resuming, 2, WORKER_A, 1.0)
    worker = Incoming(json.dumps({"result": {"worker": WORKER_B, "services": ["fit"], "jobs": [
        {"job_id": "j", "service": "fit", "state": "running"}]}}).encode(), "application/json")
    waiting = {"brokerexec.launches.fit": [
        Incoming(json.dumps(queued.encode()).encode(), "application/json", queued.job_id, LAUNCH_TYPE),
        Incoming(json.dumps(lease.encode()).encode(), "application/json", resuming.job_id, LEASE_TYPE),
        Incoming(b"not json", "application/json", "x", LAUNCH_TYPE)],
        "brokerexec.launches.other": []}
    broker = Broker(worker, [], waiting)
    listing = drive(lookups.listing(timeout=0.5, max_bytes=10_000, services=["other"]), broker)
    browse = broker.commands[2]
    assert isinstance(browse, Browse)
    assert browse.queues == ["brokerexec.launches.fit", "brokerexec.launches.other"]
    assert [(j["job_id"], j["state"]) for j in listing.jobs] == [
        ("j", "running"), (queued.job_id, "queued"), (resuming.job_id, "resuming")]
    assert listing.queued[1]["attempt"] == 2 and listing.workers[0]["services"] == ["fit"]


def test_a_lease_and_a_targeted_control_survive_the_wire() -> None:
    lease = Lease(Launch.new("fit", {"n": 1}), 3, WORKER_A, 100.0, "q", {"time": 90.0, "attempt": 2}, True)
    assert Lease.decode(json.loads(json.dumps(lease.encode()))) == lease
    assert lease.since == 90.0
    with pytest.raises(DecodeError, match="attempt"):
        Lease.decode({**lease.encode(), "attempt": 0})
    control = Control(Intent.ABORT, None, 5.0, new_job_id())
    assert Control.decode(json.loads(json.dumps(control.encode()))) == control
