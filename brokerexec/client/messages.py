"""The messages both clients build from their callers' arguments: a launch's settings, and
the control message of ``pause_all`` and friends."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from ..protocol.names import check_name

if TYPE_CHECKING:
    from ..protocol.intents import Intent
    from ..protocol.messages import Control

__all__ = ["control_message", "handler_settings"]


def control_message(intent: Intent, service: str | None) -> Control:
    """The control message of ``pause_all`` and friends, limited to jobs started before now."""
    from ..protocol.messages import Control  # messages: not for a one-shot `status`

    return Control(intent, None if service is None else check_name("service name", service), time.time())


def handler_settings(progress_delta: float | None, checkpoint_delta: float | None,
                     improved_delta: float | None) -> Mapping[str, float]:
    """A launch's ``settings``: the intervals given, and only those."""
    return {key: value for key, value in (("progress_delta", progress_delta),
                                         ("checkpoint_delta", checkpoint_delta),
                                         ("improved_delta", improved_delta))
            if value is not None}
