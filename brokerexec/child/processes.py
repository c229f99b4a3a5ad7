"""Child processes for computations: started, watched and killed by the worker.

:class:`ChildProcesses` starts one child interpreter per computation (``sys.executable``
running :mod:`brokerexec.child.main`, or what the service asks for: ``interpreters.py``;
its stderr passes on to the worker's, its last lines kept; not a fork of the worker, so
nothing of the worker's threads, locks or connection is inherited) and hands back a
:class:`ChildProcess`:

* **its own process group** (a new session): a signal to the group reaches whatever the
  computation started itself (a process pool, a solver binary), and the terminal's Ctrl-C
  reaches only the worker, which stops gracefully;
* **dying with the worker**: on Linux the child asks for ``PR_SET_PDEATHSIG`` (SIGKILL)
  first thing. The kernel sends it when the *thread* that started the child ends, so every
  child is started by the runner's one long-lived thread, ``brokerexec-spawner``; that
  thread also keeps the handler thread from waiting for a fork and an exec;
* **its whole tree ending with it**: right after that, the child forks its *sentinel*
  (:func:`brokerexec.child.main._guard_group`), a process of its group that SIGKILLs the
  group as soon as the child has ended, however it ended. So what the computation started
  (``subprocess``, ``multiprocessing``, their children) goes with it also when nobody here
  is left to kill it: the worker SIGKILLed (the kernel kills the child, the sentinel the
  rest), or the child itself killed (the OOM killer). Nothing here counts the sentinel: it
  is no child of the worker's (init adopts it, or the nearest subreaper: see below), the
  exit status is the child's, and :meth:`ChildProcess.reap` kills the group as before. A
  process that leaves the group (``setsid``, a daemon) escapes both: only a cgroup would
  hold it;
* **watched without being reaped**: :meth:`ChildProcess.wait_exit` sees the exit (a pidfd
  where the kernel has them, ``waitid(WNOWAIT)`` otherwise) and leaves the zombie, so the
  group can still be killed safely (its id cannot be reused) before :meth:`ChildProcess.reap`.
  A worker that adopts orphans (PID 1 of a container, or a subreaper) also reaps what it
  adopted of the group (the sentinel, the computation's processes), so none stays a zombie.

What a job's computation does with its child is :mod:`brokerexec.child.computation`; the
runner that hands out those computations is :mod:`brokerexec.child.runner`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

from ..errors import ConfigurationError, InvalidState
from .interpreters import ChildProgram, program_for

__all__ = ["ChildProcess", "ChildProcesses", "Limits", "describe_exit"]

log = logging.getLogger(__name__)

#: Lines of each child's stderr kept, to say how a child that died before it started went.
STDERR_LINES = 20


@dataclass(frozen=True)
class Limits:
    """Limits of each computation run in a child process (None: no limit).

    Parameters:
        wall_time: seconds from its start; then it is aborted, and killed ``abort_grace``
            later if it has not ended. Its record: failed, ``brokerexec.LimitExceeded``.
        memory: bytes of address space (``RLIMIT_AS`` in the child: it counts every mapping,
            thread stacks and shared libraries too, not only what is resident). An
            allocation past it raises ``MemoryError`` in the computation; its record:
            failed, ``MemoryError``, the message naming the limit.
    """

    wall_time: float | None = None
    memory: int | None = None

    def __post_init__(self) -> None:
        if self.wall_time is not None and not self.wall_time > 0:
            raise ConfigurationError(f"wall-time limit must be > 0 s, not {self.wall_time!r}")
        if self.memory is not None and not self.memory > 0:
            raise ConfigurationError(f"memory limit must be > 0 bytes, not {self.memory!r}")


def describe_exit(code: int) -> str:
    """How a child that ended without an outcome went: "died of SIGSEGV", "exited with status 3"."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"died of {name}"
    return f"exited with status {code}"


