"""The history store's text search (``brokerexec/history/search.py``) on SQLite and on the real
PostgreSQL: the same rows whether the trigram index has taken them or trails behind, case
ignored for ASCII letters alike on both, hostile text as text, rows indexed again when they
change and taken out when pruned, pages stable across the index's mark."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import brokerctl
import pytest
import sqlalchemy as sa
from test_history_store import upgrade_to

from brokerexec.history import Entry, HistoryStore
from brokerexec.history.search import COLUMNS
from brokerexec.protocol.messages import Launch, Record
from brokerexec.protocol.names import LAUNCH_TYPE, RECORD_TYPE, journal_stream
from brokerexec.protocol.states import JobState

HOSTILE = ["%", "_", "%_%", "'", "''", '"', '""', "'; DROP TABLE jobs; --", "*", "ds*", "NEAR(",
           'NEAR("a" "b")', "AND", " AND ", "OR", "NOT", '"ds" AND "x"', "^ds", "body:ds", "ds-0001 OR 1=1",
           "\\", "/", "//%", "a\x00b", "\n", "{}", "(", ")", ":", "-", "ds-", "\u00e9cole", "\U0001f600",
           "\u0130stanbul", "Stra\u00dfe", "\u0130\u0130\u0130"]


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[HistoryStore]:
    url = (str(tmp_path / "history.db") if request.param == "sqlite"
           else request.getfixturevalue("postgres_url"))
    with HistoryStore(url) as store:
        store.migrate()
        yield store


class Journal:
    """Entries as the streams hold them, with offsets per stream."""

    def __init__(self) -> None:
        self.next: dict[str, int] = {}

    def entry(self, job_id: str, kind: str, body: dict[str, Any]) -> Entry:
        stream = journal_stream(job_id)
        offset = self.next.get(stream, 0)
        self.next[stream] = offset + 1
        return Entry(stream, offset, kind, body, job_id)

    def launch(self, request: Any, service: str = "fit", at: float = 100.0) -> tuple[str, Entry]:
        launch = Launch.new(service, request)
        return launch.job_id, self.entry(launch.job_id, LAUNCH_TYPE, {**launch.encode(), "sent": at})

    def record(self, job_id: str, end: float, message: str | None = None, service: str = "fit") -> Entry:
        state = JobState.FAILED if message is not None else JobState.FINISHED
        error = {"type": "ValueError", "message": message, "traceback": ""} if message is not None else None
        record = Record(job_id, service, state, None if error else {"ok": True}, error, end - 1, end,
                        {"hostname": "h"})
        return self.entry(job_id, RECORD_TYPE, record.encode())


def _jobs(store: HistoryStore, journal: Journal, n: int, start: float = 1000.0,
          text: str = "ds-{i:05d}") -> list[str]:
    """``n`` ended jobs, one ingest, each a request naming ``text`` and an end of its own
    (some sharing one: paging breaks ties by id)."""
    ids, entries = [], []
    for i in range(n):
        job_id, launch = journal.launch({"dataset": text.format(i=i), "n": i})
        ids.append(job_id)
        entries += [launch, journal.record(job_id, start + i // 2, f"Diverged At Step {i}" if i % 7 == 0
                                           else None)]
    store.ingest(entries, journal.next)
    return ids


def _ascii_lower(text: str) -> str:
    return "".join(chr(ord(c) + 32) if "A" <= c <= "Z" else c for c in text)


def _truth(store: HistoryStore, text: str) -> list[str]:
    """The ids of the rows that hold ``text``, newest first, read and matched in Python."""
    with store.engine.connect() as connection:
        rows = connection.execute(sa.text(f"SELECT at, {', '.join(COLUMNS)} FROM jobs")).all()
    wanted = _ascii_lower(text)
    return [row.job_id for row in sorted(rows, key=lambda row: (row.at, row.job_id), reverse=True)
            if "\x00" not in text and any(wanted in _ascii_lower(getattr(row, c) or "") for c in COLUMNS)]


def _found(store: HistoryStore, text: str, limit: int = 50, **filters: Any) -> tuple[list[str], int | None]:
    """Every page of ``text``, followed by its cursors; the ids, and the first page's total."""
    ids: list[str] = []
    page = store.page(text=text, limit=limit, count=True, **filters)
    total = page.total
    while True:
        ids += [row.job_id for row in page.rows]
        if page.cursor is None:
            return ids, total
        page = store.page(text=text, limit=limit, cursor=page.cursor, **filters)


def _catch_up(store: HistoryStore) -> None:
    while store.index_search(limit=100):
        pass
    assert store.search_lag() == 0


def _indexed(store: HistoryStore) -> int:
    with store.engine.connect() as connection:
        return int(connection.execute(sa.text("SELECT count(*) FROM search_docs")).scalar_one())


