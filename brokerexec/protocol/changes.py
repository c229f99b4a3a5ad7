"""The sets and invokes applied to a job since its newest stored checkpoint, as they are kept
in the broker: carried by the job's lease and covered by its checkpoints
(``brokerexec.core.change_log`` keeps them on the computation's side; docs/durability.md).

Each entry is numbered (``seq``, counting on across attempts):
``{"seq", "kind": "set", "attrs", "time"}`` or ``{"seq", "kind": "invoke", "method", "time"}``
(an invoke's arguments are not kept: it is listed, never replayed; ``"count"`` on one that
stands for several older ones folded together). A checkpoint ``covers`` the entries applied
before it was taken.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["Change", "invokes_of", "seq_of", "sets_of", "uncovered"]

#: One entry (see the module docstring).
Change = dict[str, Any]


def uncovered(entries: Sequence[Change], covers: int) -> list[Change]:
    """The entries applied after a checkpoint that covers up to ``covers``."""
    return [entry for entry in entries if seq_of(entry) > covers]


def sets_of(entries: Iterable[Change]) -> dict[str, Any]:
    """Each attribute's newest value among the logged sets."""
    values: dict[str, Any] = {}
    for entry in entries:
        if entry.get("kind") == "set" and isinstance(entry.get("attrs"), dict):
            values.update(entry["attrs"])
    return values


def invokes_of(entries: Iterable[Change]) -> list[dict[str, Any]]:
    """The logged invokes, in order: ``{"method", "time"}`` each; ``{"method": None,
    "count": n, "time"}`` for ``n`` older ones folded together."""
    listed = []
    for entry in entries:
        if entry.get("kind") == "invoke":
            item = {"method": entry.get("method"), "time": entry.get("time")}
            if entry.get("count"):
                item["count"] = entry["count"]
            listed.append(item)
    return listed


def seq_of(entry: Change) -> int:
    """An entry's number (0 if it has none: taken as covered)."""
    seq = entry.get("seq")
    return seq if isinstance(seq, int) and not isinstance(seq, bool) else 0
