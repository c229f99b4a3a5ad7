"""One behavioural suite, run against every transport: memory:// and the real RabbitMQ.

What a user sees through ``Client`` and ``Job`` must not depend on the transport.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sample_services

from brokerexec import (
    Client,
    Event,
    InvalidRequest,
    Job,
    JobAborted,
    JobNotFound,
    RemoteError,
    ServiceRegistry,
    SignalRefused,
    UnknownService,
    Worker,
    WorkerSettings,
)
from brokerexec.protocol.names import new_job_id

WAIT = 20.0


def _memory_client(concurrency: int) -> Iterator[Client]:
    with Client(f"memory://test-{uuid.uuid4().hex}", services=sample_services.ALL,
                concurrency=concurrency) as client:
        yield client


def _amqp_client(url: str, concurrency: int) -> Iterator[Client]:
    from brokerexec.transport.rabbitmq.connection_settings import ConnectionSettings
    from brokerexec.transport.rabbitmq.worker.transport import RabbitWorkerTransport
    from brokerexec.worker.worker import host_info

    transport = RabbitWorkerTransport(ConnectionSettings(url=url, name="test-worker"),
                                      host_info=host_info())
    worker = Worker(transport, ServiceRegistry(sample_services.ALL),
                    WorkerSettings(concurrency=concurrency)).start()
    try:
        with Client(url) as client:
            yield client
    finally:
        worker.stop(grace=5)


@pytest.fixture(params=["memory", pytest.param("amqp", marks=pytest.mark.rabbitmq)])
def make_client(request: pytest.FixtureRequest) -> Iterator[Callable[[int], Client]]:
    """A factory: ``make_client(concurrency)`` -> a client with a worker behind it."""
    stack: list[Iterator[Client]] = []

    def make(concurrency: int = 4) -> Client:
        if request.param == "memory":
            gen = _memory_client(concurrency)
        else:
            gen = _amqp_client(request.getfixturevalue("amqp_url"), concurrency)
        stack.append(gen)
        return next(gen)

    yield make
    for gen in reversed(stack):
        for _ in gen:
            pass


class Inbox:
    """Events collected by a subscription, waited on by condition."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.cond = threading.Condition()

    def __call__(self, event: Event) -> None:
        with self.cond:
            self.events.append(event)
            self.cond.notify_all()

    def wait_for(self, predicate: Callable[[list[Event]], bool], timeout: float = WAIT) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: predicate(self.events), timeout), self.events

    def states(self, job_id: str) -> list[str]:
        with self.cond:
            return [e.data["to"] for e in self.events if e.kind == "state" and e.job_id == job_id]


def test_launch_and_result(make_client: Callable[[int], Client]) -> None:
    client = make_client(4)
    job = client.launch("counter", {"steps": 50})
    assert job.result(WAIT) == {"count": 50, "label": ""}
    record = job.record()
    assert record is not None and record["state"] == "finished"
    assert record["end"] >= record["start"]


def test_launch_many_queues_a_sweep_and_every_job_ends(make_client: Callable[[int], Client]) -> None:
    client = make_client(4)
    jobs = client.launch_many("counter", [{"steps": n} for n in range(1, 41)], progress_delta=5)
    assert len({job.id for job in jobs}) == 40 and all(job.service == "counter" for job in jobs)
    assert [job.result(WAIT)["count"] for job in jobs] == list(range(1, 41))
    # and each record is there for a reader that did not launch them
    assert jobs[-1].record(0)["result"]["count"] == 40


def test_the_record_keeps_the_last_progress_and_improved_state(make_client: Callable[[int], Client]) -> None:
    client = make_client(4)
    # Given a job that sends progress at every ready() and improves five times
    job = client.launch("improver", {"n": 5}, progress_delta=0)
    # Then its record carries its last progress and its last (best) improved state
    assert job.result(WAIT) == 5
    record = job.record()
    assert record is not None and record["improved"] == {"i": 4}
    assert set(record["progress"]) == {"elapsed"} and record["progress"]["elapsed"] >= 0
    # and a job that reported neither has neither key
    quiet = client.launch("counter", {"steps": 3}, progress_delta=3600)
    assert quiet.result(WAIT)["count"] == 3
    assert not {"progress", "improved"} & set(quiet.record() or {})


def test_a_failed_job_raises_remote_error_with_type_and_traceback(
        make_client: Callable[[int], Client]) -> None:
    client = make_client(4)
    job = client.launch("counter", {"steps": 10, "fail_at": 3})
    with pytest.raises(RemoteError) as info:
        job.result(WAIT)
    assert info.value.remote_type == "ValueError"
    assert "boom at step 3" in info.value.remote_message
    assert "raise ValueError" in info.value.remote_traceback


