"""The CLI verbs about many jobs: ``pause``, ``resume`` and ``abort`` (one job, or ``--all``)
and ``jobs`` (the fleet's listing).

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

from .input import ask, broker_option, json_option, yes_option
from .output import EPILOG, EXIT_ABORTED, EXIT_USAGE, emit, fail

if TYPE_CHECKING:
    from ..client.blocking import Client
    from ..protocol.events import Event

__all__ = ["ACK_WINDOW", "COMMANDS", "abort", "jobs", "pause", "resume"]

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

#: With --all: how far back ended jobs are listed (the journal keeps far longer).
ENDED_WITHIN = 3600.0


@click.command(epilog=EPILOG)
@click.option("--all", "all_jobs", is_flag=True,
              help=f"Also the jobs that ended in the last {ENDED_WITHIN / 3600:g} h.")
@click.option("--timeout", type=click.FloatRange(min=0), default=0.5, show_default=True,
              help="Seconds to gather the workers' answers.")
@broker_option
@json_option
def jobs(all_jobs: bool, timeout: float, broker: str, as_json: bool) -> None:
    """Jobs across the fleet: running, then queued and resuming (id, service, state,
    progress, worker), with --all also recently ended ones (start, end, attempts)."""
    listed = ask(broker, lambda client: client.listing(
        timeout, ended_within=ENDED_WITHIN if all_jobs else None))
    if as_json:
        emit(listed.jobs, as_json)
        return
    from .show import jobs_table

    jobs_table(listed, ended=all_jobs)


COMMANDS = (pause, resume, abort, jobs)
