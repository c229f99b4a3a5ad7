"""The one place that uses pika's internals, for speed; everything else uses its public API.

pika queues each frame of a message (method, header, body) as a buffer of its own and sends
each with a system call: three per publish, the largest single cost of a launch on the
client. :func:`join_frame_writes` makes one connection send a message's frames with one
``send()``; nothing changes on the wire. It relies on ``Connection._output_marshaled_frames``
(pika 1.3 and 1.4); without it the connection is left as it is, slower and correct.
``tests/test_rabbitmq_transport.py`` fails loudly if the pinned pika no longer has it.

:func:`closing_reason` reads why the broker closed a channel (``_closing_reason``): a
publish refused (``403 ACCESS_REFUSED``) is otherwise only a closed channel; without it,
the error says less.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["closing_reason", "join_frame_writes"]


def join_frame_writes(connection: Any) -> bool:
    """Make ``connection`` (a ``pika.BlockingConnection``) write a message's frames at once;
    False if pika's internals are not the ones expected (nothing changed then)."""
    impl = getattr(connection, "_impl", None)
    output = getattr(impl, "_output_marshaled_frames", None)
    if output is None:
        return False

    def output_together(frames: Sequence[bytes]) -> None:
        output([b"".join(frames)] if len(frames) > 1 else frames)

    impl._output_marshaled_frames = output_together  # type: ignore[union-attr]
    return True


def closing_reason(channel: Any) -> str | None:
    """``"403 ACCESS_REFUSED - ..."`` for a ``pika.BlockingChannel`` the broker closed, else None."""
    reason = getattr(channel, "_closing_reason", None)
    code, text = getattr(reason, "reply_code", None), getattr(reason, "reply_text", None)
    return f"{code} {text}" if code is not None else None