def test_a_search_finds_the_same_rows_before_and_after_the_index_takes_them(store: HistoryStore) -> None:
    journal = Journal()
    ids = _jobs(store, journal, 300)
    texts = ["ds-00042", "DS-0004", "ds-001", "diverged at", "DIVERGED AT STEP 14", "valueerror", "ok", "ds",
             ids[5], ids[5][:8].upper(), "\"dataset\": \"ds-002", '"dataset":"ds-002', "nothing like it"]
    before = {text: _found(store, text) for text in texts}
    assert store.search_lag() == 300 and _indexed(store) == 0
    assert store.index_search(limit=120) == 120 and store.search_lag() == 180  # half way: both at once
    halfway = {text: _found(store, text) for text in texts}
    _catch_up(store)
    assert _indexed(store) == 300 and store.index_search() == 0
    after = {text: _found(store, text) for text in texts}
    for text in texts:
        truth = _truth(store, text)
        assert before[text] == halfway[text] == after[text] == (truth, len(truth)), text
    assert len(after["ds-00042"][0]) == 1 and len(after["ds-001"][0]) == 100
    assert len(after["DIVERGED AT STEP 14"][0]) == 3  # steps 14, 140 and 147
    # the other filters and `since` still apply, with the count
    ended = store.get(ids[40]).at  # type: ignore[union-attr]
    page = store.page(text="ds-000", since=ended, count=True)
    assert page.total == len([i for i in _truth(store, "ds-000")
                              if store.get(i).at >= ended])  # type: ignore[union-attr]
    assert store.page(text="ds-00043", state="finished").rows[0].job_id == ids[43]
    assert store.page(text="ds-00043", state="failed").rows == []


def test_case_is_ignored_for_ascii_letters_only_on_both_back_ends(store: HistoryStore) -> None:
    journal = Journal()
    job_id, launch = journal.launch({"note": "Crème BRÛLÉE at ÉCOLE", "k": "MiXeD"})
    store.ingest([launch], journal.next)
    for indexed in (False, True):
        for text in ("mixed", "MIXED", "mIxEd", "crème", "CRèME", "brÛlÉe", "BRÛLÉE", "cole", "t ÉC"):
            assert [r.job_id for r in store.page(text=text).rows] == [job_id], (text, indexed)
        for text in ("CRÈME", "brûlé", "école", "T éc"):  # other letters match only as they are
            assert store.page(text=text).rows == [], (text, indexed)
        _catch_up(store)


def test_hostile_text_is_matched_literally_and_never_an_error(store: HistoryStore) -> None:
    journal = Journal()
    odd = "50% off_x 'quoted' \"dq\" NEAR(a b) AND OR * ^ col:x \\ // é \U0001f600 ds-9"
    target, launch = journal.launch({"note": odd})
    _jobs(store, journal, 20)
    store.ingest([launch], journal.next)
    for indexed in (False, True):
        for text in [*HOSTILE, odd, odd[3:20], '"dq" NEAR(a', "AND OR *"]:
            ids, total = _found(store, text)
            truth = _truth(store, text)
            assert (ids, total) == (truth, len(truth)), (text, indexed)
        assert [r.job_id for r in store.page(text="0% off_x").rows] == [target]
        assert store.page(text="0%p").rows == store.page(text="off%x").rows == []  # % and _ as themselves
        _catch_up(store)
    assert len(_truth(store, "ds-")) == 21 and store.get(target) is not None  # every table still there


def test_a_row_is_indexed_again_when_it_changes_and_its_old_text_no_longer_finds_it(
        store: HistoryStore) -> None:
    journal = Journal()
    job_id, launch = journal.launch({"dataset": "ds-77777"})
    store.ingest([launch], journal.next)
    _catch_up(store)
    assert [r.job_id for r in store.page(text="ds-77777").rows] == [job_id]
    assert store.page(text="exploded").rows == []
    store.ingest([journal.record(job_id, 200.0, "Exploded in the middle")], journal.next)
    assert store.search_lag() == 1
    for _ in range(2):  # past the mark, then indexed again
        assert [r.job_id for r in store.page(text="EXPLODED in").rows] == [job_id]
        assert [r.job_id for r in store.page(text="ds-77777").rows] == [job_id]
        assert store.page(text="exploded", count=True).total == 1
        _catch_up(store)
    assert _indexed(store) == 1
    # its text changed by a later transaction (as an ingest does): the index's old text of it
    # finds it no more, before and after the index takes it again
    with store.engine.begin() as connection:
        connection.execute(sa.text("UPDATE jobs SET error = 'calm', changed = "
                                   "(SELECT max(changed) FROM jobs) + 1 WHERE job_id = :id"), {"id": job_id})
    for _ in range(2):
        assert store.page(text="exploded", count=True).total == 0
        assert [r.job_id for r in store.page(text="CALM").rows] == [job_id]
        _catch_up(store)


