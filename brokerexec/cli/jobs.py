"""The CLI verbs about one job: ``launch``, ``status``, ``set``, ``invoke``, ``checkpoint``,
``result`` and ``watch``.

Each is a plain click command that :mod:`brokerexec.cli` adds to its group. They run on the
one-shot client (:func:`~brokerexec.cli.input.ask`); only ``launch --follow`` and ``watch``
open the full client, for the job's events.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from .input import ask, broker_option, json_option, json_value, loads_strict, parse_request, request_option
from .output import EPILOG, EXIT_TIMEOUT, EXIT_USAGE, emit, exit_on_errors, fail, finish

if TYPE_CHECKING:
    from ..client.blocking import Client
    from ..protocol.intents import Intent

__all__ = ["COMMANDS", "checkpoint", "invoke", "launch", "result", "set_", "status", "watch"]


def _signal(client: Client, job_id: str, intent: Intent, **fields: Any) -> Any:
    """``Job.signal``: ``Job.set(**attrs)`` and ``Job.invoke(**kwargs)`` would take an
    attribute or argument called ``rpc_timeout`` as their own time-out."""
    return client.job(job_id).signal(intent, **fields)


@click.command(epilog=EPILOG)
@click.argument("name")
@request_option
@click.option("--follow", is_flag=True, help="Watch the job until it ends, then print its result.")
@broker_option
@json_option
def launch(name: str, request_text: str, follow: bool, broker: str, as_json: bool) -> None:
    """Launch a job of service NAME on whichever worker takes it; print its id.

    With --follow, behave like `watch` and print the result (or, with --json, the final
    record); Ctrl-C then stops following and leaves the job running.
    """
    request = parse_request(request_text)
    if not follow:
        job = ask(broker, lambda client: client.launch(name, request))
        emit({"job_id": job.id, "service": name}, as_json, lambda v: v["job_id"])
        return
    ask(broker, lambda client: None)  # fails fast (exit 5) when the broker is down
    with exit_on_errors():
        from ..client.blocking import Client
        from ..protocol.names import new_job_id
        from .display import follow as follow_job

        job_id = new_job_id()
        if not as_json:
            click.echo(f"job {job_id}", err=True)
        with Client(broker) as full:
            record = follow_job(full, job_id, as_json=as_json, on_interrupt="detach",
                                launch=lambda: full.launch(name, request, job_id=job_id))
    finish(record, as_json)


@click.command(epilog=EPILOG)
@click.argument("job_id")
@broker_option
@json_option
def status(job_id: str, broker: str, as_json: bool) -> None:
    """Show a job's state, since when, progress, worker and attempt, wherever it is in its
    life (with --json: the status object of docs/protocol.md)."""
    answer = ask(broker, lambda client: client.job(job_id).status())
    if as_json:
        emit(answer, as_json)
        return
    from .show import status_panel

    status_panel(job_id, answer)


@click.command(name="set", epilog=EPILOG)
@click.argument("job_id")
@click.argument("assignments", nargs=-1, required=True, metavar="KEY=VALUE...")
@broker_option
@json_option
def set_(job_id: str, assignments: tuple[str, ...], broker: str, as_json: bool) -> None:
    """Set attributes of a running job (values are JSON when they parse, else strings)."""
    attrs = {}
    for item in assignments:
        key, sep, text = item.partition("=")
        if not sep or not key:
            fail(f"{item!r} is not key=value", EXIT_USAGE)
        attrs[key] = json_value(text)
    from ..protocol.intents import Intent

    emit(ask(broker, lambda client: _signal(client, job_id, Intent.SET, attrs=attrs)), as_json)


@click.command(epilog=EPILOG)
@click.argument("job_id")
@click.argument("method")
@click.argument("arguments", required=False, default="[]")
@broker_option
@json_option
def invoke(job_id: str, method: str, arguments: str, broker: str, as_json: bool) -> None:
    """Call a declared METHOD of a running job.

    ARGUMENTS is a JSON list (positional arguments) or a JSON object (keyword arguments).
    """
    try:
        parsed = loads_strict(arguments)
    except ValueError as exc:
        fail(f"ARGUMENTS is not valid JSON: {exc}", EXIT_USAGE)
    if not isinstance(parsed, list | dict):
        fail("ARGUMENTS must be a JSON list (positional) or object (keywords), "
             f"not {type(parsed).__name__}", EXIT_USAGE)
    args, kwargs = (parsed, {}) if isinstance(parsed, list) else ([], parsed)
    from ..protocol.intents import Intent

    emit(ask(broker, lambda client: _signal(client, job_id, Intent.INVOKE, method=method, args=args,
                                            kwargs=kwargs)), as_json)


@click.command(epilog=EPILOG)
@click.argument("job_id")
@broker_option
@json_option
def checkpoint(job_id: str, broker: str, as_json: bool) -> None:
    """Take a checkpoint of a running job at its next ready(); print when it was taken."""
    taken = ask(broker, lambda client: client.job(job_id).checkpoint())
    emit({"job_id": job_id, **taken}, as_json, lambda v: f"checkpoint of {job_id} taken at {v['time']}")


@click.command(epilog=EPILOG)
@click.argument("job_id")
@click.option("--timeout", type=click.FloatRange(min=0), default=None,
              help="Seconds to wait (default: until the job ends).")
@broker_option
@json_option
def result(job_id: str, timeout: float | None, broker: str, as_json: bool) -> None:
    """Wait for a job to end; print its result (with --json, its final record)."""
    record = ask(broker, lambda client: client.job(job_id).record(timeout))
    if record is None:
        fail(f"job {job_id} did not end within {timeout} s", EXIT_TIMEOUT)
    finish(record, as_json)


@click.command(epilog=EPILOG)
@click.argument("job_id")
@broker_option
@json_option
def watch(job_id: str, broker: str, as_json: bool) -> None:
    """Show a job's progress bar and improved values until it ends, then its final state.

    Ctrl-C stops watching (exit 130); the job keeps running.
    """
    # Fast answers from the one-shot client for a down broker (5) or an unknown job (3).
    ask(broker, lambda client: client.job(job_id).record(0) or client.job(job_id).status())
    with exit_on_errors():
        from ..client.blocking import Client
        from .display import follow

        with Client(broker) as client:
            record = follow(client, job_id, as_json=as_json, on_interrupt="detach")
    finish(record, as_json)


#: In the order ``--help`` lists them after the local verbs.
COMMANDS = (launch, status, set_, invoke, checkpoint, result, watch)
