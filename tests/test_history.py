"""The history indexer (``brokerexec history``) as users run it: a real broker, real worker and
indexer processes, real SIGKILLs; the store on SQLite and on the real PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import brokerctl
import pytest

from brokerexec import Client, DecodeError, HistoryUnavailable, RemoteError
from brokerexec.history import HistoryStore

pytestmark = [pytest.mark.rabbitmq, pytest.mark.timeout(240)]
ROOT = Path(__file__).resolve().parent.parent
WAIT = 60.0


class IndexerProcess:
    """``brokerexec history`` in a process of its own."""

    def __init__(self, broker: str, store: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "brokerexec", "history", "--broker", broker, "--store", store],
            stderr=subprocess.PIPE, text=True, cwd=ROOT)
        self.lines: list[str] = []
        ready = threading.Event()

        def read() -> None:
            assert self.process.stderr is not None
            for line in self.process.stderr:
                self.lines.append(line)
                if "history indexer ready" in line:
                    ready.set()

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()
        if not ready.wait(30):
            self.process.kill()
            raise AssertionError("the indexer did not start:\n" + "".join(self.lines))

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)
        self._closed()

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(30)
        self._closed()
        return code

    def _closed(self) -> None:
        self._reader.join(10)  # it read to the end of stderr
        assert self.process.stderr is not None
        self.process.stderr.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "history.db")
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def indexers(own_vhost: str) -> Iterator[Callable[[str], IndexerProcess]]:
    started: list[IndexerProcess] = []

    def start(store: str) -> IndexerProcess:
        started.append(IndexerProcess(own_vhost, store))
        return started[-1]

    yield start
    for indexer in started:
        if indexer.process.poll() is None:
            indexer.kill()


def rows_of(store: str, ids: list[str]) -> dict[str, Any]:
    with HistoryStore(store) as history:
        return {job_id: history.get(job_id) for job_id in ids}


def wait_for_rows(store: str, want: Callable[[dict[str, Any]], bool], ids: list[str]) -> dict[str, Any]:
    brokerctl.wait_until(lambda: want(rows_of(store, ids)), WAIT, "the store to hold every job as wanted")
    return rows_of(store, ids)


def test_every_job_is_in_the_store_once_across_worker_and_indexer_sigkills(
        own_vhost: str, store_url: str, worker_process: Callable[..., Any],
        indexers: Callable[[str], IndexerProcess]) -> None:
    # A vhost of its own: the store reads the whole journal, and holds this test's jobs only.
    amqp_url = own_vhost
    first = worker_process("--concurrency", "4", "--resume-grace", "0.5", "--heartbeat", "2",
                           services=("Counter", "Steps"), url=amqp_url)
    with Client(amqp_url, timeout=10) as client:
        indexer = indexers(store_url)
        done = [client.launch("counter", {"steps": n % 4, "delay": 0.01 * (n % 2)}) for n in range(20)]
        failing = client.launch("counter", {"steps": 3, "fail_at": 1})
        sweep = client.launch_many("counter", [{"steps": 1}] * 10)
        resumed = client.launch("steps", {"steps": 300, "delay": 0.01}, checkpoint_delta=0.2)
        brokerctl.wait_until(lambda: resumed.status().get("state") == "running", 30, "the steps job to run")
        indexer.kill()  # mid-stream: what it had not committed is read again
        worker_process("--concurrency", "4", "--resume-grace", "0.5", "--heartbeat", "2",
                       services=("Counter", "Steps"), url=amqp_url)
        os.kill(first.pid, signal.SIGKILL)  # the steps job resumes on the second worker
        for job in [*done, *sweep]:
            job.result(WAIT)
        with pytest.raises(RemoteError, match="boom at step 1"):
            failing.result(WAIT)
        assert resumed.result(WAIT)["done"] == 300
        indexer = indexers(store_url)
        ids = [job.id for job in (*done, failing, *sweep, resumed)]
        rows = wait_for_rows(store_url, lambda rows: all(row is not None and row.state in (
            "finished", "failed") for row in rows.values()), ids)
        # Asked over the broker: any client, with only the broker's URL.
        failed = client.history(state="failed", count=True)
        assert [row["job_id"] for row in failed.rows] == [failing.id] and failed.total == 1
        assert failed.rows[0]["error"] == "boom at step 1" and failed.cursor is None
        assert [row["job_id"] for row in client.history(text="boom at").rows] == [failing.id]
        paged, cursor = [], None
        while True:
            page = client.history(service="counter", limit=7, cursor=cursor)
            paged += [row["job_id"] for row in page.rows]
            if (cursor := page.cursor) is None:
                break
        assert sorted(paged) == sorted(job.id for job in (*done, failing, *sweep))
        with pytest.raises(DecodeError, match="not a history cursor"):
            client.history(cursor="nonsense")
    assert indexer.stop() == 0
    with Client(amqp_url, timeout=10) as client:  # no indexer now: said at once
        started = time.monotonic()
        with pytest.raises(HistoryUnavailable, match="no history indexer runs on this broker"):
            client.history()
        assert time.monotonic() - started < 1.0
    assert {rows[job.id].state for job in (*done, *sweep)} == {"finished"}
    assert rows[failing.id].state == "failed" and rows[failing.id].error == "boom at step 1"
    assert rows[failing.id].error_type == "ValueError"
    again = rows[resumed.id]
    assert again.attempts == 2 and len(again.workers) >= 1 and again.last_checkpoint is not None
    assert rows[done[5].id].request == '{"steps":1,"delay":0.01}'
    assert rows[done[5].id].result == '{"count":1,"label":""}'
    assert all(rows[job.id].request is None for job in sweep)  # a sweep's entry holds no requests
    with HistoryStore(store_url) as history:
        assert sum(history.counts().values()) == len(ids)  # each once
        incremental = {job_id: history.get(job_id) for job_id in ids}
    # An empty store rebuilt from the streams comes to the same rows.
    rebuilt = store_url + "-rebuilt.db" if "://" not in store_url else None
    if rebuilt is not None:
        fresh = indexers(rebuilt)
        rows = wait_for_rows(rebuilt, lambda rows: rows == incremental, ids)
        assert fresh.stop() == 0
