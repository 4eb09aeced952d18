"""Test-only stop hook: ``python tests/stophook.py ARGS`` is ``advtune ARGS`` that stops
itself after some batches, as the environment variable :data:`STOP_HOOK_ENV` says.

``N`` raises KeyboardInterrupt after N batches were written; ``N:kill`` makes the process
SIGKILL itself instead (no clean-up at all), ``N:term`` sends itself SIGTERM; ``N@R`` /
``N:kill@R`` do so on torchrun rank ``R`` only (the other ranks keep going). It lives
here, not in the CLI: the hook wraps :func:`advtune.run.runner.run` and adds a callback.
Also usable in-process: :func:`installed` (a context manager) for ``advtune.cli.main``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator

STOP_HOOK_ENV = "ADVTUNE_TEST_STOP_AFTER_BATCHES"


def stop_hook(value: str):
    """The callback ``value`` describes (``None`` when it is for another rank)."""
    from advtune.run.callbacks import RunCallbacks

    spec, _, only_rank = value.partition("@")
    count, _, mode = spec.partition(":")
    after = int(count)
    if only_rank and int(only_rank) != int(os.environ.get("RANK", "0")):
        return None

    class StopHook(RunCallbacks):
        def on_batch(self, batches: int) -> None:
            if batches >= after:
                if mode in ("kill", "term"):  # a real signal, handled as users send it
                    os.kill(os.getpid(), signal.SIGKILL if mode == "kill" else signal.SIGTERM)
                    return
                raise KeyboardInterrupt

    return StopHook()


@contextlib.contextmanager
def installed(value: str) -> Iterator[None]:
    """Every :func:`advtune.run.runner.run` inside the block gets the stop hook ``value``."""
    import advtune.run.runner

    original = advtune.run.runner.run
    hook = stop_hook(value)

    def run(*args, callbacks=(), **kwargs):
        return original(*args, callbacks=[*callbacks, *([hook] if hook else [])], **kwargs)

    advtune.run.runner.run = run
    try:
        yield
    finally:
        advtune.run.runner.run = original


if __name__ == "__main__":
    from advtune.cli import main

    with (
        installed(os.environ.get(STOP_HOOK_ENV, ""))
        if os.environ.get(STOP_HOOK_ENV)
        else contextlib.nullcontext()
    ):
        sys.exit(main())
