"""The body of ``brokerexec worker``: one worker process, from its start to a graceful stop.

Logging (with the thread name on every line), the signal handlers (the first SIGTERM or
Ctrl-C stops gracefully, a second exits at once), the RabbitMQ transport and the
:class:`~brokerexec.Worker` on it. Imported only by that verb.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import Any

import click

from .cli_input import need_amqp
from .cli_output import EXIT_ABORTED, EXIT_USAGE, exit_on_errors, fail
from .pool import PoolKind
from .protocol.topology import QueueType
from .registry import ServiceRegistry
from .transport.amqp_settings import ConnectionSettings
from .transport.amqp_worker import RabbitWorkerTransport
from .worker import RunnerKind, Worker, WorkerSettings, host_info

__all__ = ["serve"]

LOG_FORMAT = "%(asctime)s %(levelname)s [%(threadName)s] %(name)s: %(message)s"


def serve(broker: str, services: tuple[str, ...], *, concurrency: int, pool_kind: PoolKind,
          pool_size: int | None, shutdown_grace: float, heartbeat: int, claim_after: float,
          lease_renew: float, resume_grace: float, max_checkpoint_bytes: int, log_level: str,
          runner: RunnerKind = "thread", queue_type: QueueType = "classic") -> None:
    """Run a worker until SIGTERM or Ctrl-C, then stop it gracefully (see ``worker --help``)."""
    need_amqp(broker)
    with exit_on_errors():
        registry = ServiceRegistry.from_specs(services)
    if not len(registry):
        fail("no services to run: give --service MODULE:Class (or file.py:Class), or install "
              "a package with a 'brokerexec.services' entry point", EXIT_USAGE)
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr, format=LOG_FORMAT)
    log = logging.getLogger("brokerexec.cli")
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        if stop.is_set():
            os.write(2, b"brokerexec: second signal, exiting without waiting for jobs\n")
            os._exit(EXIT_ABORTED)
        stop.set()

    # Installed before the connection starts: an early SIGTERM still stops cleanly, and pool
    # processes forked later inherit this handler instead of dying on the terminal's Ctrl-C.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    with exit_on_errors():
        info = host_info()
        transport = RabbitWorkerTransport(ConnectionSettings(
            url=broker, heartbeat=heartbeat, reconnect_deadline=None,
            name=f"brokerexec-worker-{info['hostname']}-{info['pid']}"), host_info=info,
            claim_after=claim_after, lease_renew=lease_renew, resume_grace=resume_grace,
            max_checkpoint_bytes=max_checkpoint_bytes, queue_type=queue_type)
        running = Worker(transport, registry, WorkerSettings(
            concurrency=concurrency, pool_kind=pool_kind, pool_size=pool_size,
            shutdown_grace=shutdown_grace, runner=runner)).start()
    click.echo(f"worker ready: {', '.join(registry.names())}", err=True)
    while not stop.wait(1.0):  # a timed wait: signal handlers run promptly on every Python
        pass
    log.info("stopping: no new jobs; running ones are handed over or get %.0f s to finish",
             shutdown_grace)
    running.stop()
    log.info("stopped")
