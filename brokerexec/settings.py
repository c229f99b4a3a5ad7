"""One settings object for the command line: the broker URL and the worker's settings.

Each setting is read from the first of these that has it (``KEYS`` lists them all):

1. a command-line option (``--concurrency 4``),
2. an environment variable (``BROKEREXEC_CONCURRENCY=4``; the URL's is ``BROKEREXEC_URL``),
3. a TOML file (``concurrency = 4``) named by ``--config PATH`` or ``BROKEREXEC_CONFIG``,
4. the default.

Every value is checked where it is read, and a bad one raises
:class:`~brokerexec.errors.ConfigurationError` naming the key, where it came from and what
was wrong; so does an unknown key in the file (a typo would otherwise be ignored in silence).
Unknown ``BROKEREXEC_*`` variables are not errors: tests and tools set their own.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from .constants import (
    DEFAULT_CLAIM_AFTER,
    DEFAULT_HEARTBEAT,
    DEFAULT_LEASE_RENEW,
    DEFAULT_RESUME_GRACE,
    DEFAULT_URL,
    MAX_CHECKPOINT_BYTES,
)
from .errors import ConfigurationError
from .transport.base import split_urls

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, before it joined the standard library
    import tomli as tomllib

__all__ = ["CONFIG_ENV", "KEYS", "Key", "Origin", "Settings", "load_settings", "masked_url"]

#: The variable naming the TOML file when ``--config`` is not given.
CONFIG_ENV = "BROKEREXEC_CONFIG"
OriginKind = Literal["default", "file", "env", "option"]
#: Parses one raw value (a string from the environment, any TOML value from the file);
#: raises ``ValueError`` saying what was wrong.
Parser = Callable[[Any, bool], Any]


@dataclass(frozen=True)
class Origin:
    """Where a setting's value came from: ``kind``, and which option, variable or file."""

    kind: OriginKind
    where: str = ""

    def __str__(self) -> str:
        return f"{self.kind} {self.where}".strip()


def _integer(low: int, high: int | None = None) -> Parser:
    def parse(raw: Any, text: bool) -> int:
        if text and isinstance(raw, str):
            try:
                raw = int(raw.strip())
            except ValueError:
                raise ValueError(f"{raw!r} is not an integer") from None
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise ValueError(f"{raw!r} is not an integer")
        if raw < low or (high is not None and raw > high):
            bound = f"at least {low}" if high is None else f"from {low} to {high}"
            raise ValueError(f"{raw} is out of range: it must be {bound}")
        return raw
    return parse


def _number(low: float) -> Parser:
    def parse(raw: Any, text: bool) -> float:
        if text and isinstance(raw, str):
            try:
                raw = float(raw.strip())
            except ValueError:
                raise ValueError(f"{raw!r} is not a number") from None
        if isinstance(raw, bool) or not isinstance(raw, int | float) or raw != raw:
            raise ValueError(f"{raw!r} is not a number")
        if raw < low:
            raise ValueError(f"{raw} is out of range: it must be at least {low}")
        return float(raw)
    return parse


def _choice(*options: str, upper: bool = False) -> Parser:
    def parse(raw: Any, _text: bool) -> str:
        value = raw.upper() if upper and isinstance(raw, str) else raw
        if value not in options:
            raise ValueError(f"{raw!r} is not one of {', '.join(options)}")
        return str(value)
    return parse


def _text(raw: Any, _text: bool) -> str:
    if not isinstance(raw, str) or not raw:
        raise ValueError(f"{raw!r} is not a non-empty string")
    return raw


def _names(raw: Any, text: bool) -> tuple[str, ...]:
    if text and isinstance(raw, str):  # BROKEREXEC_SERVICES="a:A, b.py:B"
        raw = [part for part in raw.replace(",", " ").split() if part]
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not all(isinstance(item, str) and item for item in raw):
        raise ValueError(f"{raw!r} is not a list of MODULE:Class strings")
    return tuple(raw)


def _optional(parse: Parser) -> Parser:
    def parse_optional(raw: Any, text: bool) -> Any:
        return None if text and raw == "" else parse(raw, text)
    return parse_optional


@dataclass(frozen=True)
class Key:
    """One setting: its name (the TOML key and the :class:`Settings` field, which holds its
    default), its parser and its environment variable."""

    name: str
    parse: Parser
    env: str = ""

    @property
    def variable(self) -> str:
        """The environment variable that sets it."""
        return self.env or f"BROKEREXEC_{self.name.upper()}"

    @property
    def option(self) -> str:
        """The command-line option that sets it."""
        return "--" + self.name.replace("_", "-")


