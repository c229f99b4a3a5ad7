"""The worker's log lines (text with job ids, JSON) and its Prometheus metrics, in process
on memory:// and from a real ``brokerexec worker --metrics-port`` against RabbitMQ."""

from __future__ import annotations

import io
import json
import logging
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from brokerexec import Client, Service, ServiceHandler
from brokerexec.core import computation_thread as computation
from brokerexec.logs import JobFilter, JsonFormatter, TextFormatter, current_job
from brokerexec.settings import WorkerSettings

ROOT = Path(__file__).resolve().parent.parent
WAIT = 30.0

CHATTY = '''
import logging
from brokerexec import Input, Service

log = logging.getLogger("user.chatty")


class Chatty(Service):
    """Logs from its own code, calls ready() often, and can be checkpointed."""

    name = "chatty"
    inputs = (Input("steps", int, default=2000),)

    def __init__(self):
        self.done = 0

    def run(self, handler, request):
        log.info("working on %d steps", request["steps"])
        while self.done < request["steps"]:
            handler.ready()
            self.done += 1
            sum(range(2000))  # the workload: a little work between ready() calls
        return {"done": self.done}

    def checkpoint(self):
        return {"done": self.done}

    def restore(self, state):
        self.done = state["done"]
'''


class Logs(logging.Handler):
    """Keeps the formatted lines of one formatter, with brokerexec's filter on."""

    def __init__(self, formatter: logging.Formatter) -> None:
        super().__init__()
        self.lines: list[str] = []
        self.addFilter(JobFilter())
        self.setFormatter(formatter)

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def captured() -> Iterator[tuple[Logs, Logs]]:
    text, as_json = Logs(TextFormatter()), Logs(JsonFormatter())
    root = logging.getLogger()
    old_level = root.level
    # Earlier tests in the session may have set a level on these loggers or disabled them
    # (logging.config's disable_existing_loggers, as a library's set-up does): undone here.
    named = [logging.getLogger(name) for name in ("brokerexec", "brokerexec.worker", "plain", "user.talker")]
    saved = [(logger.level, logger.disabled) for logger in named]
    for logger in named:
        logger.setLevel(logging.NOTSET)
        logger.disabled = False
    root.addHandler(text)
    root.addHandler(as_json)
    root.setLevel(logging.INFO)
    yield text, as_json
    root.removeHandler(text)
    root.removeHandler(as_json)
    root.setLevel(old_level)
    for logger, (level, disabled) in zip(named, saved, strict=True):
        logger.setLevel(level)
        logger.disabled = disabled


class Talker(Service):
    name = "talker"

    def run(self, handler: ServiceHandler, request: dict[str, Any]) -> str:
        logging.getLogger("user.talker").info("hello from the service")
        handler.ready()
        return "ok"


def test_service_code_logs_carry_the_job_id_and_thread(captured: tuple[Logs, Logs]) -> None:
    text, as_json = captured
    with Client("memory://", services=[Talker]) as client:
        job = client.launch("talker")
        assert job.result(timeout=WAIT) == "ok"
    [line] = [line for line in text.lines if "hello from the service" in line]
    assert f"user.talker job={job.id}: hello from the service" in line
    assert re.search(r" INFO \[[^\]]+\] ", line)
    [parsed] = [json.loads(line) for line in as_json.lines if "hello from" in line]
    assert parsed["job_id"] == job.id and parsed["level"] == "INFO"
    assert parsed["logger"] == "user.talker" and parsed["thread"]
    assert current_job.get() is None  # outside the computation, no job


def test_a_child_process_logs_the_job_id_too(captured: tuple[Logs, Logs],
                                             capfd: pytest.CaptureFixture[str]) -> None:
    # Given a worker whose computations run in child processes, at INFO (the children
    # take the worker's level and log format), when the service logs from its own code
    with Client("memory://", services=[Talker],
                worker_settings=WorkerSettings(runner="process")) as client:
        job = client.launch("talker")
        assert job.result(timeout=WAIT) == "ok"
    # Then the child's line, on the inherited stderr, names the job
    line = next(x for x in capfd.readouterr().err.splitlines() if "hello from the service" in x)
    assert "[child " in line and f"user.talker job={job.id}: hello from the service" in line


