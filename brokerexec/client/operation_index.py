"""Finding operations by when they were made, their service and their name: from the history
store when an indexer runs, the newest from the journal.

The store keeps every operation's header (``history/store.py``) for as long as it keeps jobs,
and finds them with one index, whatever the fleet wrote meanwhile; but it follows the
journal, a little behind it. So what was made in the last :data:`STORE_LAG` seconds is read
from the journal (a scan of that much of every stream), and the rest asked of the store;
with no indexer (or only older ones), the journal alone answers, from ``since`` on.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ..errors import DecodeError, HistoryUnavailable, Timeout
from ..protocol.history import MAX_LIMIT, HistoryQuery
from ..protocol.operation_log import OperationHeader, time_of_id

if TYPE_CHECKING:
    from ..transport.base import ClientTransport

__all__ = ["STORE_LAG", "find_headers", "stored_header"]

#: Seconds of the newest operations read from the journal rather than the store (which
#: follows the journal: under a second behind when it keeps up).
STORE_LAG = 60.0


def find_headers(transport: ClientTransport, since: float, limit: int, timeout: float, *,
                 service: str | None = None, name: str | None = None) -> list[OperationHeader]:
    """The headers of the operations made since ``since`` (epoch seconds), of ``service``
    and named ``name`` if given, newest first, at most ``limit``."""
    recent = max(since, time.time() - STORE_LAG)
    try:
        stored = _stored(transport, since, recent, limit, timeout, service, name)
    except (HistoryUnavailable, DecodeError, Timeout):  # no indexer, or one older than this query
        stored, recent = [], since
    found = {header.id: header for header in stored}
    for header in transport.find_operations(recent, MAX_LIMIT * 1000, timeout):
        if (service is None or header.service == service) and (name is None or header.name == name):
            found.setdefault(header.id, header)
    return sorted(found.values(), key=lambda header: (header.created, header.id), reverse=True)[:limit]


def stored_header(transport: ClientTransport, operation_id: str, timeout: float) -> OperationHeader | None:
    """The header of operation ``operation_id`` from the history store, at once whatever the
    journal holds; None when no indexer answers (or an older one), or the store does not
    have it (yet: it follows the journal)."""
    made = time_of_id(operation_id)
    if made is None:
        return None
    try:  # its id says when it was made; its header's time is its client's, a moment later
        headers = _stored(transport, made - 60, made + 60, 10 * MAX_LIMIT, timeout, None, None)
    except (HistoryUnavailable, DecodeError, Timeout):
        return None
    return next((header for header in headers if header.id == operation_id), None)


def _stored(transport: ClientTransport, since: float, until: float, limit: int, timeout: float,
            service: str | None, name: str | None) -> list[OperationHeader]:
    headers: list[OperationHeader] = []
    cursor = None
    while len(headers) < limit:
        page = transport.history(HistoryQuery(since=since, until=until, service=service, name=name,
                                              limit=min(limit - len(headers), MAX_LIMIT), cursor=cursor,
                                              operations=True), timeout)
        if page.operations is None:
            raise HistoryUnavailable("the history indexer does not list operations (an older one)")
        for body in page.operations:
            try:
                headers.append(OperationHeader.decode(body))
            except DecodeError:
                continue
        cursor = page.cursor
        if cursor is None:
            break
    return headers
