"""A job's periodic messages: how often progress, checkpoints and improved values go out.

Park's handler lets a client ``set`` these on a running job (``onSignalSet``), so they are
the handler's own settable attributes, checked here wherever they come from: a ``set``, a
launch's settings, or a worker's defaults.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..constants import DEFAULT_CHECKPOINT_DELTA, DEFAULT_IMPROVED_DELTA, DEFAULT_PROGRESS_DELTA
from ..errors import SignalRefused
from .inputs import check_type

__all__ = ["HANDLER_SETTABLE", "Intervals", "check_delta"]

#: Attributes a ``set`` may change on the handler itself (park's onSignalSet).
HANDLER_SETTABLE = ("progress_delta", "checkpoint_delta", "improved_delta")


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


@dataclass
class Intervals:
    """A job's periodic messages, in seconds: written by ``set`` on the handler thread, read
    by the computation thread when it schedules (after a reschedule request)."""

    progress_delta: float = DEFAULT_PROGRESS_DELTA
    checkpoint_delta: float = DEFAULT_CHECKPOINT_DELTA
    improved_delta: float = DEFAULT_IMPROVED_DELTA
