"""Where the modules of brokerexec 0.1's flat layout went, for code that imports them.

Such an import still works: ``from brokerexec.service import Service`` gets the very class
of ``brokerexec.core.service``, with a ``DeprecationWarning`` naming the new path. A module
split in two answers for the names of both. New code imports the public names from
``brokerexec`` itself; only those are kept stable.

``brokerexec/__init__.py`` installs :class:`_Finder` at the end of ``sys.meta_path``: it is
asked only for names no real module has, so it costs the other imports nothing.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import sys
import types
import warnings
from typing import Any

__all__ = ["MOVED", "install"]

#: Old module (without ``brokerexec.``) -> its new home(s), also without ``brokerexec.``.
MOVED: dict[str, tuple[str, ...]] = {
    # the core
    "service": ("core.service",),
    "ports": ("core.inputs",),
    "states": ("core.state_machine", "protocol.states"),
    "crossing": ("core.crossing",),
    "signal_desk": ("core.handler_thread", "core.intervals"),
    "computation": ("core.computation_thread", "core.runner", "core.crossing"),
    "handler": ("core.service_handler", "core.intervals"),
    "runner": ("core.thread_runner", "core.runner"),
    "pool": ("core.map_pool", "settings"),
    "registry": ("core.registry",),
    "codec_yaml": ("codec.yaml_fallback",),
    # child processes
    "back_channel": ("child.back_channel",),
    "child_runner": ("child.runner", "child.processes"),
    "child_computation": ("child.computation",),
    "child_main": ("child.main",),
    # worker, clients, command line
    "metrics": ("worker.metrics",),
    "job": ("client.job",),
    "aio": ("client.aio",),
    "pace": ("client.pace",),
    "display": ("cli.display",),
    **{f"cli_{verb}": (f"cli.{verb}",)
       for verb in ("config", "fleet", "input", "jobs", "output", "show", "worker")},
    # transports
    "transport.memory_worker": ("transport.memory.worker",),
    "transport.memory_clients": ("transport.memory.clients",),
    "transport.aiormq_internals": ("transport.rabbitmq.aiormq_internals",),
    "transport.amqp_settings": ("transport.rabbitmq.connection_settings",),
    "transport.amqp_connection": ("transport.rabbitmq.connection",
                                  "transport.rabbitmq.connection_settings"),
    "transport.amqp_journal": ("transport.rabbitmq.journal_reader",),
    **{f"transport.amqp_{name}": (f"transport.rabbitmq.{name}",)
       for name in ("client", "declare", "delivery", "failures", "frames", "outbox", "setups")},
    "transport.amqp_worker": ("transport.rabbitmq.worker.transport",),
    "transport.amqp_entries": ("transport.rabbitmq.worker.journal_writer",),
    "transport.amqp_job_end": ("transport.rabbitmq.worker.owner_writes",),
    **{f"transport.amqp_{name}": (f"transport.rabbitmq.worker.{name}",)
       for name in ("intake", "ownership", "owned_job", "leases", "signal_server")},
    "transport.pika_journal": ("transport.pika.journal_reader",),
    "transport.pika_depth": ("transport.pika.queue_depth",),
    **{f"transport.pika_{name}": (f"transport.pika.{name}",)
       for name in ("client", "caller", "listener", "internals")},
}
_PREFIX = "brokerexec."


class _Forwarding(types.ModuleType):
    """An old module: its names are its new homes' names."""

    def __init__(self, name: str, homes: tuple[str, ...]) -> None:
        super().__init__(name, f"Moved to {', '.join(homes)}.")
        self._homes = homes

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        for home in self._homes:
            module = importlib.import_module(home)
            if hasattr(module, attr):
                return getattr(module, attr)
        raise AttributeError(f"module {self.__name__!r} has no attribute {attr!r}: it moved to "
                             f"{' or '.join(self._homes)}")

    def __dir__(self) -> list[str]:
        return sorted({name for home in self._homes for name in dir(importlib.import_module(home))})


class _Loader:  # importlib.abc.Loader's protocol (the ABC costs a one-shot verb 6 ms)
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        homes = tuple(_PREFIX + home for home in MOVED[spec.name.removeprefix(_PREFIX)])
        return _Forwarding(spec.name, homes)

    def exec_module(self, module: types.ModuleType) -> None:
        assert isinstance(module, _Forwarding)
        warnings.warn(f"{module.__name__} moved to {' and '.join(module._homes)}: import from "
                      "there (or the public names from brokerexec)", DeprecationWarning,
                      stacklevel=_importer_level())


def _importer_level() -> int:
    """The ``stacklevel`` that points past the import machinery, at the importing line."""
    level, frame = 2, sys._getframe(2)  # 0: here, 1: exec_module
    caller: types.FrameType | None = frame
    while caller is not None and caller.f_code.co_filename.startswith("<frozen importlib"):
        level, caller = level + 1, caller.f_back
    return level


class _Finder:  # importlib.abc.MetaPathFinder's protocol
    def find_spec(self, fullname: str, path: Any = None,
                  target: types.ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname.startswith(_PREFIX) and fullname.removeprefix(_PREFIX) in MOVED:
            return importlib.machinery.ModuleSpec(fullname, _Loader())  # type: ignore[arg-type]
        return None


def install() -> None:
    """Let the old module paths import (once per process)."""
    if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.append(_Finder())
