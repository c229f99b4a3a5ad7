"""Transports: how workers and clients reach each other.

``memory://`` runs everything in one process (:mod:`brokerexec.transport.memory`);
``amqp://`` goes over RabbitMQ (:mod:`brokerexec.transport.amqp_worker`, ``amqp_client``). Both implement the
interfaces of :mod:`brokerexec.transport.base` and pass one behavioural test suite.
"""

from __future__ import annotations

from .base import ClientTransport, PreparedJob, Subscription, WorkerHooks, WorkerTransport

__all__ = ["ClientTransport", "PreparedJob", "Subscription", "WorkerHooks", "WorkerTransport"]
