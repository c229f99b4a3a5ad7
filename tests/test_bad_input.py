"""Every class of bad input gets a clear error reply (within a second where a reply is
possible) and the worker and its running jobs keep going. Real broker, raw pika senders."""

from __future__ import annotations

import json
import pickle
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pika
import pytest
import sample_services

from brokerexec import Client, JobNotFound, ServiceRegistry, UnknownService, Worker, WorkerSettings
from brokerexec.protocol.names import DEAD_LETTER_QUEUE, launch_queue, new_job_id
from brokerexec.settings import RabbitMQSettings
from brokerexec.transport.rabbitmq.connection_settings import ConnectionSettings
from brokerexec.transport.rabbitmq.worker.transport import RabbitWorkerTransport
from brokerexec.worker.worker import host_info

pytestmark = pytest.mark.rabbitmq
WAIT = 20.0
CALLED: list[Any] = []


def tripwire(*args: Any) -> None:
    CALLED.append(args)


@pytest.fixture(scope="module")
def setup(amqp_url: str) -> Iterator[tuple[Client, Any]]:
    transport = RabbitWorkerTransport(
        ConnectionSettings(url=amqp_url, name="bad-input-worker", max_message_bytes=64 * 1024),
        host_info=host_info(), rabbitmq=RabbitMQSettings(claim_after=0))  # raw peers address the job at once
    worker = Worker(transport, ServiceRegistry(sample_services.ALL), WorkerSettings(concurrency=4))
    worker.start()
    with Client(amqp_url) as client:
        job = client.launch("forever", {"tick": 0.005})
        # a job that keeps running through every test of this module
        deadline = time.monotonic() + WAIT
        while True:
            try:
                if job.status()["state"] == "running":
                    break
            except JobNotFound:
                if time.monotonic() > deadline:
                    raise
        yield client, job
        job.abort()
    worker.stop(grace=5)


class Raw:
    """A pika sender that can send anything at all."""

    def __init__(self, url: str) -> None:
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        self.replies: dict[str, list[Any]] = {}
        self.channel.basic_consume("amq.rabbitmq.reply-to", self._on_reply, auto_ack=True)

    def _on_reply(self, _ch: Any, _m: Any, props: pika.BasicProperties, body: bytes) -> None:
        self.replies.setdefault(props.correlation_id, []).append(body)

    def send(self, job_id: str, body: bytes, *, content_type: str | None = "application/json",
             reply: bool = True, correlation_id: str | None = None,
             headers: dict[str, Any] | None = None) -> str:
        correlation_id = correlation_id or uuid.uuid4().hex
        self.channel.basic_publish("kiwipy.messages", f"[rpc].{job_id}", body, pika.BasicProperties(
            content_type=content_type, correlation_id=correlation_id, headers=headers,
            reply_to="amq.rabbitmq.reply-to" if reply else None))
        return correlation_id

    def final(self, correlation_id: str, within: float = 1.0) -> Any:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            self.connection.process_data_events(time_limit=0.02)
            for body in self.replies.get(correlation_id, []):
                try:
                    reply = json.loads(body)
                except ValueError:
                    import yaml

                    reply = yaml.safe_load(body)
                if "pending" not in reply:
                    return reply
        return None

    def close(self) -> None:
        self.connection.close()


@pytest.fixture
def raw(amqp_url: str) -> Iterator[Raw]:
    sender = Raw(amqp_url)
    yield sender
    sender.close()


def _error_of(raw: Raw, correlation_id: str) -> str:
    reply = raw.final(correlation_id)
    assert reply is not None, "no error reply within a second"
    assert "result" not in reply
    return str(reply["exception"])


