"""Checks for gradient masking and other signs of an unreliable robustness evaluation.

The checks AutoAttack runs alongside its attacks (Croce & Hein, ICML 2020, Section 5 and
the reference implementation's flags): a model whose outputs change between identical
calls (a randomised defence: use ``version="rand"``), zero or non-finite input gradients,
a black-box attack breaking samples the white-box attacks could not, and robust accuracy
that grows with the budget (eps or steps). Each check returns a plain ``dict`` (JSON
ready, for ``report.json``) and, when it fires, emits a :class:`GradientMaskingWarning`
subclass naming what was seen.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

__all__ = [
    "BlackBoxWinsWarning",
    "GradientMaskingWarning",
    "NonFiniteGradientWarning",
    "NonMonotoneWarning",
    "RandomizedModelWarning",
    "ZeroGradientWarning",
    "check_black_box",
    "check_gradients",
    "check_monotone",
    "check_randomized",
]


class GradientMaskingWarning(UserWarning):
    """Base class: the robustness numbers of this run may be overestimates."""


class RandomizedModelWarning(GradientMaskingWarning):
    """The model's outputs differ between two identical calls (a randomised defence)."""


class ZeroGradientWarning(GradientMaskingWarning):
    """Some samples have an input gradient that is exactly zero."""


class NonFiniteGradientWarning(GradientMaskingWarning):
    """Some samples have NaN or infinite input gradients (zeroed before stepping)."""


class BlackBoxWinsWarning(GradientMaskingWarning):
    """A black-box attack broke samples that the white-box attacks before it did not."""


class NonMonotoneWarning(GradientMaskingWarning):
    """Robust accuracy grew with a larger budget (eps or steps)."""


def check_gradients(grad: torch.Tensor, *, stacklevel: int = 2) -> dict[str, Any]:
    """Count samples with an all-zero or a non-finite input gradient.

    Args:
        grad: ``(N, ...)`` input gradients of a per-sample loss.
        stacklevel: Passed to :func:`warnings.warn`.

    Returns:
        ``{"check": "gradients", "samples": N, "zero": int, "nonfinite": int, "ok": bool}``;
        warns :class:`ZeroGradientWarning` / :class:`NonFiniteGradientWarning` if not ok.
    """
    flat = grad.detach().flatten(1)
    nonfinite = int((~torch.isfinite(flat)).any(dim=1).sum())
    zero = int((flat == 0).all(dim=1).sum())
    n = flat.shape[0]
    if nonfinite:
        warnings.warn(
            f"{nonfinite} of {n} samples have NaN or infinite input gradients (zeroed "
            "before the step): the model or its loss is numerically broken for them and "
            "gradient attacks may overestimate robustness",
            NonFiniteGradientWarning,
            stacklevel=stacklevel,
        )
    if zero:
        warnings.warn(
            f"{zero} of {n} samples have an input gradient that is exactly zero: gradient "
            "attacks cannot move them, so their robustness may be overestimated "
            "(gradient masking)",
            ZeroGradientWarning,
            stacklevel=stacklevel,
        )
    return {
        "check": "gradients",
        "samples": n,
        "zero": zero,
        "nonfinite": nonfinite,
        "ok": not (zero or nonfinite),
    }


def check_randomized(
    first: torch.Tensor, second: torch.Tensor, *, tol: float = 1e-4, stacklevel: int = 2
) -> dict[str, Any]:
    """Compare the logits of two identical calls of the model on the same images.

    Args:
        first, second: ``(N, K)`` logits of the two calls.
        tol: Largest accepted L2 distance between the two calls' logit vectors, each
            scaled to unit L2 norm (scale-free; float noise of a deterministic model is
            far below it).
        stacklevel: Passed to :func:`warnings.warn`.

    Returns:
        ``{"check": "randomized", "max_diff": float, "prediction_changes": int,
        "ok": bool}``; warns :class:`RandomizedModelWarning` if not ok.
    """
    a, b = first.detach().double(), second.detach().double()
    unit_a = a / (a.norm(dim=1, keepdim=True) + 1e-10)
    unit_b = b / (b.norm(dim=1, keepdim=True) + 1e-10)
    diff = (unit_a - unit_b).norm(dim=1)
    max_diff = float(diff.max()) if diff.numel() else 0.0
    if not math.isfinite(max_diff):
        max_diff = math.inf
    changes = int((a.argmax(1) != b.argmax(1)).sum())
    ok = max_diff <= tol and changes == 0
    if not ok:
        warnings.warn(
            f"the model's outputs differ between two identical calls (largest normalised "
            f"difference {max_diff:.3g}, {changes} predictions changed): it looks "
            'randomised; evaluate it with version="rand" (EOT) and report that',
            RandomizedModelWarning,
            stacklevel=stacklevel,
        )
    return {
        "check": "randomized",
        "max_diff": max_diff,
        "prediction_changes": changes,
        "ok": ok,
    }


