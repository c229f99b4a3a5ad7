"""A computation's whole process tree ends with its attempt (``--runner process``).

The processes a service starts itself (a ``subprocess``, a ``multiprocessing`` child and its
own child) must be gone when the attempt ends, however it ends: aborted and hard-killed, its
outcome sent, its process killed from outside (the OOM killer), or its worker SIGKILLed. The
child's sentinel (``brokerexec.child.main._guard_group``) kills the group when nobody else is
left to. Real processes and real signals; every wait is on a condition, with a deadline.

This file is also loaded by path in worker processes (the ``tree`` service), so it imports
nothing from the other test modules.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest

from brokerexec import Client, Input, JobAborted, RemoteError, Service, ServiceHandler, WorkerSettings

WAIT = 30.0
GONE = 10.0  # the tree must be gone within this, once its attempt has ended
THIS = str(Path(__file__).resolve())
#: A process that only SIGKILL ends: it ignores what may be sent to its whole group.
STUBBORN = ("import signal, sys, time\n"
            "for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):\n"
            "    signal.signal(sig, signal.SIG_IGN)\n"
            "print('ready', flush=True)\n"
            "time.sleep(600)\n")


# ---- the service ---------------------------------------------------------------------------------


def _start_stubborn() -> subprocess.Popen[bytes]:
    """A solver binary, say: a process of the computation's own that outlives nothing."""
    process = subprocess.Popen([sys.executable, "-c", STUBBORN], stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE)
    assert process.stdout is not None and process.stdout.readline() == b"ready\n"
    return process


def _pool_process(report: Connection) -> None:
    """A multiprocessing child that starts a process of its own, says its pid, and waits."""
    report.send(_start_stubborn().pid)
    time.sleep(600)


class Tree(Service):
    """Starts a tree of processes of its own and writes their pids to ``pids_file``: a
    subprocess, a multiprocessing (fork) child and that one's own subprocess. Then, as
    ``then`` says: "ready" calls ready() until aborted; "blocked" never calls it (one long C
    call); "end" returns, its processes still running, once ``pids_file`` + ".go" exists."""

    name = "tree"
    inputs = (Input("pids_file", str), Input("then", str, default="ready"))

    def run(self, handler: ServiceHandler, request: dict[str, Any]) -> str:
        popen = _start_stubborn()
        context = multiprocessing.get_context("fork")
        receiver, sender = context.Pipe(duplex=False)
        pool_process = context.Process(target=_pool_process, args=(sender,), daemon=False)
        pool_process.start()
        pids = {"child": os.getpid(), "popen": popen.pid, "mp": pool_process.pid,
                "mp_child": receiver.recv()}
        written = Path(request["pids_file"])
        partial = written.with_suffix(".partial")
        partial.write_text(json.dumps(pids))
        partial.replace(written)  # the test sees all of it, or nothing
        if request["then"] == "blocked":
            time.sleep(600)
        go = written.with_suffix(".go")
        while request["then"] == "ready" or not go.exists():
            handler.ready()
            time.sleep(0.01)
        return "done"


# ---- seeing processes go -------------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    """Fields 3.. of ``/proc/<pid>/stat`` (state first), or None if there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


class Proc:
    """One process, told apart from a later one with the same pid by its start time."""

    def __init__(self, pid: int, name: str = "") -> None:
        stat = _stat(pid)
        assert stat is not None, f"{name or 'process'} {pid} is not there"
        self.pid, self.name, self.started = pid, name, stat[19]

    def gone(self) -> bool:
        """Exited: no such process, a zombie nobody has reaped yet, or its pid reused."""
        stat = _stat(self.pid)
        return stat is None or stat[19] != self.started or stat[0] in ("Z", "X")

    def __repr__(self) -> str:
        return f"{self.name} {self.pid}"


