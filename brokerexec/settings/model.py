"""Every setting, declared once: its section, key, kind, default and help.

:class:`Settings` is a tree of frozen dataclasses: the broker URL and the services at its
root, then one section per part that uses them — :class:`WorkerSettings` (how a worker runs
its jobs: what :class:`~brokerexec.Worker` takes), :class:`RabbitMQSettings` (how a worker
uses RabbitMQ: what its RabbitMQ transport takes), :class:`LoggingSettings`,
:class:`MetricsSettings` and :class:`HistorySettings` (the history indexer). Each leaf is
a :func:`setting`: from its declaration come the
TOML key (flat, unique across sections), the environment variable, the command-line option
and its help (:mod:`brokerexec.cli.config`), the default, the check of every value
(:mod:`.kinds`, also when Python code makes a section) and its line in ``brokerexec config``.
:data:`KEYS` lists the leaves in order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, get_args

from ..constants import (
    DEFAULT_CHECKPOINT_DELTA,
    DEFAULT_CLAIM_AFTER,
    DEFAULT_HEARTBEAT,
    DEFAULT_IMPROVED_DELTA,
    DEFAULT_LEASE_RENEW,
    DEFAULT_PROGRESS_DELTA,
    DEFAULT_RESUME_GRACE,
    DEFAULT_URL,
    JOURNAL_MAX_AGE,
    MAX_CHECKPOINT_BYTES,
    MAX_RESULT_BYTES,
)
from ..errors import ConfigurationError
from ..urls import masked_url
from .kinds import Choice, Integer, Names, Number, Optional, Text

if TYPE_CHECKING:
    from .kinds import Kind

__all__ = ["KEYS", "HistorySettings", "Key", "LoggingSettings", "MetricsSettings", "Origin", "PoolKind",
           "QueueType", "RabbitMQSettings", "RunnerKind", "Setting", "Settings",
           "WorkerSettings", "setting"]

#: The pool behind ``handler.map`` / ``imap``: threads, or processes.
PoolKind = Literal["thread", "process"]
#: Where a worker runs its computations: threads of its own, or a child process each.
RunnerKind = Literal["thread", "process"]
#: What a worker declares its services' launch queues as (quorum: they survive a node's loss).
QueueType = Literal["classic", "quorum"]

_SETTING = "brokerexec.setting"


class Setting:
    """How one leaf of the tree is set: its kind, help, and where the names differ from
    the field's (``key``: the TOML key, default the field's name; ``env``: default
    ``BROKEREXEC_<KEY>``; ``option``: default ``--<key>`` with dashes; ``metavar``: default
    the kind's)."""

    __slots__ = ("env", "help", "key", "kind", "metavar", "option")

    def __init__(self, kind: Kind, help: str, *, key: str = "", env: str = "", option: str = "",
                 metavar: str = "") -> None:
        self.kind, self.help = kind, help
        self.key, self.env, self.option, self.metavar = key, env, option, metavar


def setting(default: Any, kind: Kind, help: str, **names: str) -> Any:
    """A leaf of the settings tree (a dataclass field)."""
    return field(default=default, metadata={_SETTING: Setting(kind, help, **names)})


class _Checked:
    """Checks each setting of a section when it is made, with the kind that checks it
    everywhere else, and keeps the value the kind returns (``30`` becomes ``30.0``)."""

    def __post_init__(self) -> None:
        for one in dataclasses.fields(self):  # type: ignore[arg-type]
            declared = one.metadata.get(_SETTING)
            if declared is None:
                continue
            try:
                value = declared.kind.parse(getattr(self, one.name), False)
            except ValueError as exc:
                raise ConfigurationError(f"{type(self).__name__}: {one.name}: {exc}") from None
            object.__setattr__(self, one.name, value)


