"""The verbs that need no broker: ``run`` (one service, here, on the embedded broker) and
``describe`` (a service's declarations)."""

from __future__ import annotations

import json
from typing import Any

import click

from .config import given_settings, setting_options
from .input import json_option, parse_request, request_option
from .output import EPILOG, exit_on_errors, finish

__all__ = ["COMMANDS", "describe", "run"]


@click.command(epilog=EPILOG)
@click.argument("service_spec", metavar="MODULE:Class|file.py:Class")
@request_option
@setting_options("progress_delta", "checkpoint_delta", "improved_delta", "pool", "pool_size",
                 environment=False)
@json_option
def run(service_spec: str, request_text: str, as_json: bool, **options: Any) -> None:
    """Run one service here, on the embedded broker, showing its progress.

    Ctrl-C aborts the job and waits for it to stop; a second Ctrl-C quits at once.
    """
    import dataclasses
    import logging
    import uuid

    from ..client.blocking import Client
    from ..core.registry import load_service
    from ..protocol.names import new_job_id
    from .display import follow

    request = parse_request(request_text)
    # Its options only: the worker settings of the environment or a file are a worker's.
    settings = dataclasses.replace(given_settings(options, environment=False).worker,
                                   concurrency=1, abort_grace=5.0)
    # The embedded worker's warnings about a refused launch repeat what the record says.
    logging.getLogger("brokerexec.worker").setLevel(logging.ERROR)
    with exit_on_errors():
        service = load_service(service_spec)
        # The worker checks the request, as it would over RabbitMQ: an invalid input is a
        # failed job (exit 1) with the same message a remote launch gets.
        with Client(f"memory://run-{uuid.uuid4().hex}", services=[service],
                    worker_settings=settings) as client:
            job_id = new_job_id()
            record = follow(client, job_id, as_json=as_json, on_interrupt="abort",
                            launch=lambda: client.launch(service.name, request, job_id=job_id))
    finish(record, as_json)


@click.command(epilog=EPILOG)
@click.argument("service_spec", metavar="MODULE:Class|file.py:Class")
@json_option
def describe(service_spec: str, as_json: bool) -> None:
    """Show a service's inputs, settable attributes and invokable methods."""
    from ..core.registry import load_service

    with exit_on_errors():
        description = load_service(service_spec).describe()
    if as_json:
        click.echo(json.dumps(description))
    else:
        from .display import describe_text

        click.echo(describe_text(description))


#: The verbs of this module, in the order ``--help`` lists them.
COMMANDS = (run, describe)
