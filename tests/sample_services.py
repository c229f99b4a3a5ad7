"""Services used by the tests (also loaded by worker subprocesses via file path)."""

from __future__ import annotations

import ctypes
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from brokerexec import ChildCommand, Input, Service, ServiceHandler


class Counter(Service):
    """Counts to ``steps``, calling ready() before each step; ``delay`` seconds per step."""

    name = "counter"
    inputs = (
        Input("steps", int, default=100, help="how far to count"),
        Input("delay", float, default=0.0, help="seconds per step"),
        Input("fail_at", int, default=-1, help="raise ValueError at this step"),
    )
    settable = {"step": int, "label": str, "delay": float}
    invokable = ("snapshot", "add")

    def __init__(self) -> None:
        self.count = 0
        self.step = 1
        self.label = ""
        self.delay = 0.0
        self.steps = 0
        self.applied: list[str] = []

    def run(self, handler: ServiceHandler, request: dict[str, Any]) -> dict[str, Any]:
        self.steps, self.delay = request["steps"], request["delay"]
        for i in range(self.steps):
            handler.ready()
            if i == request["fail_at"]:
                raise ValueError(f"boom at step {i}")
            self.count += self.step
            if self.delay:
                time.sleep(self.delay)  # the workload itself, not a test wait
        handler.ready()
        return {"count": self.count, "label": self.label}

    def snapshot(self) -> dict[str, Any]:
        return {"count": self.count, "label": self.label, "step": self.step}

    def add(self, amount: int) -> int:
        self.count += amount
        self.applied.append(f"add {amount}")
        return self.count

    def progress(self) -> dict[str, Any]:
        done = self.count
        return {"done": done, "total": self.steps,
                "fraction": min(1.0, done / self.steps) if self.steps else 1.0}

    def checkpoint(self) -> dict[str, Any]:
        return {"count": self.count}

    def restore(self, state: dict[str, Any]) -> None:
        self.count = state["count"]


class Forever(Service):
    """Calls ready() until aborted; counts its loops. ``tick`` seconds per loop."""

    name = "forever"
    inputs = (Input("tick", float, default=0.01),)
    settable = {"value": int}
    invokable = ("loops", "current")

    def __init__(self) -> None:
        self.value = 0
        self.n = 0

    def run(self, handler: ServiceHandler, request: dict[str, Any]) -> None:
        while True:
            handler.ready()
            self.n += 1
            time.sleep(request["tick"])  # the workload

    def loops(self) -> int:
        return self.n

    def current(self) -> int:
        return self.value

    def progress(self) -> dict[str, Any]:
        return {"loops": self.n, "value": self.value}


class Gated(Service):
    """Waits on a process-local gate between ready() calls (in-process tests only)."""

    name = "gated"
    settable = {"x": int, "y": str}
    invokable = ("record", "explode")
    gates: dict[str, threading.Event] = {}

    def __init__(self) -> None:
        self.x = 0
        self.y = ""
        self.log: list[Any] = []

    def run(self, handler: ServiceHandler, request: dict[str, Any]) -> list[Any]:
        for _ in range(request.get("rounds", 1)):
            self.log.append("before-ready")
            handler.ready()
            self.log.append("after-ready")
        return self.log

    def record(self, value: Any) -> Any:
        self.log.append(value)
        return value

    def explode(self) -> None:
        raise RuntimeError("invoked method failed")


class NoReady(Service):
    """Never calls ready(): spins for ``seconds``."""

    name = "noready"
    inputs = (Input("seconds", float, default=30.0),)

    def run(self, handler: ServiceHandler, request: dict[str, Any]) -> str:
        end = time.monotonic() + request["seconds"]
        while time.monotonic() < end:
            pass
        return "finished"


