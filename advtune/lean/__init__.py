"""Lean layers: autograd Functions that save only what the *input* gradient needs.

An attack differentiates the loss with respect to the image, never the weights. Eager
PyTorch still saves, for every layer, what a weight gradient would need:

* a conv or linear layer saves its input (pytorch/pytorch#133566);
* ReLU saves its whole output, MaxPool2d its input and int64 indices, an eval-mode
  BatchNorm its input, average pools their input (only its shape is used).

The layers here keep exactly what the input gradient needs:

=============================  ============================================================
layer                          saved for backward
=============================  ============================================================
Conv1d/2d/3d, ConvTranspose*    the weight (backward is the transposed op)
Linear                          the weight
ReLU, ReLU6, LeakyReLU,         the derivative mask, bit-packed: 1 bit per element
Hardtanh, Hardsigmoid
MaxPool2d                       the argmax as a uint8 offset inside its window
AvgPool2d, AdaptiveAvgPool2d    nothing (the op is linear; only shapes are kept)
BatchNorm (eval, not folded)    the per-channel scale
=============================  ============================================================

Smooth activations (SiLU, GELU, Hardswish, Sigmoid, ...) already save exactly one tensor
their exact derivative needs, so :func:`advtune.frozen.freeze` leaves them alone.

The activations and pools also come as functions with the signatures of their
``torch.nn.functional`` namesakes (:func:`relu`, :func:`relu_`, :func:`relu6`,
:func:`leaky_relu`, :func:`hardtanh`, :func:`hardsigmoid`, :func:`max_pool2d`,
:func:`avg_pool2d`, :func:`adaptive_avg_pool2d`); the modules call them, and
:func:`advtune.frozen.freeze` points functional calls inside a model's ``forward`` at
them. Without a graph to record (``torch.no_grad()``, an input that needs no gradient)
each runs the native op.

Each lean module is a subclass of the ``torch.nn`` class it replaces, so parameters,
buffers, ``state_dict`` keys and ``repr`` stay the same; :func:`advtune.frozen.freeze`
swaps the class of existing modules. Their parameters must not require gradients: a
frozen layer computes no weight gradient, and says so with :class:`FrozenParameterError`
instead of silently returning ``None``.

Every tensor a Function keeps is stored with ``ctx.save_for_backward`` (never as a
``ctx`` attribute), so ``torch.autograd.graph.saved_tensors_hooks`` — and therefore
``advtune bench`` — sees all of it.

Their CPU kernel choices form one immutable :class:`KernelPolicy`; ``with
kernels(fold_channels=0): ...`` changes it for a block in this thread only, and
:func:`kernel_policy` returns the one in force.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from torch import nn

from advtune import _swap
from advtune._kernels import KernelPolicy, kernel_policy, kernels
from advtune.lean._common import FrozenParameterError
from advtune.lean.activations import (
    LeanHardsigmoid,
    LeanHardtanh,
    LeanLeakyReLU,
    LeanReLU,
    LeanReLU6,
    hardsigmoid,
    hardtanh,
    hardtanh_,
    leaky_relu,
    leaky_relu_,
    relu,
    relu6,
    relu_,
)
from advtune.lean.batchnorm import LeanBatchNorm1d, LeanBatchNorm2d, LeanBatchNorm3d
from advtune.lean.conv import (
    LeanConv1d,
    LeanConv2d,
    LeanConv3d,
    LeanConvTranspose1d,
    LeanConvTranspose2d,
    LeanConvTranspose3d,
    LeanLinear,
    conv1d,
    conv2d,
    conv3d,
    linear,
)
from advtune.lean.pooling import (
    LeanAdaptiveAvgPool2d,
    LeanAvgPool2d,
    LeanMaxPool2d,
    adaptive_avg_pool2d,
    avg_pool2d,
    max_pool2d,
)
from advtune.masks import pack_bits, unpack_bits

__all__ = [
    "LEAN_TYPES",
    "FrozenParameterError",
    "KernelPolicy",
    "LeanAdaptiveAvgPool2d",
    "LeanAvgPool2d",
    "LeanBatchNorm1d",
    "LeanBatchNorm2d",
    "LeanBatchNorm3d",
    "LeanConv1d",
    "LeanConv2d",
    "LeanConv3d",
    "LeanConvTranspose1d",
    "LeanConvTranspose2d",
    "LeanConvTranspose3d",
    "LeanHardsigmoid",
    "LeanHardtanh",
    "LeanLeakyReLU",
    "LeanLinear",
    "LeanMaxPool2d",
    "LeanReLU",
    "LeanReLU6",
    "adaptive_avg_pool2d",
    "avg_pool2d",
    "conv1d",
    "conv2d",
    "conv3d",
    "hardsigmoid",
    "hardtanh",
    "hardtanh_",
    "kernel_policy",
    "kernels",
    "leaky_relu",
    "leaky_relu_",
    "linear",
    "max_pool2d",
    "pack_bits",
    "relu",
    "relu6",
    "relu_",
    "unpack_bits",
]

# Native class -> (its lean replacement, kind). Registered with advtune._swap, the one
# owner of class swapping: freeze() asks it which class replaces a module's.
_LEAN: dict[type[nn.Module], tuple[type[nn.Module], str]] = {
    nn.Conv1d: (LeanConv1d, "lean-conv"),
    nn.Conv2d: (LeanConv2d, "lean-conv"),
    nn.Conv3d: (LeanConv3d, "lean-conv"),
    nn.ConvTranspose1d: (LeanConvTranspose1d, "lean-conv"),
    nn.ConvTranspose2d: (LeanConvTranspose2d, "lean-conv"),
    nn.ConvTranspose3d: (LeanConvTranspose3d, "lean-conv"),
    nn.Linear: (LeanLinear, "lean-linear"),
    nn.ReLU: (LeanReLU, "lean-activation"),
    nn.ReLU6: (LeanReLU6, "lean-activation"),
    nn.LeakyReLU: (LeanLeakyReLU, "lean-activation"),
    nn.Hardtanh: (LeanHardtanh, "lean-activation"),
    nn.Hardsigmoid: (LeanHardsigmoid, "lean-activation"),
    nn.MaxPool2d: (LeanMaxPool2d, "lean-pool"),
    nn.AvgPool2d: (LeanAvgPool2d, "lean-pool"),
    nn.AdaptiveAvgPool2d: (LeanAdaptiveAvgPool2d, "lean-pool"),
    nn.BatchNorm1d: (LeanBatchNorm1d, "lean-bn"),
    nn.BatchNorm2d: (LeanBatchNorm2d, "lean-bn"),
    nn.BatchNorm3d: (LeanBatchNorm3d, "lean-bn"),
}
for _native, (_lean, _kind) in _LEAN.items():
    _swap.register_replacement(_native, _lean, _kind)

#: ``torch.nn`` class -> its lean subclass (read-only).
LEAN_TYPES: Mapping[type[nn.Module], type[nn.Module]] = MappingProxyType(
    {native: lean for native, (lean, _) in _LEAN.items()}
)
