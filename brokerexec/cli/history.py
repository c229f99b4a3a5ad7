"""``brokerexec history``: the history indexer, as a long-running process.

It tails every journal stream of the broker into the history store (a SQLite file by default,
or PostgreSQL) until SIGTERM or Ctrl-C, with its Prometheus metrics
(:mod:`brokerexec.history.metrics`) when asked for; ``docs/history.md`` tells what it keeps.
Imported only by that verb.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import TYPE_CHECKING, Any

import click

from ..logs import configure_logging
from ..settings import Settings
from .config import config_option, given_settings, setting_options
from .input import need_shared_broker
from .output import EPILOG, EXIT_FAILED, EXIT_USAGE, announce, exit_on_errors, fail

if TYPE_CHECKING:
    from ..history.indexer import Indexer

__all__ = ["history"]


@click.command(epilog=EPILOG)
@config_option
@setting_options("broker", "history_store", "history_keep", "metrics_port", "metrics_host", "log_level",
                 "log_format")
def history(**options: Any) -> None:
    """Keep every job in the history store, fed by the broker's journal, until SIGTERM.

    Reads each journal stream from where the store says it stopped, so a restart (or a
    SIGKILL) loses and doubles nothing; an empty store is built from the journal's whole
    retention. Rows of jobs that ended longer ago than --keep are pruned.
    """
    from ..history.indexer import Indexer
    from ..history.store import HistoryStore

    settings = given_settings(options)
    need_shared_broker(settings.broker)
    configure_logging(settings.logging.level, settings.logging.format)
    stop = threading.Event()

    def on_signal(_signum: int, _frame: Any) -> None:
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    from sqlalchemy.exc import SQLAlchemyError

    with exit_on_errors():
        store = HistoryStore(settings.history.store)
        with store:
            indexer = Indexer(store, settings.broker, keep=settings.history.keep, store_process=True)
            if settings.metrics.port is not None:
                _serve_metrics(settings, indexer)
            threading.Thread(target=_ready, args=(settings, indexer, stop), daemon=True).start()
            try:
                indexer.run(stop)
            except SQLAlchemyError as exc:  # at its start: the store cannot be reached or made
                fail(f"the history store {store.redacted_url} cannot be used: {exc}", EXIT_FAILED)
    logging.getLogger("brokerexec.cli").info("history indexer stopped")


def _serve_metrics(settings: Settings, indexer: Indexer) -> None:
    from ..history.metrics import HistoryMetrics

    host = settings.metrics.host
    try:
        port = HistoryMetrics(indexer).serve(host, settings.metrics.port or 0)
    except OSError as exc:
        fail(f"cannot serve metrics on {host}:{settings.metrics.port}: {exc.strerror or exc}", EXIT_USAGE)
    announce(settings.logging.format, f"metrics at http://{host}:{port}/metrics")  # before the ready line


def _ready(settings: Settings, indexer: Indexer, stop: threading.Event) -> None:
    """Say once the journal is being read (what scripts and tests wait for)."""
    while not stop.is_set():
        if indexer.tail.connected.wait(0.5) and indexer.server.serving.wait(0.5):
            announce(settings.logging.format, f"history indexer ready: {indexer.store.redacted_url}")
            return
