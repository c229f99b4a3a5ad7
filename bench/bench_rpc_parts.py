"""Where an RPC's time goes: brokerexec's client and worker each against a raw pika peer.

    python -m bench.bench_rpc_parts [--n 2000] [--warmup 200]

Five round trips of a ``status`` RPC over direct reply-to, measured in one run, each a p50:

* ``floor``: a raw pika client and a raw pika echo server in another process, through the
  default exchange: nothing in the way;
* ``topic``: the same through kiwipy's topic exchange with the routing key ``[rpc].<id>``
  and ``mandatory`` (what a brokerexec request does on the broker);
* ``client``: brokerexec's client (``Job.status()``) against that raw echo server: the
  topic row plus what the client adds (building the request, decoding the reply);
* ``worker``: the raw pika client against a ``brokerexec worker`` process: the topic row
  plus what the worker adds (its event loop, decoding, the handler, the reply);
* ``both``: brokerexec on both sides, as ``bench_rpc.py`` measures it.

So ``topic - floor`` is the broker's routing, ``client - topic`` the client, ``worker -
topic`` the worker, and ``both`` should come to about ``topic`` plus both of those.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import uuid
from collections.abc import Iterator
from multiprocessing.synchronize import Event as MpEvent
from typing import Any

from bench import _brokerexec
from bench._harness import (
    DEFAULT_URL,
    DIRECT_REPLY_TO,
    Row,
    bench_main,
    broker_lock,
    latency_row,
    spawn,
    time_calls,
    unique_name,
)

KIWIPY_EXCHANGE = "kiwipy.messages"
STATUS = {"state": "running", "paused": False, "pause_requested": False, "abort_requested": False,
          "since": 0.0, "queued_signals": 0, "progress": {}, "progress_delta": 1.0,
          "checkpoint_delta": 3600.0, "improved_delta": 0.0}
TIMEOUT = 10.0


def serve_echo(ready: MpEvent, url: str, queue: str, job_id: str | None) -> None:
    """A raw pika server answering ``{"result": <a status>}``; on kiwipy's exchange with
    ``[rpc].<job_id>`` when ``job_id`` is given, else on the default exchange."""
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.queue_declare(queue, exclusive=True, auto_delete=True)
    if job_id is not None:
        channel.exchange_declare(KIWIPY_EXCHANGE, "topic", durable=False)
        channel.queue_bind(queue, KIWIPY_EXCHANGE, f"[rpc].{job_id}")
    reply = json.dumps({"result": STATUS}).encode()

    def on_request(ch: Any, _method: Any, props: Any, body: bytes) -> None:
        json.loads(body)
        ch.basic_publish("", props.reply_to, reply, pika.BasicProperties(
            correlation_id=props.correlation_id, content_type="application/json"))

    channel.basic_consume(queue, on_request, auto_ack=True)
    ready.set()
    channel.start_consuming()


@contextlib.contextmanager
def echo_server(url: str, on_kiwipy: bool) -> Iterator[str]:
    """The raw echo server in its own process; yields the routing key to reach it."""
    queue, job_id = unique_name("rpc-parts"), uuid.uuid4().hex
    with spawn(serve_echo, (url, queue, job_id if on_kiwipy else None)):
        yield f"[rpc].{job_id}" if on_kiwipy else queue


def raw_calls(url: str, exchange: str, routing_key: str, n: int, warmup: int) -> list[float]:
    """A raw pika client: publish ``{"intent": "status"}``, wait for the reply."""
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        got: dict[str, bytes] = {}
        channel.basic_consume(DIRECT_REPLY_TO, lambda _c, _m, props, body: got.__setitem__(
            props.correlation_id, body), auto_ack=True)
        body = b'{"intent":"status"}'

        def call() -> None:
            cid = uuid.uuid4().hex
            channel.basic_publish(exchange, routing_key, body, pika.BasicProperties(
                reply_to=DIRECT_REPLY_TO, correlation_id=cid, content_type="application/json"),
                mandatory=bool(exchange))
            while cid not in got:
                connection.process_data_events(time_limit=TIMEOUT)
                if cid not in got:
                    raise TimeoutError(f"no reply in {TIMEOUT} s")
            json.loads(got.pop(cid))

        return time_calls(call, n, warmup)
    finally:
        connection.close()


def client_calls(url: str, job_id: str, n: int, warmup: int) -> list[float]:
    from brokerexec import Client

    with Client(url) as client:
        return time_calls(client.job(job_id).status, n, warmup)


def measure(url: str, n: int, warmup: int) -> list[tuple[str, list[float]]]:
    """The five rows, in order (see the module docstring)."""
    rows = []
    with broker_lock(), echo_server(url, on_kiwipy=False) as queue:
        rows.append(("floor: raw pika client, raw pika echo server, default exchange",
                     raw_calls(url, "", queue, n, warmup)))
    with broker_lock(), echo_server(url, on_kiwipy=True) as key:
        rows.append(("topic: the same through kiwipy's exchange, [rpc].<id>, mandatory",
                     raw_calls(url, KIWIPY_EXCHANGE, key, n, warmup)))
        rows.append(("client: brokerexec Job.status() against the raw echo server",
                     client_calls(url, key.partition(".")[2], n, warmup)))
    with broker_lock(), _brokerexec.rpc_serve(url) as job_id:
        # brokerexec's client first: its first call claims the job, which a raw client
        # cannot ask for (it reaches claimed jobs only).
        both = client_calls(url, job_id, n, warmup)
        rows.append(("worker: raw pika client against a brokerexec worker process",
                     raw_calls(url, KIWIPY_EXCHANGE, f"[rpc].{job_id}", n, warmup)))
        rows.append(("both: brokerexec Job.status() against a brokerexec worker process", both))
    return rows


def run(url: str, args: argparse.Namespace) -> list[Row]:
    group = "Where an RPC's time goes (p50, one at a time)"
    return [latency_row(group, label, samples, reference=index == 0)
            for index, (label, samples) in enumerate(measure(url, args.n, args.warmup))]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--n", type=int, default=2000, help="timed calls per row (%(default)s)")
    p.add_argument("--warmup", type=int, default=200, help="untimed calls first (%(default)s)")
    p.add_argument("--url", default=DEFAULT_URL, help="broker URL (loopback); default %(default)s")
    p.add_argument("--no-vhost", action="store_true", help="use the URL's vhost as it is")
    return p


QUICK = ["--n", "300", "--warmup", "50"]


if __name__ == "__main__":
    sys.exit(bench_main("rpc_parts", parser(), run, sys.argv[1:]))
