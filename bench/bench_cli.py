"""Wall time of one-shot commands (a fresh interpreter each), as ratios to a pika connect.

    python -m bench.bench_cli [--runs 20] [--only floor,pika-connect,pika-rpc]

Like hyperfine, in Python: every command runs ``runs`` times (after one untimed run that
warms the page cache), the contenders interleaved run by run so that drift hits them alike;
the row is the median wall time, with min and p90 beside it.

Contenders (``CONTENDERS``): ``serve(url)`` is a context manager that starts whatever the
command talks to and yields its ``target`` (or None); ``drive(url, target)`` returns the
command line (a list of arguments). To add one, write those two functions and add an entry;
see ``bench/README.md``. (brokerexec's row will be ``brokerexec status JOB``.)
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator

from bench import _brokerexec, bench_rpc
from bench._harness import (
    DIRECT_REPLY_TO,
    ROOT,
    Contender,
    Row,
    add_common_arguments,
    bench_main,
    broker_lock,
    percentiles,
    selected,
)

TIMEOUT = 60.0

#: What ``brokerexec status`` does over pika: connect, one RPC with direct reply-to, close.
PIKA_ONESHOT_RPC = f"""\
import json, sys, uuid, pika
connection = pika.BlockingConnection(pika.URLParameters(sys.argv[1]))
channel = connection.channel()
got = []
channel.basic_consume({DIRECT_REPLY_TO!r}, lambda _c, _m, _p, body: got.append(body), auto_ack=True)
channel.basic_publish("", sys.argv[2], json.dumps({{"intent": "status"}}).encode(),
                      pika.BasicProperties(reply_to={DIRECT_REPLY_TO!r}, correlation_id=uuid.uuid4().hex))
connection.process_data_events(time_limit=10)
connection.close()
sys.exit(0 if got and json.loads(got[0]) else "no reply")
"""


@contextlib.contextmanager
def no_server(url: str) -> Iterator[None]:
    """For commands that need nothing running."""
    yield None


def floor(url: str, target: None) -> list[str]:
    """The interpreter starting and stopping."""
    return [sys.executable, "-c", "pass"]


def pika_connect(url: str, target: None) -> list[str]:
    """Import pika, open a connection, close it."""
    code = "import sys, pika; pika.BlockingConnection(pika.URLParameters(sys.argv[1])).close()"
    return [sys.executable, "-c", code, url]


def pika_rpc(url: str, queue: str) -> list[str]:
    """:data:`PIKA_ONESHOT_RPC` to the aio-pika echo server of ``bench_rpc``."""
    return [sys.executable, "-c", PIKA_ONESHOT_RPC, url, queue]


CONTENDERS: dict[str, Contender] = {
    "floor": Contender("python -c pass (floor)", no_server, floor),
    "pika-connect": Contender("import pika, connect, close", no_server, pika_connect, reference=True),
    "pika-rpc": Contender("pika one-shot RPC to a live aio-pika server", bench_rpc.aio_pika_server, pika_rpc),
}
CONTENDERS["brokerexec"] = _brokerexec.CLI


def compile_brokerexec() -> None:
    """Compile the brokerexec the commands import, as ``pip install`` does for a package.

    An editable checkout (and ``PYTHONDONTWRITEBYTECODE``, which CI sets) would have every
    run compile the package from source, while pika, installed, is read compiled.
    """
    where = subprocess.run([sys.executable, "-c", "import brokerexec, os; print(os.path.dirname("
                            "brokerexec.__file__))"], check=True, capture_output=True, text=True,
                           cwd=ROOT).stdout.strip()
    subprocess.run([sys.executable, "-m", "compileall", "-q", where], check=True, cwd=ROOT)


def _wall(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, cwd=ROOT, timeout=TIMEOUT)
    return time.perf_counter() - start


def run(url: str, args: argparse.Namespace) -> list[Row]:
    """Start every selected contender's server, then time the commands interleaved."""
    group = "one-shot command, wall time"
    contenders = selected(CONTENDERS, args.only)
    compile_brokerexec()
    with broker_lock(), contextlib.ExitStack() as stack:
        commands = {key: c.drive(url, stack.enter_context(c.serve(url))) for key, c in contenders.items()}
        samples: dict[str, list[float]] = {key: [] for key in commands}
        for round_no in range(1 + args.runs):
            for key, argv in commands.items():
                wall = _wall(argv)
                if round_no:
                    samples[key].append(wall)
    rows = []
    for key, contender in contenders.items():
        values = samples[key]
        extra = {"min": min(values) * 1000, "p90": percentiles(values)["p90"] * 1000}
        rows.append(Row(group, contender.label, statistics.median(values) * 1000, "ms median",
                        contender.reference, extra=extra))
    return rows


def parser() -> argparse.ArgumentParser:
    """Command-line options of this benchmark."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--runs", type=int, default=20, help="timed runs per command (%(default)s)")
    add_common_arguments(p, CONTENDERS)
    return p


#: Arguments of a quick smoke run (``run_all --quick``).
QUICK = ["--runs", "5"]


if __name__ == "__main__":
    sys.exit(bench_main("cli", parser(), run, sys.argv[1:]))
