"""TLS from the broker URL: one query-string convention for the aio-pika and the pika clients.

``amqps://user:pass@host:5671/vhost?cafile=/etc/ca.pem&certfile=/etc/me.pem&keyfile=/etc/me.key``

* ``cafile`` / ``capath``: the CAs the server's certificate must chain to (default: the
  system's trust store).
* ``certfile`` / ``keyfile``: a client certificate and its key, for brokers that verify
  clients (``ssl_options.verify = verify_peer``); ``keyfile`` may be left out when the key
  is in ``certfile``.
* ``server_hostname``: the name the certificate must carry, when the URL's host is not that
  name (an IP address, a tunnel); it is also sent as SNI.
* ``no_verify_ssl=1``: no certificate or hostname check at all. Anyone on the path can then
  impersonate the broker and read the password: for throw-away test brokers only.

The names are aiormq's own (``no_verify_ssl`` included), so a URL means the same thing to
aio-pika whether or not it went through here. The certificate and hostname are checked by
default. The keys are taken out of the URL before pika sees it: pika refuses unknown query
parameters. None of them is a secret (paths, a host name), but the password in the URL is:
see :func:`~brokerexec.transport.base.redacted_url`.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlparse, urlunparse

from ..errors import ConfigurationError

__all__ = ["TLS_KEYS", "TlsOptions", "split_tls"]

log = logging.getLogger(__name__)

#: The query parameters this module reads (and removes from the URL).
TLS_KEYS = ("cafile", "capath", "certfile", "keyfile", "server_hostname", "no_verify_ssl")


@dataclass(frozen=True)
class TlsOptions:
    """How to set up TLS for one ``amqps://`` URL (see the module docstring)."""

    host: str
    cafile: str | None = None
    capath: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    server_hostname: str | None = None
    verify: bool = True

    @property
    def hostname(self) -> str:
        """The name the server's certificate is checked against (and SNI)."""
        return self.server_hostname or self.host

    def context(self) -> ssl.SSLContext:
        """A client context; ``ConfigurationError`` naming the file when one cannot be used."""
        try:
            context = ssl.create_default_context(cafile=self.cafile, capath=self.capath)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigurationError(f"cannot load the CA certificates (cafile={self.cafile}, "
                                     f"capath={self.capath}): {exc}") from exc
        if self.certfile:
            try:
                context.load_cert_chain(self.certfile, self.keyfile)
            except (OSError, ssl.SSLError) as exc:
                # The key's passphrase is never asked for: an encrypted key fails here too.
                raise ConfigurationError(f"cannot load the client certificate {self.certfile} "
                                         f"(keyfile={self.keyfile}): {exc}") from exc
        if not self.verify:
            log.warning("no_verify_ssl=1: the broker's certificate is not checked; anyone on "
                        "the path can impersonate it")
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context


def split_tls(url: str) -> tuple[str, TlsOptions | None]:
    """The URL without the TLS keys, and the TLS options (None for ``amqp://``).

    Raises:
        ConfigurationError: TLS keys on an ``amqp://`` URL (they would be silently
            ignored: the connection would not be encrypted), a repeated key, a ``keyfile``
            without a ``certfile``, or a ``no_verify_ssl`` other than 0 or 1.
    """
    parts = urlparse(url)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    tls = [(key, value) for key, value in pairs if key in TLS_KEYS]
    rest = urlunparse(parts._replace(query=urlencode([p for p in pairs if p[0] not in TLS_KEYS])))
    if parts.scheme != "amqps":
        if tls:
            raise ConfigurationError(f"{', '.join(sorted({k for k, _ in tls}))} given on an "
                                     f"{parts.scheme}:// URL: use amqps:// for TLS")
        return rest, None
    options = dict(tls)
    if len(options) != len(tls):
        raise ConfigurationError("a TLS parameter is given twice in the broker URL")
    if options.get("keyfile") and not options.get("certfile"):
        raise ConfigurationError("keyfile given without certfile in the broker URL")
    no_verify = options.pop("no_verify_ssl", "0")
    if no_verify not in ("0", "1"):
        raise ConfigurationError(f"no_verify_ssl must be 0 or 1, not {no_verify!r}")
    return rest, TlsOptions(host=parts.hostname or "localhost", verify=no_verify == "0",
                            **{key: value or None for key, value in options.items()})
