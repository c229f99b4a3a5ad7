"""The history store at a million jobs (issue 21), beside the same questions asked of the journal.

    python -m bench.bench_history [--jobs 1000000] [--stores sqlite,postgresql] [--quick]

One run, in a RabbitMQ vhost of its own (made with ``rabbitmqctl``, deleted at the end; the
journal's streams declared by brokerexec's own topology, as a worker declares them):

* **write**: ``--jobs`` jobs' journal entries, a ``launch`` and a ``record`` each, written
  with raw pika by ``--writers`` processes (no confirms but one per stream at the end); a
  job's record follows its launch by ``LAG`` other jobs, so the two land in different
  batches of the indexer, as those of jobs that ran a while do. Ten services (30% to 2%),
  90% finished, 8% failed (with a traceback), 2% aborted; ends spread over the last 7 days;
  each request names one of 50,000 datasets (the text searched for).
* **journal** (the baseline: what answers today): ``Job.status()`` and ``Job.record()`` of
  random ended jobs and of the newest one (the journal read back from its end), and
  ``client.listing(ended_within=3600)``, i.e. ``brokerexec jobs --all``.
* then for each store (a SQLite file in a temporary folder; a PostgreSQL database of its
  own, dropped at the end), with ``brokerexec history --store ...`` running:

  - **ingest**: from the indexer's start until the offsets it commits reach every stream's
    end: entries a second (target 10,000), and how much of it the indexer spent decoding,
    folding and committing (its ``store_seconds`` metric);
  - **look-ups**: ``HistoryStore.get`` of random jobs (target 10 ms p50), the same through
    the broker, ``HistoryQuery(job_id=...)`` (30 ms), and ``Job.status()``/``Job.record()``
    (which ask the store before the journal);
  - **pages** of 50 (target 50 ms), at the store and through the broker: a service and a
    state, page 2 of it by its cursor, a text search (one dataset's jobs), the newest 1,000
    of the last hour with their count (what ``jobs --all`` answers); **counts** by service
    and state (200 ms);
  - **fresh**: while ``--fresh-rate`` jobs a second end (launch, then its record a second
    later, written by another process) for ``--fresh-seconds``: from a record's write to
    the commit of its row (target 1 s p99). The store commits each batch's rows with the
    offsets its entries reach, in one transaction; the bench knows each record's offset (it
    is the only writer) and polls the committed offsets every 10 ms: the first poll that
    sees an offset past the record is when its row was there (at most one poll late);
  - **bytes** per job: the SQLite file (WAL checkpointed) or PostgreSQL's
    ``pg_total_relation_size`` of the tables, over the rows.

  On a PostgreSQL server that runs without autovacuum, the bench does for the store's
  database what autovacuum would with its default settings (:func:`autovacuum`), and says so.

``--quick`` runs 20,000 jobs and fewer look-ups: a smoke run of a minute or two.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import multiprocessing
import os
import random
import shutil
import signal
import socket
import sys
import tempfile
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pika

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._harness import (
    DEFAULT_URL,
    Row,
    broker_lock,
    isolated_vhost,
    percentiles,
    report,
    subprocess_server,
)
from brokerexec import codec
from brokerexec.protocol.messages import Launch, Record
from brokerexec.protocol.names import JSON_CONTENT_TYPE, LAUNCH_TYPE, RECORD_TYPE, journal_stream, new_job_id
from brokerexec.protocol.states import JobState

#: The PostgreSQL server the store's database is made on (trust auth, a user that may create
#: databases); the same default as the test suite's.
POSTGRES_URL = os.environ.get("BROKEREXEC_BENCH_POSTGRES_URL",
                              os.environ.get("BROKEREXEC_TEST_POSTGRES_URL",
                                             "postgresql://postgres@127.0.0.1:5432/postgres"))
#: A job's record is written this many jobs after its launch (per writer).
LAG = 2000
SERVICES = ("fit", "scan", "render", "train", "etl", "report", "sim", "align", "index", "backup")
WEIGHTS = (30, 20, 12, 10, 8, 6, 5, 4, 3, 2)
DATASETS = 50_000
SPREAD = 7 * 86400.0  # ends over the last week
ERRORS = ("ValueError", "RuntimeError", "TimeoutError", "numpy.linalg.LinAlgError")
TRACEBACK = ("Traceback (most recent call last):\n"
             '  File "/srv/app/services/fit.py", line 212, in run\n    self.step(handler)\n'
             '  File "/srv/app/services/fit.py", line 187, in step\n    raise ValueError(msg)\n')
#: The service and state of the filtered page: 10% and 8% of the jobs.
PAGE_SERVICE, PAGE_STATE = "train", "failed"
#: Seconds of calls one figure may take (slow ones get fewer samples).
BUDGET = 60.0
#: Arguments of ``run_all --quick``.
QUICK = ["--quick"]


# ---- the journal's entries ------------------------------------------------------------------


def _job(rng: random.Random, now: float, spread: float = SPREAD) -> tuple[str, str, bytes, bytes]:
    """A new ended job (ended up to ``spread`` s before ``now``): its id, dataset, and its
    launch and record entries' bodies."""
    job_id = new_job_id()
    service = rng.choices(SERVICES, WEIGHTS)[0]
    end = now - rng.random() * spread
    start = end - rng.uniform(0.05, 600.0)
    dataset = f"ds-{rng.randrange(DATASETS):05d}"
    request = {"dataset": dataset, "samples": rng.randrange(1000, 10**7), "seed": rng.randrange(2**31),
               "tolerance": 10.0 ** -rng.randrange(3, 9)}
    draw, result, error = rng.random(), None, None
    if draw < 0.90:
        state = JobState.FINISHED
        result = {"value": rng.random(), "iterations": rng.randrange(1, 5000), "converged": True}
    elif draw < 0.98:
        state = JobState.FAILED
        error = {"type": rng.choice(ERRORS), "message": f"diverged at iteration {rng.randrange(5000)}",
                 "traceback": TRACEBACK}
    else:
        state = JobState.ABORTED
    worker = {"hostname": f"node-{rng.randrange(16):02d}", "pid": rng.randrange(1000, 60000),
              "id": f"{rng.getrandbits(48):012x}"}
    launch = Launch(job_id, service, request, {}, start - rng.uniform(0.0, 5.0))
    record = Record(job_id, service, state, result, error, start, end, worker)
    return job_id, dataset, codec.encode(launch.encode()), codec.encode(record.encode())


