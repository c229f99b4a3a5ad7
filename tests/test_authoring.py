"""Writing a service: definitions checked when the class is defined, free-form requests, a
``set`` of a missing attribute refused where it is applied (and one of an attribute the service
makes in ``run()`` accepted), and a worker's job lines (issues 13 and 19)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from brokerexec import (
    Client,
    ConfigurationError,
    Input,
    InvalidRequest,
    RemoteError,
    Service,
    ServiceDefinitionError,
    ServiceHandler,
    SignalRefused,
    WorkerSettings,
)
from brokerexec.core.service import apply_set

WAIT = 30.0
ROOT = Path(__file__).resolve().parent.parent


def _define(**body: Any) -> type[Service]:
    def helper(self: Service) -> None:
        return None

    return type("Bad", (Service,), {"name": "bad", "helper": helper, "limit": 1, **body})


@pytest.mark.parametrize(("body", "mistake"), [
    ({"inputs": (Input("n", "int"),)}, "input 'n': type 'int' is not a type"),  # type: ignore[arg-type]
    ({"inputs": (Input("n", (int, "str")),)}, "is not a type or a tuple"),  # type: ignore[arg-type]
    ({"inputs": (Input("n", int, default="three"),)}, "default 'three' does not match"),
    ({"inputs": (Input("n", float, default=None),)}, "default None does not match"),
    ({"inputs": ("n",)}, "inputs must be Input objects"),
    ({"settable": {"_secret": int}}, "settable '_secret' must be a public identifier"),
    ({"settable": {"helper": int}}, "settable 'helper' is a method of the service"),
    ({"settable": {"run": int}}, "settable 'run' is a method of the service"),
    ({"settable": {"limit": "int"}}, "settable 'limit': type 'int' is not a type"),
    ({"invokable": ("helpr",)}, "invokable 'helpr' is not a public method"),
    ({"invokable": ("limit",)}, "invokable 'limit' is not a public method"),
    ({"invokable": ("run",)}, "invokable 'run' is not a public method"),
    ({"invokable": ("_helper",)}, "invokable '_helper' must be a public identifier"),
    ({"invokable": "helper"}, "not the string 'helper'"),
])
def test_a_bad_definition_fails_when_the_class_is_defined(body: dict[str, Any], mistake: str) -> None:
    with pytest.raises(ServiceDefinitionError) as info:
        _define(**body)
    assert str(info.value).startswith("service class Bad: ")  # names the class...
    assert mistake in str(info.value)  # ...and the mistake
    # One tree: a usage error for the CLI (exit 2), and still the TypeError it always was.
    assert isinstance(info.value, ConfigurationError) and isinstance(info.value, TypeError)


def test_good_definitions_pass() -> None:
    good = _define(inputs=(Input("n", int, default=3), Input("x", float, default=1),
                           Input("tag", (str, type(None)), default=None),
                           Input("forced", int, default=None, required=True)),
                   settable={"limit": int}, invokable=("helper",))
    assert good.validate({"forced": 1}) == {"n": 3, "x": 1, "tag": None, "forced": 1}


def test_describe_never_crashes_on_a_bad_service(tmp_path: Path) -> None:
    # Given a file whose service declares an input type as a string
    source = tmp_path / "typo.py"
    source.write_text("from brokerexec import Input, Service\n\n"
                      "class Typo(Service):\n    name = 'typo'\n    inputs = (Input('n', 'int'),)\n")
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('half-written module')\n")
    cases = [(verb, f"{source}:Typo", "service class Typo: input 'n': type 'int' is not a type")
             for verb in ("describe", "run")]
    cases.append(("describe", f"{broken}:X", "RuntimeError: half-written module"))
    for verb, spec, said in cases:
        # When describe (or run) is asked about it, through the real entry point
        done = subprocess.run([sys.executable, "-m", "brokerexec", verb, spec],
                              capture_output=True, text=True, timeout=60, check=False, cwd=ROOT)
        # Then it says what is wrong in one line, with the usage exit code, no traceback
        assert done.returncode == 2, done.stderr
        assert said in done.stderr and "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr


# ---- requests -----------------------------------------------------------------------------


class FreeForm(Service):
    """Takes whatever object it is sent."""

    name = "free-form"

    def run(self, handler: ServiceHandler, request: dict[str, Any]) -> Any:
        return request


class Declared(Service):
    """Holds its request to its inputs."""

    name = "declared"
    inputs = (Input("n", int), Input("scale", float, default=1.0))


def test_a_service_without_inputs_gets_its_request_as_sent() -> None:
    request = {"n": 5, "nested": {"a": [1, 2]}, "anything": None}
    assert FreeForm.validate(request) == request
    assert FreeForm.validate(None) == {}
    with pytest.raises(InvalidRequest, match="JSON object"):
        FreeForm.validate([1, 2])  # type: ignore[arg-type]


def test_a_service_with_inputs_is_validated_strictly() -> None:
    assert Declared.validate({"n": 2}) == {"n": 2, "scale": 1.0}
    with pytest.raises(InvalidRequest, match="missing required input 'n'"):
        Declared.validate({})
    with pytest.raises(InvalidRequest, match="unknown input 'm'"):
        Declared.validate({"n": 1, "m": 2})


def test_describe_says_whether_the_request_is_free_form() -> None:
    assert FreeForm.describe()["request"] == "free-form"
    assert Declared.describe()["request"] == "inputs"
    for spec, said in (("tests/test_authoring.py:FreeForm", "request: free-form"),
                       ("tests/test_authoring.py:Declared", "inputs:\n  n: int (required)")):
        human = subprocess.run([sys.executable, "-m", "brokerexec", "describe", spec],
                               capture_output=True, text=True, timeout=60, check=True, cwd=ROOT)
        assert said in human.stdout
        machine = subprocess.run([sys.executable, "-m", "brokerexec", "describe", spec, "--json"],
                                 capture_output=True, text=True, timeout=60, check=True, cwd=ROOT)
        assert json.loads(machine.stdout)["request"] in ("free-form", "inputs")


# ---- set: a declared name the running service lacks -----------------------------------------


class Typo(Service):
    """Declares ``stpe`` (a typo of ``step``): valid as a declaration, absent at run time."""

    name = "typo"
    settable = {"stpe": int, "note": str}

    def __init__(self) -> None:
        self.step = 1
        self.note = ""
        self.started = threading.Event()
        self.release = threading.Event()

    def run(self, handler: ServiceHandler, request: dict[str, Any]) -> Any:
        self.started.set()
        while not self.release.wait(0.01):
            handler.ready()
        handler.ready()
        return {"step": self.step, "note": self.note, "has_stpe": hasattr(self, "stpe")}


def test_a_set_of_a_missing_attribute_is_refused_whole_at_ready_and_creates_nothing() -> None:
    service = Typo()
    handler = ServiceHandler(lambda kind, data: None)
    handler.start(service, {})
    assert service.started.wait(WAIT)
    # Its names and types pass at receipt; that the service lacks it is found where it is
    # applied, at ready(), before anything is set.
    refused = handler.put({"intent": "set", "attrs": {"note": "x", "stpe": 5}})
    with pytest.raises(SignalRefused, match="has no attribute 'stpe'"):
        refused.result(WAIT)
    assert handler.put({"intent": "set", "attrs": {"note": "kept"}}).result(WAIT) == {"note": "kept"}
    service.release.set()
    outcome = handler.join(WAIT)
    assert outcome["result"] == {"step": 1, "note": "kept", "has_stpe": False}


# ---- set: a declared attribute the service makes in run() -------------------------------------


class MadeInRun(Service):
    """Makes its settable ``step`` in ``run()``, once ``gate`` opens: a ``set`` taken before
    then must wait for its first ``ready()``, not be refused."""

    name = "made-in-run"
    settable = {"step": int}
    reached = threading.Event()
    gate = threading.Event()

    def run(self, handler: ServiceHandler, request: dict[str, Any]) -> Any:
        type(self).reached.set()
        assert type(self).gate.wait(WAIT)
        self.step = 1
        handler.ready()
        return {"step": self.step}


def test_a_set_before_the_first_ready_waits_for_the_attribute_made_in_run() -> None:
    MadeInRun.reached.clear()
    MadeInRun.gate.clear()
    handler = ServiceHandler(lambda kind, data: None)
    handler.start(MadeInRun, {})
    assert MadeInRun.reached.wait(WAIT)
    # Given a set taken while run() has not made the attribute yet
    pending = handler.put({"intent": "set", "attrs": {"step": 7}})
    assert handler.status()["queued_signals"] == 1 and not pending.done()
    # an undeclared name or a wrong type is still refused at once, on the handler thread
    with pytest.raises(SignalRefused, match="settable are step"):
        handler.put({"intent": "set", "attrs": {"stpe": 7}})
    with pytest.raises(SignalRefused, match="expected int"):
        handler.put({"intent": "set", "attrs": {"step": "seven"}})
    # When run() makes it and reaches ready(), the set is applied there
    MadeInRun.gate.set()
    assert pending.result(WAIT) == {"step": 7}
    assert handler.join(WAIT)["result"] == {"step": 7}


def test_a_set_sent_right_after_launch_is_applied_to_an_attribute_made_in_run() -> None:
    MadeInRun.reached.clear()
    MadeInRun.gate.clear()
    with Client(f"memory://made-in-run-{uuid.uuid4().hex}", services=[MadeInRun]) as client:
        job = client.launch("made-in-run", {})
        assert MadeInRun.reached.wait(WAIT)  # running, before its first ready()
        applied: list[Any] = []
        sender = threading.Thread(target=lambda: applied.append(job.set(step=7)))
        sender.start()
        deadline = time.monotonic() + WAIT
        while job.status().get("queued_signals", 0) < 1:
            assert time.monotonic() < deadline, "the set never reached the job"
            threading.Event().wait(0.01)
        with pytest.raises(SignalRefused, match="settable are step"):
            job.set(stpe=7)  # refused at once, while the set of step waits
        MadeInRun.gate.set()
        sender.join(WAIT)
        assert applied == [{"step": 7}]
        assert job.result(WAIT) == {"step": 7}


def test_apply_set_refuses_a_missing_attribute_before_setting_any() -> None:
    service = Typo()
    with pytest.raises(SignalRefused, match="declared settable, but the running Typo"):
        apply_set(service, {"note": "x", "stpe": 2})
    assert service.note == "" and not hasattr(service, "stpe")


class TypoLoop(Service):
    """``Typo`` for a child process: runs until its note is set to "stop"."""

    name = "typo-loop"
    settable = {"stpe": int, "note": str}

    def __init__(self) -> None:
        self.note = ""

    def run(self, handler: ServiceHandler, request: dict[str, Any]) -> Any:
        while self.note != "stop":
            handler.ready()
        return {"has_stpe": hasattr(self, "stpe")}


def test_in_a_child_process_a_set_of_a_missing_attribute_is_refused_at_ready() -> None:
    settings = WorkerSettings(runner="process")
    with Client(f"memory://typo-{uuid.uuid4().hex}", services=[TypoLoop],
                worker_settings=settings) as client:
        job = client.launch("typo-loop", {})
        with pytest.raises(SignalRefused, match="has no attribute 'stpe'"):
            job.set(stpe=5, note="x")  # refused whole, where the instance lives
        assert job.set(note="stop") == {"note": "stop"}
        assert job.result(WAIT) == {"has_stpe": False}


# ---- the worker's job lines, and a clean stop -------------------------------------------------


@pytest.mark.rabbitmq
def test_a_worker_logs_each_job_and_no_warning_on_a_clean_stop(
        amqp_url: str, worker_process: Callable[..., Any]) -> None:
    # Given a worker process on the real broker
    worker = worker_process(services=("Counter",))
    # When one job finishes, one fails and the worker is stopped cleanly (SIGTERM)
    with Client(amqp_url) as client:
        good = client.launch("counter", {"steps": 3})
        bad = client.launch("counter", {"steps": 3, "fail_at": 1})
        good.result(WAIT)
        with pytest.raises(RemoteError, match="boom at step 1"):
            bad.result(WAIT)
        assert bad.record(WAIT) is not None
    assert worker.terminate(timeout=WAIT) == 0
    lines = worker.lines
    text = "".join(lines)

    def line_of(job_id: str, words: str) -> str:
        found = [line for line in lines if job_id in line and words in line]
        assert len(found) == 1, text
        return found[0]

    # Then each job has a start and an end line: id, service, attempt, duration, state
    assert " INFO " in line_of(good.id, "of counter started (attempt 1)")
    assert " INFO " in line_of(good.id, "of counter finished after ")
    assert " INFO " in line_of(bad.id, "of counter started (attempt 1)")
    failed = line_of(bad.id, "of counter failed after ")
    assert " WARNING " in failed and failed.rstrip().endswith(": ValueError: boom at step 1")
    # And the only warning is the failed job's: none from the stop (aiormq's Basic.Cancel)
    assert [line for line in lines if "WARNING" in line or "ERROR" in line] == [failed], text
