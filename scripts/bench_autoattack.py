#!/usr/bin/env python
"""Wall time and peak memory of advtune's AutoAttack vs the official one, same inputs.

A benchmark, not a test. Each measurement runs in a fresh worker process (so peak memory
is that process's own): the model (a torchvision architecture with random weights and
calibrated BN statistics, ``advtune.bench.build_model``), ``--n`` seeded random images and
their clean predictions as labels are built, then one ensemble call is timed. Peak memory
is the growth of the resident set during the call: Linux's high-water mark (``VmHWM``,
reset through ``/proc/self/clear_refs`` before the call) minus the resident set before
it. Both implementations get the same budget: ``--steps`` APGD iterations, ``--n-targets``
APGD-T (and FAB-T) targets, ``--queries`` Square queries, one restart each; FAB-T and
Square run only when advtune has ``fab`` and ``square`` registered, so both sides always
run the same components. Runs alternate between the two implementations; the table shows
medians over ``--repeats``.

Example (the command behind the numbers in ``docs/autoattack.md``)::

    python scripts/bench_autoattack.py --model resnet18 --size 32 --n 16 --steps 10 \\
        --n-targets 3 --repeats 3
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

from advtune import attacks
from advtune.bench import build_model
from advtune.presets import parse_number

IMPLS = ("advtune", "official")


def _components() -> list[str]:
    comps = ["apgd-ce", "apgd-t"]
    if {"fab", "square"} <= set(attacks.names()):
        comps += ["fab-t", "square"]
    return comps


def _rss_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        return True
    except OSError:
        return False


def _official(model, args, comps):
    try:
        from pyautoattack import AutoAttack
        from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted
    except ImportError:  # the upstream package name
        from autoattack import AutoAttack
        from autoattack.autopgd_base import APGDAttack, APGDAttack_targeted
    logging.getLogger("auto-attack").setLevel(logging.WARNING)
    norm = {"linf": "Linf", "l2": "L2"}[args.norm]
    common = {"eps": args.eps, "norm": norm, "seed": 0, "device": "cpu", "n_restarts": 1}
    aa = AutoAttack(model, attacks=comps, device="cpu", eps=args.eps, norm=norm, seed=0,
                    version="custom")  # fmt: skip
    # APGD fixes its step-size checkpoints from n_iter at construction: build anew.
    aa.apgd = APGDAttack(model, n_iter=args.steps, loss="ce", **common)
    aa.apgd_targeted = APGDAttack_targeted(
        model, n_iter=args.steps, n_target_classes=args.n_targets, **common
    )
    aa.fab.n_iter, aa.fab.n_target_classes, aa.fab.n_restarts = args.steps, args.n_targets, 1
    aa.square.n_queries = args.queries
    return aa


def worker(args: argparse.Namespace) -> dict:
    """One timed ensemble call in this process; returns its measurements."""
    torch.set_num_threads(args.threads)
    model = build_model(args.model, size=args.size, seed=0)
    model.requires_grad_(False)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(args.n, 3, args.size, args.size, generator=gen)
    with torch.no_grad():
        y = model(x).argmax(1)
    comps = _components()
    before = _rss_mib("VmRSS")
    exact = _reset_peak()
    start = time.perf_counter()
    if args.worker == "advtune":
        res = attacks.autoattack(
            model, x, y, eps=args.eps, norm=args.norm, attacks=comps, steps=args.steps,
            n_targets=args.n_targets, queries=args.queries, seeds=torch.arange(args.n),
        )  # fmt: skip
        wall = time.perf_counter() - start
        robust = 1 - float(res.success.float().mean())
    else:
        aa = _official(model, args, comps)
        x_adv, _ = aa.run_standard_evaluation(x, y, batch_size=args.n)
        wall = time.perf_counter() - start
        with torch.no_grad():
            robust = float((model(x_adv).argmax(1) == y).float().mean())
    peak = _rss_mib("VmHWM") - before
    return {
        "impl": args.worker,
        "wall_s": wall,
        "peak_mib": peak,
        "peak_exact": exact,
        "robust_accuracy": robust,
        "components": comps,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--n", type=int, default=16, help="images per ensemble call")
    p.add_argument("--eps", type=parse_number, default=1 / 255)
    p.add_argument("--norm", choices=("linf", "l2"), default="linf")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--n-targets", type=int, default=3)
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="write the raw measurements here")
    p.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    passthrough = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--json"]
    if args.json:
        passthrough = [a for a in passthrough if a != args.json]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    runs: list[dict] = []
    for r in range(args.repeats):
        order = IMPLS if r % 2 == 0 else IMPLS[::-1]  # alternate who goes first
        for impl in order:
            out = subprocess.run(
                [sys.executable, __file__, *passthrough, "--worker", impl],
                check=True, capture_output=True, text=True, env=env,
            )  # fmt: skip
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    comps = runs[0]["components"]
    print(
        f"# {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()}, "
        f"torch {torch.__version__}, {args.threads} thread(s); {args.model} {args.size}px "
        f"random weights, {args.n} images, {args.norm} eps={args.eps:.5g}, "
        f"{'+'.join(comps)}, steps={args.steps} n_targets={args.n_targets} "
        f"queries={args.queries}, median of {args.repeats}"
    )
    print("| implementation | wall s (median) | wall s (all) | peak MiB (median) | robust acc |")
    print("|---|---|---|---|---|")
    for impl in IMPLS:
        mine = [r for r in runs if r["impl"] == impl]
        walls = [r["wall_s"] for r in mine]
        peaks = [r["peak_mib"] for r in mine]
        accs = sorted({round(r["robust_accuracy"], 4) for r in mine})
        print(
            f"| {impl} | {statistics.median(walls):.2f} | "
            f"{', '.join(f'{w:.2f}' for w in walls)} | {statistics.median(peaks):.1f} | "
            f"{', '.join(map(str, accs))} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "runs": runs}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
