"""The history store: a materialized view of the journal in a real database.

SQLite by default (one file, WAL: no server to run) or PostgreSQL (``postgresql://...``: a
store shared by several readers and indexers), through SQLAlchemy Core, one schema for
both (``schema.py``), made and changed by versioned Alembic migrations (``migrations/``).

:meth:`HistoryStore.ingest` takes a batch of journal entries and the offsets they reach,
and commits the rows they make and those offsets in one transaction: an indexer killed
mid-batch starts again from the offsets of the last batch that committed, and the fold
(``rows.py``) makes entries applied twice change nothing, so no row is lost or doubled.
Every query is parameterized; filters are values, never SQL.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from ..errors import ConfigurationError, DecodeError
from ..protocol.history import decode_cursor, encode_cursor
from ..protocol.journal import attempt_of, launches_in
from ..protocol.names import LAUNCH_TYPE, LAUNCHES_TYPE, OPERATION_TYPE, RECORD_TYPE
from ..protocol.operation_log import OperationHeader
from . import schema, search
from .rows import ENDED, JobRow, fold

__all__ = ["Entry", "HistoryStore", "Page", "store_url"]

log = logging.getLogger(__name__)

#: What an improved value's field may be called in a question of the store (``best``).
_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")

#: The most rows one page holds.
MAX_PAGE = 1000
#: psycopg's ``prepare_threshold`` that prepares a statement only when its caller asks
#: (``executemany`` does): the number of runs after which it would prepare any other.
_ONLY_WHEN_ASKED = 2**31 - 1


@dataclass(frozen=True)
class Entry:
    """One journal entry as the store takes it in: where it is, what it is."""

    stream: str
    offset: int
    kind: str
    body: dict[str, Any]
    job_id: str | None = None  # the message's id (a ``launches`` entry names many in its body)
    text: str | None = None  # the body's JSON as it came, if it did: a record is kept as it is


@dataclass(frozen=True)
class Page:
    """One page of rows, newest first, and the cursor of the next (None: no more)."""

    rows: list[JobRow]
    cursor: str | None
    total: int | None = None  # how many match, when asked


def store_url(url: str) -> str:
    """The SQLAlchemy URL of a store: ``postgresql://`` goes through psycopg 3; a plain path
    (or ``sqlite:///path``) is a SQLite file.

    Raises:
        ConfigurationError: any other scheme.
    """
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    if url.startswith("postgresql+psycopg://") or url.startswith("sqlite://"):
        return url
    if "://" in url:
        raise ConfigurationError(f"unsupported history store {url!r}: use a file path, sqlite:///PATH "
                                 "or postgresql://USER@HOST/DB")
    return f"sqlite:///{Path(url).expanduser().resolve()}"


class HistoryStore:
    """See the module docstring. ``url``: see :func:`store_url`."""

    def __init__(self, url: str) -> None:
        self.url = store_url(url)
        parsed = sa.engine.make_url(self.url)
        if parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:"):
            # An in-memory database is one connection (a second would be another, empty,
            # database): shared by every thread, one at a time.
            self.engine: Engine = sa.create_engine(
                self.url, poolclass=sa.pool.QueuePool, pool_size=1, max_overflow=0,
                connect_args={"check_same_thread": False})
        elif parsed.get_backend_name() == "postgresql":
            # Prepared statements only where asked for: psycopg's executemany asks (the
            # ingest's upserts, whose plan is the same whatever the table holds; parsed and
            # planned at every row, they were 60% of the server's time: 8,773 entries a second
            # at a million jobs, 12,726 prepared; psycopg forgets them at a rollback, and the
            # next batch prepares again). Other queries are never prepared: by default
            # psycopg prepares a query run five times, and PostgreSQL may keep the generic plan
            # it made while the table was small (a sequential scan for the ingest's look-up of
            # 500 ids) until an ANALYZE, which never comes without autovacuum: the ingest then
            # slowed with every row (docs/performance.md).
            self.engine = sa.create_engine(self.url, pool_pre_ping=True,
                                           connect_args={"prepare_threshold": _ONLY_WHEN_ASKED})
        else:
            self.engine = sa.create_engine(self.url, pool_pre_ping=True)
        self.sqlite = self.engine.dialect.name == "sqlite"
        if self.sqlite:
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)

    @property
    def redacted_url(self) -> str:
        """The store's URL without its password, for logs."""
        return self.engine.url.render_as_string(hide_password=True)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> HistoryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the schema ------------------------------------------------------------------------

    def migrate(self) -> str:
        """Bring the schema to the newest version (from none, or any older one); its version."""
        from alembic import command
        from alembic.config import Config
        from alembic.runtime.migration import MigrationContext

        config = Config()
        config.set_main_option("script_location", "brokerexec.history:migrations")
        with self.engine.begin() as connection:
            if not self.sqlite:  # several indexers starting at once: one migrates
                connection.execute(sa.text("SELECT pg_advisory_xact_lock(7268190521)"))
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
            version = MigrationContext.configure(connection).get_current_revision()
        return str(version)

    # ---- ingest ----------------------------------------------------------------------------

    def offsets(self) -> dict[str, int]:
        """The next offset to read of each stream read so far."""
        with self.engine.connect() as connection:
            return {row.stream: int(row.next) for row in connection.execute(sa.select(schema.offsets))}

    def ingest(self, entries: Sequence[Entry], reached: Mapping[str, int]) -> int:
        """Fold ``entries`` into their jobs' rows and move each stream's offset to
        ``reached`` (the next to read), in one transaction; the number of rows changed."""
        with self.engine.begin() as connection:
            self._one_writer(connection)
            changed, records, moved = self._fold(connection, entries)
            self._write(connection, changed.values(), self._next_change(connection))
            self._keep_records(connection, records)
            self._count(connection, moved)
            self._keep_operations(connection, [e.body for e in entries if e.kind == OPERATION_TYPE])
            self._move(connection, reached)
        return len(changed)

    def _keep_operations(self, connection: Connection, headers: Sequence[dict[str, Any]]) -> None:
        """Each operation's header (a newer one of an operation replaces it)."""
        values = []
        for body in headers:
            try:
                header = OperationHeader.decode(body)
            except DecodeError as exc:
                log.warning("an operation's header skipped: %s", exc)
                continue
            values.append({"operation": header.id, "service": header.service, "name": header.name,
                           "created": header.created, "header": json.dumps(header.encode())})
        if values:
            insert = self._insert(schema.operations)
            connection.execute(insert.on_conflict_do_update(
                index_elements=[schema.operations.c.operation],
                set_={name: insert.excluded[name] for name in ("service", "name", "created", "header")}),
                values)

    def _one_writer(self, connection: Connection) -> None:
        """Several indexers on one PostgreSQL store write one transaction at a time: a fold
        reads the rows it changes, and the counts move by each (SQLite has one writer)."""
        if not self.sqlite:
            connection.execute(sa.text("SELECT pg_advisory_xact_lock(7268190522)"))

    def _fold(self, connection: Connection, entries: Sequence[Entry]
              ) -> tuple[dict[str, JobRow], dict[str, tuple[dict[str, Any], str | None]],
                         Counter[tuple[str, str]]]:
        """The rows the entries change, the records that ended them (the one that counts:
        the first of the newest attempt, as the fold decides), and how the counts by
        service and state move."""
        per_job: list[tuple[str, str, dict[str, Any], str | None]] = []
        for entry in entries:
            if entry.kind == LAUNCHES_TYPE:  # a sweep's launches: one entry, many jobs
                per_job.extend((job_id, LAUNCH_TYPE, launch, None)
                               for job_id, launch in launches_in(entry.body))
            elif entry.job_id:
                per_job.append((entry.job_id, entry.kind, entry.body, entry.text))
        known = self._rows(connection, {job_id for job_id, _, _, _ in per_job})
        stored = dict(known)
        changed: dict[str, JobRow] = {}
        records: dict[str, tuple[dict[str, Any], str | None]] = {}
        for job_id, kind, body, text in per_job:
            before = known.get(job_id)
            after = fold(before, job_id, kind, body)
            if after is not None and after != before:
                known[job_id] = changed[job_id] = after
                ended_now = after.state in ENDED and (before is None or before.state not in ENDED)
                if kind == RECORD_TYPE and ended_now:
                    records[job_id] = (body, text)
        moved: Counter[tuple[str, str]] = Counter()
        for job_id, row in changed.items():
            moved[(row.service, row.state)] += 1
            if (before := stored.get(job_id)) is not None:
                moved[(before.service, before.state)] -= 1
        return changed, records, moved

    def _count(self, connection: Connection, moved: Mapping[tuple[str, str], int]) -> None:
        values = [{"service": service, "state": state, "n": n}
                  for (service, state), n in sorted(moved.items()) if n]
        if not values:
            return
        insert = self._insert(schema.counts)
        connection.execute(insert.on_conflict_do_update(
            index_elements=[schema.counts.c.service, schema.counts.c.state],
            set_={"n": schema.counts.c.n + insert.excluded.n}), values)

    def _keep_records(self, connection: Connection, records: Mapping[str, tuple[dict[str, Any], str | None]]
                      ) -> None:
        if records:  # the driver's executemany, as _write
            connection.exec_driver_sql(_KEEP_RECORD_SQLITE if self.sqlite else _KEEP_RECORD_POSTGRESQL, [
                # The entry's JSON as it came (it is what was decoded), else made again.
                (job_id, attempt_of(body),
                 text if text is not None else json.dumps(body, separators=(",", ":")))
                for job_id, (body, text) in records.items()])

    def _rows(self, connection: Connection, job_ids: Iterable[str]) -> dict[str, JobRow]:
        found: dict[str, JobRow] = {}
        ids = list(job_ids)
        mark = "?" if self.sqlite else "%s"
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            # The driver's own cursor: SQLAlchemy's result processing of each row was a
            # tenth of the ingest's time, and these columns need none.
            query = f"SELECT {_SELECTED} FROM jobs WHERE job_id IN ({', '.join([mark] * len(chunk))})"
            for values in connection.exec_driver_sql(query, tuple(chunk)):
                found[values[0]] = _row_of(values)
        return found

    def _next_change(self, connection: Connection) -> int:
        """The number this transaction marks the rows it changes with: above every number
        before it (the writers take turns: :meth:`_one_writer`), so the search index takes
        the rows that changed since it last looked (``changed`` is indexed)."""
        newest = connection.exec_driver_sql("SELECT max(changed) FROM jobs").scalar()
        return int(newest or 0) + 1

    def _write(self, connection: Connection, rows: Iterable[JobRow], change: int) -> None:
        values = [_values(row, change) for row in rows]
        if values:
            # One statement, compiled once, given to the driver's executemany: SQLAlchemy's
            # processing of each row's parameters was a fifth of the ingest's time.
            connection.exec_driver_sql(_UPSERT_SQLITE if self.sqlite else _UPSERT_POSTGRESQL, values)

    def _move(self, connection: Connection, reached: Mapping[str, int]) -> None:
        if not reached:
            return
        insert = self._insert(schema.offsets)
        greatest = sa.func.max if self.sqlite else sa.func.greatest  # never back
        statement = insert.on_conflict_do_update(
            index_elements=[schema.offsets.c.stream],
            set_={"next": greatest(schema.offsets.c.next, insert.excluded.next)})
        connection.execute(statement, [{"stream": s, "next": n} for s, n in sorted(reached.items())])

    def _insert(self, table: sa.Table) -> Any:
        if self.sqlite:
            from sqlalchemy.dialects.sqlite import insert
        else:
            from sqlalchemy.dialects.postgresql import insert  # type: ignore[assignment]
        return insert(table)

    # ---- queries ---------------------------------------------------------------------------

    def get(self, job_id: str) -> JobRow | None:
        """The row of one job, or None."""
        with self.engine.connect() as connection:
            found = connection.execute(sa.select(schema.jobs).where(schema.jobs.c.job_id == job_id)).first()
        return _row(found._mapping) if found is not None else None

    def record(self, job_id: str) -> dict[str, Any] | None:
        """The whole final record of an ended job (what ``result`` returns), or None."""
        with self.engine.connect() as connection:
            body = connection.execute(sa.select(schema.records.c.body)
                                      .where(schema.records.c.job_id == job_id)).scalar_one_or_none()
        return json.loads(body) if body is not None else None

    def page(self, *, service: str | None = None, state: str | None = None, since: float | None = None,
             until: float | None = None, worker: str | None = None, operation: str | None = None,
             text: str | None = None, limit: int = 50, cursor: str | None = None,
             count: bool = False) -> Page:
        """A page of the jobs that match, newest first (by when they last moved); the
        cursor of the next page is stable while rows arrive (keyset paging).

        Raises:
            DecodeError: a bad limit or cursor.
        """
        if not 1 <= limit <= MAX_PAGE:
            raise DecodeError(f"limit must be 1 to {MAX_PAGE}, not {limit}")
        if text and "\x00" in text:  # no row holds it (PostgreSQL's text cannot)
            return Page([], None, 0 if count else None)
        seek = decode_cursor(cursor) if cursor is not None else None
        indexed = bool(text) and search.indexable(text or "", self.sqlite)
        with self.engine.connect() as connection:
            others = _filters(schema.jobs.c, service, state, since, until, worker, operation, seek)
            found = self._newest(connection, others, text, limit) if indexed else None
            if found is None:
                rows = search.searched(connection, text or "", self.sqlite) if indexed else schema.jobs
                holds = [search.holds(text, self.sqlite)] if text and not indexed else []
                query = sa.select(rows).where(*holds, *_filters(rows.c, service, state, since, until, worker,
                                                                operation, seek))
                found = [_row(row._mapping) for row in connection.execute(
                    query.order_by(rows.c.at.desc(), rows.c.job_id.desc()).limit(limit + 1))]
            total = None
            if count:
                rows = search.searched(connection, text or "", self.sqlite) if indexed else schema.jobs
                holds = [search.holds(text, self.sqlite)] if text and not indexed else []
                total = int(connection.execute(sa.select(sa.func.count()).select_from(rows).where(
                    *holds, *_filters(rows.c, service, state, since, until, worker, operation))).scalar_one())
        more = len(found) > limit
        page = found[:limit]
        return Page(page, encode_cursor(page[-1].at, page[-1].job_id) if more else None, total)

    def _newest(self, connection: Connection, conditions: list[Any], text: str | None, limit: int
                ) -> list[JobRow] | None:
        """The page of ``text`` if the newest rows that meet the other conditions hold enough
        of it (a common text, which the index would find in too many rows), or if they are
        all the rows that meet them; else None."""
        jobs = schema.jobs
        order = (jobs.c.at.desc(), jobs.c.job_id.desc())
        # The oldest of the newest rows that meet the conditions, then the rows down to it: a
        # range of an index that the scan leaves as soon as it has the page (a subquery of
        # them was sorted again whole). Bounding by the newest rows whatever the filters was
        # cheaper for a rare text under a filter no index serves (state), but sent a common
        # one under filters to the index, which reads every row it is in (0.7 s).
        bound = connection.execute(sa.select(jobs.c.at, jobs.c.job_id).where(*conditions).order_by(*order)
                                   .offset(min(search.SCAN_FIRST * (limit + 1), search.SCAN_MOST) - 1)
                                   .limit(1)).first()
        down_to = [] if bound is None else [sa.tuple_(jobs.c.at, jobs.c.job_id) >= sa.tuple_(
            sa.literal(bound.at), sa.literal(bound.job_id))]
        found = [_row(row._mapping) for row in connection.execute(
            sa.select(jobs).where(*conditions, *down_to, search.holds(text or "", self.sqlite))
            .order_by(*order).limit(limit + 1))]
        return found if len(found) > limit or bound is None else None

    def index_search(self, limit: int = 1000) -> int:
        """Index up to ``limit`` rows that changed since the text-search index last took rows
        (``search.py``), in one short transaction; how many (0: it has them all). Called
        between the ingest's batches: the index follows the rows, and a text question is
        right meanwhile (it scans the rows not indexed yet)."""
        with self.engine.begin() as connection:
            return search.take(connection, self.sqlite, limit)

    def search_lag(self) -> int:
        """How many rows changed that the text-search index has not taken yet."""
        with self.engine.connect() as connection:
            return search.lag(connection)

    def operation_counts(self, operation: str) -> dict[str, int]:
        """How many of an operation's jobs are in each state (a range of ``jobs_operation_key``)."""
        jobs = schema.jobs
        with self.engine.connect() as connection:
            return {state: int(n) for state, n in connection.execute(
                sa.select(jobs.c.state, sa.func.count()).where(jobs.c.operation == operation)
                .group_by(jobs.c.state))}

    def operations(self, *, since: float | None = None, until: float | None = None,
                   service: str | None = None, name: str | None = None, limit: int = 100,
                   cursor: str | None = None) -> tuple[list[dict[str, Any]], str | None]:
        """A page of the operations made in ``[since, until)`` (of ``service``, named
        ``name``, if given), newest first: each its header (as ``OperationHeader.encode``),
        and the cursor of the next page (None: no more).

        Raises:
            DecodeError: a bad limit or cursor.
        """
        if not 1 <= limit <= MAX_PAGE:
            raise DecodeError(f"limit must be 1 to {MAX_PAGE}, not {limit}")
        table = schema.operations
        conditions: list[Any] = []
        for column, value in ((table.c.service, service), (table.c.name, name)):
            if value is not None:
                conditions.append(column == value)
        if since is not None:
            conditions.append(table.c.created >= since)
        if until is not None:
            conditions.append(table.c.created < until)
        if cursor is not None:
            created, operation = decode_cursor(cursor)
            conditions.append(sa.tuple_(table.c.created, table.c.operation)
                              < sa.tuple_(sa.literal(created), sa.literal(operation)))
        with self.engine.connect() as connection:
            found = list(connection.execute(
                sa.select(table.c.operation, table.c.created, table.c.header).where(*conditions)
                .order_by(table.c.created.desc(), table.c.operation.desc()).limit(limit + 1)))
        page = found[:limit]
        more = encode_cursor(page[-1].created, page[-1].operation) if len(found) > limit else None
        return [json.loads(row.header) for row in page], more

    def best(self, operation: str, field: str, lowest: bool = False) -> tuple[str, float] | None:
        """The job of ``operation`` whose improved value's number ``field`` is the highest
        (``lowest``: the lowest), and that number; None if no job has one.

        Raises:
            DecodeError: ``field`` is not a plain name (letters, digits, ``_``).
        """
        if not _FIELD.fullmatch(field):
            raise DecodeError(f"an improved value's field is a plain name (letters, digits, _), "
                              f"not {field!r}")
        jobs = schema.jobs
        number: Any
        numeric: Any
        if self.sqlite:
            path: Any = sa.bindparam("path", f"$.{field}")
            number = sa.func.json_extract(jobs.c.improved, path)
            numeric = sa.func.json_type(jobs.c.improved, path).in_(("integer", "real"))
        else:
            from sqlalchemy.dialects.postgresql import JSONB

            document = sa.cast(jobs.c.improved, JSONB)
            numeric = sa.func.jsonb_typeof(document[field]) == "number"
            number = sa.case((numeric, sa.cast(document[field].astext, sa.Float)))
        order = number.asc() if lowest else number.desc()
        with self.engine.connect() as connection:
            found = connection.execute(
                sa.select(jobs.c.job_id, number.label("number"))
                .where(jobs.c.operation == operation, jobs.c.improved.is_not(None), numeric)
                .order_by(order).limit(1)).first()
        return (found.job_id, float(found.number)) if found is not None else None

    def counts(self, since: float | None = None) -> dict[tuple[str, str], int]:
        """How many jobs there are by service and state (that moved since ``since``: counted
        then; else as kept with the rows, at once)."""
        if since is None:
            kept = schema.counts
            with self.engine.connect() as connection:
                return {(service, state): int(n) for service, state, n in connection.execute(
                    sa.select(kept.c.service, kept.c.state, kept.c.n).where(kept.c.n > 0))}
        jobs = schema.jobs
        query = (sa.select(jobs.c.service, jobs.c.state, sa.func.count())
                 .group_by(jobs.c.service, jobs.c.state))
        if since is not None:
            query = query.where(jobs.c.at >= since)
        with self.engine.connect() as connection:
            return {(service, state): int(n) for service, state, n in connection.execute(query)}

    def prune(self, keep: float, now: float | None = None) -> int:
        """Delete the rows of jobs that ended more than ``keep`` seconds ago; how many."""
        horizon = (time.time() if now is None else now) - keep
        with self.engine.begin() as connection:
            self._one_writer(connection)
            jobs = schema.jobs
            # An ended job's ``at`` is its end: a range of the ``at`` index, where ``ended``
            # alone (no index) read every row, at the indexer's start and hourly.
            ended = sa.and_(jobs.c.at < horizon, jobs.c.ended < horizon)
            gone = Counter({(service, state): -int(n) for service, state, n in connection.execute(
                sa.select(jobs.c.service, jobs.c.state, sa.func.count()).where(ended)
                .group_by(jobs.c.service, jobs.c.state))})
            old = sa.select(jobs.c.job_id).where(ended)
            connection.execute(sa.delete(schema.records).where(schema.records.c.job_id.in_(old)))
            search.unindex(connection, self.sqlite, old)
            result = connection.execute(sa.delete(jobs).where(ended))
            search.lower_mark(connection)
            self._count(connection, gone)
        return int(result.rowcount or 0)


def _filters(c: Any, service: str | None, state: str | None, since: float | None, until: float | None,
             worker: str | None, operation: str | None, seek: tuple[float, str] | None = None) -> list[Any]:
    """The conditions of the filters but ``text`` (``search.py``), on the columns ``c`` (of
    ``jobs``, or of the rows a text search found), and of the cursor ``seek``."""
    conditions: list[Any] = []
    if service is not None:
        conditions.append(c.service == service)
    if state is not None:
        conditions.append(c.state == state)
    if since is not None:
        conditions.append(c.at >= since)
    if until is not None:
        conditions.append(c.at < until)
    if worker is not None:  # a JSON list of hosts: the host, quoted, as a substring
        conditions.append(c.workers.contains(json.dumps(worker), autoescape=True))
    if operation is not None:
        conditions.append(c.operation == operation)
    if seek is not None:
        # A row value: a range of the (at, job_id) index to seek, however deep the page (an
        # OR of two conditions is scanned from the newest row on).
        conditions.append(sa.tuple_(c.at, c.job_id) < sa.tuple_(sa.literal(seek[0]), sa.literal(seek[1])))
    return conditions


#: The columns of ``jobs`` in the order of the ingest's rows of values (:func:`_values`).
_COLUMNS = ("job_id", "service", "state", "attempts", "workers", "launched", "started", "ended", "at",
            "request", "request_bytes", "result", "result_bytes", "error_type", "error", "reason",
            "last_checkpoint", "labels", "operation", "progress", "improved", "item_key", "changed")
#: What the ingest reads of a row (:func:`_row_of`): all but ``at`` and ``changed``, which it
#: makes again.
_READ = tuple(name for name in _COLUMNS if name not in ("at", "changed"))
_SELECTED = ", ".join(_READ)


def _upsert(mark: str) -> str:
    names = ", ".join(_COLUMNS)
    updates = ", ".join(f"{name} = excluded.{name}" for name in _COLUMNS if name != "job_id")
    return (f"INSERT INTO jobs ({names}) VALUES ({', '.join([mark] * len(_COLUMNS))}) "
            f"ON CONFLICT (job_id) DO UPDATE SET {updates}")


_UPSERT_SQLITE = _upsert("?")
_UPSERT_POSTGRESQL = _upsert("%s")
#: A record kept again replaces the one before: the job ended again (a newer attempt).
_KEEP_RECORD = ("INSERT INTO records (job_id, attempt, body) VALUES ({0}, {0}, {0}) "
                "ON CONFLICT (job_id) DO UPDATE SET attempt = excluded.attempt, body = excluded.body")
_KEEP_RECORD_SQLITE, _KEEP_RECORD_POSTGRESQL = _KEEP_RECORD.format("?"), _KEEP_RECORD.format("%s")
_EMPTY_LIST, _EMPTY_OBJECT = "[]", "{}"


def _values(row: JobRow, change: int) -> tuple[Any, ...]:
    """A row's values in the order of :data:`_COLUMNS`."""
    return (row.job_id, row.service, row.state, row.attempts,
            json.dumps(list(row.workers)) if row.workers else _EMPTY_LIST,
            row.launched, row.started, row.ended, row.at, row.request, row.request_bytes,
            row.result, row.result_bytes, row.error_type, row.error, row.reason, row.last_checkpoint,
            json.dumps(row.labels, sort_keys=True) if row.labels else _EMPTY_OBJECT, row.operation,
            _json(row.progress), _json(row.improved), row.item_key, change)


def _row_of(values: Sequence[Any]) -> JobRow:
    """A row read as :data:`_READ` says (JSON parsed only where there is some)."""
    (job_id, service, state, attempts, workers, launched, started, ended, request, request_bytes, result,
     result_bytes, error_type, error, reason, last_checkpoint, labels, operation, progress, improved,
     item_key) = values
    return JobRow(job_id, service, state, attempts,
                  tuple(json.loads(workers)) if workers and workers != _EMPTY_LIST else (),
                  launched, started, ended, request, request_bytes, result, result_bytes, error_type, error,
                  reason, last_checkpoint,
                  json.loads(labels) if labels and labels != _EMPTY_OBJECT else {}, operation,
                  _object(progress), _object(improved), item_key)


def _row(mapping: Any) -> JobRow:
    return _row_of(tuple(mapping[name] for name in _READ))


def _json(value: dict[str, Any] | None) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True, default=str)


def _object(text: str | None) -> dict[str, Any] | None:
    value = json.loads(text) if text else None
    return value if isinstance(value, dict) else None



def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers never wait for the indexer
    cursor.execute("PRAGMA synchronous=NORMAL")  # durable at each checkpoint of the WAL
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()
