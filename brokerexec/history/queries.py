"""A history query answered from the store: the one answer, whoever asks (the indexer over the
broker, a memory broker in its own process), so every client gets the same page."""

from __future__ import annotations

from ..protocol.history import HistoryPage, HistoryQuery
from .store import HistoryStore

__all__ = ["answer"]


def answer(store: HistoryStore, query: HistoryQuery) -> HistoryPage:
    """The page that answers ``query``: its rows encoded as a reply carries them, the cursor
    of the next page and, when counted, the total (with ``by_state``, the operation's jobs by
    state); with ``job_id``, that job's row alone (and with ``record``, its whole final record
    under ``"record"``); with ``operations``, a page of operations' headers.

    Raises:
        DecodeError: a bad limit or cursor.
        sqlalchemy.exc.SQLAlchemyError: the store cannot answer.
    """
    if query.job_id is not None:
        row = store.get(query.job_id)
        rows = [] if row is None else [row.encode()]
        if rows and query.record:
            rows[0]["record"] = store.record(query.job_id)
        return HistoryPage(rows, None, len(rows))
    if query.operations:
        headers, cursor = store.operations(since=query.since, until=query.until, service=query.service,
                                           name=query.name, limit=query.limit, cursor=query.cursor)
        return HistoryPage([], cursor, None, operations=headers)
    found = store.page(**query.filters())
    states = store.operation_counts(query.operation) if query.by_state and query.operation else None
    return HistoryPage([row.encode() for row in found.rows], found.cursor, found.total, states)
