"""The report: ``report.json``, the printed summary and the robust-accuracy plot.

The report's ``metrics`` come from manifest rows only (:func:`advtune.run.metrics.
compute_metrics`), its timings add this session to those of earlier sessions. See
``docs/cli.md`` for every key.
"""

from __future__ import annotations

import io
import logging
import math
import platform
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from advtune._version import __version__
from advtune.run.batch import merge_cost
from advtune.run.loop import RunStats
from advtune.run.metrics import compute_metrics
from advtune.run.spec import AttackConfig, dataset_info

__all__ = [
    "REPORT_FORMAT",
    "aggregate_checks",
    "build_report",
    "check_warnings",
    "convbn_info",
    "device_info",
    "eps_axis",
    "format_eps",
    "format_summary",
    "merge_checks",
    "model_info",
    "plot_curve",
    "plural",
    "robustbench_fields",
    "unwrap_model",
    "versions",
]

log = logging.getLogger(__name__)

REPORT_FORMAT = "advtune-report/1"


def versions() -> dict[str, str | None]:
    """Versions of advtune, Python, torch, torchvision (and CUDA when built with it)."""
    import torchvision  # a core dependency

    tv = torchvision.__version__
    return {
        "advtune": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": tv,
        "cuda": torch.version.cuda,
    }


def device_info(device: torch.device | str) -> dict[str, Any]:
    device = torch.device(device)
    info: dict[str, Any] = {"type": device.type, "name": platform.processor() or platform.machine()}
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        info["name"] = torch.cuda.get_device_name(index)
        info["index"] = index
        info["total_memory_bytes"] = torch.cuda.get_device_properties(index).total_memory
    else:
        info["threads"] = torch.get_num_threads()
    return info


def unwrap_model(model: nn.Module) -> nn.Module:
    """The classifier inside run-time wrappers (``advtune.runtime.AmpModel``,
    ``torch.compile``), which carries ``name``, ``categories``, ``net``..."""
    seen = 0
    while not hasattr(model, "categories") and seen < 8:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            break
        model, seen = inner, seen + 1
    return model


def model_info(model: nn.Module) -> dict[str, Any]:
    """``report["model"]``: the model's card (``model.card.to_dict()``, through run-time
    wrappers) plus its ConvBN mode and wrapper; name and class count for a bare module."""
    inner = unwrap_model(model)
    card = getattr(model, "card", None)
    info: dict[str, Any] = (
        card.to_dict()
        if card is not None
        else {
            "name": getattr(inner, "name", type(inner).__name__),
            "weights": getattr(inner, "weights", None),
            "num_classes": getattr(inner, "num_classes", None),
        }
    )
    info["convbn"] = getattr(inner, "convbn", None)
    info["wrapper"] = type(model).__name__ if inner is not model else None
    # Untrained: the numbers test the pipeline only (the plot's title says so too).
    info["random_weights"] = str(info.get("weights") or "").lower() == "random"
    return info


def convbn_info(model: nn.Module) -> dict[str, Any] | None:
    try:
        from advtune import convbn_report

        inner = unwrap_model(model)
        return convbn_report(getattr(inner, "net", inner)).to_dict()
    except Exception as e:  # a report is nice to have; never fail a run over it
        log.debug("no ConvBN report: %s", e)
        return None


_CHECK_SKIP = ("eps", "skipped")


def merge_checks(*parts: Mapping[str, Any] | None) -> dict[str, Any]:
    """Add up aggregated gradient-masking checks (sessions, torchrun ranks).

    Each part maps a check name to ``{"batches", "failed", "first_failure"}`` (from
    :func:`aggregate_checks`), plus ``"skipped"``: the ensemble components skipped.
    """
    out: dict[str, Any] = {}
    for part in parts:
        for name, value in (part or {}).items():
            if name == "monotone_eps":
                continue  # recomputed from the rows
            if name == "skipped":
                out["skipped"] = sorted({*out.get("skipped", []), *value})
                continue
            acc = out.setdefault(name, {"batches": 0, "failed": 0, "first_failure": None})
            acc["batches"] += int(value["batches"])
            acc["failed"] += int(value["failed"])
            if acc["first_failure"] is None:
                acc["first_failure"] = value.get("first_failure")
    return out


