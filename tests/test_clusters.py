"""Clustered brokers: several broker addresses, quorum launch queues, a node lost mid-run.

The address parsing runs without a broker; the queue-type choice and the failover among
addresses run on the default broker in the session's vhost; the node losses run on one 3-node
cluster of :mod:`rabbitnodes` (``pause_minority``, as docs/clusters.md recommends) that the
module starts once and always stops: a node stopped, and a node paused as ``pause_minority``
pauses the minority side of a network partition.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlparse

import brokerctl
import pika
import pytest
from conftest import ROOT, SAMPLES
from rabbitnodes import START_TIMEOUT, RabbitCluster, RabbitNodeError, free_ports, require_installed
from test_faults import Watch, launch

from brokerexec import BrokerConnectionError, Client, ConfigurationError
from brokerexec.cli.app import EXIT_USAGE
from brokerexec.protocol import topology
from brokerexec.protocol.journal import probe_message
from brokerexec.protocol.names import ATTEMPT_HEADER, journal_stream, launch_queue
from brokerexec.transport.rabbitmq.connection_settings import ConnectionSettings
from brokerexec.urls import broker_urls, redacted_url

pytestmark = pytest.mark.timeout(120)
WAIT = 60.0
FAST = ("--heartbeat", "2", "--resume-grace", "0.5")


# ---- several addresses in one URL ---------------------------------------------------------------


@pytest.mark.parametrize(("url", "expected"), [
    ("amqp://u:p@a:1/vh", ["amqp://u:p@a:1/vh"]),
    ("amqp://u:p@a:1,b:2, c/vh?heartbeat=5",
     ["amqp://u:p@a:1/vh?heartbeat=5", "amqp://u:p@b:2/vh?heartbeat=5", "amqp://u:p@c/vh?heartbeat=5"]),
    ("amqp://u:p@a:1/v,amqps://x:y@b/w?q=1", ["amqp://u:p@a:1/v", "amqps://x:y@b/w?q=1"]),
    ("amqp://a,b:5673", ["amqp://a", "amqp://b:5673"]),
])
def test_broker_urls_gives_one_url_per_address(url: str, expected: list[str]) -> None:
    assert broker_urls(url) == expected


def test_every_address_is_redacted_and_gets_the_heartbeat_and_name() -> None:
    url = "amqp://u:secret@a:1,b:2/vh"
    assert redacted_url(url) == "amqp://u:***@a:1/vh,amqp://u:***@b:2/vh"
    urls = ConnectionSettings(url, heartbeat=3, name="w").connection_urls()
    assert [urlparse(one).netloc for one in urls] == ["u:secret@a:1", "u:secret@b:2"]
    assert all(one.endswith("/vh?heartbeat=3&name=w") for one in urls)


def test_queue_types_give_the_arguments_the_broker_needs() -> None:
    classic = topology.launch_queue_spec("svc").arguments
    quorum = topology.launch_queue_spec("svc", "quorum").arguments
    assert classic == {"x-dead-letter-exchange": "brokerexec.dead", "x-queue-version": 2}
    assert quorum == {"x-dead-letter-exchange": "brokerexec.dead", "x-queue-type": "quorum"}
    dead_letters, control = topology.shared_queue_specs("quorum")
    assert dead_letters.arguments == {"x-queue-type": "quorum"} and control is topology.CONTROL
    assert topology.shared_queue_specs()[0].arguments == {}
    with pytest.raises(ConfigurationError, match="queue type 'stream': expected one of classic, quorum"):
        topology.check_queue_type("stream")


# ---- on the default broker ----------------------------------------------------------------------


def queue_types(vhost: str) -> dict[str, str]:
    listed = brokerctl.rabbitmqctl("list_queues", "-p", vhost, "name", "type", "--formatter", "json")
    rows = json.loads(listed)
    return {row["name"]: row["type"] for row in rows}


def vhost_of(url: str) -> str:
    return urlparse(url).path.lstrip("/") or "/"


def closed_port_url(url: str) -> str:
    """``url`` with a dead address (a free loopback port nobody listens on) in front."""
    [dead] = free_ports(1)
    parts = urlparse(url)
    userinfo, _, host = parts.netloc.rpartition("@")
    return parts._replace(netloc=f"{userinfo}@127.0.0.1:{dead},{host}").geturl()


@pytest.mark.rabbitmq
def test_quorum_launch_queues_run_jobs_and_a_classic_worker_is_refused_clearly(
        own_vhost: str, worker_process: Callable[..., Any]) -> None:
    amqp_url = own_vhost
    # Given a worker that declares its launch queue as a quorum queue, behind a dead address
    url = closed_port_url(amqp_url)
    worker_process(*FAST, "--queue-type", "quorum", url=url, services=("Steps",))
    assert queue_types(vhost_of(amqp_url))[launch_queue("steps")] == "quorum"
    # When a client that also tries the dead address first launches a job
    with Client(url, timeout=10) as client:
        job = client.launch("steps", {"steps": 20, "delay": 0.005})
        # Then it runs there
        assert job.result(WAIT)["done"] == 20
    # And a worker that would declare the same queues as classic ones stops at once, saying why
    refused = refused_worker(amqp_url, "Steps", "classic")
    assert ("the dead-letter queue (brokerexec.launch.dead) exists with other arguments than "
            "a classic queue's") in refused
    # And so does a quorum worker whose launch queue someone made a classic queue before
    with pika.BlockingConnection(pika.URLParameters(amqp_url)) as connection:
        spec = topology.launch_queue_spec("counter", "classic")
        connection.channel().queue_declare(spec.name, durable=True, arguments=dict(spec.arguments))
    refused = refused_worker(amqp_url, "Counter", "quorum")
    assert (f"the launch queue of service 'counter' ({spec.name}) exists with other arguments "
            "than a quorum queue's") in refused


def refused_worker(url: str, service: str, queue_type: str) -> str:
    """The stderr of a worker that must stop at once (a queue of another type exists)."""
    command = [sys.executable, "-m", "brokerexec", "worker", "--broker", url,
               f"--service={SAMPLES}:{service}", "--queue-type", queue_type]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == EXIT_USAGE, result.stderr  # a setting that cannot work
    assert "PRECONDITION_FAILED" in result.stderr and "Traceback" not in result.stderr
    assert "guest:guest" not in result.stderr
    return result.stderr


@pytest.mark.rabbitmq
def test_a_client_fails_over_past_dead_addresses_and_names_them_all_when_none_answers(
        amqp_url: str) -> None:
    with Client(closed_port_url(amqp_url), timeout=10) as client:
        assert client.jobs() == []
    [one, two] = free_ports(2)
    with pytest.raises(BrokerConnectionError, match=rf"127\.0\.0\.1:{one}/,amqp://guest:\*\*\*@127\.0\.0\.1:{two}/"):
        Client(f"amqp://guest:guest@127.0.0.1:{one},127.0.0.1:{two}/", timeout=3)


# ---- a 3-node cluster loses a node --------------------------------------------------------------
#
# One cluster for the module (started by the first test that asks for it, about 15 s), with the
# partition handling docs/clusters.md recommends. Each test gets a vhost of its own on it, so that
# its queues and streams are new and led where its first declarations put them, and finds all
# three nodes running: a node an earlier test stopped is started again first (the test that
# stops a node for good runs last, so that nobody waits for it to come back).

#: The partition handling docs/clusters.md recommends; a stopped node leaves a majority of two.
PARTITION_HANDLING = "cluster_partition_handling = pause_minority\n"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitCluster]:
    require_installed("start a 3-node cluster")
    cluster = RabbitCluster(tmp_path_factory.mktemp("cluster"), n=3)
    for node in cluster.nodes:  # conf.d/*.conf is read after the node's own rabbitmq.conf
        (node.base / "conf.d").mkdir(parents=True, exist_ok=True)
        (node.base / "conf.d" / "partitions.conf").write_text(PARTITION_HANDLING)
    with cluster:
        yield cluster


class OnCluster:
    """The module's cluster, and a vhost of one test's own on it."""

    def __init__(self, cluster: RabbitCluster, vhost: str) -> None:
        self.cluster, self.vhost = cluster, vhost
        self.ports = [node.port for node in cluster.nodes]

    def url(self, *nodes: int) -> str:
        """One URL naming these members (indexes), in this order, on the test's vhost."""
        return cluster_url([self.ports[i] for i in nodes], self.vhost)


