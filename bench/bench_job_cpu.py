"""Where a trivial job's CPU goes: the worker's, the broker's and the client's, per job.

    python -m bench.bench_job_cpu [--mode many|loop] [--n 2000] [--rounds 3]

One ``brokerexec worker`` process (8 slots) runs ``n`` echo jobs per round, launched by one
``launch_many()`` or by ``launch()`` in a loop; each round prints jobs a second and the CPU
time per job of the worker process and of RabbitMQ (``/proc/<pid>/stat``: run it where the
broker runs) and of this process (the client). Throughput on this machine drifts by a third
from one minute to the next; CPU per job drifts far less, so it is what to compare between
two trees: run this from each, alternating (``PYTHONPATH=<tree>``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from bench import _brokerexec
from bench._harness import isolated_vhost, subprocess_server


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=("many", "loop"), default="many")
    parser.add_argument("--n", type=int, default=2000, help="jobs per round (%(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (%(default)s)")
    parser.add_argument("--url", default=os.environ.get("BROKEREXEC_BENCH_AMQP_URL",
                                                        "amqp://guest:guest@127.0.0.1:5672/"))
    args = parser.parse_args(argv)
    from brokerexec import Client

    beam = int(subprocess.run(["pgrep", "-f", "beam.smp"], capture_output=True, text=True,
                              check=True).stdout.split()[0])
    with isolated_vhost(args.url) as url:
        worker_argv = [sys.executable, "-m", "brokerexec", "worker", "--broker", url,
                       "--concurrency", "8", "--log-level", "WARNING",
                       f"--service={_brokerexec.SAMPLES}:Sleeper"]
        with subprocess_server(worker_argv, ready=r"worker ready") as worker, Client(url) as client:
            client.launch_many("echo", [{"value": i} for i in range(200)])[-1].result(60)  # warm
            print("| jobs/s | worker ms/job | broker ms/job | client ms/job |\n|---|---|---|---|")
            for _ in range(args.rounds):
                before = cpu_seconds(worker.pid), cpu_seconds(beam), time.process_time()
                start = time.perf_counter()
                if args.mode == "many":
                    jobs = client.launch_many("echo", [{"value": i} for i in range(args.n)])
                else:
                    jobs = [client.launch("echo", {"value": i}) for i in range(args.n)]
                for job in jobs:
                    job.result(60)
                elapsed = time.perf_counter() - start
                after = cpu_seconds(worker.pid), cpu_seconds(beam), time.process_time()
                worker_ms, broker_ms, client_ms = (1000 * (a - b) / args.n
                                                   for a, b in zip(after, before, strict=True))
                print(f"| {args.n / elapsed:.0f} | {worker_ms:.3f} | {broker_ms:.3f} | {client_ms:.3f} |",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
