"""Graceful handover and checkpoints on the embedded broker, with threads and with child
processes: a worker that stops hands its resumable jobs over, and another resumes them from
the checkpoint taken at their last ``ready()``. (Over RabbitMQ: ``tests/test_durable.py``.)"""

from __future__ import annotations

import threading
import uuid
from typing import Any

import pytest
import sample_services

from brokerexec import CheckpointFailed, Client, Event, Service, ServiceRegistry, Worker, WorkerSettings
from brokerexec.client.embedded import embedded_worker
from brokerexec.transport.memory.broker import MemoryBroker
from brokerexec.transport.memory.clients import MemoryClientTransport
from brokerexec.transport.memory.worker import MemoryWorkerTransport

WAIT = 20.0


class Seen:
    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        with self.cond:
            self.events.append(event)
            self.cond.notify_all()

    def wait(self, predicate: Any, what: str) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: predicate(self.events), WAIT), what


def second_worker(broker: MemoryBroker, runner: str) -> Worker:
    return Worker(MemoryWorkerTransport(broker), ServiceRegistry(sample_services.ALL),
                  WorkerSettings(concurrency=2, runner=runner)).start()  # type: ignore[arg-type]


@pytest.mark.parametrize("runner", ["thread", "process"])
def test_a_stopping_worker_hands_its_job_over_to_another(runner: str) -> None:
    url = f"memory://handover-{uuid.uuid4().hex}"
    first = embedded_worker(url, sample_services.ALL, 2, WorkerSettings(concurrency=2, runner=runner))  # type: ignore[arg-type]
    broker = MemoryBroker.named(url.removeprefix("memory://"))
    seen = Seen()
    with Client(url, transport=MemoryClientTransport(broker)) as client:
        client.subscribe("#", seen)
        job = client.launch("steps", {"steps": 200, "delay": 0.01}, progress_delta=0.05)
        seen.wait(lambda events: any(e.data.get("done", 0) >= 20 for e in events if e.kind == "progress"),
                  "the job never got going")
        second = second_worker(broker, runner)
        try:
            first.stop(grace=10)  # hands over at the next ready(): no wait for the job to end
            assert job.status()["state"] in ("resuming", "created", "running")
            result = job.result(WAIT)
            assert result["done"] == 200 and result["resumed_from"] >= 20
            assert job.record()["attempt"] == 2  # type: ignore[index]
            # Its watchers saw it go on: "resuming", then the next attempt's events.
            seen.wait(lambda events: any(e.kind == "state" and e.data["to"] == "finished" for e in events),
                      "no final state event")
            states = [(e.attempt, e.data["to"]) for e in seen.events
                      if e.kind == "state" and e.job_id == job.id]
            assert (1, "resuming") in states and (2, "finished") in states
        finally:
            second.stop(grace=0)


@pytest.mark.parametrize("runner", ["thread", "process"])
def test_a_requested_checkpoint_returns_once_stored_and_a_too_large_one_fails_only_itself(
        runner: str) -> None:
    with Client(f"memory://ckpt-{uuid.uuid4().hex}", services=sample_services.ALL,
                worker_settings=WorkerSettings(runner=runner)) as client:  # type: ignore[arg-type]
        seen = Seen()
        client.subscribe("#", seen)
        job = client.launch("steps", {"steps": 100_000, "delay": 0.001})
        seen.wait(lambda events: any(e.kind == "state" and e.data["to"] == "running" for e in events),
                  "never ran")
        taken = job.checkpoint()
        assert taken.get("stored") is True
        seen.wait(lambda events: any(e.kind == "checkpoint" for e in events), "no checkpoint event")
        job.abort()


def test_a_checkpoint_that_cannot_be_stored_is_an_error_event_not_a_failed_job() -> None:
    with Client(f"memory://bad-{uuid.uuid4().hex}", services=[Unstorable]) as client:
        seen = Seen()
        client.subscribe("#", seen)
        job = client.launch("unstorable", checkpoint_delta=0.05)
        seen.wait(lambda events: any(e.kind == "error" for e in events), "no error event")
        error = next(e for e in seen.events if e.kind == "error")
        assert error.data["during"] == "checkpoint" and "JSON" in error.data["error"]["message"]
        with pytest.raises(CheckpointFailed):
            job.checkpoint()
        assert job.result(WAIT) == "done"  # the job went on


def test_a_set_queued_at_a_handover_is_applied_first_and_carried_by_the_checkpoint() -> None:
    url = f"memory://pending-{uuid.uuid4().hex}"
    first = embedded_worker(url, [Slow], 1, WorkerSettings(concurrency=1))
    broker = MemoryBroker.named(url.removeprefix("memory://"))
    with Client(url, transport=MemoryClientTransport(broker)) as client:
        seen = Seen()
        client.subscribe("#", seen)
        job = client.launch("slow")
        seen.wait(lambda events: any(e.kind == "state" and e.data["to"] == "running" for e in events),
                  "never ran")
        outcome: list[Any] = []
        sender = threading.Thread(target=lambda: outcome.append(_catch(lambda: job.set(note="x"))))
        sender.start()
        seen.wait(lambda _: job.status().get("queued_signals", 0) >= 1, "the set never queued")
        second = Worker(MemoryWorkerTransport(broker), ServiceRegistry([Slow]), WorkerSettings()).start()
        stopper = threading.Thread(target=first.stop, args=(10,))
        try:
            stopper.start()  # the next ready() applies the set, then hands the job over
            seen.wait(lambda _: job.status().get("handover_requested") or job.status()["attempt"] == 2,
                      "no handover asked for")
            Slow.gate.set()
            stopper.join(WAIT)
            sender.join(WAIT)
            assert outcome == [{"note": "x"}]  # applied once, before the handover's checkpoint
            assert job.result(WAIT) == "x"  # which carried it to the next attempt
            assert job.record()["attempt"] == 2  # type: ignore[index]
        finally:
            second.stop(grace=0)


def _catch(call: Any) -> Any:
    try:
        return call()
    except Exception as exc:
        return exc


class Unstorable(Service):
    """Its checkpoint is not JSON-able."""

    name = "unstorable"

    def run(self, handler: Any, request: dict[str, Any]) -> str:
        for _ in range(50):
            handler.ready()
            threading.Event().wait(0.01)  # the workload
        return "done"

    def checkpoint(self) -> dict[str, Any]:
        return {"not json": object()}

    def restore(self, state: dict[str, Any]) -> None:
        pass


class Slow(Service):
    """Calls ready(), waits for ``gate``, calls ready() and returns its note; can resume."""

    name = "slow"
    settable = {"note": str}
    gate = threading.Event()

    def __init__(self) -> None:
        self.note = ""

    def run(self, handler: Any, request: dict[str, Any]) -> str:
        handler.ready()
        self.gate.wait(WAIT)  # the workload: a set waits for the next ready()
        handler.ready()
        return self.note

    def checkpoint(self) -> dict[str, Any]:
        return {"note": self.note}

    def restore(self, state: dict[str, Any]) -> None:
        self.note = state["note"]
