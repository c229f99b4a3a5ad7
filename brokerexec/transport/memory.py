"""The in-memory transport: a whole brokerexec deployment inside one process.

A :class:`MemoryBroker` stands in for RabbitMQ: a launch queue, per-job RPC endpoints with
exclusive ownership, topic-matched event subscriptions, control messages and final
records. Everything that RabbitMQ would deliver is delivered on one dispatcher thread (the
"handler thread" of every worker on it), and every message goes through the same codec and
the same protocol objects as on the wire, so what works here works over AMQP.
``memory://`` URLs share one broker per name (``memory://`` and ``memory://lab`` are two
brokers).
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import functools
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

from .. import codec
from ..errors import DecodeError, JobNotFound, Timeout
from ..protocol.events import Event
from ..protocol.intents import Signal
from ..protocol.messages import Control, Launch, Record, WorkerJobs
from ..protocol.replies import Reply
from .base import AsyncClientTransport, ClientTransport, Subscription, WorkerHooks, WorkerTransport

__all__ = ["MemoryAsyncClientTransport", "MemoryBroker", "MemoryClientTransport",
           "MemoryWorkerTransport", "topic_matches"]

log = logging.getLogger(__name__)
T = TypeVar("T")

_brokers: dict[str, MemoryBroker] = {}
_brokers_lock = threading.Lock()


def topic_matches(pattern: str, routing_key: str) -> bool:
    """AMQP topic matching: ``*`` is exactly one word, ``#`` is zero or more words."""
    return _match(tuple(pattern.split(".")), tuple(routing_key.split(".")))


def _match(pattern: tuple[str, ...], words: tuple[str, ...]) -> bool:
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(_match(rest, words[i:]) for i in range(len(words) + 1))
    return bool(words) and head in ("*", words[0]) and _match(rest, words[1:])


def _wire(body: Any) -> Any:
    """Encode and decode as the wire would, so the same rules apply here."""
    value, _ = codec.decode(codec.encode(body), codec.JSON)
    return value


