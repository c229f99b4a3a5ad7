"""Act on the local RabbitMQ through ``rabbitmqctl``, for fault tests.

Every helper waits, with a deadline, until its effect is real (connections gone, port
closed or answering AMQP, process stopped), and every context manager puts the broker
back (running, ``consumer_timeout`` at its default) even when the body fails.

Facts about this broker (RabbitMQ 3.10.8, 2 cores, measured; see ``tests/test_brokerctl.py``):

* Each ``rabbitmqctl`` call starts an Erlang VM: about 0.5 s, whatever the command.
  ``stop_app`` takes 0.4-0.6 s, ``start_app`` 1.3-1.5 s with a few queues; a
  SIGSTOP + SIGCONT cycle 0.3-0.4 s (the pid look-up; the broker answers at once after).
* ``rabbitmqctl`` runs ``su rabbitmq``, and ``su`` puts the real CLI in a session of its
  own: killing our child on a time-out would leave the CLI VM running (it did, for
  minutes). :func:`rabbitmqctl` kills the whole process tree instead.
* ``start_app`` recovers every durable queue. With thousands of them the default limit of
  1024 file descriptors starves the file handle cache and the boot hangs (seen with
  6,400 leaked ``brokerexec.result.*`` queues in ``/``: 5-10 min, or forever): :func:`start_app`
  then fails with the cache's figures rather than waiting forever.
* A closed connection whose client does not read (a blocking pika connection nobody pumps)
  stays listed, in state ``closed``, for 30 s while the broker waits for ``Close-Ok``.
* ``consumer_timeout`` and ``channel_tick_interval`` (60 s: how often a channel checks the
  timeout) are read when a channel opens; channels already open keep the old values.
* A SIGSTOPped broker still completes TCP handshakes (the kernel does that), but sends
  nothing: an AMQP client connects, then times out waiting for ``Connection.Start``
  (pika's BlockingConnection raises ``AMQPConnectorStackTimeout``, which is not an
  ``AMQPConnectionError``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import unquote, urlsplit

__all__ = [
    "DEFAULT_CHANNEL_TICK_INTERVAL",
    "DEFAULT_CONSUMER_TIMEOUT",
    "BrokerCtlError",
    "amqp_answers",
    "app_stopped",
    "broker_frozen",
    "broker_pid",
    "close_all_connections",
    "close_connections_named",
    "consumer_timeout",
    "ensure_running",
    "eventually",
    "get_consumer_timeout",
    "list_connections",
    "list_queues",
    "queue_exists",
    "rabbitmqctl",
    "restore_defaults",
    "set_consumer_timeout",
    "start_app",
    "stop_app",
    "vhost_of",
    "wait_until",
]

AMQP_ADDRESS = ("127.0.0.1", 5672)
DEFAULT_CONSUMER_TIMEOUT = 1_800_000  # ms, RabbitMQ's default
DEFAULT_CHANNEL_TICK_INTERVAL = 60_000  # ms, RabbitMQ's default
CTL_TIMEOUT = 60.0  # one rabbitmqctl call
START_TIMEOUT = 120.0  # start_app and a fresh node, normally 1-3 s
EFFECT_TIMEOUT = 30.0  # connections closed, port closed, process stopped
_AMQP_HEADER = b"AMQP\x00\x00\x09\x01"


class BrokerCtlError(RuntimeError):
    """``rabbitmqctl`` failed, or its effect did not show up in time."""


# --- plumbing -------------------------------------------------------------------------------

def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (``su`` hides the CLI in another session)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def rabbitmqctl(*args: str, timeout: float = CTL_TIMEOUT) -> str:
    """Run ``rabbitmqctl -q ARGS``; return its stdout, or raise :class:`BrokerCtlError`.

    On a time-out the whole process tree is killed, so no CLI VM outlives the call.
    """
    command = ["rabbitmqctl", "-q", *args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in [*_descendants(process.pid), process.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.communicate()
        raise BrokerCtlError(f"{' '.join(command)}: no answer within {timeout} s") from None
    if process.returncode != 0:
        raise BrokerCtlError(f"{' '.join(command)} (exit {process.returncode}): {err.strip() or out.strip()}")
    return out.strip()


def _json(*args: str) -> list[dict[str, Any]]:
    out = rabbitmqctl(*args, "--formatter", "json")
    return list(json.loads(out)) if out else []


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll external state (the broker's) until ``condition()`` holds; a deadline, no fixed sleep."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()  # never set: an interruptible 0.1 s pause
    while not condition():
        if time.monotonic() > deadline:
            raise BrokerCtlError(f"timed out after {timeout} s waiting for {what}")
        pause.wait(0.1)


def amqp_answers(address: tuple[str, int] = AMQP_ADDRESS, timeout: float = 2.0) -> bool:
    """True when ``address`` answers the AMQP 0-9-1 header with a ``Connection.Start`` frame.

    A TCP connect alone proves nothing: a frozen broker's kernel still accepts it.
    """
    try:
        with socket.create_connection(address, timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(_AMQP_HEADER)
            frame = sock.recv(7)
    except OSError:
        return False
    return frame[:3] == b"\x01\x00\x00"  # method frame on channel 0


def vhost_of(url: str) -> str:
    """The virtual host of an AMQP URL (``/`` when the path is empty)."""
    path = urlsplit(url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


# --- connections ----------------------------------------------------------------------------

def list_connections(*fields: str) -> list[dict[str, Any]]:
    """Every AMQP connection of the node, all vhosts, as dicts of ``fields``.

    ``client_properties`` comes back as a plain dict (``{"connection_name": ...}``). Note that
    the JSON form of ``pid`` cannot be given back to ``close_connection``.
    """
    rows = _json("list_connections", *(fields or ("name", "vhost", "client_properties")))
    for row in rows:
        if isinstance(row.get("client_properties"), list):
            row["client_properties"] = {key: value for key, _type, value in row["client_properties"]}
    return rows


def _connection_pids() -> dict[str, str]:
    """Connection name (``peer -> local``) to a pid string ``close_connection`` accepts."""
    out = rabbitmqctl("list_connections", "--no-table-headers", "pid", "name")
    rows = (line.split("\t", 1) for line in out.splitlines() if "\t" in line)
    return {name: pid for pid, name in rows}


def _wait_closed(names: set[str], what: str) -> None:
    """Wait until the broker has sent ``Connection.Close`` on each of ``names``.

    A client that does not read its socket (a blocking pika connection nobody pumps) keeps
    its connection listed, in state ``closed``, for 30 s, until the broker gives up waiting
    for ``Close-Ok``: that state counts as done.
    """
    def open_ones() -> set[str]:
        rows = list_connections("name", "state")
        return names & {row["name"] for row in rows if row["state"] not in ("closing", "closed")}

    wait_until(lambda: not open_ones(), EFFECT_TIMEOUT, what)


def close_all_connections(reason: str = "test") -> None:
    """Close every client connection in every vhost; return once the broker closed them all.

    Connections opened meanwhile (clients reconnecting) are not waited for.
    """
    before = {row["name"] for row in list_connections("name")}
    rabbitmqctl("close_all_connections", "--global", reason)
    _wait_closed(before, "every connection to close")


def close_connections_named(substring: str, reason: str = "test") -> int:
    """Close the connections whose client-given ``connection_name`` contains ``substring``.

    Returns how many were closed, once the broker has closed them.
    """
    if not substring:
        raise ValueError("an empty substring would close every connection")
    names = {
        row["name"] for row in list_connections("name", "client_properties")
        if substring in str(row["client_properties"].get("connection_name", ""))
    }
    pids = _connection_pids()
    for name in names:
        if name in pids:
            with contextlib.suppress(BrokerCtlError):  # it may have closed by itself meanwhile
                rabbitmqctl("close_connection", pids[name], reason)
    _wait_closed(names, f"connections named *{substring}* to close")
    return len(names)


# --- the application and the VM -------------------------------------------------------------

def _boot_diagnosis() -> str:
    with contextlib.suppress(BrokerCtlError):
        info = rabbitmqctl("eval", "file_handle_cache:info([total_limit, total_used]).", timeout=15)
        return f"; file handle cache {info} (a full cache hangs queue recovery)"
    return ""


def stop_app() -> None:
    """``rabbitmqctl stop_app``; return once port 5672 no longer answers."""
    rabbitmqctl("stop_app", timeout=START_TIMEOUT)
    wait_until(lambda: not amqp_answers(timeout=0.5), EFFECT_TIMEOUT, "port 5672 to close")


def start_app() -> None:
    """``rabbitmqctl start_app`` and ``await_startup``; return once port 5672 answers AMQP."""
    try:
        rabbitmqctl("start_app", timeout=START_TIMEOUT)
        rabbitmqctl("await_startup", "--timeout", str(int(START_TIMEOUT)), timeout=START_TIMEOUT + 10)
        wait_until(amqp_answers, EFFECT_TIMEOUT, "port 5672 to answer AMQP")
    except BrokerCtlError as exc:
        raise BrokerCtlError(f"{exc}{_boot_diagnosis()}") from exc


@contextlib.contextmanager
def app_stopped() -> Iterator[None]:
    """The RabbitMQ application is stopped inside the block (the Erlang VM keeps running)."""
    stop_app()
    try:
        yield
    finally:
        start_app()


def broker_pid() -> int:
    """The OS pid of the broker's Erlang VM (asked of the broker itself)."""
    return int(rabbitmqctl("eval", "os:getpid().").strip('"'))


