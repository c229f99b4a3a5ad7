"""Prometheus metrics of the history indexer (``brokerexec history --metrics-port N``).

:class:`HistoryMetrics` reads an :class:`~.indexer.Indexer` from outside it, at each scrape:
its counts so far (:class:`~.indexer.IndexerStats`), the offsets its tail stored, and two
things only the broker and the store know, each read off the scrape's thread at most every
few seconds (:class:`Reading`), so that a scrape never waits on a broker or a store that does
not answer: where each journal stream ends (its lag behind them, :func:`lag_of`) and how
many rows the store holds (and how many its text-search index has yet to take).
docs/monitoring.md names every metric.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .indexer import Indexer

__all__ = ["HistoryMetrics", "Reading", "lag_of", "lag_seconds"]

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Seconds a look at the streams' ends, or a count of the rows, is used again for.
READ_EVERY = 5.0
#: Seconds a scrape waits for one (a store or broker that does not answer: the last value).
READ_WAIT = 3.0
#: The counters: the field of ``IndexerStats``, the metric's name after the prefix, its help.
_COUNTERS = (
    ("entries", "entries", "Journal entries taken into the store."),
    ("skipped", "skipped", "Journal entries that did not decode, skipped (one log line each)."),
    ("rows", "row_writes", "Rows inserted or changed in the store."),
    ("batches", "batches", "Batches of entries committed."),
    ("store_seconds", "store_seconds", "Seconds spent folding and committing batches."),
    ("store_errors", "store_errors", "Batches the store refused (read again later) and queries "
                                     "it could not answer."),
    ("pruned", "pruned", "Rows of jobs ended longer ago than --keep, deleted."),
    ("indexed", "search_indexed", "Rows the text-search index took (again, for a row that changed)."),
    ("queries", "queries", "History queries answered over the broker."),
)
_PREFIX = "brokerexec_history_"


def lag_of(ends: Mapping[str, int], committed: Mapping[str, int]) -> dict[str, int]:
    """Entries of each stream not in the store yet: the stream's next offset (``ends``)
    less the store's (``committed``), never below 0; a stream the store has nothing of yet
    counts from its offset 0."""
    return {stream: max(end - committed.get(stream, 0), 0) for stream, end in ends.items()}


def lag_seconds(lag: Mapping[str, int], newest: float, now: float) -> float | None:
    """How far behind the journal the store is in time: 0 while it holds every entry,
    else the age of the newest entry it holds (``newest``, epoch seconds; None when it holds
    none yet: unknown)."""
    if not any(lag.values()):
        return 0.0
    return None if newest <= 0 else max(now - newest, 0.0)


class Reading(Generic[T]):
    """A value read on a thread of its own (named ``name``), at most every ``every``
    seconds: :meth:`get` waits at most ``wait`` seconds for a fresh one, else gives the
    last one read; None when the last read failed (or none finished yet). :meth:`refresh`
    starts a read without waiting (several readings then read at once)."""

    def __init__(self, read: Callable[[], T], name: str, *, every: float = READ_EVERY,
                 wait: float = READ_WAIT) -> None:
        self.read, self.name, self.every, self.wait = read, name, every, wait
        self._lock = threading.Lock()
        self._value: T | None = None
        self._done = threading.Event()
        self._done.set()
        self._at = -float("inf")  # when the last read started (monotonic)

    def refresh(self) -> None:
        """Start a read unless one runs, or the last started less than ``every`` seconds ago."""
        with self._lock:
            if self._done.is_set() and time.monotonic() - self._at >= self.every:
                self._at = time.monotonic()
                self._done.clear()
                threading.Thread(target=self._run, name=self.name, daemon=True).start()

    def get(self) -> T | None:
        """The value (see the class docstring)."""
        self.refresh()
        self._done.wait(self.wait)
        return self._value

    def _run(self) -> None:
        try:
            value: T | None = self.read()
        except Exception as exc:  # a broker or store that cannot answer now: no value
            log.debug("%s: %s", self.name, exc)
            value = None
        self._value = value
        self._done.set()


class HistoryMetrics:
    """The metrics of one indexer, in a registry of their own."""

    def __init__(self, indexer: Indexer) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_IndexerCollector(indexer))

    def serve(self, host: str, port: int) -> int:
        """Serve ``/metrics`` on ``host:port`` from a daemon thread; returns the port bound
        (``port`` 0 picks a free one)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_port)


class _IndexerCollector(Collector):
    """Every metric, made at each scrape from what the indexer holds then."""

    def __init__(self, indexer: Indexer) -> None:
        self.indexer = indexer
        self.ends = Reading(indexer.tail.ends, "brokerexec-history-ends")
        self.rows = Reading(indexer.store.counts, "brokerexec-history-rows")
        self.search_lag = Reading(indexer.store.search_lag, "brokerexec-history-search-lag")

    def collect(self) -> Iterator[Metric]:
        # The readings first, both at once: the counts below are then as new as they are.
        self.ends.refresh()
        self.rows.refresh()
        self.search_lag.refresh()
        ends, counts, search_lag = self.ends.get(), self.rows.get(), self.search_lag.get()
        stats, tail = dataclasses.replace(self.indexer.stats), self.indexer.tail
        for field, name, help_text in _COUNTERS:
            counter = CounterMetricFamily(_PREFIX + name, help_text)
            counter.add_metric([], float(getattr(stats, field)))
            yield counter
        reconnects = CounterMetricFamily(_PREFIX + "reconnects", "Times the journal was read "
                                         "again from the stored offsets (the broker or the store failed).")
        reconnects.add_metric([], float(tail.reconnects))
        yield reconnects
        yield _gauge("connected", "1 while the indexer reads the journal, else 0.",
                     float(tail.connected.is_set()))
        yield _gauge("last_batch_timestamp_seconds", "When the last batch was committed (epoch).",
                     stats.last_batch)
        yield _gauge("newest_entry_timestamp_seconds", "When the newest entry in the store was "
                     "written (epoch, by its writer's clock).", stats.newest_entry)
        if ends is not None:  # else the broker did not answer: unknown, not 0
            yield from _lag(ends, tail.committed(), stats.newest_entry)
        if counts is not None:  # else the store did not answer
            yield _rows(counts)
        if search_lag is not None:
            yield _gauge("search_lag_rows", "Rows changed that the text-search index has not taken "
                         "yet (a text question scans them meanwhile).", float(search_lag))


def _lag(ends: Mapping[str, int], committed: Mapping[str, int], newest: float) -> Iterator[Metric]:
    lag = lag_of({**committed, **ends}, committed)  # a stream the look missed: 0 behind
    entries = GaugeMetricFamily(_PREFIX + "lag_entries", "Entries of a journal stream not in the "
                                "store yet (its end looked at every few seconds).", labels=["stream"])
    for stream, behind in sorted(lag.items()):
        entries.add_metric([stream], float(behind))
    yield entries
    seconds = lag_seconds(lag, newest, time.time())
    if seconds is not None:
        yield _gauge("lag_seconds", "0 while the store holds every journal entry, else the seconds "
                     "since the newest entry it holds was written.", seconds)


def _rows(counts: Mapping[tuple[str, str], int]) -> Metric:
    rows = GaugeMetricFamily(_PREFIX + "rows", "Rows in the store, by service and state (counted "
                             "every few seconds).", labels=["service", "state"])
    for (service, state), count in sorted(counts.items()):
        rows.add_metric([service, state], float(count))
    return rows


def _gauge(name: str, help_text: str, value: float) -> GaugeMetricFamily:
    gauge = GaugeMetricFamily(_PREFIX + name, help_text)
    gauge.add_metric([], value)
    return gauge
