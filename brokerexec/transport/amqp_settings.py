"""How to reach the broker and how hard to try: one settings object for every connection."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlparse, urlunparse

from ..constants import DEFAULT_HEARTBEAT, DEFAULT_URL, MAX_MESSAGE_BYTES
from .base import broker_urls, redacted_url

__all__ = ["ConnectionSettings"]


@dataclass(frozen=True)
class ConnectionSettings:
    """How to reach the broker and how hard to try.

    Parameters:
        url: ``amqp://user:pass@host:port/vhost``; a ``heartbeat`` query parameter wins.
            For a cluster, several addresses (:func:`~.base.broker_urls`): each connection
            attempt tries them in turn, from the one after the address last lost.
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

    def connection_urls(self) -> list[str]:
        """One URL per broker address the URL names, with the heartbeat and the connection
        name set (unless the URL sets them)."""
        return [self._with_query(url) for url in broker_urls(self.url)]

    def _with_query(self, url: str) -> str:
        parts = urlparse(url)
        query = dict(parse_qsl(parts.query))
        query.setdefault("heartbeat", str(self.heartbeat))
        # aio-pika takes the connection name from the URL and ignores client_properties.
        query.setdefault("name", self.name)
        return urlunparse(parts._replace(query=urlencode(query)))

    def redacted_url(self) -> str:
        """The URL without its password, for logs and errors."""
        return redacted_url(self.url)