def test_unknown_service_and_invalid_request_are_clear_failures(
        make_client: Callable[[int], Client]) -> None:
    client = make_client(4)
    # Refused at the client, at once: no worker has ever offered it on this broker.
    with pytest.raises(UnknownService, match="no worker has ever offered service 'nonesuch'"):
        client.launch("nonesuch")
    with pytest.raises(RemoteError, match="steps"):
        client.launch("counter", {"steps": "many"}).result(WAIT)
    # and the worker keeps going
    assert client.launch("counter", {"steps": 3}).result(WAIT)["count"] == 3


def launch_watched(client: Client, inbox: Inbox, service: str, request: dict[str, Any]) -> Job:
    """Subscribe to a job's events before launching it, then wait until it runs."""
    job_id = new_job_id()
    client.subscribe(f"*.*.{job_id}", inbox)
    job = client.launch(service, request, job_id=job_id)
    inbox.wait_for(lambda _: "running" in inbox.states(job.id))
    return job


def test_status_pause_resume_abort(make_client: Callable[[int], Client]) -> None:
    client = make_client(4)
    inbox = Inbox()
    job = launch_watched(client, inbox, "forever", {"tick": 0.005})
    assert job.status()["state"] in ("running", "paused")
    assert job.pause() is True
    inbox.wait_for(lambda _: "paused" in inbox.states(job.id))
    assert job.status()["paused"] is True
    loops = job.invoke("loops")  # applied while paused, without resuming
    assert job.invoke("loops") == loops
    assert job.resume() is True
    inbox.wait_for(lambda _: inbox.states(job.id)[-1:] == ["running"])
    assert job.abort() is True
    with pytest.raises(JobAborted):
        job.result(WAIT)
    inbox.wait_for(lambda _: "aborted" in inbox.states(job.id))


def test_abort_while_paused(make_client: Callable[[int], Client]) -> None:
    client = make_client(4)
    inbox = Inbox()
    job = launch_watched(client, inbox, "forever", {"tick": 0.005})
    job.pause()
    inbox.wait_for(lambda _: "paused" in inbox.states(job.id))
    job.abort()
    with pytest.raises(JobAborted):
        job.result(WAIT)
    inbox.wait_for(lambda _: inbox.states(job.id)[-2:] == ["running", "aborted"])


def _wait_running(client: Client, service: str, request: dict[str, Any]) -> Job:
    return launch_watched(client, Inbox(), service, request)


def test_set_and_invoke_reply_after_ready(make_client: Callable[[int], Client]) -> None:
    client = make_client(4)
    job = _wait_running(client, "forever", {"tick": 0.005})
    assert job.set(value=41) == {"value": 41}
    assert job.invoke("loops") >= 0
    with pytest.raises(RemoteError, match="cannot set 'nope'"):
        job.set(nope=1)
    with pytest.raises(RemoteError, match="cannot set '_private'"):
        job.set(_private=1)
    with pytest.raises(RemoteError, match="cannot invoke '__class__'"):
        job.invoke("__class__")
    with pytest.raises(RemoteError, match="expected int"):
        job.set(value="x")
    assert job.set(progress_delta=0.05) == {"progress_delta": 0.05}
    progress = next(job.progress(idle_timeout=WAIT))
    assert progress["value"] == 41
    job.abort()


def test_progress_iterator_ends_with_the_job(make_client: Callable[[int], Client]) -> None:
    client = make_client(4)
    job = client.launch("counter", {"steps": 40, "delay": 0.01}, progress_delta=0.05)
    seen = list(job.progress(idle_timeout=WAIT))
    assert seen, "no progress message"
    assert all(0.0 <= p["fraction"] <= 1.0 for p in seen)
    assert job.result(0) == {"count": 40, "label": ""}


def test_subscriptions_by_job_service_and_kind(make_client: Callable[[int], Client]) -> None:
    client = make_client(4)
    by_kind, by_service, by_job = Inbox(), Inbox(), Inbox()
    client.subscribe("improved.#", by_kind)
    client.subscribe("*.counter.*", by_service)
    job = client.launch("improver", {"n": 3})
    client.subscribe(f"*.*.{job.id}", by_job)
    job.result(WAIT)
    other = client.launch("counter", {"steps": 2})
    other.result(WAIT)
    by_kind.wait_for(lambda evs: len([e for e in evs if e.job_id == job.id]) == 3)
    assert {e.kind for e in by_kind.events} == {"improved"}
    by_service.wait_for(lambda evs: any(e.job_id == other.id and e.data.get("to") == "finished"
                                        for e in evs))
    assert {e.service for e in by_service.events} == {"counter"}
    assert job.id not in {e.job_id for e in by_service.events}


