"""The ``brokerexec`` command line.

Exit codes (also in ``brokerexec --help``):

====  ==========================================================
0     success
1     the job failed, or the remote side returned an error
2     usage error or bad input (request JSON, service spec, arguments)
3     not found: no worker holds that job id
4     time-out: something did not answer in time
5     the broker cannot be reached
130   interrupted (Ctrl-C), or the job was aborted
====  ==========================================================

One-shot verbs (launch, status, pause, resume, abort, set, invoke, checkpoint, result, jobs)
use a plain blocking pika connection (:mod:`brokerexec.transport.pika_client`) and start
fast: nothing heavy (rich, aio-pika) is imported at module level, only inside the commands
that need it.
``run`` uses the embedded in-memory broker; ``worker``, ``watch`` and ``launch --follow``
the full RabbitMQ transport.
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any, NoReturn

import click

from .cli_config import config, config_option, given_settings, worker_options
from .cli_input import (
    ask,
    broker_option,
    json_option,
    json_value,
    loads_strict,
    parse_request,
    pool_options,
    request_option,
)
from .cli_output import (
    EPILOG,
    EXIT_ABORTED,
    EXIT_BROKER,
    EXIT_FAILED,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_TIMEOUT,
    EXIT_USAGE,
    emit,
    exit_on_errors,
    fail,
    finish,
)

if TYPE_CHECKING:
    from .client import Client
    from .pool import PoolKind
    from .protocol.intents import Intent

__all__ = ["EXIT_ABORTED", "EXIT_BROKER", "EXIT_FAILED", "EXIT_NOT_FOUND", "EXIT_OK",
           "EXIT_TIMEOUT", "EXIT_USAGE", "cli", "main"]

#: Kept under its old name: tests reach it as ``brokerexec.cli._json_value``.
_json_value = json_value


def _signal(client: Client, job_id: str, intent: Intent, **fields: Any) -> Any:
    """``Job.signal``: ``Job.set(**attrs)`` and ``Job.invoke(**kwargs)`` would take an
    attribute or argument called ``rpc_timeout`` as their own time-out."""
    return client.job(job_id).signal(intent, **fields)


@click.group(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="brokerexec")
@config_option
def cli() -> None:
    """Run long computations on workers and steer them while they run."""


cli.add_command(config)


# ---- local runs ------------------------------------------------------------------------------


@cli.command(epilog=EPILOG)
@click.argument("service_spec", metavar="MODULE:Class|file.py:Class")
@request_option
@click.option("--progress-delta", type=click.FloatRange(min=0), help="Seconds between progress messages.")
@click.option("--checkpoint-delta", type=click.FloatRange(min=0), help="Seconds between checkpoints.")
@click.option("--improved-delta", type=click.FloatRange(min=0),
              help="At most one improved message per this many seconds.")
@pool_options
@json_option
def run(service_spec: str, request_text: str, progress_delta: float | None,
        checkpoint_delta: float | None, improved_delta: float | None, pool_kind: PoolKind,
        pool_size: int | None, as_json: bool) -> None:
    """Run one service here, on the embedded broker, showing its progress.

    Ctrl-C aborts the job and waits for it to stop; a second Ctrl-C quits at once.
    """
    import logging
    import uuid

    from .client import Client
    from .display import follow
    from .protocol.names import new_job_id
    from .registry import load_service
    from .worker import WorkerSettings

    request = parse_request(request_text)
    # The embedded worker's warnings about a refused launch repeat what the record says.
    logging.getLogger("brokerexec.worker").setLevel(logging.ERROR)
    with exit_on_errors():
        service = load_service(service_spec)
        settings = WorkerSettings(concurrency=1, pool_kind=pool_kind, pool_size=pool_size,
                                  abort_grace=5.0)
        # The worker checks the request, as it would over RabbitMQ: an invalid input is a
        # failed job (exit 1) with the same message a remote launch gets.
        with Client(f"memory://run-{uuid.uuid4().hex}", services=[service],
                    worker_settings=settings) as client:
            job_id = new_job_id()
            record = follow(client, job_id, as_json=as_json, on_interrupt="abort",
                            launch=lambda: client.launch(
                                service.name, request, job_id=job_id, progress_delta=progress_delta,
                                checkpoint_delta=checkpoint_delta, improved_delta=improved_delta))
    finish(record, as_json)


@cli.command(epilog=EPILOG)
@click.argument("service_spec", metavar="MODULE:Class|file.py:Class")
@json_option
def describe(service_spec: str, as_json: bool) -> None:
    """Show a service's inputs, settable attributes and invokable methods."""
    from .registry import load_service

    with exit_on_errors():
        description = load_service(service_spec).describe()
    if as_json:
        click.echo(json.dumps(description))
    else:
        from .display import describe_text

        click.echo(describe_text(description))


# ---- the worker --------------------------------------------------------------------------------