def _cost_line(cost: Mapping[str, Any], images: int) -> str | None:
    """``model calls per image: 12.3 forward, 456.7 gradient (...)`` for the summary."""
    if not cost or not images:
        return None
    fwd, grad = cost.get("forward_images", 0) / images, cost.get("gradient_images", 0) / images
    line = f"model calls per image: {fwd:.1f} forward, {grad:.1f} forward+backward"
    if cost.get("versions"):
        line = f"autoattack version {', '.join(cost['versions'])} · " + line
    comps = cost.get("components") or {}
    if comps:
        line += (
            " ("
            + ", ".join(
                f"{name} {c.get('forward_images', 0) / images:.1f}+{c.get('gradient_images', 0) / images:.1f}"
                for name, c in comps.items()
            )
            + ")"
        )
    return line


def aggregate_checks(batch_checks: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Aggregate the per-batch checks of :class:`~advtune.run.batch.BatchOutput`.

    Args:
        batch_checks: one dict per (batch, eps): ``{"eps": eps, name: record, ...}``
            with the records of :mod:`advtune.attacks._masking` (each has ``"ok"``) and
            ``"skipped"`` (component names).

    Returns:
        ``{name: {"batches", "failed", "first_failure"}, "skipped": [...]}``:
        ``first_failure`` is the first failing record, with its ``eps``.
    """
    parts = []
    for checks in batch_checks:
        part: dict[str, Any] = {}
        for name, record in checks.items():
            if name == "skipped":
                part["skipped"] = list(record)
            elif name not in _CHECK_SKIP and isinstance(record, Mapping) and "ok" in record:
                bad = not record["ok"]
                part[name] = {
                    "batches": 1,
                    "failed": int(bad),
                    "first_failure": {"eps": checks.get("eps"), **record} if bad else None,
                }
        parts.append(part)
    return merge_checks(*parts)


def check_warnings(checks: Mapping[str, Any] | None) -> list[str]:
    """One line per failed check of ``report.json``'s ``checks`` (the CLI warns each)."""
    lines = []
    for name, value in (checks or {}).items():
        if name == "skipped" and value:
            lines.append(
                f"autoattack skipped unregistered components {', '.join(value)}: robust "
                "accuracy may be overestimated"
            )
        elif name == "monotone_eps" and not value.get("ok", True):
            pairs = "; ".join(
                f"{format_eps(v['from'])} -> {format_eps(v['to'])}: "
                f"{_pct(v['accuracy_from'])} -> {_pct(v['accuracy_to'])}"
                for v in value["violations"]
            )
            lines.append(
                f"robust accuracy grows with eps ({pairs}): a sign of gradient masking or "
                "a too weak attack"
            )
        elif isinstance(value, Mapping) and value.get("failed"):
            first = value.get("first_failure") or {}
            lines.append(
                f"gradient-masking check {name!r} failed on {value['failed']} of "
                f"{value['batches']} attacked batches (first at eps "
                f"{format_eps(first.get('eps'))}); see checks in report.json"
            )
    return lines


def _monotone(metrics: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``check_monotone`` of robust accuracy vs eps (two eps or more), without warning."""
    from advtune.attacks._masking import check_monotone

    curve = [
        (e["eps"], e["robust_accuracy"])
        for e in (metrics or {}).get("per_eps", [])
        if e["eps"] is not None and e["robust_accuracy"] is not None
    ]
    if len(curve) < 2:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the CLI warns once, from check_warnings
        return check_monotone(curve, what="eps")


def build_report(
    *,
    command: str,
    status: str,
    config: Mapping[str, Any],
    attack: AttackConfig,
    rows: Sequence[Mapping[str, Any]],
    model: nn.Module,
    dataset: Any,
    device: torch.device | str,
    settings: Mapping[str, Any],
    stats: RunStats | None = None,
    previous: Mapping[str, Any] | None = None,
    outputs: Mapping[str, Any] | None = None,
    convbn: Mapping[str, Any] | None = None,
    skipped: Sequence[tuple[str, str]] | None = None,
    distributed: Mapping[str, Any] | None = None,
    checks: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``report.json`` document (see ``docs/cli.md`` for every key).

    ``metrics`` come from ``rows`` only; ``timings`` add this session to the sessions
    recorded in ``previous`` (the report of an interrupted run being resumed), and so do
    ``checks`` (this session's, from :func:`aggregate_checks`); ``checks.monotone_eps``
    is ``check_monotone`` of robust accuracy vs eps, from the rows.
    """
    inner = unwrap_model(model)
    card = getattr(model, "card", None)
    categories = card.categories if card is not None else getattr(inner, "categories", None)
    labeled = bool(getattr(dataset, "labeled", True))
    metrics = compute_metrics(rows, attack, categories=categories) if rows else None
    prev_t = (previous or {}).get("timings") or {}
    session = {
        "images": stats.images if stats else 0,
        "wall_s": stats.wall_s if stats else 0.0,
        "attack_s": stats.attack_s if stats else 0.0,
        "images_per_s": stats.images_per_s if stats else None,
        "model_calls": stats.model_calls if stats else 0,
        "cost": dict(stats.cost) if stats else {},
        "oom_backoffs": stats.oom_backoffs if stats else 0,
        "final_batch_size": stats.final_batch_size if stats else None,
    }
    sessions = list(prev_t.get("sessions", []))
    if stats is not None and stats.images:
        sessions.append(session)
    total_wall = math.fsum(s["wall_s"] for s in sessions)
    total_images = sum(s["images"] for s in sessions)
    peaks = [
        p
        for p in ((previous or {}).get("peak_memory_bytes"), stats and stats.peak_memory_bytes)
        if p
    ]
    if skipped is None:
        skipped = list(getattr(dataset, "skipped", []))
    skipped_rows = [{"path": p, "reason": r} for p, r in skipped]
    all_checks = merge_checks((previous or {}).get("checks"), checks)
    monotone = _monotone(metrics)
    if monotone is not None:
        all_checks["monotone_eps"] = monotone
    report = {
        "format": REPORT_FORMAT,
        "command": command,
        "status": status,
        "config": dict(config),
        "settings": dict(settings),
        "versions": versions(),
        "device": device_info(device),
        "model": model_info(model),
        "convbn": dict(convbn) if convbn is not None else None,
        "data": {
            **dataset_info(dataset),
            "label_source": "dataset" if labeled else "model clean predictions",
            "skipped": skipped_rows,
        },
        "metrics": metrics,
        "timings": {
            "wall_s": total_wall,
            "images_per_s": total_images / total_wall if total_wall > 0 and total_images else None,
            "images_this_session": session["images"],
            "resumed": previous is not None,
            "sessions": sessions,
        },
        "cost": _total_cost(sessions, total_images),
        "peak_memory_bytes": max(peaks) if peaks else None,
        "outputs": dict(outputs or {}),
        "checks": all_checks,
    }
    if distributed is not None:
        report["distributed"] = dict(distributed)
    if attack.attack == "autoattack" and metrics:
        report["robustbench"] = robustbench_fields(attack, metrics, model_info(model))
    return report


_AA_BUDGETS = ("steps", "n_targets", "queries", "eot_iter")


def robustbench_fields(
    attack: AttackConfig, metrics: Mapping[str, Any], model: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """RobustBench model-info fields of an AutoAttack run, one dict per eps.

    ``clean_acc``/``autoattack_acc`` are percent strings with two decimals and ``eps``
    a string (``"4/255"``), as in RobustBench's ``model_info/<dataset>/<threat>/*.json``;
    ``n_examples`` and ``attack_version`` say what was run (the leaderboard takes the
    ``standard`` version with its official budgets on its 5000-image subset only;
    budgets set by hand are named: ``"autoattack standard with steps=3 (advtune X)"``).
    """
    version = attack.params.get("version") or (
        "custom" if attack.params.get("attacks") else "standard"
    )
    # Budgets set by hand make it no official run: the version string says so.
    budgets = [f"{k}={attack.params[k]}" for k in _AA_BUDGETS if k in attack.params]
    if budgets:
        version += " with " + " ".join(budgets)
    threat = {"linf": "Linf", "l2": "L2"}.get(attack.norm, attack.norm)
    out = []
    for entry in metrics.get("per_eps", []):
        clean, robust = entry.get("clean_accuracy"), entry.get("robust_accuracy")
        out.append(
            {
                "name": model.get("name"),
                "dataset": model.get("dataset"),
                "threat_model": threat,
                "eps": format_eps(entry.get("eps")),
                "clean_acc": None if clean is None else f"{100 * clean:.2f}",
                "autoattack_acc": None if robust is None else f"{100 * robust:.2f}",
                "n_examples": entry.get("num_images"),
                "attack_version": f"autoattack {version} (advtune {__version__})",
            }
        )
    return out


def _total_cost(sessions: Sequence[Mapping[str, Any]], images: int) -> dict[str, Any]:
    """Every session's ``cost`` added up, with ``per_image`` averages of the image counts."""
    total = merge_cost(*(s.get("cost") for s in sessions))
    if images and total:
        total["per_image"] = {
            k: total.get(k, 0) / images for k in ("forward_images", "gradient_images")
        }
        total["images"] = images
    return total


def format_eps(eps: float | None) -> str:
    """``4/255`` for multiples of 1/255, else the number (``0.5``); ``-`` for none."""
    if eps is None:
        return "-"
    k = eps * 255
    if eps > 0 and abs(k - round(k)) < 1e-6 and eps <= 1:
        return f"{round(k)}/255"
    return f"{eps:g}"


def plural(count: int, noun: str) -> str:
    """``"1 image"``, ``"2 images"``."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _pct(value: float | None) -> str:
    return (
        "n/a"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else f"{100 * value:.1f}%"
    )


def _num(value: float | None) -> str:
    return (
        "n/a"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else f"{value:.4g}"
    )


def format_summary(report: Mapping[str, Any]) -> str:
    """A short plain-text table of a report (the CLI prints it)."""
    config = report["config"]
    attack = config["attack"]
    metrics = report.get("metrics") or {}
    model = report.get("model", {})
    lines = [
        f"advtune {report['command']}: {model.get('name')} ({model.get('weights')}) · "
        f"{attack['attack']} {attack['norm']}"
        + (f" targeted={attack['targeted']}" if attack.get("targeted") else "")
        + f" · {plural(metrics.get('num_images', 0), 'image')} · {report['device']['type']}"
    ]
    nonfinite = metrics.get("num_nonfinite") or 0
    if nonfinite:
        lines.append(
            f"warning: {plural(nonfinite, 'image')} with non-finite logits (NaN/inf), "
            "counted as neither correct nor robust"
        )
    if report["data"]["label_source"] != "dataset":
        lines.append("labels: the model's clean predictions (unlabeled images)")
    header = f"{'eps':>10}  {'clean acc':>9}  {'robust acc':>10}  {'success':>8}  {'mean linf':>9}  {'mean l2':>8}"
    l1 = attack["norm"] == "l1"  # the budget's own norm, shown for L1 runs
    lines.append(header + (f"  {'mean l1':>8}" if l1 else ""))
    for entry in metrics.get("per_eps", []):
        lines.append(
            f"{format_eps(entry['eps']):>10}  {_pct(entry['clean_accuracy']):>9}  "
            f"{_pct(entry['robust_accuracy']):>10}  {_pct(entry['success_rate']):>8}  "
            f"{_num(entry['linf_mean']):>9}  {_num(entry['l2_mean']):>8}"
            + (f"  {_num(entry.get('l1_mean')):>8}" if l1 else "")
        )
    for entry in metrics.get("per_eps", []):
        after = entry.get("robust_after")
        if after:
            where = f" (eps {format_eps(entry['eps'])})" if len(metrics["per_eps"]) > 1 else ""
            lines.append(f"initial accuracy{where}: {_pct(after['clean'])}")
            lines.extend(
                f"robust accuracy after {name.upper()}{where}: {_pct(value)}"
                for name, value in after.items()
                if name != "clean"
            )
    lines.extend(
        _published_lines(
            model.get("published"),
            attack["norm"],
            metrics,
            random=bool(model.get("random_weights")),
        )
    )
    cost_line = _cost_line(report.get("cost") or {}, (report.get("cost") or {}).get("images", 0))
    if cost_line:
        lines.append(cost_line)
    timings = report.get("timings", {})
    peak = report.get("peak_memory_bytes")
    lines.append(
        f"wall {timings.get('wall_s', 0):.1f} s · {_num(timings.get('images_per_s'))} img/s · "
        f"peak memory {'n/a' if peak is None else f'{peak / 2**20:.0f} MiB'}"
    )
    outputs = report.get("outputs", {})
    if outputs:
        lines.append("outputs: " + ", ".join(str(v) for v in outputs.values() if v))
    return "\n".join(lines)


#: Fewer images than this and a measured accuracy is too noisy to set beside a published
#: one (one image moves it by 1 % or more), so the comparison is not printed.
MIN_COMPARE_IMAGES = 100


def _published_lines(
    published: Mapping[str, Any] | None,
    norm: str,
    metrics: Mapping[str, Any],
    *,
    random: bool = False,
) -> list[str]:
    """ "expected (published) vs measured" for the eps the model card has figures for;
    a note instead for random weights or fewer than :data:`MIN_COMPARE_IMAGES` images."""
    if not published or str(published.get("norm", "")).lower() != norm:
        return []
    for entry in metrics.get("per_eps", []):
        if entry["eps"] is not None and math.isclose(entry["eps"], published["eps"]):
            if random:
                return ["published figures not compared: the weights are random (untrained)"]
            count = entry.get("num_images", metrics.get("num_images", 0)) or 0
            if count < MIN_COMPARE_IMAGES:
                return [
                    f"published figures not compared: {plural(count, 'image')} are too few "
                    f"(at least {MIN_COMPARE_IMAGES}; published: {published['images']})"
                ]
            return [
                f"expected (published, {published['attack']} on {published['images']} images) "
                f"vs measured at eps {format_eps(entry['eps'])}: clean "
                f"{_pct(published['clean'])} vs {_pct(entry['clean_accuracy'])}, robust "
                f"{_pct(published['robust'])} vs {_pct(entry['robust_accuracy'])}"
            ]
    return []


def eps_axis(ax: Any, values: Sequence[float]) -> dict[float, int]:
    """Evenly spaced eps ticks on a matplotlib axis; returns each eps's x position.

    Budgets usually double (1/255, 2/255, 4/255...): on a linear axis the small ones'
    labels overlap, so each eps gets its own slot instead.
    """
    xs = sorted(set(values))
    ax.set_xticks(range(len(xs)), [format_eps(x) if x else "0" for x in xs], rotation=45)
    return {x: i for i, x in enumerate(xs)}


def plot_curve(metrics: Mapping[str, Any], path: str | Path, *, title: str = "") -> bool:
    """Plot robust accuracy against eps (clean accuracy at eps 0) into a PNG.

    Returns:
        ``True`` if written; ``False`` (with a warning) when matplotlib is missing.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        warnings.warn(
            "matplotlib is not installed, so no robust-accuracy plot was written; "
            "install it with: pip install 'advtune[plot]'",
            stacklevel=2,
        )
        return False
    points = sorted(
        (e["eps"], e["robust_accuracy"])
        for e in metrics["per_eps"]
        if e["eps"] is not None and e["robust_accuracy"] is not None
    )
    if points and points[0][0] != 0 and metrics.get("clean_accuracy") is not None:
        points.insert(0, (0.0, metrics["clean_accuracy"]))
    # An explicit Figure + Agg canvas: no pyplot global state, no display backend.
    fig = Figure(figsize=(5, 3.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    place = eps_axis(ax, [p[0] for p in points])
    ax.plot([place[p[0]] for p in points], [100 * p[1] for p in points], marker="o")
    ax.set_xlabel("eps (evenly spaced)")
    ax.set_ylabel("robust accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    from advtune.storage import atomic_write_bytes

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())
    return True
