"""The text-search index of the history store, which follows the rows behind the ingest.

``HistoryStore.page(text=...)`` finds the jobs where any of six columns (``job_id``,
``request``, ``result``, ``error``, ``error_type``, ``reason``) holds ``text``, ignoring the
case of the ASCII letters A-Z (other characters match as they are): the same on SQLite and
PostgreSQL. A ``LIKE '%...%'`` over a million rows reads every row (seconds); a trigram index
finds them at once. Building one inline would cost the ingest ~260 µs a row, so it is built
apart, behind the rows:

* every ingest transaction marks the rows it writes with a number above all before
  (``jobs.changed``, indexed), and :func:`take` (``HistoryStore.index_search``), called
  between batches, indexes the rows past the **mark** (``search_mark``: the ``(changed,
  job_id)`` of the last row indexed, moved in the transaction that indexes them, so a crash
  loses nothing), a few hundred at a time (each transaction holds SQLite's write lock);
* a query unites what the index finds among the rows at or below the mark with a plain scan
  of the rows past it (the tail: few, a range of ``jobs_changed``), in one statement, so it
  is right however far the index trails; and every row it finds is checked against the
  columns themselves (:func:`holds`), so the index only has to find a superset.

The index: SQLite, an FTS5 table with the trigram tokenizer over ``search_docs`` (the text of
each row, its six columns joined); PostgreSQL, ``search_docs`` with a ``pg_trgm`` GIN index.
Text shorter than 3 characters has no trigram (nor, on PostgreSQL, text without 3 letters or
digits in a row, which ``pg_trgm`` needs): it is found by the plain scan, as before.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from . import schema

__all__ = ["COLUMNS", "holds", "indexable", "lag", "lower_mark", "searched", "take", "unindex"]

#: The columns text is looked for in.
COLUMNS = ("job_id", "request", "result", "error", "error_type", "reason")
#: The newest rows a text question scans before it asks the index (times the page's rows):
#: a common text is in enough of them (5% of the rows and more), and scanning them is
#: cheaper than reading the many rows the index would give.
SCAN_FIRST = 20
#: And at most this many (a page of 1,000).
SCAN_MOST = 5000
#: At most this many trigrams of a text are looked at in SQLite's index (:func:`_fts_query`);
#: a trigram in this many rows or more is common, and of the rare ones the RAREST are asked.
MAX_TRIGRAMS, COMMON, RAREST = 16, 2000, 4
#: PostgreSQL's advisory lock of the search index: one transaction indexes at a time, and
#: pruning waits for it (a row it deletes cannot be indexed behind its back).
SEARCH_LOCK = 7268190523
#: An upper bound of ``changed``: the tail is ``changed BETWEEN mark AND TOP``, a range
#: PostgreSQL estimates as small without statistics (``changed >= mark`` alone it takes for a
#: third of the table, and scans it) where autovacuum is off.
TOP = 2**62

jobs = schema.jobs
mark = schema.search_mark
#: The text of each row indexed (SQLite: ``doc`` is the FTS5 table's rowid).
docs = sa.table("search_docs", sa.column("doc", sa.BigInteger), sa.column("job_id", sa.String),
                sa.column("body", sa.Text))
#: SQLite's FTS5 table (external content: ``search_docs``); its hidden column of its own name
#: takes MATCH.
fts = sa.table("search_index", sa.column("rowid", sa.BigInteger), sa.column("body", sa.Text),
               sa.column("search_index", sa.Text))
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _body() -> Any:
    """A row's text in the index: its six columns, one a line."""
    parts = [sa.func.coalesce(jobs.c[name], "") for name in COLUMNS]
    body: Any = parts[0]
    for part in parts[1:]:
        body = body + "\n" + part
    return body


def _past(changed: Any, job_id: Any, top: Any = TOP) -> Any:
    """The rows after ``(changed, job_id)`` in the order they are indexed (up to a ``changed``
    of ``top``)."""
    return sa.and_(jobs.c.changed.between(changed, top),
                   sa.tuple_(jobs.c.changed, jobs.c.job_id) > sa.tuple_(changed, job_id))


# ---- indexing ---------------------------------------------------------------------------------


