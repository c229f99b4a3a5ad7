"""What every verb prints and how it exits, through the real entry point (``python -m
brokerexec``): with ``--json`` exactly one JSON document on stdout, errors included, and the
exit codes of ``docs/cli.md``, verb by verb, against the real broker."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import click
import pytest
from test_cli import FIT, LONG_FIT, ROOT, Worker, brokerexec, closed_port, wait_until

from brokerexec.cli.show import ago, bar, footer, local_time, status_rows
from brokerexec.protocol.lookups import Listing

UNKNOWN = "0" * 32


def one_document(done: subprocess.CompletedProcess[str]) -> Any:
    """The whole of stdout, parsed: exactly one JSON document (json.loads refuses a second)."""
    return json.loads(done.stdout)


def an_error(done: subprocess.CompletedProcess[str], kind: str | None = None) -> dict[str, Any]:
    document = one_document(done)
    assert set(document) == {"error"} and set(document["error"]) == {"type", "message"}, document
    if kind is not None:
        assert document["error"]["type"] == kind, document
    assert document["error"]["message"] in done.stderr  # the same message, for people
    return dict(document["error"])


# ---- without a broker: usage errors (2) and an unreachable broker (5), every verb ------------


@pytest.mark.parametrize("args", [
    ["run", "examples/fit.py:NoSuchClass"], ["describe", "no_colon_here"],
    ["worker", "--broker", "amqp://guest:guest@127.0.0.1:1/"],
    ["launch", "fit", "--request", "[1]"], ["status"], ["pause"], ["resume", "x", "--all"],
    ["abort", "x", "--service", "fit"], ["set", "abc", "novalue"], ["invoke", "abc", "m", "12"],
    ["checkpoint"], ["result", "abc", "--timeout", "-1"], ["watch", "a", "--broker", "memory://"],
    ["jobs", "--timeout", "soon"], ["no-such-verb"],
])
def test_a_usage_error_exits_2_with_one_error_document(args: list[str]) -> None:
    done = brokerexec(*args, "--json")
    assert done.returncode == 2, (args, done.stdout, done.stderr)
    assert an_error(done)["type"] in ("brokerexec.UsageError", "brokerexec.ConfigurationError")


@pytest.mark.parametrize("args", [
    ["launch", "fit"], ["status", UNKNOWN], ["pause", UNKNOWN], ["resume", "--all", "--yes"],
    ["abort", UNKNOWN], ["set", UNKNOWN, "x=1"], ["invoke", UNKNOWN, "m"], ["checkpoint", UNKNOWN],
    ["result", UNKNOWN], ["watch", UNKNOWN], ["jobs"],
])
def test_an_unreachable_broker_exits_5_with_one_error_document(args: list[str]) -> None:
    done = brokerexec(*args, "--json", "--broker", f"amqp://guest:guest@127.0.0.1:{closed_port()}/")
    assert done.returncode == 5, (args, done.stdout, done.stderr)
    assert "cannot reach the broker" in an_error(done, "brokerexec.BrokerConnectionError")["message"]


def test_local_verbs_exit_0_and_1_with_one_document() -> None:
    assert one_document(brokerexec("describe", FIT, "--json"))["name"] == "fit"
    done = brokerexec("run", FIT, "--json", "--request", '{"points": "many"}')
    assert done.returncode == 1 and one_document(done)["state"] == "failed"


def test_the_shell_completion_script_is_produced() -> None:
    for shell, marker in (("bash", "complete -o nosort -F _brokerexec_completion brokerexec"),
                          ("zsh", "#compdef brokerexec"),
                          ("fish", "complete --no-files --command brokerexec")):
        done = brokerexec(env={"_BROKEREXEC_COMPLETE": f"{shell}_source"})
        assert done.returncode == 0 and marker in done.stdout, (shell, done.stdout)
    # and the script's callback completes verbs and options
    done = brokerexec(env={"_BROKEREXEC_COMPLETE": "bash_complete", "COMP_WORDS": "brokerexec pa",
                           "COMP_CWORD": "1"})
    assert done.stdout.split() == ["plain,pause"]
    done = brokerexec(env={"_BROKEREXEC_COMPLETE": "bash_complete",
                           "COMP_WORDS": "brokerexec abort --a", "COMP_CWORD": "2"})
    assert "plain,--all" in done.stdout.split()


def test_docs_cli_names_every_verb_and_option_and_nothing_else() -> None:
    import re

    from brokerexec.cli.app import cli

    page = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    options = {"--version"}
    commands = [(f"brokerexec {name}", command) for name, command in cli.commands.items()]
    while commands:
        name, command = commands.pop()
        assert name in page, name
        options |= {opt for param in command.params for opt in param.opts if opt.startswith("--")}
        if isinstance(command, click.Group):  # `brokerexec op status`, ...
            commands += [(f"{name} {sub}", subcommand) for sub, subcommand in command.commands.items()]
    options.add("--help")
    documented = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", page))
    assert options - documented == set(), "options docs/cli.md does not mention"
    assert documented - options == set(), "options docs/cli.md names that no verb has"


# ---- the human views, from their data ------------------------------------------------------------


def test_times_read_as_people_say_them() -> None:
    now = time.time()
    assert [ago(now - s, now) for s in (5, 190, 7300, 3 * 86400)] == [
        "5 s ago", "3 min ago", "2 h ago", "3 days ago"]
    assert local_time(now, now) == time.strftime("%H:%M:%S", time.localtime(now))
    assert local_time(None) == "-" and bar(0.5, 10) == "[#####.....]  50%"


def test_status_has_the_same_shape_running_and_ended() -> None:
    now = time.time()
    worker = {"hostname": "lab", "pid": 7}
    running = status_rows(UNKNOWN, {"state": "running", "since": now - 200, "attempt": 1,
                                    "worker": worker, "queued_signals": 0,
                                    "progress": {"fraction": 0.25, "cost": 1.5}}, now)
    ended = status_rows(UNKNOWN, {"state": "failed", "attempt": 2, "record": {
        "state": "failed", "start": now - 100, "end": now - 40, "worker": worker, "attempt": 2,
        "error": {"type": "ValueError", "message": "bad"}}}, now)
    assert dict(running)["since"].endswith("(3 min ago)")
    assert dict(running)["progress"] == "[#####...............]  25%  cost=1.5"
    assert dict(ended)["since"].endswith("(40 s ago)") and dict(ended)["started"].endswith("(ran 1:00)")
    for rows in (running, ended):
        assert [name for name, _ in rows][:3] == ["job", "state", "since"]
        assert dict(rows)["worker"] == "lab:7"
        assert not any("queued_signals" in value or "{" in value for _, value in rows)
    assert dict(ended)["error"] == "ValueError: bad" and dict(ended)["attempt"] == "2"
    assert "progress" not in dict(ended) and "improved" not in dict(ended)  # it reported neither
    reported = status_rows(UNKNOWN, {"state": "finished", "attempt": 1, "record": {
        "state": "finished", "start": now - 100, "end": now - 40, "worker": worker,
        "progress": {"fraction": 1.0, "step": 9}, "improved": {"cost": 0.25}}}, now)
    assert dict(reported)["progress"] == "[####################] 100%  step=9"
    assert dict(reported)["improved"] == "cost=0.25"


def test_the_jobs_footer_counts_workers_and_jobs() -> None:
    assert footer(Listing(), ended=False) == "no worker answered, 0 running, 0 queued"
    listing = Listing(workers=[{}, {}, {}], running=[{"job_id": str(i)} for i in range(5)],
                      queued=[{"job_id": "a", "state": "queued"}, {"job_id": "b", "state": "queued"}])
    assert footer(listing, ended=False) == "3 workers answered, 5 running, 2 queued"
    assert footer(listing, ended=True).endswith(", 0 ended in the last hour")


# ---- against RabbitMQ: every verb and the codes it can end with ------------------------------------


@pytest.mark.rabbitmq
def test_no_worker_answered_is_said(amqp_url: str) -> None:
    # Before the module's fleet starts (tests run in file order): no worker on the vhost.
    done = brokerexec("jobs", "--broker", amqp_url)
    assert done.returncode == 0 and "no worker answered" in done.stdout


@dataclass
class Fleet:
    url: str
    running: str
    finished: str
    failed: str
    aborted: str

    def run(self, *args: str, code: int) -> Any:
        filled = [arg.format(**vars(self), unknown=UNKNOWN) for arg in args]
        done = brokerexec(*filled, "--broker", self.url, "--json")
        assert done.returncode == code, (filled, done.stdout, done.stderr)
        return one_document(done)

    def state(self, job_id: str) -> str:
        done = brokerexec("status", job_id, "--broker", self.url, "--json")
        return str(json.loads(done.stdout)["state"]) if done.returncode == 0 else "unknown"


@pytest.fixture(scope="module")
def fleet(amqp_url: str) -> Iterator[Fleet]:
    worker = Worker(amqp_url, "--concurrency", "4", "--shutdown-grace", "5")
    url = amqp_url

    def launch(request: str) -> str:
        done = brokerexec("launch", "fit", "--request", request, "--broker", url)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    try:
        running, aborted = launch(LONG_FIT), launch(LONG_FIT)
        finished, failed = launch('{"points": 30, "max_iterations": 5}'), launch('{"points": "many"}')
        made = Fleet(url, running, finished, failed, aborted)
        wait_until(lambda: made.state(aborted) == "running", "a job to run")
        assert brokerexec("abort", aborted, "--broker", url).returncode == 0
        for job_id in (finished, failed, aborted):
            brokerexec("result", job_id, "--timeout", "30", "--broker", url)
        wait_until(lambda: made.state(running) == "running", "the long job to run")
        yield made
    finally:
        brokerexec("abort", "--all", "--yes", "--broker", url)
        try:
            worker.stop()
        except subprocess.TimeoutExpired:
            worker.process.kill()
            worker.process.wait()


CASES = [
    (("launch", "fit"), 0), (("launch", "nosuch"), 2),
    (("status", "{running}"), 0), (("status", "{finished}"), 0), (("status", "{unknown}"), 3),
    (("pause", "{running}"), 0), (("resume", "{running}"), 0), (("pause", "{unknown}"), 3),
    (("resume", "{unknown}"), 3), (("abort", "{unknown}"), 3), (("abort", "{finished}"), 1),
    (("pause", "--all", "--service", "nosuch"), 2), (("abort", "--all", "--service", "nosuch"), 2),
    (("set", "{running}", "tolerance=0"), 0), (("set", "{running}", "cost=1"), 1),
    (("set", "{unknown}", "x=1"), 3),
    (("invoke", "{running}", "perturb", "[0.0]"), 0), (("invoke", "{running}", "run"), 1),
    (("invoke", "{unknown}", "m"), 3),
    (("checkpoint", "{running}"), 0), (("checkpoint", "{unknown}"), 3),
    (("result", "{finished}"), 0), (("result", "{failed}"), 1), (("result", "{aborted}"), 130),
    (("result", "{unknown}"), 3), (("result", "{running}", "--timeout", "0.3"), 4),
    (("watch", "{finished}"), 0), (("watch", "{failed}"), 1), (("watch", "{aborted}"), 130),
    (("watch", "{unknown}"), 3),
    (("jobs",), 0), (("jobs", "--all"), 0),
]


@pytest.mark.rabbitmq
@pytest.mark.parametrize("args, code", CASES, ids=[f"{' '.join(a)}->{c}" for a, c in CASES])
def test_every_verb_prints_one_document_and_exits_as_documented(
        fleet: Fleet, args: tuple[str, ...], code: int) -> None:
    document = fleet.run(*args, code=code)
    if code in (2, 3, 4) or args[0] not in ("result", "watch"):
        assert ("error" in document) == (code != 0), document
    else:  # an ended job's record, whatever its state
        assert document["state"] in ("finished", "failed", "aborted")


@pytest.mark.rabbitmq
def test_jobs_lists_running_and_with_all_recently_ended(fleet: Fleet) -> None:
    listed = {job["job_id"]: job for job in fleet.run("jobs", code=0)}
    assert listed[fleet.running]["state"] in ("running", "paused") and fleet.finished not in listed
    fallback = fleet.run("jobs", "--all", code=0)  # no history indexer here: the journal's hour
    assert fallback["source"] == "journal" and fallback["cursor"] is None
    assert len(fallback["jobs"]) == min(fallback["total"], 50) and fallback["capped"] is False  # --limit
    ended = {job["job_id"]: job for job in fallback["jobs"]}
    assert ended[fleet.finished]["state"] == "finished" and ended[fleet.aborted]["state"] == "aborted"
    assert ended[fleet.finished]["end"] >= ended[fleet.finished]["start"] > 0
    text = brokerexec("jobs", "--all", "--broker", fleet.url).stdout
    assert fleet.failed in text and "1 worker answered" in text and "ended in the last hour" in text
    assert "may be more" not in text
    for column in ("start", "end", "attempts"):
        assert column in text


@pytest.mark.rabbitmq
def test_status_is_a_panel_for_people(fleet: Fleet) -> None:
    for job_id, state in ((fleet.running, "running"), (fleet.failed, "failed")):
        text = brokerexec("status", job_id, "--broker", fleet.url).stdout
        assert job_id in text and state in text and " ago)" in text and "attempt" in text
        assert "queued_signals" not in text and "record" not in text and "{" not in text


@pytest.mark.rabbitmq
def test_all_reports_how_many_jobs_acknowledged(fleet: Fleet) -> None:
    # Given two more long jobs running beside the fixture's,
    jobs = [brokerexec("launch", "fit", "--request", LONG_FIT, "--broker", fleet.url).stdout.strip()
            for _ in range(2)]
    for job_id in jobs:
        wait_until(lambda job_id=job_id: fleet.state(job_id) == "running", "the jobs to run")
    # pause --all of the service reaches all of them, each acknowledging within a second,
    paused = fleet.run("pause", "--all", "--service", "fit", code=0)
    assert paused["jobs"] >= 3 and paused["acknowledged"] == paused["jobs"], paused
    assert paused["workers"] == 1 and paused["within"] == 1.0
    # and resume --all / abort --all (with --yes: stdin may be a terminal) report alike.
    resumed = fleet.run("resume", "--all", "--yes", code=0)
    assert resumed["acknowledged"] == resumed["jobs"] >= 3, resumed
    text = brokerexec("abort", "--all", "--yes", "--broker", fleet.url).stdout
    assert f"{resumed['jobs']} of {resumed['jobs']} jobs aborted within 1 s" in text, text
    for job_id in jobs:
        assert fleet.run("result", job_id, code=130)["state"] == "aborted"


def test_the_module_runs_as_documented() -> None:
    done = subprocess.run([sys.executable, "-m", "brokerexec", "--help"], capture_output=True,
                          text=True, cwd=ROOT, timeout=60, check=False)
    assert done.returncode == 0 and "Exit codes" in done.stdout
