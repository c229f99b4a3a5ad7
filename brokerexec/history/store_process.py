"""The indexer's store half in a process of its own: one core decodes, folds and commits
while the other reads the journal.

Reading the journal costs pika about 60 µs of CPU an entry and storing it about as much
again (``docs/performance.md``); in one process the two take turns under the GIL and the
indexer ingests no more than about 5,000 entries a second. Here the tail hands each batch
over a pipe (:func:`encode_batch`: a JSON header and the bodies as they came, never pickle)
to a child process that runs :class:`~.ingest.Ingest`, and acknowledges the batch to the
broker only when the child says it committed (:meth:`StoreProcess.submit` returns a future).

The child takes batches in the order given. Once it failed one (the store down, full or
restarting), it refuses every batch after it until :meth:`StoreProcess.reset`: the tail then
reads again from the offsets the store holds, so no batch after a failed one is stored
before it. A child that dies is started again at the next reset; one whose parent dies sees
its pipe close and exits. SIGTERM and SIGINT are the parent's to handle: the child finishes
the batches it was handed, then stops when the parent says so.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import json
import logging
import multiprocessing
import signal
import struct
import threading
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

from sqlalchemy import exc as sa_exc

from ..logs import configure_logging, configured_format
from ..transport.pika.journal_tail import TailEntry, TryAgain
from .ingest import DEFAULT_KEEP, IndexerStats, Ingest
from .store import HistoryStore

__all__ = ["StoreProcess", "decode_batch", "encode_batch"]

log = logging.getLogger(__name__)

_LENGTH = struct.Struct("!I")
#: How long closing waits for the child to finish the batches in hand (seconds).
CLOSE_TIMEOUT = 30.0
#: With no batch for this long (seconds), the journal is read up to its end: the child lets
#: the text-search index take rows until a batch comes.
IDLE = 0.05


def encode_batch(batch: Sequence[TailEntry], reached: dict[str, int]) -> bytes:
    """A batch as one message of the pipe: the length of a JSON header (each entry's stream,
    offset, type, id, content type and body length; the offsets reached), the header, then
    the bodies one after another, as they came."""
    header = json.dumps({"reached": reached, "entries": [
        [entry.stream, entry.offset, entry.kind, entry.message_id, entry.content_type, len(entry.body)]
        for entry in batch]}, separators=(",", ":")).encode()
    return b"".join([_LENGTH.pack(len(header)), header, *(entry.body for entry in batch)])


def decode_batch(message: bytes) -> tuple[list[TailEntry], dict[str, int]]:
    """The batch and offsets :func:`encode_batch` put in ``message``."""
    (size,) = _LENGTH.unpack_from(message)
    header = json.loads(message[_LENGTH.size:_LENGTH.size + size])
    at = _LENGTH.size + size
    batch = []
    view = memoryview(message)
    for stream, offset, kind, message_id, content_type, length in header["entries"]:
        batch.append(TailEntry(stream, offset, kind, message_id, content_type, bytes(view[at:at + length])))
        at += length
    return batch, {str(stream): int(offset) for stream, offset in header["reached"].items()}


class StoreProcess:
    """See the module docstring.

    Parameters:
        url: the history store (its URL as :class:`~.store.HistoryStore` takes it).
        keep: seconds a job's row is kept after it ended.
        batch: the most entries the tail hands over at once (a smaller batch: it read the
            journal to its end, and the text-search index may take its turn).
        stats: where what the child did is added up, as each batch is settled.
    """

    def __init__(self, url: str, keep: float = DEFAULT_KEEP, batch: int = 1000,
                 stats: IndexerStats | None = None) -> None:
        self.url, self.keep, self.batch = url, keep, batch
        self.stats = stats if stats is not None else IndexerStats()
        self._context = multiprocessing.get_context("spawn")  # the parent has threads: no fork
        self._lock = threading.Lock()
        self._waiting: dict[int, cf.Future[None]] = {}
        self._next = 0
        self._pipe: Connection | None = None
        self._process: Any = None
        self._reader: threading.Thread | None = None

    def start(self) -> None:
        ours, theirs = self._context.Pipe()
        level = logging.getLogger().getEffectiveLevel()
        self._process = self._context.Process(
            target=_serve, args=(theirs, self.url, self.keep, self.batch, level, configured_format()),
            name="brokerexec-history-store", daemon=True)
        self._process.start()
        theirs.close()
        self._pipe = ours
        self._reader = threading.Thread(target=self._read, args=(ours,), daemon=True,
                                        name="brokerexec-history-store-replies")
        self._reader.start()

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.is_alive()

    def submit(self, batch: Sequence[TailEntry], reached: dict[str, int]) -> cf.Future[None]:
        """Hand a batch to the child; the future is done once it is committed, or raises
        :class:`TryAgain` (the store refused it, or an earlier one: read again) or the
        child's error."""
        future: cf.Future[None] = cf.Future()
        with self._lock:
            number, self._next = self._next, self._next + 1
            self._waiting[number] = future
            pipe = self._pipe
        try:
            if pipe is None:
                raise OSError("not started")
            pipe.send_bytes(b"B" + _LENGTH.pack(number) + encode_batch(batch, reached))
        except (OSError, ValueError) as exc:
            self._settle(number, TryAgain(f"the history store process is gone: {exc}"))
        return future

    def reset(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Once every batch handed over is settled, have the child take batches again (after
        a refusal), or start a new child (after it died)."""
        with self._lock:
            waiting = list(self._waiting.values())
        cf.wait(waiting, timeout)
        if not self.alive:
            if self._process is not None:
                log.warning("the history store process ended (exit code %s); starting it again",
                            self._process.exitcode)
            self._close_pipe()
            self.start()
            return
        done: cf.Future[None] = cf.Future()
        with self._lock:
            number, self._next = self._next, self._next + 1
            self._waiting[number] = done
        assert self._pipe is not None
        self._pipe.send_bytes(b"R" + _LENGTH.pack(number))
        done.result(timeout)

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Let the child finish what it was handed, then stop it."""
        with self._lock:
            waiting = list(self._waiting.values())
        cf.wait(waiting, timeout)
        if self._pipe is not None:
            # Said, not by closing the pipe: a close does not end the reply thread's read of
            # it, so the child would never see its end.
            with contextlib.suppress(OSError, ValueError):
                self._pipe.send_bytes(b"S" + _LENGTH.pack(0))
        if self._process is not None:
            self._process.join(timeout)
            if self._process.is_alive():
                self._process.kill()
                self._process.join(5)
        if self._reader is not None:
            self._reader.join(5)  # the child gone, its read ends
        self._close_pipe()

    def _close_pipe(self) -> None:
        if self._pipe is not None:
            with contextlib.suppress(OSError):
                self._pipe.close()
            self._pipe = None

    def _read(self, pipe: Connection) -> None:
        """Settle each batch as the child answers for it; all that wait, when it is gone."""
        while True:
            try:
                reply = json.loads(pipe.recv_bytes())
            except (EOFError, OSError):
                break
            self.stats.add(IndexerStats.decode(reply.get("stats") or {}))
            error = reply.get("error")
            if error is None:
                outcome: BaseException | None = None
            elif reply.get("again"):
                outcome = TryAgain(error)
            else:
                outcome = RuntimeError(f"the history store process failed: {error}")
            self._settle(int(reply["number"]), outcome)
        with self._lock:
            gone = list(self._waiting)
        for number in gone:
            self._settle(number, TryAgain("the history store process is gone"))

    def _settle(self, number: int, outcome: BaseException | None) -> None:
        with self._lock:
            future = self._waiting.pop(number, None)
        if future is None or future.done():
            return
        if outcome is None:
            future.set_result(None)
        else:
            future.set_exception(outcome)


def _serve(pipe: Connection, url: str, keep: float, batch: int, level: int, fmt: str) -> None:
    """The child: take batches until the pipe closes (:class:`StoreProcess`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops it, once its batches are in
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    configure_logging(level, fmt)
    refusing: str | None = None  # why, after a batch failed: none is stored until a reset
    with HistoryStore(url) as store:
        # The search index takes rows while no batch waits (_search_while_idle), never
        # between a batch and the next: at 1,000 jobs a second on PostgreSQL, indexing after
        # every batch held the next ones up, seconds behind the journal.
        ingest = Ingest(store, keep, batch, search_when_idle=True)
        behind = True  # rows the search index may not have: until it says it has them all
        ingest.prune()  # at the start, as hourly after
        _report(pipe, ingest, {"number": -1})  # what it pruned, with no batch
        while True:
            try:
                if behind and refusing is None and not pipe.poll(IDLE):
                    behind = not _search_while_idle(pipe, ingest)
                message = pipe.recv_bytes()
            except (EOFError, OSError):
                return
            kind, (number,) = message[:1], _LENGTH.unpack_from(message, 1)
            reply: dict[str, Any] = {"number": number}
            if kind == b"S":
                return
            if kind == b"R":
                refusing = None
            elif refusing is not None:
                reply.update(error=f"not stored after an earlier batch failed: {refusing}", again=True)
            else:
                behind = True  # rows changed (or, if it fails, will be read again)
                try:
                    ingest.take(*decode_batch(message[1 + _LENGTH.size:]))
                except sa_exc.OperationalError as exc:  # down, full, restarting: read again
                    ingest.stats.store_errors += 1
                    refusing = f"the history store refused a batch: {exc.orig}"
                    reply.update(error=refusing, again=True)
                except Exception as exc:  # said to the parent, which raises it
                    log.exception("the history store process failed on a batch")
                    refusing = f"{type(exc).__name__}: {exc}"
                    reply.update(error=refusing, again=False)
            _report(pipe, ingest, reply)


def _search_while_idle(pipe: Connection, ingest: Ingest) -> bool:
    """Let the text-search index take rows, a chunk at a time, until it has them all or a
    batch comes; what it took is said with no batch (-1). Whether it has them all: then an
    idle child waits for the next batch without asking again (no write transaction every
    50 ms for nothing). A store that refuses: tried again at the next idle moment."""
    taken, caught_up = 0, False
    try:
        while not pipe.poll(0):
            if not ingest.search():
                caught_up = True
                break
            taken += 1
    except sa_exc.OperationalError as exc:
        log.warning("the text-search index cannot take rows now: %s", exc.orig)
        pipe.poll(1.0)  # not at once again
    if taken:
        _report(pipe, ingest, {"number": -1})
    return caught_up


def _report(pipe: Connection, ingest: Ingest, reply: dict[str, Any]) -> None:
    """Send ``reply`` with what the child did since its last (-1: no batch's)."""
    pipe.send_bytes(json.dumps({**reply, "stats": ingest.stats.encode()}).encode())
    ingest.stats = IndexerStats()