def test_pruned_rows_leave_the_index_and_rows_after_them_are_indexed(store: HistoryStore) -> None:
    journal = Journal()
    old = _jobs(store, journal, 30, start=1000.0, text="old-{i:03d}")
    _catch_up(store)
    kept = _jobs(store, journal, 10, start=5000.0, text="kept-{i:03d}")
    _catch_up(store)
    gone = _jobs(store, journal, 10, start=1500.0, text="late-{i:03d}")  # the newest change, pruned
    store.index_search(limit=4)  # part of them indexed, part past the mark
    assert store.prune(keep=2000.0, now=4000.0) == 40
    assert _indexed(store) == 10 and store.search_lag() == 0
    for text in ("old-0", "late-0"):
        assert store.page(text=text, count=True).total == 0
    assert {r.job_id for r in store.page(text="kept-0").rows} == set(kept)
    # the ingest numbers its next change from the newest row left: still past the index's mark
    fresh = _jobs(store, journal, 5, start=6000.0, text="fresh-{i:03d}")
    assert store.search_lag() == 5
    assert {r.job_id for r in store.page(text="FRESH-").rows} == set(fresh)
    _catch_up(store)
    assert {r.job_id for r in store.page(text="fresh-").rows} == set(fresh) and _indexed(store) == 15
    assert not set(old + gone) & {r.job_id for r in store.page(text="-0", limit=1000).rows}
    assert store.prune(keep=0.0, now=10_000.0) == 15
    assert _indexed(store) == 0 and store.search_lag() == 0
    again = _jobs(store, journal, 3, start=20_000.0, text="again-{i:03d}")
    assert store.search_lag() == 3
    _catch_up(store)
    assert {r.job_id for r in store.page(text="again-").rows} == set(again)


def test_pages_across_the_mark_are_stable_while_the_index_catches_up(store: HistoryStore) -> None:
    journal = Journal()
    _jobs(store, journal, 80, text="same-{i:03d}")
    store.index_search(limit=37)
    _jobs(store, journal, 40, start=1020.0, text="same-x{i:03d}")  # interleaved in time with the first
    truth = _truth(store, "SAME-")
    assert len(truth) == 120
    for limit in (1, 7, 50):
        assert _found(store, "same-", limit=limit) == (truth, 120)
    # the index moves between the pages of one listing: none lost, none twice
    seen: list[str] = []
    page = store.page(text="same-", limit=9)
    while True:
        seen += [row.job_id for row in page.rows]
        store.index_search(limit=11)
        if page.cursor is None:
            break
        page = store.page(text="same-", limit=9, cursor=page.cursor)
    assert seen == truth and store.search_lag() == 0


def test_a_common_text_and_a_rare_one_are_both_right(store: HistoryStore, monkeypatch: Any) -> None:
    from brokerexec.history import search

    journal = Journal()
    _jobs(store, journal, 400, text="common-{i:05d}")
    _catch_up(store)
    for common in (2000, 30):  # SQLite asks only the rarest trigrams (here: fewer than 30 rows)
        monkeypatch.setattr(search, "COMMON", common)
        for text, limit in (("common-", 10), ("common-001", 10), ("common-0039", 3), ("mmon-0", 50),
                            ("ON-0039", 2), ("00039", 5)):
            truth = _truth(store, text)
            assert _found(store, text, limit=limit) == (truth, len(truth)), text


def test_a_store_migrated_from_0003_with_rows_gets_them_indexed(tmp_path: Any) -> None:
    journal = Journal()
    ids = []
    with HistoryStore(str(tmp_path / "old.db")) as store:
        with store.engine.begin() as connection:
            upgrade_to(connection, "0003")
            for i in range(25):
                job_id, _ = journal.launch({})
                ids.append(job_id)
                connection.execute(sa.text(
                    "INSERT INTO jobs (job_id, service, state, attempts, workers, launched, at, request, "
                    "request_bytes, result_bytes, labels) VALUES (:id, 'fit', 'queued', 0, '[]', :at, :at, "
                    ":request, 0, 0, '{}')"),
                    {"id": job_id, "at": float(i), "request": f'{{"dataset":"Before-{i:02d}"}}'})
        assert store.migrate() == "0007"
        assert store.search_lag() == 25
        truth = _truth(store, "before-")
        assert _found(store, "before-") == (truth, 25) and set(truth) == set(ids)
        assert store.index_search(limit=10) == 10 and store.search_lag() == 15
        assert _found(store, "BEFORE-", limit=4) == (truth, 25)
        _catch_up(store)
        assert _found(store, "before-") == (truth, 25)
        assert [r.job_id for r in store.page(text="before-07").rows] == [ids[7]]


def test_the_embedded_history_indexes_its_text_when_idle(tmp_path: Any) -> None:
    from brokerexec.history.embedded import MemoryHistory
    from brokerexec.transport.memory.broker import MemoryBroker

    broker = MemoryBroker.of_url(f"memory://search-{uuid.uuid4().hex[:8]}")
    history = MemoryHistory(str(tmp_path / "embedded.db"), broker)
    try:
        journal = Journal()
        ids = []
        for i in range(30):
            job_id, launch = journal.launch({"dataset": f"emb-{i:02d}"})
            ids.append(job_id)
            history.note(LAUNCH_TYPE, launch.body, job_id)
        history.flushed().result(10)
        brokerctl.wait_until(lambda: history.store.search_lag() == 0, 10, "the search index to catch up")
        assert history.store.search_lag() == 0 and _indexed(history.store) == 30
        assert [r.job_id for r in history.store.page(text="EMB-07").rows] == [ids[7]]
    finally:
        history.close()
