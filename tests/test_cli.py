"""The ``brokerexec`` command line: arguments (CliRunner), local runs and the broker verbs
(real subprocesses, as users run them, with ``sys.executable -m brokerexec``)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from brokerexec.cli import app as cli_module
from brokerexec.cli.app import cli
from brokerexec.cli.input import json_value, parse_when

ROOT = Path(__file__).resolve().parent.parent
FIT = "examples/fit.py:ExponentialFit"
MONTECARLO = "examples/montecarlo.py:MonteCarloPi"
#: A fit that runs for many minutes unless steered: no tolerance stop, a huge iteration cap.
LONG_FIT = json.dumps({"max_iterations": 10**8, "tolerance": 0})
WAIT = 30.0


def brokerexec(*args: str, timeout: float = 60, env: dict[str, str] | None = None
               ) -> subprocess.CompletedProcess[str]:
    """Run the CLI in a subprocess (the venv's interpreter) from the project root."""
    return subprocess.run([sys.executable, "-m", "brokerexec", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, check=False,
                          env={**os.environ, **(env or {})})


def closed_port() -> int:
    """A loopback port nobody listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Lines:
    """Reads a stream line by line on a thread; waits for a line containing some text."""

    def __init__(self, stream: Any, name: str) -> None:
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(stream,), name=name, daemon=True)
        self._thread.start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()

    def wait_for(self, text: str, timeout: float = WAIT) -> None:
        with self._changed:
            found = self._changed.wait_for(lambda: any(text in line for line in self.lines), timeout)
        assert found, f"no line with {text!r} within {timeout} s:\n{''.join(self.lines)}"

    def text(self) -> str:
        with self._changed:
            return "".join(self.lines)

    def close(self) -> str:
        """Wait for the end of the stream; all of it."""
        self._thread.join(WAIT)
        return self.text()


# ---- arguments and help (CliRunner, no broker) ------------------------------------------------


def test_help_lists_every_verb_and_the_exit_codes() -> None:
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for verb in ("run", "worker", "launch", "status", "pause", "resume", "abort", "set", "invoke",
                 "watch", "result", "jobs", "describe"):
        assert f"  {verb} " in result.output
    assert "Exit codes" in result.output and "5 broker unreachable" in result.output
    # The module docstring carries the same table, code by code.
    for code in ("0 ", "1 ", "2 ", "3 ", "4 ", "5 ", "130 "):
        assert f"\n{code}" in (cli_module.__doc__ or "")


@pytest.mark.parametrize("request_text, message", [
    ('{"points": ', "--request is not valid JSON"),
    ("[1, 2]", "--request must be a JSON object, not list"),
    ('{"noise": NaN}', "NaN is not JSON"),
    ("@/nonexistent/request.json", "cannot read the request file /nonexistent/request.json"),
])
def test_a_bad_request_is_a_usage_error(request_text: str, message: str) -> None:
    result = CliRunner().invoke(cli, ["run", FIT, "--request", request_text])
    assert result.exit_code == 2
    assert message in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("args, message", [
    (["run", "examples/fit.py:NoSuchClass"], "cannot load service"),
    (["run", "no_colon_here"], "must look like module:Class"),
    (["pause"], "pause needs a job id or --all"),
    (["abort", "abc", "--all"], "abort needs a job id or --all"),
    (["resume", "abc", "--service", "fit"], "--service only goes with --all"),
    (["set", "abc", "novalue"], "'novalue' is not key=value"),
    (["invoke", "abc", "perturb", "12"], "must be a JSON list (positional) or object"),
    (["invoke", "abc", "perturb", "[1"], "ARGUMENTS is not valid JSON"),
    (["status", "abc", "--broker", "memory://"], "memory:// lives inside one process"),
    (["watch", "abc", "--broker", "memory://lab"], "memory:// lives inside one process"),
    (["jobs", "--broker", "http://localhost"],
     "unsupported broker URL 'http://localhost': use amqp://, amqps:// or memory://"),
    (["jobs", "--since", "2h"], "--since only go(es) with --all"),
    (["jobs", "--all", "--since", "soonish"], "--since 'soonish' is not a time"),
    (["jobs", "--all", "--until", "2026-13-45"], "--until '2026-13-45' is not a time"),
    (["jobs", "--all", "--cursor", "nonsense", "--broker", "amqp://guest:guest@127.0.0.1:1/"],
     "not a history cursor"),
    (["worker", "--broker", "amqp://guest:guest@127.0.0.1:1/"], "no services to run"),
    (["worker", "--service", "nope.module:Thing"], "cannot load service"),
])
def test_usage_errors_exit_2_with_a_message(args: list[str], message: str) -> None:
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr


def test_click_usage_errors_also_exit_2() -> None:
    assert CliRunner().invoke(cli, ["no-such-verb"]).exit_code == 2
    assert CliRunner().invoke(cli, ["worker", "--concurrency", "0"]).exit_code == 2
    assert CliRunner().invoke(cli, ["run", FIT, "--pool", "fork"]).exit_code == 2


def test_times_on_the_command_line_are_durations_ago_dates_or_epoch_seconds() -> None:
    from datetime import datetime

    now = 1_800_000_000.0
    assert parse_when("90s", "--since", now) == now - 90
    assert parse_when("2h", "--since", now) == now - 7200
    assert parse_when("1.5d", "--since", now) == now - 1.5 * 86400
    assert parse_when("1w", "--since", now) == now - 7 * 86400
    assert parse_when("1764950400", "--since", now) == 1764950400.0
    assert parse_when("2026-12-05T14:30", "--since", now) == datetime(2026, 12, 5, 14, 30).timestamp()


@pytest.mark.parametrize("text, value", [
    ("12", 12), ("0.5", 0.5), ("true", True), ('"12"', "12"), ("[1, 2]", [1, 2]),
    ("abc", "abc"), ("NaN", "NaN"), ("", ""), ('{"a": 1}', {"a": 1}),
])
def test_set_values_are_json_when_they_parse_else_strings(text: str, value: Any) -> None:
    assert json_value(text) == value


def test_the_entry_point_exits_with_documented_codes() -> None:
    assert brokerexec("--version").stdout.strip().endswith("0.1.0")
    unknown = brokerexec("no-such-verb")
    assert unknown.returncode == 2 and "No such command" in unknown.stderr


def test_an_unreachable_broker_exits_5_naming_it_without_the_password() -> None:
    url = f"amqp://guest:secret@127.0.0.1:{closed_port()}/"
    for args in (["status", "abc"], ["launch", "fit"], ["pause", "--all"], ["jobs"]):
        result = CliRunner().invoke(cli, [*args, "--broker", url])
        assert result.exit_code == 5, (args, result.output)
        assert "cannot reach the broker at amqp://guest:***@127.0.0.1" in result.stderr
        assert "secret" not in result.output


def test_the_broker_url_comes_from_the_environment() -> None:
    url = f"amqp://guest:guest@127.0.0.1:{closed_port()}/"
    result = CliRunner(env={"BROKEREXEC_URL": url}).invoke(cli, ["status", "abc"])
    assert result.exit_code == 5
    assert url.replace("guest:guest", "guest:***") in result.stderr


def test_describe_shows_inputs_settable_and_invokable() -> None:
    result = CliRunner().invoke(cli, ["describe", FIT])
    assert result.exit_code == 0
    assert "points: int = 400  number of data points" in result.stdout
    assert "settable: tolerance: float, max_iterations: int" in result.stdout
    assert "invokable: perturb" in result.stdout
    described = json.loads(CliRunner().invoke(cli, ["describe", FIT, "--json"]).stdout)
    assert described["name"] == "fit"
    assert [port["name"] for port in described["inputs"]][:2] == ["points", "noise"]


def test_run_in_process_prints_only_the_result_on_stdout() -> None:
    result = CliRunner().invoke(cli, ["run", FIT, "--request", '{"points": 50}'])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["iterations"] >= 1  # the pretty result, nothing else
    assert "improved: " in result.stderr and "state: finished" in result.stderr


def test_one_shot_verbs_import_nothing_heavy() -> None:
    # Given a fresh interpreter, when the CLI module and the one-shot client are imported,
    # then neither aio-pika, kiwipy nor rich is loaded (they cost most of a second).
    code = ("import sys, brokerexec.cli, brokerexec.transport.pika.client; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'aio_pika', 'aiormq', 'kiwipy', 'rich', 'plumpy', 'tenacity'}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)
    assert done.stdout.strip() == "[]"


# ---- local runs in a subprocess --------------------------------------------------------------


def test_run_json_prints_one_finished_record() -> None:
    done = brokerexec("run", FIT, "--json")
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)  # the whole of stdout is one JSON document
    assert record["state"] == "finished" and record["service"] == "fit"
    assert record["error"] is None
    assert abs(record["result"]["params"][1] - 1.3) < 0.05  # the fit found b ~ 1.3


def test_run_montecarlo_on_a_process_pool() -> None:
    done = brokerexec("run", MONTECARLO, "--pool", "process", "--pool-size", "2", "--json",
                      "--request", '{"samples": 400000, "batch": 50000}')
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert record["state"] == "finished"
    assert record["result"]["samples"] == 400000
    assert abs(record["result"]["pi"] - 3.1416) < 0.02


def test_run_reads_the_request_from_a_file(tmp_path: Path) -> None:
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"points": 30, "max_iterations": 2, "tolerance": 0}))
    done = brokerexec("run", FIT, "--request", f"@{request}", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["result"]["iterations"] == 2


def test_run_with_bad_request_json_exits_2() -> None:
    done = brokerexec("run", FIT, "--request", '{"points": 400,}')
    assert done.returncode == 2
    assert "--request is not valid JSON" in done.stderr
    assert done.stdout == ""


def test_run_with_an_invalid_input_fails_naming_the_input() -> None:
    done = brokerexec("run", FIT, "--request", '{"points": "many"}', "--json")
    assert done.returncode == 1
    record = json.loads(done.stdout)
    assert record["state"] == "failed"
    assert record["error"]["type"] == "brokerexec.InvalidRequest"
    assert "input 'points'" in record["error"]["message"]
    human = brokerexec("run", FIT, "--request", '{"pointz": 3}')
    assert human.returncode == 1
    assert "unknown input 'pointz'" in human.stderr


def test_ctrl_c_aborts_the_run_and_prints_the_aborted_record() -> None:
    # Given a long run that has reported progress,
    process = subprocess.Popen(
        [sys.executable, "-m", "brokerexec", "run", MONTECARLO, "--json", "--progress-delta", "0.1",
         "--request", json.dumps({"samples": 10**10, "batch": 20000})],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        stdout, stderr = Lines(process.stdout, "run-stdout"), Lines(process.stderr, "run-stderr")
        stderr.wait_for("progress:")
        # when it gets SIGINT,
        interrupted = time.monotonic()
        process.send_signal(signal.SIGINT)
        process.wait(15)
        took = time.monotonic() - interrupted
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    # then it aborts the job, prints the aborted record and exits 130, quickly.
    assert process.returncode == 130, stderr.close()
    assert json.loads(stdout.close())["state"] == "aborted"
    assert "aborting the job" in stderr.close()
    assert took < 5, took


def test_a_second_ctrl_c_exits_at_once() -> None:
    # Given a run whose computation never calls ready(), so an abort cannot land soon,
    process = subprocess.Popen(
        [sys.executable, "-m", "brokerexec", "run", "tests/sample_services.py:NoReady", "--json",
         "--request", '{"seconds": 60}'],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        stdout, stderr = Lines(process.stdout, "run-stdout"), Lines(process.stderr, "run-stderr")
        stderr.wait_for("state: running")
        process.send_signal(signal.SIGINT)
        stderr.wait_for("aborting the job")
        # when Ctrl-C comes again, it exits 130 at once, long before the 5 s abort grace.
        interrupted = time.monotonic()
        process.send_signal(signal.SIGINT)
        process.wait(15)
        took = time.monotonic() - interrupted
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, stderr.close()
    assert took < 3, took
    assert stdout.close() == ""  # no record: it did not wait for one


# ---- against RabbitMQ --------------------------------------------------------------------------


class Worker:
    """``brokerexec worker`` running the fit example, in its own process."""

    def __init__(self, url: str, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "brokerexec", "worker", "--broker", url, "--service", FIT,
             "--log-level", "debug", *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        assert self.process.stderr is not None
        self.log = Lines(self.process.stderr, "worker-stderr")
        self.log.wait_for("worker ready: fit")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(WAIT)


@pytest.fixture
def worker(amqp_url: str) -> Iterator[Worker]:
    started = Worker(amqp_url, "--shutdown-grace", "5")
    yield started
    try:
        brokerexec("abort", "--all", "--yes", "--broker", amqp_url)  # nothing left running later
        started.stop()
    except subprocess.TimeoutExpired:
        started.process.kill()
        started.process.wait()


def wait_until(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    """Poll external state (a job on the broker) with a deadline."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        pause.wait(0.1)


@pytest.mark.rabbitmq
def test_steering_a_job_of_a_worker_process_from_the_command_line(
        amqp_url: str, worker: Worker) -> None:
    def be(*args: str, code: int = 0) -> Any:
        done = brokerexec(*args, "--broker", amqp_url, "--json")
        assert done.returncode == code, (args, done.stdout, done.stderr)
        document = json.loads(done.stdout)  # errors too are one JSON document
        failed = isinstance(document, dict) and set(document) == {"error"}
        return document["error"]["message"] if failed else document

    def state() -> str:
        done = brokerexec("status", job_id, "--broker", amqp_url, "--json")
        return str(json.loads(done.stdout)["state"]) if done.returncode == 0 else "unknown"

    # Given a long job launched from the command line,
    plain = brokerexec("launch", "fit", "--request", LONG_FIT, "--broker", amqp_url)
    assert plain.returncode == 0, plain.stderr
    job_id = plain.stdout.strip()
    assert len(job_id) == 32
    wait_until(lambda: state() == "running", "the job to run")
    # it can be paused, changed and called while it holds,
    assert be("pause", job_id) == {"job_id": job_id, "accepted": True}
    wait_until(lambda: state() == "paused", "the job to hold")
    assert be("set", job_id, "max_iterations=200000000", "tolerance=0") == {
        "max_iterations": 200000000, "tolerance": 0.0}
    # (progress_delta is the handler's: no progress message comes while the fit is perturbed)
    assert be("set", job_id, "progress_delta=3600") == {"progress_delta": 3600.0}
    assert len(be("invoke", job_id, "perturb", '{"scale": 0.1}')) == 3
    taken = be("checkpoint", job_id)  # taken while it holds: a paused job still applies signals
    assert taken["job_id"] == job_id and taken["time"] > 0
    assert "SignalRefused" in be("set", job_id, "cost=1", code=1)
    assert "SignalRefused" in be("invoke", job_id, "run", code=1)
    listed = be("jobs")
    assert [(j["job_id"], j["service"], j["state"]) for j in listed] == [(job_id, "fit", "paused")]
    table = brokerexec("jobs", "--broker", amqp_url)
    assert job_id in table.stdout and "paused" in table.stdout
    # resumed, asked for a result it does not have yet,
    assert be("resume", job_id)["accepted"] is True
    wait_until(lambda: state() == "running", "the job to resume")
    assert "did not end within 0.3 s" in be("result", job_id, "--timeout", "0.3", code=4)
    # and aborted: its final record says so, and it no longer answers.
    assert be("abort", job_id)["accepted"] is True
    record = be("result", job_id, code=130)
    assert record["state"] == "aborted" and record["job_id"] == job_id
    assert be("status", job_id)["record"]["state"] == "aborted"
    assert "no worker holds job" in be("pause", job_id, code=3)


@pytest.mark.rabbitmq
def test_unknown_jobs_exit_3(amqp_url: str, worker: Worker) -> None:
    unknown = "0" * 32
    for args in (["status", unknown], ["pause", unknown], ["abort", unknown], ["set", unknown, "x=1"],
                 ["invoke", unknown, "m"], ["checkpoint", unknown], ["watch", unknown]):
        done = brokerexec(*args, "--broker", amqp_url)
        assert done.returncode == 3, (args, done.stderr)
        assert "no worker holds" in done.stderr and unknown in done.stderr


@pytest.mark.rabbitmq
def test_launch_follow_and_watch_end_with_the_result(amqp_url: str, worker: Worker) -> None:
    followed = brokerexec("launch", "fit", "--follow", "--json", "--broker", amqp_url)
    assert followed.returncode == 0, followed.stderr
    record = json.loads(followed.stdout)
    assert record["state"] == "finished" and record["result"]["iterations"] >= 1
    assert "improved: " in followed.stderr
    # watch a job launched elsewhere: it shows progress and ends with the pretty result
    job_id = brokerexec("launch", "fit", "--broker", amqp_url, "--request",
                        json.dumps({"max_iterations": 1500, "tolerance": 0})).stdout.strip()
    watched = brokerexec("watch", job_id, "--broker", amqp_url)
    assert watched.returncode == 0, watched.stderr
    assert json.loads(watched.stdout)["iterations"] == 1500
    # Ctrl-C stops watching and leaves the job running
    job_id = brokerexec("launch", "fit", "--broker", amqp_url, "--request", LONG_FIT).stdout.strip()
    process = subprocess.Popen(
        [sys.executable, "-m", "brokerexec", "watch", job_id, "--broker", amqp_url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        stdout, stderr = Lines(process.stdout, "watch-stdout"), Lines(process.stderr, "watch-stderr")
        stderr.wait_for("progress:")
        process.send_signal(signal.SIGINT)
        assert process.wait(15) == 130, stderr.close()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert f"job {job_id} keeps running" in stderr.close() and stdout.close() == ""
    status = brokerexec("status", job_id, "--broker", amqp_url, "--json")
    assert json.loads(status.stdout)["state"] == "running"
    assert brokerexec("abort", job_id, "--broker", amqp_url).returncode == 0
    # a failed job: exit 1, its error on stderr
    failed = brokerexec("launch", "fit", "--follow", "--broker", amqp_url, "--request",
                        '{"points": "many"}')
    assert failed.returncode == 1
    assert "InvalidRequest" in failed.stderr and "input 'points'" in failed.stderr


@pytest.mark.rabbitmq
def test_pause_all_and_resume_all_reach_running_jobs(amqp_url: str, worker: Worker) -> None:
    job_id = brokerexec("launch", "fit", "--request", LONG_FIT, "--broker", amqp_url).stdout.strip()

    def state() -> str:
        done = brokerexec("status", job_id, "--broker", amqp_url, "--json")
        return str(json.loads(done.stdout)["state"]) if done.returncode == 0 else "unknown"

    wait_until(lambda: state() == "running", "the job to run")
    paused = brokerexec("pause", "--all", "--service", "fit", "--broker", amqp_url, "--json")
    assert json.loads(paused.stdout) == {"sent": "pause_all", "service": "fit", "workers": 1,
                                         "jobs": 1, "acknowledged": 1, "within": 1.0}
    wait_until(lambda: state() == "paused", "pause --all to arrive")
    assert brokerexec("resume", "--all", "--broker", amqp_url).returncode == 0
    wait_until(lambda: state() == "running", "resume --all to arrive")
    assert brokerexec("abort", "--all", "--yes", "--broker", amqp_url).returncode == 0
    done = brokerexec("result", job_id, "--timeout", "20", "--broker", amqp_url, "--json")
    assert done.returncode == 130 and json.loads(done.stdout)["state"] == "aborted"


@pytest.mark.rabbitmq
def test_sigterm_hands_the_running_job_over_and_another_worker_finishes_it(amqp_url: str) -> None:
    worker = Worker(amqp_url)
    try:
        # Given a job of a second or two that has started, of a service that can resume,
        job_id = brokerexec("launch", "fit", "--broker", amqp_url, "--request",
                            json.dumps({"max_iterations": 2500, "tolerance": 0})).stdout.strip()
        wait_until(lambda: brokerexec("status", job_id, "--broker", amqp_url).returncode == 0,
                   "the job to start")
        # when the worker gets SIGTERM, it checkpoints the job at its next ready(), gives it
        # back to the launch queue (no record) and exits 0,
        assert worker.stop() == 0, worker.log.text()
    finally:
        if worker.process.poll() is None:
            worker.process.kill()
            worker.process.wait()
    assert "handed over" in worker.log.text()
    status = json.loads(brokerexec("status", job_id, "--broker", amqp_url, "--json").stdout)
    assert status["state"] == "resuming"
    # and the next worker resumes it from that checkpoint, to the same result.
    second = Worker(amqp_url)
    try:
        done = brokerexec("result", job_id, "--timeout", "30", "--broker", amqp_url, "--json")
        assert done.returncode == 0, done.stderr
        record = json.loads(done.stdout)
        assert record["result"]["iterations"] == 2500 and record["attempt"] == 2
        assert "resumed here as attempt 2 (from its checkpoint)" in second.log.text()
    finally:
        second.stop()
    assert "[MainThread]" in worker.log.text()  # the log format names threads
    assert "stopping: no new jobs" in worker.log.text()


@pytest.mark.rabbitmq
def test_status_wall_time(amqp_url: str, worker: Worker, capsys: pytest.CaptureFixture[str]) -> None:
    """Measured, not asserted: `brokerexec status ID` as a user runs it (reported in -rA/-s)."""
    job_id = brokerexec("launch", "fit", "--request", LONG_FIT, "--broker", amqp_url).stdout.strip()
    wait_until(lambda: brokerexec("status", job_id, "--broker", amqp_url).returncode == 0,
               "the job to run")
    times = []
    for _ in range(5):
        started = time.perf_counter()
        done = brokerexec("status", job_id, "--broker", amqp_url, "--json")
        times.append(time.perf_counter() - started)
        assert json.loads(done.stdout)["state"] == "running"
    assert brokerexec("abort", job_id, "--broker", amqp_url).returncode == 0
    with capsys.disabled():
        print(f"\n`brokerexec status ID` wall time: median {sorted(times)[2] * 1000:.0f} ms, "
              f"min {min(times) * 1000:.0f} ms, max {max(times) * 1000:.0f} ms")