def running_names(cluster: RabbitCluster) -> set[str]:
    """The members whose RabbitMQ application runs, asked of the first member that answers
    (a node whose application is stopped refuses ``cluster_status``)."""
    for index, node in enumerate(cluster.nodes):
        if node.running:
            with contextlib.suppress(RabbitNodeError):
                return set(cluster.running_nodes(via=index))
    return set()


def all_running(cluster: RabbitCluster) -> None:
    """Start whatever a test stopped: a node's VM, or only its RabbitMQ application."""
    names = {node.nodename for node in cluster.nodes}
    running = running_names(cluster)
    for index, node in enumerate(cluster.nodes):
        if node.nodename in running:
            continue
        if node.running:  # the VM runs: stop_app, as pause_minority pauses a node
            node.ctl("start_app", timeout=START_TIMEOUT)
        else:
            cluster.start_node(index)
    brokerctl.wait_until(lambda: running_names(cluster) == names, WAIT, "all 3 nodes running")


@pytest.fixture
def on_cluster(cluster: RabbitCluster) -> Iterator[OnCluster]:
    all_running(cluster)  # here, not after a test: a node the module's last test stops stays so
    vhost = f"brokerexec-test-clusters-{uuid.uuid4().hex[:8]}"
    cluster.nodes[0].ctl("add_vhost", vhost)
    try:
        cluster.nodes[0].ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        yield OnCluster(cluster, vhost)
    finally:
        if running_names(cluster) == {node.nodename for node in cluster.nodes}:
            cluster.nodes[0].ctl("delete_vhost", vhost)
        # else left to go with the cluster: deleting quorum queues and streams that have a
        # member down takes seconds


