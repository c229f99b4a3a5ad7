"""The CLI verbs about many jobs: ``pause``, ``resume`` and ``abort`` (one job, or ``--all``)
and ``jobs`` (the fleet's listing; with ``--all``, the history store's pages, or the journal's
last hour when no history indexer runs).

``--all`` reaches every job on the broker, so without ``--service`` it asks first when stdin
is a terminal (``--yes`` skips the question; a script, whose stdin is not a terminal, is
not asked). It reports how many jobs acknowledged within :data:`ACK_WINDOW`: the jobs that
were running (or, for ``resume``, paused) are counted from the fleet's listing, and a job
acknowledges with its state event (``paused``, ``running``, ``aborted``) at its next
``ready()``; a job that calls ``ready()`` less often still applies it later.
"""

from __future__ import annotations

import sys
import threading
from typing import TYPE_CHECKING, Any

import click

from .input import ask, broker_option, json_option, parse_when, yes_option
from .output import EPILOG, EXIT_ABORTED, EXIT_USAGE, emit, exit_on_errors, fail

if TYPE_CHECKING:
    from ..client.blocking import Client
    from ..protocol.events import Event
    from ..protocol.lookups import Listing

__all__ = ["ACK_WINDOW", "COMMANDS", "abort", "filtered", "jobs", "pause", "resume"]

#: Seconds ``--all`` waits for jobs to acknowledge before it reports.
ACK_WINDOW = 1.0
#: Seconds the listing before ``--all`` gathers workers' answers.
LISTING_TIMEOUT = 0.5
#: Per verb: the states of the jobs it reaches, and the state that acknowledges it.
_REACHES = {"pause": (("running",), "paused"), "resume": (("paused",), "running"),
            "abort": (("running", "paused"), "aborted")}


def _broadcast(client: Client, verb: str, service: str | None) -> dict[str, Any]:
    """Send ``<verb>_all`` and count the jobs that acknowledge within ``ACK_WINDOW``."""
    reached, acknowledging = _REACHES[verb]
    before = client.listing(LISTING_TIMEOUT)
    targets = {str(job.get("job_id")) for job in before.running
               if job.get("state") in reached and service in (None, job.get("service"))}
    acknowledged: set[str] = set()
    changed = threading.Condition()

    def on_event(event: Event) -> None:  # on the listener's thread: record, wake, return
        if event.data.get("to") == acknowledging and event.job_id in targets:
            with changed:
                acknowledged.add(event.job_id)
                changed.notify_all()

    subscription = client.subscribe(f"state.{service or '*'}.*", on_event)
    try:
        getattr(client, f"{verb}_all")(service)
        with changed:
            changed.wait_for(lambda: acknowledged >= targets, ACK_WINDOW)
            count = len(acknowledged)
    finally:
        subscription.close()
    return {"sent": f"{verb}_all", "service": service, "workers": len(before.workers),
            "jobs": len(targets), "acknowledged": count, "within": ACK_WINDOW}


def _broadcast_text(verb: str, answer: dict[str, Any]) -> str:
    done = {"pause": "paused", "resume": "resumed", "abort": "aborted"}[verb]
    of = f" of service {answer['service']}" if answer["service"] else ""
    if not answer["workers"]:
        return f"{verb} sent to every job{of}; no worker answered (it applies on reconnection)"
    text = f"{answer['acknowledged']} of {answer['jobs']} jobs{of} {done} within {answer['within']:g} s"
    if answer["acknowledged"] < answer["jobs"]:
        text += " (the others apply it at their next ready())"
    return text


def _confirmed(verb: str) -> bool:
    if not sys.stdin.isatty():
        return True  # a script: asking would hang it or read its input; see the docstring
    return click.confirm(f"{verb} every job on this broker, of every service?", default=False,
                         err=True)


def _steer(verb: str) -> click.Command:
    def command(job_id: str | None, all_jobs: bool, service: str | None, yes: bool, broker: str,
                as_json: bool) -> None:
        if bool(job_id) == all_jobs:
            fail(f"{verb} needs a job id or --all (not both)", EXIT_USAGE)
        if service is not None and not all_jobs:
            fail("--service only goes with --all", EXIT_USAGE)
        if not all_jobs:
            accepted = ask(broker, lambda client: getattr(client.job(str(job_id)), verb)())
            emit({"job_id": job_id, "accepted": accepted}, as_json,
                 lambda v: f"{verb} of {job_id} {'accepted' if v['accepted'] else 'not accepted'}")
            return
        if service is None and not yes and not _confirmed(verb):
            fail(f"{verb} --all not confirmed; nothing sent", EXIT_ABORTED, "brokerexec.Interrupted")
        answer = ask(broker, lambda client: _broadcast(client, verb, service))
        emit(answer, as_json, lambda v: _broadcast_text(verb, v))

    command.__name__ = verb
    command.__doc__ = (f"{verb.capitalize()} job JOB_ID, or every job on every worker (--all, "
                       f"optionally only those of one --service); --all reports how many "
                       f"acknowledged within {ACK_WINDOW:g} s.")
    decorators = [click.command(name=verb, epilog=EPILOG), click.argument("job_id", required=False),
                  click.option("--all", "all_jobs", is_flag=True, help="Every job on every worker."),
                  click.option("--service", help="With --all: only jobs of this service."),
                  yes_option, broker_option, json_option]
    for decorator in reversed(decorators):
        command = decorator(command)
    return command  # type: ignore[return-value]


pause, resume, abort = _steer("pause"), _steer("resume"), _steer("abort")

#: Without a history indexer, --all lists the jobs that ended this recently (from the journal).
ENDED_WITHIN = 3600.0
#: The most ended jobs the journal's listing reads.
JOURNAL_LISTING_LIMIT = 1000
#: --limit's default: one page of the history.
PAGE = 50
#: The filters that need --all (the fleet's live listing has no such fields).
_HISTORY_ONLY = ("since", "until", "operation", "search", "cursor")


