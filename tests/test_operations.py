"""Operations through a client (``client.operation()``), on ``memory://``: one service over many
requests, launched as they come, watched, consolidated, stopped by their failure policy, and
re-run where they failed. ``test_operations_rabbitmq.py`` runs them on the real broker."""

from __future__ import annotations

import csv
import itertools
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sample_services import Counter

from brokerexec import (
    Client,
    ConfigurationError,
    Input,
    InvalidRequest,
    InvalidState,
    ItemState,
    JobNotFound,
    Operation,
    RemoteError,
    Service,
    ServiceHandler,
    Timeout,
    UnknownService,
    grid,
)
from brokerexec.operations import item_key
from brokerexec.protocol.names import new_job_id

pytestmark = pytest.mark.timeout(60)
WAIT = 30.0


class Held(Service):
    """Waits at ready() until its test opens the gate named in its request (or fails)."""

    name = "held"
    gates: dict[str, threading.Event] = {}
    broken: set[str] = set()

    def run(self, handler: ServiceHandler, request: dict[str, Any]) -> dict[str, Any]:
        gate = self.gates.setdefault(request["gate"], threading.Event())
        while not gate.wait(0.01):
            handler.ready()
        handler.ready()
        if request.get("n") in self.broken or request["gate"] in self.broken:
            raise ValueError(f"item {request.get('n')} is broken")
        return {"n": request.get("n"), "score": float(request.get("n", 0)) ** 2 % 7}


@pytest.fixture
def client() -> Iterator[Client]:
    with Client("memory://", services=[Counter, Held], concurrency=4) as client:
        yield client


def opened(name: str) -> str:
    Held.gates.setdefault(name, threading.Event()).set()
    return name


def test_a_grid_runs_one_job_per_request_and_every_outcome_is_kept(client: Client, tmp_path: Path) -> None:
    requests = grid(steps=[1, 2, 3], fail_at=[-1, 0])
    with client.operation("counter", requests, name="fit") as op:
        status = op.wait(WAIT)
        assert (status.total, status.done, status.fraction) == (6, 6, 1.0)
        assert status.counts["finished"] == 3 and status.counts["failed"] == 3
        # in the order of the requests, each named by the hash of its service and request
        ordered = list(op.results(ordered=True))
        assert [outcome.request for outcome in ordered] == list(requests)
        assert [outcome.key for outcome in ordered] == [item_key("counter", r) for r in requests]
        assert [outcome.value for outcome in ordered if outcome.ok] == [
            {"count": n, "label": ""} for n in (1, 2, 3)]
        failed = [outcome for outcome in ordered if not outcome.ok]
        assert all(o.state == "failed" and "boom at step 0" in (o.error or {})["message"] for o in failed)
        with pytest.raises(RemoteError, match="boom at step 0"):
            failed[0].result()
        assert sorted(o.key for o in op.results()) == sorted(o.key for o in ordered)  # as they ended
        # errors="raise" raises the first failure that comes, typed as Job.result would
        with pytest.raises(RemoteError, match="boom"):
            list(op.results(ordered=True, errors="raise"))
        # a reader that stopped after 4 goes on from there
        assert [o.key for o in op.results(ordered=True, start=4)] == [o.key for o in ordered[4:]]
        items = op.items()
        assert [item.state for item in items] == [ItemState(o.state) for o in ordered]
        assert all(item.started is not None and item.ended is not None and item.runs == 1 for item in items)
        assert op.items("failed", limit=2) == [item for item in items if item.state is ItemState.FAILED][:2]
        assert op.items(offset=4) == items[4:]
        # consolidation always runs: successes and failures alike
        stats = op.consolidate("stats")
        assert stats["counts"] == {"aborted": 0, "failed": 3, "finished": 3}
        assert stats["fields"]["count"] == {"count": 3, "mean": 2.0, "min": 1.0, "max": 3.0, "stdev": 1.0}
        assert op.consolidate("best:count")["value"] == {"count": 3, "label": ""}
        assert op.consolidate("best:-count")["value"] == {"count": 1, "label": ""}
        assert op.consolidate(lambda outcomes: sum(o.ok for o in outcomes)) == 3
        rows = op.consolidate("collect", tmp_path / "all.jsonl")
        lines = (tmp_path / "all.jsonl").read_text().splitlines()
        assert [json.loads(line) for line in lines] == rows and len(rows) == 6
        op.consolidate("collect", tmp_path / "all.csv")
        with (tmp_path / "all.csv").open() as table:
            read = list(csv.DictReader(table))
        assert {row["request.steps"] for row in read} == {"1", "2", "3"}
        assert sorted(row["value.count"] for row in read if row["state"] == "finished") == ["1", "2", "3"]
        assert all(row["error"].startswith("ValueError: boom") for row in read if row["state"] == "failed")
        with pytest.raises(ConfigurationError, match="best:<field>"):
            op.consolidate("median")


