"""What durable jobs cost: checkpoints, looking a job up as history grows, leases, resumes.

    python -m bench.bench_durability [--only lookup,checkpoint,leases,resume,memory,busy,restart] [--url amqp://...]

* **lookup**: ``status`` and ``result`` of an ended job, from a client that did not launch it
  (so it reads the journal), with 1,000, 10,000 and 100,000 other jobs' launches and records
  in the history: half of them older than the job, half ended after it; and, apart, all of
  them in the ten seconds before its launch (the reader starts that much before the launch
  time, for clock skew, and reads past them). The reference is the look-up with no history.
* **checkpoint**: a stored checkpoint of 1 KiB and of 1 MiB (journal entry, confirmed, then
  the lease replaced to point at it), beside a raw persistent, confirmed pika publish of the
  same size to a stream.
* **leases**: what 1,000 claimed jobs hold in the broker (their leases) and cost it at rest.
* **resume**: from a SIGKILL of a worker to the first event of its job's next attempt on
  another worker (the resume grace set to 0, so what is measured is the mechanism).
* **restart**: ``--restart-jobs`` (2,000) claimed jobs, their leases held, over worker
  processes of at most 1,900 jobs each (a connection's channels); the broker's application
  restarted (``rabbitmqctl stop_app``, ``start_app``). Then the time until every job runs
  again as its first attempt (every claim verified, every lease held again, each lease that
  came back dropped), and how many ran twice (an attempt other than 1): none may.
* **memory**: a worker's peak RSS (``VmHWM``) while it stores one checkpoint of 16 and of 48
  MiB, beyond its peak before, as a multiple of the checkpoint's size.
* **busy**: a job in a busy fleet: ``--busy`` (1,000,000) other entries written to its journal
  stream during its life (with raw pika, as other jobs' entries). Then the resume after a
  SIGKILL (at the default resume grace, 2 s: the target is the grace + 2 s), and, once it
  ended, a fresh client's ``status`` and ``result`` (target: 100 ms p50); each beside the same
  measure on an idle journal.

Each part runs in a vhost of its own, deleted at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pika

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._harness import DEFAULT_URL, Row, broker_lock, isolated_vhost, percentiles, report
from brokerexec.protocol.messages import Launch, Record
from brokerexec.protocol.names import (
    JOURNAL_BUCKETS,
    LAUNCH_TYPE,
    RECORD_TIME_MARGIN,
    RECORD_TYPE,
    journal_stream,
    journal_stream_of_bucket,
    new_job_id,
)
from brokerexec.protocol.states import JobState
from brokerexec.settings import RabbitMQSettings

SERVICE = f"{Path(__file__).resolve().parent / '_chaos_service.py'}:Steps"


def _start_worker(url: str, *args: str) -> subprocess.Popen[str]:
    process = subprocess.Popen([sys.executable, "-m", "brokerexec", "worker", "--broker", url,
                                "--service", SERVICE, "--log-level", "WARNING", *args],
                               stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    for line in process.stderr:
        if "worker ready" in line:
            break
    threading.Thread(target=lambda: [None for _ in process.stderr], daemon=True).start()  # type: ignore[union-attr]
    return process


def _stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


# ---- lookup ----------------------------------------------------------------------------------


def _write_history(channel: Any, jobs: int) -> None:
    """``jobs`` other jobs' launch and record entries, spread over the journal by their ids."""
    for _ in range(jobs):
        _write_job(channel, new_job_id())


def _write_job(channel: Any, job_id: str) -> None:
    launch = Launch.new("steps", {"steps": 1}, job_id=job_id)
    record = Record(job_id, "steps", JobState.FINISHED, {"done": 1}, None, launch.sent,
                    launch.sent + 0.01, {"hostname": "bench", "pid": 1})
    for kind, body in ((LAUNCH_TYPE, launch.encode()), (RECORD_TYPE, record.encode())):
        channel.basic_publish("", journal_stream(job_id), json.dumps(body).encode(), pika.BasicProperties(
            content_type="application/json", message_id=job_id, type=kind, delivery_mode=2))


