"""Launch-queue depth: how many launches of each service wait, read by a passive declare.

For the worker's metrics (:mod:`brokerexec.worker.metrics`), read at each scrape on a short-lived
blocking connection of its own, so that a scrape never waits on the worker's event loop and
a slow broker delays only the scrape.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import pika

from ...protocol.names import launch_queue

__all__ = ["launch_queue_depths"]

log = logging.getLogger(__name__)


def launch_queue_depths(url: str, services: Sequence[str]) -> list[tuple[str, int]]:
    """``(service, ready launches)`` for each service whose queue exists; none if the
    broker cannot be reached (the scrape still answers, without them)."""
    parameters = pika.URLParameters(url)
    parameters.connection_attempts, parameters.socket_timeout = 1, 2.0
    try:
        link = pika.BlockingConnection(parameters)
    except Exception as exc:
        log.debug("launch-queue depth not read: %s", exc)
        return []
    depths = []
    try:
        for service in services:
            channel = link.channel()  # a failed passive declare closes its channel
            try:
                frame = channel.queue_declare(launch_queue(service), passive=True)
            except pika.exceptions.ChannelClosedByBroker:  # not declared yet
                continue
            depths.append((service, int(frame.method.message_count)))
            channel.close()
    finally:
        link.close()
    return depths
