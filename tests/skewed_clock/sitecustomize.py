"""Loaded first by a Python whose path starts here (``PYTHONPATH``): its wall clock is
``BROKEREXEC_TEST_CLOCK_OFFSET`` seconds off, as a host whose clock is wrong (what
libfaketime does for a whole process; brokerexec reads the wall clock only through
``time.time``). Monotonic clocks are left alone, as they are on such a host."""

import os
import time

_offset = float(os.environ.get("BROKEREXEC_TEST_CLOCK_OFFSET", "0") or 0)
if _offset:
    _time, _time_ns = time.time, time.time_ns
    time.time = lambda: _time() + _offset  # type: ignore[assignment]
    time.time_ns = lambda: _time_ns() + int(_offset * 1e9)  # type: ignore[assignment]
