"""FGSM: one signed-gradient step (Goodfellow, Shlens & Szegedy, ICLR 2015)."""

from __future__ import annotations

import torch
from torch import nn

from advtune.attacks._registry import register
from advtune.attacks._result import (
    AttackResult,
    ModelGuard,
    ce_loss,
    check_inputs,
    check_nonnegative,
    clip_unit,
    finish,
    work_dtype,
)

__all__ = ["fgsm"]


@register("fgsm", norm="linf")
def fgsm(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    target: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    seeds: torch.Tensor | None = None,
) -> AttackResult:
    """Fast Gradient Sign Method (L∞): ``x + eps·sign(∇ CE)``, clipped to [0, 1].

    Untargeted it ascends the cross-entropy of ``y``; targeted it descends the
    cross-entropy of ``target``. Reference: Goodfellow et al., "Explaining and Harnessing
    Adversarial Examples", ICLR 2015 (arXiv:1412.6572).

    Args:
        model: Classifier on [0, 1] images returning logits ``(N, K)``; expected in eval
            mode. Its modes and ``requires_grad`` flags are restored afterwards.
        x: ``(N, C, H, W)`` clean images in [0, 1]. Not modified.
        y: ``(N,)`` true labels.
        eps: L∞ budget (absolute, in [0, 1] pixel units), ``>= 0``.
        target: Optional ``(N,)`` target classes (each ≠ ``y``) for a targeted attack.
        generator: Accepted and ignored (FGSM is deterministic).
        seeds: Accepted and ignored.

    Returns:
        :class:`AttackResult`; ``model_calls == 2`` (gradient step + final evaluation).

    Raises:
        ValueError: Invalid inputs or ``eps``.
    """
    y, target = check_inputs(model, x, y, target, generator=generator, seeds=seeds)
    eps = check_nonnegative("eps", eps)
    with ModelGuard(model, y=y, target=target) as guard, torch.no_grad():
        x0 = x.detach().to(work_dtype(x))
        g, _ = guard.grad(x0.to(x.dtype), lambda z: ce_loss(z, y, target))
        x_adv = clip_unit(x0 + eps * g.to(x0.dtype).sign())
        return finish(guard, x, x_adv, y, target)
