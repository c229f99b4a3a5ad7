"""What a child process starts as: the worker's interpreter, another one, or an application.

By default a child runs the worker's own interpreter (``sys.executable``) and takes the
worker's ``sys.path``. A service may name another interpreter (``child_python``; the worker's
``--child-python`` is the default) or an application's command (``child_command()``, Qube's
``getSubprocessArgs``): that child keeps its own ``sys.path``, gets brokerexec from the
worker's installation (its child side needs nothing but the standard library) and the
folder the service's module was imported from, so an application's Python runs the service
with no brokerexec installed for it.

Every child starts with the same bootstrap code, which finds its back-channel in the
environment (``BROKEREXEC_CHILD_*``), so it works however an application passes code to its
Python. Another interpreter is asked its version once (then again only if its file changed):
a missing one, or one older than 3.10, fails the job with a message that says which and why,
before any child is started.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.child_command import BOOTSTRAP, BOOTSTRAP_FILE, ChildCommand
from ..errors import ConfigurationError

__all__ = ["MIN_PYTHON", "ChildProgram", "bootstrap_code", "program_for", "service_root"]

#: The oldest Python a child may run.
MIN_PYTHON = (3, 10)
#: Seconds an interpreter has to say its version.
PROBE_TIMEOUT = 30.0
#: Where the child finds brokerexec, its back-channel and its worker.
PACKAGE_ENV, FD_ENV, WORKER_ENV = "BROKEREXEC_CHILD_PACKAGE", "BROKEREXEC_CHILD_FD", "BROKEREXEC_CHILD_WORKER"
#: The ``brokerexec`` package, as the worker imported it.
PACKAGE = Path(__file__).resolve().parent.parent


def bootstrap_code(setup: Sequence[str] = ()) -> str:
    """The child's first code: the version checked, ``setup`` run, brokerexec made
    importable from where the worker has it, then its child side (``child/main.py``)."""
    lines = [
        "import os, sys",
        f"if sys.version_info < {MIN_PYTHON!r}: sys.exit('brokerexec: the child runs Python %d.%d; "
        f"the child runner needs {MIN_PYTHON[0]}.{MIN_PYTHON[1]} or newer' % sys.version_info[:2])",
        *setup,
        f"sys.path.insert(0, os.environ.pop({PACKAGE_ENV!r}))",
        "from brokerexec.child.main import main",
        f"main([os.environ.pop({FD_ENV!r}), os.environ.pop({WORKER_ENV!r})])",
    ]
    return "\n".join(lines) + "\n"


_BOOTSTRAP = bootstrap_code()


@dataclass(frozen=True)
class ChildProgram:
    """How one service's children start. ``own``: the worker's interpreter, whose children
    take the worker's ``sys.path``; otherwise they keep their own, plus ``extra_path``."""

    args: list[str]
    own: bool = True  # the worker's interpreter: brokerexec from where the worker has it
    env: dict[str, str | None] = field(default_factory=dict)
    cwd: str | None = None
    extra_path: list[str] = field(default_factory=list)

    def popen_kwargs(self, fd: int, worker: int) -> dict[str, Any]:
        """``subprocess.Popen``'s ``args``, ``env`` and ``cwd`` for a child on back-channel ``fd``."""
        env = dict(os.environ)
        for name, value in self.env.items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        package = str(PACKAGE.parent) if self.own else package_folder()
        env.update({PACKAGE_ENV: package, FD_ENV: str(fd), WORKER_ENV: str(worker)})
        return {"args": self.args, "env": env, "cwd": self.cwd}


def program_for(service_cls: Any, default_python: str) -> ChildProgram:
    """How ``service_cls``'s children start: its ``child_command()``, else its
    ``child_python``, else ``default_python`` (the worker's ``--child-python`` or its own).

    Raises:
        ConfigurationError: the interpreter cannot be run or is too old; the command is
            not a :class:`ChildCommand`.
    """
    try:
        command = service_cls.child_command()
    except ConfigurationError:
        raise
    except Exception as exc:  # the service's own code: its job fails, the worker goes on
        raise ConfigurationError(f"{service_cls.__qualname__}.child_command() raised "
                                 f"{type(exc).__name__}: {exc}") from exc
    root = service_root(service_cls)
    if command is not None:
        if not isinstance(command, ChildCommand):
            raise ConfigurationError(f"{service_cls.__qualname__}.child_command() returned {command!r}, "
                                     "not a ChildCommand")
        code = bootstrap_code(command.setup)
        args = [arg.replace(BOOTSTRAP_FILE, _bootstrap_file(code)).replace(BOOTSTRAP, code)
                for arg in command.args]
        return ChildProgram(args, False, dict(command.env), command.cwd, root)
    python = service_cls.child_python or default_python
    if python == sys.executable:
        return ChildProgram([python, "-c", _BOOTSTRAP])
    path = _probe(python)
    return ChildProgram([path, "-c", _BOOTSTRAP], False, extra_path=root)


