"""What users subclass: :class:`Service`.

A service declares its name, its inputs, which attributes clients may ``set`` (with types)
and which methods they may ``invoke``. Nothing else is reachable from the network: private
and dunder names are refused even if declared, and the declarations are checked when the
class is defined, so a typo fails at import time rather than at a client's call.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from .errors import InvalidRequest, SignalRefused
from .ports import Input, TypeSpec, check_type, type_name, validate_request
from .protocol import NAME_PATTERN

if TYPE_CHECKING:
    from .handler import ServiceHandler

__all__ = ["Service", "apply_invoke", "apply_set", "check_invokable", "check_set"]

#: Methods of the service life cycle: never invokable remotely.
_LIFECYCLE = frozenset({"run", "progress", "checkpoint", "restore", "describe", "validate"})
_JSON_TYPES = (int, float, str, bool, list, dict)


def _check_public(kind: str, name: str, owner: str) -> None:
    if not isinstance(name, str) or not name.isidentifier() or name.startswith("_"):
        raise TypeError(f"{owner}: {kind} {name!r} must be a public identifier")


class Service:
    """Base class of user services.

    Class attributes:
        name: the registry name (letters, digits, ``_``, ``-``), used to launch it.
        inputs: the declared :class:`~brokerexec.Input` list; requests are checked first.
        settable: attribute name -> type, for remote ``set``.
        invokable: method names for remote ``invoke``.

    Override :meth:`run` (required), and optionally :meth:`progress`, :meth:`checkpoint`
    and :meth:`restore`.
    """

    name: ClassVar[str] = ""
    inputs: ClassVar[Sequence[Input]] = ()
    settable: ClassVar[Mapping[str, TypeSpec]] = {}
    invokable: ClassVar[Sequence[str]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        owner = cls.__qualname__
        if cls.name and not NAME_PATTERN.match(cls.name):
            raise TypeError(f"{owner}: service name {cls.name!r} must match {NAME_PATTERN.pattern}")
        for attr in cls.settable:
            _check_public("settable attribute", attr, owner)
        for method in cls.invokable:
            _check_public("invokable method", method, owner)
            if method in _LIFECYCLE or not callable(getattr(cls, method, None)):
                raise TypeError(f"{owner}: invokable {method!r} is not a method of the service")
        names = [port.name for port in cls.inputs]
        if len(names) != len(set(names)):
            raise TypeError(f"{owner}: duplicate input names in {names}")

    def run(self, handler: ServiceHandler, request: dict[str, Any]) -> Any:
        """Do the work in the computation thread; return a JSON-able result.

        Call ``handler.ready()`` often: that is where signals apply, pauses hold and
        aborts raise :class:`~brokerexec.Aborted`.
        """
        raise NotImplementedError(f"{type(self).__qualname__}.run is not implemented")

    def progress(self) -> dict[str, Any]:
        """Progress to report when due: e.g. ``{"fraction": 0.4, "message": "..."}``."""
        return {}

    def checkpoint(self) -> dict[str, Any]:
        """A JSON-able state from which :meth:`restore` can continue."""
        return {}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint (called before ``run`` when resuming)."""
        raise NotImplementedError(f"{type(self).__qualname__} cannot resume from a checkpoint")

    @classmethod
    def describe(cls) -> dict[str, Any]:
        """A JSON description: name, help, inputs, settable and invokable names."""
        return {
            "name": cls.name,
            "help": inspect.getdoc(cls) or "",
            "inputs": [port.describe() for port in cls.inputs],
            "settable": {attr: type_name(kind) for attr, kind in cls.settable.items()},
            "invokable": list(cls.invokable),
        }

    @classmethod
    def validate(cls, request: Mapping[str, Any] | None) -> dict[str, Any]:
        """Check a request against :attr:`inputs`; return it with defaults filled in."""
        if request is not None and not isinstance(request, Mapping):
            raise InvalidRequest(f"{cls.name}: a request must be a JSON object")
        return validate_request(cls.inputs, request, service=cls.name or cls.__qualname__)


def check_set(service_cls: type[Service], attrs: Mapping[str, Any]) -> dict[str, Any]:
    """Check a ``set`` against the declarations; return the values to assign.

    Raises:
        SignalRefused: naming the first undeclared, private or mistyped attribute.
    """
    declared = service_cls.settable
    checked: dict[str, Any] = {}
    for attr, value in attrs.items():
        if attr not in declared or attr.startswith("_"):
            allowed = ", ".join(declared) or "none"
            raise SignalRefused(f"cannot set {attr!r} on {service_cls.name}: settable are {allowed}")
        try:
            checked[attr] = check_type(value, declared[attr])
        except TypeError as exc:
            raise SignalRefused(f"cannot set {attr!r}: {exc}") from exc
    return checked


def apply_set(service: Service, attrs: Mapping[str, Any]) -> dict[str, Any]:
    """Set declared attributes on ``service``: all of them, or none if one is refused."""
    checked = check_set(type(service), attrs)
    for attr, value in checked.items():
        setattr(service, attr, value)
    return checked


def check_invokable(service_cls: type[Service], method: object) -> str:
    """Check ``method`` is declared invokable (never private); return it."""
    if not isinstance(method, str) or method.startswith("_") or method not in service_cls.invokable:
        allowed = ", ".join(service_cls.invokable) or "none"
        raise SignalRefused(f"cannot invoke {method!r} on {service_cls.name}: invokable are {allowed}")
    return method


def apply_invoke(service: Service, method: str, args: Sequence[Any],
                 kwargs: Mapping[str, Any]) -> Any:
    """Call a declared method of ``service`` after checking its arguments."""
    check_invokable(type(service), method)
    function = getattr(service, method)
    try:
        bound = inspect.signature(function).bind(*args, **kwargs)
    except TypeError as exc:
        raise SignalRefused(f"invoke {method}: {exc}") from exc
    hints = typing.get_type_hints(function)
    for param, value in bound.arguments.items():
        hint = hints.get(param)
        if hint in _JSON_TYPES:
            try:
                bound.arguments[param] = check_type(value, hint)
            except TypeError as exc:
                raise SignalRefused(f"invoke {method}: argument {param!r}: {exc}") from exc
    return function(*bound.args, **bound.kwargs)
