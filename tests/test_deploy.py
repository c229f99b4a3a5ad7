"""The files in ``deploy/`` parse, and every brokerexec command they run is one the CLI accepts.

Each command line is parsed by the real click group (``brokerexec.cli:cli``), so an option
that does not exist, a bad value or a missing argument fails here, not on a production host.
The stop timeouts are checked against the ``--shutdown-grace`` the same file passes, and the
autoscaler's queues against the services the workers really run.
"""

from __future__ import annotations

import configparser
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from cli_lines import envvars_read_by, parse_command

from brokerexec.core.registry import load_service
from brokerexec.protocol.names import launch_queue

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
#: Seconds a stop needs beyond --shutdown-grace: the last records and the connection's close.
STOP_MARGIN = 15


def check_worker(argv: list[str]) -> dict[str, Any]:
    verb, params = parse_command(argv)
    assert verb == "worker"
    assert params["services"], "a worker without --service runs only entry-point services"
    service_names(params)  # each --service imports and is a named Service
    return params


def service_names(params: dict[str, Any]) -> set[str]:
    # The examples' paths are relative to the image's working folder, a copy of the repo's.
    return {load_service(str(ROOT / spec) if ".py:" in spec else spec).name
            for spec in params["services"]}


# ---- the checker itself bites ---------------------------------------------------------------


def test_the_checker_refuses_an_option_that_does_not_exist() -> None:
    with pytest.raises(click.NoSuchOption):
        parse_command(["brokerexec", "worker", "--no-such-option", "1"])
    with pytest.raises(click.BadParameter):
        parse_command(["brokerexec", "worker", "--shutdown-grace", "soon"])
    with pytest.raises(click.UsageError):
        parse_command(["brokerexec", "wrker"])


# ---- systemd ---------------------------------------------------------------------------------


def test_systemd_unit_runs_a_valid_worker_and_stops_gracefully() -> None:
    # interpolation=None: systemd's %-specifiers are not configparser's.
    unit = configparser.ConfigParser(interpolation=None, strict=True)
    unit.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    unit.read(DEPLOY / "systemd" / "brokerexec-worker.service", encoding="utf-8")
    assert set(unit.sections()) == {"Unit", "Service", "Install"}
    service = unit["Service"]
    params = check_worker(shlex.split(service["ExecStart"]))
    assert service["KillSignal"] == "SIGTERM"
    # Only the worker gets SIGTERM; a child process of --runner process is the worker's to stop.
    assert service["KillMode"] == "mixed"
    assert int(service["TimeoutStopSec"]) >= params["shutdown_grace"] + STOP_MARGIN
    assert service["Restart"] == "on-failure"
    assert "2" in service["RestartPreventExitStatus"].split()  # a usage error is not retried


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_accepts_every_setting_of_the_unit(tmp_path: Path) -> None:
    # systemd's own parser: a misspelt key or value is only a warning (rc 0), so any output
    # fails. The unit's brokerexec is not installed here: the copy runs /bin/true instead.
    text = (DEPLOY / "systemd" / "brokerexec-worker.service").read_text(encoding="utf-8")
    unit = tmp_path / "brokerexec-worker.service"
    unit.write_text(re.sub(r"^ExecStart=\S+", "ExecStart=/bin/true", text, flags=re.MULTILINE),
                    encoding="utf-8")
    verified = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                              text=True, timeout=60)
    assert (verified.returncode, verified.stdout + verified.stderr) == (0, "")


def test_systemd_environment_file_sets_only_what_the_worker_reads() -> None:
    lines = (DEPLOY / "systemd" / "worker.env.example").read_text(encoding="utf-8").splitlines()
    names = {line.split("=", 1)[0] for line in lines if line.strip() and not line.startswith("#")}
    assert names and names <= envvars_read_by("worker")


# ---- the image and compose ---------------------------------------------------------------------


