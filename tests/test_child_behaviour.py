"""The behavioural suite (``tests/test_behaviour.py``) again, every computation in a child process.

What a user sees through ``Client`` and ``Job`` must not depend on where the computation
runs: the same test functions, collected here with a ``make_client`` whose worker has
``WorkerSettings(runner="process")``, on memory:// and on the real RabbitMQ.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest
import sample_services
from test_behaviour import (
    test_a_failed_job_raises_remote_error_with_type_and_traceback,
    test_abort_while_paused,
    test_broadcast_pause_all_resume_all_abort_all,
    test_checkpoint_on_request_is_taken_at_ready_and_published,
    test_concurrency_bounds_running_jobs,
    test_jobs_lists_running_jobs,
    test_launch_and_result,
    test_launch_many_queues_a_sweep_and_every_job_ends,
    test_progress_iterator_ends_with_the_job,
    test_refusals_raise_as_their_own_class,
    test_set_and_invoke_reply_after_ready,
    test_status_pause_resume_abort,
    test_subscriptions_by_job_service_and_kind,
    test_unknown_service_and_invalid_request_are_clear_failures,
)

from brokerexec import Client, ServiceRegistry, Worker, WorkerSettings

__all__ = [
    "test_a_failed_job_raises_remote_error_with_type_and_traceback",
    "test_abort_while_paused",
    "test_broadcast_pause_all_resume_all_abort_all",
    "test_checkpoint_on_request_is_taken_at_ready_and_published",
    "test_concurrency_bounds_running_jobs",
    "test_jobs_lists_running_jobs",
    "test_launch_and_result",
    "test_launch_many_queues_a_sweep_and_every_job_ends",
    "test_progress_iterator_ends_with_the_job",
    "test_refusals_raise_as_their_own_class",
    "test_set_and_invoke_reply_after_ready",
    "test_status_pause_resume_abort",
    "test_subscriptions_by_job_service_and_kind",
    "test_unknown_service_and_invalid_request_are_clear_failures",
]


def _memory_client(concurrency: int) -> Iterator[Client]:
    settings = WorkerSettings(concurrency=concurrency, runner="process")
    with Client(f"memory://child-{uuid.uuid4().hex}", services=sample_services.ALL,
                worker_settings=settings) as client:
        yield client


def _amqp_client(url: str, concurrency: int) -> Iterator[Client]:
    from brokerexec.transport.rabbitmq.connection_settings import ConnectionSettings
    from brokerexec.transport.rabbitmq.worker.transport import RabbitWorkerTransport
    from brokerexec.worker.worker import host_info

    transport = RabbitWorkerTransport(ConnectionSettings(url=url, name="test-child-worker"),
                                      host_info=host_info())
    worker = Worker(transport, ServiceRegistry(sample_services.ALL),
                    WorkerSettings(concurrency=concurrency, runner="process")).start()
    try:
        with Client(url) as client:
            yield client
    finally:
        worker.stop(grace=5)


@pytest.fixture(params=["memory", pytest.param("amqp", marks=pytest.mark.rabbitmq)])
def make_client(request: pytest.FixtureRequest) -> Iterator[Callable[[int], Client]]:
    """``make_client(concurrency)``: a client with a child-process worker behind it."""
    stack: list[Iterator[Client]] = []

    def make(concurrency: int = 4) -> Client:
        if request.param == "memory":
            gen = _memory_client(concurrency)
        else:
            gen = _amqp_client(request.getfixturevalue("amqp_url"), concurrency)
        stack.append(gen)
        return next(gen)

    yield make
    for gen in reversed(stack):
        for _ in gen:
            pass
