"""Acknowledged changes that survive a crash: the sets and invokes applied to a job since its
newest stored checkpoint.

A ``set`` or ``invoke`` is acknowledged (its sender told it was applied) at ``ready()``. If
the job's worker dies before the next checkpoint, the job resumes from the previous one, and
without this log a ``set`` its sender was told about would be silently undone. So, when the
job's checkpoints are stored (a worker's), every change applied at ``ready()`` is first made
durable, then acknowledged: the computation hands the whole log to the worker's ``note``
(over RabbitMQ: the job's lease is replaced by one that carries it, ``docs/durability.md``),
and waits for it.

Each entry is numbered (``seq``, counting on across attempts). A checkpoint says which entries
it ``covers`` (those applied before it was taken: the values of the service's declared
settable attributes are part of every checkpoint); once it is stored, they leave the log.
What a resumed job finds in the log is carried into its next execution: its sets are applied
again at its first ``ready()`` after ``restore()``, its invokes are *not* replayed but listed
(in its ``resumed`` event and its status), so no sender believes in an effect that was undone
without being told.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

from ..protocol.changes import Change, seq_of, uncovered

__all__ = ["MAX_INVOKES", "ChangeLog"]

#: The log keeps this many invokes at most (a client may invoke every second for hours
#: between checkpoints): older ones are folded into one entry that counts them.
MAX_INVOKES = 100


class ChangeLog:
    """The changes applied since the newest stored checkpoint, numbered (thread-safe).

    Parameters:
        carried: the log a resumed job brings from its previous execution: kept until a
            checkpoint of this one covers it, so a second crash does not lose it either.
        after: the newest entry its checkpoint covers: numbering goes on past both, so an
            entry of this execution is never taken for one that checkpoint covers.
    """

    def __init__(self, carried: Iterable[Change] = (), after: int = 0) -> None:
        self._lock = threading.Lock()
        self._entries: list[Change] = [dict(entry) for entry in carried]
        self._seq = max([after, *(seq_of(entry) for entry in self._entries)])

    @property
    def last(self) -> int:
        """The number of the newest entry (0: none yet): what a checkpoint taken now covers."""
        return self._seq

    def entries(self) -> list[Change]:
        with self._lock:
            return list(self._entries)

    def applied_set(self, attrs: dict[str, Any], time: float) -> list[Change]:
        """Log a set applied now; the log to make durable."""
        return self._add({"kind": "set", "attrs": dict(attrs), "time": time})

    def applied_invoke(self, method: str, time: float) -> list[Change]:
        """Log an invoke applied now; the log to make durable."""
        return self._add({"kind": "invoke", "method": method, "time": time})

    def _add(self, entry: Change) -> list[Change]:
        with self._lock:
            self._seq += 1
            if entry["kind"] == "set":
                # A set whose every attribute is set again later adds nothing: dropped.
                self._entries = [old for old in self._entries if old.get("kind") != "set"
                                 or not set(old.get("attrs") or {}) <= set(entry["attrs"])]
            self._entries.append({"seq": self._seq, **entry})
            if entry["kind"] == "invoke":
                self._fold_invokes()
            return list(self._entries)

    def _fold_invokes(self) -> None:
        invokes = [old for old in self._entries if old.get("kind") == "invoke"]
        if len(invokes) <= MAX_INVOKES:
            return
        oldest, second = invokes[0], invokes[1]
        count = int(oldest.get("count") or 1) + int(second.get("count") or 1)
        folded = {**second, "method": None, "count": count}  # the newer seq: still uncovered
        self._entries = [folded if old is second else old for old in self._entries if old is not oldest]

    def covered(self, seq: int) -> None:
        """A checkpoint that covers every entry up to ``seq`` is stored: they leave the log."""
        with self._lock:
            self._entries = uncovered(self._entries, seq)
