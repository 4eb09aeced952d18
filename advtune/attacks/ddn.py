"""Decoupled Direction and Norm, L2 (Rony et al., CVPR 2019)."""

from __future__ import annotations

import torch
from torch import nn

from advtune.attacks._minnorm import FRACTION, Smallest, cosine_anneal
from advtune.attacks._registry import Param, register
from advtune.attacks._result import (
    AttackResult,
    ModelGuard,
    ce_loss,
    check_inputs,
    success_of,
    work_dtype,
)
from advtune.attacks.threat import L2

__all__ = ["DDN_PARAMS", "ddn"]

_TINY = 1e-12  # floor for norms: a zero gradient or perturbation gives no step, not NaN
_ALPHA_FINAL = 0.01  # the step decays from alpha to alpha · 0.01 (cosine)


#: DDN's hyperparameters, declared once (validation, presets, CLI, tests read them).
DDN_PARAMS = (
    Param("steps", int, 100, low=1, role="budget", cheap=3, help="gradient steps"),
    Param("gamma", float, 0.05, **FRACTION, help="relative change of the radius per step"),
    Param("init_norm", float, 1.0, low=0.0, low_open=True, high=1e4, help="starting radius"),
    Param("alpha", float, 1.0, low=0.0, low_open=True, high=1e4, help="first step length"),
    Param("levels", int, None, low=2, high=65536, nullable=True,
          help="round iterates to this many grey levels (256: 8-bit)"),
)  # fmt: skip


@register("ddn", norm="l2", params=DDN_PARAMS)
def ddn(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int = 100,
    gamma: float = 0.05,
    init_norm: float = 1.0,
    alpha: float = 1.0,
    levels: int | None = None,
    target: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    seeds: torch.Tensor | None = None,
) -> AttackResult:
    """Decoupled Direction and Norm: the smallest L2 perturbation found in ``steps`` steps.

    The direction and the norm of ``δ`` are optimised separately. Each step evaluates
    ``x + δ`` once (logits and the cross-entropy gradient ``g``: ascent on CE(y), or
    descent on CE(target) when targeted), then

    * moves ``δ ← δ + α_k · g / ‖g‖₂`` (``α_k`` decays from ``alpha`` to ``alpha / 100``
      with a cosine schedule; a zero gradient gives no move);
    * sets the radius ``ε ← ε(1 − γ)`` if ``x + δ`` was adversarial, else ``ε(1 + γ)``,
      never above the largest L2 distance the image box allows;
    * rescales ``δ`` to norm ``ε`` and clips ``x + δ`` into [0, 1] (then rounds it to
      ``levels`` grey levels, if given).

    Each sample keeps the smallest-L2 adversarial iterate seen; one that never succeeds
    returns ``x`` with ``success=False``. Every sample runs all steps, so results do not
    depend on the batch. Deterministic. Reference: Rony, Hafemann, Oliveira, Ben Ayed,
    Sabourin & Granger, "Decoupling Direction and Norm for Efficient Gradient-Based L2
    Adversarial Attacks and Defenses", CVPR 2019 (arXiv:1811.09600).

    Args:
        model: Classifier on [0, 1] images returning logits ``(N, K)``; expected in eval
            mode. Its modes and ``requires_grad`` flags are restored afterwards.
        x: ``(N, C, H, W)`` clean images in [0, 1]. Not modified.
        y: ``(N,)`` true labels.
        steps: Gradient steps, ``>= 1`` (model calls are ``steps + 1``).
        gamma: Relative change of ``ε`` per step, in (0, 1).
        init_norm: Starting radius ``ε``, ``> 0``.
        alpha: First step length (L2 length of the move of ``δ``), ``> 0``.
        levels: ``None``, or an integer ``>= 2``: iterates are rounded to this many
            evenly spaced values in [0, 1] (256 for 8-bit images), so the returned
            images are exactly representable.
        target: Optional ``(N,)`` target classes (each ≠ ``y``) for a targeted attack.
        generator: Accepted and ignored (DDN is deterministic here).
        seeds: Accepted and ignored.

    Returns:
        :class:`AttackResult`; ``model_calls`` is ``steps + 1`` (plus one if a recorded
        success did not reproduce in the final evaluation).

    Raises:
        ValueError: Invalid inputs or hyperparameters.
    """
    y, target = check_inputs(model, x, y, target, generator=generator, seeds=seeds)

    with ModelGuard(model, y=y, target=target) as guard, torch.no_grad():
        wd = work_dtype(x)
        x0 = x.detach().to(wd)
        n, dev = x0.shape[0], x0.device
        view = (-1,) + (1,) * (x0.dim() - 1)

        l2 = L2().norm
        delta = torch.zeros_like(x0)
        eps = torch.full((n,), init_norm, dtype=wd, device=dev)
        worst = l2(torch.maximum(x0, 1.0 - x0))  # farthest point of the box from x
        smallest = Smallest(x0)

        for i in range(steps):
            step = cosine_anneal(alpha, alpha * _ALPHA_FINAL, i, steps)
            xa = x0 + delta
            g, logits = guard.grad(xa.to(x.dtype), lambda z: ce_loss(z, y, target))
            g = g.to(wd)
            d_l2 = l2(delta)

            adv = success_of(logits, y, target)
            smallest.update(xa, d_l2, adv)

            delta = delta + (step / l2(g).clamp_min(_TINY)).reshape(view) * g
            eps = torch.minimum(torch.where(adv, eps * (1.0 - gamma), eps * (1.0 + gamma)), worst)
            delta = delta * (eps / l2(delta).clamp_min(_TINY)).reshape(view)
            xa = (x0 + delta).clamp(0.0, 1.0)
            if levels is not None:
                xa = (xa * (levels - 1)).round() / (levels - 1)
            delta = xa - x0

        return smallest.result(guard, x, y, target)
