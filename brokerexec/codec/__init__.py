"""Encoding and strict decoding of message bodies.

Messages are JSON. Stock kiwipy clients send YAML (``yaml.dump``) without a content type; those
are read with a safe loader that refuses tags, anchors, aliases and every value JSON could not
carry. Nothing here ever unpickles or uses an unsafe YAML loader. Cheap checks come first: the
size before any parsing, the content type before the body.

A decoded value is made of ``dict`` (``str`` keys), ``list``, ``str``, ``int``, finite
``float``, ``bool`` and ``None``, nested at most ``MAX_JSON_DEPTH`` containers deep, with no
lone surrogate in any string. Whatever :func:`encode` makes of such a value, :func:`decode`
accepts (size permitting).
"""

from __future__ import annotations

import json
import math
import re
from itertools import accumulate
from typing import Any

from ..constants import MAX_JSON_DEPTH, MAX_MESSAGE_BYTES
from ..errors import DecodeError, MessageTooLarge
from .values import check_value

__all__ = ["JSON", "YAML", "content_type_for", "decode", "decode_object", "encode", "expect_object"]

#: The content type brokerexec sends.
JSON = "application/json"
#: The content type of YAML replies to kiwipy clients.
YAML = "application/x-yaml"

_YAML_TYPES = frozenset({YAML, "application/yaml", "text/yaml", "text/x-yaml"})
_PICKLE = "application/x-python-serialize"
_UTF8 = frozenset({"utf-8", "utf8"})

_ENCODER = json.JSONEncoder(allow_nan=False, separators=(",", ":"), ensure_ascii=False)
#: A ``\\u`` escape of a surrogate: the only way valid UTF-8 JSON can carry a lone one.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def encode(obj: object, codec: str = "json") -> bytes:
    """Encode ``obj`` for the wire.

    Args:
        obj: a JSON-able value (non-``str`` dict keys are converted as :func:`json.dumps` does).
        codec: ``"json"`` (compact UTF-8 JSON) or ``"yaml"`` (for replies to kiwipy clients).

    Raises:
        ValueError: ``obj`` cannot be carried: NaN or infinity, a non-JSON type, a lone
            surrogate, a cycle, or nesting deeper than ``MAX_JSON_DEPTH``. A caller's bug.
    """
    if codec not in ("json", "yaml"):
        raise ValueError(f"unknown codec {codec!r}; use 'json' or 'yaml'")
    try:
        text = _ENCODER.encode(obj)
        body = text.encode("utf-8")  # UnicodeEncodeError (a ValueError) on a lone surrogate
    except RecursionError as exc:
        raise ValueError(f"cannot encode as JSON: nested deeper than {MAX_JSON_DEPTH} levels") from exc
    except (TypeError, ValueError) as exc:
        raise ValueError(f"cannot encode as JSON: {exc}") from exc
    if body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH and _nesting(body) > MAX_JSON_DEPTH:
        raise ValueError(f"cannot encode as JSON: nested deeper than {MAX_JSON_DEPTH} levels")
    if codec == "json":
        return body
    # Dumping the JSON-normalised value makes YAML carry exactly what JSON would: tuples become
    # lists, and no object is shared, so there are no anchors for the reader to refuse.
    from .yaml_fallback import dump_yaml  # PyYAML is imported on first use: one-shot verbs skip it

    return dump_yaml(json.loads(text))


def content_type_for(codec: str) -> str:
    """The AMQP content type that goes with a codec name (``"json"`` or ``"yaml"``)."""
    if codec == "json":
        return JSON
    if codec == "yaml":
        return YAML
    raise ValueError(f"unknown codec {codec!r}; use 'json' or 'yaml'")