def _process_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0]


@contextlib.contextmanager
def broker_frozen() -> Iterator[int]:
    """The broker's VM is SIGSTOPped inside the block (yields its pid); always SIGCONTed after.

    ``rabbitmqctl`` cannot reach a frozen broker: do not call it inside the block.
    """
    pid = broker_pid()
    with open(f"/proc/{pid}/comm") as comm:
        if comm.read().strip() != "beam.smp":  # never stop anything but the broker
            raise BrokerCtlError(f"pid {pid} is not the broker's beam.smp")
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_until(lambda: _process_state(pid) in "Tt", EFFECT_TIMEOUT, "the broker to stop")
        yield pid
    finally:
        os.kill(pid, signal.SIGCONT)
        wait_until(lambda: _process_state(pid) not in "Tt", EFFECT_TIMEOUT, "the broker to continue")
        wait_until(amqp_answers, EFFECT_TIMEOUT, "the broker to answer AMQP after SIGCONT")


def _frozen_brokers() -> list[int]:
    """Stopped (``T``) broker VMs: what a test killed inside :func:`broker_frozen` leaves."""
    found = []
    for entry in os.listdir("/proc"):
        with contextlib.suppress(OSError, IndexError):
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                args = cmdline.read().split(b"\0")
            # the broker's VM, not a CLI VM (those run the rabbitmqctl escript)
            if args[0].endswith(b"beam.smp") and b"rabbit" in b" ".join(args) \
                    and not any(b"escript" in arg for arg in args) and _process_state(int(entry)) in "Tt":
                found.append(int(entry))
    return found


