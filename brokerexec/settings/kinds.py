"""The kinds of value a setting takes, each with the one check its values go through.

A kind parses a raw value from wherever it came: text (a command-line option or an
environment variable, ``text=True``) or a value already typed (a TOML file, or Python code
making a settings object, ``text=False``). It returns the value to use, or raises
``ValueError`` saying what was wrong; the caller adds which setting and where it came from.
``metavar`` is how ``--help`` shows it.

Plain classes with ``__slots__``, not dataclasses: every CLI verb imports this module, and
making a dataclass costs about half a millisecond each (docs/performance.md).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from typing import Protocol

    class Kind(Protocol):
        """What every kind offers."""

        @property
        def metavar(self) -> str:
            """How ``--help`` shows a value of this kind."""

        def parse(self, raw: Any, text: bool) -> Any:
            """The value ``raw`` stands for; ``ValueError`` saying what was wrong."""

__all__ = ["Choice", "Integer", "Names", "Number", "Optional", "Text"]


class Integer:
    """A whole number from ``low`` (to ``high``, if given)."""

    __slots__ = ("high", "low")
    metavar = "N"

    def __init__(self, low: int, high: int | None = None) -> None:
        self.low, self.high = low, high

    def parse(self, raw: Any, text: bool) -> int:
        if text and isinstance(raw, str):
            try:
                raw = int(raw.strip())
            except ValueError:
                raise ValueError(f"{raw!r} is not an integer") from None
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise ValueError(f"{raw!r} is not an integer")
        if raw < self.low or (self.high is not None and raw > self.high):
            bound = f"at least {self.low}" if self.high is None else f"from {self.low} to {self.high}"
            raise ValueError(f"{raw} is out of range: it must be {bound}")
        return raw


class Number:
    """A finite number, at least ``low`` (above it, with ``above``); a float."""

    __slots__ = ("above", "low")
    metavar = "S"

    def __init__(self, low: float, *, above: bool = False) -> None:
        self.low, self.above = low, above

    def parse(self, raw: Any, text: bool) -> float:
        if text and isinstance(raw, str):
            try:
                raw = float(raw.strip())
            except ValueError:
                raise ValueError(f"{raw!r} is not a number") from None
        if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw):
            raise ValueError(f"{raw!r} is not a finite number")
        if raw < self.low or (self.above and raw == self.low):
            bound = f"greater than {self.low:g}" if self.above else f"at least {self.low:g}"
            raise ValueError(f"{raw} is out of range: it must be {bound}")
        return float(raw)


class Choice:
    """One of ``options``; with ``upper``, given in any case (``info`` is ``INFO``)."""

    __slots__ = ("options", "upper")

    def __init__(self, options: tuple[str, ...], *, upper: bool = False) -> None:
        self.options, self.upper = options, upper

    @property
    def metavar(self) -> str:
        return "|".join(self.options)

    def parse(self, raw: Any, text: bool) -> str:
        value = raw.upper() if self.upper and isinstance(raw, str) else raw
        if value not in self.options:
            raise ValueError(f"{raw!r} is not one of {', '.join(self.options)}")
        return str(value)


class Text:
    """A non-empty string."""

    __slots__ = ()
    metavar = "TEXT"

    def parse(self, raw: Any, text: bool) -> str:
        if not isinstance(raw, str) or not raw:
            raise ValueError(f"{raw!r} is not a non-empty string")
        return raw


class Names:
    """Service specs, ``MODULE:Class`` or ``file.py:Class``: a list (or a tuple) of them;
    as text, separated by commas or spaces (``BROKEREXEC_SERVICES="a:A, b.py:B"``)."""

    __slots__ = ()
    metavar = "MODULE:Class"

    def parse(self, raw: Any, text: bool) -> tuple[str, ...]:
        if isinstance(raw, tuple):  # a repeated option
            raw = list(raw)
        if text and isinstance(raw, str):
            raw = [part for part in raw.replace(",", " ").split() if part]
        if isinstance(raw, str):
            raw = [raw]
        if not isinstance(raw, list) or not all(isinstance(item, str) and item for item in raw):
            raise ValueError(f"{raw!r} is not a list of MODULE:Class strings")
        return tuple(raw)


class Optional:
    """``kind``, or none: ``None`` from Python, the empty string as text (a variable set to
    ``""`` unsets the setting)."""

    __slots__ = ("kind",)

    def __init__(self, kind: Integer | Number | Choice | Text) -> None:
        self.kind = kind

    @property
    def metavar(self) -> str:
        return self.kind.metavar

    def parse(self, raw: Any, text: bool) -> Any:
        if raw is None or (text and raw == ""):
            return None
        return self.kind.parse(raw, text)
