"""The RabbitMQ transport comes back by itself: consumers, subscriptions and job claims.

Transport level, real broker: a ``RabbitWorkerTransport`` with the recording hooks of
``test_rabbitmq_transport.py`` and a ``PikaClientTransport``. After each fault an RPC
must round-trip to the job and an event must reach the subscriber, with nothing done by
the test but waiting. Each fault test leaves the broker running (``faults`` restores it).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import operator
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlparse, urlunparse

import brokerctl
import pytest
from test_rabbitmq_transport import (
    SERVICES,
    STATUS,
    FakeHooks,
    Inbox,
    client_for,
    event,
    finished,
    launched,
    settings_for,
)

from brokerexec.protocol.intents import Intent
from brokerexec.protocol.messages import Control
from brokerexec.settings import RabbitMQSettings
from brokerexec.transport.pika.client import PikaClientTransport
from brokerexec.transport.rabbitmq.worker.transport import RabbitWorkerTransport

pytestmark = [pytest.mark.rabbitmq, pytest.mark.fault, pytest.mark.timeout(180)]
WAIT = 60.0


def round_trip(client: PikaClientTransport, worker: RabbitWorkerTransport, job_id: str,
               inbox: Inbox, what: str) -> None:
    """An RPC answers, then an event published now reaches the subscription."""
    status = brokerctl.eventually(lambda: client.rpc(job_id, STATUS, 2), f"RPC {what}")
    assert status["job_id"] == job_id
    # The subscription's queue may come back a moment after the RPC path: publish until
    # one event gets through (events sent while no queue is bound are dropped by design).
    deadline = time.monotonic() + WAIT
    while True:
        marker = event("progress", "fake", job_id, {"note": what}, seq=len(inbox.events))
        worker.publish_event(marker)
        with inbox.cond:
            if inbox.cond.wait_for(functools.partial(operator.contains, inbox.events, marker), 1.0):
                return
        assert time.monotonic() < deadline, f"no event reached the subscriber {what}"


@pytest.fixture(autouse=True)
def _broker_left_running() -> Iterator[None]:
    yield
    brokerctl.ensure_running()


@pytest.fixture
def transports(amqp_url: str, unique_name: str
               ) -> Iterator[Callable[..., tuple[RabbitWorkerTransport, FakeHooks]]]:
    """Factory of worker transports with recording hooks; all closed at the end."""
    started: list[RabbitWorkerTransport] = []

    def make(url: str | None = None, claim_after: float = 0,
             **settings: Any) -> tuple[RabbitWorkerTransport, FakeHooks]:
        name = f"{unique_name}-w{len(started)}"
        transport = RabbitWorkerTransport(settings_for(url or amqp_url, name, **settings),
                                          host_info={"name": name},
                                          rabbitmq=RabbitMQSettings(claim_after=claim_after))
        hooks = FakeHooks(name, only=set())
        hooks.transport = transport
        started.append(transport)
        transport.serve(hooks, hooks.capacity, SERVICES)
        return transport, hooks

    yield make
    for transport in started:
        transport.close()


@pytest.fixture
def client(amqp_url: str, unique_name: str) -> Iterator[PikaClientTransport]:
    transport = client_for(amqp_url, f"{unique_name}-client")
    yield transport
    transport.close()


def close_all_connections(amqp_url: str, reason: str) -> None:
    """``rabbitmqctl close_all_connections`` of the test vhost.

    Without ``--vhost`` (or ``--global``) rabbitmqctl closes only the connections of the
    default vhost ``/``, and this session's tests run in a vhost of their own.
    """
    vhost = urlparse(amqp_url).path[1:] or "/"
    brokerctl.rabbitmqctl("close_all_connections", "--vhost", vhost, reason)


def wait_until(condition: Callable[[], bool], what: str) -> None:
    brokerctl.wait_until(condition, WAIT, what)


def finishes(client: PikaClientTransport, worker: RabbitWorkerTransport, hooks: FakeHooks) -> None:
    """A new launch is taken, and its final record is stored and read back."""
    job_id = launched(client, hooks)
    record = finished(job_id, 1)
    worker.finish(record).result(WAIT)
    assert client.fetch_result(job_id, 10) == record.encode()


def test_five_close_all_connections_in_a_row(transports: Any, client: PikaClientTransport,
                                            amqp_url: str) -> None:
    worker, hooks = transports()
    job_id = launched(client, hooks)
    inbox = Inbox()
    client.subscribe([f"*.*.{job_id}"], inbox)
    round_trip(client, worker, job_id, inbox, "before any drop")
    for drop in range(5):
        seen = (worker.connection.reconnects, client.reconnects)
        close_all_connections(amqp_url, f"brokerexec test drop {drop}")
        def noticed(seen: tuple[int, int] = seen) -> bool:
            return (worker.connection.reconnects > seen[0]
                    and client.reconnects > seen[1])

        wait_until(noticed, f"both sides to notice drop {drop}")
        round_trip(client, worker, job_id, inbox, f"after drop {drop}")
    assert hooks.begun.count(job_id) == 1  # the job was re-claimed, never begun again
    finishes(client, worker, hooks)  # the launch consumer came back too


def kiwipy_play_broadcast(url: str) -> None:
    """What plumpy's ``play_all`` sends; raises if kiwipy's exchange is not there (yet)."""
    import pika
    import pika.exceptions

    from brokerexec import BrokerConnectionError
    from brokerexec.protocol.names import BROADCAST_TOPIC, KIWIPY_EXCHANGE

    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish(KIWIPY_EXCHANGE, BROADCAST_TOPIC,
                              b"{body: null, correlation_id: null, sender: null, subject: play}\n")
    except pika.exceptions.ChannelClosedByBroker as exc:  # 404: declared again soon
        raise BrokerConnectionError(str(exc)) from exc
    finally:
        connection.close()


def test_broker_application_restart(transports: Any, client: PikaClientTransport,
                                    amqp_url: str) -> None:
    worker, hooks = transports()
    job_id = launched(client, hooks)
    inbox = Inbox()
    client.subscribe([f"progress.*.{job_id}"], inbox)
    with brokerctl.app_stopped():
        wait_until(lambda: not (worker.connection.connected or client.connected),
                   "both sides to notice the broker is gone")
    round_trip(client, worker, job_id, inbox, "after the restart")
    # The control stream consumer is back too.
    control = Control(Intent.PAUSE, sent=time.time())
    brokerctl.eventually(lambda: client.control(control), "control after the restart")
    hooks.wait(lambda: control in hooks.controls, "no control message after the restart")
    # kiwipy broadcasts reach the worker again: kiwipy's transient exchange, and the
    # binding of the workers' filter to it, went with the restart and were declared anew.
    heard = len(hooks.controls)
    brokerctl.eventually(lambda: kiwipy_play_broadcast(amqp_url), "kiwipy broadcast after the restart")
    hooks.wait(lambda: len(hooks.controls) > heard, "no kiwipy broadcast after the restart")
    assert hooks.controls[-1].intent is Intent.RESUME
    finishes(client, worker, hooks)


class HalfOpenProxy:
    """A TCP proxy to the broker that can drop connections on the client's side only.

    The broker keeps a silent, open socket and learns that its client is gone only from
    missed heartbeats, as after a crash of the client's host or a NAT time-out. Meanwhile
    the client has reconnected and finds the job queue still held by its old connection.
    """

    def __init__(self, upstream: tuple[str, int] = ("127.0.0.1", 5672)) -> None:
        self.upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._live: list[tuple[socket.socket, socket.socket]] = []
        self._kept: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, name="halfopen-accept", daemon=True).start()

    def url(self, base: str) -> str:
        parts = urlparse(base)
        auth = f"{parts.username}:{parts.password}@" if parts.username else ""
        return urlunparse(parts._replace(netloc=f"{auth}127.0.0.1:{self.port}"))

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
                server = socket.create_connection(self.upstream, 5)
            except OSError:
                return
            with self._lock:
                self._live.append((client, server))
            threading.Thread(target=self._pump, args=(client, server), name="halfopen-pump",
                             daemon=True).start()

    def _pump(self, client: socket.socket, server: socket.socket) -> None:
        peers = {client: server, server: client}
        while not self._closed:
            with self._lock:
                if (client, server) not in self._live:
                    return  # orphaned: the broker's side stays open, unread
            try:
                readable, _, _ = select.select(list(peers), [], [], 0.05)
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        raise OSError("closed")
                    peers[sock].sendall(data)
            except (OSError, ValueError):
                break
        with self._lock:
            if server in self._kept:
                return
            if (client, server) in self._live:
                self._live.remove((client, server))
        for sock in (client, server):
            with contextlib.suppress(OSError):
                sock.close()

    def orphan(self) -> int:
        """Reset every client side now; keep the broker sides open and silent."""
        with self._lock:
            pairs, self._live = self._live, []
            self._kept.extend(server for _, server in pairs)
        for client, _ in pairs:
            with contextlib.suppress(OSError):
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()
        return len(pairs)

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        with self._lock:
            pairs, self._live = self._live, []
            kept, self._kept = self._kept, []
        for sock in [*kept, *(sock for pair in pairs for sock in pair)]:
            with contextlib.suppress(OSError):
                sock.close()


def test_job_queue_is_reclaimed_once_the_broker_lets_go_of_the_dead_connection(
        transports: Any, client: PikaClientTransport, amqp_url: str,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="brokerexec")
    proxy = HalfOpenProxy()
    try:
        # heartbeat 2 s: the broker reaps the silent old connection after a few seconds
        worker, hooks = transports(url=proxy.url(amqp_url), heartbeat=2, connect_timeout=2.0)
        job_id = launched(client, hooks)
        inbox = Inbox()
        client.subscribe([f"*.*.{job_id}"], inbox)
        # When the worker loses its connection but the broker does not notice yet
        assert proxy.orphan() == 1
        # Then the worker reconnects at once, is refused the job queue while the broker
        # still holds it for the dead connection, and claims it again once it is freed
        round_trip(client, worker, job_id, inbox, "after the half-open drop")
        refused = [r.getMessage() for r in caplog.records
                   if f"job:{job_id}" in r.getMessage() and "locked" in r.getMessage().lower()]
        assert refused, "the job queue was never found still locked by the old connection"
        assert hooks.begun.count(job_id) == 1
        assert worker.connection.reconnects >= 1
    finally:
        proxy.close()