KEYS: tuple[Key, ...] = (
    Key("broker", _text, env="BROKEREXEC_URL"),
    Key("services", _names),
    Key("concurrency", _integer(1)),
    Key("pool", _choice("thread", "process")),
    Key("pool_size", _optional(_integer(1))),
    Key("shutdown_grace", _number(0)),
    Key("runner", _choice("thread", "process")),
    Key("heartbeat", _integer(0)),
    Key("queue_type", _choice("classic", "quorum")),
    Key("claim_after", _number(0)),
    Key("lease_renew", _number(0.1)),
    Key("resume_grace", _number(0)),
    Key("max_checkpoint_bytes", _integer(1024)),
    Key("log_level", _choice("DEBUG", "INFO", "WARNING", "ERROR", upper=True)),
    Key("log_format", _choice("text", "json")),
    Key("metrics_port", _optional(_integer(0, 65535))),
    Key("metrics_host", _text),
)
_BY_NAME = {key.name: key for key in KEYS}


@dataclass(frozen=True)
class Settings:
    """The effective settings of one command (see the module docstring for their order)."""

    broker: str = DEFAULT_URL
    services: tuple[str, ...] = ()
    concurrency: int = 1
    pool: str = "thread"
    pool_size: int | None = None
    shutdown_grace: float = 30.0
    runner: str = "thread"
    heartbeat: int = DEFAULT_HEARTBEAT
    queue_type: str = "classic"
    claim_after: float = DEFAULT_CLAIM_AFTER
    lease_renew: float = DEFAULT_LEASE_RENEW
    resume_grace: float = DEFAULT_RESUME_GRACE
    max_checkpoint_bytes: int = MAX_CHECKPOINT_BYTES
    log_level: str = "INFO"
    log_format: str = "text"
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    #: Where each value came from, by key.
    origins: Mapping[str, Origin] = field(default_factory=dict, compare=False)

    def shown(self) -> dict[str, dict[str, Any]]:
        """Each setting as printed by ``brokerexec config``: its value with the URL's
        password masked, and its origin."""
        rows: dict[str, dict[str, Any]] = {}
        for key in KEYS:
            value = getattr(self, key.name)
            value = masked_url(value) if key.name == "broker" else value
            origin = self.origins.get(key.name, Origin("default"))
            rows[key.name] = {"value": list(value) if isinstance(value, tuple) else value,
                              "source": origin.kind, "from": origin.where}
        return rows


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


def _read_file(path: Path, named_by: str) -> dict[str, Any]:
    try:
        with path.open("rb") as stream:
            table = tomllib.load(stream)
    except OSError as exc:
        raise ConfigurationError(f"cannot read the config file {path} (named by {named_by}): "
                                 f"{exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"config file {path} is not valid TOML: {exc}") from exc
    unknown = sorted(set(table) - set(_BY_NAME))
    if unknown:
        raise ConfigurationError(f"config file {path}: unknown key {unknown[0]!r} (known keys: "
                                 f"{', '.join(_BY_NAME)})")
    return table


def load_settings(options: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None,
                  config: str | None = None, *, only: tuple[str, ...] | None = None) -> Settings:
    """The effective settings.

    Parameters:
        options: values given on the command line, by key (already checked by click).
        env: the environment (``os.environ`` when ``None``).
        config: the TOML file's path from ``--config``; else ``BROKEREXEC_CONFIG`` names it.
        only: read just these keys (a client verb needs the broker URL alone, and a bad
            worker variable in its environment must not stop it).

    Raises:
        ConfigurationError: a value, the file or one of its keys is invalid.
    """
    options = options or {}
    env = os.environ if env is None else env
    named_by = "--config"
    if config is None and env.get(CONFIG_ENV):
        config, named_by = env[CONFIG_ENV], CONFIG_ENV
    table = _read_file(Path(config), named_by) if config else {}
    values: dict[str, Any] = {}
    origins: dict[str, Origin] = {}
    for key in KEYS:
        if only is not None and key.name not in only:
            continue
        if key.name in options:
            values[key.name], origins[key.name] = options[key.name], Origin("option", key.option)
            continue
        if key.variable in env:
            raw, text, origin = env[key.variable], True, Origin("env", key.variable)
        elif key.name in table:
            raw, text, origin = table[key.name], False, Origin("file", str(config))
        else:
            continue
        try:
            values[key.name] = key.parse(raw, text)
        except ValueError as exc:
            raise ConfigurationError(f"setting {key.name!r} from {origin}: {exc}") from None
        origins[key.name] = origin
    return Settings(**values, origins=origins)
