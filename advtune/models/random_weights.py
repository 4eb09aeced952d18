"""Random weights that are the same in every process, with meaningful BN statistics.

The one random-weights builder of advtune (bench, tests, scripts and
``load_model(weights="random")`` all use it). Initialisers (torchvision's, timm's) draw
from the global RNG, so the build runs inside :func:`torch.random.fork_rng` seeded with
``seed``: the same ``seed`` gives the same weights in every process, rank and resume,
and the caller's global RNG state is left exactly as it was.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["calibrate_batchnorm", "seeded"]


def seeded(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    """``build()`` with the global RNG seeded by ``seed``, then restored."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int, got {seed!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


@torch.no_grad()
def calibrate_batchnorm(
    net: nn.Module,
    *,
    size: int,
    seed: int = 0,
    batch: int = 4,
    passes: int = 2,
    affine: bool = True,
) -> nn.Module:
    """Give every BatchNorm of ``net`` running statistics from deterministic data.

    Statistics are the cumulative average over ``passes`` train-mode forwards of
    ``torch.rand(batch, 3, size, size)`` drawn from a generator seeded with ``seed``
    (in the net's dtype). With ``affine``, γ is drawn from [0.9, 1.1] and β from
    N(0, 0.05²) first, so that folding a BN is not close to the identity. Dropout and
    stochastic depth draw from a forked, seeded global RNG: nothing outside is touched.

    Returns:
        ``net`` in eval mode (modified in place). A net without BatchNorm is only put
        in eval mode.
    """
    bns = [m for m in net.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not bns:
        return net.eval()
    param = next(net.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    gen = torch.Generator().manual_seed(seed)
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average over the calibration passes
        if affine and bn.affine:
            bn.weight.copy_(0.2 * torch.rand(bn.weight.shape, generator=gen, dtype=dtype) + 0.9)
            bn.bias.copy_(0.05 * torch.randn(bn.bias.shape, generator=gen, dtype=dtype))
    net.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(passes):
            x = torch.rand(batch, 3, size, size, generator=gen, dtype=dtype)
            net(x.to(device))
    for bn, momentum in zip(bns, momenta):
        bn.momentum = momentum
    return net.eval()
