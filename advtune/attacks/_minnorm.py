"""What the minimum-norm attacks (``cw_l2``, ``fmn``, ``ddn``) share.

They have no ``eps`` budget: each sample keeps the smallest successful image it has seen,
and a sample that never succeeds comes back as ``x`` itself with ``success=False``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from advtune.attacks._result import AttackResult, ModelGuard, finish

__all__ = ["FRACTION", "Smallest", "cosine_anneal", "finish_min_norm"]

#: Bounds of a :class:`~advtune.attacks.Param` in (0, 1) (the relative radius changes).
FRACTION: dict[str, Any] = {"low": 0.0, "low_open": True, "high": 1.0, "high_open": True}


class Smallest:
    """Per sample, the smallest-norm adversarial image seen so far.

    Args:
        x0: ``(N, C, H, W)`` clean images in the attack's working dtype; ``best`` starts
            as a copy of them.
    """

    def __init__(self, x0: torch.Tensor) -> None:
        n = x0.shape[0]
        self.best = x0.clone()
        self.norm = torch.full((n,), float("inf"), dtype=x0.dtype, device=x0.device)
        self.found = torch.zeros(n, dtype=torch.bool, device=x0.device)

    def update(self, xa: torch.Tensor, norm: torch.Tensor, adv: torch.Tensor) -> None:
        """Record ``xa`` ``(N, C, H, W)`` where ``adv`` ``(N,)`` and ``norm`` ``(N,)`` is smaller."""
        better = adv & (norm < self.norm)
        self.norm = torch.where(better, norm, self.norm)
        self.best[better] = xa[better]
        self.found |= adv

    def result(
        self, guard: ModelGuard, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None
    ) -> AttackResult:
        """:func:`finish_min_norm` of what was recorded."""
        return finish_min_norm(guard, x, self.best, self.found, y, target)


def cosine_anneal(start: float, end: float, step: int, steps: int) -> float:
    """``start`` at ``step = 0`` decaying to ``end`` along a half cosine over ``steps``."""
    return end + (start - end) * (1.0 + math.cos(math.pi * step / steps)) / 2.0


def finish_min_norm(
    guard: ModelGuard,
    x: torch.Tensor,
    best: torch.Tensor,
    found: torch.Tensor,
    y: torch.Tensor,
    target: torch.Tensor | None,
) -> AttackResult:
    """The result of a minimum-norm attack: ``best`` where ``found``, ``x`` elsewhere.

    The final images are evaluated once more (one model call). A recorded success that
    does not reproduce there (nondeterministic kernels, or the cast back to ``x``'s
    dtype moved it across the boundary) is reported as the clean image, like any
    failed sample (one more call on those samples only).

    Args:
        guard: The attack's :class:`ModelGuard` (its call count goes into the result).
        x: ``(N, C, H, W)`` clean images.
        best: ``(N, C, H, W)`` smallest successful image per sample (any float dtype).
        found: ``(N,)`` bool, whether ``best`` holds a success.
        y: ``(N,)`` labels.
        target: ``(N,)`` targets or ``None``.
    """
    x = x.detach()
    x_adv = torch.where(found.reshape(-1, *([1] * (x.dim() - 1))), best.to(x.dtype), x)
    res = finish(guard, x, x_adv, y, target)
    lost = found & ~res.success
    if not bool(lost.any()):
        return res
    x_adv, logits = res.x_adv.clone(), res.logits.clone()
    x_adv[lost] = x[lost]
    logits[lost] = guard.logits(x_adv[lost])
    return finish(guard, x, x_adv, y, target, logits=logits)
