"""Clustered brokers: several broker addresses, quorum launch queues, a node lost mid-run.

The address parsing runs without a broker; the queue-type choice and the failover among
addresses run on the default broker in the session's vhost; the node loss runs on a 3-node
cluster of :mod:`rabbitnodes` that the test starts and always stops.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import brokerctl
import pika
import pytest
from conftest import ROOT, SAMPLES
from rabbitnodes import free_ports

from brokerexec import BrokerConnectionError, Client, ConfigurationError
from brokerexec.cli.app import EXIT_USAGE
from brokerexec.protocol import topology
from brokerexec.protocol.names import launch_queue
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


@pytest.fixture
def own_vhost(amqp_url: str) -> Iterator[str]:
    """The URL of a vhost of this test's own, deleted after it: queue types are per vhost,
    and other tests declare classic queues in the session's."""
    vhost = f"brokerexec-test-clusters-{uuid.uuid4().hex[:8]}"
    brokerctl.rabbitmqctl("add_vhost", vhost)
    try:
        brokerctl.rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        yield urlparse(amqp_url)._replace(path=f"/{vhost}").geturl()
    finally:
        brokerctl.rabbitmqctl("delete_vhost", vhost)


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


def cluster_url(ports: list[int]) -> str:
    return "amqp://guest:guest@" + ",".join(f"127.0.0.1:{port}" for port in ports) + "/"


@pytest.mark.rabbitmq
@pytest.mark.cluster
@pytest.mark.timeout(600)
def test_jobs_on_a_cluster_finish_when_the_node_hosting_them_stops(
        tmp_path: Path, worker_process: Callable[..., Any]) -> None:
    from rabbitnodes import RabbitCluster, require_installed
    from test_faults import Watch, launch

    require_installed("start a 3-node cluster")
    cluster = RabbitCluster(tmp_path, n=3)
    ports = [node.port for node in cluster.nodes]
    with cluster:
        # Given two workers and a client on the cluster, all on node 0 (listed first), the
        # workers with quorum launch queues
        url = cluster_url(ports)
        workers = [worker_process(*FAST, "--queue-type", "quorum", "--concurrency", "3", url=url,
                                  services=("Steps",)) for _ in range(2)]
        with Client(url, heartbeat=2, timeout=10) as client:
            # And six checkpointing jobs running on them
            watch = Watch()
            jobs = [launch(client, watch, "steps", {"steps": 300, "delay": 0.02},
                           checkpoint_delta=0.2, progress_delta=0.1) for _ in range(6)]
            before = replicated(cluster, 1)
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
            after = replicated(cluster, 1)
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


def replicated(cluster: Any, via: int) -> dict[str, tuple[str, int]]:
    """Leader and member count of each quorum queue and stream, asked of member ``via``."""
    rows = json.loads(cluster.nodes[via].ctl("list_queues", "name", "type", "leader", "members",
                                             "--formatter", "json"))
    return {row["name"]: (row["leader"], len(row["members"])) for row in rows
            if row["type"] in ("quorum", "stream")}


def progressed(watch: Any, jobs: list[Any], n: int) -> bool:
    return all(max((e.data.get("done", 0) for e in watch.events
                    if e.job_id == job.id and e.kind == "progress"), default=0) >= n for job in jobs)


def reconnected(worker: Any, ports: list[int]) -> bool:
    return any("connected to" in line and any(f":{port}/" in line for port in ports)
               for line in worker.lines)
