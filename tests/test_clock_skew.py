"""Hosts whose clocks disagree: a worker 30 s ahead or behind, a launcher 30 s ahead of the
client that cancels. No decision may depend on their clocks agreeing closer than the
documented margin (protocol/names.py CLOCK_SKEW_MARGIN). Real broker, real processes, each
with its wall clock moved by ``tests/skewed_clock/sitecustomize.py``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import brokerctl
import pytest
from test_faults import Watch, _broker_left_running, launch  # noqa: F401 (autouse)

from brokerexec import Client, JobAborted

pytestmark = [pytest.mark.rabbitmq, pytest.mark.fault, pytest.mark.timeout(180)]
WAIT = 60.0
SKEWED = str(Path(__file__).resolve().parent / "skewed_clock")
ROOT = Path(__file__).resolve().parent.parent


def skewed(seconds: float) -> dict[str, str]:
    """The environment of a process whose wall clock is ``seconds`` off."""
    path = os.pathsep.join(p for p in (SKEWED, os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "BROKEREXEC_TEST_CLOCK_OFFSET": str(seconds)}


def test_the_skewed_clock_is_real_in_the_processes_that_get_it() -> None:
    code = "import time; print(time.time())"
    moved = subprocess.run([sys.executable, "-c", code], env={**os.environ, **skewed(30)},
                           capture_output=True, text=True, check=True)
    assert abs(float(moved.stdout) - time.time() - 30) < 5


@pytest.mark.parametrize("offset", [30, -30])
def test_a_job_on_a_worker_whose_clock_is_off_answers_and_is_steered(
        amqp_url: str, worker_process: Callable[..., Any], offset: float) -> None:
    worker_process("--heartbeat", "2", env=skewed(offset), services=("Forever", "Counter"))
    watch = Watch()
    with Client(amqp_url, heartbeat=2, timeout=10) as client:
        job = launch(client, watch, "forever", {"tick": 0.01})
        # Asked at once, before its claim: every worker is asked with a half-second
        # deadline by this host's clock; a worker 30 s ahead used to drop that as expired.
        assert job.status()["state"] == "running"
        assert job.pause() is True  # obeyed at its next ready()
        brokerctl.wait_until(lambda: job.status()["state"] == "paused", 10, "the job to pause")
        assert job.resume() is True
        assert job.abort() is True
        with pytest.raises(JobAborted):
            job.result(WAIT)
        assert client.launch("counter", {"steps": 2}).result(WAIT)["count"] == 2


def test_a_job_launched_by_a_host_ahead_is_cancelled_by_one_behind(
        amqp_url: str, worker_process: Callable[..., Any]) -> None:
    worker_process("--concurrency", "1", services=("Forever", "Counter"))
    watch = Watch()
    with Client(amqp_url, heartbeat=2, timeout=10) as client:
        busy = launch(client, watch, "forever", {"tick": 0.01})
        # Queued behind it, launched by a host whose clock is 30 s ahead of this one.
        out = subprocess.run([sys.executable, "-m", "brokerexec", "launch", "--broker", amqp_url,
                              "counter", "--request", json.dumps({"steps": 1}), "--json"],
                             env={**os.environ, **skewed(30)}, capture_output=True, text=True,
                             cwd=ROOT, timeout=60)
        assert out.returncode == 0, out.stderr
        queued = client.job(json.loads(out.stdout)["job_id"])
        assert queued.status()["state"] == "queued"
        assert queued.abort() is True  # cancelled: this host's clock says before its launch
        busy.abort()
        with pytest.raises(JobAborted):
            queued.result(WAIT)
        record = queued.record()
        assert record is not None and record.get("reason") == "cancelled while queued"
        # and it never ran: the worker is free, and the next job runs at once.
        assert client.launch("counter", {"steps": 1}).result(WAIT)["count"] == 1
        assert queued.record() == record