def wait_until(predicate: Callable[[], bool], timeout: float, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out: {what}"
        time.sleep(0.02)  # polling a condition with a deadline


def wait_all_gone(procs: list[Proc], timeout: float = GONE) -> None:
    wait_until(lambda: all(p.gone() for p in procs), timeout,
               f"still there: {[p for p in procs if not p.gone()]}")


def sentinel_of(leader: int, timeout: float = WAIT) -> Proc:
    """The sentinel of the process group led by ``leader`` (it names itself once started)."""
    found: list[int] = []

    def look() -> bool:
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                stat = _stat(int(entry.name))
                try:
                    comm = (entry / "comm").read_text().strip()
                except OSError:
                    continue
                if stat is not None and stat[2] == str(leader) and comm == "brokerexec-sent":
                    found.append(int(entry.name))
        return bool(found)

    wait_until(look, timeout, f"the sentinel of group {leader}")
    (pid,) = set(found)
    return Proc(pid, "sentinel")


def fds_of(pid: int) -> list[str]:
    """What the descriptors of ``pid`` are open on."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            found.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return found


def read_tree(pids_file: Path, timeout: float = WAIT) -> dict[str, Proc]:
    """The tree the ``tree`` service wrote, its sentinel included."""
    wait_until(pids_file.exists, timeout, f"{pids_file} written")
    tree = {name: Proc(pid, name) for name, pid in json.loads(pids_file.read_text()).items()}
    tree["sentinel"] = sentinel_of(tree["child"].pid)
    for proc in tree.values():
        assert not proc.gone(), proc
    # the back-channel is the child's alone: the worker sees its end when the child ends
    held = ["anon_inode:[pidfd]"] if _pidfds() else []
    wait_until(lambda: fds_of(tree["sentinel"].pid) == held, WAIT, f"the sentinel holding only {held}")
    return tree


def _pidfds() -> bool:
    """Whether this kernel has pidfds (the sentinel's way to watch the child)."""
    try:
        os.close(os.pidfd_open(os.getpid()))
    except (AttributeError, OSError):
        return False
    return True


# ---- the sentinel by itself, without a worker ----------------------------------------------------

LEADER = textwrap.dedent("""\
    import os, signal, subprocess, sys
    from brokerexec.child.main import _guard_group
    if sys.argv[1] == "pdeathsig":  # as on a kernel without pidfds
        del os.pidfd_open
    _guard_group()
    try:
        os.waitpid(-1, os.WNOHANG)
        children = "some"
    except ChildProcessError:
        children = "none"
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)
    stubborn = subprocess.Popen([sys.executable, "-c", sys.argv[2]], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE)
    assert stubborn.stdout.readline() == b"ready\\n"
    print(stubborn.pid, children, flush=True)
    sys.stdin.read()  # until the test closes it
    os._exit(0)
    """)


@pytest.mark.parametrize("how", ["killed", "exits"])
@pytest.mark.parametrize("watch", ["pidfd", "pdeathsig"])
def test_the_sentinel_kills_the_group_once_its_leader_has_ended(watch: str, how: str) -> None:
    # Given a group leader with a sentinel, and a process of its group that ignores the
    # signals the worker or a terminal may send to a whole group
    leader = subprocess.Popen([sys.executable, "-c", LEADER, watch, STUBBORN], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert leader.stdout is not None and leader.stdin is not None
        pid, children = leader.stdout.readline().split()
        grandchild = Proc(int(pid), "grandchild")
        sentinel = sentinel_of(leader.pid)
        # the sentinel is no child of the leader, unless it has to be (PR_SET_PDEATHSIG)
        stat = _stat(sentinel.pid)
        assert stat is not None
        assert (children, stat[1] == str(leader.pid)) == ((b"none", False) if watch == "pidfd" else
                                                          (b"some", True))
        # and it holds no descriptor of the leader's (a back-channel, a pipe): only its pidfd
        held = ["anon_inode:[pidfd]"] if watch == "pidfd" else []
        wait_until(lambda: fds_of(sentinel.pid) == held, WAIT, f"the sentinel holding only {held}")
        # When the group is sent what a stop or a Ctrl-C sends, the sentinel stays
        for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
            os.killpg(leader.pid, sig)
        # and when the leader ends, killed or on its own
        if how == "killed":
            leader.kill()
        else:
            leader.stdin.close()
        # Then the whole group goes: what the leader started, and the sentinel
        assert leader.wait(WAIT) == (-signal.SIGKILL if how == "killed" else 0)
        wait_all_gone([grandchild, sentinel])
    finally:  # nothing left behind, even when it failed
        with contextlib.suppress(ProcessLookupError):
            os.killpg(leader.pid, signal.SIGKILL)
        leader.wait(WAIT)


def test_the_sentinel_guards_only_the_leader_of_its_own_group() -> None:
    # a process started some other way (here: in this test run's group) must not start a
    # sentinel, which would kill the group it is in
    code = ("import os; from brokerexec.child.main import _guard_group\n"
            "def no_fork(): raise AssertionError('a sentinel was forked')\n"
            "os.fork = no_fork; _guard_group(); print(os.getpgrp() != os.getpid(), flush=True)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=WAIT,
                          check=True)
    assert done.stdout == "True\n"


# ---- with a worker in this process ---------------------------------------------------------------


@pytest.fixture
def process_client() -> Iterator[Callable[..., Client]]:
    """``process_client(**worker_settings)``: a memory:// client whose worker runs children."""
    clients: list[Client] = []

    def make(**settings: Any) -> Client:
        client = Client(f"memory://tree-{uuid.uuid4().hex}", services=[Tree],
                        worker_settings=WorkerSettings(runner="process", **settings))
        clients.append(client.__enter__())
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def test_an_aborted_computation_that_never_reaches_ready_takes_its_tree_along(
        process_client: Callable[..., Client], tmp_path: Path) -> None:
    client = process_client(abort_grace=0.5)
    job = client.launch("tree", {"pids_file": str(tmp_path / "pids"), "then": "blocked"})
    tree = read_tree(tmp_path / "pids")
    assert job.abort() is True
    with pytest.raises(JobAborted):
        job.result(WAIT)  # SIGTERM to the group after the grace, SIGKILL later
    wait_all_gone(list(tree.values()))


def test_processes_left_running_at_the_end_go_with_it(
        process_client: Callable[..., Client], tmp_path: Path) -> None:
    client = process_client()
    job = client.launch("tree", {"pids_file": str(tmp_path / "pids"), "then": "end"})
    tree = read_tree(tmp_path / "pids")
    (tmp_path / "pids.go").touch()
    assert job.result(WAIT) == "done"
    wait_all_gone(list(tree.values()))


def test_the_tree_goes_when_the_computation_process_is_killed(
        process_client: Callable[..., Client], tmp_path: Path) -> None:
    client = process_client()
    job = client.launch("tree", {"pids_file": str(tmp_path / "pids")})
    tree = read_tree(tmp_path / "pids")
    os.kill(tree["child"].pid, signal.SIGKILL)  # as the OOM killer does
    with pytest.raises(RemoteError) as info:
        job.result(WAIT)
    assert info.value.remote_type == "brokerexec.ComputationDied"
    wait_all_gone(list(tree.values()))


SUBREAPER = textwrap.dedent("""\
    import ctypes, os, sys, time
    from pathlib import Path
    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: as a container's PID 1
    sys.path.insert(0, os.path.dirname(sys.argv[1]))
    from brokerexec import ServiceHandler
    from brokerexec.child.runner import ProcessRunner
    from test_child_tree import Tree

    def children():
        found = []
        for entry in Path("/proc").iterdir():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[1]) == os.getpid():
                found.append((int(entry.name), fields[0]))
        return found

    runner = ProcessRunner(term_grace=0.5)
    for i, then in enumerate(("end", "blocked")):
        handler = ServiceHandler(runner=runner, name=f"adopting-{i}", abort_grace=0.5)
        pids = os.path.join(sys.argv[2], f"pids-{i}")
        handler.start(Tree, {"pids_file": pids, "then": then})
        while not os.path.exists(pids):
            time.sleep(0.02)
        if then == "blocked":
            handler.put({"intent": "abort"})
        else:
            open(pids + ".go", "w").close()
        print(handler.join(30)["state"], flush=True)
    runner.close()
    deadline = time.monotonic() + 10
    while children() and time.monotonic() < deadline:
        time.sleep(0.02)
    print(children(), flush=True)
    """)


def test_a_worker_that_adopts_orphans_leaves_no_zombie_of_them(tmp_path: Path) -> None:
    # A worker that is PID 1 of its container (or a subreaper) adopts the group's orphans:
    # the sentinel, and what the computation left. It must reap them, not collect zombies.
    done = subprocess.run([sys.executable, "-c", SUBREAPER, THIS, str(tmp_path)], capture_output=True,
                          text=True, timeout=WAIT * 2)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["finished", "aborted", "[]"], done.stdout + done.stderr


# ---- ``brokerexec worker --runner process`` over RabbitMQ ----------------------------------------


def tree_worker(worker_process: Callable[..., Any]) -> Any:
    # two at once: a test's job is never kept waiting behind one that another test's SIGKILLed
    # worker left to be resumed
    return worker_process("--runner", "process", "--concurrency", "2", services=(f"{THIS}:Tree",))


@pytest.mark.rabbitmq
def test_the_tree_of_a_sigkilled_workers_computation_is_gone(
        amqp_url: str, worker_process: Callable[..., Any], tmp_path: Path) -> None:
    # Given a worker whose computation started processes of its own
    worker = tree_worker(worker_process)
    with Client(amqp_url) as client:
        client.launch("tree", {"pids_file": str(tmp_path / "pids")})
        tree = read_tree(tmp_path / "pids")
    assert _stat(tree["child"].pid)[1] == str(worker.pid)  # type: ignore[index]
    # When the worker is SIGKILLed (nothing of it runs on to clean up)
    os.kill(worker.pid, signal.SIGKILL)
    worker.process.wait(WAIT)
    # Then the kernel kills its child (PR_SET_PDEATHSIG), and the sentinel the rest of the tree
    wait_all_gone(list(tree.values()))
    with Client(amqp_url) as client:
        client.abort_all("tree")  # not to be resumed by another test's worker


@pytest.mark.rabbitmq
def test_the_tree_of_a_killed_computation_process_goes_even_while_its_worker_is_stopped(
        amqp_url: str, worker_process: Callable[..., Any], tmp_path: Path) -> None:
    # Given a computation with processes of its own, and its worker stopped (so it cannot be
    # the one that kills the group)
    worker = tree_worker(worker_process)
    with Client(amqp_url) as client:
        job = client.launch("tree", {"pids_file": str(tmp_path / "pids")})
        tree = read_tree(tmp_path / "pids")
        os.kill(worker.pid, signal.SIGSTOP)
        try:
            # When the computation process is SIGKILLed, as the OOM killer does
            os.kill(tree["child"].pid, signal.SIGKILL)
            # Then the rest of its tree is gone, the worker still stopped
            others = [proc for name, proc in tree.items() if name != "child"]
            wait_all_gone(others)
            assert _stat(worker.pid)[0] == "T"  # type: ignore[index]
        finally:
            os.kill(worker.pid, signal.SIGCONT)
        # and the worker, going on, fails the job with the reason
        with pytest.raises(RemoteError) as info:
            job.result(WAIT)
        assert info.value.remote_type == "brokerexec.ComputationDied"
        assert tree["child"].gone()
