"""How to reach the broker and how hard to try: one settings object for every connection."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlparse, urlunparse

import aio_pika
from aio_pika.abc import ConnectionParameter

from ...constants import DEFAULT_HEARTBEAT, DEFAULT_URL, MAX_MESSAGE_BYTES
from ...urls import broker_urls, redacted_url
from ..tls import TlsOptions, split_tls

__all__ = ["ConnectionSettings"]


class _TlsConnection(aio_pika.Connection):
    """aio-pika's connection, letting ``server_hostname`` through to ``open_connection``.

    aio-pika keeps only the keywords its ``PARAMETERS`` name and aiormq checks the URL's host
    otherwise: a certificate issued to a name could not be checked when the URL has an IP.
    aio-pika's robust connection extends ``PARAMETERS`` the same way.
    """

    PARAMETERS: tuple[ConnectionParameter, ...] = (
        *aio_pika.Connection.PARAMETERS,
        ConnectionParameter(name="server_hostname", parser=str, is_kwarg=True),
    )


@dataclass(frozen=True)
class ConnectionSettings:
    """How to reach the broker and how hard to try.

    Parameters:
        url: ``amqp://user:pass@host:port/vhost``; a ``heartbeat`` query parameter wins.
            For a cluster, several addresses (:func:`~.base.broker_urls`): each connection
            attempt tries them in turn, from the one after the address last lost.
            ``amqps://…?cafile=…&certfile=…&keyfile=…`` for TLS (:mod:`.tls`). Never shown
            whole: the repr and logs carry :meth:`redacted_url`.
        heartbeat: seconds; a hung broker is detected after about two of these.
        connect_timeout: seconds for one connection attempt.
        backoff_initial, backoff_max: exponential backoff with jitter between attempts.
        reconnect_deadline: give up after this many seconds without a connection
            (None: never, as a worker should).
        name: connection name shown by ``rabbitmqctl list_connections``; names threads.
        max_message_bytes: larger incoming bodies are refused before decoding.
    """

    url: str = DEFAULT_URL
    heartbeat: int = DEFAULT_HEARTBEAT
    connect_timeout: float = 5.0
    backoff_initial: float = 0.1
    backoff_max: float = 5.0
    reconnect_deadline: float | None = None
    name: str = "brokerexec"
    max_message_bytes: int = MAX_MESSAGE_BYTES

    def __repr__(self) -> str:
        # Not the dataclass's: that one would print the password.
        return (f"ConnectionSettings(url={self.redacted_url()!r}, heartbeat={self.heartbeat}, "
                f"name={self.name!r})")

    def addresses(self) -> list[str]:
        """One URL per broker address the URL names (:func:`~.base.broker_urls`), each with
        the URL's query, TLS parameters included."""
        return broker_urls(self.url)

    def tls(self) -> TlsOptions | None:
        """The URL's TLS options (None for ``amqp://``); ``ConfigurationError`` if invalid."""
        return split_tls(self.addresses()[0])[1]

    def connect_kwargs(self, address: str | None = None) -> dict[str, Any]:
        """``aio_pika.connect`` keywords for TLS to ``address`` (one of :meth:`addresses`;
        default the first): a context made from the URL's files, the hostname to check
        (nothing for ``amqp://``)."""
        tls = split_tls(address or self.addresses()[0])[1]
        if tls is None:
            return {}
        context: ssl.SSLContext = tls.context()
        return {"ssl_context": context, "server_hostname": tls.hostname,
                "connection_class": _TlsConnection}

    def connection_urls(self) -> list[str]:
        """:meth:`connection_url` of each address, in :meth:`addresses`' order."""
        return [self.connection_url(one) for one in self.addresses()]

    def connection_url(self, address: str | None = None) -> str:
        """``address`` (default the first) with the heartbeat and the connection name set
        (unless the URL sets them), without the TLS parameters (they travel as
        :meth:`connect_kwargs`)."""
        parts = urlparse(split_tls(address or self.addresses()[0])[0])
        query = dict(parse_qsl(parts.query))
        query.setdefault("heartbeat", str(self.heartbeat))
        # aio-pika takes the connection name from the URL and ignores client_properties.
        query.setdefault("name", self.name)
        return urlunparse(parts._replace(query=urlencode(query)))

    def redacted_url(self) -> str:
        """The URL without its password, for logs and errors."""
        return redacted_url(self.url)
