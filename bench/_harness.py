"""Shared helpers of the benchmark scripts: samples, rows, server processes, the report.

A benchmark file declares ``CONTENDERS``, a dict from a short key to a :class:`Contender`,
and a ``run(url, args) -> list[Row]`` function that measures each selected contender in the
same run. :func:`report` prints one markdown table per group with each row's ratio to the
group's reference row: absolute numbers drift by up to 50% on this kind of machine, same-run
ratios by about 10%, so ratios are what the tables are for.

Server sides run in processes of their own, started with :func:`spawn` (``multiprocessing``
with the ``spawn`` start method; the target sets a readiness event) or :func:`subprocess_server`
(a command whose output announces readiness, e.g. a Celery worker). Both wait on readiness, never
on a fixed sleep, and stop and reap what they started when the ``with`` block ends.

Each measurement shares the test suite's broker lock (:func:`broker_lock`), so fault tests do
not stop the broker in the middle of one, and a run works in a throw-away vhost
(:func:`isolated_vhost`).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field, replace
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
#: Loopback only. The same variable as ``bench_wire.py`` so one setting moves both.
DEFAULT_URL = os.environ.get("BROKEREXEC_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
#: How long a server process may take to announce readiness.
START_TIMEOUT = 60.0
#: The test suite's broker lock (tests/conftest.py): fault tests that stop or cut off the
#: broker hold it exclusively, every other broker user shares it.
BROKER_LOCK = os.environ.get("BROKEREXEC_BROKER_LOCK", "/tmp/brokerexec-broker.lock")


# ---- samples and rows -----------------------------------------------------------------------


def percentiles(samples: Sequence[float]) -> dict[str, float]:
    """p50, p90, p99 (nearest rank) and mean of ``samples``."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)

    def rank(q: float) -> float:
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)]

    return {"p50": rank(0.50), "p90": rank(0.90), "p99": rank(0.99), "mean": statistics.fmean(ordered)}


@dataclass(frozen=True)
class Row:
    """One measured figure. ``ratio`` is ``value`` over the group's reference row's value."""

    group: str
    name: str
    value: float
    unit: str
    reference: bool = False
    #: Secondary figures in the same unit, e.g. ``{"p99": 1.9}``.
    extra: dict[str, float] = field(default_factory=dict)
    note: str = ""
    ratio: float | None = None


@dataclass(frozen=True)
class Contender:
    """One way of doing what a benchmark measures.

    ``serve`` starts the server side (in processes of its own) and yields whatever ``drive``
    needs to reach it; ``drive`` runs the timed part in this process. Their exact signatures
    are documented by each benchmark file, next to its ``CONTENDERS``.
    """

    label: str
    serve: Callable[..., AbstractContextManager[Any]]
    drive: Callable[..., Any]
    reference: bool = False


def with_ratios(rows: Sequence[Row]) -> list[Row]:
    """``rows`` with ``ratio`` filled in (where not set) against each group's reference row."""
    references = {r.group: r.value for r in rows if r.reference}
    return [replace(r, ratio=r.value / references[r.group])
            if r.ratio is None and r.group in references else r for r in rows]


def median_rows(runs: Sequence[Sequence[Row]]) -> list[Row]:
    """Merge repeated runs of the same rows into their medians.

    The ratio is the median of the same-run ratios (not a ratio of medians), and the note
    gives their range: that spread is the figure's real uncertainty.
    """
    if len(runs) == 1:
        return with_ratios(runs[0])
    merged: dict[tuple[str, str], list[Row]] = {}
    for rows in runs:
        for r in with_ratios(rows):
            merged.setdefault((r.group, r.name), []).append(r)
    out = []
    for same in merged.values():
        extra = {k: statistics.median(r.extra[k] for r in same if k in r.extra) for k in same[0].extra}
        ratios = [r.ratio for r in same if r.ratio is not None]
        note = f"median of {len(same)} runs"
        if ratios and not same[0].reference:
            note += f", ratios {min(ratios):.2f} to {max(ratios):.2f}"
        out.append(replace(same[0], value=statistics.median(r.value for r in same), extra=extra,
                           note="; ".join(filter(None, [note, same[0].note])),
                           ratio=statistics.median(ratios) if ratios else None))
    return out


def markdown(rows: Sequence[Row]) -> str:
    """One markdown table per group, in the order the groups first appear."""
    lines: list[str] = []
    group = None
    for r in with_ratios(rows):
        if r.group != group:
            group = r.group
            lines += ["", f"### {group}", "", "| contender | value | ratio | details |", "|---|---|---|---|"]
        ratio = "—" if r.ratio is None else f"{r.ratio:.2f}" + (" (reference)" if r.reference else "")
        details = ", ".join([f"{k} {_number(v)}" for k, v in r.extra.items()] + ([r.note] if r.note else []))
        lines.append(f"| {r.name} | {_number(r.value)} {r.unit} | {ratio} | {details} |")
    return "\n".join(lines).lstrip("\n") + "\n"


