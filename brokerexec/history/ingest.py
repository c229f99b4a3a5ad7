"""Taking a batch of journal entries into the history store: decode, fold, commit, count.

The store half of the indexer (``indexer.py``), apart from the tail that reads the journal,
so that it can run in the indexer's process or in a process of its own
(``store_process.py``) with the same code. Each batch is decoded, folded into its jobs' rows
and committed with the offsets it reaches, in one transaction (``store.py``). An entry that
does not decode is skipped with one log line and counted; ingestion goes on. Rows of jobs
that ended longer ago than ``keep`` are pruned now and then, independently of how long the
journal keeps its entries.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

from sqlalchemy import exc as sa_exc

from .. import codec
from ..constants import MAX_ENTRY_BYTES
from ..errors import DecodeError
from ..protocol.journal import ENTRY_TYPES
from ..protocol.names import (
    CHECKPOINT_TYPE,
    LAUNCH_TYPE,
    LAUNCHES_TYPE,
    OPERATION_TYPE,
    RECORD_TYPE,
    STARTED_TYPE,
)
from ..transport.pika.journal_tail import TailEntry
from .store import Entry, HistoryStore

__all__ = ["DEFAULT_KEEP", "PRUNE_EVERY", "IndexerStats", "Ingest", "written_at"]

log = logging.getLogger(__name__)

#: The journal entries the store takes: its jobs', and operations' headers.
TAKEN = ENTRY_TYPES | {OPERATION_TYPE}
#: Rows of jobs that ended longer ago than this are pruned (seconds): 90 days.
DEFAULT_KEEP = 90 * 86400.0
#: How often the store is pruned (seconds).
PRUNE_EVERY = 3600.0
#: Rows the text-search index takes at a time (``search.py``): it holds SQLite's write lock
#: meanwhile, about 90 µs a row, so the next batch waits no longer than that.
SEARCH_CHUNK = 250
#: While batches come back to back (a backlog), the search index still takes a chunk this
#: often (seconds); otherwise it follows between them, when the journal is read up to its end.
SEARCH_EVERY = 2.0


@dataclass
class IndexerStats:
    """What an indexer has done so far (its metrics read them)."""

    entries: int = 0  # journal entries taken in
    rows: int = 0  # row changes committed
    skipped: int = 0  # entries that did not decode
    batches: int = 0
    pruned: int = 0
    indexed: int = 0  # rows the text-search index took
    store_errors: int = 0  # batches the store refused (read again later), queries it could not answer
    queries: int = 0  # history queries answered
    store_seconds: float = 0.0  # spent folding and committing batches
    last_batch: float = 0.0  # when the last batch was committed (epoch seconds)
    newest_entry: float = 0.0  # when the newest entry committed was written (epoch s, writer's clock)

    def add(self, other: IndexerStats) -> None:
        """Take in what ``other`` counted since (times: the later one)."""
        for name in _COUNTED:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.last_batch = max(self.last_batch, other.last_batch)
        self.newest_entry = max(self.newest_entry, other.newest_entry)

    def encode(self) -> dict[str, Any]:
        return {item.name: getattr(self, item.name) for item in fields(self)}

    @classmethod
    def decode(cls, body: dict[str, Any]) -> IndexerStats:
        names = {item.name for item in fields(cls)}
        return cls(**{name: value for name, value in body.items() if name in names})


_COUNTED = tuple(item.name for item in fields(IndexerStats)
                 if item.name not in ("last_batch", "newest_entry"))


class Ingest:
    """See the module docstring. ``stats`` counts what it did."""

    def __init__(self, store: HistoryStore, keep: float = DEFAULT_KEEP, batch: int = 1000, *,
                 search_when_idle: bool = False) -> None:
        self.store, self.keep, self.batch = store, keep, batch
        #: Its caller lets the search index take rows whenever no batch waits (the store
        #: process does): after a batch only when a backlog has kept it from its turn.
        self.search_when_idle = search_when_idle
        self.stats = IndexerStats()
        self._pruned_at = 0.0
        self._searched_at = time.monotonic()

    def take(self, batch: Sequence[TailEntry], reached: dict[str, int]) -> None:
        """Store one batch and the offsets it reaches; prune when it is time.

        Raises:
            sqlalchemy.exc.OperationalError: the store refused it (nothing of it is stored).
        """
        began = time.perf_counter()
        entries: list[Entry] = []
        for raw in batch:
            if raw.kind not in TAKEN:
                continue  # probes and anything else in the stream
            try:
                body, codec_name = codec.decode_object(raw.body, raw.content_type, allow_yaml=False,
                                                       max_bytes=MAX_ENTRY_BYTES)
            except DecodeError as exc:
                self.stats.skipped += 1
                log.warning("journal entry %s@%d skipped: %s", raw.stream, raw.offset, exc)
                continue
            # A record is kept whole, as it came: its JSON text, when it was JSON.
            text = raw.body.decode() if raw.kind == RECORD_TYPE and codec_name == "json" else None
            entries.append(Entry(raw.stream, raw.offset, raw.kind, body, raw.message_id, text))
        self.stats.rows += self.store.ingest(entries, reached)
        self.stats.entries += len(entries)
        self.stats.batches += 1
        self.stats.last_batch = now = time.time()
        self.stats.store_seconds += time.perf_counter() - began
        written = max((written_at(entry.kind, entry.body) for entry in entries), default=0.0)
        self.stats.newest_entry = max(self.stats.newest_entry, min(written, now))  # a clock ahead: now
        if time.monotonic() - self._pruned_at > PRUNE_EVERY:
            self.prune()
        caught_up = len(batch) < self.batch and not self.search_when_idle  # a batch not full
        if caught_up or time.monotonic() - self._searched_at > SEARCH_EVERY:
            try:  # the journal read to its end, or a backlog's turn
                self.search()
            except sa_exc.OperationalError as exc:  # the batch is in: the index follows later
                log.warning("the text-search index cannot take rows now: %s", exc.orig)

    def search(self, limit: int = SEARCH_CHUNK) -> int:
        """Let the text-search index take up to ``limit`` rows that changed; how many."""
        self._searched_at = time.monotonic()
        taken = self.store.index_search(limit)
        self.stats.indexed += taken
        return taken

    def prune(self) -> None:
        self._pruned_at = time.monotonic()
        pruned = self.store.prune(self.keep)
        self.stats.pruned += pruned
        if pruned:
            log.info("history: %d rows of jobs that ended over %.0f days ago pruned", pruned,
                     self.keep / 86400)


#: Where each kind of journal entry says when it was written (``protocol/journal.py``).
_WRITTEN = {LAUNCH_TYPE: "sent", LAUNCHES_TYPE: "sent", STARTED_TYPE: "time", CHECKPOINT_TYPE: "time",
            RECORD_TYPE: "end", OPERATION_TYPE: "created"}


def written_at(kind: str, body: dict[str, Any]) -> float:
    """When a journal entry was written, by its writer's clock (epoch seconds; 0: it does
    not say)."""
    value = body.get(_WRITTEN.get(kind, ""))
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0
