"""Controls remembered for the launches still queued: an abort or a pause sent to a service
(or to every job) also applies to its jobs that wait in the queue.

A worker hears every control message (``pause_all`` and friends, or a job's own while it
is queued) and keeps them for as long as the control stream does (an hour), newest last.
A launch sent before an abort that applies to it is never started (it was aborted while
queued); one sent before a pause (and no resume since) starts paused; an operation's item
sent before a set of its operation's jobs starts with those attributes set (at its first
``ready()``, in the order they were sent).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

from ..protocol.intents import Intent
from ..protocol.messages import Control, Launch

__all__ = ["CONTROLS_KEPT", "RememberedControls"]

#: How long control messages are remembered for the launches still queued (seconds): as
#: long as the control stream keeps them.
CONTROLS_KEPT = 3600.0


class RememberedControls:
    """The control messages of the last :data:`CONTROLS_KEPT` seconds (any thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._controls: deque[Control] = deque()  # newest last

    def remember(self, control: Control) -> None:
        """Keep ``control`` (one without a time, a plumpy broadcast, is for the jobs running
        now only), and forget those older than :data:`CONTROLS_KEPT`."""
        if control.sent is None:
            return
        horizon = time.time() - CONTROLS_KEPT
        with self._lock:
            self._controls.append(control)
            while self._controls and (self._controls[0].sent or 0) < horizon:
                self._controls.popleft()

    def aborted_while_queued(self, launch: Launch) -> Control | None:
        """The newest abort that applies to ``launch`` (sent after it), if any."""
        with self._lock:
            return next((control for control in reversed(self._controls)
                         if control.intent is Intent.ABORT and _applies(control, launch)), None)

    def paused_while_queued(self, launch: Launch) -> bool:
        """True if the newest pause or resume that applies to ``launch`` is a pause."""
        with self._lock:
            latest = next((control for control in reversed(self._controls)
                           if control.intent in (Intent.PAUSE, Intent.RESUME) and _applies(control, launch)),
                          None)
        return latest is not None and latest.intent is Intent.PAUSE

    def set_while_queued(self, launch: Launch) -> list[dict[str, Any]]:
        """The attributes set on ``launch``'s operation's jobs since it was sent, oldest first."""
        if launch.operation is None:
            return []
        with self._lock:
            return [dict(control.attrs or {}) for control in self._controls
                    if control.intent is Intent.SET and _applies(control, launch)]


def _applies(control: Control, launch: Launch) -> bool:
    return control.applies_to(launch.job_id, launch.service, launch.sent, operation=launch.operation,
                              launched=launch.sent)
