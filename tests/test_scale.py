"""Durable jobs at the scale users run them: megabyte states and results, and acknowledged
changes that survive a crash. Real broker, real worker processes, real SIGKILLs."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import brokerctl
import pika
import pytest
from sample_services import blob
from test_faults import Watch, _broker_left_running, launch  # noqa: F401 (autouse)

from brokerexec import Client, InvalidState, RemoteError
from brokerexec.protocol.messages import Launch
from brokerexec.protocol.names import STARTED_TYPE, journal_stream, new_job_id
from brokerexec.transport.pika.client import PikaClientTransport

pytestmark = [pytest.mark.rabbitmq, pytest.mark.fault, pytest.mark.timeout(240)]
WAIT = 90.0
FAST = ("--heartbeat", "2", "--resume-grace", "0.5")
MIB = 1024 * 1024


@pytest.fixture
def client(amqp_url: str) -> Iterator[Client]:
    with Client(amqp_url, heartbeat=2, timeout=10) as client:
        yield client


def sha(size: int) -> str:
    return hashlib.sha256(blob(size).encode()).hexdigest()


def done(watch: Watch, job_id: str) -> int:
    with watch.cond:
        return max((e.data.get("done", 0) for e in watch.events
                    if e.job_id == job_id and e.kind == "progress"), default=0)


def stored_checkpoints(watch: Watch, job_id: str) -> int:
    return watch.count(job_id, "checkpoint")


# ---- megabyte states and results -------------------------------------------------------------


@pytest.mark.parametrize("runner", ["thread", "process"])
def test_a_3_mib_checkpoint_is_resumed_from_with_its_bytes_intact_after_a_sigkill(
        client: Client, worker_process: Callable[..., Any], runner: str) -> None:
    size = 3 * MIB
    first = worker_process(*FAST, "--runner", runner, services=("Bulky",))
    watch = Watch()
    job = launch(client, watch, "bulky", {"steps": 400, "delay": 0.02, "state_bytes": size},
                 checkpoint_delta=0.3, progress_delta=0.1)
    watch.wait(lambda: stored_checkpoints(watch, job.id) >= 2, "no checkpoint was stored")
    worker_process(*FAST, "--runner", runner, services=("Bulky",))
    os.kill(first.pid, signal.SIGKILL)
    result = job.result(WAIT)
    record = job.record()
    assert record is not None and record["attempt"] == 2
    restored = result["restored"]
    assert restored is not None, "the job restarted instead of resuming from its checkpoint"
    assert restored["chars"] == size and restored["sha"] == sha(size)
    assert result["done"] == 400 and result["sha"] == sha(size)
    # A fresh client reads the same record from the journal.
    with Client(client.url, timeout=10) as fresh:
        assert fresh.job(job.id).result(30)["restored"] == restored
        assert fresh.job(job.id).status()["state"] == "finished"


@pytest.mark.parametrize("megabytes", [2, 50])
def test_a_large_result_reaches_the_launching_client_and_a_fresh_one(
        client: Client, worker_process: Callable[..., Any], megabytes: int) -> None:
    worker_process(*FAST, services=("Bulky",))
    size = megabytes * MIB
    job = client.launch("bulky", {"steps": 1, "delay": 0.0, "result_bytes": size})
    result = job.result(WAIT)  # pushed to this client's queue
    assert len(result["payload"]) == size and set(result["payload"]) == {"r"}
    with Client(client.url, timeout=10) as fresh:  # read from the journal
        started = time.monotonic()
        again = fresh.job(job.id).result(30)
        print(f"a fresh client's result() of {megabytes} MiB: {time.monotonic() - started:.2f} s")
        assert again["payload"] == result["payload"]


def test_a_result_over_the_limit_fails_the_job_saying_so(
        client: Client, worker_process: Callable[..., Any]) -> None:
    worker = worker_process(*FAST, "--max-result-bytes", str(MIB), services=("Bulky", "Counter"))
    job = client.launch("bulky", {"steps": 1, "delay": 0.0, "result_bytes": 2 * MIB})
    with pytest.raises(RemoteError, match="over the limit of 1,048,576") as failed:
        job.result(WAIT)
    assert failed.value.remote_type == "brokerexec.ResultTooLarge"
    assert "--max-result-bytes" in str(failed.value)
    # and the worker takes the next job.
    assert client.launch("counter", {"steps": 1}).result(WAIT)["count"] == 1
    assert worker.process.poll() is None


def test_a_result_over_the_brokers_own_limit_fails_the_job_instead_of_hanging(
        client: Client, worker_process: Callable[..., Any]) -> None:
    # Allowed by the worker, refused by RabbitMQ (max_message_size: 128 MiB on 3.10).
    worker_process(*FAST, "--max-result-bytes", str(300 * MIB), services=("Bulky",))
    job = client.launch("bulky", {"steps": 1, "delay": 0.0, "result_bytes": 130 * MIB})
    with pytest.raises(RemoteError, match="larger than the broker takes") as failed:
        job.result(WAIT)
    assert failed.value.remote_type == "brokerexec.ResultTooLarge"


# ---- acknowledged changes survive a crash ----------------------------------------------------


@pytest.mark.parametrize("runner", ["thread", "process"])
def test_acknowledged_sets_survive_a_sigkill_and_undone_invokes_are_listed(
        client: Client, worker_process: Callable[..., Any], runner: str) -> None:
    first = worker_process(*FAST, "--runner", runner, services=("Bulky",))
    watch = Watch()
    # No periodic checkpoint: only the one asked for below.
    job = launch(client, watch, "bulky", {"steps": 300, "delay": 0.02},
                 checkpoint_delta=3600, progress_delta=0.1)
    assert job.set(step=3) == {"step": 3}
    job.checkpoint()  # stored: covers step=3 (the checkpoint carries the settable values)
    assert job.set(label="after the checkpoint") == {"label": "after the checkpoint"}
    assert job.invoke("mark") == 1
    worker_process(*FAST, "--runner", runner, services=("Bulky",))
    os.kill(first.pid, signal.SIGKILL)
    watch.wait(lambda: any(e.job_id == job.id and e.kind == "resumed" for e in watch.events),
               "the job was never resumed")
    resumed = next(e for e in watch.events if e.job_id == job.id and e.kind == "resumed")
    assert resumed.attempt == 2 and resumed.data["from_checkpoint"] is True
    assert resumed.data["set_again"] == {"step": 3, "label": "after the checkpoint"}
    assert [i["method"] for i in resumed.data["invokes_not_replayed"]] == ["mark"]
    # Its status says so while that execution runs,
    status = job.status()
    assert status["attempt"] == 2, status
    assert status["resumed"]["invokes_not_replayed"][0]["method"] == "mark"
    # and it has every value its senders were told was applied; the invoke's effect (not
    # in the checkpoint) was undone, as the resumed event said.
    result = job.result(WAIT)
    assert result["restored"] is not None
    assert (result["step"], result["label"], result["marks"]) == (3, "after the checkpoint", 0)


def noise(url: str, job_id: str, n: int) -> None:
    """``n`` entries of other jobs in ``job_id``'s journal stream, as a busy fleet writes them."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        body = json.dumps({"v": 1, "attempt": 1, "time": time.time(), "worker": {}}).encode()
        for _ in range(n):
            channel.basic_publish("", journal_stream(job_id), body, pika.BasicProperties(
                content_type="application/json", message_id=new_job_id(), type=STARTED_TYPE))
        channel.confirm_delivery()  # the ones before are stored once this one is confirmed
        channel.basic_publish("", journal_stream(job_id), body, pika.BasicProperties(
            content_type="application/json", message_id=new_job_id(), type=STARTED_TYPE))
    finally:
        connection.close()


