"""The in-memory transport: a whole brokerexec deployment inside one process.

A :class:`MemoryBroker` stands in for RabbitMQ: a launch queue, per-job RPC endpoints with
exclusive ownership, topic-matched event subscriptions, retained control messages and final
records. Everything that RabbitMQ would deliver is delivered on one dispatcher thread (the
"handler thread" of every worker on it), and every body goes through the same JSON codec as
on the wire, so what works here works over AMQP. ``memory://`` URLs share one broker per
name (``memory://`` and ``memory://lab`` are two brokers).
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from .. import codec
from ..errors import DecodeError, JobNotFound, Timeout
from ..protocol import Event, reply_error, reply_result, result_from_reply
from .base import ClientTransport, WorkerHooks, WorkerTransport

__all__ = ["MemoryBroker", "MemoryClientTransport", "MemoryWorkerTransport", "topic_matches"]

log = logging.getLogger(__name__)

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
        self._launches: deque[dict[str, Any]] = deque()
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

    def enqueue_launch(self, body: dict[str, Any]) -> None:
        with self._lock:
            self._launches.append(_wire(body))
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

    # ---- results and events ------------------------------------------------------------

    def store_result(self, job_id: str, record: dict[str, Any]) -> None:
        with self._lock:
            self._results[job_id] = _wire(record)
            self._owners.pop(job_id, None)
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

    def owner(self, job_id: str) -> MemoryWorkerTransport | None:
        with self._lock:
            return self._owners.get(job_id)

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

    def add_subscription(self, sub: _MemorySubscription) -> None:
        with self._lock:
            self._subscriptions.append(sub)

    def remove_subscription(self, sub: _MemorySubscription) -> None:
        with self._lock:
            if sub in self._subscriptions:
                self._subscriptions.remove(sub)


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

    def deliver_launch(self, launch: dict[str, Any]) -> None:
        assert self.hooks is not None
        try:
            job = self.hooks.prepare(launch)
        except DecodeError as exc:
            log.warning("launch dead-lettered: %s", exc)
            return
        if job is None:
            return
        if self.broker.claim(job.job_id, self):
            self.hooks.begin(job)
        else:
            self.hooks.cancel(job, f"job {job.job_id} is owned by another worker")

    def publish_event(self, event: Event) -> None:
        self.broker.publish(event)

    def finish(self, job_id: str, record: dict[str, Any]) -> cf.Future[None]:
        self.broker.store_result(job_id, record)
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
        self.broker.remove_subscription(self)


class MemoryClientTransport(ClientTransport):
    """A client's side of a :class:`MemoryBroker`."""

    def __init__(self, broker: MemoryBroker) -> None:
        self.broker = broker

    def launch(self, body: dict[str, Any]) -> None:
        self.broker.enqueue_launch(body)

    def rpc(self, job_id: str, body: dict[str, Any], timeout: float) -> Any:
        reply: cf.Future[Any] = cf.Future()
        request = _wire(body)

        def deliver() -> None:
            worker = self.broker.owner(job_id)
            if worker is None or worker.hooks is None:
                reply.set_exception(JobNotFound(f"no worker holds job {job_id}"))
                return
            try:
                answer = worker.hooks.on_rpc(job_id, request)
            except Exception as exc:
                reply.set_exception(exc)
                return
            if isinstance(answer, cf.Future):
                answer.add_done_callback(lambda done: _copy_outcome(done, reply))
            else:
                reply.set_result(answer)

        self.broker.call_soon(deliver)
        try:
            return result_from_reply(_wire(_reply_body(reply, timeout, job_id, body)))
        finally:
            reply.cancel()

    def control(self, body: dict[str, Any]) -> None:
        message = _wire(body)
        for worker in self.broker.workers():
            if worker.hooks is not None:
                self.broker.call_soon(functools.partial(worker.hooks.on_control, message))

    def subscribe(self, patterns: list[str], callback: Callable[[Event], None]) -> _MemorySubscription:
        sub = _MemorySubscription(self.broker, patterns, callback)
        self.broker.add_subscription(sub)
        return sub

    def fetch_result(self, job_id: str, timeout: float | None) -> dict[str, Any] | None:
        return self.broker.wait_result(job_id, timeout)

    def query_jobs(self, timeout: float) -> list[dict[str, Any]]:
        answer: cf.Future[list[dict[str, Any]]] = cf.Future()

        def gather() -> None:
            jobs = [job for worker in self.broker.workers() if worker.hooks is not None
                    for job in worker.hooks.describe_jobs()]
            answer.set_result(jobs)

        self.broker.call_soon(gather)
        return _wire(answer.result(timeout))  # type: ignore[no-any-return]

    def close(self) -> None:
        pass


def _copy_outcome(source: cf.Future[Any], target: cf.Future[Any]) -> None:
    if target.done():
        return
    if source.exception() is not None:
        target.set_exception(source.exception())
    else:
        target.set_result(source.result())


def _reply_body(reply: cf.Future[Any], timeout: float, job_id: str,
                body: dict[str, Any]) -> dict[str, Any]:
    """The reply as a wire body, so errors travel exactly as over AMQP."""
    try:
        return reply_result(reply.result(timeout))
    except cf.TimeoutError:
        raise Timeout(f"job {job_id} did not answer {body.get('intent')!r} "
                      f"within {timeout} s") from None
    except JobNotFound:
        raise
    except Exception as exc:
        return reply_error(exc)

