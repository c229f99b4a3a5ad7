"""``brokerexec history``: the history indexer, as a long-running process.

It tails every journal stream of the broker into the history store (a SQLite file by default,
or PostgreSQL) until SIGTERM or Ctrl-C; ``docs/history.md`` tells what it keeps. Imported only
by that verb.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

import click

from ..logs import configure_logging
from .config import config_option, given_settings, setting_options
from .input import need_shared_broker
from .output import EPILOG, EXIT_FAILED, exit_on_errors, fail

__all__ = ["history"]


@click.command(epilog=EPILOG)
@config_option
@setting_options("broker", "history_store", "history_keep", "log_level", "log_format")
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
            indexer = Indexer(store, settings.broker, keep=settings.history.keep)
            threading.Thread(target=_announce, args=(indexer, stop), daemon=True).start()
            try:
                indexer.run(stop)
            except SQLAlchemyError as exc:  # at its start: the store cannot be reached or made
                fail(f"the history store {store.redacted_url} cannot be used: {exc}", EXIT_FAILED)
    logging.getLogger("brokerexec.cli").info("history indexer stopped")


def _announce(indexer: Any, stop: threading.Event) -> None:
    """Say once the journal is being read (what scripts and tests wait for)."""
    while not stop.is_set():
        if indexer.tail.connected.wait(0.5):
            click.echo(f"history indexer ready: {indexer.store.redacted_url}", err=True)
            return