@dataclass(frozen=True, kw_only=True)
class WorkerSettings(_Checked):
    """How a worker runs its jobs.

    ``runner="process"`` runs every computation in a child process of its own (a service
    declaring ``runner = "process"``, a ``child_python`` or a ``child_command()`` gets one
    on any worker; ``child_python`` here names their interpreter, and runs every job in
    one); only those have limits:
    ``job_time_limit`` (seconds of wall time, then aborted and killed ``abort_grace``
    later; the record fails with ``brokerexec.LimitExceeded``) and ``job_memory_limit_mb``
    (address space, ``RLIMIT_AS``; past it allocations raise ``MemoryError``, and the
    record's message names the limit). ``progress_delta``, ``checkpoint_delta`` and
    ``improved_delta`` are each job's unless its launch gives its own.

    Raises:
        ConfigurationError: a value out of its range, naming the setting.
    """

    concurrency: int = setting(1, Integer(1), "Jobs at once.")
    pool_kind: PoolKind = setting("thread", Choice(get_args(PoolKind)),
                                  "Workers for handler.map/imap.", key="pool")
    pool_size: int | None = setting(None, Optional(Integer(1)), "Pool workers; default: one per CPU.")
    shutdown_grace: float = setting(
        30.0, Number(0), "Seconds running jobs get to finish on SIGTERM before they are aborted.")
    abort_grace: float = setting(
        10.0, Number(0), "Seconds an aborted job has to reach ready(); then it is reported "
        "aborted and left to run on (threads), or its process group is stopped (processes).")
    runner: RunnerKind = setting(
        "thread", Choice(get_args(RunnerKind)), "Where computations run: threads of the "
        "worker, or a child process each (killable; a crash or a GIL-holding C call stays there).")
    child_python: str | None = setting(
        None, Optional(Text()), "The interpreter of child processes (any CPython 3.10 or newer, "
        "brokerexec installed for it or not); setting it runs every job in one. A service's "
        "own child_python or child_command() comes first; default: the worker's own.",
        metavar="PATH")
    job_time_limit: float | None = setting(
        None, Optional(Number(0, above=True)), "Seconds of wall time a job in a child process "
        "may run; then it is aborted, and killed --abort-grace later (its record: failed, "
        "LimitExceeded); default: none.")
    job_memory_limit_mb: float | None = setting(
        None, Optional(Number(0, above=True)), "MiB of address space a job in a child process "
        "may use (RLIMIT_AS); past it, allocations raise MemoryError; default: none.",
        metavar="MIB")
    max_result_bytes: int = setting(
        MAX_RESULT_BYTES, Integer(1024), "Largest result (as JSON, with the job's last progress "
        "and improved value) a job may return; a larger one fails the job (ResultTooLarge). "
        "Keep it below the broker's max_message_size.")
    progress_delta: float = setting(
        DEFAULT_PROGRESS_DELTA, Number(0), "Seconds between a job's progress messages, unless "
        "its launch says otherwise.")
    checkpoint_delta: float = setting(
        DEFAULT_CHECKPOINT_DELTA, Number(0), "Seconds between a job's checkpoints, unless its "
        "launch says otherwise.")
    improved_delta: float = setting(
        DEFAULT_IMPROVED_DELTA, Number(0), "At least this many seconds between a job's improved "
        "messages, unless its launch says otherwise.")


@dataclass(frozen=True, kw_only=True)
class RabbitMQSettings(_Checked):
    """How a worker uses RabbitMQ (``amqp://`` and ``amqps://`` brokers)."""

    heartbeat: int = setting(DEFAULT_HEARTBEAT, Integer(0), "AMQP heartbeat (s).", metavar="S")
    queue_type: QueueType = setting(
        "classic", Choice(get_args(QueueType)), "Launch queues of its services: quorum ones "
        "survive a cluster node's loss (all workers of a service must agree).")
    claim_after: float = setting(
        DEFAULT_CLAIM_AFTER, Number(0), "Seconds a job runs before it gets its own RPC queue "
        "(stock kiwipy tools can reach it from then on; brokerexec clients always can).")
    lease_renew: float = setting(
        DEFAULT_LEASE_RENEW, Number(0.1), "Seconds between renewals of each running job's "
        "lease; keep it below half the broker's consumer_timeout.")
    resume_grace: float = setting(
        DEFAULT_RESUME_GRACE, Number(0), "Seconds before a job whose worker was lost is "
        "claimed here (its worker may only be reconnecting).")
    journal_max_age: float = setting(
        JOURNAL_MAX_AGE, Number(10), "Seconds the journal keeps its entries, when a worker "
        "makes its streams; a running job's checkpoint is taken again before it would expire.")
    max_checkpoint_bytes: int = setting(
        MAX_CHECKPOINT_BYTES, Integer(1024), "Largest checkpoint stored; a larger one fails the "
        "checkpoint (an error event), not the job. Keep it below the broker's max_message_size.")


@dataclass(frozen=True, kw_only=True)
class LoggingSettings(_Checked):
    """The worker's log lines on stderr (``docs/monitoring.md``)."""

    level: str = setting("INFO", Choice(("DEBUG", "INFO", "WARNING", "ERROR"), upper=True),
                         "Log level.", key="log_level", metavar="LEVEL")
    format: str = setting("text", Choice(("text", "json")),
                          "Log lines on stderr: text, or one JSON object per line.",
                          key="log_format")


