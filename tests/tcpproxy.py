"""A small TCP proxy for fault tests: it stands in for toxiproxy (there is no tc/netem here).

One named daemon thread (``tcpproxy-<port>``) owns every socket and runs a ``selectors``
loop with bounded per-direction buffers, so a peer that stops reading slows only its own
connection. The public methods are called from test threads: each one hands its work to
the loop thread and waits until it is done, so that when ``reset()`` returns the RSTs have
been sent, and no thread ever closes a socket that another thread is still polling.

Faults it can inject, all on loopback only:

* :meth:`TcpProxy.blackhole` -- sockets stay open but no byte goes through, in either
  direction (what a pulled cable or a dropping firewall looks like to both ends); only
  heartbeats can tell.
* :meth:`TcpProxy.reset` -- every connection is aborted with a TCP RST on both sides.
* :meth:`TcpProxy.refuse` -- new connections are refused (the listening socket is closed,
  so ``connect()`` gets ECONNREFUSED, like a stopped broker); :meth:`TcpProxy.accept`
  listens again on the same port.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import queue
import selectors
import socket
import struct
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any
from urllib.parse import urlsplit, urlunsplit

__all__ = ["TcpProxy"]

log = logging.getLogger(__name__)

#: Bytes buffered per direction before the proxy stops reading from the sender.
BUFFER_LIMIT = 256 * 1024
#: How long a caller waits for the loop thread to carry out a command.
COMMAND_TIMEOUT = 10.0
_LINGER_RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST, not FIN


def _check_loopback(host: str) -> None:
    """Refuse anything that is not a loopback address: fault tests never leave the machine."""
    if host == "localhost":
        return
    if not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"TcpProxy only works on loopback addresses, not {host!r}")


def _abort(sock: socket.socket) -> None:
    """Close ``sock`` with a TCP RST instead of an orderly FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    sock.close()


class _Side:
    """One socket of a proxied connection and the bytes waiting to be written to it."""

    def __init__(self, sock: socket.socket | None) -> None:
        self.sock = sock
        self.outgoing = bytearray()
        self.eof = False  # the peer of this socket sent FIN: read no more from it
        self.shut = False  # we sent FIN on this socket
        self.events = 0  # what the selector watches for (0: not registered)


class _Connection:
    """A client socket, its upstream socket (none when black-holed from the start)."""

    def __init__(self, client: socket.socket, upstream: socket.socket | None, blackholed: bool) -> None:
        self.client = _Side(client)
        self.upstream = _Side(upstream)
        self.connecting = upstream is not None
        self.blackholed = blackholed
        self.closed = False

    def other(self, side: _Side) -> _Side:
        return self.upstream if side is self.client else self.client

    def sides(self) -> tuple[_Side, _Side]:
        return self.client, self.upstream


