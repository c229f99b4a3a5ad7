"""Declared inputs and settable attributes, checked before anything runs (plumpy's ports).

A service lists its inputs as :class:`Input` objects; :func:`validate_request` turns a raw
JSON request into the checked dict the computation receives, or raises ``InvalidRequest``
naming every problem at once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidRequest

__all__ = ["MISSING", "Input", "check_type", "is_type_spec", "type_name", "validate_request"]


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


#: Marks an input without a default.
MISSING: Any = _Missing()

TypeSpec = type | tuple[type, ...]


def is_type_spec(kind: object) -> bool:
    """True for a type or a non-empty tuple of types: what ``isinstance`` accepts here."""
    if isinstance(kind, tuple):
        return bool(kind) and all(isinstance(k, type) for k in kind)
    return isinstance(kind, type)


def type_name(kind: TypeSpec) -> str:
    """``int``, or ``int | str`` for a tuple of types; the repr of anything else (so that a
    description of a bad declaration never fails on it)."""
    if isinstance(kind, tuple):
        return " | ".join(type_name(k) for k in kind)
    return kind.__name__ if isinstance(kind, type) else repr(kind)


def check_type(value: Any, kind: TypeSpec) -> Any:
    """Return ``value`` if it is of ``kind`` (JSON rules), else raise ``TypeError``.

    JSON has one number type, so an ``int`` is accepted (and converted) where a ``float``
    is declared; ``bool`` is never accepted as a number.
    """
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool):
        if bool in kinds or object in kinds:
            return value
    elif isinstance(value, kinds):
        return value
    elif float in kinds and isinstance(value, int):
        return float(value)
    raise TypeError(f"expected {type_name(kind)}, got {type(value).__name__} {value!r:.80}")


@dataclass(frozen=True)
class Input:
    """One declared input of a service.

    Parameters:
        name: the request key.
        type: a type or tuple of types the value must have (JSON rules, see ``check_type``).
        default: the value when the request omits it; an input without one is required.
        required: force "required" even with a default of None.
        help: one line for ``describe()`` and the CLI.
    """

    name: str
    type: TypeSpec = object
    default: Any = MISSING
    required: bool | None = None
    help: str = ""

    def __post_init__(self) -> None:
        if not self.name.isidentifier() or self.name.startswith("_"):
            raise ValueError(f"input name {self.name!r} must be a public identifier")

    def mistake(self) -> str:
        """What is wrong with this declaration ("" when nothing): a type that is not a type
        (or tuple of types), or a default that does not have it."""
        if not is_type_spec(self.type):
            return f"input {self.name!r}: type {self.type!r} is not a type or a tuple of types"
        if self.default is MISSING or self.required:  # a required input's default is never used
            return ""
        try:
            check_type(self.default, self.type)
        except TypeError as exc:
            return f"input {self.name!r}: default {self.default!r:.80} does not match: {exc}"
        return ""

    @property
    def is_required(self) -> bool:
        """True when the request must give this input."""
        return self.required if self.required is not None else self.default is MISSING

    def describe(self) -> dict[str, Any]:
        """A JSON description of this input."""
        info: dict[str, Any] = {"name": self.name, "type": type_name(self.type),
                                "required": self.is_required, "help": self.help}
        if self.default is not MISSING:
            info["default"] = self.default
        return info


def validate_request(inputs: Iterable[Input], request: Mapping[str, Any] | None,
                     *, service: str = "service") -> dict[str, Any]:
    """Check ``request`` against ``inputs``; return it with defaults filled in.

    Raises:
        InvalidRequest: listing every missing, unknown or mistyped input.
    """
    request = dict(request or {})
    declared = {port.name: port for port in inputs}
    problems: list[str] = []
    checked: dict[str, Any] = {}
    for name in sorted(set(request) - set(declared)):
        problems.append(f"unknown input {name!r}")
    for name, port in declared.items():
        if name in request:
            try:
                checked[name] = check_type(request[name], port.type)
            except TypeError as exc:
                problems.append(f"input {name!r}: {exc}")
        elif port.is_required:
            problems.append(f"missing required input {name!r}")
        else:
            checked[name] = port.default
    if problems:
        accepted = ", ".join(declared) or "none"
        raise InvalidRequest(f"{service}: " + "; ".join(problems) + f" (inputs: {accepted})")
    return checked
