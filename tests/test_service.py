"""Service declarations, input ports, states and the registry."""

from __future__ import annotations

import inspect
from typing import Any

import pytest

import brokerexec
from brokerexec import ConfigurationError, Input, InvalidRequest, Service, ServiceRegistry, UnknownService
from brokerexec.core.service import apply_invoke, apply_set
from brokerexec.core.state_machine import StateMachine
from brokerexec.errors import InvalidState
from brokerexec.protocol.states import TRANSITIONS, JobState
from brokerexec.transport.memory.broker import topic_matches


class Fit(Service):
    """Fits things."""

    name = "fit"
    inputs = (Input("points", int, help="how many"), Input("tol", float, default=1e-6),
              Input("label", (str, type(None)), default=None))
    settable = {"tol": float}
    invokable = ("scale",)

    def scale(self, factor: float, *, offset: int = 0) -> float:
        return factor * 2 + offset


def test_validate_fills_defaults_and_converts_json_numbers() -> None:
    assert Fit.validate({"points": 3}) == {"points": 3, "tol": 1e-6, "label": None}
    assert Fit.validate({"points": 3, "tol": 1})["tol"] == 1.0


def test_validate_lists_every_problem() -> None:
    with pytest.raises(InvalidRequest) as info:
        Fit.validate({"tol": "x", "extra": 1})
    text = str(info.value)
    assert "missing required input 'points'" in text
    assert "unknown input 'extra'" in text
    assert "input 'tol'" in text
    with pytest.raises(InvalidRequest, match="expected int"):
        Fit.validate({"points": True})  # a bool is not a number here
    with pytest.raises(InvalidRequest, match="JSON object"):
        Fit.validate([1, 2])  # type: ignore[arg-type]


def test_describe_is_json_and_complete() -> None:
    description = Fit.describe()
    assert description["name"] == "fit" and description["help"] == "Fits things."
    assert description["inputs"][0] == {"name": "points", "type": "int", "required": True,
                                        "help": "how many"}
    assert description["inputs"][2]["type"] == "str | NoneType"
    assert description["settable"] == {"tol": "float"}
    assert description["invokable"] == ["scale"]


@pytest.mark.parametrize("body", [
    {"settable": {"_secret": int}},
    {"settable": {"__class__": int}},
    {"invokable": ("__init__",)},
    {"invokable": ("_helper",)},
    {"invokable": ("run",)},
    {"invokable": ("missing",)},
    {"name": "has.dot"},
    {"inputs": (Input("a"), Input("a"))},
])
def test_bad_declarations_fail_when_the_class_is_defined(body: dict[str, Any]) -> None:
    with pytest.raises(TypeError):
        type("Bad", (Service,), {"name": "bad", **body, "_helper": lambda self: None})


def test_input_names_must_be_public() -> None:
    with pytest.raises(ValueError):
        Input("_hidden")


def test_apply_set_is_all_or_nothing() -> None:
    fit = Fit()
    fit.tol = 0.5
    with pytest.raises(brokerexec.SignalRefused):
        apply_set(fit, {"tol": 0.1, "points": 3})
    assert fit.tol == 0.5
    assert apply_set(fit, {"tol": 2}) == {"tol": 2.0}


def test_apply_invoke_checks_arguments() -> None:
    fit = Fit()
    assert apply_invoke(fit, "scale", [1.5], {"offset": 1}) == 4.0
    with pytest.raises(brokerexec.SignalRefused, match="argument 'factor'"):
        apply_invoke(fit, "scale", ["x"], {})
    with pytest.raises(brokerexec.SignalRefused):
        apply_invoke(fit, "scale", [], {"nope": 1})


def test_state_table() -> None:
    assert JobState.RUNNING in TRANSITIONS[JobState.PAUSED]
    assert all(not TRANSITIONS[s] for s in (JobState.FINISHED, JobState.FAILED, JobState.ABORTED))
    seen = []
    machine = StateMachine(seen.append)
    machine.transition(JobState.RUNNING)
    machine.transition(JobState.FINISHED)
    with pytest.raises(InvalidState, match="finished to running"):
        machine.transition(JobState.RUNNING)
    assert machine.try_transition(JobState.PAUSED) is None
    assert [t.state for t in seen] == [JobState.RUNNING, JobState.FINISHED]


def test_registry_allows_only_registered_services() -> None:
    registry = ServiceRegistry([Fit])
    assert registry.get("fit") is Fit
    with pytest.raises(UnknownService, match="registered: fit"):
        registry.get("os.system")
    with pytest.raises(ConfigurationError):
        registry.add(type("Other", (Service,), {"name": "fit"}))


def test_registry_loads_files_and_modules() -> None:
    registry = ServiceRegistry.from_specs(["examples/fit.py:ExponentialFit",
                                           "sample_services:Counter"])
    assert registry.names()[:2] == ["counter", "fit"]
    for bad in ("examples/fit.py", "examples/fit.py:Nope", "json:dumps", "nonexistent_mod:X"):
        with pytest.raises(ConfigurationError):
            ServiceRegistry.from_specs([bad], use_entry_points=False)


@pytest.mark.parametrize(("pattern", "key", "expected"), [
    ("progress.#", "progress.fit.abc", True),
    ("progress.*.*", "progress.fit.abc", True),
    ("*.fit.*", "state.fit.abc", True),
    ("*.fit.*", "state.fitx.abc", False),
    ("*.*.abc", "improved.fit.abc", True),
    ("#", "a.b.c", True),
    ("#.abc", "state.fit.abc", True),
    ("state.#.abc", "state.abc", True),
    ("*.abc", "state.fit.abc", False),
    ("state", "state.fit.abc", False),
])
def test_topic_matching_follows_amqp(pattern: str, key: str, expected: bool) -> None:
    assert topic_matches(pattern, key) is expected


def test_exported_members_are_sorted_and_complete() -> None:
    exported = brokerexec.__all__
    assert exported == sorted(exported)
    # Submodules show up as attributes once imported; every other public name is exported.
    public = {name for name in dir(brokerexec) if not name.startswith("_")
              and not inspect.ismodule(getattr(brokerexec, name))}
    assert public - {"annotations"} - set(exported) == set()
    for name in exported:
        assert getattr(brokerexec, name) is not None
