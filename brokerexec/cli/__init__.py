"""The ``brokerexec`` command line.

* :mod:`.app` — the group, ``config``, ``worker`` and the entry point (:func:`main`);
* :mod:`.local`, :mod:`.jobs`, :mod:`.fleet` — the verbs: no broker, one job, many jobs;
* :mod:`.worker` — the body of ``brokerexec worker``;
* :mod:`.config` — settings on the command line (options made from the settings model);
* :mod:`.input` and :mod:`.output` — checked input; what is printed and the exit codes;
* :mod:`.display` and :mod:`.show` — what people see: a followed job, records, tables.
"""

from __future__ import annotations

from .app import cli, main

__all__ = ["cli", "main"]