def lookup(url: str, sizes: list[int], n: int) -> list[Row]:
    """Look-ups of one ended job, in two histories of each size: ``grown`` (half of the other
    jobs older than the reader's margin before it, half ended after it: a history that grew
    around it) and ``burst`` (all of them in the seconds just before its launch, inside the
    margin: what a look-up must read past)."""
    from brokerexec.transport.pika.client import PikaClientTransport

    rows = []
    for shape in ("grown", "burst"):
        for size in [0, *sizes]:
            if shape == "burst" and size == 0:
                continue
            with broker_lock(), isolated_vhost(url) as vhost:
                worker = _start_worker(vhost, "--concurrency", "1")  # declares the journal
                try:
                    connection = pika.BlockingConnection(pika.URLParameters(vhost))
                    channel = connection.channel()
                    before = size if shape == "burst" else size // 2
                    _write_history(channel, before)
                    if shape == "grown":  # the older half, out of the reader's way
                        channel.confirm_delivery()
                        channel.basic_publish("", journal_stream_of_bucket(0), b"{}")
                        time.sleep(RECORD_TIME_MARGIN + 1)  # history's age, not a wait on an event
                    target = new_job_id()
                    _write_job(channel, target)
                    _write_history(channel, size - before)
                    if shape == "burst":
                        channel.confirm_delivery()
                    channel.basic_publish("", journal_stream_of_bucket(0), b"{}")  # all stored
                    connection.close()
                    client = PikaClientTransport(vhost, heartbeat=0)
                    for what, call in (("status", client.status), ("result", client.fetch_result)):
                        samples = []
                        for _ in range(n):
                            started = time.perf_counter()
                            answer = call(target, 10 if what == "status" else 0)  # type: ignore[operator]
                            samples.append(time.perf_counter() - started)
                            assert answer and answer.get("state") == "finished", answer
                        p = percentiles(samples)
                        label = ("no other job" if size == 0 else
                                 f"{size:,} jobs: half before it, half after" if shape == "grown" else
                                 f"{size:,} jobs in the {RECORD_TIME_MARGIN:.0f} s before it")
                        rows.append(Row(f"lookup: {what} of an ended job", label, 1e3 * p["p50"], "ms",
                                        reference=size == 0, extra={"p90": 1e3 * p["p90"]}))
                    client.close()
                finally:
                    _stop(worker)
    return rows


# ---- checkpoint ------------------------------------------------------------------------------


class _Hooks:
    """Worker hooks that begin every job and remember it (for the checkpoint part)."""

    def __init__(self) -> None:
        self.begun = threading.Event()
        self.job_id = ""

    def prepare(self, launch: Launch) -> Any:
        from brokerexec.transport.base import PreparedJob

        return PreparedJob(launch.job_id, launch.service, launch)

    def begin(self, job: Any) -> None:
        self.job_id = job.job_id
        self.begun.set()

    def cancel(self, job: Any, reason: str) -> None: ...
    def on_rpc(self, job_id: str, signal: Any) -> Any: return {}
    def on_control(self, control: Any) -> None: ...
    def describe_jobs(self) -> list[Any]: return []
    def superseded(self, job_id: str, reason: str) -> None: ...


def checkpoint(url: str, sizes: list[int], n: int) -> list[Row]:
    from brokerexec.transport.pika.client import PikaClientTransport
    from brokerexec.transport.rabbitmq.connection_settings import ConnectionSettings
    from brokerexec.transport.rabbitmq.worker.transport import RabbitWorkerTransport

    rows = []
    with broker_lock(), isolated_vhost(url) as vhost:
        hooks = _Hooks()
        transport = RabbitWorkerTransport(ConnectionSettings(url=vhost, name="bench-ckpt"),
                                          host_info={"hostname": "bench"},
                                          rabbitmq=RabbitMQSettings(claim_after=0))
        transport.serve(hooks, 1, ["steps"])  # type: ignore[arg-type]
        client = PikaClientTransport(vhost, heartbeat=0)
        client.launch([Launch.new("steps")])
        assert hooks.begun.wait(30)
        raw = pika.BlockingConnection(pika.URLParameters(vhost))
        channel = raw.channel()
        channel.queue_declare("bench.raw-stream", durable=True, arguments={"x-queue-type": "stream"})
        channel.confirm_delivery()
        try:
            for size in sizes:
                state = {"data": "x" * size}
                body = json.dumps(state).encode()
                group = f"checkpoint of {size // 1024:,} KiB"
                raw_samples, ours = [], []
                for _ in range(n):
                    started = time.perf_counter()
                    channel.basic_publish("", "bench.raw-stream", body,
                                          pika.BasicProperties(delivery_mode=2))
                    raw_samples.append(time.perf_counter() - started)
                    started = time.perf_counter()
                    transport.store_checkpoint(hooks.job_id, state).result(30)
                    ours.append(time.perf_counter() - started)
                for name, samples, reference in (
                        ("raw pika: persistent, confirmed publish to a stream", raw_samples, True),
                        ("brokerexec: journal entry + lease replaced", ours, False)):
                    p = percentiles(samples)
                    rows.append(Row(group, name, 1e3 * p["p50"], "ms", reference=reference,
                                    extra={"p90": 1e3 * p["p90"]}))
        finally:
            raw.close()
            client.close()
            transport.close()
    return rows


