"""The child-process runner on the embedded broker: each computation in a child interpreter.

Real child processes and real signals; the worker is the test process itself
(``Client("memory://...", worker_settings=WorkerSettings(runner="process"))``).
The same runner under real ``brokerexec worker`` processes over RabbitMQ:
``tests/test_child_runner_rabbitmq.py``.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sample_services

from brokerexec import (
    Client,
    ConfigurationError,
    Event,
    InvalidState,
    JobAborted,
    RemoteError,
    Service,
    ServiceHandler,
    WorkerSettings,
)
from brokerexec.child.runner import ProcessRunner
from brokerexec.core.registry import service_spec

WAIT = 20.0


def child_pids(parent: int | None = None) -> set[int]:
    """Live (not zombie) computation processes whose parent is ``parent`` (default: us)."""
    parent = os.getpid() if parent is None else parent
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[1]) == parent and b"brokerexec.child.main" in cmdline:
            found.add(int(entry.name))
    return found


def is_gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie nobody reaps counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)  # polling a condition with a deadline


class Inbox:
    """Events of a subscription, waited on by condition."""

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

    def kinds(self) -> list[str]:
        with self.cond:
            return [e.kind for e in self.events]

    def states(self) -> list[str]:
        with self.cond:
            return [e.data["to"] for e in self.events if e.kind == "state"]


def child_clients(services: list[type[Service]], **defaults: Any) -> Iterator[Callable[..., Client]]:
    """Yields ``make(**worker_settings)``: a memory:// client (of ``services``) whose worker
    runs children, with ``defaults`` for its settings; all closed at the end, and no child left."""
    clients: list[Client] = []

    def make(**settings: Any) -> Client:
        client = Client(f"memory://child-{uuid.uuid4().hex}", services=services,
                        worker_settings=WorkerSettings(**{**defaults, **settings}))
        clients.append(client.__enter__())
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)
    assert child_pids() == set(), "a child process outlived its worker"


@pytest.fixture
def client_with() -> Iterator[Callable[..., Client]]:
    """``client_with(**worker_settings)``: a memory:// client whose worker runs children."""
    yield from child_clients(sample_services.CHILD, runner="process")


def launch_watched(client: Client, service: str, request: dict[str, Any], **settings: Any
                   ) -> tuple[Any, Inbox]:
    inbox = Inbox()
    job_id = uuid.uuid4().hex
    client.subscribe(f"*.*.{job_id}", inbox)
    job = client.launch(service, request, job_id=job_id, **settings)
    inbox.wait_for(lambda _: "running" in inbox.states())
    return job, inbox


def test_set_invoke_progress_and_pause_cross_to_the_child(client_with: Callable[..., Client]) -> None:
    client = client_with()
    job, inbox = launch_watched(client, "where", {}, progress_delta=0.05)
    assert job.invoke("pid") != os.getpid()
    assert job.invoke("parent") == os.getpid()  # a child of the worker, not of anyone else
    assert job.set(value=41) == {"value": 41}
    assert job.invoke("current") == 41
    inbox.wait_for(lambda events: any(e.kind == "progress" and e.data["value"] == 41 for e in events))
    assert job.status()["progress"]["value"] == 41  # kept by the worker, for status
    assert job.pause() is True
    inbox.wait_for(lambda _: "paused" in inbox.states())
    assert job.invoke("current") == 41  # applied while paused, without resuming
    assert job.set(progress_delta=3600) == {"progress_delta": 3600.0}  # crosses as new intervals
    assert job.resume() is True
    inbox.wait_for(lambda _: inbox.states()[-1:] == ["running"])
    assert job.abort() is True
    with pytest.raises(JobAborted):
        job.result(WAIT)
    inbox.wait_for(lambda _: inbox.states() == ["running", "paused", "running", "aborted"])


def test_improved_checkpoint_and_the_result_cross_back(client_with: Callable[..., Client]) -> None:
    client = client_with()
    job, inbox = launch_watched(client, "counter", {"steps": 100_000, "delay": 0.0005})
    taken = job.checkpoint()
    assert taken["time"] <= time.time()
    inbox.wait_for(lambda events: any(e.kind == "checkpoint" for e in events))
    job.abort()
    with pytest.raises(JobAborted):
        job.result(WAIT)
    improver = client.launch("improver", {"n": 5})
    assert improver.result(WAIT) == 5
    assert client.launch("counter", {"steps": 7}).result(WAIT) == {"count": 7, "label": ""}


def _progress_after_improved(events: list[Event]) -> bool:
    kinds = [event.kind for event in events]
    return "improved" in kinds and "progress" in kinds[kinds.index("improved") + 1:]


