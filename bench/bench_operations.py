"""A sweep of trivial jobs as one operation, against Celery's ``group`` and ``chord``.

    python -m bench.bench_operations [--n 2000] [--batches 3] [--processes 2] [--only ...]
    python -m bench.bench_operations --status-items 100000   # status and memory of a big one

The figure is items per second from the first send until the sweep's one consolidated
answer is in the caller's hands: for Celery's ``chord``, its callback's result (a list of
every task's result); for ``group``, the list of its results; for brokerexec,
``client.operation(...)`` then ``op.wait()`` and ``op.consolidate("collect")``. The median
over ``batches`` sweeps of ``n`` items, sent one after the other through the same worker
processes (Celery prefork with one process each, brokerexec workers of 8 slots each). The
chord needs a result backend that keeps its counter: Redis, here on 127.0.0.1:6379 (the
``group`` keeps Celery's ``rpc://``). The reference row is the chord (the issue's target:
at least 1.5x it).

``--status-items N`` measures, on ``memory://`` with jobs that never end: the client's peak
RSS while it launches an N-item sweep, and ``op.status()`` on it (median of 20).
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import statistics
import time
from collections.abc import Iterator
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


# ---- Celery: group (rpc://) and chord (Redis) ---------------------------------------------------


@contextlib.contextmanager
def celery_workers(url: str, processes: int) -> Iterator[str]:
    from bench import _celery_app

    queue = unique_name("celery-sweep")
    with _celery_app.worker(url, queue, pool="prefork", concurrency=processes, backend=REDIS):
        yield queue


def drive_group(url: str, queue: str, n: int, batches: int) -> list[float]:
    from celery import group

    from bench import _celery_app

    with _celery_app.client(url, queue) as app:
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
    "celery-group": Contender("Celery group (rpc:// results), .get() of every result",
                              celery_workers, drive_group),
    "brokerexec": Contender("brokerexec client.operation(), wait(), consolidate('collect')",
                            brokerexec_workers, drive_operation),
}


def run(url: str, args: argparse.Namespace) -> list[Row]:
    rows = []
    if args.status_items:
        rows.extend(status_rows(args.status_items))
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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--n", type=int, default=2000, help="items per sweep (%(default)s)")
    p.add_argument("--batches", type=int, default=3, help="timed sweeps per contender (%(default)s)")
    p.add_argument("--processes", default="2", help="worker process counts (%(default)s)")
    p.add_argument("--status-items", type=int, default=0, help="also measure status and RSS at this size")
    add_common_arguments(p, CONTENDERS)
    return p


#: Arguments of a quick smoke run (``run_all --quick``).
QUICK = ["--n", "200", "--batches", "1"]


def main(argv: list[str] | None = None) -> int:
    return bench_main("bench_operations", parser(), run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
