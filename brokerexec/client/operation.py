"""An operation: one service over many requests, launched, watched and consolidated as a whole.

:meth:`Client.operation` returns an :class:`Operation` at once; behind it, three things run
until every item has ended:

* a **launcher** thread takes the requests as they come (a list, an iterator, a grid: a
  100,000-item sweep is never held whole before it is launched), names each item by its key,
  and launches them in batches, holding at most ``max_in_flight`` unended;
* a **subscription** to the service's state and improved events, which moves the items in
  the registry (``operations/registry.py``) as their jobs run;
* a **collector** thread, which reads the final record of each job that ended and makes it
  the item's outcome (``operations/outcomes.py``). Events are best-effort, so it also asks,
  a few at a time, after the jobs it has heard nothing of for a while: no item waits forever
  on an event that was lost.

Its failure policy (``on_error``, ``max_failures``) aborts the rest when failures pass it.
Every method is thread-safe.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sized
from typing import Any

from ..errors import (
    WIRE_PREFIX,
    BrokerExecError,
    DecodeError,
    InvalidRequest,
    InvalidState,
    JobNotFound,
    Timeout,
)
from ..operations.outcomes import FailurePolicy, Outcome, consolidate, outcome_of
from ..operations.registry import (
    ENDED,
    Item,
    ItemState,
    OperationStatus,
    Plan,
    Registry,
    read_json,
    write_json,
)
from ..operations.requests import keyed_requests
from ..protocol.intents import Intent
from ..protocol.names import check_name, new_job_id
from ..protocol.operation_log import FoundOperation, OperationHeader
from .job import JobsClient as Client  # what it needs of a Client: its transport and subscribe()

__all__ = ["Operation"]

log = logging.getLogger(__name__)

#: Launches sent together (one confirm wait for all of them).
LAUNCH_BATCH = 200
#: Seconds without news of an unended job before the collector asks after it.
QUIET = 5.0
#: Seconds without news of a job never heard to start before the collector asks after it.
QUIET_QUEUED = 60.0
#: Jobs asked after per round of the collector (one look-up each).
ASKED_PER_ROUND = 20
#: The format of :meth:`Operation.save`.
FORMAT = 1


class Operation:
    """A handle on an operation (see the module docstring); made by :meth:`Client.operation`,
    or :meth:`load`-ed from a file :meth:`save` wrote."""

    def __init__(self, client: Client | None, service: str, *, operation_id: str | None = None,
                 name: str | None = None, policy: FailurePolicy | None = None,
                 max_in_flight: int | None = None, registry: Registry | None = None,
                 outcomes: Iterable[Outcome] = (), created: float | None = None,
                 settings: Mapping[str, Any] | None = None) -> None:
        if max_in_flight is not None and (isinstance(max_in_flight, bool)
                                          or not isinstance(max_in_flight, int) or max_in_flight < 1):
            raise InvalidRequest(f"max_in_flight is a whole number of jobs, 1 or more; not {max_in_flight!r}")
        self.client = client
        self.service = check_name("service name", service)
        # Made as a job id is: it starts with when it was made, where a reader of the journal
        # starts to find it again (protocol/operation_log.py).
        self.id = check_name("operation id", operation_id or new_job_id())
        self.name = name or f"{service} sweep"
        self.policy = policy or FailurePolicy()
        self.max_in_flight = max_in_flight
        #: Its jobs' handler intervals (``progress_delta``, ``checkpoint_delta``, ``improved_delta``).
        self.settings: dict[str, Any] = dict(settings or {})
        self.expected: int | None = None  # how many requests, when they could be counted first
        self.created = created if created is not None else time.time()
        self.registry = registry or Registry()
        self._cond = threading.Condition()
        self._outcomes: dict[str, Outcome] = {}
        self._ended_order: list[str] = []  # keys, in the order their outcomes came
        self._keys: list[str] = [item.key for item in self.registry.items()]  # request order
        self._failed = 0  # outcomes that are failures
        for outcome in outcomes:
            self._take(outcome)
        self._launching = False
        self._paused = False
        self._stopped: str | None = None  # why it stopped launching early (abort, policy)
        # When launching last began (a start, a resubmission, add(), rerun()): a control of
        # this operation sent before then, from here or elsewhere, does not steer it.
        self._launch_began = 0.0
        self._controls_heard = False
        self._error: BaseException | None = None  # what ended the launcher
        # The jobs launched whose outcome has not come, and when their news came last (monotonic).
        self._pending: dict[str, float] = {}
        self._ended_jobs: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._subscriptions: list[Any] = []
        self._threads: list[threading.Thread] = []
        self._rest: Iterator[tuple[str, dict[str, Any]]] | None = None  # requests not taken yet
        self._more: list[Iterator[tuple[str, dict[str, Any]]]] = []  # add()'s, while launching
        self._again: set[str] | None = None  # submitted again: the keys of that submission so far
        self._closed = False

    def __repr__(self) -> str:
        return f"Operation({self.id!r}, service={self.service!r}, items={len(self.registry)})"

    # ---- launching ---------------------------------------------------------------------------

    def _start(self, requests: Iterable[Any]) -> None:
        """Watch, launch the first batch here (an unknown service or a bad request raises
        at once), and the rest in the background."""
        self._counted(requests)
        self._watch()
        self._hear_controls()
        self._launching, self._launch_began = True, time.time()
        self._launch_from(keyed_requests(self.service, requests), note=True)

    def _resubmit(self, requests: Iterable[Any]) -> None:
        """The same sweep submitted again (``client.operation`` with this operation's name):
        a resume. Each request's item, by its key, is skipped if it finished, left to go on
        if it is under way (one interrupted resumes from its newest checkpoint on whichever
        worker takes it), launched again if it failed or was aborted, and launched if new."""
        self._counted(requests)
        with self._cond:
            self._again, self._stopped, self._error, self._launching = set(), None, None, True
            self._launch_began = time.time()
        self._hear_controls()
        self._launch_from(keyed_requests(self.service, requests), note=False)

    def _counted(self, requests: Iterable[Any]) -> None:
        """Count ``requests`` if they can be counted first (an empty list is refused)."""
        if isinstance(requests, Sized):
            if not len(requests):
                raise InvalidRequest(f"an operation of {self.service!r} needs a request at least: none given")
            self.expected = max(self.expected or 0, len(requests))

    def _launch_from(self, items: Iterator[tuple[str, dict[str, Any]]], note: bool) -> None:
        """The first batch here (what is wrong with it raises, and closes the operation),
        with the header first if ``note``; the rest on the launcher thread."""
        try:
            first = list(itertools.islice(items, self._room()))
            if not first:
                raise InvalidRequest(f"an operation of {self.service!r} needs a request at least: none came")
            if note:
                self._client().transport.note_operation(self.header())  # where another client finds it
            self._launch(first)
        except BaseException:
            self._launching = False
            self.close()
            raise
        self._spawn(self._launch_rest, items, name="launcher")

    def plan_of(self, requests: Iterable[Any]) -> Plan:
        """What submitting ``requests`` again (``client.operation`` with this operation's
        name) would do with each item, by key: skip it (finished), leave it to resume
        (interrupted: from its newest checkpoint) or to go on (under way), run it again
        (failed, aborted) or launch it (new). Launches nothing.

        Raises:
            InvalidRequest: a request is not a JSON object, or two share a key.
        """
        plan = Plan(operation=self.id)
        seen: set[str] = set()
        for key, _ in keyed_requests(self.service, requests):
            if key in seen:
                raise InvalidRequest(f"two requests of key {key!r}")
            seen.add(key)
            if key not in self.registry:
                plan.launch.append(key)
                continue
            item = self.registry.item(key)
            action = _again_action(item)
            if action == "rerun":
                plan.rerun.append(key)
            elif action == "skip":
                plan.skip.append(key)
            else:
                (plan.resume if item.state is ItemState.RESUMING else plan.in_flight).append(key)
        return plan

    def _room(self) -> int:
        """How many items may be launched now."""
        if self.max_in_flight is None:
            return LAUNCH_BATCH
        return max(min(LAUNCH_BATCH, self.max_in_flight - len(self._pending)), 0)

    def _launch_rest(self, items: Iterator[tuple[str, dict[str, Any]]]) -> None:
        try:
            while True:
                with self._cond:
                    while not self._closed and self._stopped is None and (self._paused or self._room() == 0):
                        self._cond.wait(1.0)
                    if self._closed or self._stopped is not None:
                        break
                batch = list(itertools.islice(items, self._room()))
                if not batch:
                    with self._cond:
                        if not self._more:
                            break
                        items = self._more.pop(0)  # what add() gave meanwhile
                    continue
                self._launch(batch)
        except BaseException as exc:  # a bad request or key further on, the broker gone
            log.warning("operation %s stopped launching: %s", self.id, exc)
            with self._cond:
                self._error = exc
                self._stopped = self._stopped or f"launching failed: {exc}"
        finally:
            with self._cond:
                self._launching = False
                self._rest = itertools.chain(items, *self._more)  # what a re-run launches after its items
                self._more = []
                if self._stopped is not None:
                    for item in self.registry.items(ItemState.QUEUED):
                        if item.job_id is None:
                            self.registry.cancel(item.key)
                self._cond.notify_all()

    def _launch(self, batch: list[tuple[str, dict[str, Any]]]) -> None:
        from ..protocol.messages import Launch

        assert self.client is not None
        launches = []
        with self._cond:
            for key, request in batch:
                if self._again is not None and key in self.registry:
                    if key in self._again:
                        raise InvalidRequest(f"the operation holds an item of key {key!r} already")
                    self._again.add(key)
                    if _again_action(self.registry.item(key)) != "rerun":
                        if self.registry.item(key).state is ItemState.FINISHED:
                            self.registry.skip(key)  # finished before: kept, not run again
                        continue
                    self.registry.renew(key, request)
                else:
                    self.registry.add(key, request)
                    self._keys.append(key)
                    if self._again is not None:
                        self._again.add(key)
                launches.append(Launch.new(self.service, request, operation=self.id, key=key,
                                             settings=self.settings))
            for launch in launches:  # known before their first event can come
                assert launch.key is not None
                self.registry.launched(launch.key, launch.job_id)
                self._pending[launch.job_id] = time.monotonic()
        self._send(launches)

    def _send(self, launches: list[Any]) -> None:
        """Launch them (registered as launched, and pending, first)."""
        if not launches:
            return
        try:
            self._client().transport.launch(launches)
        except BaseException as exc:
            # Not confirmed: they failed here (a re-run launches them again). One the broker
            # took after all keeps this outcome, and its job runs unwatched.
            error = {"type": type(exc).__name__, "message": f"not launched: {exc}", "traceback": ""}
            for launch in launches:
                self._not_launched(launch.key or "", launch.job_id, error)
            raise

    def _not_launched(self, key: str, job_id: str, error: dict[str, str]) -> None:
        self.registry.observe(job_id, "failed", at=time.time(), error=f"{error['type']}: {error['message']}")
        with self._cond:
            self._pending.pop(job_id, None)
            self._take(Outcome(key, self.registry.item(key).request, job_id, "failed", error=error))
            self._cond.notify_all()

    # ---- watching ----------------------------------------------------------------------------

    def _watch(self) -> None:
        assert self.client is not None
        self._subscriptions.append(self.client.subscribe(
            [f"state.{self.service}.*", f"improved.{self.service}.*"], self._on_event))
        self._spawn(self._collect, name="collector")

    def _hear_controls(self) -> None:
        """From its first launch on: its pause, resume and abort sent by any client
        (``brokerexec op abort``, the web view) steer its launching too, not only the jobs
        launched so far. A client that only watches (a watcher may not read them) never asks."""
        with self._cond:
            if self._controls_heard:
                return
            self._controls_heard = True
        self._subscriptions.append(self._client().transport.subscribe_controls(self._on_control))

    def _on_control(self, control: Any) -> None:
        """A control message (any client's, this one's own too): one of this operation's,
        sent since launching last began, pauses, resumes or stops the launching."""
        if control.operation != self.id or control.job_id not in (None, self.id):
            return
        with self._cond:
            if control.sent is not None and control.sent < self._launch_began:
                return  # sent before this launching began: a re-run after an abort goes on
            if control.intent is Intent.PAUSE:
                self._paused = True
            elif control.intent is Intent.RESUME:
                self._paused = False
            elif control.intent is Intent.ABORT and self._stopped is None:
                self._stopped = "aborted"
                if self._launching:
                    log.info("operation %s aborted: launching no more", self.id)
            self._cond.notify_all()

    def _spawn(self, target: Callable[..., None], *args: Any, name: str) -> None:
        thread = threading.Thread(target=target, args=args, name=f"operation-{self.id[:8]}-{name}",
                                  daemon=True)
        self._threads.append(thread)
        thread.start()

    def _on_event(self, event: Any) -> None:
        key = self.registry.key_of(event.job_id)
        if key is None:
            return
        with self._cond:
            if event.job_id in self._pending:
                self._pending[event.job_id] = time.monotonic()
        if event.kind == "improved":
            state = self.registry.item(key).state
            if not state.ended:
                self.registry.observe(event.job_id, state.value, attempt=event.attempt,
                                      improved=event.data.get("state"))
            return
        to = event.data.get("to")
        if not isinstance(to, str):
            return
        if to in ("finished", "failed", "aborted"):
            self._ended_jobs.put(event.job_id)  # its record makes the outcome
        else:
            self.registry.observe(event.job_id, to, at=event.time, attempt=event.attempt)
        with self._cond:
            self._cond.notify_all()

    def _collect(self) -> None:
        while not self._closed:
            try:
                job_id = self._ended_jobs.get(timeout=1.0)
            except queue.Empty:
                self._ask_after_quiet_jobs()
                continue
            if job_id is None:
                return
            self._fetch(job_id, timeout=30.0)

    def _fetch(self, job_id: str, timeout: float) -> None:
        assert self.client is not None
        key = self.registry.key_of(job_id)
        if key is None:
            return
        try:
            record = self.client.transport.fetch_result(job_id, timeout)
        except JobNotFound:
            return  # not in the journal yet: asked again later
        except BrokerExecError as exc:
            log.warning("operation %s: the record of %s could not be read (%s)", self.id, job_id, exc)
            return
        if record is not None:
            self._ended(key, record)

    def _ask_after_quiet_jobs(self) -> None:
        """The jobs heard nothing of for :data:`QUIET` s (:data:`QUIET_QUEUED` s for those
        never heard to start: a big sweep waits long in its queue), a few at a time, longest
        quiet first. Each question may read the job's journal stream."""
        now = time.monotonic()
        asked: list[str] = []
        with self._cond:
            quiet = sorted((heard, job_id) for job_id, heard in self._pending.items() if now - heard > QUIET)
            for heard, job_id in quiet:
                key = self.registry.key_of(job_id)
                queued = key is not None and self.registry.item(key).state is ItemState.QUEUED
                if queued and now - heard < QUIET_QUEUED:
                    continue
                self._pending[job_id] = now
                asked.append(job_id)
                if len(asked) == ASKED_PER_ROUND:
                    break
        for job_id in asked:
            self._fetch(job_id, timeout=0)

    def _ended(self, key: str, record: dict[str, Any]) -> None:
        job_id = str(record.get("job_id", ""))
        item = self.registry.item(key)
        if item.job_id != job_id:
            return  # an earlier run of the item (re-run since)
        error = record.get("error")
        worker = record.get("worker") or {}
        attempt = record.get("attempt")
        if record.get("start"):  # when it started, if no event said so
            self.registry.observe(job_id, "running", at=record["start"], attempt=attempt)
        host = worker.get("hostname") if isinstance(worker, dict) else None
        said = f"{error.get('type')}: {error.get('message')}" if isinstance(error, dict) else None
        self.registry.observe(job_id, str(record.get("state")), at=record.get("end") or time.time(),
                              attempt=attempt, worker=host, error=said, improved=record.get("improved"))
        outcome = outcome_of(key, item.request, record)
        with self._cond:
            self._pending.pop(job_id, None)
            if not self._take(outcome):
                return
            stops = self._policy_stops()  # before the launcher, woken, fills the slot freed
            self._cond.notify_all()
        if stops:
            log.warning("operation %s: %s: aborting the rest", self.id, self._stopped)
            threading.Thread(target=self._abort_unended, name=f"operation-{self.id[:8]}-abort",
                             daemon=True).start()

    def _take(self, outcome: Outcome) -> bool:
        """Keep an outcome (its item's latest); False if it was kept already."""
        before = self._outcomes.get(outcome.key)
        if before is not None and before.job_id == outcome.job_id:
            return False
        if before is not None:  # an earlier run's, re-run since
            self._ended_order.remove(outcome.key)
            self._failed -= before.state == "failed"
        self._outcomes[outcome.key] = outcome
        self._ended_order.append(outcome.key)
        self._failed += outcome.state == "failed"
        return True

    def _policy_stops(self) -> bool:
        """Whether the failures now stop the operation (lock held); says why in ``stopped``."""
        if self._stopped is not None or not self.policy.stops(self._failed, self._total()):
            return False
        self._stopped = (f"{self._failed} item(s) failed (on_error={self.policy.on_error}, "
                         f"max_failures={self.policy.max_failures})")
        return True

    def _total(self) -> int:
        """How many items it has: all its requests when they could be counted first."""
        return max(len(self.registry), self.expected or 0)

    # ---- how it stands -----------------------------------------------------------------------

    @property
    def done(self) -> bool:
        """Every item launched has ended, and no more will be launched."""
        with self._cond:
            return not self._launching and not self._pending

    @property
    def launching(self) -> bool:
        """Requests are still being taken and launched."""
        return self._launching

    @property
    def launch_error(self) -> BaseException | None:
        """What stopped the launching early (a bad request further on, the broker gone)."""
        return self._error

    def wait_launched(self, timeout: float | None = None) -> bool:
        """Wait until every request was taken and launched (or the launching stopped); False
        if it goes on after ``timeout`` s."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._launching, timeout)

    @property
    def stopped(self) -> str | None:
        """Why it stopped early (aborted, or its failure policy), or None."""
        return self._stopped

    def status(self, best: str | None = None, lowest: bool = False) -> OperationStatus:
        """Counts by state, the fraction done, throughput, an ETA; ``best``: the item whose
        improved value of that field is the highest (``lowest``: lowest) so far. Requests not
        taken yet count as queued items, or as aborted ones once it stopped launching early."""
        status = self.registry.status(best, lowest)
        with self._cond:
            missing = self._total() - status.total
            gone = self._stopped is not None and not self._launching
        if missing <= 0:
            return status
        counts = dict(status.counts)
        counts["aborted" if gone else "queued"] += missing
        total = status.total + missing
        done = status.done + (missing if gone else 0)
        eta = (total - done) / status.throughput if status.throughput else status.eta if done < total else 0.0
        return dataclasses.replace(status, total=total, counts=counts, done=done, fraction=done / total,
                                   eta=eta)

    def items(self, state: ItemState | str | None = None, *, offset: int = 0,
              limit: int | None = None) -> list[Item]:
        """A page of the item table (in one state, if given), in the order of the requests."""
        chosen = self.registry.items(state)
        return chosen[offset:None if limit is None else offset + limit]

    def results(self, ordered: bool = False, errors: str = "collect", *, start: int = 0,
                timeout: float | None = None) -> Iterator[Outcome]:
        """Each item's :class:`Outcome` as it ends (``ordered``: in the order of the
        requests, each waited for in turn). ``errors="raise"`` raises a failed item's error
        (typed, as ``Job.result``) when it comes. ``start``: skip that many (a reader that
        stopped after ``start`` outcomes goes on from there). ``timeout``: seconds without a
        new outcome before ``Timeout``.

        Raises:
            Timeout: nothing new came within ``timeout``.
            InvalidRequest: ``errors`` is neither "collect" nor "raise".
        """
        if errors not in ("collect", "raise"):
            raise InvalidRequest(f'errors is "collect" or "raise", not {errors!r}')
        index = start
        while True:
            with self._cond:
                outcome = self._next(index, ordered, timeout)
            if outcome is None:
                return
            index += 1
            if errors == "raise" and outcome.state == "failed":
                outcome.result()
            yield outcome

    def _next(self, index: int, ordered: bool, timeout: float | None) -> Outcome | None:
        """The outcome at ``index`` (lock held), waiting for it; None past the last."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if ordered:
                if index < len(self._keys):
                    item = self.registry.item(self._keys[index])
                    found = self._outcomes.get(item.key)
                    if found is not None and found.job_id == item.job_id:
                        return found
                    if item.state.ended and item.job_id is None:  # cancelled: never launched
                        return Outcome(item.key, item.request, "", "aborted")
                elif not self._launching:
                    return None
            elif index < len(self._ended_order):
                return self._outcomes[self._ended_order[index]]
            elif not self._launching and not self._pending:
                return None
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise Timeout(f"operation {self.id}: no new outcome within {timeout} s")
            self._cond.wait(1.0 if remaining is None else min(remaining, 1.0))

    def wait(self, timeout: float | None = None) -> OperationStatus:
        """Wait until every item has ended; return the status then.

        Raises:
            Timeout: not all ended within ``timeout`` s.
            BrokerExecError: what stopped the launcher (a bad request further on, say).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._launching or self._pending:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    counts = {state: n for state, n in self.registry.counts().items() if n}
                    raise Timeout(f"operation {self.id} did not end within {timeout} s: {counts}")
                self._cond.wait(1.0 if remaining is None else min(remaining, 1.0))
            if self._error is not None:
                raise self._error
        return self.status()

    def invalid(self) -> list[Item]:
        """The items whose current job was refused by its service's declared inputs (failed
        as ``InvalidRequest``, the error naming each missing, unknown or mistyped input):
        after a re-run of an operation whose service changed its inputs, those that no
        longer validate. Their requests are kept, to be fixed and launched anew."""
        refused = f"{WIRE_PREFIX}{InvalidRequest.__name__}:"
        return [item for item in self.registry.items(ItemState.FAILED)
                if (item.error or "").startswith(refused)]

    def outcomes(self) -> list[Outcome]:
        """The outcomes so far, in the order they came."""
        with self._cond:
            return [self._outcomes[key] for key in self._ended_order]

    def consolidate(self, how: str | Callable[[list[Outcome]], Any],
                    path: str | os.PathLike[str] | None = None) -> Any:
        """One answer of every outcome so far, successes and failures alike
        (``operations/outcomes.py``: a function of the outcomes, or "collect" (to JSON lines
        or CSV at ``path``), "stats", "best:<field>" or "best:-<field>"). Reads what is kept:
        never runs an item again. Call after :meth:`wait` for the whole."""
        return consolidate(self.outcomes(), how, path=path)

    # ---- steering ----------------------------------------------------------------------------

    def _unended_jobs(self) -> list[str]:
        return [item.job_id for item in self.registry.items()
                if item.job_id is not None and item.state not in ENDED]

    def _control(self, intent: Intent, **attrs: Any) -> int:
        """One control message to every worker, for every job of this operation (running,
        queued, or resuming elsewhere: workers filter by operation, ``protocol/messages.py``
        ``Control``); how many of its items were not ended when it was sent."""
        from ..protocol.messages import Control

        control = Control(intent, self.service, time.time(), operation=self.id, attrs=attrs or None)
        self._client().transport.control(control)
        return len(self._unended_jobs())

    def pause(self) -> int:
        """Hold every item at its next ``ready()`` (one queued starts paused), and launch no
        more until :meth:`resume`; how many items were not ended then. One message for the
        whole operation, whatever its size."""
        with self._cond:
            self._paused = True
        return self._control(Intent.PAUSE)

    def resume(self) -> int:
        """Let paused items go on, and launching too; how many items were not ended then."""
        with self._cond:
            self._paused = False
            self._cond.notify_all()
        return self._control(Intent.RESUME)

    def abort(self) -> int:
        """Launch no more, and abort every item not ended: running ones at their next
        ``ready()``, queued ones never start (the worker that takes one from the queue
        records it aborted). How many items were not ended then."""
        with self._cond:
            if self._stopped is None:
                self._stopped = "aborted"
            self._cond.notify_all()
        return self._abort_unended()

    def _abort_unended(self) -> int:
        with self._cond:  # a batch being launched goes first: its jobs are aborted too
            while self._launching and not self._closed:
                self._cond.wait(1.0)
        return self._control(Intent.ABORT)

    def set(self, attrs: dict[str, Any] | None = None, /, **more: Any) -> int:
        """Set declared attributes of every item not ended (``op.set(step=2)``): running
        ones at their next ``ready()``, queued and resuming ones when they start. One
        message for the whole operation; a value an item's service refuses is logged by its
        worker and leaves the item as it was. How many items were not ended then.

        Raises:
            InvalidRequest: no attribute given.
        """
        attrs = {**(attrs or {}), **more}
        if not attrs:
            raise InvalidRequest("op.set() needs an attribute to set: op.set(name=value)")
        return self._control(Intent.SET, **attrs)

    def add(self, requests: Iterable[Any]) -> None:
        """More requests for this operation, launched after those it has (as
        :meth:`Client.operation` takes them)."""
        items = keyed_requests(self.service, requests)
        with self._cond:
            if self._closed:
                raise InvalidState(f"operation {self.id} is closed")
            if self.expected is not None:
                self.expected = self.expected + len(requests) if isinstance(requests, Sized) else None
            if self._launching:
                self._more.append(items)
                return
            self._launching, self._launch_began = True, time.time()
            self._stopped = None
        self._hear_controls()
        self._spawn(self._launch_rest, items, name="launcher")

    def plan(self) -> Plan:
        """What a re-run would do with each item (by key): keep it (finished), resume it
        (lost, with a checkpoint), run it again, launch it, or leave it under way."""
        return self.registry.plan()

    def rerun(self) -> int:
        """Launch again every item that failed, was aborted, or was lost without a
        checkpoint; keep every finished one (valjean's ``merge_done_tasks``); then go on
        launching the requests it stopped before taking (an abort, its failure policy, a
        broker that refused a launch). Returns how many held items were launched again.

        Raises:
            InvalidState: it is still launching, or an item to re-run has no request kept.
        """
        self._client()  # raises without one
        with self._cond:
            if self._closed:
                raise InvalidState(f"operation {self.id} is closed")
            if self._launching:
                raise InvalidState(f"operation {self.id} is still launching: wait, or abort it, first")
            plan = self.registry.plan()
            keys = plan.rerun + plan.launch
            items = [self.registry.item(key) for key in keys]
            if any(item.request is None for item in items):
                raise InvalidState(f"operation {self.id} does not hold the requests of every item to re-run")
            self._stopped = None
            self._error = None
            self._launch_began = time.time()
        from ..protocol.messages import Launch

        if items and not self._subscriptions:
            self._watch()
        if items or self._rest is not None:
            self._hear_controls()
        for start in range(0, len(items), LAUNCH_BATCH):
            chunk = items[start:start + LAUNCH_BATCH]
            launches = [Launch.new(self.service, item.request, operation=self.id, key=item.key,
                                   settings=self.settings) for item in chunk]
            with self._cond:
                for item, launch in zip(chunk, launches, strict=True):
                    self.registry.launched(item.key, launch.job_id)
                    self._pending[launch.job_id] = time.monotonic()
            self._send(launches)
        with self._cond:
            rest, self._rest = self._rest, None
            if rest is not None:
                self._launching = True
        if rest is not None:
            self._spawn(self._launch_rest, rest, name="launcher")
        return len(items)

    def _client(self) -> Client:
        if self.client is None:
            raise InvalidState(f"operation {self.id} was loaded from a file without a client: "
                               f"Operation.load(path, client) to steer it")
        return self.client

    def header(self) -> OperationHeader:
        """What the journal keeps of it besides its items (``protocol/operation_log.py``)."""
        return OperationHeader(self.id, self.service, self.name, self.created, self.policy.encode(),
                               self.max_in_flight, self.expected, self.settings)

    @classmethod
    def _found(cls, client: Client, operation_id: str, found: FoundOperation,
               ended_meanwhile: Iterable[str] = ()) -> Operation:
        """The operation as the journal has it (``client.operation_of``), watched from now on;
        ``ended_meanwhile``: jobs heard to end while the journal was read (their records may
        have come after the reader passed)."""
        header = found.header
        items = found.ordered()
        if header is None and not items:
            raise JobNotFound(f"no operation {operation_id} in the journal (never made, or made "
                              f"longer ago than the journal keeps entries)")
        service = header.service if header is not None else _service_of(found)
        operation = cls(client, service, operation_id=operation_id,
                        name=header.name if header is not None else None,
                        policy=FailurePolicy.decode(header.policy if header is not None else {}),
                        max_in_flight=header.max_in_flight if header is not None else None,
                        registry=Registry(Item(item.key, item.request, item.job_id, runs=item.runs)
                                          for item in items),
                        created=header.created if header is not None else None,
                        settings=header.settings if header is not None else None)
        operation.expected = header.expected if header is not None else None
        for item in items:
            started = found.started.get(item.job_id)
            if started is not None:
                worker = started.get("worker")
                operation.registry.observe(
                    item.job_id, "running", at=started.get("time"), attempt=started.get("attempt"),
                    worker=worker.get("hostname") if isinstance(worker, dict) else None)
            operation._pending[item.job_id] = time.monotonic()
        for item in items:
            record = found.records.get(item.job_id)
            if record is not None:
                operation._ended(item.key, record)
        operation._watch()
        for job_id in list(ended_meanwhile):  # heard until now: the operation's own listening goes on
            if job_id in operation._pending:
                operation._ended_jobs.put(job_id)
        return operation

    # ---- saving ------------------------------------------------------------------------------

    def encode(self) -> dict[str, Any]:
        with self._cond:
            return {"format": FORMAT, "id": self.id, "name": self.name, "service": self.service,
                    "created": self.created, "policy": self.policy.encode(),
                    "max_in_flight": self.max_in_flight, "settings": self.settings,
                    "registry": self.registry.encode(),
                    "outcomes": [self._outcomes[key].encode() for key in self._ended_order]}

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the operation (its items, their states and outcomes) to ``path`` as JSON,
        whole or not at all."""
        write_json(path, self.encode())

    @classmethod
    def load(cls, path: str | os.PathLike[str], client: Client | None = None) -> Operation:
        """An operation :meth:`save` wrote. With ``client``, it is watched again: items not
        ended then are followed to their end, and it can be steered and re-run.

        Raises:
            DecodeError: the file is not an operation :meth:`save` wrote.
        """
        body = read_json(path)
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            raise DecodeError(f"{path}: not an operation of format {FORMAT}")
        try:
            operation = cls(
                client, body["service"], operation_id=body["id"], name=body.get("name"),
                policy=FailurePolicy.decode(body.get("policy") or {}),
                max_in_flight=body.get("max_in_flight"), registry=Registry.decode(body["registry"]),
                outcomes=[Outcome.decode(outcome) for outcome in body.get("outcomes", [])],
                created=body.get("created"), settings=body.get("settings"))
        except (KeyError, TypeError, BrokerExecError) as exc:
            raise DecodeError(f"{path}: not an operation ({exc})") from None
        if client is not None:
            now = time.monotonic() - QUIET  # asked after at once: they may have ended meanwhile
            for job_id in operation._unended_jobs():
                operation._pending[job_id] = now
            operation._watch()
        return operation

    # ---- the end -----------------------------------------------------------------------------

    def close(self) -> None:
        """Stop watching (the jobs go on; launching stops)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._ended_jobs.put(None)
        for subscription in self._subscriptions:
            subscription.close()
        self._subscriptions.clear()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(5)

    def __enter__(self) -> Operation:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _service_of(found: FoundOperation) -> str:
    """The service of an operation without a header, from its launches or jobs."""
    if found.service:
        return found.service
    for body in (*found.records.values(), *found.started.values()):
        if isinstance(body.get("service"), str):
            return str(body["service"])
    raise JobNotFound("the journal has the operation's launches but not their service")


def _again_action(item: Item) -> str:
    """What submitting ``item``'s request again does: "skip" (it finished), "rerun" (it
    failed, was aborted, or never launched) or "leave" (under way: it goes on or resumes)."""
    if item.state in (ItemState.FINISHED, ItemState.SKIPPED):
        return "skip"
    if item.state in (ItemState.FAILED, ItemState.ABORTED) or item.job_id is None:
        return "rerun"
    return "leave"
