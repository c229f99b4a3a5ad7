"""Setups: the topology and consumers of an ``AmqpConnection``, each on a channel of its own.

A setup is a coroutine that declares what it needs on the channel it is given and starts its
consumers. The connection runs every setup again after a reconnect, and a setup whose
channel the broker closes (a failed declare, a consumer cancelled) again on a new channel,
retrying with backoff: after a reconnect the broker may still hold an exclusive queue of our
dead previous connection until it notices that connection is gone.

:class:`Setups` is a mixin of :class:`~brokerexec.transport.amqp.AmqpConnection`; it needs
the connection's ``_connection``, ``_generation``, ``_closing``, ``connected``, ``settings``,
``submit`` and ``_spawn``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

import aio_pika.abc

if TYPE_CHECKING:
    from .amqp import ConnectionSettings

__all__ = ["Setup", "SetupState", "Setups"]

log = logging.getLogger(__name__)
T = TypeVar("T")

#: A setup: declares what it needs on its own channel and starts its consumers.
Setup = Callable[[aio_pika.abc.AbstractChannel], Awaitable[None]]


class SetupState:
    """One registered setup and the channel it runs on now."""

    def __init__(self, key: str, setup: Setup, prefetch: int | None, confirms: bool = False) -> None:
        self.key = key
        self.setup = setup
        self.prefetch = prefetch
        self.confirms = confirms
        self.channel: aio_pika.abc.AbstractChannel | None = None
        self.removed = False


class Setups:
    """Registering, running and re-running setups (see the module docstring)."""

    if TYPE_CHECKING:  # provided by AmqpConnection
        settings: ConnectionSettings
        loop: asyncio.AbstractEventLoop
        _connection: aio_pika.abc.AbstractConnection | None
        _setups: dict[str, SetupState]
        _generation: int
        _closing: bool

        @property
        def connected(self) -> bool: ...

        def submit(self, coro: Coroutine[Any, Any, T]) -> cf.Future[T]: ...

        def _spawn(self, coro: Coroutine[Any, Any, None]) -> None: ...

    def add_setup(self, key: str, setup: Setup, *, prefetch: int | None = None,
                  confirms: bool = False) -> cf.Future[None]:
        """Register and run a setup; the future fails if its first run fails.

        ``confirms`` opens its channel in confirm mode with returns raised, for setups
        that publish mandatory messages on their own channel (direct reply-to RPCs).
        """
        return self.submit(self._add_setup(key, setup, prefetch, confirms))

    async def _add_setup(self, key: str, setup: Setup, prefetch: int | None,
                         confirms: bool = False) -> None:
        if key in self._setups:
            raise ValueError(f"setup {key!r} exists")
        state = SetupState(key, setup, prefetch, confirms)
        self._setups[key] = state
        if not self.connected:
            return  # it runs when the connection (re)opens
        try:
            await self._open(state)
        except BaseException:
            self._setups.pop(key, None)
            raise

    def remove_setup(self, key: str, teardown: Setup | None = None) -> cf.Future[None]:
        """Stop re-running a setup and close its channel (after ``teardown`` on it)."""
        return self.submit(self._remove_setup(key, teardown))

    async def _remove_setup(self, key: str, teardown: Setup | None) -> None:
        state = self._setups.pop(key, None)
        if state is None:
            return
        state.removed = True
        channel, state.channel = state.channel, None
        if channel is not None and not channel.is_closed:
            with contextlib.suppress(Exception):
                if teardown is not None:
                    await teardown(channel)
                await channel.close()

    def channel_of(self, key: str) -> aio_pika.abc.AbstractChannel | None:
        """The live channel of a setup, if it has one now."""
        state = self._setups.get(key)
        return state.channel if state is not None else None

    async def _open(self, state: SetupState) -> None:
        assert self._connection is not None
        channel = await self._connection.channel(publisher_confirms=state.confirms,
                                                 on_return_raises=state.confirms)
        try:
            if state.prefetch is not None:
                await channel.set_qos(prefetch_count=state.prefetch)
            await state.setup(channel)
        except BaseException:
            with contextlib.suppress(Exception):
                await channel.close()
            raise
        state.channel = channel
        channel.close_callbacks.add(lambda _ch, exc=None: self._on_channel_closed(state, channel, exc))

    def _on_channel_closed(self, state: SetupState, channel: Any, exc: BaseException | None) -> None:
        if state.removed or state.channel is not channel or self._closing:
            return
        state.channel = None
        generation = self._generation

        def reopen() -> None:
            # Decided a moment later: when the whole connection is going, its channels close
            # first, and the next connection re-runs every setup anyway.
            if generation == self._generation and self.connected and state.channel is None:
                log.warning("channel of %s closed (%r); opening it again", state.key, exc)
                self._spawn(self._open_with_retry(state, generation))

        self.loop.call_later(0.05, reopen)

    async def _open_or_retry_later(self, state: SetupState) -> None:
        try:
            await asyncio.wait_for(self._open(state), self.settings.connect_timeout * 2)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("setup %s failed (%r); retrying in the background", state.key, exc)
            self._spawn(self._open_with_retry(state, self._generation))

    async def _open_with_retry(self, state: SetupState, generation: int) -> None:
        """Re-run a setup until it works (e.g. the broker releases our old exclusive queue)."""
        delay = self.settings.backoff_initial
        while not state.removed and not self._closing and generation == self._generation:
            try:
                await asyncio.sleep(delay)
                if generation != self._generation or state.channel is not None:
                    return
                await asyncio.wait_for(self._open(state), self.settings.connect_timeout * 2)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("setup %s failed (%r); retrying in %.1f s", state.key, exc, delay)
                delay = min(delay * 2, self.settings.backoff_max)
