"""FGSM: one signed-gradient step (Goodfellow, Shlens & Szegedy, ICLR 2015)."""

from __future__ import annotations

import torch
from torch import nn

from advtune.attacks._loop import EPS, steepest_ascent
from advtune.attacks._registry import register
from advtune.attacks._result import AttackResult, ce_loss
from advtune.attacks.threat import Linf

__all__ = ["fgsm"]


@register("fgsm", norm="linf", params=(EPS,))
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
    cross-entropy of ``target``. It is the shared projected-gradient loop with one step
    of ``eps`` from ``x`` (a sample the model already gets wrong on ``x`` and right after
    the step keeps ``x``). Reference: Goodfellow et al., "Explaining and Harnessing
    Adversarial Examples", ICLR 2015 (arXiv:1412.6572).

    Args:
        model: Classifier on [0, 1] images returning logits ``(N, K)``, in eval mode.
            Its modes and ``requires_grad`` flags are restored afterwards.
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
    return steepest_ascent(
        model, x, y, threat=Linf(eps), steps=1, step_size=eps,
        objective=ce_loss, target=target, generator=generator, seeds=seeds,
    )  # fmt: skip
