"""The default runner: each job's computation in a thread of this process, reused.

:class:`ThreadRunner` implements :class:`~brokerexec.core.runner.Runner` with
:class:`~brokerexec.core.computation_thread.Computation`, and runs each computation in an
idle thread when there is one. Starting a thread costs its caller about 100 µs and a
hand-off it waits for; a worker that runs hundreds of short jobs a second on its handler
thread spent a tenth of its time there (docs/performance.md).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from .computation_thread import Computation
from .runner import JobSetup, Running

__all__ = ["THREADS", "ThreadRunner"]

log = logging.getLogger(__name__)


class _Task:
    def __init__(self, fn: Callable[[], None], name: str) -> None:
        self.fn, self.name = fn, name
        self.done = threading.Event()

    def is_alive(self) -> bool:
        return not self.done.is_set()


class ThreadRunner:
    """Each computation in a thread of its own, reusing threads that have finished one.

    Parameters:
        idle_seconds: an idle thread ends after this long without work.
    """

    def __init__(self, idle_seconds: float = 60.0) -> None:
        self.idle_seconds = idle_seconds
        self._lock = threading.Lock()
        self._idle: list[_Slot] = []

    def computation(self, setup: JobSetup) -> Computation:
        """A job's computation, run in one of these threads once started."""
        return Computation(setup, self.start)

    def start(self, fn: Callable[[], None], name: str) -> Running:
        """Run ``fn()`` (which handles its own errors) in an idle thread, or a new one."""
        task = _Task(fn, name)
        with self._lock:
            slot = self._idle.pop() if self._idle else None
        if slot is None:
            slot = _Slot(self)
            slot.inbox.put(task)
            slot.thread.start()
        else:
            slot.inbox.put(task)
        return task

    @property
    def idle(self) -> int:
        """Threads waiting for work."""
        return len(self._idle)


class _Slot:
    """One reusable thread: takes a task, runs it, offers itself again."""

    def __init__(self, runner: ThreadRunner) -> None:
        self.runner = runner
        self.inbox: queue.SimpleQueue[_Task] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, name="brokerexec-compute", daemon=True)

    def _loop(self) -> None:
        runner = self.runner
        while True:
            try:
                task = self.inbox.get(timeout=runner.idle_seconds)
            except queue.Empty:
                with runner._lock:
                    if self in runner._idle:
                        runner._idle.remove(self)
                        return
                continue  # taken just now: its task is on the way
            self.thread.name = f"brokerexec-compute-{task.name}"
            try:
                task.fn()
            except BaseException:  # the handler catches everything; this is a last resort
                log.exception("computation %s raised out of its runner", task.name)
            finally:
                task.done.set()
            self.thread.name = "brokerexec-compute"
            with runner._lock:
                runner._idle.append(self)


#: The runner handlers use unless given another.
THREADS = ThreadRunner()