def test_requests_are_taken_as_they_are_launched_never_all_first(client: Client) -> None:
    gate = f"stream-{id(client)}"
    pulled = 0

    def requests() -> Iterator[dict[str, Any]]:
        nonlocal pulled
        for n in itertools.count():
            if n == 20:
                return
            pulled += 1
            yield {"gate": gate, "n": n}

    with client.operation("held", requests(), max_in_flight=5) as op:
        assert pulled == 5  # the first batch: what max_in_flight lets go now
        seen_in_flight: list[int] = []

        def in_flight(_: Any) -> None:
            seen_in_flight.append(sum(1 for item in op.items() if item.job_id and not item.state.ended))

        subscription = client.subscribe("state.held.*", in_flight)
        try:
            opened(gate)
            status = op.wait(WAIT)
        finally:
            subscription.close()
        assert status.counts["finished"] == 20 and pulled == 20
        assert seen_in_flight and max(seen_in_flight) <= 5


@pytest.mark.parametrize(("policy", "stops_after"), [({"on_error": "fail_fast"}, 1),
                                                      ({"max_failures": 2}, 2),
                                                      ({"max_failures": 0.1}, 3)])
def test_failures_past_the_policy_abort_the_rest(client: Client, policy: dict[str, Any],
                                                 stops_after: int) -> None:
    gate = f"policy-{policy}"
    Held.broken.add(gate + "-bad")
    bad = f"{gate}-bad"
    opened(bad)
    requests = [*({"gate": bad, "n": n} for n in range(stops_after)),
                *({"gate": gate, "n": n} for n in range(20))]
    with client.operation("held", requests, max_in_flight=stops_after + 2, **policy) as op:
        status = op.wait(WAIT)
        assert op.stopped is not None and f"{stops_after} item(s) failed" in op.stopped
        assert status.counts["failed"] == stops_after
        assert status.counts["aborted"] == 20  # launched and aborted, or never launched
        assert status.done == status.total == 20 + stops_after
        assert sum(1 for item in op.items() if item.job_id) < 20 + stops_after  # not all launched
    opened(gate)


def test_continue_runs_every_item_whatever_fails(client: Client) -> None:
    requests = [{"steps": n + 1, "fail_at": 0 if n % 2 else -1} for n in range(10)]
    with client.operation("counter", requests) as op:
        status = op.wait(WAIT)
    assert op.stopped is None and (status.counts["finished"], status.counts["failed"]) == (5, 5)