def _properties(job_id: str, kind: str) -> pika.BasicProperties:
    return pika.BasicProperties(content_type=JSON_CONTENT_TYPE, message_id=job_id, type=kind, delivery_mode=2)


def _write_backlog(url: str, jobs: int, seed: int, written: Any, out: Any) -> None:
    """Write ``jobs`` jobs' entries (in a process of its own); put what was written in ``out``."""
    rng = random.Random(seed)
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    # The channel's own publish, flushed every few hundred messages: BlockingChannel's
    # flushes the socket for each message, which made the writer the bottleneck.
    publish = channel._impl.basic_publish
    counts: Counter[str] = Counter()
    waiting: deque[tuple[str, bytes]] = deque()
    sample: list[tuple[str, str]] = []
    step = max(jobs // 2000, 1)
    size = 0
    now = time.time()

    def put(job_id: str, kind: str, body: bytes) -> None:
        stream = journal_stream(job_id)
        publish("", stream, body, _properties(job_id, kind))
        counts[stream] += 1

    last = ""
    for i in range(jobs):
        job_id, dataset, launch, record = _job(rng, now)
        size += len(launch) + len(record)
        put(job_id, LAUNCH_TYPE, launch)
        waiting.append((job_id, record))
        if len(waiting) > LAG:
            put(waiting[0][0], RECORD_TYPE, waiting.popleft()[1])
        if i % step == 0:
            sample.append((job_id, dataset))
        if i % 250 == 249:
            connection.process_data_events(0)
            with written.get_lock():
                written.value += 250
    while waiting:
        last, body = waiting.popleft()
        put(last, RECORD_TYPE, body)
    channel.confirm_delivery()
    for stream in sorted(counts):  # confirmed: every entry before it in its stream is stored
        channel.basic_publish("", stream, b"{}")
        counts[stream] += 1
    connection.close()
    out.put({"counts": dict(counts), "bytes": size, "sample": sample, "last": last})


@dataclass
class Journal:
    """What the bench wrote: each stream's end, a sample of the jobs, their entries' size."""

    url: str
    ends: Counter[str] = field(default_factory=Counter)
    jobs: int = 0
    entry_bytes: int = 0
    sample: list[tuple[str, str]] = field(default_factory=list)
    newest: str = ""

    @property
    def ingest_group(self) -> str:
        return "ingest of the backlog (entries a second)"

    @property
    def entries(self) -> int:
        return sum(self.ends.values())


def write_backlog(journal: Journal, jobs: int, writers: int) -> Row:
    """The backlog, by ``writers`` processes; a row of the rate it was written at."""
    ctx = multiprocessing.get_context("spawn")
    written = ctx.Value("q", 0)
    out = ctx.Queue()
    shares = [jobs // writers + (1 if i < jobs % writers else 0) for i in range(writers)]
    started = time.perf_counter()
    processes = [ctx.Process(target=_write_backlog, args=(journal.url, share, 7919 * (i + 1), written, out),
                             daemon=True, name=f"bench-history-writer-{i}")
                 for i, share in enumerate(shares)]
    for process in processes:
        process.start()
    results: list[dict[str, Any]] = []
    try:
        while len(results) < writers:
            with contextlib.suppress(Exception):
                results.append(out.get(timeout=10))
                continue
            if any(p.exitcode not in (None, 0) for p in processes):
                raise RuntimeError("a journal writer failed")
            _progress(f"writing the journal: {written.value:,} of {jobs:,} jobs", written.value * 2, started)
    finally:
        for process in processes:
            process.join(30)
            if process.exitcode is None:
                process.kill()
    took = time.perf_counter() - started
    for result in results:
        journal.ends.update(result["counts"])
        journal.entry_bytes += result["bytes"]
        journal.sample += result["sample"]
    journal.jobs += jobs
    journal.newest = results[-1]["last"]
    entries = 2 * jobs
    return Row(journal.ingest_group, f"written to the journal: {jobs:,} jobs (raw pika, {writers} processes)",
               entries / took, "entries/s",
               reference=True, extra={"s": took}, note=f"{entries / took / 2:,.0f} jobs/s")


def _progress(what: str, done: float, started: float) -> None:
    took = time.perf_counter() - started
    print(f"[{took:6.0f} s] {what} ({done / max(took, 1e-9):,.0f} entries/s)", file=sys.stderr, flush=True)


def _declare(url: str) -> None:
    """Declare brokerexec's exchanges and streams as a worker does."""
    import aio_pika

    from brokerexec.transport.rabbitmq.declare import declare_all

    async def declare() -> None:
        connection = await aio_pika.connect(url)
        async with connection:
            await declare_all(await connection.channel())

    asyncio.run(declare())


# ---- the journal today (the baseline) -------------------------------------------------------


def _time_each(call: Callable[[Any], object], args: Sequence[Any], warmup: int = 0,
               budget: float = BUDGET) -> list[float]:
    """Seconds taken by ``call(arg)`` for each of ``args``, after ``warmup`` untimed calls (no
    more once one took a second); at least 3 calls, then no more once ``budget`` s went by."""
    for arg in args[:warmup]:
        started = time.perf_counter()
        call(arg)
        if time.perf_counter() - started > 1.0:
            break
    samples: list[float] = []
    for arg in args:
        if len(samples) >= 3 and sum(samples) > budget:
            break
        started = time.perf_counter()
        call(arg)
        samples.append(time.perf_counter() - started)
    return samples


def _row(group: str, name: str, samples: Sequence[float], reference: bool = False, note: str = "") -> Row:
    p = {k: v * 1000 for k, v in percentiles(samples).items()}
    return Row(group, name, p.pop("p50"), "ms p50", reference, extra={"p99": p["p99"]},
               note="; ".join(filter(None, [f"{len(samples)} samples", note])))


LOOKUP = "look-up of one ended job by id"
SEARCH_INDEX = "the text-search index"
MANY = "questions about many jobs"


def journal_baseline(journal: Journal, n: int, rng: random.Random) -> list[Row]:
    from brokerexec import Client

    ids = [job_id for job_id, _ in rng.sample(journal.sample, min(n, len(journal.sample)))]
    rows = []
    with Client(journal.url, timeout=120) as client:
        def status(job_id: str) -> None:
            answer = client.job(job_id).status(120)
            assert answer.get("state") in ("finished", "failed", "aborted"), answer

        def record(job_id: str) -> None:
            assert client.job(job_id).record(0) is not None

        print(f"journal: status and record of {len(ids)} random jobs ...", file=sys.stderr, flush=True)
        rows.append(_row(LOOKUP, "journal: `Job.status()`, a random job", _time_each(status, ids),
                         reference=True, note="read back from its stream's end"))
        rows.append(_row(LOOKUP, "journal: `Job.record()`, a random job", _time_each(record, ids)))
        rows.append(_row(LOOKUP, "journal: `Job.status()`, the job that ended last",
                         _time_each(status, [journal.newest] * n, warmup=1)))
        print("journal: jobs --all (client.listing(ended_within=3600)) ...", file=sys.stderr, flush=True)
        samples, found = [], 0
        for _ in range(1 if journal.jobs > 100_000 else 2):  # minutes each at a million
            started = time.perf_counter()
            listing = client.listing(1.0, ended_within=3600)
            samples.append(time.perf_counter() - started)
            found = len(listing.ended)
        rows.append(_row(MANY, "journal: `jobs --all`, `client.listing(ended_within=3600)`", samples,
                         reference=True, note=f"{found:,} rows (its cap 1,000); reads the whole hour"))
    return rows


# ---- a store --------------------------------------------------------------------------------


@contextlib.contextmanager
def sqlite_store() -> Iterator[str]:
    folder = tempfile.mkdtemp(prefix="bench-history-")
    try:
        yield str(Path(folder) / "history.db")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def postgres_store(server: str) -> Iterator[str]:
    import psycopg

    name = f"brokerexec_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield server.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(server, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def indexer(broker: str, store: str) -> Iterator[str]:
    """``brokerexec history`` as users run it, until the block ends (SIGTERM); yields the URL
    of its metrics."""
    with socket.socket() as free:  # a free port for its metrics
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    argv = [sys.executable, "-m", "brokerexec", "history", "--broker", broker, "--store", store,
            "--log-level", "WARNING", "--metrics-port", str(port), "--metrics-host", "127.0.0.1"]
    with subprocess_server(argv, ready=r"history indexer ready", stop_timeout=60):
        yield f"http://127.0.0.1:{port}/metrics"


def _metric(url: str, name: str) -> float | None:
    """One value of the indexer's metrics (None if it has none of that name)."""
    import urllib.request

    with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=10) as answer:
        for line in answer.read().decode().splitlines():
            if line.startswith(name) and not line.startswith("#"):
                return float(line.split()[-1])
    return None


def wait_ingested(store: Any, journal: Journal, label: str, started: float, timeout: float) -> float:
    """Poll the committed offsets until every stream's end is reached; when (perf_counter)."""
    total, last_print = journal.entries, time.perf_counter()
    while True:
        offsets = store.offsets()
        reached = sum(min(offsets.get(stream, 0), end) for stream, end in journal.ends.items())
        now = time.perf_counter()
        if reached >= total:
            return now
        if now - started > timeout:
            raise TimeoutError(f"{label}: {reached:,} of {total:,} entries after {timeout:.0f} s")
        if now - last_print >= 10:
            _progress(f"{label}: {reached:,} of {total:,} entries in the store", reached, started)
            last_print = now
        time.sleep(0.25)


@contextlib.contextmanager
def autovacuum(store_url: str) -> Iterator[list[str]]:
    """If the server runs without autovacuum, what it would do with its default settings,
    for this database, until the block ends: every 30 s, VACUUM a table past 50 + 20% dead
    rows or 1,000 + 20% inserted ones, ANALYZE one past 50 + 10% changed rows. Yields what
    it did (it does nothing on a server whose autovacuum runs)."""
    import threading

    import psycopg

    done: list[str] = []
    stop = threading.Event()
    query = ("SELECT relname, n_dead_tup, n_ins_since_vacuum, n_mod_since_analyze, reltuples "
             "FROM pg_stat_user_tables JOIN pg_class USING (relname) WHERE schemaname = 'public'")

    def run() -> None:
        with psycopg.connect(store_url, autocommit=True) as connection:
            while not stop.wait(30):
                for table, dead, inserted, changed, tuples in connection.execute(query).fetchall():
                    base = max(float(tuples), 0.0)
                    if dead > 50 + 0.2 * base or inserted > 1000 + 0.2 * base:
                        connection.execute(f'VACUUM "{table}"')
                        done.append(f"VACUUM {table}")
                    if changed > 50 + 0.1 * base:
                        connection.execute(f'ANALYZE "{table}"')
                        done.append(f"ANALYZE {table}")

    with psycopg.connect(store_url, autocommit=True) as connection:
        on = connection.execute("SHOW autovacuum").fetchone() == ("on",)
    thread = threading.Thread(target=run, name="bench-autovacuum", daemon=True)
    if not on:
        print("the server's autovacuum is off: doing what it would, for the store's database",
              file=sys.stderr, flush=True)
        thread.start()
    try:
        yield done
    finally:
        stop.set()
        if thread.is_alive():
            thread.join(120)


def measure_store(kind: str, store_url: str, journal: Journal, args: argparse.Namespace,
                  rng: random.Random) -> list[Row]:
    label = {"sqlite": "SQLite", "postgresql": "PostgreSQL"}[kind]
    rows: list[Row] = []
    with contextlib.ExitStack() as stack:
        vacuums = stack.enter_context(autovacuum(store_url)) if kind == "postgresql" else None
        rows += _measure_store(label, kind, store_url, journal, args, rng)
    if vacuums:
        done = ", ".join(f"{n} {what}" for what, n in sorted(Counter(vacuums).items()))
        print(f"{label}: as autovacuum would: {done}", file=sys.stderr, flush=True)
    return rows


def _measure_store(label: str, kind: str, store_url: str, journal: Journal, args: argparse.Namespace,
                   rng: random.Random) -> list[Row]:
    from brokerexec.history import HistoryStore

    rows: list[Row] = []
    with broker_lock(), HistoryStore(store_url) as store:
        started = time.perf_counter()
        machine, broker = _busy(), _broker_cpu()
        with indexer(journal.url, store_url) as metrics:
            ready = time.perf_counter()
            done = wait_ingested(store, journal, f"{label}: ingest", started, args.ingest_timeout)
            took = done - started
            busy, broker_cpu = _busy() - machine, _broker_cpu() - broker
            storing = _metric(metrics, "brokerexec_history_store_seconds")
            split = "" if storing is None else (f"; the store process busy {storing:.0f} s of it, beside "
                                                "the tail")
            cpu = (f"; the machine's {os.cpu_count()} cores {busy / took / (os.cpu_count() or 1):.0%} busy, "
                   f"RabbitMQ {broker_cpu / journal.entries * 1e6:.0f} µs of CPU an entry")
            rows.append(Row(journal.ingest_group,
                            f"`brokerexec history` into {label}: {journal.entries:,} entries",
                            journal.entries / took, "entries/s",
                            extra={"s": took}, note=f"{journal.jobs / took:,.0f} jobs/s; from the process's "
                            f"start ({ready - started:.1f} s to ready){split}{cpu}"))
            print(f"{label}: {journal.entries:,} entries in {took:.0f} s", file=sys.stderr, flush=True)
            rows.append(search_caught_up(label, store, done, args.ingest_timeout))
            rows += queries(label, store, journal, args, rng)
            rows.append(freshness(label, store, journal, args.fresh_rate, args.fresh_seconds))
            total = sum(store.counts().values())
        rows.append(store_bytes(label, kind, store, total, journal))
    return rows


def search_caught_up(label: str, store: Any, ingested: float, timeout: float) -> Row:
    """Wait for the text-search index to take every row (it follows the rows, between
    batches); a row of how long after the ingest it did."""
    lag, last_print = store.search_lag(), time.perf_counter()
    while lag:
        now = time.perf_counter()
        if now - ingested > timeout:
            raise TimeoutError(f"{label}: the search index still lags {lag:,} rows")
        if now - last_print >= 10:
            _progress(f"{label}: the search index lags {lag:,} rows", 0, ingested)
            last_print = now
        time.sleep(0.5)
        lag = store.search_lag()
    took = time.perf_counter() - ingested
    return Row(SEARCH_INDEX, f"{label}: the text-search index caught up", took, "s after the ingest",
               note="it follows the rows between the ingest's batches, a chunk every 2 s through a backlog")


def _busy() -> float:
    """CPU seconds the whole machine spent busy so far (``/proc/stat``)."""
    with open("/proc/stat") as stat:
        user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in stat.readline().split()[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def _broker_cpu() -> float:
    """CPU seconds the local RabbitMQ (its ``beam.smp``) spent so far; 0 if none is found."""
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if entry.name.isdigit() and (entry / "comm").read_text().strip().startswith("beam"):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return 0.0


def queries(label: str, store: Any, journal: Journal, args: argparse.Namespace,
            rng: random.Random) -> list[Row]:
    from brokerexec import Client
    from brokerexec.protocol.history import HistoryQuery

    n = args.n
    ids = [rng.choice(journal.sample)[0] for _ in range(n)]
    text = rng.choice(journal.sample)[1]
    hour = time.time() - 3600
    rows: list[Row] = []
    with Client(journal.url, timeout=300) as client:
        def get(job_id: str) -> None:
            assert store.get(job_id) is not None

        def ask(job_id: str) -> None:
            assert client.transport.history(HistoryQuery(job_id=job_id), 30).rows

        def status(job_id: str) -> None:
            assert client.job(job_id).status(30).get("state") in ("finished", "failed", "aborted")

        def record(job_id: str) -> None:
            assert client.job(job_id).record(0) is not None

        rows.append(_row(LOOKUP, f"{label}: `HistoryStore.get`", _time_each(get, ids, warmup=20)))
        rows.append(_row(LOOKUP, f"{label}: through the broker, `HistoryQuery(job_id=...)`",
                         _time_each(ask, ids, warmup=20)))
        rows.append(_row(LOOKUP, f"{label}: `Job.status()`, the store answering",
                         _time_each(status, ids, warmup=20)))
        rows.append(_row(LOOKUP, f"{label}: `Job.record()`, the store answering",
                         _time_each(record, ids, warmup=20)))
        filtered = {"service": PAGE_SERVICE, "state": PAGE_STATE}
        first = store.page(**filtered)
        assert first.cursor is not None, "the filtered page has no second page"
        found = len(store.page(text=text, limit=1000).rows)
        pages: list[tuple[str, dict[str, Any], int]] = [
            (f"a page of 50: service={PAGE_SERVICE} state={PAGE_STATE}", filtered, n),
            ("its page 2, by the cursor", {**filtered, "cursor": first.cursor}, n),
            (f"a page of 50: text={text!r} ({found} job{'' if found == 1 else 's'})", {"text": text},
             max(n // 10, 5)),
            ("the newest 1,000 of the last hour, with their count",
             {"since": hour, "limit": 1000, "count": True}, max(n // 10, 5)),
        ]
        for what, filters, times in pages:
            rows.append(_row(MANY, f"{label}: {what}, `HistoryStore.page`",
                             _time_each(lambda f: store.page(**f), [filters] * times, warmup=2)))
            rows.append(_row(MANY, f"{label}: {what}, through the broker",
                             _time_each(lambda f: client.history(**f), [filters] * times, warmup=2)))
        rows.append(_row(MANY, f"{label}: counts by service and state, `HistoryStore.counts`",
                         _time_each(lambda _: store.counts(), [None] * max(n // 10, 5), warmup=1)))
    return rows


# ---- freshness ------------------------------------------------------------------------------


def _write_live(url: str, base: dict[str, int], rate: float, seconds: float, life: float, seed: int,
                out: Any) -> None:
    """Jobs that end at ``rate`` a second for ``seconds``: each a launch, then its record
    ``life`` seconds later. Puts (stream, offset, monotonic time written) of every record."""
    rng = random.Random(seed)
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    publish = channel._impl.basic_publish
    next_offset = dict(base)
    running: deque[tuple[float, str, bytes]] = deque()
    written: list[tuple[str, int, float]] = []
    launched = 0

    def put(job_id: str, kind: str, body: bytes) -> tuple[str, int]:
        stream = journal_stream(job_id)
        offset = next_offset.get(stream, 0)
        next_offset[stream] = offset + 1
        publish("", stream, body, _properties(job_id, kind))
        return stream, offset

    started = time.monotonic()
    while True:
        now = time.monotonic()
        elapsed = now - started
        due = int(rate * min(elapsed, seconds))
        for _ in range(due - launched):
            job_id, _, launch, record = _job(rng, time.time() + life, spread=0.0)
            put(job_id, LAUNCH_TYPE, launch)
            running.append((now + life, job_id, record))
        launched = max(launched, due)
        while running and running[0][0] <= now:
            _, job_id, record = running.popleft()
            stream, offset = put(job_id, RECORD_TYPE, record)
            written.append((stream, offset, time.monotonic()))
        connection.process_data_events(0)
        if elapsed >= seconds and not running:
            break
        time.sleep(0.002)
    connection.close()
    out.put({"written": written, "ends": next_offset, "took": time.monotonic() - started})


def freshness(label: str, store: Any, journal: Journal, rate: float, seconds: float) -> Row:
    """From each record's write to the commit of its row, while ``rate`` jobs a second end."""
    import sqlalchemy as sa

    from brokerexec.history import schema

    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    base = {stream: int(end) for stream, end in journal.ends.items()}
    writer = ctx.Process(target=_write_live, args=(journal.url, base, rate, seconds, 1.0, 31337, out),
                         daemon=True, name="bench-history-live")
    seen: dict[str, tuple[list[int], list[float]]] = {s: ([], []) for s in base}
    result: dict[str, Any] | None = None
    print(f"{label}: {rate:,.0f} jobs a second ending for {seconds:.0f} s ...", file=sys.stderr, flush=True)
    query = sa.select(schema.offsets.c.stream, schema.offsets.c.next)
    with store.engine.connect() as connection:
        writer.start()
        try:
            deadline = time.monotonic() + seconds + 120
            while time.monotonic() < deadline:
                found = connection.execute(query).all()
                connection.commit()  # a new snapshot at each poll
                at = time.monotonic()
                for stream, next_offset in found:
                    offsets, times = seen.setdefault(stream, ([], []))
                    if not offsets or next_offset > offsets[-1]:
                        offsets.append(int(next_offset))
                        times.append(at)
                if result is None:
                    with contextlib.suppress(Exception):
                        result = out.get_nowait()
                if result is not None and all(
                        seen[s][0] and seen[s][0][-1] >= end for s, end in result["ends"].items()):
                    break
                time.sleep(0.01)
        finally:
            writer.join(30)
            if writer.exitcode is None:
                writer.kill()
    assert result is not None, "the live writer gave nothing back"
    latencies, missing = [], 0
    for stream, offset, wrote in result["written"]:
        offsets, times = seen[stream]
        i = bisect.bisect_right(offsets, offset)  # the first poll with next > offset
        if i == len(offsets):
            missing += 1
        else:
            latencies.append(times[i] - wrote)
    journal.ends.update({s: end - base.get(s, 0) for s, end in result["ends"].items()})
    journal.jobs += len(result["written"])
    if missing:
        raise AssertionError(f"{label}: {missing} records never reached the store")
    achieved = len(result["written"]) / max(result["took"] - 1.0, 1e-9)
    p = {k: v * 1000 for k, v in percentiles(latencies).items()}
    return Row(f"a record in the store after its journal write, {rate:,.0f} jobs a second ending",
               label, p["p50"], "ms p50", extra={"p99": p["p99"], "max": 1000 * max(latencies)},
               note=f"{len(latencies):,} records over {seconds:.0f} s ({achieved:,.0f} jobs/s written); "
                    "to the commit of the row, polled every 10 ms")


# ---- bytes ----------------------------------------------------------------------------------


def store_bytes(label: str, kind: str, store: Any, rows: int, journal: Journal) -> Row:
    """Bytes per job in the store (after its indexer stopped)."""
    import sqlalchemy as sa

    group = "bytes per job"
    if kind == "sqlite":
        path = Path(store.engine.url.database)
        with store.engine.connect() as connection:
            connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        size = path.stat().st_size + sum(p.stat().st_size for p in path.parent.glob(path.name + "-*"))
        return Row(group, f"{label}: the file", size / rows, "B/job",
                   note=f"{size / 2**20:,.0f} MiB, {rows:,} rows")
    with store.engine.connect() as connection:
        tables = [name for (name,) in connection.execute(sa.text(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"))]
        size_of = sa.text("SELECT pg_total_relation_size(:t)")
        sizes = {name: int(connection.execute(size_of, {"t": name}).scalar_one()) for name in tables}
    size = sum(sizes.values())
    parts = ", ".join(f"{name} {value / 2**20:,.0f} MiB" for name, value in sorted(sizes.items())
                      if value > 2**20)
    return Row(group, f"{label}: `pg_total_relation_size` of its tables", size / rows, "B/job",
               note=f"{parts}; {rows:,} rows")


# ---- the run --------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.bench_history", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=DEFAULT_URL, help="broker URL (loopback); a vhost of its own is made")
    p.add_argument("--no-vhost", action="store_true",
                   help="use the URL's vhost as it is (it must hold no journal)")
    p.add_argument("--jobs", type=int, default=1_000_000, help="jobs in the journal (default %(default)s)")
    p.add_argument("--stores", default="sqlite,postgresql", help="stores to measure (%(default)s)")
    p.add_argument("--postgres", default=POSTGRES_URL, help="PostgreSQL server to make a database on")
    p.add_argument("--n", type=int, default=200, help="look-ups and pages per figure (%(default)s)")
    p.add_argument("--journal-n", type=int, default=10, help="journal look-ups per figure (%(default)s)")
    p.add_argument("--writers", type=int, default=2, help="processes writing the journal")
    p.add_argument("--skip-journal", action="store_true",
                   help="do not ask the journal the same questions (minutes at a million jobs)")
    p.add_argument("--fresh-rate", type=float, default=1000.0, help="jobs ending a second (%(default)s)")
    p.add_argument("--fresh-seconds", type=float, default=30.0, help="for this long (%(default)s)")
    p.add_argument("--ingest-timeout", type=float, default=3600.0, help="seconds an ingest may take")
    p.add_argument("--quick", action="store_true", help="20,000 jobs, fewer samples: a smoke run")
    return p


def run(url: str, args: argparse.Namespace) -> list[Row]:
    if args.quick:
        args.jobs, args.n, args.journal_n, args.fresh_seconds = min(args.jobs, 20_000), 50, 5, 10.0
    kinds = [k.strip() for k in args.stores.split(",") if k.strip()]
    if unknown := sorted(set(kinds) - {"sqlite", "postgresql"}):
        raise SystemExit(f"unknown store(s) {unknown}: sqlite, postgresql")
    rng = random.Random(4242)
    scheme, rest = url.split("://", 1)
    # Never run_all's vhost: other benchmarks' jobs would be in its journal.
    server = url if args.no_vhost else f"{scheme}://{rest.split('/', 1)[0]}/"
    rows: list[Row] = []
    with isolated_vhost(server, enabled=not args.no_vhost) as vhost:
        journal = Journal(vhost)
        with broker_lock():
            _declare(vhost)
            rows.append(write_backlog(journal, args.jobs, args.writers))
            rows.append(Row("bytes per job", "the journal: its entries' bodies",
                            journal.entry_bytes / args.jobs, "B/job", reference=True,
                            note="launch + record, JSON"))
            if not args.skip_journal:
                rows += journal_baseline(journal, args.journal_n, rng)
        for kind in kinds:
            with (sqlite_store() if kind == "sqlite" else postgres_store(args.postgres)) as store_url:
                rows += measure_store(kind, store_url, journal, args, rng)
    order = {group: i for i, group in reversed(list(enumerate(r.group for r in rows)))}
    return _faster(sorted(rows, key=lambda r: order[r.group]))


def _faster(rows: list[Row]) -> list[Row]:
    """Each row of a group against the journal with how many times faster than it it is (the
    ratios are too small for the tables' two decimals)."""
    journal = {r.group: r.value for r in rows if r.reference and r.unit == "ms p50"}
    return [replace(r, note=f"{journal[r.group] / r.value:,.0f}x faster than the journal; {r.note}")
            if r.group in journal and not r.reference and not r.name.startswith("journal")
            and "counts" not in r.name else r
            for r in rows]


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up (vhost, database, files)
    started = time.perf_counter()
    rows = run(args.url, args)
    report(rows, "history.md", "history.json")
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"({time.perf_counter() - started:,.0f} s; load average now {load} on {os.cpu_count()} cores)",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
