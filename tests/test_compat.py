"""Stock kiwipy and plumpy tooling drives brokerexec jobs (issue 3, item 6).

A stock ``kiwipy.rmq.RmqThreadCommunicator`` (default YAML codec) under plumpy's
``RemoteProcessThreadController`` and plumpy's asyncio ``RemoteProcessController`` get the
status of, pause, play and kill brokerexec jobs by job id; pause_all/play_all/kill_all reach
them; and brokerexec jobs broadcast ``state_changed.<from>.<to>`` with the job id as sender.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from typing import Any

import kiwipy
import kiwipy.rmq
import plumpy
import pytest
import sample_services
from plumpy.futures import unwrap_kiwi_future

from brokerexec import Client, Event, JobAborted, ServiceRegistry, Worker, WorkerSettings
from brokerexec.settings import RabbitMQSettings
from brokerexec.transport.rabbitmq.connection_settings import ConnectionSettings
from brokerexec.transport.rabbitmq.worker.transport import RabbitWorkerTransport
from brokerexec.worker.worker import host_info

pytestmark = pytest.mark.rabbitmq
WAIT = 20.0


@pytest.fixture
def worker(amqp_url: str) -> Iterator[Worker]:
    # Claimed before they start, so stock tools reach jobs at once (test_young_jobs_... is
    # about the default, where they do from claim_after on).
    transport = RabbitWorkerTransport(ConnectionSettings(url=amqp_url, name="compat-worker"),
                                      host_info=host_info(),
                                      rabbitmq=RabbitMQSettings(claim_after=0))
    worker = Worker(transport, ServiceRegistry(sample_services.ALL),
                    WorkerSettings(concurrency=8)).start()
    yield worker
    worker.stop(grace=5)


@pytest.fixture
def client(amqp_url: str, worker: Worker) -> Iterator[Client]:
    with Client(amqp_url) as client:
        yield client


@pytest.fixture
def communicator(amqp_url: str) -> Iterator[kiwipy.rmq.RmqThreadCommunicator]:
    # As shipped: YAML codec, default exchange names, robust connection.
    comm = kiwipy.rmq.RmqThreadCommunicator.connect(connection_params={"url": amqp_url})
    yield comm
    comm.close()


class States:
    """state events of the brokerexec client, waited on by condition."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.seen: dict[str, list[str]] = {}

    def __call__(self, event: Event) -> None:
        with self.cond:
            self.seen.setdefault(event.job_id, []).append(event.data["to"])
            self.cond.notify_all()

    def wait(self, job_id: str, predicate: Callable[[list[str]], bool]) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: predicate(self.seen.get(job_id, [])), WAIT), \
                self.seen.get(job_id)


def _launch_running(client: Client, states: States, n: int = 1) -> list[Any]:
    jobs = [client.launch("forever", {"tick": 0.005}) for _ in range(n)]
    for job in jobs:
        states.wait(job.id, lambda seen: "running" in seen)
    return jobs


def test_thread_controller_status_pause_play_kill(
        client: Client, communicator: kiwipy.rmq.RmqThreadCommunicator) -> None:
    states = States()
    client.subscribe("state.#", states)
    (job,) = _launch_running(client, states)
    controller = plumpy.RemoteProcessThreadController(communicator)

    status = unwrap_kiwi_future(controller.get_status(job.id)).result(WAIT)
    assert status["state"] == "running"
    assert unwrap_kiwi_future(controller.pause_process(job.id)).result(WAIT) is True
    states.wait(job.id, lambda seen: "paused" in seen)
    assert unwrap_kiwi_future(controller.get_status(job.id)).result(WAIT)["paused"] is True
    assert unwrap_kiwi_future(controller.play_process(job.id)).result(WAIT) is True
    states.wait(job.id, lambda seen: seen[-1:] == ["running"])
    assert unwrap_kiwi_future(controller.kill_process(job.id)).result(WAIT) is True
    with pytest.raises(JobAborted):
        job.result(WAIT)


def test_thread_controller_pause_all_play_all_kill_all(
        client: Client, communicator: kiwipy.rmq.RmqThreadCommunicator) -> None:
    states = States()
    client.subscribe("state.#", states)
    jobs = _launch_running(client, states, 3)
    controller = plumpy.RemoteProcessThreadController(communicator)
    controller.pause_all("pausing everything")
    for job in jobs:
        states.wait(job.id, lambda seen: "paused" in seen)
    controller.play_all()
    for job in jobs:
        states.wait(job.id, lambda seen: seen[-1:] == ["running"])
    controller.kill_all("stop")
    for job in jobs:
        with pytest.raises(JobAborted):
            job.result(WAIT)


def test_asyncio_controller_gets_pending_then_result(
        client: Client, communicator: kiwipy.rmq.RmqThreadCommunicator) -> None:
    states = States()
    client.subscribe("state.#", states)
    (job,) = _launch_running(client, states)
    controller = plumpy.RemoteProcessController(communicator)

    async def drive() -> list[Any]:
        # These await a "pending" reply first, then the result: a single reply would fail.
        return [await controller.get_status(job.id), await controller.pause_process(job.id),
                await controller.play_process(job.id), await controller.kill_process(job.id)]

    status, paused, played, killed = asyncio.run(asyncio.wait_for(drive(), WAIT))
    assert status["state"] in ("running", "paused")
    assert paused is True and played is True and killed is True
    with pytest.raises(JobAborted):
        job.result(WAIT)


def test_jobs_broadcast_state_changed_with_the_job_id_as_sender(
        client: Client, communicator: kiwipy.rmq.RmqThreadCommunicator) -> None:
    received: list[tuple[Any, str]] = []
    cond = threading.Condition()

    def on_broadcast(_comm: Any, _body: Any, sender: Any, subject: Any, _cid: Any) -> None:
        with cond:
            received.append((sender, subject))
            cond.notify_all()

    communicator.add_broadcast_subscriber(
        kiwipy.BroadcastFilter(on_broadcast, subject="state_changed.*"))
    job = client.launch("counter", {"steps": 3})
    job.result(WAIT)
    with cond:
        assert cond.wait_for(lambda: (job.id, "state_changed.running.finished") in received, WAIT)
    assert (job.id, "state_changed.created.running") in received


def test_unknown_job_gives_a_kiwipy_client_no_answer_but_never_a_wrong_one(
        client: Client, communicator: kiwipy.rmq.RmqThreadCommunicator) -> None:
    # kiwipy publishes RPCs as mandatory: an unroutable id fails at once on its side.
    controller = plumpy.RemoteProcessThreadController(communicator)
    with pytest.raises(Exception):  # noqa: B017 - kiwipy raises its own UnroutableError
        unwrap_kiwi_future(controller.get_status("0" * 32)).result(WAIT)
