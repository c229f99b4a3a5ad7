"""Setups: the topology and consumers of a connection, each on a channel of its own.

A setup is a coroutine that declares what it needs on the channel it is given and starts its
consumers. :class:`SetupRegistry` runs every setup again after a reconnect, and a setup whose
channel the broker closes (a failed declare, a consumer cancelled) again on a new channel,
retrying with backoff: after a reconnect the broker may still hold an exclusive queue of our
dead previous connection until it notices that connection is gone.

A **required** setup (a worker's topology) must succeed before the connection is used at all:
for a moment after it starts, RabbitMQ refuses to declare a durable queue or stream whose
recovery has not finished (``404 NOT_FOUND - home node ... is down or inaccessible``) and
routes nothing to it, so a job's record published then would be confirmed and gone.

The registry belongs to one connection and sees it only through :class:`ChannelSource`.
Everything here runs on that connection's event-loop thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

import aio_pika.abc

from ...errors import BrokerConnectionError
from .connection_settings import ConnectionSettings

__all__ = ["ChannelSource", "Setup", "SetupRegistry"]

log = logging.getLogger(__name__)

#: A setup: declares what it needs on its own channel and starts its consumers.
Setup = Callable[[aio_pika.abc.AbstractChannel], Awaitable[None]]


class ChannelSource(Protocol):
    """What a :class:`SetupRegistry` needs of its connection."""

    settings: ConnectionSettings
    loop: asyncio.AbstractEventLoop

    @property
    def generation(self) -> int:
        """Counts connections: a retry for an older one stops."""

    @property
    def connected(self) -> bool: ...

    @property
    def closing(self) -> bool: ...

    async def open_channel(self, *, confirms: bool = False) -> aio_pika.abc.AbstractChannel:
        """A new channel on the current connection."""

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` in the background until it ends or the connection closes."""


class _Entry:
    """One registered setup and the channel it runs on now."""

    def __init__(self, key: str, setup: Setup, prefetch: int | None, confirms: bool,
                 required: bool) -> None:
        self.key = key
        self.setup = setup
        self.prefetch = prefetch
        self.confirms = confirms
        self.required = required
        self.channel: aio_pika.abc.AbstractChannel | None = None
        self.removed = False


class SetupRegistry:
    """See the module docstring."""

    def __init__(self, source: ChannelSource) -> None:
        self._source = source
        self._entries: dict[str, _Entry] = {}

    async def add(self, key: str, setup: Setup, *, prefetch: int | None = None,
                  confirms: bool = False, required: bool = False) -> None:
        """Register and run a setup; raise what its first run raised (then it is not kept).

        ``confirms`` opens its channel in confirm mode with returns raised, for setups
        that publish mandatory messages on their own channel (direct reply-to RPCs).
        ``required``: on every later connection it runs before anything else and must succeed
        before the connection is used (see the module docstring). While disconnected, the
        setup runs once the connection is back.
        """
        if key in self._entries:
            raise ValueError(f"setup {key!r} exists")
        entry = _Entry(key, setup, prefetch, confirms, required)
        self._entries[key] = entry
        if not self._source.connected:
            return
        try:
            await self._open(entry)
        except BaseException:
            self._entries.pop(key, None)
            raise

    async def remove(self, key: str, teardown: Setup | None = None) -> None:
        """Stop re-running a setup and close its channel (after ``teardown`` on it)."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        entry.removed = True
        channel, entry.channel = entry.channel, None
        if channel is not None and not channel.is_closed:
            with contextlib.suppress(Exception):
                if teardown is not None:
                    await teardown(channel)
                await channel.close()

    def channel_of(self, key: str) -> aio_pika.abc.AbstractChannel | None:
        """The live channel of a setup, if it has one now."""
        entry = self._entries.get(key)
        return entry.channel if entry is not None else None

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    async def run_all(self) -> None:
        """Run every setup on a new connection, the required ones first. A required one that
        fails is tried again here, with backoff, until it succeeds (or the connection goes:
        ``BrokerConnectionError``); any other that fails is retried in the background."""
        entries = sorted(self._entries.values(), key=lambda entry: not entry.required)
        for entry in entries:
            if entry.removed:
                continue
            if entry.required:
                await self._run_required(entry)
                continue
            try:
                await asyncio.wait_for(self._open(entry), self._source.settings.connect_timeout * 2)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("setup %s failed (%r); retrying in the background", entry.key, exc)
                self._source.spawn(self._retry(entry, self._source.generation))

    async def _run_required(self, entry: _Entry) -> None:
        settings = self._source.settings
        delay = settings.backoff_initial
        while True:
            try:
                await asyncio.wait_for(self._open(entry), settings.connect_timeout * 2)
                return
            except (asyncio.CancelledError, BrokerConnectionError):
                raise  # the connection went (open_channel says so): the next one starts over
            except Exception as exc:
                log.warning("setup %s failed (%r); nothing is sent on this connection until it "
                            "succeeds: retrying in %.1f s", entry.key, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, settings.backoff_max)

    async def _open(self, entry: _Entry) -> None:
        channel = await self._source.open_channel(confirms=entry.confirms)
        try:
            if entry.prefetch is not None:
                await channel.set_qos(prefetch_count=entry.prefetch)
            await entry.setup(channel)
        except BaseException:
            with contextlib.suppress(Exception):
                await channel.close()
            raise
        entry.channel = channel
        channel.close_callbacks.add(lambda _ch, exc=None: self._on_closed(entry, channel, exc))

    def _on_closed(self, entry: _Entry, channel: Any, exc: BaseException | None) -> None:
        source = self._source
        if entry.removed or entry.channel is not channel or source.closing:
            return
        entry.channel = None
        generation = source.generation

        def reopen() -> None:
            # Decided a moment later: when the whole connection is going, its channels close
            # first, and the next connection runs every setup anyway.
            if generation == source.generation and source.connected and entry.channel is None:
                log.warning("channel of %s closed (%r); opening it again", entry.key, exc)
                source.spawn(self._retry(entry, generation))

        source.loop.call_later(0.05, reopen)

    async def _retry(self, entry: _Entry, generation: int) -> None:
        """Run a setup again until it works (e.g. the broker releases our old exclusive queue)."""
        source = self._source
        delay = source.settings.backoff_initial
        while not entry.removed and not source.closing and generation == source.generation:
            try:
                await asyncio.sleep(delay)
                if generation != source.generation or entry.channel is not None:
                    return
                await asyncio.wait_for(self._open(entry), source.settings.connect_timeout * 2)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("setup %s failed (%r); retrying in %.1f s", entry.key, exc, delay)
                delay = min(delay * 2, source.settings.backoff_max)