@cli.command(epilog=EPILOG)
@worker_options
def worker(**options: Any) -> None:
    """Run jobs launched on the broker until SIGTERM or Ctrl-C, then stop gracefully.

    Stopping takes no new jobs; running jobs whose service can resume store a checkpoint at
    their next ready() and go back to be resumed by another worker; the others finish
    within --shutdown-grace or are aborted then. Every record is stored. A second signal
    exits at once. Should this worker die instead, its jobs are resumed elsewhere from
    their last checkpoint. Each option may come from a BROKEREXEC_* variable or the
    --config file instead (see docs/configuration.md and `brokerexec config`).
    """
    from .cli_worker import serve

    serve(given_settings(options))


# ---- client verbs --------------------------------------------------------------------------------


@cli.command(epilog=EPILOG)
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
        from .client import Client
        from .display import follow as follow_job
        from .protocol.names import new_job_id

        job_id = new_job_id()
        if not as_json:
            click.echo(f"job {job_id}", err=True)
        with Client(broker) as full:
            record = follow_job(full, job_id, as_json=as_json, on_interrupt="detach",
                                launch=lambda: full.launch(name, request, job_id=job_id))
    finish(record, as_json)


@cli.command(epilog=EPILOG)
@click.argument("job_id")
@broker_option
@json_option
def status(job_id: str, broker: str, as_json: bool) -> None:
    """Show a job's state and last progress (or its final record once it ended)."""
    emit(ask(broker, lambda client: client.job(job_id).status()), as_json)


def _steer(verb: str) -> click.Command:
    def command(job_id: str | None, all_jobs: bool, service: str | None, broker: str,
                as_json: bool) -> None:
        if bool(job_id) == all_jobs:
            fail(f"{verb} needs a job id or --all (not both)", EXIT_USAGE)
        if service is not None and not all_jobs:
            fail("--service only goes with --all", EXIT_USAGE)
        if all_jobs:
            ask(broker, lambda client: getattr(client, f"{verb}_all")(service))
            emit({"sent": f"{verb}_all", "service": service}, as_json)
        else:
            accepted = ask(broker, lambda client: getattr(client.job(str(job_id)), verb)())
            emit({"job_id": job_id, "accepted": accepted}, as_json)

    command.__name__ = verb
    command.__doc__ = (f"{verb.capitalize()} job JOB_ID, or every job on every worker (--all, "
                       f"optionally only those of one --service).")
    decorators = [cli.command(name=verb, epilog=EPILOG), click.argument("job_id", required=False),
                  click.option("--all", "all_jobs", is_flag=True, help="Every job on every worker."),
                  click.option("--service", help="With --all: only jobs of this service."),
                  broker_option, json_option]
    for decorator in reversed(decorators):
        command = decorator(command)
    return command  # type: ignore[return-value]


pause, resume, abort = _steer("pause"), _steer("resume"), _steer("abort")


@cli.command(name="set", epilog=EPILOG)
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
    from .protocol.intents import Intent

    emit(ask(broker, lambda client: _signal(client, job_id, Intent.SET, attrs=attrs)), as_json)


@cli.command(epilog=EPILOG)
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
    from .protocol.intents import Intent

    emit(ask(broker, lambda client: _signal(client, job_id, Intent.INVOKE, method=method, args=args,
                                            kwargs=kwargs)), as_json)


@cli.command(epilog=EPILOG)
@click.argument("job_id")
@broker_option
@json_option
def checkpoint(job_id: str, broker: str, as_json: bool) -> None:
    """Take a checkpoint of a running job at its next ready(); print when it was taken."""
    taken = ask(broker, lambda client: client.job(job_id).checkpoint())
    emit({"job_id": job_id, **taken}, as_json, lambda v: f"checkpoint of {job_id} taken at {v['time']}")


@cli.command(epilog=EPILOG)
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


@cli.command(epilog=EPILOG)
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
        from .client import Client
        from .display import follow

        with Client(broker) as client:
            record = follow(client, job_id, as_json=as_json, on_interrupt="detach")
    finish(record, as_json)


@cli.command(epilog=EPILOG)
@click.option("--timeout", type=click.FloatRange(min=0), default=0.5, show_default=True,
              help="Seconds to gather the workers' answers.")
@broker_option
@json_option
def jobs(timeout: float, broker: str, as_json: bool) -> None:
    """Running jobs on every worker: id, service, state, progress, worker host."""
    listed = ask(broker, lambda client: client.jobs(timeout))
    if as_json:
        click.echo(json.dumps(listed))
        return
    from .display import jobs_table

    jobs_table(listed)


def main(args: list[str] | None = None) -> NoReturn:
    """Console-script entry point: run the CLI and exit with a documented code.

    Click's standalone mode would turn Ctrl-C into exit code 1; here it is 130.
    """
    try:
        code = cli.main(args=args, prog_name="brokerexec", standalone_mode=False)
    except click.exceptions.Abort:  # Ctrl-C (or end of input) outside a followed job
        click.echo("brokerexec: interrupted", err=True)
        sys.exit(EXIT_ABORTED)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    sys.exit(code if isinstance(code, int) else EXIT_OK)
