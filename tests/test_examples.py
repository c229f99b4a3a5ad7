"""The examples do what their docs say, run as the docs say (README.md, each example's
docstring), through ``python -m brokerexec`` and, for broker commands, the real broker."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shlex
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from brokerexec import Client, Event

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
WAIT = 60.0
#: The data the documented fits use (the service's defaults): 2.5 exp(-1.3 x) + 0.5.
TRUTH = (2.5, 1.3, 0.5)


def _example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _brokerexec(command: str, url: str | None = None, timeout: float = WAIT) -> str:
    """Run a documented ``brokerexec ...`` line as ``python -m brokerexec ...``; its stdout."""
    args = shlex.split(command)
    assert args[0] == "brokerexec", command
    env = {**os.environ, **({"BROKEREXEC_URL": url} if url else {})}
    done = subprocess.run([sys.executable, "-m", "brokerexec", *args[1:]], capture_output=True,
                          text=True, timeout=timeout, check=False, cwd=ROOT, env=env)
    assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _result_of(stdout: str) -> Any:
    """The result a verb printed: its stdout as JSON, or the JSON document it ends with
    (``launch --follow`` prints the job's id first)."""
    try:
        return json.loads(stdout)
    except json.JSONDecodeError:
        return json.loads(stdout[stdout.index("\n{") + 1:])


def _optimum(points: int) -> float:
    """The least cost of the documented data, by the example's own fit run to the end."""
    class Quiet:
        def ready(self) -> None: ...
        def improved(self, value: Any) -> None: ...

    fit = _example("fit").ExponentialFit()
    request = {"points": points, "noise": 0.05, "seed": 7, "tolerance": 1e-15,
               "max_iterations": 500, "start": [1.0, 0.5, 0.0]}
    return float(fit.run(Quiet(), request)["cost"])


def _near_truth(params: list[float]) -> bool:
    return all(abs(p - t) < 0.05 for p, t in zip(params, TRUTH, strict=True))


# ---- run locally: README's main command and the examples' "Run it" lines ---------------------


@pytest.mark.timeout(300)
def test_the_readme_main_command_estimates_pi() -> None:
    line = README.split("<!-- main-command -->")[1].split("```sh\n")[1].split("\n")[0]
    command = line[line.index("brokerexec run"):]  # after the venv and pip steps
    result = _result_of(_brokerexec(command, timeout=280))
    assert result["samples"] == 20_000_000
    assert abs(result["pi"] - math.pi) < 0.002  # 20 M samples: sigma ~ 0.0004


@pytest.mark.parametrize("name", ["montecarlo", "fit"])
def test_each_examples_run_it_line(name: str) -> None:
    doc = _example(name).__doc__ or ""
    command = re.search(r"Run it:\s+(brokerexec run .*)", doc)
    assert command is not None, doc
    result = _result_of(_brokerexec(command.group(1), timeout=120))
    if name == "montecarlo":
        assert result["samples"] == 4_000_000 and abs(result["pi"] - math.pi) < 0.005
    else:
        assert _near_truth(result["params"])
        assert result["cost"] == pytest.approx(_optimum(400), rel=1e-9)


def test_a_perturbed_fit_returns_to_its_optimum() -> None:
    # Given the fit at its optimum, knocked off four times as a client's perturb would
    module = _example("fit")
    fit = module.ExponentialFit()
    optimum = _optimum(2000)
    costs: list[tuple[int, float]] = []

    class Steered:
        def ready(self) -> None:
            if fit.iteration in (50, 100, 150, 200):
                fit.perturb(0.5)
                costs.append((fit.iteration, fit.cost))

        def improved(self, value: Any) -> None: ...

    request = {"points": 2000, "noise": 0.05, "seed": 7, "tolerance": 0.0,
               "max_iterations": 250, "start": [1.0, 0.5, 0.0]}
    result = fit.run(Steered(), request)
    # Then each perturb made it worse, and it improved again, back to the optimum
    assert len(costs) == 4 and all(cost > 10 * optimum for _, cost in costs)
    assert result["cost"] == pytest.approx(optimum, rel=1e-9)
    assert _near_truth(result["params"])


# ---- over RabbitMQ: README's block, and steering the fit ------------------------------------


def _readme_rabbitmq_block() -> list[str]:
    block = README.split("## Over RabbitMQ")[1].split("```sh\n")[1].split("```")[0]
    return [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]


@pytest.mark.rabbitmq
def test_the_readme_rabbitmq_block(amqp_url: str, worker_process: Callable[..., Any]) -> None:
    worker_line, *client_lines = _readme_rabbitmq_block()
    spec = shlex.split(worker_line)[shlex.split(worker_line).index("--service") + 1]
    worker_process(services=(spec,))  # the documented worker, on this test's vhost
    launch, jobs, pause = client_lines
    result = _result_of(_brokerexec(launch, amqp_url))
    assert _near_truth(result["params"])
    assert result["cost"] == pytest.approx(_optimum(2000), rel=1e-9)
    _brokerexec(jobs, amqp_url)
    _brokerexec(pause, amqp_url)


class Improvements:
    """A job's improved events, in arrival order."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.states: list[dict[str, Any]] = []

    def __call__(self, event: Event) -> None:
        with self.cond:
            self.states.append(event.data["state"])
            self.cond.notify_all()

    def wait_at(self, cost: float, after: int) -> None:
        """Wait for an improvement made after iteration ``after`` that costs ``cost``."""
        def back() -> bool:
            return any(state["iteration"] > after and state["cost"] <= cost * (1 + 1e-9)
                       for state in self.states)

        with self.cond:
            assert self.cond.wait_for(back, WAIT), self.states[-5:]


@pytest.mark.rabbitmq
def test_steering_the_fit_as_its_docstring_says(amqp_url: str,
                                                worker_process: Callable[..., Any]) -> None:
    doc = _example("fit").__doc__ or ""
    lines = [line.split("#")[0].strip() for line in doc.splitlines()
             if line.strip().startswith("brokerexec ")]
    worker_line, launch, invoke, end, result = lines
    assert worker_line.startswith("brokerexec worker --service ")
    worker_process(services=(shlex.split(worker_line)[-1],))
    optimum = _optimum(400)
    improvements = Improvements()
    with Client(amqp_url) as client:
        # Given a fit launched as documented, running until told to end
        job_id = _brokerexec(launch, amqp_url).strip().splitlines()[-1]
        subscription = client.job(job_id).subscribe(improvements, ("improved",))
        try:
            for _ in range(4):
                # When it is perturbed, as documented (knocked well off its optimum)
                perturbed = _result_of(_brokerexec(invoke.replace("ID", job_id), amqp_url))
                assert perturbed["cost"] > 10 * optimum
                # Then it improves again, back to its optimum
                improvements.wait_at(optimum, after=perturbed["iteration"])
        finally:
            subscription.close()
        _brokerexec(end.replace("ID", job_id), amqp_url)
        final = _result_of(_brokerexec(result.replace("ID", job_id), amqp_url))
    assert final["cost"] == pytest.approx(optimum, rel=1e-9) and _near_truth(final["params"])
