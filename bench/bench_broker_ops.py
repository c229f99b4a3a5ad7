"""What each kind of broker operation costs RabbitMQ, in its own CPU time per operation.

    python -m bench.bench_broker_ops [--n 500] [--url amqp://...]

Why it exists: the first worker design spent about 11 ms of broker CPU per trivial job, and
this table showed where (queue creation and deletion). Each operation runs ``n`` times on
one blocking pika channel, in a throw-away vhost; the broker's CPU time is read from
``/proc/<beam.smp pid>/stat`` before and after, so the local broker must be the one under
test (run it on the machine where RabbitMQ runs). Wall time per operation is shown beside.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pika

from bench._harness import isolated_vhost


def _beam_pid() -> int:
    found = subprocess.run(["pgrep", "-f", "beam.smp"], capture_output=True, text=True, check=True)
    return int(found.stdout.split()[0])


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(url: str, n: int) -> list[tuple[str, float, float]]:
    """Rows of (operation, wall ms, broker CPU ms), each per operation."""
    beam = _beam_pid()
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.exchange_declare("ops.topic", "topic", durable=False)
    shared = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_declare("ops.transient")
    rows = []

    def measure(name: str, operation: Callable[[int], object]) -> None:
        cpu, wall = _cpu_seconds(beam), time.perf_counter()
        for i in range(n):
            operation(i)
        wall, cpu = time.perf_counter() - wall, _cpu_seconds(beam) - cpu
        rows.append((name, 1e3 * wall / n, 1e3 * cpu / n))

    def exclusive_queue(_: int) -> None:
        name = f"ops.{uuid.uuid4().hex}"
        channel.queue_declare(name, exclusive=True, auto_delete=True)
        channel.queue_delete(name)

    def durable_queue(_: int) -> None:
        name = f"ops.{uuid.uuid4().hex}"
        channel.queue_declare(name, durable=True, arguments={"x-expires": 60_000})
        channel.queue_delete(name)

    def binding(_: int) -> None:
        key = f"rpc.{uuid.uuid4().hex}"
        channel.queue_bind(shared, "ops.topic", key)
        channel.queue_unbind(shared, "ops.topic", key)

    def channel_open_close(_: int) -> None:
        connection.channel().close()

    measure("exclusive queue: declare + delete", exclusive_queue)
    measure("durable queue: declare + delete", durable_queue)
    measure("binding on a topic exchange: bind + unbind", binding)
    measure("channel: open + close", channel_open_close)
    measure("publish to a topic exchange, nothing bound",
            lambda _: channel.basic_publish("ops.topic", "state.x.y", b'{"a": 1}'))
    measure("transient publish to a transient queue",
            lambda _: channel.basic_publish("", "ops.transient", b'{"a": 1}'))
    confirmed = connection.channel()
    confirmed.confirm_delivery()
    confirmed.queue_declare("ops.durable", durable=True)
    confirmed.queue_declare("ops.stream", durable=True, arguments={"x-queue-type": "stream"})
    persistent = pika.BasicProperties(delivery_mode=2)
    measure("persistent publish to a durable queue, confirmed",
            lambda _: confirmed.basic_publish("", "ops.durable", b'{"a": 1}', persistent))
    measure("publish to a stream, confirmed",
            lambda _: confirmed.basic_publish("", "ops.stream", b'{"a": 1}', persistent))
    connection.close()
    return rows


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--n", type=int, default=500, help="operations of each kind (%(default)s)")
    parser.add_argument("--url", default=os.environ.get("BROKEREXEC_BENCH_AMQP_URL",
                                                        "amqp://guest:guest@127.0.0.1:5672/"))
    args = parser.parse_args(argv)
    with isolated_vhost(args.url) as url:
        rows = run(url, args.n)
    print("| operation | wall ms | broker CPU ms |\n|---|---|---|")
    for name, wall, cpu in rows:
        print(f"| {name} | {wall:.3f} | {cpu:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
