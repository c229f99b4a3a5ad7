"""The child process of one computation: a real handler and computation, driven by its worker.

:class:`~brokerexec.child.runner.ProcessRunner` starts it with the bootstrap code of
:mod:`brokerexec.child.interpreters` (in the worker's interpreter, another one, or an
application's Python), which calls :func:`main` with ``[FD, WORKER_PID]``; its back-channel
is the socket ``FD`` (:mod:`brokerexec.child.back_channel`). The service's
``child_setup()`` runs before its work and ``child_teardown()`` after it, here. Inside,
everything is thread mode: a :class:`~brokerexec.core.service_handler.ServiceHandler` runs
the service in a computation thread, and
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
(``PR_SET_PDEATHSIG``, Linux), and checks that its worker is still its parent. Then, before
any thread starts, it forks its **sentinel** (:func:`_guard_group`): a tiny process of its
process group that does nothing until the child has ended, for whatever reason, and then
SIGKILLs the whole group. So the processes a service starts itself (grandchildren) end with
the attempt too, also when nobody is left to kill them: the worker SIGKILLed (the kernel
kills the child, the sentinel the rest), or the child itself killed (the OOM killer)::

    worker ──► child (group leader) ──► the service's processes, and theirs (same group)
                 ▲ pidfd                  ▲ SIGKILL to the group, once the child has ended
                 └──── sentinel (same group; not the child's child, holds no other fd)
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import ctypes
import itertools
import logging
import os
import select
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
from ..protocol.states import JobState
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
    _guard_group()  # before any thread, and before the back-channel is more than a number
    channel = Channel(socket.socket(fileno=fd))
    start = channel.receive()
    if start is None or start.kind != ToChild.START.value:
        os._exit(EXIT_WORKER_GONE)
    ChildSide(channel, start.body).serve()


_libc: ctypes.CDLL | None = None


def _prctl(option: int, arg: int | bytes) -> bool:
    """``prctl(option, arg)`` (Linux); False if it failed."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return bool(_libc.prctl(option, arg, 0, 0, 0) == 0)


def _die_with_worker(worker: int) -> None:
    if sys.platform.startswith("linux") and not _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL):
        os.write(2, b"brokerexec child: prctl(PR_SET_PDEATHSIG) failed\n")
    if os.getppid() != worker:  # the worker died before the request took effect
        os._exit(EXIT_WORKER_GONE)


# ---- the sentinel: the process group ends with the child ---------------------------------------

#: What the sentinel ignores: the asynchronous signals that would end or stop it, sent to the
#: whole group (the worker's SIGTERM at a stop, a service's own killpg). SIGKILL still ends it.
_SENTINEL_IGNORES = tuple(
    sig for sig in (*(getattr(signal, name, None) for name in (
        "SIGHUP", "SIGINT", "SIGQUIT", "SIGTERM", "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGPIPE",
        "SIGTSTP", "SIGTTIN", "SIGTTOU", "SIGVTALRM", "SIGPROF", "SIGXCPU", "SIGXFSZ", "SIGIO",
        "SIGPWR", "SIGSTKFLT")),
        *range(getattr(signal, "SIGRTMIN", 0), getattr(signal, "SIGRTMAX", -1) + 1))
    if sig is not None)
_PR_SET_NAME = 15


def _guard_group() -> None:
    """Start this child's sentinel: a process of its group that SIGKILLs the group once this
    process has ended, however it ended (its outcome sent, a crash, the OOM killer, the
    kernel's SIGKILL when the worker died). So what the service started itself (a
    ``subprocess``, a ``multiprocessing`` pool, and their children) ends with its attempt.

    The sentinel watches a pidfd of this process and is forked twice, so it is not a child
    of this one: nothing here reaps it, and a service's ``os.wait()`` never sees it. Without
    pidfds (Linux before 5.3) it is a child of this one, told by ``PR_SET_PDEATHSIG``
    (SIGUSR1). It keeps no descriptor but the pidfd, so the worker still sees the back-channel
    end with this process. Linux only, and only in the leader of its own process group (as
    the worker starts it); a process that leaves the group (``setsid``) escapes it.
    """
    group = os.getpid()
    if not sys.platform.startswith("linux") or os.getpgrp() != group:
        return
    try:
        watch: int | None = os.pidfd_open(group)
    except (AttributeError, OSError):  # no pidfds: the sentinel is told by PR_SET_PDEATHSIG
        watch = None
    problem = ""
    try:
        pid = os.fork()
    except OSError as exc:
        pid, problem = -1, str(exc)
    if pid == 0:  # the go-between, which forks the sentinel and exits (the sentinel itself without pidfds)
        try:
            if watch is not None and os.fork() != 0:
                os._exit(0)
        except BaseException:
            os._exit(1)
        _sentinel(group, watch)
    if watch is not None:
        os.close(watch)
        if pid > 0:
            _, status = os.waitpid(pid, 0)
            problem = f"the fork that starts it ended with status {status:#x}"
            pid = pid if status == 0 else -1
    if pid < 0:  # the computation runs unguarded: only the worker kills its group (while it lives)
        os.write(2, f"brokerexec child: no sentinel for its process group: {problem}\n".encode())


