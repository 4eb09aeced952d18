"""MI-FGSM: iterative FGSM with momentum (Dong et al., CVPR 2018)."""

from __future__ import annotations

import torch
from torch import nn

from advtune.attacks._registry import register
from advtune.attacks._result import (
    AttackResult,
    ModelGuard,
    ce_loss,
    check_inputs,
    check_int,
    check_nonnegative,
    check_positive,
    finish,
    project_linf,
    work_dtype,
)

__all__ = ["mifgsm"]


@register("mifgsm", norm="linf")
def mifgsm(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    steps: int = 10,
    step_size: float | None = None,
    decay: float = 1.0,
    target: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    seeds: torch.Tensor | None = None,
) -> AttackResult:
    """Momentum Iterative FGSM (L∞), the usual baseline for transfer attacks.

    ``g ← decay·g + ∇/‖∇‖₁`` then ``x ← Π(x + step_size·sign(g))``. The gradient is
    normalised by its mean absolute value (its L1 norm over the number of pixels, the
    same direction and the same sign as the paper's L1 normalisation), as torchattacks'
    ``MIFGSM`` does. Reference: Dong et al., "Boosting Adversarial Attacks with
    Momentum", CVPR 2018 (arXiv:1710.06081).

    Args:
        model: Classifier on [0, 1] images returning logits ``(N, K)``; expected in eval
            mode. Its modes and ``requires_grad`` flags are restored afterwards.
        x: ``(N, C, H, W)`` clean images in [0, 1]. Not modified.
        y: ``(N,)`` true labels.
        eps: L∞ budget (absolute pixel units), ``>= 0``.
        steps: Iterations, ``>= 1``.
        step_size: Absolute step; ``None`` means ``eps / steps`` (the paper's choice: the
            iterations can just reach the boundary).
        decay: Momentum factor μ ``>= 0`` (μ = 0 is I-FGSM/BIM).
        target: Optional ``(N,)`` target classes (each ≠ ``y``) for a targeted attack.
        generator: Accepted and ignored (MI-FGSM is deterministic).
        seeds: Accepted and ignored.

    Returns:
        :class:`AttackResult`; ``model_calls == steps + 1``.

    Raises:
        ValueError: Invalid inputs or hyperparameters.
    """
    y, target = check_inputs(model, x, y, target, generator=generator, seeds=seeds)
    eps = check_nonnegative("eps", eps)
    steps = check_int("steps", steps, minimum=1)
    alpha = eps / steps if step_size is None else check_positive("step_size", step_size)
    decay = check_nonnegative("decay", decay)
    with ModelGuard(model, y=y, target=target) as guard, torch.no_grad():
        x0 = x.detach().to(work_dtype(x))
        xa = x0.clone()
        momentum = torch.zeros_like(x0)
        for _ in range(steps):
            g, _ = guard.grad(xa.to(x.dtype), lambda z: ce_loss(z, y, target))
            g = g.to(x0.dtype)
            # A zero gradient (saturated softmax) would divide 0/0: keep it at zero.
            scale = g.abs().mean(dim=(1, 2, 3), keepdim=True)
            g = g / torch.where(scale > 0, scale, torch.ones_like(scale))
            momentum = decay * momentum + g
            xa = project_linf(xa + alpha * momentum.sign(), x0, eps)
        return finish(guard, x, xa, y, target)
