"""The asyncio twin (``brokerexec.client.aio``): the same behaviour as ``Client``, awaited.

Run on the in-memory transport and against a real worker process over RabbitMQ; each test
runs its own event loop (``asyncio.run``), and every wait is on an event, with a deadline.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sample_services import ALL

from brokerexec.client.aio import AsyncClient
from brokerexec.errors import JobAborted, RemoteError
from brokerexec.protocol.events import Event

WAIT = 20.0


@pytest.fixture(params=["memory", pytest.param("amqp", marks=pytest.mark.rabbitmq)])
def make_client(request: pytest.FixtureRequest, unique_name: str) -> Iterator[Callable[[], AsyncClient]]:
    if request.param == "memory":
        yield lambda: AsyncClient(f"memory://{unique_name}", services=ALL, concurrency=8)
        return
    url = request.getfixturevalue("amqp_url")
    request.getfixturevalue("worker_process")("--concurrency", "8")
    yield lambda: AsyncClient(url)


async def until_state(client: AsyncClient, job_id: str, state: str) -> None:
    """Wait for the job's state event to ``state`` (or find it there already)."""
    reached = asyncio.Event()

    def on_event(event: Event) -> None:
        if event.data.get("to") == state:
            reached.set()

    subscription = client.subscribe(f"state.*.{job_id}", on_event)
    try:
        while not reached.is_set():
            if (await client.job(job_id).status())["state"] == state:
                return
            await asyncio.wait_for(reached.wait(), WAIT)
    finally:
        subscription.close()


def test_steer_a_job_from_asyncio(make_client: Callable[[], AsyncClient]) -> None:
    async def main() -> None:
        async with make_client() as client:
            job = await client.launch("forever", {"tick": 0.005})
            await until_state(client, job.id, "running")
            assert await job.set(value=7) == {"value": 7}
            assert await job.invoke("current") == 7
            assert await job.pause() is True
            await until_state(client, job.id, "paused")
            assert (await job.status())["state"] == "paused"
            assert await job.resume() is True
            await until_state(client, job.id, "running")
            with pytest.raises(RemoteError) as refused:
                await job.set(undeclared=1)
            assert "undeclared" in str(refused.value)
            await job.abort()
            with pytest.raises(JobAborted):
                await job.result(WAIT)

    asyncio.run(main())


def test_results_progress_and_subscriptions_come_to_the_loop(
        make_client: Callable[[], AsyncClient]) -> None:
    async def main() -> None:
        async with make_client() as client:
            loop = asyncio.get_running_loop()
            seen_on: list[bool] = []

            async def on_state(event: Event) -> None:  # a coroutine callback runs as a task
                seen_on.append(asyncio.get_running_loop() is loop)

            subscription = client.subscribe("state.counter.*", on_state)
            jobs = await client.launch_many("echo", [{"value": i} for i in range(40)])
            results = await asyncio.wait_for(asyncio.gather(*(job.result() for job in jobs)), WAIT)
            assert results == list(range(40))

            counter = await client.launch("counter", {"steps": 40, "delay": 0.01},
                                          progress_delta=0.05)
            progress = [p async for p in counter.progress(idle_timeout=WAIT)]
            assert progress and all(0 <= p["fraction"] <= 1 for p in progress)
            assert (await counter.result(WAIT))["count"] == 40
            subscription.close()
            assert seen_on and all(seen_on)

            failing = await client.launch("counter", {"steps": 5, "fail_at": 2})
            with pytest.raises(RemoteError) as failure:
                await failing.result(WAIT)
            assert "ValueError" in failure.value.remote_type
            record: dict[str, Any] | None = await failing.record(0)
            assert record is not None and record["state"] == "failed"

    asyncio.run(main())


def test_a_result_that_does_not_come_in_time_is_a_timeout(
        make_client: Callable[[], AsyncClient]) -> None:
    from brokerexec.errors import Timeout

    async def main() -> None:
        async with make_client() as client:
            job = await client.launch("forever", {"tick": 0.005})
            with pytest.raises(Timeout):
                await job.result(0.3)
            await job.abort()
            with pytest.raises(JobAborted):
                await job.result(WAIT)

    asyncio.run(main())


def test_using_a_client_before_connecting_says_so() -> None:
    client = AsyncClient("memory://never-connected")
    with pytest.raises(RuntimeError, match="not connected"):
        client.job("0" * 32)


@pytest.mark.rabbitmq
@pytest.mark.fault
def test_a_result_awaited_across_a_dropped_connection_still_arrives(
        amqp_url: str, worker_process: Any, unique_name: str) -> None:
    # The record pushed to the client's own queue is lost with that queue; the wait
    # falls back to the records stream on the new connection.
    from test_rabbitmq_transport import close_connections_named

    worker_process("--concurrency", "2")
    name = f"{unique_name}-aio"

    async def main() -> None:
        async with AsyncClient(f"{amqp_url}?name={name}") as client:
            job = await client.launch("forever", {"tick": 0.005})
            await until_state(client, job.id, "running")
            waiting = asyncio.ensure_future(job.result(WAIT))
            await asyncio.sleep(0)  # the wait is registered before the cut
            assert await asyncio.to_thread(close_connections_named, name) == 1
            assert await job.abort() is True  # RPCs go on the calling thread's own channel
            with pytest.raises(JobAborted):
                await asyncio.wait_for(waiting, WAIT)

    asyncio.run(main())


def test_an_operation_from_asyncio_launches_steers_and_resumes(
        make_client: Callable[[], AsyncClient]) -> None:
    async def main() -> None:
        async with make_client() as client:
            requests = [{"steps": 5 + n, "fail_at": 2 if n == 3 else -1} for n in range(6)]
            async with await client.operation("counter", requests, name="async sweep") as op:
                seen = [outcome async for outcome in op.results(timeout=WAIT)]
                status = await op.wait(WAIT)
            assert len(seen) == 6 and (status.counts["finished"], status.counts["failed"]) == (5, 1)
            assert (await op.consolidate("stats"))["counts"]["failed"] == 1
            plan = await client.operation_plan("counter", requests, name="async sweep")
            assert (plan.operation, len(plan.skip), len(plan.rerun)) == (op.id, 5, 1)
            # the same sweep again: only the failed item runs (and fails again: it is in its request)
            async with await client.operation("counter", requests, name="async sweep") as again:
                assert again.id == op.id
                resumed = await again.wait(WAIT)
                assert (resumed.counts["skipped"], resumed.counts["failed"]) == (5, 1)
                assert again.items("failed")[0].runs == 2
            # steered as a whole: one control message, the queued items reached too
            long = [{"steps": 2000 + n, "delay": 0.01} for n in range(12)]
            async with await client.operation("counter", long) as steered:
                assert await steered.set(label="async") == 12
                assert await steered.abort() == 12
                assert (await steered.wait(WAIT)).counts["aborted"] == 12
            assert any(row["id"] == op.id for row in await client.operations())
            async with await client.operation_of(op.id) as found:
                assert found.status().total == 6

    asyncio.run(main())