# ---- leases and resumes -------------------------------------------------------------------------


def _beam() -> tuple[int, float]:
    pid = int(subprocess.run(["pgrep", "-f", "beam.smp"], capture_output=True, text=True,
                             check=True).stdout.split()[0])
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return pid, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _broker_memory_mb() -> float:
    out = subprocess.run(["rabbitmqctl", "-q", "status", "--formatter", "json"], capture_output=True,
                         text=True, check=True).stdout
    return float(json.loads(out)["memory"]["total"]["rss"]) / 2**20


def leases(url: str, jobs: int, rest: float) -> list[Row]:
    from brokerexec import Client

    rows = []
    with broker_lock(), isolated_vhost(url) as vhost:
        before = _broker_memory_mb()
        _, cpu0 = _beam()
        time.sleep(rest)  # the broker at rest, as the reference
        _, cpu1 = _beam()
        idle = (cpu1 - cpu0) / rest
        worker = _start_worker(vhost, "--concurrency", str(jobs), "--claim-after", "0")
        try:
            with Client(vhost) as client:
                launched = client.launch_many("steps", [{"steps": 10**9, "delay": 0.5}] * jobs,
                                              progress_delta=3600)  # only the leases speak
                deadline = time.monotonic() + 300
                while sum(1 for job in client.jobs(2.0) if job.get("state") == "running") < jobs:
                    assert time.monotonic() < deadline, "the jobs never all ran"
                held = _broker_memory_mb()
                _, cpu0 = _beam()
                time.sleep(rest)  # the broker with every lease held
                _, cpu1 = _beam()
                busy = (cpu1 - cpu0) / rest
                group = f"{jobs:,} running jobs, each claimed with a lease"
                rows += [Row(group, "broker at rest, no jobs", idle * 100, "% of a core", reference=True),
                         Row(group, "broker holding their leases", busy * 100, "% of a core",
                             note=f"broker RSS {before:.0f} -> {held:.0f} MiB "
                                  f"({(held - before) * 1024 / jobs:.1f} KiB a job, leases and RPC queues)")]
                client.abort_all()
                for job in launched:
                    job.record(120)
        finally:
            _stop(worker)
    return rows


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=120)


def restart(url: str, jobs: int) -> list[Row]:
    from brokerexec import Client

    per_worker, every = 1900, 2.0
    heard: dict[str, float] = {}  # job id -> when it was first heard after the restart
    attempts: set[int] = set()
    lock = threading.Lock()

    def seen(event: Any) -> None:
        with lock:
            attempts.add(event.attempt)
            heard.setdefault(event.job_id, time.perf_counter())

    with broker_lock(), isolated_vhost(url) as vhost:
        workers = [_start_worker(vhost, "--concurrency", str(min(per_worker, jobs - start)),
                                 "--claim-after", "0", "--heartbeat", "5")
                   for start in range(0, jobs, per_worker)]
        try:
            with Client(vhost, timeout=30) as client:
                launched = client.launch_many("steps", [{"steps": 10**9, "delay": 0.5}] * jobs,
                                              progress_delta=every)  # a progress each 2 s
                deadline = time.monotonic() + 600
                while sum(1 for job in client.jobs(3.0) if job.get("state") == "running") < jobs:
                    assert time.monotonic() < deadline, "the jobs never all ran"
            _rabbitmqctl("stop_app")
            _rabbitmqctl("start_app")
            _rabbitmqctl("await_startup")
            back = time.perf_counter()
            with Client(vhost, timeout=30) as client:
                # A job's events are held until its claim is verified again: its first one
                # heard after the restart says it was (within one progress interval).
                client.subscribe("*.steps.*", seen)
                deadline = time.monotonic() + 900
                while len(heard) < jobs and time.monotonic() < deadline:
                    time.sleep(0.2)
                took = (max(heard.values()) - back) if len(heard) >= jobs else float("nan")
                client.abort_all()
                records = [client.job(job.id).record(300) for job in launched]
        finally:
            for worker in workers:
                _stop(worker)
    again = sum(1 for record in records if record is None or record.get("attempt", 1) != 1)
    return [Row(f"a broker restart with {jobs:,} claimed jobs", "until every job is heard again",
                took, "s", note=f"{len(heard):,} of {jobs:,} heard again (progress every {every:.0f} s); "
                                f"attempts heard {sorted(attempts)}; {again} records not of attempt 1")]


