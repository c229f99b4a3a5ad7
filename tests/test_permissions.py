"""Least-privilege RabbitMQ permissions of docs/security.md, with real users and vhosts.

A vhost and three users (worker, launching client, watcher) of the test's own on the
default broker, each with the regexes the docs give, deleted at the end whatever happens;
and a second vhost whose client must not see the first one's jobs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import brokerctl
import pika
import pytest

from brokerexec import AccessRefused, AsyncClient, Client, Event, HistoryUnavailable
from brokerexec.protocol.journal import started_entry
from brokerexec.protocol.messages import Launch, Record
from brokerexec.protocol.names import (
    HISTORY_EXCHANGE,
    HISTORY_QUEUE,
    JOURNAL_BUCKETS,
    LAUNCH_TYPE,
    RECORD_TYPE,
    STARTED_TYPE,
    job_events_pattern,
    journal_bucket,
    journal_stream,
    journal_stream_of_bucket,
)
from brokerexec.protocol.states import JobState

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
               r"^(brokerexec\.(launches|control|workers|probes|status|history|client\..*)|kiwipy\.messages"
               r"|amq\.gen-.*|amq\.default)$",
               r"^(brokerexec\.(jobs\..*|events|control|client\..*)|kiwipy\.messages|amq\.gen-.*)$"),
    "watcher": (r"^(brokerexec\.client\..*|amq\.gen-.*)$",
                r"^(brokerexec\.(probes|status|history|client\..*)|amq\.gen-.*)$",
                r"^(brokerexec\.(jobs\..*|events|client\..*)|amq\.gen-.*)$"),
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


def test_the_client_role_launches_an_operation_that_hears_an_abort_sent_from_elsewhere(
        broker: Broker, worker: None) -> None:
    url = broker.urls["client"]
    requests = [{"max_iterations": 10**9, "tolerance": 0, "seed": seed} for seed in range(6)]
    with Client(url, timeout=10) as client, client.operation("fit", requests, max_in_flight=1) as op:
        with op._cond:
            assert op._cond.wait_for(lambda: op.status().counts["running"] == 1, WAIT)
        aborted = brokerexec("op", "abort", op.id, "--broker", url)  # another process, same role
        assert aborted.returncode == 0, aborted.stderr
        status = op.wait(WAIT)
    # its launcher read the control message (the role may): it launched no more
    assert op.stopped == "aborted" and len(op.items()) == 1
    assert status.counts["aborted"] == 6


def test_the_asyncio_client_role_runs_a_job_and_looks_it_up(broker: Broker, worker: None) -> None:
    async def run() -> dict[str, object]:
        async with AsyncClient(broker.urls["aclient"]) as client:
            job = await client.launch("fit", {"max_iterations": 40, "tolerance": 0})
            await job.result(timeout=WAIT)
            status: dict[str, object] = await job.status()
            return status

    assert asyncio.run(run())["state"] == "finished"


def test_a_watcher_subscribes_and_looks_up_but_cannot_launch_or_steer(
        broker: Broker, worker: None) -> None:
    running = threading.Event()

    def on_event(event: Event) -> None:
        if event.kind == "progress":
            running.set()

    url = broker.urls["watcher"]
    with Client(broker.urls["client"]) as client, Client(url) as watcher:
        job = client.launch("fit", {"tolerance": 0, "max_iterations": 10_000_000})
        subscription = watcher.subscribe(job_events_pattern(job.id), on_event)
        assert running.wait(WAIT), "the watcher heard no progress"
        subscription.close()
        assert watcher.job(job.id).status()["state"] == "running"
        status = brokerexec("status", job.id, "--json", "--broker", url)
        assert status.returncode == 0 and json.loads(status.stdout)["state"] == "running", status.stderr
        # The library's refusals: one error class, whatever was refused
        for refusal in (lambda: watcher.launch("fit"), lambda: watcher.pause_all(),
                        lambda: watcher.job(job.id).pause(), lambda: watcher.job(job.id).abort(),
                        lambda: watcher.job(job.id).set({"max_iterations": 0})):
            with pytest.raises(AccessRefused, match="ACCESS_REFUSED"):
                refusal()
        refused(brokerexec("launch", "fit", "--broker", url), 1, "ACCESS_REFUSED")
        refused(brokerexec("pause", "--all", "--broker", url), 1, "ACCESS_REFUSED")
        refused(brokerexec("pause", job.id, "--broker", url), 1, "ACCESS_REFUSED")
        refused(brokerexec("abort", job.id, "--broker", url), 1, "ACCESS_REFUSED")
        refused(brokerexec("set", job.id, "max_iterations=0", "--broker", url), 1, "ACCESS_REFUSED")
        refused(brokerexec("jobs", "--broker", url), 1, "ACCESS_REFUSED")
        # What its write on the read-only exchanges lets it try by hand: refused by the
        # worker, and not believed by any reader
        assert "SignalRefused" in raw_rpc(url, job.id, "abort")
        assert "SignalRefused" in raw_rpc(url, job.id, "set")
        assert "SignalRefused" in raw_rpc(url, job.id, "abort", located=True)
        forge_record(url, job.id)
        assert watcher.job(job.id).record(timeout=0) is None
        assert watcher.job(job.id).status()["state"] == "running"
        client.job(job.id).set({"max_iterations": 0})  # its launcher ends it
        assert client.job(job.id).result(timeout=WAIT)["iterations"] > 0
    status = brokerexec("status", job.id, "--json", "--broker", url)
    assert status.returncode == 0 and json.loads(status.stdout)["state"] == "finished", status.stderr
    result = brokerexec("result", job.id, "--json", "--broker", url)
    assert result.returncode == 0 and json.loads(result.stdout)["state"] == "finished", result.stderr
    with Client(url) as watcher:
        assert watcher.job(job.id).status()["state"] == "finished"
        assert watcher.job(job.id).result(timeout=0)["iterations"] > 0
    with pytest.raises(AccessRefused, match="ACCESS_REFUSED"):  # the asyncio client at connect
        asyncio.run(async_status(url, job.id))


async def async_status(url: str, job_id: str) -> object:
    async with AsyncClient(url) as client:
        return await client.job(job_id).status()


def raw_rpc(url: str, job_id: str, intent: str, *, located: bool = False) -> str:
    """A watcher's hand-made RPC of ``intent`` through the status exchange (to the job's
    queue, or ``located`` to every worker, naming the job): the reply's text."""
    with pika.BlockingConnection(pika.URLParameters(url)) as connection:
        channel = connection.channel()
        replies: list[bytes] = []
        channel.basic_consume("amq.rabbitmq.reply-to", lambda _c, _m, _p, body: replies.append(body),
                              auto_ack=True)
        body = {"intent": intent, "attrs": {"max_iterations": 0}}
        channel.basic_publish("brokerexec.status", "" if located else job_id, json.dumps(body).encode(),
                              pika.BasicProperties(content_type="application/json",
                                                   correlation_id=secrets.token_hex(8),
                                                   reply_to="amq.rabbitmq.reply-to",
                                                   headers={"x-job-id": job_id} if located else None))
        deadline = time.monotonic() + WAIT
        while not replies and time.monotonic() < deadline:
            connection.process_data_events(time_limit=0.5)
        assert replies, f"no reply to a hand-made {intent!r}"
        return replies[0].decode()