def cluster_url(ports: list[int], vhost: str = "") -> str:
    return "amqp://guest:guest@" + ",".join(f"127.0.0.1:{port}" for port in ports) + "/" + vhost


@pytest.mark.rabbitmq
@pytest.mark.cluster
@pytest.mark.timeout(300)
@pytest.mark.parametrize("late", [False, True], ids=["worker-back-at-once", "worker-back-late"])
def test_a_job_whose_node_pauses_mid_run_finishes_exactly_once(
        on_cluster: OnCluster, worker_process: Callable[..., Any], late: bool) -> None:
    """What ``pause_minority`` does to the minority side of a partition, without the partition:
    the node's RabbitMQ application stops (``rabbit:stop()``; the VM stays), its clients'
    connections are closed. The job's worker moves to another member, at once or (``late``:
    SIGSTOPped across the pause) after a worker on the majority resumed the job from its lease;
    one execution runs the job to its end and stores its record, never two."""
    cluster, ports = on_cluster.cluster, on_cluster.ports
    paused = cluster.nodes[2]
    # Given a worker on node 2 (listed first), with quorum launch queues, running a
    # checkpointing job for a client on the other two nodes
    far = worker_process(*FAST, "--queue-type", "quorum", url=on_cluster.url(2, 0, 1), services=("Steps",))
    with Client(on_cluster.url(0, 1), heartbeat=2, timeout=10) as client:
        watch = Watch()
        job = launch(client, watch, "steps", {"steps": 250, "delay": 0.02},
                     checkpoint_delta=0.2, progress_delta=0.1)
        assert job.status()["worker"]["pid"] == far.pid  # claimed: a lease, a queue, a journal entry
        # And a second worker on node 1, ready to resume it
        near = worker_process(*FAST, "--queue-type", "quorum", url=on_cluster.url(1, 0, 2),
                              services=("Steps",))
        watch.wait(lambda: progressed(watch, [job], 30), "the job never got going")
        try:
            if late:
                os.kill(far.pid, signal.SIGSTOP)
            # When node 2 pauses
            paused.ctl("stop_app")
            if late:  # the job is resumed on the majority, then the far worker comes back
                watch.wait(lambda: any(e.job_id == job.id and e.attempt == 2 for e in watch.events),
                           "the job was never resumed on the majority")
                os.kill(far.pid, signal.SIGCONT)
            # Then the job finishes, every step done
            result = job.result(WAIT)
            record = job.record()
            assert result["done"] == 250 and record is not None and record["state"] == "finished"
            # once: the journal holds one record, of the newest attempt, and one start per attempt
            attempt = record.get("attempt", 1)
            entries = journal_entries(on_cluster.url(0), job.id)
            assert [a for kind, a in entries if kind == "brokerexec.record"] == [attempt], entries
            assert [a for kind, a in entries if kind == "brokerexec.started"] == list(range(1, attempt + 1))
            if late:  # resumed from a checkpoint, and the copy that came back stood down
                assert attempt == 2 and record["worker"]["pid"] == near.pid and result["resumed_from"]
            if record["worker"]["pid"] != far.pid:
                brokerctl.wait_until(lambda: stood_down(far, job.id), WAIT, "the far copy to stand down")
            # And the far worker reconnected to another member of its URL
            brokerctl.wait_until(lambda: reconnected(far, ports[:2]), WAIT, "a reconnect")
            print(f"attempt {attempt} on the {'far' if record['worker']['pid'] == far.pid else 'near'} "
                  f"worker, resumed from {result['resumed_from']}")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(far.pid, signal.SIGCONT)
            # And the node comes back (as a paused node does once it sees a majority again)
            paused.ctl("start_app", timeout=START_TIMEOUT)
    names = {node.nodename for node in cluster.nodes}
    brokerctl.wait_until(lambda: running_names(cluster) == names, WAIT, "node 2 back")
    assert [worker.terminate(60) for worker in (far, near)] == [0, 0]