def check_black_box(
    broken: Mapping[str, int],
    *,
    black_box: Iterable[str],
    samples: int,
    alpha: float = 0.002,
    stacklevel: int = 2,
) -> dict[str, Any]:
    """Did a black-box attack break samples the white-box attacks before it could not?

    In an ensemble where each attack sees only the samples still robust, samples broken
    by a score-based attack run after the gradient attacks are samples where gradients
    failed: a sign of gradient masking (AutoAttack flags a drop of more than 0.2 points).

    Args:
        broken: Component name → number of samples it broke (components in run order).
        black_box: Names of the black-box components (e.g. ``{"square"}``).
        samples: Number of samples evaluated (the batch).
        alpha: Fraction of ``samples`` a black-box attack may break before it warns.
        stacklevel: Passed to :func:`warnings.warn`.

    Returns:
        ``{"check": "black_box", "broken_by_black_box": {name: count}, "ok": bool}``;
        warns :class:`BlackBoxWinsWarning` if not ok.
    """
    names = set(black_box)
    found = {k: int(v) for k, v in broken.items() if k in names}
    worst = max(found.values(), default=0)
    ok = samples == 0 or worst <= alpha * samples
    if not ok:
        detail = ", ".join(f"{k}: {v}" for k, v in found.items() if v)
        warnings.warn(
            f"black-box attacks broke samples the white-box attacks did not ({detail} of "
            f"{samples}): the gradients may be masked; run the black-box attack with more "
            "queries and restarts, or an adaptive attack",
            BlackBoxWinsWarning,
            stacklevel=stacklevel,
        )
    return {"check": "black_box", "broken_by_black_box": found, "samples": samples, "ok": ok}


def check_monotone(
    curve: Sequence[tuple[float, float]] | Mapping[float, float],
    *,
    what: str = "eps",
    tol: float = 0.0,
    stacklevel: int = 2,
) -> dict[str, Any]:
    """Robust accuracy must not grow with the budget (pure: nothing is recomputed).

    Args:
        curve: ``(budget, robust_accuracy)`` pairs (or a mapping budget → accuracy), in
            any order; ``budget`` is eps or a step count.
        what: Name of the budget, for the message and the record (``"eps"``,
            ``"steps"``).
        tol: Accepted increase (accuracy units) before it counts as a violation.
        stacklevel: Passed to :func:`warnings.warn`.

    Returns:
        ``{"check": "monotone", "what": what, "violations": [{"from": b0, "to": b1,
        "accuracy_from": a0, "accuracy_to": a1}, ...], "ok": bool}``; warns
        :class:`NonMonotoneWarning` if not ok.

    Raises:
        ValueError: A budget given twice, or a non-finite value.
    """
    items = list(curve.items()) if isinstance(curve, Mapping) else list(curve)
    points = []
    for pair in items:
        if len(pair) != 2:
            raise ValueError(f"curve entries must be (budget, accuracy) pairs, got {pair!r}")
        b, a = float(pair[0]), float(pair[1])
        if not (math.isfinite(b) and math.isfinite(a)):
            raise ValueError(f"curve values must be finite, got {pair!r}")
        points.append((b, a))
    points.sort()
    budgets = [b for b, _ in points]
    if len(set(budgets)) != len(budgets):
        raise ValueError(f"each {what} must appear once in the curve, got {budgets}")
    violations = [
        {"from": b0, "to": b1, "accuracy_from": a0, "accuracy_to": a1}
        for (b0, a0), (b1, a1) in itertools.pairwise(points)
        if a1 > a0 + tol
    ]
    if violations:
        v = violations[0]
        warnings.warn(
            f"robust accuracy grows with {what}: {v['accuracy_from']:.4g} at {what}="
            f"{v['from']:g} but {v['accuracy_to']:.4g} at {what}={v['to']:g} "
            f"({len(violations)} increase(s)); the attack is not converging (gradient "
            "masking or too small a budget)",
            NonMonotoneWarning,
            stacklevel=stacklevel,
        )
    return {"check": "monotone", "what": what, "violations": violations, "ok": not violations}
