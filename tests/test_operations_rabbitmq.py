"""Operations on the real broker: a sweep across two worker processes, one SIGKILLed mid-way,
every item finished once with its own result; failures past the policy abort the rest."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from brokerexec import Client

pytestmark = [pytest.mark.rabbitmq, pytest.mark.timeout(180)]
WAIT = 120.0


def test_a_sweep_across_workers_survives_a_sigkilled_worker_with_every_item_once(
        own_vhost: str, worker_process: Callable[..., Any]) -> None:
    workers = [worker_process("--concurrency", "4", "--heartbeat", "2", services=("Counter",), url=own_vhost)
               for _ in range(2)]
    requests = [{"steps": 5 + n % 7, "delay": 0.02, "fail_at": -1 - n} for n in range(200)]  # each its own
    with Client(own_vhost, timeout=10) as client, client.operation("counter", requests, name="sweep") as op:
        seen = 0
        running_at_kill: list[str] = []
        for _outcome in op.results(timeout=WAIT):
            seen += 1
            if seen == 40:  # mid-way: one worker dies with jobs in hand, another comes
                running_at_kill = [item.key for item in op.items("running")]
                workers[0].kill()
                workers.append(worker_process("--concurrency", "4", "--heartbeat", "2",
                                              services=("Counter",), url=own_vhost))
        status = op.wait(WAIT)
        assert seen == 200
        assert (status.total, status.counts["finished"], status.fraction) == (200, 200, 1.0)
        outcomes = list(op.results(ordered=True))
        assert [o.request for o in outcomes] == requests
        assert all(o.ok and o.value == {"count": o.request["steps"], "label": ""} for o in outcomes)
        assert all(item.runs == 1 for item in op.items())  # resumed where lost, never launched again
        assert len({o.job_id for o in outcomes}) == 200
        assert running_at_kill  # the two workers' jobs then, the killed one's among them
        assert all(op.registry.item(key).state.value == "finished" for key in running_at_kill)
        hosts = {item.worker for item in op.items()}
        assert hosts and None not in hosts


def test_fail_fast_on_the_broker_aborts_queued_and_running_items(
        own_vhost: str, worker_process: Callable[..., Any]) -> None:
    worker_process("--concurrency", "2", services=("Counter",), url=own_vhost)
    requests = [{"steps": 1, "fail_at": 0}] + [{"steps": 1000 + n, "delay": 0.05} for n in range(30)]
    with Client(own_vhost, timeout=10) as client, \
            client.operation("counter", requests, on_error="fail_fast") as op:
        status = op.wait(WAIT)
        assert op.stopped is not None and "1 item(s) failed" in op.stopped
        assert status.counts["failed"] == 1 and status.counts["aborted"] == 30
        assert status.counts["finished"] == 0


LAUNCHER = """
import sys, threading
from brokerexec import Client

url, count = sys.argv[1], int(sys.argv[2])
requests = [{"steps": 5 + n % 7, "delay": 0.02 + n / 1e6, "fail_at": 2 if n % 25 == 3 else -1}
            for n in range(count)]  # each its own, every 25th failing at its third step
