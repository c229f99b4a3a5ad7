"""What an operation's items came to, and what the operation makes of them (pySPACE's
``retrieve()`` and ``consolidate()``).

Sans-I/O. An :class:`Outcome` is one item's end: its key, request and job, its state, and
its value or its error, built from the job's final record (:func:`outcome_of`). A
:class:`FailurePolicy` says when failures stop an operation (Celery's chord gives up at the
first; here that is a choice). :func:`consolidate` makes one answer of every outcome,
successes *and* failures: a function of the caller's, or a built-in:

* ``"collect"``: every outcome as a dict, written as JSON lines (or CSV, for a ``.csv``
  path) when given a path;
* ``"stats"``: count, mean, min, max and standard deviation of each numeric field of the
  finished items' results, with the counts by state;
* ``"best:<field>"`` (``"best:-<field>"`` for the lowest): the finished outcome whose
  result's field is the highest.
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigurationError, DecodeError, JobAborted, error_from_wire

__all__ = ["BUILT_INS", "FailurePolicy", "Outcome", "consolidate", "outcome_of"]

#: The ways :func:`consolidate` knows by name (``best:`` takes a field after it).
BUILT_INS = ("collect", "stats", "best:<field>", "best:-<field>")
#: An outcome's states: how a job ends.
ENDINGS = frozenset({"finished", "failed", "aborted"})


@dataclass(frozen=True)
class Outcome:
    """One item's end: ``value`` if it finished, ``error`` (``{"type", "message",
    "traceback"}``) if it failed; an aborted one has neither."""

    key: str
    request: dict[str, Any] | None
    job_id: str
    state: str  # finished, failed or aborted
    value: Any = None
    error: dict[str, str] | None = None

    @property
    def ok(self) -> bool:
        return self.state == "finished"

    def result(self) -> Any:
        """Its value; raises its error as :meth:`Job.result` does (typed, or ``JobAborted``)."""
        if self.state == "failed":
            raise error_from_wire(self.error)
        if self.state == "aborted":
            raise JobAborted(self.job_id)
        return self.value

    def encode(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def decode(cls, body: object) -> Outcome:
        """Raises: DecodeError: not an outcome as :meth:`encode` writes one."""
        if (not isinstance(body, dict) or not isinstance(body.get("key"), str)
                or not isinstance(body.get("job_id"), str) or body.get("state") not in ENDINGS):
            raise DecodeError(f"not an item's outcome: {body!r:.200}")
        return cls(body["key"], body.get("request"), body["job_id"], body["state"], body.get("value"),
                   body.get("error"))


def outcome_of(key: str, request: dict[str, Any] | None, record: dict[str, Any]) -> Outcome:
    """The outcome a job's final record stands for."""
    state = record.get("state")
    if state not in ENDINGS:
        raise DecodeError(f"a record in state {state!r} is not a job's end")
    return Outcome(key, request, str(record.get("job_id", "")), state,
                   record.get("result") if state == "finished" else None,
                   record.get("error") if state == "failed" else None)


@dataclass(frozen=True)
class FailurePolicy:
    """When an operation's failures stop it: ``on_error="fail_fast"`` at the first;
    ``max_failures``: after that many (an int), or once more than that fraction of its items
    (a float below 1) failed; ``"continue"`` with no limit: never. Aborted items are not
    failures (someone chose to abort them)."""

    on_error: str = "continue"
    max_failures: int | float | None = None

    def __post_init__(self) -> None:
        if self.on_error not in ("continue", "fail_fast"):
            raise ConfigurationError(f'on_error is "continue" or "fail_fast", not {self.on_error!r}')
        limit = self.max_failures
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float))
                                  or not (limit >= 1 if isinstance(limit, int) else 0 < limit < 1)):
            raise ConfigurationError(f"max_failures is a count (1 or more) or a fraction of the "
                                     f"items (between 0 and 1), not {limit!r}")

    def stops(self, failed: int, items: int) -> bool:
        """Whether ``failed`` failures among ``items`` items stop the operation."""
        if failed == 0:
            return False
        if self.on_error == "fail_fast":
            return True
        if self.max_failures is None:
            return False
        if isinstance(self.max_failures, int):
            return failed >= self.max_failures
        return failed > self.max_failures * max(items, 1)

    def encode(self) -> dict[str, Any]:
        return {"on_error": self.on_error, "max_failures": self.max_failures}

    @classmethod
    def decode(cls, body: Mapping[str, Any]) -> FailurePolicy:
        """Raises: ConfigurationError: not a policy :meth:`encode` writes."""
        return cls(body.get("on_error", "continue"), body.get("max_failures"))