@pytest.mark.rabbitmq
@pytest.mark.cluster
@pytest.mark.timeout(600)
def test_jobs_on_a_cluster_finish_when_the_node_hosting_them_stops(
        on_cluster: OnCluster, worker_process: Callable[..., Any]) -> None:
    cluster, ports = on_cluster.cluster, on_cluster.ports
    # Given two workers and a client on the cluster, all on node 0 (listed first), the
    # workers with quorum launch queues
    url = on_cluster.url(0, 1, 2)
    workers = [worker_process(*FAST, "--queue-type", "quorum", "--concurrency", "3", url=url,
                              services=("Steps",)) for _ in range(2)]
    with Client(url, heartbeat=2, timeout=10) as client:
        # And six checkpointing jobs running on them
        watch = Watch()
        jobs = [launch(client, watch, "steps", {"steps": 300, "delay": 0.02},
                       checkpoint_delta=0.2, progress_delta=0.1) for _ in range(6)]
        before = replicated(on_cluster, 1)
        lost = cluster.nodes[0].nodename
        # Node 0 leads them all: the launch queue, both lease queues, the journal streams
        assert {before[name] for name in before if name.startswith(SHARED)} == {(lost, 3)}
        assert len([name for name in before if name.startswith("brokerexec.leases.")]) == 2
        watch.wait(lambda: progressed(watch, jobs, 30), "the jobs never got going")
        # When node 0 stops: the workers and the client lose their connections
        cluster.stop_node(0)
        # Then every job finishes, with every step done, once
        results = [job.result(240) for job in jobs]
        assert [result["done"] for result in results] == [300] * 6
        records = [job.record() for job in jobs]
        assert [record["state"] for record in records if record] == ["finished"] * 6
        after = replicated(on_cluster, 1)
        assert all(after[name][0] not in (lost, "") for name in after if name.startswith(SHARED))
        # And the workers reconnected to the other nodes (they list node 0 first)
        for worker in workers:
            brokerctl.wait_until(lambda w=worker: reconnected(w, ports[1:]), WAIT, "a reconnect")
        # And the client's calls went on on a new connection, to another member
        assert client.transport.connections_made >= 2  # type: ignore[attr-defined]
        # And a job launched now runs too (on the quorum queue's new leader)
        assert client.launch("steps", {"steps": 5, "delay": 0}).result(WAIT)["done"] == 5
        print("attempts:", [(record or {}).get("attempt", 1) for record in records],
              "resumed from:", [result["resumed_from"] for result in results])
    # And the workers stop gracefully while the cluster still runs (not into dead nodes)
    assert [worker.terminate(60) for worker in workers] == [0, 0]


