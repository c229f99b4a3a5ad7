"""brokerexec's rows in every benchmark: real ``brokerexec worker`` processes, a real Client.

Each benchmark file registers these next to its baselines (``CONTENDERS["brokerexec"]``), so
brokerexec is always measured in the same run as what it is compared with.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench._harness import Contender, subprocess_server, time_calls

SAMPLES = str(Path(__file__).resolve().parent.parent / "tests" / "sample_services.py")
TIMEOUT = 60.0


@contextlib.contextmanager
def _workers(url: str, processes: int, concurrency: int) -> Iterator[None]:
    argv = [sys.executable, "-m", "brokerexec", "worker", "--broker", url,
            "--concurrency", str(concurrency), "--log-level", "WARNING",
            f"--service={SAMPLES}:Forever", f"--service={SAMPLES}:Sleeper"]
    with contextlib.ExitStack() as stack:
        for _ in range(processes):
            stack.enter_context(subprocess_server(argv, ready=r"worker ready"))
        yield


@dataclass
class States:
    """The latest state of every job, from state events; waited on by condition."""

    cond: threading.Condition = field(default_factory=threading.Condition)
    latest: dict[str, str] = field(default_factory=dict)

    def __call__(self, event: Any) -> None:
        with self.cond:
            self.latest[event.job_id] = event.data["to"]
            self.cond.notify_all()

    def wait_all(self, state: str, count: int) -> None:
        with self.cond:
            if not self.cond.wait_for(
                    lambda: sum(s == state for s in self.latest.values()) >= count, TIMEOUT):
                raise TimeoutError(f"not all {count} jobs reached {state}")


@contextlib.contextmanager
def _running_jobs(url: str, count: int) -> Iterator[tuple[Any, States, list[Any]]]:
    from brokerexec import Client

    with Client(url) as client:
        states = States()
        client.subscribe("state.forever.*", states)
        jobs = [client.launch("forever", {"tick": 0.005}) for _ in range(count)]
        states.wait_all("running", count)
        try:
            yield client, states, jobs
        finally:
            client.abort_all()
            for job in jobs:
                with contextlib.suppress(Exception):
                    job.result(TIMEOUT)


# ---- RPC: serve(url) -> job id; drive(url, job_id, n, warmup) -> seconds per call ----------


@contextlib.contextmanager
def rpc_serve(url: str) -> Iterator[str]:
    with _workers(url, 1, 1), _running_jobs(url, 1) as (_, _, jobs):
        yield jobs[0].id


def rpc_drive(url: str, job_id: str, n: int, warmup: int) -> list[float]:
    from brokerexec import Client

    with Client(url) as client:
        return time_calls(client.job(job_id).status, n, warmup)


# ---- throughput: serve(url, processes); drive(url, target, n, batches) -> s per batch -------

SLOTS_PER_PROCESS = 8


@contextlib.contextmanager
def throughput_serve(url: str, processes: int) -> Iterator[None]:
    with _workers(url, processes, SLOTS_PER_PROCESS):
        yield


def throughput_drive(url: str, target: None, n: int, batches: int) -> list[float]:
    from brokerexec import Client

    samples = []
    with Client(url) as client:
        client.launch("echo", {"value": 0}).result(TIMEOUT)  # warm
        for _ in range(batches):
            start = time.perf_counter()
            jobs = [client.launch("echo", {"value": i}) for i in range(n)]
            for job in jobs:
                job.result(TIMEOUT)
            samples.append(time.perf_counter() - start)
    return samples


def throughput_drive_many(url: str, target: None, n: int, batches: int) -> list[float]:
    """The same jobs launched as one sweep: every launch in flight at once."""
    from brokerexec import Client

    samples = []
    with Client(url) as client:
        client.launch("echo", {"value": 0}).result(TIMEOUT)  # warm
        for _ in range(batches):
            start = time.perf_counter()
            jobs = client.launch_many("echo", [{"value": i} for i in range(n)])
            for job in jobs:
                job.result(TIMEOUT)
            samples.append(time.perf_counter() - start)
    return samples


# ---- broadcast: serve(url, subscribers, processes); drive(url, target, rounds) -> s per round


@contextlib.contextmanager
def broadcast_serve(url: str, subscribers: int, processes: int) -> Iterator[tuple[Any, States, int]]:
    slots = -(-subscribers // processes)
    with _workers(url, processes, slots), _running_jobs(url, subscribers) as (client, states, _):
        yield client, states, subscribers


def broadcast_drive(url: str, target: tuple[Any, States, int], rounds: int) -> list[float]:
    client, states, count = target
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        client.pause_all()
        states.wait_all("paused", count)  # every job held at ready() and said so
        samples.append(time.perf_counter() - start)
        client.resume_all()
        states.wait_all("running", count)
    return samples


# ---- CLI: serve(url) -> job id; drive(url, job_id) -> argv --------------------------------


def cli_drive(url: str, job_id: str) -> list[str]:
    return [sys.executable, "-m", "brokerexec", "status", job_id, "--broker", url]


RPC = Contender("brokerexec Job.status() through Client", rpc_serve, rpc_drive)
THROUGHPUT = Contender(f"brokerexec, {SLOTS_PER_PROCESS} job slots per worker process, "
                       "`launch()` in a loop (each launch confirmed before the next)",
                       throughput_serve, throughput_drive)
THROUGHPUT_MANY = Contender(f"brokerexec, {SLOTS_PER_PROCESS} job slots per worker process, "
                            "`launch_many()` (one sweep, confirms awaited together)",
                            throughput_serve, throughput_drive_many)
BROADCAST = Contender("brokerexec pause_all until every job reports paused",
                      broadcast_serve, broadcast_drive)
CLI = Contender("brokerexec status ID", rpc_serve, cli_drive)
