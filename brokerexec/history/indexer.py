"""The history indexer: tails every journal stream into the history store, and answers
history queries on the broker.

Each batch of entries (``transport/pika/journal_tail.py``) is decoded, folded into its jobs'
rows and committed with the offsets it reaches, in one transaction (``ingest.py``,
``store.py``): a SIGKILLed indexer starts again where the last commit left it, and what it
reads twice changes nothing. With ``store_process`` (as ``brokerexec history`` runs it) that
half runs in a process of its own (``store_process.py``), so that reading the journal and
storing it each have a core. History queries are answered on a connection of their own
(``transport/pika/history_server.py``), from the store as it is.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import threading

from sqlalchemy import exc as sa_exc

from .. import codec
from ..errors import DecodeError, HistoryUnavailable
from ..protocol.history import HistoryQuery
from ..protocol.replies import Reply
from ..transport.pika.history_server import HistoryServer
from ..transport.pika.journal_tail import JournalTail, TailEntry, TryAgain
from . import queries
from .ingest import DEFAULT_KEEP, PRUNE_EVERY, IndexerStats, Ingest, written_at
from .store import HistoryStore
from .store_process import StoreProcess

__all__ = ["DEFAULT_KEEP", "PRUNE_EVERY", "Indexer", "IndexerStats", "written_at"]

log = logging.getLogger(__name__)


class Indexer:
    """See the module docstring.

    Parameters:
        store: where the rows go (migrated to the newest schema when it starts).
        broker: the broker whose journal is read.
        keep: seconds a job's row is kept after it ended.
        batch: the most entries committed at once.
        store_process: store the batches in a process of its own (else in this one, in turn
            with reading them).
    """

    def __init__(self, store: HistoryStore, broker: str, *, keep: float = DEFAULT_KEEP,
                 batch: int = 1000, store_process: bool = False) -> None:
        self.store = store
        self.keep = keep
        self.ingest = Ingest(store, keep, batch)
        self.stats = self.ingest.stats  # what this process did; the store process's is added in
        self.tail = JournalTail(broker, batch=batch)
        self.server = HistoryServer(broker, self.answer)
        self.process = StoreProcess(store.url, keep, batch, self.stats) if store_process else None

    def run(self, stop: threading.Event) -> None:
        """Index, and answer history queries, until ``stop`` is set (the broker going and
        coming back is ridden out)."""
        version = self.store.migrate()
        log.info("history store %s at schema %s; indexing the journal", self.store.redacted_url, version)
        if self.process is not None:
            self.process.start()  # it prunes at its first batch
        else:
            self.ingest.prune()
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
            if self.process is not None:
                self.process.close()
            server.join(10)

    def _offsets(self) -> dict[str, int]:
        try:
            if self.process is not None:
                self.process.reset()  # nothing of the last connection is still being stored
            return self.store.offsets()
        except sa_exc.OperationalError as exc:
            raise TryAgain(f"the history store cannot be reached: {exc.orig}") from exc

    def _take(self, batch: list[TailEntry], reached: dict[str, int]) -> cf.Future[None] | None:
        if self.process is not None:
            return self.process.submit(batch, reached)
        try:
            self.ingest.take(batch, reached)
        except sa_exc.OperationalError as exc:  # down, full, restarting: the batch is read again
            self.stats.store_errors += 1
            raise TryAgain(f"the history store refused a batch: {exc.orig}") from exc
        return None

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
