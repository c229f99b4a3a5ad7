"""What users subclass: :class:`Service`, and how its declarations are enforced.

A service declares its name, its inputs, which attributes clients may ``set`` (with types)
and which methods they may ``invoke``. Nothing else is reachable from the network: private
and dunder names are refused even if declared, and the declarations are checked when the
class is defined, so a typo fails at import time rather than at a client's call.

A ``set`` or ``invoke`` is checked in full where it arrives, on the handler thread
(:func:`check_set`, :func:`prepare_invoke`: names, types, arity), so a refusal reaches its
sender at once and nothing is half-applied; the computation thread then only assigns the
checked values or makes the prepared call, at ``ready()``.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

from ..errors import InvalidRequest, ServiceDefinitionError, SignalRefused
from ..protocol.names import NAME_PATTERN
from .child_command import ChildCommand
from .inputs import Input, TypeSpec, check_type, is_type_spec, type_name, validate_request

__all__ = ["Handler", "PreparedInvoke", "Service", "apply_invoke", "apply_set", "check_present", "check_set",
           "prepare_invoke"]

#: Methods of the service life cycle: never invokable remotely.
_LIFECYCLE = frozenset({"run", "progress", "checkpoint", "restore", "describe", "validate", "child_command",
                        "runs_in_child", "child_setup", "child_teardown", "can_resume"})
_JSON_TYPES = (int, float, str, bool, list, dict)
_ABSENT = object()


def _check_definition(cls: type[Service]) -> None:
    """Refuse a class whose declarations cannot work, naming the class and the mistake.

    Checked here rather than at a client's call: a typo in a class body should fail where
    its author runs it first (import, ``describe``), not as a puzzling refusal later.
    """
    for find in (_class_mistakes, _input_mistakes, _settable_mistakes, _invokable_mistakes):
        for mistake in find(cls):
            raise ServiceDefinitionError(f"service class {cls.__qualname__}: {mistake}")


def _class_mistakes(cls: type[Service]) -> Iterator[str]:
    if cls.name and not (isinstance(cls.name, str) and NAME_PATTERN.match(cls.name)):
        yield f"service name {cls.name!r} must match {NAME_PATTERN.pattern}"
    if cls.runner not in ("thread", "process"):
        yield f"runner {cls.runner!r} must be 'thread' or 'process'"
    if cls.on_lost not in ("restart", "fail"):
        yield f"on_lost must be 'restart' or 'fail', not {cls.on_lost!r}"
    if cls.child_python is not None and not (isinstance(cls.child_python, str) and cls.child_python):
        yield f"child_python must be the path of a Python interpreter, not {cls.child_python!r}"


def _input_mistakes(cls: type[Service]) -> Iterator[str]:
    names = []
    for port in cls.inputs:
        if not isinstance(port, Input):
            yield f"inputs must be Input objects, not {port!r}"
            return
        names.append(port.name)
        if port.mistake():
            yield port.mistake()
    if len(names) != len(set(names)):
        yield f"duplicate input names in {names}"


def _settable_mistakes(cls: type[Service]) -> Iterator[str]:
    for attr, kind in cls.settable.items():
        if not _is_public(attr):
            yield f"settable {attr!r} must be a public identifier"
        elif _is_method(cls, attr):
            yield f"settable {attr!r} is a method of the service: a set would replace it"
        elif not is_type_spec(kind):
            yield f"settable {attr!r}: type {kind!r} is not a type or a tuple of types"


def _invokable_mistakes(cls: type[Service]) -> Iterator[str]:
    if isinstance(cls.invokable, str):  # ("perturb") without its comma: a string, not a tuple
        yield f"invokable must be a sequence of names, not the string {cls.invokable!r}"
        return
    for method in cls.invokable:
        if not _is_public(method):
            yield f"invokable {method!r} must be a public identifier"
        elif method in _LIFECYCLE or not _is_method(cls, method):
            yield f"invokable {method!r} is not a public method of the service"


def _is_public(name: object) -> bool:
    return isinstance(name, str) and name.isidentifier() and not name.startswith("_")


def _is_method(cls: type, name: str) -> bool:
    """A method (of any kind) by that name, looked up without running a descriptor."""
    found = inspect.getattr_static(cls, name, None)
    return isinstance(found, (classmethod, staticmethod)) or callable(found)


class Handler(Protocol):
    """What a running service sees of its :class:`~brokerexec.ServiceHandler`: the
    ``handler`` that :meth:`Service.run` gets, and the calls it makes on it from the
    computation thread (the ServiceHandler documents each)."""

    def ready(self) -> None:
        """Apply queued signals, hold while paused, raise ``Aborted``, emit what is due."""

    def improved(self, state: dict[str, Any]) -> None:
        """Report a better intermediate result."""

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
        """``[fn(x) for x in items]`` on the worker pool, calling ``ready()`` meanwhile."""

    def imap(self, fn: Callable[[Any], Any], items: Iterable[Any], enumerated: bool = False,
             ordered: bool = True) -> Iterator[Any]:
        """Yield ``fn(x)`` for x in items as they are ready."""

    @property
    def progress_delta(self) -> float:
        """Seconds between progress messages."""

    @property
    def checkpoint_delta(self) -> float:
        """Seconds between checkpoints."""

    @property
    def improved_delta(self) -> float:
        """At least this many seconds between improved messages."""


class Service:
    """Base class of user services.

    Class attributes:
        name: the registry name (letters, digits, ``_``, ``-``), used to launch it.
        inputs: the declared :class:`~brokerexec.Input` list; requests are checked against
            it strictly. A service that declares none takes any JSON object as its request.
        settable: attribute name -> type, for remote ``set``.
        invokable: method names for remote ``invoke``.
        on_lost: what happens to a job whose worker was lost (or stopped) when it cannot
            resume from a checkpoint (none was stored, or the service has no
            :meth:`restore`): ``"restart"`` from the beginning on another worker (the
            default), or ``"fail"``, with a record that says the worker was lost.
        runner: ``"thread"`` (the default: the worker's runner decides) or ``"process"``
            (always a child process of its own, even on a worker run with threads).
        child_python: the interpreter its child processes run (any CPython 3.10 or newer,
            with or without brokerexec installed: ``docs/services.md``); setting it runs
            the service in child processes, as ``runner = "process"``. Default: the
            worker's ``--child-python``, else the worker's own interpreter.

    Override :meth:`run` (required), and optionally :meth:`progress`, :meth:`checkpoint`
    and :meth:`restore`; for a child process, :meth:`child_command`, :meth:`child_setup`
    and :meth:`child_teardown`. A service with both :meth:`checkpoint` and :meth:`restore` is
    resumed from its last checkpoint after a crash, and handed over at a graceful stop.
    """

    name: ClassVar[str] = ""
    inputs: ClassVar[Sequence[Input]] = ()
    settable: ClassVar[Mapping[str, TypeSpec]] = {}
    invokable: ClassVar[Sequence[str]] = ()
    on_lost: ClassVar[Literal["restart", "fail"]] = "restart"
    runner: ClassVar[str] = "thread"
    child_python: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _check_definition(cls)

    @classmethod
    def child_command(cls) -> ChildCommand | None:
        """How to start this service's child process in an application's own Python
        (Qube's ``getSubprocessArgs``): a :class:`~brokerexec.ChildCommand`, or None (the
        default) to run an interpreter (:attr:`child_python`). Returning one runs the
        service in child processes, as ``runner = "process"``."""
        return None

    @classmethod
    def runs_in_child(cls) -> bool:
        """True if the service asks for child processes, wherever it runs: ``runner =
        "process"``, a :attr:`child_python` or a :meth:`child_command` of its own."""
        return (cls.runner == "process" or cls.child_python is not None
                or cls.child_command.__func__ is not Service.child_command.__func__)  # type: ignore[attr-defined]

    def child_setup(self) -> None:
        """Run in the child process before the work (Qube's ``jobSetup``): open the
        application's scene, load a model. If it raises, the job fails, and says so."""

    def child_teardown(self) -> None:
        """Run in the child process after the work, however it ended (Qube's
        ``jobTeardown``). If it raises, the job fails, and its record says so (with the
        result, if there was one)."""

    @classmethod
    def can_resume(cls) -> bool:
        """True if the service saves (:meth:`checkpoint`) and restores (:meth:`restore`)
        its state, so that a job can continue on another worker."""
        return cls.checkpoint is not Service.checkpoint and cls.restore is not Service.restore

    def run(self, handler: Handler, request: dict[str, Any]) -> Any:
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
        """A JSON description: name, help, how the request is checked (``"request"``:
        ``"inputs"``, or ``"free-form"`` when none are declared), inputs, settable and
        invokable names."""
        return {
            "name": cls.name,
            "help": inspect.getdoc(cls) or "",
            "request": "inputs" if cls.inputs else "free-form",
            "inputs": [port.describe() for port in cls.inputs],
            "settable": {attr: type_name(kind) for attr, kind in cls.settable.items()},
            "invokable": list(cls.invokable),
        }

    @classmethod
    def validate(cls, request: Mapping[str, Any] | None) -> dict[str, Any]:
        """Check a request against :attr:`inputs`; return it with defaults filled in.

        A service that declares no inputs takes a free-form request: the object as sent
        (its size was checked with the message that carried it). One that declares inputs
        is held to them: a missing required input or an unknown key is refused.
        """
        if request is not None and not isinstance(request, Mapping):
            raise InvalidRequest(f"{cls.name}: a request must be a JSON object")
        if not cls.inputs:
            return dict(request or {})
        return validate_request(cls.inputs, request, service=cls.name or cls.__qualname__)


# ---- set: checked on the handler thread, assigned at ready() --------------------------------


def check_set(service_cls: type[Service], attrs: Mapping[str, Any],
              service: Service | None = None) -> dict[str, Any]:
    """Check a ``set`` against the declarations; return the values to assign.

    With the running ``service``, a declared name it does not have as an attribute is
    refused too: a typo in ``settable`` must not create an attribute nothing reads.

    Raises:
        SignalRefused: naming the first undeclared, private, missing or mistyped attribute.
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
    if service is not None:
        check_present(service, checked)
    return checked


def check_present(service: Service, attrs: Iterable[str]) -> None:
    """Refuse a ``set`` of a declared name that ``service`` does not have as an attribute.

    Looked up statically: reading it must not run a property's code of the service on the
    handler thread.

    Raises:
        SignalRefused: naming the first attribute missing.
    """
    for attr in attrs:
        if inspect.getattr_static(service, attr, _ABSENT) is _ABSENT:
            raise SignalRefused(
                f"cannot set {attr!r} on {type(service).name}: declared settable, but the running "
                f"{type(service).__qualname__} has no attribute {attr!r} (give it one, e.g. in "
                "__init__, or correct the name in settable)")


def apply_set(service: Service, attrs: Mapping[str, Any]) -> dict[str, Any]:
    """Set declared attributes on ``service``: all of them, or none if one is refused."""
    checked = check_set(type(service), attrs, service)
    for attr, value in checked.items():
        setattr(service, attr, value)
    return checked


# ---- invoke: checked and bound on the handler thread, called at ready() -------------------


@dataclass(frozen=True)
class PreparedInvoke:
    """A checked call of a declared method: names, arity and declared JSON types hold."""

    method: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    def call(self, service: Service) -> Any:
        """Make the call (computation thread)."""
        return getattr(service, self.method)(*self.args, **self.kwargs)


_SIGNATURES: dict[tuple[type[Service], str], tuple[inspect.Signature, dict[str, Any]]] = {}


def _signature(service_cls: type[Service], method: str) -> tuple[inspect.Signature, dict[str, Any]]:
    """The method's signature and type hints, read once per class and method."""
    known = _SIGNATURES.get((service_cls, method))
    if known is not None:
        return known
    function = getattr(service_cls, method)
    signature = inspect.signature(function)
    if inspect.isfunction(inspect.getattr_static(service_cls, method)):
        # A plain method, read off the class: `self` is not one of the caller's parameters.
        signature = signature.replace(parameters=list(signature.parameters.values())[1:])
    try:
        hints = typing.get_type_hints(function)
    except Exception:  # an annotation that cannot be evaluated: check names and arity only
        hints = {}
    _SIGNATURES[(service_cls, method)] = signature, hints
    return signature, hints


def prepare_invoke(service_cls: type[Service], method: object, args: Sequence[Any],
                   kwargs: Mapping[str, Any]) -> PreparedInvoke:
    """Check an ``invoke`` of ``method`` with these arguments; return the call to make.

    Arguments whose parameter is annotated with a JSON type (``int``, ``float``, ``str``,
    ``bool``, ``list``, ``dict``) are checked against it (an ``int`` is accepted, and
    converted, for a ``float``).

    Raises:
        SignalRefused: ``method`` is not declared invokable (or is private), or the
            arguments do not fit its signature or its annotated types.
    """
    if (not isinstance(method, str) or method.startswith("_")
            or method not in service_cls.invokable):
        allowed = ", ".join(service_cls.invokable) or "none"
        raise SignalRefused(f"cannot invoke {method!r} on {service_cls.name}: invokable are {allowed}")
    signature, hints = _signature(service_cls, method)
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise SignalRefused(f"invoke {method}: {exc}") from exc
    for param, value in bound.arguments.items():
        hint = hints.get(param)
        if hint in _JSON_TYPES:
            try:
                bound.arguments[param] = check_type(value, hint)
            except TypeError as exc:
                raise SignalRefused(f"invoke {method}: argument {param!r}: {exc}") from exc
    return PreparedInvoke(method, tuple(bound.args), dict(bound.kwargs))


def apply_invoke(service: Service, method: str, args: Sequence[Any],
                 kwargs: Mapping[str, Any]) -> Any:
    """Call a declared method of ``service`` after checking its arguments."""
    return prepare_invoke(type(service), method, args, kwargs).call(service)
