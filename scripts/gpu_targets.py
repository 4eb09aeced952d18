#!/usr/bin/env python
"""Measure issue 5's performance targets and judge them from the measurements.

Runs :func:`advtune.bench.run_bench` on ResNet-50 (224 px, PGD) under each configuration
below, measures how each configuration's precision changes attack success on a trained
model, and writes ``OUT/targets.md``: the tables and, per target, the measured values and
a verdict (``met``, ``not met`` or ``not measured``). Nothing is hard-coded: a verdict
comes from the JSON files in ``OUT``.

================  =====================================  ==========================
configuration     run-time options                        modes
================  =====================================  ==========================
fp32              none (what torchattacks runs)           eval, tune, deploy, frozen
bf16-cl           bf16 autocast, channels_last            eval, tune, deploy, frozen
fp32-cl-compile   channels_last, torch.compile            deploy, frozen
bf16-cl-compile   bf16 autocast, channels_last, compile   deploy, frozen
================  =====================================  ==========================

The largest batch that fits is probed (up to ``--max-batch-limit``) for the eager
configurations only: under ``torch.compile`` every new batch size would recompile.

The trained model is the BatchNorm CNN on scikit-learn's digits from ``tests/digits.py``
(no ImageNet weights can be downloaded where this was written; run from a checkout).
Success is PGD-10 (L∞, random start, per-sample seeds) in frozen mode over all 1797
images, so one image is 0.056 points.

Each configuration's results are kept in ``OUT/json/``; a rerun skips what is there (so
a run cut off by a time limit resumes), and ``--configs none`` only rewrites the report.
Copy the ``json/`` folders of several runs into one ``OUT`` to report them together.

The 10,000-image target is about one H200 (139 GiB): the verdict names the device it was
measured on, and an 80 GB card reports its own, smaller, largest batch.

Example (on a GPU machine; each line is meant to fit in ten minutes)::

    python scripts/gpu_targets.py --out gpu-targets --configs fp32,bf16-cl
    python scripts/gpu_targets.py --out gpu-targets --configs fp32-cl-compile,bf16-cl-compile
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from advtune.errors import UserError
from advtune.run.comm import parse_device
from advtune.storage import atomic_write_text, read_json, write_json

CONFIGS: dict[str, dict[str, Any]] = {
    "fp32": {"amp": None, "channels_last": False, "compile": False, "modes": "all"},
    "bf16-cl": {"amp": "bf16", "channels_last": True, "compile": False, "modes": "all"},
    "fp32-cl-compile": {
        "amp": None,
        "channels_last": True,
        "compile": True,
        "modes": ("deploy", "frozen"),
    },
    "bf16-cl-compile": {
        "amp": "bf16",
        "channels_last": True,
        "compile": True,
        "modes": ("deploy", "frozen"),
    },
}
REFERENCE = "fp32"  # Eval mode in fp32, eager: the baseline of every "× eval" ratio
SUCCESS_EPS = (2 / 255, 3 / 255, 4 / 255)
#: Issue 5's numbers.
SAVED_TARGET_MIB = 4.0
PEAK_TARGET_MIB = 12.0
PEAK_RATIO_TARGET = 7.0
BATCH_TARGET = 10_000
SPEED_RATIO_TARGET = 3.0
SUCCESS_TOLERANCE_POINTS = 0.5


def _csv(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    return [] if items == ["none"] else items


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gpu_targets.py",
        description="Measure and judge issue 5's targets (ResNet-50, 224 px, PGD).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument(
        "--configs",
        type=_csv,
        default=list(CONFIGS),
        help=f"comma list of {', '.join(CONFIGS)} (or 'none': report only)",
    )
    p.add_argument("--model", default="resnet50")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=10, help="timed PGD steps")
    p.add_argument("--device", default="cuda")
    p.add_argument("--max-batch-limit", type=int, default=16384)
    p.add_argument("--no-bench", action="store_true", help="skip the ResNet-50 measurement")
    p.add_argument("--no-success", action="store_true", help="skip the success measurement")
    p.add_argument("--success-images", type=int, default=None, help="digits images attacked (all)")
    return p


# --------------------------------------------------------------------------- measuring


def _bench(name: str, args: argparse.Namespace) -> dict[str, Any]:
    from advtune.bench import run_bench
    from advtune.convbn import MODES

    cfg = CONFIGS[name]
    result = run_bench(
        args.model,
        modes=MODES if cfg["modes"] == "all" else cfg["modes"],
        batch_size=args.batch_size,
        size=args.size,
        steps=args.steps,
        device=args.device,
        amp=cfg["amp"],
        channels_last=cfg["channels_last"],
        compile=cfg["compile"],
        max_batch_limit=0 if cfg["compile"] else args.max_batch_limit,
    )
    return {**result.to_dict(), "max_batch_limit": 0 if cfg["compile"] else args.max_batch_limit}


def _digits() -> tuple[Any, torch.Tensor, torch.Tensor]:
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise UserError(
            "the success measurement trains on scikit-learn's digits: pip install scikit-learn"
        ) from None
    from advtune._digits import digits_dataset, digits_model

    xtr, ytr, xte, yte = digits_dataset()
    return digits_model(), torch.cat([xtr, xte]), torch.cat([ytr, yte])


def _success(name: str, args: argparse.Namespace, digits: Any) -> dict[str, Any]:
    import advtune
    from advtune import attacks
    from advtune.runtime import prepare

    base, x, y = digits
    if args.success_images:
        x, y = x[: args.success_images], y[: args.success_images]
    cfg = CONFIGS[name]
    device = torch.device(args.device)
    model = prepare(
        advtune.tune(base, "frozen").to(device),
        amp=cfg["amp"],
        channels_last=cfg["channels_last"],
        compile=cfg["compile"],
    )
    x, y = x.to(device), y.to(device)
    seeds = torch.arange(len(y))
    rates = {}
    for eps in SUCCESS_EPS:
        hits = 0
        for i in range(0, len(y), 512):
            r = attacks.pgd(
                model, x[i : i + 512], y[i : i + 512], eps=eps, steps=10, seeds=seeds[i : i + 512]
            )
            hits += int(r.success.sum())
        rates[f"{eps * 255:.0f}/255"] = 100.0 * hits / len(y)
    return {
        "config": name,
        "images": len(y),
        "success_percent": rates,
        "device": str(device),
        "torch_version": torch.__version__,
        "date": _dt.date.today().isoformat(),
    }


def measure(args: argparse.Namespace) -> None:
    """Run what is asked and missing; each result lands in its own JSON file."""
    bench_dir, success_dir = args.out / "json" / "bench", args.out / "json" / "success"
    bench_dir.mkdir(parents=True, exist_ok=True)
    success_dir.mkdir(parents=True, exist_ok=True)
    digits = None
    for name in args.configs:
        path = bench_dir / f"{name}.json"
        if not args.no_bench and not path.exists():
            print(f"[gpu_targets] {args.model} {name} ...", file=sys.stderr, flush=True)
            write_json(path, _bench(name, args))
        if args.no_success:
            continue
        path = success_dir / f"{name}.json"
        if not path.exists():
            print(f"[gpu_targets] success {name} ...", file=sys.stderr, flush=True)
            digits = digits or _digits()
            write_json(path, _success(name, args, digits))


# --------------------------------------------------------------------------- report


def _load(folder: Path) -> dict[str, dict[str, Any]]:
    return {p.stem: read_json(p) for p in sorted(folder.glob("*.json"))} if folder.is_dir() else {}


def _row(bench: dict[str, dict[str, Any]], config: str, mode: str) -> dict[str, Any] | None:
    for row in bench.get(config, {}).get("rows", []):
        if row["mode"] == mode and not row.get("error"):
            return row
    return None


def _f(value: Any, spec: str = ".1f") -> str:
    return "n/a" if value is None else format(value, spec)


def _verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else ("**met**" if ok else "**not met**")


def _max_delta(success: dict[str, dict[str, Any]], config: str) -> float | None:
    ref, other = success.get(REFERENCE), success.get(config)
    if ref is None or other is None:
        return None
    a, b = ref["success_percent"], other["success_percent"]
    return max(abs(b[k] - a[k]) for k in a)


def targets(bench: dict[str, dict[str, Any]], success: dict[str, dict[str, Any]]) -> list[str]:
    """One Markdown table row per target: ``| target | measured | verdict |``."""
    eval_ref = _row(bench, REFERENCE, "eval")
    frozen = _row(bench, REFERENCE, "frozen")
    lines = []

    saved = frozen and frozen["saved_mib_per_image"]
    ok = None if saved is None else saved <= SAVED_TARGET_MIB
    lines.append(
        f"| frozen saves ≤ {SAVED_TARGET_MIB:g} MiB/img for backward | "
        f"{_f(saved, '.2f')} MiB/img | {_verdict(ok)} |"
    )

    peak = frozen and frozen["peak_mib_per_image"]
    eval_peak = eval_ref and eval_ref["peak_mib_per_image"]
    ratio = eval_peak / peak if peak and eval_peak else None
    ok = None if ratio is None else (peak <= PEAK_TARGET_MIB and ratio >= PEAK_RATIO_TARGET)
    lines.append(
        f"| fp32 peak ≤ {PEAK_TARGET_MIB:g} MiB/img and ≥ {PEAK_RATIO_TARGET:g}× below eval | "
        f"frozen {_f(peak, '.2f')} MiB/img, eval {_f(eval_peak, '.2f')}, "
        f"{_f(ratio, '.1f')}× | {_verdict(ok)} |"
    )

    biggest = frozen and frozen["max_batch"]
    limit = bench.get(REFERENCE, {}).get("max_batch_limit")
    ok = None if biggest is None else biggest >= BATCH_TARGET
    device = bench.get(REFERENCE, {}).get("device_name", "n/a")
    lines.append(
        f"| a {BATCH_TARGET:,}-image batch fits (fp32 frozen, one PGD step) | "
        f"largest batch {_f(biggest, 'd')} on {device}"
        + (f" (probe limit {limit})" if limit else "")
        + f" | {_verdict(ok)} |"
    )

    for config in CONFIGS:
        f, d = _row(bench, config, "frozen"), _row(bench, config, "deploy")
        if f is None or d is None:
            continue
        fs, ds = f["images_steps_per_s"], d["images_steps_per_s"]
        ok = None if fs is None or ds is None else fs >= ds
        lines.append(
            f"| frozen at least as fast as deploy ({config}) | "
            f"{_f(fs, '.0f')} vs {_f(ds, '.0f')} img·steps/s | {_verdict(ok)} |"
        )

    eval_speed = eval_ref and eval_ref["images_steps_per_s"]
    best = None
    for config in CONFIGS:
        delta = _max_delta(success, config)
        if delta is None or delta > SUCCESS_TOLERANCE_POINTS:
            continue
        for row in bench.get(config, {}).get("rows", []):
            speed = row.get("images_steps_per_s")
            if speed is not None and row["mode"] != "eval" and (best is None or speed > best[2]):
                best = (config, row["mode"], speed, delta)
    if best is None or not eval_speed:
        measured, ok = "n/a", None
    else:
        config, mode, speed, delta = best
        ratio = speed / eval_speed
        ok = ratio >= SPEED_RATIO_TARGET
        measured = (
            f"{config} {mode}: {speed:.0f} img·steps/s = {ratio:.2f}× eval fp32 "
            f"({eval_speed:.0f}); success within {delta:.2f} points of fp32"
        )
    lines.append(
        f"| fastest configuration within {SUCCESS_TOLERANCE_POINTS:g} points of fp32 success "
        f"≥ {SPEED_RATIO_TARGET:g}× eval img·steps/s | {measured} | {_verdict(ok)} |"
    )
    return lines


def report(out: Path) -> str:
    bench = _load(out / "json" / "bench")
    success = _load(out / "json" / "success")
    any_bench = next(iter(bench.values()), {})
    eval_speed = (_row(bench, REFERENCE, "eval") or {}).get("images_steps_per_s")
    lines = [
        f"# Issue 5 targets: {any_bench.get('model', 'n/a')}, {any_bench.get('size', 'n/a')} px, PGD",
        "",
        f"Device: {any_bench.get('device_name', 'n/a')}; torch {any_bench.get('torch_version', 'n/a')}; "
        f"measured {any_bench.get('date', 'n/a')}; batch {any_bench.get('batch_size', 'n/a')}, "
        f"{any_bench.get('steps', 'n/a')} timed steps.",
        "",
        "| configuration | mode | saved MiB/img | peak MiB/img | img·steps/s | × eval fp32 | max batch |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for config in CONFIGS:
        for row in bench.get(config, {}).get("rows", []):
            speed = row.get("images_steps_per_s")
            ratio = speed / eval_speed if speed and eval_speed else None
            lines.append(
                f"| {config} | {row['mode']} | {_f(row.get('saved_mib_per_image'), '.2f')} | "
                f"{_f(row.get('peak_mib_per_image'), '.2f')} | {_f(speed, '.0f')} | "
                f"{_f(ratio, '.2f')} | {_f(row.get('max_batch'), 'd')} |"
                + (f" {row['error']}" if row.get("error") else "")
            )
    if success:
        eps_keys = list(next(iter(success.values()))["success_percent"])
        lines += [
            "",
            "PGD-10 success (%) on the trained digits CNN, frozen mode, "
            f"{next(iter(success.values()))['images']} images:",
            "",
            "| configuration | " + " | ".join(eps_keys) + " | max |Δ| vs fp32 (points) |",
            "|---|" + "---:|" * (len(eps_keys) + 1),
        ]
        for config in CONFIGS:
            if config in success:
                rates = success[config]["success_percent"]
                lines.append(
                    f"| {config} | "
                    + " | ".join(f"{rates[k]:.2f}" for k in eps_keys)
                    + f" | {_f(_max_delta(success, config), '.2f')} |"
                )
    lines += ["", "| target | measured | verdict |", "|---|---|---|", *targets(bench, success)]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        unknown = [c for c in args.configs if c not in CONFIGS]
        if unknown:
            raise UserError(f"unknown --configs {unknown}; choose from {', '.join(CONFIGS)}")
        if args.success_images is not None and args.success_images < 1:
            raise UserError(f"--success-images must be >= 1, got {args.success_images}")
        if args.configs:
            args.device = parse_device(args.device)  # no CUDA: one line, not a traceback
        measure(args)
        text = report(args.out)
    except UserError as exc:
        print(f"gpu_targets.py: error: {exc}", file=sys.stderr)
        return 2
    atomic_write_text(args.out / "targets.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
