"""Where settings are read from, in order: options, the environment, a TOML file, defaults.

Each setting is taken from the first of these that has it:

1. a command-line option (``--concurrency 4``),
2. an environment variable (``BROKEREXEC_CONCURRENCY=4``; the URL's is ``BROKEREXEC_URL``),
3. a TOML file (``concurrency = 4``) named by ``--config PATH`` or ``BROKEREXEC_CONFIG``,
4. the default.

Every value is checked where it is read, by its setting's kind, and a bad one raises
:class:`~brokerexec.errors.ConfigurationError` naming the key, where it came from and what
was wrong; so does an unknown key in the file (a typo would otherwise be ignored in silence).
Unknown ``BROKEREXEC_*`` variables are not errors: tests and tools set their own.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigurationError
from .model import KEYS, Key, Origin, Settings

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, before it joined the standard library
    import tomli as tomllib

__all__ = ["CONFIG_ENV", "load_settings"]

#: The variable naming the TOML file when ``--config`` is not given.
CONFIG_ENV = "BROKEREXEC_CONFIG"
_BY_NAME = {key.name: key for key in KEYS}


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


def _read(key: Key, options: Mapping[str, Any], env: Mapping[str, str], table: Mapping[str, Any],
          config: str | None) -> tuple[Any, Origin] | None:
    """``key``'s value and origin from the first source that has it; None: the default."""
    if key.name in options:
        raw, text, origin = options[key.name], True, Origin("option", key.option)
    elif key.variable in env:
        raw, text, origin = env[key.variable], True, Origin("env", key.variable)
    elif key.name in table:
        raw, text, origin = table[key.name], False, Origin("file", str(config))
    else:
        return None
    try:
        return key.parse(raw, text), origin
    except ValueError as exc:
        raise ConfigurationError(f"setting {key.name!r} from {origin}: {exc}") from None


def load_settings(options: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None,
                  config: str | None = None, *, only: tuple[str, ...] | None = None) -> Settings:
    """The effective settings.

    Parameters:
        options: values given on the command line, by key (as text, or already typed).
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
    tree: dict[str, Any] = {}
    origins: dict[str, Origin] = {}
    for key in KEYS:
        if only is not None and key.name not in only:
            continue
        found = _read(key, options, env, table, config)
        if found is None:
            continue
        branch = tree
        for name in key.path[:-1]:
            branch = branch.setdefault(name, {})
        branch[key.path[-1]], origins[key.name] = found
    settings: Settings = _made(Settings, tree, origins)
    return settings


def _made(cls: type[Any], values: dict[str, Any], origins: dict[str, Origin] | None = None) -> Any:
    """``cls`` made from ``values``, its sections made from the dicts among them."""
    sections = cls.__dataclass_fields__  # a section's default_factory is its class
    fields = {name: _made(sections[name].default_factory, value) if isinstance(value, dict) else value
              for name, value in values.items()}
    return cls(**fields) if origins is None else cls(**fields, origins=origins)