def test_dockerfile_default_command_is_a_valid_worker() -> None:
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    (cmd,) = re.findall(r"^CMD (\[.*\])$", text, re.MULTILINE)
    check_worker(json.loads(cmd))
    for source in re.findall(r"^COPY (.+) \S+$", text, re.MULTILINE):
        for name in source.split():
            assert (ROOT / name).exists(), f"the Dockerfile copies {name}, which the repo lacks"


def test_compose_runs_rabbitmq_and_several_valid_workers() -> None:
    compose = yaml.safe_load((DEPLOY / "compose" / "compose.yaml").read_text(encoding="utf-8"))
    services = compose["services"]
    assert services["rabbitmq"]["image"].startswith("rabbitmq:")
    worker = services["worker"]
    params = check_worker(worker["command"])
    assert worker["deploy"]["replicas"] >= 2
    assert worker["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
    assert worker["stop_signal"] == "SIGTERM"
    grace = re.fullmatch(r"(\d+)s", worker["stop_grace_period"])
    assert grace and int(grace.group(1)) >= params["shutdown_grace"] + STOP_MARGIN
    assert set(worker["environment"]) <= envvars_read_by("worker")
    assert "@rabbitmq:" in worker["environment"]["BROKEREXEC_URL"]  # the compose service's name
    assert (ROOT / worker["build"]["context"].replace("../..", ".") / worker["build"]["dockerfile"]).exists()


# ---- Kubernetes --------------------------------------------------------------------------------


def kubernetes_objects() -> dict[tuple[str, str], dict[str, Any]]:
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            assert {"apiVersion", "kind", "metadata"} <= set(document), path.name
            key = (document["kind"], document["metadata"]["name"])
            assert key not in found, f"{key} defined twice"
            found[key] = document
    return found


def expand(argument: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion of container args."""
    return re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], argument)


def worker_container() -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """The worker pod's spec, its container, and the command line it runs (args expanded)."""
    objects = kubernetes_objects()
    deployment = objects["Deployment", "brokerexec-worker"]
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    env: dict[str, str] = {}
    for source in container["envFrom"]:
        data = objects["ConfigMap", source["configMapRef"]["name"]]["data"]
        assert all(isinstance(value, str) for value in data.values())  # ConfigMap data are strings
        env.update(data)
    return spec, container, [expand(a, env) for a in [*container["command"], *container["args"]]]


def test_kubernetes_worker_is_valid_and_waits_for_the_handover() -> None:
    spec, _container, argv = worker_container()
    params = check_worker(argv)
    assert spec["terminationGracePeriodSeconds"] >= params["shutdown_grace"] + STOP_MARGIN


def test_kubernetes_broker_url_comes_from_the_secret() -> None:
    objects = kubernetes_objects()
    _spec, container, _argv = worker_container()
    (url,) = [e for e in container["env"] if e["name"] == "BROKEREXEC_URL"]
    assert "BROKEREXEC_URL" in envvars_read_by("worker")
    reference = url["valueFrom"]["secretKeyRef"]
    secret = objects["Secret", reference["name"]]
    assert secret["stringData"][reference["key"]].startswith(("amqp://", "amqps://"))


def test_keda_scales_on_the_launch_queues_of_the_services_the_workers_run() -> None:
    objects = kubernetes_objects()
    scaled = objects["ScaledObject", "brokerexec-worker"]
    assert ("Deployment", scaled["spec"]["scaleTargetRef"]["name"]) in objects
    params = check_worker(worker_container()[2])
    triggers = scaled["spec"]["triggers"]
    assert all(t["type"] == "rabbitmq" for t in triggers)
    assert {t["metadata"]["queueName"] for t in triggers} == {
        launch_queue(name) for name in service_names(params)}
    for trigger in triggers:
        authentication = objects["TriggerAuthentication", trigger["authenticationRef"]["name"]]
        (target,) = authentication["spec"]["secretTargetRef"]
        assert target["parameter"] == "host"
        assert target["key"] in objects["Secret", target["name"]]["stringData"]
