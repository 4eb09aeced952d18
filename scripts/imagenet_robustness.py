#!/usr/bin/env python
"""Robust accuracy of ImageNet classifiers: a grid of models × attacks × eps.

Each grid cell (one model, one attack, all its eps) is one :func:`advtune.run.run` (one
process or every torchrun rank) in its own folder
``OUT/cells/<model>/<attack>/`` (``manifest.csv``, ``report.json``); finished cells are
skipped and unfinished ones resumed, so rerunning the same command continues where it
stopped. Then it writes ``OUT/results.csv``, ``OUT/results.md`` (one table per attack:
robust accuracy per model and eps) and ``OUT/plots/<attack>.png`` (robust accuracy vs eps,
one line per model). See ``docs/imagenet.md``.

Examples::

    python scripts/imagenet_robustness.py --data /data/imagenet/val --subset robustbench
    torchrun --nproc-per-node 8 scripts/imagenet_robustness.py --data /data/imagenet/val \\
        --models resnet50 --attacks pgd20,pgd20-l2 --batch-size 128
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from advtune.errors import UserError
from advtune.models import REFERENCE_MODELS
from advtune.run import comm as distributed

LINF_EPS = (1 / 255, 2 / 255, 4 / 255, 8 / 255)
L2_EPS = (0.25, 0.5, 1.0)


@dataclass(frozen=True)
class GridAttack:
    """A column group of the grid: a registry attack with fixed settings.

    Attributes:
        name: the grid's name (folder and table name).
        attack: ``advtune.attacks`` registry name.
        norm: ``"linf"`` or ``"l2"``; selects the eps list (``--linf-eps``/``--l2-eps``).
        params: attack settings (step size ``None`` means the attack's default,
            ``2.5 · eps / steps``).
        preset: an ``attacks/*.toml`` preset to start from.
        uses_eps: ``False`` for minimal-perturbation attacks (CW-L2).
        fixed_eps: the eps option that sets this attack's budgets instead of
            ``--linf-eps``/``--l2-eps`` (AutoAttack: ``--autoattack-eps``, one budget, as
            it is far costlier than a curve of PGD runs).
    """

    name: str
    attack: str
    norm: str
    params: dict[str, Any] = field(default_factory=dict)
    preset: str | None = None
    uses_eps: bool = True
    fixed_eps: str | None = None


GRID_ATTACKS = {
    a.name: a
    for a in (
        GridAttack("fgsm", "fgsm", "linf"),
        GridAttack("pgd10", "pgd", "linf", {"steps": 10}),
        GridAttack("pgd20", "pgd", "linf", {"steps": 20}),
        GridAttack("pgd50", "pgd", "linf", {"steps": 50}),
        GridAttack("pgd20-l2", "pgd", "l2", {"norm": "l2", "steps": 20}),
        GridAttack("cw-l2", "cw_l2", "l2", preset="cw-l2", uses_eps=False),
        # The standard AutoAttack ensemble (APGD-CE, APGD-T, FAB-T, Square), what
        # RobustBench reports; at --autoattack-eps (default 4/255, RobustBench's budget).
        GridAttack(
            "autoattack",
            "autoattack",
            "linf",
            preset="autoattack-imagenet-linf",
            fixed_eps="autoattack_eps",
        ),
    )
}
DEFAULT_ATTACKS = ("fgsm", "pgd10", "pgd50", "pgd20-l2", "cw-l2", "autoattack")


# --------------------------------------------------------------------------- arguments


def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _eps_list(text: str) -> list[float]:
    from advtune.presets import parse_number_list

    try:
        return parse_number_list(text, what="eps")
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _image_size(text: str) -> int:
    from advtune.run.inputs import MAX_IMAGE_SIZE

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 1 <= value <= MAX_IMAGE_SIZE:
        raise argparse.ArgumentTypeError(f"must be in [1, {MAX_IMAGE_SIZE}], got {value}")
    return value


def _setting(text: str) -> tuple[str, str, Any]:
    from advtune.presets import parse_value

    key, sep, value = text.partition("=")
    attack, dot, name = key.partition(".")
    if not sep or not dot or not attack or not name:
        raise argparse.ArgumentTypeError(f"expected ATTACK.KEY=VALUE, got {text!r}")
    return attack.strip(), name.strip().replace("-", "_"), parse_value(value)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="imagenet_robustness.py",
        description="Robust accuracy of ImageNet models under several attacks and budgets.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", required=True, help="ImageNet validation folder (any layout)")
    p.add_argument(
        "--subset",
        default=None,
        help="'robustbench' (the 5000-image RobustBench list), a file of relative paths, "
        "or nothing for the whole folder",
    )
    p.add_argument("--labels", help="LOC_val_solution.csv or devkit ground truth elsewhere")
    p.add_argument("--limit", type=int, help="use the first N images")
    p.add_argument(
        "--models",
        type=_csv_list,
        default=list(REFERENCE_MODELS),
        help="comma-separated models to evaluate; the default is advtune.models.REFERENCE_MODELS",
    )
    p.add_argument(
        "--weights",
        default="DEFAULT",
        help="DEFAULT, random, a torchvision weights name, or MODEL=FILE,MODEL=FILE",
    )
    p.add_argument("--convbn", default=None, help="ConvBN mode (default: advtune's)")
    p.add_argument(
        "--attacks",
        type=_csv_list,
        default=list(DEFAULT_ATTACKS),
        help=f"from: {', '.join(GRID_ATTACKS)}",
    )
    p.add_argument("--linf-eps", type=_eps_list, default=list(LINF_EPS), help="L∞ budgets")
    p.add_argument("--l2-eps", type=_eps_list, default=list(L2_EPS), help="L2 budgets")
    p.add_argument(
        "--autoattack-eps",
        type=_eps_list,
        default=[4 / 255],
        help="L∞ budgets of the autoattack column (default 4/255, RobustBench's)",
    )
    p.add_argument(
        "--set",
        type=_setting,
        action="append",
        default=[],
        metavar="ATTACK.KEY=VALUE",
        help="override an attack setting, e.g. --set pgd50.steps=100 --set cw-l2.steps=50",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="imagenet-robustness", help="output folder")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (torchrun: cuda)")
    p.add_argument(
        "--image-size", type=_image_size, help="advanced: crop side instead of the model's"
    )
    p.add_argument("--overwrite", action="store_true", help="redo cells that already exist")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return p


# --------------------------------------------------------------------------- the grid


def attack_config(grid: GridAttack, args: argparse.Namespace) -> Any:
    """The :class:`advtune.run.AttackConfig` of one grid attack."""
    from advtune.presets import resolve_attack

    overrides = dict(grid.params)
    overrides.update({k: v for a, k, v in args.set if a == grid.name})
    eps = None
    if grid.fixed_eps is not None:
        eps = getattr(args, grid.fixed_eps)
    elif grid.uses_eps:
        eps = args.linf_eps if grid.norm == "linf" else args.l2_eps
    return resolve_attack(
        grid.attack, preset=grid.preset, eps=eps, overrides=overrides, seed=args.seed
    )


def _weights_for(model: str, text: str) -> str:
    if "=" not in text:
        return text
    table = dict(item.split("=", 1) for item in _csv_list(text))
    if model not in table:
        raise UserError(f"--weights names no file for model {model!r} (got {sorted(table)})")
    return table[model]


def _finished(cell: Path, spec: Any, dataset: Any) -> bool:
    """Whether ``cell`` holds a complete run with the resume key of ``spec`` (compared as
    ``--resume`` compares it: a report written before defaults were recorded matches)."""
    from advtune.run.outputs import stored_run_matches
    from advtune.storage import read_json

    try:
        report = read_json(cell / "report.json")
    except (OSError, ValueError):
        return False
    key = json.loads(json.dumps(spec.resume_key(dataset)))
    return report.get("status") == "complete" and stored_run_matches(report.get("config"), key)


def _cell_spec(args: argparse.Namespace, cell: Path, config: Any, context: Any, device: str):
    from advtune.run import RunSpec

    return RunSpec(
        attack=config, out_dir=cell, command="evaluate", save_images=False,
        batch_size=args.batch_size, num_workers=args.workers,
        resume=(cell / "report.json").exists() and not args.overwrite,
        overwrite=args.overwrite, context=context,
        settings={"device": device, "grid": "imagenet_robustness"},
    )  # fmt: skip


def run_grid(args: argparse.Namespace, comm: Any) -> list[dict[str, Any]]:
    """Run (or resume) every cell; returns one result row per (model, attack, eps)."""
    from advtune.data import build_dataset, robustbench_subset
    from advtune.models import DEFAULT_CONVBN, load_model, model_card
    from advtune.run import TqdmProgress, image_size_preprocess, run
    from advtune.run.spec import model_context

    unknown = [a for a in args.attacks if a not in GRID_ATTACKS]
    if unknown:
        raise UserError(f"unknown grid attack(s) {unknown}; choose from {list(GRID_ATTACKS)}")
    for name, _, _ in args.set:
        if name not in GRID_ATTACKS:
            raise UserError(f"--set names unknown attack {name!r}")
    configs = {name: attack_config(GRID_ATTACKS[name], args) for name in args.attacks}
    subset = robustbench_subset() if args.subset == "robustbench" else args.subset
    device = comm.device
    convbn = args.convbn or DEFAULT_CONVBN
    out = Path(args.out)
    dataset = build_dataset(
        args.data, transform=_unset, limit=args.limit, subset=subset, labels=args.labels
    )
    if len(dataset) == 0:
        raise UserError(f"no images found in {args.data!r}")
    for model_name in args.models:
        weights = _weights_for(model_name, args.weights)
        # The card (nothing built) gives the preprocessing and the resume key (weights,
        # checkpoint digest, seed), so a changed checkpoint is never "finished".
        card = model_card(model_name, weights=weights, seed=args.seed)
        transform = image_size_preprocess(card.preprocess, args.image_size)
        dataset.transform = transform
        context = model_context(card=card, convbn=convbn, preprocess=transform)
        specs = {
            name: _cell_spec(
                args, out / "cells" / model_name / name, configs[name], context, device
            )
            for name in args.attacks
        }
        todo = [
            name
            for name in args.attacks
            if args.overwrite or not _finished(specs[name].out_dir, specs[name], dataset)
        ]
        # Every rank must take the same decision (the cells are collective runs).
        todo = comm.broadcast(todo)
        if not todo:
            continue  # every cell is finished: the model is not even built
        model = load_model(
            model_name, weights=weights, convbn=convbn, device=device,
            progress=not args.quiet and comm.is_main, seed=args.seed,
        )  # fmt: skip
        for name in todo:
            run(
                specs[name],
                model,
                dataset,
                comm=comm,
                callbacks=[] if args.quiet else [TqdmProgress()],
            )
    return collect(out, args.models, args.attacks) if comm.is_main else []


def _unset(image: Any) -> Any:
    raise RuntimeError("the dataset transform is set from each model's card")


def collect(out: Path, models: Sequence[str], attacks: Sequence[str]) -> list[dict[str, Any]]:
    """One row per (model, attack, eps) from the cells' ``report.json``."""
    from advtune.storage import read_json

    rows = []
    for model in models:
        for name in attacks:
            report = read_json(out / "cells" / model / name / "report.json")
            metrics = report["metrics"] or {}
            timings = report.get("timings", {})
            for entry in metrics.get("per_eps", []):
                rows.append(
                    {
                        "model": model,
                        "weights": report["model"]["weights"],
                        "attack": name,
                        "norm": report["config"]["attack"]["norm"],
                        "eps": entry["eps"],
                        "num_images": entry["num_images"],
                        "clean_accuracy": entry["clean_accuracy"],
                        "robust_accuracy": entry["robust_accuracy"],
                        "success_rate": entry["success_rate"],
                        "linf_median": entry["linf_median"],
                        "l2_median": entry["l2_median"],
                        "wall_s": timings.get("wall_s"),
                        "images_per_s": timings.get("images_per_s"),
                        "status": report["status"],
                    }
                )
    return rows


# --------------------------------------------------------------------------- outputs


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    from advtune.storage import atomic_write_text

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """One Markdown table per attack: models × (clean, robust accuracy at each eps)."""
    from advtune.run import format_eps

    lines = ["# ImageNet robust accuracy (%)", ""]
    for attack in dict.fromkeys(r["attack"] for r in rows):
        group = [r for r in rows if r["attack"] == attack]
        eps_values = list(dict.fromkeys(r["eps"] for r in group))
        n = sorted({r["num_images"] for r in group})
        lines += [f"## {attack} ({group[0]['norm']}, {', '.join(map(str, n))} images)", ""]
        if eps_values == [None]:  # no eps budget: robust accuracy and the median L2
            head = ["model", "clean", "robust", "success rate", "median L2"]
            cells = [
                [r["model"], _pct(r["clean_accuracy"]), _pct(r["robust_accuracy"]),
                 _pct(r["success_rate"]),
                 "n/a" if r["l2_median"] is None else f"{r['l2_median']:.4f}"]
                for r in group
            ]  # fmt: skip
        else:
            head = ["model", "clean", *(f"eps {format_eps(e)}" for e in eps_values)]
            cells = []
            for model in dict.fromkeys(r["model"] for r in group):
                by_eps = {r["eps"]: r for r in group if r["model"] == model}
                first = by_eps[eps_values[0]]
                cells.append(
                    [model, _pct(first["clean_accuracy"]),
                     *(_pct(by_eps[e]["robust_accuracy"]) for e in eps_values)]
                )  # fmt: skip
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "|".join("---" for _ in head) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in cells]
        lines.append("")
    weights = sorted({f"{r['model']}: {r['weights']}" for r in rows})
    lines.append("Weights: " + "; ".join(weights) + ".")
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict[str, Any]], folder: Path) -> list[Path]:
    """Robust accuracy vs eps, one line per model, one PNG per attack with eps."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from advtune.run.report import eps_axis
    from advtune.storage import atomic_write_bytes

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for attack in dict.fromkeys(r["attack"] for r in rows):
        group = [r for r in rows if r["attack"] == attack and r["eps"] is not None]
        if not group:
            continue
        fig = Figure(figsize=(6, 4), dpi=120)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        place = eps_axis(ax, [0.0, *(r["eps"] for r in group)])
        for model in dict.fromkeys(r["model"] for r in group):
            points = sorted((r["eps"], r["robust_accuracy"]) for r in group if r["model"] == model)
            clean = next(r["clean_accuracy"] for r in group if r["model"] == model)
            points.insert(0, (0.0, clean))
            xs = [place[p[0]] for p in points]
            ax.plot(xs, [100 * p[1] for p in points], marker="o", label=model)
        ax.set_xlabel(f"eps ({group[0]['norm']})")
        ax.set_ylabel("robust accuracy (%)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        ax.set_title(f"ImageNet · {attack}", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        path = folder / f"{attack}.png"
        atomic_write_bytes(path, buffer.getvalue())
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    import warnings

    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            if args.quiet:  # -q: results only
                warnings.simplefilter("ignore")
            comm = distributed.init_comm(args.device)
            try:
                rows = run_grid(args, comm)
            finally:
                distributed.shutdown()
        if not comm.is_main:
            return 0
        out = Path(args.out)
        write_csv(rows, out / "results.csv")
        from advtune.storage import atomic_write_text

        table = markdown(rows)
        atomic_write_text(out / "results.md", table)
        plots = plot(rows, out / "plots")
    except UserError as e:
        print(f"imagenet_robustness: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except distributed.DistributedRunError as e:
        print(f"imagenet_robustness: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(table)
        print(f"wrote {out / 'results.csv'}, {out / 'results.md'}, {len(plots)} plot(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
