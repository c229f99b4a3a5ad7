"""The service of ``bench_web``: runs until aborted, its progress sent every ``progress_delta``."""

from __future__ import annotations

import time
from typing import Any

from brokerexec import Service, ServiceHandler


class Ticker(Service):
    """Calls ready() once a second until aborted (a thousand of them share two worker
    processes); its progress is a fraction going round."""

    name = "ticker"

    def __init__(self) -> None:
        self.done = 0

    def run(self, handler: ServiceHandler, request: dict[str, Any]) -> None:
        while True:
            handler.ready()
            time.sleep(1.0)  # the workload
            self.done += 1

    def progress(self) -> dict[str, Any]:
        return {"done": self.done, "fraction": (self.done % 100) / 100}