def forge_record(url: str, job_id: str) -> None:
    """Append an aborted record of ``job_id`` to its stream, the one way a watcher can."""
    record = {"v": 1, "job_id": job_id, "service": "fit", "state": "aborted", "result": None,
              "error": None, "start": time.time(), "end": time.time(), "worker": {}}
    stream = f"brokerexec.jobs.{zlib.crc32(job_id.encode()) % 16:02x}"
    with pika.BlockingConnection(pika.URLParameters(url)) as connection:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish("brokerexec.probes", stream, json.dumps(record).encode(), pika.BasicProperties(
            content_type="application/json", message_id=job_id, type="brokerexec.record"), mandatory=True)
        with pytest.raises(pika.exceptions.ChannelClosedByBroker, match="ACCESS_REFUSED"):
            channel.basic_publish("", stream, json.dumps(record).encode(), pika.BasicProperties(
                content_type="application/json", message_id=job_id, type="brokerexec.record"))


def test_a_client_of_another_vhost_sees_none_of_its_jobs(broker: Broker, worker: None) -> None:
    followed = brokerexec("launch", "fit", "--follow", "--json", "--broker", broker.urls["client"])
    job_id = json.loads(followed.stdout)["job_id"]
    refused(brokerexec("status", job_id, "--broker", broker.urls["other"]), 3)
    listing = brokerexec("jobs", "--json", "--broker", broker.urls["other"])
    assert listing.returncode == 0 and job_id not in listing.stdout
    # No worker or indexer ever ran there: no history exchange (404 NOT_FOUND on publish),
    # met as no indexer at all, and `jobs --all` falls back to the journal.
    with Client(broker.urls["other"]) as other, pytest.raises(HistoryUnavailable, match="no history indexer"):
        other.history()
    listed = brokerexec("jobs", "--all", "--json", "--broker", broker.urls["other"])
    assert listed.returncode == 0 and json.loads(listed.stdout)["source"] == "journal", listed.stderr


