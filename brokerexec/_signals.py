"""Signal bodies on both sides of ``ready()``: ``set``/``invoke`` checked, queued, applied.

A ``set`` or ``invoke`` that can be refused (undeclared or private name, wrong type, wrong
arity) is refused at once on the handler thread by :func:`split_set` and
:func:`check_invoke`, so the sender learns without waiting for the computation and nothing
is half-applied. What passes is queued as a :class:`QueuedSignal`; the computation thread
applies it with :func:`apply_queued` at its next ``ready()`` (service code only ever runs
there), or :func:`fail_pending` fails it when the job ends first. :func:`status_body` builds
the reply to ``status``, the one signal answered with a value rather than a future.

This module holds no state: the queue, the lock and the ``_attention`` flag that make the
crossing safe stay on :class:`~brokerexec.handler.ServiceHandler`, beside the ``ready()`` that
reads them. Private: :mod:`brokerexec.handler` re-exports what other modules import.
"""

from __future__ import annotations

import concurrent.futures as cf
import math
from collections.abc import Callable, Iterable
from typing import Any

from . import codec
from .errors import InvalidState, SignalRefused
from .ports import check_type
from .protocol import Intent
from .service import Service, apply_invoke, apply_set, check_invokable, check_set
from .states import JobState, StateMachine

__all__ = ["HANDLER_SETTABLE", "QueuedSignal", "apply_queued", "check_delta", "check_invoke",
           "fail_pending", "resolved", "split_set", "status_body"]

#: Attributes a ``set`` may change on the handler itself (park's onSignalSet).
HANDLER_SETTABLE = ("progress_delta", "checkpoint_delta", "improved_delta")

#: Returns the running service's class, or raises ``InvalidState`` when there is none yet.
ServiceClass = Callable[[], type[Service]]


class QueuedSignal:
    """A set/invoke waiting for the next ``ready()``, with the future its sender awaits."""

    __slots__ = ("body", "future", "intent")

    def __init__(self, intent: Intent, body: dict[str, Any]) -> None:
        self.intent = intent
        self.body = body
        self.future: cf.Future[Any] = cf.Future()


def resolved(value: Any) -> cf.Future[Any]:
    """A future already resolved to ``value``: the reply to a signal handled at once."""
    future: cf.Future[Any] = cf.Future()
    future.set_result(value)
    return future


def check_delta(name: str, value: Any) -> float:
    """Check one of :data:`HANDLER_SETTABLE`; return it as a float.

    Raises:
        SignalRefused: ``value`` is not a number, or is negative, infinite or NaN.
    """
    try:
        number = check_type(value, float)
    except TypeError as exc:
        raise SignalRefused(f"{name}: {exc}") from exc
    if not math.isfinite(number) or number < 0:
        raise SignalRefused(f"{name} must be a finite number >= 0, got {value!r}")
    return float(number)


def split_set(body: dict[str, Any],
              service_class: ServiceClass) -> tuple[dict[str, float], dict[str, Any]]:
    """Check a ``set`` body; return ``(handler attributes, service attributes)``.

    ``service_class`` is called only when the body names service attributes: a ``set`` of
    deltas alone is valid before (and without) a service.

    Raises:
        SignalRefused: no attributes, a bad delta, or a service attribute refused.
        InvalidState: service attributes named but no service yet.
    """
    attrs = body.get("attrs")
    if not isinstance(attrs, dict) or not attrs:
        raise SignalRefused("set needs a non-empty object 'attrs'")
    mine = {key: check_delta(key, value) for key, value in attrs.items()
            if key in HANDLER_SETTABLE}
    rest = {key: value for key, value in attrs.items() if key not in HANDLER_SETTABLE}
    if rest:  # refuse now, not at ready(): the sender learns at once, nothing half-applied
        check_set(service_class(), rest)
    return mine, rest


def check_invoke(body: dict[str, Any], service_class: ServiceClass) -> dict[str, Any]:
    """Check an ``invoke`` body; return the body to queue (``method``, ``args``, ``kwargs``).

    Raises:
        SignalRefused: malformed body, or a method not declared invokable.
        InvalidState: no service yet.
    """
    method = body.get("method")
    args, kwargs = body.get("args") or [], body.get("kwargs") or {}
    if not isinstance(method, str) or not isinstance(args, list) or not isinstance(kwargs, dict):
        raise SignalRefused("invoke needs 'method' (string), 'args' (list), 'kwargs' (object)")
    check_invokable(service_class(), method)
    return {"method": method, "args": args, "kwargs": kwargs}


def apply_queued(service: Service, queued: QueuedSignal) -> None:
    """Apply one queued set/invoke to ``service`` and resolve its future (computation thread).

    A refusal or a failure of the service's method goes to the sender through the future;
    it never reaches the computation.
    """
    body = queued.body
    try:
        if queued.intent is Intent.SET:
            value = apply_set(service, body["attrs"])
            value.update(body.get("handler_attrs", {}))
        else:
            value = apply_invoke(service, str(body.get("method")),
                                 body.get("args") or [], body.get("kwargs") or {})
            codec.encode(value)  # a return value that cannot be sent fails the invoke, here
    except Exception as exc:
        queued.future.set_exception(exc)
    else:
        queued.future.set_result(value)


def fail_pending(pending: Iterable[QueuedSignal], job: str, final: JobState) -> None:
    """Fail the set/invoke a job ended before applying, so their senders do not wait forever."""
    for queued in pending:
        queued.future.set_exception(InvalidState(
            f"job {job} ended ({final.value}) before the {queued.intent.value} was applied"))


def status_body(states: StateMachine, *, pause_requested: bool, abort_requested: bool,
                queued_signals: int, progress: dict[str, Any], progress_delta: float,
                checkpoint_delta: float, improved_delta: float) -> dict[str, Any]:
    """The reply to ``status`` (the status object of ``docs/protocol.md``), from any thread.

    Built from values the caller read without the lock: a snapshot, not a transaction.
    """
    state = states.state
    return {
        "state": state.value,
        "paused": state is JobState.PAUSED,
        "pause_requested": pause_requested,
        "abort_requested": abort_requested,
        "since": states.entered,
        "queued_signals": queued_signals,
        "progress": progress,
        "progress_delta": progress_delta,
        "checkpoint_delta": checkpoint_delta,
        "improved_delta": improved_delta,
    }
