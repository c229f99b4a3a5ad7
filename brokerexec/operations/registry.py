"""The registry of an operation's items: each one's state, clocks, worker and error (valjean's Env).

Sans-I/O and thread-safe: one lock, every method atomic, :meth:`Registry.atomically` for a
read-modify-write of several. The news of jobs (their events, their records, their history
rows) come in through :meth:`Registry.observe`, which applies them to the item whose current
job they are of and ignores the rest: news of an older run of an item (it was re-run since),
of an older attempt, or that would take an ended item back. :meth:`Registry.status` is
pySPACE's ``check_status()``: counts by state, the fraction done, the throughput, an ETA, the
best improved value. :meth:`Registry.plan` says what a re-run or a resume does with each item
(valjean's ``merge_done_tasks``). Saved and loaded as JSON, never pickle.
"""

from __future__ import annotations

import enum
import json
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from ..errors import DecodeError, InvalidRequest
from .requests import check_key

__all__ = ["ENDED", "Item", "ItemState", "OperationStatus", "Plan", "Registry", "first_number_field",
           "read_json", "write_json"]

T = TypeVar("T")

#: The registry's format in :meth:`Registry.save` (refused if another).
FORMAT = 1
#: Throughput is counted over the items that ended in the last this many seconds.
THROUGHPUT_WINDOW = 60.0


class ItemState(str, enum.Enum):
    """Where an item is: its current job's state (as ``Job.status()`` says it), or skipped."""

    QUEUED = "queued"  # launched, or not launched yet
    RUNNING = "running"
    PAUSED = "paused"
    RESUMING = "resuming"  # its worker was lost: it resumes from its newest checkpoint
    FINISHED = "finished"
    FAILED = "failed"
    ABORTED = "aborted"
    SKIPPED = "skipped"  # finished in an earlier run of the operation: not run again

    @property
    def ended(self) -> bool:
        return self in ENDED


ENDED = frozenset({ItemState.FINISHED, ItemState.FAILED, ItemState.ABORTED, ItemState.SKIPPED})
#: The states a job's news may bring (``skipped`` is the registry's own).
_OBSERVED = {state.value: state for state in ItemState if state is not ItemState.SKIPPED}
_OBSERVED["created"] = ItemState.QUEUED  # a job's state machine starts there


@dataclass(frozen=True)
class Item:
    """One item of an operation, as the registry holds it (a copy: the registry changes its own)."""

    key: str
    request: dict[str, Any] | None = None  # None when not held (known by its key and job only)
    job_id: str | None = None  # its current job: the newest launched for it (None: not launched)
    state: ItemState = ItemState.QUEUED
    runs: int = 0  # jobs launched for it: a re-run launches another
    attempt: int = 0  # the execution of its current job last heard of (a resume is another)
    started: float | None = None  # its current job's first start
    ended: float | None = None
    worker: str | None = None  # the host it ran on last
    error: str | None = None  # "Type: message"
    checkpoint: float | None = None  # when its current job's newest checkpoint was taken
    improved: dict[str, Any] | None = None  # the best its current job found so far

    @property
    def run_time(self) -> float | None:
        if self.started is None or self.ended is None:
            return None
        return max(self.ended - self.started, 0.0)

    def encode(self) -> dict[str, Any]:
        body = asdict(self)
        body["state"] = self.state.value
        return body

    @classmethod
    def decode(cls, body: object) -> Item:
        """Raises: DecodeError: not an item as :meth:`encode` writes one."""
        if not isinstance(body, dict) or not isinstance(body.get("key"), str):
            raise DecodeError(f"not an operation item: {body!r:.200}")
        try:
            known = {name: value for name, value in body.items() if name in _ITEM_FIELDS}
            return cls(**{**known, "state": ItemState(body.get("state", "queued"))})
        except (TypeError, ValueError) as exc:
            raise DecodeError(f"not an operation item ({exc}): {body!r:.200}") from None


_ITEM_FIELDS = frozenset(Item.__dataclass_fields__)


