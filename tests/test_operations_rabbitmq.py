"""Operations on the real broker: a sweep across two worker processes, one SIGKILLed mid-way,
every item finished once with its own result; failures past the policy abort the rest; a
killed launcher's operation reattached and re-run; the same sweep submitted again resumes its
interrupted items from their checkpoints (the work redone counted); one control message
steers every item, queued and running, and the launcher hears it from another process."""

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

    count = 500
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


TALLY = """
import os, time
from brokerexec import Input, Service, ServiceHandler


class Tally(Service):
    '''Takes ``steps`` steps, each written to $TALLY_LOG as a line: what every execution did.'''

    name = "tally"
    inputs = (Input("n", int), Input("steps", int), Input("delay", float, default=0.02))
    settable = {"note": str}

    def __init__(self):
        self.done, self.total, self.note, self.resumed_from = 0, 0, "", None

    def run(self, handler: ServiceHandler, request):
        self.total = request["steps"]
        with open(os.environ["TALLY_LOG"], "a", buffering=1) as log:
            while self.done < self.total:
                handler.ready()
                time.sleep(request["delay"])  # the workload
                self.done += 1
                log.write(f"{request['n']} {self.done}\\n")
        handler.ready()
        return {"n": request["n"], "done": self.done, "resumed_from": self.resumed_from, "note": self.note}

    def progress(self):
        return {"done": self.done, "total": self.total, "fraction": self.done / max(self.total, 1)}

    def checkpoint(self):
        return {"done": self.done}

    def restore(self, state):
        self.done = self.resumed_from = state["done"]
"""


def _tally(tmp_path: Any) -> tuple[str, Any]:
    spec = tmp_path / "tally.py"
    spec.write_text(TALLY)
    return f"{spec}:Tally", tmp_path / "steps.log"


def test_the_same_sweep_submitted_again_skips_what_finished_and_resumes_interrupted_items(
        own_vhost: str, worker_process: Callable[..., Any], tmp_path: Any) -> None:
    import threading

    spec, log = _tally(tmp_path)
    env = {"TALLY_LOG": str(log)}
    workers = [worker_process("--concurrency", "4", "--heartbeat", "2", services=(spec,), url=own_vhost,
                              env=env) for _ in range(2)]
    short = [{"n": n, "steps": 5} for n in range(8)]
    long = [{"n": n, "steps": 100} for n in range(8, 16)]
    requests = short + long  # the short ones take the 8 slots first
    positions: dict[str, int] = {}
    far_enough = threading.Event()

    def on_progress(event: Any) -> None:
        positions[event.job_id] = max(positions.get(event.job_id, 0), int(event.data.get("done", 0)))
        if sum(1 for done in positions.values() if 40 <= done < 100) == 8:
            far_enough.set()

    with Client(own_vhost, timeout=10) as client:
        listening = client.subscribe("progress.tally.*", on_progress)
        op = client.operation("tally", requests, name="resumable", progress_delta=0.1, checkpoint_delta=0.2)
        assert far_enough.wait(WAIT), positions
        for worker in workers:
            worker.kill()  # SIGKILL: every long item interrupted, 40 steps in or more
        listening.close()
        finished_before = {item.key: item.job_id for item in op.items("finished")}
        op.close()  # and its client gone
    assert len(finished_before) == 8
    for _ in range(2):
        worker_process("--concurrency", "4", "--heartbeat", "2", services=(spec,), url=own_vhost, env=env)
    with Client(own_vhost, timeout=10) as client:
        plan = client.operation_plan("tally", requests, name="resumable")
        assert plan.operation == op.id
        assert set(plan.skip) == set(finished_before) and not plan.rerun and not plan.launch
        assert len(plan.in_flight) + len(plan.resume) == 8
        with client.operation("tally", requests, name="resumable") as again:
            assert again.id == op.id
            status = again.wait(WAIT)
            assert (status.counts["skipped"], status.counts["finished"]) == (8, 8)
            outcomes = {o.request["n"]: o for o in again.outcomes()}
            assert all(outcomes[r["n"]].value["done"] == r["steps"] for r in requests)
            for item in again.items():
                assert item.runs == 1  # nothing launched again
                if item.key in finished_before:
                    assert item.job_id == finished_before[item.key]
            resumed = [outcomes[r["n"]].value["resumed_from"] for r in long]
            assert all(start is not None and start > 0 for start in resumed), resumed  # from a checkpoint
    # the work redone: every step any execution took, less the steps each item has
    taken: dict[int, int] = {}
    for line in log.read_text().splitlines():
        taken[int(line.split()[0])] = taken.get(int(line.split()[0]), 0) + 1
    redone = {r["n"]: taken[r["n"]] - r["steps"] for r in requests}
    from_scratch = sum(taken[n] - 100 + outcomes[n].value["resumed_from"] for n in range(8, 16))
    print(f"steps redone after the kill: {sum(redone.values())} (from scratch: {from_scratch}): {redone}")
    assert all(redone[r["n"]] == 0 for r in short)  # skipped: never run again
    # an interrupted item redoes only what it did since its newest stored checkpoint (taken
    # every 0.2 s, stored a moment later): less than a restart, which redoes all it did
    at_kill = {r["n"]: redone[r["n"]] + outcomes[r["n"]].value["resumed_from"] for r in long}
    assert all(0 <= redone[r["n"]] < at_kill[r["n"]] for r in long), (redone, at_kill)


