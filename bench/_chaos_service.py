"""The service of ``bench/chaos.py``: steps of work that checkpoint and resume."""

from __future__ import annotations

import time
from typing import Any

from brokerexec import Input, Service, ServiceHandler


class Steps(Service):
    """Takes ``steps`` steps of ``delay`` seconds, calling ready() before each; resumes from
    its checkpoint and says where from in its progress."""

    name = "steps"
    inputs = (Input("steps", int, default=100), Input("delay", float, default=0.02))

    def __init__(self) -> None:
        self.done = 0
        self.total = 0
        self.resumed_from: int | None = None

    def run(self, handler: ServiceHandler, request: dict[str, Any]) -> dict[str, Any]:
        self.total = request["steps"]
        while self.done < self.total:
            handler.ready()
            time.sleep(request["delay"])  # the work
            self.done += 1
        handler.ready()
        return {"done": self.done, "resumed_from": self.resumed_from}

    def progress(self) -> dict[str, Any]:
        return {"done": self.done, "total": self.total, "resumed_from": self.resumed_from,
                "fraction": self.done / self.total if self.total else 1.0}

    def checkpoint(self) -> dict[str, Any]:
        return {"done": self.done}

    def restore(self, state: dict[str, Any]) -> None:
        self.done = self.resumed_from = state["done"]


class Blob(Service):
    """Holds a state of ``size`` characters, checkpointed on request, until aborted (the
    memory a worker needs to store one large checkpoint)."""

    name = "blob"
    inputs = (Input("size", int, default=1024),)

    def __init__(self) -> None:
        self.blob = ""

    def run(self, handler: ServiceHandler, request: dict[str, Any]) -> dict[str, Any]:
        self.blob = "b" * request["size"]
        while True:
            handler.ready()
            time.sleep(0.01)

    def checkpoint(self) -> dict[str, Any]:
        return {"blob": self.blob}

    def restore(self, state: dict[str, Any]) -> None:
        self.blob = state["blob"]