def test_extras_are_shown_and_win_over_the_context(captured: tuple[Logs, Logs]) -> None:
    text, as_json = captured
    token = current_job.set("ctx-job")
    try:
        logging.getLogger("brokerexec.worker").info(
            "job started", extra={"job_id": "given-job", "service": "fit"})
        logging.getLogger("plain").warning("no extras")
    finally:
        current_job.reset(token)
    logging.getLogger("plain").error("outside: %s", "any job", exc_info=ValueError("x"))
    assert "brokerexec.worker job=given-job service=fit: job started" in text.lines[0]
    assert "plain job=ctx-job: no extras" in text.lines[1]
    assert "plain: outside: any job" in text.lines[2]
    first, second, third = (json.loads(line) for line in as_json.lines)
    assert (first["job_id"], first["service"], first["message"]) == ("given-job", "fit", "job started")
    assert second["job_id"] == "ctx-job" and third["job_id"] is None
    assert set(first) >= {"time", "level", "logger", "message", "thread", "job_id"}
    assert "ValueError: x" in third["exc_info"]


def test_a_json_line_survives_an_extra_that_is_not_json() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("odd")
    log.addHandler(handler)
    try:
        log.warning("with an object", extra={"thing": object()})
    finally:
        log.removeHandler(handler)
    assert json.loads(stream.getvalue())["thing"].startswith("<object object")


# ---- a real worker ------------------------------------------------------------------------------


def _samples(text: str) -> dict[str, float]:
    """``name{labels}`` -> value, from Prometheus text."""
    found = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            found[key] = float(value)
    return found


def scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=WAIT) as response:
        return _samples(response.read().decode())