def test_the_last_progress_and_improved_state_cross_back_into_the_record(
        client_with: Callable[..., Client]) -> None:
    client = client_with()
    # A job that ends: what the child reported last is in its outcome, so in its record
    job = client.launch("improver", {"n": 5}, progress_delta=0)
    assert job.result(WAIT) == 5
    record = job.record()
    assert record["improved"] == {"i": 4} and set(record["progress"]) == {"elapsed"}
    # An abort: the child's held-back improved state (improved_delta) still counts
    held, inbox = launch_watched(client, "improver", {"n": 100_000, "delay": 0.001},
                                 progress_delta=0.01, improved_delta=3600)
    inbox.wait_for(_progress_after_improved)  # a ready() after the first improved state: more came
    held.abort()
    with pytest.raises(JobAborted):
        held.result(WAIT)
    record = held.record()
    assert [e.data["state"] for e in inbox.events if e.kind == "improved"] == [{"i": 0}]
    assert record["improved"]["i"] >= 1 and "elapsed" in record["progress"]


def test_a_child_that_dies_leaves_the_last_progress_and_improved_state_that_reached_its_worker(
        client_with: Callable[..., Client]) -> None:
    # Given a child that improves at steps 0, 1, 2 (1 and 2 held back by improved_delta), then dies
    client = client_with()
    job, inbox = launch_watched(client, "crasher", {"how": "segv", "steps": 3, "improve": True},
                                progress_delta=0, improved_delta=3600)
    with pytest.raises(RemoteError):
        job.result(WAIT)
    # Then its record has what crossed before it died: the held-back states died with it
    record = job.record()
    assert record["error"]["type"] == "brokerexec.ComputationDied"
    assert record["improved"] == {"step": 0}
    inbox.wait_for(lambda _: inbox.states() == ["running", "failed"])
    assert record["progress"] == [e.data for e in inbox.events if e.kind == "progress"][-1]


@pytest.mark.parametrize(("how", "reason"), [
    ("segv", "computation process died of SIGSEGV"),
    ("exit", "computation process exited with status 3"),
    ("kill", "computation process died of SIGKILL (not sent by this worker: the kernel's OOM killer"),
])
def test_a_child_that_dies_fails_only_its_job_and_the_worker_runs_the_next(
        client_with: Callable[..., Client], how: str, reason: str) -> None:
    client = client_with(concurrency=1)
    job, inbox = launch_watched(client, "crasher", {"how": how})
    with pytest.raises(RemoteError) as info:
        job.result(WAIT)
    assert info.value.remote_type == "brokerexec.ComputationDied"
    assert info.value.remote_message.startswith(reason)
    assert job.record()["state"] == "failed"
    inbox.wait_for(lambda _: inbox.states() == ["running", "failed"])
    assert client.launch("counter", {"steps": 3}).result(WAIT)["count"] == 3


def test_abort_of_a_job_blocked_in_c_kills_it_after_the_grace(client_with: Callable[..., Client]) -> None:
    # Given a computation in one long C call that never reaches ready()
    client = client_with(abort_grace=0.5)
    job, inbox = launch_watched(client, "blocked", {"seconds": 600})
    (child,) = child_pids()
    # When it is aborted
    asked = time.monotonic()
    assert job.abort() is True
    # Then after the grace its process group is stopped, and its record says aborted
    with pytest.raises(JobAborted):
        job.result(WAIT)
    assert 0.5 <= time.monotonic() - asked < 5
    record = job.record()
    assert record["state"] == "aborted"
    assert "did not reach ready() within 0.5 s of abort" in record["error"]["message"]
    assert "SIGTERM" in record["error"]["message"]
    assert is_gone(child) and child_pids() == set()
    inbox.wait_for(lambda _: inbox.states() == ["running", "aborted"])


def test_the_group_goes_with_the_computation(client_with: Callable[..., Client]) -> None:
    # Given a computation that started a process of its own
    client = client_with()
    job, _ = launch_watched(client, "where", {})
    grandchild = job.invoke("grandchild")
    assert not is_gone(grandchild)
    # When the job ends, no process of its group is left
    job.abort()
    with pytest.raises(JobAborted):
        job.result(WAIT)
    wait_until(lambda: is_gone(grandchild), 5)


def test_a_wall_time_limit_fails_the_job(client_with: Callable[..., Client]) -> None:
    # 1.5 s, not less: the counter below must start a child and finish within it on a loaded box.
    client = client_with(job_time_limit=1.5, abort_grace=0.3)
    for service in ("blocked", "where"):  # killed at the grace, or aborted at ready()
        job = client.launch(service, {})
        with pytest.raises(RemoteError) as info:
            job.result(WAIT)
        assert info.value.remote_type == "brokerexec.LimitExceeded"
        assert info.value.remote_message == "wall-time limit of 1.5 s reached"
    assert client.launch("counter", {"steps": 3}).result(WAIT)["count"] == 3


