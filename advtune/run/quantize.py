"""8-bit saving that stays inside the threat model: :func:`quantize_adv`.

The fitting itself lives once on the threat-model objects
(:meth:`advtune.attacks.ThreatModel.quantize`); this is the run pipeline's name for it.
"""

from __future__ import annotations

import torch

__all__ = ["quantize_adv"]


def quantize_adv(
    x_adv: torch.Tensor, x: torch.Tensor, *, norm: str, eps: float | None
) -> torch.Tensor:
    """The uint8 image to save for ``x_adv``, inside the threat model around ``x``.

    ``threat_model(norm, eps).quantize(x_adv, x)``: rounding to 8 bits never steps
    outside the budget (see :meth:`advtune.attacks.ThreatModel.quantize`); ``eps=None``
    (no budget) is plain rounding.

    Args:
        x_adv: ``(N, C, H, W)`` adversarial images in [0, 1].
        x: ``(N, C, H, W)`` clean images in [0, 1], multiples of 1/255.
        norm: a threat-model name (``advtune.attacks.threat_names()``).
        eps: the budget in [0, 1] pixel units, or ``None``.

    Returns:
        ``(N, C, H, W)`` uint8 tensor on ``x``'s device.
    """
    from advtune.attacks import threat_model

    return threat_model(norm, eps).quantize(x_adv, x)