def _sentinel(group: int, watch: int | None) -> NoReturn:
    """The sentinel's life: wait for the group's leader (this child) to end, then SIGKILL the
    group, itself included. Single-threaded, it does nothing else, and every way out kills."""
    try:
        if watch is None:  # PR_SET_PDEATHSIG's SIGUSR1 waits for sigwait, from the first moment
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
        for sig in _SENTINEL_IGNORES:
            if sig != signal.SIGUSR1 or watch is not None:
                with contextlib.suppress(OSError, ValueError):
                    signal.signal(sig, signal.SIG_IGN)
        _prctl(_PR_SET_NAME, b"brokerexec-sentinel")  # `ps -o comm` shows "brokerexec-sent"
        _close_all_but(-1 if watch is None else watch)
        if watch is not None:
            poller = select.poll()
            poller.register(watch, select.POLLIN)
            while not poller.poll():
                pass
        else:
            _prctl(_PR_SET_PDEATHSIG, signal.SIGUSR1)
            while os.getppid() == group:  # reparented: the child is gone (also if before the prctl)
                signal.sigwait({signal.SIGUSR1})  # a SIGUSR1 sent to the group only loops
    finally:
        with contextlib.suppress(OSError):
            os.killpg(group, signal.SIGKILL)
        os._exit(0)


def _close_all_but(keep: int) -> None:
    """Close every descriptor but ``keep``: the back-channel, stdio, anything inherited."""
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]  # few; its own is closed by now
    except OSError:  # no /proc
        os.closerange(0, max(keep, 0))
        os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))
        return
    for fd in fds:
        if fd != keep:
            with contextlib.suppress(OSError):
                os.close(fd)


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
        self.service: Service | None = None
        self.crossing = Crossing()  # the handler's, once there is one
        self._stores: dict[int, cf.Future[None]] = {}
        self._store_ids = itertools.count()

    def serve(self) -> None:
        """Make the service, start its computation, and read the worker's messages; never returns."""
        start = self.start
        if start.get("sys_path") is not None:  # the worker's own interpreter: its path
            sys.path[:] = start["sys_path"]
        sys.path[1:1] = [folder for folder in start.get("extra_path") or () if folder not in sys.path]
        configure_logging(start.get("log_level", logging.WARNING), start.get("log_format", "text"),
                          LOG_FORMAT)
        if self.memory_limit:
            _limit_memory(self.memory_limit)
        try:
            service = self._make_service()
        except BaseException as exc:  # the job fails; the child has nothing left to do
            self._exit_after(ToParent.NOT_STARTED, {"error": error_to_wire(exc, traceback.format_exc())})
        try:
            service.child_setup()
        except BaseException as exc:
            error = error_to_wire(exc, traceback.format_exc())
            error["message"] = f"{type(service).__qualname__}.child_setup() failed: {error['message']}"
            self._exit_after(ToParent.NOT_STARTED, {"error": error})
        self.service = service
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
        self._exit_after(ToParent.OUTCOME, self._torn_down(outcome))

    def _torn_down(self, outcome: dict[str, Any]) -> dict[str, Any]:
        """The outcome after the service's ``child_teardown()``: failed if it raised (the
        result kept; an earlier error kept first, this one after it)."""
        if self.service is None:
            return outcome
        try:
            self.service.child_teardown()
        except BaseException as exc:
            failure = error_to_wire(exc, traceback.format_exc())
            failure["message"] = (f"{type(self.service).__qualname__}.child_teardown() failed: "
                                  f"{failure['message']}")
            before = outcome.get("error")
            if isinstance(before, dict):
                before["message"] = f"{before.get('message')}; then {failure['message']}"
                return outcome
            return {**outcome, "state": JobState.FAILED.value, "error": failure}
        return outcome

    def _exit_after(self, kind: ToParent, body: dict[str, Any]) -> NoReturn:
        """Send the last message, and end the process at once (nothing else runs on)."""
        with contextlib.suppress(OSError):
            self.channel.send(kind.value, body)
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os._exit(0)
