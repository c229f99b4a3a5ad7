"""The child-process runner: each computation in a child interpreter of its own.

:class:`ProcessRunner` is the :class:`~brokerexec.core.runner.Runner` a worker uses with
``--runner process`` (or for a service that declares ``runner = "process"``): each job's
computation side is a :class:`~brokerexec.child.computation.ChildComputation`, whose child
the runner starts, watches and kills (:class:`~brokerexec.child.processes.ChildProcesses`).
"""

from __future__ import annotations

from ..core.runner import JobSetup
from .computation import ChildComputation
from .processes import ChildProcesses

__all__ = ["ProcessRunner"]


class ProcessRunner(ChildProcesses):
    """Runs each computation in a child process; see :class:`ChildProcesses` for its
    parameters (limits, the grace between SIGTERM and SIGKILL, the interpreter)."""

    def computation(self, setup: JobSetup) -> ChildComputation:
        """A job's computation, in a child started when it starts."""
        return ChildComputation(setup, self)
