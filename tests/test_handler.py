"""The ServiceHandler's semantics (park's ServiceHandler), with no transport at all."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from brokerexec import Aborted, InvalidState, Service, ServiceHandler, SignalRefused
from brokerexec.core.map_pool import WorkerPool
from brokerexec.errors import DecodeError

WAIT = 10.0


class Recorder:
    """Collects emitted messages; tests wait on its condition, never on sleeps."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, dict[str, Any]]] = []
        self.cond = threading.Condition()

    def __call__(self, kind: str, data: dict[str, Any]) -> None:
        with self.cond:
            self.messages.append((kind, data))
            self.cond.notify_all()

    def of(self, kind: str) -> list[dict[str, Any]]:
        with self.cond:
            return [data for k, data in self.messages if k == kind]

    def states(self) -> list[str]:
        return [data["to"] for data in self.of("state")]

    def wait_for(self, predicate: Callable[[], bool], timeout: float = WAIT) -> None:
        with self.cond:
            assert self.cond.wait_for(predicate, timeout), f"timed out; got {self.messages}"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Stepped(Service):
    """Runs ``rounds`` rounds; each waits for the test to open the gate, then calls ready()."""

    name = "stepped"
    settable = {"x": int, "y": str}
    invokable = ("record", "explode")

    def __init__(self) -> None:
        self.gate = threading.Semaphore(0)
        self.log: list[Any] = []
        self.cond = threading.Condition()
        self.x = 0
        self.y = ""

    def note(self, entry: Any) -> None:
        with self.cond:
            self.log.append(entry)
            self.cond.notify_all()

    def wait_log(self, entry: Any) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: entry in self.log, WAIT), self.log

    def run(self, handler: ServiceHandler, request: dict[str, Any]) -> list[Any]:
        for i in range(request.get("rounds", 1)):
            self.note(f"gate{i}")
            assert self.gate.acquire(timeout=WAIT)
            handler.ready()
            self.note(f"ready{i}")
        return self.log

    def record(self, value: Any) -> Any:
        self.note(value)
        return value

    def explode(self) -> None:
        raise RuntimeError("invoked method failed")


def start(service: Service, request: dict[str, Any] | None = None, **options: Any
          ) -> tuple[ServiceHandler, Recorder]:
    recorder = Recorder()
    handler = ServiceHandler(recorder, **options)
    handler.start(service, request or {})
    return handler, recorder


def test_start_returns_at_once_and_a_busy_handler_refuses_a_second_start() -> None:
    service = Stepped()
    handler, _ = start(service, {"rounds": 1})
    service.wait_log("gate0")  # the computation runs in its own thread, blocked on our gate
    with pytest.raises(InvalidState, match="busy"):
        handler.start(Stepped(), {})
    service.gate.release()
    outcome = handler.join(WAIT)
    assert outcome["state"] == "finished"
    assert outcome["result"] == ["gate0", "ready0"]


def test_status_is_answered_while_the_computation_is_busy() -> None:
    service = Stepped()
    handler, _ = start(service)
    service.wait_log("gate0")
    status = handler.put({"intent": "status"})
    assert status["state"] == "running" and status["paused"] is False
    service.gate.release()
    handler.join(WAIT)


def test_set_and_invoke_wait_for_ready_and_apply_in_arrival_order() -> None:
    # Given a computation that has not reached ready()
    service = Stepped()
    handler, _ = start(service, {"rounds": 1})
    service.wait_log("gate0")
    # When set and invoke arrive interleaved
    futures = [handler.put({"intent": "set", "attrs": {"x": 1}}),
               handler.put({"intent": "invoke", "method": "record", "args": ["first"]}),
               handler.put({"intent": "set", "attrs": {"x": 2, "y": "two"}}),
               handler.put({"intent": "invoke", "method": "record", "kwargs": {"value": "second"}})]
    # Then nothing is applied before ready()
    assert not any(f.done() for f in futures) and service.x == 0
    service.gate.release()
    assert [f.result(WAIT) for f in futures] == [{"x": 1}, "first", {"x": 2, "y": "two"}, "second"]
    assert service.x == 2 and service.y == "two"
    assert service.log[:3] == ["gate0", "first", "second"]
    handler.join(WAIT)


