"""A raw pika client, written from docs/protocol.md alone, drives a brokerexec job.

Nothing from brokerexec is imported on the client side: only pika and json, and the names
and bodies the document gives. If this test breaks, the document or the code lies.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from typing import Any

import pika
import pytest
import sample_services

pytestmark = pytest.mark.rabbitmq
WAIT = 20.0


@pytest.fixture
def worker(amqp_url: str) -> Iterator[None]:
    from brokerexec import ServiceRegistry, Worker, WorkerSettings
    from brokerexec.transport.rabbitmq.connection_settings import ConnectionSettings
    from brokerexec.transport.rabbitmq.worker.transport import RabbitWorkerTransport
    from brokerexec.worker.worker import host_info

    transport = RabbitWorkerTransport(ConnectionSettings(url=amqp_url, name="protocol-worker"),
                                      host_info=host_info())
    worker = Worker(transport, ServiceRegistry(sample_services.ALL), WorkerSettings(concurrency=4))
    worker.start()
    yield
    worker.stop(grace=5)


def journal_stream(job_id: str) -> str:
    """The journal stream of a job: ``brokerexec.jobs.`` and two hex digits, crc32 mod 16."""
    return f"brokerexec.jobs.{zlib.crc32(job_id.encode()) % 16:02x}"


#: Intents answered at once, and safe to send twice (docs/protocol.md).
ANSWERED_AT_ONCE = {"status", "pause", "play", "resume", "kill", "abort"}


class RawClient:
    """Speaks docs/protocol.md with a pika BlockingConnection."""

    def __init__(self, url: str) -> None:
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        self.channel.confirm_delivery()
        self.replies: dict[str, list[dict[str, Any]]] = {}
        self.returned: set[str] = set()
        self.channel.basic_consume("amq.rabbitmq.reply-to", self._on_reply, auto_ack=True)
        self.channel.add_on_return_callback(self._on_return)

    def _on_reply(self, _ch: Any, _method: Any, props: pika.BasicProperties, body: bytes) -> None:
        self.replies.setdefault(props.correlation_id, []).append(json.loads(body))

    def _on_return(self, _ch: Any, _method: Any, props: pika.BasicProperties, _body: bytes) -> None:
        self.returned.add(props.correlation_id)

    def launch(self, service: str, request: dict[str, Any]) -> str:
        job_id = uuid.uuid4().hex
        body = {"v": 1, "job_id": job_id, "service": service, "request": request,
                "settings": {"progress_delta": 0.05}, "sent": time.time()}
        # To the service's queue, and by the CC key to the job's journal stream.
        self.channel.basic_publish(
            "brokerexec.launches", service, json.dumps(body).encode(),
            pika.BasicProperties(content_type="application/json", delivery_mode=2,
                                 message_id=job_id, type="brokerexec.launch",
                                 headers={"CC": [journal_stream(job_id)]}), mandatory=True)
        return job_id

    def rpc(self, job_id: str, request: dict[str, Any]) -> Any:
        correlation_id = uuid.uuid4().hex
        properties = pika.BasicProperties(content_type="application/json",
                                          correlation_id=correlation_id,
                                          reply_to="amq.rabbitmq.reply-to")
        try:
            self.channel.basic_publish("kiwipy.messages", f"[rpc].{job_id}",
                                       json.dumps(request).encode(), properties, mandatory=True)
        except pika.exceptions.UnroutableError:
            # Not claimed (yet): ask every worker, with a deadline half a second ahead.
            properties.headers = {"x-job-id": job_id,
                                  "x-deadline-ms": int((time.time() + 0.5) * 1000)}
            try:
                self.channel.basic_publish("brokerexec.workers", "", json.dumps(request).encode(),
                                           properties, mandatory=True)
            except pika.exceptions.UnroutableError:
                return "not found"
            deadline = time.monotonic() + 0.8
            while not self.replies.get(correlation_id):
                if time.monotonic() > deadline:
                    return "not found"
                self.connection.process_data_events(time_limit=0.05)
        start = time.monotonic()
        while time.monotonic() < start + WAIT:
            self.connection.process_data_events(time_limit=0.05)
            replies = self.replies.get(correlation_id, [])
            for reply in replies:
                if "pending" not in reply:
                    return reply
            if not replies and time.monotonic() > start + 2 and request["intent"] in ANSWERED_AT_ONCE:
                # As the document says: lost with a queue deleted as the job ended; ask again.
                return self.rpc(job_id, request)
        raise AssertionError(f"no final reply to {request}")

    def wait_rpc(self, job_id: str, request: dict[str, Any], want: Any) -> Any:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            reply = self.rpc(job_id, request)
            if reply != "not found" and want(reply):  # not taken by a worker yet: ask again
                return reply
            self.connection.sleep(0.05)
        raise AssertionError(f"{request} never gave the wanted reply")

    def record(self, job_id: str) -> dict[str, Any]:
        """Read the job's journal stream from the start until its record."""
        channel = self.connection.channel()
        channel.basic_qos(prefetch_count=100)
        found: list[dict[str, Any]] = []

        def read(ch: Any, method: Any, props: pika.BasicProperties, body: bytes) -> None:
            ch.basic_ack(method.delivery_tag)
            if props.message_id == job_id and props.type == "brokerexec.record":
                found.append(json.loads(body))

        channel.basic_consume(journal_stream(job_id), read, arguments={"x-stream-offset": "first"})
        deadline = time.monotonic() + WAIT
        while not found and time.monotonic() < deadline:
            self.connection.process_data_events(time_limit=0.05)
        channel.close()
        if not found:
            raise AssertionError(f"no final record for {job_id}")
        return found[0]

    def close(self) -> None:
        self.connection.close()


