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

from .errors import JobNotFound, Timeout
from .protocol.events import Event

if TYPE_CHECKING:
    from .client import Client
    from .job import Job

__all__ = ["EXIT_INTERRUPTED", "describe_text", "follow", "jobs_table", "pretty", "show_record"]

TERMINAL = ("finished", "failed", "aborted")
EXIT_INTERRUPTED = 130
#: While nothing arrives, look for the final record this often (the end may have come
#: before we subscribed, or its state event may have been lost with a connection).
RECORD_CHECK_INTERVAL = 5.0

OnInterrupt = Literal["abort", "detach"]


def fraction_of(data: dict[str, Any]) -> float | None:
    """``data["fraction"]``, else ``done / total``, else None (progress of unknown extent)."""
    fraction = data.get("fraction")
    if isinstance(fraction, int | float) and not isinstance(fraction, bool):
        return max(0.0, min(float(fraction), 1.0))
    done, total = data.get("done"), data.get("total")
    if isinstance(done, int | float) and isinstance(total, int | float) and total:
        return max(0.0, min(float(done) / float(total), 1.0))
    return None


def _summary(data: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value:.6g}" if isinstance(value, float) else f"{key}={value}"
                     for key, value in data.items()
                     if key not in ("fraction", "elapsed") and not isinstance(value, dict | list))[:80]


class _View:
    """A rich progress bar on stderr, or plain lines on stderr."""

    def __init__(self, job_id: str, bar: bool) -> None:
        self.bar = bar
        self.job_id = job_id
        self._progress: Any = None
        self._task: Any = None

    @contextlib.contextmanager
    def shown(self) -> Iterator[_View]:
        if not self.bar:
            yield self
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            Progress,
            SpinnerColumn,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        self._progress = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
            TimeElapsedColumn(), TextColumn("{task.fields[info]}"), console=Console(stderr=True))
        with self._progress:
            self._task = self._progress.add_task(f"job {self.job_id[:8]}", total=None, info="queued")
            yield self

    def progress(self, data: dict[str, Any]) -> None:
        fraction = fraction_of(data)
        if self._progress is None:
            percent = "" if fraction is None else f"{100 * fraction:5.1f}% "
            self.say(f"progress: {percent}{_summary(data)}".rstrip())
        elif fraction is None:
            self._progress.update(self._task, info=_summary(data))
        else:
            self._progress.update(self._task, total=1.0, completed=fraction, info=_summary(data))

    def state(self, state: str) -> None:
        if self._progress is None:
            self.say(f"state: {state}")
        elif state == "finished":  # the last progress message may have said 93%
            self._progress.update(self._task, total=1.0, completed=1.0, info=state)
        else:
            self._progress.update(self._task, info=state)

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
                job.status()  # raises JobNotFound for an id no worker holds
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
        view.progress(event.data)
    elif event.kind == "improved":
        view.say(f"improved: {json.dumps(event.data.get('state'))}")
    elif event.kind == "state":
        view.state(str(event.data.get("to", "")))
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


def jobs_table(jobs: list[dict[str, Any]]) -> None:
    """Print the jobs of all workers as a table on stdout."""
    if not jobs:
        print("no running jobs")
        return
    from rich.console import Console
    from rich.table import Column, Table

    table = Table(Column("job id", no_wrap=True, min_width=32),  # an id is never cut short
                  "service", "state", "progress", "worker")
    for job in sorted(jobs, key=lambda j: (str(j.get("service", "")), str(j.get("job_id", "")))):
        fraction = fraction_of(job.get("progress") or {})
        worker = job.get("worker") or {}
        table.add_row(str(job.get("job_id", "")), str(job.get("service", "")), str(job.get("state", "")),
                      "" if fraction is None else f"{100 * fraction:.0f}%",
                      f"{worker.get('hostname', '?')}:{worker.get('pid', '?')}")
    Console().print(table)
