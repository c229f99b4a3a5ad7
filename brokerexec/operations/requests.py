"""An operation's items: their requests (a list, an iterator or a grid) and the key of each.

An operation runs one service over many requests, one job per request (pySPACE's operation
of processes). Each request is an *item*, named by a key: by default a hash of the service's
name and the request in a normal form (JSON with its keys sorted), so that the same sweep
submitted again names the same items, and what ran already can be skipped or resumed
(valjean's ``merge_done_tasks``); or a key its caller gives.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from ..errors import DecodeError, InvalidRequest
from ..protocol.names import check_item_key

__all__ = ["Grid", "check_key", "grid", "item_key", "keyed_requests", "normal_form"]

def normal_form(request: object) -> str:
    """A request as JSON with its keys sorted and no spaces: equal requests, equal texts. A
    tuple is a list and a key a string, as on the wire (``codec.encode``).

    Raises:
        InvalidRequest: it is not a JSON object (a dict of str keys holding JSON values,
            finite numbers only).
    """
    if not isinstance(request, Mapping):
        raise InvalidRequest(f"a request is a JSON object (a dict), not {type(request).__name__}")
    try:
        return json.dumps(request, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False)
    except (TypeError, ValueError) as exc:  # a value JSON has no form for, NaN, a key not a str
        raise InvalidRequest(f"a request must be JSON: {exc}") from None


def item_key(service: str, request: Mapping[str, Any]) -> str:
    """The key of the item that runs ``request`` through ``service``: 32 hex digits of the
    SHA-256 of both (``1`` and ``1.0`` differ, as in JSON; the order of keys does not).

    Raises:
        InvalidRequest: ``request`` is not a JSON object.
    """
    return hashlib.sha256(f"{service}\n{normal_form(request)}".encode()).hexdigest()[:32]


def check_key(key: object) -> str:
    """A key its caller gives, checked; returned.

    Raises:
        InvalidRequest: not a string of 1-200 characters without control characters.
    """
    try:
        return check_item_key(key)
    except DecodeError as exc:
        raise InvalidRequest(str(exc)) from None


def keyed_requests(service: str, requests: Iterable[Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(key, request)`` for each of an operation's requests, as they are taken: a dict
    (keyed by :func:`item_key`) or a ``(key, dict)`` pair (its caller's key, checked).

    Raises (as each is taken):
        InvalidRequest: a request is not a JSON object, or a key is bad.
    """
    for entry in requests:
        if isinstance(entry, tuple) and len(entry) == 2:
            key, request = entry
            normal_form(request)  # a JSON object, as the hash would check
            yield check_key(key), dict(request)
        else:
            yield item_key(service, entry), dict(entry)


class Grid:
    """Every combination of the values of named axes, each a request: ``grid(a=[1, 2],
    b=[3, 4])`` is ``{"a": 1, "b": 3}``, ``{"a": 1, "b": 4}``, ``{"a": 2, "b": 3}``,
    ``{"a": 2, "b": 4}`` (the last axis varies fastest). Made as they are iterated: a
    100,000-item grid holds its axes, not its requests; ``len()`` says how many there are.
    """

    def __init__(self, axes: Mapping[str, Iterable[Any]]) -> None:
        if not axes:
            raise InvalidRequest("a grid needs at least one axis: grid(name=[values, ...])")
        self.axes: dict[str, tuple[Any, ...]] = {}
        for name, values in axes.items():
            if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Iterable):
                raise InvalidRequest(f"the axis {name!r} of a grid is a list of values, not {values!r}")
            self.axes[name] = tuple(values)
            if not self.axes[name]:
                raise InvalidRequest(f"the axis {name!r} of a grid has no values")

    def __len__(self) -> int:
        return math.prod(len(values) for values in self.axes.values())

    def __iter__(self) -> Iterator[dict[str, Any]]:
        names = list(self.axes)
        for values in itertools.product(*self.axes.values()):
            yield dict(zip(names, values, strict=True))

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}=<{len(values)} values>" for name, values in self.axes.items())
        return f"grid({shown}): {len(self)} requests"


def grid(**axes: Iterable[Any]) -> Grid:
    """The requests of a sweep over every combination of ``axes`` (see :class:`Grid`).

    Raises:
        InvalidRequest: no axis, or an axis that is not a non-empty list of values.
    """
    return Grid(axes)