class TcpProxy:
    """A TCP proxy on ``listen_host`` (an OS-chosen port) to ``upstream``, with faults.

    Use as a context manager (``with TcpProxy() as proxy:``) or call :meth:`start` and
    :meth:`stop`. Connect clients to :meth:`url`.

    Parameters:
        upstream: where to forward, a loopback ``(host, port)``; the local broker by default.
        listen_host: the loopback address to listen on.
    """

    def __init__(self, upstream: tuple[str, int] = ("127.0.0.1", 5672),
                 listen_host: str = "127.0.0.1") -> None:
        _check_loopback(upstream[0])
        _check_loopback(listen_host)
        self.upstream = upstream
        self.listen_host = listen_host
        self._family = socket.AF_INET6 if ":" in listen_host else socket.AF_INET
        self._listener: socket.socket | None = socket.create_server((listen_host, 0), family=self._family)
        self.port: int = self._listener.getsockname()[1]
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._commands: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
        self._connections: list[_Connection] = []
        self._blackholed = False
        self._running = False
        self._thread = threading.Thread(target=self._loop, name=f"tcpproxy-{self.port}", daemon=True)

    # --- public face: each call runs on the loop thread -------------------------------------

    def start(self) -> TcpProxy:
        """Start forwarding; returns ``self``."""
        assert self._listener is not None
        self._listener.setblocking(False)
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        self._wake_r.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._running = True
        self._thread.start()
        return self

    def stop(self) -> None:
        """Abort every connection (RST), close the listener and join the loop thread."""
        if self._thread.is_alive():
            self._call(self._shutdown)
            self._thread.join(COMMAND_TIMEOUT)
            if self._thread.is_alive():
                raise RuntimeError(f"{self._thread.name} did not stop")
        else:
            self._shutdown()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def url(self, base_url: str) -> str:
        """``base_url`` with its host and port replaced by the proxy's.

        User, password (kept exactly as encoded), virtual host and query are unchanged.
        """
        parts = urlsplit(base_url)
        userinfo, at, _ = parts.netloc.rpartition("@")
        host = f"[{self.listen_host}]" if ":" in self.listen_host else self.listen_host
        return urlunsplit(parts._replace(netloc=f"{userinfo}{at}{host}:{self.port}"))

    @property
    def connections(self) -> int:
        """How many client connections are open right now (black-holed ones included)."""
        return int(self._call(lambda: sum(c.client.sock is not None for c in self._connections)))

    def blackhole(self) -> None:
        """Stop every byte, both ways, on current and new connections; keep sockets open.

        What arrives is read and dropped, so neither end sees a full window or an error; an
        end that closes its socket is not told to the other end either. Only heartbeats
        (or a TCP keepalive) can find out.
        """
        self._call(self._blackhole)

    def heal(self) -> None:
        """Forward new connections normally again; reset (RST) the black-holed ones.

        The ends of a black-holed connection have lost bytes, so it can never be resumed.
        """
        self._call(self._heal)

    def reset(self) -> None:
        """Abort every current connection with a TCP RST on both sides; returns once sent."""
        self._call(self._reset_all)

    def refuse(self) -> None:
        """Refuse new connections (ECONNREFUSED); current ones are untouched."""
        self._call(self._close_listener)

    def accept(self) -> None:
        """Listen again on the same port after :meth:`refuse`."""
        self._call(self._open_listener)

    def _call(self, command: Callable[[], Any]) -> Any:
        """Run ``command`` on the loop thread (or here, when no loop runs) and return its result."""
        if not self._thread.is_alive():
            return command()
        reply: Future[Any] = Future()
        self._commands.put((command, reply))
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")
        return reply.result(COMMAND_TIMEOUT)

    # --- commands, on the loop thread -------------------------------------------------------

    def _blackhole(self) -> None:
        self._blackholed = True
        for conn in self._connections:
            conn.blackholed = True
            for side in conn.sides():
                side.outgoing.clear()  # bytes in flight are lost with the link
            self._update(conn)

    def _heal(self) -> None:
        self._blackholed = False
        for conn in [c for c in self._connections if c.blackholed]:
            self._drop(conn, abort=True)

    def _reset_all(self) -> None:
        for conn in list(self._connections):
            self._drop(conn, abort=True)

    def _close_listener(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(KeyError):  # never registered: stop() without start()
                self._selector.unregister(self._listener)
            self._listener.close()
            self._listener = None

    def _open_listener(self) -> None:
        if self._listener is None:
            self._listener = socket.create_server((self.listen_host, self.port), family=self._family)
            self._listener.setblocking(False)
            self._selector.register(self._listener, selectors.EVENT_READ, None)

    def _shutdown(self) -> None:
        self._running = False
        self._reset_all()
        self._close_listener()

    # --- the loop ----------------------------------------------------------------------------

    def _loop(self) -> None:
        while self._running:
            for key, mask in self._selector.select():
                if key.fileobj is self._wake_r:
                    self._run_commands()
                elif key.fileobj is self._listener:
                    self._accept_one()
                else:
                    conn, side = key.data
                    try:
                        self._on_event(conn, side, mask)
                    except OSError as exc:  # e.g. ECONNRESET: pass the abort on, unless black-holed
                        log.debug("tcpproxy %s: %s", self.port, exc)
                        if conn.blackholed:
                            self._lose_side(conn, side, abort=True)
                        else:
                            self._drop(conn, abort=True)
                if not self._running:
                    break

    def _run_commands(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while self._wake_r.recv(4096):
                pass
        while True:
            try:
                command, reply = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                reply.set_result(command())
            except BaseException as exc:  # handed back to the calling thread
                reply.set_exception(exc)

    def _accept_one(self) -> None:
        assert self._listener is not None
        try:
            client, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        client.setblocking(False)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        upstream = None
        if not self._blackholed:  # a black hole never reaches the other end
            upstream = socket.socket(socket.AF_INET6 if ":" in self.upstream[0] else socket.AF_INET)
            upstream.setblocking(False)
            upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            upstream.connect_ex(self.upstream)  # completes (or fails) when writable
        conn = _Connection(client, upstream, self._blackholed)
        self._connections.append(conn)
        self._update(conn)

    def _on_event(self, conn: _Connection, side: _Side, mask: int) -> None:
        if side.sock is None:  # closed by an earlier event of this round
            return
        if conn.connecting and side is conn.upstream:
            error = side.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error:  # upstream refused: the client sees its connection reset
                raise OSError(error, f"upstream {self.upstream}: {os.strerror(error)}")
            conn.connecting = False
        if mask & selectors.EVENT_WRITE and side.outgoing:
            sent = side.sock.send(side.outgoing)
            del side.outgoing[:sent]
        if mask & selectors.EVENT_READ:
            self._read(conn, side)
        self._pass_on_eof(conn)
        self._update(conn)

    def _read(self, conn: _Connection, side: _Side) -> None:
        assert side.sock is not None
        try:
            data = side.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        other = conn.other(side)
        if data:
            if not conn.blackholed:
                other.outgoing += data
            return
        side.eof = True
        if conn.blackholed:
            self._lose_side(conn, side, abort=False)

    def _pass_on_eof(self, conn: _Connection) -> None:
        """Forward a FIN once the bytes before it are through; close when both ends are done."""
        if conn.blackholed or conn.client.sock is None:
            return
        for side in conn.sides():
            other = conn.other(side)
            if side.eof and not other.outgoing and not other.shut and other.sock is not None:
                with contextlib.suppress(OSError):
                    other.sock.shutdown(socket.SHUT_WR)
                other.shut = True
        if conn.client.eof and conn.upstream.eof:
            self._drop(conn, abort=False)

    def _events(self, conn: _Connection, side: _Side) -> int:
        events = 0
        if not side.eof and (conn.blackholed or len(conn.other(side).outgoing) < BUFFER_LIMIT):
            events |= selectors.EVENT_READ
        if side.outgoing or (conn.connecting and side is conn.upstream):
            events |= selectors.EVENT_WRITE
        return events

    def _update(self, conn: _Connection) -> None:
        """Re-arm both sockets: read while the buffer to the other end has room, write when due."""
        if conn.closed:
            return
        for side in conn.sides():
            if side.sock is None:
                continue
            events = self._events(conn, side)
            if events == side.events:
                continue
            # selectors reject an empty mask: a socket with nothing to do is unregistered
            # until the other side drains its buffer.
            if not side.events:
                self._selector.register(side.sock, events, (conn, side))
            elif not events:
                self._selector.unregister(side.sock)
            else:
                self._selector.modify(side.sock, events, (conn, side))
            side.events = events

    def _close_side(self, side: _Side, abort: bool) -> None:
        if side.sock is None:
            return
        if side.events:
            self._selector.unregister(side.sock)
            side.events = 0
        if abort:
            _abort(side.sock)
        else:
            side.sock.close()
        side.sock = None

    def _lose_side(self, conn: _Connection, side: _Side, abort: bool) -> None:
        """Inside a black hole one end goes away unseen: the other end must not learn of it."""
        self._close_side(side, abort)
        if conn.client.sock is None and conn.upstream.sock is None:
            self._drop(conn, abort)

    def _drop(self, conn: _Connection, abort: bool) -> None:
        for side in conn.sides():
            self._close_side(side, abort)
        if not conn.closed:
            conn.closed = True
            self._connections.remove(conn)