def test_broadcast_pause_all_resume_all_abort_all(make_client: Callable[[int], Client]) -> None:
    client = make_client(4)
    inbox = Inbox()
    client.subscribe("state.#", inbox)
    jobs = [launch_watched(client, inbox, "forever", {"tick": 0.005}) for _ in range(3)]
    other = launch_watched(client, inbox, "counter", {"steps": 10_000_000})
    client.pause_all(service="forever")
    for job in jobs:
        inbox.wait_for(lambda _, job=job: "paused" in inbox.states(job.id))
    assert other.status()["state"] == "running"
    client.resume_all()
    for job in jobs:
        inbox.wait_for(lambda _, job=job: inbox.states(job.id)[-1:] == ["running"])
    client.abort_all()
    for job in [*jobs, other]:
        with pytest.raises(JobAborted):
            job.result(WAIT)


def test_jobs_lists_running_jobs(make_client: Callable[[int], Client]) -> None:
    client = make_client(4)
    job = _wait_running(client, "forever", {"tick": 0.005})
    listed = {entry["job_id"]: entry for entry in client.jobs()}
    assert listed[job.id]["service"] == "forever"
    assert listed[job.id]["state"] == "running"
    assert "hostname" in listed[job.id]["worker"]
    job.abort()


def test_unknown_job_is_not_found(make_client: Callable[[int], Client]) -> None:
    client = make_client(4)
    with pytest.raises(JobNotFound):
        client.job(uuid.uuid4().hex).status(timeout=5)


def test_concurrency_bounds_running_jobs(make_client: Callable[[int], Client]) -> None:
    client = make_client(2)
    inbox = Inbox()
    jobs = [_launch_subscribed(client, inbox) for _ in range(3)]
    inbox.wait_for(lambda _: sum("running" in inbox.states(j.id) for j in jobs) == 2)
    waiting = next(j for j in jobs if "running" not in inbox.states(j.id))
    listed = {job["job_id"]: job["state"] for job in client.jobs()}
    assert listed == {**{j.id: "running" for j in jobs if j is not waiting}, waiting.id: "queued"}
    assert waiting.status()["state"] == "queued"
    next(j for j in jobs if j is not waiting).abort()
    inbox.wait_for(lambda _: "running" in inbox.states(waiting.id))
    for job in jobs:
        if job.record(0) is None:
            job.abort()
    for job in jobs:
        with pytest.raises(JobAborted):
            job.result(WAIT)


def _launch_subscribed(client: Client, inbox: Inbox) -> Job:
    job_id = new_job_id()
    client.subscribe(f"*.*.{job_id}", inbox)
    return client.launch("forever", {"tick": 0.005}, job_id=job_id)


def test_checkpoint_on_request_is_taken_at_ready_and_published(make_client: Callable[[int], Client]) -> None:
    client = make_client(4)
    inbox = Inbox()
    job = launch_watched(client, inbox, "counter", {"steps": 100_000, "delay": 0.001})
    before = time.time()
    taken = job.checkpoint()  # checkpoint_delta is an hour: this one is the one asked for
    assert before <= taken["time"] <= time.time()
    inbox.wait_for(lambda events: any(e.kind == "checkpoint" for e in events))
    (event,) = [e for e in inbox.events if e.kind == "checkpoint"]
    assert event.data["state"]["count"] >= 0  # the service's checkpoint()
    job.abort()
    with pytest.raises(JobAborted):
        job.result(WAIT)


def test_refusals_raise_as_their_own_class(make_client: Callable[[int], Client]) -> None:
    client = make_client(4)
    job = _wait_running(client, "forever", {"tick": 0.005})
    with pytest.raises(SignalRefused) as refused:
        job.set(nope=1)
    assert isinstance(refused.value, RemoteError) and refused.value.remote_type == "brokerexec.SignalRefused"
    with pytest.raises(SignalRefused, match="too many positional arguments"):
        job.invoke("loops", 1, 2)  # refused on the worker's handler thread, at once
    job.abort()
    with pytest.raises(UnknownService, match="no worker has ever offered service 'nosuch'"):
        client.launch("nosuch", {})
    with pytest.raises(InvalidRequest, match="unknown input 'bogus'"):
        client.launch("counter", {"bogus": 1}).result(WAIT)


def test_a_launch_queued_longer_than_the_controls_are_kept_has_its_journal_read_first() -> None:
    # A cancel of a queued job is a control message (kept an hour) and a record (kept as long
    # as the journal): a launch older than the hour, less the clocks' minute, is claimed first
    # and its journal read before it runs. Younger ones pay for nothing.
    import dataclasses

    from brokerexec.protocol.messages import Launch
    from brokerexec.transport.memory.broker import MemoryBroker
    from brokerexec.transport.memory.worker import MemoryWorkerTransport

    worker = Worker(MemoryWorkerTransport(MemoryBroker()), ServiceRegistry(sample_services.ALL),
                    WorkerSettings(concurrency=4))
    fresh = Launch.new("counter", {"steps": 1})
    prepared = [worker.prepare(dataclasses.replace(fresh, job_id=new_job_id(), sent=time.time() - age))
                for age in (0, 3000, 3560, 7200)]
    assert [job.check_journal for job in prepared if job is not None] == [False, False, True, True]
