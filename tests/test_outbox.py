"""The outbox and the broker-side plumbing of the worker's wire path, against the real broker.

* the outbox writes fire-and-forget publishes, acks and confirmed publishes in batches, in
  order, and comes back by itself when the broker closes one of its channels;
* a launch queue made by an older brokerexec (classic version 1) is still used, with a warning.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from test_rabbitmq_transport import Raw, settings_for

from brokerexec.errors import BrokerConnectionError
from brokerexec.transport.rabbitmq.connection import AmqpConnection
from brokerexec.transport.rabbitmq.outbox import Outgoing

pytestmark = pytest.mark.rabbitmq


@pytest.fixture
def connection(amqp_url: str, unique_name: str) -> Iterator[AmqpConnection]:
    conn = AmqpConnection(settings_for(amqp_url, unique_name))
    conn.start(timeout=20)
    yield conn
    conn.close()


def drain(raw: Raw, queue: str, count: int, within: float = 10.0) -> list[bytes]:
    """The bodies of the first ``count`` messages on ``queue``."""
    bodies: list[bytes] = []
    deadline = time.monotonic() + within
    while len(bodies) < count and time.monotonic() < deadline:
        method, _, body = raw.channel.basic_get(queue, auto_ack=True)
        if method is None:
            raw.connection.process_data_events(time_limit=0.02)
        else:
            bodies.append(body)
    return bodies


def test_posts_and_confirmed_publishes_arrive_in_order(connection: AmqpConnection, raw: Raw) -> None:
    queue = str(raw.channel.queue_declare("", exclusive=True).method.queue)
    confirmed_queue = str(raw.channel.queue_declare("", exclusive=True).method.queue)
    for i in range(2000):  # more than one batch
        connection.post(Outgoing.json("", queue, json.dumps(i).encode()))
    records = [Outgoing.json("", confirmed_queue, json.dumps(i).encode(), delivery_mode=2)
               for i in range(50)]
    connection.submit(connection.publish_confirmed(records)).result(20)
    assert [json.loads(b) for b in drain(raw, confirmed_queue, 50)] == list(range(50))
    assert [json.loads(b) for b in drain(raw, queue, 2000)] == list(range(2000))


def test_the_pinned_aiormq_has_the_internals_the_outbox_batches_with(connection: AmqpConnection) -> None:
    # If this fails, an aiormq release changed what aiormq_internals relies on: the outbox
    # still works (the next test), one publish at a time. Mend aiormq_internals, or pin.
    from brokerexec.transport.rabbitmq import aiormq_internals

    channels = connection.submit(_outbox_channels(connection)).result(20)
    assert all(aiormq_internals.supported(channel) for channel in channels)


async def _outbox_channels(connection: AmqpConnection) -> Any:
    plain = await connection.open_channel()
    confirming = await connection.open_channel(confirms=True)
    try:
        return [await plain.get_underlay_channel(), await confirming.get_underlay_channel()]
    finally:
        await plain.close()
        await confirming.close()


def test_publishes_fall_back_to_aiormqs_public_api_if_its_internals_change(
        connection: AmqpConnection, raw: Raw, monkeypatch: pytest.MonkeyPatch) -> None:
    from brokerexec.transport.rabbitmq import aiormq_internals

    monkeypatch.setattr(aiormq_internals, "supported", lambda channel: False)
    queue = str(raw.channel.queue_declare("", exclusive=True).method.queue)
    for i in range(1, 21):
        connection.post(Outgoing.json("", queue, json.dumps(-i).encode()))
    connection.submit(connection.publish_confirmed(
        [Outgoing.json("", queue, json.dumps(i).encode()) for i in range(1, 21)])).result(20)
    bodies = [json.loads(b) for b in drain(raw, queue, 40)]
    # Every one arrives, each kind in order (posted ones are fire-and-forget).
    assert [b for b in bodies if b < 0] == [-i for i in range(1, 21)]
    assert [b for b in bodies if b > 0] == list(range(1, 21))


def test_outbox_comes_back_after_the_broker_closes_its_channels(
        connection: AmqpConnection, raw: Raw) -> None:
    queue = str(raw.channel.queue_declare("", exclusive=True).method.queue)
    missing = f"no-such-exchange-{uuid.uuid4().hex[:8]}"
    # The broker closes the channel of a publish to an exchange that does not exist (404).
    connection.post(Outgoing.json(missing, "x", b"{}"))
    with pytest.raises(BrokerConnectionError):
        connection.submit(connection.publish_confirmed(
            [Outgoing.json(missing, "x", b"{}")])).result(20)
    # Both kinds of publish work again by themselves, on new channels.
    deadline = time.monotonic() + 20
    while True:
        try:
            connection.submit(connection.publish_confirmed(
                [Outgoing.json("", queue, b'"confirmed"')])).result(20)
            break
        except BrokerConnectionError:
            assert time.monotonic() < deadline, "the confirm channel never came back"
    connection.post(Outgoing.json("", queue, b'"posted"'))
    assert drain(raw, queue, 2) == [b'"confirmed"', b'"posted"']
    assert connection.connected and connection.reconnects == 0




@pytest.mark.parametrize("batched", [True, False], ids=["batched", "public-api"])
def test_a_confirmed_publish_routed_to_no_queue_fails_and_is_never_called_stored(
        connection: AmqpConnection, raw: Raw, monkeypatch: pytest.MonkeyPatch, batched: bool) -> None:
    """The broker confirms a publish it routed nowhere as readily as a stored one (as right
    after it starts, before its streams take messages): confirmed publishes are mandatory,
    and a returned one fails, the others in its batch with its ``message_id`` unaffected."""
    from brokerexec.transport.rabbitmq import aiormq_internals

    if not batched:
        monkeypatch.setattr(aiormq_internals, "supported", lambda channel: False)
    queue = str(raw.channel.queue_declare("", exclusive=True).method.queue)
    nowhere = f"no-such-queue-{uuid.uuid4().hex[:8]}"
    with pytest.raises(BrokerConnectionError, match=r"routed the publish to .* to no queue"):
        connection.submit(connection.publish_confirmed(
            [Outgoing.json("", nowhere, b"{}", message_id="job")])).result(20)

    async def both() -> list[BaseException | None]:
        # One id, as a job's record and its lease may have: each outcome is its own.
        outcomes = await asyncio.gather(*(connection.publish_confirmed([item]) for item in (
            Outgoing.json("", nowhere, b'"lost"', message_id="job"),
            Outgoing.json("", queue, b'"kept"', message_id="job"),
            Outgoing.json("", nowhere, b'"lost"', message_id="job"))), return_exceptions=True)
        return [outcome if isinstance(outcome, BaseException) else None for outcome in outcomes]

    lost, kept, lost_again = connection.submit(both()).result(20)
    assert isinstance(lost, BrokerConnectionError) and isinstance(lost_again, BrokerConnectionError)
    assert kept is None
    assert drain(raw, queue, 1) == [b'"kept"']
    # Neither the channel nor the connection suffered: the next publish is confirmed.
    connection.submit(connection.publish_confirmed([Outgoing.json("", queue, b'"next"')])).result(20)
    assert drain(raw, queue, 1) == [b'"next"']
    assert connection.reconnects == 0


def test_a_connection_is_used_only_once_its_required_setups_succeed(
        amqp_url: str, unique_name: str, raw: Raw) -> None:
    """Right after a broker starts it refuses to declare durable queues and streams still
    recovering, and routes nothing to them: a required setup (a worker's topology) is tried
    again on the new connection until it succeeds, and nothing is published before."""
    import brokerctl

    refusing = threading.Event()
    attempts: list[float] = []

    async def topology(channel: Any) -> None:
        attempts.append(time.monotonic())
        if refusing.is_set():
            raise RuntimeError("NOT_FOUND - home node of durable queue is down or inaccessible")

    async def optional(channel: Any) -> None:
        raise RuntimeError("an optional setup that fails is retried in the background")

    queue = str(raw.channel.queue_declare("", exclusive=True).method.queue)
    conn = AmqpConnection(settings_for(amqp_url, unique_name))
    conn.start(timeout=20)
    try:
        conn.submit(conn.setups.add("topology", topology, required=True)).result(20)
        with pytest.raises(RuntimeError):
            conn.submit(conn.setups.add("optional", optional)).result(20)
        refusing.set()
        brokerctl.close_connections_named(unique_name)
        brokerctl.wait_until(lambda: len(attempts) >= 4, 30, "the required setup to be tried again")
        assert not conn.connected
        with pytest.raises(BrokerConnectionError, match="not connected"):
            conn.submit(conn.publish_confirmed([Outgoing.json("", queue, b'"early"')])).result(20)
        conn.post(Outgoing.json("", queue, b'"posted"'))  # kept until then
        refusing.clear()
        brokerctl.wait_until(lambda: conn.connected, 30, "the connection to be used once it succeeds")
        conn.submit(conn.publish_confirmed([Outgoing.json("", queue, b'"confirmed"')])).result(20)
        assert sorted(drain(raw, queue, 2)) == [b'"confirmed"', b'"posted"']
        retries = [later - earlier for earlier, later in itertools.pairwise(attempts[1:])]
        assert retries[1] > 1.5 * retries[0]  # backing off, not hammering a booting broker
    finally:
        conn.close()