def test_a_set_after_the_last_checkpoint_is_in_the_resumed_job(
        client: Client, worker_process: Callable[..., Any], amqp_url: str) -> None:
    first = worker_process(*FAST, services=("Bulky",))
    watch = Watch()
    job = launch(client, watch, "bulky", {"steps": 300, "delay": 0.02},
                 checkpoint_delta=3600, progress_delta=0.1)
    job.checkpoint()
    noise(amqp_url, job.id, 6_000)  # the resume reads the checkpoint where it is, not these
    assert job.set(step=7) == {"step": 7}  # acknowledged: applied, and made durable first
    worker_process(*FAST, services=("Bulky",))
    os.kill(first.pid, signal.SIGKILL)
    result = job.result(WAIT)
    assert job.record()["attempt"] == 2
    assert result["restored"] is not None and result["step"] == 7
    assert result["marks"] == 0


# ---- look-ups that do not read the job's life --------------------------------------------------


def test_a_fresh_client_finds_an_ended_job_behind_thousands_of_later_entries(
        client: Client, worker_process: Callable[..., Any], amqp_url: str) -> None:
    worker_process(*FAST, services=("Bulky", "Counter"))
    job = client.launch("bulky", {"steps": 30, "delay": 0.01}, checkpoint_delta=0.05)
    noise(amqp_url, job.id, 3_000)  # during its life
    result = job.result(WAIT)
    noise(amqp_url, job.id, 7_000)  # after its end: the search goes back through windows
    with Client(amqp_url, timeout=10) as fresh:
        assert fresh.job(job.id).result(30) == result
        assert fresh.job(job.id).status()["state"] == "finished"
    one_shot = PikaClientTransport(amqp_url, heartbeat=0)  # the CLI's verbs
    try:
        assert one_shot.fetch_result(job.id, 0)["result"] == result  # type: ignore[index]
        assert one_shot.status(job.id, 10)["state"] == "finished"
        with pytest.raises(InvalidState):
            one_shot.abort(job.id, 10)
    finally:
        one_shot.close()


