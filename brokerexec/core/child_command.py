"""ChildCommand: how a service's child process is started in an application's own Python.

Qube's child back end runs "another python interpreter of some sort (usually a 2D or 3D app)"
and returns, from ``getSubprocessArgs``, the arguments that start it and the Python commands
that initialize it. A service does the same with :meth:`~brokerexec.Service.child_command`:
the worker starts ``args``, in which ``{bootstrap}`` stands for the child's Python code (for
an application that takes code, ``--python-expr {bootstrap}``) or ``{bootstrap_file}`` for a
file holding it (``mayapy {bootstrap_file}``, ``hython {bootstrap_file}``); ``setup``
statements run there first (``import bpy``), then the child connects back to its worker.
A service that needs only another interpreter names it: ``child_python = "/opt/app/python"``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ..errors import ConfigurationError

__all__ = ["BOOTSTRAP", "BOOTSTRAP_FILE", "ChildCommand"]

#: Replaced in :attr:`ChildCommand.args` by the child's Python code (one argument).
BOOTSTRAP = "{bootstrap}"
#: Replaced in :attr:`ChildCommand.args` by the path of a file holding that code.
BOOTSTRAP_FILE = "{bootstrap_file}"


@dataclass(frozen=True)
class ChildCommand:
    """How to start a child (see the module docstring).

    Parameters:
        args: the command and its arguments; one of them holds ``{bootstrap}`` or
            ``{bootstrap_file}``.
        env: variables added to the worker's environment for the child (a value of None
            removes one).
        cwd: the child's working folder (default: the worker's).
        setup: Python statements the child runs before anything else.

    Raises:
        ConfigurationError: no arguments, or none that holds the bootstrap.
    """

    args: Sequence[str]
    env: Mapping[str, str | None] = field(default_factory=dict)
    cwd: str | None = None
    setup: Sequence[str] = ()

    def __post_init__(self) -> None:
        if isinstance(self.args, str) or not self.args or not all(isinstance(arg, str) for arg in self.args):
            raise ConfigurationError(f"a ChildCommand's args are a list of strings, not {self.args!r}")
        if not any(BOOTSTRAP in arg or BOOTSTRAP_FILE in arg for arg in self.args):
            raise ConfigurationError(f"a ChildCommand's args must hold {BOOTSTRAP} or {BOOTSTRAP_FILE} "
                                     f"(where the child's Python code goes): {list(self.args)!r}")
        if isinstance(self.setup, str):
            raise ConfigurationError("a ChildCommand's setup is a list of Python statements, not one string")
