"""Metrics of a run, computed once, from manifest rows only.

An interrupted and resumed run, or the merged rows of torchrun ranks, therefore reports
exactly what an uninterrupted single process does. Rows with non-finite logits
(:func:`advtune.run.batch.row_is_finite`) never count as correct or robust; they are
counted in ``num_nonfinite``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from advtune.run.batch import row_is_finite
from advtune.run.spec import AttackConfig

__all__ = [
    "compute_metrics",
    "ensemble_components",
    "is_correct",
    "is_robust",
    "robust_after",
    "success_counts",
]

# Metrics over an empty set are None (null in JSON), not NaN: NaN != NaN would make equal
# reports compare unequal.


def _mean(values: Sequence[float]) -> float | None:
    # fsum: exact, so the result does not depend on row order.
    return math.fsum(values) / len(values) if values else None


def _median(values: Sequence[float]) -> float | None:
    return float(statistics.median(values)) if values else None


def _l1(rows: Sequence[Mapping[str, Any]]) -> list[float]:
    """The rows' L1 norms; none at all when a row has none (written before the ``l1``
    column): a mean over only the newer rows of a resumed run would pass for all of them."""
    values = [r.get("l1") for r in rows]
    if any(v is None or v == "" for v in values):
        return []
    return [float(v) for v in values]  # type: ignore[arg-type]


def _rate(flags: Sequence[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def is_correct(row: Mapping[str, Any]) -> bool:
    """The model classified the clean image right (and its clean logits were finite)."""
    return row["clean_pred"] == row["label"] and math.isfinite(row["clean_conf"])


def is_robust(row: Mapping[str, Any]) -> bool:
    """The saved adversarial image is still classified right (finite logits only)."""
    return row["adv_pred"] == row["label"] and row_is_finite(row)


def success_counts(rows: Sequence[Mapping[str, Any]], *, targeted: bool) -> tuple[int, int]:
    """``(successes, eligible)`` behind ``success_rate``: untargeted over the correctly
    classified images, targeted over all. The progress bar uses it too."""
    eligible = rows if targeted else [r for r in rows if is_correct(r)]
    return sum(bool(r["success"]) for r in eligible), len(eligible)


def ensemble_components(
    rows: Sequence[Mapping[str, Any]], config: AttackConfig
) -> list[str] | None:
    """The components of an ensemble run, in run order; ``None`` for other attacks.

    For ``autoattack`` the order comes from its configuration (so components that broke
    nothing are listed too); names found in the rows' ``broken_by`` that it does not list
    follow in the order of their first row.
    """
    names: list[str] = []
    if config.attack == "autoattack":
        from advtune.attacks.autoattack import _plan

        try:
            _, plan = _plan(config.params.get("version"), config.params.get("attacks"))
            names = [label for label, *_ in plan]
        except ValueError:
            names = []
    for row in sorted(rows, key=lambda r: r["index"]):
        name = row.get("broken_by") or ""
        if name and name != "clean" and name not in names:
            names.append(name)
    return names if names or config.attack == "autoattack" else None


def robust_after(rows: Sequence[Mapping[str, Any]], components: Sequence[str]) -> dict[str, Any]:
    """Robust accuracy after the clean pass and after each ensemble component.

    The attack's own verdict (before 8-bit quantisation), from the ``broken_by`` column:
    the fraction of ``rows`` not yet broken after each stage, as the official AutoAttack
    log prints it. ``{"clean": a0, components[0]: a1, ...}``; ``None`` values for no rows.
    """
    broken = [r.get("broken_by") or "" for r in rows]
    out: dict[str, Any] = {"clean": _rate([b != "clean" for b in broken])}
    done = {"clean"}
    for name in components:
        done.add(name)
        out[name] = _rate([b not in done for b in broken])
    return out


def _group_metrics(rows: Sequence[Mapping[str, Any]], targeted: bool) -> dict[str, Any]:
    hits, eligible = success_counts(rows, targeted=targeted)
    return {
        "num_images": len(rows),
        "clean_accuracy": _rate([is_correct(r) for r in rows]),
        "robust_accuracy": _rate([is_robust(r) for r in rows]),
        "success_rate": hits / eligible if eligible else None,
    }


def compute_metrics(
    rows: Sequence[Mapping[str, Any]],
    config: AttackConfig,
    *,
    categories: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Metrics of a run from its manifest rows alone.

    Args:
        rows: manifest rows (any order; each (index, eps) once).
        config: the attack configuration (eps order, targeted).
        categories: class names for the per-class breakdown.

    Returns:
        ``{"num_images", "clean_accuracy", "mean_clean_confidence", "targeted",
        "num_nonfinite", "per_eps": [...]}``; each ``per_eps`` entry has ``eps``,
        ``num_images``, ``clean_accuracy``, ``robust_accuracy``, ``success_rate``
        (untargeted: over the images the model classified correctly; targeted: target
        hit rate over all), ``success_rate_all``, ``num_correct``, ``num_nonfinite``,
        ``quantization_flips``, ``linf_mean``, ``linf_median``, ``l2_mean``,
        ``l2_median``, ``l1_mean``, ``l1_median``, ``mean_adv_confidence``, ``per_class`` (by label: ``name``,
        ``num_images``, ``clean_accuracy``, ``robust_accuracy``, ``success_rate``) and,
        for an ensemble attack, ``robust_after`` (:func:`robust_after`). With a single
        eps its entries are also copied to the top level.
    """
    targeted = config.targeted is not None
    by_eps: dict[float | None, list[Mapping[str, Any]]] = {e: [] for e in config.eps_values()}
    for row in rows:
        eps = row["eps"]
        if eps not in by_eps:
            raise ValueError(f"manifest row for {row['path']} has eps {eps}, not in {list(by_eps)}")
        by_eps[eps].append(row)
    first = by_eps[config.eps_values()[0]]
    components = ensemble_components(rows, config)
    per_eps = []
    for eps, group in by_eps.items():
        group = sorted(group, key=lambda r: r["index"])
        finite = [r for r in group if row_is_finite(r)]
        l1 = _l1(group)
        entry = {"eps": eps, **_group_metrics(group, targeted)}
        entry.update(
            {
                "success_rate_all": _rate([r["success"] for r in group]),
                "num_correct": sum(is_correct(r) for r in group),
                "num_nonfinite": len(group) - len(finite),
                "quantization_flips": sum(r["success"] != r["attack_success"] for r in group),
                "linf_mean": _mean([r["linf"] for r in group]),
                "linf_median": _median([r["linf"] for r in group]),
                "l2_mean": _mean([r["l2"] for r in group]),
                "l2_median": _median([r["l2"] for r in group]),
                "l1_mean": _mean(l1),
                "l1_median": _median(l1),
                "mean_adv_confidence": _mean([r["adv_conf"] for r in finite]),
            }
        )
        if components is not None:
            entry["robust_after"] = robust_after(group, components)
        classes: dict[int, list[Mapping[str, Any]]] = {}
        for r in group:
            classes.setdefault(r["label"], []).append(r)
        entry["per_class"] = {
            str(label): {
                "name": categories[label] if categories and 0 <= label < len(categories) else None,
                **_group_metrics(members, targeted),
            }
            for label, members in sorted(classes.items())
        }
        per_eps.append(entry)
    metrics: dict[str, Any] = {
        "num_images": len(first),
        "clean_accuracy": _rate([is_correct(r) for r in first]),
        "mean_clean_confidence": _mean(
            [r["clean_conf"] for r in first if math.isfinite(r["clean_conf"])]
        ),
        "targeted": config.targeted,
        "num_nonfinite": len(
            {r["index"] for g in by_eps.values() for r in g if not row_is_finite(r)}
        ),
        "per_eps": per_eps,
    }
    if len(per_eps) == 1:
        metrics.update({k: v for k, v in per_eps[0].items() if k not in metrics})
    return metrics
