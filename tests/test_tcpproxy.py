"""The fault-injection TCP proxy does what it says: raw sockets first, then pika to the broker."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pika
import pika.exceptions
import pytest
from brokerctl import wait_until
from tcpproxy import TcpProxy


class EchoServer:
    """A loopback upstream that echoes, and records how each of its connections ended."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()
        self.accepted = 0
        self.endings: list[str] = []  # "eof" (FIN) or "reset" (RST), one per ended connection
        self._threads: list[threading.Thread] = []
        self._accepting = threading.Thread(target=self._accept, name="echo-accept", daemon=True)
        self._accepting.start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            thread = threading.Thread(target=self._echo, args=(sock,), name="echo-conn", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _echo(self, sock: socket.socket) -> None:
        with sock:
            try:
                while data := sock.recv(65536):
                    sock.sendall(data)
                self.endings.append("eof")
            except ConnectionResetError:
                self.endings.append("reset")
            except OSError:
                self.endings.append("error")

    def close(self) -> None:
        self.listener.close()
        for thread in self._threads:
            thread.join(5)


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture
def proxy(echo: EchoServer) -> Iterator[TcpProxy]:
    with TcpProxy(echo.address) as running:
        yield running


def connect(proxy: TcpProxy) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), 5)
    sock.settimeout(5)
    return sock