def take(connection: Connection, sqlite: bool, limit: int) -> int:
    """Index up to ``limit`` rows past the mark and move the mark past them, in the caller's
    transaction; how many (0: none left)."""
    if sqlite:
        # A write first: the transaction holds the write lock from here (pysqlite begins one
        # only at a write), so what it reads next is what it writes over.
        connection.execute(sa.update(mark).values(changed=mark.c.changed))
    else:
        connection.execute(sa.text(f"SELECT pg_advisory_xact_lock({SEARCH_LOCK})"))
    at, after = connection.execute(sa.select(mark.c.changed, mark.c.job_id)).one()
    # The rows to take lie at or below the ``changed`` of the limit-th row after the mark's:
    # a walk of ``jobs_changed``, then a sort of that range only. Sorting every row past the
    # mark by (changed, job_id), which no index holds, took PostgreSQL 0.9 s a call with a
    # million rows to index.
    top = connection.execute(sa.select(jobs.c.changed).where(jobs.c.changed > at).order_by(jobs.c.changed)
                             .offset(limit - 1).limit(1)).scalar()
    keys = connection.execute(sa.select(jobs.c.changed, jobs.c.job_id)
                              .where(_past(at, after, TOP if top is None else top))
                              .order_by(jobs.c.changed, jobs.c.job_id).limit(limit)).all()
    if not keys:
        return 0
    last = keys[-1]
    # Bounded above by the last one's ``changed`` too: the row value alone bounds no range of
    # ``jobs_changed``, and each statement read the index to its end.
    batch = sa.and_(jobs.c.changed.between(at, last.changed),
                    sa.tuple_(jobs.c.changed, jobs.c.job_id) > sa.tuple_(at, after),
                    sa.tuple_(jobs.c.changed, jobs.c.job_id) <= sa.tuple_(last.changed, last.job_id))
    ids = sa.select(jobs.c.job_id).where(batch)
    if sqlite:
        _unindex_sqlite(connection, ids)  # the texts they had, if they were indexed before
        start = connection.execute(sa.select(sa.func.coalesce(sa.func.max(docs.c.doc), 0))).scalar_one()
        connection.execute(sa.insert(docs).from_select(["job_id", "body"], sa.select(jobs.c.job_id, _body())
                                                       .where(batch)))
        connection.execute(sa.insert(fts).from_select(["rowid", "body"], sa.select(
            docs.c.doc, docs.c.body).where(docs.c.doc > start)))
    else:
        from sqlalchemy.dialects.postgresql import insert

        rows = sa.select(jobs.c.job_id, _body()).where(batch)
        statement = insert(docs).from_select(["job_id", "body"], rows)
        connection.execute(statement.on_conflict_do_update(index_elements=["job_id"],
                                                           set_={"body": statement.excluded.body}))
    connection.execute(sa.update(mark).values(changed=last.changed, job_id=last.job_id))
    return len(keys)


def unindex(connection: Connection, sqlite: bool, ids: Any) -> None:
    """Take the rows ``ids`` (a select of job ids, about to be deleted) out of the index."""
    if sqlite:
        _unindex_sqlite(connection, ids)
    else:
        connection.execute(sa.text(f"SELECT pg_advisory_xact_lock({SEARCH_LOCK})"))
        connection.execute(sa.delete(docs).where(docs.c.job_id.in_(ids)))


def lower_mark(connection: Connection) -> None:
    """After rows were deleted: the mark down to the newest row left if it was past it. The
    ingest numbers its next change from the newest row, and that change must be past the
    mark; every row left was at or below the mark, so indexed, and still is."""
    at = connection.execute(sa.select(mark.c.changed)).scalar_one()
    newest = connection.execute(sa.select(sa.func.max(jobs.c.changed))).scalar()
    if newest is None:
        connection.execute(sa.update(mark).values(changed=-1, job_id=""))
    elif newest < at:
        last = connection.execute(sa.select(sa.func.max(jobs.c.job_id)).where(jobs.c.changed == newest)
                                  ).scalar_one()
        connection.execute(sa.update(mark).values(changed=newest, job_id=last))


def _unindex_sqlite(connection: Connection, ids: Any) -> None:
    gone = sa.select(docs.c.doc).where(docs.c.job_id.in_(ids))
    # External content: FTS5 takes an entry out given the text it was made of.
    connection.execute(sa.insert(fts).from_select(["search_index", "rowid", "body"], sa.select(
        sa.literal("delete"), docs.c.doc, docs.c.body).where(docs.c.doc.in_(gone))))
    connection.execute(sa.delete(docs).where(docs.c.doc.in_(gone)))


