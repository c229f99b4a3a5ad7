"""Acknowledged changes made durable before they are acknowledged (brokerexec.core.change_log),
at the handler level with a store and a note of the test's own: no transport."""

from __future__ import annotations

import concurrent.futures as cf
import threading
from typing import Any

import pytest

from brokerexec import NotDurable, ResultTooLarge, Service, ServiceHandler
from brokerexec.core.change_log import MAX_INVOKES, ChangeLog
from brokerexec.errors import RemoteError
from brokerexec.protocol.changes import invokes_of, sets_of, uncovered

WAIT = 10.0


# ---- the log ---------------------------------------------------------------------------------


def test_entries_are_numbered_on_past_what_a_resumed_job_carries() -> None:
    log = ChangeLog([{"seq": 4, "kind": "set", "attrs": {"a": 1}, "time": 1.0}], after=7)
    entries = log.applied_set({"b": 2}, 2.0)
    assert [e["seq"] for e in entries] == [4, 8] and log.last == 8
    assert sets_of(entries) == {"a": 1, "b": 2}


def test_a_set_wholly_set_again_leaves_the_log_and_covered_entries_go() -> None:
    log = ChangeLog()
    log.applied_set({"a": 1, "b": 1}, 1.0)
    log.applied_invoke("go", 2.0)
    entries = log.applied_set({"a": 2, "b": 2}, 3.0)
    assert [(e["kind"], e["seq"]) for e in entries] == [("invoke", 2), ("set", 3)]
    log.applied_set({"a": 3}, 4.0)  # b's value is only in seq 3: that one stays
    assert sets_of(log.entries()) == {"a": 3, "b": 2}
    log.covered(3)
    assert [e["seq"] for e in log.entries()] == [4]
    assert uncovered(log.entries(), 4) == []


def test_invokes_beyond_the_cap_are_folded_and_counted() -> None:
    log = ChangeLog()
    for n in range(MAX_INVOKES + 5):
        entries = log.applied_invoke(f"m{n}", float(n))
    listed = invokes_of(entries)
    assert len(listed) == MAX_INVOKES
    assert listed[0] == {"method": None, "count": 6, "time": 5.0}
    assert listed[-1]["method"] == f"m{MAX_INVOKES + 4}"


# ---- the handler: durable, then acknowledged ---------------------------------------------------


class Knob(Service):
    """Calls ready() whenever the test opens its gate; ``x`` settable, ``poke`` invokable."""

    name = "knob"
    settable = {"x": int}
    invokable = ("poke",)

    def __init__(self) -> None:
        self.x = 0
        self.pokes = 0
        self.gate = threading.Semaphore(0)
        self.stop = False

    def run(self, handler: Any, request: dict[str, Any]) -> Any:
        while not self.stop:
            self.gate.acquire()
            handler.ready()
        return {"x": self.x, "pokes": self.pokes, "payload": "p" * request.get("size", 0)}

    def poke(self) -> int:
        self.pokes += 1
        return self.pokes

    def checkpoint(self) -> dict[str, Any]:
        return {"pokes": self.pokes}

    def restore(self, state: dict[str, Any]) -> None:
        self.pokes = state["pokes"]


class Keeper:
    """A worker's store and note, answered when the test says so."""

    def __init__(self) -> None:
        self.notes: list[tuple[list[dict[str, Any]], cf.Future[None]]] = []
        self.stored: list[tuple[Any, dict[str, Any], int]] = []
        self.cond = threading.Condition()

    def note(self, changes: list[dict[str, Any]]) -> cf.Future[None]:
        future: cf.Future[None] = cf.Future()
        with self.cond:
            self.notes.append((changes, future))
            self.cond.notify_all()
        return future

    def store(self, state: Any, settable: dict[str, Any], covers: int) -> cf.Future[None]:
        self.stored.append((state, settable, covers))
        future: cf.Future[None] = cf.Future()
        future.set_result(None)
        return future

    def wait_notes(self, n: int) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.notes) >= n, WAIT)


