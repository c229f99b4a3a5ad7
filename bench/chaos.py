"""Chaos: jobs that checkpoint, on workers SIGKILLed at random, all on the real broker.

::

    python -m bench.chaos [--jobs 20] [--workers 3] [--kill-every 2 4] [--steps 300]

Starts ``--workers`` worker processes (``brokerexec worker``, the service below), launches
``--jobs`` jobs, and every 2 to 4 s SIGKILLs a random worker and starts a fresh one in its place,
until every job has ended or ``--deadline`` passes. It watches every job's events, and prints:

* jobs launched, finished with the right result, lost (no record by the deadline), and
  duplicated (events of an older execution after a newer one started: two at once);
* per crash that hit a job: the work redone (steps past the last checkpoint the resumed
  execution started from, in seconds of work) and the resume latency (from the SIGKILL to the
  first event of the job's next attempt).

It works in a vhost of its own, deleted at the end. Exit status 1 if a job was lost,
duplicated or wrong.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from brokerexec import Client, Event

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._harness import DEFAULT_URL, broker_lock, isolated_vhost

SERVICE = f"{Path(__file__).resolve().parent / '_chaos_service.py'}:Steps"


@dataclass
class Seen:
    """What the events of one job told."""

    first_of: dict[int, float] = field(default_factory=dict)  # attempt -> first event (monotonic)
    last_of: dict[int, float] = field(default_factory=dict)
    done_of: dict[int, int] = field(default_factory=dict)  # attempt -> last "done" progress
    resumed_from: dict[int, int] = field(default_factory=dict)
    late: int = 0  # events of an older attempt after a newer one began


class Watcher:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.jobs: dict[str, Seen] = defaultdict(Seen)

    def __call__(self, event: Event) -> None:
        now = time.monotonic()
        with self.lock:
            seen = self.jobs[event.job_id]
            if any(attempt > event.attempt for attempt in seen.first_of):
                seen.late += 1
            seen.first_of.setdefault(event.attempt, now)
            seen.last_of[event.attempt] = now
            if event.kind == "progress":
                seen.done_of[event.attempt] = max(seen.done_of.get(event.attempt, 0),
                                                  int(event.data.get("done", 0)))
                if event.data.get("resumed_from") is not None:
                    seen.resumed_from.setdefault(event.attempt, int(event.data["resumed_from"]))


def start_worker(url: str) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "brokerexec", "worker", "--broker", url, "--service", SERVICE,
         "--concurrency", "4", "--heartbeat", "5", "--log-level", "WARNING"],
        stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    for line in process.stderr:  # readiness, not a sleep
        if "worker ready" in line:
            break
    threading.Thread(target=lambda: [None for _ in process.stderr], daemon=True).start()  # type: ignore[union-attr]
    return process


STEP_SECONDS = 0.02


def run(args: argparse.Namespace, url: str, watcher: Watcher
        ) -> tuple[list[Any], dict[str, dict[str, Any]], list[float]]:
    """Launch the jobs and kill workers until every job has ended (or the deadline)."""
    workers = [start_worker(url) for _ in range(args.workers)]
    kills: list[float] = []
    ended: dict[str, dict[str, Any]] = {}
    try:
        with Client(url) as client:
            client.subscribe("#", watcher)
            jobs = client.launch_many("steps", [{"steps": args.steps, "delay": STEP_SECONDS}] * args.jobs,
                                      checkpoint_delta=args.checkpoint_every, progress_delta=0.05)
            started = time.monotonic()
            next_kill = started + random.uniform(*args.kill_every)
            while len(ended) < len(jobs) and time.monotonic() - started < args.deadline:
                for job in jobs:
                    if job.id not in ended and (record := job.record(0)) is not None:
                        ended[job.id] = record
                if time.monotonic() >= next_kill and len(ended) < len(jobs):
                    victim = workers.pop(random.randrange(len(workers)))
                    os.kill(victim.pid, signal.SIGKILL)
                    kills.append(time.monotonic())
                    victim.wait()
                    workers.append(start_worker(url))
                    next_kill = time.monotonic() + random.uniform(*args.kill_every)
                time.sleep(0.2)  # polling the records: the chaos loop's own pace
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        for worker in workers:
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()
    return jobs, ended, kills


def resumes(watcher: Watcher, kills: list[float]) -> tuple[list[float], list[float]]:
    """Work redone per resume (seconds of work) and resume latencies after a SIGKILL."""
    redone, latencies = [], []
    for seen in watcher.jobs.values():
        for attempt in sorted(seen.first_of):
            if attempt == 1:
                continue
            before = seen.done_of.get(attempt - 1, 0)
            redone.append(max(before - seen.resumed_from.get(attempt, 0), 0) * STEP_SECONDS)
            began = seen.first_of[attempt]
            crash = max((k for k in kills if k <= began), default=None)
            if crash is not None:
                latencies.append(began - crash)
    return redone, latencies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=DEFAULT_URL)
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--kill-every", type=float, nargs=2, default=(2.0, 4.0), metavar=("MIN", "MAX"))
    parser.add_argument("--steps", type=int, default=300, help="steps per job, 0.02 s each")
    parser.add_argument("--checkpoint-every", type=float, default=0.5, help="checkpoint_delta, s")
    parser.add_argument("--deadline", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    random.seed(args.seed)
    watcher = Watcher()
    with broker_lock(), isolated_vhost(args.url) as url:
        jobs, ended, kills = run(args, url, watcher)
    right = sum(1 for r in ended.values() if r["state"] == "finished" and r["result"]["done"] == args.steps)
    lost = len(jobs) - len(ended)
    duplicated = sum(1 for seen in watcher.jobs.values() if seen.late)
    redone, latencies = resumes(watcher, kills)
    print(f"jobs launched {len(jobs)}, finished right {right}, lost {lost}, duplicated {duplicated}; "
          f"{len(kills)} SIGKILLs, {len(redone)} resumes")
    if redone:
        print(f"work redone per resume: median {statistics.median(redone):.2f} s, max {max(redone):.2f} s "
              f"(checkpoint interval {args.checkpoint_every} s, so at most that plus one step)")
    if latencies:
        print(f"resume latency after SIGKILL: median {statistics.median(latencies):.2f} s, "
              f"max {max(latencies):.2f} s")
    return 0 if right == len(jobs) and not lost and not duplicated else 1


if __name__ == "__main__":
    sys.exit(main())
