"""Setups: the topology and consumers of a connection, each on a channel of its own.

A setup is a coroutine that declares what it needs on the channel it is given and starts its
consumers. :class:`SetupRegistry` runs every setup again after a reconnect, and a setup whose
channel the broker closes (a failed declare, a consumer cancelled) again on a new channel,
retrying with backoff: after a reconnect the broker may still hold an exclusive queue of our
dead previous connection until it notices that connection is gone.

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

    def __init__(self, key: str, setup: Setup, prefetch: int | None, confirms: bool) -> None:
        self.key = key
        self.setup = setup
        self.prefetch = prefetch
        self.confirms = confirms
        self.channel: aio_pika.abc.AbstractChannel | None = None
        self.removed = False


class SetupRegistry:
    """See the module docstring."""

    def __init__(self, source: ChannelSource) -> None:
        self._source = source
        self._entries: dict[str, _Entry] = {}

    async def add(self, key: str, setup: Setup, *, prefetch: int | None = None,
                  confirms: bool = False) -> None:
        """Register and run a setup; raise what its first run raised (then it is not kept).

        ``confirms`` opens its channel in confirm mode with returns raised, for setups
        that publish mandatory messages on their own channel (direct reply-to RPCs).
        While disconnected, the setup runs once the connection is back.
        """
        if key in self._entries:
            raise ValueError(f"setup {key!r} exists")
        entry = _Entry(key, setup, prefetch, confirms)
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
        """Run every setup on a new connection; one that fails is retried in the background."""
        for entry in list(self._entries.values()):
            if entry.removed:
                continue
            try:
                await asyncio.wait_for(self._open(entry), self._source.settings.connect_timeout * 2)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("setup %s failed (%r); retrying in the background", entry.key, exc)
                self._source.spawn(self._retry(entry, self._source.generation))

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
