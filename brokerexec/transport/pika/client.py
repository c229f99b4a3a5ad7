"""The blocking client transport, on pika: what :class:`~brokerexec.Client` and the CLI use.

Each calling thread gets a connection of its own (pika is not thread-safe), used only
during a call: the caller's thread moves the bytes itself, with no hop to another thread,
which puts a ``Job.status()`` on par with raw aio-pika (``docs/performance.md``). What is
received without asking — event subscriptions, the records pushed to this client — comes
on a :class:`~.listener.PikaListener` thread, started when first needed (a one-shot
``brokerexec status ID`` never starts it).

What a call does on the wire is decided in :mod:`brokerexec.protocol.calls`; this module
only moves the bytes. Every pika error becomes one of ours where it crosses out of here:
connection trouble :class:`~brokerexec.BrokerConnectionError`, a refusal by the broker
:class:`~brokerexec.BrokerExecError`. A connection found broken is replaced; a call that
broke with it is sent again only if its intent is resendable (``INTENTS``): a ``set`` or
``invoke`` may have been applied already.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlparse, urlunparse

import pika

from ...constants import DEFAULT_LOCATE_TIMEOUT, MAX_MESSAGE_BYTES
from ...errors import BrokerConnectionError
from ...protocol import calls, history, lookups
from ...urls import broker_urls
from ..base import ClientTransport, client_info
from ..tls import split_tls
from .caller import Caller, Lost

if TYPE_CHECKING:
    from collections.abc import Iterable

    from ...protocol.events import Event
    from ...protocol.history import HistoryPage, HistoryQuery
    from ...protocol.intents import Signal
    from ...protocol.lookups import Listing
    from ...protocol.messages import Control, Launch
    from ...protocol.operation_log import FoundOperation, OperationHeader
    from ..base import Subscription
    from ..pushed_records import PushedRecords
    from .listener import PikaListener

__all__ = ["PikaClientTransport", "connection_parameters"]

log = logging.getLogger(__name__)
T = TypeVar("T")


def _without_name(url: str, name: str) -> tuple[str, str]:
    """The URL (each of its broker addresses) without a ``name`` query parameter
    (aio-pika's, unknown to pika), and the connection name: that parameter if given, else
    ``name``."""
    urls = []
    for one in broker_urls(url):
        parts = urlparse(one)
        query = parse_qsl(parts.query)
        name = next((value for key, value in reversed(query) if key == "name"), name)
        kept = urlencode([(key, value) for key, value in query if key != "name"])
        urls.append(urlunparse(parts._replace(query=kept)))
    return ",".join(urls), name


def connection_parameters(url: str, connect_timeout: float, name: str,
                          heartbeat: int | None) -> list[pika.URLParameters]:
    """One set per broker address: pika's ``BlockingConnection`` tries them in order."""
    every = []
    for one in broker_urls(url):
        plain_url, tls = split_tls(one)
        params = pika.URLParameters(plain_url)
        if tls is not None:  # made once: every caller's and the listener's connection share it
            params.ssl_options = pika.SSLOptions(tls.context(), tls.hostname)
        if heartbeat is not None:
            params.heartbeat = heartbeat
        params.connection_attempts = 1
        params.retry_delay = 0
        params.socket_timeout = connect_timeout
        params.stack_timeout = connect_timeout * 2
        params.blocked_connection_timeout = connect_timeout * 2
        params.client_properties = {"connection_name": name}
        every.append(params)
    return every


class PikaClientTransport(ClientTransport):
    """See the module docstring.

    Parameters:
        url: ``amqp://user:pass@host:port/vhost``.
        connect_timeout: seconds for one connection attempt (socket and handshake).
        name: connection name shown by ``rabbitmqctl list_connections``.
        heartbeat: AMQP heartbeat of the callers' connections (None: the broker's; 0 for
            connections used only in bursts, which pump nothing between calls).
        locate_timeout: how long an RPC to a job not claimed yet waits for its worker.
        push_records: launch with a ``reply_to`` queue of ours, so records come to us
            instead of being read from the stream (needs the listener thread).
        listener_heartbeat: the listener's AMQP heartbeat (it pumps all the time).
    """

    def __init__(self, url: str, *, connect_timeout: float = 3.0, name: str = "brokerexec-client",
                 heartbeat: int | None = None, locate_timeout: float = DEFAULT_LOCATE_TIMEOUT,
                 max_message_bytes: int = MAX_MESSAGE_BYTES, push_records: bool = False,
                 listener_heartbeat: int = 10) -> None:
        url, name = _without_name(url, name)
        self.url = url
        self.locate_timeout = locate_timeout
        self.max_message_bytes = max_message_bytes
        self._parameters = connection_parameters(url, connect_timeout, name, heartbeat)
        self._listener_parameters = connection_parameters(url, connect_timeout,
                                                                f"{name}-listener", listener_heartbeat)
        self._connect_timeout = connect_timeout
        self._local = threading.local()
        self._lock = threading.Lock()
        self._callers: list[Caller] = []
        #: How many callers' connections were made (one per thread, and one per broken one).
        self.connections_made = 0
        self.records: PushedRecords | None = None
        if push_records:
            from ..pushed_records import PushedRecords

            self.records = PushedRecords()
        self._listener: PikaListener | None = None
        self._offered: set[str] = set()  # services known to have a launch queue
        self._caller()  # connect now: an unreachable broker fails here, fast

    # ---- connections -------------------------------------------------------------------------

    def _caller(self) -> Caller:
        caller: Caller | None = getattr(self._local, "caller", None)
        if caller is not None and not caller.alive:
            self._forget(caller)
            caller = None
        if caller is None:
            caller = Caller(self._parameters, self.url, self.max_message_bytes)
            self._local.caller = caller
            with self._lock:
                self._callers.append(caller)
                self.connections_made += 1
        return caller

    def _forget(self, caller: Caller) -> None:
        self._local.caller = None
        with self._lock:
            if caller in self._callers:
                self._callers.remove(caller)
        caller.close()

    def _run(self, act: Callable[[Caller], T], *, resendable: bool, what: str) -> T:
        """``act`` on this thread's connection; once more on a new one if it broke and the
        call may be sent again."""
        caller = self._caller()
        try:
            return act(caller)
        except Lost as exc:
            self._forget(caller)
            if not resendable:
                raise BrokerConnectionError(f"{exc} during {what}: it may or may not have been "
                                            "applied; it is not sent again") from exc
            log.info("%s; sending %s again on a new connection", exc, what)
        return act(self._caller())

    def _listening(self) -> PikaListener:
        from .listener import PikaListener  # a one-shot CLI verb never needs it

        with self._lock:
            if self._listener is None:
                listener = PikaListener(self._listener_parameters, records=self.records)
                listener.start(self._connect_timeout * 3)
                self._listener = listener
            return self._listener

    # ---- ClientTransport -----------------------------------------------------------------------

    def launch(self, launches: list[Launch]) -> None:
        reply_to = None
        if self.records is not None:
            self._listening()
            reply_to = self.records.note_launched([launch.job_id for launch in launches])
        # Sending a launch again is safe: a job id runs once, its duplicates stop at the claim.
        self._run(lambda caller: caller.run(calls.launches(launches, reply_to=reply_to,
                                                           offered=self._offered)),
                  resendable=True, what=f"the launch of {len(launches)} job(s)")

    def rpc(self, job_id: str, signal: Signal, timeout: float) -> Any:
        return self._run(lambda caller: caller.run(calls.rpc(
            job_id, signal, timeout=timeout, locate_timeout=self.locate_timeout,
            max_bytes=self.max_message_bytes)), resendable=signal.intent.spec.resendable,
            what=f"{signal.describe()} to job {job_id}")

    def status(self, job_id: str, timeout: float) -> dict[str, Any]:
        return self._run(lambda caller: caller.run(lookups.status(
            job_id, timeout=timeout, locate_timeout=self.locate_timeout,
            max_bytes=self.max_message_bytes)), resendable=True, what=f"the status of job {job_id}")

    def history(self, query: HistoryQuery, timeout: float) -> HistoryPage:
        return self._run(lambda caller: caller.run(history.ask(
            query, timeout=timeout, max_bytes=self.max_message_bytes)), resendable=True,
            what="a history query")

    def abort(self, job_id: str, timeout: float) -> bool:
        return self._run(lambda caller: caller.run(lookups.abort(
            job_id, timeout=timeout, locate_timeout=self.locate_timeout,
            max_bytes=self.max_message_bytes, by=client_info())), resendable=True,
            what=f"the abort of job {job_id}")

    def control(self, control: Control) -> None:
        from ...protocol import topology

        def act(caller: Caller) -> None:
            # The exchange and its stream may not exist yet if no worker has run: declared
            # exactly as workers do, so the message is kept for the first one.
            caller.declare_queue(topology.CONTROL)
            caller.run(calls.control(control))

        self._run(act, resendable=True, what=f"control {control.intent.value!r}")

    def subscribe(self, patterns: list[str], callback: Callable[[Event], None]) -> Subscription:
        return self._listening().subscribe(patterns, callback)

    def subscribe_controls(self, callback: Callable[[Control], None]) -> Subscription:
        return self._listening().subscribe_controls(callback)

    def fetch_result(self, job_id: str, timeout: float | None) -> dict[str, Any] | None:
        started = time.monotonic()
        if self.records is not None:
            decided, record = self.records.wait(job_id, timeout)
            if decided or record is not None:
                return record
        remaining = None if timeout is None else max(timeout - (time.monotonic() - started), 0.0)
        return self._run(lambda caller: caller.run(lookups.result(
            job_id, remaining, max_bytes=self.max_message_bytes)), resendable=True,
            what=f"the look-up of job {job_id}'s record")

    def list_jobs(self, timeout: float, *, services: Iterable[str] = (),
                  ended_since: float | None = None, limit: int = 1000) -> Listing:
        return self._run(lambda caller: caller.run(lookups.listing(
            timeout=timeout, max_bytes=self.max_message_bytes, services=tuple(services),
            ended_since=ended_since, limit=limit)), resendable=True, what="the jobs listing")

    def note_operation(self, header: OperationHeader) -> None:
        from ...protocol import operation_log  # a one-shot CLI verb never needs it

        self._run(lambda caller: caller.run(operation_log.note(header)), resendable=True,
                  what=f"the header of operation {header.id}")

    def find_operation(self, operation_id: str, timeout: float) -> FoundOperation:
        from ...protocol import operation_log

        return self._run(lambda caller: caller.run(operation_log.find(operation_id, timeout)),
                         resendable=True, what=f"the look-up of operation {operation_id}")

    def find_operations(self, since: float, limit: int, timeout: float) -> list[OperationHeader]:
        from ...protocol import operation_log

        return self._run(lambda caller: caller.run(operation_log.find_all(since, limit, timeout)),
                         resendable=True, what="the operations listing")

    def close(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            callers, self._callers = self._callers, []
        if listener is not None:
            listener.close()
        for caller in callers:
            caller.close()

    @property
    def listener(self) -> PikaListener | None:
        """The listener thread, once something needed it."""
        return self._listener

    @property
    def connected(self) -> bool:
        """True while the listener's connection is up (False before anything needed it)."""
        return self._listener is not None and self._listener.connected

    @property
    def reconnects(self) -> int:
        """How many times the listener's connection was lost and made again."""
        return self._listener.reconnects if self._listener is not None else 0