class MemoryBroker:
    """The in-process stand-in for RabbitMQ (see the module docstring)."""

    def __init__(self, name: str = "") -> None:
        self.name = name
        self._lock = threading.Lock()
        self._results_changed = threading.Condition(self._lock)
        self._launches: deque[Launch] = deque()
        self._workers: list[MemoryWorkerTransport] = []
        self._owners: dict[str, MemoryWorkerTransport] = {}
        self._results: dict[str, dict[str, Any]] = {}
        self._subscriptions: list[_MemorySubscription] = []
        self._tasks: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._dispatch, daemon=True,
                                        name=f"brokerexec-memory-{name or 'default'}")
        self._thread.start()

    @classmethod
    def named(cls, name: str) -> MemoryBroker:
        """The process-wide broker of that name, created on first use."""
        with _brokers_lock:
            if name not in _brokers:
                _brokers[name] = cls(name)
            return _brokers[name]

    def call_soon(self, task: Callable[[], None]) -> None:
        """Run ``task`` on the dispatcher thread."""
        self._tasks.put(task)

    def _dispatch(self) -> None:
        while (task := self._tasks.get()) is not None:
            try:
                task()
            except Exception:  # a bad message never stops the broker
                log.exception("memory broker: task failed")

    # ---- launches ------------------------------------------------------------------------

    def enqueue(self, launches: list[Launch]) -> None:
        with self._lock:
            self._launches.extend(Launch.decode(_wire(launch.encode())) for launch in launches)
        self.call_soon(self._deliver_launches)

    def _deliver_launches(self) -> None:
        while True:
            with self._lock:
                worker = next((w for w in self._workers if w.free > 0 and w.consuming), None)
                if worker is None or not self._launches:
                    return
                launch = self._launches.popleft()
            worker.deliver_launch(launch)

    def claim(self, job_id: str, worker: MemoryWorkerTransport) -> bool:
        with self._lock:
            if job_id in self._owners:
                return False
            self._owners[job_id] = worker
            return True

    # ---- RPC, control, the jobs query ------------------------------------------------------

    def rpc(self, job_id: str, signal: Signal) -> cf.Future[Any]:
        """Deliver ``signal`` to the job's owner; the future resolves with the final reply."""
        reply: cf.Future[Any] = cf.Future()
        request = Signal.decode(_wire(signal.encode()))

        def deliver() -> None:
            with self._lock:
                worker = self._owners.get(job_id)
            if worker is None or worker.hooks is None:
                reply.set_exception(JobNotFound(f"no worker holds job {job_id}"))
                return
            try:
                answer = worker.hooks.on_rpc(job_id, request)
            except Exception as exc:
                reply.set_result(Reply.failure(exc))
                return
            if isinstance(answer, cf.Future):
                answer.add_done_callback(functools.partial(_settle, reply))
            else:
                reply.set_result(Reply.result(answer))

        self.call_soon(deliver)
        return reply

    def control(self, control: Control) -> None:
        message = Control.decode(_wire(control.encode()))
        for worker in self.workers():
            if worker.hooks is not None:
                self.call_soon(functools.partial(worker.hooks.on_control, message))

    def query_jobs(self) -> cf.Future[list[dict[str, Any]]]:
        answer: cf.Future[list[dict[str, Any]]] = cf.Future()

        def gather() -> None:
            jobs = []
            for worker in self.workers():
                if worker.hooks is not None:
                    summaries = [job.encode() for job in worker.hooks.describe_jobs()]
                    jobs.extend(WorkerJobs.decode(_wire({"worker": {}, "jobs": summaries})).jobs)
            answer.set_result(jobs)

        self.call_soon(gather)
        return answer

    # ---- results and events ------------------------------------------------------------

    def store_result(self, record: Record) -> None:
        with self._lock:
            self._results[record.job_id] = _wire(record.encode())
            self._owners.pop(record.job_id, None)
            self._results_changed.notify_all()

    def wait_result(self, job_id: str, timeout: float | None) -> dict[str, Any] | None:
        with self._lock:
            self._results_changed.wait_for(lambda: job_id in self._results, timeout)
            return self._results.get(job_id)

    def publish(self, event: Event) -> None:
        body = _wire(event.encode())
        key = event.routing_key
        with self._lock:
            targets = [sub for sub in self._subscriptions if sub.matches(key)]
        for sub in targets:
            self.call_soon(functools.partial(sub.callback, Event.decode(body)))

    def workers(self) -> list[MemoryWorkerTransport]:
        with self._lock:
            return list(self._workers)

    def add_worker(self, worker: MemoryWorkerTransport) -> None:
        with self._lock:
            self._workers.append(worker)

    def remove_worker(self, worker: MemoryWorkerTransport) -> None:
        with self._lock:
            if worker in self._workers:
                self._workers.remove(worker)

    def subscribe(self, patterns: list[str], callback: Callable[[Event], None]) -> _MemorySubscription:
        sub = _MemorySubscription(self, patterns, callback)
        with self._lock:
            self._subscriptions.append(sub)
        return sub

    def unsubscribe(self, sub: _MemorySubscription) -> None:
        with self._lock:
            if sub in self._subscriptions:
                self._subscriptions.remove(sub)


def _settle(reply: cf.Future[Any], answer: cf.Future[Any]) -> None:
    if not reply.done():
        error = answer.exception()
        reply.set_result(Reply.failure(error) if error is not None else Reply.result(answer.result()))


class MemoryWorkerTransport(WorkerTransport):
    """A worker's side of a :class:`MemoryBroker`."""

    def __init__(self, broker: MemoryBroker) -> None:
        self.broker = broker
        self.hooks: WorkerHooks | None = None
        self.free = 0
        self.consuming = False

    def serve(self, hooks: WorkerHooks, capacity: int) -> None:
        self.hooks, self.free, self.consuming = hooks, capacity, True
        self.broker.add_worker(self)
        self.broker.call_soon(self.broker._deliver_launches)

    def set_free_capacity(self, free: int) -> None:
        self.free = free
        if free > 0:
            self.broker.call_soon(self.broker._deliver_launches)

    def deliver_launch(self, launch: Launch) -> None:
        assert self.hooks is not None
        job = self.hooks.prepare(launch)
        if job is None:
            return
        if self.broker.claim(job.job_id, self):
            self.hooks.begin(job)
        else:
            self.hooks.cancel(job, f"job {job.job_id} is owned by another worker")

    def publish_event(self, event: Event) -> None:
        self.broker.publish(event)

    def finish(self, record: Record) -> cf.Future[None]:
        self.broker.store_result(record)
        done: cf.Future[None] = cf.Future()
        done.set_result(None)
        return done

    def stop_taking_work(self) -> None:
        self.consuming = False

    def close(self) -> None:
        self.consuming = False
        self.broker.remove_worker(self)


