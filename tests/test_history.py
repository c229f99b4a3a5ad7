"""The history indexer (``brokerexec history``) as users run it: a real broker, real worker and
indexer processes, real SIGKILLs; the store on SQLite and on the real PostgreSQL."""

from __future__ import annotations

import asyncio
import dataclasses
import json
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

from brokerexec import AsyncClient, Client, DecodeError, HistoryUnavailable, RemoteError, Timeout
from brokerexec.history import HistoryStore
from brokerexec.protocol.journal import started_entry
from brokerexec.protocol.messages import Launch, Record
from brokerexec.protocol.names import (
    HISTORY_EXCHANGE,
    HISTORY_QUEUE,
    LAUNCH_TYPE,
    RECORD_TYPE,
    STARTED_TYPE,
    journal_stream,
)
from brokerexec.protocol.states import JobState

pytestmark = [pytest.mark.rabbitmq, pytest.mark.timeout(240)]
ROOT = Path(__file__).resolve().parent.parent
WAIT = 60.0


class IndexerProcess:
    """``brokerexec history`` in a process of its own."""

    def __init__(self, broker: str, store: str, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "brokerexec", "history", "--broker", broker, "--store", store, *args],
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
def indexers(own_vhost: str) -> Iterator[Callable[..., IndexerProcess]]:
    started: list[IndexerProcess] = []

    def start(store: str, *args: str) -> IndexerProcess:
        started.append(IndexerProcess(own_vhost, store, *args))
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
        assert {rows[job.id].request for job in sweep} == {'{"steps":1}'}  # the sweep's entries hold them
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
    with HistoryStore(store_url) as history:
        assert sum(history.counts().values()) == len(ids)  # each once
        incremental = {job_id: history.get(job_id) for job_id in ids}
    # An empty store rebuilt from the streams comes to the same rows.
    rebuilt = store_url + "-rebuilt.db" if "://" not in store_url else None
    if rebuilt is not None:
        fresh = indexers(rebuilt)
        rows = wait_for_rows(rebuilt, lambda rows: rows == incremental, ids)
        assert fresh.stop() == 0


def brokerexec(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "brokerexec", *args], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, check=False)


def cli_json(*args: str, code: int = 0) -> Any:
    done = brokerexec(*args, "--json")
    assert done.returncode == code, (done.stdout, done.stderr)
    return json.loads(done.stdout)


def test_jobs_all_pages_through_the_store_with_filters_and_a_footer_that_never_hides_a_cap(
        own_vhost: str, worker_process: Callable[..., Any], indexers: Callable[..., IndexerProcess],
        tmp_path: Path) -> None:
    url = own_vhost
    worker_process("--concurrency", "4", services=("Counter",), url=url)
    with Client(url, timeout=10) as client:
        done = [client.launch("counter", {"steps": 1, "delay": 0.0001 * (n + 1)}) for n in range(7)]
        failing = client.launch("counter", {"steps": 3, "fail_at": 1})
        for job in done:
            job.result(WAIT)
        with pytest.raises(RemoteError):
            failing.result(WAIT)
    ids = {job.id for job in done}
    # No indexer yet: said on stderr, and the journal's last hour instead, as before
    fallback = brokerexec("jobs", "--all", "--broker", url, "--json")
    assert fallback.returncode == 0 and "no history indexer runs" in fallback.stderr
    listed = json.loads(fallback.stdout)
    assert listed["source"] == "journal" and ids <= {job["job_id"] for job in listed["jobs"]}
    store = str(tmp_path / "history.db")
    indexers(store)
    wait_for_rows(store, lambda rows: all(row is not None and row.state in ("finished", "failed")
                                          for row in rows.values()), [*ids, failing.id])
    page = cli_json("jobs", "--all", "--broker", url)
    assert page["source"] == "history" and page["total"] == 8 and page["cursor"] is None
    ended = [row["ended"] for row in page["jobs"]]
    assert ended == sorted(ended, reverse=True)  # newest first
    failed = cli_json("jobs", "--all", "--state", "failed", "--broker", url)
    assert [row["job_id"] for row in failed["jobs"]] == [failing.id] and failed["total"] == 1
    assert failed["jobs"][0]["error_type"] == "ValueError"
    found = cli_json("jobs", "--all", "--search", '"delay":0.0004', "--service", "counter", "--since", "1h",
                     "--broker", url)
    assert [row["job_id"] for row in found["jobs"]] == [done[3].id]
    assert cli_json("jobs", "--all", "--until", "2h", "--broker", url)["total"] == 0
    # pages of 3: every job once, and the footer says how many and how to go on
    seen: list[str] = []
    cursor: list[str] = []
    while True:
        part = cli_json("jobs", "--all", "--limit", "3", "--broker", url, *cursor)
        seen += [row["job_id"] for row in part["jobs"]]
        if part["cursor"] is None:
            break
        cursor = ["--cursor", part["cursor"]]
    assert sorted(seen) == sorted([*ids, failing.id])
    text = brokerexec("jobs", "--all", "--limit", "3", "--broker", url)
    assert text.returncode == 0 and "3 of 8 matching jobs, newest first; next page: --cursor " in text.stdout
    assert "ValueError" not in text.stdout and failing.id in brokerexec(
        "jobs", "--all", "--state", "failed", "--broker", url).stdout
    for bad in (["--since", "yesterday-ish"], ["--cursor", "nonsense"], ["--search", "x"]):
        all_flag = [] if bad[0] == "--search" else ["--all"]  # --search goes only with --all
        refused = brokerexec("jobs", *all_flag, *bad, "--broker", url)
        assert refused.returncode == 2 and refused.stderr.startswith("brokerexec: "), refused.stderr


