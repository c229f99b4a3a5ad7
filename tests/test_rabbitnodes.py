"""The throw-away RabbitMQ nodes of ``rabbitnodes`` start, serve, fail over and vanish.

Each test starts its nodes, uses them and stops them before the next test (two cores);
the last test checks that the machine's default node ``rabbit@localhost`` was left alone.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import brokerctl
import pika
import pika.exceptions
import pytest
from rabbitnodes import (
    RabbitCluster,
    RabbitNode,
    RabbitNodeError,
    TlsFiles,
    make_tls_files,
    require_installed,
)

pytestmark = [pytest.mark.rabbitmq, pytest.mark.timeout(300)]
WAIT = 60.0
STARTED: list[RabbitNode] = []  # every node of this module, checked for leftovers at the end


@pytest.fixture(autouse=True, scope="module")  # module: before the class-scoped TLS node
def _rabbitmq_installed() -> None:
    """These tests start nodes of their own: they need RabbitMQ installed, not just a broker URL."""
    require_installed("start throw-away nodes")


def ps_lines(*words: str) -> list[str]:
    """Lines of ``ps -ww -eo pid,args`` (full command lines) that contain all ``words``."""
    out = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if all(word in line for word in words)]


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), 1.0):
            return True
    except OSError:
        return False


def assert_gone(node: RabbitNode) -> None:
    """No process, port or epmd of ``node`` is left."""
    assert not node.running
    assert not ps_lines("beam.smp", node.nodename), "a VM of the node, or a CLI aimed at it"
    assert not ps_lines(f"epmd -port {node.epmd_port} ")
    for port in (node.port, node.dist_port, node.tls_port, node.epmd_port):
        assert port is None or not port_open(port), f"port {port} of {node.nodename} still open"


def tls_parameters(node: RabbitNode, context: ssl.SSLContext | None,
                   server_hostname: str = "localhost") -> pika.ConnectionParameters:
    """Connection to the node's TLS port: over TLS with ``context``, plain AMQP without."""
    assert node.tls_port is not None
    return pika.ConnectionParameters(
        host="127.0.0.1", port=node.tls_port, credentials=pika.PlainCredentials("guest", "guest"),
        ssl_options=pika.SSLOptions(context, server_hostname) if context else None,
        connection_attempts=1, socket_timeout=10, stack_timeout=30, blocked_connection_timeout=30)


def test_plain_node_answers_amqp_and_leaves_nothing_behind(tmp_path: Path) -> None:
    node = RabbitNode(tmp_path)
    STARTED.append(node)
    with node:
        assert len(ps_lines("beam.smp", node.nodename)) == 1, "the VM shows in ps: the check after stop works"
        status = json.loads(node.ctl("status", "--formatter", "json"))
        # Its own files, no plugins, listening on loopback only: nothing of the default node.
        assert status["active_plugins"] == []
        assert status["config_files"] == [str(node.base / "rabbitmq.conf")]
        assert status["data_directory"] == str(node.base / "mnesia" / node.nodename)
        assert status["enabled_plugin_file"] == str(node.base / "enabled_plugins")
        listeners = {(x["protocol"], x["interface"], x["port"]) for x in status["listeners"]}
        assert listeners == {("amqp", "127.0.0.1", node.port), ("clustering", "127.0.0.1", node.dist_port)}
        with pika.BlockingConnection(pika.URLParameters(node.url)) as connection:
            channel = connection.channel()
            queue = channel.queue_declare("", exclusive=True).method.queue
            channel.basic_publish("", queue, b"hello")
            brokerctl.wait_until(lambda: channel.basic_get(queue, auto_ack=True)[2] == b"hello",
                                 WAIT, "the message back")
    assert_gone(node)
    node.stop()  # idempotent


def test_failed_start_raises_with_the_log_and_leaves_nothing_behind(tmp_path: Path) -> None:
    node = RabbitNode(tmp_path)
    STARTED.append(node)
    with socket.socket() as squatter:  # takes the node's AMQP port: the boot must fail
        squatter.bind(("127.0.0.1", node.port))
        squatter.listen()
        with pytest.raises(RabbitNodeError, match=r"exited while starting(.|\n)*could_not_start_listener"):
            node.start()
    assert_gone(node)


class Tls(NamedTuple):
    node: RabbitNode
    files: TlsFiles
    other: TlsFiles  # a second CA, its server and client certs: trusted by nobody


@pytest.fixture(scope="class")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tls]:
    """One TLS node for the class (one boot, not five), stopped when the class is done."""
    root = tmp_path_factory.mktemp("tls")
    files, other = make_tls_files(root / "ca"), make_tls_files(root / "other-ca")
    node = RabbitNode(root, tls=files, fail_if_no_peer_cert=True)
    STARTED.append(node)
    with node:
        yield Tls(node, files, other)
    assert_gone(node)


def server_alerts(node: RabbitNode, alert: str) -> int:
    """How often the node's log says it refused a TLS handshake with ``alert``."""
    log = (node.base / "log" / f"{node.nodename}.log").read_text(errors="replace")
    return log.count(f"generated SERVER ALERT: Fatal - {alert}")


def connection_row(node: RabbitNode, name: str) -> dict[str, Any]:
    """The ``list_connections`` row of the client connection called ``name``."""
    rows = json.loads(node.ctl("list_connections", "ssl", "peer_cert_subject", "client_properties",
                               "--formatter", "json"))
    return next(r for r in rows if ["connection_name", "longstr", name] in r.pop("client_properties"))