class Indexer:
    """``brokerexec history`` in a process of its own, ready once it answers queries."""

    def __init__(self, url: str, store: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "brokerexec", "history", "--broker", url, "--store", str(store)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        assert self.process.stderr is not None
        log = []
        for line in self.process.stderr:  # blocks on the pipe; the test's timeout bounds it
            log.append(line)
            if "history indexer ready" in line:
                break
        else:
            pytest.fail("the indexer did not start:\n" + "".join(log))
        # drained, so that its log never fills the pipe
        threading.Thread(target=self.process.stderr.read, daemon=True).start()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(WAIT)


def write_archived_job(url: str) -> dict[str, object]:
    """A job the journal cannot give but the store keeps: its entries, as its worker wrote
    them, in another stream than its own, so a look-up (which reads the job's own stream)
    finds nothing, while the indexer takes every stream's entries: as for a job the journal
    dropped, without waiting out a retention. Its record."""
    ran = time.time() - 120
    launch = dataclasses.replace(Launch.new("archived", {"steps": 1}), sent=ran)
    job_id = launch.job_id
    elsewhere = journal_stream_of_bucket((journal_bucket(job_id) + 1) % JOURNAL_BUCKETS)
    record = Record(job_id, "archived", JobState.FINISHED, {"count": 1}, None, ran + 1, ran + 60,
                    {"hostname": "old-host", "pid": 1})
    with pika.BlockingConnection(pika.URLParameters(url)) as connection:
        channel = connection.channel()
        channel.confirm_delivery()
        for kind, body in ((LAUNCH_TYPE, launch.encode()),
                           (STARTED_TYPE, started_entry(job_id, "archived", 1, {"hostname": "old-host"},
                                                        ran + 1)),
                           (RECORD_TYPE, record.encode())):
            channel.basic_publish("", elsewhere, json.dumps(body).encode(), pika.BasicProperties(
                content_type="application/json", message_id=job_id, type=kind, delivery_mode=2))
    return record.encode()


def raw_history_query(url: str, exchange: str, body: dict[str, object]) -> Any:
    """A hand-made history query through ``exchange``, as a stock client sends it: the reply."""
    with pika.BlockingConnection(pika.URLParameters(url)) as connection:
        channel = connection.channel()
        replies: list[bytes] = []
        channel.basic_consume("amq.rabbitmq.reply-to", lambda _c, _m, _p, reply: replies.append(reply),
                              auto_ack=True)
        channel.basic_publish(exchange, HISTORY_QUEUE, json.dumps(body).encode(), pika.BasicProperties(
            content_type="application/json", correlation_id=secrets.token_hex(8),
            reply_to="amq.rabbitmq.reply-to"), mandatory=True)
        deadline = time.monotonic() + WAIT
        while not replies and time.monotonic() < deadline:
            connection.process_data_events(time_limit=0.5)
        assert replies, f"no reply to a history query through {exchange!r}"
        return json.loads(replies[0])


def test_a_watcher_asks_the_history_store(broker: Broker, worker: None, tmp_path: Path) -> None:
    url = broker.urls["watcher"]
    # no indexer yet: said at once, as to any client
    with Client(url) as watcher, pytest.raises(HistoryUnavailable, match="no history indexer"):
        watcher.history()
    archived = write_archived_job(broker.urls["worker"])
    job_id = str(archived["job_id"])
    refused(brokerexec("status", job_id, "--broker", url), 3)  # the journal cannot give it
    with Client(broker.urls["client"]) as client:
        ran = client.launch("fit", {"max_iterations": 40, "tolerance": 0})
        ran.result(timeout=WAIT)
    indexer = Indexer(broker.urls["worker"], tmp_path / "history.db")
    try:
        with Client(url) as watcher:
            def stored() -> set[str]:
                return {str(row["job_id"]) for row in watcher.history(limit=1000).rows}

            brokerctl.wait_until(lambda: {job_id, ran.id} <= stored(), WAIT, "the store to hold both jobs")
            # Page by page, a row at a time: every job once
            seen: list[str] = []
            page = watcher.history(limit=1, count=True)
            while True:
                seen += [str(row["job_id"]) for row in page.rows]
                if page.cursor is None:
                    break
                page = watcher.history(limit=1, cursor=page.cursor)
            assert len(seen) == len(set(seen)) and {job_id, ran.id} <= set(seen)
            [row] = watcher.history(service="archived").rows
            assert row["job_id"] == job_id and row["state"] == "finished"
            # status and result of a job only the store has
            assert watcher.job(job_id).status()["state"] == "finished"
            assert watcher.job(job_id).result(timeout=5) == archived["result"]
        listed = brokerexec("jobs", "--all", "--json", "--broker", url)
        assert listed.returncode == 0, listed.stderr
        body = json.loads(listed.stdout)
        assert body["source"] == "history" and {job_id, ran.id} <= {row["job_id"] for row in body["jobs"]}
        status = brokerexec("status", job_id, "--json", "--broker", url)
        assert status.returncode == 0 and json.loads(status.stdout)["record"] == archived, status.stderr
        result = brokerexec("result", job_id, "--json", "--broker", url)
        assert result.returncode == 0 and json.loads(result.stdout) == archived, result.stderr
        # A stock client's query through the default exchange is answered as before ...
        query = {"intent": "history", "job_id": job_id, "record": True}
        old_style = raw_history_query(broker.urls["client"], "", query)
        assert old_style["result"]["rows"][0]["record"] == archived
        assert raw_history_query(url, HISTORY_EXCHANGE, query) == old_style
        # ... and the history exchange reaches nothing but the history queue
        with pika.BlockingConnection(pika.URLParameters(url)) as connection:
            channel = connection.channel()
            channel.confirm_delivery()
            for routing_key in (f"brokerexec.rpc.{ran.id}", "brokerexec.launches.fit",
                                journal_stream(job_id)):
                with pytest.raises(pika.exceptions.UnroutableError):
                    channel.basic_publish(HISTORY_EXCHANGE, routing_key, b"{}", mandatory=True)
        assert "DecodeError" in json.dumps(raw_history_query(url, HISTORY_EXCHANGE, {"intent": "abort"}))
    finally:
        indexer.stop()
