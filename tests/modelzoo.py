"""torchvision classification models for the ConvBN tests: which ones have BatchNorm,
how to build them with meaningful BN statistics, and what input size they need."""

from __future__ import annotations

import functools

import torch
import torchvision
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

# Inputs are kept small so float64 on 2 CPU cores stays fast; these models need more.
_MIN_SIZE = {"inception_v3": 75, "maxvit_t": 224}
# Inception's auxiliary head cannot run at 75 px in train mode (calibration).
_BUILD_KWARGS = {"inception_v3": {"aux_logits": False, "init_weights": True}}
# float64 convolutions (depthwise ones above all) are slow on CPU: the default run checks
# one model per architecture family; `pytest -m slow` checks every BN model.
_FAST = {"resnet18", "densenet121", "efficientnet_b0", "mnasnet0_5", "googlenet"}


@functools.cache
def _meta_info() -> dict[str, tuple[bool, int]]:
    """name -> (has BatchNorm, parameter count), built on the meta device (no memory)."""
    info = {}
    for name in torchvision.models.list_models(module=torchvision.models):
        try:
            with torch.device("meta"):  # no memory, no init cost
                model = torchvision.models.get_model(name, weights=None)
        except NotImplementedError:  # an initialiser needs real data
            model = torchvision.models.get_model(name, weights=None)
        has_bn = any(isinstance(m, _BatchNorm) for m in model.modules())
        info[name] = (has_bn, sum(p.numel() for p in model.parameters()))
    return info


def bn_model_names() -> list[str]:
    """Every torchvision classification model that contains BatchNorm."""
    return [name for name, (has_bn, _) in _meta_info().items() if has_bn]


def is_slow(name: str) -> bool:
    return name not in _FAST


def input_size(name: str) -> int:
    return _MIN_SIZE.get(name, 32)


def build_calibrated(
    name: str, *, dtype: torch.dtype = torch.float64, batch: int = 16, seed: int = 0
) -> nn.Module:
    """A torchvision model with random weights whose BN statistics are calibrated.

    Running statistics come from a few train-mode forwards (cumulative average), and
    γ/β are randomised so that folding is not close to the identity. Returned in eval mode.
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # torchvision's initialisers draw from the global RNG
    model = torchvision.models.get_model(name, weights=None, **_BUILD_KWARGS.get(name, {}))
    model = model.to(dtype)
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.momentum = None  # cumulative moving average over the calibration passes
            if m.affine:
                with torch.no_grad():
                    m.weight.copy_(
                        0.2 * torch.rand(m.weight.shape, generator=gen, dtype=dtype) + 0.9
                    )
                    m.bias.copy_(0.05 * torch.randn(m.bias.shape, generator=gen, dtype=dtype))
    size = input_size(name)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.rand(batch, 3, size, size, generator=gen, dtype=dtype))
    return model.eval()