class Improver(Service):
    """Reports ``n`` improvements, calling ready() between them."""

    name = "improver"
    inputs = (Input("n", int, default=10), Input("delay", float, default=0.0))

    def run(self, handler: ServiceHandler, request: dict[str, Any]) -> int:
        for i in range(request["n"]):
            handler.ready()
            handler.improved({"i": i})
            if request["delay"]:
                time.sleep(request["delay"])
        return request["n"]


class Sleeper(Service):
    """Trivial job for throughput tests: returns its input."""

    name = "echo"
    inputs = (Input("value", object, default=None),)

    def run(self, handler: ServiceHandler, request: dict[str, Any]) -> Any:
        handler.ready()
        return request["value"]


class Steps(Service):
    """Takes ``steps`` steps of ``delay`` seconds, calling ready() before each; resumes from
    its checkpoint (how many steps were done), and says where it resumed from."""

    name = "steps"
    inputs = (Input("steps", int, default=100), Input("delay", float, default=0.01))
    settable = {"note": str}
    invokable = ("position",)

    def __init__(self) -> None:
        self.done = 0
        self.total = 0
        self.note = ""
        self.resumed_from: int | None = None

    def run(self, handler: ServiceHandler, request: dict[str, Any]) -> dict[str, Any]:
        self.total = request["steps"]
        while self.done < self.total:
            handler.ready()
            time.sleep(request["delay"])  # the workload
            self.done += 1
        handler.ready()
        return {"done": self.done, "resumed_from": self.resumed_from, "note": self.note}

    def position(self) -> int:
        return self.done

    def progress(self) -> dict[str, Any]:
        return {"done": self.done, "total": self.total,
                "fraction": self.done / self.total if self.total else 1.0}

    def checkpoint(self) -> dict[str, Any]:
        return {"done": self.done}

    def restore(self, state: dict[str, Any]) -> None:
        self.done = self.resumed_from = state["done"]


class Fragile(Service):
    """Sleeps ``seconds`` between ready() calls; cannot resume, and fails if its worker is lost."""

    name = "fragile"
    inputs = (Input("seconds", float, default=30.0),)
    on_lost = "fail"

    def run(self, handler: ServiceHandler, request: dict[str, Any]) -> str:
        deadline = time.monotonic() + request["seconds"]
        while time.monotonic() < deadline:
            handler.ready()
            time.sleep(0.01)  # the workload
        return "done"


ALL = [Counter, Forever, Gated, NoReady, Improver, Sleeper, Steps, Fragile]


# ---- for the child-process runner (tests/test_child_runner*.py) -------------------------------


class Where(Service):
    """Calls ready() until aborted; says which process it runs in, and can start a grandchild."""

    name = "where"
    settable = {"value": int}
    invokable = ("pid", "parent", "grandchild", "current", "interpreter")

    def __init__(self) -> None:
        self.value = 0
        self.loops = 0

    def run(self, handler: ServiceHandler, request: dict[str, Any]) -> int:
        while True:
            handler.ready()
            self.loops += 1
            time.sleep(0.005)  # the workload

    def pid(self) -> int:
        return os.getpid()

    def parent(self) -> int:
        return os.getppid()

    def current(self) -> int:
        return self.value

    def grandchild(self) -> int:
        """Start a process of the computation's own (a solver binary, say); its pid."""
        return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]).pid

    def progress(self) -> dict[str, Any]:
        return {"loops": self.loops, "value": self.value, "pid": os.getpid()}

    def interpreter(self) -> dict[str, Any]:
        """Which Python the computation runs in, its path, and where brokerexec came from."""
        import brokerexec

        return {"executable": sys.executable, "version": list(sys.version_info[:3]), "path": sys.path,
                "brokerexec": os.path.realpath(brokerexec.__file__)}


class WhereAlone(Where):
    """``Where``, declaring that it always runs in a child process of its own."""

    name = "where-alone"
    runner = "process"


