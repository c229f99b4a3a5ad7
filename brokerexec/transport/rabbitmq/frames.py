"""AMQP 0-9-1 frames of a publish and an ack, marshalled with ``struct`` instead of pamqp.

A worker publishes five messages for every job it runs (two state events, their two kiwipy
broadcasts, the record) and pamqp's general marshaller took about 20 µs for each: a tenth
of a trivial job's CPU on the worker (``docs/performance.md``). The properties a worker
sends are few and plain, so :func:`publish_frames` writes them directly, byte for byte as
pamqp does (``tests/test_frames.py`` compares the two), and hands anything it does not know
(a timestamp, a float or a nested table in the headers) back to pamqp.
"""

from __future__ import annotations

import struct
from typing import Any

import pamqp.frame
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

__all__ = ["ack_frame", "publish_frames"]

_FRAME = struct.Struct(">BHI")  # type, channel, payload size
_END = b"\xce"
_PUBLISH = struct.pack(">IH", 0x003C0028, 0)  # Basic.Publish, the reserved ticket
_ACK = struct.Struct(">BHIIQB")  # a whole Basic.Ack frame but its end byte
_HEADER = struct.Struct(">HHQH")  # class Basic, weight, body size, property flags

#: Basic's properties in wire order, with their flag bits and AMQP types.
_PROPERTIES: tuple[tuple[str, int, str], ...] = tuple(
    (name, spec.Basic.Properties.flags[name], spec.Basic.Properties.amqp_type(name))
    for name in spec.Basic.Properties.__slots__)


class _Unsupported(Exception):
    """A value this module leaves to pamqp."""


def _shortstr(value: Any) -> bytes:
    if value.__class__ is not str:
        raise _Unsupported
    data = value.encode("utf-8")
    if len(data) > 255:
        raise _Unsupported  # pamqp's error says what is wrong
    return _LENGTHS[len(data)] + data


_LENGTHS = [bytes((n,)) for n in range(256)]
_BYTE, _SHORT, _USHORT, _LONG, _ULONG = (struct.Struct(f) for f in (">b", ">h", ">H", ">i", ">I"))


def _field_value(value: Any) -> bytes:
    # The same choice of type as pamqp's encode_table_value, for the types a worker sends.
    kind = value.__class__
    if kind is str:
        data: bytes = value.encode("utf-8")
        return b"S" + _ULONG.pack(len(data)) + data
    if kind is bool:
        return b"t\x01" if value else b"t\x00"
    if kind is int:
        if -128 <= value <= 127:
            return b"b" + _BYTE.pack(value)
        if -32768 <= value <= 32767:
            return b"s" + _SHORT.pack(value)
        if 0 <= value <= 65535:
            return b"u" + _USHORT.pack(value)
        if -2147483648 <= value <= 2147483647:
            return b"I" + _LONG.pack(value)
        raise _Unsupported
    if kind is list:
        items = b"".join([_field_value(item) for item in value])
        return b"A" + _ULONG.pack(len(items)) + items
    if value is None:
        return b"V"
    raise _Unsupported


def _table(value: Any) -> bytes:
    if value.__class__ is not dict:
        raise _Unsupported
    entries = b"".join([_shortstr(key) + _field_value(value[key]) for key in sorted(value)])
    return _ULONG.pack(len(entries)) + entries


def _octet(value: Any) -> bytes:
    if value.__class__ is not int or not 0 <= value <= 255:
        raise _Unsupported
    return _LENGTHS[value]


def _properties(p: spec.Basic.Properties) -> tuple[int, bytes]:
    # Unrolled, in wire order: a loop over the names took as long again. As in pamqp, a
    # property that is None or "" is left out.
    flags, parts = 0, []
    value: Any
    if (value := p.content_type) is not None and value != "":
        flags, parts = 0x8000, [_shortstr(value)]
    if (value := p.content_encoding) is not None and value != "":
        flags |= 0x4000
        parts.append(_shortstr(value))
    if (value := p.headers) is not None:
        flags |= 0x2000
        parts.append(_table(value))
    if (value := p.delivery_mode) is not None:
        flags |= 0x1000
        parts.append(_octet(value))
    if (value := p.priority) is not None:
        flags |= 0x0800
        parts.append(_octet(value))
    if p.timestamp is not None:
        raise _Unsupported  # pamqp's
    for name, flag in _STRINGS_AFTER:
        if (value := getattr(p, name)) is not None and value != "":
            flags |= flag
            parts.append(_shortstr(value))
    return flags, b"".join(parts)


#: The short strings after ``priority``, in wire order (the timestamp among them is pamqp's).
_STRINGS_AFTER = tuple((name, flag) for name, flag, kind in _PROPERTIES[5:] if kind == "shortstr")


def publish_frames(channel: int, exchange: str, routing_key: str, body: bytes,
                   properties: spec.Basic.Properties, max_content: int, *, mandatory: bool = False) -> bytes:
    """One publish as marshalled frames: method, content header, body in pieces
    (``mandatory``: returned by the broker if it routes it to no queue)."""
    try:
        method = _PUBLISH + _shortstr(exchange) + _shortstr(routing_key) + (b"\x01" if mandatory else b"\x00")
        flags, values = _properties(properties)
    except _Unsupported:
        return _pamqp_publish(channel, exchange, routing_key, body, properties, max_content, mandatory)
    header = _HEADER.pack(60, 0, len(body), flags) + values
    parts = [_FRAME.pack(1, channel, len(method)), method, _END,
             _FRAME.pack(2, channel, len(header)), header, _END]
    for start in range(0, len(body), max_content):
        piece = body[start:start + max_content]
        parts += (_FRAME.pack(3, channel, len(piece)), piece, _END)
    return b"".join(parts)


def _pamqp_publish(channel: int, exchange: str, routing_key: str, body: bytes,
                   properties: spec.Basic.Properties, max_content: int, mandatory: bool) -> bytes:
    parts = [pamqp.frame.marshal(spec.Basic.Publish(exchange=exchange, routing_key=routing_key,
                                                    mandatory=mandatory), channel),
             pamqp.frame.marshal(ContentHeader(properties=properties, body_size=len(body)), channel)]
    for start in range(0, len(body), max_content):
        parts.append(pamqp.frame.marshal(ContentBody(body[start:start + max_content]), channel))
    return b"".join(parts)


def ack_frame(channel: int, delivery_tag: int) -> bytes:
    """A ``Basic.Ack`` of one delivery (not ``multiple``)."""
    return _ACK.pack(1, channel, 13, 0x003C0050, delivery_tag, 0) + _END
