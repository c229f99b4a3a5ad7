"""From the command line to what a verb works with: shared options, checked input, and the
one-shot client that ``--broker`` names.

Bad input is a usage error (exit 2) with a message naming what was wrong, raised here before
any broker is contacted. JSON from the command line is parsed as strictly as the wire codec
would encode it, so a request that would be refused on the wire is refused at once.

The one-shot client is :class:`~brokerexec.Client` on the URL's one-shot transport (on
RabbitMQ, :mod:`brokerexec.transport.pika` without its listener thread); both are imported
only when a verb asks for one, so that ``brokerexec --help`` and a usage error stay fast.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from ..constants import DEFAULT_URL
from ..transport.schemes import SCHEMES, scheme_of
from .config import resolve_broker
from .output import EXIT_USAGE, JSON_FLAG, exit_on_errors, fail

if TYPE_CHECKING:
    from ..client.blocking import Client
    from ..transport.base import ClientTransport

__all__ = ["ask", "broker_option", "json_option", "json_value", "loads_strict",
           "need_shared_broker", "oneshot_client", "parse_request", "parse_when", "request_option",
           "yes_option"]

T = TypeVar("T")

# Resolved by brokerexec.settings: --broker, else BROKEREXEC_URL, else the --config file.
broker_option = click.option(
    "--broker", callback=resolve_broker, show_default=DEFAULT_URL,
    help="Broker URL (env BROKEREXEC_URL, or `broker` in the --config file).")


def _remember_json(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
    # Eager, so that a bad value of a later option is already reported as JSON.
    if value:
        ctx.find_root().meta[JSON_FLAG] = True
    return value


json_option = click.option("--json", "as_json", is_flag=True, is_eager=True, callback=_remember_json,
                           help="Print exactly one JSON document on stdout (errors included).")
yes_option = click.option("--yes", "-y", is_flag=True,
                          help="With --all and no --service: do not ask for confirmation.")
request_option = click.option("--request", "request_text", default="{}", show_default=True,
                              help="The request: a JSON object, or @file holding one.")
def loads_strict(text: str) -> Any:
    """Strict JSON: NaN and Infinity are refused here, as the wire codec would refuse them."""
    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def parse_request(text: str) -> dict[str, Any]:
    """``--request``: a JSON object, or ``@path`` to a file holding one."""
    source = "--request"
    if text.startswith("@"):
        source = text[1:]
        try:
            text = Path(source).read_text(encoding="utf-8")
        except OSError as exc:
            fail(f"cannot read the request file {source}: {exc.strerror or exc}", EXIT_USAGE)
    try:
        value = loads_strict(text)
    except ValueError as exc:
        fail(f"{source} is not valid JSON: {exc}", EXIT_USAGE)
    if not isinstance(value, dict):
        fail(f"{source} must be a JSON object, not {type(value).__name__}", EXIT_USAGE)
    return value


#: ``--since 2h``: how many seconds each unit is.
_UNITS = {"s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}


def parse_when(text: str, option: str, now: float | None = None) -> float:
    """A time given on the command line, as epoch seconds: a duration ago (``90s``,
    ``10m``, ``2h``, ``3d``, ``1w``), a local date or date and time (``2026-12-05``,
    ``2026-12-05T14:30``, ``2026-12-05 14:30:00``), or epoch seconds (``1764950400``)."""
    import re
    import time
    from datetime import datetime

    value = text.strip()
    ago = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|m|min|h|d|w)", value)
    if ago:
        return (time.time() if now is None else now) - float(ago[1]) * _UNITS[ago[2]]
    if re.fullmatch(r"\d{9,}(?:\.\d+)?", value):
        return float(value)
    try:
        return datetime.fromisoformat(value).timestamp()  # local time unless it names a zone
    except ValueError:
        fail(f"{option} {text!r} is not a time: give a duration ago (90s, 10m, 2h, 3d, 1w), a date "
             "or date and time (2026-12-05, 2026-12-05T14:30) or epoch seconds", EXIT_USAGE)


def json_value(text: str) -> Any:
    """A command-line value: JSON when it parses, else the string itself."""
    try:
        return loads_strict(text)
    except ValueError:
        return text


def need_shared_broker(broker: str) -> Callable[[str], ClientTransport]:
    """Exit 2 unless ``broker`` is a broker other processes reach (amqp:// or amqps://): the
    verbs that reach workers cannot use ``memory://``, whose broker lives inside one process.
    Returns its scheme's one-shot client transport."""
    with exit_on_errors():
        scheme = scheme_of(broker)
    if not scheme.shared or scheme.oneshot_client is None:
        shared = " or ".join(f"{name}://" for name, one in SCHEMES.items() if one.shared)
        fail(f"client verbs need an {shared} broker URL ({scheme.name}:// lives inside one "
             "process; use `brokerexec run` for local runs)", EXIT_USAGE)
    return scheme.oneshot_client


def oneshot_client(broker: str) -> Client:
    """A client for one or two round trips (on RabbitMQ: one blocking pika connection, no
    listener thread, records read from the stream)."""
    transport = need_shared_broker(broker)
    from ..client.blocking import Client

    return Client(broker, transport=transport(broker))


def ask(broker: str, action: Callable[[Client], T]) -> T:
    """Run ``action`` with a one-shot client; brokerexec errors become exit codes."""
    with exit_on_errors():
        client = oneshot_client(broker)
        try:
            return action(client)
        finally:
            client.close()
    raise AssertionError("unreachable: exit_on_errors() exits")