def lag(connection: Connection) -> int:
    """How many rows changed since the index took them."""
    at, after = connection.execute(sa.select(mark.c.changed, mark.c.job_id)).one()
    return int(connection.execute(sa.select(sa.func.count()).select_from(jobs)
                                  .where(_past(at, after))).scalar_one())


# ---- questions ----------------------------------------------------------------------------------


def holds(text: str, sqlite: bool, columns: Any = None) -> Any:
    """The rows where one of :data:`COLUMNS` (of ``jobs``, or of ``columns``: a subquery's)
    holds ``text``, ``%`` and ``_`` as themselves, ASCII letters of either case alike:
    SQLite's LIKE ignores the case of ASCII letters, and only theirs; PostgreSQL's ``lower()``
    in the "C" collation lowers those, and only those."""
    columns = jobs.c if columns is None else columns
    if sqlite:
        return sa.or_(*(columns[name].contains(text, autoescape=True) for name in COLUMNS))
    lowered = text.translate(_ASCII_LOWER)
    return sa.or_(*(sa.func.lower(columns[name].collate("C")).contains(lowered, autoescape=True)
                    for name in COLUMNS))


def indexable(text: str, sqlite: bool) -> bool:
    """Whether the index can find ``text``: a trigram of it is in the index."""
    if sqlite:
        return len(text) >= 3
    run = 0  # pg_trgm makes its trigrams of words (letters and digits): three of them in a row
    for char in text:
        run = run + 1 if char.isalnum() else 0
        if run >= 3:
            return True
    return False


def searched(connection: Connection, text: str, sqlite: bool) -> Any:
    """The rows that hold ``text`` (which must be :func:`indexable`), as a subquery: those the
    index finds at or below the mark, and those past it (not indexed yet, or changed since),
    scanned, each checked with :func:`holds`; one statement, so one snapshot of the rows, the
    index and its mark. The caller's filters and order go outside it: OFFSET 0 keeps either
    database from pushing them in, where they would choose the plan (with no statistics, an
    index on ``service`` looked cheaper than the few rows the index found, and was read
    whole) instead of the index and the mark."""
    at = sa.select(mark.c.changed).scalar_subquery()
    after = sa.select(mark.c.job_id).scalar_subquery()
    if sqlite:
        found = sa.select(docs.c.job_id).where(docs.c.doc.in_(
            sa.select(fts.c.rowid).where(fts.c.search_index.op("MATCH")(_fts_query(connection, text)))))
    else:
        found = sa.select(docs.c.job_id).where(docs.c.body.ilike("%" + _escape(text) + "%", escape="/"))
    indexed = sa.and_(jobs.c.job_id.in_(found),
                      sa.tuple_(jobs.c.changed, jobs.c.job_id) <= sa.tuple_(at, after))
    check = holds(text, sqlite)
    union = sa.union_all(sa.select(jobs).where(indexed, check),
                         sa.select(jobs).where(_past(at, after), check))
    return union.offset(0).subquery("searched")


def _fts_query(connection: Connection, text: str) -> str:
    """An FTS5 query of ``text``: trigrams of it, each a quoted string (so nothing in it is
    FTS5 syntax), all of them needed. The index keeps no positions, and ANDing a trigram
    that most rows have (``ds-`` of ``ds-01234``) read its whole list (22 ms of a rare
    dataset's 25, at a million rows): each is counted up to :data:`COMMON` first, and only
    the rarest few are asked, or all if none is rare."""
    grams = list(dict.fromkeys(text[i:i + 3] for i in range(len(text) - 2)))
    if len(grams) > MAX_TRIGRAMS:  # spread over the text
        step = (len(grams) - 1) / (MAX_TRIGRAMS - 1)
        grams = [grams[round(i * step)] for i in range(MAX_TRIGRAMS)]
    terms = {gram: '"' + gram.replace('"', '""') + '"' for gram in grams}
    probe = sa.text("SELECT count(*) FROM (SELECT 1 FROM search_index WHERE search_index MATCH :term "
                    "LIMIT :most)")
    counts = {gram: int(connection.execute(probe, {"term": term, "most": COMMON}).scalar_one())
              for gram, term in terms.items()}
    rare = sorted((gram for gram in grams if counts[gram] < COMMON), key=counts.__getitem__)
    return " AND ".join(terms[gram] for gram in (rare[:RAREST] if rare else grams))


def _escape(text: str) -> str:
    return text.replace("/", "//").replace("%", "/%").replace("_", "/_")