def roundtrip(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    received = b""
    while len(received) < len(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        received += chunk
    return received


# --- raw sockets, no broker -----------------------------------------------------------------

def test_forwards_both_ways_including_a_megabyte(proxy: TcpProxy) -> None:
    with connect(proxy) as sock:
        assert roundtrip(sock, b"hello") == b"hello"
        big = bytes(range(256)) * 4096  # more than the proxy buffers per direction
        assert roundtrip(sock, big) == big
        assert proxy.connections == 1


def test_close_is_passed_on_as_a_fin(proxy: TcpProxy, echo: EchoServer) -> None:
    with connect(proxy) as sock:
        assert roundtrip(sock, b"x") == b"x"
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(10) == b""  # the echo server saw EOF and closed: FIN came back
    wait_until(lambda: proxy.connections == 0, 5, "the proxy to forget the connection")
    assert echo.endings == ["eof"]


def test_reset_aborts_both_sides_with_rst(proxy: TcpProxy, echo: EchoServer) -> None:
    with connect(proxy) as sock:
        assert roundtrip(sock, b"x") == b"x"
        proxy.reset()
        assert proxy.connections == 0  # reset() returns once done
        with pytest.raises(ConnectionResetError):
            sock.recv(10)
    wait_until(lambda: echo.endings == ["reset"], 5, "the upstream to see the RST")


def test_blackhole_stops_bytes_but_keeps_sockets_open(proxy: TcpProxy, echo: EchoServer) -> None:
    with connect(proxy) as old:
        assert roundtrip(old, b"x") == b"x"
        proxy.blackhole()
        old.sendall(b"lost")
        old.settimeout(0.5)
        with pytest.raises(TimeoutError):  # no answer, and no FIN or RST either
            old.recv(10)

        # A new connection is accepted but goes nowhere: the upstream never sees it.
        with connect(proxy) as new:
            new.sendall(b"lost too")
            new.settimeout(0.5)
            with pytest.raises(TimeoutError):
                new.recv(10)
            assert proxy.connections == 2
            assert echo.accepted == 1
            assert echo.endings == []  # the first upstream socket is still open

            proxy.heal()
            for sock in (old, new):  # black-holed connections are reset by heal()
                sock.settimeout(5)
                with pytest.raises(ConnectionResetError):
                    sock.recv(10)

    with connect(proxy) as healed:
        assert roundtrip(healed, b"again") == b"again"


def test_an_end_closing_inside_the_blackhole_is_not_told_to_the_other(
        proxy: TcpProxy, echo: EchoServer) -> None:
    with connect(proxy) as sock:
        assert roundtrip(sock, b"x") == b"x"
        proxy.blackhole()
        sock.close()
    wait_until(lambda: proxy.connections == 0, 5, "the client side to be closed")
    assert echo.endings == []  # the upstream still believes in the connection
    proxy.heal()
    wait_until(lambda: echo.endings == ["reset"], 5, "heal() to reset the upstream side")


def test_refuse_and_accept_again(proxy: TcpProxy) -> None:
    with connect(proxy) as kept:
        proxy.refuse()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", proxy.port), 2)
        assert roundtrip(kept, b"still") == b"still"  # current connections are untouched
        proxy.accept()
        with connect(proxy) as sock:
            assert roundtrip(sock, b"back") == b"back"


def test_upstream_refusing_resets_the_client() -> None:
    with socket.create_server(("127.0.0.1", 0)) as placeholder:
        closed_port = placeholder.getsockname()[1]
    # The RST may beat connect() itself (loopback is fast): either way the client sees it.
    with TcpProxy(("127.0.0.1", closed_port)) as proxy, pytest.raises(ConnectionResetError), \
            connect(proxy) as sock:
        sock.recv(10)


def test_stop_joins_its_thread_quickly(echo: EchoServer) -> None:
    proxy = TcpProxy(echo.address).start()
    sock = connect(proxy)
    assert roundtrip(sock, b"x") == b"x"
    assert any(t.name == f"tcpproxy-{proxy.port}" for t in threading.enumerate())
    started = time.monotonic()
    proxy.stop()
    assert time.monotonic() - started < 1
    assert not any(t.name.startswith("tcpproxy-") and t.is_alive() for t in threading.enumerate())
    with sock, pytest.raises(ConnectionResetError):
        sock.recv(10)


def test_url_swaps_only_host_and_port() -> None:
    proxy = TcpProxy()
    try:
        url = proxy.url("amqp://us%40er:p%2Fss@broker.example:5673/my%2Fvhost?heartbeat=2&x=1")
        assert url == f"amqp://us%40er:p%2Fss@127.0.0.1:{proxy.port}/my%2Fvhost?heartbeat=2&x=1"
        assert proxy.url("amqp://127.0.0.1/") == f"amqp://127.0.0.1:{proxy.port}/"
    finally:
        proxy.stop()


def test_only_loopback() -> None:
    with pytest.raises(ValueError, match="loopback"):
        TcpProxy(("192.0.2.1", 5672))
    with pytest.raises(ValueError, match="loopback"):
        TcpProxy(listen_host="0.0.0.0")


# --- pika through the proxy to the broker ---------------------------------------------------

def _check_connection_works(url: str, queue: str) -> None:
    with contextlib.closing(pika.BlockingConnection(pika.URLParameters(url))) as connection:
        channel = connection.channel()
        channel.queue_declare(queue, exclusive=True)
        channel.basic_publish("", queue, b"through the proxy")
        _, _, body = channel.basic_get(queue, auto_ack=True)
        assert body == b"through the proxy"


@pytest.mark.rabbitmq
def test_pika_works_through_the_proxy(amqp_url: str, unique_name: str) -> None:
    with TcpProxy() as proxy:
        _check_connection_works(proxy.url(amqp_url), unique_name)
        wait_until(lambda: proxy.connections == 0, 5, "the closed connection to leave the proxy")


@pytest.mark.rabbitmq
def test_pika_fails_promptly_after_reset(amqp_url: str, unique_name: str) -> None:
    with TcpProxy() as proxy:
        connection = pika.BlockingConnection(pika.URLParameters(proxy.url(amqp_url)))
        channel = connection.channel()
        channel.queue_declare(unique_name, exclusive=True)
        proxy.reset()
        started = time.monotonic()
        with pytest.raises(pika.exceptions.StreamLostError, match="reset"):
            channel.queue_declare(unique_name + "-2", exclusive=True)
        assert time.monotonic() - started < 2
        assert connection.is_closed


@pytest.mark.rabbitmq
def test_pika_heartbeat_finds_the_blackhole_then_heal_lets_new_connections_work(
        amqp_url: str, unique_name: str) -> None:
    with TcpProxy() as proxy:
        url = proxy.url(amqp_url)
        connection = pika.BlockingConnection(pika.URLParameters(f"{url}?heartbeat=2"))
        connection.channel().queue_declare(unique_name, exclusive=True)
        proxy.blackhole()
        # pika checks every heartbeat + 5 s whether bytes arrived: dead after 7-14 s.
        started = time.monotonic()
        with pytest.raises(pika.exceptions.AMQPHeartbeatTimeout):
            while time.monotonic() - started < 20:
                connection.process_data_events(time_limit=0.2)
        detected = time.monotonic() - started
        assert detected < 16, detected
        proxy.heal()
        _check_connection_works(url, unique_name + "-healed")
