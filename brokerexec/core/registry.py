"""Which services a worker may run: the allow-list, and nothing else, chooses code.

Services come from ``--service MODULE:Class`` (or ``path/to/file.py:Class``) and from the
``brokerexec.services`` entry-point group. A launch naming anything else is refused with
``UnknownService``; no name from the network is ever imported.

A child process that runs a computation (``runner = "process"``) loads its class again, by
the spec it was loaded with here (:func:`service_spec`): the same file or module, never a
pickle.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Iterable
from importlib.metadata import entry_points
from pathlib import Path

from ..errors import BrokerExecError, ConfigurationError, UnknownService
from .service import Service

__all__ = ["ENTRY_POINT_GROUP", "ServiceRegistry", "load_service", "service_spec"]

ENTRY_POINT_GROUP = "brokerexec.services"

#: The spec each class was loaded by, for a child process to load it the same way.
_SPECS: dict[type[Service], str] = {}


def load_service(spec: str) -> type[Service]:
    """Import ``module:Class`` or ``path/file.py:Class`` and check it is a named Service.

    ``Class`` may be dotted (``Outer.Inner``).
    """
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise ConfigurationError(f"service spec {spec!r} must look like module:Class or file.py:Class")
    path: Path | None = None
    try:
        if target.endswith(".py"):
            path = Path(target).resolve()
            module_name = f"brokerexec_user_{path.stem}"
            module_spec = importlib.util.spec_from_file_location(module_name, path)
            if module_spec is None or module_spec.loader is None:
                raise ConfigurationError(f"cannot load {path}")
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_name] = module  # so process pools can pickle its functions
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
        cls: object = module
        for part in attr.split("."):
            cls = getattr(cls, part)
    except BrokerExecError:  # a ServiceDefinitionError says what is wrong already
        raise
    except Exception as exc:  # whatever the module raises on import is its author's to read
        raise ConfigurationError(f"cannot load service {spec!r}: {type(exc).__name__}: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, Service)) or not cls.name:
        raise ConfigurationError(f"{spec!r} is not a brokerexec.Service subclass with a name")
    _SPECS.setdefault(cls, f"{path}:{attr}" if path is not None else spec)
    return cls


def service_spec(cls: type[Service]) -> str:
    """The spec that loads ``cls`` in another interpreter: the one it was loaded by, or
    ``module:QualName`` for a class registered as an object.

    Raises:
        ConfigurationError: ``cls`` cannot be loaded from elsewhere (defined in a function).
    """
    known = _SPECS.get(cls)
    if known is not None:
        return known
    if "<locals>" in cls.__qualname__:
        raise ConfigurationError(f"service {cls.name!r} ({cls.__qualname__}) is defined inside a "
                                 "function: a child process cannot load it")
    module = sys.modules.get(cls.__module__)
    main_file = getattr(module, "__file__", None) if cls.__module__ == "__main__" else None
    if main_file:  # the worker's own script: load that file, as multiprocessing's spawn does
        return f"{Path(main_file).resolve()}:{cls.__qualname__}"
    return f"{cls.__module__}:{cls.__qualname__}"


class ServiceRegistry:
    """Services by name."""

    def __init__(self, services: Iterable[type[Service]] = ()) -> None:
        self._services: dict[str, type[Service]] = {}
        for service in services:
            self.add(service)

    @classmethod
    def from_specs(cls, specs: Iterable[str], *, use_entry_points: bool = True) -> ServiceRegistry:
        """Services named on the command line, plus the entry-point group's."""
        registry = cls(load_service(spec) for spec in specs)
        if use_entry_points:
            for point in entry_points(group=ENTRY_POINT_GROUP):
                registry.add(load_service(point.value))
        return registry

    def add(self, service: type[Service]) -> None:
        """Register ``service`` under its name; a different class of the same name is an error."""
        if not (isinstance(service, type) and issubclass(service, Service)) or not service.name:
            raise ConfigurationError(f"{service!r} is not a brokerexec.Service subclass with a name")
        known = self._services.get(service.name)
        if known is not None and known is not service:
            raise ConfigurationError(f"two services named {service.name!r}: {known} and {service}")
        self._services[service.name] = service

    def get(self, name: str) -> type[Service]:
        """The service called ``name``, or ``UnknownService`` listing what is known."""
        try:
            return self._services[name]
        except KeyError:
            known = ", ".join(sorted(self._services)) or "none"
            raise UnknownService(f"no service {name!r} on this worker (registered: {known})") from None

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._services)

    def __contains__(self, name: object) -> bool:
        return name in self._services

    def __len__(self) -> int:
        return len(self._services)
