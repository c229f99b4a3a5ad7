"""What a decoded value may hold, whichever language it came in (JSON or YAML).

``dict`` (``str`` keys), ``list``, ``str``, ``int``, finite ``float``, ``bool`` and ``None``,
with no lone surrogate in any string: what JSON can carry. The nesting is bounded by each
parser before this runs.
"""

from __future__ import annotations

import math
import re

from ..errors import DecodeError

__all__ = ["check_string", "check_value"]

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def check_value(value: object, language: str) -> None:
    """Refuse anything JSON could not carry (``language`` names the source in the message).

    Raises:
        DecodeError: saying which value, key or string is refused, and why.
    """
    if isinstance(value, str):
        check_string(value, language, "string")
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise DecodeError(f"{language} mapping key {key!r} is not a string")
            check_string(key, language, "key")
            check_value(item, language)
    elif isinstance(value, list):
        for item in value:
            check_value(item, language)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise DecodeError(f"{language} value {value} is refused: NaN and infinities are not JSON")
    elif value is not None and not isinstance(value, int):  # bool is an int
        raise DecodeError(f"{language} value of type {type(value).__name__} is not a JSON type")


def check_string(text: str, language: str, what: str) -> None:
    """Refuse a string (a ``what``: "string" or "key") that holds a lone surrogate."""
    if not text.isascii() and _LONE_SURROGATE.search(text):
        raise DecodeError(f"{language} {what} {text[:40]!r} holds a lone surrogate")