def _number(value: float) -> str:
    """Three significant digits, without exponents for the sizes benchmarks produce."""
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def report(rows: Sequence[Row], path_md: Path | str | None = None,
           path_json: Path | str | None = None) -> str:
    """Print the tables; write them (markdown) and the rows (JSON) where asked.

    Relative paths are taken inside ``bench/results/`` (gitignored).
    """
    text = markdown(rows)
    print(text, flush=True)
    for path, content in ((path_md, text), (path_json, _json(rows))):
        if path is not None:
            target = RESULTS / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(content)
    return text


def _json(rows: Sequence[Row]) -> str:
    meta = {"python": sys.version.split()[0], "cpus": os.cpu_count(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    return json.dumps({"meta": meta, "rows": [asdict(r) for r in with_ratios(rows)]}, indent=2) + "\n"


# ---- timing ---------------------------------------------------------------------------------


def time_calls(call: Callable[[], object], n: int, warmup: int) -> list[float]:
    """Seconds taken by each of ``n`` calls of ``call``, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        call()
    clock = time.perf_counter
    samples = []
    for _ in range(n):
        start = clock()
        call()
        samples.append(clock() - start)
    return samples


async def atime_calls(call: Callable[[], Awaitable[object]], n: int, warmup: int) -> list[float]:
    """:func:`time_calls` for a coroutine function, on the running loop."""
    for _ in range(warmup):
        await call()
    clock = time.perf_counter
    samples = []
    for _ in range(n):
        start = clock()
        await call()
        samples.append(clock() - start)
    return samples


def latency_row(group: str, label: str, samples: Sequence[float], reference: bool) -> Row:
    """A latency row in ms: the p50 as value, p90/p99/mean as extras."""
    p = {k: v * 1000 for k, v in percentiles(samples).items()}
    return Row(group, label, p.pop("p50"), "ms p50", reference, extra=p)


# ---- names and broker objects ---------------------------------------------------------------


def unique_name(prefix: str) -> str:
    """A queue or exchange name no other run uses."""
    return f"bench.{prefix}.{uuid.uuid4().hex[:10]}"


def delete_objects(url: str, queues: Sequence[str] = (), exchanges: Sequence[str] = ()) -> None:
    """Delete queues and exchanges that outlive their users (durable or not auto-deleted)."""
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        for kind, names in (("queue", queues), ("exchange", exchanges)):
            for name in names:
                channel = connection.channel()  # a failed delete closes its channel only
                with contextlib.suppress(pika.exceptions.ChannelClosed):
                    if kind == "queue":
                        channel.queue_delete(name)
                    else:
                        channel.exchange_delete(name)
                if channel.is_open:
                    channel.close()
    finally:
        if connection.is_open:
            connection.close()


@contextmanager
def broker_lock() -> Iterator[None]:
    """Share the broker lock for one measurement, so no fault test restarts the broker meanwhile.

    Take it per contender, not per run: a fault test waiting for it counts against its
    per-test timeout.
    """
    with open(BROKER_LOCK, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for {BROKER_LOCK} (a fault test holds it) ...", file=sys.stderr, flush=True)
            fcntl.flock(lock, fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextmanager
def isolated_vhost(url: str, enabled: bool = True) -> Iterator[str]:
    """A throw-away vhost on the local broker, deleted with everything in it at the end.

    Unique, auto-deleted names already keep runs apart; the vhost also keeps fixed-name objects
    (brokerexec's launch queue, Celery's defaults) away from other users of the broker, and
    takes everything with it at the end; the vhosts of runs that were killed are swept by the
    next run (the creator's pid is in the name). Falls back to ``url`` as given when disabled,
    when ``url`` names a vhost already, or when ``rabbitmqctl`` is not at hand.
    """
    tail = url.split("://", 1)[-1].split("/", 1)
    if not enabled or (len(tail) > 1 and tail[1] not in ("", "%2F")) or not shutil.which("rabbitmqctl"):
        yield url
        return
    ctl = ["rabbitmqctl", "-q"]
    prefix = "bench.vhost."
    name = f"{prefix}{os.getpid()}.{uuid.uuid4().hex[:8]}"
    with broker_lock():
        listed = subprocess.run([*ctl, "list_vhosts", "name"], check=True, capture_output=True,
                                text=True, timeout=60).stdout.split()
        for stale in listed:
            if stale.startswith(prefix) and not _alive(stale[len(prefix):].split(".")[0]):
                subprocess.run([*ctl, "delete_vhost", stale], check=False, capture_output=True, timeout=60)
        subprocess.run([*ctl, "add_vhost", name], check=True, capture_output=True, timeout=60)
        subprocess.run([*ctl, "set_permissions", "-p", name, "guest", ".*", ".*", ".*"],
                       check=True, capture_output=True, timeout=60)
    try:
        yield url.rstrip("/") + "/" + name
    finally:
        with broker_lock():
            subprocess.run([*ctl, "delete_vhost", name], check=False, capture_output=True, timeout=60)


def _alive(pid: str) -> bool:
    """Whether process ``pid`` exists (an unparsable pid counts as alive: leave it alone)."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (ValueError, PermissionError):
        return True
    return True


# ---- server processes -----------------------------------------------------------------------


def _die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Linux: get ``sig`` when the thread that started us dies, so nothing is left behind.

    (The kernel watches the starting *thread*: start servers from the main thread.)
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, sig)  # PR_SET_PDEATHSIG


def _die_hard_with_parent() -> None:
    # SIGKILL: a Celery worker's warm shutdown can hang once its output pipe (read by the
    # dead parent) is gone; its pool children then see their pipes close and exit.
    _die_with_parent(signal.SIGKILL)


def _child(target: Callable[..., None], ready: MpEvent, args: tuple[Any, ...]) -> None:
    _die_with_parent()
    target(ready, *args)


@contextmanager
def spawn(target: Callable[..., None], *per_process: tuple[Any, ...],
          timeout: float = START_TIMEOUT) -> Iterator[list[multiprocessing.process.BaseProcess]]:
    """Run ``target(ready, *args)`` in one fresh process per ``args`` tuple, until the block ends.

    ``target`` must be a module-level function; it sets ``ready`` once it serves and then
    serves until terminated. The block starts when every process is ready.
    """
    ctx = multiprocessing.get_context("spawn")
    started = []
    try:
        for i, args in enumerate(per_process):
            ready = ctx.Event()
            proc = ctx.Process(target=_child, args=(target, ready, args), daemon=True,
                               name=f"bench-{getattr(target, '__name__', 'server')}-{i}")
            proc.start()
            started.append((proc, ready))
        deadline = time.monotonic() + timeout
        for proc, ready in started:
            while not ready.wait(0.05):
                if proc.exitcode is not None:
                    raise RuntimeError(f"{proc.name} exited with {proc.exitcode} before it was ready")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{proc.name} not ready after {timeout} s")
        yield [proc for proc, _ in started]
    finally:
        for proc, _ in started:
            proc.terminate()
        for proc, _ in started:
            proc.join(10)
            if proc.exitcode is None:
                proc.kill()
                proc.join()


@contextmanager
def subprocess_server(argv: Sequence[str], ready: str, env: dict[str, str] | None = None,
                      timeout: float = START_TIMEOUT, stop_timeout: float = 20.0,
                      ) -> Iterator[subprocess.Popen[str]]:
    """Run ``argv`` (in the repository root, a session of its own) until the block ends.

    The block starts once a line of its output matches the regular expression ``ready``. At the
    end the process gets SIGTERM, then its whole process group SIGKILL if it is still there
    after ``stop_timeout`` s (a Celery prefork worker has children of its own).
    """
    proc = subprocess.Popen(list(argv), cwd=ROOT, env={**os.environ, **(env or {})}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=_die_hard_with_parent)
    seen = threading.Event()
    tail: list[str] = []
    pattern = re.compile(ready)

    def read() -> None:  # drains the pipe to the end so the server never blocks on it
        assert proc.stdout is not None
        for line in proc.stdout:
            tail[:] = [*tail[-40:], line]
            if pattern.search(line):
                seen.set()

    reader = threading.Thread(target=read, name=f"bench-read-{proc.pid}", daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + timeout
        while not seen.wait(0.05):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{argv[:4]} not ready (exit {proc.poll()}):\n{''.join(tail)}")
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(stop_timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        with contextlib.suppress(ProcessLookupError):  # orphaned pool children, if any
            os.killpg(proc.pid, signal.SIGKILL)
        reader.join(5)


# ---- command line ---------------------------------------------------------------------------


def add_common_arguments(parser: argparse.ArgumentParser, contenders: dict[str, Contender]) -> None:
    """``--url``, ``--no-vhost`` and ``--only`` (a comma-separated subset of ``contenders``)."""
    parser.add_argument("--url", default=DEFAULT_URL, help="broker URL (loopback); default %(default)s")
    parser.add_argument("--no-vhost", action="store_true",
                        help="use the URL's vhost instead of a throw-away one")
    parser.add_argument("--only", default=",".join(contenders),
                        help="comma-separated contenders to run; default: all of %(default)s")


def selected(contenders: dict[str, Contender], only: str) -> dict[str, Contender]:
    """The contenders named in ``only``, in registry order; unknown names are an error."""
    wanted = [k.strip() for k in only.split(",") if k.strip()]
    unknown = sorted(set(wanted) - set(contenders))
    if unknown:
        raise SystemExit(f"unknown contender(s) {unknown}; known: {sorted(contenders)}")
    return {k: v for k, v in contenders.items() if k in wanted}


def bench_main(name: str, parser: argparse.ArgumentParser,
               run: Callable[[str, argparse.Namespace], list[Row]], argv: Sequence[str] | None) -> int:
    """Parse ``argv``, run in a throw-away vhost, print and save ``results/<name>.{md,json}``."""
    args = parser.parse_args(argv)
    with isolated_vhost(args.url, enabled=not args.no_vhost) as url:
        rows = run(url, args)
    report(rows, f"{name}.md", f"{name}.json")
    return 0