class _MemorySubscription:
    def __init__(self, broker: MemoryBroker, patterns: list[str],
                 callback: Callable[[Event], None]) -> None:
        self.broker = broker
        self._patterns = list(patterns)
        self.callback = callback

    def matches(self, key: str) -> bool:
        return any(topic_matches(pattern, key) for pattern in self._patterns)

    def close(self) -> None:
        self.broker.unsubscribe(self)


def _final(job_id: str, signal: Signal, reply: cf.Future[Any], timeout: float) -> Any:
    """The value of an RPC's final reply, through the wire's encoding (errors raise typed)."""
    try:
        answer: Reply = reply.result(timeout)
    except cf.TimeoutError:
        raise Timeout(f"job {job_id} did not answer {signal.describe()} within {timeout} s") from None
    finally:
        reply.cancel()
    try:
        return Reply.decode(_wire(answer.encode())).outcome()
    except DecodeError:
        raise
    except ValueError as exc:  # a value the wire cannot carry, as a worker would say
        return Reply.failure(exc).outcome()


class MemoryClientTransport(ClientTransport):
    """A client's side of a :class:`MemoryBroker`, blocking."""

    def __init__(self, broker: MemoryBroker) -> None:
        self.broker = broker

    def launch(self, launches: list[Launch]) -> None:
        self.broker.enqueue(launches)

    def rpc(self, job_id: str, signal: Signal, timeout: float) -> Any:
        return _final(job_id, signal, self.broker.rpc(job_id, signal), timeout)

    def control(self, control: Control) -> None:
        self.broker.control(control)

    def subscribe(self, patterns: list[str], callback: Callable[[Event], None]) -> Subscription:
        return self.broker.subscribe(patterns, callback)

    def fetch_result(self, job_id: str, timeout: float | None) -> dict[str, Any] | None:
        return self.broker.wait_result(job_id, timeout)

    def query_jobs(self, timeout: float) -> list[dict[str, Any]]:
        return self.broker.query_jobs().result(timeout)

    def close(self) -> None:
        pass


class MemoryAsyncClientTransport(AsyncClientTransport):
    """A client's side of a :class:`MemoryBroker`, for asyncio.

    Waits hold no thread: the broker's futures are awaited on the caller's loop, and
    event callbacks are moved to it; only a wait for a record uses a thread, since the
    broker keeps records behind a condition.
    """

    def __init__(self, broker: MemoryBroker) -> None:
        self.broker = broker
        self._sync = MemoryClientTransport(broker)

    async def connect(self) -> None:
        pass

    async def launch(self, launches: list[Launch]) -> None:
        self.broker.enqueue(launches)

    async def rpc(self, job_id: str, signal: Signal, timeout: float) -> Any:
        reply = self.broker.rpc(job_id, signal)
        with contextlib.suppress(asyncio.TimeoutError):  # _final says so, as every transport does
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(reply)), timeout)
        return _final(job_id, signal, reply, 0)

    async def control(self, control: Control) -> None:
        self.broker.control(control)

    def subscribe(self, patterns: list[str], callback: Callable[[Event], None]) -> Subscription:
        loop = asyncio.get_running_loop()

        def hop(event: Event) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody listens
                loop.call_soon_threadsafe(callback, event)

        return self.broker.subscribe(patterns, hop)

    async def fetch_result(self, job_id: str, timeout: float | None) -> dict[str, Any] | None:
        if timeout == 0:
            return self.broker.wait_result(job_id, 0)
        return await asyncio.to_thread(self.broker.wait_result, job_id, timeout)

    async def query_jobs(self, timeout: float) -> list[dict[str, Any]]:
        return await asyncio.wait_for(asyncio.wrap_future(self.broker.query_jobs()), timeout)

    async def close(self) -> None:
        pass
