"""The history indexer's Prometheus metrics: the pure parts (lag, the background reading), the
collector over an indexer fed by hand, the look at where the journal's streams end against the
real broker, and a real ``brokerexec history --metrics-port 0`` process with a worker."""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import brokerctl
import pika
import pytest
from prometheus_client import generate_latest
from test_history import IndexerProcess
from test_monitoring import _samples, scrape

from brokerexec import Client
from brokerexec.history import HistoryStore
from brokerexec.history.indexer import Indexer, written_at
from brokerexec.history.metrics import HistoryMetrics, Reading, lag_of, lag_seconds
from brokerexec.protocol.names import (
    CHECKPOINT_TYPE,
    LAUNCH_TYPE,
    LAUNCHES_TYPE,
    RECORD_TYPE,
    STARTED_TYPE,
    journal_stream_of_bucket,
)
from brokerexec.protocol.topology import journal_specs
from brokerexec.transport.pika.client import connection_parameters
from brokerexec.transport.pika.journal_tail import TailEntry, stream_ends

WAIT = 60.0
S0, S1 = journal_stream_of_bucket(0), journal_stream_of_bucket(1)


# ---- the pure parts --------------------------------------------------------------------------------


def test_lag_is_each_stream_end_less_the_stored_offset_never_below_zero() -> None:
    assert lag_of({S0: 10, S1: 4}, {S0: 7}) == {S0: 3, S1: 4}  # S1: nothing stored yet
    assert lag_of({S0: 10}, {S0: 12}) == {S0: 0}  # stored past an older look at the end
    assert lag_of({}, {S0: 3}) == {}


def test_lag_in_seconds_is_zero_when_caught_up_else_the_newest_entry_age() -> None:
    assert lag_seconds({S0: 0, S1: 0}, 100.0, 130.0) == 0.0
    assert lag_seconds({}, 0.0, 130.0) == 0.0
    assert lag_seconds({S0: 2}, 100.0, 130.0) == 30.0
    assert lag_seconds({S0: 2}, 0.0, 130.0) is None  # behind, and nothing stored yet: unknown
    assert lag_seconds({S0: 2}, 140.0, 130.0) == 0.0  # a writer's clock ahead


def test_an_entry_says_when_it_was_written_by_its_kind() -> None:
    assert written_at(LAUNCH_TYPE, {"sent": 5}) == 5.0
    assert written_at(LAUNCHES_TYPE, {"sent": 6.5}) == 6.5
    assert written_at(STARTED_TYPE, {"time": 7}) == 7.0
    assert written_at(CHECKPOINT_TYPE, {"time": 8}) == 8.0
    assert written_at(RECORD_TYPE, {"start": 1, "end": 9}) == 9.0
    assert written_at(RECORD_TYPE, {"end": True}) == 0.0  # not a time
    assert written_at("brokerexec.probe", {"time": 3}) == 0.0


def test_a_reading_is_made_off_the_callers_thread_and_used_again_for_a_while() -> None:
    calls: list[str] = []

    def read() -> int:
        calls.append(threading.current_thread().name)
        return len(calls)

    reading = Reading(read, "test-reading", every=3600, wait=5)
    assert reading.get() == 1 and reading.get() == 1  # the second: the first, again
    assert calls == ["test-reading"]
    reading.every = 0
    assert reading.get() == 2


def test_a_reading_that_fails_is_none_and_one_that_hangs_gives_the_last_value() -> None:
    release = threading.Event()
    answers: list[Any] = [RuntimeError("store down"), 7, "hang", 8]

    def read() -> int:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        if answer == "hang":
            release.wait(WAIT)
            return 9
        return int(answer)

    reading = Reading(read, "test-reading", every=0, wait=0.2)
    assert reading.get() is None  # failed: unknown
    assert reading.get() == 7
    assert reading.get() == 7  # this read hangs: the last value, after 0.2 s
    assert reading.get() == 7 and answers == [8]  # and no second read meanwhile
    release.set()
    brokerctl.wait_until(lambda: reading.get() == 8, WAIT, "the next read")