#: Names of the replicated objects the workers declare (launch, lease and journal queues).
SHARED = ("brokerexec.launches.", "brokerexec.leases.", "brokerexec.jobs.", "brokerexec.control")


def replicated(on_cluster: OnCluster, via: int) -> dict[str, tuple[str, int]]:
    """Leader and member count of each quorum queue and stream of the test's vhost, asked of
    member ``via``."""
    rows = json.loads(on_cluster.cluster.nodes[via].ctl(
        "list_queues", "-p", on_cluster.vhost, "name", "type", "leader", "members", "--formatter", "json"))
    return {row["name"]: (row["leader"], len(row["members"])) for row in rows
            if row["type"] in ("quorum", "stream")}


def journal_entries(url: str, job_id: str) -> list[tuple[str, int]]:
    """Every entry of the job in its journal stream, as (type, attempt), in stream order: read
    from the first offset up to a probe appended now (what a brokerexec reader does)."""
    stream, probe_id = journal_stream(job_id), f"probe-{uuid.uuid4().hex}"
    probe = probe_message(stream, probe_id)
    entries: list[tuple[str, int]] = []
    seen_probe = False

    def read(channel: Any, method: Any, properties: pika.BasicProperties, body: bytes) -> None:
        nonlocal seen_probe
        channel.basic_ack(method.delivery_tag)
        if properties.message_id == probe_id:
            seen_probe = True
        elif properties.message_id == job_id and properties.type:
            entries.append((properties.type, int((properties.headers or {}).get(ATTEMPT_HEADER, 1))))

    with pika.BlockingConnection(pika.URLParameters(url)) as connection:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish(probe.exchange, probe.routing_key, probe.body, pika.BasicProperties(
            message_id=probe.message_id, type=probe.type), mandatory=True)
        channel.basic_qos(prefetch_count=100)
        channel.basic_consume(stream, read, arguments={"x-stream-offset": "first"})
        deadline = time.monotonic() + WAIT
        while not seen_probe:
            assert time.monotonic() < deadline, f"the probe never came back from {stream}"
            connection.process_data_events(time_limit=0.1)
    return entries


def progressed(watch: Any, jobs: list[Any], n: int) -> bool:
    return all(max((e.data.get("done", 0) for e in watch.events
                    if e.job_id == job.id and e.kind == "progress"), default=0) >= n for job in jobs)


def reconnected(worker: Any, ports: list[int]) -> bool:
    return any("connected to" in line and any(f":{port}/" in line for port in ports)
               for line in worker.lines)


def stood_down(worker: Any, job_id: str) -> bool:
    return any(f"job {job_id} stopped here" in line for line in worker.lines)
