"""The back-channel between a worker and the child process that runs one computation.

One Unix socket pair per child (Qube's child back end: a dispatcher in the parent, an
executor in the child). Each message is a 4-byte big-endian length and a JSON object
``{"kind": ..., ...}``; what crosses is JSON-able by design (a posted signal's payload is
checked and JSON-able already, and so is everything the computation emits)::

    worker (parent: ChildComputation)               child (brokerexec.child.main)
    ─────────────────────────────────               ─────────────────────────────
    START      job, service spec, request, ───►     load the class, make the service,
               resume + state, reapply,             restore it when resuming, run
               intervals, pool, limits,
               sys.path, changes carried
    POST       id, intent, payload         ───►     Crossing.post: applied at ready()
    REQUEST    what (a Requested)          ───►     Crossing.request_<what>
    INTERVALS  the handler's deltas        ───►     set, Crossing.request_reschedule
    STORED     id, error?                  ───►     a STORE's checkpoint is stored (or not)
               ◄───  STORE        id, state, settable, covers: store this checkpoint
                                  durably (the worker's store); or id, changes: make the
                                  changes applied since it durable (the worker's note)
               ◄───  EMIT         event (state | progress | improved | checkpoint), data
               ◄───  SETTLED      id, value or error: a POST applied (or refused, or failed)
               ◄───  OUTCOME      state, result, error, start, end, and its last progress
                                  and improved state (if any): the computation ended
               ◄───  NOT_STARTED  error: the service could not be loaded or made

The child's end of a job is its OUTCOME; a child that dies without one is reported by the
parent from its exit status (:mod:`brokerexec.child.computation`).
"""

from __future__ import annotations

import enum
import json
import logging
import queue
import socket
import struct
import threading
from dataclasses import dataclass
from typing import Any

from .. import codec
from ..errors import DecodeError

__all__ = ["Channel", "Decoder", "Message", "QueuedSender", "Requested", "ToChild", "ToParent",
           "read_rest", "read_some"]

log = logging.getLogger(__name__)

_HEADER = struct.Struct(">I")
#: A frame longer than this is garbage, not a message (both ends are brokerexec).
MAX_FRAME = 1 << 30


class ToChild(str, enum.Enum):
    """What the worker sends its child."""

    START = "start"
    POST = "post"
    REQUEST = "request"
    INTERVALS = "intervals"
    STORED = "stored"


class ToParent(str, enum.Enum):
    """What the child sends its worker."""

    EMIT = "emit"
    STORE = "store"
    SETTLED = "settled"
    OUTCOME = "outcome"
    NOT_STARTED = "not_started"


class Requested(str, enum.Enum):
    """A flag the worker raises on the child's crossing, one ``REQUEST`` each.

    Each is one ``Crossing.request_<value>`` method in the child: a new flag (a graceful
    handover, say) is one more entry here and one more method there.
    """

    PAUSE = "pause"
    RESUME = "resume"
    ABORT = "abort"
    HANDOVER = "handover"


@dataclass(frozen=True)
class Message:
    """One message of the back-channel: its kind and its body."""

    kind: str
    body: dict[str, Any]

    def encode(self) -> bytes:
        """The frame: length, then the JSON object.

        Raises:
            ValueError: the body is not JSON-able.
        """
        if "kind" in self.body:
            raise ValueError("a back-channel body cannot have a key 'kind'")
        data = codec.encode({**self.body, "kind": self.kind})
        return _HEADER.pack(len(data)) + data

    @classmethod
    def decode(cls, data: bytes) -> Message:
        """Read one frame's JSON object.

        Raises:
            DecodeError: not a JSON object with a string ``kind``.
        """
        try:
            body = json.loads(data)
        except ValueError as exc:
            raise DecodeError(f"back-channel frame is not JSON: {exc}") from exc
        if not isinstance(body, dict) or not isinstance(body.get("kind"), str):
            raise DecodeError("back-channel frame must be an object with a string 'kind'")
        return cls(body.pop("kind"), body)


class Decoder:
    """Cuts a byte stream into messages, however the bytes arrive."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Message]:
        """Add ``data``; return the messages now complete, in order."""
        buffer = self._buffer
        buffer += data
        messages = []
        while len(buffer) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(buffer)
            if size > MAX_FRAME:
                raise DecodeError(f"back-channel frame of {size} bytes")
            end = _HEADER.size + size
            if len(buffer) < end:
                break
            messages.append(Message.decode(bytes(buffer[_HEADER.size:end])))
            del buffer[:end]
        return messages


class Channel:
    """One end of the back-channel, blocking: the child's (it may wait for its worker)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._send_lock = threading.Lock()
        self._decoder = Decoder()
        self._received: list[Message] = []

    def send(self, kind: str, body: dict[str, Any]) -> None:
        """Send one message (from any thread).

        Raises:
            ValueError: the body is not JSON-able (nothing was sent).
            OSError: the other end is gone.
        """
        frame = Message(kind, body).encode()
        with self._send_lock:
            self.sock.sendall(frame)

    def receive(self) -> Message | None:
        """The next message; None once the other end has closed (from one thread only)."""
        while not self._received:
            data = read_some(self.sock)
            if not data:
                return None
            self._received.extend(self._decoder.feed(data))
        return self._received.pop(0)


class QueuedSender:
    """The worker's sending end: ``send`` never blocks its caller (the handler thread).

    Frames are encoded on the caller's thread, so a body that is not JSON-able fails there,
    and written by a thread of their own: a child that holds its GIL in a C call reads
    nothing meanwhile, and a full socket buffer must stall only this thread.
    """

    def __init__(self, sock: socket.socket, name: str) -> None:
        self._sock = sock
        self._frames: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._write, name=f"brokerexec-to-child-{name}",
                                        daemon=True)
        self._thread.start()

    def send(self, kind: str, body: dict[str, Any]) -> None:
        """Queue one message for the child.

        Raises:
            ValueError: the body is not JSON-able.
        """
        self.put(Message(kind, body).encode())

    def put(self, frame: bytes) -> None:
        """Queue one encoded message (:meth:`Message.encode`)."""
        self._frames.put(frame)

    def close(self) -> None:
        """Write what is queued, then stop (the socket stays open)."""
        self._frames.put(None)

    def _write(self) -> None:
        while (frame := self._frames.get()) is not None:
            try:
                self._sock.sendall(frame)
            except OSError as exc:  # the child is gone: its reader reports how it ended
                log.debug("back-channel write failed: %r", exc)
                return


def read_some(sock: socket.socket) -> bytes:
    """What the other end has written, once the socket is readable; b"" at its end."""
    try:
        return sock.recv(1 << 16)
    except ConnectionResetError:
        return b""


def read_rest(sock: socket.socket) -> bytes:
    """Everything readable now, without waiting: what a child wrote before it exited
    (a grandchild that inherited its end may keep the socket from ever ending)."""
    sock.setblocking(False)
    chunks = []
    while data := _read_now(sock):
        chunks.append(data)
    return b"".join(chunks)


def _read_now(sock: socket.socket) -> bytes:
    try:
        return sock.recv(1 << 16)
    except (BlockingIOError, ConnectionResetError):
        return b""
