"""Why a connection attempt failed: an outage (retry) or a misconfiguration (stop), in one line.

aiormq wraps the reason of a failed handshake (an untrusted certificate, refused
credentials) in exceptions whose text is a tuple; these walk the chain to the cause.
"""

from __future__ import annotations

import ssl

import aiormq.exceptions

from ...errors import ConfigurationError

__all__ = ["cause", "describe_failure", "permanent_failure"]


def permanent_failure(exc: BaseException) -> bool:
    """A misconfiguration rather than an outage: bad settings, a certificate not trusted,
    credentials refused (aiormq's "probable" one: the broker closed the handshake)."""
    return (isinstance(exc, (ConfigurationError, aiormq.exceptions.AuthenticationError,
                             aiormq.exceptions.ProbableAuthenticationError))
            or cause(exc, ssl.SSLCertVerificationError) is not None)


def cause(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    """``exc`` or the first exception of type ``kind`` it was raised from."""
    seen: BaseException | None = exc
    for _ in range(10):  # a bounded walk: chains can loop
        if seen is None or isinstance(seen, kind):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def describe_failure(exc: BaseException) -> str:
    """One line for a failed connection: the TLS reason when there is one (aiormq wraps
    it in an AMQPConnectionError whose text is a tuple)."""
    tls = cause(exc, ssl.SSLError)
    if isinstance(tls, ssl.SSLError):
        return f"TLS: {getattr(tls, 'verify_message', None) or tls.reason or tls}"
    return str(exc) or type(exc).__name__