@dataclass(frozen=True, kw_only=True)
class MetricsSettings(_Checked):
    """The worker's Prometheus endpoint (``docs/monitoring.md``)."""

    port: int | None = setting(
        None, Optional(Integer(0, 65535)), "Serve Prometheus metrics at "
        "http://HOST:PORT/metrics (default: none; 0: any free port, printed).", key="metrics_port")
    host: str = setting("127.0.0.1", Text(), "Address the metrics server listens on "
                        "(0.0.0.0 in a container).", key="metrics_host", metavar="HOST")


@dataclass(frozen=True, kw_only=True)
class HistorySettings(_Checked):
    """The history indexer (``brokerexec history``, ``docs/history.md``)."""

    store: str = setting("history.db", Text(), "The history store: a SQLite file (created if "
                         "need be) or postgresql://USER@HOST/DB.", key="history_store",
                         option="--store", metavar="URL")
    keep: float = setting(90 * 86400.0, Number(60.0), "Seconds a job's row is kept after it "
                          "ended (90 days), however long the journal keeps its entries.",
                          key="history_keep", option="--keep")


class Origin:
    """Where a setting's value came from: ``kind``, and which option, variable or file."""

    __slots__ = ("kind", "where")

    def __init__(self, kind: Literal["default", "file", "env", "option"], where: str = "") -> None:
        self.kind, self.where = kind, where

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Origin) and (self.kind, self.where) == (other.kind, other.where)

    def __hash__(self) -> int:
        return hash((self.kind, self.where))

    def __repr__(self) -> str:
        return f"Origin({self.kind!r}, {self.where!r})"

    def __str__(self) -> str:
        return f"{self.kind} {self.where}".strip()


@dataclass(frozen=True, kw_only=True)
class Settings(_Checked):
    """The effective settings of one command (:func:`~brokerexec.settings.load_settings`)."""

    broker: str = setting(DEFAULT_URL, Text(), "Broker URL.", env="BROKEREXEC_URL", metavar="URL")
    services: tuple[str, ...] = setting(
        (), Names(), "A service to run (MODULE:Class or file.py:Class); repeat for more.",
        option="--service")
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    rabbitmq: RabbitMQSettings = field(default_factory=RabbitMQSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    history: HistorySettings = field(default_factory=HistorySettings)
    #: Where each value came from, by key (absent: the default).
    origins: Mapping[str, Origin] = field(default_factory=dict, compare=False)

    def shown(self) -> dict[str, dict[str, Any]]:
        """Each setting as printed by ``brokerexec config``, by key: its value (the broker
        URL's password masked) and its origin."""
        rows: dict[str, dict[str, Any]] = {}
        for key in KEYS:
            value = key.value_in(self)
            value = masked_url(value) if key.name == "broker" else value
            origin = self.origins.get(key.name, Origin("default"))
            rows[key.name] = {"value": list(value) if isinstance(value, tuple) else value,
                              "source": origin.kind, "from": origin.where}
        return rows


class Key:
    """One leaf of :class:`Settings`, found by walking the tree: its place (``path``, the
    fields from the root), its declaration and its default."""

    __slots__ = ("declared", "default", "path")

    def __init__(self, path: tuple[str, ...], declared: Setting, default: Any) -> None:
        self.path, self.declared, self.default = path, declared, default

    def __repr__(self) -> str:
        return f"Key({self.name!r})"

    @property
    def name(self) -> str:
        """The TOML key, also how ``brokerexec config`` and error messages name it."""
        return self.declared.key or self.path[-1]

    @property
    def variable(self) -> str:
        """The environment variable that sets it."""
        return self.declared.env or f"BROKEREXEC_{self.name.upper()}"

    @property
    def option(self) -> str:
        """The command-line option that sets it."""
        return self.declared.option or "--" + self.name.replace("_", "-")

    @property
    def metavar(self) -> str:
        """How ``--help`` shows its value."""
        return self.declared.metavar or self.declared.kind.metavar

    def parse(self, raw: Any, text: bool) -> Any:
        """Its kind's check (``ValueError`` saying what was wrong)."""
        return self.declared.kind.parse(raw, text)

    def value_in(self, settings: Any) -> Any:
        """Its value in ``settings`` (a :class:`Settings`)."""
        for name in self.path:
            settings = getattr(settings, name)
        return settings


def _leaves(cls: type, path: tuple[str, ...] = ()) -> Iterator[Key]:
    for one in dataclasses.fields(cls):
        declared = one.metadata.get(_SETTING)
        if declared is not None:
            yield Key((*path, one.name), declared, one.default)
        elif isinstance(one.default_factory, type) and dataclasses.is_dataclass(one.default_factory):
            yield from _leaves(one.default_factory, (*path, one.name))  # a section: its class


#: Every setting, in the order of the tree (``brokerexec config`` prints them so).
KEYS: tuple[Key, ...] = tuple(_leaves(Settings))
