"""The files in ``deploy/`` parse, and every brokerexec command they run is one the CLI accepts.

Each command line is parsed by the real click group (``brokerexec.cli:cli``), so an option
that does not exist, a bad value or a missing argument fails here, not on a production host.
The stop timeouts are checked against the ``--shutdown-grace`` the same file passes, the
autoscaler's queues against the services the workers really run, and the history indexer's
store against where each file keeps it (a volume, a state folder, a Secret).
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


def check_history(argv: list[str]) -> dict[str, Any]:
    verb, params = parse_command(argv)
    assert verb == "history"
    assert params["metrics_port"], "every file here serves the indexer's metrics"
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


def systemd_service(name: str) -> configparser.SectionProxy:
    """The ``[Service]`` section of a unit in deploy/systemd."""
    # interpolation=None: systemd's %-specifiers are not configparser's.
    unit = configparser.ConfigParser(interpolation=None, strict=True)
    unit.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    unit.read(DEPLOY / "systemd" / name, encoding="utf-8")
    assert set(unit.sections()) == {"Unit", "Service", "Install"}
    return unit["Service"]


def test_systemd_unit_runs_a_valid_worker_and_stops_gracefully() -> None:
    service = systemd_service("brokerexec-worker.service")
    params = check_worker(shlex.split(service["ExecStart"]))
    assert service["KillSignal"] == "SIGTERM"
    # Only the worker gets SIGTERM; a child process of --runner process is the worker's to stop.
    assert service["KillMode"] == "mixed"
    assert int(service["TimeoutStopSec"]) >= params["shutdown_grace"] + STOP_MARGIN
    assert service["Restart"] == "on-failure"
    assert "2" in service["RestartPreventExitStatus"].split()  # a usage error is not retried


def test_systemd_unit_runs_a_valid_history_indexer_with_its_store_in_its_state_folder() -> None:
    service = systemd_service("brokerexec-history.service")
    check_history(shlex.split(service["ExecStart"]))
    # The SQLite file, unless the environment file names another store: in the folder systemd
    # makes for the unit's user, the one it may write to under ProtectSystem=strict.
    name, _, store = service["Environment"].partition("=")
    assert name == "BROKEREXEC_HISTORY_STORE" and name in envvars_read_by("history")
    assert service["ProtectSystem"] == "strict"
    assert Path(store).parent == Path("/var/lib") / service["StateDirectory"]
    assert service["KillSignal"] == "SIGTERM"
    assert service["Restart"] == "on-failure"
    assert "2" in service["RestartPreventExitStatus"].split()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("name", ["brokerexec-worker.service", "brokerexec-history.service"])
def test_systemd_accepts_every_setting_of_the_unit(tmp_path: Path, name: str) -> None:
    # systemd's own parser: a misspelt key or value is only a warning (rc 0), so any output
    # fails. The unit's brokerexec is not installed here: the copy runs /bin/true instead.
    text = (DEPLOY / "systemd" / name).read_text(encoding="utf-8")
    unit = tmp_path / name
    unit.write_text(re.sub(r"^ExecStart=\S+", "ExecStart=/bin/true", text, flags=re.MULTILINE),
                    encoding="utf-8")
    verified = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                              text=True, timeout=60)
    assert (verified.returncode, verified.stdout + verified.stderr) == (0, "")


@pytest.mark.parametrize(("name", "verb"), [("worker.env.example", "worker"),
                                            ("history.env.example", "history")])
def test_systemd_environment_file_sets_only_what_its_verb_reads(name: str, verb: str) -> None:
    text = (DEPLOY / "systemd" / name).read_text(encoding="utf-8")
    # A line commented out is a setting too, to be set by removing its "# ".
    names = set(re.findall(r"^(?:# )?([A-Z_]+)=", text, re.MULTILINE))
    assert "BROKEREXEC_URL" in names and names <= envvars_read_by(verb)


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


def test_compose_runs_one_valid_history_indexer_with_its_store_on_a_volume() -> None:
    compose = yaml.safe_load((DEPLOY / "compose" / "compose.yaml").read_text(encoding="utf-8"))
    services = compose["services"]
    history = services["history"]
    params = check_history(history["command"])
    assert "replicas" not in history.get("deploy", {})  # one indexer on a SQLite file
    assert (history["image"], history["build"]) == (services["worker"]["image"], services["worker"]["build"])
    assert history["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
    assert history["stop_signal"] == "SIGTERM"
    assert set(history["environment"]) <= envvars_read_by("history")
    assert "@rabbitmq:" in history["environment"]["BROKEREXEC_URL"]
    assert str(params["metrics_port"]) in history["expose"] and params["metrics_host"] == "0.0.0.0"
    # The SQLite file is on a named volume, whose folder the image makes its user's (a fresh
    # volume takes the owner of the folder it is mounted on).
    folder = str(Path(params["history_store"]).parent)
    [volume] = [v for v, f in (one.split(":", 1) for one in history["volumes"]) if f == folder]
    assert volume in compose["volumes"]
    dockerfile = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    (user,) = re.findall(r"^USER (\S+)$", dockerfile, re.MULTILINE)
    assert f"install -d -o {user} {folder}" in dockerfile


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
    template, container, argv = deployment_container("brokerexec-worker")
    return template["spec"], container, argv


def deployment_container(name: str) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """A Deployment's pod template, its container, and the command line it runs (args expanded)."""
    objects = kubernetes_objects()
    template = objects["Deployment", name]["spec"]["template"]
    (container,) = template["spec"]["containers"]
    env: dict[str, str] = {}
    for source in container["envFrom"]:
        data = objects["ConfigMap", source["configMapRef"]["name"]]["data"]
        assert all(isinstance(value, str) for value in data.values())  # ConfigMap data are strings
        env.update(data)
    return template, container, [expand(a, env) for a in [*container["command"], *container["args"]]]


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