def _resumed_watch() -> tuple[threading.Event, Callable[[Any], None]]:
    """An event set by the callback once it sees an event of a job's next attempt."""
    resumed = threading.Event()

    def seen(event: Any) -> None:
        if event.attempt > 1:
            resumed.set()

    return resumed, seen


def resume(url: str, n: int) -> list[Row]:
    from brokerexec import Client

    latencies = []
    with broker_lock(), isolated_vhost(url) as vhost:
        for _ in range(n):
            first = _start_worker(vhost, "--resume-grace", "0")
            second = None
            try:
                resumed, seen = _resumed_watch()
                with Client(vhost) as client:
                    job = client.launch("steps", {"steps": 400, "delay": 0.01}, checkpoint_delta=0.2)
                    client.subscribe(f"*.*.{job.id}", seen)
                    while job.status().get("attempt") != 1 or job.status()["state"] != "running":
                        pass
                    job.status()  # claimed: its lease is held
                    second = _start_worker(vhost, "--resume-grace", "0")
                    os.kill(first.pid, signal.SIGKILL)
                    killed = time.perf_counter()
                    assert resumed.wait(60), "never resumed"
                    latencies.append(time.perf_counter() - killed)
                    job.result(60)
            finally:
                _stop(first)
                if second is not None:
                    _stop(second)
    p = percentiles(latencies)
    return [Row("resume after SIGKILL (resume grace 0)", "kill to the next attempt's first event",
                1e3 * p["p50"], "ms", extra={"p90": 1e3 * p["p90"], "max": 1e3 * max(latencies)},
                note=f"{n} kills; add --resume-grace (2 s by default)")]


# ---- memory ----------------------------------------------------------------------------------


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def memory(url: str, sizes: list[int]) -> list[Row]:
    """Peak RSS added by storing one checkpoint of each size, beside the state held."""
    from brokerexec import Client

    rows = []
    blob = f"{Path(__file__).resolve().parent / '_chaos_service.py'}:Blob"
    for size in sizes:
        with broker_lock(), isolated_vhost(url) as vhost:
            worker = _start_worker(vhost, "--service", blob)
            try:
                with Client(vhost) as client:
                    job = client.launch("blob", {"size": size}, checkpoint_delta=3600)
                    while job.status().get("state") != "running":
                        pass
                    job.status()  # claimed, its state made: what it holds before storing it
                    before = _peak_rss(worker.pid)
                    job.checkpoint()
                    after = _peak_rss(worker.pid)
                    job.abort()
                rows.append(Row("memory: peak RSS added by storing one checkpoint",
                                f"{size // 2**20} MiB state", (after - before) / size, "x its size",
                                extra={"MiB added": round((after - before) / 2**20, 1)}))
            finally:
                _stop(worker)
    return rows


# ---- busy ------------------------------------------------------------------------------------


def _noise(url: str, stream: str, n: int) -> float:
    """``n`` other jobs' ``started`` entries in ``stream``, confirmed; the seconds it took."""
    started = time.perf_counter()
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    body = json.dumps({"v": 1, "attempt": 1, "time": time.time(), "worker": {"hostname": "bench"}}).encode()
    properties = [pika.BasicProperties(content_type="application/json", message_id=new_job_id(),
                                       type="brokerexec.started") for _ in range(64)]
    for i in range(n):
        channel.basic_publish("", stream, body, properties[i % 64])
    channel.confirm_delivery()
    channel.basic_publish("", stream, body, properties[0])  # confirmed: all before it are stored
    connection.close()
    return time.perf_counter() - started


