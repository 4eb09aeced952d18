#!/usr/bin/env python
"""advtune's AutoAttack against the official one on the digits CNNs, per seed and image.

A benchmark, not a test (``tests/test_oracle.py`` asserts on the same measurements). For
each model of :data:`CONFIGS` (the standard digits CNN of ``advtune._digits`` and the
adversarially trained ones of ``advtune._robust_digits``, trained on first use and kept
in ``--cache``) and each row of ``advtune._oracle.ROWS``, both implementations run on the
first ``--images`` held-out images once per seed (advtune ``seeds=arange(n) + 1000·s``,
official ``seed=s``). Each (model, row, seed) is appended to ``--out`` (JSON lines) as
soon as it is done; a rerun skips what is there, so a long measurement can be resumed or
spread over several processes (different ``--rows``). ``--table`` prints the Markdown
table of ``docs/autoattack.md`` from that file.

Example::

    OMP_NUM_THREADS=1 python scripts/oracle_autoattack.py --rows apgd-ce apgd-t \\
        --images 200 --seeds 3 --out oracle.jsonl
    python scripts/oracle_autoattack.py --table --out oracle.jsonl
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from advtune._digits import digits_model, digits_test_set
from advtune._oracle import ROWS, Budget, advtune_broken, official_broken, summarise
from advtune._robust_digits import robust_digits_model

#: model → (norm, eps, L1 eps): radii where robust accuracy is neither ~0 nor ~clean.
CONFIGS: dict[str, tuple[str, float, float]] = {
    "standard": ("linf", 2 / 255, 3.0),
    "at-linf-8": ("linf", 8 / 255, 12.0),
    "at-l2-1": ("l2", 1.0, 12.0),
}

_EPS_TEXT = {2 / 255: "2/255", 8 / 255: "8/255"}


def load_model(name: str, cache: str | None) -> torch.nn.Module:
    """The digits CNN ``name`` (a key of :data:`CONFIGS`); ``cache`` ``""``/``None``: none."""
    return digits_model() if name == "standard" else robust_digits_model(name, cache or None)


def threat(name: str, row: str) -> tuple[str, float]:
    """``(norm, eps)`` of ``row`` on model ``name``."""
    norm, eps, l1_eps = CONFIGS[name]
    return ("l1", l1_eps) if row == "l1" else (norm, eps)


def _done(out: Path) -> set[tuple[str, str, int, int]]:
    if not out.is_file():
        return set()
    keys = set()
    for line in out.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            keys.add((r["model"], r["row"], r["images"], r["seed"]))
    return keys


def run(args: argparse.Namespace) -> None:
    """Measure every missing (model, row, seed), appending one JSON line each."""
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    done = _done(out)
    x_all, y_all = digits_test_set()
    x, y = x_all[: args.images], y_all[: args.images]
    budget = Budget(steps=args.steps, queries=args.queries)
    for name in args.models:
        model = load_model(name, args.cache)
        for row in args.rows:
            norm, eps = threat(name, row)
            for s in range(args.seeds):
                if (name, row, len(y), s) in done:
                    continue
                t0 = time.perf_counter()
                ours = advtune_broken(model, x, y, row=row, norm=norm, eps=eps, seed=s,
                                      budget=budget)  # fmt: skip
                t1 = time.perf_counter()
                theirs = official_broken(model, x, y, row=row, norm=norm, eps=eps, seed=s,
                                         budget=budget)  # fmt: skip
                t2 = time.perf_counter()
                rec: dict[str, Any] = {
                    "model": name, "row": row, "norm": norm, "eps": eps, "images": len(y),
                    "seed": s, "steps": args.steps, "queries": args.queries,
                    "advtune": ours.int().tolist(), "official": theirs.int().tolist(),
                    "seconds": {"advtune": t1 - t0, "official": t2 - t1},
                    "finished": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
                }  # fmt: skip
                with out.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
                print(
                    f"{name} {row} seed {s}: advtune {1 - ours.float().mean():.3f} official "
                    f"{1 - theirs.float().mean():.3f} ({t1 - t0:.0f} s, {t2 - t1:.0f} s)",
                    flush=True,
                )


def table(path: Path) -> str:
    """The Markdown table from ``path`` (one row per model, row and image count)."""
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            groups.setdefault((r["model"], r["row"], r["images"]), []).append(r)
    lines = [
        "| model | norm, eps | row | images | seeds | advtune | official | Δ points "
        "| agreement | official-only | advtune-only |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    # "standard" is both a model and a row: two orders.
    model_order = {n: i for i, n in enumerate(CONFIGS)}
    row_order = {r: i for i, r in enumerate(ROWS)}
    for key in sorted(groups, key=lambda k: (model_order[k[0]], row_order[k[1]], k[2])):
        recs = sorted(groups[key], key=lambda r: r["seed"])
        s = summarise(
            torch.tensor([r["advtune"] for r in recs], dtype=torch.bool),
            torch.tensor([r["official"] for r in recs], dtype=torch.bool),
        )
        eps = recs[0]["eps"]
        eps_text = next((t for v, t in _EPS_TEXT.items() if abs(v - eps) < 1e-12), f"{eps:g}")
        lines.append(
            f"| {key[0]} | {recs[0]['norm']} {eps_text} | {key[1]} | {s['images']} | {s['seeds']} "
            f"| {100 * s['advtune']:.2f} % | {100 * s['official']:.2f} % "
            f"| {s['delta_points']:+.2f} | {100 * s['agreement']:.1f} % "
            f"| {s['official_only']} | {s['advtune_only']} |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--models", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    p.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=None, help="override (official: 100)")
    p.add_argument("--queries", type=int, default=None, help="override (official: 5000)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "advtune"))
    p.add_argument("--out", default="oracle.jsonl")
    p.add_argument("--table", action="store_true", help="print the table of --out and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.table:
        print(table(Path(args.out)))
        return 0
    if args.cache:
        Path(args.cache).mkdir(parents=True, exist_ok=True)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
