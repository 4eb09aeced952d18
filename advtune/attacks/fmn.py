"""Fast Minimum-Norm attack, L2 and L∞ (Pintor et al., NeurIPS 2021)."""

from __future__ import annotations

import torch
from torch import nn

from advtune.attacks._minnorm import FRACTION, Smallest, cosine_anneal
from advtune.attacks._registry import Param, register
from advtune.attacks._result import (
    AttackResult,
    ModelGuard,
    check_inputs,
    margin_loss,
    success_of,
    work_dtype,
)
from advtune.attacks.threat import threat_model

__all__ = ["FMN_PARAMS", "fmn"]

#: The threat models FMN minimises (its step is the L2-normalised gradient; the norm
#: decides the radius update and the projection, :meth:`ThreatModel.shrink`).
NORMS = ("l2", "linf")

_TINY = 1e-12  # floor for gradient norms (a flat gradient gives a zero step, not NaN)


#: FMN's hyperparameters, declared once (validation, presets, CLI, tests read them).
FMN_PARAMS = (
    Param("steps", int, 100, low=1, role="budget", cheap=3, help="gradient steps"),
    Param("norm", str, "l2", choices=NORMS, role="norm", help="the norm minimised"),
    Param("alpha_init", float, 1.0, low=0.0, low_open=True, high=1e4, help="first step length"),
    Param("alpha_final", float, None, low=0.0, low_open=True, high=1e4, nullable=True,
          help="last step length; None: alpha_init / 100"),
    Param("gamma_init", float, 0.05, **FRACTION, help="first relative change of the radius"),
    Param("gamma_final", float, 0.001, **FRACTION, help="last relative change of the radius"),
)  # fmt: skip


@register("fmn", norm="l2", params=FMN_PARAMS)
def fmn(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int = 100,
    norm: str = "l2",
    alpha_init: float = 1.0,
    alpha_final: float | None = None,
    gamma_init: float = 0.05,
    gamma_final: float = 0.001,
    target: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    seeds: torch.Tensor | None = None,
) -> AttackResult:
    """Fast Minimum-Norm: the smallest L2 (or L∞) perturbation found in ``steps`` steps.

    Each step evaluates ``x + δ`` once (logits and the gradient of the logit margin
    ``m = max_{j≠y} z_j − z_y``, targeted ``z_t − max_{j≠t} z_j``), then

    * adapts the radius ``ε``: while no adversarial has been seen it goes a factor
      ``1 + γ`` beyond the linearised boundary ``‖δ‖ + |m| / ‖∇m‖_*`` (``*`` the dual
      norm: L2 for L2, L1 for L∞), and never shrinks (the paper uses exactly the
      linearised distance; see ``docs/minnorm.md``); on an adversarial iterate it shrinks
      to ``min(ε(1 − γ), best norm)``; on a non-adversarial one after the first success it
      grows to ``ε(1 + γ)``; never above the largest norm the image box allows;
    * takes a step ``α · ∇m / ‖∇m‖₂`` on ``δ``, projects onto the ``ε``-ball (L2: rescale;
      L∞: clamp) and clips ``x + δ`` into [0, 1].

    ``α`` and ``γ`` decay from ``*_init`` to ``*_final`` with a cosine schedule. Each sample
    keeps the smallest-norm adversarial iterate seen; one that never succeeds returns
    ``x`` with ``success=False``. Every sample runs all steps, decided per sample, so
    results do not depend on the batch. Deterministic. Reference: Pintor, Roli, Brendel
    & Biggio, "Fast Minimum-norm Adversarial Attacks through Adaptive Norm Constraints",
    NeurIPS 2021 (arXiv:2102.12827).

    Args:
        model: Classifier on [0, 1] images returning logits ``(N, K)``; expected in eval
            mode. Its modes and ``requires_grad`` flags are restored afterwards.
        x: ``(N, C, H, W)`` clean images in [0, 1]. Not modified.
        y: ``(N,)`` true labels.
        steps: Gradient steps, ``>= 1`` (model calls are ``steps + 1``).
        norm: ``"l2"`` or ``"linf"``: the norm minimised.
        alpha_init: First step length (L2 length of the step on ``δ``), ``> 0``.
        alpha_final: Last step length, ``> 0``; ``None`` means ``alpha_init / 100``.
        gamma_init: First relative change of ``ε`` per step, in (0, 1).
        gamma_final: Last relative change of ``ε`` per step, in (0, 1).
        target: Optional ``(N,)`` target classes (each ≠ ``y``) for a targeted attack.
        generator: Accepted and ignored (FMN is deterministic).
        seeds: Accepted and ignored.

    Returns:
        :class:`AttackResult`; ``model_calls`` is ``steps + 1`` (plus one if a recorded
        success did not reproduce in the final evaluation).

    Raises:
        ValueError: Invalid inputs or hyperparameters.
    """
    y, target = check_inputs(model, x, y, target, generator=generator, seeds=seeds)
    threat = threat_model(norm)
    alpha_final = alpha_init / 100 if alpha_final is None else alpha_final

    with ModelGuard(model, y=y, target=target) as guard, torch.no_grad():
        wd = work_dtype(x)
        x0 = x.detach().to(wd)
        n, dev = x0.shape[0], x0.device
        view = (-1,) + (1,) * (x0.dim() - 1)

        size = threat.norm
        delta = torch.zeros_like(x0)
        eps = torch.full((n,), float("inf"), dtype=wd, device=dev)
        # The farthest any image in the box can be from x: ε never needs to exceed it.
        worst = size(torch.maximum(x0, 1.0 - x0))
        smallest = Smallest(x0)

        for i in range(steps):
            alpha = cosine_anneal(alpha_init, alpha_final, i, steps)
            gamma = cosine_anneal(gamma_init, gamma_final, i, steps)
            xa = x0 + delta
            g, logits = guard.grad(xa.to(x.dtype), lambda z: margin_loss(z, y, target))
            g = g.to(wd)
            margin = margin_loss(logits, y, target).to(wd)
            d_norm = size(delta)

            adv = success_of(logits, y, target)
            smallest.update(xa, d_norm, adv)

            flat = g.flatten(1)
            g_l2 = flat.norm(p=2, dim=1)
            g_dual = threat.dual_norm(g)
            # First-order distance to the boundary along the steepest direction. Until the
            # first success, ε aims γ beyond it and never shrinks: the paper sets ε to
            # exactly this distance, which lands on the boundary of a piecewise-linear
            # model (success then hinges on rounding) and, on curved boundaries,
            # undershoots step after step (docs/minnorm.md has the measurements).
            to_boundary = d_norm + margin.abs() / g_dual.clamp_min(_TINY)
            seek = torch.where(torch.isfinite(eps), torch.maximum(eps, to_boundary), to_boundary)
            grown = (1.0 + gamma) * torch.where(smallest.found, eps, seek)
            eps = torch.where(adv, torch.minimum(eps * (1.0 - gamma), smallest.norm), grown)
            eps = torch.minimum(eps, worst)

            delta = delta + (alpha / g_l2.clamp_min(_TINY)).reshape(view) * g
            delta = threat.shrink(delta, eps)
            delta = (x0 + delta).clamp(0.0, 1.0) - x0

        return smallest.result(guard, x, y, target)