class TestTlsNode:
    @pytest.mark.parametrize("server_hostname", ["localhost", "127.0.0.1"])
    def test_accepts_amqps_with_our_ca_and_client_cert(self, tls: Tls, server_hostname: str) -> None:
        context = tls.files.client_context()
        assert context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED
        parameters = tls_parameters(tls.node, context, server_hostname)
        name = f"tls-{uuid.uuid4().hex[:8]}"
        parameters.client_properties = {"connection_name": name}
        with pika.BlockingConnection(parameters) as connection:
            assert connection.channel().queue_declare("", exclusive=True).method.queue
            row = connection_row(tls.node, name)
        assert row == {"ssl": True, "peer_cert_subject": "CN=brokerexec-test-client"}

    def test_refuses_plain_amqp_on_the_tls_port(self, tls: Tls) -> None:
        # Connected, then reset by the TLS listener (a closed port would be another error).
        with pytest.raises(pika.exceptions.IncompatibleProtocolError, match="reset by peer"):
            pika.BlockingConnection(tls_parameters(tls.node, None))
        assert brokerctl.amqp_answers(("127.0.0.1", tls.node.port)), "the plain port still serves"

    def test_client_refuses_a_server_cert_from_another_ca(self, tls: Tls) -> None:
        context = tls.files.client_context(ca=tls.other.ca_cert)
        # The node sends its chain up to our CA: a self-signed root the client does not trust.
        with pytest.raises(ssl.SSLCertVerificationError, match=r"verify failed: (self-signed|unable to get)"):
            pika.BlockingConnection(tls_parameters(tls.node, context))

    def test_client_refuses_a_wrong_hostname(self, tls: Tls) -> None:
        context = tls.files.client_context()
        with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
            pika.BlockingConnection(tls_parameters(tls.node, context, "example.com"))

    @pytest.mark.parametrize(("client_cert", "alert"), [(None, "Certificate required"),
                                                        ("other", "Unknown CA")])
    def test_node_refuses_a_client_without_our_client_cert(self, tls: Tls, client_cert: str | None,
                                                           alert: str) -> None:
        context = tls.files.client_context(client_cert=False)
        if client_cert == "other":
            context.load_cert_chain(tls.other.client_cert, tls.other.client_key)
        before = server_alerts(tls.node, alert)
        # With TLS 1.3 the client learns of the refusal only once the AMQP handshake reads:
        # the alert, or a bare EOF when the node closes first, hence the node's log below.
        with pytest.raises(pika.exceptions.IncompatibleProtocolError):
            pika.BlockingConnection(tls_parameters(tls.node, context))
        brokerctl.wait_until(lambda: server_alerts(tls.node, alert) > before, WAIT, f"the node's {alert!r}")


def quorum_queue(node: RabbitNode, queue: str) -> dict[str, Any]:
    rows = json.loads(node.ctl("list_queues", "name", "type", "leader", "members", "--formatter", "json"))
    return next(row for row in rows if row["name"] == queue)


def test_cluster_of_three_keeps_a_quorum_queue_through_a_node_stop(tmp_path: Path) -> None:
    cluster = RabbitCluster(tmp_path, n=3)
    STARTED.extend(cluster.nodes)
    names = sorted(node.nodename for node in cluster.nodes)
    queue, body = f"bx-{uuid.uuid4().hex[:8]}", uuid.uuid4().bytes
    with cluster:
        assert sorted(cluster.running_nodes(via=0)) == names
        assert sorted(cluster.running_nodes(via=2)) == names
        with pika.BlockingConnection(pika.URLParameters(cluster.nodes[0].url)) as connection:
            channel = connection.channel()
            channel.confirm_delivery()  # quorum queue: confirmed once a majority has it
            channel.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
            channel.basic_publish("", queue, body, pika.BasicProperties(delivery_mode=2), mandatory=True)
        info = quorum_queue(cluster.nodes[2], queue)
        assert info["type"] == "quorum" and sorted(info["members"]) == names

        # Stop the leader, the hardest case: the other two must elect a new one.
        down = next(i for i, node in enumerate(cluster.nodes) if node.nodename == info["leader"])
        other = (down + 1) % 3
        reader = cluster.nodes[other]
        cluster.stop_node(down)
        assert not cluster.nodes[down].running and not port_open(cluster.nodes[down].port)
        assert sorted(cluster.running_nodes(via=other)) == [name for name in names if name != info["leader"]]
        got: list[bytes] = []

        def read_through_another_node() -> bool:
            try:
                with pika.BlockingConnection(pika.URLParameters(reader.url)) as connection:
                    _, _, message = connection.channel().basic_get(queue, auto_ack=True)
            except pika.exceptions.AMQPError:
                return False  # no leader yet: the channel is closed on us
            if message is not None:
                got.append(message)
            return bool(got)

        brokerctl.wait_until(read_through_another_node, WAIT, "the message through another node")
        assert got == [body]
        assert quorum_queue(reader, queue)["leader"] not in (info["leader"], "")

        cluster.start_node(down)
        brokerctl.wait_until(lambda: sorted(cluster.running_nodes(via=down)) == names, WAIT, "all 3 again")
    for node in cluster.nodes:
        assert_gone(node)


def test_default_node_untouched() -> None:
    """Last: the shared node runs with its settings, and no node of this module is left."""
    assert brokerctl.rabbitmqctl("eval", "application:get_env(rabbit, consumer_timeout).") == "{ok,1800000}"
    with pika.BlockingConnection(pika.URLParameters("amqp://guest:guest@127.0.0.1:5672/")) as connection:
        assert connection.channel().is_open
    for node in STARTED:
        assert_gone(node)
