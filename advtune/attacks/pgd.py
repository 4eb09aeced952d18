"""PGD: projected gradient ascent in an L∞ or L2 ball (Madry et al., ICLR 2018)."""

from __future__ import annotations

import torch
from torch import nn

from advtune.attacks._loop import EPS, bind, steepest_ascent, step_size_param, with_restarts
from advtune.attacks._registry import NORMS, Param, register
from advtune.attacks._result import LOSSES, AttackResult
from advtune.attacks.threat import threat_model

__all__ = ["PGD_PARAMS", "pgd"]

#: PGD's hyperparameters, declared once (validation, presets, CLI, tests read them).
PGD_PARAMS = (
    EPS,
    Param("steps", int, 10, low=1, role="budget", cheap=3, help="gradient steps per restart"),
    step_size_param("2.5 · eps / steps"),
    Param("norm", str, "linf", choices=NORMS, role="norm", help="threat model"),
    Param("random_start", bool, True, help="start at a random point of the ball"),
    Param("restarts", int, 1, low=1, role="budget", cheap=1, help="runs per sample"),
    Param("early_stop", bool, False, help="stop moving a sample once it succeeds"),
    Param("loss", str, "ce", choices=tuple(LOSSES), help="objective: ce or margin"),
)  # fmt: skip


@register("pgd", norm="linf", randomized=True, params=PGD_PARAMS)
def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    steps: int = 10,
    step_size: float | None = None,
    norm: str = "linf",
    random_start: bool = True,
    restarts: int = 1,
    early_stop: bool = False,
    loss: str = "ce",
    target: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    seeds: torch.Tensor | None = None,
) -> AttackResult:
    """Projected Gradient Descent in an L∞ or L2 ball, with random restarts.

    Each step moves ``step_size`` along the signed gradient (L∞) or the L2-normalised
    gradient (L2) of the loss, then projects onto the ``eps``-ball around ``x`` and the
    [0, 1] box (:class:`~advtune.attacks.Linf`, :class:`~advtune.attacks.L2`). A sample
    whose final iterate fails but an earlier iterate succeeded returns that successful
    iterate (the one with the highest loss). Without random start, with ``restarts=1``
    and when the final iterate succeeds (or none does) it is step for step the update of
    torchattacks' ``PGD``. Reference: Madry et al., "Towards Deep Learning Models
    Resistant to Adversarial Attacks", ICLR 2018 (arXiv:1706.06083).

    Args:
        model: Classifier on [0, 1] images returning logits ``(N, K)``, in eval mode
            (a BatchNorm or Dropout in training mode is refused). Its modes and
            ``requires_grad`` flags are restored afterwards.
        x: ``(N, C, H, W)`` clean images in [0, 1]. Not modified.
        y: ``(N,)`` true labels.
        eps: Radius of the ball (absolute pixel units), ``>= 0``.
        steps: Gradient steps per restart, ``>= 1``.
        step_size: Absolute step; ``None`` means ``2.5 · eps / steps`` (Madry et al.'s
            rule: enough to cross the ball and come back).
        norm: ``"linf"`` or ``"l2"``.
        random_start: Start from a random point of the ball (then clipped into [0, 1])
            instead of from ``x``: uniform for L∞; for L2 a Gaussian direction with a
            radius uniform in [0, eps] (chosen by measurement, see docs/attacks.md).
        restarts: Runs per sample, ``>= 1`` (:func:`~advtune.attacks.with_restarts`):
            later runs attack only the samples not yet broken, with fresh per-sample
            seeds; among failures the run with the largest logit margin is kept.
            ``restarts > 1`` needs ``random_start=True`` (otherwise every run would be
            identical) and raises ``ValueError`` without it.
        early_stop: Stop moving a sample as soon as it is successful (fewer model calls,
            smaller perturbations).
        loss: ``"ce"`` (cross-entropy; −CE of the target when targeted) or ``"margin"``
            (CW logit margin ``max_{j≠y} z_j − z_y``; targeted ``z_t − max_{j≠t} z_j``).
        target: Optional ``(N,)`` target classes (each ≠ ``y``) for a targeted attack.
        generator: Source of the random start when ``seeds`` is not given.
        seeds: ``(N,)`` integer seeds; sample *i*'s random start depends only on
            ``seeds[i]``, so results do not depend on batch composition.

    Returns:
        :class:`AttackResult`. ``model_calls`` counts the gradient steps plus one
        evaluation per restart (calls on a subset of the batch count once each).

    Raises:
        ValueError: Invalid inputs or hyperparameters.
    """
    once = bind(
        _pgd_once, eps=eps, steps=steps, step_size=step_size, norm=norm,
        random_start=random_start, early_stop=early_stop, loss=loss,
    )  # fmt: skip
    return with_restarts(
        once, model, x, y, restarts=restarts, randomized=random_start,
        target=target, generator=generator, seeds=seeds,
    )  # fmt: skip


def _pgd_once(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    steps: int,
    step_size: float | None,
    norm: str,
    random_start: bool,
    early_stop: bool,
    loss: str,
    target: torch.Tensor | None,
    generator: torch.Generator | None,
    seeds: torch.Tensor | None,
) -> AttackResult:
    """One PGD run (hyperparameters already validated)."""
    return steepest_ascent(
        model, x, y, threat=threat_model(norm, eps), steps=steps,
        step_size=2.5 * eps / steps if step_size is None else step_size,
        objective=LOSSES[loss], early_stop=early_stop, random_start=random_start,
        target=target, generator=generator, seeds=seeds,
    )  # fmt: skip
