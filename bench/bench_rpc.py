"""RPC round trip, one call at a time: latency percentiles of each peer, as ratios to aio-pika.

    python -m bench.bench_rpc [--n 2000] [--warmup 200] [--only aio-pika,pika,...]

Each contender's server runs in a process of its own and answers a small JSON-ish status
request (``{"intent": "status"}`` -> ``{"state": "running", "step": 1}``); the client here
sends ``n`` calls one after the other, after ``warmup`` untimed ones, and the row is the p50
with p90/p99/mean beside it.

Contenders (``CONTENDERS``): ``serve(url)`` is a context manager that starts the server side
and yields the ``target`` the client needs (a queue name, a kiwipy identifier, ...);
``drive(url, target, n, warmup)`` returns the ``n`` timed round trips in seconds. To add one,
write those two functions and add an entry; see ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import uuid
from collections.abc import Iterator
from multiprocessing.synchronize import Event as MpEvent
from typing import Any

from bench import _brokerexec
from bench._harness import (
    DIRECT_REPLY_TO,
    Contender,
    Row,
    add_common_arguments,
    atime_calls,
    bench_main,
    broker_lock,
    delete_objects,
    latency_row,
    selected,
    spawn,
    time_calls,
    unique_name,
)

REQUEST = {"intent": "status"}
REPLY = {"state": "running", "step": 1}
TIMEOUT = 10.0  # a lost reply fails the run instead of hanging it


# ---- aio-pika: exclusive queue, reply to reply_to through the default exchange -------------


def serve_aio_pika(ready: MpEvent, url: str, queue: str) -> None:
    """Server process: answer every request on ``queue`` with :data:`REPLY`."""
    import aio_pika

    async def main() -> None:
        connection = await aio_pika.connect(url)
        channel = await connection.channel(publisher_confirms=False)
        rpc_queue = await channel.declare_queue(queue, exclusive=True, auto_delete=True)

        async def on_request(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            json.loads(message.body)
            reply = aio_pika.Message(json.dumps(REPLY).encode(), correlation_id=message.correlation_id)
            # Not mandatory: RabbitMQ returns every mandatory publish to a direct reply-to name
            # as unroutable even though it delivers it (aio-pika's default is mandatory).
            await channel.default_exchange.publish(reply, routing_key=message.reply_to or "", mandatory=False)

        await rpc_queue.consume(on_request, no_ack=True)
        ready.set()
        await asyncio.Future()  # serve until terminated

    asyncio.run(main())


@contextlib.contextmanager
def aio_pika_server(url: str) -> Iterator[str]:
    """The aio-pika RPC server in its own process; yields its queue name."""
    queue = unique_name("rpc.aio-pika")
    with spawn(serve_aio_pika, (url, queue)):
        yield queue


async def _aio_pika_calls(url: str, queue: str, n: int, warmup: int) -> list[float]:
    import aio_pika

    connection = await aio_pika.connect(url)
    try:
        # The reply is the end-to-end acknowledgement of an RPC: no publisher confirms,
        # as with pika's BlockingConnection below.
        channel = await connection.channel(publisher_confirms=False)
        replies = await channel.get_queue(DIRECT_REPLY_TO, ensure=False)
        waiting: dict[str, asyncio.Future[bytes]] = {}

        async def on_reply(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            future = waiting.pop(message.correlation_id or "", None)
            if future is not None and not future.done():
                future.set_result(message.body)

        await replies.consume(on_reply, no_ack=True)
        loop = asyncio.get_running_loop()
        body = json.dumps(REQUEST).encode()

        async def call() -> None:
            cid = uuid.uuid4().hex
            waiting[cid] = future = loop.create_future()
            await channel.default_exchange.publish(
                aio_pika.Message(body, correlation_id=cid, reply_to=DIRECT_REPLY_TO), routing_key=queue)
            json.loads(await asyncio.wait_for(future, TIMEOUT))

        return await atime_calls(call, n, warmup)
    finally:
        await connection.close()


def drive_aio_pika(url: str, queue: str, n: int, warmup: int) -> list[float]:
    """aio-pika client: direct reply-to, one future per call."""
    return asyncio.run(_aio_pika_calls(url, queue, n, warmup))


# ---- pika BlockingConnection, both sides ----------------------------------------------------


def serve_pika(ready: MpEvent, url: str, queue: str) -> None:
    """Server process: pika's blocking consumer answering on ``queue``."""
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.queue_declare(queue, exclusive=True, auto_delete=True)
    body = json.dumps(REPLY).encode()

    def on_request(ch: Any, method: Any, props: Any, request: bytes) -> None:
        json.loads(request)
        ch.basic_publish("", props.reply_to, body, pika.BasicProperties(correlation_id=props.correlation_id))

    channel.basic_consume(queue, on_request, auto_ack=True)
    ready.set()
    channel.start_consuming()


@contextlib.contextmanager
def pika_server(url: str) -> Iterator[str]:
    """The pika RPC server in its own process; yields its queue name."""
    queue = unique_name("rpc.pika")
    with spawn(serve_pika, (url, queue)):
        yield queue