def test_ordering_holds_for_many_senders() -> None:
    service = Stepped()
    handler, _ = start(service, {"rounds": 1})
    service.wait_log("gate0")
    sent: list[tuple[int, int]] = []
    lock = threading.Lock()

    def sender(who: int) -> None:
        for n in range(50):
            with lock:  # the arrival order is the order put() is called in
                handler.put({"intent": "invoke", "method": "record", "args": [[who, n]]})
                sent.append((who, n))

    threads = [threading.Thread(target=sender, args=(who,)) for who in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    service.gate.release()
    handler.join(WAIT)
    applied = [tuple(entry) for entry in service.log if isinstance(entry, list)]
    assert applied == sent


@pytest.mark.parametrize("attrs", [{"nope": 1}, {"_x": 1}, {"__class__": 1}, {"x": "text"},
                                   {"x": True}, {"x": 1, "undeclared": 2}])
def test_a_refused_set_is_an_error_reply_and_nothing_is_applied(attrs: dict[str, Any]) -> None:
    service = Stepped()
    handler, _ = start(service, {"rounds": 1})
    service.wait_log("gate0")
    with pytest.raises(SignalRefused):
        future = handler.put({"intent": "set", "attrs": attrs})
        future.result(WAIT)  # a type error is found at ready(), a name error at once
    service.gate.release()
    assert handler.join(WAIT)["state"] == "finished"
    assert service.x == 0


@pytest.mark.parametrize("method", ["_x", "__class__", "__init__", "__reduce__", "run",
                                    "checkpoint", "undeclared", "note"])
def test_only_declared_methods_can_be_invoked(method: str) -> None:
    service = Stepped()
    handler, _ = start(service)
    service.wait_log("gate0")
    with pytest.raises(SignalRefused, match="cannot invoke"):
        handler.put({"intent": "invoke", "method": method})
    service.gate.release()
    assert handler.join(WAIT)["state"] == "finished"


def test_invoke_argument_errors_and_method_errors_reach_the_sender_only() -> None:
    service = Stepped()
    handler, _ = start(service, {"rounds": 1})
    service.wait_log("gate0")
    # A wrong number of arguments is refused at once, on the handler thread (nothing is
    # queued for ready()); a method that raises fails its own invoke, not the computation.
    with pytest.raises(SignalRefused, match="too many"):
        handler.put({"intent": "invoke", "method": "record", "args": [1, 2, 3]})
    assert handler.status()["queued_signals"] == 0
    raising = handler.put({"intent": "invoke", "method": "explode"})
    service.gate.release()
    with pytest.raises(RuntimeError, match="invoked method failed"):
        raising.result(WAIT)
    assert handler.join(WAIT)["state"] == "finished"


def test_unknown_intent_and_malformed_signals_are_refused() -> None:
    handler = ServiceHandler()
    with pytest.raises(DecodeError, match="unknown intent"):
        handler.put({"intent": "format_disk"})
    with pytest.raises(DecodeError):
        handler.put(["not", "an", "object"])  # type: ignore[arg-type]
    with pytest.raises(SignalRefused):
        handler.put({"intent": "set", "attrs": []})


def test_pause_holds_at_ready_applies_signals_meanwhile_and_resume_continues() -> None:
    service = Stepped()
    handler, recorder = start(service, {"rounds": 2})
    service.wait_log("gate0")
    assert handler.put({"intent": "pause"}).result(WAIT) is True
    service.gate.release()
    recorder.wait_for(lambda: "paused" in recorder.states())
    # While paused: status answers, set/invoke are applied without resuming.
    assert handler.put({"intent": "status"})["paused"] is True
    assert handler.put({"intent": "set", "attrs": {"x": 7}}).result(WAIT) == {"x": 7}
    assert handler.put({"intent": "invoke", "method": "record", "args": ["while paused"]}
                       ).result(WAIT) == "while paused"
    assert "ready0" not in service.log  # still held inside the first ready()
    assert handler.put({"intent": "resume"}).result(WAIT) is True
    service.wait_log("ready0")
    service.gate.release()
    outcome = handler.join(WAIT)
    assert outcome["state"] == "finished"
    assert service.log == ["gate0", "while paused", "ready0", "gate1", "ready1"]
    assert recorder.states() == ["running", "paused", "running", "finished"]


def test_plumpy_play_and_kill_are_resume_and_abort() -> None:
    service = Stepped()
    handler, recorder = start(service, {"rounds": 1})
    service.wait_log("gate0")
    handler.put({"intent": "pause"})
    service.gate.release()
    recorder.wait_for(lambda: "paused" in recorder.states())
    handler.put({"intent": "play"})
    recorder.wait_for(lambda: recorder.states()[-1] != "paused")
    assert handler.join(WAIT)["state"] == "finished"
    other = Stepped()
    handler2, _ = start(other, {"rounds": 1})
    other.wait_log("gate0")
    handler2.put({"intent": "kill"})
    other.gate.release()
    assert handler2.join(WAIT)["state"] == "aborted"


def test_abort_raises_aborted_which_except_exception_cannot_swallow() -> None:
    swallowed: list[BaseException] = []

    class Stubborn(Service):
        name = "stubborn"

        def run(self, handler: ServiceHandler, request: dict[str, Any]) -> None:
            while True:
                try:
                    handler.ready()
                except Exception as exc:  # user code that catches too much
                    swallowed.append(exc)

    handler, recorder = start(Stubborn())
    recorder.wait_for(lambda: "running" in recorder.states())
    handler.put({"intent": "abort"})
    outcome = handler.join(WAIT)
    assert outcome["state"] == "aborted" and not swallowed
    assert issubclass(Aborted, BaseException) and not issubclass(Aborted, Exception)


def test_abort_while_paused_resumes_first_then_aborts() -> None:
    service = Stepped()
    handler, recorder = start(service, {"rounds": 2})
    service.wait_log("gate0")
    handler.put({"intent": "pause"})
    service.gate.release()
    recorder.wait_for(lambda: "paused" in recorder.states())
    queued = handler.put({"intent": "invoke", "method": "record", "args": ["late"]})
    handler.put({"intent": "abort"})
    outcome = handler.join(WAIT)
    assert outcome["state"] == "aborted"
    assert recorder.states() == ["running", "paused", "running", "aborted"]
    assert "ready0" not in service.log
    # A signal queued before the abort was either applied or answered with an error.
    assert queued.done()
    if queued.exception() is None:
        assert "late" in service.log


def test_signals_after_the_end_are_refused_clearly() -> None:
    service = Stepped()
    handler, _ = start(service)
    service.gate.release()
    handler.join(WAIT)
    assert handler.put({"intent": "pause"}).result(WAIT) is False
    with pytest.raises(InvalidState, match="ended"):
        handler.put({"intent": "invoke", "method": "record", "args": [1]})
    assert handler.put({"intent": "status"})["state"] == "finished"


def test_a_failing_computation_reports_type_message_traceback_and_the_handler_survives() -> None:
    class Broken(Service):
        name = "broken"

        def run(self, handler: ServiceHandler, request: dict[str, Any]) -> None:
            handler.ready()
            raise KeyError("missing thing")

    handler, recorder = start(Broken())
    outcome = handler.join(WAIT)
    assert outcome["state"] == "failed"
    assert outcome["error"]["type"] == "KeyError"
    assert "missing thing" in outcome["error"]["message"]
    assert "raise KeyError" in outcome["error"]["traceback"]
    assert recorder.states() == ["running", "failed"]
    assert handler.put({"intent": "status"})["state"] == "failed"


def test_a_result_that_is_not_json_fails_the_job_clearly() -> None:
    class Unsendable(Service):
        name = "unsendable"

        def run(self, handler: ServiceHandler, request: dict[str, Any]) -> Any:
            return {1, 2, 3}

    outcome = start(Unsendable())[0].join(WAIT)
    assert outcome["state"] == "failed"
    assert "not JSON-able" in outcome["error"]["message"]


def test_transitions_carry_start_and_end_times_of_the_state_left() -> None:
    service = Stepped()
    handler, recorder = start(service)
    service.gate.release()
    handler.join(WAIT)
    recorder.wait_for(lambda: len(recorder.of("state")) == 2)
    running, finished = recorder.of("state")
    assert (running["from"], running["to"]) == ("created", "running")
    assert (finished["from"], finished["to"]) == ("running", "finished")
    assert running["start"] <= running["end"] == finished["start"] <= finished["end"]


class Ticker(Service):
    """Calls ready() once per gate opening, forever, until aborted."""

    name = "ticker"

    def __init__(self) -> None:
        self.gate = threading.Semaphore(0)
        self.done = threading.Semaphore(0)
        self.ticks = 0

    def run(self, handler: ServiceHandler, request: dict[str, Any]) -> None:
        while True:
            assert self.gate.acquire(timeout=WAIT)
            handler.ready()
            self.ticks += 1
            self.done.release()

    def tick(self) -> None:
        self.gate.release()
        assert self.done.acquire(timeout=WAIT)

    def progress(self) -> dict[str, Any]:
        return {"ticks": self.ticks}

    def checkpoint(self) -> dict[str, Any]:
        return {"ticks": self.ticks}


def test_progress_and_checkpoints_are_emitted_on_their_intervals_by_the_clock() -> None:
    clock = FakeClock()
    service = Ticker()
    handler, recorder = start(service, clock=clock, progress_delta=1.0, checkpoint_delta=5.0)
    recorder.wait_for(lambda: "running" in recorder.states())
    for _ in range(3):
        service.tick()  # no time has passed: nothing due
    assert recorder.of("progress") == [] and recorder.of("checkpoint") == []
    clock.now += 0.999
    service.tick()
    assert recorder.of("progress") == []
    clock.now += 0.001
    service.tick()
    service.tick()  # due once, not on every ready() after
    assert [p["ticks"] for p in recorder.of("progress")] == [4]
    clock.now += 4.0
    service.tick()
    assert len(recorder.of("progress")) == 2
    assert recorder.of("checkpoint") == [{"state": {"ticks": 6}}]
    handler.put({"intent": "abort"})
    service.gate.release()
    assert handler.join(WAIT)["state"] == "aborted"


def test_setting_an_interval_on_the_handler_applies_at_once_and_reschedules() -> None:
    clock = FakeClock()
    service = Ticker()
    handler, recorder = start(service, clock=clock, progress_delta=100.0)
    recorder.wait_for(lambda: "running" in recorder.states())
    assert handler.put({"intent": "set", "attrs": {"progress_delta": 2.0}}).result(0) == {
        "progress_delta": 2.0}
    assert handler.progress_delta == 2.0
    service.tick()  # the reschedule happens at this ready(): next progress due at now + 2
    clock.now += 2.0
    service.tick()
    assert len(recorder.of("progress")) == 1
    with pytest.raises(SignalRefused):
        handler.put({"intent": "set", "attrs": {"progress_delta": -1}})
    handler.put({"intent": "abort"})
    service.gate.release()
    handler.join(WAIT)


class Improving(Service):
    name = "improving"

    def __init__(self, clock: FakeClock, steps: list[float]) -> None:
        self.clock, self.steps = clock, steps

    def run(self, handler: ServiceHandler, request: dict[str, Any]) -> None:
        for i, advance in enumerate(self.steps):
            self.clock.now += advance
            handler.improved({"i": i})
            handler.ready()


def test_improved_is_sent_immediately_when_delta_is_zero() -> None:
    clock = FakeClock()
    handler, recorder = start(Improving(clock, [0.0] * 5), clock=clock)
    handler.join(WAIT)
    assert [m["state"]["i"] for m in recorder.of("improved")] == [0, 1, 2, 3, 4]


def test_improved_is_throttled_latest_wins_and_the_last_is_never_lost() -> None:
    clock = FakeClock()
    # Improvements at t = 0, 0.1, ..., 0.9, 2.0, 2.1 with improved_delta = 0.5
    steps = [0.0] + [0.1] * 9 + [1.1, 0.1]
    handler, recorder = start(Improving(clock, steps), clock=clock, improved_delta=0.5)
    handler.join(WAIT)
    sent = [m["state"]["i"] for m in recorder.of("improved")]
    # 0 at once; 5 is the latest when 0.5 s passed; 9 when it came due at 2.0 (before
    # 10 arrived), 10 immediately (0.5 s since 9's), 11 at the end.
    assert sent[0] == 0 and sent[-1] == 11
    assert 5 in sent
    assert len(sent) < len(steps)
    assert sent == sorted(sent)


class Reporting(Service):
    """Takes ``len(steps)`` steps of a fake clock, each an improved state, then ``ready()``
    (progress: the step); then waits for ``go`` (if given) and calls ``ready()`` once more."""

    name = "reporting"

    def __init__(self, clock: FakeClock, steps: int, pad: str = "", result: Any = None,
                 go: threading.Event | None = None) -> None:
        self.clock, self.steps, self.pad, self.result, self.go = clock, steps, pad, result, go
        self.i = -1
        self.looped = threading.Event()

    def run(self, handler: ServiceHandler, request: dict[str, Any]) -> Any:
        for i in range(self.steps):
            self.i = i
            self.clock.now += 1.0
            handler.improved({"i": i, "pad": self.pad} if self.pad else {"i": i})
            handler.ready()
        self.looped.set()
        if self.go is not None:
            assert self.go.wait(WAIT)
            handler.ready()
        return self.result

    def progress(self) -> dict[str, Any]:
        return {"i": self.i}


def test_the_outcome_carries_the_last_progress_and_improved_state() -> None:
    clock = FakeClock()
    handler, recorder = start(Reporting(clock, 3), clock=clock, wallclock=clock, progress_delta=0.5)
    outcome = handler.join(WAIT)
    assert outcome["state"] == "finished"
    assert outcome["progress"] == {"i": 2, "elapsed": 3.0} == recorder.of("progress")[-1]
    assert outcome["improved"] == {"i": 2} == recorder.of("improved")[-1]["state"]


def test_an_outcome_without_progress_or_improved_has_neither_key() -> None:
    clock = FakeClock()
    handler, recorder = start(Reporting(clock, 0, result=1), clock=clock, progress_delta=100.0)
    outcome = handler.join(WAIT)
    assert outcome["state"] == "finished" and recorder.of("progress") == []
    assert "progress" not in outcome and "improved" not in outcome


def test_an_improved_state_held_back_by_the_delta_is_in_the_outcome_of_an_abort() -> None:
    # Given improvements 0, 1, 2 within the improved_delta: only 0 goes out at once
    clock, go = FakeClock(), threading.Event()
    service = Reporting(clock, 3, go=go)
    handler, recorder = start(service, clock=clock, improved_delta=100.0, progress_delta=100.0)
    assert service.looped.wait(WAIT)
    # When the job is aborted (an abort sends no held-back improved state)
    handler.put({"intent": "abort"})
    go.set()
    outcome = handler.join(WAIT)
    # Then its outcome still has the best one: the throttle is the events', not the job's
    assert outcome["state"] == "aborted" and outcome["improved"] == {"i": 2}
    assert [m["state"] for m in recorder.of("improved")] == [{"i": 0}]


def test_what_was_reported_counts_with_the_result_against_its_limit() -> None:
    clock = FakeClock()
    # A result that fits alone, but not with its improved state: the job fails, saying so,
    # and its outcome keeps the improved state, which fits alone.
    handler, _ = start(Reporting(clock, 1, pad="p" * 600, result="r" * 600), clock=clock,
                       progress_delta=100.0, max_result_bytes=1024)
    outcome = handler.join(WAIT)
    assert outcome["state"] == "failed" and outcome["result"] is None
    assert outcome["error"]["type"] == "brokerexec.ResultTooLarge"
    assert ("is 602 bytes as JSON, and its last progress and improved value 616, over the limit"
            in outcome["error"]["message"])
    assert outcome["improved"]["pad"] == "p" * 600
    # Reports over the limit alone are left out: the record must stay storable.
    handler, _ = start(Reporting(clock, 1, pad="p" * 2000, result=1), clock=clock,
                       progress_delta=100.0, max_result_bytes=1024)
    outcome = handler.join(WAIT)
    assert outcome["state"] == "finished" and "improved" not in outcome


def test_an_improved_state_that_is_not_json_is_left_out_of_the_outcome() -> None:
    class Odd(Service):
        name = "odd"

        def run(self, handler: ServiceHandler, request: dict[str, Any]) -> int:
            handler.improved({"when": object()})
            return 1

    handler = ServiceHandler(name="odd")
    handler.start(Odd(), {})
    outcome = handler.join(WAIT)
    assert outcome["state"] == "finished" and outcome["result"] == 1 and "improved" not in outcome


def test_a_computation_that_never_calls_ready_is_abandoned_at_the_abort_deadline() -> None:
    release = threading.Event()

    class Deaf(Service):
        name = "deaf"
        settable = {"x": int}
        x = 0

        def run(self, handler: ServiceHandler, request: dict[str, Any]) -> str:
            handler.improved({"best": 1})
            release.wait(WAIT)
            handler.improved({"best": 2})  # unheard: abandoned
            return "late"

    handler, recorder = start(Deaf(), abort_grace=0.2)
    recorder.wait_for(lambda: "running" in recorder.states() and recorder.of("improved") != [])
    queued = handler.put({"intent": "set", "attrs": {"x": 1}})
    handler.put({"intent": "abort"})
    outcome = handler.join(WAIT)
    assert outcome["state"] == "aborted" and outcome.get("abandoned") is True
    assert outcome["improved"] == {"best": 1}  # what it reported before it was abandoned
    with pytest.raises(InvalidState, match="ended"):  # its sender is told, not left waiting
        queued.result(WAIT)
    release.set()  # the abandoned thread ends; its late result changes nothing
    assert handler.join(0)["state"] == "aborted"
    assert recorder.states() == ["running", "aborted"]


def square(x: int) -> int:
    return x * x


def test_map_and_imap_over_threads_and_processes() -> None:
    results: dict[str, Any] = {}

    class Mapper(Service):
        name = "mapper"

        def run(self, handler: ServiceHandler, request: dict[str, Any]) -> None:
            results["map"] = handler.map(square, range(20))
            results["enum"] = list(handler.imap(square, [3, 1, 2], enumerated=True))
            results["unordered"] = sorted(handler.imap(square, range(10), ordered=False))

    for pool in (WorkerPool(3, "thread"), WorkerPool(2, "process")):
        handler, _ = start(Mapper(), workers=pool)
        assert handler.join(WAIT * 3)["state"] == "finished"
        assert results["map"] == [x * x for x in range(20)]
        assert results["enum"] == [(0, 9), (1, 1), (2, 4)]
        assert results["unordered"] == sorted(x * x for x in range(10))
        pool.shutdown()


def test_abort_reaches_a_computation_waiting_in_imap() -> None:
    started = threading.Event()
    never = threading.Event()

    def stuck(x: int) -> int:
        started.set()
        never.wait(WAIT)
        return x

    class Waiting(Service):
        name = "waiting"

        def run(self, handler: ServiceHandler, request: dict[str, Any]) -> list[int]:
            return handler.map(stuck, range(4))

    pool = WorkerPool(2, "thread")
    handler, _ = start(Waiting(), workers=pool)
    assert started.wait(WAIT)
    handler.put({"intent": "abort"})
    assert handler.join(WAIT)["state"] == "aborted"
    never.set()
    pool.shutdown()


class _Quick(Service):
    name = "quick"

    def run(self, handler: ServiceHandler, request: dict[str, Any]) -> Any:
        handler.ready()
        return 7


def test_a_failing_emit_never_ends_the_computation_unreported() -> None:
    def broken(kind: str, data: dict[str, Any]) -> None:
        raise RuntimeError("transport gone")

    handler = ServiceHandler(broken, name="broken-emit")
    handler.start(_Quick(), {})
    outcome = handler.outcome.result(WAIT)  # the transitions' emits failed; the job still ended
    assert outcome["state"] == "finished" and outcome["result"] == 7


def test_a_checkpoint_asked_for_is_taken_at_the_next_ready_and_published() -> None:
    service = Stepped()
    handler, recorder = start(service, {"rounds": 2}, wallclock=lambda: 1234.5)
    service.wait_log("gate0")
    taken = handler.put({"intent": "checkpoint"})
    assert not taken.done() and recorder.of("checkpoint") == []  # nothing before ready()
    service.gate.release()
    assert taken.result(WAIT) == {"time": 1234.5}
    assert recorder.of("checkpoint") == [{"state": {}}]  # Stepped's (the default) checkpoint()
    service.gate.release()
    handler.join(WAIT)
    with pytest.raises(InvalidState, match="has ended"):
        handler.put({"intent": "checkpoint"})


def test_a_checkpoint_before_there_is_a_service_is_refused() -> None:
    with pytest.raises(InvalidState, match="no service yet"):
        ServiceHandler().put({"intent": "checkpoint"})