def test_a_memory_limit_fails_the_job_with_memory_error(client_with: Callable[..., Client]) -> None:
    client = client_with(job_memory_limit_mb=512)
    with pytest.raises(RemoteError) as info:
        client.launch("greedy", {"mb": 1024}).result(WAIT)
    assert info.value.remote_type == "MemoryError"
    assert "memory limit of 512 MiB reached" in info.value.remote_message
    assert client.launch("greedy", {"mb": 16}).result(WAIT) == 16 * 2**20


def test_a_service_may_ask_for_a_child_on_a_thread_worker(client_with: Callable[..., Client]) -> None:
    client = client_with(runner="thread", concurrency=2)
    alone, _ = launch_watched(client, "where-alone", {})
    here, _ = launch_watched(client, "where", {})
    assert alone.invoke("pid") != os.getpid()
    assert here.invoke("pid") == os.getpid()
    for job in (alone, here):
        job.abort()
        with pytest.raises(JobAborted):
            job.result(WAIT)


def test_a_service_that_cannot_be_made_in_the_child_fails_its_job(
        client_with: Callable[..., Client]) -> None:
    client = client_with()
    with pytest.raises(RemoteError, match="cannot make this one") as info:
        client.launch("unmakeable").result(WAIT)
    assert info.value.remote_type == "RuntimeError"


def test_a_class_defined_in_a_function_cannot_go_to_a_child() -> None:
    class Local(Service):
        name = "local"

    with pytest.raises(ConfigurationError, match="defined inside a function"):
        service_spec(Local)
    runner = ProcessRunner()
    handler = ServiceHandler(runner=runner, name="local")
    handler.start(Local, {})
    outcome = handler.join(WAIT)
    assert outcome["state"] == "failed" and "defined inside a function" in outcome["error"]["message"]
    runner.close()


def test_resume_restores_the_checkpoint_in_the_child_first() -> None:
    runner = ProcessRunner()
    try:
        handler = ServiceHandler(runner=runner, name="resumed")
        # as the worker resumes a job: an instance, resume=True and the checkpoint's state
        handler.start(sample_services.Counter(), sample_services.Counter.validate({"steps": 3}),
                      resume=True, state={"count": 50})
        assert handler.join(WAIT)["result"] == {"count": 53, "label": ""}
        cannot = ServiceHandler(runner=runner, name="cannot-resume")
        cannot.start(sample_services.Forever, {"tick": 0.01}, resume=True, state={})
        outcome = cannot.join(WAIT)
        assert outcome["state"] == "failed" and outcome["error"]["type"] == "NotImplementedError"
    finally:
        runner.close()
    assert runner.live == 0


def test_a_signal_waiting_when_the_child_dies_fails_to_its_sender(
        client_with: Callable[..., Client]) -> None:
    # Given a checkpoint request waiting for a ready() that never comes
    client = client_with()
    job, _ = launch_watched(client, "blocked", {"seconds": 600})
    (child,) = child_pids()
    waiting: list[BaseException] = []
    asker = threading.Thread(target=lambda: _record_error(waiting, job.checkpoint, WAIT))
    asker.start()
    wait_until(lambda: job.status()["queued_signals"] == 1)
    # When the child is killed from outside
    os.kill(child, signal.SIGSEGV)
    # Then the job fails with the reason, and the request fails to its sender at once
    with pytest.raises(RemoteError, match="computation process died of SIGSEGV"):
        job.result(WAIT)
    asker.join(WAIT)
    (error,) = waiting
    assert isinstance(error, InvalidState) and "before the checkpoint was applied" in str(error)


def _record_error(errors: list[BaseException], fn: Callable[..., Any], *args: Any) -> None:
    try:
        fn(*args)
    except BaseException as exc:
        errors.append(exc)


def test_closing_the_runner_kills_what_still_runs() -> None:
    runner = ProcessRunner()
    handler = ServiceHandler(runner=runner, name="left-running")
    handler.start(sample_services.Blocked, {"seconds": 600})
    wait_until(lambda: len(child_pids()) == 1)
    runner.close()
    outcome = handler.join(WAIT)
    assert outcome["state"] == "failed"
    assert outcome["error"]["message"] == "computation process died of SIGKILL: the worker stopped"
    assert runner.live == 0 and child_pids() == set()
