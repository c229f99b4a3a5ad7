"""The history store embedded with a memory broker (``keep_history("memory://NAME", STORE)``):
jobs run on the in-memory transport, ``client.history()`` pages through them as over RabbitMQ
(there: ``tests/test_history.py``), and a store that fails or hangs never holds up a launch."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import brokerctl
import pytest
import sample_services

from brokerexec import (
    AsyncClient,
    Client,
    ConfigurationError,
    DecodeError,
    HistoryUnavailable,
    Job,
    RemoteError,
    ServiceRegistry,
    Timeout,
    Worker,
    WorkerSettings,
)
from brokerexec.client.embedded import embedded_worker
from brokerexec.history import Entry, HistoryStore
from brokerexec.history.embedded import MemoryHistory, keep_history
from brokerexec.protocol.history import HistoryQuery
from brokerexec.transport.memory.broker import MemoryBroker
from brokerexec.transport.memory.clients import MemoryClientTransport
from brokerexec.transport.memory.worker import MemoryWorkerTransport
from brokerexec.worker import host_info

pytestmark = pytest.mark.timeout(60)
WAIT = 20.0


def _name() -> str:
    return f"history-{uuid.uuid4().hex}"


def _history(broker: MemoryBroker) -> MemoryHistory:
    assert isinstance(broker.history, MemoryHistory)
    return broker.history


@pytest.fixture(params=["file", "in-memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A store's URL: a SQLite file, or an in-memory SQLite database (``sqlite://``)."""
    return str(tmp_path / "history.db") if request.param == "file" else "sqlite://"


@pytest.fixture
def client(store: str) -> Iterator[Client]:
    url = f"memory://{_name()}"
    history = keep_history(url, store)
    try:
        with Client(url, services=sample_services.ALL, concurrency=8) as client:
            yield client
    finally:
        history.close()


def _run_some(client: Client) -> dict[str, list[str]]:
    """Three counters, one that fails, a sweep of four echoes; their ids by what they are."""
    counters = [client.launch("counter", {"steps": 5 + n}) for n in range(3)]
    failing = client.launch("counter", {"steps": 10, "fail_at": 2})
    sweep = client.launch_many("echo", [{"value": f"sweep-{n}"} for n in range(4)])
    for job in counters + sweep:
        job.result(WAIT)
    with pytest.raises(RemoteError, match="boom at step 2"):
        failing.result(WAIT)
    return {"counters": [j.id for j in counters], "failing": [failing.id], "sweep": [j.id for j in sweep]}


def test_a_memory_client_pages_through_every_job_it_ran(client: Client) -> None:
    # Given jobs that ended on a memory broker with a history store
    ids = _run_some(client)
    # When the client asks for its history, right after their results
    page = client.history(count=True)
    # Then every job is there once, newest first, in the shape a RabbitMQ indexer's page has
    assert page.total == 8 and page.cursor is None
    assert sorted(row["job_id"] for row in page.rows) == sorted(i for some in ids.values() for i in some)
    ended = [row["ended"] for row in page.rows]
    assert ended == sorted(ended, reverse=True)
    counter = next(row for row in page.rows if row["job_id"] == ids["counters"][0])
    assert counter["state"] == "finished" and counter["service"] == "counter"
    assert counter["attempts"] == 1 and counter["workers"] == [host_info()["hostname"]]
    assert (counter["request"], counter["request_bytes"]) == ('{"steps":5}', 11)
    assert counter["result"] == '{"count":5,"label":""}'
    assert counter["launched"] <= counter["started"] <= counter["ended"]
    assert counter["run_time"] == pytest.approx(counter["ended"] - counter["started"])
    failed = next(row for row in page.rows if row["job_id"] == ids["failing"][0])
    assert (failed["state"], failed["error_type"]) == ("failed", "ValueError")
    assert failed["error"] == "boom at step 2"
    # a sweep's rows have their requests, as over RabbitMQ (from one launches entry for them all)
    swept = [row for row in page.rows if row["job_id"] in ids["sweep"]]
    assert sorted(row["request"] for row in swept) == [f'{{"value":"sweep-{n}"}}' for n in range(4)]
    assert all(row["launched"] for row in swept)


