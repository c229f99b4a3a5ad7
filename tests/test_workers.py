"""Worker processes, clients in other processes, graceful shutdown (real broker, real signals)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

import pytest

from brokerexec import Client, Event, JobAborted

pytestmark = pytest.mark.rabbitmq
WAIT = 30.0


class Ends:
    """Final state events by job id."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.states: dict[str, list[str]] = {}

    def __call__(self, event: Event) -> None:
        with self.cond:
            self.states.setdefault(event.job_id, []).append(event.data["to"])
            self.cond.notify_all()

    def wait(self, job_id: str, state: str) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: state in self.states.get(job_id, []), WAIT), \
                self.states.get(job_id)


def test_jobs_spread_over_worker_processes_and_finish(
        amqp_url: str, worker_process: Callable[..., Any]) -> None:
    first, second = worker_process("--concurrency", "2"), worker_process("--concurrency", "2")
    with Client(amqp_url) as client:
        jobs = [client.launch("counter", {"steps": 20, "delay": 0.01}) for _ in range(12)]
        records = [job.result(WAIT) and job.record() for job in jobs]
    assert all(r is not None and r["state"] == "finished" for r in records)
    assert all(r["result"] == {"count": 20, "label": ""} for r in records if r)
    assert {r["worker"]["pid"] for r in records if r} == {first.pid, second.pid}


def test_a_cli_client_in_another_process_steers_a_job(
        amqp_url: str, worker_process: Callable[..., Any]) -> None:
    worker_process()
    ends = Ends()

    def cli(*args: str) -> Any:
        done = subprocess.run([sys.executable, "-m", "brokerexec", *args, "--broker", amqp_url,
                               "--json"], capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode in (0, 130), done.stderr
        return json.loads(done.stdout) if done.stdout.strip() else None

    with Client(amqp_url) as client:
        client.subscribe("state.forever.*", ends)  # by service: the id is not known yet
        job_id = cli("launch", "forever", "--request", '{"tick": 0.01}')["job_id"]
        ends.wait(job_id, "running")
        job = client.job(job_id)
        assert cli("pause", job_id)["accepted"] is True
        ends.wait(job_id, "paused")
        assert cli("set", job_id, "value=12") == {"value": 12}
        assert cli("invoke", job_id, "current") == 12
        assert cli("status", job_id)["paused"] is True
        assert any(j["job_id"] == job_id for j in cli("jobs"))
        assert cli("resume", job_id)["accepted"] is True
        assert cli("abort", job_id)["accepted"] is True
        with pytest.raises(JobAborted):
            job.result(WAIT)
        assert cli("result", job_id)["state"] == "aborted"


def test_sigterm_lets_running_jobs_finish_and_takes_no_new_work(
        amqp_url: str, worker_process: Callable[..., Any]) -> None:
    worker = worker_process("--concurrency", "1", "--shutdown-grace", "30")
    ends = Ends()
    with Client(amqp_url) as client:
        client.subscribe("state.#", ends)
        # (a service that cannot resume: one that can is handed over, test_durable.py)
        running = client.launch("fragile", {"seconds": 2})
        ends.wait(running.id, "running")
        queued = client.launch("counter", {"steps": 3})
        assert worker.terminate(timeout=WAIT) == 0  # returns once the running job finished
        assert running.record(0)["state"] == "finished"
        assert queued.record(0) is None  # not taken: still safely queued
        worker_process()  # a new worker takes it
        assert queued.result(WAIT) == {"count": 3, "label": ""}


def test_sigterm_past_the_grace_aborts_and_records_the_job(
        amqp_url: str, worker_process: Callable[..., Any]) -> None:
    worker = worker_process("--shutdown-grace", "0.5")
    ends = Ends()
    with Client(amqp_url) as client:
        client.subscribe("state.#", ends)
        job = client.launch("forever", {"tick": 0.01})
        ends.wait(job.id, "running")
        assert worker.terminate(timeout=WAIT) == 0
        with pytest.raises(JobAborted):
            job.result(5)


def test_a_sigkilled_workers_unclaimed_job_runs_again_on_another_worker(
        amqp_url: str, worker_process: Callable[..., Any]) -> None:
    # Given a job running on a worker that has not claimed it yet (its launch unacknowledged)
    doomed = worker_process("--claim-after", "600")
    ends = Ends()
    with Client(amqp_url) as client:
        client.subscribe("state.forever.*", ends)
        job = client.launch("forever", {"tick": 0.01})
        ends.wait(job.id, "running")
        # When that worker dies without a word
        doomed.kill()
        # Then the broker gives the launch to another worker, which claims it before running it
        survivor = worker_process()
        with ends.cond:
            assert ends.cond.wait_for(lambda: ends.states[job.id].count("running") == 2, WAIT)
        status = job.status()  # routed straight to its claimed queue
        assert status["state"] == "running"
        job.abort()
        with pytest.raises(JobAborted):
            job.result(WAIT)
        assert job.record()["worker"]["pid"] == survivor.pid
