"""Settings on the command line: ``--config``, the broker URL of every verb, the options made
from the settings model, and ``brokerexec config``, which prints the effective settings and
their origins.

Every option of a setting is made from its key (:data:`brokerexec.settings.KEYS`): its
name, help, variable, default and value type come from the model. The type is the
setting's kind (:class:`SettingType`), so an option's value is checked by the same function
as a variable's or a file's, when click reads it. Only a value given on the command line
counts as an option: :func:`brokerexec.settings.load_settings` looks for the others in the
environment, the TOML file and the defaults, in that order, so that one function decides
precedence. ``--broker`` on the client verbs has no default, for the same reason.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import click
from click.core import ParameterSource

from ..settings import CONFIG_ENV, KEYS, Key, Settings, load_settings
from ..settings.kinds import Names
from .output import exit_on_errors

__all__ = ["config", "config_option", "given_settings", "resolve_broker", "setting_options",
           "worker_options"]

_META = "brokerexec.config"
_BY_NAME = {key.name: key for key in KEYS}


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


def given_settings(options: dict[str, Any], *, environment: bool = True) -> Settings:
    """The effective settings of a verb whose options click parsed into ``options`` (by
    key); only those given on the command line count as options. Without ``environment``,
    neither variables nor a file are read (``run``: its options alone). Exits 2 on an
    invalid value."""
    ctx = click.get_current_context()
    given = {key: value for key, value in options.items()
             if ctx.get_parameter_source(key) is ParameterSource.COMMANDLINE}
    with exit_on_errors():
        if not environment:
            return load_settings(given, env={})
        return load_settings(given, config=ctx.meta.get(_META))
    raise AssertionError("unreachable: exit_on_errors() exits")


class SettingType(click.ParamType):  # type: ignore[type-arg]  # generic in recent clicks only
    """An option's value, checked by its setting's kind (a usage error if it is refused)."""

    def __init__(self, key: Key) -> None:
        self.key = key
        self.name = key.metavar

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            return self.key.parse(value, True)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def _option(key: Key, environment: bool) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The option of one setting (its help naming its variable if the verb reads it)."""
    multiple = isinstance(key.declared.kind, Names)  # repeated: each a spec, checked together
    default = key.default
    via = f" (env {key.variable}" + (": comma-separated)" if multiple else ")") if environment else ""
    return click.option(key.option, key.name, type=click.STRING if multiple else SettingType(key),
                        multiple=multiple, metavar=key.metavar, default=default,
                        show_default=default is not None and default != (),
                        help=f"{key.declared.help.rstrip('.')}{via}.")


def setting_options(*names: str, environment: bool = True) -> Callable[[Callable[..., Any]],
                                                                         Callable[..., Any]]:
    """Add the options of these settings (by key), in this order; ``environment``: the verb
    reads the variables and the file too (:func:`given_settings`)."""
    def add(command: Callable[..., Any]) -> Callable[..., Any]:
        for name in reversed(names):
            command = _option(_BY_NAME[name], environment)(command)
        return command
    return add


def worker_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--config`` and an option for every setting a worker takes (each a key of the
    settings model; the history indexer's are ``brokerexec history``'s)."""
    return config_option(setting_options(*(key.name for key in KEYS if key.path[0] != "history"))(command))


def all_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--config`` and an option for every setting."""
    return config_option(setting_options(*(key.name for key in KEYS))(command))


@click.command()
@all_options
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON document on stdout.")
def config(as_json: bool, **options: Any) -> None:
    """Print the effective settings and where each came from (default, file, env, option).

    The broker URL's password is masked. Takes every option (the worker's, the history
    indexer's), so that a command line can be checked before it is run.
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