# ---- lives longer than the journal keeps its entries -------------------------------------------


def checkpoint_times(url: str, job_id: str) -> list[float]:
    """The times of the job's checkpoint entries still in its journal stream (read on a
    connection of its own, closed at the end: a stream refuses the rejects of a cancel)."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    times: list[float] = []
    probe, seen = new_job_id(), threading.Event()

    def read(channel: Any, method: Any, props: pika.BasicProperties, body: bytes) -> None:
        channel.basic_ack(method.delivery_tag)
        if props.message_id == probe:
            seen.set()
        elif props.message_id == job_id and props.type == "brokerexec.checkpoint":
            times.append(json.loads(body)["time"])

    try:
        channel = connection.channel()
        channel.basic_qos(prefetch_count=1000)
        channel.basic_consume(journal_stream(job_id), read, arguments={"x-stream-offset": "first"})
        channel.basic_publish("", journal_stream(job_id), b"{}", pika.BasicProperties(message_id=probe))
        deadline = time.monotonic() + 30
        while not seen.is_set():
            assert time.monotonic() < deadline, "the probe never came back"
            connection.process_data_events(0.2)
    finally:
        # pika rejects what it holds undispatched when it closes, and a stream answers a
        # reject by closing the connection (540): it is closing anyway.
        with contextlib.suppress(pika.exceptions.AMQPError):
            connection.close()
    return times


def test_a_job_longer_than_the_journal_keeps_entries_resumes_from_a_checkpoint_it_kept(
        worker_process: Callable[..., Any], own_vhost: str) -> None:
    retention = ("--journal-max-age", "10", "--lease-renew", "1")
    first = worker_process(*FAST, *retention, url=own_vhost, services=("Bulky",))
    watch = Watch()
    with Client(own_vhost, heartbeat=2, timeout=10) as client:
        job = launch(client, watch, "bulky", {"steps": 100_000, "delay": 0.01},
                     checkpoint_delta=3600, progress_delta=0.5)
        job.checkpoint()
        taken = checkpoint_times(own_vhost, job.id)
        assert len(taken) == 1
        # Half the retention later the worker takes one again; then the first one expires
        # with its segment (rolled over by the fleet's traffic: 4 MB of other entries).
        watch.wait(lambda: stored_checkpoints(watch, job.id) >= 3, "no checkpoint taken again", 60)
        brokerctl.wait_until(lambda: (noise(own_vhost, job.id, 25_000) is None
                                      and taken[0] not in checkpoint_times(own_vhost, job.id)),
                             90, "the first checkpoint to expire")
        worker_process(*FAST, *retention, url=own_vhost, services=("Bulky",))
        os.kill(first.pid, signal.SIGKILL)
        watch.wait(lambda: any(e.job_id == job.id and e.kind == "resumed" for e in watch.events),
                   "the job was never resumed")
        resumed = next(e for e in watch.events if e.job_id == job.id and e.kind == "resumed")
        assert resumed.data["from_checkpoint"] is True
        assert resumed.data["checkpoint_time"] > taken[0] + 4
        job.abort()


def test_a_worker_says_at_start_how_many_jobs_it_can_claim(amqp_url: str) -> None:
    import subprocess
    import sys

    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "brokerexec", "worker", "--broker", amqp_url,
                           "--concurrency", "5000", "--service", "tests/sample_services.py:Counter"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "--concurrency 5000 is more jobs than one worker process can claim" in done.stderr
    assert "Run several worker processes" in done.stderr
    assert time.monotonic() - started < 30


@pytest.mark.parametrize("dead_lettered", [True, False])
def test_a_stale_copy_of_a_lease_never_runs_a_job_that_ended(
        client: Client, worker_process: Callable[..., Any], amqp_url: str, dead_lettered: bool) -> None:
    # A lease dead-lettered while its worker was cut off, left in the launch queue while every
    # worker was busy; meanwhile its worker came back, claimed the job again and ended it.
    # (Or a lease without the x-death a broker would give it: searched back all the same.)
    from datetime import datetime, timezone

    from brokerexec.protocol.messages import Lease
    from brokerexec.protocol.names import ATTEMPT_HEADER, LAUNCHES_EXCHANGE, LEASE_TYPE

    first = worker_process(*FAST, "--concurrency", "1", services=("Counter",))
    job = client.launch("counter", {"steps": 2})
    record = job.result(WAIT) and job.record()
    assert record is not None
    first.terminate()  # the worker that ran it would know it: another one takes the copy
    worker = worker_process(*FAST, "--concurrency", "1", services=("Counter",))
    lease = Lease(Launch.new("counter", {"steps": 2}, job_id=job.id), 1,
                  {"hostname": "elsewhere", "pid": 1, "id": "0123456789ab"}, time.time() - 5)
    headers: dict[str, Any] = {ATTEMPT_HEADER: 1}
    if dead_lettered:
        # dead-lettered while the job still ran (its worker cut off), before it ended
        died = datetime.fromtimestamp(int(record["start"]), tz=timezone.utc)
        headers["x-death"] = [{"time": died, "count": 1,
                               "reason": "expired", "queue": "brokerexec.leases.0123456789ab"}]
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish(LAUNCHES_EXCHANGE, "counter", json.dumps(lease.encode()).encode(),
                              pika.BasicProperties(content_type="application/json", message_id=job.id,
                                                   type=LEASE_TYPE, delivery_mode=2, headers=headers))
    finally:
        connection.close()
    brokerctl.wait_until(lambda: any(f"job {job.id} not run here: it ended already" in line
                                     for line in worker.lines), 30, "the stale lease to be dropped")
    assert job.record() == record
    assert client.launch("counter", {"steps": 1}).result(WAIT)["count"] == 1
