"""Least-squares fit of y = a * exp(-b * x) + c by Levenberg-Marquardt, reporting each improvement.

Run it:  brokerexec run examples/fit.py:ExponentialFit --request '{"points": 400}'

Steer it on a worker::

    brokerexec worker --service examples/fit.py:ExponentialFit      # on the worker's host
    brokerexec launch fit --request '{"tolerance": 0, "max_iterations": 1000000}'  # prints ID
    brokerexec invoke ID perturb '[0.5]'   # knocks the fit off; it improves again, to the optimum
    brokerexec set ID max_iterations=0     # ends it at its next step
    brokerexec result ID

A tolerance of 0 never stops on a small gain: the job runs until it is told to end.
"""

from __future__ import annotations

import math
import random
from typing import Any

from brokerexec import Input, Service, ServiceHandler

#: Levenberg-Marquardt damping: where a fit starts, and the bounds it stays within.
DAMPING_START, DAMPING_MIN, DAMPING_MAX = 1e-3, 1e-9, 1e6


def make_data(points: int, noise: float, seed: int) -> tuple[list[float], list[float]]:
    """Noisy samples of 2.5 * exp(-1.3 x) + 0.5 on [0, 4]."""
    rng = random.Random(seed)
    xs = [4.0 * i / (points - 1) for i in range(points)]
    ys = [2.5 * math.exp(-1.3 * x) + 0.5 + rng.gauss(0.0, noise) for x in xs]
    return xs, ys


def _solve3(m: list[list[float]], v: list[float]) -> list[float]:
    """Solve a 3x3 system by Gaussian elimination with partial pivoting."""
    a = [[*row, rhs] for row, rhs in zip(m, v, strict=True)]
    for col in range(3):
        pivot = max(range(col, 3), key=lambda r: abs(a[r][col]))
        a[col], a[pivot] = a[pivot], a[col]
        if abs(a[col][col]) < 1e-300:
            raise ArithmeticError("singular normal equations")
        for row in range(col + 1, 3):
            f = a[row][col] / a[col][col]
            for k in range(col, 4):
                a[row][k] -= f * a[col][k]
    x = [0.0, 0.0, 0.0]
    for row in (2, 1, 0):
        x[row] = (a[row][3] - sum(a[row][k] * x[k] for k in range(row + 1, 3))) / a[row][row]
    return x


class ExponentialFit(Service):
    """Fit a decaying exponential to noisy data with damped Gauss-Newton (Levenberg-Marquardt) steps."""

    name = "fit"
    inputs = (
        Input("points", int, default=400, help="number of data points"),
        Input("noise", float, default=0.05, help="standard deviation of the noise"),
        Input("seed", int, default=7, help="random seed of the data"),
        Input("tolerance", float, default=1e-12, help="stop when the cost improves less"),
        Input("max_iterations", int, default=200, help="upper bound on Gauss-Newton steps"),
        Input("start", list, default=[1.0, 0.5, 0.0], help="initial [a, b, c]"),
    )
    settable = {"tolerance": float, "max_iterations": int}
    invokable = ("perturb",)

    def __init__(self) -> None:
        self.params = [1.0, 0.5, 0.0]
        self.cost = math.inf
        self.iteration = 0
        self.tolerance = 1e-12
        self.max_iterations = 200
        self.damping = DAMPING_START
        self.data: tuple[list[float], list[float]] = ([], [])

    def _cost(self, xs: list[float], ys: list[float], p: list[float]) -> float:
        return sum((p[0] * math.exp(-p[1] * x) + p[2] - y) ** 2 for x, y in zip(xs, ys, strict=True))

    def run(self, handler: ServiceHandler, request: dict[str, Any]) -> dict[str, Any]:
        xs, ys = self.data = make_data(request["points"], request["noise"], request["seed"])
        self.tolerance, self.max_iterations = request["tolerance"], request["max_iterations"]
        self.params = [float(v) for v in request["start"]]
        self.cost = self._cost(xs, ys, self.params)
        self.damping = DAMPING_START
        while self.iteration < self.max_iterations:
            handler.ready()  # a perturb applies here, and resets the damping
            self.iteration += 1
            trial = self._step(xs, ys)
            cost = self._cost(xs, ys, trial)
            if cost < self.cost:
                gain = self.cost - cost
                self.params, self.cost = trial, cost
                self.damping = max(self.damping / 3, DAMPING_MIN)
                handler.improved({"params": self.params, "cost": self.cost,
                                  "iteration": self.iteration})
                if gain < self.tolerance * max(1.0, cost):
                    break
            else:
                # Bounded: a damping grown without limit made every later step vanish, so
                # the fit never recovered from a perturb. At the bound, no step helps.
                self.damping = min(self.damping * 4, DAMPING_MAX)
        return {"params": self.params, "cost": self.cost, "iterations": self.iteration}

    def _step(self, xs: list[float], ys: list[float]) -> list[float]:
        """The Levenberg-Marquardt trial point: Gauss-Newton with a damped diagonal."""
        a, b, c = self.params
        jtj = [[0.0] * 3 for _ in range(3)]
        jtr = [0.0, 0.0, 0.0]
        for x, y in zip(xs, ys, strict=True):
            e = math.exp(-b * x)
            grad = (e, -a * x * e, 1.0)
            r = a * e + c - y
            for i in range(3):
                jtr[i] -= grad[i] * r
                for j in range(3):
                    jtj[i][j] += grad[i] * grad[j]
        for i in range(3):
            jtj[i][i] *= 1.0 + self.damping
        step = _solve3(jtj, jtr)
        return [p + s for p, s in zip(self.params, step, strict=True)]

    def perturb(self, scale: float = 0.1) -> dict[str, Any]:
        """Nudge the parameters (to show invoke); the fit then improves again, back to the
        optimum: the damping starts afresh, as on a new fit. Returns where it now stands."""
        self.params = [p * (1.0 + scale) for p in self.params]
        self.cost = self._cost(*self.data, self.params)
        self.damping = DAMPING_START
        return {"params": self.params, "cost": self.cost, "iteration": self.iteration}

    def progress(self) -> dict[str, Any]:
        # max_iterations may be set to 0 to end the fit (the docstring's `set`): done then.
        total = self.max_iterations
        return {"iteration": self.iteration, "total": total,
                "fraction": min(self.iteration / total, 1.0) if total > 0 else 1.0, "cost": self.cost}

    def checkpoint(self) -> dict[str, Any]:
        return {"params": self.params, "iteration": self.iteration}

    def restore(self, state: dict[str, Any]) -> None:
        self.params, self.iteration = list(state["params"]), int(state["iteration"])
