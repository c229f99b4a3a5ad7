"""Parse ``brokerexec ...`` command lines as the CLI would, for the tests of docs and deploy/.

Each line is parsed by the real click group (``brokerexec.cli:cli``): an option that does not
exist, a bad value or a missing argument raises ``click.UsageError``, as it would for a user.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import click

from brokerexec.cli.app import cli

#: Tokens that separate commands on one shell line.
SEPARATORS = {"&&", "||", ";", "|"}


def parse_command(argv: list[str]) -> tuple[str, dict[str, Any]]:
    """Parse ``brokerexec VERB ...``; return the verb and its parameters.

    Raises click.UsageError (NoSuchOption, BadParameter, ...) for anything the CLI refuses.
    """
    assert Path(argv[0]).name == "brokerexec", argv
    assert len(argv) > 1, "no verb"
    root = click.Context(cli, info_name="brokerexec")
    command = cli.get_command(root, argv[1])
    if command is None:
        raise click.UsageError(f"no such command {argv[1]!r}")
    with command.make_context(argv[1], list(argv[2:]), parent=root) as context:
        return argv[1], dict(context.params)


def brokerexec_commands(shell_line: str) -> list[list[str]]:
    """The ``brokerexec`` commands of one shell line (comments dropped, ``&&`` chains split)."""
    commands: list[list[str]] = [[]]
    for token in shlex.split(shell_line, comments=True):
        if token in SEPARATORS:
            commands.append([])
        else:
            commands[-1].append(token)
    return [c for c in commands if c and Path(c[0]).name == "brokerexec"]


def envvars_read_by(verb: str) -> set[str]:
    """The environment variables a verb reads: its options' own, and the settings'
    (``brokerexec.settings``: every worker option's ``BROKEREXEC_*``; the broker URL and
    ``BROKEREXEC_CONFIG`` for every verb)."""
    from brokerexec.settings import CONFIG_ENV, KEYS

    command = cli.get_command(click.Context(cli), verb)
    assert command is not None
    options = {p.name for p in command.params}
    read = {p.envvar for p in command.params if isinstance(p.envvar, str)}
    read |= {key.variable for key in KEYS if key.name in options}
    return read | {CONFIG_ENV}
