"""Cost of ``ready()`` with nothing pending, beside an empty call and a bare check.

    python -m bench.bench_ready [--n 2000000] [--repeat 5]

All three run in the same process and the same run; each figure is the best of ``repeat``
timings of ``n`` calls, minus the cost of the empty loop itself. The target (issue 2) is
``ready()`` <= 3x the bare ``deque`` + ``time.monotonic()`` check.
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


def _loop_overhead(n: int) -> float:
    start = time.perf_counter_ns()
    for _ in range(n):
        pass
    return time.perf_counter_ns() - start


def _empty_calls(n: int) -> float:
    def empty() -> None:
        pass

    start = time.perf_counter_ns()
    for _ in range(n):
        empty()
    return time.perf_counter_ns() - start


def _bare_checks(n: int) -> float:
    pending: deque[Any] = deque()
    deadline = time.monotonic() + 3600
    monotonic = time.monotonic

    def check() -> None:
        if pending or monotonic() >= deadline:
            raise AssertionError("never due")

    start = time.perf_counter_ns()
    for _ in range(n):
        check()
    return time.perf_counter_ns() - start


class _ReadyLoop(Service):
    name = "ready-loop"

    def run(self, handler: ServiceHandler, request: dict[str, Any]) -> float:
        ready = handler.ready
        n = request["n"]
        start = time.perf_counter_ns()
        for _ in range(n):
            ready()
        return float(time.perf_counter_ns() - start)


def _ready_calls(n: int) -> float:
    # A real handler, in a real computation thread, with nothing pending and nothing due.
    handler = ServiceHandler(progress_delta=3600, checkpoint_delta=3600)
    handler.start(_ReadyLoop(), {"n": n})
    outcome = handler.join()
    assert outcome["state"] == "finished", outcome
    return float(outcome["result"])


def measure(n: int, repeat: int) -> dict[str, float]:
    """Nanoseconds per call of each contender, loop overhead removed."""
    best: dict[str, float] = {}
    for _ in range(repeat):
        overhead = _loop_overhead(n)
        for name, fn in (("empty function call", _empty_calls),
                         ("deque + monotonic() check", _bare_checks),
                         ("ServiceHandler.ready()", _ready_calls)):
            per_call = max(fn(n) - overhead, 0.0) / n
            best[name] = min(best.get(name, float("inf")), per_call)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    threading.current_thread().name = "bench"
    best = measure(args.n, args.repeat)
    reference = best["deque + monotonic() check"]
    if args.json:
        print(json.dumps({"ns_per_call": best, "ratio_to_bare_check":
                          {k: v / reference for k, v in best.items()}}))
    else:
        print(f"Python {sys.version.split()[0]}, n={args.n}, best of {args.repeat}\n")
        print("| contender | ns per call | ratio to bare check |")
        print("|---|---|---|")
        for name, value in best.items():
            print(f"| {name} | {value:.1f} | {value / reference:.2f} |")
    ratio = best["ServiceHandler.ready()"] / reference
    print(f"\nready() / bare check = {ratio:.2f} (target <= 3.0)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