def test_one_control_message_pauses_sets_and_aborts_every_item_queued_and_running(
        own_vhost: str, worker_process: Callable[..., Any], tmp_path: Any) -> None:
    spec, log = _tally(tmp_path)
    worker_process("--concurrency", "2", services=(spec,), url=own_vhost, env={"TALLY_LOG": str(log)})
    requests = [{"n": n, "steps": 150, "delay": 0.01} for n in range(5)]  # 2 run, 3 wait in the queue
    with Client(own_vhost, timeout=10) as client, client.operation("tally", requests) as op:
        with op._cond:
            assert op._cond.wait_for(lambda: op.status().counts["running"] == 2, WAIT)
        assert op.pause() == 5
        with op._cond:
            assert op._cond.wait_for(lambda: op.status().counts["paused"] == 2, WAIT)
        assert op.set(note="tuned") == 5
        paused = op.items("paused")[0]
        assert client.job(paused.job_id or "").abort()  # a slot frees: a queued item starts paused
        with op._cond:
            assert op._cond.wait_for(lambda: op.status().counts["paused"] == 2
                                     and op.status().counts["aborted"] == 1, WAIT)
        assert op.resume() == 4
        status = op.wait(WAIT)
        assert (status.counts["finished"], status.counts["aborted"]) == (4, 1)
        assert all(o.value["note"] == "tuned" for o in op.outcomes() if o.ok)  # queued ones too
    more = [{"n": n, "steps": 5000, "delay": 0.01} for n in range(10, 30)]
    with Client(own_vhost, timeout=10) as client, client.operation("tally", more) as op:
        with op._cond:
            assert op._cond.wait_for(lambda: op.status().counts["running"] == 2, WAIT)
        assert op.abort() == 20
        status = op.wait(30)  # 18 queued: each dropped by the worker, with its record and event
        assert status.counts["aborted"] == 20
    # A launcher still launching (two at a time) hears its operation steered from elsewhere:
    # `brokerexec op pause` and `op abort` in other processes hold, then stop, its launching.
    rest = [{"n": n, "steps": 5000, "delay": 0.01} for n in range(30, 50)]
    broker = ("--broker", own_vhost)
    with Client(own_vhost, timeout=10) as client, client.operation("tally", rest, max_in_flight=2) as op:
        with op._cond:
            assert op._cond.wait_for(lambda: op.status().counts["running"] == 2, WAIT)
        paused = _cli("op", "pause", op.id, *broker)
        assert paused.returncode == 0, paused.stderr
        with op._cond:
            assert op._cond.wait_for(lambda: op.status().counts["paused"] == 2, WAIT)
        aborted = _cli("op", "abort", op.id, *broker)
        assert aborted.returncode == 0, aborted.stderr
        status = op.wait(30)
        assert op.stopped == "aborted"
        assert len(op.items()) == 2  # the 18 others never launched
        assert status.counts["aborted"] == 20 and status.done == 20
