"""An operation's items (``brokerexec/operations/``), sans-I/O: a grid of requests, each
request's key, and the registry of their states (valjean's Env, pySPACE's check_status)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from brokerexec.errors import DecodeError, InvalidRequest
from brokerexec.operations import Grid, ItemState, Registry, grid, item_key
from brokerexec.operations.requests import check_key


def test_a_grid_is_every_combination_last_axis_fastest_and_made_as_iterated() -> None:
    assert list(grid(a=[1, 2], b=[3, 4])) == [{"a": 1, "b": 3}, {"a": 1, "b": 4},
                                              {"a": 2, "b": 3}, {"a": 2, "b": 4}]
    large = grid(x=range(1000), y=range(100), z=["s"])
    assert len(large) == 100_000 and next(iter(large)) == {"x": 0, "y": 0, "z": "s"}
    assert isinstance(large, Grid) and "100000 requests" in repr(large)


@pytest.mark.parametrize("axes", [{}, {"a": []}, {"a": "abc"}, {"a": 3}, {"a": {"k": 1}}])
def test_a_grid_without_axes_or_with_an_axis_that_is_not_a_list_is_refused(axes: dict[str, object]) -> None:
    with pytest.raises(InvalidRequest, match="grid"):
        grid(**axes)  # type: ignore[arg-type]


def test_an_items_key_names_its_service_and_its_request_in_normal_form() -> None:
    key = item_key("fit", {"a": 1, "b": [1, 2]})
    assert len(key) == 32 and int(key, 16) >= 0
    assert item_key("fit", {"b": [1, 2], "a": 1}) == key  # the order of keys does not count
    assert item_key("scan", {"a": 1, "b": [1, 2]}) != key
    assert item_key("fit", {"a": 1.0, "b": [1, 2]}) != key  # as in JSON
    assert item_key("fit", {"a": 1, "b": [2, 1]}) != key
    # what the wire makes of it (codec.encode): a tuple is a list, a key a string
    assert item_key("fit", {"a": 1, "b": (1, 2)}) == key and item_key("f", {1: 2}) == item_key("f", {"1": 2})


@pytest.mark.parametrize("request_", [[1, 2], "a", {"x": float("nan")}, {"x": object()}])
def test_a_request_that_is_not_a_json_object_has_no_key(request_: object) -> None:
    with pytest.raises(InvalidRequest, match="request"):
        item_key("fit", request_)  # type: ignore[arg-type]


def test_a_key_given_is_checked() -> None:
    assert check_key("run-1 (seed 3)") == "run-1 (seed 3)"
    for bad in ("", "a\nb", "x" * 201, 7):
        with pytest.raises(InvalidRequest, match="key"):
            check_key(bad)


def _three() -> Registry:
    registry = Registry()
    for n in range(3):
        registry.add(f"k{n}", {"n": n})
    return registry


def test_news_of_a_job_move_its_item_and_nothing_else() -> None:
    registry = _three()
    registry.launched("k0", "job-a")
    assert registry.observe("job-z", "running", at=1.0) is None  # a job of no item
    assert registry.observe("job-a", "running", at=10.0, attempt=1, worker="node-1") is not None
    assert registry.observe("job-a", "running", at=11.0, attempt=1) is None  # nothing new
    item = registry.observe("job-a", "failed", at=15.0, error="ValueError: bad n")
    assert item is not None and (item.state, item.started, item.ended, item.run_time) == (
        ItemState.FAILED, 10.0, 15.0, 5.0)
    assert (item.worker, item.error, item.attempt, item.runs) == ("node-1", "ValueError: bad n", 1, 1)
    # its first record counts: nothing after it changes the item
    assert registry.observe("job-a", "finished", at=16.0) is None
    assert registry.counts() == {"queued": 2, "running": 0, "paused": 0, "resuming": 0, "finished": 0,
                                 "failed": 1, "aborted": 0, "skipped": 0}


def test_a_rerun_leaves_its_earlier_job_behind_and_older_attempts_are_ignored() -> None:
    registry = _three()
    registry.launched("k1", "job-1")
    registry.observe("job-1", "aborted", at=5.0)
    again = registry.launched("k1", "job-2")
    assert (again.state, again.runs, again.job_id, again.ended, again.request) == (
        ItemState.QUEUED, 2, "job-2", None, {"n": 1})
    assert registry.observe("job-1", "finished", at=6.0) is None  # the old run's news
    assert registry.key_of("job-1") is None and registry.key_of("job-2") == "k1"
    registry.observe("job-2", "running", at=7.0, attempt=2, checkpoint=8.0)
    assert registry.observe("job-2", "running", at=7.5, attempt=1) is None  # an older attempt
    registry.observe("job-2", "resuming", at=9.0, attempt=2, checkpoint=7.0)  # an older checkpoint
    item = registry.item("k1")
    assert (item.state, item.started, item.checkpoint) == (ItemState.RESUMING, 7.0, 8.0)
    # late news of its queueing never takes a started item back
    assert registry.observe("job-2", "created", at=7.1) is None
    assert registry.item("k1").state is ItemState.RESUMING


def test_an_item_is_added_once_and_asked_of_by_its_key() -> None:
    registry = _three()
    with pytest.raises(InvalidRequest, match="already"):
        registry.add("k1")
    with pytest.raises(InvalidRequest, match="no item"):
        registry.launched("nope", "job-x")
    assert [item.key for item in registry] == ["k0", "k1", "k2"] and len(registry) == 3


def test_status_counts_the_fraction_done_the_throughput_an_eta_and_the_best() -> None:
    registry = Registry()
    for n in range(10):
        registry.add(f"k{n}")
        registry.launched(f"k{n}", f"job-{n}")
    status = registry.status()
    assert (status.total, status.done, status.fraction) == (10, 0, 0.0)
    assert (status.throughput, status.eta) == (None, None)
    losses = [0.5, 0.2, float("nan"), "0.1", 0.3]  # NaN and a string are no numbers
    for n, loss in enumerate(losses):
        registry.observe(f"job-{n}", "finished", at=float(n), improved={"loss": loss})
    status = registry.status(best="loss", lowest=True)
    assert (status.done, status.fraction, status.counts["finished"]) == (5, 0.5, 5)
    assert status.throughput == pytest.approx(5 / 60) and status.eta == pytest.approx(5 / (5 / 60))
    assert status.best is not None and status.best.key == "k1"
    highest = registry.status(best="loss").best
    assert highest is not None and highest.key == "k0"
    assert registry.status(best="accuracy").best is None
    assert json.loads(json.dumps(status.encode()))["best"]["key"] == "k1"
    assert Registry().status().fraction == 1.0 and Registry().status().eta == 0.0


def test_the_plan_keeps_what_finished_and_runs_again_what_did_not() -> None:
    registry = Registry()
    states = {"done": "finished", "bad": "failed", "cut": "aborted", "going": "running",
              "lost-with": "resuming", "lost-without": "resuming", "new": None}
    for key, state in states.items():
        registry.add(key)
        if state is not None:
            registry.launched(key, f"job-{key}")
            registry.observe(f"job-{key}", state, at=1.0, checkpoint=0.5 if key == "lost-with" else None)
    registry.add("earlier")
    registry.skip("earlier")
    plan = registry.plan()
    assert plan.encode() == {"skip": ["done", "earlier"], "resume": ["lost-with"],
                             "rerun": ["bad", "cut", "lost-without"], "launch": ["new"],
                             "in_flight": ["going"], "operation": None}
    assert plan.counts() == {"skip": 2, "resume": 1, "rerun": 3, "launch": 1, "in_flight": 1}
    assert registry.status().throughput is not None  # three ended: skipped ones do not count
    assert registry.status().done == 4


def test_merge_done_takes_an_earlier_runs_finished_items_only() -> None:
    earlier = _three()
    for n, state in enumerate(("finished", "failed")):
        earlier.launched(f"k{n}", f"old-{n}")
        earlier.observe(f"old-{n}", state, at=2.0)
    fresh = _three()
    fresh.add("k9")
    assert fresh.merge_done(earlier) == 1
    assert fresh.item("k0").state is ItemState.FINISHED and fresh.item("k0").job_id == "old-0"
    assert [item.key for item in fresh.items("queued")] == ["k1", "k2", "k9"]
    assert fresh.merge_done(earlier) == 0  # once


def test_a_registry_is_saved_and_loaded_as_json_whole_and_a_bad_file_is_a_clear_error(tmp_path: Path) -> None:
    registry = _three()
    registry.launched("k2", "job-2")
    registry.observe("job-2", "finished", at=3.0, attempt=1, worker="n", improved={"loss": 0.25})
    path = tmp_path / "op.json"
    registry.save(path)
    assert json.loads(path.read_text())["format"] == 1 and not list(tmp_path.glob(".*.tmp"))
    loaded = Registry.load(path)
    assert loaded.items() == registry.items() and loaded.key_of("job-2") == "k2"
    for text in ("{", '{"format": 2, "items": []}', '{"format": 1, "items": [{"nokey": 1}]}',
                 '{"format": 1, "items": [{"key": "a", "state": "weird"}]}',
                 '{"format": 1, "items": [{"key": "a"}, {"key": "a"}]}'):
        path.write_text(text)
        with pytest.raises(DecodeError):
            Registry.load(path)


def test_news_from_many_threads_at_once_are_each_applied_once() -> None:
    registry = Registry()
    for n in range(2000):
        registry.add(f"k{n}")
        registry.launched(f"k{n}", f"job-{n}")
    applied: list[int] = []

    def report(start: int) -> None:
        count = 0
        for n in range(2000):  # every thread reports every job: one wins each
            if registry.observe(f"job-{(n + start) % 2000}", "finished", at=1.0) is not None:
                count += 1
        applied.append(count)

    threads = [threading.Thread(target=report, args=(n * 500,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sum(applied) == 2000 and registry.counts()["finished"] == 2000

    # a read-modify-write of several items, atomically
    def swap(inner: Registry) -> int:
        return sum(1 for item in inner.items("finished")[:10] if inner.skip(item.key))

    assert registry.atomically(swap) == 10 and registry.counts()["skipped"] == 10


# ---- an operation in the journal (protocol/operation_log.py), sans-I/O --------------------------


def test_an_operation_is_gathered_again_from_every_stream_of_the_journal() -> None:
    from brokerexec import codec
    from brokerexec.protocol.commands import Incoming
    from brokerexec.protocol.journal import launches_entry
    from brokerexec.protocol.messages import Launch
    from brokerexec.protocol.names import (
        LAUNCHES_EXCHANGE,
        LAUNCHES_TYPE,
        PROBES_EXCHANGE,
        RECORD_TYPE,
        STARTED_TYPE,
        new_job_id,
    )
    from brokerexec.protocol.operation_log import OperationHeader, OperationScan, header_message, time_of_id

    op_id = new_job_id()
    created = time_of_id(op_id)
    assert created is not None and abs(created - time.time()) < 5
    assert time_of_id("0" * 32) is None and time_of_id("not hex") is None

    def entry(kind: str, body: dict, message_id: str, exchange: str = LAUNCHES_EXCHANGE) -> Incoming:
        return Incoming(codec.encode(body), "application/json", message_id, kind, exchange=exchange)

    header = OperationHeader(op_id, "fit", "a sweep", created, {"on_error": "continue"}, None, 3)
    message = header_message(header)
    scan = OperationScan(op_id)
    stream = scan.streams[0]
    jobs = [new_job_id() for _ in range(4)]
    scan.feed(stream, Incoming(message.body, "application/json", op_id, message.type,
                               exchange=LAUNCHES_EXCHANGE))
    scan.feed(stream, entry(LAUNCHES_TYPE, launches_entry("fit", 1.0, jobs[:2], [{"a": 1}, {"a": 2}],
                                                          operation=op_id, keys=["k1", "k2"]), "x"))
    scan.feed(stream, entry(LAUNCHES_TYPE, launches_entry("fit", 1.0, [new_job_id()], [{"a": 9}],
                                                          operation="another", keys=["k9"]), "y"))
    single = Launch.new("fit", {"a": 3}, operation=op_id, key="k3")
    scan.feed(stream, entry("brokerexec.launch", single.encode(), single.job_id))
    rerun = Launch.new("fit", {"a": 2}, operation=op_id, key="k2")  # k2 re-run: its newer job
    scan.feed(stream, entry("brokerexec.launch", rerun.encode(), rerun.job_id))
    scan.feed(stream, entry(STARTED_TYPE, {"job_id": jobs[0], "attempt": 1, "worker": {"hostname": "h"},
                                           "time": 2.0}, jobs[0]))
    scan.feed(stream, entry(RECORD_TYPE, {"job_id": jobs[0], "state": "finished", "result": 1}, jobs[0]))
    scan.feed(stream, entry(RECORD_TYPE, {"job_id": jobs[0], "state": "failed"}, jobs[0]))  # the first counts
    scan.feed(stream, entry(RECORD_TYPE, {"job_id": jobs[3], "state": "finished"}, jobs[3]))  # not its job
    # what anyone may publish to the probes exchange is not an entry
    scan.feed(stream, entry(RECORD_TYPE, {"job_id": jobs[1], "state": "finished"}, jobs[1], PROBES_EXCHANGE))
    for other in scan.streams:
        assert scan.feed(other, Incoming(b"", message_id=scan.probes[other])) is (other == scan.streams[-1])
    found = scan.found
    assert found.header == header and found.service == "fit"
    assert [(item.key, item.runs) for item in found.ordered()] == [("k1", 1), ("k2", 2), ("k3", 1)]
    assert found.items["k2"].job_id == rerun.job_id and found.items["k2"].request == {"a": 2}
    assert found.started[jobs[0]]["worker"] == {"hostname": "h"}
    assert found.records == {jobs[0]: {"job_id": jobs[0], "state": "finished", "result": 1}}


def test_an_operations_items_found_in_the_journal_keep_the_order_of_their_requests() -> None:
    """The streams are read side by side: a sweep's later part may be read first. The items
    still come in the order their requests were launched."""
    from brokerexec import codec
    from brokerexec.protocol.commands import Incoming
    from brokerexec.protocol.journal import launches_entry
    from brokerexec.protocol.names import LAUNCHES_EXCHANGE, LAUNCHES_TYPE, new_job_id
    from brokerexec.protocol.operation_log import OperationScan

    op_id = new_job_id()
    scan = OperationScan(op_id)
    first, second = scan.streams[3], scan.streams[7]

    def part(sent: float, keys: list[str]) -> Incoming:
        body = launches_entry("fit", sent, [new_job_id() for _ in keys], [{"k": k} for k in keys],
                              operation=op_id, keys=list(keys))
        return Incoming(codec.encode(body), "application/json", "x", LAUNCHES_TYPE,
                        exchange=LAUNCHES_EXCHANGE)

    scan.feed(second, part(2.0, ["c", "d"]))  # the sweep's second part, read first
    scan.feed(first, part(1.0, ["a", "b"]))
    assert [item.key for item in scan.found.ordered()] == ["a", "b", "c", "d"]
