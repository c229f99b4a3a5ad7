"""The clients: launch jobs, steer them and watch them, over any transport.

* :mod:`.blocking` — :class:`Client`;
* :mod:`.aio` — :class:`~.aio.AsyncClient`, the same API awaited;
* :mod:`.job` — :class:`Job`, a handle on one job (and what both clients share to read
  records and events);
* :mod:`.messages` — what both clients build from their arguments;
* :mod:`.embedded` — the worker a ``memory://`` client runs in its own process;
* :mod:`.pace` — how far a job has got, as people read it (for the CLI and other views).
"""

from __future__ import annotations

from .blocking import Client
from .job import Job

__all__ = ["Client", "Job"]
