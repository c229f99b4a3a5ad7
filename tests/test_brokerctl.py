"""The rabbitmqctl helpers do what they say to the real broker, and always put it back."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
import uuid
from collections.abc import Iterator

import brokerctl
import pika
import pika.exceptions
import pytest
from pika.adapters.utils.connection_workflow import AMQPConnectorStackTimeout

pytestmark = pytest.mark.rabbitmq


@pytest.fixture
def restored() -> Iterator[None]:
    """Whatever the test did, the broker answers again and runs at its defaults afterwards."""
    try:
        yield
    finally:
        brokerctl.ensure_running()
        brokerctl.restore_defaults()


def open_connection(url: str, name: str | None = None, **options: object) -> pika.BlockingConnection:
    parameters = pika.URLParameters(url)
    if name is not None:
        parameters.client_properties = {"connection_name": name}
    for key, value in options.items():
        setattr(parameters, key, value)
    return pika.BlockingConnection(parameters)


def works(url: str) -> bool:
    """A new connection opens and a channel answers."""
    with contextlib.closing(open_connection(url)) as connection:
        connection.channel().queue_declare("", exclusive=True)
        return True


@contextlib.contextmanager
def closing(connection: pika.BlockingConnection) -> Iterator[pika.BlockingConnection]:
    """Close ``connection`` at the end unless the broker already did."""
    try:
        yield connection
    finally:
        if connection.is_open:
            connection.close()


# --- read-only helpers ----------------------------------------------------------------------

def test_list_queues_and_queue_exists(amqp_url: str, unique_name: str) -> None:
    vhost = brokerctl.vhost_of(amqp_url)
    connection = open_connection(amqp_url)
    with closing(connection):
        channel = connection.channel()
        channel.confirm_delivery()
        channel.queue_declare(unique_name, exclusive=True)
        for body in (b"1", b"2"):
            channel.basic_publish("", unique_name, body)
        rows = brokerctl.list_queues("name", "messages", "consumers", "exclusive", vhost=vhost)
        assert {"name": unique_name, "messages": 2, "consumers": 0, "exclusive": True} in rows
        assert brokerctl.queue_exists(unique_name, vhost=vhost)
        assert not brokerctl.queue_exists(unique_name)  # not in "/"
        channel.queue_delete(unique_name)
        assert not brokerctl.queue_exists(unique_name, vhost=vhost)


def test_vhost_of() -> None:
    assert brokerctl.vhost_of("amqp://guest:guest@127.0.0.1:5672/") == "/"
    assert brokerctl.vhost_of("amqp://127.0.0.1") == "/"
    assert brokerctl.vhost_of("amqp://127.0.0.1/%2F") == "/"
    assert brokerctl.vhost_of("amqp://127.0.0.1/test-1?heartbeat=2") == "test-1"


def test_rabbitmqctl_time_out_kills_the_whole_cli_tree() -> None:
    # Given a command that outlasts its time-out (the sleep's length marks our CLI VM)
    marker = f"timer:sleep({60_000 + uuid.uuid4().int % 1000})."
    started = time.monotonic()
    with pytest.raises(brokerctl.BrokerCtlError, match="no answer within"):
        brokerctl.rabbitmqctl("eval", marker, timeout=3)
    assert time.monotonic() - started < 10
    # Then no process of that call is left, not even in the session su made for it.
    brokerctl.wait_until(lambda: not _processes_with(marker), 5, "the CLI processes to die")


def _processes_with(text: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        with contextlib.suppress(OSError), open(f"/proc/{entry}/cmdline", "rb") as cmdline:
            if text.encode() in cmdline.read():
                found.append(int(entry))
    return found


# --- faults ---------------------------------------------------------------------------------

@pytest.mark.fault
def test_close_connections_named_closes_only_that_one(
        amqp_url: str, unique_name: str, restored: None) -> None:
    named = open_connection(amqp_url, name=f"{unique_name}-victim")
    other = open_connection(amqp_url, name=f"{unique_name}-bystander")
    anonymous = open_connection(amqp_url)
    with closing(named), closing(other), closing(anonymous):
        assert brokerctl.close_connections_named(f"{unique_name}-vic") == 1
        # Read before writing: a write to the closed socket would get a RST instead.
        with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as closed:
            named.process_data_events(time_limit=5)
        assert closed.value.reply_code == 320  # CONNECTION_FORCED
        for survivor in (other, anonymous):
            survivor.channel().queue_declare("", exclusive=True)
        assert brokerctl.close_connections_named(f"{unique_name}-nobody") == 0


@pytest.mark.fault
def test_close_all_connections_closes_every_vhost(amqp_url: str, restored: None) -> None:
    connection = open_connection(amqp_url)  # in the session's own vhost, not "/"
    with closing(connection):
        brokerctl.close_all_connections("test_brokerctl")
        with pytest.raises(pika.exceptions.ConnectionClosedByBroker, match="test_brokerctl"):
            connection.process_data_events(time_limit=5)
    assert works(amqp_url)


@pytest.mark.fault
def test_app_stopped_refuses_then_serves_again(amqp_url: str, restored: None) -> None:
    with brokerctl.app_stopped():
        assert not brokerctl.amqp_answers()
        with pytest.raises(pika.exceptions.AMQPConnectionError):
            open_connection(amqp_url, connection_attempts=1, socket_timeout=2)
    assert brokerctl.amqp_answers()
    assert works(amqp_url)


@pytest.mark.fault
def test_app_stopped_starts_the_app_even_when_the_block_fails(amqp_url: str, restored: None) -> None:
    with pytest.raises(RuntimeError, match="inside"), brokerctl.app_stopped():
        raise RuntimeError("inside")
    assert works(amqp_url)


@pytest.mark.fault
def test_broker_frozen_accepts_tcp_but_not_amqp(amqp_url: str, restored: None) -> None:
    with brokerctl.broker_frozen() as pid:
        with open(f"/proc/{pid}/stat") as stat:
            assert stat.read().rsplit(")", 1)[1].split()[0] in ("T", "t")
        # The kernel still completes the TCP handshake for the stopped VM ...
        with socket.create_connection(brokerctl.AMQP_ADDRESS, 2):
            pass
        # ... but nothing answers the protocol header, so opening a connection times out
        # (pika raises AMQPConnectorStackTimeout, which is NOT an AMQPConnectionError).
        assert not brokerctl.amqp_answers(timeout=1)
        started = time.monotonic()
        with pytest.raises(AMQPConnectorStackTimeout):
            open_connection(amqp_url, connection_attempts=1, socket_timeout=1, stack_timeout=2)
        assert time.monotonic() - started < 5
    assert works(amqp_url)


@pytest.mark.fault
def test_ensure_running_continues_a_frozen_broker_and_starts_a_stopped_app(
        amqp_url: str, restored: None) -> None:
    pid = brokerctl.broker_pid()
    os.kill(pid, signal.SIGSTOP)  # as a test killed inside broker_frozen() would leave it
    try:
        brokerctl.wait_until(lambda: not brokerctl.amqp_answers(timeout=0.5), 10, "the freeze")
        brokerctl.ensure_running()
        assert brokerctl.amqp_answers()
    finally:
        os.kill(pid, signal.SIGCONT)
    brokerctl.stop_app()
    brokerctl.ensure_running()
    assert works(amqp_url)


@pytest.mark.fault
def test_consumer_timeout_is_enforced_inside_and_restored_after(
        amqp_url: str, unique_name: str, restored: None, caplog: pytest.LogCaptureFixture) -> None:
    with brokerctl.consumer_timeout(1000):
        assert brokerctl.get_consumer_timeout() == 1000
        # A channel opened now holds a delivery unacked past the timeout: the broker closes it.
        connection = open_connection(amqp_url)
        with closing(connection):
            channel = connection.channel()
            channel.queue_declare(unique_name, exclusive=True)
            channel.basic_publish("", unique_name, b"held")
            channel.basic_consume(unique_name, lambda *args: None)  # never acks
            started = time.monotonic()
            while channel.is_open and time.monotonic() - started < 10:
                connection.process_data_events(time_limit=0.1)
            assert channel.is_closed
            assert time.monotonic() - started < 5  # 1 s timeout + a 0.2 s tick, not 60 s
            assert "PRECONDITION_FAILED - delivery acknowledgement on channel 1 timed out" in caplog.text
            rows = brokerctl.list_queues("name", "messages", vhost=brokerctl.vhost_of(amqp_url))
            assert {"name": unique_name, "messages": 1} in rows  # given back to the queue
    assert brokerctl.get_consumer_timeout() == brokerctl.DEFAULT_CONSUMER_TIMEOUT == 1_800_000
    assert brokerctl.rabbitmqctl("eval", "application:get_env(rabbit, channel_tick_interval).") \
        == "{ok,60000}"


@pytest.mark.fault
def test_consumer_timeout_is_restored_when_the_block_fails(restored: None) -> None:
    with pytest.raises(RuntimeError, match="inside"), brokerctl.consumer_timeout(5000):
        raise RuntimeError("inside")
    assert brokerctl.get_consumer_timeout() == brokerctl.DEFAULT_CONSUMER_TIMEOUT
