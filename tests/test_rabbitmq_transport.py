"""The RabbitMQ transport itself, driven through its two interfaces against the real broker.

The worker side is given a tiny recording :class:`FakeHooks` (a real object, no mocks of
the broker); the client side is the real blocking ``PikaClientTransport``. Raw pika
connections stand in for the peers (stock kiwipy tools, a look at the dead-letter exchange)
where the wire itself is what is checked. ``test_reconnect.py`` reuses the helpers here.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import json
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pika
import pytest
import yaml

from brokerexec.errors import DecodeError, JobNotFound, RemoteError, Timeout, UnknownService
from brokerexec.protocol.events import Event
from brokerexec.protocol.intents import Intent, Signal
from brokerexec.protocol.messages import Control, JobSummary, Launch, Record
from brokerexec.protocol.names import (
    BROADCAST_TOPIC,
    DEAD_LETTER_EXCHANGE,
    DIRECT_REPLY_TO,
    KIWIPY_EXCHANGE,
    KIWIPY_OTHERS_EXCHANGE,
    journal_stream,
    launch_queue,
    new_job_id,
    rpc_routing_key,
)
from brokerexec.protocol.states import JobState
from brokerexec.settings import RabbitMQSettings
from brokerexec.transport.base import PreparedJob
from brokerexec.transport.pika.client import PikaClientTransport
from brokerexec.transport.rabbitmq.connection_settings import ConnectionSettings
from brokerexec.transport.rabbitmq.worker.transport import RabbitWorkerTransport

pytestmark = pytest.mark.rabbitmq
WAIT = 20.0


# ---- helpers (also used by test_reconnect.py) ----------------------------------------------


def settings_for(url: str, name: str, **overrides: Any) -> ConnectionSettings:
    """Settings whose connection shows up as ``name`` in ``rabbitmqctl list_connections``.

    The name also goes into the URL (``?name=``): aio-pika drops ``client_properties`` when
    it is given a URL, and aiormq reads the connection name from the URL query.
    """
    separator = "&" if "?" in url else "?"
    return ConnectionSettings(url=f"{url}{separator}name={name}", name=name, **overrides)


def client_for(url: str, name: str) -> PikaClientTransport:
    """A blocking client transport whose connections show up as ``name`` (and
    ``name-listener``), its records pushed to it as ``Client``'s are."""
    return PikaClientTransport(url, name=name, push_records=True, heartbeat=0)


# What the fake jobs of FakeHooks answer: real intents, with fake methods to invoke.
STATUS = Signal.of(Intent.STATUS)
SLOW = Signal.of(Intent.INVOKE, method="slow")
FAIL = Signal.of(Intent.INVOKE, method="fail")


def echo(value: Any) -> Signal:
    return Signal.of(Intent.INVOKE, method="echo", args=[value])


def finished(job_id: str, result: Any = None, state: JobState = JobState.FINISHED) -> Record:
    """A final record as a worker stores it."""
    return Record(job_id, "fake", state, result, start=time.time(), end=time.time())


def connection_pids(name: str) -> list[str]:
    """Broker-side pids of the connections called ``name``."""
    listing = subprocess.run(["rabbitmqctl", "-s", "list_connections", "pid", "client_properties"],
                             capture_output=True, text=True, check=True, timeout=60).stdout
    tag = f'{{"connection_name","{name}"}}'
    return [line.split("\t", 1)[0] for line in listing.splitlines() if tag in line]


def close_connections_named(name: str) -> int:
    """Close, on the broker, every connection called ``name``; return how many."""
    pids = connection_pids(name)
    for pid in pids:
        subprocess.run(["rabbitmqctl", "-q", "close_connection", pid, "brokerexec test"],
                       capture_output=True, check=True, timeout=60)
    return len(pids)


