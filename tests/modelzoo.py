"""torchvision classification models for the ConvBN tests: which ones have BatchNorm,
how to build them with meaningful BN statistics, and what input size they need."""

from __future__ import annotations

import contextlib
import functools
import os

import pytest
import torch
import torchvision
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from advtune.models import random_net

# Inputs are kept small so float64 on 2 CPU cores stays fast; these models need more.
_MIN_SIZE = {"inception_v3": 75, "maxvit_t": 224}
# float64 convolutions (depthwise ones above all) are slow on CPU: the default run checks
# one model per architecture family; `pytest -m slow` checks every BN model.
_FAST = {"resnet18", "densenet121", "efficientnet_b0", "mnasnet0_5", "googlenet"}


@contextlib.contextmanager
def _parameters_on_meta():
    """Register every new parameter on the meta device, so initialisers cost nothing."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


@functools.cache
def _meta_info() -> dict[str, tuple[bool, int]]:
    """name -> (has BatchNorm, parameter count), built on the meta device (no memory)."""
    info = {}
    for name in torchvision.models.list_models(module=torchvision.models):
        try:
            with torch.device("meta"):  # no memory, no init cost
                model = torchvision.models.get_model(name, weights=None)
        except NotImplementedError:  # the constructor computes with tensors (RegNet)
            with _parameters_on_meta():
                model = torchvision.models.get_model(name, weights=None)
        has_bn = any(isinstance(m, _BatchNorm) for m in model.modules())
        info[name] = (has_bn, sum(p.numel() for p in model.parameters()))
    return info


def bn_model_names() -> list[str]:
    """Every torchvision classification model that contains BatchNorm."""
    return [name for name, (has_bn, _) in _meta_info().items() if has_bn]


def is_slow(name: str) -> bool:
    return name not in _FAST


# Float64 copies of the eval, converted and gradient tensors of the largest models need
# more memory than a 24 GiB machine has (regnet_y_128gf: 645M parameters, ~5 GiB a copy).
_MIN_RAM_GIB = {"regnet_y_128gf": 64}


def _ram_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def zoo_param(name: str, fast: set[str] | frozenset[str] = frozenset(_FAST)):
    """``name`` as a pytest param: slow unless in ``fast``, skipped where memory is short."""
    marks = [] if name in fast else [pytest.mark.slow]
    need = _MIN_RAM_GIB.get(name)
    if need is not None:
        marks.append(
            pytest.mark.skipif(_ram_gib() < need, reason=f"needs >= {need} GiB of RAM in float64")
        )
    return pytest.param(name, marks=marks)


def input_size(name: str) -> int:
    return _MIN_SIZE.get(name, 32)


def build_calibrated(
    name: str, *, dtype: torch.dtype = torch.float64, batch: int = 16, seed: int = 0
) -> nn.Module:
    """A model with seeded random weights whose BN statistics are calibrated.

    :func:`advtune.models.random_net` (the one random-weights builder): running
    statistics from train-mode forwards of seeded random images at :func:`input_size`,
    γ/β randomised so that folding is not close to the identity. Eval mode.
    """
    return random_net(name, seed=seed, size=input_size(name), batch=batch, dtype=dtype)


def calibrate_bn(model: nn.Module, shape: tuple[int, ...], *, passes: int = 1) -> nn.Module:
    """BN running statistics from ``passes`` train-mode forwards of ``torch.rand(shape)``.

    Draws from the global RNG (seed it first for reproducible statistics). Returns
    ``model`` in eval mode.
    """
    model.train()
    with torch.no_grad():
        for _ in range(passes):
            model(torch.rand(*shape))
    return model.eval()


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``‖a − b‖ / ‖b‖`` (``b`` is the reference)."""
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def output_and_grad(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and the input gradient of a loss that weighs every logit differently.

    ``sum(w · logits) + sum(logits²)`` with ``w`` spread over [-1, 1], so the whole
    Jacobian is exercised. ``x`` is not modified.
    """
    x = x.clone().requires_grad_(True)
    out = model(x)
    w = torch.linspace(-1, 1, out.shape[1], dtype=out.dtype)
    (grad,) = torch.autograd.grad((out * w).sum() + out.square().sum(), x)
    return out.detach(), grad


def tiny_bn_net(classes: int = 5, *, dtype: torch.dtype = torch.float64) -> nn.Module:
    """Conv→BN blocks on 8×8 RGB with random weights and calibrated BN, in eval mode.

    Cheap enough to run every attack of the registry in the default suite. Weights and
    calibration come from a local generator (the global RNG is not used).
    """
    gen = torch.Generator().manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, classes),
    ).to(torch.float64)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5)
        net.train()
        for _ in range(3):
            net(torch.rand(32, 3, 8, 8, generator=gen, dtype=torch.float64))
    return net.to(dtype).eval()
