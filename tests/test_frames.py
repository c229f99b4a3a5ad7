"""The worker's own marshalling of publishes and acks (``transport/amqp_frames.py``): byte
for byte what pamqp writes, pamqp's way for what it does not handle, and frames that pamqp
reads back as the same publish."""

from __future__ import annotations

import datetime
import struct
from typing import Any

import pamqp.frame
import pytest
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

from brokerexec.transport.rabbitmq.frames import ack_frame, publish_frames

MAX_CONTENT = 131_064


def pamqp_publish(channel: int, exchange: str, routing_key: str, body: bytes,
                  properties: spec.Basic.Properties, max_content: int = MAX_CONTENT,
                  mandatory: bool = False) -> bytes:
    parts = [pamqp.frame.marshal(spec.Basic.Publish(exchange=exchange, routing_key=routing_key,
                                                    mandatory=mandatory), channel),
             pamqp.frame.marshal(ContentHeader(properties=properties, body_size=len(body)), channel)]
    parts += [pamqp.frame.marshal(ContentBody(body[i:i + max_content]), channel)
              for i in range(0, len(body), max_content)]
    return b"".join(parts)


def read_frames(data: bytes) -> list[Any]:
    frames = []
    while data:
        used, _, frame = pamqp.frame.unmarshal(data)
        frames.append(frame)
        data = data[used:]
    return frames


CASES: list[dict[str, Any]] = [
    {},
    {"content_type": "application/json", "delivery_mode": 1},
    # a state event's kiwipy broadcast, a record (attempt and BCC), a lease (CC)
    {"content_type": "application/json", "delivery_mode": 1,
     "message_type": "brokerexec.state_changed", "headers": {"x-brokerexec-skip": True}},
    {"content_type": "application/json", "delivery_mode": 2, "message_id": "a" * 32,
     "correlation_id": "a" * 32, "message_type": "brokerexec.record",
     "headers": {"x-attempt": 3, "BCC": ["amq.gen-JzTY20BRgKO-HjmUJj0wLg"]}},
    {"content_type": "application/json", "delivery_mode": 2,
     "headers": {"CC": ["echo", "sweep"], "x-attempt": 70_000}},
    # every integer width pamqp picks, unicode, None, nested lists, empty strings skipped
    {"headers": {"b": 5, "s": -3_000, "u": 40_000, "I": -2_000_000_000, "off": False,
                 "text": "žluťoučký kůň", "none": None, "list": [1, "two", [True]]},
     "reply_to": "", "priority": 9, "expiration": "60000", "user_id": "guest",
     "app_id": "brokerexec", "content_encoding": "utf-8"},
    {"headers": {}},
]


@pytest.mark.parametrize("properties", CASES)
@pytest.mark.parametrize("body", [b"", b'{"a": 1}', bytes(range(256)) * 5])
def test_a_publish_is_marshalled_byte_for_byte_as_pamqp_does(properties: dict[str, Any],
                                                             body: bytes) -> None:
    props = spec.Basic.Properties(**properties)
    ours = publish_frames(7, "brokerexec.events", "state.echo.abc", body, props, 500)
    assert ours == pamqp_publish(7, "brokerexec.events", "state.echo.abc", body, props, 500)
    method, header, *pieces = read_frames(ours)
    assert (method.exchange, method.routing_key) == ("brokerexec.events", "state.echo.abc")
    assert header.body_size == len(body)
    assert header.properties == spec.Basic.Properties(  # an empty string is left out
        **{name: value for name, value in properties.items() if value != ""})
    assert b"".join(piece.value for piece in pieces) == body
    assert all(len(piece.value) <= 500 for piece in pieces)


@pytest.mark.parametrize("properties", [
    {"timestamp": datetime.datetime(2026, 12, 2, tzinfo=datetime.timezone.utc)},
    {"headers": {"float": 1.5}},
    {"headers": {"table": {"nested": 1}}},
    {"headers": {"big": 2 ** 40}},
])
def test_what_it_does_not_handle_is_left_to_pamqp(properties: dict[str, Any]) -> None:
    props = spec.Basic.Properties(**properties)
    ours = publish_frames(1, "", "queue", b"x", props, MAX_CONTENT)
    assert ours == pamqp_publish(1, "", "queue", b"x", props)
    assert read_frames(ours)[1].properties == props


@pytest.mark.parametrize("properties", [{"message_id": "abc"}, {"headers": {"float": 1.5}}])
def test_a_mandatory_publish_sets_the_flag_as_pamqp_does(properties: dict[str, Any]) -> None:
    props = spec.Basic.Properties(**properties)
    ours = publish_frames(3, "", "queue", b"x", props, MAX_CONTENT, mandatory=True)
    assert ours == pamqp_publish(3, "", "queue", b"x", props, mandatory=True)
    assert read_frames(ours)[0].mandatory is True
    assert read_frames(publish_frames(3, "", "queue", b"x", props, MAX_CONTENT))[0].mandatory is False


def test_a_small_negative_header_is_a_signed_octet() -> None:
    # pamqp cannot write -128..-1 (it packs its "b" type unsigned); RabbitMQ and pamqp's own
    # decoder read the type as signed.
    props = spec.Basic.Properties(headers={"x-attempt": -5})
    frames = publish_frames(1, "", "queue", b"x", props, MAX_CONTENT)
    assert read_frames(frames)[1].properties.headers == {"x-attempt": -5}


def test_a_name_too_long_for_amqp_is_refused_as_pamqp_refuses_it() -> None:
    with pytest.raises(struct.error):
        publish_frames(1, "", "q" * 256, b"x", spec.Basic.Properties(), MAX_CONTENT)


@pytest.mark.parametrize("tag", [1, 255, 2 ** 40])
def test_an_ack_is_marshalled_as_pamqp_does(tag: int) -> None:
    assert ack_frame(3, tag) == pamqp.frame.marshal(spec.Basic.Ack(delivery_tag=tag), 3)