FILLER = b"x" * (1 << 20)


def _roll(url: str, streams: set[str]) -> None:
    """Fill each stream past a segment (4 MB): a new segment starts, and retention is applied
    to the closed ones then."""
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        for stream in streams:
            for _ in range(5):
                channel.basic_publish("", stream, FILLER, pika.BasicProperties(type="test.filler"))
    finally:
        connection.close()


def _write_old_job(url: str, age: float) -> dict[str, Any]:
    """A job that ran ``age`` seconds ago, as its worker wrote it to the journal; its record."""
    import pika

    ran = time.time() - age
    launch = dataclasses.replace(Launch.new("counter", {"steps": 1}), sent=ran)
    job_id = launch.job_id
    record = Record(job_id, "counter", JobState.FINISHED, {"count": 1, "label": "old"}, None, ran + 1,
                    ran + 60, {"hostname": "old-host", "pid": 1})
    entries = [(LAUNCH_TYPE, launch.encode()),
               (STARTED_TYPE, started_entry(job_id, "counter", 1, {"hostname": "old-host"}, ran + 1)),
               (RECORD_TYPE, record.encode())]
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        for kind, body in entries:
            channel.basic_publish("", journal_stream(job_id), json.dumps(body).encode(), pika.BasicProperties(
                content_type="application/json", message_id=job_id, type=kind, delivery_mode=2))
    finally:
        connection.close()
    return record.encode()


def test_a_week_old_job_is_served_by_the_store_after_the_journal_dropped_it(
        own_vhost: str, worker_process: Callable[..., Any], indexers: Callable[..., IndexerProcess],
        tmp_path: Path) -> None:
    url, store = own_vhost, str(tmp_path / "history.db")
    # Both retentions lowered: the journal keeps entries 10 s (its streams made so by the
    # worker), the store keeps rows a day at the end.
    worker_process("--journal-max-age", "10", services=("Counter",), url=url)
    week_old = _write_old_job(url, 7 * 86400)
    with Client(url, timeout=10) as client:
        recent = client.launch("counter", {"steps": 2})
        recent_record = recent.record(WAIT)
    assert recent_record is not None
    jobs = {week_old["job_id"]: week_old, recent.id: recent_record}
    indexer = indexers(store)
    wait_for_rows(store, lambda rows: all(row is not None and row.state == "finished"
                                          for row in rows.values()), list(jobs))
    assert indexer.stop() == 0
    streams = {journal_stream(job_id) for job_id in jobs}
    _roll(url, streams)  # what holds the jobs' entries is a closed segment now
    closed = time.time()
    brokerctl.wait_until(lambda: time.time() > closed + 11, 30, "the closed segments to age past 10 s")
    _roll(url, streams)  # the next roll drops them

    def journal_forgot() -> bool:
        return all(brokerexec("status", job_id, "--broker", url).returncode == 3 for job_id in jobs)

    brokerctl.wait_until(journal_forgot, 30, "the journal to drop both jobs (no indexer runs)")
    indexers(store)
    for job_id, record in jobs.items():
        assert cli_json("result", job_id, "--broker", url) == record
        status = cli_json("status", job_id, "--broker", url)
        assert status["state"] == "finished" and status["record"] == record
        with Client(url, timeout=10) as client:
            assert client.job(job_id).result(5) == record["result"]
            assert client.job(job_id).status()["state"] == "finished"
    listed = cli_json("jobs", "--all", "--search", week_old["job_id"], "--broker", url)
    assert [row["workers"] for row in listed["jobs"]] == [["old-host"]]
    # The store's retention lowered to a day: the week-old row is pruned, the recent one kept.
    indexers(store, "--keep", "86400")
    brokerctl.wait_until(lambda: rows_of(store, [week_old["job_id"]])[week_old["job_id"]] is None, WAIT,
                         "the week-old row to be pruned")
    assert brokerexec("status", week_old["job_id"], "--broker", url).returncode == 3
    assert cli_json("result", recent.id, "--broker", url) == recent_record


