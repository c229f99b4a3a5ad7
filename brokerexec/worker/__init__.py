"""The worker: runs the jobs a transport hands it, each through its own ServiceHandler.

* :mod:`.worker` — :class:`Worker`, transport-agnostic: slots, job starts and ends, graceful
  stops and handovers.
* :mod:`.controls` — controls remembered for the launches still queued.
* :mod:`.metrics` — its Prometheus metrics, watched through its transport.

``brokerexec worker`` (:mod:`brokerexec.cli.worker`) runs one on RabbitMQ; a ``memory://``
client embeds one (:mod:`brokerexec.client.embedded`). Its settings are
:class:`~brokerexec.settings.WorkerSettings`.
"""

from __future__ import annotations

from ..settings import RunnerKind, WorkerSettings
from .worker import Worker, host_info

__all__ = ["RunnerKind", "Worker", "WorkerSettings", "host_info"]
