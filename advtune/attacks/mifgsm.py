"""MI-FGSM: iterative FGSM with momentum (Dong et al., CVPR 2018)."""

from __future__ import annotations

import torch
from torch import nn

from advtune.attacks._loop import EPS, steepest_ascent, step_size_param
from advtune.attacks._registry import Param, register
from advtune.attacks._result import AttackResult, ce_loss
from advtune.attacks.threat import Linf

__all__ = ["mifgsm"]

MIFGSM_PARAMS = (
    EPS,
    Param("steps", int, 10, low=1, role="budget", cheap=3, help="iterations"),
    step_size_param("eps / steps"),
    Param("decay", float, 1.0, low=0.0, help="momentum factor μ (0: I-FGSM)"),
)  # fmt: skip


@register("mifgsm", norm="linf", params=MIFGSM_PARAMS)
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
    ``MIFGSM`` does. A sample whose last iterate fails but an earlier one succeeded
    returns that earlier iterate. Reference: Dong et al., "Boosting Adversarial Attacks
    with Momentum", CVPR 2018 (arXiv:1710.06081).

    Args:
        model: Classifier on [0, 1] images returning logits ``(N, K)``, in eval mode.
            Its modes and ``requires_grad`` flags are restored afterwards.
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
    return steepest_ascent(
        model, x, y, threat=Linf(eps), steps=steps,
        step_size=eps / steps if step_size is None else step_size, momentum=decay,
        objective=ce_loss, target=target, generator=generator, seeds=seeds,
    )  # fmt: skip
