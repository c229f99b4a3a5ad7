"""A sweep of trivial jobs as one operation, against Celery's ``group`` and ``chord``.

    python -m bench.bench_operations [--n 2000] [--batches 3] [--processes 2] [--only ...]
    python -m bench.bench_operations --status-items 100000   # status and memory of a big one

The figure is items per second from the first send until the sweep's one consolidated
answer is in the caller's hands: for Celery's ``chord``, its callback's result (a list of
every task's result); for ``group``, the list of its results; for brokerexec,
``client.operation(...)`` then ``op.wait()`` and ``op.consolidate("collect")``. The median
over ``batches`` sweeps of ``n`` items, sent one after the other through the same worker
processes (Celery prefork with one process each, brokerexec workers of 8 slots each). The
chord needs a result backend that keeps its counter: Redis, here on 127.0.0.1:6379 (database
15), for the group too (one worker serves both). The reference row is the chord (the issue's
target: at least 1.5x it).

``--status-items N`` measures, on ``memory://`` with jobs that never end: the process's peak
RSS while it launches an N-item sweep (client, embedded worker and broker together), and
``op.status()`` on it (median of 20). ``--broker-items N`` runs an N-item sweep of trivial
jobs on the broker from a client process of its own (its peak RSS), then finds it by id from
a fresh client (``client.operation_of``, which reads the journal) and asks its status, and
asks a ``brokerexec history`` indexer (SQLite) for its counts by state from another.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench._harness import (
    Contender,
    Row,
    add_common_arguments,
    bench_main,
    broker_lock,
    selected,
    unique_name,
)

TIMEOUT = 300.0
WARMUP = 50
REDIS = "redis://127.0.0.1:6379/15"


# ---- Celery: group and chord (Redis results) ---------------------------------------------------


@contextlib.contextmanager
def celery_workers(url: str, processes: int) -> Iterator[str]:
    import redis

    from bench import _celery_app

    queue = unique_name("celery-sweep")
    try:
        with _celery_app.worker(url, queue, pool="prefork", concurrency=processes, backend=REDIS):
            yield queue
    finally:
        redis.Redis.from_url(REDIS).flushdb()  # the results Celery kept: the bench's own database


def drive_group(url: str, queue: str, n: int, batches: int) -> list[float]:
    from celery import group

    from bench import _celery_app

    with _celery_app.client(url, queue, backend=REDIS) as app:
        echo = app.signature(_celery_app.ECHO)

        def sweep(count: int) -> float:
            start = time.perf_counter()
            values = group(echo.clone((i,)) for i in range(count)).apply_async().get(timeout=TIMEOUT)
            assert len(values) == count
            return time.perf_counter() - start

        sweep(WARMUP)
        return [sweep(n) for _ in range(batches)]


def drive_chord(url: str, queue: str, n: int, batches: int) -> list[float]:
    from celery import chord

    from bench import _celery_app

    with _celery_app.client(url, queue, backend=REDIS) as app:
        echo, collect = app.signature(_celery_app.ECHO), app.signature(_celery_app.COLLECT)

        def sweep(count: int) -> float:
            start = time.perf_counter()
            values = chord(echo.clone((i,)) for i in range(count))(collect).get(timeout=TIMEOUT)
            assert len(values) == count
            return time.perf_counter() - start

        sweep(WARMUP)
        return [sweep(n) for _ in range(batches)]


# ---- brokerexec ---------------------------------------------------------------------------------


@contextlib.contextmanager
def brokerexec_workers(url: str, processes: int) -> Iterator[None]:
    from bench import _brokerexec

    with _brokerexec.throughput_serve(url, processes):
        yield


def drive_operation(url: str, target: None, n: int, batches: int) -> list[float]:
    from brokerexec import Client

    with Client(url) as client:

        def sweep(count: int) -> float:
            start = time.perf_counter()
            with client.operation("echo", [{"value": i} for i in range(count)]) as op:
                op.wait(TIMEOUT)
                values = op.consolidate("collect")
            assert len(values) == count and all(row["state"] == "finished" for row in values)
            return time.perf_counter() - start

        sweep(WARMUP)
        return [sweep(n) for _ in range(batches)]


CONTENDERS: dict[str, Contender] = {
    "celery-chord": Contender("Celery chord (Redis result backend), callback collects every result",
                              celery_workers, drive_chord, reference=True),
    "celery-group": Contender("Celery group (Redis result backend), .get() of every result",
                              celery_workers, drive_group),
    "brokerexec": Contender("brokerexec client.operation(), wait(), consolidate('collect')",
                            brokerexec_workers, drive_operation),
}


def run(url: str, args: argparse.Namespace) -> list[Row]:
    rows = []
    if args.status_items:
        rows.extend(status_rows(args.status_items))
    if args.broker_items:
        with broker_lock(), brokerexec_workers(url, 2), history_indexer(url):
            rows.extend(broker_rows(url, args.broker_items))
    if args.abort_items:
        with broker_lock():
            rows.extend(abort_rows(url, args.abort_items))
    for processes in (int(p) for p in args.processes.split(",")):
        group = f"sweep of {args.n} trivial items to one answer, {processes} worker process(es)"
        for contender in selected(CONTENDERS, args.only).values():
            with broker_lock(), contender.serve(url, processes) as target:
                elapsed = contender.drive(url, target, args.n, args.batches)
            rates = sorted(args.n / seconds for seconds in elapsed)
            rows.append(Row(group, contender.label, statistics.median(rates), "items/s", contender.reference,
                            extra={"min": rates[0], "max": rates[-1]}))
    return rows


def status_rows(count: int) -> list[Row]:
    """An ``count``-item sweep on ``memory://`` whose jobs never end (they wait at ready()):
    the client's peak RSS, and how long ``op.status()`` takes on it."""
    import threading

    from brokerexec import Client, Service, ServiceHandler, grid

    release = threading.Event()

    class Waits(Service):
        name = "waits"

        def run(self, handler: ServiceHandler, request: dict[str, Any]) -> None:
            while not release.wait(0.05):
                handler.ready()

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with Client("memory://bench-status", services=[Waits], concurrency=4) as client:
        sweep = grid(x=range(count // 100), y=range(100))
        start = time.perf_counter()
        op = client.operation("waits", sweep)
        op.wait_launched(TIMEOUT)
        launched = time.perf_counter() - start
        samples = []
        for _ in range(20):
            began = time.perf_counter()
            status = op.status()
            samples.append(time.perf_counter() - began)
        assert status.total == len(sweep)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        release.set()
        op.abort(60)
        op.close()
    group = f"an operation of {len(sweep)} items on memory:// (jobs waiting)"
    return [Row(group, "op.status(), median of 20", statistics.median(samples) * 1000, "ms",
                extra={"max": max(samples) * 1000}),
            Row(group, "the client's peak RSS (process, after launching)", peak, "MiB",
                extra={"before": before}),
            Row(group, "launching every item (registered and queued)", launched, "s")]


#: A launching client of its own (its RSS is its own): runs an N-item sweep of trivial jobs to
#: its end; prints its id, seconds, and peak RSS in MiB.
_LAUNCHER = """
import json, resource, sys, time
from brokerexec import Client, grid
url, count = sys.argv[1], int(sys.argv[2])
with Client(url) as client:
    start = time.perf_counter()
    with client.operation("echo", grid(value=range(count))) as op:
        op.wait(3600)
        took = time.perf_counter() - start
        assert op.status().counts["finished"] == count
    print(json.dumps({"id": op.id, "seconds": took,
                      "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""
#: A fresh client that finds the operation by id (reading the journal) and asks its status.
_FINDER = """
import json, sys, time
from brokerexec import Client
url, operation_id = sys.argv[1], sys.argv[2]
with Client(url) as client:
    start = time.perf_counter()
    op = client.operation_of(operation_id)
    found = time.perf_counter() - start
    began = time.perf_counter()
    status = op.status()
    print(json.dumps({"found": found, "status": time.perf_counter() - began, "total": status.total}))
    op.close()
"""
#: A fresh client that asks the history store for the operation's counts (once the store has
#: them all), the way `brokerexec op status ID` does.
_COUNTER = """
import json, sys, time
from brokerexec import Client
url, operation_id, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
with Client(url) as client:
    deadline = time.monotonic() + 600
    while sum(client.operation_counts(operation_id).values()) < count:  # the store catching up
        assert time.monotonic() < deadline, "the history store never counted every job"
        time.sleep(0.5)
with Client(url) as client:
    start = time.perf_counter()
    counts = client.operation_counts(operation_id)
    print(json.dumps({"seconds": time.perf_counter() - start, "total": sum(counts.values())}))
"""


@contextlib.contextmanager
def history_indexer(url: str) -> Iterator[None]:
    """A `brokerexec history` process on a SQLite store of its own."""
    import sys
    import tempfile

    from bench._harness import subprocess_server

    with tempfile.TemporaryDirectory() as folder:
        store = f"{folder}/history.db"
        argv = [sys.executable, "-m", "brokerexec", "history", "--broker", url, "--store", store]
        with subprocess_server(argv, ready=r"history indexer ready"):
            yield


def broker_rows(url: str, count: int) -> list[Row]:
    """An ``count``-item sweep of trivial jobs on the broker, launched by a client process of
    its own (its peak RSS), then found by id from a fresh one (how long that takes)."""
    import json
    import subprocess
    import sys

    def output(script: str, *args: str) -> dict[str, Any]:
        done = subprocess.run([sys.executable, "-c", script, url, *args], check=True, capture_output=True,
                              text=True, timeout=3600)
        return dict(json.loads(done.stdout))

    launched = output(_LAUNCHER, str(count))
    found = output(_FINDER, launched["id"])
    counted = output(_COUNTER, launched["id"], str(count))
    assert found["total"] == count == counted["total"]
    group = f"an operation of {count} trivial items on RabbitMQ, 2 worker processes"
    return [Row(group, "launching client: launch, follow to the end", count / launched["seconds"], "items/s"),
            Row(group, "launching client: peak RSS", launched["rss"], "MiB"),
            Row(group, "a fresh client: operation_of(id), reading the journal", found["found"] * 1e3, "ms"),
            Row(group, "then op.status()", found["status"] * 1000, "ms"),
            Row(group, "a fresh client: client.operation_counts(id), from the history store",
                counted["seconds"] * 1000, "ms")]


def abort_rows(url: str, count: int) -> list[Row]:
    """An operation of ``count`` items that run until aborted, 8 running (2 worker processes
    of 4) and the rest queued, aborted as a whole: by one control message (``op.abort()``),
    and, the way before it, by a signal to each unended job, 8 at a time. From the abort to
    the last item's outcome in the client."""
    import concurrent.futures as cf
    import subprocess
    import sys

    from brokerexec import Client

    service = f"{Path(__file__).resolve().parent / '_web_service.py'}:Ticker"
    workers = [subprocess.Popen([sys.executable, "-m", "brokerexec", "worker", "--broker", url, "--service",
                                 service, "--concurrency", "4"], stderr=subprocess.DEVNULL) for _ in range(2)]
    group = f"aborting an operation of {count} items (8 running, the rest queued), to every outcome"
    rows = []
    try:
        with Client(url) as client:
            from bench.bench_web import wait_offered

            wait_offered(client)
            for how in ("one control message: op.abort()", "a signal to each job, 8 at a time (before)"):
                op = client.operation("ticker", [{"n": n, "how": how} for n in range(count)])
                with op._cond:
                    op._cond.wait_for(lambda held=op: held.status().counts["running"] == 8, 120)
                start = time.perf_counter()
                if how.startswith("one"):
                    op.abort()
                else:
                    unended = op._unended_jobs()
                    with cf.ThreadPoolExecutor(8) as pool:
                        list(pool.map(lambda job_id: _abort_quietly(client, job_id), unended))
                status = op.wait(3600)
                seconds = time.perf_counter() - start
                assert status.counts["aborted"] == count, status.counts
                rows.append(Row(group, how, seconds * 1000, "ms", reference=not how.startswith("one")))
                op.close()
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.wait(60)
    return rows


def _abort_quietly(client: Any, job_id: str) -> bool:
    from brokerexec import BrokerExecError

    try:
        return bool(client.job(job_id).abort(10))
    except BrokerExecError:  # ended meanwhile
        return False


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--n", type=int, default=2000, help="items per sweep (%(default)s)")
    p.add_argument("--batches", type=int, default=3, help="timed sweeps per contender (%(default)s)")
    p.add_argument("--processes", default="2", help="worker process counts (%(default)s)")
    p.add_argument("--status-items", type=int, default=0,
                   help="also measure status and RSS at this size on memory://")
    p.add_argument("--abort-items", type=int, default=0,
                   help="also abort an operation of this many items: one control message, a signal per job")
    p.add_argument("--broker-items", type=int, default=0,
                   help="also sweep this many on the broker: the client's RSS, a fresh client's look-up")
    add_common_arguments(p, CONTENDERS)
    return p


#: Arguments of a quick smoke run (``run_all --quick``).
QUICK = ["--n", "200", "--batches", "1"]


def main(argv: list[str] | None = None) -> int:
    return bench_main("bench_operations", parser(), run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