# ---- the collector, over an indexer fed by hand ------------------------------------------------------


def test_the_metrics_count_what_the_indexer_took_in_and_the_rows_the_store_holds(tmp_path: Path) -> None:
    from test_history_store import Journal

    journal = Journal()
    now = time.time()
    ids = [journal.job(end=now - 30), journal.job(end=now - 20)]
    raw = [TailEntry(e.stream, e.offset, e.kind, e.job_id, "application/json", json.dumps(e.body).encode())
           for e in journal.entries]
    bad = TailEntry(raw[0].stream, 99, RECORD_TYPE, "job-x", "application/json", b"{not json")
    with HistoryStore(str(tmp_path / "h.db")) as store:
        store.migrate()
        indexer = Indexer(store, "amqp://guest:guest@127.0.0.1:1/")  # never answers: no lag known
        indexer._take([*raw, bad], {**journal.next, raw[0].stream: 100})
        indexer.answer(b"{}", "application/json")
        found = _samples(generate_latest(HistoryMetrics(indexer).registry).decode())
        assert {row.job_id for row in store.page().rows} == set(ids)
    assert found["brokerexec_history_entries_total"] == len(raw)
    assert found["brokerexec_history_skipped_total"] == 1.0
    assert found["brokerexec_history_row_writes_total"] == 2.0
    assert found["brokerexec_history_batches_total"] == 1.0
    assert found["brokerexec_history_queries_total"] == 1.0
    assert found["brokerexec_history_store_errors_total"] == 0.0
    assert found["brokerexec_history_store_seconds_total"] > 0.0
    assert found["brokerexec_history_connected"] == 0.0
    assert found['brokerexec_history_rows{service="fit",state="finished"}'] == 2.0
    assert found["brokerexec_history_newest_entry_timestamp_seconds"] == pytest.approx(now - 20)
    assert found["brokerexec_history_last_batch_timestamp_seconds"] >= now
    assert not any(name.startswith("brokerexec_history_lag") for name in found)  # unknown, not 0


# ---- against the real broker ---------------------------------------------------------------------------


@pytest.fixture
def journal(own_vhost: str) -> Iterator[Any]:
    """A raw pika channel on the test's own vhost."""
    connection = pika.BlockingConnection(pika.URLParameters(own_vhost))
    yield connection.channel()
    connection.close()


@pytest.mark.rabbitmq
def test_the_look_at_the_streams_ends_finds_the_newest_offset_of_each(own_vhost: str, journal: Any) -> None:
    parameters = connection_parameters(own_vhost, 10.0, "test-ends", 30)
    assert stream_ends(parameters) == {}  # no journal yet
    for spec in journal_specs():
        journal.queue_declare(spec.name, durable=True, arguments=dict(spec.arguments))
    assert stream_ends(parameters, 0.2) == {}  # empty streams send nothing
    # Given entries in two streams: a burst (a last chunk of many), and one chunk each
    for _ in range(30):
        journal.basic_publish("", S0, b"{}", pika.BasicProperties(type="x"))
    journal.confirm_delivery()  # from here each publish is confirmed, so are those before it
    journal.basic_publish("", S0, b"{}", pika.BasicProperties(type="x"))
    for _ in range(40):
        journal.basic_publish("", S1, b"{}", pika.BasicProperties(type="x"))
    # Then the look finds one past the newest of each, and nothing of the empty ones
    assert stream_ends(parameters) == {S0: 31, S1: 40}


def lag(found: dict[str, float]) -> float | None:
    """The sum of the streams' lag, None when the scrape has none (the look did not answer)."""
    values = [v for k, v in found.items() if k.startswith("brokerexec_history_lag_entries{")]
    return sum(values) if values else None


