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

The verbs about one job live in :mod:`brokerexec.cli_jobs`, those about many jobs
(``pause``/``resume``/``abort``, ``jobs``) in :mod:`brokerexec.cli_fleet`; this module holds
the group, the local verbs (``run``, ``describe``), ``worker`` and the entry point.

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

from . import cli_fleet, cli_jobs
from .cli_config import config, config_option, given_settings, worker_options
from .cli_input import json_option, json_value, parse_request, pool_options, request_option
from .cli_output import (
    EPILOG,
    EXIT_ABORTED,
    EXIT_BROKER,
    EXIT_FAILED,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_TIMEOUT,
    EXIT_USAGE,
    error_document,
    exit_on_errors,
    finish,
)

if TYPE_CHECKING:
    from .pool import PoolKind

__all__ = ["EXIT_ABORTED", "EXIT_BROKER", "EXIT_FAILED", "EXIT_NOT_FOUND", "EXIT_OK",
           "EXIT_TIMEOUT", "EXIT_USAGE", "cli", "main"]

#: Kept under its old name: tests reach it as ``brokerexec.cli._json_value``.
_json_value = json_value


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


# ---- client verbs: one job (cli_jobs), many jobs (cli_fleet) --------------------------------------

for _command in (*cli_jobs.COMMANDS, *cli_fleet.COMMANDS):
    cli.add_command(_command)


def main(args: list[str] | None = None) -> NoReturn:
    """Console-script entry point: run the CLI and exit with a documented code.

    Click's standalone mode would turn Ctrl-C into exit code 1; here it is 130.
    """
    argv = sys.argv[1:] if args is None else args
    # Click's own errors come after its context is gone: --json is looked for in argv.
    as_json = "--json" in argv[:argv.index("--")] if "--" in argv else "--json" in argv
    try:
        code = cli.main(args=args, prog_name="brokerexec", standalone_mode=False)
    except click.exceptions.Abort:  # Ctrl-C (or end of input) outside a followed job
        if as_json:
            click.echo(error_document("brokerexec.Interrupted", "interrupted"))
        click.echo("brokerexec: interrupted", err=True)
        sys.exit(EXIT_ABORTED)
    except click.ClickException as exc:
        if as_json:
            click.echo(error_document("brokerexec.UsageError", exc.format_message()))
        exc.show()
        sys.exit(exc.exit_code)
    sys.exit(code if isinstance(code, int) else EXIT_OK)
