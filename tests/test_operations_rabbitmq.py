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
