"""SIGINT and SIGTERM: stop after the current write, never in the middle of one.

:func:`install` makes both signals raise :class:`Interrupted` (a ``KeyboardInterrupt``)
in the main thread; inside :func:`deferred` (the run wraps each batch's PNG and manifest
writes in it) the signal is remembered and raised when the block ends, so what was being
written is complete on disk.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["Interrupted", "deferred", "exit_code", "install", "restore"]


class Interrupted(KeyboardInterrupt):
    """The process got SIGINT or SIGTERM.

    Args:
        signum: the signal number.
    """

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


def exit_code(exc: BaseException) -> int:
    """The shell's exit code for a run stopped by ``exc``: 128 + signal (130 for Ctrl-C)."""
    signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
    return 128 + int(signum)


_depth = 0
_pending: int | None = None


def _handler(signum: int, frame: Any) -> None:
    global _pending
    if _depth > 0:
        _pending = signum
        return
    raise Interrupted(signum)


def install() -> dict[int, Any]:
    """Route SIGINT and SIGTERM to :class:`Interrupted` (main thread only; no-op elsewhere).

    Returns:
        The previous handlers, for :func:`restore`.
    """
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signum: signal.signal(signum, _handler) for signum in (signal.SIGINT, signal.SIGTERM)}


def restore(previous: dict[int, Any]) -> None:
    """Put back the handlers :func:`install` replaced."""
    for signum, handler in previous.items():
        signal.signal(signum, handler)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM (when :func:`install` routed them) until the block ends."""
    global _depth, _pending
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0 and _pending is not None:
            signum, _pending = _pending, None
            raise Interrupted(signum)
