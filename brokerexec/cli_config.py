"""Settings on the command line: ``--config``, the broker URL of every verb, the worker's
options, and ``brokerexec config``, which prints the effective settings and their origins.

The worker's options have no click ``envvar``, and their click defaults (shown in
``--help``) are the :class:`~brokerexec.settings.Settings` defaults: only a value given on
the command line counts as an option, and :func:`brokerexec.settings.load_settings` looks
for the others in the environment, the TOML file and the defaults, in that order, so that
one function decides precedence and checks every value with one kind of message.
``--broker`` on the client verbs has no default, for the same reason.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import click
from click.core import ParameterSource

from .cli_output import exit_on_errors
from .settings import CONFIG_ENV, Settings, load_settings

__all__ = ["config", "config_option", "given_settings", "resolve_broker", "worker_options"]

_META = "brokerexec.config"
_DEFAULTS = Settings()


def _store_config(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    # ctx.meta is shared by a group's context and its subcommand's: `brokerexec --config F
    # status` and `brokerexec worker --config F` both reach the verb.
    if value is not None:
        ctx.meta[_META] = value


config_option = click.option(
    "--config", metavar="PATH", is_eager=True, expose_value=False, callback=_store_config,
    help=f"A TOML file of settings (env {CONFIG_ENV}); options and BROKEREXEC_* variables "
    "take precedence over it.")


def resolve_broker(ctx: click.Context, _param: click.Parameter, value: str | None) -> str:
    """``--broker``'s value, else ``BROKEREXEC_URL``, else the file's ``broker``, else the
    default; a bad file or value exits 2."""
    if value is not None:
        return value
    with exit_on_errors():
        return load_settings(config=ctx.meta.get(_META), only=("broker",)).broker
    raise AssertionError("unreachable: exit_on_errors() exits")


def given_settings(options: dict[str, Any]) -> Settings:
    """The effective settings of a verb whose options click parsed into ``options`` (by
    key); only those given on the command line count as options. Exits 2 on an invalid one."""
    ctx = click.get_current_context()
    given = {key: value for key, value in options.items()
             if ctx.get_parameter_source(key) is ParameterSource.COMMANDLINE}
    with exit_on_errors():
        return load_settings(given, config=ctx.meta.get(_META))
    raise AssertionError("unreachable: exit_on_errors() exits")


def _setting(flag: str, **attrs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The option of setting ``flag`` (``--pool-size``: key ``pool_size``), its default
    shown in ``--help`` being the settings' own."""
    default = getattr(_DEFAULTS, flag[2:].replace("-", "_"))
    return click.option(flag, default=default, show_default=default is not None, **attrs)


_WORKER_OPTIONS = (
    _setting("--broker", help="Broker URL (env BROKEREXEC_URL)."),
    click.option("--service", "services", multiple=True, metavar="MODULE:Class",
                 help="A service to run (MODULE:Class or file.py:Class); repeat for more "
                 "(env BROKEREXEC_SERVICES: comma-separated)."),
    _setting("--concurrency", type=click.IntRange(min=1), help="Jobs at once."),
    _setting("--pool", type=click.Choice(["thread", "process"]),
             help="Workers for handler.map/imap."),
    _setting("--pool-size", type=click.IntRange(min=1), help="Pool workers (default: CPUs)."),
    _setting("--shutdown-grace", type=click.FloatRange(min=0),
             help="Seconds running jobs get to finish on SIGTERM before they are aborted."),
    _setting("--runner", type=click.Choice(["thread", "process"]),
             help="Where computations run: threads of the worker, or a child process each "
             "(killable; a crash or a GIL-holding C call stays there)."),
    _setting("--heartbeat", type=click.IntRange(min=0), help="AMQP heartbeat (s)."),
    _setting("--queue-type", type=click.Choice(["classic", "quorum"]),
             help="Launch queues of its services: quorum ones survive a cluster node's loss "
             "(all workers of a service must agree)."),
    _setting("--claim-after", type=click.FloatRange(min=0),
             help="Seconds a job runs before it gets its own RPC queue (stock kiwipy tools "
             "can reach it from then on; brokerexec clients always can)."),
    _setting("--lease-renew", type=click.FloatRange(min=0.1),
             help="Seconds between renewals of each running job's lease; keep it below half "
             "the broker's consumer_timeout."),
    _setting("--resume-grace", type=click.FloatRange(min=0),
             help="Seconds before a job whose worker was lost is claimed here (its worker "
             "may only be reconnecting)."),
    _setting("--max-checkpoint-bytes", type=click.IntRange(min=1024),
             help="Largest checkpoint stored; a larger one fails the checkpoint (an error "
             "event), not the job."),
    _setting("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"],
                                              case_sensitive=False)),
    _setting("--log-format", type=click.Choice(["text", "json"]),
             help="Log lines on stderr: text, or one JSON object per line."),
    _setting("--metrics-port", type=click.IntRange(0, 65535),
             help="Serve Prometheus metrics at http://HOST:PORT/metrics (default: none; 0: "
             "any free port, printed)."),
    _setting("--metrics-host",
             help="Address the metrics server listens on (0.0.0.0 in a container)."),
)


def worker_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--config`` and the worker's options (each a key of :mod:`brokerexec.settings`)."""
    for option in reversed((config_option, *_WORKER_OPTIONS)):
        command = option(command)
    return command


@click.command()
@worker_options
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON document on stdout.")
def config(as_json: bool, **options: Any) -> None:
    """Print the effective settings and where each came from (default, file, env, option).

    The broker URL's password is masked. Takes the worker's options, so that a command line
    can be checked before it is run.
    """
    rows = given_settings(options).shown()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    width = max(len(name) for name in rows)
    for name, row in rows.items():
        value = row["value"]
        shown = (", ".join(value) or "none") if isinstance(value, list) else value
        shown = "none" if shown is None else shown
        origin = f"{row['source']} {row['from']}".strip()
        click.echo(f"{name:<{width}}  {shown}  ({origin})")
