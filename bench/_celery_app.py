"""The Celery app of the benchmarks: one trivial task, every broker object named per run.

The worker is started as ``python -m celery -A bench._celery_app worker ...`` with the broker
URL and queue in the environment (:func:`worker`); the timing side builds its own app on the
same URL and queue (:func:`client`). Celery's shared exchanges (events, remote control) get
names of their own too and remote control is off, so a run declares nothing another Celery
user of the broker could see, and :func:`worker` deletes what outlives it.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

from celery import Celery

from bench._harness import DEFAULT_URL, delete_objects, subprocess_server

ECHO = "bench.echo"
COLLECT = "bench.collect"


def make_app(url: str, queue: str, backend: str = "rpc://") -> Celery:
    """A Celery app on ``url`` whose tasks go to ``queue``, results over ``backend``
    (``rpc://``; a chord needs one that keeps its counter, as Redis)."""
    app = Celery("bench", broker=url, backend=backend, set_as_current=False)
    app.conf.update(
        task_default_queue=queue,
        task_default_exchange=queue,
        task_default_routing_key=queue,
        event_exchange=f"{queue}.ev",
        control_exchange=f"{queue}.ctl",
        worker_enable_remote_control=False,  # no pidbox queue
        broker_connection_retry_on_startup=True,  # as Celery 5 does; silences its warning
        broker_connection_max_retries=3,
    )
    app.task(name=ECHO)(echo)
    app.task(name=COLLECT)(collect)
    return app


def echo(value: object) -> object:
    """The trivial task."""
    return value


def collect(values: list[object]) -> list[object]:
    """A chord's callback: the list of its members' results, as they are."""
    return values


# The worker process's app (``-A bench._celery_app``), configured by :func:`worker`.
app = make_app(os.environ.get("BENCH_CELERY_URL", DEFAULT_URL), os.environ.get("BENCH_CELERY_QUEUE", "bench"),
               os.environ.get("BENCH_CELERY_BACKEND", "rpc://"))


def objects(queue: str) -> tuple[list[str], list[str]]:
    """The (queues, exchanges) a run on ``queue`` may leave behind (durable, not auto-deleted)."""
    return [queue], [queue, f"{queue}.ev", f"{queue}.ctl", f"{queue}.ctl.pidbox",
                     f"reply.{queue}.ctl.pidbox"]


@contextlib.contextmanager
def worker(url: str, queue: str, pool: str, concurrency: int, backend: str = "rpc://") -> Iterator[None]:
    """A Celery worker on ``queue`` until the block ends; its broker objects deleted after."""
    argv = [sys.executable, "-m", "celery", "-A", "bench._celery_app", "worker", "--pool", pool,
            "--concurrency", str(concurrency), "--queues", queue, "--hostname", f"{queue}@localhost",
            "--without-heartbeat", "--without-gossip", "--without-mingle", "--loglevel", "INFO"]
    env = {"BENCH_CELERY_URL": url, "BENCH_CELERY_QUEUE": queue, "BENCH_CELERY_BACKEND": backend}
    try:
        with subprocess_server(argv, ready=r"\bready\.", env=env):
            yield
    finally:
        queues, exchanges = objects(queue)
        delete_objects(url, queues, exchanges)


@contextlib.contextmanager
def client(url: str, queue: str, confirm: bool = False, backend: str = "rpc://") -> Iterator[Celery]:
    """The timing side's app; its connections (and its rpc:// reply queue) closed at the end.

    ``confirm``: publisher confirms on (py-amqp's ``confirm_publish``), so each ``send_task``
    returns once the broker holds the task, as brokerexec's ``launch()`` does.
    """
    app = make_app(url, queue, backend)
    if confirm:
        app.conf.broker_transport_options = {"confirm_publish": True}
    try:
        yield app
    finally:
        with contextlib.suppress(Exception):  # closing what may never have been opened
            app.backend.result_consumer.stop()
        app.close()