def test_filters_and_cursor_paging(client: Client) -> None:
    ids = _run_some(client)
    assert {row["job_id"] for row in client.history(service="echo").rows} == set(ids["sweep"])
    assert [row["job_id"] for row in client.history(state="failed").rows] == ids["failing"]
    assert client.history(service="counter", state="finished", count=True).total == 3
    assert [row["job_id"] for row in client.history(text="sweep-2").rows] == [ids["sweep"][2]]
    assert [row["job_id"] for row in client.history(text="boom").rows] == ids["failing"]
    assert client.history(worker=host_info()["hostname"], count=True).total == 8
    assert client.history(worker="elsewhere").rows == []
    assert client.history(since=time.time() + 60).rows == []
    # pages of three: every job once, in the order of one whole page
    whole = [row["job_id"] for row in client.history(limit=100).rows]
    paged: list[str] = []
    cursor = None
    while True:
        page = client.history(limit=3, cursor=cursor)
        paged += [row["job_id"] for row in page.rows]
        if page.cursor is None:
            break
        cursor = page.cursor
    assert paged == whole and len(paged) == 8
    with pytest.raises(DecodeError, match="cursor"):
        client.history(cursor="not-a-cursor")


def _running(job: Job) -> None:
    brokerctl.wait_until(lambda: job.status()["state"] == "running", WAIT, f"job {job.id} to run")


def test_running_and_aborted_jobs_have_their_state(client: Client) -> None:
    job = client.launch("forever", {"tick": 0.005})
    _running(job)
    assert [row["state"] for row in client.history(service="forever").rows] == ["running"]
    job.abort()
    job.record(WAIT)
    assert [row["state"] for row in client.history(service="forever").rows] == ["aborted"]


def test_a_job_cancelled_while_queued_is_aborted_with_its_reason(tmp_path: Path) -> None:
    url = f"memory://{_name()}"
    history = keep_history(url, str(tmp_path / "history.db"))
    try:
        with Client(url, services=sample_services.ALL, concurrency=1) as client:
            running = client.launch("forever", {"tick": 0.005})
            _running(running)
            queued = client.launch("counter", {"steps": 5})  # waits: the one slot is taken
            assert queued.abort() is True
            (row,) = client.history(service="counter").rows
            assert (row["state"], row["reason"]) == ("aborted", "cancelled while queued")
            assert row["request"] == '{"steps":5}' and row["error"] is None
            running.abort()
    finally:
        history.close()


def test_checkpoints_are_noted(client: Client) -> None:
    job = client.launch("steps", {"steps": 30, "delay": 0.01}, checkpoint_delta=0.05)
    job.result(WAIT)
    (row,) = client.history(service="steps").rows
    assert row["last_checkpoint"] is not None and row["started"] <= row["last_checkpoint"] <= row["ended"]


def test_a_file_store_keeps_the_jobs_after_the_client_closed(tmp_path: Path) -> None:
    path = tmp_path / "kept.db"
    url = f"memory://{_name()}"
    history = keep_history(url, str(path))
    with Client(url, services=sample_services.ALL) as client:
        job = client.launch("echo", {"value": "kept"})
        job.result(WAIT)
    # the client's close waited for the store: the row is there, read from another connection
    with HistoryStore(str(path)) as store:
        row = store.get(job.id)
        assert row is not None and row.state == "finished" and row.result == '"kept"'
        assert store.offsets() == {url: 3}  # after its launch, started and record entries
    history.close()


def test_the_async_client_pages_the_same(store: str) -> None:
    url = f"memory://{_name()}"
    history = keep_history(url, store)

    async def main() -> None:
        async with AsyncClient(url, services=sample_services.ALL, concurrency=4) as client:
            jobs = await client.launch_many("echo", [{"value": n} for n in range(5)])
            await asyncio.gather(*(job.result(timeout=WAIT) for job in jobs))
            first = await client.history(limit=2, count=True)
            assert first.total == 5 and len(first.rows) == 2 and first.cursor is not None
            rest = await client.history(limit=10, cursor=first.cursor)
            assert {row["job_id"] for row in first.rows + rest.rows} == {job.id for job in jobs}
            assert (await client.history(state="failed")).rows == []
            with pytest.raises(DecodeError, match="cursor"):
                await client.history(cursor="not-a-cursor")

    try:
        asyncio.run(main())
    finally:
        history.close()


def test_a_memory_broker_without_a_store_says_how_to_have_one() -> None:
    with (Client(f"memory://{_name()}", services=sample_services.ALL) as client,
          pytest.raises(HistoryUnavailable, match="keep_history")):
        client.history()