def consolidate(outcomes: Sequence[Outcome], how: str | Callable[[list[Outcome]], Any], *,
                path: str | os.PathLike[str] | None = None) -> Any:
    """One answer made of every outcome (see the module docstring); ``how`` is a function
    of the outcomes or a built-in's name.

    Raises:
        ConfigurationError: an unknown built-in, or ``path`` with another than ``collect``.
    """
    if callable(how):
        return how(list(outcomes))
    if path is not None and how != "collect":
        raise ConfigurationError(f"only collect writes to a file, not {how!r}")
    if how == "collect":
        rows = [outcome.encode() for outcome in outcomes]
        if path is not None:
            _write(rows, Path(path))
        return rows
    if how == "stats":
        return _stats(outcomes)
    if how.startswith("best:") and len(how) > len("best:") and how != "best:-":
        field = how[len("best:"):]
        lowest = field.startswith("-")
        return _best(outcomes, field.lstrip("-") if lowest else field, lowest)
    raise ConfigurationError(f"consolidate takes a function or one of {', '.join(BUILT_INS)}; "
                             f"not {how!r}")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _stats(outcomes: Iterable[Outcome]) -> dict[str, Any]:
    counts = dict.fromkeys(sorted(ENDINGS), 0)
    columns: dict[str, list[float]] = {}
    for outcome in outcomes:
        counts[outcome.state] += 1
        if outcome.ok and isinstance(outcome.value, dict):
            for name, value in outcome.value.items():
                if (number := _number(value)) is not None:
                    columns.setdefault(name, []).append(number)
    fields = {name: {"count": len(values), "mean": statistics.fmean(values), "min": min(values),
                     "max": max(values), "stdev": statistics.stdev(values) if len(values) > 1 else 0.0}
              for name, values in sorted(columns.items())}
    return {"counts": counts, "fields": fields}


def _best(outcomes: Iterable[Outcome], field: str, lowest: bool) -> dict[str, Any] | None:
    scored = [(number, outcome) for outcome in outcomes if outcome.ok and isinstance(outcome.value, dict)
              and (number := _number(outcome.value.get(field))) is not None]
    if not scored:
        return None
    pick = min if lowest else max
    return pick(scored, key=lambda pair: pair[0])[1].encode()


def _write(rows: list[dict[str, Any]], path: Path) -> None:
    """JSON lines, or CSV with the request's and the value's fields as columns of their own."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with temporary.open("w", newline="", encoding="utf-8") as out:
        if path.suffix.lower() != ".csv":
            for row in rows:
                out.write(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n")
        else:
            flat = [_flat(row) for row in rows]
            names = list(dict.fromkeys(name for row in flat for name in row))
            writer = csv.DictWriter(out, names)
            writer.writeheader()
            writer.writerows(flat)
    os.replace(temporary, path)


def _flat(row: dict[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {"key": row["key"], "job_id": row["job_id"], "state": row["state"]}
    for part in ("request", "value"):
        body = row[part]
        if isinstance(body, dict):
            for name, value in body.items():
                plain = value is None or isinstance(value, (str, int, float, bool))
                flat[f"{part}.{name}"] = value if plain else json.dumps(value, separators=(",", ":"))
        elif body is not None:
            flat[part] = json.dumps(body, separators=(",", ":"))
    error = row.get("error")
    flat["error"] = f"{error.get('type')}: {error.get('message')}" if isinstance(error, dict) else ""
    return flat