def test_a_rerun_launches_only_what_did_not_finish_and_keeps_the_rest(client: Client, tmp_path: Path) -> None:
    gate = opened("rerun")
    Held.broken.update({1, 3})
    requests = [{"gate": gate, "n": n} for n in range(5)]
    try:
        with client.operation("held", requests) as op:
            op.wait(WAIT)
            first = {item.key: item for item in op.items()}
            assert [item.state.value for item in first.values()] == [
                "finished", "failed", "finished", "failed", "finished"]
            op.save(tmp_path / "op.json")
            Held.broken.difference_update({1, 3})  # mended
            assert op.rerun() == 2
            status = op.wait(WAIT)
            assert status.counts["finished"] == 5
            after = {item.key: item for item in op.items()}
            for key, item in first.items():
                if item.state is ItemState.FINISHED:  # kept as it was: not run again
                    assert after[key] == item
                else:
                    assert after[key].runs == 2 and after[key].job_id != item.job_id
            assert len(op.outcomes()) == 5 and all(outcome.ok for outcome in op.outcomes())
            assert op.rerun() == 0
    finally:
        Held.broken.difference_update({1, 3})
    # saved, loaded elsewhere: the table and the outcomes, consolidated without running anything
    loaded = Operation.load(tmp_path / "op.json")
    assert (loaded.id, loaded.name, loaded.service) == (op.id, op.name, "held")
    assert loaded.status().counts["failed"] == 2 and len(loaded.outcomes()) == 5
    assert loaded.consolidate("stats")["counts"] == {"aborted": 0, "failed": 2, "finished": 3}
    with pytest.raises(InvalidState, match="without a client"):
        loaded.rerun()
    # with a client, it is steered again: the re-run of the two that failed then
    Held.broken.clear()
    with Operation.load(tmp_path / "op.json", client) as again:
        assert again.rerun() == 2
        assert again.wait(WAIT).counts["finished"] == 5


def test_an_operation_is_aborted_paused_and_resumed_as_a_whole(client: Client) -> None:
    gate = "steered"
    requests = [{"gate": gate, "n": n} for n in range(12)]
    with client.operation("held", requests, max_in_flight=4) as op:
        brokered = op.pause()
        assert brokered >= 1
        assert op.resume() >= 1
        aborted = op.abort()
        assert aborted == 4
        status = op.wait(WAIT)
    assert op.stopped == "aborted"
    assert status.counts["aborted"] == 12 and status.done == 12
    assert len(op.items()) == 4  # the 8 others were never taken from the list, nor launched
    assert [o.state for o in op.results(ordered=True)] == ["aborted"] * 4


def test_an_abort_sent_from_another_client_stops_the_launcher_too(client: Client) -> None:
    # Given an operation still launching (two at a time, ten items)
    gate = "aborted elsewhere"
    requests = [{"gate": gate, "n": n} for n in range(10)]
    with client.operation("held", requests, max_in_flight=2) as op:
        # When another client (``brokerexec op abort``, the web view) aborts it by its id
        with Client("memory://", services=[Held]) as other:
            assert other.operation_of(op.id).abort() == 2
        # Then the launcher launches no more: the two running are aborted, the rest never run
        status = op.wait(WAIT)
        assert op.stopped == "aborted"
        assert len(op.items()) == 2
        assert status.counts["aborted"] == 10 and status.done == 10
        # and a re-run launched after that abort goes on: the abort was before it began
        opened(gate)
        assert op.rerun() == 2
        assert op.wait(WAIT).counts["finished"] == 10


def test_bad_sweeps_are_refused_at_once(client: Client) -> None:
    with pytest.raises(UnknownService, match="nobody"):
        client.operation("nobody", [{"a": 1}])
    with pytest.raises(InvalidRequest, match="key"):
        client.operation("counter", [{"steps": 1}, {"steps": 1}])  # one key twice
    with pytest.raises(InvalidRequest, match="JSON object"):
        client.operation("counter", [["steps", 1]])
    with pytest.raises(ConfigurationError, match="on_error"):
        client.operation("counter", [{"steps": 1}], on_error="ignore")
    with pytest.raises(ConfigurationError, match="max_failures"):
        client.operation("counter", [{"steps": 1}], max_failures=0)
    with pytest.raises(InvalidRequest, match="max_in_flight"):
        client.operation("counter", [{"steps": 1}], max_in_flight=0)
    # the caller's own keys
    with client.operation("counter", [("first", {"steps": 1}), ("second", {"steps": 2})]) as op:
        op.wait(WAIT)
        assert [o.key for o in op.results(ordered=True)] == ["first", "second"]


def test_a_bad_request_further_on_stops_the_launching_and_wait_says_why(client: Client) -> None:
    def requests() -> Iterator[Any]:
        yield from ({"steps": n} for n in range(1, 4))
        yield "not a request"

    with client.operation("counter", requests(), max_in_flight=3) as op:
        with pytest.raises(InvalidRequest, match="JSON object"):
            op.wait(WAIT)
        assert op.status().counts["finished"] == 3


