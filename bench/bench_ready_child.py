"""Cost of ``ready()`` with nothing pending in a child process, beside thread mode.

    python -m bench.bench_ready_child [--n 2000000] [--repeat 5] [--python /usr/bin/python3]

The same service runs once in a computation thread of this process and once in a child
process (``brokerexec.child.runner.ProcessRunner``). Each run times, in the interpreter
it runs in, ``n`` calls of ``ready()`` and ``n`` calls of the bare ``deque`` +
``time.monotonic()`` check (the reference of ``bench_ready``), minus the empty loop; each
figure is the best of ``repeat`` runs. In a child, ``ready()`` is still a local test: nothing
crosses the back-channel unless something is pending or due. ``--python`` adds a child in
another interpreter (``child_python``: e.g. Debian's, with no brokerexec installed for it).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections import deque
from typing import Any

from brokerexec import Service, ServiceHandler
from brokerexec.child.runner import ProcessRunner


class ReadyAndBare(Service):
    """Times ``ready()`` and the bare check where it runs; ns per call, loop removed."""

    name = "ready-and-bare"

    def run(self, handler: ServiceHandler, request: dict[str, Any]) -> dict[str, float]:
        n = request["n"]
        ready = handler.ready
        pending: deque[Any] = deque()
        deadline = time.monotonic() + 3600
        monotonic = time.monotonic

        def check() -> None:
            if pending or monotonic() >= deadline:
                raise AssertionError("never due")

        start = time.perf_counter_ns()
        for _ in range(n):
            pass
        loop = time.perf_counter_ns() - start
        start = time.perf_counter_ns()
        for _ in range(n):
            check()
        bare = time.perf_counter_ns() - start - loop
        start = time.perf_counter_ns()
        for _ in range(n):
            ready()
        calls = time.perf_counter_ns() - start - loop
        return {"bare": max(bare, 0) / n, "ready": max(calls, 0) / n}


def _run(n: int, runner: ProcessRunner | None) -> dict[str, float]:
    handler = ServiceHandler(progress_delta=3600, checkpoint_delta=3600, runner=runner,
                             name="bench-ready")
    handler.start(ReadyAndBare, {"n": n})
    outcome = handler.join()
    assert outcome["state"] == "finished", outcome
    return dict(outcome["result"])


def measure(n: int, repeat: int, python: str | None = None) -> dict[str, dict[str, float]]:
    """Best ns per call of the bare check and ``ready()``, in a thread and in a child (and
    in a child of ``python``)."""
    runners: dict[str, ProcessRunner | None] = {"thread": None, "child process": ProcessRunner()}
    if python is not None:
        runners[f"child process, {python}"] = ProcessRunner(python=python)
    best: dict[str, dict[str, float]] = {mode: {} for mode in runners}
    try:
        for _ in range(repeat):
            for mode, where in runners.items():
                for key, value in _run(n, where).items():
                    best[mode][key] = min(best[mode].get(key, float("inf")), value)
    finally:
        for runner in runners.values():
            if runner is not None:
                runner.close()
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--python", help="also in a child of this interpreter (child_python)")
    args = parser.parse_args(argv)
    threading.current_thread().name = "bench"
    best = measure(args.n, args.repeat, args.python)
    if args.json:
        print(json.dumps(best))
        return 0
    print(f"Python {sys.version.split()[0]}, n={args.n}, best of {args.repeat}\n")
    print("| where ready() runs | bare check, ns | ready(), ns | ready() / bare check |")
    print("|---|---|---|---|")
    for mode, figures in best.items():
        print(f"| {mode} | {figures['bare']:.1f} | {figures['ready']:.1f} | "
              f"{figures['ready'] / figures['bare']:.2f} |")
    thread = best["thread"]["ready"]
    for mode in best:
        if mode != "thread":
            print(f"ready() in a {mode} / in a thread = {best[mode]['ready'] / thread:.2f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