def ensure_running() -> None:
    """Make sure the broker answers AMQP: continue a frozen VM, start the app, or the node."""
    if amqp_answers():
        return
    frozen = _frozen_brokers()
    for pid in frozen:
        os.kill(pid, signal.SIGCONT)
    if frozen:
        with contextlib.suppress(BrokerCtlError):
            wait_until(amqp_answers, EFFECT_TIMEOUT, "the broker to answer after SIGCONT")
            return
    if not _node_answers():
        subprocess.run(["rabbitmq-server", "-detached"], check=False, capture_output=True, timeout=60)
        wait_until(_node_answers, START_TIMEOUT, "the RabbitMQ node to start")
    start_app()


def _node_answers() -> bool:
    """Whether the Erlang node answers ``rabbitmqctl`` (its app may still be stopped)."""
    try:
        rabbitmqctl("eval", "ok.", timeout=15)
    except BrokerCtlError:
        return False
    return True


# --- settings -------------------------------------------------------------------------------

def _get_env(key: str) -> int:
    out = rabbitmqctl("eval", f"application:get_env(rabbit, {key}).")
    if not (out.startswith("{ok,") and out.endswith("}")):
        raise BrokerCtlError(f"rabbit's {key} is not set: {out}")
    return int(out[4:-1])


def _set_env(key: str, value: int) -> None:
    value = int(value)  # an int, nothing else, reaches eval
    if value <= 0:
        raise ValueError(f"{key} must be positive, not {value}")
    rabbitmqctl("eval", f"application:set_env(rabbit, {key}, {value}).")
    if _get_env(key) != value:
        raise BrokerCtlError(f"rabbit's {key} did not change to {value}")


def get_consumer_timeout() -> int:
    """The broker's ``consumer_timeout`` in ms."""
    return _get_env("consumer_timeout")


def set_consumer_timeout(ms: int) -> None:
    """Set ``consumer_timeout``; only channels opened afterwards see it."""
    _set_env("consumer_timeout", ms)


def restore_defaults() -> None:
    """Put ``consumer_timeout`` and ``channel_tick_interval`` back to RabbitMQ's defaults."""
    for key, default in (("consumer_timeout", DEFAULT_CONSUMER_TIMEOUT),
                         ("channel_tick_interval", DEFAULT_CHANNEL_TICK_INTERVAL)):
        if _get_env(key) != default:
            _set_env(key, default)


@contextlib.contextmanager
def consumer_timeout(ms: int, tick_ms: int | None = 200) -> Iterator[None]:
    """``consumer_timeout`` is ``ms`` inside the block, back to the default after.

    ``tick_ms`` also sets ``channel_tick_interval`` (how often a channel checks the timeout,
    60 s by default) so that a short timeout is enforced promptly; ``None`` leaves it alone.
    Both apply to channels opened inside the block.
    """
    try:
        set_consumer_timeout(ms)
        if tick_ms is not None:
            _set_env("channel_tick_interval", tick_ms)
        yield
    finally:
        restore_defaults()


# --- queues ---------------------------------------------------------------------------------

def list_queues(*fields: str, vhost: str = "/") -> list[dict[str, Any]]:
    """The queues of ``vhost`` as dicts of ``fields`` (default: name, messages, consumers)."""
    return _json("list_queues", "-p", vhost, *(fields or ("name", "messages", "consumers")))


def queue_exists(name: str, vhost: str = "/") -> bool:
    """Whether queue ``name`` exists in ``vhost``."""
    return any(row["name"] == name for row in list_queues("name", vhost=vhost))


def eventually(call: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    """Retry ``call`` while brokerexec rides out a fault (reconnect, re-claim of a job)."""
    from brokerexec import BrokerConnectionError, JobNotFound, Timeout

    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while True:
        try:
            return call()
        except (BrokerConnectionError, JobNotFound, Timeout) as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: still {exc!r} after {timeout} s") from exc
            pause.wait(0.1)