def test_results_time_out_when_nothing_comes(client: Client) -> None:
    with client.operation("held", [{"gate": "never", "n": 1}]) as op:
        with pytest.raises(Timeout, match="no new outcome"):
            next(op.results(timeout=0.2))
        with pytest.raises(Timeout, match="did not end"):
            op.wait(0.2)
        op.abort()
        op.wait(WAIT)


def test_items_the_broker_did_not_take_fail_as_not_launched_and_a_rerun_launches_them(
        client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    from brokerexec import BrokerConnectionError

    gate = "unlaunched"
    requests = [{"gate": gate, "n": n} for n in range(4)]
    with client.operation("held", requests, max_in_flight=2) as op:
        def refused(launches: list[Any]) -> None:
            raise BrokerConnectionError("the broker is gone")

        monkeypatch.setattr(client.transport, "launch", refused)
        opened(gate)  # the first two end: the next two are launched, and refused
        with pytest.raises(BrokerConnectionError, match="gone"):
            op.wait(WAIT)
        states = [item.state.value for item in op.items()]
        assert states[:2] == ["finished", "finished"] and set(states[2:]) == {"failed"}  # 1 or 2
        assert all("not launched" in (o.error or {}).get("message", "") for o in op.outcomes() if not o.ok)
        assert op.stopped is not None and "launching failed" in op.stopped
        status = op.status()  # a request not taken yet counts as aborted: nothing launches it now
        assert status.total == 4 and status.done == 4
        monkeypatch.undo()
        assert op.rerun() == len(states) - 2  # those that failed; then the rest of the list
        assert op.wait(WAIT).counts["finished"] == 4
        assert [o.request for o in op.results(ordered=True)] == requests


def test_another_client_reattaches_by_id_and_follows_the_items_to_their_end(client: Client) -> None:
    gate = "reattached"
    Held.broken.add(7)
    requests = [{"gate": gate, "n": n} for n in range(10)]
    try:
        op = client.operation("held", requests, name="to find again", max_failures=3)
        assert any(entry["id"] == op.id and entry["name"] == "to find again" and entry["expected"] == 10
                   for entry in client.operations())
        with Client("memory://", services=[Held]) as other:
            again = other.operation_of(op.id)
            assert (again.id, again.name, again.service) == (op.id, "to find again", "held")
            assert again.policy.max_failures == 3
            assert [item.key for item in again.items()] == [item.key for item in op.items()]
            assert [item.job_id for item in again.items()] == [item.job_id for item in op.items()]
            assert again.status().total == 10
            opened(gate)
            status = again.wait(WAIT)
            assert (status.counts["finished"], status.counts["failed"]) == (9, 1)
            values = [o.value for o in again.results(ordered=True)]
            assert values == [o.value for o in op.results(ordered=True)]
            # reattached once more after the end: everything from the journal alone
            ended = other.operation_of(op.id)
            assert ended.done and ended.wait(WAIT).counts == status.counts
            assert ended.items("failed")[0].error == "ValueError: item 7 is broken"
            assert ended.items("finished")[0].started is not None
        op.close()
    finally:
        Held.broken.discard(7)
    with pytest.raises(JobNotFound, match="no operation"):
        client.operation_of(new_job_id())
    with pytest.raises(InvalidRequest, match="a request at least"):
        client.operation("counter", [])
    with pytest.raises(InvalidRequest, match="a request at least"):
        client.operation("counter", iter([]))


def test_set_reaches_every_running_item_add_launches_more_and_plan_says_what_a_rerun_does(
        client: Client) -> None:
    with client.operation("counter", [{"steps": 300 + n, "delay": 0.01} for n in range(4)]) as op:
        with op._cond:  # every item running (the registry notifies as items move)
            assert op._cond.wait_for(lambda: op.status().counts["running"] == 4, WAIT)
        assert op.set(label="tuned") == 4
        op.wait(WAIT)
        assert all(o.value["label"] == "tuned" for o in op.results())
    gate = "added"
    with client.operation("held", [{"gate": gate, "n": n} for n in range(2)]) as op:
        op.add([{"gate": gate, "n": n} for n in range(2, 5)])
        assert op.status().total == 5
        plan = op.plan()
        assert len(plan.in_flight) + len(plan.launch) == len(op.items()) and not plan.rerun
        opened(gate)
        status = op.wait(WAIT)
        assert status.counts["finished"] == 5
        assert op.plan().skip == [item.key for item in op.items()]


def test_one_control_message_steers_every_item_running_or_queued(client: Client) -> None:
    sent: list[Any] = []
    send = client.transport.control
    client.transport.control = lambda control: (sent.append(control), send(control))[1]  # type: ignore[method-assign]
    # 4 run at once here: 2 wait in the queue
    with client.operation("held", [{"gate": "closed-for-now", "n": n} for n in range(6)]) as op:
        with op._cond:
            assert op._cond.wait_for(lambda: op.status().counts["running"] == 4, WAIT)
        assert op.pause() == 6
        with op._cond:  # held at ready(): paused, the queued two not started
            assert op._cond.wait_for(lambda: op.status().counts["paused"] == 4, WAIT)
        queued = [item for item in op.items() if item.state is ItemState.QUEUED]
        assert len(queued) == 2
        first = op.items(ItemState.PAUSED)[0]
        assert client.job(first.job_id or "").abort()  # a slot frees: a queued item starts paused
        with op._cond:
            assert op._cond.wait_for(lambda: op.status().counts["paused"] == 4
                                     and op.status().counts["aborted"] == 1, WAIT)
        opened("closed-for-now")
        assert op.resume() == 5
        status = op.wait(WAIT)
        assert (status.counts["finished"], status.counts["aborted"]) == (5, 1)
    assert [(c.intent.value, c.operation) for c in sent] == [("pause", op.id), ("resume", op.id)]
    # set: one message; the items queued when it was sent have it when they start
    with client.operation("counter", [{"steps": 300 + n, "delay": 0.01} for n in range(7)]) as op:
        with op._cond:
            assert op._cond.wait_for(lambda: op.status().counts["running"] == 4, WAIT)
        assert op.set(label="tuned") == 7
        assert all(o.value["label"] == "tuned" for o in op.results(timeout=WAIT))
        assert len(op.outcomes()) == 7
    with pytest.raises(InvalidRequest, match="needs an attribute"):
        op.set()


def test_an_abort_ends_queued_items_at_once_with_their_events(client: Client) -> None:
    with client.operation("held", [{"gate": "aborted-whole", "n": n} for n in range(40)]) as op:
        with op._cond:
            assert op._cond.wait_for(lambda: op.status().counts["running"] == 4, WAIT)
        assert op.abort() == 40
        status = op.wait(WAIT)  # no item waits for the collector's quiet questions (60 s)
        assert status.counts["aborted"] == 40
        assert {o.state for o in op.outcomes()} == {"aborted"}


def test_the_same_sweep_submitted_again_by_name_resumes_it(client: Client) -> None:
    gate = "resubmitted"
    requests = [{"gate": gate, "n": n} for n in range(6)]
    Held.broken.update({1, 4})
    try:
        opened(gate)
        with client.operation("held", requests, name="nightly") as first:
            assert first.wait(WAIT).counts == {**first.status().counts, "finished": 4, "failed": 2}
    finally:
        Held.broken.difference_update({1, 4})
    jobs_before = {item.key: item.job_id for item in first.items()}
    # what a resubmission would do, launching nothing; with one request more
    more = [*requests, {"gate": gate, "n": 6}]
    plan = client.operation_plan("held", more, name="nightly")
    assert plan.operation == first.id
    assert plan.counts() == {"skip": 4, "resume": 0, "rerun": 2, "launch": 1, "in_flight": 0}
    assert set(plan.rerun) == {first.items()[1].key, first.items()[4].key}
    assert client.operation_plan("held", more, name="another").counts()["launch"] == 7
    with client.operation("held", more, name="nightly") as again:
        assert again.id == first.id  # the same operation, resumed
        status = again.wait(WAIT)
        assert (status.counts["skipped"], status.counts["finished"], status.total) == (4, 3, 7)
        # only the failed ones and the new one ran: the finished ones kept their jobs
        redone = [item.key for item in again.items() if item.job_id != jobs_before.get(item.key)]
        assert set(redone) == {*plan.rerun, *plan.launch}
        assert [o.value["n"] for o in again.results(ordered=True)] == list(range(7))
        assert again.consolidate("stats")["counts"]["finished"] == 7
    # resume=False: a new operation of the same name
    with client.operation("held", requests, name="nightly", resume=False) as fresh:
        assert fresh.id != first.id
        assert fresh.wait(WAIT).counts["finished"] == 6


def test_a_resubmission_leaves_items_under_way_to_go_on(client: Client) -> None:
    gate = "under-way"
    requests = [{"gate": gate, "n": n} for n in range(3)]
    op = client.operation("held", requests, name="long one")
    with op._cond:
        assert op._cond.wait_for(lambda: op.status().counts["running"] == 3, WAIT)
    jobs = [item.job_id for item in op.items()]
    op.close()  # the launching client gone: its jobs go on
    with client.operation("held", requests, name="long one") as again:
        assert again.id == op.id
        assert client.operation_plan("held", requests, name="long one").counts()["in_flight"] == 3
        opened(gate)
        assert again.wait(WAIT).counts["finished"] == 3
        assert [item.job_id for item in again.items()] == jobs and {i.runs for i in again.items()} == {1}
    with pytest.raises(InvalidRequest, match="two requests"):
        client.operation_plan("held", [requests[0], requests[0]], name="long one")


class FitV1(Service):
    name = "fit-versions"
    inputs = (Input("rate", float),)

    def run(self, handler: ServiceHandler, request: dict[str, Any]) -> dict[str, Any]:
        handler.ready()
        if request["rate"] > 0.5:
            raise ValueError("diverges")
        return {"rate": request["rate"]}


class FitV2(FitV1):
    """The same service, its inputs changed since: ``rate`` is now an int, and ``depth`` is needed."""

    inputs = (Input("rate", int), Input("depth", int))


def test_a_rerun_after_the_service_changed_its_inputs_says_which_items_no_longer_validate(
        tmp_path: Path) -> None:
    requests = [{"rate": rate} for rate in (0.1, 0.9, 0.95)]
    with Client("memory://v1", services=[FitV1]) as client, client.operation("fit-versions", requests) as op:
        assert op.wait(WAIT).counts["failed"] == 2 and not op.invalid()
        op.save(tmp_path / "op.json")
    with Client("memory://v2", services=[FitV2]) as client, \
            Operation.load(tmp_path / "op.json", client) as again:
        assert again.rerun() == 2
        assert again.wait(WAIT).counts["failed"] == 2
        invalid = again.invalid()
        assert [item.request for item in invalid] == [{"rate": 0.9}, {"rate": 0.95}]
        assert all("missing required input 'depth'" in (item.error or "") for item in invalid)


def test_a_consolidation_that_raises_is_reported_with_its_traceback_and_leaves_the_outcomes(
        client: Client) -> None:
    import traceback

    with client.operation("counter", [{"steps": 1 + n} for n in range(4)]) as op:
        op.wait(WAIT)

        def broken(outcomes: list[Any]) -> float:
            return sum(o.value["count"] for o in outcomes) / 0

        with pytest.raises(ZeroDivisionError) as raised:
            op.consolidate(broken)
        assert "in broken" in "".join(traceback.format_tb(raised.value.__traceback__))  # where it failed
        assert len(op.outcomes()) == 4 and op.status().counts["finished"] == 4  # nothing lost
        assert sum(row["value"]["count"] for row in op.consolidate("collect")) == 10  # and again, unchanged


def test_op_watch_says_the_best_value_so_far(client: Client) -> None:
    from sample_services import Improver

    from brokerexec.cli.operations import _status_text

    with Client("memory://", services=[Improver]) as improvers, \
            improvers.operation("improver", [{"n": n} for n in (3, 5, 4)]) as op:
        op.wait(WAIT)
        text = _status_text(op)
    assert "3/3 done (3 finished)" in text and text.endswith("best i = 4")  # each item's last: 2, 4, 3
    with client.operation("counter", [{"steps": 1}]) as quiet:
        quiet.wait(WAIT)
        assert "best" not in _status_text(quiet)  # no improved value reported