@pytest.mark.rabbitmq
def test_a_worker_serves_metrics_and_json_logs(amqp_url: str, tmp_path: Path) -> None:
    def be(*args: str, code: int = 0) -> str:
        done = subprocess.run([sys.executable, "-m", "brokerexec", *args, "--broker", amqp_url],
                              capture_output=True, text=True, timeout=WAIT * 2, cwd=ROOT,
                              check=False)
        assert done.returncode == code, (args, done.stderr)
        return done.stdout

    (tmp_path / "chatty.py").write_text(textwrap.dedent(CHATTY), encoding="utf-8")
    worker = subprocess.Popen(
        [sys.executable, "-m", "brokerexec", "worker", "--broker", amqp_url, "--service",
         f"{tmp_path / 'chatty.py'}:Chatty", "--metrics-port", "0", "--log-format", "json"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    assert worker.stderr is not None
    try:
        lines: list[str] = []
        for line in worker.stderr:  # the first lines come before any job: read them in turn
            lines.append(line)
            if "worker ready" in line:
                break
        [url] = [json.loads(line)["message"].split()[-1] for line in lines
                 if '"metrics at http://127.0.0.1:' in line]
        # When a long job is paused, resumed, checkpointed and aborted
        job_id = be("launch", "chatty", "--request", '{"steps": 1000000000}').strip()
        be("pause", job_id)
        paused = scrape(url)
        be("resume", job_id)
        be("checkpoint", job_id)
        be("abort", job_id)
        be("result", job_id, "--timeout", str(WAIT), code=130)
        # (a job run to its end is counted too)
        be("launch", "chatty", "--follow", "--request", '{"steps": 2000}')
        ended = scrape(url)
    finally:
        worker.send_signal(signal.SIGTERM)
        _, rest = worker.communicate(timeout=WAIT)
    # Then the gauges and counters say so
    assert paused['brokerexec_jobs{service="chatty",state="paused"}'] == 1.0
    assert paused['brokerexec_jobs{service="chatty",state="running"}'] == 0.0
    assert ended['brokerexec_jobs_started_total{service="chatty"}'] == 2.0  # a resume is no start
    assert ended['brokerexec_jobs_ended_total{service="chatty",state="aborted"}'] == 1.0
    assert ended['brokerexec_jobs_ended_total{service="chatty",state="finished"}'] == 1.0
    assert ended['brokerexec_jobs{service="chatty",state="running"}'] == 0.0
    assert ended['brokerexec_jobs{service="chatty",state="paused"}'] == 0.0
    assert ended['brokerexec_checkpoints_total{service="chatty"}'] >= 1.0  # and any it took itself
    assert ended['brokerexec_checkpoint_bytes_total{service="chatty"}'] >= len('{"done":1}')
    for intent in ("pause", "resume", "checkpoint", "abort"):
        assert ended[f'brokerexec_signal_round_trip_seconds_count{{intent="{intent}"}}'] == 1.0
    assert ended["brokerexec_ready_interval_seconds_count"] >= 1.0
    assert ended["brokerexec_reconnects_total"] == 0.0
    assert ended['brokerexec_launch_queue_depth{service="chatty"}'] == 0.0
    # and every log line is one JSON object; the service's own line names its job
    assert worker.returncode == 0, rest
    logged = [json.loads(line) for line in [*lines, *rest.splitlines()]]
    assert any(x["message"] == "worker ready: chatty" for x in logged)
    assert logged and all({"time", "level", "logger", "message", "thread"} <= set(x) for x in logged)
    own = {x["message"]: x["job_id"] for x in logged if x["logger"] == "user.chatty"}
    assert own["working on 1000000000 steps"] == job_id
    assert own["working on 2000 steps"] not in (job_id, None)


class Spinner(Service):
    """Calls ready() in a tight loop until told to stop (``stop`` settable)."""

    name = "spinner"
    settable = {"stop": bool}

    def __init__(self) -> None:
        self.stop = False

    def run(self, handler: ServiceHandler, request: dict[str, Any]) -> int:
        calls = 0
        while not self.stop:
            handler.ready()
            calls += 1
        return calls


def test_ready_intervals_are_sampled_on_the_slow_path(
        monkeypatch: pytest.MonkeyPatch) -> None:
    samples: list[float] = []
    sampled = threading.Event()

    def observe(seconds: float) -> None:
        samples.append(seconds)
        sampled.set()

    monkeypatch.setattr(computation, "ready_interval_observer", observe)
    monkeypatch.setattr(computation, "READY_SAMPLE_PERIOD", 0.0)
    with Client("memory://", services=[Spinner]) as client:
        # Given a job whose slow path runs every 10 ms, held paused for 0.5 s once
        job = client.launch("spinner", progress_delta=0.01)
        assert sampled.wait(WAIT)  # it runs, and ready() was sampled
        job.pause()
        held = threading.Event()
        held.wait(0.5)  # the pause being measured: a duration, not a wait for something
        job.resume()
        job.set(stop=True)
        calls = job.result(timeout=WAIT)
    # Then ready() was sampled, each sample one interval between two calls, none the pause
    # (a sample is open for one interval only, so a pause rarely lands in one; the
    # computation drops it when one does)
    assert samples and len(samples) < calls
    assert max(samples) < 0.4, sorted(samples)[-3:]


@pytest.mark.rabbitmq
def test_a_metrics_port_in_use_exits_2_naming_it(amqp_url: str, tmp_path: Path) -> None:
    (tmp_path / "chatty.py").write_text(textwrap.dedent(CHATTY), encoding="utf-8")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "brokerexec", "worker", "--broker", amqp_url, "--service",
             f"{tmp_path / 'chatty.py'}:Chatty", "--metrics-port", str(port)],
            capture_output=True, text=True, timeout=WAIT, cwd=ROOT, check=False)
    assert done.returncode == 2, done.stderr
    assert f"cannot serve metrics on 127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in done.stderr
