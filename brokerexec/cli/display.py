"""What the CLI shows: a job being followed, final records, the jobs table.

Everything here writes to stderr, so stdout carries only the command's answer (one JSON
document with ``--json``). When stderr is a terminal and ``--json`` is off, progress is a
live rich bar with improved values printed above it; otherwise each progress, improved and
state message is one plain line, for logs and pipes.

Ctrl-C while following: ``run`` aborts the job and waits for its final record; ``watch``
stops watching and leaves the job alone. A second Ctrl-C exits at once. The SIGINT handler
only counts and wakes the follow loop (``SimpleQueue.put`` is safe in a signal handler), so
an interrupt can never land half-way through drawing or an RPC.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Literal

from ..client.pace import Pace, clock, fraction_of
from ..errors import JobNotFound, Timeout
from ..protocol.events import Event

if TYPE_CHECKING:
    from ..client.blocking import Client
    from ..client.job import Job

__all__ = ["EXIT_INTERRUPTED", "describe_text", "follow", "label", "pretty", "show_record", "summary"]

TERMINAL = ("finished", "failed", "aborted")
EXIT_INTERRUPTED = 130
#: While nothing arrives, look for the final record this often (the end may have come
#: before we subscribed, or its state event may have been lost with a connection).
RECORD_CHECK_INTERVAL = 5.0

OnInterrupt = Literal["abort", "detach"]
BAR_WIDTH = 20
#: Columns the live bar's spinner, label, bar, percentage and clocks take, with padding.
FIXED_COLUMNS = 2 + 15 + BAR_WIDTH + 1 + 5 + 23


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list) and all(isinstance(v, int | float) for v in value):
        return "[" + ", ".join(f"{v:.4g}" for v in value) + "]"
    return str(value)


def summary(data: dict[str, Any], limit: int = 80) -> str:
    """``key=value, ...`` of what can be shown on a line (short lists of numbers included)."""
    return ", ".join(f"{key}={_value(value)}" for key, value in data.items()
                     if key not in ("fraction", "elapsed") and not isinstance(value, dict)
                     and not (isinstance(value, list) and len(value) > 8))[:limit]


def label(job_id: str) -> str:
    """A job's short name: the random tail of its id (its head is the launch time, the same
    for every job launched within a minute)."""
    return f"job …{job_id[-8:]}"


class _View:
    """A rich progress bar on stderr, or plain lines on stderr."""

    def __init__(self, job_id: str, bar: bool) -> None:
        self.bar = bar
        self.job_id = job_id
        self.pace = Pace()
        self._progress: Any = None
        self._task: Any = None
        self._info = "waiting"
        self._ended = False

    @contextlib.contextmanager
    def shown(self) -> Iterator[_View]:
        if not self.bar:
            yield self
            return
        from rich.console import Console
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn
        from rich.table import Column

        # Fixed widths for what must stay readable; the service's own values take the rest.
        self._progress = Progress(
            SpinnerColumn(), TextColumn("{task.description}", table_column=Column(no_wrap=True)),
            BarColumn(bar_width=BAR_WIDTH),
            TextColumn("{task.fields[percent]}", table_column=Column(width=4, no_wrap=True)),
            TextColumn("{task.fields[times]}", table_column=Column(min_width=22, no_wrap=True)),
            TextColumn("{task.fields[info]}", table_column=Column(no_wrap=True, overflow="ellipsis")),
            console=Console(stderr=True))
        with self._progress:
            self._task = self._progress.add_task(label(self.job_id), total=None, percent="",
                                                 times="", info=self._info)
            self.tick()
            yield self

    def _times(self, now: float) -> str:
        elapsed = self.pace.elapsed(now)
        eta = None if self._ended else self.pace.eta(now)
        text = "" if elapsed is None else f"elapsed {clock(elapsed)}"
        return f"{text}, ETA {clock(eta)}" if eta is not None else text

    def tick(self) -> None:
        """Redraw: the bar moves on between reports, the clocks count."""
        if self._progress is None:
            return
        now = time.time()
        fraction = 1.0 if self._ended and self._info == "finished" else self.pace.fraction(now)
        # The service's values get what the fixed columns leave: they, not the bar, are cut.
        room = max(self._progress.console.width - FIXED_COLUMNS, 0)
        info = self._info if len(self._info) <= room else self._info[:max(room - 1, 0)] + "…"
        fields = {"times": self._times(now), "info": info,
                  # floored: 99.6% is not "100%" while it runs
                  "percent": "" if fraction is None else f"{int(100 * fraction):3d}%"}
        if fraction is None:
            self._progress.update(self._task, **fields)
        else:
            self._progress.update(self._task, total=1.0, completed=fraction, **fields)
        self._progress.refresh()  # else a line printed above redraws the bar as it last was

    def progress(self, data: dict[str, Any], when: float) -> None:
        elapsed = data.get("elapsed")
        if isinstance(elapsed, int | float) and not isinstance(elapsed, bool):
            self.pace.started(when - elapsed)
        fraction = fraction_of(data)
        if fraction is not None:
            self.pace.report(when, fraction)
        self._info = summary(data)
        if self._progress is None:
            percent = "" if fraction is None else f"{100 * fraction:5.1f}% "
            times = self._times(when)
            self.say(f"progress: {percent}{self._info}{f' ({times})' if times else ''}".rstrip())
        self.tick()

    def state(self, state: str, data: dict[str, Any]) -> None:
        self.pace.started(data.get("start"))
        self._ended = state in TERMINAL
        self._info = state
        if self._progress is None:
            self.say(f"state: {state}")
        self.tick()

    def improved(self, state: Any, when: float) -> None:
        """An improved value, printed above the bar, with when it came in the job's time."""
        shown = summary(state, 200) if isinstance(state, dict) and summary(state) else json.dumps(state)
        elapsed = self.pace.elapsed(when)
        self.say(f"improved: {shown}{f' (at {clock(elapsed)})' if elapsed is not None else ''}")

    def say(self, text: str) -> None:
        """One line above the bar, or on stderr."""
        if self._progress is not None:
            self._progress.console.print(text, highlight=False, markup=False)
        else:
            print(text, file=sys.stderr, flush=True)