@click.command(epilog=EPILOG)
@click.option("--all", "all_jobs", is_flag=True,
              help="Every job the history store keeps, newest first, a page at a time (without a "
                   f"history indexer: the jobs that ended in the last {ENDED_WITHIN / 3600:g} h).")
@click.option("--service", help="Only jobs of this service.")
@click.option("--state", type=click.Choice(("queued", "running", "paused", "resuming", "finished",
                                            "failed", "aborted")), help="Only jobs in this state.")
@click.option("--worker", help="Only jobs that ran on this host.")
@click.option("--since", "since_text", metavar="WHEN",
              help="With --all: jobs that last moved at or after WHEN (2h, 3d, 2026-12-05, ...).")
@click.option("--until", "until_text", metavar="WHEN", help="With --all: ... and before WHEN.")
@click.option("--operation", help="With --all: only jobs of this operation.")
@click.option("--search", metavar="TEXT", help="With --all: TEXT in the id, request, result or error.")
@click.option("--limit", type=click.IntRange(1, 1000), default=PAGE, show_default=True,
              help="With --all: the most jobs on a page.")
@click.option("--cursor", help="With --all: the page after the one whose footer gave this cursor.")
@click.option("--timeout", type=click.FloatRange(min=0), default=0.5, show_default=True,
              help="Seconds to gather the workers' answers.")
@broker_option
@json_option
def jobs(all_jobs: bool, service: str | None, state: str | None, worker: str | None,
         since_text: str | None, until_text: str | None, operation: str | None, search: str | None,
         limit: int, cursor: str | None, timeout: float, broker: str, as_json: bool) -> None:
    """Jobs across the fleet: running, then queued and resuming (id, service, state,
    progress, worker); with --all, every job the history store keeps (`brokerexec history`),
    newest first, filtered, a page at a time; the footer says how many matched and how to
    get the next page."""
    given = {"since": since_text, "until": until_text, "operation": operation, "search": search,
             "cursor": cursor}
    without_all = [f"--{name}" for name in _HISTORY_ONLY if given[name] is not None]
    if without_all and not all_jobs:
        fail(f"{', '.join(without_all)} only go(es) with --all (the history)", EXIT_USAGE)
    since = None if since_text is None else parse_when(since_text, "--since")
    until = None if until_text is None else parse_when(until_text, "--until")
    if not all_jobs:
        listed = ask(broker, lambda client: client.listing(timeout))
        listed = filtered(listed, service=service, state=state, worker=worker)
        if as_json:
            emit(listed.jobs, as_json)
            return
        from .show import jobs_table

        jobs_table(listed)
        return
    from ..errors import HistoryUnavailable
    from ..protocol.history import HistoryQuery

    with exit_on_errors():  # a bad cursor is exit 2 before anything is sent
        query = HistoryQuery(service, state, since, until, worker, operation, search, limit, cursor,
                             count=True)

    def page_or_none(client: Client) -> Any:
        try:
            return client.history(**query.filters())
        except HistoryUnavailable as exc:
            return exc

    page = ask(broker, page_or_none)
    if isinstance(page, HistoryUnavailable):
        _from_journal(broker, timeout, as_json, page, service=service, state=state, worker=worker,
                      since=since, until=until, operation=operation, search=search, limit=limit,
                      cursor=cursor)
        return
    if as_json:
        emit({"jobs": page.rows, "total": page.total, "cursor": page.cursor, "source": "history"}, True)
        return
    from .show import history_table

    history_table(page)


def _from_journal(broker: str, timeout: float, as_json: bool, why: Exception, *, cursor: str | None,
                  limit: int, **filters: Any) -> None:
    """``jobs --all`` without a history indexer: the fleet and the journal's last hour, as
    before there was a history store, with the same filters applied here."""
    click.echo(f"brokerexec: {why}; listing the running jobs and those that ended in the last "
               f"{ENDED_WITHIN / 3600:g} h from the journal instead", err=True)
    if cursor is not None:
        fail("--cursor needs the history store: no history indexer runs on this broker", EXIT_USAGE)
    listed = ask(broker, lambda client: client.listing(timeout, ended_within=ENDED_WITHIN))
    capped = len(listed.ended) >= JOURNAL_LISTING_LIMIT
    listed = filtered(listed, **filters)
    matched = listed.jobs
    if as_json:
        emit({"jobs": matched[:limit], "total": len(matched), "cursor": None, "source": "journal",
              "capped": capped}, True)
        return
    from .show import jobs_table

    jobs_table(listed, ended=True, limit=limit, capped=capped)


def filtered(listing: Listing, *, service: str | None = None, state: str | None = None,
             worker: str | None = None, since: float | None = None, until: float | None = None,
             operation: str | None = None, search: str | None = None) -> Listing:
    """The listing's jobs that pass the filters (the fleet's live listing knows no operation:
    given one, nothing passes)."""
    from ..protocol.lookups import Listing

    def passes(job: dict[str, Any]) -> bool:
        moved = job.get("end") or job.get("since") or job.get("start") or 0.0
        host = (job.get("worker") or {}).get("hostname")
        return ((service is None or job.get("service") == service)
                and (state is None or job.get("state") == state)
                and (worker is None or host == worker)
                and (since is None or moved >= since) and (until is None or moved < until)
                and operation is None
                and (not search or search in str(job.get("job_id", ""))))

    return Listing(listing.workers, [j for j in listing.running if passes(j)],
                   [j for j in listing.queued if passes(j)], [j for j in listing.ended if passes(j)])


COMMANDS = (pause, resume, abort, jobs)
