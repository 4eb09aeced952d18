#!/usr/bin/env python
"""Follow one ``advtune generate`` through the package: which modules the run's spec visits.

A reading aid for ``docs/design.md``, not a test. It runs the CLI in this process under
:func:`sys.setprofile` and records, in call order, the module of every advtune function
that is handed the run's description as an argument: an object of one of
:data:`FOLLOWED` (the run plan, the run spec, the attack configuration). Consecutive
calls in one module are one *stay*; a stay in a module the walk already left is a
*return*. Few stays, no returns: the run reads top to bottom. Calls of the followed
objects' own methods (``spec.eps_values()``) are left out unless ``--methods``.

Example (the command behind the figures in ``docs/design.md``)::

    python scripts/walk_run.py -- --model resnet18 --weights random --attack fgsm \\
        --eps 4/255 --image-size 64 --limit 2 --quiet --out /tmp/walk
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import advtune

#: Type names whose instances are the run's description (looked up by name, so the
#: script works on trees that lack one of them).
FOLLOWED = ("RunPlan", "RunSpec", "AttackConfig")

#: Every advtune module that ran a Python function during the last :func:`walk`.
TOUCHED: set[str] = set()
#: The modules whose functions the run layer (:func:`_in_run_layer`) called directly:
#: what a reader of the run has to open.
CALLED_BY_RUN: set[str] = set()


def _in_run_layer(module: str) -> bool:
    return module == "advtune.cli" or module.startswith("advtune.run")


_ROOT = Path(advtune.__file__).resolve().parent


def _module(filename: str) -> str | None:
    path = Path(filename).resolve()
    if _ROOT not in path.parents:
        return None
    rel = path.relative_to(_ROOT.parent).with_suffix("")
    return ".".join(rel.parts).removesuffix(".__init__")


def _carries_spec(frame: Any, *, methods: bool) -> bool:
    code = frame.f_code
    count = code.co_argcount + code.co_kwonlyargcount
    names = code.co_varnames[:count]
    if names and names[0] == "self" and type(frame.f_locals.get("self")).__name__ in FOLLOWED:
        # The object answering about itself (``spec.eps_values()``) is read once with its
        # class; counted only with --methods.
        return methods
    for name in names:
        value = frame.f_locals.get(name)
        if type(value).__name__ in FOLLOWED:
            return True
    return False


def walk(argv: list[str], *, methods: bool = False) -> list[tuple[str, str]]:
    """Run ``advtune generate ARGV``; return ``(module, function)`` per spec-carrying call."""
    from advtune.cli import main

    calls: list[tuple[str, str]] = []
    TOUCHED.clear()
    CALLED_BY_RUN.clear()

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event != "call":
            return
        module = _module(frame.f_code.co_filename)
        if module is None or frame.f_code.co_name == "<module>":  # imports are not the run
            return
        TOUCHED.add(module)
        caller = frame.f_back
        if caller is not None:
            from_module = _module(caller.f_code.co_filename)
            if from_module is not None and _in_run_layer(from_module):
                CALLED_BY_RUN.add(module)
        if _carries_spec(frame, methods=methods):
            calls.append((module, frame.f_code.co_name))

    sys.setprofile(profile)
    try:
        code = main(["generate", *argv])
    finally:
        sys.setprofile(None)
    if code:
        raise SystemExit(f"advtune generate exited with {code}")
    return calls


def stays(calls: list[tuple[str, str]]) -> list[tuple[str, list[str]]]:
    """Consecutive calls in one module, merged: ``(module, [functions])``."""
    out: list[tuple[str, list[str]]] = []
    for module, fn in calls:
        if out and out[-1][0] == module:
            if fn not in out[-1][1]:
                out[-1][1].append(fn)
        else:
            out.append((module, [fn]))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--methods", action="store_true", help="count the followed objects' own methods too"
    )
    parser.add_argument("generate_args", nargs=argparse.REMAINDER, help="after --")
    args = parser.parse_args(argv)
    rest = [a for a in args.generate_args if a != "--"] if args.generate_args else []
    walked = stays(walk(rest, methods=args.methods))
    seen: set[str] = set()
    returns = 0
    for i, (module, fns) in enumerate(walked, 1):
        back = module in seen
        returns += back
        seen.add(module)
        mark = "  (return)" if back else ""
        print(f"{i:3d}. {module}: {', '.join(fns)}{mark}")
    print(f"{len(walked)} stays in {len(seen)} modules, {returns} returns")
    print(f"{len(TOUCHED)} advtune modules ran a function")
    print(
        f"{len(CALLED_BY_RUN)} modules called directly by advtune.cli and advtune.run.*: "
        + ", ".join(sorted(CALLED_BY_RUN))
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
