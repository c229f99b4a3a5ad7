"""The worker's side of a computation that runs in a child process.

:class:`ChildComputation` stands where :class:`~brokerexec.core.computation_thread.Computation` stands:
the job's crossing, state machine and intervals stay in the worker, whose handler thread
answers ``status``, ``pause`` and ``abort`` at once and checks every ``set`` and ``invoke``;
the service, ``ready()`` and a real ``Computation`` run in the child
(:mod:`brokerexec.child.main`), over the back-channel (:mod:`brokerexec.child.back_channel`):

* **to the child** (:meth:`_forward`, told of every post and request by
  :meth:`Crossing.relay_to`): each posted signal, with an id; pause, resume, abort and a
  handover as ``REQUEST`` flags; new intervals; each checkpoint it asked to be stored, stored;
* **from the child** (:meth:`_watch`, one thread per child): its state transitions except
  the last (how a job ended is decided here), progress, improved and checkpoint messages,
  checkpoints to store (through the worker's store), each posted signal settled, its outcome.

The child's outcome carries its last progress and improved state (the improved one whether
or not ``improved_delta`` let it be sent). A child that ends without an outcome cannot say
them: its job's outcome then carries the last progress and improved messages that reached
the worker (an improved state the child held back for ``improved_delta`` is lost with it).

How a job ends when its child cannot say so itself: the child dies (SIGSEGV, ``os._exit``,
the OOM killer's SIGKILL): *failed*, ``brokerexec.ComputationDied``, "computation process
died of SIGSEGV"; an abort is not obeyed within ``abort_grace`` (no ``ready()``, or stuck in
C): SIGTERM to its process group, SIGKILL ``term_grace`` later, *aborted*, its error saying
so; the wall-time limit is reached: aborted as above, and *failed*, ``LimitExceeded``.

Posted signals the child never settled fail with ``InvalidState`` (``NotApplied`` if handed over).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import itertools
import logging
import math
import select
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any, ClassVar

from ..core.crossing import Posted, fail_unapplied
from ..core.registry import service_spec
from ..core.runner import JobSetup, Outcome, last_reports
from ..core.service import Handler, Service
from ..errors import (
    WIRE_PREFIX,
    CheckpointFailed,
    ConfigurationError,
    InvalidState,
    NotDurable,
    error_from_wire,
    error_to_wire,
)
from ..logs import configured_format
from ..protocol.states import JobState
from .back_channel import Decoder, Message, QueuedSender, Requested, ToChild, ToParent, read_rest, read_some
from .processes import ChildProcess, ChildProcesses, describe_exit

__all__ = ["ChildComputation"]

log = logging.getLogger(__name__)

#: Seconds a child may take to exit after its outcome (or after closing its end).
EXIT_WAIT = 5.0
#: Seconds between checks of a child's exit where the kernel has no pidfds.
_POLL = 0.1


class ChildComputation:
    """See the module docstring: the :class:`~brokerexec.core.runner.ComputationSide` that
    :class:`~brokerexec.child.runner.ProcessRunner` makes."""

    def __init__(self, setup: JobSetup, runner: ChildProcesses) -> None:
        self.job = setup.job
        self.outcome: cf.Future[Outcome] = cf.Future()
        #: The service lives in the child; there is none here.
        self.service: Service | None = None
        self._crossing = setup.crossing
        self._states = setup.states
        self._intervals = setup.intervals
        self._send = setup.send
        self._runner = runner
        self._pool = setup.pool
        self._abort_grace = setup.abort_grace
        self._wallclock = setup.wallclock
        self._store = setup.store
        self._note = setup.note
        self._setup = setup
        self._service_cls: type[Service] | None = None
        self._handover_sent = False
        self._lock = threading.Lock()
        self._sender: QueuedSender | None = None
        self._child: ChildProcess | None = None
        self._pending_stop: str | None = None
        self._in_flight: dict[int, Posted] = {}
        self._ids = itertools.count()
        self._pause_sent = self._abort_sent = self._ended = False
        self._limit_error: dict[str, str] | None = None
        self._improved: object = None  # the last improved state that reached us
        self._timers: list[threading.Timer] = []
        self._started_at = 0.0

    @property
    def started(self) -> bool:
        return self._sender is not None

    @property
    def stores_checkpoints(self) -> bool:
        """True if the child's checkpoints are stored (through this worker's store)."""
        cls = self._service_cls
        return self._store is not None and cls is not None and cls.checkpoint is not Service.checkpoint

    def start(self, service: Service | type[Service], request: dict[str, Any], resume: bool,
              state: dict[str, Any] | None, handler: Handler,
              reapply: dict[str, Any] | None = None) -> None:
        """Start a child that makes a service of ``service``'s class, restores ``state`` if
        ``resume``, and runs ``request``; return at once. The child has a handler of its own:
        ``handler`` (this process's) is not used.

        Raises:
            InvalidState: started already.
        """
        if self._sender is not None:
            raise InvalidState(f"handler {self.job} is busy: one computation per handler")
        service_cls = service if isinstance(service, type) else type(service)
        self._service_cls = service_cls
        limits = self._runner.limits
        try:
            program = self._runner.program_for(service_cls)
            body = {"job": self.job, "service": service_cls.name, "spec": service_spec(service_cls),
                    "request": request, "resume": resume, "state": state,
                    "intervals": dataclasses.asdict(self._intervals),
                    "pool": {"size": self._pool.size, "kind": self._pool.kind},
                    "memory_limit": limits.memory, "log_level": self._runner.child_log_level(),
                    "log_format": configured_format(), "stores_checkpoints": self.stores_checkpoints,
                    # The worker's path in its own interpreter; in another, the child's own
                    # and where the service's module is (interpreters.py).
                    "sys_path": list(sys.path) if program.own else None, "extra_path": program.extra_path,
                    "reapply": reapply or {},
                    "keeps_changes": self._note is not None and self._store is not None,
                    "carried": list(self._setup.carried), "carried_after": self._setup.carried_after,
                    "max_result_bytes": self._setup.max_result_bytes}
            start = Message(ToChild.START.value, body).encode()
        except (ConfigurationError, ValueError) as exc:  # not loadable, or state not JSON-able
            self.fail_to_start(exc)
            return
        parent_end, child_end = socket.socketpair()
        self._started_at = self._wallclock()
        sender = QueuedSender(parent_end, self.job)
        sender.put(start)
        with self._lock:
            self._sender = sender
        self._crossing.relay_to(self._forward)
        self._forward()  # what was requested before the start (a pause, say)
        if limits.wall_time is not None:
            self._after(limits.wall_time, self._on_time_limit, limits.wall_time)
        self._runner.spawn(self.job, child_end, lambda child: self._on_spawned(child, parent_end), program)

    def fail_to_start(self, exc: BaseException) -> None:
        """The job cannot start (its class cannot be loaded elsewhere): a failed job."""
        now = self._wallclock()
        self._end({"state": "failed", "result": None, "start": now, "end": now,
                   "error": error_to_wire(exc, traceback.format_exc())})

    def abandon_if_stuck(self, grace: float) -> None:
        """The abort grace is over: stop the child's process group if it still runs."""
        if not self._ended:
            self._stop_child(f"did not reach ready() within {grace:.1f} s of abort")

    def at_ready(self) -> None:
        raise InvalidState(f"job {self.job} runs in a child process: ready() is called there")

    def improved(self, state: dict[str, Any]) -> None:
        raise InvalidState(f"job {self.job} runs in a child process: improved() is called there")

    # ---- to the child (any thread that posts or requests) -----------------------------------

    def _forward(self) -> None:
        crossing = self._crossing
        unsendable: list[tuple[Posted, ValueError]] = []
        with self._lock:  # one forwarder at a time, so the child sees requests in order
            sender = self._sender
            if sender is None or self._ended:
                return
            for posted in crossing.hand_over():
                key = next(self._ids)
                try:
                    sender.send(ToChild.POST.value, {"id": key, "intent": posted.intent.value,
                                                     "payload": posted.payload})
                except ValueError as exc:
                    unsendable.append((posted, exc))
                else:
                    self._in_flight[key] = posted
            if crossing.pause_requested != self._pause_sent:
                self._pause_sent = crossing.pause_requested
                what = Requested.PAUSE if self._pause_sent else Requested.RESUME
                sender.send(ToChild.REQUEST.value, {"what": what.value})
            if crossing.abort_requested and not self._abort_sent:
                self._abort_sent = True
                sender.send(ToChild.REQUEST.value, {"what": Requested.ABORT.value})
            if crossing.handover_requested and not self._handover_sent:
                self._handover_sent = True
                sender.send(ToChild.REQUEST.value, {"what": Requested.HANDOVER.value})
            if crossing.reschedule:
                crossing.reschedule = False
                sender.send(ToChild.INTERVALS.value, {"intervals": dataclasses.asdict(self._intervals)})
        for posted, error in unsendable:  # outside the lock: a sender's callback may post again
            posted.future.set_exception(error)

    # ---- from the child (its watcher thread), stopping it, the end -----------------------------

    def _on_spawned(self, child: ChildProcess | BaseException, parent_end: socket.socket) -> None:
        if isinstance(child, BaseException):
            assert self._sender is not None
            self._sender.close()
            parent_end.close()
            now = self._wallclock()
            error = error_to_wire(child)
            error["message"] = f"could not start the computation process: {error['message']}"
            self._end({"state": "failed", "result": None, "error": error, "start": now, "end": now})
            return
        with self._lock:
            self._child, pending = child, self._pending_stop
        if pending is not None:
            child.stop(pending, self._runner.term_grace)
        threading.Thread(target=self._watch, args=(child, parent_end), daemon=True,
                         name=f"brokerexec-child-{self.job}").start()

    def _watch(self, child: ChildProcess, sock: socket.socket) -> None:
        """Read the child's messages until it exits; then reap it and end the job."""
        decoder, received = Decoder(), None
        reading, deadline = True, math.inf
        try:
            while not child.has_exited():
                waits: list[Any] = [sock] if reading else []
                if child.exit_fd is not None:
                    waits.append(child.exit_fd)
                timeout = _POLL if child.exit_fd is None else None
                if deadline < math.inf:
                    timeout = max(0.0, min(timeout or math.inf, deadline - time.monotonic()))
                readable, _, _ = select.select(waits, [], [], timeout)
                if sock in readable:
                    data = read_some(sock)
                    if data:
                        received = self._take(decoder.feed(data)) or received
                    else:
                        reading = False
                    if received is not None or not reading:
                        deadline = min(deadline, time.monotonic() + EXIT_WAIT)
                if time.monotonic() >= deadline:
                    deadline = math.inf
                    child.kill("its process did not exit after its computation ended")
            if reading:
                received = self._take(decoder.feed(read_rest(sock))) or received
        except Exception as exc:  # a bad message or a bug here: the job must still end
            log.exception("job %s: reading its child process failed", self.job)
            child.kill(f"its back-channel failed: {exc!r}")
        finally:
            code = child.reap()
            self._runner.forget(child)
            assert self._sender is not None
            self._sender.close()
            sock.close()
            self._end(self._verdict(received, code, child))

    def _take(self, messages: list[Message]) -> Outcome | None:
        outcome = None
        for message in messages:
            try:
                kind = ToParent(message.kind)
            except ValueError:
                log.warning("job %s: unknown back-channel message %r ignored", self.job, message.kind)
                continue
            outcome = self.ON[kind](self, message.body) or outcome
        return outcome

    def _on_emit(self, body: dict[str, Any]) -> None:
        kind, data = body["event"], body["data"]
        if kind == "state":
            new = JobState(data["to"])
            if not new.terminal:  # the end is decided here, from the outcome or the exit
                self._states.try_transition(new)
            return
        if kind == "progress":
            self._crossing.last_progress = data
        elif kind == "improved":
            self._improved = data.get("state")
        self._send(kind, data)

    def _on_store(self, body: dict[str, Any]) -> None:
        """The child asks for a checkpoint to be stored: by the worker's store; STORED says when."""
        def stored(error: BaseException | None) -> None:
            reply = {"id": body["id"]} if error is None else {"id": body["id"], "error": error_to_wire(error)}
            with self._lock:
                sender = self._sender
            if sender is not None:
                with contextlib.suppress(OSError, ValueError):
                    sender.send(ToChild.STORED.value, reply)

        if "changes" in body:  # a set or invoke applied there, made durable before its reply
            if self._note is None:
                stored(NotDurable(f"job {self.job}: this worker keeps no changes"))
            else:
                self._note(body["changes"]).add_done_callback(lambda done: stored(done.exception()))
        elif self._store is None:
            stored(CheckpointFailed(f"job {self.job}: this worker stores no checkpoints"))
        else:
            self._store(body["state"], body.get("settable") or {}, int(body.get("covers") or 0)
                        ).add_done_callback(lambda done: stored(done.exception()))

    def _on_settled(self, body: dict[str, Any]) -> None:
        with self._lock:
            posted = self._in_flight.pop(body["id"], None)
        if posted is None:
            return
        if "error" in body:
            posted.future.set_exception(error_from_wire(body["error"]))
        else:
            posted.future.set_result(body.get("value"))

    def _on_outcome(self, body: dict[str, Any]) -> Outcome:
        return dict(body)

    def _on_not_started(self, body: dict[str, Any]) -> Outcome:
        now = self._wallclock()
        return {"state": "failed", "result": None, "error": body["error"], "start": now, "end": now}

    #: What each message from the child does; those that end the job return its outcome.
    ON: ClassVar[dict[ToParent, Callable[[ChildComputation, dict[str, Any]], Outcome | None]]] = {
        ToParent.EMIT: _on_emit, ToParent.STORE: _on_store, ToParent.SETTLED: _on_settled,
        ToParent.OUTCOME: _on_outcome,
        ToParent.NOT_STARTED: _on_not_started,
    }

    def _stop_child(self, reason: str) -> None:
        with self._lock:
            child = self._child
            if child is None:  # not started yet: stopped as soon as it is
                self._pending_stop = self._pending_stop or reason
                return
        child.stop(reason, self._runner.term_grace)

    def _on_time_limit(self, limit: float) -> None:
        with self._lock:
            if self._ended:
                return
            self._limit_error = {"type": f"{WIRE_PREFIX}LimitExceeded", "traceback": "",
                                 "message": f"wall-time limit of {limit:g} s reached"}
        log.warning("job %s reached its wall-time limit of %g s: aborting it", self.job, limit)
        self._crossing.request_abort()
        self._after(self._abort_grace, self._stop_child,
                    f"reached its wall-time limit of {limit:g} s and did not reach ready() "
                    f"within {self._abort_grace:.1f} s")

    def _after(self, seconds: float, fn: Callable[..., None], *args: Any) -> None:
        timer = threading.Timer(seconds, fn, args=args)
        timer.name, timer.daemon = f"brokerexec-limit-{self.job}", True
        with self._lock:
            self._timers.append(timer)
        timer.start()

    def _verdict(self, received: Outcome | None, code: int, child: ChildProcess) -> Outcome:
        """How the job ended: the child's outcome, unless a limit or the child's death says otherwise."""
        limit = self._limit_error
        if received is not None:
            if limit is not None and received["state"] == JobState.ABORTED.value:
                return {**received, "state": JobState.FAILED.value, "error": limit}
            return received
        history = self._states.history
        start = history[0].end if history else self._started_at
        reports, _ = last_reports(self.job, self._crossing.last_progress, self._improved,
                                  self._setup.max_result_bytes)
        outcome: Outcome = {"state": JobState.FAILED.value, "result": None, "error": limit,
                            "start": start, "end": self._wallclock(), **reports}
        if limit is not None:
            return outcome
        how = describe_exit(code)
        if child.kill_reason is not None and self._crossing.abort_requested:
            outcome["state"] = JobState.ABORTED.value
            outcome["error"] = {"type": f"{WIRE_PREFIX}Aborted", "traceback": "",
                                "message": f"job {self.job} {child.kill_reason}: its process group "
                                           f"was stopped (the computation process {how})"}
            return outcome
        message = f"computation process {how}"
        if child.kill_reason is not None:
            message += f": {child.kill_reason}"
        elif code == -signal.SIGKILL:
            message += (" (not sent by this worker: the kernel's OOM killer sends SIGKILL when "
                        "memory runs out)")
        if tail := child.last_stderr():  # e.g. an interpreter too old, a setup that raised
            message += f"; its last lines on stderr:\n{tail}"
        outcome["error"] = {"type": f"{WIRE_PREFIX}ComputationDied", "message": message,
                            "traceback": ""}
        log.error("job %s failed: %s", self.job, message)
        return outcome

    def _end(self, outcome: Outcome) -> None:
        with self._lock:
            if self._ended:
                return
            self._ended = True
            unsettled, self._in_flight = list(self._in_flight.values()), {}
            timers, self._timers = self._timers, []
        for timer in timers:
            timer.cancel()
        if outcome["state"] == "handed_over":  # not an end: the job goes on elsewhere
            fail_unapplied([*self._crossing.close("handed over"), *unsettled], self.job, None)
            self.outcome.set_result(outcome)
            return
        final = JobState(outcome["state"])
        fail_unapplied([*self._crossing.close(final.value), *unsettled], self.job, final)
        if final is JobState.ABORTED and self._states.state is JobState.PAUSED:
            self._states.try_transition(JobState.RUNNING)  # abort resumes first, as park does
        self._states.try_transition(final)
        self.outcome.set_result(outcome)