class _Interrupts:
    """Counts SIGINTs while following: the first wakes the loop, the second exits at once."""

    def __init__(self, inbox: queue.SimpleQueue[Event | None]) -> None:
        self.count = 0
        self._inbox = inbox
        self._previous: Any = None

    @contextlib.contextmanager
    def installed(self) -> Iterator[_Interrupts]:
        if threading.current_thread() is not threading.main_thread():
            yield self  # signals are only delivered to the main thread's handlers
            return
        self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            yield self
        finally:
            # None: the previous handler was not set from Python; the default is the best guess.
            signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.SIG_DFL)

    def _on_sigint(self, _signum: int, _frame: Any) -> None:
        self.count += 1
        if self.count > 1:
            os.write(2, b"\nbrokerexec: interrupted again, exiting now\n")
            os._exit(EXIT_INTERRUPTED)
        self._inbox.put(None)


def follow(client: Client, job_id: str, *, as_json: bool = False,
           launch: Callable[[], Any] | None = None,
           on_interrupt: OnInterrupt = "abort") -> dict[str, Any] | None:
    """Show a job's progress and improvements until it ends; return its final record.

    With ``launch``, subscribe first and then call it, so no event is missed. Returns None
    when the user pressed Ctrl-C and ``on_interrupt`` is ``"detach"``.

    Raises:
        JobNotFound: no launch given, and the job is neither running nor ended.
    """
    job = client.job(job_id)
    inbox: queue.SimpleQueue[Event | None] = queue.SimpleQueue()
    view = _View(job_id, bar=sys.stderr.isatty() and not as_json)
    interrupts = _Interrupts(inbox)
    subscription = client.subscribe(f"*.*.{job_id}", inbox.put)
    try:
        with interrupts.installed():
            if launch is not None:
                launch()
            else:  # subscribed first: an end after this check is seen as an event
                record = job.record(0)
                if record is not None:
                    return record
                known = job.status()  # raises JobNotFound for an id no worker holds
                # Elapsed time counts from the job's start, not from when watching began.
                view.pace.started(known.get("start") or (
                    known.get("since") if known.get("state") == "running" else None))
            with view.shown():
                ended = _pump(job, inbox, view, on_interrupt)
            if not ended:
                view.say(f"stopped watching; job {job_id} keeps running "
                         f"(brokerexec abort {job_id} stops it)")
                return None
            record = job.record(30)
    finally:
        subscription.close()
    if record is None:
        raise Timeout(f"job {job_id} ended but its final record did not arrive within 30 s")
    return record


