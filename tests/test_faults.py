"""Broker faults: every job finishes correctly and stays controllable afterwards.

Real broker, real worker processes, real signals: connections closed by the broker five
times in a row, the broker application restarted, the worker's TCP connection black-holed
and reset (a proxy stands in for toxiproxy), the broker SIGSTOPped. Each test leaves the
broker running (the fault context managers restore it even on failure).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import brokerctl
import pytest
from tcpproxy import TcpProxy

from brokerexec import BrokerConnectionError, Client, Event, JobAborted, JobNotFound, Timeout
from brokerexec.protocol.names import new_job_id

pytestmark = [pytest.mark.rabbitmq, pytest.mark.fault, pytest.mark.timeout(180)]
WAIT = 60.0
HEARTBEAT = "2"


class Watch:
    """Events of the jobs under test, waited on by condition."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        with self.cond:
            self.events.append(event)
            self.cond.notify_all()

    def count(self, job_id: str, kind: str) -> int:
        with self.cond:
            return sum(1 for e in self.events if e.job_id == job_id and e.kind == kind)

    def wait(self, predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
        with self.cond:
            assert self.cond.wait_for(predicate, timeout), what

    def reached(self, job_id: str, state: str) -> bool:
        return any(e.job_id == job_id and e.kind == "state" and e.data["to"] == state
                   for e in self.events)


@pytest.fixture(autouse=True)
def _broker_left_running() -> Iterator[None]:
    yield
    brokerctl.ensure_running()


@pytest.fixture
def client(amqp_url: str) -> Iterator[Client]:
    with Client(amqp_url, heartbeat=int(HEARTBEAT), timeout=5) as client:
        yield client


def launch(client: Client, watch: Watch, service: str, request: dict[str, Any],
           **settings: Any) -> Any:
    job_id = new_job_id()
    client.subscribe(f"*.*.{job_id}", watch)
    job = client.launch(service, request, job_id=job_id, **settings)
    watch.wait(lambda: watch.reached(job_id, "running"), f"{service} job never ran")
    return job


def assert_controllable(client: Client, watch: Watch, job: Any) -> None:
    """A forever job answers, pauses, takes a set, resumes and aborts after the fault."""
    # A job not yet claimed when its worker lost the broker is, for a moment after the
    # reconnect, only its launch back in the launch queue: "queued" until the worker that
    # still runs it takes the launch again and answers for it.
    brokerctl.wait_until(lambda: brokerctl.eventually(job.status, "status")["state"] in ("running", "paused"),
                         30, "the job to answer as running again")
    brokerctl.eventually(job.pause, "pause")
    watch.wait(lambda: watch.reached(job.id, "paused"), "never paused")
    assert brokerctl.eventually(lambda: job.set(value=3), "set") == {"value": 3}
    brokerctl.eventually(job.resume, "resume")
    brokerctl.eventually(job.abort, "abort")
    with pytest.raises(JobAborted):
        job.result(WAIT)


def test_five_connection_drops_in_a_row(client: Client, worker_process: Callable[..., Any]) -> None:
    worker_process("--heartbeat", HEARTBEAT, "--concurrency", "4")
    watch = Watch()
    job = launch(client, watch, "forever", {"tick": 0.01}, progress_delta=0.1)
    counter = launch(client, watch, "counter", {"steps": 300, "delay": 0.02})
    for drop in range(5):
        brokerctl.close_all_connections(f"drop {drop}")
        before = watch.count(job.id, "progress")
        # Afterwards an RPC round-trips and events flow again, by themselves.
        assert brokerctl.eventually(job.status, f"status after drop {drop}")["state"] == "running"
        watch.wait(lambda before=before: watch.count(job.id, "progress") > before,
                   f"no progress event after drop {drop}")
    assert counter.result(WAIT) == {"count": 300, "label": ""}
    assert_controllable(client, watch, job)
    assert client.launch("counter", {"steps": 5}).result(WAIT)["count"] == 5


def test_broker_application_restart(client: Client, worker_process: Callable[..., Any]) -> None:
    worker_process("--heartbeat", HEARTBEAT, "--concurrency", "4")
    watch = Watch()
    job = launch(client, watch, "forever", {"tick": 0.01}, progress_delta=0.1)
    counter = launch(client, watch, "counter", {"steps": 200, "delay": 0.02})
    with brokerctl.app_stopped():
        brokerctl.wait_until(lambda: not client.transport.connected, 30,  # type: ignore[attr-defined]
                          "the client to notice the broker is gone")
    assert counter.result(WAIT) == {"count": 200, "label": ""}
    before = watch.count(job.id, "progress")
    watch.wait(lambda: watch.count(job.id, "progress") > before, "no progress after restart")
    assert_controllable(client, watch, job)


def test_black_holed_then_reset_connection(amqp_url: str, client: Client,
                                           worker_process: Callable[..., Any]) -> None:
    with TcpProxy() as proxy:
        worker = worker_process("--heartbeat", HEARTBEAT, url=proxy.url(amqp_url))
        watch = Watch()
        job = launch(client, watch, "forever", {"tick": 0.01}, progress_delta=0.1)
        job.status()  # an RPC claims it: its endpoint is now a queue of the worker's connection
        proxy.blackhole()
        # The broker reaps the silent connection after missed heartbeats: the job's
        # endpoint goes with it.
        deadline = time.monotonic() + WAIT
        while True:
            try:
                job.status(timeout=2)
            except (JobNotFound, Timeout):
                break
            assert time.monotonic() < deadline, "the broker never noticed the black hole"
        proxy.heal()
        brokerctl.wait_until(lambda: _state(job) == "running", WAIT, "status running after heal")
        proxy.reset()
        brokerctl.wait_until(lambda: _state(job) == "running", WAIT, "status running after reset")
        assert_controllable(client, watch, job)
        stopped_cleanly(worker)


def test_pause_all_reaches_a_worker_that_was_cut_off(
        amqp_url: str, client: Client, worker_process: Callable[..., Any]) -> None:
    with TcpProxy() as proxy:
        worker = worker_process("--heartbeat", HEARTBEAT, url=proxy.url(amqp_url))
        watch = Watch()
        job = launch(client, watch, "forever", {"tick": 0.01})
        job.status()  # an RPC claims it: its endpoint is now a queue of the worker's connection
        proxy.blackhole()
        brokerctl.wait_until(lambda: _unreachable(job), WAIT, "the broker to drop the worker")
        client.pause_all()  # sent while the worker is cut off
        proxy.heal()
        watch.wait(lambda: watch.reached(job.id, "paused"), "pause_all never arrived")
        client.resume_all()
        brokerctl.eventually(job.abort, "abort")
        with pytest.raises(JobAborted):
            job.result(WAIT)
        stopped_cleanly(worker)


def stopped_cleanly(worker: Any) -> None:
    """SIGTERM, while its broker is in reach: the worker writes what it holds (the aborted
    job's record) and exits 0 at once (with its broker gone it would wait for it: ``worker
    --shutdown-grace``)."""
    assert worker.terminate(timeout=WAIT) == 0, "".join(worker.lines[-20:])


def _state(job: Any) -> str | None:
    """The job's state now, or None while its worker is out of reach. A job whose worker
    reconnects is ``resuming`` until the worker claims it again (it answers for it then)."""
    try:
        return str(job.status(timeout=2)["state"])
    except (BrokerConnectionError, JobNotFound, Timeout):
        return None


def _unreachable(job: Any) -> bool:
    try:
        job.status(timeout=2)
    except (JobNotFound, Timeout):
        return True
    return False


def test_sigstopped_broker(client: Client, worker_process: Callable[..., Any]) -> None:
    worker = worker_process("--heartbeat", HEARTBEAT)
    watch = Watch()
    job = launch(client, watch, "forever", {"tick": 0.01}, progress_delta=0.1)
    with brokerctl.broker_frozen():
        brokerctl.wait_until(lambda: any("lost" in line for line in worker.lines), 30,
                          "the worker to detect the hung broker by heartbeat")
    before = watch.count(job.id, "progress")
    watch.wait(lambda: watch.count(job.id, "progress") > before, "no progress after SIGCONT")
    assert_controllable(client, watch, job)


def test_a_record_its_journal_stream_does_not_take_waits_in_the_worker_until_it_does(
        own_vhost: str, worker_process: Callable[..., Any]) -> None:
    """The broker confirms a publish it routed to no queue as readily as a stored one: right
    after it starts, RabbitMQ routes nothing to streams still recovering, and a job's record
    written then was confirmed and gone (its job stuck resuming forever). Here the job's
    stream is deleted while it runs: its record is returned, kept and written again until
    the stream is back, never taken for stored."""
    import pika

    from brokerexec.protocol.names import journal_stream
    from brokerexec.protocol.topology import journal_specs

    worker = worker_process("--heartbeat", HEARTBEAT, services=("Counter",), url=own_vhost)
    with Client(own_vhost, timeout=10) as client:  # gone before the job ends: no push of its record
        job = client.launch("counter", {"steps": 30, "delay": 0.1})
        job_id = job.id
        brokerctl.wait_until(lambda: job.status().get("state") == "running", WAIT, "the job to run")
    stream = journal_stream(job_id)
    spec = next(spec for spec in journal_specs() if spec.name == stream)
    connection = pika.BlockingConnection(pika.URLParameters(own_vhost))
    try:
        channel = connection.channel()
        channel.queue_delete(stream)
        brokerctl.wait_until(lambda: any("to no queue" in line and stream in line for line in worker.lines),
                             WAIT, "the worker to be told its record went nowhere")
        channel.queue_declare(stream, durable=True, arguments=dict(spec.arguments))
        for exchange in spec.bound_to:
            channel.queue_bind(stream, exchange, spec.routing_key)
    finally:
        connection.close()
    with Client(own_vhost, timeout=10) as client:
        def stored() -> bool:  # the stream lost the job's launch with it: unknown until then
            try:
                return client.job(job_id).record() is not None
            except JobNotFound:
                return False

        brokerctl.wait_until(stored, WAIT, "the record to be written again once its stream is back")
        assert client.job(job_id).result(WAIT) == {"count": 30, "label": ""}
