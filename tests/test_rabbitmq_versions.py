"""Nothing brokerexec declares or asks for is removed or deprecated in RabbitMQ 3.13 and 4.x.

RabbitMQ 3.10 runs here, which cannot deny deprecated features: so the test looks at what a
worker, the CLI and a subscribing client actually left on the broker, in the session's own
vhost, against the list in ``docs/clusters.md`` ("RabbitMQ versions"):

* no transient non-exclusive queue (``transient_nonexcl_queues``: denied by default in 4.3);
* no global QoS (``global_qos``: denied by default in 4.3): every channel's
  ``global_prefetch_count`` is 0;
* no mirroring, queue-mode, master-locator or CQv1 argument (removed in 4.0 and 4.3);
* every queue type is classic, quorum or stream.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from brokerexec import Client

pytestmark = [pytest.mark.rabbitmq, pytest.mark.timeout(180)]
ROOT = Path(__file__).resolve().parent.parent
FIT = "examples/fit.py:ExponentialFit"
WAIT = 60.0
#: Queue arguments RabbitMQ 4.x refuses or ignores (4.0: mirroring gone; 4.3: CQv1 gone,
#: x-queue-master-locator denied by default).
GONE_ARGUMENTS = ("x-ha-policy", "x-queue-mode", "x-queue-master-locator")


def ctl(*args: str) -> list[dict[str, object]]:
    out = subprocess.run(["rabbitmqctl", "-q", *args, "--formatter", "json"], check=True,
                         capture_output=True, text=True, timeout=WAIT).stdout
    return list(json.loads(out or "[]"))


def test_every_declaration_is_allowed_on_rabbitmq_4(amqp_url: str) -> None:
    vhost = unquote(urlparse(amqp_url).path[1:]) or "/"
    # Given a worker process, a job launched and followed from the CLI, and a subscriber
    worker = subprocess.Popen(
        [sys.executable, "-m", "brokerexec", "worker", "--broker", amqp_url, "--service", FIT,
         "--shutdown-grace", "5"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert worker.stderr is not None
        for line in worker.stderr:  # blocks on the pipe; the test's timeout bounds it
            if "worker ready: fit" in line:
                break
        heard = threading.Event()
        with Client(amqp_url) as client:
            subscription = client.subscribe("#", lambda event: heard.set())
            followed = subprocess.run([sys.executable, "-m", "brokerexec", "launch", "fit", "--follow",
                                       "--broker", amqp_url], capture_output=True, text=True,
                                      timeout=WAIT, cwd=ROOT)
            assert followed.returncode == 0, followed.stderr
            assert heard.wait(WAIT)
            # When we look at every queue and channel while all of them are connected
            queues = ctl("list_queues", "-p", vhost, "name", "durable", "exclusive", "type", "arguments")
            channels = ctl("list_channels", "vhost", "name", "global_prefetch_count")
            subscription.close()
    finally:
        worker.terminate()
        worker.communicate(timeout=WAIT)
    # Then no queue is transient and shared, none takes a removed argument, none is mirrored
    assert {q["type"] for q in queues} <= {"classic", "quorum", "stream"}, queues
    assert any(q["exclusive"] for q in queues) and any(q["type"] == "quorum" for q in queues)
    for queue in queues:
        assert queue["durable"] or queue["exclusive"], queue
        # rabbitmqctl lists arguments as [name, AMQP type, value] triples
        arguments = {name: value for name, _, value in queue["arguments"] or []}  # type: ignore[attr-defined]
        assert not set(GONE_ARGUMENTS) & set(arguments), queue
        assert arguments.get("x-queue-version", 2) == 2, queue
    policies = ctl("list_policies", "-p", vhost)
    assert not any("ha-" in json.dumps(policy) for policy in policies)
    # And no channel of ours asks for a global prefetch
    ours = [c for c in channels if c["vhost"] == vhost]
    assert ours and all(c["global_prefetch_count"] == 0 for c in ours), ours
