"""Prometheus metrics of one worker (``brokerexec worker --metrics-port N``).

:class:`WorkerMetrics` watches a worker from outside it: :meth:`WorkerMetrics.watch` wraps
the worker's transport, whose few calls (a state event, a stored checkpoint, a final
record, an RPC) say all the metrics need, so the worker itself holds no metrics code.
``ready()`` stays one test: the computation samples the interval between two consecutive
calls about once a second per job (:data:`brokerexec.core.computation_thread.ready_interval_observer`).
What only the broker knows (reconnects, launch-queue depth) is read when scraped.
docs/monitoring.md names every metric.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .. import codec
from ..core import computation_thread as computation
from ..protocol.events import Event
from ..protocol.intents import Signal
from ..protocol.messages import Record
from ..transport.base import WorkerHooks, WorkerTransport
from ..transport.schemes import scheme_of

__all__ = ["WorkerMetrics"]

log = logging.getLogger(__name__)
_SHOWN = ("running", "paused")  # the states with a gauge
_FAST = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class WorkerMetrics:
    """The metrics of one worker, in a registry of their own."""

    def __init__(self, broker: str = "") -> None:
        self.registry = registry = CollectorRegistry()
        self.started = Counter("brokerexec_jobs_started", "Jobs that started running here.",
                               ["service"], registry=registry)
        self.ended = Counter("brokerexec_jobs_ended", "Jobs that ended here, by final state "
                             "(finished, failed, aborted) or handed_over.", ["service", "state"],
                             registry=registry)
        self.current = Gauge("brokerexec_jobs", "Jobs here now in a state (running, paused).",
                             ["service", "state"], registry=registry)
        self.checkpoints = Counter("brokerexec_checkpoints", "Checkpoints stored.", ["service"],
                                   registry=registry)
        self.checkpoint_bytes = Counter("brokerexec_checkpoint_bytes", "Bytes of the checkpoints "
                                        "stored (their JSON).", ["service"], registry=registry)
        self.round_trip = Histogram("brokerexec_signal_round_trip_seconds", "From an RPC's "
                                    "receipt by the worker to its reply being ready.", ["intent"],
                                    buckets=_FAST, registry=registry)
        self.ready_interval = Histogram("brokerexec_ready_interval_seconds", "Seconds between "
                                        "two consecutive ready() calls of a job (sampled).",
                                        buckets=_FAST, registry=registry)
        self._lock = threading.Lock()
        self._jobs: dict[str, tuple[str, str]] = {}  # job id -> (service, state)
        self._broker = broker
        self._transport: WorkerTransport | None = None
        self._services: Sequence[str] = ()
        registry.register(_BrokerCollector(self))

    def watch(self, transport: WorkerTransport) -> WorkerTransport:
        """``transport``, reporting to these metrics; also samples every job's ``ready()``."""
        self._transport = transport
        computation.ready_interval_observer = self.ready_interval.observe
        return _MeteredTransport(transport, self)

    def serve(self, host: str, port: int) -> int:
        """Serve ``/metrics`` on ``host:port`` from a daemon thread; returns the port bound
        (``port`` 0 picks a free one)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_port)

    # ---- what the transport sees --------------------------------------------------------

    def on_state(self, job_id: str, service: str, state: str) -> None:
        with self._lock:
            before = self._jobs.get(job_id)
            self._jobs[job_id] = (service, state)
        if before is not None and before[1] in _SHOWN:
            self.current.labels(before[0], before[1]).dec()
        if state in _SHOWN:
            self.current.labels(service, state).inc()
        if state == "running" and (before is None or before[1] != "paused"):
            self.started.labels(service).inc()

    def on_end(self, job_id: str, service: str, how: str) -> None:
        with self._lock:
            before = self._jobs.pop(job_id, None)
        if before is not None and before[1] in _SHOWN:
            self.current.labels(before[0], before[1]).dec()
        self.ended.labels(service, how).inc()

    def service_of(self, job_id: str) -> str:
        with self._lock:
            return self._jobs.get(job_id, ("", ""))[0]


class _MeteredTransport(WorkerTransport):
    """A worker transport that tells :class:`WorkerMetrics` what passes through it."""

    def __init__(self, inner: WorkerTransport, metrics: WorkerMetrics) -> None:
        self.inner, self.metrics = inner, metrics

    def __getattr__(self, name: str) -> Any:  # e.g. ``connection``, which tests reach for
        return getattr(self.inner, name)

    def serve(self, hooks: WorkerHooks, capacity: int, services: Sequence[str]) -> None:
        self.metrics._services = tuple(services)
        self.inner.serve(_MeteredHooks(hooks, self.metrics), capacity, services)

    def set_free_capacity(self, free: int) -> None:
        self.inner.set_free_capacity(free)

    def publish_event(self, event: Event) -> None:
        if event.kind == "state":
            self.metrics.on_state(event.job_id, event.service, str(event.data.get("to")))
        self.inner.publish_event(event)

    def finish(self, record: Record) -> cf.Future[None]:
        self.metrics.on_end(record.job_id, record.service, record.state.value)
        return self.inner.finish(record)

    def note_changes(self, job_id: str, changes: list[dict[str, Any]]) -> cf.Future[None]:
        return self.inner.note_changes(job_id, changes)

    def store_checkpoint(self, job_id: str, state: Any, settable: dict[str, Any],
                         covers: int) -> cf.Future[None]:
        # Measured here, on the caller's thread: a done-callback would run on the loop's.
        size, service = len(codec.encode(state)), self.metrics.service_of(job_id)
        done = self.inner.store_checkpoint(job_id, state, settable, covers)
        stored = self.metrics.checkpoints.labels(service)
        stored_bytes = self.metrics.checkpoint_bytes.labels(service)

        def count(future: cf.Future[None]) -> None:
            if future.exception() is None:
                stored.inc()
                stored_bytes.inc(size)
        done.add_done_callback(count)
        return done

    def hand_over(self, job_id: str) -> cf.Future[None]:
        self.metrics.on_end(job_id, self.metrics.service_of(job_id), "handed_over")
        return self.inner.hand_over(job_id)

    def stop_taking_work(self) -> None:
        self.inner.stop_taking_work()

    def close(self) -> None:
        self.inner.close()


class _MeteredHooks:
    """The worker's hooks, timing each RPC from its receipt to its reply."""

    def __init__(self, hooks: WorkerHooks, metrics: WorkerMetrics) -> None:
        self.hooks, self.metrics = hooks, metrics

    def __getattr__(self, name: str) -> Any:
        return getattr(self.hooks, name)

    def on_rpc(self, job_id: str, signal: Signal) -> Any:
        start = time.perf_counter()
        timer = self.metrics.round_trip.labels(signal.intent.value)
        try:
            answer = self.hooks.on_rpc(job_id, signal)
        except BaseException:
            timer.observe(time.perf_counter() - start)
            raise
        if isinstance(answer, cf.Future):
            answer.add_done_callback(lambda _f: timer.observe(time.perf_counter() - start))
        else:
            timer.observe(time.perf_counter() - start)
        return answer


class _BrokerCollector(Collector):
    """Read at each scrape: reconnects so far, and each launch queue's ready messages (a
    passive declare on a connection of its own, so that a scrape never waits on the
    worker's loop)."""

    def __init__(self, metrics: WorkerMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        connection = getattr(self.metrics._transport, "connection", None)
        reconnects = CounterMetricFamily("brokerexec_reconnects", "Connections to the broker "
                                         "made again after one was lost.")
        reconnects.add_metric([], float(getattr(connection, "reconnects", 0)))
        yield reconnects
        depth = GaugeMetricFamily("brokerexec_launch_queue_depth", "Launches waiting in a "
                                  "service's queue (ready, not yet taken).", labels=["service"])
        for service, count in self._depths():
            depth.add_metric([service], float(count))
        yield depth

    def _depths(self) -> list[tuple[str, int]]:
        broker = self.metrics._broker
        if not broker:
            return []
        depths = scheme_of(broker).queue_depths
        return [] if depths is None else depths(broker, self.metrics._services)