def test_a_store_that_is_down_is_said_within_a_second_and_holds_nothing_else_up(
        own_vhost: str, worker_process: Callable[..., Any], indexers: Callable[..., IndexerProcess],
        postgres_url: str, postgres_server: str) -> None:
    import psycopg

    url, database = own_vhost, postgres_url.rsplit("/", 1)[1]
    worker_process(services=("Counter",), url=url)
    indexers(postgres_url)

    def store_up(up: bool) -> None:
        with psycopg.connect(postgres_server, autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS {str(up).lower()}')
            if not up:  # and the indexer's open connections go too
                admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                              (database,))

    try:
        with Client(url, timeout=10) as client:
            before = client.launch("counter", {"steps": 1})
            before.result(WAIT)
            brokerctl.wait_until(lambda: client.history(count=True).total == 1, WAIT, "the first row")
            store_up(False)
            started = time.monotonic()
            with pytest.raises(HistoryUnavailable, match="cannot answer now"):
                client.history()
            assert time.monotonic() - started < 1.0
            # launching, steering, status and result go on without it
            during = client.launch("counter", {"steps": 2})
            assert during.result(WAIT) == {"count": 2, "label": ""}
            listed = brokerexec("jobs", "--all", "--broker", url, "--json")
            assert listed.returncode == 0 and "cannot answer now" in listed.stderr
            assert json.loads(listed.stdout)["source"] == "journal"
        with Client(url, timeout=10) as fresh:  # a status of an ended job: from the journal
            started = time.monotonic()
            assert fresh.job(before.id).status()["state"] == "finished"
            assert time.monotonic() - started < 3.0
            store_up(True)
            brokerctl.wait_until(lambda: fresh.history(count=True).total == 2, WAIT,
                                 "the indexer to catch up once the store is back")
    finally:
        store_up(True)


@pytest.mark.fault
def test_ingest_rides_out_a_broker_restart_with_every_job_once(
        own_vhost: str, store_url: str, worker_process: Callable[..., Any],
        indexers: Callable[..., IndexerProcess]) -> None:
    url = own_vhost
    worker_process("--concurrency", "4", "--heartbeat", "2", services=("Counter",), url=url)
    indexer = indexers(store_url)
    with Client(url, timeout=10) as client:
        before = [client.launch("counter", {"steps": 20 + n, "delay": 0.1}) for n in range(12)]
        brokerctl.wait_until(lambda: client.history(state="running").rows != [], WAIT,
                             "a running job in the store")
        with brokerctl.app_stopped():  # jobs end meanwhile: their records wait in the workers
            pass
        after = [client.launch("counter", {"steps": 2}) for _ in range(8)]
        for job in [*before, *after]:
            job.result(WAIT)
        ids = [job.id for job in (*before, *after)]
        rows = wait_for_rows(store_url, lambda rows: all(row is not None and row.state == "finished"
                                                         for row in rows.values()), ids)
        assert all(rows[job.id].result == json.dumps({"count": 20 + n, "label": ""}, separators=(",", ":"))
                   for n, job in enumerate(before))
        # the indexer answers again on the broker, and holds each job once
        def every_job_once() -> bool:
            try:
                return client.history(count=True).total == len(ids)
            except (HistoryUnavailable, Timeout):  # its query connection is back a little later
                return False

        brokerctl.wait_until(every_job_once, WAIT, "the indexer to answer with every job once")
    with HistoryStore(store_url) as history:
        assert sum(history.counts().values()) == len(ids)
    assert indexer.process.poll() is None  # it rode it out
    assert indexer.stop() == 0


