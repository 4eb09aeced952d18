#!/usr/bin/env python
"""AutoAttack ``version="fast"`` against the standard version: calls, robust accuracy, time.

A benchmark, not a test. On the digits CNNs (``advtune._digits``: the standard model, and
the adversarially trained ones of ``advtune._robust_digits``, trained on first use and
kept in ``--cache``), for each (model, norm, eps) of :data:`CONFIGS`:

1. Both versions once on ``--images`` held-out images with seeds ``0..n-1`` (both are
   deterministic given the seeds): robust accuracy, the images the standard version
   breaks that the fast one does not (and the reverse), and the model calls by kind
   (``EnsembleResult.calls``: images through forward-only and forward+backward passes).
2. Wall time on the first ``--timing-images`` images: ``--repeats`` runs of each
   version, alternating (standard, fast, standard, ...) in this process with one torch
   thread; the table gives the ratio of the medians.

Prints a Markdown table (the one in ``docs/autoattack.md``) and writes ``--json``.

Example (the command behind the table in ``docs/autoattack.md``)::

    OMP_NUM_THREADS=1 python scripts/bench_autoattack_fast.py --images 200 \\
        --timing-images 24 --repeats 3 --json fast.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from advtune import attacks
from advtune._digits import digits_model, digits_test_set
from advtune._robust_digits import ROBUST_RECIPES, robust_digits_model

#: (model, norm, eps): a standard model in both norms and two adversarially trained ones.
CONFIGS: tuple[tuple[str, str, float], ...] = (
    ("standard", "linf", 2 / 255),
    ("standard", "l2", 0.3),
    ("at-linf-8", "linf", 8 / 255),
    ("at-l2-1", "l2", 1.0),
)


def _model(name: str, cache: str | None) -> torch.nn.Module:
    return digits_model() if name == "standard" else robust_digits_model(name, cache)


def _run(model, x, y, norm: str, eps: float, version: str, extra: dict[str, Any]):
    return attacks.autoattack(
        model, x, y, eps=eps, norm=norm, version=version, seeds=torch.arange(len(y)), **extra
    )


def measure(
    name: str, norm: str, eps: float, *, images: int, timing_images: int, repeats: int,
    cache: str | None, extra: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    """One table row (see the module docstring)."""
    model = _model(name, cache)
    x, y = digits_test_set()
    x, y = x[:images], y[:images]
    std = _run(model, x, y, norm, eps, "standard", {})
    fast = _run(model, x, y, norm, eps, "fast", extra)
    sc, fc = std.calls, fast.calls
    assert sc is not None and fc is not None  # every advtune attack counts its calls
    s_all = sc.forward_images + sc.gradient_images
    f_all = fc.forward_images + fc.gradient_images
    times: dict[str, list[float]] = {"standard": [], "fast": []}
    xt, yt = x[:timing_images], y[:timing_images]
    for _ in range(repeats):
        for version in ("standard", "fast"):
            t0 = time.perf_counter()
            _run(model, xt, yt, norm, eps, version, extra if version == "fast" else {})
            times[version].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "model": name,
        "norm": norm,
        "eps": eps,
        "images": images,
        "robust_standard": 1 - float(std.success.float().mean()),
        "robust_fast": 1 - float(fast.success.float().mean()),
        "broken_standard": int(std.success.sum()),
        "missed_by_fast": int((std.success & ~fast.success).sum()),
        "extra_by_fast": int((fast.success & ~std.success).sum()),
        "calls_standard": sc.as_dict(),
        "calls_fast": fc.as_dict(),
        "calls_ratio": f_all / s_all,
        "gradient_ratio": fc.gradient_images / max(sc.gradient_images, 1),
        "forward_ratio": fc.forward_images / max(sc.forward_images, 1),
        "seconds": times,
        "time_ratio": med["fast"] / med["standard"],
        "robust_after_fast": fast.robust_after(),
    }


def table(rows: list[dict[str, Any]]) -> str:
    """The Markdown table of ``docs/autoattack.md``."""
    out = [
        "| model | norm, eps | robust acc. standard | fast | broken by standard, missed by fast "
        "| calls/image standard (fwd + grad) | fast | fast/standard calls (grad, fwd) "
        "| CPU time fast/standard |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        n = r["images"]
        s, f = r["calls_standard"], r["calls_fast"]
        eps = f"{r['eps'] * 255:.0f}/255" if r["norm"] == "linf" else f"{r['eps']:g}"
        out.append(
            f"| {r['model']} | {r['norm']} {eps} | {100 * r['robust_standard']:.1f} % "
            f"| {100 * r['robust_fast']:.1f} % | {r['broken_standard']}, {r['missed_by_fast']} "
            f"| {s['forward_images'] / n:.0f} + {s['gradient_images'] / n:.0f} "
            f"| {f['forward_images'] / n:.0f} + {f['gradient_images'] / n:.0f} "
            f"| {100 * r['calls_ratio']:.1f} % ({100 * r['gradient_ratio']:.1f} %, "
            f"{100 * r['forward_ratio']:.1f} %) | {r['time_ratio']:.2f} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200, help="held-out images (<= 200)")
    parser.add_argument("--timing-images", type=int, default=32, help="images for wall time")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each version")
    parser.add_argument("--n-targets", type=int, default=None, help="fast: APGD-MALT targets")
    parser.add_argument("--queries", type=int, default=None, help="fast: Square queries")
    parser.add_argument("--cache", default=None, help="folder for the trained weights")
    parser.add_argument("--configs", default=None, help="comma-separated row numbers (0-3)")
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args(argv)
    for key in ("images", "timing_images", "repeats"):
        value = getattr(args, key)
        if not 1 <= value <= (200 if key != "repeats" else 1000):
            parser.error(f"--{key.replace('_', '-')} must be between 1 and 200, got {value}")
    if args.cache is not None:
        Path(args.cache).mkdir(parents=True, exist_ok=True)
    extra = {k: v for k, v in (("n_targets", args.n_targets), ("queries", args.queries)) if v}
    picked = CONFIGS
    if args.configs:
        try:
            picked = tuple(CONFIGS[int(i)] for i in args.configs.split(","))
        except (ValueError, IndexError):
            parser.error(f"--configs must be numbers 0-{len(CONFIGS) - 1}, got {args.configs!r}")
    torch.set_num_threads(1)
    rows = []
    for name, norm, eps in picked:
        assert name == "standard" or name in ROBUST_RECIPES
        row = measure(
            name, norm, eps, images=args.images, timing_images=args.timing_images,
            repeats=args.repeats, cache=args.cache, extra=extra,
        )  # fmt: skip
        rows.append(row)
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(f"{dt.date.today()} · {platform.processor() or platform.machine()} · torch "
          f"{torch.__version__} · one thread · fast extra {extra}")  # fmt: skip
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