def _pump(job: Job, inbox: queue.SimpleQueue[Event | None], view: _View,
          on_interrupt: OnInterrupt) -> bool:
    """Draw events until the job ends (True) or the user detaches (False)."""
    abort_wanted = False
    next_check = time.monotonic() + RECORD_CHECK_INTERVAL
    while True:
        try:
            event = inbox.get(timeout=0.5)
        except queue.Empty:
            event = None
            view.tick()
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + RECORD_CHECK_INTERVAL
                if job.record(0) is not None:
                    return True
        else:
            if event is None:  # Ctrl-C (see _Interrupts)
                if on_interrupt == "detach":
                    return False
                view.say("aborting the job (Ctrl-C again to quit at once)")
                abort_wanted = True
        if abort_wanted:
            abort_wanted = not _try_abort(job)
        if event is not None and _show(view, event):
            return True


def _show(view: _View, event: Event) -> bool:
    """Draw one event; True if it is the job's final state."""
    if event.kind == "progress":
        view.progress(event.data, event.time)
    elif event.kind == "improved":
        view.improved(event.data.get("state"), event.time)
    elif event.kind == "state":
        view.state(str(event.data.get("to", "")), event.data)
        return event.data.get("to") in TERMINAL
    return False


def _try_abort(job: Job) -> bool:
    """Send the abort; False if it must be tried again (the job is still queued)."""
    try:
        job.abort(timeout=5)
    except JobNotFound:
        return job.record(0) is not None  # ended: done; not started yet: again later
    except Timeout:
        return False
    return True


def pretty(value: Any) -> str:
    """A value for people: indented JSON for objects and lists, else its text."""
    return json.dumps(value, indent=2, sort_keys=True) if isinstance(value, dict | list) else str(value)


def show_record(record: dict[str, Any], as_json: bool) -> None:
    """A final record: all of it as JSON, or its result on stdout / its error on stderr."""
    state = record.get("state")
    if as_json:
        print(json.dumps(record), flush=True)
    elif state == "finished":
        print(pretty(record.get("result")), flush=True)
    elif state == "failed":
        error = record.get("error") or {}
        if error.get("traceback"):
            print(str(error["traceback"]).rstrip(), file=sys.stderr)
        print(f"job {record.get('job_id')} failed: {error.get('type')}: {error.get('message')}",
              file=sys.stderr, flush=True)
    else:
        print(f"job {record.get('job_id')} {state}", file=sys.stderr, flush=True)


def describe_text(description: dict[str, Any]) -> str:
    """A service's ``describe()`` for people: inputs, settable attributes, invokable methods."""
    lines = [f"{description['name']}: {description['help']}",
             "inputs:" if description["inputs"] else "request: free-form (any JSON object)"]
    for port in description["inputs"]:
        default = " (required)" if port["required"] else f" = {json.dumps(port.get('default'))}"
        lines.append(f"  {port['name']}: {port['type']}{default}  {port['help']}".rstrip())
    settable = ", ".join(f"{name}: {kind}" for name, kind in description["settable"].items())
    lines.append(f"settable: {settable or 'none'}")
    lines.append(f"invokable: {', '.join(description['invokable']) or 'none'}")
    return "\n".join(lines)
