"""One AMQP connection on its own thread and event loop, that comes back by itself.

Why not aio-pika's robust connection: after a reconnect it re-declares queues in one go,
and a named exclusive queue still held by the broker for our dead previous connection
(the broker notices only after missed heartbeats) makes that fail for good. Here topology
and consumers are **setups** (:class:`~.setups.SetupRegistry`): coroutines that each
get their own channel (so one failing declare cannot close another's channel) and are run
again after every reconnect or channel loss, retrying with backoff until the broker has let
go of the old connection.

The connection is made of parts with public interfaces: :attr:`AmqpConnection.setups`
(topology and consumers), :attr:`AmqpConnection.outbox` (batched writes, on two channels of
its own) and a confirm channel for the few publishes that wait for their confirm alone.

Threads: everything AMQP happens on the loop thread (``brokerexec-amqp-<name>``); other
threads cross over with :meth:`AmqpConnection.submit`, :meth:`~AmqpConnection.call` or
:meth:`~AmqpConnection.post`. Heartbeats are answered by that loop, so a busy computation
thread never starves them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import logging
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import aio_pika
import aio_pika.abc
from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay, wait_random_exponential

from ...errors import BrokerConnectionError, ConfigurationError
from ...urls import redacted_url
from .connection_settings import ConnectionSettings
from .delivery import Delivery
from .failures import describe_failure, permanent_failure
from .outbox import Channels, Outbox, Outgoing
from .setups import SetupRegistry

__all__ = ["AmqpConnection", "ConnectionSettings", "Outgoing"]

log = logging.getLogger(__name__)
T = TypeVar("T")


class AmqpConnection:
    """See the module docstring."""

    def __init__(self, settings: ConnectionSettings) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, daemon=True,
                                        name=f"brokerexec-amqp-{settings.name}")
        self.setups = SetupRegistry(self)
        self.outbox = Outbox(self.loop, self.on_loop_thread)
        #: How many times the connection was lost and made again.
        self.reconnects = 0
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._publisher: aio_pika.abc.AbstractChannel | None = None  # confirms on
        self._outbox_channels: Channels | None = None
        self._outbox_reopening = False
        self._connected: asyncio.Event | None = None
        self._closing = False
        self._generation = 0  # one per connection: retries of an old one stop
        self._address = 0  # which of the URL's broker addresses to try first (a cluster's)
        self._supervisor: asyncio.Task[None] | None = None
        self._drainer: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()

    # ---- life cycle ----------------------------------------------------------------------

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def start(self, timeout: float | None = None) -> None:
        """Connect; raise ``BrokerConnectionError`` if no connection within ``timeout``."""
        self._thread.start()
        first: cf.Future[None] = cf.Future()
        self.loop.call_soon_threadsafe(self._start_supervisor, first)
        wait = timeout if timeout is not None else (self.settings.reconnect_deadline or 30.0)
        try:
            first.result(wait)
        except cf.TimeoutError:
            self.close(flush=0)
            raise BrokerConnectionError(
                f"no connection to {self.settings.redacted_url()} within {wait:.0f} s") from None

    def _start_supervisor(self, first: cf.Future[None]) -> None:
        self._connected = asyncio.Event()
        self._supervisor = self.loop.create_task(self._supervise(first))
        self._drainer = self.loop.create_task(
            self.outbox.run(self._live_outbox_channels, self.settings.backoff_initial))

    def close(self, flush: float = 5.0) -> None:
        """Flush the outbox (up to ``flush`` seconds), then close and stop the thread."""
        if not self._thread.is_alive():
            return
        if flush > 0:
            with contextlib.suppress(cf.TimeoutError, RuntimeError):
                self.submit(self.outbox.wait_empty()).result(flush)
        with contextlib.suppress(cf.TimeoutError, RuntimeError):
            self.submit(self._shutdown()).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self.loop.close()

    async def _shutdown(self) -> None:
        self._closing = True
        for task in (self._supervisor, self._drainer, *self._background):
            if task is not None:
                task.cancel()
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._connection.close(), 2)

    @property
    def connected(self) -> bool:
        """True while a connection is up."""
        return self._connected is not None and self._connected.is_set()

    @property
    def closing(self) -> bool:
        """True once :meth:`close` has begun: nothing is retried any more."""
        return self._closing

    @property
    def generation(self) -> int:
        """Counts connections made; what belongs to an older one is void."""
        return self._generation

    # ---- crossing into the loop ----------------------------------------------------------

    def submit(self, coro: Coroutine[Any, Any, T]) -> cf.Future[T]:
        """Run ``coro`` on the loop thread (from any thread)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def on_loop_thread(self) -> bool:
        """True when called from this connection's own thread."""
        return threading.current_thread() is self._thread

    def call(self, fn: Callable[..., Any], *args: Any) -> None:
        """Call ``fn(*args)`` on the loop thread soon (from any thread)."""
        self.loop.call_soon_threadsafe(fn, *args)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """A background task of this connection (loop thread), cancelled when it closes."""
        task = self.loop.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ---- the connection ------------------------------------------------------------------

    async def _supervise(self, first: cf.Future[None]) -> None:
        assert self._connected is not None
        while not self._closing:
            try:
                connection = await self._connect(first_time=not first.done())
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # tenacity gave up: a reconnect deadline, or a bad setup
                error = exc if isinstance(exc, ConfigurationError) else BrokerConnectionError(
                    f"cannot connect to {self.settings.redacted_url()}: {describe_failure(exc)}")
                log.error("giving up: %s", error)
                if not first.done():
                    first.set_exception(error)
                return
            closed = asyncio.Event()
            connection.close_callbacks.add(lambda *_, event=closed: event.set())
            self._generation += 1
            try:
                self._publisher = await connection.channel(publisher_confirms=True,
                                                           on_return_raises=True)
                await self._open_outbox_channels()
                await self.setups.run_all()
                self._connected.set()
                self.outbox.post_wakeup()
                if not first.done():
                    first.set_result(None)
                await closed.wait()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("connection to %s lost while setting up: %r",
                            self.settings.redacted_url(), exc)
            finally:
                self._connected.clear()
                self._publisher = self._outbox_channels = None
            if not self._closing:
                self.reconnects += 1
                self._address += 1  # the member just lost is likely down: another one first
                log.warning("connection to %s lost; reconnecting", self.settings.redacted_url())
                with contextlib.suppress(Exception):  # a hung broker may never answer
                    await asyncio.wait_for(connection.close(), 2)

    async def _connect(self, *, first_time: bool) -> aio_pika.abc.AbstractConnection:
        deadline = self.settings.reconnect_deadline

        def transient(exc: BaseException) -> bool:
            # A bad TLS file or an untrusted certificate will not mend by itself: a first
            # connection fails at once. Once connected, retry: a broker's certificate may be
            # replaced by a bad one and then fixed while the worker runs.
            return not (first_time and permanent_failure(exc))

        retrying = AsyncRetrying(
            wait=wait_random_exponential(multiplier=self.settings.backoff_initial,
                                         max=self.settings.backoff_max),
            stop=stop_after_delay(deadline) if deadline is not None else (lambda _: False),
            retry=retry_if_exception(transient),
            before_sleep=lambda state: log.warning(
                "cannot connect to %s (attempt %d): %r", self.settings.redacted_url(),
                state.attempt_number, state.outcome.exception() if state.outcome else None),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                connection = await self._connect_to_any()
                self._connection = connection
                return connection
        raise BrokerConnectionError("unreachable")  # pragma: no cover - tenacity reraises

    async def _connect_to_any(self) -> aio_pika.abc.AbstractConnection:
        """One attempt: each broker address once, from the current one; the last error if
        none answers. Back-off waits only between rounds: a cluster's next member is tried
        at once when one is down."""
        addresses = self.settings.addresses()
        urls = self.settings.connection_urls()
        for tried in range(len(urls)):
            index = self._address % len(urls)
            url = urls[index]
            try:
                connection = await aio_pika.connect(
                    url, timeout=self.settings.connect_timeout,
                    client_properties={"connection_name": self.settings.name},
                    **self.settings.connect_kwargs(addresses[index]))
            except Exception as exc:
                self._address += 1
                if tried == len(urls) - 1:
                    raise
                log.warning("cannot connect to %s (%r); trying the next address",
                            redacted_url(url), exc)
                continue
            if len(urls) > 1:
                log.info("connected to %s", redacted_url(url))
            return connection
        raise BrokerConnectionError("no broker address")  # pragma: no cover - urls is never empty

    async def open_channel(self, *, confirms: bool = False) -> aio_pika.abc.AbstractChannel:
        """A new channel on the current connection (``confirms``: confirm mode, returns
        raised); the caller closes it."""
        if self._connection is None or self._connection.is_closed:
            raise BrokerConnectionError(f"not connected to {self.settings.redacted_url()}")
        return await self._connection.channel(publisher_confirms=confirms, on_return_raises=confirms)

    def channel_max(self) -> int | None:
        """How many channels the broker lets this connection open (``Connection.Tune``), or
        None when not connected."""
        connection = self._connection
        if connection is None or connection.is_closed:
            return None
        tune = getattr(getattr(connection.transport, "connection", None), "connection_tune", None)
        value = getattr(tune, "channel_max", None)
        return value if isinstance(value, int) and value > 0 else None

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait for a connection; ``BrokerConnectionError`` after ``timeout``."""
        assert self._connected is not None
        if self._connected.is_set():  # the hot path: no task, no timer
            return
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
        except asyncio.TimeoutError:
            raise BrokerConnectionError(
                f"not connected to {self.settings.redacted_url()} after {timeout} s") from None

    # ---- the outbox's channels -----------------------------------------------------------

    async def _open_outbox_channels(self) -> None:
        # Its own two channels: it numbers the publishes on the confirm one itself.
        plain = await self.open_channel()
        confirming = await self.open_channel(confirms=True)
        self._outbox_channels = (await plain.get_underlay_channel(),
                                 await confirming.get_underlay_channel())

    def _live_outbox_channels(self) -> Channels | None:
        pair = self._outbox_channels
        if not self.connected or pair is None:
            return None
        if pair[0].is_closed or pair[1].is_closed:
            # A channel error closed one (a publish to an exchange deleted meanwhile, say):
            # both open again shortly, unless the whole connection is going anyway.
            if not self._outbox_reopening:
                self._outbox_reopening = True
                self.spawn(self._reopen_outbox_channels(self._generation))
            return None
        return pair

    async def _reopen_outbox_channels(self, generation: int) -> None:
        delay = self.settings.backoff_initial
        try:
            while generation == self._generation and not self._closing:
                await asyncio.sleep(delay)
                if generation != self._generation or not self.connected:
                    return  # the next connection opens its own
                try:
                    for old in self._outbox_channels or ():
                        if not old.is_closed:
                            await old.close()
                    await self._open_outbox_channels()
                    log.warning("outbox channels closed by the broker; opened again")
                    self.outbox.post_wakeup()
                    return
                except Exception as exc:
                    log.warning("reopening the outbox channels failed (%r); retrying", exc)
                    delay = min(delay * 2, self.settings.backoff_max)
        finally:
            self._outbox_reopening = False

    # ---- publishing ----------------------------------------------------------------------

    async def publish(self, exchange: str, routing_key: str, message: aio_pika.Message, *,
                      mandatory: bool = False, timeout: float | None = None) -> None:
        """Publish with a broker confirm, waiting for the connection if it is down.

        Raises ``aio_pika.exceptions.DeliveryError`` if ``mandatory`` and unroutable, and
        ``BrokerConnectionError`` if the connection dies before the confirm.
        """
        await _isolated(self._publish(exchange, routing_key, message, mandatory, timeout))

    async def _publish(self, exchange: str, routing_key: str, message: aio_pika.Message,
                       mandatory: bool, timeout: float | None) -> None:
        await self.wait_connected(timeout)
        assert self._publisher is not None
        target = (self._publisher.default_exchange if not exchange
                  else await self._publisher.get_exchange(exchange, ensure=False))
        # wait_for as well: a confirm from a connection that died mid-way may never come.
        await asyncio.wait_for(target.publish(message, routing_key, mandatory=mandatory),
                               timeout if timeout is not None else 30)

    async def publish_confirmed(self, items: list[Outgoing], timeout: float = 30) -> None:
        """Publish ``items`` with the outbox's next batch; return once all are confirmed.

        The cheap form of :meth:`publish` for the hot path (a job's record). Raises
        ``BrokerConnectionError`` if not connected or the connection goes before the confirms.
        """
        if not self.connected:
            raise BrokerConnectionError("not connected")
        # The outbox's own futures: aiormq never cancels them (a lost confirm fails them
        # with BrokerConnectionError), so they need no task of their own (``_isolated``).
        confirms = [self.outbox.publish_confirmed(item) for item in items]
        await asyncio.wait_for(confirms[0] if len(confirms) == 1 else asyncio.gather(*confirms),
                               timeout)

    def post(self, item: Outgoing) -> None:
        """Queue a fire-and-forget publish; ordered, kept across reconnects (any thread)."""
        self.outbox.post(item)

    def send(self, item: Outgoing) -> None:
        """A fire-and-forget publish written at once when it can be (from the loop thread),
        else posted: for replies, which someone waits for (any thread)."""
        if self.on_loop_thread():
            self.outbox.send_now(item, self._live_outbox_channels())
        else:
            self.outbox.post(item)

    def ack(self, message: Delivery | aio_pika.abc.AbstractIncomingMessage) -> None:
        """Acknowledge a delivery with the outbox's next batch (loop thread); void if its
        channel has closed since (the delivery went back to its queue)."""
        if message.delivery_tag is not None:
            self.outbox.ack(message.channel, message.delivery_tag)


async def _isolated(coro: Coroutine[Any, Any, T]) -> T:
    """Await ``coro`` in a task of its own.

    aiormq cancels the confirm futures of a connection that dies; awaited directly, that
    ``CancelledError`` would look like a cancellation of the caller (and silently end, say,
    the outbox drainer). Here it becomes a ``BrokerConnectionError``; a real cancellation of
    the caller still cancels.
    """
    task = asyncio.ensure_future(coro)
    try:
        await asyncio.wait({task})
    except asyncio.CancelledError:
        task.cancel()
        raise
    if task.cancelled():
        raise BrokerConnectionError("the connection closed before the broker confirmed")
    return task.result()
