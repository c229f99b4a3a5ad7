"""A service's child process in another interpreter, or in an application's own Python
(Qube's child back end): Debian's ``/usr/bin/python3``, which has no brokerexec installed.

The child-runner tests of ``test_child_runner.py`` run again here with the worker's
``child_python`` set to it (this module's ``client_with``): signals, checkpoints, improved
states, crashes, aborts and hard aborts cross the same back channel. Then what is new: the
interpreter and path the child really has, resume, a worker over RabbitMQ SIGKILLed mid-job,
the errors (a missing interpreter, one too old, a service that does not import there), the
service's child_setup()/child_teardown(), and ChildCommand.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sample_services
from test_child_runner import (  # noqa: F401 - run again here, with this module's client_with
    Inbox,
    child_clients,
    child_pids,
    launch_watched,
    test_a_child_that_dies_fails_only_its_job_and_the_worker_runs_the_next,
    test_a_service_that_cannot_be_made_in_the_child_fails_its_job,
    test_abort_of_a_job_blocked_in_c_kills_it_after_the_grace,
    test_improved_checkpoint_and_the_result_cross_back,
    test_set_invoke_progress_and_pause_cross_to_the_child,
    test_the_group_goes_with_the_computation,
)

from brokerexec import Client, ConfigurationError, RemoteError, Service, ServiceHandler, WorkerSettings
from brokerexec.child.runner import ProcessRunner
from brokerexec.core.child_command import ChildCommand
from brokerexec.core.registry import load_service

#: Another interpreter than the worker's, with no brokerexec installed for it.
OTHER_PYTHON = "/usr/bin/python3"
WAIT = 30.0
CHILD_SERVICES = [*sample_services.CHILD, sample_services.SetUpAndTearDown, sample_services.SetUpFails,
                  sample_services.TearDownFails]

pytestmark = pytest.mark.skipif(not os.access(OTHER_PYTHON, os.X_OK) and not os.environ.get("CI"),
                                reason=f"no {OTHER_PYTHON} (Debian's python3 package) on this machine")


def test_the_other_interpreter_has_no_brokerexec_of_its_own() -> None:
    # What the tests below stand on: brokerexec reaches the child from the worker alone.
    found = subprocess.run([OTHER_PYTHON, "-c", "import brokerexec"], capture_output=True, text=True,
                           timeout=WAIT, cwd="/")
    assert found.returncode != 0 and "No module named 'brokerexec'" in found.stderr


@pytest.fixture
def client_with() -> Iterator[Callable[..., Client]]:
    """``client_with(**worker_settings)``: a memory:// client whose worker runs each job in a
    child of :data:`OTHER_PYTHON`."""
    yield from child_clients(CHILD_SERVICES, child_python=OTHER_PYTHON)


def test_the_child_runs_the_other_interpreter_with_its_own_path(client_with: Callable[..., Client]) -> None:
    client = client_with()
    job, _ = launch_watched(client, "where", {})
    seen = job.invoke("interpreter")
    child = job.invoke("pid")
    assert os.path.realpath(f"/proc/{child}/exe") == os.path.realpath(OTHER_PYTHON)
    assert seen["executable"] == OTHER_PYTHON
    # its own packages, not the worker's (built for another Python); brokerexec and the
    # service's folder from the worker
    assert not [folder for folder in seen["path"] if "site-packages" in folder and ".venv" in folder], seen
    assert seen["brokerexec"] == os.path.realpath(sample_services.__file__.replace(
        "tests/sample_services.py", "brokerexec/__init__.py"))
    assert str(Path(sample_services.__file__).parent) in seen["path"]
    job.abort()


def test_resume_restores_the_checkpoint_in_the_other_interpreter() -> None:
    runner = ProcessRunner(python=OTHER_PYTHON)
    try:
        handler = ServiceHandler(runner=runner, name="resumed")
        handler.start(sample_services.Counter(), sample_services.Counter.validate({"steps": 3}),
                      resume=True, state={"count": 50})
        assert handler.join(WAIT)["result"] == {"count": 53, "label": ""}
    finally:
        runner.close()
    assert runner.live == 0


@pytest.mark.rabbitmq
def test_a_worker_sigkilled_mid_job_and_its_job_resumed_both_in_the_other_interpreter(
        amqp_url: str, worker_process: Any) -> None:
    args = ("--child-python", OTHER_PYTHON, "--resume-grace", "0.5", "--heartbeat", "2")
    first = worker_process(*args, services=("Steps",))
    with Client(amqp_url) as client:
        inbox = Inbox()
        job_id = uuid.uuid4().hex
        client.subscribe(f"*.*.{job_id}", inbox)
        job = client.launch("steps", {"steps": 400, "delay": 0.01}, job_id=job_id, checkpoint_delta=0.2)
        inbox.wait_for(lambda events: sum(e.kind == "checkpoint" for e in events) >= 2, WAIT)
        (child,) = child_pids(first.pid)
        assert os.path.realpath(f"/proc/{child}/exe") == os.path.realpath(OTHER_PYTHON)
        os.kill(first.pid, signal.SIGKILL)
        first.process.wait(10)
        second = worker_process(*args, services=("Steps",))
        result = job.result(60)
        assert result["done"] == 400 and result["resumed_from"] > 0  # from its checkpoint
        assert job.record()["attempt"] == 2 and second.process.poll() is None


def _failed_fast(client: Client, service: str) -> tuple[dict[str, Any], float]:
    started = time.monotonic()
    job = client.launch(service, {})
    with pytest.raises(RemoteError):
        job.result(WAIT)
    return job.record(), time.monotonic() - started


def test_a_missing_interpreter_fails_the_job_at_once_and_the_worker_goes_on(
        client_with: Callable[..., Client], tmp_path: Path) -> None:
    client = client_with(child_python=str(tmp_path / "no-such-python"))
    record, took = _failed_fast(client, "counter")
    assert record["state"] == "failed" and took < 10
    assert record["error"]["type"] == "brokerexec.ConfigurationError"
    assert f"the child's interpreter {tmp_path / 'no-such-python'} cannot be run: No such file" in (
        record["error"]["message"])


def test_an_interpreter_too_old_fails_the_job_saying_so(client_with: Callable[..., Client],
                                                        tmp_path: Path) -> None:
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 3.8.18\n")  # says it is Python 3.8, whatever it is asked
    fake.chmod(0o755)
    client = client_with(child_python=str(fake))
    record, took = _failed_fast(client, "counter")
    assert took < 10
    assert record["error"]["message"] == (f"the child's interpreter {fake} is Python 3.8.18: the child "
                                          "runner needs 3.10 or newer")


def test_a_service_that_does_not_import_in_the_child_fails_its_job_and_the_next_runs(
        client_with: Callable[..., Client], tmp_path: Path) -> None:
    module = tmp_path / "needs_pika.py"
    module.write_text("import pika  # the worker has it, the other interpreter not\n"
                      "from brokerexec import Service\n\n"
                      "class NeedsPika(Service):\n    name = 'needs-pika'\n\n"
                      "    def run(self, handler, request):\n        return pika.__version__\n")
    needs_pika = load_service(f"{module}:NeedsPika")
    client = Client(f"memory://other-{uuid.uuid4().hex}", services=[needs_pika, sample_services.Counter],
                    worker_settings=WorkerSettings(child_python=OTHER_PYTHON, concurrency=1))
    with client:
        record, took = _failed_fast(client, "needs-pika")
        assert took < 10
        assert record["error"]["type"] == "brokerexec.ConfigurationError"
        assert record["error"]["message"] == (f"cannot load service '{module}:NeedsPika': "
                                              "ModuleNotFoundError: No module named 'pika'")
        assert "import pika" in record["error"]["traceback"]  # where, in the child
        assert client.launch("counter", {"steps": 2}).result(WAIT)["count"] == 2


def test_child_setup_runs_before_the_work_and_child_teardown_after_it(
        client_with: Callable[..., Client], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BROKEREXEC_TEST_TEARDOWN", str(tmp_path / "torn-down"))
    client = client_with()
    done = client.launch("set-up", {}).result(WAIT)
    assert done["set_up"] is True
    assert (tmp_path / "torn-down").read_text() == str(done["pid"])  # in the child, after the work
    failed, _ = _failed_fast(client, "set-up-fails")
    assert failed["error"]["type"] == "RuntimeError"
    assert failed["error"]["message"] == "SetUpFails.child_setup() failed: no licence for this host"
    torn, _ = _failed_fast(client, "tear-down-fails")
    assert torn["error"]["message"] == "TearDownFails.child_teardown() failed: the scene would not close"
    assert torn["result"]["set_up"] is True  # the work's result is kept


def test_a_child_command_starts_an_application_its_own_way(tmp_path: Path) -> None:
    # The child imports them from sample_services' folder, with no brokerexec of its own
    with Client(f"memory://app-{uuid.uuid4().hex}", services=[
            sample_services.InApplication, sample_services.InApplicationByCode,
            sample_services.ApplicationThatWillNotStart]) as client:
        for service in ("in-application", "in-application-by-code"):
            assert client.launch(service, {}).result(WAIT) == {
                "app": "ready", "mode": "batch", "cwd": "/", "executable": OTHER_PYTHON}, service
        record, took = _failed_fast(client, "no-licence")
        assert took < 10 and record["error"]["type"] == "brokerexec.ComputationDied"
        assert record["error"]["message"] == ("computation process exited with status 1; its last lines "
                                              "on stderr:\nno licence for this host")


def test_a_child_command_and_child_python_are_checked() -> None:
    for args in ([], "python", ["python", "-c", "print(1)"]):
        with pytest.raises(ConfigurationError, match="ChildCommand"):
            ChildCommand(args)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="setup"):
        ChildCommand(["python", "{bootstrap_file}"], setup="import bpy")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="child_python"):
        class Bad(Service):  # refused as it is defined
            name = "bad"
            child_python = ""  # type: ignore[assignment]
    assert sample_services.InApplication.runs_in_child() and not sample_services.Counter.runs_in_child()


def test_the_brokerexec_folder_of_a_worker_that_died_is_swept_by_the_next() -> None:
    from brokerexec.child import interpreters

    gone = subprocess.Popen(["true"])
    gone.wait()
    temp = Path(tempfile.gettempdir())
    dead = temp / f"brokerexec-child-path-{gone.pid}-x1"
    alive = temp / f"brokerexec-child-path-{os.getpid()}-x2"
    for folder in (dead, alive):
        folder.mkdir()
        (folder / "brokerexec").symlink_to(interpreters.PACKAGE)
    try:
        interpreters._sweep_folders()
        assert not dead.exists() and (alive / "brokerexec").is_symlink()
    finally:
        for folder in (dead, alive):
            shutil.rmtree(folder, ignore_errors=True)


class NoApplication(Service):
    """Its child_command() raises: the worker's own call of the service's code."""

    name = "no-application"

    @classmethod
    def child_command(cls) -> ChildCommand:
        raise FileNotFoundError("no blender on this host")


def test_a_child_command_that_raises_fails_its_job_and_the_worker_goes_on() -> None:
    with Client(f"memory://app-{uuid.uuid4().hex}", services=[NoApplication, sample_services.Counter],
                worker_settings=WorkerSettings(concurrency=1)) as client:
        record, _ = _failed_fast(client, "no-application")
        assert record["error"]["message"] == ("NoApplication.child_command() raised FileNotFoundError: "
                                              "no blender on this host")
        assert client.launch("counter", {"steps": 2}).result(WAIT)["count"] == 2
