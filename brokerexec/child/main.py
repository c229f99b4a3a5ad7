"""The child process of one computation: a real handler and computation, driven by its worker.

:class:`~brokerexec.child.runner.ProcessRunner` starts it as
``python -c <bootstrap> PACKAGE_DIR FD WORKER_PID``; its back-channel is the socket ``FD``
(:mod:`brokerexec.child.back_channel`). Inside, everything is thread mode: a
:class:`~brokerexec.core.service_handler.ServiceHandler` runs the service in a computation thread, and
``ready()`` is the same closure (one flag test, one clock read). The main thread stands in
for the handler thread, with nothing to check (the worker checked every signal already)::

    main thread (reads the worker's messages)        computation thread
    ─────────────────────────────────────────        ───────────────────────────────────
    POST      → Crossing.post ─────────────────────► applied at ready() → SETTLED, by id
    REQUEST   → Crossing.request_pause/resume/abort  obeyed at ready()
    INTERVALS → set them, Crossing.request_reschedule
    end of the back-channel: the worker is gone,     emits → EMIT; the outcome → OUTCOME,
    so the child exits at once                       then the child exits

The child asks the kernel first thing to SIGKILL it when the worker's spawning thread ends
(``PR_SET_PDEATHSIG``, Linux), and checks that its worker is still its parent.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import ctypes
import itertools
import logging
import os
import signal
import socket
import sys
import traceback
from collections.abc import Callable
from typing import Any, ClassVar, NoReturn

from ..core.crossing import Crossing, Posted
from ..core.intervals import HANDLER_SETTABLE
from ..core.map_pool import WorkerPool
from ..core.registry import load_service
from ..core.service import Service
from ..core.service_handler import ServiceHandler
from ..errors import CheckpointFailed, ConfigurationError, InvalidState, error_to_wire
from ..logs import configure_logging
from ..protocol.intents import Intent
from .back_channel import Channel, Requested, ToChild, ToParent

__all__ = ["ChildSide", "main"]

log = logging.getLogger(__name__)

#: The exit status of a child whose worker is gone.
EXIT_WORKER_GONE = 70
_PR_SET_PDEATHSIG = 1
LOG_FORMAT = ("%(asctime)s %(levelname)s [child %(process)d %(threadName)s] %(name)s%(context)s: "
              "%(message)s")


def main(argv: list[str]) -> None:
    """The child's entry point: ``argv`` is ``[FD, WORKER_PID]``."""
    fd, worker = int(argv[0]), int(argv[1])
    _die_with_worker(worker)
    channel = Channel(socket.socket(fileno=fd))
    start = channel.receive()
    if start is None or start.kind != ToChild.START.value:
        os._exit(EXIT_WORKER_GONE)
    ChildSide(channel, start.body).serve()


def _die_with_worker(worker: int) -> None:
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            os.write(2, b"brokerexec child: prctl(PR_SET_PDEATHSIG) failed\n")
    if os.getppid() != worker:  # the worker died before the request took effect
        os._exit(EXIT_WORKER_GONE)


def _limit_memory(limit: int) -> None:
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    value = limit if hard == resource.RLIM_INFINITY else min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (value, value))


