"""Launch-to-finish of many trivial tasks with 1 and 2 consumer processes, as ratios to aio-pika.

    python -m bench.bench_throughput [--n 2000] [--batches 3] [--processes 1,2] [--only ...]

The figure is tasks per second from the first send to the last result received, the median
over ``batches`` batches of ``n`` tasks sent one batch after the other through the same
consumers, after a small untimed warm-up batch. Consumers run in processes of their own; each
task's result goes back to the sender, which counts them.

Contenders (``CONTENDERS``): ``serve(url, processes)`` is a context manager that starts
``processes`` consumer processes and yields the ``target`` the sender needs;
``drive(url, target, n, batches)`` sends ``batches`` batches of ``n`` tasks and returns, per
batch, the seconds until all ``n`` results were received. To add one, write those two
functions and add an entry; see ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Iterator
from multiprocessing.synchronize import Event as MpEvent

from bench import _brokerexec
from bench._harness import (
    Contender,
    Row,
    add_common_arguments,
    bench_main,
    broker_lock,
    delete_objects,
    selected,
    spawn,
    unique_name,
)

WARMUP = 50
PREFETCH = 50  # per aio-pika consumer; Celery keeps its own default (4 x concurrency)
TIMEOUT = 120.0


# ---- aio-pika: one consumer per process, result to the sender's exclusive queue -------------


def serve_aio_pika(ready: MpEvent, url: str, queue: str, durable: bool) -> None:
    """Consumer process: run each task (echo its body) and send the result to ``reply_to``."""
    import aio_pika

    async def main() -> None:
        connection = await aio_pika.connect(url)
        channel = await connection.channel(publisher_confirms=False)
        await channel.set_qos(prefetch_count=PREFETCH)
        tasks = await channel.declare_queue(queue, durable=durable, auto_delete=not durable)

        async def on_task(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            result = json.dumps({"result": json.loads(message.body)["value"]}).encode()
            await channel.default_exchange.publish(
                aio_pika.Message(result, correlation_id=message.correlation_id),
                routing_key=message.reply_to or "")
            await message.ack()

        await tasks.consume(on_task)
        ready.set()
        await asyncio.Future()  # serve until terminated

    asyncio.run(main())


@contextlib.contextmanager
def aio_pika_consumers(url: str, processes: int, durable: bool) -> Iterator[tuple[str, bool]]:
    """``processes`` aio-pika consumers of a queue of their own; yields (queue, durable)."""
    queue = unique_name("tasks.aio-pika" + (".durable" if durable else ""))
    try:
        with spawn(serve_aio_pika, *[(url, queue, durable)] * processes):
            yield queue, durable
    finally:
        if durable:  # a transient queue is auto-deleted with its last consumer
            delete_objects(url, queues=[queue])


async def _aio_pika_send(url: str, queue: str, durable: bool, n: int, batches: int) -> list[float]:
    import aio_pika

    connection = await aio_pika.connect(url)
    try:
        # Durable: persistent messages, and publisher confirms handled concurrently (all
        # publishes in flight at once), which is how aio-pika keeps confirms cheap.
        channel = await connection.channel(publisher_confirms=durable)
        await channel.declare_queue(queue, durable=durable, auto_delete=not durable)
        results = await channel.declare_queue(exclusive=True)
        mode = aio_pika.DeliveryMode.PERSISTENT if durable else aio_pika.DeliveryMode.NOT_PERSISTENT
        state = {"left": 0}
        done = asyncio.Event()

        async def on_result(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            json.loads(message.body)
            state["left"] -= 1
            if state["left"] == 0:
                done.set()

        await results.consume(on_result, no_ack=True)

        async def batch(count: int) -> float:
            state["left"] = count
            done.clear()
            start = time.perf_counter()
            await asyncio.gather(*(channel.default_exchange.publish(
                aio_pika.Message(json.dumps({"value": i}).encode(), delivery_mode=mode,
                                 reply_to=results.name), routing_key=queue) for i in range(count)))
            await asyncio.wait_for(done.wait(), TIMEOUT)
            return time.perf_counter() - start

        await batch(WARMUP)
        return [await batch(n) for _ in range(batches)]
    finally:
        await connection.close()


def drive_aio_pika(url: str, target: tuple[str, bool], n: int, batches: int) -> list[float]:
    """aio-pika sender: all publishes in flight at once, results counted as they come."""
    queue, durable = target
    return asyncio.run(_aio_pika_send(url, queue, durable, n, batches))


# ---- Celery prefork, rpc:// results ---------------------------------------------------------


@contextlib.contextmanager
def celery_prefork(url: str, processes: int) -> Iterator[str]:
    """A Celery worker, prefork pool of ``processes``, on a queue of its own; yields the queue."""
    from bench import _celery_app

    queue = unique_name("celery-tasks")
    with _celery_app.worker(url, queue, pool="prefork", concurrency=processes):
        yield queue


def drive_celery(url: str, queue: str, n: int, batches: int, confirm: bool = False) -> list[float]:
    """Celery sender: ``send_task`` n times, then ``get()`` every result."""
    from bench import _celery_app

    with _celery_app.client(url, queue, confirm=confirm) as app:

        def batch(count: int) -> float:
            start = time.perf_counter()
            for result in [app.send_task(_celery_app.ECHO, (i,)) for i in range(count)]:
                result.get(timeout=TIMEOUT)
            return time.perf_counter() - start

        batch(WARMUP)
        return [batch(n) for _ in range(batches)]


CONTENDERS: dict[str, Contender] = {
    "aio-pika": Contender("aio-pika, transient", lambda url, k: aio_pika_consumers(url, k, durable=False),
                          drive_aio_pika, reference=True),
    "aio-pika-durable": Contender("aio-pika, durable queue + persistent messages + confirms",
                                  lambda url, k: aio_pika_consumers(url, k, durable=True), drive_aio_pika),
    "celery": Contender("Celery prefork, rpc:// results (concurrency = process count)",
                        celery_prefork, drive_celery),
    "celery-confirm": Contender("Celery prefork, rpc:// results, publisher confirms on "
                                "(each `send_task` confirmed before the next)", celery_prefork,
                                lambda url, queue, n, batches: drive_celery(url, queue, n, batches,
                                                                            confirm=True)),
}
CONTENDERS["brokerexec"] = _brokerexec.THROUGHPUT
CONTENDERS["brokerexec-many"] = _brokerexec.THROUGHPUT_MANY


def run(url: str, args: argparse.Namespace) -> list[Row]:
    """For each process count, measure each selected contender, one after the other."""
    rows = []
    for processes in (int(p) for p in args.processes.split(",")):
        group = f"launch-to-finish, {args.n} trivial tasks, {processes} consumer process(es)"
        for contender in selected(CONTENDERS, args.only).values():
            with broker_lock(), contender.serve(url, processes) as target:
                elapsed = contender.drive(url, target, args.n, args.batches)
            rates = sorted(args.n / seconds for seconds in elapsed)
            rows.append(Row(group, contender.label, statistics.median(rates), "tasks/s", contender.reference,
                            extra={"min": rates[0], "max": rates[-1]}))
    return rows


def parser() -> argparse.ArgumentParser:
    """Command-line options of this benchmark."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--n", type=int, default=2000, help="timed tasks per contender (%(default)s)")
    p.add_argument("--batches", type=int, default=3, help="timed batches per contender (%(default)s)")
    p.add_argument("--processes", default="1,2", help="consumer process counts (%(default)s)")
    add_common_arguments(p, CONTENDERS)
    return p


#: Arguments of a quick smoke run (``run_all --quick``).
QUICK = ["--n", "500", "--batches", "1"]


if __name__ == "__main__":
    sys.exit(bench_main("throughput", parser(), run, sys.argv[1:]))
