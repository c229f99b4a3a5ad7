"""Durable jobs, as users meet them: real broker, real worker processes, real signals.

Routed by service across a heterogeneous fleet; known from launch to record (queued,
cancelled before they start, unknown ids answered at once); resumed from their last
checkpoint when their worker is SIGKILLed; fenced when a stopped or cut-off worker comes
back; handed over on SIGTERM; finished across a broker restart and with RabbitMQ's
``consumer_timeout`` lowered far below their length.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import brokerctl
import pika
import pytest
from tcpproxy import TcpProxy
from test_faults import Watch, launch

from brokerexec import Client, InvalidState, JobAborted, JobNotFound, NotApplied, RemoteError, UnknownService
from brokerexec.codec import encode
from brokerexec.protocol.messages import Launch, Record
from brokerexec.protocol.names import (
    CC_HEADER,
    LAUNCH_TYPE,
    LAUNCHES_EXCHANGE,
    RECORD_TYPE,
    journal_stream,
    new_job_id,
)

pytestmark = [pytest.mark.rabbitmq, pytest.mark.fault, pytest.mark.timeout(240)]
WAIT = 60.0
HEARTBEAT = "2"
JSON = "application/json"
#: Quick resumes for tests: the default grace (2 s) waits for a worker that only reconnects.
FAST = ("--heartbeat", HEARTBEAT, "--resume-grace", "0.5")


@pytest.fixture(autouse=True)
def _broker_left_running() -> Iterator[None]:
    yield
    brokerctl.ensure_running()


@pytest.fixture
def client(amqp_url: str) -> Iterator[Client]:  # as test_faults': steady heartbeats, short waits
    with Client(amqp_url, heartbeat=int(HEARTBEAT), timeout=5) as client:
        yield client


def ran_on(record: dict[str, Any]) -> int:
    return int(record["worker"]["pid"])


def steps(client: Client, watch: Watch, n: int, delay: float, **settings: Any) -> Any:
    """A running ``steps`` job that checkpoints every 0.2 s, watched."""
    return launch(client, watch, "steps", {"steps": n, "delay": delay},
                  **{"checkpoint_delta": 0.2, "progress_delta": 0.1, **settings})


def last_done(watch: Watch, job_id: str) -> int:
    with watch.cond:
        return max((e.data.get("done", 0) for e in watch.events
                    if e.job_id == job_id and e.kind == "progress"), default=0)


# ---- routed by service, known from launch to record ------------------------------------------


def test_a_heterogeneous_fleet_runs_every_job_where_its_service_is(
        client: Client, worker_process: Callable[..., Any]) -> None:
    # Given three workers with overlapping service sets
    a = worker_process(*FAST, services=("Steps", "Sleeper"))
    b = worker_process(*FAST, services=("Sleeper", "Counter"))
    c = worker_process(*FAST, services=("Counter",))
    offered = {"steps": {a.pid}, "echo": {a.pid, b.pid}, "counter": {b.pid, c.pid}}
    # When jobs of each service are launched
    jobs = [client.launch("steps", {"steps": 3, "delay": 0.001}) for _ in range(4)]
    jobs += [client.launch("echo", {"value": n}) for n in range(8)]
    jobs += [client.launch("counter", {"steps": 3}) for _ in range(8)]
    # Then each runs on a worker that offers its service, and none is refused
    for job in jobs:
        job.result(WAIT)
        assert ran_on(job.record()) in offered[job.service], job.service  # type: ignore[index, arg-type]
    # and a service nobody offers is refused at once, at the client.
    started = time.monotonic()
    with pytest.raises(UnknownService):
        client.launch(f"nobody-offers-{new_job_id()}", {})
    assert time.monotonic() - started < 1.0


def test_a_queued_job_is_listed_answers_status_and_can_be_cancelled(
        client: Client, worker_process: Callable[..., Any]) -> None:
    worker_process(*FAST, "--concurrency", "1", services=("Forever", "Counter"))
    watch = Watch()
    busy = launch(client, watch, "forever", {"tick": 0.01})
    # Two launches wait behind the busy worker
    first, second = (client.launch("counter", {"steps": 2}) for _ in range(2))
    assert first.status()["state"] == "queued" and second.status()["state"] == "queued"
    listed = {job["job_id"]: job["state"] for job in client.jobs()}
    assert listed[busy.id] == "running" and listed[first.id] == listed[second.id] == "queued"
    # Aborting a queued job cancels it: its record says aborted, at once
    assert first.abort() is True
    with pytest.raises(JobAborted):
        first.result(5)
    record = first.record()
    assert record is not None and record["reason"] == "cancelled while queued"
    with pytest.raises(InvalidState, match="has ended"):
        first.abort()
    # and when the worker frees up, it never starts; the other one does.
    busy.abort()
    assert second.result(WAIT) == {"count": 2, "label": ""}
    assert first.record() == record  # still the cancelled record: the first one counts
    ended = {job["job_id"]: job for job in client.jobs(ended_within=60)}
    assert ended[first.id]["state"] == "aborted" and ended[second.id]["state"] == "finished"
    # Unknown ids are answered within a second or two each (0.8 s on a quiet machine: the
    # workers get the locate deadline of 0.5 s, plus slack), not at a time-out.
    unknown = client.job(new_job_id())
    for ask in (unknown.status, lambda: unknown.result(30), unknown.abort):
        started = time.monotonic()
        with pytest.raises(JobNotFound):
            ask()
        assert time.monotonic() - started < 2.5


def test_jobs_queued_by_one_launch_many_answer_status_and_can_be_cancelled(
        client: Client, worker_process: Callable[..., Any]) -> None:
    worker_process(*FAST, "--concurrency", "1", services=("Forever", "Counter"))
    busy = launch(client, Watch(), "forever", {"tick": 0.01})
    # A sweep's launches share one journal entry per stream: each job is known there
    # (a status each: the locate deadline of 0.5 s, then the journal)
    sweep = client.launch_many("counter", [{"steps": n % 3} for n in range(6)])
    assert {job.status()["state"] for job in sweep} == {"queued"}
    cancelled = sweep[3]
    assert cancelled.abort() is True
    with pytest.raises(JobAborted):
        cancelled.result(5)
    busy.abort()
    results = [job.result(WAIT) for job in sweep if job is not cancelled]
    assert results == [{"count": n % 3, "label": ""} for n in range(6) if n != 3]
    record = cancelled.record()
    assert record is not None and record["reason"] == "cancelled while queued"


def test_a_job_cancelled_while_queued_never_runs_however_long_it_waited(
        worker_process: Callable[..., Any], own_vhost: str) -> None:
    # A vhost of its own: an abort-all another test sent within the hour rightly applies to
    # launches sent before it, and these say they were sent two hours ago.
    worker = worker_process(*FAST, "--concurrency", "1", services=("Forever", "Counter"), url=own_vhost)
    with Client(own_vhost, heartbeat=int(HEARTBEAT), timeout=5) as client:
        busy = launch(client, Watch(), "forever", {"tick": 0.01})
        # Two launches queued two hours ago (their clients' clocks say), longer than the
        # control stream keeps its messages: one was cancelled, only its record is left of that.
        two_hours_ago = time.time() - 7200
        cancelled, kept = (dataclasses.replace(Launch.new("counter", {"steps": n}), sent=two_hours_ago)
                           for n in (1, 2))
        connection = pika.BlockingConnection(pika.URLParameters(own_vhost))
        try:
            channel = connection.channel()
            channel.confirm_delivery()
            for old in (cancelled, kept):
                channel.basic_publish(LAUNCHES_EXCHANGE, "counter", encode(old.encode()),
                                      pika.BasicProperties(content_type=JSON, delivery_mode=2,
                                                           message_id=old.job_id, type=LAUNCH_TYPE,
                                                           headers={CC_HEADER: [journal_stream(old.job_id)]}),
                                      mandatory=True)
            record = Record.cancelled(cancelled.job_id, "counter", {"user": "test"})
            job_id = cancelled.job_id
            channel.basic_publish("", journal_stream(job_id), encode(record.encode()),
                                  pika.BasicProperties(content_type=JSON, delivery_mode=2, message_id=job_id,
                                                       correlation_id=job_id, type=RECORD_TYPE))
        finally:
            connection.close()
        busy.abort()
        # The worker reads the journal of so old a launch before it runs it: the cancelled
        # one never starts, the other runs.
        assert client.job(kept.job_id).result(WAIT) == {"count": 2, "label": ""}
        brokerctl.wait_until(lambda: any(f"job {cancelled.job_id} not run here: it ended already" in line
                                         for line in worker.lines), 30, "the cancelled launch to be dropped")
        assert client.job(cancelled.job_id).record()["reason"] == "cancelled while queued"
        assert client.job(cancelled.job_id).status()["state"] == "aborted"


def test_abort_all_reaches_jobs_still_queued(client: Client, worker_process: Callable[..., Any]) -> None:
    worker_process(*FAST, "--concurrency", "1", services=("Forever", "Counter"))
    watch = Watch()
    busy = launch(client, watch, "forever", {"tick": 0.01})
    queued = client.launch("counter", {"steps": 2})
    client.abort_all()
    for job in (busy, queued):
        with pytest.raises(JobAborted):
            job.result(WAIT)
    assert queued.record()["reason"] == "cancelled while queued"  # type: ignore[index]
    assert client.launch("counter", {"steps": 1}).result(WAIT)["count"] == 1  # later ones run


# ---- resumed after a crash, fenced after a comeback ---------------------------------------------


@pytest.mark.parametrize("runner", ["thread", "process"])
def test_a_sigkilled_workers_job_resumes_elsewhere_from_its_last_checkpoint(
        client: Client, worker_process: Callable[..., Any], runner: str) -> None:
    first = worker_process(*FAST, "--runner", runner, services=("Steps",))
    watch = Watch()
    job = steps(client, watch, 200, 0.02)
    watch.wait(lambda: last_done(watch, job.id) >= 40, "the job never got going")
    second = worker_process(*FAST, "--runner", runner, services=("Steps",))
    killed_at = last_done(watch, job.id)
    os.kill(first.pid, signal.SIGKILL)
    died = time.monotonic()
    # It resumes on the second worker, from its last checkpoint (at most 0.2 s behind)
    watch.wait(lambda: any(e.job_id == job.id and e.attempt == 2 for e in watch.events),
               "the job was never resumed")
    resume_latency = time.monotonic() - died
    result = job.result(WAIT)
    record = job.record()
    assert result["done"] == 200 and record["attempt"] == 2 and ran_on(record) == second.pid  # type: ignore[index]
    assert 0 < result["resumed_from"] <= killed_at + 2
    assert killed_at - result["resumed_from"] <= 0.2 / 0.02 + 2  # redone: one checkpoint interval
    assert resume_latency < 15, resume_latency
    print(f"resume latency after SIGKILL: {resume_latency:.2f} s; redone "
          f"{killed_at - result['resumed_from']} steps of 0.02 s")


def test_a_set_pending_when_the_worker_dies_is_reported_not_applied(
        client: Client, worker_process: Callable[..., Any]) -> None:
    first = worker_process(*FAST, services=("Steps",))
    watch = Watch()
    job = steps(client, watch, 3, 3.0)  # ready() only every three seconds
    job.status()  # claimed: its worker is the one that holds the set
    worker_process(*FAST, services=("Steps",))
    outcome: list[BaseException | Any] = []

    def send() -> None:
        try:
            outcome.append(job.set(note="late", rpc_timeout=60))
        except BaseException as exc:  # what the sender sees is the point
            outcome.append(exc)

    import threading

    sender = threading.Thread(target=send)
    sender.start()
    brokerctl.wait_until(lambda: job.status().get("queued_signals", 0) >= 1, 10, "the set to be queued")
    os.kill(first.pid, signal.SIGKILL)
    sender.join(30)
    assert outcome and isinstance(outcome[0], NotApplied), outcome
    # The job resumes without it: the note was never applied, not applied twice.
    assert job.result(WAIT)["note"] == ""


def test_a_service_that_cannot_resume_fails_saying_its_worker_was_lost(
        client: Client, worker_process: Callable[..., Any]) -> None:
    first = worker_process(*FAST, services=("Fragile",))
    watch = Watch()
    job = launch(client, watch, "fragile", {"seconds": 60})
    job.status()  # claimed: it has a lease
    worker_process(*FAST, services=("Fragile",))
    os.kill(first.pid, signal.SIGKILL)
    with pytest.raises(RemoteError, match="was lost") as lost:
        job.result(WAIT)
    assert lost.value.remote_type == "brokerexec.WorkerLost"


def zombie_comes_back(client: Client, watch: Watch, stopped: Any, resume: Callable[[], None],
                      job: Any, survivor: Any) -> None:
    """The job resumes on ``survivor`` while ``stopped`` is away; once it is back, its copy
    stops and the record is the survivor's."""
    watch.wait(lambda: any(e.job_id == job.id and e.attempt == 2 for e in watch.events),
               "the job was never resumed elsewhere", timeout=WAIT)
    resume()
    brokerctl.wait_until(lambda: any("stopped here" in line for line in stopped.lines), 30,
                         "the comeback never stood down")
    result = job.result(WAIT)
    record = job.record()
    assert result["done"] == 300 and record["attempt"] == 2 and ran_on(record) == survivor.pid


