"""Computations in child processes (Qube's child back end): killable, apart from the worker.

* :mod:`.runner` — :class:`~.runner.ProcessRunner`, the core's
  :class:`~brokerexec.core.runner.Runner` for ``--runner process``;
* :mod:`.computation` — the worker's side of one child's computation;
* :mod:`.processes` — starting, watching and killing the children;
* :mod:`.back_channel` — the messages between a worker and a child;
* :mod:`.main` — the child's own side, run in the child interpreter.
"""