@pytest.mark.rabbitmq
@pytest.mark.timeout(180)
def test_a_history_process_serves_its_lag_rows_and_skipped_entries(
        own_vhost: str, tmp_path: Path, worker_process: Any, journal: Any) -> None:
    store = tmp_path / "history.db"
    worker_process("--concurrency", "4", services=("Counter",), url=own_vhost)  # makes the journal
    indexer = IndexerProcess(own_vhost, str(store), "--metrics-port", "0")
    try:
        [url] = [line.split()[-1] for line in indexer.lines if "metrics at http://127.0.0.1:" in line]
        found: dict[str, float] = {}

        def scraped(condition: Any) -> bool:
            found.clear()
            found.update(scrape(url))
            return bool(condition(found))

        def finished(n: int) -> Any:
            return lambda f: f.get('brokerexec_history_rows{service="counter",state="finished"}') == n

        with Client(own_vhost, timeout=10) as client:
            # When jobs run to their end
            for job in [client.launch("counter", {"steps": 2}) for _ in range(5)]:
                job.result(WAIT)
            # Then the store has caught up: every row, no lag
            brokerctl.wait_until(lambda: scraped(lambda f: finished(5)(f) and lag(f) == 0), WAIT,
                                 "five rows and no lag")
            assert found["brokerexec_history_entries_total"] >= 5 * 2  # a launch and a record each
            assert found["brokerexec_history_row_writes_total"] >= 5
            assert found["brokerexec_history_lag_seconds"] == 0.0
            assert found["brokerexec_history_connected"] == 1.0
            assert found["brokerexec_history_skipped_total"] == 0.0
            # When the store refuses writes (a lock held on the SQLite file) while more jobs end
            blocker = sqlite3.connect(store, timeout=30, isolation_level=None)
            blocker.execute("BEGIN EXCLUSIVE")
            try:
                for job in [client.launch("counter", {"steps": 2}) for _ in range(5)]:
                    job.result(WAIT)
                # Then the lag says how far behind the store is, in entries and in time
                brokerctl.wait_until(lambda: scraped(lambda f: (lag(f) or 0) >= 5 * 2), WAIT,
                                     "the lag to show the waiting entries")
                assert found["brokerexec_history_lag_seconds"] > 0.0
                brokerctl.wait_until(lambda: scraped(
                    lambda f: f["brokerexec_history_store_errors_total"] >= 1), WAIT, "a store error")
            finally:
                blocker.execute("ROLLBACK")
                blocker.close()
            # and once it takes writes again, the indexer catches up
            brokerctl.wait_until(lambda: scraped(lambda f: finished(10)(f) and lag(f) == 0), WAIT,
                                 "ten rows and no lag")
            assert found["brokerexec_history_reconnects_total"] >= 1
            entries = found["brokerexec_history_entries_total"]
        # When an entry that does not decode is written into a journal stream
        journal.basic_publish("", S0, b"{not json", pika.BasicProperties(
            type=RECORD_TYPE, content_type="application/json", message_id="job-undecodable"))
        # Then it is skipped, counted, and passed (no lag stays behind it)
        brokerctl.wait_until(lambda: scraped(
            lambda f: f["brokerexec_history_skipped_total"] == 1 and lag(f) == 0), WAIT, "the skip")
        assert found["brokerexec_history_entries_total"] == entries
        assert any("skipped" in line for line in indexer.lines)
    finally:
        code = indexer.stop()
    assert code == 0, "".join(indexer.lines)


def test_a_metrics_port_in_use_exits_2_naming_it(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "brokerexec", "history", "--broker", "amqp://guest:guest@127.0.0.1:1/",
             "--store", str(tmp_path / "h.db"), "--metrics-port", str(port)],
            capture_output=True, text=True, timeout=WAIT, check=False)
    assert done.returncode == 2, done.stderr
    assert f"cannot serve metrics on 127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in done.stderr
