"""``brokerexec web``: the live web view (``brokerexec/web/``, ``docs/web.md``). Imported only
by that verb: nothing else loads Starlette or uvicorn."""

from __future__ import annotations

import os
from typing import Any

import click

from .config import config_option, given_settings, setting_options
from .input import need_shared_broker
from .output import EPILOG, EXIT_USAGE, announce, exit_on_errors, fail

__all__ = ["web"]


@click.command(epilog=EPILOG)
@config_option
@setting_options("broker", "history_store", "log_level", "log_format")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0 only behind an authenticating proxy or with a token).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              help="Port to listen on (0: any free port, printed).")
@click.option("--read-only", is_flag=True, help="A view without controls: nothing may be changed from it.")
@click.option("--basic-auth", "basic_auth_env", metavar="VAR",
              help="Ask for user:password, taken from the environment variable VAR (not a token).")
@click.option("--token", envvar="BROKEREXEC_WEB_TOKEN", show_envvar=True, metavar="TOKEN",
              help="The token that signs a browser in (better from the environment; default: a new "
                   "one at every start, printed in the address).")
@click.option("--trusted-header", metavar="NAME",
              help="Trust the user an authenticating proxy puts in header NAME (X-Forwarded-User; "
                   "for a server only that proxy can reach).")
def web(host: str, port: int, read_only: bool, basic_auth_env: str | None, token: str | None,
        trusted_header: str | None, **options: Any) -> None:
    """Serve the live web view of the broker's jobs, operations and fleet, until Ctrl-C.

    Jobs come from the history store (--store: the store of the fleet's `brokerexec history`;
    with no indexer on the broker, this process runs one into it). By default a token,
    printed in the address at start (or --token), signs a browser in.
    """
    from ..logs import configure_logging

    try:
        from ..web.security import Access
        from ..web.server import WebServer
    except ImportError as exc:  # the web extra is not installed
        fail(f"the web view needs its extra: pip install 'brokerexec[web]' ({exc})", EXIT_USAGE)

    settings = given_settings(options)
    need_shared_broker(settings.broker)
    configure_logging(settings.logging.level, settings.logging.format)
    if basic_auth_env is not None and trusted_header is not None:
        fail("give --basic-auth or --trusted-header, not both", EXIT_USAGE)
    if basic_auth_env is not None:
        secret = os.environ.get(basic_auth_env, "")
        if ":" not in secret:
            fail(f"--basic-auth {basic_auth_env}: that variable must hold user:password", EXIT_USAGE)
        access = Access(basic=secret)
    elif trusted_header is not None:
        access = Access(header=trusted_header)
    else:
        access = Access(token=token) if token else Access.new_token()
    server = WebServer(settings.broker, settings.history.store, access, host, port, read_only)
    with exit_on_errors():
        bound = server.open()
    shown_host = f"[{host}]" if ":" in host else host
    address = f"http://{shown_host}:{bound}/"
    if access.token is not None:
        address += f"?token={access.token}"
    announce(settings.logging.format, f"brokerexec web at {address}"
             + (" (indexing into the store: no indexer answered on the broker)" if server.indexing else ""))
    server.serve()