@dataclass(frozen=True)
class OperationStatus:
    """How an operation stands (pySPACE's ``check_status()``)."""

    total: int
    counts: dict[str, int]  # every state, 0 included
    done: int  # items ended: finished, failed, aborted or skipped
    fraction: float  # done / total (1.0 for no items)
    throughput: float | None  # items ended a second, over the last THROUGHPUT_WINDOW s
    eta: float | None  # seconds until every item has ended, at that throughput
    best: Item | None = None  # the item whose improved value is best, when asked

    def encode(self) -> dict[str, Any]:
        body = asdict(self)
        body["best"] = self.best.encode() if self.best is not None else None
        return body


@dataclass(frozen=True)
class Plan:
    """What running an operation again does with each item (by key), and why."""

    skip: list[str] = field(default_factory=list)  # finished (or skipped): kept as they are
    resume: list[str] = field(default_factory=list)  # interrupted with a checkpoint: from it
    rerun: list[str] = field(default_factory=list)  # failed, aborted, or interrupted without one
    launch: list[str] = field(default_factory=list)  # never launched
    in_flight: list[str] = field(default_factory=list)  # queued, running, paused or resuming
    #: The operation it is of (a plan of a sweep submitted again: the one it would resume).
    operation: str | None = None

    def encode(self) -> dict[str, Any]:
        return asdict(self)

    def counts(self) -> dict[str, int]:
        """How many items each part holds."""
        return {part: len(getattr(self, part)) for part in ("skip", "resume", "rerun", "launch", "in_flight")}


def _changes(item: Item, state: ItemState, at: float | None, attempt: int | None, error: str | None,
             checkpoint: float | None, latest: dict[str, Any]) -> dict[str, Any]:
    """What a job's news changes of its item (see :meth:`Registry.observe`)."""
    if state is ItemState.QUEUED:
        state = item.state  # news older than what was heard: a job goes back to no queue
    changes: dict[str, Any] = {name: value for name, value in latest.items()
                               if value is not None and value != getattr(item, name)}
    if attempt is not None and attempt > item.attempt:
        changes["attempt"] = attempt
    if state is not item.state:
        changes["state"] = state
    if state not in (ItemState.QUEUED, ItemState.RESUMING) and item.started is None:
        changes["started"] = at
    if state.ended:
        changes["ended"] = at
        if error is not None:
            changes["error"] = error
    if checkpoint is not None and (item.checkpoint is None or checkpoint > item.checkpoint):
        changes["checkpoint"] = checkpoint
    return changes