class ChildProcess:
    """One child interpreter, seen from the worker. Made by :class:`ChildProcesses`."""

    def __init__(self, popen: subprocess.Popen[bytes], job: str) -> None:
        self.popen = popen
        self.pid = popen.pid
        self.job = job
        #: The last lines the child wrote on stderr (which goes on to the worker's).
        self.stderr_tail: deque[bytes] = deque(maxlen=STDERR_LINES)
        self._stderr_done = threading.Event()
        if popen.stderr is not None:
            threading.Thread(target=self._pass_stderr, args=(popen.stderr,), daemon=True,
                             name=f"brokerexec-stderr-{job}").start()
        else:
            self._stderr_done.set()
        #: Why the worker signalled the group, if it did (e.g. "the worker stopped").
        self.kill_reason: str | None = None
        self._lock = threading.Lock()
        self._reaped = False
        self._kill_timer: threading.Timer | None = None
        try:
            self.exit_fd: int | None = os.pidfd_open(self.pid)
        except (AttributeError, OSError):  # no pidfds: wait_exit polls
            self.exit_fd = None

    def _pass_stderr(self, pipe: IO[bytes]) -> None:
        """Copy the child's stderr to the worker's, line by line, keeping the last lines."""
        out = getattr(sys.stderr, "buffer", None)
        try:
            for line in pipe:
                self.stderr_tail.append(line)
                if out is not None:
                    with contextlib.suppress(OSError, ValueError):
                        out.write(line)
                        out.flush()
        finally:
            pipe.close()
            self._stderr_done.set()

    def last_stderr(self, wait: float = 1.0) -> str:
        """The last lines the child wrote on stderr, once its end of it closed (waiting up to
        ``wait`` s: what the computation started may hold it open)."""
        self._stderr_done.wait(wait)
        return b"".join(self.stderr_tail).decode(errors="replace").rstrip()

    def has_exited(self) -> bool:
        """True once the child has exited (it may not be reaped yet)."""
        if self._reaped:
            return True
        try:
            info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        return info is not None

    def signal_group(self, sig: int) -> None:
        """Send ``sig`` to the child's process group, unless the child is reaped already."""
        with self._lock:
            if self._reaped:
                return
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, sig)

    def stop(self, reason: str, term_grace: float) -> None:
        """SIGTERM the group now, SIGKILL it ``term_grace`` seconds later (if still there)."""
        with self._lock:
            if self.kill_reason is None:
                self.kill_reason = reason
            if self._kill_timer is not None:
                return
            self._kill_timer = threading.Timer(term_grace, self.signal_group, args=(signal.SIGKILL,))
            self._kill_timer.name, self._kill_timer.daemon = f"brokerexec-kill-{self.job}", True
        log.warning("job %s: %s; SIGTERM to its process group %d", self.job, reason, self.pid)
        self.signal_group(signal.SIGTERM)
        self._kill_timer.start()

    def kill(self, reason: str) -> None:
        """SIGKILL the group at once."""
        with self._lock:
            if self.kill_reason is None:
                self.kill_reason = reason
        self.signal_group(signal.SIGKILL)

    def reap(self) -> int:
        """The child has exited: kill what is left of its group, collect its exit status
        (negative: the signal that killed it)."""
        self.signal_group(signal.SIGKILL)  # grandchildren must not outlive the computation
        with self._lock:
            self._reaped = True
            timer = self._kill_timer
        if timer is not None:
            timer.cancel()
        code = self.popen.wait()
        if self.exit_fd is not None:
            os.close(self.exit_fd)
            self.exit_fd = None
        if _adopts_orphans():
            _reap_adopted(self.pid, self.job)
        return code


