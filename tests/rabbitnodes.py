"""Throw-away RabbitMQ nodes for integration tests: a plain node, a TLS node, a cluster.

Each node lives in a folder the caller owns (pytest's ``tmp_path``) and shares nothing with
the default node ``rabbit@localhost``: own name, AMQP/TLS/distribution ports, mnesia and log
dirs, config, ``enabled_plugins`` (``[].``: no management plugin), cookie, even epmd::

    with RabbitNode(tmp_path) as node: ...                    # node.url, node.ctl("status")
    with RabbitNode(tmp_path, tls=make_tls_files(tmp_path / "ca")) as node: ...  # node.tls_port
    with RabbitCluster(tmp_path, n=3) as cluster: ...         # cluster.stop_node(0), start_node(0)

How, found by experiment (RabbitMQ 3.10.8, OTP 25, Debian, as root):

* ``/usr/sbin/rabbitmq-server``/``rabbitmqctl`` are a wrapper that, for root, runs ``su rabbitmq``
  in /var/lib/rabbitmq: ``HOME`` becomes /var/lib/rabbitmq (the default node's cookie), output
  goes to the default node's startup_log. We run the real scripts in /usr/lib/rabbitmq/bin as
  the caller: as root that works, with no chown/chmod (nothing runs as ``rabbitmq``).
* Environment built from scratch: ``RABBITMQ_CONF_ENV_FILE`` is an empty file (else /etc's
  rabbitmq-env.conf names the node rabbit@localhost); config, ``conf.d``, advanced config and
  motd point into the node's folder: nothing in /etc/rabbitmq is read.
* Cookie: ``$HOME/.erlang.cookie`` (0400), ``HOME`` in the node's folder for the node and each
  ``rabbitmqctl`` against it (with ``HOME=/root`` the CLI would create /root/.erlang.cookie).
* A private ``epmd -port P -address 127.0.0.1`` (``ERL_EPMD_PORT``), started and killed here:
  the shared epmd never sees our names; a missing one would be daemonized by Erlang, on all
  interfaces, for ever. Distribution binds 127.0.0.1 (``ERL_FLAGS``) like the default node's.
* ``ps`` shows no node name for a RabbitMQ VM, so we add a user flag ``-brokerexec_node NAME``.
* Children run in sessions of their own (one killpg ends script, VM, helpers), with
  ``PR_SET_PDEATHSIG``: should the test process die, the script gets SIGTERM and stops its VM
  (so start nodes from a thread that lives as long as they should: pytest's main thread).

Measured on this 2-core box, other suites running: ``start()`` (AMQP and ``await_startup``
answer) 4.8-5.8 s, 8.6 s under load; a 3-node cluster (parallel boot, then ``stop_app``,
``join_cluster``, ``start_app`` on nodes 2, 3) 11.6-13 s; ``stop()`` 1.5-1.7 s a node, 4.5-4.8 s
the cluster; a member restart 4-5.8 s; one ``rabbitmqctl`` call 0.3-0.6 s.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from brokerctl import BrokerCtlError, amqp_answers, wait_until

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")  # the real scripts, not the su wrapper in /usr/sbin
TAG_FLAG = "-brokerexec_node"  # user flag on the VM's command line, so ps shows the node name
START_TIMEOUT = 120.0  # normally about 5 s; generous because other suites share the two cores
STOP_TIMEOUT = CTL_TIMEOUT = 60.0
_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def require_installed(what: str) -> None:
    """Skip the calling test when RabbitMQ is not installed (``what`` says what it needed it
    for), or fail it under ``CI``: as conftest does, CI must never silently skip."""
    import pytest

    if not (RABBITMQ_BIN / "rabbitmq-server").exists():
        message = f"no {RABBITMQ_BIN}/rabbitmq-server: install RabbitMQ to {what}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


class RabbitNodeError(RuntimeError):
    """A node did not start, or ``rabbitmqctl`` or ``openssl`` failed."""


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on 127.0.0.1 now (the kernel's pick: parallel runs differ)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:  # all bound at once, so the kernel cannot hand out one port twice
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]


def _port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1.0):
        return True
    return False


def _spawn(command: Sequence[str], env: dict[str, str], cwd: Path, stdout: IO[bytes] | int,
           stderr: int = subprocess.STDOUT) -> subprocess.Popen[bytes]:
    # A session of its own: one killpg reaches the script, the VM and the VM's helpers. And
    # between fork and exec, ask the kernel for SIGTERM when the test process dies.
    return subprocess.Popen(list(command), env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=stdout,
                            stderr=stderr, start_new_session=True,
                            preexec_fn=lambda: _libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM)))


def _exited(process: subprocess.Popen[bytes]) -> bool:
    # WNOWAIT: look, do not reap. An unreaped leader keeps its pid, which is also its process
    # group's id, from being reused, so killpg in _end_session can only hit our processes.
    if process.returncode is not None:
        return True
    return os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _end_session(process: subprocess.Popen[bytes] | None, wait: float, term: float = 5.0) -> None:
    """Wait ``wait`` s for an exit, SIGTERM the session, wait ``term`` s, SIGKILL it (leftovers too)."""
    if process is None or process.returncode is not None:
        return
    for grace, sig in ((wait, signal.SIGTERM), (term, signal.SIGKILL)):
        with contextlib.suppress(BrokerCtlError):  # wait_until's time-out: escalate
            wait_until(lambda: _exited(process), grace, f"pid {process.pid} to exit")
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)  # SIGTERM: the server script stops its VM gracefully
    process.wait()


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a throw-away CA, a server cert for localhost/127.0.0.1 and a client cert."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def client_context(self, *, ca: Path | None = None, client_cert: bool = True) -> ssl.SSLContext:
        """A client context that verifies the server, hostname included, against ``ca`` (default ours)."""
        context = ssl.create_default_context(cafile=str(ca or self.ca_cert))
        if client_cert:
            context.load_cert_chain(self.client_cert, self.client_key)
        return context


_OPENSSL_CONFIG = """\
[req]
distinguished_name = dn
[dn]
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
[server]
basicConstraints = critical, CA:FALSE
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1
[client]
basicConstraints = critical, CA:FALSE
extendedKeyUsage = clientAuth
"""


def make_tls_files(directory: Path) -> TlsFiles:
    """Make a CA, a server and a client certificate (EC P-256, one day) in ``directory``.

    With the ``openssl`` CLI (``cryptography`` is no dependency) and our config, not the system's.
    """
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "openssl.cnf"
    config.write_text(_OPENSSL_CONFIG)
    new_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-config", str(config)]

    def openssl(*args: str) -> None:
        result = subprocess.run(["openssl", *args], cwd=directory, capture_output=True, text=True)
        if result.returncode:
            raise RabbitNodeError(f"openssl {args[0]} failed: {result.stderr.strip()}")

    openssl("req", "-x509", *new_key, "-subj", "/CN=brokerexec test CA", "-extensions", "ca",
            "-days", "1", "-keyout", "ca.key", "-out", "ca.pem")
    for name, cn in (("server", "localhost"), ("client", "brokerexec-test-client")):
        openssl("req", "-new", *new_key, "-subj", f"/CN={cn}", "-keyout", f"{name}.key",
                "-out", f"{name}.csr")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-set_serial", str(secrets.randbits(63)), "-days", "1",
                "-extfile", str(config), "-extensions", name, "-out", f"{name}.pem")
    names = ["ca.pem", "server.pem", "server.key", "client.pem", "client.key"]
    return TlsFiles(*(directory / name for name in names))


class _Epmd:
    """A private epmd on a free loopback port, so our node names stay off the shared one."""

    def __init__(self, directory: Path) -> None:
        [self.port] = free_ports(1)
        self._directory = directory
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self._process is not None and not _exited(self._process):
            return
        self.stop()  # reap one that died on its own
        self._directory.mkdir(parents=True, exist_ok=True)
        with (self._directory / "epmd.log").open("ab") as log:
            self._process = _spawn(["epmd", "-port", str(self.port), "-address", "127.0.0.1"],
                                   {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}, self._directory, log)
        wait_until(lambda: _port_open(self.port), 10, f"epmd on port {self.port}")

    def stop(self) -> None:
        _end_session(self._process, 0)


class RabbitNode:
    """One RabbitMQ node in ``root/<short name>``: ``start()``/``stop()``, or ``with``.

    ``tls``: an ``amqps`` listener on ``tls_port`` too, verifying clients (``verify_peer``).
    :class:`RabbitCluster` passes ``cookie``, ``epmd``; a lone node makes (and stops) its own.
    """

    def __init__(self, root: Path, name: str | None = None, *, tls: TlsFiles | None = None,
                 fail_if_no_peer_cert: bool = True, cookie: str | None = None,
                 epmd: _Epmd | None = None) -> None:
        short = name or f"bx-{secrets.token_hex(3)}-1"
        self.nodename = f"{short}@localhost"
        self.base = root / short
        self.home = self.base / "home"
        self.tls, self.fail_if_no_peer_cert = tls, fail_if_no_peer_cert
        self.port, self.dist_port, tls_port = free_ports(3)
        self.tls_port = tls_port if tls else None
        self._cookie = cookie or secrets.token_hex(16).upper()
        self._own_epmd = epmd is None
        self._epmd = epmd or _Epmd(self.base)
        self.epmd_port = self._epmd.port
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Plain AMQP URL (guest may log in: it is a loopback connection)."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def running(self) -> bool:
        """True while the server process we started has not exited."""
        return self._process is not None and not _exited(self._process)

    def _env(self) -> dict[str, str]:
        # From scratch: none of the caller's RABBITMQ_* or ERL_* variables may leak in.
        b = self.base
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",  # the Elixir CLI warns without UTF-8
            "HOME": str(self.home),  # $HOME/.erlang.cookie: the cookie of the node and its CLI
            "ERL_EPMD_PORT": str(self._epmd.port),
            "ERL_FLAGS": "-kernel inet_dist_use_interface {127,0,0,1}",  # node and CLI VMs
            "RABBITMQ_CONF_ENV_FILE": str(b / "rabbitmq-env.conf"),  # empty: not /etc's
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(b / "mnesia"),
            "RABBITMQ_LOG_BASE": str(b / "log"),
            "RABBITMQ_CONFIG_FILE": str(b / "rabbitmq.conf"),
            "RABBITMQ_CONFIG_FILES": str(b / "conf.d" / "*.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(b / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(b / "enabled_plugins"),
            "RABBITMQ_MOTD_FILE": str(b / "motd"),
            "RABBITMQ_PID_FILE": str(b / "rabbitmq.pid"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": f"{TAG_FLAG} {self.nodename}",
        }

    def _write_files(self) -> None:
        for directory in (self.home, self.base / "mnesia", self.base / "log", self.base / "conf.d"):
            directory.mkdir(parents=True, exist_ok=True)
        cookie = self.home / ".erlang.cookie"
        if not cookie.exists():  # kept across restarts; Erlang refuses one others can read
            cookie.write_text(self._cookie)
            cookie.chmod(0o400)
        (self.base / "rabbitmq-env.conf").write_text("")
        (self.base / "enabled_plugins").write_text("[].\n")
        config = [f"listeners.tcp.default = 127.0.0.1:{self.port}"]  # the AMQP port lives here
        if self.tls:
            config += [f"listeners.ssl.default = 127.0.0.1:{self.tls_port}",
                       f"ssl_options.cacertfile = {self.tls.ca_cert}",
                       f"ssl_options.certfile = {self.tls.server_cert}",
                       f"ssl_options.keyfile = {self.tls.server_key}",
                       "ssl_options.verify = verify_peer",
                       f"ssl_options.fail_if_no_peer_cert = {str(self.fail_if_no_peer_cert).lower()}"]
        (self.base / "rabbitmq.conf").write_text("\n".join(config) + "\n")

    def _launch(self) -> None:
        """Spawn the server, no waiting: :class:`RabbitCluster` boots its members in parallel."""
        if self.running:
            return
        _end_session(self._process, 0)  # reap a run that ended on its own
        if self._own_epmd:
            self._epmd.start()
        self._write_files()
        with (self.base / "log" / "console.log").open("ab") as console:
            self._process = _spawn([str(RABBITMQ_BIN / "rabbitmq-server")], self._env(), self.base, console)

    def _ready(self) -> bool:
        if not self.running:
            raise RabbitNodeError(f"{self.nodename} exited while starting:\n{self.log_tail()}")
        return amqp_answers(("127.0.0.1", self.port)) and (self.tls_port is None or _port_open(self.tls_port))

    def _await(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        try:
            wait_until(self._ready, timeout, f"{self.nodename} to answer AMQP on port {self.port}")
        except BrokerCtlError as exc:  # wait_until's time-out
            raise RabbitNodeError(f"{exc}\n{self.log_tail()}") from exc
        # Listeners open a few boot steps before the boot ends: a stop_app would race it.
        remaining = max(deadline - time.monotonic(), 1.0)
        self.ctl("await_startup", "--timeout", str(int(remaining)), timeout=remaining + 10)

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the node; return once it answers AMQP (and TCP on its TLS port) and has booted."""
        try:
            self._launch()
            self._await(timeout)
        except BaseException:
            self.stop()  # a half-started node must not outlive the failure
            raise

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop the node: ``rabbitmqctl stop``, then SIGTERM and SIGKILL whatever of it lingers."""
        try:
            if self.running:
                with contextlib.suppress(RabbitNodeError):
                    self.ctl("stop", timeout=timeout / 2)
            _end_session(self._process, timeout / 2, timeout / 4)
        finally:
            if self._own_epmd:
                self._epmd.stop()

    def ctl(self, *args: str, timeout: float = CTL_TIMEOUT, check: bool = True) -> str:
        """Run ``rabbitmqctl -q -n NODE ARGS`` with this node's HOME, cookie and epmd; return stdout."""
        command = [str(RABBITMQ_BIN / "rabbitmqctl"), "-q", "-n", self.nodename, *args]
        process = _spawn(command, self._env(), self.base, subprocess.PIPE, subprocess.PIPE)
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _end_session(process, 0, 0)  # the CLI is a whole VM: do not leave it running
            process.communicate()
            raise RabbitNodeError(f"rabbitmqctl {' '.join(args)}: no answer within {timeout} s") from None
        if check and process.returncode:
            raise RabbitNodeError(f"rabbitmqctl {' '.join(args)} (exit {process.returncode}): "
                                  f"{(err or out).decode().strip()}")
        return out.decode().strip()

    def log_tail(self, lines: int = 30) -> str:
        """The ends of the console output and of the node's log, for error messages."""
        parts = []
        for path in (self.base / "log" / "console.log", self.base / "log" / f"{self.nodename}.log"):
            with contextlib.suppress(OSError):
                parts += [f"--- {path}", *path.read_text(errors="replace").splitlines()[-lines:]]
        return "\n".join(parts)

    def __enter__(self) -> RabbitNode:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class RabbitCluster:
    """``n`` nodes sharing a cookie and an epmd, joined to the first: ``start()``/``stop()``, or ``with``."""

    def __init__(self, root: Path, n: int = 3) -> None:
        prefix = f"bx-{secrets.token_hex(3)}"
        cookie = secrets.token_hex(16).upper()
        self._epmd = _Epmd(root / f"{prefix}-epmd")
        self.nodes = [RabbitNode(root, f"{prefix}-{i}", cookie=cookie, epmd=self._epmd)
                      for i in range(1, n + 1)]

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Boot all nodes at once, join nodes 2..n to node 1, wait until all n run together."""
        try:
            self._epmd.start()
            deadline = time.monotonic() + timeout
            for node in self.nodes:
                node._launch()
            for node in self.nodes:
                node._await(max(deadline - time.monotonic(), 1.0))
            for node in self.nodes[1:]:  # one at a time: concurrent joins race in mnesia
                node.ctl("stop_app")
                node.ctl("join_cluster", self.nodes[0].nodename)
                node.ctl("start_app", timeout=timeout)
            wait_until(lambda: len(self.running_nodes()) == len(self.nodes), timeout, "all nodes running")
        except BaseException:
            self.stop()
            raise

    def running_nodes(self, via: int | None = None) -> list[str]:
        """The running members, as ``cluster_status`` on node ``via`` (default: any running) says."""
        node = self.nodes[via] if via is not None else next(m for m in self.nodes if m.running)
        return list(json.loads(node.ctl("cluster_status", "--formatter", "json"))["running_nodes"])

    def stop_node(self, index: int) -> None:
        """Stop member ``index`` (0-based); it stays a member and rejoins on :meth:`start_node`."""
        self.nodes[index].stop()

    def start_node(self, index: int, timeout: float = START_TIMEOUT) -> None:
        """Start member ``index`` again, with its data: it rejoins the cluster by itself."""
        self.nodes[index].start(timeout)

    def stop(self) -> None:
        """Stop every member, then the epmd; each step runs even if an earlier one failed."""
        with contextlib.ExitStack() as stack:
            stack.callback(self._epmd.stop)
            for node in reversed(self.nodes):
                stack.callback(node.stop)  # callbacks run last in, first out: node 1 first

    def __enter__(self) -> RabbitCluster:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