def test_a_sigstopped_worker_is_fenced_when_it_comes_back(
        client: Client, worker_process: Callable[..., Any]) -> None:
    stopped = worker_process(*FAST, services=("Steps",))
    watch = Watch()
    job = steps(client, watch, 300, 0.02)
    job.status()
    survivor = worker_process(*FAST, services=("Steps",))
    os.kill(stopped.pid, signal.SIGSTOP)
    try:
        zombie_comes_back(client, watch, stopped, lambda: os.kill(stopped.pid, signal.SIGCONT), job,
                          survivor)
    finally:
        os.kill(stopped.pid, signal.SIGCONT)


def test_a_black_holed_worker_is_fenced_when_the_network_heals(
        amqp_url: str, client: Client, worker_process: Callable[..., Any]) -> None:
    with TcpProxy() as proxy:
        cut = worker_process(*FAST, url=proxy.url(amqp_url), services=("Steps",))
        watch = Watch()
        job = steps(client, watch, 300, 0.02)
        job.status()
        survivor = worker_process(*FAST, services=("Steps",))
        proxy.blackhole()
        zombie_comes_back(client, watch, cut, proxy.heal, job, survivor)


# ---- graceful handover, broker restarts, long jobs -----------------------------------------------


@pytest.mark.parametrize("runner", ["thread", "process"])
def test_a_rolling_restart_loses_no_work(client: Client, worker_process: Callable[..., Any],
                                         runner: str) -> None:
    def fresh() -> Any:
        return worker_process(*FAST, "--concurrency", "3", "--runner", runner, services=("Steps",))

    workers = [fresh() for _ in range(2)]
    watch = Watch()
    jobs = [steps(client, watch, 150, 0.02, checkpoint_delta=3600) for _ in range(4)]
    everyone = list(workers)
    for _ in range(3):  # SIGTERM one at a time, a fresh worker in its place
        workers.append(fresh())
        everyone.append(workers[-1])
        assert workers.pop(0).terminate(timeout=30) == 0
    for job in jobs:
        try:
            result = job.result(WAIT)
        except Exception as exc:
            logs = "\n".join("".join(w.lines) for w in everyone)
            raise AssertionError(f"{job.id}: {exc}\n{logs}") from exc
        assert result["done"] == 150
        # Handed over at a ready(): resumed from exactly there, with nothing redone
        # (checkpoint_delta is an hour: every checkpoint was a handover's).
        assert result["resumed_from"] is None or result["resumed_from"] > 0
    handovers = sum(1 for job in jobs if (job.record() or {}).get("attempt", 1) > 1)
    assert handovers >= 1


def test_jobs_finish_across_a_broker_restart(client: Client, worker_process: Callable[..., Any]) -> None:
    for _ in range(2):
        worker_process(*FAST, "--concurrency", "2", services=("Steps",))
    watch = Watch()
    jobs = [steps(client, watch, 250, 0.02) for _ in range(3)]
    with brokerctl.app_stopped():
        pass
    for job in jobs:
        assert job.result(WAIT)["done"] == 250
    # Watching went on: events came after the restart.
    before = len(watch.events)
    late = steps(client, watch, 10, 0.01)
    late.result(WAIT)
    assert len(watch.events) > before


def test_a_job_ten_times_longer_than_consumer_timeout_finishes_once(
        client: Client, worker_process: Callable[..., Any]) -> None:
    with brokerctl.consumer_timeout(2000):
        worker_process(*FAST, "--lease-renew", "0.5", services=("Steps",))
        watch = Watch()
        job = steps(client, watch, 400, 0.05)  # 20 s: ten times the timeout
        result = job.result(WAIT)
    assert result == {"done": 400, "resumed_from": None, "note": ""}
    assert (job.record() or {}).get("attempt", 1) == 1
