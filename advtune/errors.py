"""Errors a user can fix. The CLI prints them as one line and exits with code 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["UserError", "first_line", "suggest"]


class UserError(ValueError):
    """Bad input from the user (unknown name, bad path, out-of-range value...).

    A ``ValueError`` subclass so library callers can catch it the usual way; the CLI
    prints ``advtune: error: <message>`` without a traceback.
    """


def suggest(name: str, choices: Iterable[str], *, what: str) -> str:
    """``"unknown <what> 'resnt50'; did you mean: resnet50, resnet101?"``."""
    choices = list(choices)
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.6)
    hint = (
        f"; did you mean: {', '.join(close)}?"
        if close
        else f"; choose from: {', '.join(sorted(choices)[:20])}{' ...' if len(choices) > 20 else ''}"
    )
    return f"unknown {what} {name!r}{hint}"


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of ``str(error)``, at most ``limit`` characters: a third-party
    error (a hub download, a checkpoint load) quoted inside a one-line message."""
    return (str(error).splitlines() or [""])[0][:limit]
