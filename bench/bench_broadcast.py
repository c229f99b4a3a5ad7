"""Latency from one broadcast to its last receipt among many subscribers in a few processes.

    python -m bench.bench_broadcast [--subscribers 50] [--processes 2,5] [--rounds 100]

Subscribers are spread evenly over the processes. Each receipt is time-stamped where it
happens, with ``time.monotonic()`` (CLOCK_MONOTONIC on Linux: one clock for every process of
the machine), and the stamps reach the sender through a ``multiprocessing`` queue, so the way
back is not part of the figure. A round's latency is the last stamp minus the time just before
the send; the row is the median over the rounds, after a few untimed ones.

Contenders (``CONTENDERS``): ``serve(url, subscribers, processes)`` is a context manager that
starts the subscribers and yields the ``target`` the sender needs; ``drive(url, target,
rounds)`` returns one latency (seconds) per round. To add one, write those two functions and
add an entry; see ``bench/README.md``. brokerexec's row is ``pause_all`` until all jobs
report paused; its like-for-like baseline is the hand-written ``aio-pika-jobs`` row.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import queue as queue_module
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.queues import Queue as MpQueue
from multiprocessing.synchronize import Event as MpEvent
from typing import Any

from bench import _brokerexec
from bench._harness import (
    Contender,
    Row,
    add_common_arguments,
    bench_main,
    broker_lock,
    delete_objects,
    latency_row,
    selected,
    spawn,
    unique_name,
)

WARMUP = 5
TIMEOUT = 30.0


@dataclass(frozen=True)
class Target:
    """What a sender needs: the exchange, where receipts arrive, and how many to expect."""

    exchange: str
    receipts: MpQueue[tuple[int, float]]
    subscribers: int


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (i < total % parts) for i in range(parts)]


def _last_receipt(target: Target, round_no: int) -> float:
    """Wait for every subscriber's stamp of round ``round_no``; the latest stamp."""
    deadline = time.monotonic() + TIMEOUT
    stamps: list[float] = []
    while len(stamps) < target.subscribers:
        try:
            got_round, stamp = target.receipts.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue_module.Empty:
            raise TimeoutError(f"{len(stamps)}/{target.subscribers} receipts in {TIMEOUT} s") from None
        if got_round == round_no:
            stamps.append(stamp)
    return max(stamps)


def _rounds(send: Callable[[dict[str, Any]], Any], target: Target, rounds: int) -> list[float]:
    samples = []
    for round_no in range(WARMUP + rounds):
        body = {"intent": "pause", "round": round_no}
        start = time.monotonic()
        send(body)
        samples.append(_last_receipt(target, round_no) - start)
    return samples[WARMUP:]


@contextlib.contextmanager
def _subscribers(serve: Callable[..., None], url: str, exchange: str, subscribers: int,
                 processes: int, *extra: Any) -> Iterator[Target]:
    receipts: MpQueue[tuple[int, float]] = multiprocessing.get_context("spawn").Queue()
    try:
        per_process = [(url, exchange, count, receipts, *extra) for count in _split(subscribers, processes)]
        with spawn(serve, *per_process):
            yield Target(exchange, receipts, subscribers)
    finally:
        receipts.close()
        receipts.join_thread()


# ---- aio-pika fanout: one exclusive queue per subscriber ------------------------------------