def drive_pika(url: str, queue: str, n: int, warmup: int) -> list[float]:
    """pika BlockingConnection client with direct reply-to."""
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        got: dict[str, bytes] = {}
        channel.basic_consume(DIRECT_REPLY_TO, lambda _c, _m, props, body: got.__setitem__(
            props.correlation_id, body), auto_ack=True)
        body = json.dumps(REQUEST).encode()

        def call() -> None:
            cid = uuid.uuid4().hex
            channel.basic_publish("", queue, body, pika.BasicProperties(reply_to=DIRECT_REPLY_TO,
                                                                         correlation_id=cid))
            while cid not in got:
                connection.process_data_events(time_limit=TIMEOUT)
                if cid not in got:
                    raise TimeoutError(f"no pika reply in {TIMEOUT} s")
            json.loads(got.pop(cid))

        return time_calls(call, n, warmup)
    finally:
        connection.close()


# ---- kiwipy RmqThreadCommunicator, YAML (as shipped) or JSON codec --------------------------


def _kiwipy_communicator(url: str, exchange: str, codec: str) -> Any:
    import kiwipy.rmq

    codecs: dict[str, Any] = {} if codec == "yaml" else {
        "encoder": lambda obj: json.dumps(obj).encode(), "decoder": json.loads}
    return kiwipy.rmq.RmqThreadCommunicator.connect(connection_params={"url": url},
                                                    message_exchange=exchange, **codecs)


def serve_kiwipy(ready: MpEvent, url: str, exchange: str, identifier: str, codec: str) -> None:
    """Server process: one kiwipy RPC subscriber, answering at once."""
    import threading

    communicator = _kiwipy_communicator(url, exchange, codec)
    communicator.add_rpc_subscriber(lambda _comm, _msg: dict(REPLY), identifier=identifier)
    ready.set()
    threading.Event().wait()  # serve until terminated


@contextlib.contextmanager
def kiwipy_server(url: str, codec: str) -> Iterator[tuple[str, str, str]]:
    """The kiwipy RPC server in its own process; yields (exchange, identifier, codec).

    The message exchange gets a name of its own (kiwipy declares it not auto-deleted), and
    is deleted at the end.
    """
    exchange, identifier = unique_name(f"kiwipy-{codec}"), f"bench{uuid.uuid4().hex[:10]}"
    try:
        with spawn(serve_kiwipy, (url, exchange, identifier, codec)):
            yield exchange, identifier, codec
    finally:
        delete_objects(url, exchanges=[exchange])


def drive_kiwipy(url: str, target: tuple[str, str, str], n: int, warmup: int) -> list[float]:
    """kiwipy client: ``rpc_send(...).result()`` per call."""
    exchange, identifier, codec = target
    communicator = _kiwipy_communicator(url, exchange, codec)
    try:
        return time_calls(lambda: communicator.rpc_send(identifier, REQUEST).result(TIMEOUT), n, warmup)
    finally:
        communicator.close()


# ---- Celery task, rpc:// result backend -----------------------------------------------------


@contextlib.contextmanager
def celery_server(url: str) -> Iterator[str]:
    """A Celery worker (thread pool, concurrency 1) on a queue of its own; yields the queue."""
    from bench import _celery_app

    queue = unique_name("celery-rpc")
    with _celery_app.worker(url, queue, pool="threads", concurrency=1):
        yield queue


def drive_celery(url: str, queue: str, n: int, warmup: int) -> list[float]:
    """Celery client: ``send_task(...).get()`` per call."""
    from bench import _celery_app

    with _celery_app.client(url, queue) as app:
        return time_calls(lambda: app.send_task(_celery_app.ECHO, (REPLY,)).get(timeout=TIMEOUT), n, warmup)


CONTENDERS: dict[str, Contender] = {
    "aio-pika": Contender("aio-pika, direct reply-to", aio_pika_server, drive_aio_pika, reference=True),
    "pika": Contender("pika BlockingConnection, direct reply-to", pika_server, drive_pika),
    "kiwipy": Contender("kiwipy RmqThreadCommunicator (YAML, as shipped)",
                        lambda url: kiwipy_server(url, "yaml"), drive_kiwipy),
    "kiwipy-json": Contender("kiwipy RmqThreadCommunicator, JSON codec",
                             lambda url: kiwipy_server(url, "json"), drive_kiwipy),
    "celery": Contender("Celery task + rpc:// backend (threads pool, concurrency 1)",
                        celery_server, drive_celery),
}
CONTENDERS["brokerexec"] = _brokerexec.RPC


def run(url: str, args: argparse.Namespace) -> list[Row]:
    """Measure each selected contender, one after the other, in this run."""
    group = "RPC round trip, one at a time"
    rows = []
    for contender in selected(CONTENDERS, args.only).values():
        with broker_lock(), contender.serve(url) as target:
            samples = contender.drive(url, target, args.n, args.warmup)
        rows.append(latency_row(group, contender.label, samples, contender.reference))
    return rows


def parser() -> argparse.ArgumentParser:
    """Command-line options of this benchmark."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--n", type=int, default=2000, help="timed calls per contender (%(default)s)")
    p.add_argument("--warmup", type=int, default=200, help="untimed calls first (%(default)s)")
    add_common_arguments(p, CONTENDERS)
    return p


#: Arguments of a quick smoke run (``run_all --quick``).
QUICK = ["--n", "300", "--warmup", "50"]


if __name__ == "__main__":
    sys.exit(bench_main("rpc", parser(), run, sys.argv[1:]))
