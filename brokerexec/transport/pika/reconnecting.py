"""The reconnect loop of pika's long-running readers (the journal's tail, the history
queries' server): try again, backing off to 30 s, for as long as the process runs, with one
warning line per failure; a stop ends the wait at once."""

from __future__ import annotations

import functools
import logging
import threading

import pika.exceptions
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_never, wait_exponential

__all__ = ["reconnecting"]

#: The errors of a broker that went (or is not there yet): try again.
BROKER_GONE: tuple[type[BaseException], ...] = (pika.exceptions.AMQPError, OSError)


def reconnecting(stop: threading.Event, what: str, log: logging.Logger,
                 also: tuple[type[BaseException], ...] = ()) -> Retrying:
    """``for attempt in reconnecting(...): with attempt: ...``: the body again after a
    :data:`BROKER_GONE` error (or one of ``also``), backing off from 0.5 s to 30 s, logging
    ``"<what> (<error>); again in N s"``; any other error is raised."""
    def before_sleep(state: RetryCallState) -> None:
        log.warning("%s (%s); again in %.1f s", what, state.outcome.exception() if state.outcome else "?",
                    state.next_action.sleep if state.next_action else 0)

    return Retrying(retry=retry_if_exception_type((*BROKER_GONE, *also)),
                    wait=wait_exponential(multiplier=0.5, max=30), stop=stop_never,
                    before_sleep=before_sleep, sleep=functools.partial(_sleep, stop), reraise=True)


def _sleep(stop: threading.Event, seconds: float) -> None:
    stop.wait(seconds)  # a stop ends the wait

