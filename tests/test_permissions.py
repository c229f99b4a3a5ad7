"""Least-privilege RabbitMQ permissions of docs/security.md, with real users and vhosts.

A vhost and three users (worker, launching client, watcher) of the test's own on the
default broker, each with the regexes the docs give, deleted at the end whatever happens;
and a second vhost whose client must not see the first one's jobs.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from brokerexec import AccessRefused, AsyncClient, Client

pytestmark = [pytest.mark.rabbitmq, pytest.mark.timeout(240)]
ROOT = Path(__file__).resolve().parent.parent
FIT = "examples/fit.py:ExponentialFit"
WAIT = 60.0
#: (configure, write, read) of each role, exactly as docs/security.md gives them.
ROLES = {
    "worker": (r"^(brokerexec\..*|kiwipy\.messages|amq\.gen-.*)$",
               r"^(brokerexec\..*|kiwipy\.messages|amq\.gen-.*|amq\.default)$",
               r"^(brokerexec\..*|kiwipy\.messages|amq\.gen-.*)$"),
    "client": (r"^(brokerexec\.(control|launches\..*|client\..*)|amq\.gen-.*)$",
               r"^(brokerexec\.(launches|control|workers|client\..*)|kiwipy\.messages|amq\.gen-.*|amq\.default)$",
               r"^(brokerexec\.(jobs\..*|events|control|client\..*)|kiwipy\.messages|amq\.gen-.*)$"),
    "watcher": (r"^(brokerexec\.client\..*|amq\.gen-.*)$", r"^(brokerexec\.client\..*|amq\.gen-.*)$",
                r"^(brokerexec\.(events|client\..*)|amq\.gen-.*)$"),
}


#: The asyncio client declares the clients' whole topology when it connects, exchange
#: bindings included: it needs the worker's permissions.
ROLES["aclient"] = ROLES["worker"]


def ctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=WAIT)


class Broker(NamedTuple):
    urls: dict[str, str]  # role -> URL in the test's vhost; "other": a client of another vhost
    passwords: list[str]


@pytest.fixture(scope="module")
def broker(amqp_url: str) -> Iterator[Broker]:
    tag = secrets.token_hex(4)
    vhost, other = f"bx-perm-{tag}", f"bx-perm-{tag}-other"
    users = {role: f"bx-{role}-{tag}" for role in (*ROLES, "other")}
    passwords = {role: secrets.token_hex(8) for role in users}
    host = amqp_url.split("@", 1)[1].split("/", 1)[0]
    try:
        for name in (vhost, other):
            ctl("add_vhost", name)
        for role, user in users.items():
            ctl("add_user", user, passwords[role])
            ctl("set_permissions", "-p", other if role == "other" else vhost, user,
                *ROLES["client" if role == "other" else role])
        yield Broker({role: f"amqp://{user}:{passwords[role]}@{host}/{other if role == 'other' else vhost}"
                      for role, user in users.items()}, list(passwords.values()))
    finally:  # every user and vhost goes, even when a step above failed
        for user in users.values():
            subprocess.run(["rabbitmqctl", "-q", "delete_user", user], capture_output=True, timeout=WAIT)
        for name in (vhost, other):
            subprocess.run(["rabbitmqctl", "-q", "delete_vhost", name], capture_output=True, timeout=WAIT)


@pytest.fixture(scope="module")
def worker(broker: Broker) -> Iterator[None]:
    process = subprocess.Popen(
        [sys.executable, "-m", "brokerexec", "worker", "--broker", broker.urls["worker"], "--service", FIT,
         "--shutdown-grace", "5"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert process.stderr is not None
        log = []
        for line in process.stderr:  # blocks on the pipe; the test's timeout bounds it
            log.append(line)
            if "worker ready: fit" in line:
                break
        else:
            pytest.fail("the worker did not start:\n" + "".join(log))
        yield
    finally:
        process.terminate()
        process.communicate(timeout=WAIT)


def brokerexec(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "brokerexec", *args], capture_output=True, text=True,
                          timeout=WAIT, cwd=ROOT)


def refused(result: subprocess.CompletedProcess[str], code: int, *texts: str) -> None:
    """One ``brokerexec:`` line on stderr, exit ``code``, no traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, result.stderr
    assert len(lines) == 1 and lines[0].startswith("brokerexec: "), result.stderr
    for text in texts:
        assert text in lines[0]