class Crasher(Service):
    """Calls ready() ``steps`` times (with ``improve``, each followed by an improved state),
    then dies: "segv", "exit" (os._exit(3)) or "kill" (SIGKILL)."""

    name = "crasher"
    inputs = (Input("how", str, default="segv"), Input("steps", int, default=1),
              Input("improve", bool, default=False))

    def run(self, handler: ServiceHandler, request: dict[str, Any]) -> str:
        for step in range(request["steps"]):
            handler.ready()
            if request["improve"]:
                handler.improved({"step": step})
        if request["how"] == "segv":
            ctypes.string_at(0)
        elif request["how"] == "exit":
            os._exit(3)
        elif request["how"] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        return "survived"


class Blocked(Service):
    """Never calls ready(): one C call (time.sleep) of ``seconds``."""

    name = "blocked"
    inputs = (Input("seconds", float, default=600.0),)

    def run(self, handler: ServiceHandler, request: dict[str, Any]) -> str:
        time.sleep(request["seconds"])
        return "woke up"


class GilHog(Service):
    """Holds the GIL for about ``seconds`` in one C call: a backtracking regex, sized here.

    ``a*a*a*a*c`` against ``"a" * n`` tries every split of the a's, some power of n steps
    inside ``re`` (which never releases the GIL), so the size can be tuned continuously.
    The probes that size it hold the GIL too (up to a few seconds).
    """

    name = "gil-hog"
    inputs = (Input("seconds", float, default=60.0),)
    PATTERN = re.compile(r"a*a*a*a*c")

    def run(self, handler: ServiceHandler, request: dict[str, Any]) -> dict[str, Any]:
        handler.ready()  # progress_delta 0: the test learns the calibration begins now
        return {"size": (size := self._size_for(request["seconds"])), "held": self._hold(size)}

    def _size_for(self, seconds: float) -> int:
        # Grow the size until one hold takes 2 s, then fit the cost's power of n over that
        # last doubling or so (short probes alone misjudge it by a factor of two either way).
        probes = [(200, self._hold(200))]
        while probes[-1][1] < 2.0:
            size = round(probes[-1][0] * 1.25)
            probes.append((size, self._hold(size)))
        (small, t_small), (large, t_large) = next(
            (p for p in probes if p[1] >= 0.2), probes[0]), probes[-1]
        power = math.log(t_large / t_small) / math.log(large / small) if large > small else 4.0
        power = min(max(power, 3.3), 4.0)  # four stars: n**4 steps at most
        return round(large * (seconds / t_large) ** (1 / power))

    def _hold(self, size: int) -> float:
        start = time.monotonic()
        self.PATTERN.match("a" * size)
        return time.monotonic() - start

    def progress(self) -> dict[str, Any]:
        return {"holding": True, "pid": os.getpid()}


class Greedy(Service):
    """Allocates ``mb`` MiB at once."""

    name = "greedy"
    inputs = (Input("mb", int, default=1024),)

    def run(self, handler: ServiceHandler, request: dict[str, Any]) -> int:
        handler.ready()
        return len(bytearray(request["mb"] * 2**20))


class Unmakeable(Service):
    """Its __init__ raises."""

    name = "unmakeable"

    def __init__(self) -> None:
        raise RuntimeError("cannot make this one")


#: The services of the child-process tests.
class SetUpAndTearDown(Service):
    """Says whether its child_setup() ran; its child_teardown() writes its pid in the file
    ``$BROKEREXEC_TEST_TEARDOWN`` names (the child inherits the worker's environment)."""

    name = "set-up"
    fail_setup = False
    fail_teardown = False

    def __init__(self) -> None:
        self.set_up = False

    def child_setup(self) -> None:
        if self.fail_setup:
            raise RuntimeError("no licence for this host")
        self.set_up = True

    def run(self, handler: ServiceHandler, request: dict[str, Any]) -> dict[str, Any]:
        handler.ready()
        return {"set_up": self.set_up, "pid": os.getpid()}

    def child_teardown(self) -> None:
        if self.fail_teardown:
            raise RuntimeError("the scene would not close")
        with open(os.environ["BROKEREXEC_TEST_TEARDOWN"], "w") as file:
            file.write(str(os.getpid()))


