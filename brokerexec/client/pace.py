"""How far a job has got, as people read it: the fraction it reports, the rate it goes at,
the time it has run and the time it still needs.

The service reports progress every ``progress_delta`` seconds; between reports a bar that
only drew what was reported would stand still and then jump. :class:`Pace` measures the
rate since the first report and moves the fraction on at that rate, never to 100% before
the job says it has ended, and gives an ETA from the same rate. Pure arithmetic on times
given to it, so it is tested without a clock.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Pace", "clock", "fraction_of"]


def fraction_of(data: dict[str, Any]) -> float | None:
    """``data["fraction"]``, else ``done / total``, else None (progress of unknown extent)."""
    fraction = data.get("fraction")
    if isinstance(fraction, int | float) and not isinstance(fraction, bool):
        return max(0.0, min(float(fraction), 1.0))
    done, total = data.get("done"), data.get("total")
    if isinstance(done, int | float) and isinstance(total, int | float) and total:
        return max(0.0, min(float(done) / float(total), 1.0))
    return None


def clock(seconds: float | None) -> str:
    """``1:02:03``, ``2:03``; ``-:--`` when unknown."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "-:--"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Pace:
    """Where a job is: its start (wall clock), the fractions it reported and when, so that
    the bar moves between reports at the measured rate (no stall until the next one) and an
    ETA is known once two reports tell a rate."""

    def __init__(self) -> None:
        self.start: float | None = None
        self._first: tuple[float, float] | None = None  # (time, fraction) of the first report
        self._last: tuple[float, float] | None = None

    def started(self, when: float | None) -> None:
        """The job's start, from its status, a state event or a progress event."""
        if isinstance(when, int | float) and when > 0 and (self.start is None or when < self.start):
            self.start = float(when)

    def report(self, when: float, fraction: float) -> None:
        """A progress report: ``fraction`` done at ``when`` (a lower one: it began again)."""
        if self._first is None or fraction < self._first[1]:  # a restart from the beginning
            self._first = (when, fraction)
        self._last = (when, fraction)

    def elapsed(self, now: float) -> float | None:
        """Seconds since the job's start, if known."""
        return None if self.start is None else max(0.0, now - self.start)

    def rate(self) -> float | None:
        """Fraction per second since the first report (or since the start)."""
        if self._last is None:
            return None
        origin = self._first if self._first is not None and self._first[0] < self._last[0] else None
        if origin is None and self.start is not None and self._last[0] > self.start:
            origin = (self.start, 0.0)
        if origin is None or self._last[1] <= origin[1]:
            return None
        return (self._last[1] - origin[1]) / (self._last[0] - origin[0])

    def fraction(self, now: float) -> float | None:
        """The last fraction, moved on at the measured rate, never past 99% before the end."""
        if self._last is None:
            return None
        rate = self.rate()
        moved = self._last[1] + (rate or 0.0) * max(0.0, now - self._last[0])
        return max(self._last[1], min(moved, 0.99))

    def eta(self, now: float) -> float | None:
        """Seconds still needed at the measured rate, if one is known."""
        rate, fraction = self.rate(), self.fraction(now)
        return None if not rate or fraction is None else (1.0 - fraction) / rate
