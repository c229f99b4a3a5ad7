"""Code written against the flat layout of brokerexec 0.1 still imports: each old module path
gives the same objects as its new home, with a DeprecationWarning naming that home."""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings

import pytest

import brokerexec
from brokerexec._moved import MOVED

#: The modules of the flat layout (``git ls-tree -r --name-only b6da2a9 brokerexec``).
FLAT_LAYOUT = [
    "aio", "back_channel", "child_computation", "child_main", "child_runner", "cli", "cli_config",
    "cli_fleet", "cli_input", "cli_jobs", "cli_output", "cli_show", "cli_worker", "client", "codec",
    "codec_yaml", "computation", "constants", "crossing", "display", "errors", "handler", "job",
    "logs", "metrics", "pace", "pool", "ports", "registry", "runner", "service", "settings",
    "signal_desk", "states", "worker", "transport.base", "transport.memory", "transport.tls",
    "transport.pushed_records", "transport.memory_worker", "transport.memory_clients",
    "transport.aiormq_internals", "transport.pika_internals",
    *(f"transport.amqp_{name}" for name in (
        "client", "connection", "declare", "delivery", "entries", "failures", "frames", "intake",
        "job_end", "journal", "leases", "outbox", "owned_job", "ownership", "settings", "setups",
        "signal_server", "worker")),
    *(f"transport.pika_{name}" for name in ("caller", "client", "depth", "journal", "listener")),
]


def test_the_old_service_path_gives_the_same_class_and_names_the_new_one() -> None:
    sys.modules.pop("brokerexec.service", None)
    with pytest.warns(DeprecationWarning, match=r"brokerexec\.service moved to brokerexec\.core\.service"):
        from brokerexec.service import Service, check_set
    assert Service is brokerexec.Service
    assert check_set is importlib.import_module("brokerexec.core.service").check_set


def test_a_split_module_answers_for_both_homes_and_says_where_a_name_went() -> None:
    sys.modules.pop("brokerexec.states", None)
    with pytest.warns(DeprecationWarning, match=r"brokerexec\.core\.state_machine and "
                      r"brokerexec\.protocol\.states"):
        old = importlib.import_module("brokerexec.states")
    assert old.JobState is brokerexec.JobState
    assert old.StateMachine.__module__ == "brokerexec.core.state_machine"
    with pytest.raises(AttributeError, match=r"it moved to brokerexec\.core\.state_machine or "
                       r"brokerexec\.protocol\.states"):
        old.NoSuchName  # noqa: B018


def test_the_client_and_errors_paths_are_the_same_modules_as_before() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: these paths did not move
        from brokerexec.client import Client, Job
        from brokerexec.errors import BrokerExecError, JobNotFound
        from brokerexec.worker import Worker, WorkerSettings
    assert (Client, Job, Worker, WorkerSettings) == (brokerexec.Client, brokerexec.Job,
                                                     brokerexec.Worker, brokerexec.WorkerSettings)
    assert issubclass(JobNotFound, BrokerExecError)


@pytest.mark.parametrize("old", FLAT_LAYOUT)
def test_every_module_of_the_flat_layout_still_imports(old: str) -> None:
    # In a fresh interpreter, so that nothing imported by the tests hides a broken path.
    code = (f"import warnings; warnings.simplefilter('ignore'); import brokerexec.{old} as m; "
            "print(len(dir(m)) > 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.stdout.strip() == "True", done.stderr


def test_the_table_names_only_modules_that_exist() -> None:
    for old, homes in MOVED.items():
        for home in homes:
            importlib.import_module(f"brokerexec.{home}")
        assert importlib.util.find_spec(f"brokerexec.{old}") is not None, old