class FakeHooks:
    """Worker hooks that record every call; jobs answer ``status`` and a few fake methods.

    Like the real worker it reserves a slot in ``prepare`` and gives it back in ``release``,
    telling the transport its free capacity each time. ``only`` (job ids) makes it drop any
    other launch, e.g. one an earlier test left in the shared launch queue.
    """

    def __init__(self, name: str, capacity: int = 8, only: set[str] | None = None) -> None:
        self.name, self.capacity, self.only = name, capacity, only
        self.transport: RabbitWorkerTransport | None = None
        self.cond = threading.Condition()
        self.prepared: list[dict[str, Any]] = []
        self.begun: list[str] = []
        self.cancelled: list[tuple[str, str]] = []
        self.controls: list[Control] = []
        self.rpcs: list[tuple[str, Any]] = []  # (job id, intent or invoked method), as they came
        self.pending: list[cf.Future[Any]] = []
        self.active: set[str] = set()
        self.most_active = 0
        self.born = time.time()

    def _changed(self) -> None:
        self.cond.notify_all()

    def wait(self, predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
        with self.cond:
            assert self.cond.wait_for(predicate, timeout), f"{self.name}: {what}"

    def _tell_free(self) -> None:
        if self.transport is not None:
            self.transport.set_free_capacity(self.capacity - len(self.active))

    # ---- WorkerHooks ---------------------------------------------------------------------

    def prepare(self, launch: Launch) -> PreparedJob | None:
        if launch.service == "undecodable":
            raise DecodeError("this service's launches are refused by prepare")
        with self.cond:
            self.prepared.append(launch.encode())
            self._changed()
            if self.only is not None and launch.job_id not in self.only:
                return None
            self.active.add(launch.job_id)
            self.most_active = max(self.most_active, len(self.active))
        self._tell_free()
        return PreparedJob(launch.job_id, launch.service, launch)

    def begin(self, job: PreparedJob) -> None:
        with self.cond:
            self.begun.append(job.job_id)
            self._changed()

    def cancel(self, job: PreparedJob, reason: str) -> None:
        with self.cond:
            self.cancelled.append((job.job_id, reason))
            self.active.discard(job.job_id)
            self._changed()
        self._tell_free()

    def release(self, job_id: str) -> None:
        """The job ended: give its slot back (the real worker does this after ``finish``)."""
        with self.cond:
            self.active.discard(job_id)
        self._tell_free()

    def on_rpc(self, job_id: str, signal: Signal) -> Any:
        what = signal.get("method") if signal.intent is Intent.INVOKE else signal.intent.value
        with self.cond:
            self.rpcs.append((job_id, what))
            self._changed()
        if job_id not in self.begun:
            raise JobNotFound(f"job {job_id} is not running on {self.name}")
        if what == "status":
            return {"job_id": job_id, "worker": self.name}
        if what == "echo":
            return signal.get("args")[0]
        if what == "slow":
            future: cf.Future[Any] = cf.Future()
            with self.cond:
                self.pending.append(future)
                self._changed()
            return future
        if what == "fail":
            raise ValueError("the fake job refuses")
        raise DecodeError(f"the fake job does not {what!r}")

    def on_control(self, control: Control) -> None:
        if control.sent is not None and control.sent < self.born:
            return  # replayed from the control stream (the last hour): a worker only notes it
        with self.cond:
            self.controls.append(control)
            self._changed()

    def describe_jobs(self) -> list[JobSummary]:
        with self.cond:
            return [JobSummary(job_id, "fake", "running", 0.0, {}) for job_id in self.begun]

    def describe_services(self) -> dict[str, dict[str, Any]]:
        return {"fake": {"name": "fake", "settable": {}, "invokable": []}}

    def superseded(self, job_id: str, reason: str) -> None:
        # What the real worker does: abort its copy (recorded as an RPC, as tests expect).
        with self.cond:
            self.rpcs.append((job_id, "abort"))
            self.superseded_as = reason
            self._changed()


class Inbox:
    """Events delivered to a subscription callback, waited on by condition."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.events: list[Event] = []
        self.threads: set[str] = set()

    def __call__(self, event: Event) -> None:
        with self.cond:
            self.events.append(event)
            self.threads.add(threading.current_thread().name)
            self.cond.notify_all()

    def wait_for(self, predicate: Callable[[Event], bool], what: str, timeout: float = WAIT) -> Event:
        with self.cond:
            assert self.cond.wait_for(lambda: any(predicate(e) for e in self.events), timeout), what
            return next(e for e in self.events if predicate(e))


def event(kind: str, service: str, job_id: str, data: dict[str, Any] | None = None,
          seq: int = 0) -> Event:
    return Event(kind, job_id, service, seq, time.time(), data or {})


class Raw:
    """A raw pika connection: a peer that is not brokerexec (kiwipy tools, operators)."""

    def __init__(self, url: str) -> None:
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        self.replies: list[tuple[pika.BasicProperties, bytes]] = []
        self.channel.basic_consume(DIRECT_REPLY_TO, self._on_reply, auto_ack=True)

    def _on_reply(self, _ch: Any, _method: Any, props: pika.BasicProperties, body: bytes) -> None:
        self.replies.append((props, body))

    def request(self, job_id: str, body: bytes, content_type: str) -> str:
        correlation_id = uuid.uuid4().hex
        self.channel.basic_publish(KIWIPY_EXCHANGE, rpc_routing_key(job_id), body,
                                   pika.BasicProperties(content_type=content_type,
                                                        correlation_id=correlation_id,
                                                        reply_to=DIRECT_REPLY_TO))
        return correlation_id

    def next_reply(self, correlation_id: str, within: float = 5.0) -> tuple[str, Any]:
        """The next reply to ``correlation_id``: its content type and decoded body."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            for index, (props, body) in enumerate(self.replies):
                if props.correlation_id == correlation_id:
                    del self.replies[index]
                    return props.content_type, yaml.safe_load(body)  # JSON is YAML too
            self.connection.process_data_events(time_limit=0.02)
        raise AssertionError(f"no reply to {correlation_id} within {within} s")

    def listen(self, exchange: str, routing_key: str = "") -> str:
        """An exclusive queue bound to ``exchange``; returns its name."""
        queue = str(self.channel.queue_declare("", exclusive=True).method.queue)
        self.channel.queue_bind(queue, exchange, routing_key)
        return queue

    def get(self, queue: str, predicate: Callable[[pika.BasicProperties, bytes], bool],
            within: float) -> tuple[pika.BasicProperties, bytes]:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            method, props, body = self.channel.basic_get(queue, auto_ack=True)
            if method is None:
                self.connection.process_data_events(time_limit=0.02)
            elif predicate(props, body):
                return props, body
        raise AssertionError(f"nothing matching arrived on {queue} within {within} s")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.connection.close()


# ---- fixtures ------------------------------------------------------------------------------


#: The fake services every test worker offers.
SERVICES = ("fake", "undecodable")


@pytest.fixture
def make_worker(amqp_url: str, unique_name: str
                ) -> Iterator[Callable[..., tuple[RabbitWorkerTransport, FakeHooks]]]:
    """Factory: ``make_worker(capacity=8, only=None, url=None, claim_after=0, **settings)``.

    Returns (transport, hooks). ``claim_after=0`` claims every job before it starts, so raw
    peers can address it at once; tests of the lazy claim pass another value.
    """
    started: list[RabbitWorkerTransport] = []

    def make(capacity: int = 8, only: set[str] | None = None, url: str | None = None,
             claim_after: float = 0, services: tuple[str, ...] = SERVICES,
             **settings: Any) -> tuple[RabbitWorkerTransport, FakeHooks]:
        name = f"{unique_name}-w{len(started)}"
        transport = RabbitWorkerTransport(settings_for(url or amqp_url, name, **settings),
                                          host_info={"name": name}, rabbitmq=RabbitMQSettings(
                                              claim_after=claim_after, resume_grace=0.2))
        hooks = FakeHooks(name, capacity, only)
        hooks.transport = transport
        started.append(transport)
        transport.serve(hooks, capacity, services)
        return transport, hooks

    yield make
    for transport in started:
        transport.close()


@pytest.fixture
def client(amqp_url: str, unique_name: str) -> Iterator[PikaClientTransport]:
    transport = client_for(amqp_url, f"{unique_name}-client")
    yield transport
    transport.close()


def launch_of(job_id: str, service: str = "fake") -> list[Launch]:
    return [Launch.new(service, job_id=job_id)]


def launched(client: PikaClientTransport, hooks: FakeHooks, service: str = "fake") -> str:
    """Launch a job and wait until ``hooks`` began it; return its id."""
    job_id = new_job_id()
    if hooks.only is not None:
        hooks.only.add(job_id)
    client.launch(launch_of(job_id, service))
    hooks.wait(lambda: job_id in hooks.begun, f"job {job_id} never began")
    return job_id


# ---- launch, claim, finish, result ---------------------------------------------------------


def test_launch_claim_begin_finish_and_fetch_result(make_worker: Any, client: PikaClientTransport) -> None:
    worker, hooks = make_worker(only=set())
    job_id = launched(client, hooks)
    assert client.rpc(job_id, STATUS, 5) == {"job_id": job_id, "worker": hooks.name}
    # A reader that waits before the record exists gets it once it is stored.
    early = cf.ThreadPoolExecutor(1, thread_name_prefix="early-reader")
    waiting = early.submit(client.fetch_result, job_id, WAIT)
    assert client.fetch_result(job_id, 0) is None  # "not yet", not an error

    record = finished(job_id, {"answer": 42})
    worker.finish(record).result(WAIT)
    assert waiting.result(WAIT) == record.encode()
    early.shutdown()
    # The record stays for every later reader.
    assert client.fetch_result(job_id, 5) == record.encode()
    assert client.fetch_result(job_id, 0) == record.encode()
    # finish released the job's endpoint: nobody holds the id any more.
    with pytest.raises(JobNotFound):
        client.rpc(job_id, STATUS, 5)


def test_result_of_a_job_never_launched_is_not_found_at_once(
        make_worker: Any, client: PikaClientTransport) -> None:
    make_worker(capacity=0)  # the journal exists: a worker has run
    started = time.monotonic()
    for timeout in (0, 30, None):
        with pytest.raises(JobNotFound, match="no trace of it"):
            client.fetch_result(new_job_id(), timeout)
    assert time.monotonic() - started < 2.0


def test_a_second_worker_cannot_claim_a_claimed_job(make_worker: Any, client: PikaClientTransport) -> None:
    # Given a job claimed by the first worker, which takes no more launches
    first_worker, first = make_worker(capacity=1, only=set())
    job_id = launched(client, first)
    first_worker.stop_taking_work()  # (a launch of a job it runs would be dropped right there)
    # When the same launch reaches a second worker
    _, second = make_worker(only={job_id})
    client.launch(launch_of(job_id))
    # Then its claim fails, it gives the slot back, and the first worker still owns the job
    second.wait(lambda: bool(second.cancelled), "the duplicate claim was not refused")
    assert second.cancelled[0][0] == job_id and "another worker" in second.cancelled[0][1]
    assert second.begun == [] and second.active == set()
    assert client.rpc(job_id, STATUS, 5)["worker"] == first.name


def test_a_young_job_is_claimed_after_claim_after(make_worker: Any, client: PikaClientTransport,
                                                 amqp_url: str) -> None:
    _, hooks = make_worker(only=set(), claim_after=0.5)
    raw = Raw(amqp_url)
    try:
        job_id = launched(client, hooks)
        began = time.monotonic()
        # Unclaimed: a stock kiwipy client's RPC is unroutable (returned, no reply)...
        raw.channel.confirm_delivery()
        with pytest.raises(pika.exceptions.UnroutableError):
            raw.channel.basic_publish(KIWIPY_EXCHANGE, rpc_routing_key(job_id), b'{"intent": "status"}',
                                      pika.BasicProperties(content_type="application/json",
                                                           reply_to=DIRECT_REPLY_TO), mandatory=True)
        # ...until the worker claims it, claim_after seconds in
        while True:
            correlation_id = uuid.uuid4().hex
            try:
                raw.channel.basic_publish(
                    KIWIPY_EXCHANGE, rpc_routing_key(job_id), b'{"intent": "status"}',
                    pika.BasicProperties(content_type="application/json", reply_to=DIRECT_REPLY_TO,
                                         correlation_id=correlation_id), mandatory=True)
                break
            except pika.exceptions.UnroutableError:
                assert time.monotonic() - began < WAIT, "never claimed"
                raw.connection.sleep(0.05)
        assert time.monotonic() - began >= 0.4
        assert raw.next_reply(correlation_id)[1] == {"result": {"job_id": job_id, "worker": hooks.name}}
    finally:
        raw.close()


def test_an_rpc_reaches_a_young_job_through_every_worker_and_claims_it(
        make_worker: Any, client: PikaClientTransport) -> None:
    _, idle = make_worker(capacity=0, only=set(), claim_after=600)  # takes no launches
    worker, hooks = make_worker(only=set(), claim_after=600)
    job_id = launched(client, hooks)
    # Not claimed, yet the client's RPC finds it: the running worker answers, the idle one not
    assert client.rpc(job_id, STATUS, 5) == {"job_id": job_id, "worker": hooks.name}
    # and the job is claimed now: its queue exists and routes the next RPC directly
    assert client.rpc(job_id, echo(7), 5) == 7
    record = finished(job_id)
    worker.finish(record).result(WAIT)
    assert client.fetch_result(job_id, 5) == record.encode()
    with pytest.raises(JobNotFound):
        client.rpc(job_id, STATUS, 5)
    assert idle.begun == []


def test_a_young_job_finishes_without_a_claim_and_its_launch_is_acked(
        make_worker: Any, client: PikaClientTransport, amqp_url: str) -> None:
    worker, hooks = make_worker(capacity=1, only=set(), claim_after=600)
    first = launched(client, hooks)
    record = finished(first, 1)
    worker.finish(record).result(WAIT)
    hooks.release(first)
    assert client.fetch_result(first, 0) == record.encode()  # pushed, or the stream with a probe
    second = launched(client, hooks)  # the slot and the prefetch were freed by the ack
    worker.finish(finished(second, 1)).result(WAIT)
    hooks.release(second)
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        declared = connection.channel().queue_declare(launch_queue("fake"), passive=True)
        assert declared.method.message_count == 0
    finally:
        connection.close()


def test_a_launch_redelivered_after_its_worker_was_cut_off_has_one_owner(
        make_worker: Any, client: PikaClientTransport) -> None:
    # Given a young job on a worker whose connection the broker closes
    first_worker, first = make_worker(capacity=1, only=set(), claim_after=600)
    job_id = launched(client, first)
    second_worker, second = make_worker(only={job_id}, claim_after=600)
    assert close_connections_named(first.name) == 1
    # Then the launch goes back to the queue; the second worker claims it before running it,
    # the first claims it on reconnecting: one of them wins, the other stands down
    second.wait(lambda: job_id in second.begun or bool(second.cancelled), "the launch never came back")
    owner_name = client.rpc(job_id, STATUS, 5)["worker"]
    if job_id in second.begun:  # the usual order: the second was consuming already
        assert owner_name == second.name
        owner, loser = second_worker, first_worker
        # it claims on reconnecting, loses, and aborts its copy
        first.wait(lambda: (job_id, "abort") in first.rpcs, "the first worker never stood down")
        assert first_worker.ownership.silenced(job_id)
        loser.finish(finished(job_id, state=JobState.ABORTED)).result(WAIT)
        assert client.fetch_result(job_id, 0) is None  # the loser stores nothing
    else:
        assert owner_name == first.name and "another worker" in second.cancelled[0][1]
        owner = first_worker
    record = finished(job_id, 2)
    owner.finish(record).result(WAIT)
    assert client.fetch_result(job_id, 5) == record.encode()


def test_a_launch_that_comes_back_after_its_job_ended_is_not_run_again(
        make_worker: Any, client: PikaClientTransport, raw: Raw) -> None:
    # Given a young job that ended and stored its record, on a worker that is gone since
    first_worker, first = make_worker(only=set(), claim_after=600)
    job_id = launched(client, first)
    record = finished(job_id, 1)
    first_worker.finish(record).result(WAIT)
    first_worker.close()
    # When its launch comes back redelivered (as when the ack is lost in a cut)
    body = json.dumps(Launch.new("fake", job_id=job_id).encode()).encode()
    raw.channel.basic_publish("", launch_queue("fake"), body,
                              pika.BasicProperties(content_type="application/json", delivery_mode=2,
                                                   message_id=job_id))
    deadline = time.monotonic() + WAIT
    while (taken := raw.channel.basic_get(launch_queue("fake"), auto_ack=False))[0] is None:
        assert time.monotonic() < deadline, "the launch never arrived"
    raw.channel.basic_nack(taken[0].delivery_tag, requeue=True)
    # Then the next worker claims it, finds the record, and does not run the job again
    _, second = make_worker(only={job_id}, claim_after=600)
    second.wait(lambda: bool(second.cancelled), "the launch that came back was never looked at")
    assert job_id not in second.begun and "ended already" in second.cancelled[0][1]
    assert client.fetch_result(job_id, 0) == record.encode()
    assert client.fetch_result(job_id, 5) == record.encode()


def test_launches_are_taken_only_while_there_is_free_capacity(
        make_worker: Any, client: PikaClientTransport) -> None:
    worker, hooks = make_worker(capacity=1, only=set())
    job_ids = [new_job_id() for _ in range(3)]
    hooks.only = set(job_ids)
    for job_id in job_ids:
        client.launch(launch_of(job_id))
    for done in range(3):
        hooks.wait(lambda done=done: len(hooks.begun) == done + 1, f"job {done} never began")
        running = hooks.begun[-1]
        assert hooks.most_active == 1, "more launches taken than free slots"
        worker.finish(finished(running)).result(WAIT)
        hooks.release(running)
    assert sorted(hooks.begun) == sorted(job_ids)


def test_undecodable_launches_are_dead_lettered_at_once(
        make_worker: Any, client: PikaClientTransport, raw: Raw) -> None:
    _, hooks = make_worker(only=set())
    dead = raw.listen(DEAD_LETTER_EXCHANGE)  # a copy of everything dead-lettered from now on
    marker = uuid.uuid4().hex
    bad = [(b"{not json", "application/json"),
           (b"\x80\x04K\x01.", "application/x-python-serialize"),
           (b'{"v": 1, "service": "fake", "job_id": "no.dots.allowed"}', "application/json")]
    started = time.monotonic()
    for body, content_type in bad:  # without a job id: nobody to tell
        raw.channel.basic_publish("", launch_queue("fake"), body, pika.BasicProperties(
            content_type=content_type, correlation_id=marker, delivery_mode=2))
    for body, _ in bad:
        def dead_lettered(props: pika.BasicProperties, got: bytes, body: bytes = body) -> bool:
            return bool(props.correlation_id == marker and got == body)

        props, _ = raw.get(dead, dead_lettered, 2.0)
        death = props.headers["x-death"][0]
        assert (death["queue"], death["reason"]) == (launch_queue("fake"), "rejected")
    assert time.monotonic() - started < 2.0
    # The worker keeps taking good launches.
    launched(client, hooks)


def test_a_launch_that_cannot_run_but_names_its_job_ends_with_a_failed_record(
        make_worker: Any, client: PikaClientTransport, raw: Raw) -> None:
    _, hooks = make_worker(only=set())
    too_big = json.dumps({**Launch.new("fake").encode(), "request": {"x": "y" * 1_100_000}}).encode()
    cases = {new_job_id(): (b"{not json", "fake", "JSON"),
             new_job_id(): (too_big, "fake", "over the limit"),
             new_job_id(): (json.dumps(Launch.new("undecodable").encode()).encode(), "undecodable",
                            "refused by prepare")}
    for job_id, (body, service, _) in cases.items():
        raw.channel.basic_publish("brokerexec.launches", service, body, pika.BasicProperties(
            content_type="application/json", message_id=job_id, delivery_mode=2,
            headers={"CC": [journal_stream(job_id)]}))
    for job_id, (_, service, says) in cases.items():
        record = client.fetch_result(job_id, WAIT)
        assert record is not None and record["state"] == "failed", job_id
        assert record["service"] == service and says in record["error"]["message"]
    launched(client, hooks)


def test_a_launch_of_a_service_no_worker_offers_is_refused_at_the_client(
        make_worker: Any, client: PikaClientTransport) -> None:
    make_worker(capacity=0)
    started = time.monotonic()
    with pytest.raises(UnknownService, match="no worker has ever offered service 'nobody-offers-this'"):
        client.launch(launch_of(new_job_id(), "nobody-offers-this"))
    assert time.monotonic() - started < 1.0


# ---- RPC -----------------------------------------------------------------------------------


def test_rpc_value_pending_then_final_and_errors(make_worker: Any, client: PikaClientTransport) -> None:
    _, hooks = make_worker(only=set())
    job_id = launched(client, hooks)
    assert client.rpc(job_id, echo([1, "two", None]), 5) == [1, "two", None]

    answer = cf.ThreadPoolExecutor(1, thread_name_prefix="rpc-caller")
    slow = answer.submit(client.rpc, job_id, SLOW, WAIT)
    hooks.wait(lambda: bool(hooks.pending), "the slow RPC never reached the hooks")
    hooks.pending[0].set_result({"late": True})
    assert slow.result(WAIT) == {"late": True}

    failing = answer.submit(client.rpc, job_id, SLOW, WAIT)
    hooks.wait(lambda: len(hooks.pending) == 2, "the second slow RPC never arrived")
    hooks.pending[1].set_exception(KeyError("gone"))
    with pytest.raises(RemoteError) as caught:
        failing.result(WAIT)
    assert caught.value.remote_type == "KeyError"
    answer.shutdown()

    with pytest.raises(RemoteError) as caught:
        client.rpc(job_id, FAIL, 5)
    assert (caught.value.remote_type, caught.value.remote_message) == ("ValueError", "the fake job refuses")
    assert "on_rpc" in caught.value.remote_traceback
    # An intent this client cannot even send: a raw peer's, refused by the worker.
    raw = Raw(client.url)
    try:
        _, reply = raw.next_reply(raw.request(job_id, b'{"intent": "dance"}', "application/json"))
        assert "unknown intent 'dance'" in reply["exception"]
    finally:
        raw.close()


def test_rpc_to_an_unknown_job_is_not_found_within_a_second(client: PikaClientTransport) -> None:
    job_id = new_job_id()
    started = time.monotonic()
    with pytest.raises(JobNotFound, match=f"no worker holds job {job_id}"):
        client.rpc(job_id, STATUS, 10)
    assert time.monotonic() - started < 1.0


def test_rpc_timeout_names_the_job_and_the_intent(make_worker: Any, client: PikaClientTransport) -> None:
    _, hooks = make_worker(only=set())
    job_id = launched(client, hooks)
    started = time.monotonic()
    with pytest.raises(Timeout, match=f"{job_id}.*'slow'"):
        client.rpc(job_id, SLOW, 0.5)
    assert 0.5 <= time.monotonic() - started < 3
    hooks.pending[0].set_result(None)  # answered too late: nobody waits for it any more
    assert client.rpc(job_id, echo(1), 5) == 1


def test_pending_goes_out_at_once_and_replies_use_the_request_codec(
        make_worker: Any, client: PikaClientTransport, raw: Raw) -> None:
    _, hooks = make_worker(only=set())
    job_id = launched(client, hooks)
    # A stock kiwipy client speaks YAML and decodes replies as YAML.
    correlation_id = raw.request(job_id, yaml.safe_dump({"intent": "invoke", "method": "slow"}).encode(),
                                 "application/x-yaml")
    # kiwipy reads "pending" and ignores the attempt beside it (brokerexec clients use it).
    assert raw.next_reply(correlation_id) == ("application/x-yaml", {"pending": None, "attempt": 1})
    hooks.wait(lambda: bool(hooks.pending), "the slow RPC never reached the hooks")
    hooks.pending[0].set_result(7)
    assert raw.next_reply(correlation_id) == ("application/x-yaml", {"result": 7})

    correlation_id = raw.request(job_id, b'{"intent": "invoke", "method": "echo", "args": ["x"]}',
                                 "application/json")
    assert raw.next_reply(correlation_id) == ("application/json", {"result": "x"})


# ---- events --------------------------------------------------------------------------------


def test_subscriptions_by_job_service_and_kind(make_worker: Any, client: PikaClientTransport,
                                               unique_name: str) -> None:
    worker, _ = make_worker()
    service, other = f"svc{uuid.uuid4().hex[:8]}", f"other{uuid.uuid4().hex[:8]}"
    job_a, job_b, job_c = new_job_id(), new_job_id(), new_job_id()
    one_job, one_service, one_kind = Inbox(), Inbox(), Inbox()
    client.subscribe([f"*.*.{job_a}"], one_job)
    client.subscribe([f"*.{service}.*"], one_service)
    kind_subscription = client.subscribe(["improved.#", f"checkpoint.{other}.*"], one_kind)

    published = [event("state", service, job_a, {"from": "created", "to": "running"}),
                 event("progress", other, job_b, {"done": 1}),
                 event("checkpoint", service, job_c),
                 event("checkpoint", other, job_c),
                 event("improved", other, job_b, {"best": 3.0}),
                 event("improved", service, job_a, {"best": 1.0})]  # last: matches all three
    for item in published:
        worker.publish_event(item)
    last = published[-1]
    for inbox in (one_job, one_service, one_kind):
        inbox.wait_for(lambda e: e == last, "the last event never arrived")

    def keys(inbox: Inbox) -> list[str]:
        return [e.routing_key for e in inbox.events]

    # Events of one publisher arrive in order, and only those each binding selects.
    assert keys(one_job) == [published[0].routing_key, last.routing_key]
    assert keys(one_service) == [published[i].routing_key for i in (0, 2, 5)]
    assert keys(one_kind) == [published[i].routing_key for i in (3, 4, 5)]
    assert one_job.events[0].data == {"from": "created", "to": "running"}
    assert all(name.startswith("brokerexec-pika-listener") for name in one_job.threads)

    # A closed subscription gets nothing more, the others still do.
    kind_subscription.close()
    after = event("improved", service, job_a, {"best": 0.5}, seq=1)
    worker.publish_event(after)
    one_job.wait_for(lambda e: e == after, "no event after another subscription closed")
    one_service.wait_for(lambda e: e == after, "no event after another subscription closed")
    assert after not in one_kind.events


def test_state_events_are_also_kiwipy_state_changed_broadcasts(make_worker: Any, raw: Raw) -> None:
    worker, hooks = make_worker()
    broadcasts = raw.listen(KIWIPY_EXCHANGE, BROADCAST_TOPIC)
    job_id = new_job_id()
    worker.publish_event(event("state", "fake", job_id, {"from": "running", "to": "paused"}))
    _, body = raw.get(broadcasts, lambda p, b: job_id.encode() in b, 5.0)
    assert yaml.safe_load(body) == {"body": None, "sender": job_id, "correlation_id": None,
                                    "subject": "state_changed.running.paused"}
    # The worker hears its own broadcast too, and ignores it: the next control it gets is
    # the pause sent after it.
    raw.channel.basic_publish(KIWIPY_EXCHANGE, BROADCAST_TOPIC, json.dumps(
        {"body": {"intent": "pause"}, "sender": None, "subject": "pause", "correlation_id": None}
    ).encode(), pika.BasicProperties(content_type="application/json"))
    hooks.wait(lambda: bool(hooks.controls), "the kiwipy pause broadcast never arrived")
    assert [c.intent for c in hooks.controls] == [Intent.PAUSE]


def test_workers_hear_plumpy_broadcasts_but_not_the_jobs_state_changed(
        make_worker: Any, raw: Raw) -> None:
    worker, hooks = make_worker()
    stock = raw.listen(KIWIPY_EXCHANGE, BROADCAST_TOPIC)  # what a kiwipy tool hears
    filtered = raw.listen(KIWIPY_OTHERS_EXCHANGE)  # what workers hear
    job_id = new_job_id()
    worker.publish_event(event("state", "fake", job_id, {"from": "running", "to": "paused"}))
    _, body = raw.get(stock, lambda p, b: job_id.encode() in b, 5.0)
    assert yaml.safe_load(body)["subject"] == "state_changed.running.paused"
    raw.channel.basic_publish(KIWIPY_EXCHANGE, BROADCAST_TOPIC, yaml.safe_dump(
        {"body": None, "sender": None, "subject": "pause", "correlation_id": None}).encode(),
        pika.BasicProperties(content_type="application/x-yaml"))
    hooks.wait(lambda: bool(hooks.controls), "the plumpy pause never reached the worker")
    # Routing is in order: the state_changed went first, and the filter held it back.
    _, first = raw.get(filtered, lambda p, b: True, 5.0)
    assert yaml.safe_load(first)["subject"] == "pause"
    method, _, _ = raw.channel.basic_get(filtered, auto_ack=True)
    assert method is None


# ---- control and the jobs query ------------------------------------------------------------


def test_plumpy_broadcasts_become_control_messages(make_worker: Any, raw: Raw) -> None:
    _, hooks = make_worker()
    for subject, body in (("pause", {"intent": "pause", "message": "maintenance"}),
                          ("play", None), ("kill", {"intent": "kill", "message": None})):
        raw.channel.basic_publish(KIWIPY_EXCHANGE, BROADCAST_TOPIC, yaml.safe_dump(
            {"body": body, "sender": None, "subject": subject, "correlation_id": None}).encode(),
            pika.BasicProperties(content_type="application/x-yaml"))
    hooks.wait(lambda: len(hooks.controls) == 3, "not every plumpy broadcast arrived")
    assert [c.intent for c in hooks.controls] == [Intent.PAUSE, Intent.RESUME, Intent.ABORT]


def test_query_jobs_gathers_every_workers_jobs(make_worker: Any, client: PikaClientTransport) -> None:
    # The first worker has one slot: once its job runs, the next launch goes to the second.
    _, first = make_worker(capacity=1, only=set())
    job_a = launched(client, first)
    _, second = make_worker(only=set())
    job_b = launched(client, second)
    started = time.monotonic()
    jobs = client.list_jobs(1.0).jobs
    assert time.monotonic() - started < 3.0
    by_id = {job["job_id"]: job for job in jobs}
    assert {job_a, job_b} <= set(by_id)
    assert by_id[job_a]["state"] == by_id[job_b]["state"] == "running"


def test_query_jobs_names_the_worker_of_each_job(make_worker: Any, client: PikaClientTransport) -> None:
    _, hooks = make_worker(only=set())
    job_id = launched(client, hooks)
    jobs = [job for job in client.list_jobs(1.0).jobs if job["job_id"] == job_id]
    assert [job.get("worker", {}).get("name") for job in jobs] == [hooks.name]


def test_control_sent_while_a_worker_was_disconnected_is_applied_on_reconnect(
        make_worker: Any, client: PikaClientTransport, amqp_url: str) -> None:
    from tcpproxy import TcpProxy

    with TcpProxy() as proxy:
        worker, hooks = make_worker(url=proxy.url(amqp_url), connect_timeout=1.0)
        name = hooks.name
        first = Control(Intent.PAUSE, sent=time.time())  # `sent` tells them apart
        client.control(first)
        hooks.wait(lambda: first in hooks.controls, "a live control message never arrived")
        # Given the worker cut off: the broker closed its connection (which ends its
        # consumers at once), and the network swallows everything, so the worker can
        # neither receive anything nor come back yet
        proxy.blackhole()
        assert close_connections_named(name) == 1
        # When a control message is sent meanwhile, and the network heals
        second = Control(Intent.ABORT, sent=time.time() + 1)
        client.control(second)
        proxy.heal()
        # Then the worker reconnects and applies it, once, and the first is not replayed
        hooks.wait(lambda: second in hooks.controls, "the control sent while away never arrived")
        assert hooks.controls == [first, second]
        assert worker.connection.reconnects >= 1


def test_the_pinned_pika_has_the_internals_frame_joining_relies_on(amqp_url: str) -> None:
    # If this fails, a pika release changed what pika_internals relies on: publishes still
    # work, three system calls each instead of one. Mend pika_internals, or pin pika.
    from brokerexec.transport.pika.internals import join_frame_writes

    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        assert join_frame_writes(connection)
        channel = connection.channel()
        channel.confirm_delivery()
        queue = str(channel.queue_declare("", exclusive=True).method.queue)
        channel.basic_publish("", queue, b"x" * 300_000)  # several body frames, one write
        method, _, body = channel.basic_get(queue, auto_ack=True)
        assert method is not None and body == b"x" * 300_000
    finally:
        connection.close()


def test_a_record_found_early_in_a_long_stream_leaves_the_clients_connection_alone(
        make_worker: Any, client: PikaClientTransport, raw: Raw) -> None:
    # Given a record followed by thousands of others in its journal stream (more than a
    # reader's prefetch)
    from brokerexec.protocol.names import RECORD_TYPE

    make_worker(capacity=0)
    target = finished(new_job_id(), "early")
    stream = journal_stream(target.job_id)
    for record in [target, *(finished(new_job_id(), n) for n in range(3000))]:
        properties = pika.BasicProperties(content_type="application/json", message_id=record.job_id,
                                          type=RECORD_TYPE, delivery_mode=2)
        raw.channel.basic_publish("", stream, json.dumps(record.encode()).encode(), properties)
    # When it is looked up, with and without waiting
    client.list_jobs(0.1)
    connections = client.connections_made
    started = time.monotonic()
    assert client.fetch_result(target.job_id, 0) == target.encode()
    assert client.fetch_result(target.job_id, 5) == target.encode()
    assert time.monotonic() - started < 5
    # Then the client's own connection is fine (a stream refuses the rejects pika sends for
    # deliveries it still holds by closing the whole connection: not the caller's)
    client.list_jobs(0.2)  # round trip on the same thread's connection
    client.launch(launch_of(new_job_id(), "fake"))
    assert client.connections_made == connections


def test_stop_taking_work_returns_once_the_launch_consumers_are_cancelled(
        make_worker: Any, amqp_url: str) -> None:
    # A close right behind a cancel still in flight made aiormq close the channel with a
    # WARNING ("RPC call Basic.Cancel cancelled") on a clean stop: the stop waits for it.
    worker, _ = make_worker(capacity=1, services=("fake",))
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()

        def consumers() -> int:
            return int(channel.queue_declare(launch_queue("fake"), passive=True).method.consumer_count)

        deadline = time.monotonic() + WAIT
        while consumers() != 1:  # polling the broker's count, with a deadline
            assert time.monotonic() < deadline, "the worker never consumed its launches"
            connection.sleep(0.02)
        worker.stop_taking_work()
        assert consumers() == 0  # at once: no cancel is left for the close to cut short
    finally:
        connection.close()