def started(keeper: Keeper, **kwargs: Any) -> tuple[ServiceHandler, Knob]:
    handler = ServiceHandler(store=keeper.store, note=keeper.note, **kwargs)
    service = Knob()
    handler.start(service, kwargs.pop("request", {}))
    return handler, service


def test_a_set_is_acknowledged_only_once_it_is_durable() -> None:
    keeper = Keeper()
    handler, service = started(keeper)
    reply = handler.put({"intent": "set", "attrs": {"x": 5}})
    service.gate.release()  # ready(): applied, then noted
    keeper.wait_notes(1)
    changes, durable = keeper.notes[0]
    assert service.x == 5 and sets_of(changes) == {"x": 5}
    assert not reply.done()  # applied, not yet durable: its sender waits
    durable.set_result(None)
    assert reply.result(WAIT) == {"x": 5}
    service.stop = True
    service.gate.release()
    handler.join(WAIT)


def test_a_change_that_cannot_be_made_durable_tells_its_sender_so() -> None:
    keeper = Keeper()
    handler, service = started(keeper)
    reply = handler.put({"intent": "invoke", "method": "poke"})
    service.gate.release()
    keeper.wait_notes(1)
    keeper.notes[0][1].set_exception(OSError("broker gone"))
    with pytest.raises(NotDurable, match="applied, but could not be made durable"):
        reply.result(WAIT)
    assert service.pokes == 1
    service.stop = True
    service.gate.release()
    handler.join(WAIT)


def test_a_checkpoint_carries_the_settable_values_and_covers_the_log() -> None:
    keeper = Keeper()
    handler, service = started(keeper)
    reply = handler.put({"intent": "set", "attrs": {"x": 9}})
    service.gate.release()
    keeper.wait_notes(1)
    keeper.notes[0][1].set_result(None)
    reply.result(WAIT)
    stored = handler.put({"intent": "checkpoint"})
    service.gate.release()
    stored.result(WAIT)
    state, settable, covers = keeper.stored[-1]
    assert state == {"pokes": 0} and settable == {"x": 9} and covers == 1
    # The next note no longer carries what that checkpoint covers.
    poked = handler.put({"intent": "invoke", "method": "poke"})
    service.gate.release()
    keeper.wait_notes(2)
    assert [(e["kind"], e["seq"]) for e in keeper.notes[1][0]] == [("invoke", 2)]
    keeper.notes[1][1].set_result(None)
    assert poked.result(WAIT) == 1
    service.stop = True
    service.gate.release()
    handler.join(WAIT)


def test_values_carried_by_a_resumed_job_are_set_again_at_its_first_ready() -> None:
    keeper = Keeper()
    carried = [{"seq": 3, "kind": "set", "attrs": {"x": 4}, "time": 1.0}]
    handler = ServiceHandler(store=keeper.store, note=keeper.note, carried=carried, carried_after=2)
    service = Knob()
    handler.start(service, {}, True, state={"pokes": 2}, reapply={"x": 4})
    stored = handler.put({"intent": "checkpoint"})  # applied after the values set again
    service.gate.release()
    stored.result(WAIT)
    assert keeper.stored[-1] == ({"pokes": 2}, {"x": 4}, 3)  # it covers what it carried
    assert keeper.notes == []  # durable already: not noted again
    service.stop = True
    service.gate.release()
    outcome = handler.join(WAIT)
    assert outcome["result"]["x"] == 4 and outcome["result"]["pokes"] == 2


def test_a_result_over_the_limit_fails_the_job_with_result_too_large() -> None:
    handler = ServiceHandler(max_result_bytes=1000)
    service = Knob()
    service.stop = True
    handler.start(service, {"size": 2000})
    service.gate.release()
    outcome = handler.join(WAIT)
    assert outcome["state"] == "failed" and outcome["result"] is None
    assert outcome["error"]["type"] == "brokerexec.ResultTooLarge"
    assert "2,0" in outcome["error"]["message"] and "--max-result-bytes" in outcome["error"]["message"]
    assert issubclass(ResultTooLarge, Exception) and not issubclass(ResultTooLarge, RemoteError)