def test_kubernetes_history_indexer_is_valid_and_its_urls_come_from_secrets() -> None:
    objects = kubernetes_objects()
    template, container, argv = deployment_container("brokerexec-history")
    check_history(argv)
    assert "--store" not in argv  # the Secret's, not the args'
    env = {variable["name"]: variable["valueFrom"]["secretKeyRef"] for variable in container["env"]}
    assert set(env) <= envvars_read_by("history")
    for name, schemes in (("BROKEREXEC_URL", ("amqp://", "amqps://")),
                          ("BROKEREXEC_HISTORY_STORE", ("postgresql://",))):
        secret = objects["Secret", env[name]["name"]]
        assert secret["stringData"][env[name]["key"]].startswith(schemes), name
    # A PostgreSQL store: the image has its driver
    assert '"/src[postgresql,web]"' in (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    # The rolling update starts the new indexer first (two on one PostgreSQL store is allowed)
    strategy = objects["Deployment", "brokerexec-history"]["spec"]["strategy"]
    assert strategy["rollingUpdate"]["maxUnavailable"] == 0
    assert template["spec"]["terminationGracePeriodSeconds"] >= 10


@pytest.mark.parametrize("name", ["brokerexec-worker", "brokerexec-history"])
def test_kubernetes_metrics_are_served_where_prometheus_and_the_probes_look(name: str) -> None:
    template, container, argv = deployment_container(name)
    _verb, params = parse_command(argv)
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert params["metrics_host"] == "0.0.0.0"  # the pod's network
    assert ports["metrics"] == params["metrics_port"]
    assert int(template["metadata"]["annotations"]["prometheus.io/port"]) == params["metrics_port"]
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        if probe in container:
            port = container[probe]["httpGet"]["port"]
            assert ports.get(port, port) == params["metrics_port"], probe


def test_compose_serves_the_web_view_of_the_indexers_store_on_the_hosts_loopback_only() -> None:
    compose = yaml.safe_load((DEPLOY / "compose" / "compose.yaml").read_text(encoding="utf-8"))
    services = compose["services"]
    web, history = services["web"], services["history"]
    verb, params = parse_command(web["command"])
    assert verb == "web"
    assert params["history_store"] == check_history(history["command"])["history_store"]  # the same file
    assert set(web["volumes"]) & set(history["volumes"])  # on the same volume
    assert params["host"] == "0.0.0.0" and web["ports"] == [f"127.0.0.1:{params['port']}:{params['port']}"]
    assert set(web["environment"]) <= envvars_read_by("web")
    assert (web["image"], web["build"]) == (services["worker"]["image"], services["worker"]["build"])
    assert '"/src[postgresql,web]"' in (DEPLOY / "Dockerfile").read_text(encoding="utf-8")


def test_kubernetes_web_view_trusts_only_the_proxys_header_and_only_the_ingress_reaches_it() -> None:
    objects = kubernetes_objects()
    _template, container, argv = deployment_container("brokerexec-web")
    verb, params = parse_command(argv)
    assert verb == "web" and params["trusted_header"] == "X-Auth-Request-User"
    env = {variable["name"]: variable["valueFrom"]["secretKeyRef"] for variable in container["env"]}
    assert set(env) <= envvars_read_by("web")
    assert env["BROKEREXEC_HISTORY_STORE"]["name"] == "brokerexec-history-store"  # the indexer's store
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports["http"] == params["port"]
    ingress = objects["Ingress", "brokerexec-web"]
    annotations = ingress["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/auth-response-headers"] == params["trusted_header"]
    assert "oauth2" in annotations["nginx.ingress.kubernetes.io/auth-url"]
    service = objects["Service", "brokerexec-web"]["spec"]
    assert service["selector"] == {"app.kubernetes.io/name": "brokerexec-web"}
    policy = objects["NetworkPolicy", "brokerexec-web"]["spec"]
    assert [port["port"] for rule in policy["ingress"] for port in rule["ports"]] == [params["port"]]
