#!/usr/bin/env python
"""Memory and time of the ConvBN modes across models (the paper-style table).

For each model, :func:`advtune.bench.run_bench` measures every ConvBN mode (``eval``,
``tune``, ``deploy``, ``frozen``): bytes autograd saves per image (CPU or CUDA), and on
CUDA the peak MiB per image, images·steps/s of a PGD loop and the largest batch that fits;
ratios are against Eval mode. Models have random weights with calibrated BN statistics:
this measures cost, not accuracy. Writes ``OUT/convbn_modes.md``, ``OUT/convbn_modes.csv``,
``OUT/convbn_modes.png`` (saved MiB/img per mode and model) and one JSON per model
(``OUT/json/<model>.json``), reused on a rerun with the same settings (``--overwrite``
measures again).

Example::

    python scripts/convbn_modes.py --device cuda --batch-size 128 --out convbn-modes
    python scripts/convbn_modes.py --device cpu --size 224 --steps 0   # saved bytes only
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from advtune.bench import run_bench
from advtune.convbn import MODES
from advtune.errors import UserError
from advtune.models import REFERENCE_MODELS, random_net
from advtune.storage import atomic_write_bytes, atomic_write_text, read_json, write_json

FIELDS = ("saved_mib_per_image", "peak_mib_per_image", "images_steps_per_s", "max_batch")


def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convbn_modes.py",
        description="Memory/time of the ConvBN modes across models (advtune.bench).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--models",
        type=_csv_list,
        default=list(REFERENCE_MODELS),
        help="comma-separated models to measure (torchvision names, timm:<name>, "
        "robustbench:<name>); the default is advtune.models.REFERENCE_MODELS",
    )
    p.add_argument("--modes", type=_csv_list, default=list(MODES))
    p.add_argument("--attack", default="pgd", help="pgd or fgsm")
    p.add_argument("--device", default="auto")
    p.add_argument("--size", type=int, default=224, help="image side")
    p.add_argument("--batch-size", type=int, default=None, help="throughput batch")
    p.add_argument("--steps", type=int, default=10, help="timed PGD steps (0: saved bytes only)")
    p.add_argument("--amp", choices=("bf16", "fp16"), default=None)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--out", default="convbn-modes")
    p.add_argument("--overwrite", action="store_true", help="measure models measured before")
    p.add_argument("-q", "--quiet", action="store_true")
    return p


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "modes": list(args.modes),
        "attack": args.attack,
        "device": args.device,
        "size": args.size,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "amp": args.amp,
        "channels_last": args.channels_last,
        "compile": args.compile,
    }


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run (or reuse) the benchmark of each model; returns their ``to_dict()``."""
    folder = Path(args.out) / "json"
    folder.mkdir(parents=True, exist_ok=True)
    settings = _settings(args)
    results = []
    for model in args.models:
        path = folder / f"{model}.json"
        if path.exists() and not args.overwrite:
            stored = read_json(path)
            if stored.get("settings") == settings:
                results.append(stored["result"])
                continue
        # advtune.models.random_net builds any source's model (torchvision, timm:,
        # robustbench:) with seeded weights and calibrated BN statistics.
        result = run_bench(
            model, attack=args.attack, modes=args.modes, batch_size=args.batch_size,
            size=args.size, steps=args.steps, device=args.device, amp=args.amp,
            channels_last=args.channels_last, compile=args.compile,
            model_factory=functools.partial(random_net, model, size=args.size),
        )  # fmt: skip
        if not args.quiet:
            print(result.table(), file=sys.stderr)
        write_json(path, {"settings": settings, "result": result.to_dict()})
        results.append(json.loads(json.dumps(result.to_dict())))
    return results


def table_rows(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (model, mode) with the figures and their ratios to Eval mode."""
    rows = []
    for result in results:
        ratios = result["ratios_vs_eval"]
        for row in result["rows"]:
            rows.append(
                {
                    "model": result["model"],
                    "mode": row["mode"],
                    **{f: row[f] for f in FIELDS},
                    "saved_vs_eval": ratios[row["mode"]]["saved_mib_per_image"],
                    "peak_vs_eval": ratios[row["mode"]]["peak_mib_per_image"],
                    "speed_vs_eval": ratios[row["mode"]]["images_steps_per_s"],
                    "error": row["error"],
                    "device": result["device_name"],
                    "size": result["size"],
                    "batch_size": result["batch_size"],
                    "steps": result["steps"],
                }
            )
    return rows


def _fmt(value: Any, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    first = rows[0]
    lines = [
        "# ConvBN modes: memory and speed of an attack",
        "",
        f"{first['device']}, {first['size']}px, batch {first['batch_size']}, "
        f"{first['steps']} PGD steps; random weights with calibrated BN statistics.",
        "",
        "| model | mode | saved MiB/img | × eval | peak MiB/img | × eval | img·steps/s "
        "| × eval | max batch |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["error"]:
            lines.append(f"| {r['model']} | {r['mode']} | failed: {r['error']} ||||||| ")
            continue
        lines.append(
            f"| {r['model']} | {r['mode']} | {_fmt(r['saved_mib_per_image'], '.2f')} | "
            f"{_fmt(r['saved_vs_eval'], '.3f')} | {_fmt(r['peak_mib_per_image'], '.2f')} | "
            f"{_fmt(r['peak_vs_eval'], '.3f')} | {_fmt(r['images_steps_per_s'], '.1f')} | "
            f"{_fmt(r['speed_vs_eval'], '.2f')} | {_fmt(r['max_batch'], 'd')} |"
        )
    lines += ["", "n/a: not measured (peak memory and max batch need CUDA; --steps 0)."]
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Grouped bars: saved MiB per image, per model and mode."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    models = list(dict.fromkeys(r["model"] for r in rows))
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    fig = Figure(figsize=(max(5, 1.2 * len(models) + 2), 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / len(modes)
    for k, mode in enumerate(modes):
        values = [
            next((r["saved_mib_per_image"] or 0 for r in rows if (r["model"], r["mode"]) == (m, mode)), 0)
            for m in models
        ]  # fmt: skip
        ax.bar([i + k * width for i in range(len(models))], values, width, label=mode)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(models))], models, rotation=30)
    ax.set_ylabel("saved for backward (MiB / image)")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rows = table_rows(measure(args))
    except UserError as e:
        print(f"convbn_modes: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    out = Path(args.out)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "convbn_modes.csv", buffer.getvalue())
    table = markdown(rows)
    atomic_write_text(out / "convbn_modes.md", table)
    plot(rows, out / "convbn_modes.png")
    if not args.quiet:
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
