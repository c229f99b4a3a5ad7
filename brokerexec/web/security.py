"""Who may see the web view, and which requests may change anything.

Sans-I/O: pure functions of a request's headers and cookies, for ``app.py`` to apply.

* **Token** (the default, Jupyter's way): the server prints a URL with ``?token=...``;
  opening it sets a session cookie (HttpOnly, SameSite=Strict) and drops the token from the
  address. ``Authorization: Bearer <token>`` works too, for scripts. The session is an HMAC
  of the token, so a server restarted with the same token (``BROKEREXEC_WEB_TOKEN``) keeps
  its sessions.
* **Basic**: ``user:password`` from an environment variable (``--basic-auth VAR``).
* **Trusted header**: behind an authenticating proxy (oauth2-proxy), the user the proxy
  puts in that header (``--trusted-header X-Forwarded-User``); only for a server the proxy
  alone can reach.

Every request that changes something is a POST carrying the CSRF token of its session (a
form field or the ``X-CSRF-Token`` header) from the server's own origin (``Origin``, else
``Referer``); a request authenticated by a bearer token, which a browser never sends on its
own, needs neither.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = ["COOKIE", "Access", "Guard", "Who"]

#: The session cookie's name.
COOKIE = "brokerexec_session"


@dataclass(frozen=True)
class Who:
    """A request's authenticated user: ``name``, and how (``"token"``, ``"cookie"``,
    ``"basic"``, ``"header"``); ``bearer``: by a header no browser sends on its own."""

    name: str
    how: str

    @property
    def bearer(self) -> bool:
        return self.how == "token"


@dataclass(frozen=True)
class Access:
    """How the server lets people in: exactly one of ``token``, ``basic`` (``user:password``)
    and ``header`` (a trusted header's name)."""

    token: str | None = None
    basic: str | None = None
    header: str | None = None

    def __post_init__(self) -> None:
        if sum(value is not None for value in (self.token, self.basic, self.header)) != 1:
            raise ValueError("the web view takes exactly one way in: a token, basic auth or a trusted header")
        if self.basic is not None and ":" not in self.basic:
            raise ValueError("basic auth is user:password")

    @classmethod
    def new_token(cls) -> Access:
        return cls(token=secrets.token_urlsafe(32))


class Guard:
    """The checks of one server (see the module docstring)."""

    def __init__(self, access: Access) -> None:
        self.access = access
        # Sessions and CSRF tokens are HMACs under a key made of the token (kept across
        # restarts with the same token), or at random (basic auth, a trusted header).
        seed = access.token.encode() if access.token is not None else secrets.token_bytes(32)
        self._key = hashlib.sha256(b"brokerexec web session\x00" + seed).digest()

    def _mac(self, *parts: str) -> str:
        return hmac.new(self._key, "\x00".join(parts).encode(), hashlib.sha256).hexdigest()

    # ---- who is asking ------------------------------------------------------------------------

    def who(self, headers: Mapping[str, str], cookies: Mapping[str, str],
            query_token: str | None = None) -> Who | None:
        """The user a request is from, or None (refused: 401, or the sign-in page)."""
        access = self.access
        if access.header is not None:
            name = headers.get(access.header.lower(), "").strip()
            return Who(name, "header") if name else None
        authorization = headers.get("authorization", "")
        scheme, _, credentials = authorization.partition(" ")
        if access.basic is not None:
            if scheme.lower() != "basic":
                return None
            try:
                given = base64.b64decode(credentials.strip(), validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                return None
            if hmac.compare_digest(given.encode(), access.basic.encode()):
                return Who(given.partition(":")[0], "basic")
            return None
        assert access.token is not None
        if scheme.lower() == "bearer" and self.token_matches(credentials.strip()):
            return Who("token", "token")
        if query_token is not None and self.token_matches(query_token):
            return Who("token", "cookie")  # the sign-in URL: a cookie is set with the answer
        session = cookies.get(COOKIE)
        if session and hmac.compare_digest(session.encode(), self.session().encode()):
            return Who("token", "cookie")
        return None

    def token_matches(self, given: str) -> bool:
        token = self.access.token
        return token is not None and hmac.compare_digest(given.encode(), token.encode())

    def session(self) -> str:
        """The session cookie's value (token access)."""
        return self._mac("session")

    def csrf(self, who: Who) -> str:
        """The CSRF token of ``who``'s requests."""
        return self._mac("csrf", who.how, who.name)

    # ---- may it change something ------------------------------------------------------------------

    def may_change(self, who: Who, given_csrf: str | None, headers: Mapping[str, str],
                   own_origin: str) -> str | None:
        """None if this state-changing request may go on; else why not (403)."""
        if who.bearer:
            return None
        if not given_csrf or not hmac.compare_digest(given_csrf.encode(), self.csrf(who).encode()):
            return "a missing or wrong CSRF token: reload the page and try again"
        origin = headers.get("origin") or _origin_of(headers.get("referer", ""))
        if not origin or origin.lower() != own_origin.lower():
            return f"a request from another origin ({origin or 'none said'}) may not change anything here"
        return None


def _origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else ""