def serve_aio_pika(ready: MpEvent, url: str, exchange: str, count: int,
                   receipts: MpQueue[tuple[int, float]], queue_per_subscriber: bool) -> None:
    """Subscriber process: ``count`` subscribers on one connection to the fanout exchange.

    Either every subscriber has a queue of its own, or the process has one queue and hands
    each message to its subscribers in turn (the shape of kiwipy and of a brokerexec worker).
    """
    import aio_pika

    def subscriber(body: bytes) -> None:
        stamp = time.monotonic()
        receipts.put((json.loads(body)["round"], stamp))

    async def main() -> None:
        connection = await aio_pika.connect(url)
        channel = await connection.channel()
        fanout = await channel.declare_exchange(exchange, aio_pika.ExchangeType.FANOUT, auto_delete=True)

        async def one(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            subscriber(message.body)

        async def every(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            for _ in range(count):
                subscriber(message.body)

        for _ in range(count if queue_per_subscriber else 1):
            queue = await channel.declare_queue(exclusive=True)
            await queue.bind(fanout)
            await queue.consume(one if queue_per_subscriber else every, no_ack=True)
        ready.set()
        await asyncio.Future()  # serve until terminated

    asyncio.run(main())


def aio_pika_fanout(url: str, subscribers: int, processes: int,
                    queue_per_subscriber: bool) -> contextlib.AbstractContextManager[Target]:
    """aio-pika subscribers; the fanout exchange is auto-deleted with its last queue."""
    return _subscribers(serve_aio_pika, url, unique_name("fanout"), subscribers, processes,
                        queue_per_subscriber)


async def _aio_pika_rounds(url: str, target: Target, rounds: int) -> list[float]:
    import aio_pika

    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=False)
        fanout = await channel.declare_exchange(target.exchange, aio_pika.ExchangeType.FANOUT,
                                                auto_delete=True)
        samples = []
        for round_no in range(WARMUP + rounds):
            body = json.dumps({"intent": "pause", "round": round_no}).encode()
            start = time.monotonic()
            await fanout.publish(aio_pika.Message(body), routing_key="")
            last = await asyncio.to_thread(_last_receipt, target, round_no)
            samples.append(last - start)
        return samples[WARMUP:]
    finally:
        await connection.close()


def drive_aio_pika(url: str, target: Target, rounds: int) -> list[float]:
    """aio-pika sender: one publish to the fanout exchange per round."""
    return asyncio.run(_aio_pika_rounds(url, target, rounds))


# ---- hand-written pause_all: aio-pika fanout to ticking jobs that report back -------------
#
# The like-for-like baseline for brokerexec's row: a fanout message to every process; each
# of its "jobs" (a thread doing 5 ms of work between checks, as the brokerexec row's jobs
# do) notices it at its next check, holds, and reports "paused" through the broker to the
# sender, which stops the clock at the last report. What brokerexec adds on top is its own
# machinery only: the retained control stream, the handler, state events, kiwipy broadcasts.

TICK = 0.005


def serve_aio_pika_jobs(ready: MpEvent, url: str, exchange: str, count: int,
                        receipts: MpQueue[tuple[int, float]], reports: str) -> None:
    """Subscriber process: one queue on the fanout, ``count`` job threads reporting back."""
    import threading

    import aio_pika

    state = {"round": -1}

    async def main() -> None:
        loop = asyncio.get_running_loop()
        connection = await aio_pika.connect(url)
        channel = await connection.channel(publisher_confirms=False)
        fanout = await channel.declare_exchange(exchange, aio_pika.ExchangeType.FANOUT, auto_delete=True)

        async def report(round_no: int) -> None:
            await channel.default_exchange.publish(
                aio_pika.Message(json.dumps({"round": round_no, "to": "paused"}).encode()), reports)

        def job() -> None:
            seen = -1
            while True:
                time.sleep(TICK)  # the job's work between two checks
                if state["round"] != seen:
                    seen = state["round"]
                    asyncio.run_coroutine_threadsafe(report(seen), loop)

        async def on_pause(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            state["round"] = json.loads(message.body)["round"]

        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(fanout)
        await queue.consume(on_pause, no_ack=True)
        for _ in range(count):
            threading.Thread(target=job, daemon=True).start()
        ready.set()
        await asyncio.Future()  # serve until terminated

    asyncio.run(main())


@contextlib.contextmanager
def aio_pika_jobs(url: str, subscribers: int, processes: int) -> Iterator[tuple[Target, str]]:
    """Job processes, and the queue their reports come to (deleted at the end)."""
    import pika

    reports = unique_name("reports")
    connection = pika.BlockingConnection(pika.URLParameters(url))
    connection.channel().queue_declare(reports, auto_delete=False)
    connection.close()
    try:
        with _subscribers(serve_aio_pika_jobs, url, unique_name("fanout"), subscribers, processes,
                          reports) as target:
            yield target, reports
    finally:
        delete_objects(url, queues=[reports])


def drive_aio_pika_jobs(url: str, target: tuple[Target, str], rounds: int) -> list[float]:
    """Publish a pause per round; the clock stops at the last job's report."""
    import aio_pika

    fanout_target, reports = target

    async def main() -> list[float]:
        connection = await aio_pika.connect(url)
        try:
            channel = await connection.channel(publisher_confirms=False)
            fanout = await channel.declare_exchange(fanout_target.exchange, aio_pika.ExchangeType.FANOUT,
                                                    auto_delete=True)
            inbox: asyncio.Queue[int] = asyncio.Queue()
            queue = await channel.get_queue(reports)
            await queue.consume(lambda m: inbox.put_nowait(json.loads(m.body)["round"]), no_ack=True)
            samples = []
            for round_no in range(WARMUP + rounds):
                start = time.monotonic()
                await fanout.publish(aio_pika.Message(json.dumps({"round": round_no}).encode()), "")
                got = 0
                while got < fanout_target.subscribers:
                    got += await asyncio.wait_for(inbox.get(), TIMEOUT) == round_no
                samples.append(time.monotonic() - start)
            return samples[WARMUP:]
        finally:
            await connection.close()

    return asyncio.run(main())


# ---- kiwipy broadcast: one communicator per process, subscribers added to it ---------------


def _kiwipy_communicator(url: str, exchange: str) -> Any:
    import kiwipy.rmq

    return kiwipy.rmq.RmqThreadCommunicator.connect(connection_params={"url": url}, message_exchange=exchange)


def serve_kiwipy(ready: MpEvent, url: str, exchange: str, count: int,
                 receipts: MpQueue[tuple[int, float]]) -> None:
    """Subscriber process: one communicator with ``count`` broadcast subscribers (AiiDA's shape)."""
    import threading

    def on_broadcast(_comm: Any, body: Any, _sender: Any, _subject: Any, _cid: Any) -> None:
        stamp = time.monotonic()
        receipts.put((body["round"], stamp))

    communicator = _kiwipy_communicator(url, exchange)
    for _ in range(count):
        communicator.add_broadcast_subscriber(on_broadcast)
    ready.set()
    threading.Event().wait()  # serve until terminated


@contextlib.contextmanager
def kiwipy_broadcast(url: str, subscribers: int, processes: int) -> Iterator[Target]:
    """kiwipy subscribers on an exchange of their own, deleted at the end."""
    exchange = unique_name("kiwipy-broadcast")
    try:
        with _subscribers(serve_kiwipy, url, exchange, subscribers, processes) as target:
            yield target
    finally:
        delete_objects(url, exchanges=[exchange])


def drive_kiwipy(url: str, target: Target, rounds: int) -> list[float]:
    """kiwipy sender: ``broadcast_send`` (YAML, as shipped; waits for the broker's confirm)."""
    communicator = _kiwipy_communicator(url, target.exchange)
    try:
        return _rounds(communicator.broadcast_send, target, rounds)
    finally:
        communicator.close()


CONTENDERS: dict[str, Contender] = {
    "aio-pika": Contender("aio-pika fanout, a queue per process",
                          lambda url, subs, procs: aio_pika_fanout(url, subs, procs, False), drive_aio_pika,
                          reference=True),
    "aio-pika-queues": Contender("aio-pika fanout, a queue per subscriber",
                                 lambda url, subs, procs: aio_pika_fanout(url, subs, procs, True),
                                 drive_aio_pika),
    "kiwipy": Contender("kiwipy broadcast_send, a communicator per process", kiwipy_broadcast, drive_kiwipy),
    "aio-pika-jobs": Contender("hand-written pause_all: aio-pika fanout to jobs checking every "
                               "5 ms, each reporting `paused` back through the broker",
                               aio_pika_jobs, drive_aio_pika_jobs),
}
CONTENDERS["brokerexec"] = _brokerexec.BROADCAST


def run(url: str, args: argparse.Namespace) -> list[Row]:
    """For each process count, measure each selected contender, one after the other."""
    rows = []
    for processes in (int(p) for p in args.processes.split(",")):
        group = f"broadcast to {args.subscribers} subscribers in {processes} processes, to the last receipt"
        for contender in selected(CONTENDERS, args.only).values():
            with broker_lock(), contender.serve(url, args.subscribers, processes) as target:
                samples = contender.drive(url, target, args.rounds)
            rows.append(latency_row(group, contender.label, samples, contender.reference))
    return rows


def parser() -> argparse.ArgumentParser:
    """Command-line options of this benchmark."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--subscribers", type=int, default=50, help="subscribers in all (%(default)s)")
    p.add_argument("--processes", default="2,5", help="subscriber process counts (%(default)s)")
    p.add_argument("--rounds", type=int, default=100, help="timed broadcasts (%(default)s)")
    add_common_arguments(p, CONTENDERS)
    return p


#: Arguments of a quick smoke run (``run_all --quick``).
QUICK = ["--rounds", "10", "--processes", "2"]


if __name__ == "__main__":
    sys.exit(bench_main("broadcast", parser(), run, sys.argv[1:]))
