"""Where a job's computation runs: the interface every runner implements.

A :class:`~brokerexec.core.service_handler.ServiceHandler` keeps the handler thread's side
of its job (the signal desk, the crossing, the state machine) and asks its runner for the
other side, :meth:`Runner.computation`. It then drives that :class:`ComputationSide`
without knowing where the service runs:

* :class:`~brokerexec.core.thread_runner.ThreadRunner`, the default: in a reused thread of
  this process (:class:`~brokerexec.core.computation_thread.Computation`);
* :class:`~brokerexec.child.runner.ProcessRunner`: in a child process of its own, which can
  be killed (:class:`~brokerexec.child.computation.ChildComputation` stands for it here).
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from .. import codec

if TYPE_CHECKING:
    from .crossing import Crossing
    from .intervals import Intervals
    from .map_pool import WorkerPool
    from .service import Handler, Service
    from .state_machine import StateMachine

__all__ = ["ComputationSide", "JobSetup", "Note", "Outcome", "Runner", "Running", "Send", "Store",
           "last_reports"]

log = logging.getLogger(__name__)

#: How a job ended: ``{"state", "result", "error", "start", "end"}``, and ``"abandoned"``
#: (an abort not obeyed in time), and what the job last reported, each only if there is one
#: (:func:`last_reports`): ``"progress"`` (its last progress message) and ``"improved"``
#: (the last state its service passed to ``handler.improved()``, sent yet or not).
#: ``Record.of_outcome`` makes its record of it.
Outcome = dict[str, Any]
#: Sends one outgoing message: ``send(kind, data)``.
Send = Callable[[str, dict[str, Any]], None]
#: Stores a checkpoint durably: ``store(state, settable, covers)``, the service's state, the
#: values of its declared settable attributes, and the newest change it covers
#: (:mod:`.change_log`); the future fails with ``CheckpointFailed``.
Store = Callable[[Any, dict[str, Any], int], "cf.Future[None]"]
#: Makes the changes applied since the newest stored checkpoint durable (:mod:`.change_log`):
#: ``note(entries)``, the whole log each time; the future fails if the broker did not take it.
Note = Callable[[list[dict[str, Any]]], "cf.Future[None]"]


@dataclass(frozen=True)
class JobSetup:
    """What the computation side of one job is made with, by whichever runner.

    Parameters:
        job: the job's name (the worker uses its id), for threads, processes and messages.
        crossing: what the handler thread posts and requests; the computation obeys it.
        states: the job's state machine, shared with the handler thread.
        intervals: the periodic messages' deltas, changed by a ``set`` on the handler thread.
        send: sends every outgoing message (state, progress, improved, checkpoint, error).
        pool: the pool of ``handler.map`` / ``imap``.
        abort_grace: seconds an aborted computation has to reach ``ready()``.
        clock: the monotonic clock of the periodic messages.
        wallclock: the clock of the times reported.
        store: stores checkpoints durably (a worker's); None: they are only published.
        note: makes each set and invoke durable before it is acknowledged (a worker's,
            beside ``store``); None: they are not.
        carried: the change log a resumed job brings from its previous execution.
        carried_after: the newest change the checkpoint it resumes from covers.
        max_result_bytes: a result larger than this, as JSON, fails the job
            (``ResultTooLarge``); None: no limit.
    """

    job: str
    crossing: Crossing
    states: StateMachine
    intervals: Intervals
    send: Send
    pool: WorkerPool
    abort_grace: float
    clock: Callable[[], float]
    wallclock: Callable[[], float]
    store: Store | None = None
    note: Note | None = None
    carried: tuple[dict[str, Any], ...] = ()
    carried_after: int = 0
    max_result_bytes: int | None = None


class Running(Protocol):
    """A callable running apart from its caller, as the one who started it sees it."""

    def is_alive(self) -> bool:
        """True until the callable has returned."""


class ComputationSide(Protocol):
    """The computation's side of a job, as its handler drives it (from any thread)."""

    #: Resolves when the job ends (see :data:`Outcome`), or is handed over.
    outcome: cf.Future[Outcome]
    #: The running service, when it runs in this process (None before, or in a child).
    service: Service | None

    @property
    def started(self) -> bool:
        """True once :meth:`start` has been called."""

    @property
    def stores_checkpoints(self) -> bool:
        """True if checkpoints are stored (the job can be handed over and resumed)."""

    def start(self, service: Service | type[Service], request: dict[str, Any], resume: bool,
              state: dict[str, Any] | None, handler: Handler,
              reapply: dict[str, Any] | None = None) -> None:
        """Make the service where it runs (from its class), restore ``state`` if
        ``resume``, and run ``request`` through it with ``handler``; return at once. A
        service that cannot be made fails the job. ``reapply``: settable values a resumed
        job's senders were told were applied, set again at its first ``ready()``."""

    def fail_to_start(self, exc: BaseException) -> None:
        """End the job as failed before it ran."""

    def abandon_if_stuck(self, grace: float) -> None:
        """The abort grace is over: end the job as aborted if the computation still runs."""

    def at_ready(self) -> None:
        """What ``ready()`` does when its one test says there is something to do."""

    def improved(self, state: dict[str, Any]) -> None:
        """Report a better intermediate result (computation thread)."""


class Runner(Protocol):
    """Where the computations of a handler run."""

    def computation(self, setup: JobSetup) -> ComputationSide:
        """The computation side of one job, not started yet."""


def last_reports(job: str, progress: object, improved: object,
                 room: int | None) -> tuple[dict[str, Any], int]:
    """An outcome's ``progress`` and ``improved`` (see :data:`Outcome`), and their size as JSON.

    ``progress`` counts if it is a non-empty object (a job that never sent one has ``{}``),
    ``improved`` if it is an object; one that is not JSON-able is left out. They are small
    by contract, and cut nowhere: but they go into the job's record with its result, so
    both are left out if together they are over ``room`` bytes (None: no limit), and the
    record stays one the broker takes. What is left out is logged.
    """
    reports: dict[str, Any] = {}
    size = 0
    for key, value in (("progress", progress), ("improved", improved)):
        if not isinstance(value, dict) or (key == "progress" and not value):
            continue
        try:
            size += len(codec.encode(value))
        except Exception as exc:  # not JSON-able (ValueError), or changed meanwhile: never stops the end
            log.warning("job %s: its last %s is not JSON-able, and is not in its record: %s",
                        job, key, exc)
            continue
        reports[key] = value
    if room is not None and size > room:
        log.warning("job %s: its last progress and improved value are %d bytes as JSON, over the "
                    "limit of %d (--max-result-bytes): not in its record", job, size, room)
        return {}, 0
    return reports, size
