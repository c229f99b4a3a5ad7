"""The history store's tables, as SQLAlchemy Core objects: one schema for SQLite and
PostgreSQL, made and changed only by the versioned migrations (``migrations/``)."""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Float, Index, Integer, MetaData, String, Table, Text

__all__ = ["counts", "jobs", "metadata", "offsets", "operations", "records", "search_mark"]

metadata = MetaData()

#: One row per job (:class:`~.rows.JobRow`).
jobs = Table(
    "jobs", metadata,
    Column("job_id", String(64), primary_key=True),
    Column("service", String(255), nullable=False),
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("workers", Text, nullable=False, default="[]"),  # JSON list of hosts
    Column("launched", Float),
    Column("started", Float),
    Column("ended", Float),
    Column("at", Float, nullable=False),  # ended, else started, else launched: pages sort by it
    Column("request", Text),
    Column("request_bytes", Integer, nullable=False, default=0),
    Column("result", Text),
    Column("result_bytes", Integer, nullable=False, default=0),
    Column("error_type", String(255)),
    Column("error", Text),
    Column("reason", Text),
    Column("last_checkpoint", Float),
    Column("labels", Text, nullable=False, default="{}"),  # JSON object
    Column("operation", String(64)),
    Column("progress", Text),  # JSON object
    Column("improved", Text),  # JSON object
    # The ingest transaction that changed it last: each takes a number above all before
    # (migration 0004), so the text-search index follows the rows that changed.
    Column("changed", BigInteger, nullable=False, server_default="0"),
    # The item of its operation the job runs (migration 0005): an operation's items, and its
    # jobs by state, are a range of one index.
    Column("item_key", String(200)),
    Index("jobs_at", "at", "job_id"),
    Index("jobs_service_at", "service", "at"),
    Index("jobs_state_at", "state", "at"),
    Index("jobs_operation_key", "operation", "item_key"),
    Index("jobs_operation_state", "operation", "state"),
    Index("jobs_changed", "changed"),
)

#: One row per operation (``brokerexec/operations/``): its header entry from the journal
#: (migration 0007), whole as ``header`` (JSON), and what operations are listed and found by.
operations = Table(
    "operations", metadata,
    Column("operation", String(64), primary_key=True),
    Column("service", String(255), nullable=False),
    Column("name", Text, nullable=False),
    Column("created", Float, nullable=False),
    Column("header", Text, nullable=False),
    Index("operations_created", "created", "operation"),
    Index("operations_service_name", "service", "name", "created"),
)

#: Each ended job's whole final record (what ``result`` returns), apart from ``jobs``: pages
#: scan rows, and a record can be as large as a journal entry.
records = Table(
    "records", metadata,
    Column("job_id", String(64), primary_key=True),
    Column("attempt", Integer, nullable=False),
    Column("body", Text, nullable=False),  # JSON object
)

#: How many rows ``jobs`` holds by service and state, moved in the transaction that moves
#: the rows: counts without counting.
counts = Table(
    "counts", metadata,
    Column("service", String(255), primary_key=True),
    Column("state", String(16), primary_key=True),
    Column("n", BigInteger, nullable=False),
)

#: Where the store has read each journal stream up to: the next offset to read. Committed
#: with the rows the entries before it made.
offsets = Table(
    "offsets", metadata,
    Column("stream", String(255), primary_key=True),
    Column("next", BigInteger, nullable=False),
)

#: How far the text-search index has taken the rows (``search.py``): the ``(changed, job_id)``
#: of the last row it indexed, in the order it takes them; one row, moved in the transaction
#: that indexes them. The index itself is of each back end's own kind (migration 0004).
search_mark = Table(
    "search_mark", metadata,
    Column("changed", BigInteger, nullable=False),
    Column("job_id", String(64), nullable=False),
)
