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

The verbs that need no broker (``run``, ``describe``) live in :mod:`.local`, those about
one job in :mod:`.jobs`, those about many jobs (``pause``/``resume``/``abort``, ``jobs``) in
:mod:`.fleet`; this module holds the group, ``config``, ``worker`` (its body is
:mod:`.worker`) and the entry point.

One-shot verbs (launch, status, pause, resume, abort, set, invoke, checkpoint, result, jobs)
use a plain blocking pika connection (:mod:`brokerexec.transport.pika`) and start
fast: nothing heavy (rich, aio-pika) is imported at module level, only inside the commands
that need it.
``run`` uses the embedded in-memory broker; ``worker``, ``watch`` and ``launch --follow``
the full RabbitMQ transport.
"""

from __future__ import annotations

import sys
from typing import Any, NoReturn

import click

from . import fleet, jobs, local, operations
from .config import config, config_option, given_settings, worker_options
from .history import history
from .output import (
    EPILOG,
    EXIT_ABORTED,
    EXIT_BROKER,
    EXIT_FAILED,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_TIMEOUT,
    EXIT_USAGE,
    error_document,
)
from .web import web

__all__ = ["EXIT_ABORTED", "EXIT_BROKER", "EXIT_FAILED", "EXIT_NOT_FOUND", "EXIT_OK",
           "EXIT_TIMEOUT", "EXIT_USAGE", "cli", "main"]

@click.group(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="brokerexec")
@config_option
def cli() -> None:
    """Run long computations on workers and steer them while they run."""


cli.add_command(config)


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
    from .worker import serve

    serve(given_settings(options))


# ---- the verbs of the other modules: local runs, one job, many jobs ---------------------------

for _command in (*local.COMMANDS, *jobs.COMMANDS, *fleet.COMMANDS):
    cli.add_command(_command)
cli.add_command(history)
cli.add_command(operations.sweep)
cli.add_command(operations.op)
cli.add_command(web)


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
