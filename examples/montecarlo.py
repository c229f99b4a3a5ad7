"""Estimate pi by Monte-Carlo, in batches spread over the handler's worker pool.

Run it:  brokerexec run examples/montecarlo.py:MonteCarloPi --request '{"samples": 4000000}'
With processes:  add ``--pool process`` (pure-Python batches then use every core).
"""

from __future__ import annotations

import random
from typing import Any

from brokerexec import Input, Service, ServiceHandler


def count_inside(task: tuple[int, int]) -> int:
    """How many of ``n`` random points in the unit square fall inside the quarter circle."""
    seed, n = task
    rng = random.Random(seed)
    inside = 0
    for _ in range(n):
        x, y = rng.random(), rng.random()
        inside += x * x + y * y <= 1.0
    return inside


class MonteCarloPi(Service):
    """Estimate pi from random points; steerable batch size, improved after every batch."""

    name = "montecarlo"
    inputs = (
        Input("samples", int, default=2_000_000, help="total number of random points"),
        Input("batch", int, default=500_000, help="points per parallel batch"),
        Input("seed", int, default=1, help="seed of the first batch"),
    )
    settable = {"batch": int}
    invokable = ("estimate",)

    def __init__(self) -> None:
        self.done = 0
        self.inside = 0
        self.total = 0
        self.batch = 500_000

    def run(self, handler: ServiceHandler, request: dict[str, Any]) -> dict[str, Any]:
        self.total, self.batch = request["samples"], request["batch"]
        seed = request["seed"]
        while self.done < self.total:
            handler.ready()
            # One round of batches: as many as the pool has workers, sized by `batch`
            # as it is now (a remote `set` may have changed it).
            sizes = []
            remaining = self.total - self.done
            for _ in range(handler.workers.size):
                if remaining <= 0:
                    break
                sizes.append(min(self.batch, remaining))
                remaining -= sizes[-1]
            tasks = [(seed + i, n) for i, n in enumerate(sizes)]
            seed += len(tasks)
            for (_, n), inside in zip(tasks, handler.imap(count_inside, tasks), strict=True):
                self.inside += inside
                self.done += n
            handler.improved({"pi": self.estimate(), "samples": self.done})
        return {"pi": self.estimate(), "samples": self.done}

    def estimate(self) -> float:
        """The current estimate of pi."""
        return 4.0 * self.inside / self.done if self.done else 0.0

    def progress(self) -> dict[str, Any]:
        return {"done": self.done, "total": self.total,
                "fraction": self.done / self.total if self.total else 0.0}

    def checkpoint(self) -> dict[str, Any]:
        return {"done": self.done, "inside": self.inside}

    def restore(self, state: dict[str, Any]) -> None:
        self.done, self.inside = state["done"], state["inside"]
