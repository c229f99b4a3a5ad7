"""The body of ``brokerexec worker``: one worker process, from its start to a graceful stop.

Logging (:mod:`brokerexec.logs`: the thread name and job id on every line, or JSON), the
metrics endpoint (:mod:`brokerexec.worker.metrics`) when asked for, the signal handlers
(the first SIGTERM or Ctrl-C stops gracefully, a second exits at once), the broker URL's
worker transport (:mod:`brokerexec.transport.schemes`) and the :class:`~brokerexec.Worker`
on it, each made from its section of the settings. Imported only by that verb.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

from ..core.registry import ServiceRegistry
from ..logs import configure_logging
from ..settings import Settings
from ..transport.base import WorkerTransport
from ..transport.schemes import scheme_of
from ..worker.worker import Worker, host_info
from .input import need_shared_broker
from .output import EXIT_ABORTED, EXIT_USAGE, announce, exit_on_errors, fail

__all__ = ["serve"]


def serve(settings: Settings) -> None:
    """Run a worker until SIGTERM or Ctrl-C, then stop it gracefully (see ``worker --help``)."""
    broker = settings.broker
    need_shared_broker(broker)
    with exit_on_errors():
        registry = ServiceRegistry.from_specs(settings.services)
    if not len(registry):
        fail("no services to run: give --service MODULE:Class (or file.py:Class), or install "
              "a package with a 'brokerexec.services' entry point", EXIT_USAGE)
    configure_logging(settings.logging.level, settings.logging.format)
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
        transport: WorkerTransport = scheme_of(broker).worker(broker, settings, host_info())
        if settings.metrics.port is not None:
            transport = _serve_metrics(settings, transport)
        running = Worker(transport, registry, settings.worker).start()
    announce(settings.logging.format, f"worker ready: {', '.join(registry.names())}")
    while not stop.wait(1.0):  # a timed wait: signal handlers run promptly on every Python
        pass
    log.info("stopping: no new jobs; running ones are handed over or get %.0f s to finish",
             settings.worker.shutdown_grace)
    running.stop()
    log.info("stopped")


def _serve_metrics(settings: Settings, transport: WorkerTransport) -> WorkerTransport:
    from ..worker.metrics import WorkerMetrics

    host = settings.metrics.host
    metrics = WorkerMetrics(settings.broker)
    try:
        port = metrics.serve(host, settings.metrics.port or 0)
    except OSError as exc:
        fail(f"cannot serve metrics on {host}:{settings.metrics.port}: "
             f"{exc.strerror or exc}", EXIT_USAGE)
    # Parsed by tests and scripts that ask for port 0; stderr, as the ready line.
    announce(settings.logging.format, f"metrics at http://{host}:{port}/metrics")
    return metrics.watch(transport)