client = Client(url, timeout=10)
op = client.operation("counter", requests, name="killed launcher")
op.wait_launched()
print(op.id, flush=True)
threading.Event().wait()  # until the test SIGKILLs it
"""


def test_a_sweep_whose_launching_client_is_sigkilled_is_reattached_by_id_and_rerun(
        own_vhost: str, worker_process: Callable[..., Any]) -> None:
    import subprocess
    import sys

    count = 200
    injected = {n for n in range(count) if n % 25 == 3}
    workers = [worker_process("--concurrency", "4", "--heartbeat", "2", services=("Counter",), url=own_vhost)
               for _ in range(2)]
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, own_vhost, str(count)],
                                stdout=subprocess.PIPE, text=True)
    try:
        assert launcher.stdout is not None
        operation_id = launcher.stdout.readline().strip()
        assert operation_id, "the launching client printed no operation id"
    finally:
        launcher.kill()  # SIGKILL: its operation lives on in the journal
        launcher.wait(10)
    with Client(own_vhost, timeout=10) as client:
        op = client.operation_of(operation_id)
        assert (op.name, op.service, op.status().total) == ("killed launcher", "counter", count)
        for seen, _outcome in enumerate(op.results(timeout=WAIT), 1):
            if seen == 30:
                workers[0].kill()
                workers.append(worker_process("--concurrency", "4", "--heartbeat", "2",
                                              services=("Counter",), url=own_vhost))
        status = op.wait(WAIT)
        assert (status.total, status.done) == (count, count)
        outcomes = list(op.results(ordered=True))
        assert len(outcomes) == count and len({o.key for o in outcomes}) == count
        assert {n for n, o in enumerate(outcomes) if not o.ok} == injected  # exactly the injected ones
        assert all(o.value == {"count": o.request["steps"], "label": ""} for o in outcomes if o.ok)
        finished = {item.key: item.job_id for item in op.items("finished")}
        # a re-run runs only the failed ones again (they fail again: their failure is in the request)
        assert op.rerun() == len(injected)
        again = op.wait(WAIT)
        assert again.counts["failed"] == len(injected) and again.counts["finished"] == count - len(injected)
        assert {item.key: item.job_id for item in op.items("finished")} == finished
        assert all(item.runs == 2 for item in op.items("failed"))


def _cli(*args: str, timeout: float = WAIT) -> Any:
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "brokerexec", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_the_sweep_and_op_verbs_launch_find_and_steer_an_operation_by_id(
        own_vhost: str, worker_process: Callable[..., Any], tmp_path: Any) -> None:
    import json

    worker_process("--concurrency", "4", services=("Counter",), url=own_vhost)
    broker = ("--broker", own_vhost)
    grid = json.dumps({"steps": [1, 2, 3], "fail_at": [-1, 0]})
    followed = _cli("sweep", "counter", "--grid", grid, "--name", "cli sweep", "--follow", "--json", *broker)
    assert followed.returncode == 1, followed.stderr  # some items failed
    document = json.loads(followed.stdout)
    assert (document["name"], document["total"], document["done"]) == ("cli sweep", 6, 6)
    assert document["counts"]["finished"] == 3 and len(document["failures"]) == 3
    assert all("boom at step 0" in failure["error"] for failure in document["failures"])
    operation_id = document["id"]

    lines = tmp_path / "requests.jsonl"
    lines.write_text("\n".join(json.dumps({"steps": n}) for n in (4, 5)) + "\n\n")
    launched = _cli("sweep", "counter", "--requests", str(lines), *broker)
    assert launched.returncode == 0, launched.stderr
    assert len(launched.stdout.strip()) == 32

    listed = json.loads(_cli("op", "list", "--json", *broker).stdout)
    assert {row["id"] for row in listed} >= {operation_id, launched.stdout.strip()}
    status = json.loads(_cli("op", "status", operation_id, "--json", *broker).stdout)
    assert (status["total"], status["counts"]["failed"]) == (6, 3)
    failed = json.loads(_cli("op", "items", operation_id, "--state", "failed", "--json", *broker).stdout)
    assert len(failed) == 3 and all(item["error"].startswith("ValueError") for item in failed)
    outcomes = json.loads(_cli("op", "results", operation_id, "--ordered", "--json", *broker).stdout)
    expected = [{"steps": steps, "fail_at": fail_at} for steps in (1, 2, 3) for fail_at in (-1, 0)]
    assert [o["request"] for o in outcomes] == expected
    stats = json.loads(_cli("op", "consolidate", operation_id, "stats", "--json", *broker).stdout)
    assert stats["fields"]["count"]["max"] == 3.0
    rerun = _cli("op", "rerun", operation_id, "--follow", "--json", *broker)
    assert rerun.returncode == 1  # they fail again: their failure is in their request
    assert json.loads(rerun.stdout)["counts"]["failed"] == 3
    assert _cli("op", "status", "0" * 32, *broker).returncode == 3  # not an operation's id
    assert _cli("op", "status", "019" + "0" * 29, *broker).returncode == 3  # no such operation
    assert _cli("sweep", "counter", *broker).returncode == 2  # no requests