def test_the_docs_give_these_regexes() -> None:
    doc = (ROOT / "docs" / "security.md").read_text(encoding="utf-8")
    for regexes in ROLES.values():
        for regex in regexes:
            assert f"`{regex.replace('|', chr(92) + '|')}`" in doc, regex


def test_worker_and_client_roles_run_and_steer_a_job(broker: Broker, worker: None) -> None:
    url = broker.urls["client"]
    followed = brokerexec("launch", "fit", "--follow", "--json", "--broker", url)
    assert followed.returncode == 0, followed.stderr
    job_id = json.loads(followed.stdout)["job_id"]
    status = brokerexec("status", job_id, "--broker", url)
    assert status.returncode == 0 and "finished" in status.stdout, status.stderr
    assert brokerexec("jobs", "--broker", url).returncode == 0
    for result in (followed, status):
        assert not any(password in result.stdout + result.stderr for password in broker.passwords)


def test_the_asyncio_client_role_runs_a_job_and_looks_it_up(broker: Broker, worker: None) -> None:
    async def run() -> dict[str, object]:
        async with AsyncClient(broker.urls["aclient"]) as client:
            job = await client.launch("fit", {"max_iterations": 40, "tolerance": 0})
            await job.result(timeout=WAIT)
            status: dict[str, object] = await job.status()
            return status

    assert asyncio.run(run())["state"] == "finished"


def test_a_watcher_subscribes_but_cannot_launch_pause_abort_or_look_up(
        broker: Broker, worker: None) -> None:
    heard: list[str] = []
    finished = threading.Event()

    def on_event(event: object) -> None:
        heard.append(str(event))
        finished.set()

    with Client(broker.urls["watcher"]) as watcher:
        subscription = watcher.subscribe("#", on_event)
        followed = brokerexec("launch", "fit", "--follow", "--json", "--broker", broker.urls["client"])
        assert followed.returncode == 0, followed.stderr
        assert finished.wait(WAIT), "the watcher heard no event"
        subscription.close()
        job_id = json.loads(followed.stdout)["job_id"]
        # The library's refusals: one error class, whatever was refused; a look-up, whose
        # probe a watcher may not append to the journal, is refused at once, not timed out
        for refusal in (lambda: watcher.launch("fit"), lambda: watcher.pause_all(),
                        lambda: watcher.job(job_id).abort(), lambda: watcher.job(job_id).status()):
            with pytest.raises(AccessRefused, match="ACCESS_REFUSED"):
                refusal()
    url = broker.urls["watcher"]
    with pytest.raises(AccessRefused, match="ACCESS_REFUSED"):  # the asyncio client at connect
        asyncio.run(async_status(url, job_id))
    refused(brokerexec("launch", "fit", "--broker", url), 1, "ACCESS_REFUSED")
    refused(brokerexec("pause", "--all", "--broker", url), 1, "ACCESS_REFUSED")
    refused(brokerexec("abort", job_id, "--broker", url), 1, "ACCESS_REFUSED")
    refused(brokerexec("status", job_id, "--broker", url), 1, "ACCESS_REFUSED")


async def async_status(url: str, job_id: str) -> object:
    async with AsyncClient(url) as client:
        return await client.job(job_id).status()


def test_a_client_of_another_vhost_sees_none_of_its_jobs(broker: Broker, worker: None) -> None:
    followed = brokerexec("launch", "fit", "--follow", "--json", "--broker", broker.urls["client"])
    job_id = json.loads(followed.stdout)["job_id"]
    refused(brokerexec("status", job_id, "--broker", broker.urls["other"]), 3)
    listing = brokerexec("jobs", "--json", "--broker", broker.urls["other"])
    assert listing.returncode == 0 and job_id not in listing.stdout
