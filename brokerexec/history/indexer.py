"""The history indexer: tails every journal stream into the history store.

Each batch of entries (``transport/pika/journal_tail.py``) is decoded, folded into its jobs'
rows and committed with the offsets it reaches, in one transaction (``store.py``): a
SIGKILLed indexer starts again where the last commit left it, and what it reads twice
changes nothing. An entry that does not decode is skipped with one log line and counted;
ingestion goes on. Rows of jobs that ended longer ago than ``keep`` are pruned now and then,
independently of how long the journal keeps its entries.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import exc as sa_exc

from .. import codec
from ..constants import MAX_ENTRY_BYTES
from ..errors import DecodeError, HistoryUnavailable
from ..protocol.history import HistoryQuery
from ..protocol.journal import ENTRY_TYPES
from ..protocol.names import CHECKPOINT_TYPE, LAUNCH_TYPE, LAUNCHES_TYPE, RECORD_TYPE, STARTED_TYPE
from ..protocol.replies import Reply
from ..transport.pika.history_server import HistoryServer
from ..transport.pika.journal_tail import JournalTail, TailEntry, TryAgain
from . import queries
from .store import Entry, HistoryStore

__all__ = ["Indexer", "IndexerStats", "written_at"]

log = logging.getLogger(__name__)

#: Rows of jobs that ended longer ago than this are pruned (seconds): 90 days.
DEFAULT_KEEP = 90 * 86400.0
#: How often the store is pruned (seconds).
PRUNE_EVERY = 3600.0


@dataclass
class IndexerStats:
    """What an indexer has done so far (its metrics read them)."""

    entries: int = 0  # journal entries taken in
    rows: int = 0  # row changes committed
    skipped: int = 0  # entries that did not decode
    batches: int = 0
    pruned: int = 0
    store_errors: int = 0  # batches the store refused (read again later), queries it could not answer
    queries: int = 0  # history queries answered
    store_seconds: float = 0.0  # spent folding and committing batches
    last_batch: float = 0.0  # when the last batch was committed (epoch seconds)
    newest_entry: float = 0.0  # when the newest entry committed was written (epoch s, writer's clock)


class Indexer:
    """See the module docstring.

    Parameters:
        store: where the rows go (migrated to the newest schema when it starts).
        broker: the broker whose journal is read.
        keep: seconds a job's row is kept after it ended.
        batch: the most entries committed at once.
    """

    def __init__(self, store: HistoryStore, broker: str, *, keep: float = DEFAULT_KEEP,
                 batch: int = 1000) -> None:
        self.store = store
        self.keep = keep
        self.tail = JournalTail(broker, batch=batch)
        self.server = HistoryServer(broker, self.answer)
        self.stats = IndexerStats()
        self._pruned_at = 0.0

    def run(self, stop: threading.Event) -> None:
        """Index, and answer history queries, until ``stop`` is set (the broker going and
        coming back is ridden out)."""
        version = self.store.migrate()
        log.info("history store %s at schema %s; indexing the journal", self.store.redacted_url, version)
        self._prune()
        # Queries on a connection of their own: answered while a batch commits, and while
        # the store is down (saying so) as the tail backs off.
        served = threading.Event()
        server = threading.Thread(target=self.server.run, args=(served,), name="brokerexec-history-queries",
                                  daemon=True)
        server.start()
        try:
            self.tail.run(self._offsets, self._take, stop)
        finally:
            served.set()  # whatever ended the tail
            server.join(10)

    def _offsets(self) -> dict[str, int]:
        try:
            return self.store.offsets()
        except sa_exc.OperationalError as exc:
            raise TryAgain(f"the history store cannot be reached: {exc.orig}") from exc

    def _take(self, batch: list[TailEntry], reached: dict[str, int]) -> None:
        try:
            self._store(batch, reached)
        except sa_exc.OperationalError as exc:  # down, full, restarting: the batch is read again
            self.stats.store_errors += 1
            raise TryAgain(f"the history store refused a batch: {exc.orig}") from exc

    def _store(self, batch: list[TailEntry], reached: dict[str, int]) -> None:
        began = time.perf_counter()
        entries: list[Entry] = []
        for raw in batch:
            if raw.kind not in ENTRY_TYPES:
                continue  # probes and anything else in the stream
            try:
                body, _ = codec.decode_object(raw.body, raw.content_type, allow_yaml=False,
                                              max_bytes=MAX_ENTRY_BYTES)
            except DecodeError as exc:
                self.stats.skipped += 1
                log.warning("journal entry %s@%d skipped: %s", raw.stream, raw.offset, exc)
                continue
            entries.append(Entry(raw.stream, raw.offset, raw.kind, body, raw.message_id))
        self.stats.rows += self.store.ingest(entries, reached)
        self.stats.entries += len(entries)
        self.stats.batches += 1
        self.stats.last_batch = now = time.time()
        self.stats.store_seconds += time.perf_counter() - began
        written = max((written_at(entry.kind, entry.body) for entry in entries), default=0.0)
        self.stats.newest_entry = max(self.stats.newest_entry, min(written, now))  # a clock ahead: now
        if time.monotonic() - self._pruned_at > PRUNE_EVERY:
            self._prune()

    def answer(self, body: bytes, content_type: str | None) -> bytes:
        """The reply to one history query: a page, one job's row, or why not."""
        self.stats.queries += 1
        try:
            decoded, _ = codec.decode_object(body, content_type, allow_yaml=False)
            query = HistoryQuery.decode(decoded)
            page = queries.answer(self.store, query)
            reply = Reply.result(page.encode())
        except (DecodeError, TypeError) as exc:
            reply = Reply.failure(exc if isinstance(exc, DecodeError) else DecodeError(str(exc)))
        except sa_exc.SQLAlchemyError as exc:
            self.stats.store_errors += 1
            reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]  # not its SQL
            reply = Reply.failure(HistoryUnavailable(f"the history store cannot answer now: {reason}"))
        return codec.encode(reply.encode())

    def _prune(self) -> None:
        self._pruned_at = time.monotonic()
        pruned = self.store.prune(self.keep)
        self.stats.pruned += pruned
        if pruned:
            log.info("history: %d rows of jobs that ended over %.0f days ago pruned", pruned,
                     self.keep / 86400)


#: Where each kind of journal entry says when it was written (``protocol/journal.py``).
_WRITTEN = {LAUNCH_TYPE: "sent", LAUNCHES_TYPE: "sent", STARTED_TYPE: "time", CHECKPOINT_TYPE: "time",
            RECORD_TYPE: "end"}


def written_at(kind: str, body: dict[str, Any]) -> float:
    """When a journal entry was written, by its writer's clock (epoch seconds; 0: it does
    not say)."""
    value = body.get(_WRITTEN.get(kind, ""))
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0