class SetUpFails(SetUpAndTearDown):
    name = "set-up-fails"
    fail_setup = True


class TearDownFails(SetUpAndTearDown):
    name = "tear-down-fails"
    fail_teardown = True


class InApplication(Service):
    """Run by an application's command (here another Python with a setup statement and an
    environment of its own), as Qube's getSubprocessArgs."""

    name = "in-application"
    code_as = "{bootstrap_file}"

    @classmethod
    def child_command(cls) -> ChildCommand:
        return ChildCommand(["/usr/bin/python3", cls.code_as] if cls.code_as.endswith("file}")
                            else ["/usr/bin/python3", "-c", cls.code_as],
                            env={"APP_MODE": "batch"}, cwd="/",
                            setup=["import builtins", "builtins.APP = 'ready'"])

    def run(self, handler: ServiceHandler, request: dict[str, Any]) -> dict[str, Any]:
        import builtins
        import sys

        handler.ready()
        return {"app": getattr(builtins, "APP", None), "mode": os.environ.get("APP_MODE"),
                "cwd": os.getcwd(), "executable": sys.executable}


class InApplicationByCode(InApplication):
    name = "in-application-by-code"
    code_as = "{bootstrap}"


class ApplicationThatWillNotStart(InApplication):
    name = "no-licence"

    @classmethod
    def child_command(cls) -> ChildCommand:
        return ChildCommand(["/usr/bin/python3", "-c", "{bootstrap}"],
                            setup=["raise SystemExit('no licence for this host')"])


CHILD = [Where, WhereAlone, Crasher, Blocked, GilHog, Greedy, Unmakeable, Counter, Forever, Improver]


def blob(size: int) -> str:
    """``size`` characters that any copy of this module makes the same: a large state whose
    corruption or truncation shows in its hash."""
    seed = "".join(f"{n:08x}" for n in range(4096))  # 32 KiB, no run repeats within it
    return (seed * (size // len(seed) + 1))[:size]


class Bulky(Service):
    """Checkpoints a state of ``state_bytes`` characters and returns a result with a payload
    of ``result_bytes``; ``step`` and ``label`` are settable, ``mark`` invokable. Says whether
    the state it restored is the one it stored (its hash) and where it resumed from."""

    name = "bulky"
    inputs = (Input("steps", int, default=100), Input("delay", float, default=0.05),
              Input("state_bytes", int, default=0), Input("result_bytes", int, default=0))
    settable = {"step": int, "label": str}
    invokable = ("mark",)

    def __init__(self) -> None:
        self.done = 0
        self.step = 1
        self.label = ""
        self.marks = 0
        self.blob = ""
        self.restored: dict[str, Any] | None = None

    def run(self, handler: ServiceHandler, request: dict[str, Any]) -> dict[str, Any]:
        import hashlib

        if not self.blob:
            self.blob = blob(request["state_bytes"])
        while self.done < request["steps"]:
            handler.ready()
            time.sleep(request["delay"])
            self.done += 1
        handler.ready()
        return {"done": self.done, "step": self.step, "label": self.label, "marks": self.marks,
                "restored": self.restored, "sha": hashlib.sha256(self.blob.encode()).hexdigest(),
                "payload": "r" * request["result_bytes"]}

    def mark(self) -> int:
        self.marks += 1
        return self.marks

    def progress(self) -> dict[str, Any]:
        return {"done": self.done}

    def checkpoint(self) -> dict[str, Any]:
        return {"done": self.done, "blob": self.blob}

    def restore(self, state: dict[str, Any]) -> None:
        import hashlib

        self.done, self.blob = state["done"], state["blob"]
        self.restored = {"done": self.done, "chars": len(self.blob),
                         "sha": hashlib.sha256(self.blob.encode()).hexdigest()}
