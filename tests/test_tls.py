"""TLS and credentials: ``amqps://`` URLs for the worker, the clients and the CLI.

Against a throw-away TLS node of :mod:`rabbitnodes` (its own CA, server and client
certificates, made here; the node verifies client certificates) and a user with a password
of its own, so that the tests can check the password never shows: not in the CLI's output,
not in the worker's log, not in the connection names the broker lists.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlencode

import pytest
from rabbitnodes import RabbitNode, TlsFiles, make_tls_files, require_installed

from brokerexec import AsyncClient, Client
from brokerexec.errors import BrokerConnectionError, ConfigurationError
from brokerexec.transport.rabbitmq.connection_settings import ConnectionSettings
from brokerexec.transport.tls import split_tls

ROOT = Path(__file__).resolve().parent.parent
FIT = "examples/fit.py:ExponentialFit"
WAIT = 60.0
USER = "bx-tls"


class Tls(NamedTuple):
    node: RabbitNode
    files: TlsFiles
    other: TlsFiles  # another CA: trusted by nobody
    password: str

    def url(self, *, host: str = "127.0.0.1", cafile: Path | None = None, **query: str) -> str:
        """An amqps URL of the node with our client certificate and ``query`` on top."""
        params = {"cafile": str(cafile or self.files.ca_cert), "certfile": str(self.files.client_cert),
                  "keyfile": str(self.files.client_key), **query}
        return f"amqps://{USER}:{self.password}@{host}:{self.node.tls_port}/?{urlencode(params)}"


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tls]:
    """One TLS node for the module, with a user of its own; stopped (data and all) at the end."""
    require_installed("start a TLS node")
    root = tmp_path_factory.mktemp("tls")
    files, other = make_tls_files(root / "ca"), make_tls_files(root / "other-ca")
    password = f"pw-{secrets.token_hex(8)}"
    with RabbitNode(root, tls=files) as node:  # stopped even when a test or the setup fails
        node.ctl("add_user", USER, password)
        node.ctl("set_permissions", "-p", "/", USER, ".*", ".*", ".*")
        yield Tls(node, files, other, password)


def brokerexec(*args: str, timeout: float = WAIT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "brokerexec", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def assert_one_line_without(result: subprocess.CompletedProcess[str], secret: str, *texts: str) -> None:
    """A refusal: one ``brokerexec:`` line on stderr, saying ``texts``, no traceback, no secret."""
    output = result.stdout + result.stderr
    assert secret not in output
    assert "Traceback" not in output, output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("brokerexec: "), result.stderr
    for text in texts:
        assert text in lines[0], lines[0]


# ---- the URL convention, no broker ------------------------------------------------------------


def test_tls_keys_leave_the_url_and_verification_is_on_by_default(tmp_path: Path) -> None:
    url, options = split_tls("amqps://u:p@broker:5671/v?cafile=/ca.pem&heartbeat=5&certfile=/c&keyfile=/k")
    assert url == "amqps://u:p@broker:5671/v?heartbeat=5"  # what pika is given: no unknown keys
    assert options is not None and options.verify and options.hostname == "broker"
    assert (options.cafile, options.certfile, options.keyfile) == ("/ca.pem", "/c", "/k")
    assert split_tls("amqps://broker/?server_hostname=rmq.example")[1].hostname == "rmq.example"  # type: ignore[union-attr]
    assert split_tls("amqp://broker/?heartbeat=5") == ("amqp://broker/?heartbeat=5", None)


@pytest.mark.parametrize(("url", "message"), [
    ("amqp://broker/?cafile=/ca.pem", "use amqps:// for TLS"),
    ("amqps://broker/?keyfile=/k", "keyfile given without certfile"),
    ("amqps://broker/?no_verify_ssl=yes", "no_verify_ssl must be 0 or 1"),
    ("amqps://broker/?cafile=/a&cafile=/b", "given twice"),
])
def test_bad_tls_parameters_are_configuration_errors(url: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        split_tls(url)


def test_a_missing_ca_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    _, options = split_tls(f"amqps://broker/?cafile={missing}")
    assert options is not None
    with pytest.raises(ConfigurationError, match=f"cannot load the CA certificates.*{missing}"):
        options.context()


def test_settings_never_show_the_password() -> None:
    settings = ConnectionSettings(url="amqps://worker:hunter2@broker/?cafile=/ca.pem")
    assert "hunter2" not in repr(settings) and "worker:***@broker" in repr(settings)
    assert "hunter2" not in settings.redacted_url()
    assert "cafile" not in settings.connection_url()  # TLS travels as connect keywords


def test_an_unsupported_scheme_is_refused_without_the_password() -> None:
    with pytest.raises(ConfigurationError) as refused:
        Client("http://me:hunter2@broker/")
    assert "hunter2" not in str(refused.value)


# ---- against the TLS node ---------------------------------------------------------------------


async def launch_async(url: str) -> dict[str, int]:
    async with AsyncClient(url) as client:
        job = await client.launch("fit", {"max_iterations": 60, "tolerance": 0})
        result: dict[str, int] = await job.result(timeout=WAIT)
        return result



@pytest.mark.rabbitmq
@pytest.mark.timeout(240)
def test_worker_client_and_cli_run_jobs_over_amqps_without_showing_the_password(tls: Tls) -> None:
    # Given a worker process connected over TLS, with a client certificate
    url = tls.url()
    worker = subprocess.Popen(
        [sys.executable, "-m", "brokerexec", "worker", "--broker", url, "--service", FIT,
         "--log-level", "debug", "--shutdown-grace", "5"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert worker.stderr is not None
        log: list[str] = []
        for line in worker.stderr:  # blocks on the pipe, not a sleep; the timeout bounds it
            log.append(line)
            if "worker ready: fit" in line:
                break
        else:
            pytest.fail("the worker exited before it was ready:\n" + "".join(log))
        # When the CLI launches and follows a job, and the Python client runs another
        followed = brokerexec("launch", "fit", "--follow", "--json", "--broker", url)
        with Client(url) as client:
            result = client.launch("fit", {"max_iterations": 50, "tolerance": 0}).result(timeout=WAIT)
            assert asyncio.run(launch_async(url))["iterations"] == 60  # aio-pika's client path
            # Then every connection of that user is TLS, named without the password
            rows = [line.split("\t") for line in
                    tls.node.ctl("list_connections", "user", "ssl", "name").splitlines()]
    finally:
        worker.terminate()
        _, rest = worker.communicate(timeout=WAIT)
    assert followed.returncode == 0, followed.stderr
    assert json.loads(followed.stdout)["state"] == "finished"
    assert result["iterations"] == 50
    ours = [row for row in rows if row[0] == USER]
    assert len(ours) >= 2 and all(row[1] == "true" for row in ours), rows
    assert not any(tls.password in row[2] for row in ours)
    # And the password shows nowhere: not in the CLI's output, not in the worker's debug log
    for text in (followed.stdout, followed.stderr, "".join(log), rest):
        assert tls.password not in text


@pytest.mark.rabbitmq
@pytest.mark.timeout(240)
@pytest.mark.parametrize(("case", "expected"), [
    ("wrong CA", "certificate verify failed"),
    ("wrong hostname", "Hostname mismatch"),
])
def test_an_untrusted_broker_is_one_clear_line_for_every_command(tls: Tls, case: str, expected: str) -> None:
    url = (tls.url(cafile=tls.other.ca_cert) if case == "wrong CA"
           else tls.url(server_hostname="elsewhere.invalid"))
    # The CLI's client commands: exit 5 (broker), one line, no traceback, no password
    for args in (["launch", "fit", "--follow"], ["jobs"]):
        result = brokerexec(*args, "--broker", url)
        assert result.returncode == 5, result.stderr
        assert_one_line_without(result, tls.password, expected, f"{USER}:***@127.0.0.1")
    # A worker does not retry a certificate it cannot trust for ever: it exits, saying why
    worker = brokerexec("worker", "--broker", url, "--service", FIT)
    assert worker.returncode == 5, worker.stderr
    assert tls.password not in worker.stdout + worker.stderr and "Traceback" not in worker.stderr
    assert expected in worker.stderr
    # The Python client raises the library's error
    with pytest.raises(BrokerConnectionError, match=expected):
        Client(url)


@pytest.mark.rabbitmq
@pytest.mark.timeout(120)
def test_a_wrong_password_is_refused_without_showing_it(tls: Tls) -> None:
    url = tls.url().replace(tls.password, "not-the-password")
    result = brokerexec("jobs", "--broker", url)
    assert result.returncode == 5
    assert_one_line_without(result, "not-the-password", f"{USER}:***@")
    # A worker refused on its first connection exits too, instead of retrying for ever
    worker = brokerexec("worker", "--broker", url, "--service", FIT)
    assert worker.returncode == 5, worker.stderr
    assert "not-the-password" not in worker.stdout + worker.stderr and "Traceback" not in worker.stderr
    assert f"{USER}:***@" in worker.stderr
