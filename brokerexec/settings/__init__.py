"""One settings model for every command: each setting declared once, read from anywhere.

* :mod:`.model` — the tree (:class:`Settings`, with :class:`WorkerSettings`,
  :class:`RabbitMQSettings`, :class:`LoggingSettings`, :class:`MetricsSettings`,
  :class:`HistorySettings`) and
  :data:`KEYS`, its leaves: key, variable, option, kind, default, help.
* :mod:`.kinds` — the check each value goes through, wherever it comes from.
* :mod:`.sources` — :func:`load_settings`: options, then the environment, then a TOML file,
  then the defaults, each value with its origin.

The command line's options are made from :data:`KEYS` (:mod:`brokerexec.cli.config`);
``docs/configuration.md`` tells the whole story.
"""

from __future__ import annotations

from ..urls import masked_url
from .model import (
    KEYS,
    HistorySettings,
    Key,
    LoggingSettings,
    MetricsSettings,
    Origin,
    PoolKind,
    QueueType,
    RabbitMQSettings,
    RunnerKind,
    Settings,
    WorkerSettings,
)
from .sources import CONFIG_ENV, load_settings

__all__ = ["CONFIG_ENV", "KEYS", "HistorySettings", "Key", "LoggingSettings", "MetricsSettings", "Origin",
           "PoolKind", "QueueType", "RabbitMQSettings", "RunnerKind", "Settings", "WorkerSettings",
           "load_settings", "masked_url"]
