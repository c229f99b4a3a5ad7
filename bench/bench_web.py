"""The web view under load (issue 23): a busy fleet, a large history, twenty browsers.

    python -m bench.bench_web [--running 1000] [--ended 100000] [--browsers 20] [--minutes 10]

In a RabbitMQ vhost of its own:

* the history store (a SQLite file) holds ``--ended`` ended jobs, written straight into it
  (as its indexer would: a launch and a record each, ``HistoryStore.ingest``);
* two worker processes run ``--running`` jobs of ``_web_service.Ticker``, each sending its
  progress every second (``--running`` progress events a second through the broker);
* ``brokerexec web`` serves them (as users start it), indexing the journal itself;
* ``--browsers`` pages of one headless Chromium (Debian's), each in a context of its own (a
  browser's own connections), hold the jobs page open, each its live stream of the 50 jobs
  it shows.

Measured, for ``--minutes``: the jobs page's **first byte** (time to the response's headers,
through the token; target 200 ms), an event's **latency** from the worker (its ``time``) to
a page's script (target 250 ms p95; one machine, one clock), beside the same events' latency
to a plain subscriber in the bench's process (the baseline: the worker, the broker and a
client's connection, without the web server or a browser) and to the web server's stream
read by a plain HTTP client (the server without a browser), the web process's **CPU**
(cores, from ``/proc``; target under 0.5), its **memory** (RSS every 10 s: flat), and the
cores every kind of process on the machine used meanwhile (where the two cores went).
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench._harness import isolated_vhost, percentiles, subprocess_server

ROOT = Path(__file__).resolve().parent.parent
SERVICE = str(ROOT / "bench" / "_web_service.py") + ":Ticker"
TOKEN = "bench-web-token"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def fill_store(path: Path, ended: int) -> float:
    """``ended`` ended jobs in the store at ``path``; seconds it took."""
    from brokerexec.history.store import Entry, HistoryStore
    from brokerexec.protocol.messages import Launch, Record
    from brokerexec.protocol.names import LAUNCH_TYPE, RECORD_TYPE, journal_stream
    from brokerexec.protocol.states import JobState

    began = time.monotonic()
    now = time.time()
    with HistoryStore(str(path)) as store:
        store.migrate()
        batch: list[Entry] = []
        for n in range(ended):
            launch = Launch.new(f"service-{n % 10}", {"dataset": f"d{n % 50_000}", "n": n})
            end = now - random.uniform(60, 7 * 86400)
            state = JobState.FINISHED if n % 10 else JobState.FAILED
            error = None if state is JobState.FINISHED else {"type": "ValueError", "message": "diverged",
                                                             "traceback": ""}
            value = {"loss": n / ended} if error is None else None
            record = Record(launch.job_id, launch.service, state, value, error, end - 30, end,
                            {"hostname": "bench"})
            stream = journal_stream(launch.job_id)
            batch.append(Entry(stream, 2 * n, LAUNCH_TYPE, launch.encode(), launch.job_id))
            batch.append(Entry(stream, 2 * n + 1, RECORD_TYPE, record.encode(), launch.job_id))
            if len(batch) >= 2000:
                store.ingest(batch, {})
                batch = []
        store.ingest(batch, {})
    return time.monotonic() - began


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def machine_cpu() -> dict[str, float]:
    """CPU seconds so far of every process on the machine, summed by what it is (its
    command's name: the broker's ``beam.smp``, ``chromium``, ``python``...), and the whole
    machine's busy and total seconds (from ``/proc/stat``): where the two cores go."""
    found: dict[str, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            name = (entry / "comm").read_text().strip()
            seconds = cpu_seconds(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue  # it ended meanwhile
        key = "chromium" if name.startswith("chrom") else name
        found[key] = found.get(key, 0.0) + seconds
    ticks = [int(n) for n in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    found["(machine busy)"] = (sum(ticks) - ticks[3] - ticks[4]) / hz
    found["(machine all)"] = sum(ticks) / hz
    return found


def cpu_split(before: dict[str, float], after: dict[str, float], seconds: float) -> dict[str, float]:
    """Cores each kind of process used between two :func:`machine_cpu` readings."""
    split = {key: round((after.get(key, 0.0) - before.get(key, 0.0)) / seconds, 2) for key in after}
    return {key: value for key, value in sorted(split.items(), key=lambda kv: -kv[1]) if value >= 0.01}


class StreamReader:
    """The web server's stream of the same jobs, read by a plain HTTP client in this
    process (no browser): what the web server adds, apart from the browser's."""

    def __init__(self, base: str, path: str) -> None:
        import threading

        self.latency: list[float] = []
        self._connection = http.client.HTTPConnection(*host_port(base), timeout=60)
        self._connection.request("GET", path, headers={"Authorization": f"Bearer {TOKEN}",
                                                        "Accept": "text/event-stream"})
        self._response = self._connection.getresponse()
        assert self._response.status == 200, self._response.status
        self._closed = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for line in self._response:
                if self._closed:
                    return
                if line.startswith(b"data: {"):
                    self.latency.append(time.time() - json.loads(line[6:])["time"])
        except (OSError, ValueError, AttributeError):  # closed under it (http.client's own)
            return

    def close(self) -> None:
        self._closed = True
        self._connection.close()


def in_ms(samples: Sequence[float]) -> dict[str, float]:
    """``percentiles`` of samples in seconds, and their p95 (the web targets' own), in ms."""
    ordered = sorted(samples)
    return {**{k: round(v * 1000, 1) for k, v in percentiles(samples).items()},
            "p95": round(ordered[max(math.ceil(0.95 * len(ordered)) - 1, 0)] * 1000, 1)}


def host_port(base: str) -> tuple[str, int]:
    """``("127.0.0.1", 8080)`` of ``"http://127.0.0.1:8080"``."""
    host, port = re.match(r"http://([^:/]+):(\d+)", base).groups()  # type: ignore[union-attr]
    return host, int(port)


def first_bytes(base: str, n: int) -> list[float]:
    """Seconds from each request's sending to its response's headers, ``n`` GETs of /jobs."""
    samples = []
    for _ in range(n):
        connection = http.client.HTTPConnection(*host_port(base), timeout=30)
        began = time.perf_counter()
        connection.request("GET", "/jobs", headers={"Authorization": f"Bearer {TOKEN}"})
        response = connection.getresponse()
        samples.append(time.perf_counter() - began)
        assert response.status == 200, response.status
        response.read()
        connection.close()
    return samples


LATENCY = """
() => {
  window.benchLatency = [];
  const source = new EventSource(document.body.dataset.stream);
  source.addEventListener("job", (message) => {
    const event = JSON.parse(message.data);
    window.benchLatency.push(Date.now() / 1000 - event.time);
  });
}
"""


def run(url: str, running: int, ended: int, browsers: int, minutes: float) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    from brokerexec import Client

    folder = Path(tempfile.mkdtemp(prefix="bench-web-"))
    results: dict[str, Any] = {"running": running, "ended": ended, "browsers": browsers, "minutes": minutes}
    try:
        store = folder / "history.db"
        results["fill_seconds"] = round(fill_store(store, ended), 1)
        print(f"store: {ended:,} ended jobs in {results['fill_seconds']} s", file=sys.stderr)
        per_worker = (running + 1) // 2
        workers = [subprocess.Popen([sys.executable, "-m", "brokerexec", "worker", "--broker", url,
                                     "--service", SERVICE, "--concurrency", str(per_worker)],
                                    cwd=ROOT, stderr=subprocess.DEVNULL) for _ in range(2)]
        try:
            with Client(url) as client:
                wait_offered(client)
                client.launch_many("ticker", [{"n": n} for n in range(running)], progress_delta=1.0)
                _wait_running(client, running)
                env = {"BROKEREXEC_WEB_TOKEN": TOKEN}
                port = _free_port()
                argv = [sys.executable, "-m", "brokerexec", "web", "--broker", url, "--store", str(store),
                        "--port", str(port)]
                # The baseline, in the same run: the events of the jobs the first page shows,
                # to a plain subscriber (the worker, the broker and a client's connection; no
                # web server, no browser), over the same minutes.
                direct: list[float] = []

                def baseline(job_ids: list[str]) -> Any:
                    return client.subscribe([f"progress.ticker.{job_id}" for job_id in job_ids],
                                            lambda event: direct.append(time.time() - event.time))

                with subprocess_server(argv, r"brokerexec web at http://", env=env, timeout=120) as web:
                    results.update(_measure(f"http://127.0.0.1:{port}", web.pid, browsers, minutes,
                                            sync_playwright, baseline))
                if direct:
                    results["subscriber_latency_ms"] = in_ms(direct)
                client.abort_all("ticker")
        finally:
            for worker in workers:
                worker.terminate()
            for worker in workers:
                try:
                    worker.wait(60)
                except subprocess.TimeoutExpired:
                    worker.kill()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return results


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_offered(client: Any) -> None:
    """Until both worker processes offer ``ticker``."""
    from brokerexec import BrokerExecError

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            workers = client.listing(1.0).workers
        except BrokerExecError:  # before a worker declared the topology in this new vhost
            workers = []
        if sum("ticker" in (worker.get("services") or []) for worker in workers) == 2:
            return
    raise RuntimeError("the two workers did not offer ticker within 60 s")


def _wait_running(client: Any, running: int) -> None:
    """Until every job runs: the load is measured, not the fleet's start."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if len(client.listing(2.0).running) >= running:
            print(f"{running} jobs running", file=sys.stderr)
            return
    raise RuntimeError(f"not all {running} jobs ran within 600 s")


def _measure(base: str, pid: int, browsers: int, minutes: float, sync_playwright: Any,
             baseline: Any) -> dict[str, Any]:
    found: dict[str, Any] = {}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        pages = []
        for _ in range(browsers):
            # A context each, as a browser each: a browser opens at most six connections to
            # one server, and each page's stream holds one.
            context = browser.new_context()
            context.set_default_timeout(120_000)
            page = context.new_page()
            page.goto(f"{base}/jobs?token={TOKEN}")
            pages.append(page)
        pages[0].evaluate(LATENCY)  # one more stream on the first page: what it hears, and when
        shown = pages[0].evaluate("() => [...document.querySelectorAll('tr[data-job-id]')]"
                                  ".map((row) => row.dataset.jobId)")
        listening = baseline(shown)
        reader = StreamReader(base, pages[0].evaluate("() => document.body.dataset.stream"))
        cpu0, wall0, machine0 = cpu_seconds(pid), time.monotonic(), machine_cpu()
        memory: list[tuple[float, float]] = []
        stop = time.monotonic() + minutes * 60
        while time.monotonic() < stop:
            memory.append((round(time.monotonic() - wall0), round(rss_mib(pid), 1)))
            time.sleep(min(10.0, max(stop - time.monotonic(), 0)))  # sampling period, not a wait on work
        found["web_cpu_cores"] = round((cpu_seconds(pid) - cpu0) / (time.monotonic() - wall0), 3)
        found["machine_cores"] = cpu_split(machine0, machine_cpu(), time.monotonic() - wall0)
        memory.append((round(time.monotonic() - wall0), round(rss_mib(pid), 1)))
        found["web_rss_mib"] = memory
        listening.close()
        reader.close()
        if reader.latency:
            found["stream_reader_latency_ms"] = in_ms(reader.latency)
        latency = pages[0].evaluate("() => window.benchLatency")
        found["events_heard"] = len(latency)
        if latency:
            found["latency_ms"] = in_ms(latency)
        found["first_byte_ms"] = in_ms(first_bytes(base, 50))
        browser.close()
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--running", type=int, default=1000)
    parser.add_argument("--ended", type=int, default=100_000)
    parser.add_argument("--browsers", type=int, default=20)
    parser.add_argument("--minutes", type=float, default=10.0)
    args = parser.parse_args(argv)
    if not os.path.exists(CHROMIUM):
        print(f"bench_web needs Debian's Chromium at {CHROMIUM}: apt-get install -y chromium",
              file=sys.stderr)
        return 2
    with isolated_vhost(args.url) as url:
        results = run(url, args.running, args.ended, args.browsers, args.minutes)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