def decode(body: bytes, content_type: str | None, *, max_bytes: int = MAX_MESSAGE_BYTES,
           allow_yaml: bool = True) -> tuple[object, str]:
    """Decode a message body.

    ``application/json`` is strict JSON. No content type (stock kiwipy) is strict JSON, then,
    for a body that is not JSON at all, safe YAML. YAML content types are safe YAML.

    Args:
        body: the raw body.
        content_type: the AMQP content type, parameters allowed (``charset`` must be UTF-8).
        max_bytes: larger bodies are refused before any parsing.
        allow_yaml: when false, only JSON is accepted.

    Returns:
        ``(value, codec)``, codec ``"json"`` or ``"yaml"``: answer in the same codec.

    Raises:
        MessageTooLarge: the body is over ``max_bytes``.
        DecodeError: anything else; the message says exactly what was wrong.
    """
    if len(body) > max_bytes:
        raise MessageTooLarge(f"message of {len(body)} bytes is over the limit of {max_bytes} bytes")
    kind = JSON if content_type == JSON else _media_type(content_type or "")
    if kind and kind != JSON and kind not in _YAML_TYPES:
        hint = " (pickle is never decoded)" if kind == _PICKLE else ""
        raise DecodeError(f"unsupported content type {content_type!r}{hint}; "
                          "brokerexec accepts application/json")
    if kind in _YAML_TYPES and not allow_yaml:
        raise DecodeError(f"content type {content_type!r} is not accepted here; send application/json")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError(f"message is not valid UTF-8: byte 0x{body[exc.start]:02x} at offset "
                          f"{exc.start} ({exc.reason})") from exc
    if kind in _YAML_TYPES:
        return _parse_yaml(text), "yaml"
    try:
        return _parse_json(text, body), "json"
    except json.JSONDecodeError as json_error:
        if kind or not allow_yaml:
            raise DecodeError(f"invalid JSON: {json_error}") from json_error
        # Only a syntax error leads here: a JSON document refused for NaN, a duplicate key or
        # its depth must not get in through YAML's laxer reading ("NaN" is a YAML string).
        try:
            return _parse_yaml(text), "yaml"
        except DecodeError as yaml_error:
            raise DecodeError(f"invalid JSON: {json_error} (no content type, so YAML was also "
                              f"tried: {yaml_error})") from json_error


def decode_object(body: bytes, content_type: str | None, *, max_bytes: int = MAX_MESSAGE_BYTES,
                  allow_yaml: bool = True) -> tuple[dict[str, object], str]:
    """Like :func:`decode`, but the value must be an object (a ``dict`` with ``str`` keys).

    Raises:
        DecodeError: as :func:`decode`, or the value is not an object.
    """
    value, codec = decode(body, content_type, max_bytes=max_bytes, allow_yaml=allow_yaml)
    if not isinstance(value, dict):
        kind = "null" if value is None else type(value).__name__
        raise DecodeError(f"expected a JSON object, got {kind}")
    return value, codec


def expect_object(body: object, what: str) -> dict[str, Any]:
    """``body`` if it is a JSON object, else a ``DecodeError`` naming ``what`` it should be."""
    if not isinstance(body, dict):
        raise DecodeError(f"{what} must be a JSON object, got {type(body).__name__}")
    return body



def _media_type(content_type: str) -> str:
    """The lower-case media type of a content type; refuses a charset other than UTF-8."""
    kind, _, parameters = content_type.partition(";")
    for parameter in parameters.split(";"):
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in _UTF8:
            raise DecodeError(f"unsupported charset in content type {content_type!r}; "
                              "brokerexec accepts UTF-8 only")
    return kind.strip().lower()


# ---- JSON ------------------------------------------------------------------------------


def _reject_constant(name: str) -> object:
    raise DecodeError(f"{name} is not valid JSON (NaN and infinities are refused)")


def _finite_float(literal: str) -> float:
    value = float(literal)
    if math.isinf(value):  # e.g. 1e400: would not survive a re-encode with allow_nan=False
        raise DecodeError(f"JSON number {literal[:40]} is out of range for a float")
    return value


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise DecodeError(f"duplicate key {key!r} in JSON object")
            seen.add(key)
    return result


_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float,
                            object_pairs_hook=_unique_keys)


def _parse_json(text: str, body: bytes) -> object:
    """Strict JSON; a syntax error stays a ``json.JSONDecodeError`` (the body may be YAML)."""
    try:
        value = _DECODER.decode(text)
    except (DecodeError, json.JSONDecodeError):
        raise
    except RecursionError as exc:  # the C scanner gives up near the interpreter's limit
        raise DecodeError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from exc
    except ValueError as exc:  # valid syntax, but e.g. an integer of more than 4300 digits
        raise DecodeError(f"invalid JSON: {exc}") from exc
    # Both checks cost next to nothing on the common path: fewer brackets than the limit
    # cannot nest past it, and valid UTF-8 can only carry a lone surrogate as a \u escape.
    if body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH and _nesting(body) > MAX_JSON_DEPTH:
        raise DecodeError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    if "\\u" in text and _SURROGATE_ESCAPE.search(text):
        check_value(value, "JSON")
    return value


#: A JSON string; and every byte but a bracket. :func:`_nesting` deletes both.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))
#: Opening brackets become +1, closing ones -1 (0xff read as a signed byte).
_BRACKET_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")


def _nesting(document: bytes) -> int:
    """How deep the containers of valid JSON nest, at C speed (walking the value is 5x slower)."""
    brackets = _JSON_STRING.sub(b"", document).translate(_BRACKET_STEPS, _NOT_BRACKETS)
    return max(accumulate(memoryview(brackets).cast("b")), default=0)


def _parse_yaml(text: str) -> object:
    """Safe, strict YAML, holding JSON types only (:mod:`.yaml_fallback`, imported on first use)."""
    from .yaml_fallback import parse_yaml

    return parse_yaml(text)
