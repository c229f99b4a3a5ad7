"""Settings: option > env > file > default, checked values with messages naming key, source
and fault, and ``brokerexec config`` (masked), through the real entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from brokerexec.errors import ConfigurationError
from brokerexec.settings import (
    KEYS,
    Origin,
    RabbitMQSettings,
    Settings,
    WorkerSettings,
    load_settings,
    masked_url,
)

ROOT = Path(__file__).resolve().parent.parent
#: No BROKEREXEC_* variable of the session leaks into these runs.
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("BROKEREXEC_")}


def brokerexec(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "brokerexec", *args], capture_output=True,
                          text=True, timeout=60, cwd=ROOT, check=False,
                          env={**CLEAN_ENV, **(env or {})})


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "brokerexec.toml"
    path.write_text('broker = "amqp://bob:s3cret@127.0.0.1:5672/prod?heartbeat=5"\n'
                    "concurrency = 3\nshutdown_grace = 12\nheartbeat = 7\n"
                    'services = ["examples/fit.py:ExponentialFit"]\n', encoding="utf-8")
    return path


def test_the_keys_are_the_leaves_of_the_tree_and_the_defaults_are_its_defaults() -> None:
    # Every leaf of the tree is a key, once, with a flat name of its own.
    assert len({key.name for key in KEYS}) == len(KEYS)
    assert [key.name for key in KEYS][:3] == ["broker", "services", "concurrency"]
    for section, cls in (("worker", WorkerSettings), ("rabbitmq", RabbitMQSettings)):
        leaves = {key.path[1] for key in KEYS if key.path[0] == section}
        assert leaves == set(cls.__dataclass_fields__), section
    assert load_settings(env={}) == Settings()
    assert {key.name: key.value_in(Settings()) for key in KEYS}["pool"] == "thread"


def test_every_worker_setting_is_a_key_abort_grace_and_the_limits_too(tmp_path: Path) -> None:
    path = tmp_path / "limits.toml"
    path.write_text("abort_grace = 3\njob_memory_limit_mb = 512\nprogress_delta = 0.5\n",
                    encoding="utf-8")
    settings = load_settings({"job_time_limit": "60"}, env={"BROKEREXEC_CHECKPOINT_DELTA": "90"},
                             config=str(path))
    worker = settings.worker
    assert (worker.abort_grace, worker.job_memory_limit_mb, worker.job_time_limit) == (3.0, 512.0, 60.0)
    assert (worker.progress_delta, worker.checkpoint_delta) == (0.5, 90.0)
    assert settings.origins["job_time_limit"] == Origin("option", "--job-time-limit")
    with pytest.raises(ConfigurationError, match=r"'job_time_limit' from env BROKEREXEC_JOB_TIME_LIMIT: "
                       r"0\.0 is out of range: it must be greater than 0"):
        load_settings(env={"BROKEREXEC_JOB_TIME_LIMIT": "0"})


def test_a_section_made_in_python_is_checked_by_the_same_kinds() -> None:
    assert WorkerSettings(shutdown_grace=30).shutdown_grace == 30.0  # a number, as a float
    with pytest.raises(ConfigurationError, match="WorkerSettings: runner: 'fork' is not one of "
                       "thread, process"):
        WorkerSettings(runner="fork")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=r"RabbitMQSettings: lease_renew: 0\.0 is out of range"):
        RabbitMQSettings(lease_renew=0.0)


def test_option_beats_env_beats_file_beats_default(config_file: Path) -> None:
    # Given concurrency in all three places, heartbeat in env and file, grace only in the file
    settings = load_settings({"concurrency": 9}, env={"BROKEREXEC_CONCURRENCY": "5",
                                                      "BROKEREXEC_HEARTBEAT": "4"},
                             config=str(config_file))
    assert (settings.worker.concurrency, settings.rabbitmq.heartbeat,
            settings.worker.shutdown_grace) == (9, 4, 12.0)
    assert settings.rabbitmq.lease_renew == RabbitMQSettings().lease_renew
    assert settings.origins["concurrency"] == Origin("option", "--concurrency")
    assert settings.origins["heartbeat"] == Origin("env", "BROKEREXEC_HEARTBEAT")
    assert settings.origins["shutdown_grace"] == Origin("file", str(config_file))
    assert "lease_renew" not in settings.origins
    assert settings.services == ("examples/fit.py:ExponentialFit",)


def test_the_file_is_named_by_the_environment_unless_an_option_names_one(
        config_file: Path, tmp_path: Path) -> None:
    assert load_settings(env={"BROKEREXEC_CONFIG": str(config_file)}).worker.concurrency == 3
    other = tmp_path / "other.toml"
    other.write_text("concurrency = 2\n", encoding="utf-8")
    assert load_settings(env={"BROKEREXEC_CONFIG": str(config_file)},
                         config=str(other)).worker.concurrency == 2


@pytest.mark.parametrize(("env", "text", "message"), [
    ({"BROKEREXEC_CONCURRENCY": "0"}, "", "setting 'concurrency' from env BROKEREXEC_CONCURRENCY: "
     "0 is out of range: it must be at least 1"),
    ({"BROKEREXEC_HEARTBEAT": "ten"}, "", "'heartbeat' from env BROKEREXEC_HEARTBEAT: 'ten' is "
     "not an integer"),
    ({"BROKEREXEC_RUNNER": "fork"}, "", "'runner' from env BROKEREXEC_RUNNER: 'fork' is not one "
     "of thread, process"),
    ({}, "shutdown_grace = -1\n", "'shutdown_grace' from file {path}: -1 is out of range"),
    ({}, 'concurrency = "4"\n', "'concurrency' from file {path}: '4' is not an integer"),
    ({}, "concurency = 4\n", "config file {path}: unknown key 'concurency'"),
    ({}, "concurrency = \n", "config file {path} is not valid TOML"),
])
def test_a_bad_value_names_the_key_its_source_and_the_fault(
        tmp_path: Path, env: dict[str, str], text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigurationError) as caught:
        load_settings(env=env, config=str(path))
    assert message.format(path=path) in str(caught.value)


def test_a_missing_file_names_what_named_it() -> None:
    with pytest.raises(ConfigurationError, match="cannot read the config file /nonexistent.toml "
                       r"\(named by BROKEREXEC_CONFIG\)"):
        load_settings(env={"BROKEREXEC_CONFIG": "/nonexistent.toml"})


def test_a_verb_reading_only_the_broker_ignores_bad_worker_settings() -> None:
    settings = load_settings(env={"BROKEREXEC_CONCURRENCY": "0", "BROKEREXEC_URL": "amqp://x/"},
                             only=("broker",))
    assert settings.broker == "amqp://x/"


@pytest.mark.parametrize(("url", "shown"), [
    ("amqp://bob:s3cret@host:5672/v?heartbeat=5", "amqp://bob:***@host:5672/v?heartbeat=5"),
    ("amqps://bob@host/", "amqps://bob@host/"),
    ("amqp://host/", "amqp://host/"),
])
def test_masked_url_hides_only_the_password(url: str, shown: str) -> None:
    assert masked_url(url) == shown


# ---- through the entry point -------------------------------------------------------------------


def test_config_prints_each_setting_and_its_origin_with_the_password_masked(
        config_file: Path) -> None:
    done = brokerexec("--config", str(config_file), "config", "--concurrency", "8",
                      env={"BROKEREXEC_HEARTBEAT": "4"})
    assert done.returncode == 0, done.stderr
    lines = {line.split()[0]: line for line in done.stdout.splitlines()}
    assert set(lines) == {key.name for key in KEYS}
    assert lines["concurrency"].split()[1:] == ["8", "(option", "--concurrency)"]
    assert lines["heartbeat"].split()[1:] == ["4", "(env", "BROKEREXEC_HEARTBEAT)"]
    assert lines["shutdown_grace"].split()[1:] == ["12.0", "(file", f"{config_file})"]
    assert lines["lease_renew"].split()[2:] == ["(default)"]
    assert "amqp://bob:***@127.0.0.1:5672/prod?heartbeat=5" in lines["broker"]
    assert "s3cret" not in done.stdout + done.stderr


def test_config_json_is_one_document_with_values_and_sources(config_file: Path) -> None:
    done = brokerexec("config", "--json", env={"BROKEREXEC_CONFIG": str(config_file),
                                               "BROKEREXEC_URL": "amqp://u:pw@127.0.0.1/"})
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert rows["broker"] == {"value": "amqp://u:***@127.0.0.1/", "source": "env",
                              "from": "BROKEREXEC_URL"}
    assert rows["concurrency"] == {"value": 3, "source": "file", "from": str(config_file)}
    assert rows["pool_size"] == {"value": None, "source": "default", "from": ""}
    assert "pw" not in done.stdout


@pytest.mark.parametrize(("args", "env", "message"), [
    (["worker"], {"BROKEREXEC_CONCURRENCY": "-2"},
     "setting 'concurrency' from env BROKEREXEC_CONCURRENCY: -2 is out of range"),
    (["worker", "--config", "/nonexistent.toml"], {},
     "cannot read the config file /nonexistent.toml (named by --config)"),
    (["status", "abc"], {"BROKEREXEC_CONFIG": "/nonexistent.toml"},
     "cannot read the config file /nonexistent.toml (named by BROKEREXEC_CONFIG)"),
    (["config"], {"BROKEREXEC_LOG_FORMAT": "xml"},
     "setting 'log_format' from env BROKEREXEC_LOG_FORMAT: 'xml' is not one of text, json"),
])
def test_bad_settings_exit_2_with_the_message(args: list[str], env: dict[str, str],
                                              message: str) -> None:
    done = brokerexec(*args, env=env)
    assert done.returncode == 2, done
    assert message in done.stderr and "Traceback" not in done.stderr


def test_every_verb_takes_the_broker_from_the_file(tmp_path: Path) -> None:
    # Given a file naming a broker nobody listens on, a client verb goes there (exit 5)
    path = tmp_path / "c.toml"
    path.write_text('broker = "amqp://guest:guest@127.0.0.1:1/"\n', encoding="utf-8")
    done = brokerexec("--config", str(path), "status", "abc")
    assert done.returncode == 5, done
    assert "127.0.0.1:1" in done.stderr
    # and an option still wins over it
    done = brokerexec("--config", str(path), "status", "abc", "--broker", "memory://")
    assert done.returncode == 2 and "amqp:// or amqps://" in done.stderr


def test_an_option_equal_to_its_default_still_wins_over_the_environment() -> None:
    done = brokerexec("config", "--json", "--concurrency", "1", "--log-level", "info",
                      env={"BROKEREXEC_CONCURRENCY": "4", "BROKEREXEC_LOG_LEVEL": "debug"})
    rows = json.loads(done.stdout)
    assert rows["concurrency"] == {"value": 1, "source": "option", "from": "--concurrency"}
    assert rows["log_level"]["value"] == "INFO" and rows["log_level"]["source"] == "option"


def test_the_worker_table_of_docs_cli_has_every_key_and_its_default() -> None:
    # Given the table's rows: | `--option ...` | `key` / `VARIABLE` ... | default | meaning |
    page = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    rows = [line.replace("\\|", "/").split("|")[1:-1] for line in page.splitlines()
            if line.startswith("| `--")]
    documented: dict[str, str] = {}
    for _option, keys, default, _meaning in rows:
        names = [name.strip(" `") for name in keys.split("/")[0].split(",")]
        defaults = [value.strip(" `") for value in default.split(",")]
        if len(defaults) != len(names):
            defaults = [""] * len(names)
        documented.update(zip(names, defaults, strict=True))
    # Then every key has its row, and a single default reads as the model's
    assert set(documented) == {key.name for key in KEYS}
    for key in KEYS:
        shown = documented[key.name]
        if not shown or key.name in ("services", "pool_size"):
            continue  # "entry points", "CPUs": what none means there
        if isinstance(key.default, float):  # 7776000 as written, not 7.776e+06
            assert float(shown) == key.default, key.name
            continue
        expected = "none" if key.default is None else str(key.default)
        assert shown == expected, key.name