def service_root(service_cls: Any) -> list[str]:
    """The folder a child in another interpreter imports the service's module from: the one
    that holds its top package (nothing for a service loaded from a file path, which the
    child loads from there, or for one whose module has no file)."""
    module = sys.modules.get(service_cls.__module__)
    file = getattr(module, "__file__", None)
    if not file or service_cls.__module__ == "__main__":
        return []
    path = Path(file).resolve()
    depth = service_cls.__module__.count(".") + (1 if path.name == "__init__.py" else 0)
    return [str(path.parents[depth])]


# ---- an interpreter asked its version, once ------------------------------------------------

_PROBED: dict[tuple[str, int], str] = {}
_PROBE_LOCK = threading.Lock()
_VERSION = re.compile(r"(\d+)\.(\d+)(?:\.(\d+))?")


def _probe(python: str) -> str:
    """The path of ``python``, once it said it is CPython 3.10 or newer.

    Raises:
        ConfigurationError: it cannot be run, or does not say its version, or is too old.
    """
    path = shutil.which(python) or python
    try:
        stamp = os.stat(path).st_mtime_ns
    except OSError as exc:
        raise ConfigurationError(f"the child's interpreter {python} cannot be run: {exc.strerror}") from None
    with _PROBE_LOCK:
        if (path, stamp) in _PROBED:
            return path
    try:
        probe = subprocess.run([path, "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"],
                               capture_output=True, timeout=PROBE_TIMEOUT, stdin=subprocess.DEVNULL)
    except OSError as exc:
        raise ConfigurationError(f"the child's interpreter {python} cannot be run: "
                                 f"{exc.strerror or exc}") from None
    except subprocess.TimeoutExpired:
        raise ConfigurationError(f"the child's interpreter {python} did not say its version within "
                                 f"{PROBE_TIMEOUT:g} s") from None
    said = probe.stdout.decode(errors="replace").strip()
    found = _VERSION.match(said)
    if probe.returncode != 0 or found is None:
        raise ConfigurationError(f"the child's interpreter {python} did not say its version (exit status "
                                 f"{probe.returncode}): {last_lines(probe.stderr or probe.stdout)}")
    if (int(found[1]), int(found[2])) < MIN_PYTHON:
        raise ConfigurationError(f"the child's interpreter {python} is Python {found[0]}: the child runner "
                                 f"needs {MIN_PYTHON[0]}.{MIN_PYTHON[1]} or newer")
    with _PROBE_LOCK:
        _PROBED[(path, stamp)] = found[0]
    return path


def last_lines(output: bytes, lines: int = 10) -> str:
    """The last ``lines`` lines of a program's output, as text (or "nothing")."""
    text = output.decode(errors="replace").rstrip()
    return "\n".join(text.splitlines()[-lines:]) if text else "(nothing on stderr)"


_PACKAGE_FOLDER: list[str] = []


def package_folder() -> str:
    """A folder that holds brokerexec alone (a link to the worker's), for the path of a child
    in another interpreter: not the folder the worker has it in, which may be its whole
    site-packages (that interpreter would import the worker's packages from there, built for
    another Python). Made once, removed at the worker's exit."""
    with _PROBE_LOCK:
        if not _PACKAGE_FOLDER:
            _sweep_folders()
            folder = tempfile.mkdtemp(prefix=f"{_FOLDER_PREFIX}{os.getpid()}-")
            os.symlink(PACKAGE, os.path.join(folder, PACKAGE.name))
            atexit.register(shutil.rmtree, folder, True)
            _PACKAGE_FOLDER.append(folder)
        return _PACKAGE_FOLDER[0]


_FOLDER_PREFIX = "brokerexec-child-path-"


def _sweep_folders() -> None:
    """Remove the folders of workers that died without removing theirs (SIGKILLed): this
    user's, whose worker's pid (in the name) is gone."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(tempfile.gettempdir()):
            pid = entry.name[len(_FOLDER_PREFIX):].split("-", 1)[0]
            if not (entry.name.startswith(_FOLDER_PREFIX) and pid.isdigit()) or _alive(int(pid)):
                continue
            with contextlib.suppress(OSError):
                if entry.stat(follow_symlinks=False).st_uid == os.getuid():
                    shutil.rmtree(entry.path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


_BOOTSTRAP_FILES: dict[str, str] = {}


def _bootstrap_file(code: str) -> str:
    """A file holding ``code``, for the worker's life (removed at its exit)."""
    with _PROBE_LOCK:
        if code not in _BOOTSTRAP_FILES:
            handle, name = tempfile.mkstemp(prefix="brokerexec-child-", suffix=".py")
            with os.fdopen(handle, "w") as file:
                file.write(code)
            _BOOTSTRAP_FILES[code] = name
            atexit.register(_remove, name)
        return _BOOTSTRAP_FILES[code]


def _remove(name: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(name)
