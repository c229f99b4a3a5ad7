"""The indexer's store half in a process of its own (``brokerexec/history/store_process.py``):
batches committed in order, a refused batch refusing those after it until a reset, a child
that dies started again, a child whose parent is SIGKILLed gone. Real processes and a real
SQLite file; no broker (the tail's side is ``tests/test_history.py``)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import brokerctl
import pytest
from test_history_store import Journal

from brokerexec.history import HistoryStore
from brokerexec.history.store_process import StoreProcess, decode_batch, encode_batch
from brokerexec.transport.pika.journal_tail import TailEntry, TryAgain

WAIT = 30.0


def raw(journal: Journal, start: int = 0) -> tuple[list[TailEntry], dict[str, int]]:
    """The journal's entries from ``start`` on as the tail hands them over."""
    batch = [TailEntry(e.stream, e.offset, e.kind, e.job_id, "application/json", json.dumps(e.body).encode())
             for e in journal.entries[start:]]
    return batch, dict(journal.next)


def test_a_batch_crosses_the_pipe_as_it_came() -> None:
    journal = Journal()
    journal.job(request={"text": "é \u2028 \\ \" {}"})
    batch, reached = raw(journal)
    batch.append(TailEntry("s", 7, None, None, None, b"\x00\xff not json"))  # bytes as they came
    assert decode_batch(encode_batch(batch, reached)) == (batch, reached)
    assert decode_batch(encode_batch([], {})) == ([], {})


@pytest.fixture
def store(tmp_path: Path) -> HistoryStore:
    store = HistoryStore(str(tmp_path / "h.db"))
    store.migrate()
    return store


def test_batches_commit_in_order_and_one_refused_refuses_those_after_it_until_a_reset(
        store: HistoryStore, tmp_path: Path) -> None:
    journal = Journal()
    first = journal.job(end=100.0)
    process = StoreProcess(store.url)
    process.start()
    try:
        process.submit(*raw(journal)).result(WAIT)
        assert store.get(first) is not None and store.offsets() == journal.next
        assert process.stats.entries == len(journal.entries) and process.stats.batches == 1
        # When the store refuses a batch (its offsets table gone: an OperationalError)
        sql = sqlite3.connect(tmp_path / "h.db", isolation_level=None)
        sql.execute("ALTER TABLE offsets RENAME TO offsets_away")
        done = len(journal.entries)
        second = journal.job(end=200.0)
        refused = process.submit(*raw(journal, done))
        with pytest.raises(TryAgain, match="refused a batch"):
            refused.result(WAIT)
        # Then a later batch is not stored either, even once the store would take it
        sql.execute("ALTER TABLE offsets_away RENAME TO offsets")
        third = journal.job(end=300.0)
        with pytest.raises(TryAgain, match="after an earlier batch failed"):
            process.submit(*raw(journal, done + 4)).result(WAIT)
        assert store.get(second) is None and store.get(third) is None
        assert process.stats.store_errors == 1
        # and after a reset, read again from the stored offsets, every job is stored once
        process.reset()
        process.submit(*raw(journal, done)).result(WAIT)
        assert {job: store.get(job).state for job in (first, second, third)} == dict.fromkeys(  # type: ignore[union-attr]
            (first, second, third), "finished")
        assert store.counts() == {("fit", "finished"): 3} and store.offsets() == journal.next
        # and while no batch comes, the text-search index takes the rows (none is left behind)
        brokerctl.wait_until(lambda: store.search_lag() == 0, WAIT, "the search index to catch up")
        assert [row.job_id for row in store.page(text=second[6:20].upper()).rows] == [second]
    finally:
        process.close()
    assert not process.alive


def test_a_child_that_dies_fails_what_it_held_and_a_reset_starts_another(store: HistoryStore) -> None:
    journal = Journal()
    process = StoreProcess(store.url)
    process.start()
    try:
        os.kill(process._process.pid, signal.SIGKILL)
        brokerctl.wait_until(lambda: not process.alive, WAIT, "the child to die")
        job = journal.job()
        with pytest.raises(TryAgain, match="gone"):
            process.submit(*raw(journal)).result(WAIT)
        process.reset()
        assert process.alive
        process.submit(*raw(journal)).result(WAIT)
        assert store.get(job) is not None
    finally:
        process.close()


def test_the_child_ends_when_its_parent_is_sigkilled(store: HistoryStore, tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import sys, threading
        from brokerexec.history.store_process import StoreProcess
        if __name__ == "__main__":
            process = StoreProcess({store.url!r})
            process.start()
            print(process._process.pid, flush=True)
            threading.Event().wait()
    """)
    (tmp_path / "parent.py").write_text(script)
    parent = subprocess.Popen([sys.executable, str(tmp_path / "parent.py")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert _running(child)
    finally:
        parent.kill()
        parent.wait(WAIT)
    brokerctl.wait_until(lambda: not _running(child), WAIT, "the orphaned store process to end")


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False