def test_one_store_per_broker(tmp_path: Path) -> None:
    url = f"memory://{_name()}"
    history = keep_history(url, str(tmp_path / "a.db"))
    try:
        # the same store again: the same keeper; another: refused
        assert keep_history(url, str(tmp_path / "a.db")) is history
        assert keep_history(MemoryBroker.of_url(url), history.store) is history
        with pytest.raises(ConfigurationError, match=r"keeps its history elsewhere already \(sqlite:///"):
            keep_history(url, str(tmp_path / "b.db"))
    finally:
        history.close()
    # closed, it lets go of the broker: another may keep its history now
    assert MemoryBroker.of_url(url).history is None
    keep_history(url, "sqlite://").close()
    with pytest.raises(ConfigurationError, match="unsupported history store"):
        keep_history(url, "mysql://db/history")
    with pytest.raises(ConfigurationError, match="not a memory:// URL"):
        keep_history("amqp://guest:guest@127.0.0.1/", "sqlite://")


class _Gated(HistoryStore):
    """A store whose ingest hangs until the test opens its gate."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.entered, self.gate = threading.Event(), threading.Event()

    def ingest(self, entries: Sequence[Entry], reached: Mapping[str, int]) -> int:
        self.entered.set()
        self.gate.wait(WAIT)
        return super().ingest(entries, reached)


def test_a_hung_store_holds_up_no_launch(tmp_path: Path) -> None:
    # Given a broker whose history store hangs (a broker of its own, and a worker on it)
    store = _Gated(str(tmp_path / "hung.db"))
    broker = MemoryBroker(_name())
    history = MemoryHistory(store, broker)
    worker = Worker(MemoryWorkerTransport(broker, host_info()), ServiceRegistry(sample_services.ALL),
                    WorkerSettings(concurrency=4)).start()
    client = Client(f"memory://{broker.name}", transport=MemoryClientTransport(broker))
    try:
        client.launch("echo", {"value": 1}).result(WAIT)
        assert store.entered.wait(WAIT)  # the history thread is stuck in the store from here on
        # When jobs are launched, steered and end
        jobs = [client.launch("counter", {"steps": 5}) for _ in range(5)]
        job = client.launch("forever", {"tick": 0.005})
        _running(job)
        assert job.set(value=3) == {"value": 3}
        assert job.abort() is True
        # Then they run as ever, and only history waits: a query says so within its timeout
        assert [j.result(WAIT)["count"] for j in jobs] == [5] * 5
        assert job.record(WAIT)["state"] == "aborted"  # type: ignore[index]
        assert history.stats.entries == 0
        with pytest.raises(Timeout, match=r"did not answer within 0\.2 s"):
            client.history(timeout=0.2)
        # and once the store moves again, every job is in it
        store.gate.set()
        assert client.history(count=True).total == 7
    finally:
        worker.stop(grace=0)
        client.close()
        history.close()
        store.close()


def test_a_failing_store_holds_up_no_launch_and_gets_every_entry_once_it_works(tmp_path: Path) -> None:
    # Given a store that cannot be opened (its folder does not exist yet)
    folder = tmp_path / "not-yet"
    url = f"memory://{_name()}"
    history = keep_history(url, str(folder / "history.db"))
    try:
        with Client(url, services=sample_services.ALL, concurrency=4) as client:
            # When jobs run, they run, and history says it is unavailable
            jobs = client.launch_many("echo", [{"value": n} for n in range(10)])
            assert [job.result(WAIT) for job in jobs] == list(range(10))
            with pytest.raises(HistoryUnavailable, match="cannot be used now"):
                client.history()
            assert history.stats.store_errors >= 1 and history.stats.entries == 0
            # Then, the store reachable again, it holds every job (the entries were kept)
            folder.mkdir()
            page = client.history(count=True)
            assert page.total == 10 and {row["state"] for row in page.rows} == {"finished"}
            # a launches entry, 10 started, 10 records
            assert history.stats.entries == 21 and history.stats.dropped == 0
    finally:
        history.close()


def test_a_job_handed_over_has_both_attempts(tmp_path: Path) -> None:
    url = f"memory://{_name()}"
    history = keep_history(url, str(tmp_path / "history.db"))
    first = embedded_worker(url, sample_services.ALL, 2, None)
    broker = MemoryBroker.of_url(url)
    with Client(url, transport=MemoryClientTransport(broker)) as client:
        job = client.launch("steps", {"steps": 200, "delay": 0.01})
        brokerctl.wait_until(lambda: job.invoke("position") >= 20, WAIT, "the job to get going")
        second = Worker(MemoryWorkerTransport(broker, host_info()), ServiceRegistry(sample_services.ALL),
                        WorkerSettings(concurrency=2)).start()
        try:
            first.stop(grace=10)  # hands the job over, with its checkpoint
            job.result(WAIT)
        finally:
            second.stop(grace=0)
        row = client.history(service="steps").rows[0]
        assert (row["state"], row["attempts"]) == ("finished", 2)
        assert row["last_checkpoint"] is not None
    history.close()


def test_a_lookup_of_one_job_gives_its_row_and_record(client: Client) -> None:
    job = client.launch("echo", {"value": "one"})
    job.result(WAIT)
    broker = MemoryBroker.of_url(client.url)
    page = broker.ask_history(HistoryQuery(job_id=job.id, record=True)).result(WAIT)
    assert page.total == 1 and page.rows[0]["job_id"] == job.id
    assert page.rows[0]["record"]["result"] == "one"
    assert broker.ask_history(HistoryQuery(job_id="0" * 32)).result(WAIT).rows == []


def test_a_closed_history_commits_what_it_was_given_and_closes_its_own_store(tmp_path: Path) -> None:
    history = keep_history(f"memory://{_name()}", str(tmp_path / "own.db"))
    history.note("brokerexec.launch", {"job_id": "a" * 32, "service": "echo", "sent": 1.0}, "a" * 32)
    history.close()
    assert history.stats.entries == 1
    with pytest.raises(HistoryUnavailable, match="closed"):
        history.ask(HistoryQuery()).result(WAIT)
    assert history.flushed().result(0) is None
    with HistoryStore(str(tmp_path / "own.db")) as again:
        assert again.get("a" * 32) is not None


def test_a_history_store_named_in_the_memory_url_keeps_the_jobs(tmp_path: Path) -> None:
    path = tmp_path / "from-url.db"
    url = f"memory://{_name()}?history={path}"
    with Client(url, services=sample_services.ALL) as client:
        job = client.launch("echo", {"value": "by url"})
        job.result(WAIT)
        assert [row["job_id"] for row in client.history().rows] == [job.id]
    history = _history(MemoryBroker.of_url(url))
    try:
        with HistoryStore(str(path)) as store:
            row = store.get(job.id)
            assert row is not None and row.result == '"by url"'
    finally:
        history.close()


def test_an_in_memory_store_is_one_database_for_every_thread() -> None:
    with HistoryStore("sqlite://") as store:
        store.migrate()  # on this thread
        found: list[object] = []
        reader = threading.Thread(target=lambda: found.append(store.page(limit=5).rows))
        reader.start()
        reader.join(10)
        assert found == [[]]  # the tables the migration made, not another, empty, database
        store.ingest([], {"s": 3})
        assert store.offsets() == {"s": 3}


def test_an_operations_jobs_are_counted_by_state_from_the_store(client: Client) -> None:
    from brokerexec.errors import DecodeError
    from brokerexec.protocol.names import new_job_id

    requests = [{"steps": 2 + n, "fail_at": 0 if n % 3 == 0 else -1} for n in range(9)]
    with client.operation("counter", requests) as op:
        status = op.wait(WAIT)
        counts = client.operation_counts(op.id)  # once every entry noted so far is in the store
        assert counts == {"finished": status.counts["finished"], "failed": status.counts["failed"]} == {
            "finished": 6, "failed": 3}
        rows = client.history(operation=op.id, limit=50).rows
        assert sorted(row["item_key"] for row in rows) == sorted(item.key for item in op.items())
    assert client.operation_counts(new_job_id()) == {}
    with pytest.raises(DecodeError, match="only an operation's jobs"):
        HistoryQuery(by_state=True)


def test_operations_are_listed_and_found_by_name_from_the_store(
        client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    from brokerexec.client import operation_index

    with client.operation("counter", [{"steps": 2}, {"steps": 3}], name="kept") as op:
        op.wait(WAIT)
    with client.operation("counter", [{"steps": 4}], name="other") as other:
        other.wait(WAIT)
    # the store alone (the journal says nothing): every operation older than no time at all
    monkeypatch.setattr(operation_index, "STORE_LAG", 0.0)
    monkeypatch.setattr(client.transport, "find_operations", lambda since, limit, timeout: [])
    found = client.operations()
    assert [row["id"] for row in found] == [other.id, op.id]  # newest first
    assert found[1]["name"] == "kept" and found[1]["expected"] == 2 and found[1]["service"] == "counter"
    assert [row["id"] for row in client.operations(name="kept")] == [op.id]
    assert client.operations(service="echo") == []
    assert [row["id"] for row in client.operations(limit=1)] == [other.id]
    # a resume by name finds it there too
    assert client.operation_plan("counter", [{"steps": 2}], name="kept").operation == op.id
    with pytest.raises(DecodeError, match="only operations"):
        HistoryQuery(name="kept")
    with pytest.raises(DecodeError, match="not by state"):
        HistoryQuery(operations=True, state="failed")
