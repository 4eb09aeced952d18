"""One lock for every ``torch.fx`` trace advtune makes.

A trace patches process-global state while it runs (``torch.nn.Module.__call__`` and
``__getattr__``, and the warnings filters advtune sets around it), so two threads tracing
at once corrupt each other's graphs. Threads that convert or inspect models at the same
time (ranks run as threads in tests, user thread pools) take this lock around a trace.
"""

from __future__ import annotations

import threading

TRACE_LOCK = threading.RLock()
