"""What a CLI command prints, and the exit code it ends with.

The codes are the documented ones (the table in :mod:`brokerexec.cli`'s docstring, ``EPILOG``
in ``--help`` and ``docs/cli.md``): each verb ends through :func:`fail`, :func:`finish` or
:func:`exit_on_errors`, so a brokerexec error always becomes the same code, whichever verb
hit it. Answers go to stdout (exactly one JSON document with ``--json``); messages go to
stderr. With ``--json`` an error is that one document too, ``{"error": {"type", "message"}}``
(besides its message on stderr), so a script reads stdout whatever happened.
:mod:`brokerexec.cli.display` is imported only when something is shown as text, because it pulls
in rich, which one-shot verbs must not pay for.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import click

from ..errors import (
    BrokerConnectionError,
    BrokerExecError,
    ConfigurationError,
    DecodeError,
    JobAborted,
    JobNotFound,
    RemoteError,
    Timeout,
    UnknownService,
)

__all__ = [
    "EPILOG",
    "EXIT_ABORTED",
    "EXIT_BROKER",
    "EXIT_CODES",
    "EXIT_FAILED",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_TIMEOUT",
    "EXIT_USAGE",
    "JSON_FLAG",
    "announce",
    "emit",
    "error_document",
    "exit_code",
    "exit_on_errors",
    "fail",
    "finish",
    "message_of",
    "type_of",
    "wants_json",
]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_TIMEOUT, EXIT_BROKER, EXIT_ABORTED = (
    0, 1, 2, 3, 4, 5, 130)

EPILOG = """Exit codes: 0 ok; 1 job failed or remote error; 2 usage or bad input;
3 no worker holds the job; 4 time-out; 5 broker unreachable; 130 interrupted or aborted."""


#: Where ``--json`` is remembered in click's context (``ctx.meta``), for :func:`fail`.
JSON_FLAG = "brokerexec.json"

#: The error type of a :func:`fail` that no exception caused, by exit code.
_KIND_OF_CODE = {EXIT_FAILED: "brokerexec.Failed", EXIT_USAGE: "brokerexec.UsageError",
                 EXIT_NOT_FOUND: "brokerexec.JobNotFound", EXIT_TIMEOUT: "brokerexec.Timeout",
                 EXIT_BROKER: "brokerexec.BrokerConnectionError",
                 EXIT_ABORTED: "brokerexec.Interrupted"}


def wants_json() -> bool:
    """True inside a verb given ``--json`` (set by the option's callback)."""
    ctx = click.get_current_context(silent=True)
    return bool(ctx is not None and ctx.find_root().meta.get(JSON_FLAG))


def error_document(kind: str, message: str) -> str:
    """The one JSON document of a failed verb under ``--json``."""
    return json.dumps({"error": {"type": kind, "message": message}})


def fail(message: str, code: int, kind: str | None = None) -> NoReturn:
    """Print ``brokerexec: message`` on stderr (and, with ``--json``, the error document on
    stdout) and exit with ``code``. ``kind`` names the error; by default its code does."""
    if wants_json():
        click.echo(error_document(kind or _KIND_OF_CODE.get(code, "brokerexec.Failed"), message))
    click.echo(f"brokerexec: {message}", err=True)
    sys.exit(code)


@contextmanager
def exit_on_errors() -> Iterator[None]:
    """Turn brokerexec errors into a message on stderr and the documented exit code."""
    try:
        yield
    except BrokerExecError as exc:
        fail(message_of(exc), exit_code(exc), type_of(exc))


#: Exit codes by error class, the first match wins: a remote refusal raised typed
#: (``RemoteJobNotFound`` is a ``JobNotFound``) gets the code of what it is.
EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (JobAborted, EXIT_ABORTED),
    (JobNotFound, EXIT_NOT_FOUND),
    (Timeout, EXIT_TIMEOUT),
    (BrokerConnectionError, EXIT_BROKER),
    (UnknownService, EXIT_USAGE),  # a name given on the command line that nothing offers
    (RemoteError, EXIT_FAILED),  # a remote refusal or failure; the job's own is exit 1 too
    (ConfigurationError, EXIT_USAGE),
    (DecodeError, EXIT_USAGE),
    (BrokerExecError, EXIT_FAILED),
)


def exit_code(exc: BaseException) -> int:
    """The documented exit code of an error."""
    return next((code for kind, code in EXIT_CODES if isinstance(exc, kind)), EXIT_FAILED)


def message_of(exc: BaseException) -> str:
    """What the CLI says of an error: a remote one names its remote type."""
    if isinstance(exc, RemoteError) and not isinstance(exc, JobAborted):
        return f"{exc.remote_type}: {exc.remote_message}"
    return str(exc)


def type_of(exc: BaseException) -> str:
    """The ``type`` of an error's JSON document: the remote type of a remote error, else
    the dotted name of the class (``brokerexec.JobNotFound``)."""
    if isinstance(exc, RemoteError) and exc.remote_type:
        return exc.remote_type
    module = type(exc).__module__
    return f"brokerexec.{type(exc).__name__}" if module.startswith("brokerexec") else type(exc).__name__


def emit(value: Any, as_json: bool, text: Callable[[Any], str] | None = None) -> None:
    """Print a command's answer on stdout: JSON with ``--json``, else ``text(value)`` or a
    pretty rendering."""
    if as_json:
        click.echo(json.dumps(value))
    else:
        from .display import pretty

        click.echo(text(value) if text else pretty(value))


def finish(record: dict[str, Any] | None, as_json: bool) -> NoReturn:
    """Print a final record (or its result) and exit with the code of its state."""
    if record is None:  # the user stopped watching
        if as_json:
            click.echo(error_document("brokerexec.Interrupted", "stopped watching; the job runs on"))
        sys.exit(EXIT_ABORTED)
    from .display import show_record

    show_record(record, as_json)
    sys.exit({"finished": EXIT_OK, "failed": EXIT_FAILED}.get(str(record.get("state")), EXIT_ABORTED))


def announce(log_format: str, text: str) -> None:
    """A line on stderr whatever the log level (scripts wait for it), in the log format of a
    long-running verb: with ``--log-format json`` every line of stderr is a JSON object."""
    if log_format == "json":
        import logging

        from ..logs import JsonFormatter

        text = JsonFormatter().format(logging.LogRecord(
            "brokerexec.cli", logging.INFO, __file__, 0, text, None, None))
    click.echo(text, err=True)