class ChildProcesses:
    """Starts and keeps the child processes of one worker; see the module docstring.

    Parameters:
        limits: what each computation may use.
        term_grace: seconds between SIGTERM and SIGKILL of a group being stopped.
        python: the interpreter to run (default: the worker's).
        log_level: the children's logging level (default: the worker's root logger's).
    """

    def __init__(self, limits: Limits | None = None, *, term_grace: float = 2.0,
                 python: str = sys.executable, log_level: int | None = None) -> None:
        self.limits = limits or Limits()
        self.term_grace = term_grace
        self.python = python
        self.log_level = log_level
        self._lock = threading.Lock()
        self._gone = threading.Condition(self._lock)
        self._live: set[ChildProcess] = set()
        self._requests: queue.SimpleQueue[_Spawn | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False

    def child_log_level(self) -> int:
        """The logging level children use."""
        return self.log_level if self.log_level is not None else logging.getLogger().getEffectiveLevel()

    def program_for(self, service_cls: Any) -> ChildProgram:
        """What ``service_cls``'s children start as (``interpreters.py``); this runner's
        interpreter is the default.

        Raises:
            ConfigurationError: its interpreter cannot be run or is too old.
        """
        return program_for(service_cls, self.python)

    def spawn(self, job: str, child_end: socket.socket,
              done: Callable[[ChildProcess | BaseException], None], program: ChildProgram) -> None:
        """Start a child for ``job`` with ``child_end`` as its back-channel; return at once.

        ``program``: what it starts as (:meth:`program_for`). ``done`` gets the
        :class:`ChildProcess`, or the error that kept it from starting, on the spawner
        thread. ``child_end`` is closed in this process once the child has it.
        """
        with self._lock:
            if self._closed:
                child_end.close()
                done(InvalidState("the worker's process runner is closed"))
                return
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="brokerexec-spawner",
                                                daemon=True)
                self._thread.start()
        self._requests.put(_Spawn(job, child_end, done, program))

    def forget(self, child: ChildProcess) -> None:
        """``child`` is reaped: no longer one of this runner's."""
        with self._lock:
            self._live.discard(child)
            self._gone.notify_all()

    @property
    def live(self) -> int:
        """Children started and not reaped yet."""
        return len(self._live)

    def close(self, timeout: float = 10.0) -> None:
        """Kill every child's group, wait up to ``timeout`` for them to be reaped, stop."""
        with self._lock:
            self._closed = True
            children = list(self._live)
        for child in children:
            child.kill("the worker stopped")
        with self._lock:
            deadline = time.monotonic() + timeout
            while self._live and (left := deadline - time.monotonic()) > 0:
                self._gone.wait(left)
            if self._live:
                log.warning("%d child process(es) not reaped at close", len(self._live))
        self._requests.put(None)

    # ---- the spawner thread -------------------------------------------------------------

    def _serve(self) -> None:
        # This thread must outlive every child it starts: PR_SET_PDEATHSIG fires when it ends.
        while (request := self._requests.get()) is not None:
            try:
                child = self._start(request)
            except Exception as exc:  # the job fails, the worker goes on
                log.error("job %s: could not start its computation process: %r", request.job, exc)
                request.done(exc)
            else:
                request.done(child)
            finally:
                request.child_end.close()

    def _start(self, request: _Spawn) -> ChildProcess:
        fd = request.child_end.fileno()
        with self._lock:
            if self._closed:
                raise InvalidState("the worker's process runner is closed")
            popen = subprocess.Popen(
                **request.program.popen_kwargs(fd, os.getpid()), stdin=subprocess.DEVNULL,
                stderr=subprocess.PIPE, pass_fds=(fd,), start_new_session=True)
            child = ChildProcess(popen, request.job)
            self._live.add(child)
        log.debug("job %s runs in process %d", request.job, child.pid)
        return child


_PR_GET_CHILD_SUBREAPER = 37


def _adopts_orphans() -> bool:
    """Whether orphans in this process's subtree become its children (PID 1, or a subreaper)."""
    if os.getpid() == 1:
        return True
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    flag = ctypes.c_int(0)
    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(flag), 0, 0, 0) == 0 and flag.value)


def _reap_adopted(group: int, job: str) -> None:
    """Reap the processes of ``group`` that this process adopted; wait aside for those still
    dying (SIGKILLed just now), so the job's end does not wait for them."""
    try:
        while os.waitid(os.P_PGID, group, os.WEXITED | os.WNOHANG) is not None:
            pass
    except ChildProcessError:  # none left
        return
    threading.Thread(target=_reap_group, args=(group,), name=f"brokerexec-reap-{job}", daemon=True).start()


def _reap_group(group: int) -> None:
    with contextlib.suppress(ChildProcessError):
        while True:
            os.waitid(os.P_PGID, group, os.WEXITED)


@dataclass(frozen=True)
class _Spawn:
    job: str
    child_end: socket.socket
    done: Callable[[Any], None]
    program: ChildProgram
