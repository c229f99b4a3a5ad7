"""What ``status`` and ``jobs`` show people (``--json`` prints the objects themselves).

``status`` is one short panel of the same shape whatever the job's state: state, since
(local time and how long ago), progress (a bar when a fraction is known), worker and
attempt; an ended job adds its end and its error. ``jobs`` is a table with a footer saying
how many workers answered and how many jobs run and wait, so an empty table cannot be
mistaken for an idle fleet when no worker answered. Both use rich, imported only here.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from ..client.pace import clock, fraction_of
from .display import label, summary

if TYPE_CHECKING:
    from ..protocol.history import HistoryPage
    from ..protocol.lookups import Listing

__all__ = ["ago", "bar", "history_footer", "history_table", "jobs_table", "local_time", "status_panel",
           "status_rows", "worker_name"]

BAR_WIDTH = 20


def ago(when: float, now: float | None = None) -> str:
    """``12 s ago``, ``3 min ago``, ``2 h ago``, ``4 days ago``."""
    seconds = max(0.0, (time.time() if now is None else now) - when)
    for unit, size in (("day", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            count = int(seconds // size)
            return f"{count} {unit}{'s' if unit == 'day' and count > 1 else ''} ago"
    return f"{int(seconds)} s ago"


def local_time(when: Any, now: float | None = None) -> str:
    """An epoch time as local time: the clock today, else the date too; ``-`` if unknown."""
    if not isinstance(when, int | float) or isinstance(when, bool) or when <= 0:
        return "-"
    stamp = time.localtime(when)
    today = time.localtime(time.time() if now is None else now)
    same_day = stamp[:3] == today[:3]
    return time.strftime("%H:%M:%S" if same_day else "%Y-%m-%d %H:%M", stamp)


def bar(fraction: float, width: int = BAR_WIDTH) -> str:
    """``[#########...........]  45%``: plain characters, readable in a log too."""
    filled = round(fraction * width)
    return f"[{'#' * filled}{'.' * (width - filled)}] {100 * fraction:3.0f}%"


def worker_name(worker: Any) -> str:
    """``host:pid`` of a worker's description; ``-`` when none holds the job."""
    if not isinstance(worker, dict) or not worker:
        return "-"
    return f"{worker.get('hostname', '?')}:{worker.get('pid', '?')}"


def status_rows(job_id: str, status: dict[str, Any], now: float | None = None) -> list[tuple[str, str]]:
    """The panel's rows, for a status from a worker or from the journal (running or ended)."""
    record = status.get("record") if isinstance(status.get("record"), dict) else None
    source = record or status
    state = str(status.get("state", "?"))
    flags = [name for name, key in (("pause requested", "pause_requested"),
                                    ("abort requested", "abort_requested"),
                                    ("handing over", "handover_requested")) if status.get(key)]
    since = source.get("end") if record else status.get("since")
    rows = [("job", f"{job_id} ({label(job_id)})"),
            ("state", state + (f" ({', '.join(flags)})" if flags else ""))]
    if isinstance(since, int | float) and since > 0:
        rows.append(("since", f"{local_time(since, now)} ({ago(since, now)})"))
    if record:
        start, end = record.get("start"), record.get("end")
        timed = isinstance(start, int | float) and isinstance(end, int | float)
        took = f" (ran {clock(end - start)})" if timed else ""
        rows.append(("started", f"{local_time(start, now)}{took}"))
    progress = status.get("progress") or (record or {}).get("progress")  # an ended job's last
    progress = progress if isinstance(progress, dict) else {}
    if progress:
        fraction = fraction_of(progress)
        shown = {key: value for key, value in progress.items() if key not in ("fraction", "elapsed")}
        detail = summary(shown, 60)
        rows.append(("progress", f"{bar(fraction)}  {detail}".rstrip() if fraction is not None else detail))
    improved = record.get("improved") if record else None
    if isinstance(improved, dict) and summary(improved, 60):
        rows.append(("improved", summary(improved, 60)))  # its best value
    rows.append(("worker", worker_name(source.get("worker") or status.get("worker"))))
    rows.append(("attempt", str(status.get("attempt", source.get("attempt", "-")))))
    error = record.get("error") if record else None
    if isinstance(error, dict):
        rows.append(("error", f"{error.get('type')}: {error.get('message')}"))
    return rows


def status_panel(job_id: str, status: dict[str, Any]) -> None:
    """Print the status panel on stdout."""
    from rich.console import Console
    from rich.panel import Panel
    from rich.table import Table

    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    for name, value in status_rows(job_id, status):
        grid.add_row(name, value)
    service = status.get("service") or (status.get("record") or {}).get("service") or "status"
    Console(highlight=False).print(Panel(grid, title=str(service), title_align="left", expand=False))


def footer(listing: Listing, ended: bool, shown: int | None = None, capped: bool = False) -> str:
    """``3 workers answered, 5 running, 2 queued`` (``no worker answered`` when none did)."""
    count = len(listing.workers)
    parts = [f"{count} worker{'s' if count != 1 else ''} answered" if count else "no worker answered",
             f"{len(listing.running)} running"]
    waiting = {job.get("job_id") for job in listing.queued}
    resuming = sum(1 for job in listing.queued if job.get("state") == "resuming")
    parts.append(f"{len(waiting) - resuming} queued")
    if resuming:
        parts.append(f"{resuming} resuming")
    if ended:
        parts.append(f"{len(listing.ended)} ended in the last hour"
                     + (" (the journal's listing stops there: there may be more)" if capped else ""))
    text = ", ".join(parts)
    if shown is not None and shown < len(listing.jobs):
        text += f"; the first {shown} of {len(listing.jobs)} shown (--limit)"
    return text


def _console() -> Any:
    from rich.console import Console

    console = Console(highlight=False)
    if not console.is_terminal:  # a pipe or a file: whole rows, not rich's 80 columns
        console.width = 200
    return console


def jobs_table(listing: Listing, ended: bool = False, limit: int | None = None, capped: bool = False) -> None:
    """Print the fleet's jobs as a table on stdout (the first ``limit``), then the footer."""
    from rich.table import Column, Table

    console = _console()
    jobs = listing.jobs[:limit]
    if jobs:
        # min_width: an id is never cut short
        columns: list[Column | str] = [Column("job id", no_wrap=True, min_width=32),
                   "service", "state", "progress", "worker"]
        if ended:
            columns += ["start", "end", "attempts"]
        table = Table(*columns)
        for job in jobs:
            fraction = fraction_of(job.get("progress") or {})
            row = [str(job.get("job_id", "")), str(job.get("service", "")), str(job.get("state", "")),
                   "" if fraction is None else f"{100 * fraction:.0f}%", worker_name(job.get("worker"))]
            if ended:
                row += [local_time(job.get("start") or job.get("since")), local_time(job.get("end")),
                        str(job.get("attempt", "-"))]
            table.add_row(*row)
        console.print(table)
    console.print(footer(listing, ended, None if limit is None else len(jobs), capped))


def history_footer(page: HistoryPage) -> str:
    """``50 of 1,234 matching jobs, newest first; next page: --cursor ...``: never a silent cap."""
    shown, total = len(page.rows), page.total
    if total is None:
        total = shown
    if not shown:
        return "no job in the history store matches"
    if page.cursor:
        return f"{shown:,} of {total:,} matching jobs, newest first; next page: --cursor {page.cursor}"
    if shown < total:
        return f"the last {shown:,} of {total:,} matching jobs"
    return f"{shown:,} matching job{'s' if shown != 1 else ''}"


def history_table(page: HistoryPage) -> None:
    """Print a page of the history store as a table on stdout, then its footer."""
    from rich.table import Column, Table

    console = _console()
    if page.rows:
        table = Table(Column("job id", no_wrap=True, min_width=32), "service", "state", "worker",
                      "attempts", "launched", "ended", "ran")
        for row in page.rows:
            workers = row.get("workers") or []
            run_time = row.get("run_time")
            table.add_row(str(row.get("job_id", "")), str(row.get("service", "")), str(row.get("state", "")),
                          str(workers[-1]) if workers else "-", str(row.get("attempts", 0)),
                          local_time(row.get("launched") or row.get("started")), local_time(row.get("ended")),
                          clock(run_time) if isinstance(run_time, int | float) else "-")
        console.print(table)
    console.print(history_footer(page))