class Registry:
    """See the module docstring. Items keep the order they were added in."""

    def __init__(self, items: Iterable[Item] = ()) -> None:
        self._lock = threading.RLock()
        self._items: dict[str, Item] = {}
        self._keys_by_job: dict[str, str] = {}
        self._ends: deque[float] = deque()  # when items ended, for the throughput (monotonic)
        for item in items:
            self._put(item)

    # ---- the items -------------------------------------------------------------------------

    def atomically(self, action: Callable[[Registry], T]) -> T:
        """``action(self)`` with the registry's lock held: a read-modify-write no other
        thread sees half done (its methods are atomic each, not together)."""
        with self._lock:
            return action(self)

    def add(self, key: str, request: dict[str, Any] | None = None) -> Item:
        """A new item, queued and not launched yet.

        Raises:
            InvalidRequest: a bad key, or one the operation holds already.
        """
        with self._lock:
            if check_key(key) in self._items:
                raise InvalidRequest(f"the operation holds an item of key {key!r} already")
            return self._put(Item(key, request))

    def launched(self, key: str, job_id: str) -> Item:
        """``key``'s item is run by a new job, ``job_id``: its first run or a re-run. What
        its earlier job did is left behind (and news of it ignored from now on).

        Raises:
            InvalidRequest: no item of that key.
        """
        with self._lock:
            item = self._get(key)
            if item.job_id is not None:
                self._keys_by_job.pop(item.job_id, None)
            return self._put(Item(key, item.request, job_id, runs=item.runs + 1))

    def renew(self, key: str, request: dict[str, Any]) -> Item:
        """``key``'s item runs ``request`` from its next launch (its key's request, given
        again: the caller's own key may name a new one).

        Raises:
            InvalidRequest: no item of that key.
        """
        with self._lock:
            return self._put(replace(self._get(key), request=request))

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._items

    def observe(self, job_id: str, state: str, *, at: float | None = None, attempt: int | None = None,
                worker: str | None = None, error: str | None = None, checkpoint: float | None = None,
                improved: dict[str, Any] | None = None) -> Item | None:
        """A job's news: its ``state`` (a job state, as events, records and history rows name
        them) at ``at`` (epoch seconds), and what else it says. Applied to the item whose
        current job it is; returns the item after, or None if it changed nothing.

        Ignored: a job of no item, or of an older run of one; an older ``attempt`` than the
        newest heard of; anything after the item ended (a job's first record counts), and an
        unknown state.
        """
        new_state = _OBSERVED.get(state)
        with self._lock:
            key = self._keys_by_job.get(job_id)
            if key is None or new_state is None:
                return None
            item = self._items[key]
            if item.state.ended or (attempt is not None and attempt < item.attempt):
                return None
            changes = _changes(item, new_state, at, attempt, error, checkpoint,
                               {"worker": worker, "improved": improved})
            if not changes:
                return None
            if changes.get("state", item.state).ended:
                self._ends.append(time.monotonic())
            return self._put(replace(item, **changes))

    def cancel(self, key: str) -> Item:
        """``key``'s item, never launched, will not be: aborted with its operation."""
        with self._lock:
            item = self._get(key)
            if item.job_id is not None or item.state.ended:
                return item
            return self._put(replace(item, state=ItemState.ABORTED, ended=time.time()))

    def skip(self, key: str) -> Item:
        """``key``'s item is not run: it finished in an earlier run (a resume). Not counted
        in the throughput: a resume skips thousands at once."""
        with self._lock:
            return self._put(replace(self._get(key), state=ItemState.SKIPPED))

    def item(self, key: str) -> Item:
        """Raises: InvalidRequest: no item of that key."""
        with self._lock:
            return self._get(key)

    def key_of(self, job_id: str) -> str | None:
        """The key of the item ``job_id`` is the current job of, if any."""
        with self._lock:
            return self._keys_by_job.get(job_id)

    def items(self, state: ItemState | str | None = None) -> list[Item]:
        """The items (in one state, if given), in the order they were added."""
        wanted = ItemState(state) if state is not None else None
        with self._lock:
            return [item for item in self._items.values() if wanted is None or item.state is wanted]

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Item]:
        return iter(self.items())

    # ---- how it stands ---------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """How many items are in each state (every state, 0 included)."""
        with self._lock:
            counts = dict.fromkeys((state.value for state in ItemState), 0)
            for item in self._items.values():
                counts[item.state.value] += 1
            return counts

    def status(self, best: str | None = None, lowest: bool = False) -> OperationStatus:
        """Counts, the fraction done, the throughput over the last minute, an ETA; and with
        ``best`` (a field of the improved values), the item whose value of it is the highest
        (``lowest``: the lowest), of those that have one that is a number."""
        with self._lock:
            counts = self.counts()
            total = len(self._items)
            done = sum(counts[state.value] for state in ENDED)
            now = time.monotonic()
            while self._ends and self._ends[0] < now - THROUGHPUT_WINDOW:
                self._ends.popleft()
            throughput = len(self._ends) / THROUGHPUT_WINDOW if self._ends else None
            eta = (total - done) / throughput if throughput else (0.0 if done == total else None)
            found = self._best(best, lowest) if best is not None else None
            fraction = done / total if total else 1.0
            return OperationStatus(total, counts, done, fraction, throughput, eta, found)

    def _best(self, name: str, lowest: bool) -> Item | None:
        scored = [(number, item) for item in self._items.values()
                  if (number := _number((item.improved or {}).get(name))) is not None]
        if not scored:
            return None
        pick = min if lowest else max
        return pick(scored, key=lambda pair: pair[0])[1]

    def plan(self) -> Plan:
        """What running the operation again does with each item: finished and skipped ones
        are kept; failed and aborted ones run again; interrupted ones (``resuming``) resume
        from their checkpoint, or run again without one; those never launched are launched;
        the others are still under way and left to go on."""
        plan = Plan()
        with self._lock:
            for item in self._items.values():
                if item.state in (ItemState.FINISHED, ItemState.SKIPPED):
                    plan.skip.append(item.key)
                elif item.state in (ItemState.FAILED, ItemState.ABORTED):
                    plan.rerun.append(item.key)
                elif item.job_id is None:
                    plan.launch.append(item.key)
                elif item.state is ItemState.RESUMING:
                    (plan.resume if item.checkpoint is not None else plan.rerun).append(item.key)
                else:
                    plan.in_flight.append(item.key)
        return plan

    def merge_done(self, other: Registry) -> int:
        """Take from ``other`` (an earlier run's registry) every item it finished that this
        one holds too, as it was there (valjean's ``merge_done_tasks``); how many. The rest
        of this registry is left as it is: those items run."""
        finished = {item.key: item for item in other.items(ItemState.FINISHED)}
        with self._lock:
            taken = 0
            for key, item in finished.items():
                if key in self._items and self._items[key].state is not ItemState.FINISHED:
                    before = self._items[key]
                    if before.job_id is not None:
                        self._keys_by_job.pop(before.job_id, None)
                    self._put(replace(item, request=before.request if item.request is None else item.request))
                    taken += 1
            return taken

    # ---- JSON ------------------------------------------------------------------------------

    def encode(self) -> dict[str, Any]:
        return {"format": FORMAT, "items": [item.encode() for item in self.items()]}

    @classmethod
    def decode(cls, body: object) -> Registry:
        """Raises: DecodeError: not a registry as :meth:`encode` writes one."""
        items = body.get("items") if isinstance(body, dict) else None
        if not isinstance(body, dict) or body.get("format") != FORMAT or not isinstance(items, list):
            raise DecodeError(f"not an operation registry of format {FORMAT}")
        registry = cls()
        for item in items:
            decoded = Item.decode(item)
            if decoded.key in registry._items:
                raise DecodeError(f"the registry holds the key {decoded.key!r} twice")
            registry._put(decoded)
        return registry

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write it to ``path`` as JSON, whole or not at all (a new file moved in place)."""
        write_json(path, self.encode())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Registry:
        """Raises: DecodeError: the file is not a registry :meth:`save` wrote. OSError: it
        cannot be read."""
        return cls.decode(read_json(path))

    # ---- inside ----------------------------------------------------------------------------

    def _get(self, key: str) -> Item:
        item = self._items.get(key)
        if item is None:
            raise InvalidRequest(f"the operation holds no item of key {key!r}")
        return item

    def _put(self, item: Item) -> Item:
        self._items[item.key] = item
        if item.job_id is not None:
            self._keys_by_job[item.job_id] = item.key
        return item


def write_json(path: str | os.PathLike[str], body: Any) -> None:
    """``body`` as JSON in ``path``, whole or not at all (a new file moved in place)."""
    target = Path(path)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(body, ensure_ascii=False, allow_nan=False) + "\n")
    os.replace(temporary, target)


def read_json(path: str | os.PathLike[str]) -> Any:
    """What ``path`` holds as JSON.

    Raises:
        DecodeError: it is not JSON. OSError: it cannot be read.
    """
    try:
        return json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise DecodeError(f"{path}: not JSON ({exc})") from None


def first_number_field(improved: Iterable[Mapping[str, Any] | None]) -> str | None:
    """The first field that holds a number in these improved values: what an operation's
    best is of unless another is asked for (``op watch``, the web view's operation page)."""
    return next((str(name) for values in improved for name, value in (values or {}).items()
                 if _number(value) is not None), None)


def _number(value: Any) -> float | None:
    """``value`` if it is a number a best can be of: not a bool, not NaN."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
        return None
    return float(value)