@pytest.mark.parametrize(("body", "content_type", "expected"), [
    (b"{not json", "application/json", "invalid JSON"),
    (b"[1, 2]", "application/json", "JSON object"),
    (b'"just a string"', "application/json", "JSON object"),
    (b'{"intent": "status", "x": NaN}', "application/json", "NaN"),
    (b'{"intent": "status", "intent": "pause"}', "application/json", "duplicate key"),
    (b'{"intent": "\\ud800"}', "application/json", "surrogate"),
    (b"[" * 5000 + b"]" * 5000, "application/json", "nested deeper"),
    (pickle.dumps({"intent": "status"}), "application/x-python-serialize", "unsupported content type"),
    (b"intent: !!python/name:test_bad_input.tripwire", None, "unsafe YAML"),
    (b"!!python/object/apply:test_bad_input.tripwire [1]", None, "unsafe YAML"),
    (b'{"intent": "format_disk"}', "application/json", "unknown intent"),
    (b'{"intent": "set", "attrs": {"nope": 1}}', "application/json", "cannot set 'nope'"),
    (b'{"intent": "set", "attrs": {"_private": 1}}', "application/json", "cannot set '_private'"),
    (b'{"intent": "set", "attrs": {"value": "x"}}', "application/json", "expected int"),
    (b'{"intent": "invoke", "method": "_x"}', "application/json", "cannot invoke '_x'"),
    (b'{"intent": "invoke", "method": "__class__"}', "application/json", "cannot invoke"),
    (b'{"intent": "invoke", "method": "__init__"}', "application/json", "cannot invoke"),
    (b'{"intent": "invoke", "method": "__reduce__"}', "application/json", "cannot invoke"),
    (b'{"intent": "invoke", "method": "undeclared"}', "application/json", "cannot invoke"),
    (b'{"intent": "invoke", "method": "loops", "args": [1, 2]}', "application/json", "too many"),
    (b'{"intent": "invoke", "method": "loops", "args": "x"}', "application/json", "args"),
])
def test_bad_rpc_gets_a_clear_error_and_the_job_keeps_running(
        setup: tuple[Client, Any], raw: Raw, body: bytes, content_type: str | None,
        expected: str) -> None:
    _, job = setup
    assert expected in _error_of(raw, raw.send(job.id, body, content_type=content_type))
    assert job.status()["state"] == "running"
    assert not CALLED


def test_oversized_message_is_refused_before_decoding(setup: tuple[Client, Any], raw: Raw) -> None:
    _, job = setup
    body = json.dumps({"intent": "status", "pad": "x" * 70_000}).encode()
    assert "over the limit" in _error_of(raw, raw.send(job.id, body))
    assert job.status()["state"] == "running"


def test_missing_reply_to_executes_nothing(setup: tuple[Client, Any], raw: Raw) -> None:
    _, job = setup
    job.set(value=1)
    raw.send(job.id, b'{"intent": "set", "attrs": {"value": 99}}', reply=False)
    # Requests of one channel are handled in order: once this one is answered at ready(),
    # the one before it was handled too.
    assert raw.final(raw.send(job.id, b'{"intent": "invoke", "method": "current"}')) == {"result": 1}
    assert job.invoke("current") == 1


def test_duplicate_correlation_id_is_refused(setup: tuple[Client, Any], raw: Raw) -> None:
    _, job = setup
    first = raw.send(job.id, b'{"intent": "status"}')
    assert "result" in raw.final(first)
    raw.replies.clear()
    raw.send(job.id, b'{"intent": "status"}', correlation_id=first)
    assert "duplicate correlation id" in _error_of(raw, first)


def test_expired_request_is_dropped(setup: tuple[Client, Any], raw: Raw) -> None:
    _, job = setup
    late = raw.send(job.id, b'{"intent": "pause"}', headers={"x-deadline": int(time.time()) - 60})
    assert raw.final(late, within=0.5) is None
    assert job.status()["paused"] is False


def test_unknown_job_and_unknown_service(setup: tuple[Client, Any]) -> None:
    client, _ = setup
    started = time.monotonic()
    with pytest.raises(JobNotFound):
        client.job(new_job_id()).status()
    assert time.monotonic() - started < 1.0
    with pytest.raises(UnknownService, match="no worker has ever offered service 'nope_service'"):
        client.launch("nope_service", {})
    assert time.monotonic() - started < 1.5
    started = time.monotonic()
    with pytest.raises(JobNotFound):
        client.job(new_job_id()).result(WAIT)  # at once, not after WAIT
    assert time.monotonic() - started < 1.0


def test_undecodable_launch_is_dead_lettered_at_once(setup: tuple[Client, Any], amqp_url: str) -> None:
    client, job = setup
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = connection.channel()
    marker = uuid.uuid4().hex
    try:
        for body, content_type in ((b"{broken", "application/json"),
                                   (pickle.dumps({"x": 1}), "application/x-python-serialize"),
                                   (b'{"v": 1, "service": "counter"}', "application/json")):
            # No job id (message_id) to say what failed: dead-lettered, with nobody to tell.
            channel.basic_publish("", launch_queue("counter"), body, pika.BasicProperties(
                content_type=content_type, correlation_id=marker, delivery_mode=2))
        found = 0
        deadline = time.monotonic() + 2.0
        while found < 3 and time.monotonic() < deadline:
            method, props, _ = channel.basic_get(DEAD_LETTER_QUEUE, auto_ack=False)
            if method is None:
                connection.sleep(0.02)
                continue
            # Another test's dead letters (this run's own vhost) go too: put back, they
            # would come first again and hide ours.
            channel.basic_ack(method.delivery_tag)
            found += props.correlation_id == marker
        assert found == 3
        # and the worker still takes good launches
        assert client.launch("counter", {"steps": 2}).result(WAIT)["count"] == 2
        assert job.status()["state"] == "running"
    finally:
        connection.close()
