"""Run every benchmark with its defaults, in one throw-away vhost, and write the tables.

    python -m bench.run_all [--quick] [--repeat 1] [--only rpc,throughput,broadcast,cli]
    python -m bench.run_all --only history [--quick]

Prints the markdown tables and writes ``bench/results/latest.md`` and ``latest.json``. With
``--repeat R`` every benchmark runs R times (rpc, throughput, ... then again) and each row is
the median of its R values. ``--quick`` runs small counts, for a smoke test. Everything with
the defaults takes a few minutes on 2 cores. ``history`` (a million jobs in the history store,
about an hour; ``--quick``: 20,000) runs only when named.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from types import ModuleType

from bench import bench_broadcast, bench_cli, bench_history, bench_operations, bench_rpc, bench_throughput
from bench._harness import DEFAULT_URL, Row, isolated_vhost, median_rows, report

BENCHMARKS: dict[str, ModuleType] = {
    "rpc": bench_rpc,
    "throughput": bench_throughput,
    "broadcast": bench_broadcast,
    "cli": bench_cli,
    "operations": bench_operations,
}
#: Benchmarks that run only when named in ``--only`` (long).
NAMED_ONLY: dict[str, ModuleType] = {
    "history": bench_history,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the selected benchmarks; print and save the tables."""
    p = argparse.ArgumentParser(prog="python -m bench.run_all",
                                description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--url", default=DEFAULT_URL, help="broker URL (loopback); default %(default)s")
    p.add_argument("--no-vhost", action="store_true", help="use the URL's vhost instead of a throw-away one")
    p.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    p.add_argument("--repeat", type=int, default=1, help="runs of each benchmark; rows are medians")
    p.add_argument("--only", default=",".join(BENCHMARKS), help="benchmarks to run (%(default)s)")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    known = {**BENCHMARKS, **NAMED_ONLY}
    if unknown := sorted(set(names) - set(known)):
        raise SystemExit(f"unknown benchmark(s) {unknown}; known: {sorted(known)}")

    runs: list[list[Row]] = []
    start = time.monotonic()
    with isolated_vhost(args.url, enabled=not args.no_vhost) as url:
        for _ in range(args.repeat):
            rows: list[Row] = []
            for name in names:
                module = known[name]
                bench_args = module.parser().parse_args(["--url", url, *(module.QUICK if args.quick else [])])
                print(f"[{time.monotonic() - start:6.1f} s] {name} ...", file=sys.stderr, flush=True)
                rows += module.run(url, bench_args)
            runs.append(rows)
    print(f"[{time.monotonic() - start:6.1f} s] done", file=sys.stderr, flush=True)
    report(median_rows(runs), "latest.md", "latest.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
