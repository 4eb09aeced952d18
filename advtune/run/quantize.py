"""8-bit saving that stays inside the threat model: :func:`quantize_adv`.

# merge: the attack-core helper moves 8-bit fitting onto the threat-model objects
# (``Linf``/``L2``); this file then delegates to them.
"""

from __future__ import annotations

import math

import torch

__all__ = ["eps_levels", "quantize_adv"]


def eps_levels(eps: float) -> int:
    # The largest whole number of 8-bit levels within eps; the tolerance absorbs
    # 4/255 * 255 evaluating to 3.9999999999999996.
    return math.floor(eps * 255 + 1e-6)


def quantize_adv(
    x_adv: torch.Tensor, x: torch.Tensor, *, norm: str, eps: float | None
) -> torch.Tensor:
    """The uint8 image to save for ``x_adv``, inside the threat model around ``x``.

    ``x`` must be 8-bit quantised (the datasets guarantee it), so ``x * 255`` is an integer
    image ``c``. Rounding ``x_adv * 255`` can move a pixel by half a level, which can step
    outside the budget; this function keeps the saved image ``q`` within it:

    * L∞: ``q = c + clamp(round(d), -k, k)`` with ``d = (x_adv - x) * 255`` and ``k`` the
      whole levels within ``eps``, so ``max |q - c| / 255 <= eps``.
    * L2: ``round(d)`` when its norm is within ``eps * 255``; otherwise the coordinates
      whose rounding grew ``|d_j|`` the most are truncated toward zero instead, greedily,
      until the norm fits (truncating every coordinate always fits, since ``|trunc(d)| <=
      |d|``), so ``||q - c||_2 / 255 <= eps``.
    * ``eps=None`` (no budget): plain rounding.

    Args:
        x_adv: ``(N, C, H, W)`` adversarial images in [0, 1].
        x: ``(N, C, H, W)`` clean images in [0, 1], multiples of 1/255.
        norm: ``"linf"`` or ``"l2"``.
        eps: the budget in [0, 1] pixel units, or ``None``.

    Returns:
        ``(N, C, H, W)`` uint8 tensor on ``x``'s device.
    """
    if x_adv.shape != x.shape:
        raise ValueError(f"x_adv shape {tuple(x_adv.shape)} differs from x {tuple(x.shape)}")
    if norm not in ("linf", "l2"):
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    clean = torch.round(x.double() * 255)
    # Work on the perturbation in level units, clipped to the valid pixel range first.
    d = (x_adv.double().clamp(0, 1) * 255) - clean
    if eps is None:
        q = clean + d.round()
    elif norm == "linf":
        k = eps_levels(eps)
        q = clean + d.round().clamp(-k, k)
    else:
        q = clean + _fit_l2(d, eps * 255)
    return q.clamp_(0, 255).to(torch.uint8)


def _fit_l2(d: torch.Tensor, budget: float) -> torch.Tensor:
    """Integer perturbations close to ``d`` (level units) with per-sample L2 norm <= budget."""
    n = d.shape[0]
    flat = d.reshape(n, -1)
    rounded = flat.round()
    budget_sq = budget * budget
    over = rounded.square().sum(dim=1) > budget_sq
    if not bool(over.any()):
        return rounded.view_as(d)
    out = rounded.clone()
    for i in torch.nonzero(over).flatten().tolist():
        di = flat[i]
        norm = float(di.norm())
        if norm > budget:  # x_adv itself may sit a float rounding error outside
            di = di * (budget / norm)
        r = di.round()
        t = di.trunc()
        # Truncating coordinate j instead of rounding it lowers ||.||² by cost_j >= 0.
        cost = r.square() - t.square()
        excess = float(r.square().sum()) - budget_sq
        if excess <= 0:
            out[i] = r
            continue
        order = torch.argsort(cost, descending=True)
        saved = torch.cumsum(cost[order], dim=0)
        count = int(torch.searchsorted(saved, torch.tensor(excess, dtype=saved.dtype))) + 1
        r[order[:count]] = t[order[:count]]
        out[i] = r
    return out.view_as(d)
