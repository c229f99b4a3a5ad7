"""Shared fixtures: the broker probe, per-test names, and the fault lock.

The broker URL comes from ``BROKEREXEC_TEST_AMQP_URL`` (default: the local RabbitMQ).
Without a broker, tests marked ``rabbitmq`` are skipped locally with the command that
starts one, and fail when ``CI`` is set: CI must never silently skip them.

Fault tests (marker ``fault``) stop, restart or cut off the shared local broker. They take
an exclusive lock on ``/tmp/brokerexec-broker.lock`` while every other broker test holds a
shared one, so that concurrent test sessions on one machine do not break each other.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

import pytest

AMQP_URL = os.environ.get("BROKEREXEC_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
LOCK_PATH = "/tmp/brokerexec-broker.lock"

# The tests start hundreds of Python processes (workers, indexers, CLI verbs). Under
# PYTHONDONTWRITEBYTECODE (set on these machines and in CI) each one compiled brokerexec
# from source again: about 0.4 s more per worker start. They share a bytecode cache instead,
# kept outside the checkout as the variable intended. Set here, at import, so that it is in
# os.environ before any test module copies the environment.
if os.environ.pop("PYTHONDONTWRITEBYTECODE", None) and not os.environ.get("PYTHONPYCACHEPREFIX"):
    os.environ["PYTHONPYCACHEPREFIX"] = f"/tmp/brokerexec-test-pycache-{os.getuid()}"


def _broker_answers(url: str, timeout: float = 1.0) -> bool:
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or 5672), timeout):
            return True
    except OSError:
        return False


def _try_start_local_broker() -> bool:
    """Start the local RabbitMQ if this machine has one installed; wait up to 60 s."""
    if not shutil.which("rabbitmq-server"):
        return False
    subprocess.run(["rabbitmq-server", "-detached"], check=False, capture_output=True)
    if shutil.which("rabbitmqctl"):
        subprocess.run(["rabbitmqctl", "wait", "--timeout", "60", "--pid", "0"],
                       check=False, capture_output=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if _broker_answers(AMQP_URL):
            return True
        time.sleep(0.5)
    return False


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    """The broker URL, once the broker is known to answer.

    With a local ``rabbitmqctl`` (and no BROKEREXEC_TEST_AMQP_URL), the session gets a
    vhost of its own, deleted at the end: no queue or message of any other user of the
    broker, or of an earlier run, can leak into the tests.
    """
    if not (_broker_answers(AMQP_URL) or _try_start_local_broker()):
        message = (
            f"no RabbitMQ answers at {AMQP_URL}. Start one with `rabbitmq-server -detached`, "
            "or `docker run -d -p 5672:5672 rabbitmq:3.10`, or point BROKEREXEC_TEST_AMQP_URL "
            "at one."
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    if "BROKEREXEC_TEST_AMQP_URL" in os.environ or not shutil.which("rabbitmqctl"):
        yield AMQP_URL
        return
    vhost = f"brokerexec-test-{uuid.uuid4().hex[:12]}"
    subprocess.run(["rabbitmqctl", "-q", "add_vhost", vhost], check=True, capture_output=True)
    subprocess.run(["rabbitmqctl", "-q", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"],
                   check=True, capture_output=True)
    try:
        yield AMQP_URL.rstrip("/") + "/" + vhost
    finally:
        subprocess.run(["rabbitmqctl", "-q", "delete_vhost", vhost], check=False,
                       capture_output=True)


@pytest.fixture
def own_vhost(amqp_url: str) -> Iterator[str]:
    """The URL of a vhost of the test's own, deleted after it: its journal, its queues and its
    control stream hold only what the test put there (queue types are per vhost, and the
    session's control stream replays the aborts other tests sent)."""
    import brokerctl

    vhost = f"brokerexec-test-{uuid.uuid4().hex[:12]}"
    brokerctl.rabbitmqctl("add_vhost", vhost)
    try:
        brokerctl.rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        yield amqp_url.rsplit("/", 1)[0] + "/" + vhost
    finally:
        brokerctl.rabbitmqctl("delete_vhost", vhost)


#: The PostgreSQL server tests make their databases in (trust auth on these machines).
POSTGRES_URL = os.environ.get("BROKEREXEC_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(scope="session")
def postgres_server() -> str:
    """The PostgreSQL server's URL, once it answers (fails under CI if it does not)."""
    import psycopg

    try:
        psycopg.connect(POSTGRES_URL, connect_timeout=3, autocommit=True).close()
    except psycopg.Error as exc:
        message = (f"no PostgreSQL answers at {POSTGRES_URL} ({exc}). Start one (Debian: `apt-get "
                   "install -y postgresql && pg_ctlcluster 15 main start`, trust auth for 127.0.0.1), "
                   "or point BROKEREXEC_TEST_POSTGRES_URL at one where the user may create databases.")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return POSTGRES_URL


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    """A database of the test's own on that server, dropped at the end."""
    import psycopg

    name = f"brokerexec_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_server, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield postgres_server.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(postgres_server, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(autouse=True)
def _broker_lock(request: pytest.FixtureRequest) -> Iterator[None]:
    """Shared lock for broker tests, exclusive for fault tests (see module docstring)."""
    if request.node.get_closest_marker("fault"):
        mode = fcntl.LOCK_EX
    elif request.node.get_closest_marker("rabbitmq"):
        mode = fcntl.LOCK_SH
    else:
        yield
        return
    with open(LOCK_PATH, "a+") as lock:
        fcntl.flock(lock, mode)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture
def raw(amqp_url: str) -> Iterator[Any]:
    """A raw pika peer (``test_rabbitmq_transport.Raw``): kiwipy tools, operators."""
    from test_rabbitmq_transport import Raw

    peer = Raw(amqp_url)
    yield peer
    peer.close()


@pytest.fixture
def unique_name(request: pytest.FixtureRequest) -> str:
    """A name unique to this test, for queues, exchanges and job ids."""
    return f"test-{request.node.name[:40]}-{uuid.uuid4().hex[:8]}".replace("[", "-").replace("]", "")


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = os.path.join(ROOT, "tests", "sample_services.py")


class WorkerProcess:
    """A ``brokerexec worker`` in its own process, as users run it."""

    #: The sample services a worker offers unless told otherwise.
    SERVICES = ("Counter", "Forever", "Improver", "Sleeper", "NoReady", "Steps", "Fragile")

    def __init__(self, url: str, *args: str, name: str = "worker",
                 services: tuple[str, ...] = SERVICES, env: dict[str, str] | None = None) -> None:
        import sys
        import threading

        command = [sys.executable, "-m", "brokerexec", "worker", "--broker", url,
                   *[f"--service={cls if ':' in cls else f'{SAMPLES}:{cls}'}" for cls in services],
                   *args]
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                        env=None if env is None else {**os.environ, **env})
        self.lines: list[str] = []
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, name=f"{name}-stderr", daemon=True)
        self._reader.start()
        if not self._ready.wait(30):
            self.kill()
            raise AssertionError("worker did not start:\n" + "".join(self.lines))

    def _read(self) -> None:
        assert self.process.stderr is not None
        with self.process.stderr:
            for line in self.process.stderr:
                self.lines.append(line)
                if "worker ready" in line:
                    self._ready.set()

    @property
    def pid(self) -> int:
        return self.process.pid

    def terminate(self, timeout: float = 60) -> int:
        import signal

        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout)
        self._reader.join(5)  # stderr reaches EOF once the process is gone
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._reader.join(5)


@pytest.fixture
def worker_process(amqp_url: str) -> Iterator[object]:
    """Factory: ``worker_process(*cli_args, url=None, services=...)`` starts a worker
    process (offering those sample services, by class name, or any ``file.py:Class`` spec);
    all are stopped (SIGTERM, then SIGKILL) at the end."""
    started: list[WorkerProcess] = []

    def start(*args: str, url: str | None = None, services: tuple[str, ...] = WorkerProcess.SERVICES,
              env: dict[str, str] | None = None) -> WorkerProcess:
        worker = WorkerProcess(url or amqp_url, *args, name=f"worker{len(started)}", services=services,
                               env=env)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        try:
            worker.terminate(timeout=20)
        except subprocess.TimeoutExpired:
            worker.kill()