def busy(url: str, entries: int, n: int) -> list[Row]:
    """Resume and fresh look-ups of a job whose stream got ``entries`` other entries during its
    life, beside the same on an idle journal (0)."""
    from brokerexec import Client
    from brokerexec.transport.pika.client import PikaClientTransport

    rows = []
    for size in (0, entries):
        with broker_lock(), isolated_vhost(url) as vhost:
            first = _start_worker(vhost)
            second = None
            try:
                resumed, seen = _resumed_watch()
                with Client(vhost) as client:
                    job = client.launch("steps", {"steps": 100_000, "delay": 0.01}, checkpoint_delta=0.5)
                    client.subscribe(f"*.*.{job.id}", seen)
                    while job.status().get("state") != "running":
                        pass
                    wrote = _noise(vhost, journal_stream(job.id), size)
                    print(f"busy: {size:,} entries written in {wrote:.1f} s", file=sys.stderr)
                    second = _start_worker(vhost)
                    os.kill(first.pid, signal.SIGKILL)
                    killed = time.perf_counter()
                    assert resumed.wait(120), "never resumed"
                    took = time.perf_counter() - killed
                    label = "idle journal" if size == 0 else f"{size:,} entries during its life"
                    rows.append(Row("busy: resume after SIGKILL (resume grace 2 s)", label, 1e3 * took, "ms",
                                    reference=size == 0))
                    job.abort()
                    with contextlib.suppress(Exception):
                        job.result(60)
                one_shot = PikaClientTransport(vhost, heartbeat=0)
                job_id = job.id
                with Client(vhost) as fresh:
                    calls: list[tuple[str, Any]] = [
                        ("status (pika, the CLI's)", functools.partial(one_shot.status, job_id, 10)),
                        ("result (pika, the CLI's)", functools.partial(one_shot.fetch_result, job_id, 0)),
                        ("status (Client)", fresh.job(job_id).status),
                        ("result (Client)", fresh.job(job_id).record)]
                    for what, call in calls:
                        samples = []
                        for _ in range(n):
                            begun = time.perf_counter()
                            answer = call()
                            samples.append(time.perf_counter() - begun)
                            assert answer and answer.get("state") == "aborted", answer
                        p = percentiles(samples)
                        rows.append(Row(f"busy: a fresh client's {what} of the ended job", label,
                                        1e3 * p["p50"], "ms", reference=size == 0,
                                        extra={"p90": 1e3 * p["p90"]}))
                one_shot.close()
            finally:
                _stop(first)
                if second is not None:
                    _stop(second)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=DEFAULT_URL)
    parser.add_argument("--only", default="lookup,checkpoint,leases,resume,memory,busy",
                        help="parts to run; 'restart' (long) runs only when named")
    parser.add_argument("--n", type=int, default=20, help="look-ups and checkpoints per figure")
    parser.add_argument("--histories", default="1000,10000,100000")
    parser.add_argument("--jobs", type=int, default=1000, help="running jobs for the lease part")
    parser.add_argument("--rest", type=float, default=10.0, help="seconds of broker CPU sampled at rest")
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--busy", type=int, default=1_000_000, help="entries in a busy job's life")
    parser.add_argument("--restart-jobs", type=int, default=2000, help="claimed jobs at the broker restart")
    args = parser.parse_args()
    parts = set(args.only.split(","))
    rows: list[Row] = []
    if "lookup" in parts:
        rows += lookup(args.url, [int(s) for s in args.histories.split(",")], args.n)
    if "checkpoint" in parts:
        rows += checkpoint(args.url, [1024, 1024 * 1024], args.n)
    if "leases" in parts:
        rows += leases(args.url, args.jobs, args.rest)
    if "resume" in parts:
        rows += resume(args.url, args.kills)
    if "restart" in parts:
        rows += restart(args.url, args.restart_jobs)
    if "memory" in parts:
        rows += memory(args.url, [16 * 2**20, 48 * 2**20])
    if "busy" in parts:
        rows += busy(args.url, args.busy, args.n)
    order = {group: i for i, group in reversed(list(enumerate(r.group for r in rows)))}
    report(sorted(rows, key=lambda r: order[r.group]), "durability.md", "durability.json")
    print(f"(the journal: {JOURNAL_BUCKETS} streams)")


if __name__ == "__main__":
    main()