class ChildSide:
    """The child's half of the back-channel; see the module docstring.

    Parameters:
        channel: the back-channel to the worker.
        start: the body of the worker's ``START`` message.
    """

    def __init__(self, channel: Channel, start: dict[str, Any]) -> None:
        self.channel = channel
        self.start = start
        self.job: str = start["job"]
        self.memory_limit: int | None = start.get("memory_limit")
        self.handler: ServiceHandler | None = None
        self.crossing = Crossing()  # the handler's, once there is one
        self._stores: dict[int, cf.Future[None]] = {}
        self._store_ids = itertools.count()

    def serve(self) -> None:
        """Make the service, start its computation, and read the worker's messages; never returns."""
        start = self.start
        sys.path[:] = start["sys_path"]
        configure_logging(start.get("log_level", logging.WARNING), start.get("log_format", "text"),
                          LOG_FORMAT)
        if self.memory_limit:
            _limit_memory(self.memory_limit)
        try:
            service = self._make_service()
        except BaseException as exc:  # the job fails; the child has nothing left to do
            self._exit_after(ToParent.NOT_STARTED, {"error": error_to_wire(exc, traceback.format_exc())})
        pool = start["pool"]
        intervals = start["intervals"]
        # Checkpoints are stored by the worker (STORE, answered by STORED) when it stores them.
        handler = self.handler = ServiceHandler(
            self._emit, workers=WorkerPool(pool["size"], pool["kind"]), name=self.job,
            progress_delta=intervals["progress_delta"], checkpoint_delta=intervals["checkpoint_delta"],
            improved_delta=intervals["improved_delta"],
            store=self._store if start.get("stores_checkpoints") else None,
            note=self._note if start.get("keeps_changes") else None,
            carried=start.get("carried") or (), carried_after=start.get("carried_after") or 0,
            max_result_bytes=start.get("max_result_bytes"))
        self.crossing = handler.crossing
        handler.outcome.add_done_callback(self._finish)
        handler.start(service, start["request"], start["resume"], state=start["state"],
                      reapply=start.get("reapply") or None)
        self._read()

    def _make_service(self) -> Service:
        cls = load_service(self.start["spec"])
        if cls.name != self.start["service"]:
            raise ConfigurationError(f"{self.start['spec']!r} loads service {cls.name!r} in the "
                                     f"child process, not {self.start['service']!r}")
        return cls()

    # ---- the worker's messages (main thread) ---------------------------------------------

    def _read(self) -> None:
        while (message := self.channel.receive()) is not None:
            try:
                kind = ToChild(message.kind)
            except ValueError:
                log.warning("unknown back-channel message %r ignored", message.kind)
                continue
            self.ON[kind](self, message.body)
        os._exit(EXIT_WORKER_GONE)  # nobody is left to read the outcome

    def _on_post(self, body: dict[str, Any]) -> None:
        key = body["id"]
        posted = Posted(Intent(body["intent"]), body["payload"])
        try:
            self.crossing.post(posted, self.job)
        except InvalidState as exc:  # the computation has ended
            posted.future.set_exception(exc)
        posted.future.add_done_callback(lambda future: self._settled(key, future))

    def _on_request(self, body: dict[str, Any]) -> None:
        self.REQUESTS[Requested(body["what"])](self.crossing)

    def _on_stored(self, body: dict[str, Any]) -> None:
        future = self._stores.pop(body["id"], None)
        if future is None:
            return
        error = body.get("error")
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(CheckpointFailed(str(error.get("message", "not stored"))))

    def _on_intervals(self, body: dict[str, Any]) -> None:
        assert self.handler is not None
        for attr, value in body["intervals"].items():
            if attr in HANDLER_SETTABLE:
                setattr(self.handler.intervals, attr, float(value))
        self.crossing.request_reschedule()

    #: What each message from the worker does (START comes once, first).
    ON: ClassVar[dict[ToChild, Callable[[ChildSide, dict[str, Any]], None]]] = {
        ToChild.POST: _on_post, ToChild.REQUEST: _on_request, ToChild.INTERVALS: _on_intervals,
        ToChild.STORED: _on_stored,
        ToChild.START: lambda self, body: log.warning("a second START ignored"),
    }
    #: Each flag the worker may raise, as the crossing's method that raises it.
    REQUESTS: ClassVar[dict[Requested, Callable[[Crossing], Any]]] = {
        Requested.PAUSE: Crossing.request_pause, Requested.RESUME: Crossing.request_resume,
        Requested.ABORT: Crossing.request_abort, Requested.HANDOVER: Crossing.request_handover,
    }

    # ---- to the worker (computation thread) --------------------------------------------------

    def _emit(self, kind: str, data: dict[str, Any]) -> None:
        # A body that is not JSON-able raises here; the handler logs it, as the wire would.
        self.channel.send(ToParent.EMIT.value, {"event": kind, "data": data})

    def _store(self, state: Any, settable: dict[str, Any], covers: int) -> cf.Future[None]:
        """Ask the worker to store a checkpoint (computation thread); resolved by STORED."""
        return self._ask_to_keep({"state": state, "settable": settable, "covers": covers}, "checkpoint")

    def _note(self, changes: list[dict[str, Any]]) -> cf.Future[None]:
        """Ask the worker to make the applied changes durable (computation thread)."""
        return self._ask_to_keep({"changes": changes}, "changes")

    def _ask_to_keep(self, body: dict[str, Any], what: str) -> cf.Future[None]:
        key = next(self._store_ids)
        future: cf.Future[None] = cf.Future()
        self._stores[key] = future
        try:
            self.channel.send(ToParent.STORE.value, {"id": key, **body})
        except (OSError, ValueError) as exc:
            self._stores.pop(key, None)
            future.set_exception(CheckpointFailed(f"the {what} could not reach the worker: {exc}"))
        return future

    def _settled(self, key: int, future: cf.Future[Any]) -> None:
        exc = future.exception()
        body: dict[str, Any] = {"id": key}
        if exc is None:
            body["value"] = future.result()
        else:
            body["error"] = error_to_wire(exc, "".join(traceback.format_exception(exc)))
        with contextlib.suppress(OSError):  # the worker is gone: the reader exits
            self.channel.send(ToParent.SETTLED.value, body)

    def _finish(self, future: cf.Future[dict[str, Any]]) -> None:
        outcome = dict(future.result())
        error = outcome.get("error")
        if self.memory_limit and isinstance(error, dict) and error.get("type") == "MemoryError":
            error["message"] = (f"{error.get('message') or 'out of memory'} (memory limit of "
                                f"{self.memory_limit / 2**20:g} MiB reached)")
        self._exit_after(ToParent.OUTCOME, outcome)

    def _exit_after(self, kind: ToParent, body: dict[str, Any]) -> NoReturn:
        """Send the last message, and end the process at once (nothing else runs on)."""
        with contextlib.suppress(OSError):
            self.channel.send(kind.value, body)
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os._exit(0)