def test_an_older_indexer_or_no_history_exchange_is_met_as_no_indexer(own_vhost: str) -> None:
    """A client of this version sends its queries through the exchange ``brokerexec.history``:
    an indexer older than it (its queue not bound there), or no such exchange at all (404
    NOT_FOUND on publish), is ``HistoryUnavailable`` at once, never an error of its own, over
    pika and over aio-pika alike."""
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(own_vhost))
    try:
        channel = connection.channel()
        channel.exchange_declare(HISTORY_EXCHANGE, "direct", durable=True)  # a worker of this version
        channel.queue_declare(HISTORY_QUEUE, auto_delete=True)  # an older indexer, bound to nothing
        channel.basic_consume(HISTORY_QUEUE, lambda *_: None, auto_ack=True)
        with Client(own_vhost, timeout=10) as client:
            began = time.monotonic()
            with pytest.raises(HistoryUnavailable, match="no history indexer"):
                client.history()
            channel.exchange_delete(HISTORY_EXCHANGE)  # no worker or indexer of this version
            with pytest.raises(HistoryUnavailable, match="no history indexer"):
                client.history()
            assert time.monotonic() - began < 5  # at once, not timed out

        async def asked_without_the_exchange() -> None:
            async with AsyncClient(own_vhost, timeout=10) as aclient:  # declares it on connecting
                channel.exchange_delete(HISTORY_EXCHANGE)
                with pytest.raises(HistoryUnavailable, match="no history indexer"):
                    await aclient.history()

        asyncio.run(asked_without_the_exchange())
    finally:
        connection.close()


def test_an_operations_status_comes_at_once_from_the_store_when_an_indexer_runs(
        own_vhost: str, tmp_path: Path, worker_process: Callable[..., Any],
        indexers: Callable[..., IndexerProcess]) -> None:
    worker_process("--concurrency", "4", services=("Counter",), url=own_vhost)
    indexers(str(tmp_path / "history.db"))
    requests = [{"steps": 2 + n, "fail_at": 0 if n % 5 == 0 else -1} for n in range(30)]
    with Client(own_vhost, timeout=10) as client:
        with client.operation("counter", requests) as op:
            status = op.wait(WAIT)
        assert (status.counts["finished"], status.counts["failed"]) == (24, 6)
        brokerctl.wait_until(lambda: client.operation_counts(op.id) == {"finished": 24, "failed": 6}, WAIT,
                             "the store to count the operation's jobs")
        # listed, and found by name, by the store alone (as once the journal has dropped it)
        from brokerexec.client import operation_index

        recent, operation_index.STORE_LAG = operation_index.STORE_LAG, 0.0
        journal, client.transport.find_operations = client.transport.find_operations, lambda *_: []
        try:
            assert [row["id"] for row in client.operations(name=op.name)] == [op.id]
            assert client.operation_plan("counter", requests, name=op.name).counts()["rerun"] == 6
        finally:
            operation_index.STORE_LAG, client.transport.find_operations = recent, journal
    done = subprocess.run([sys.executable, "-m", "brokerexec", "op", "status", op.id, "--json",
                           "--broker", own_vhost], capture_output=True, text=True, timeout=WAIT)
    document = json.loads(done.stdout)
    assert document["from"] == "history" and (document["total"], document["done"]) == (30, 30)
    assert (document["counts"]["finished"], document["counts"]["failed"]) == (24, 6)
    forced = subprocess.run([sys.executable, "-m", "brokerexec", "op", "status", op.id, "--journal", "--json",
                             "--broker", own_vhost], capture_output=True, text=True, timeout=WAIT)
    assert json.loads(forced.stdout)["from"] == "journal"
    # `op abort` sends its one control message with what the store knows: no journal read
    long_ones = [{"steps": 10**6 + n, "delay": 0.01} for n in range(4)]
    with Client(own_vhost, timeout=10) as client, client.operation("counter", long_ones) as running:
        brokerctl.wait_until(lambda: client.operation_counts(running.id).get("running") == 4, WAIT,
                             "the store to see the operation's 4 jobs running")
        aborted = subprocess.run([sys.executable, "-m", "brokerexec", "op", "abort", running.id, "--json",
                                  "--broker", own_vhost], capture_output=True, text=True, timeout=WAIT)
        assert json.loads(aborted.stdout) == {"id": running.id, "abort": 4, "from": "history"}, aborted.stderr
        assert running.wait(WAIT).counts["aborted"] == 4