def test_a_raw_pika_client_drives_a_job_from_the_document(amqp_url: str, worker: None) -> None:
    client = RawClient(amqp_url)
    events: list[dict[str, Any]] = []
    watcher = pika.BlockingConnection(pika.URLParameters(amqp_url))
    watch = watcher.channel()
    queue = watch.queue_declare("", exclusive=True).method.queue
    try:
        job_id = client.launch("forever", {"tick": 0.005})
        watch.queue_bind(queue, "brokerexec.events", f"*.*.{job_id}")
        status = client.wait_rpc(job_id, {"intent": "status"},
                                 lambda r: r.get("result", {}).get("state") == "running")
        assert status["result"]["paused"] is False
        assert client.rpc(job_id, {"intent": "pause"}) == {"result": True}
        client.wait_rpc(job_id, {"intent": "status"}, lambda r: r["result"]["paused"] is True)
        assert client.rpc(job_id, {"intent": "set", "attrs": {"value": 5}}) == {"result": {"value": 5}}
        refused = client.rpc(job_id, {"intent": "set", "attrs": {"_hidden": 1}})
        assert refused["error"]["type"] == "brokerexec.SignalRefused"
        assert "exception" in refused
        assert client.rpc(job_id, {"intent": "play"}) == {"result": True}
        loops = client.rpc(job_id, {"intent": "invoke", "method": "loops", "args": [], "kwargs": {}})
        assert loops["result"] >= 0
        assert client.rpc(job_id, {"intent": "kill"}) == {"result": True}
        record = client.record(job_id)
        assert record["v"] == 1 and record["state"] == "aborted" and record["job_id"] == job_id
        # Its last progress (it reported some, every 0.05 s); no improved state (it sent none).
        assert {"loops", "value", "elapsed"} <= set(record["progress"]) and "improved" not in record
        # The endpoint goes away right after the record is stored; until then it says so.
        deadline = time.monotonic() + WAIT
        while (reply := client.rpc(job_id, {"intent": "status"})) != "not found":
            assert reply["result"]["state"] == "aborted"
            assert time.monotonic() < deadline

        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline and not any(
                e["kind"] == "state" and e["data"]["to"] == "aborted" for e in events):
            method, _props, body = watch.basic_get(queue, auto_ack=True)
            if method is None:
                watcher.sleep(0.02)
                continue
            assert method.routing_key.endswith(f".forever.{job_id}")
            events.append(json.loads(body))
        kinds = {e["kind"] for e in events}
        assert "state" in kinds and "progress" in kinds
        assert record["progress"] == [e["data"] for e in events if e["kind"] == "progress"][-1]
        assert [e["seq"] for e in events] == sorted(e["seq"] for e in events)
        assert {"from", "to", "start", "end"} <= set(events[-1]["data"])
    finally:
        watcher.close()
        client.close()


def test_raw_control_message_pauses_every_job(amqp_url: str, worker: None) -> None:
    client = RawClient(amqp_url)
    try:
        jobs = [client.launch("forever", {"tick": 0.005}) for _ in range(2)]
        for job_id in jobs:
            client.wait_rpc(job_id, {"intent": "status"},
                            lambda r: r.get("result", {}).get("state") == "running")
        client.channel.basic_publish(
            "brokerexec.control", "", json.dumps({"intent": "pause", "sent": time.time()}).encode(),
            pika.BasicProperties(content_type="application/json", delivery_mode=2,
                                 message_id=uuid.uuid4().hex))
        for job_id in jobs:
            client.wait_rpc(job_id, {"intent": "status"}, lambda r: r["result"]["paused"] is True)
        for job_id in jobs:
            client.rpc(job_id, {"intent": "abort"})
            assert client.record(job_id)["state"] == "aborted"
    finally:
        client.close()


def test_jobs_query_from_the_document(amqp_url: str, worker: None) -> None:
    client = RawClient(amqp_url)
    try:
        job_id = client.launch("forever", {"tick": 0.005})
        client.wait_rpc(job_id, {"intent": "status"},
                        lambda r: r.get("result", {}).get("state") == "running")
        correlation_id = uuid.uuid4().hex
        client.channel.basic_publish(
            "brokerexec.workers", "", json.dumps({"intent": "jobs"}).encode(),
            pika.BasicProperties(content_type="application/json", correlation_id=correlation_id,
                                 reply_to="amq.rabbitmq.reply-to"))
        done = threading.Event()
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and not done.is_set():
            client.connection.process_data_events(time_limit=0.05)
            for reply in client.replies.get(correlation_id, []):
                if any(job["job_id"] == job_id for job in reply["result"]["jobs"]):
                    done.set()
        assert done.is_set()
        client.rpc(job_id, {"intent": "abort"})
    finally:
        client.close()
