"""Broker URLs as brokerexec reads them: a cluster's several addresses, and how a URL is shown.

A URL may name several brokers (:func:`broker_urls`); it is never shown whole, since it may
hold a password: logs and errors carry :func:`redacted_url` (no password, no query),
``brokerexec config`` shows :func:`masked_url` (no password). Which transport serves a URL's
scheme is :mod:`brokerexec.transport.schemes`.
"""

from __future__ import annotations

import re
from urllib.parse import urlparse, urlsplit, urlunparse, urlunsplit

__all__ = ["broker_urls", "masked_url", "redacted_url", "split_urls"]


def broker_urls(url: str) -> list[str]:
    """One URL per broker address that ``url`` names: a cluster's members, tried in turn.

    ``url`` is one URL, or several joined by commas
    (``amqp://u:p@a:5672/vh,amqp://u:p@b:5672/vh``), or one URL whose host part lists several
    ``host[:port]`` joined by commas (``amqp://u:p@a:5672,b:5673,c/vh?heartbeat=5``): each
    address takes that URL's credentials, vhost and query.
    """
    urls: list[str] = []
    for one in split_urls(url):
        parts = urlsplit(one)
        userinfo, at, hosts = parts.netloc.rpartition("@")
        for host in hosts.split(","):
            urls.append(urlunsplit(parts._replace(netloc=f"{userinfo}{at}{host.strip()}")))
    return urls


_SCHEME = re.compile(r"\s*[A-Za-z][A-Za-z0-9+.-]*://")


def split_urls(url: str) -> list[str]:
    """The whole URLs that ``url`` joins with commas (a comma before a scheme starts one)."""
    # Any other comma separates the hosts of one URL.
    pieces = url.split(",")
    urls = [pieces[0]]
    for piece in pieces[1:]:
        if _SCHEME.match(piece):
            urls.append(piece.strip())
        else:
            urls[-1] += "," + piece
    return urls


def redacted_url(url: str) -> str:
    """The URL without its password or query, for logs and error messages (each address of
    a cluster's URL, joined by commas)."""
    if "," in url:
        return ",".join(redacted_url(one) for one in broker_urls(url))
    parts = urlparse(url)
    netloc = parts.hostname or ""
    if parts.port:
        netloc = f"{netloc}:{parts.port}"
    if parts.username:
        netloc = f"{parts.username}:***@{netloc}"
    return urlunparse(parts._replace(netloc=netloc, query=""))


def masked_url(url: str) -> str:
    """``url`` with its password, if any, replaced by ``***`` (credentials are never shown);
    each URL of a cluster's comma-joined list."""
    urls = split_urls(url)
    if len(urls) > 1:
        return ",".join(masked_url(one) for one in urls)
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))
