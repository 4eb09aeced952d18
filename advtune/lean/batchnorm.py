"""Lean eval-mode BatchNorm: a per-channel affine map that saves nothing."""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from advtune._compat import autocast_enabled
from advtune.lean._common import (
    _AutocastOff,
    _check_frozen,
    _refuse_weight_grads,
    _wants_graph,
)
from advtune.lean.conv import _where


class _ChannelAffineFn(torch.autograd.Function):
    """``x * scale + shift`` per channel; backward needs only ``scale``."""

    @staticmethod
    def forward(ctx, x, scale, shift, where):  # type: ignore[override]
        ctx.save_for_backward(scale)
        ctx.where = where
        return torch.addcmul(shift, x, scale)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        _refuse_weight_grads(ctx)
        (scale,) = ctx.saved_tensors
        return grad * scale, None, None, None


class _LeanBatchNormMixin:
    """Eval-mode BatchNorm (not folded into a conv) as a per-channel affine map.

    Native eval-mode batch norm saves its input; the affine map needs only the scale.
    In training mode, or without running statistics, it is the native BatchNorm.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if (
            self.training  # type: ignore[attr-defined]
            or self.running_mean is None  # type: ignore[attr-defined]
            or not (torch.is_grad_enabled() and input.requires_grad)
        ):
            return super().forward(input)  # type: ignore[misc]
        self._check_input_dim(input)  # type: ignore[attr-defined]
        _check_frozen(self, "weight", "bias")  # type: ignore[arg-type]
        if not _wants_graph(input):  # too small for the lean layer to pay
            return super().forward(input)  # type: ignore[misc]
        dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
        with _AutocastOff(input.device.type, autocast_enabled(input.device.type)):
            # Same arithmetic as the native CPU kernel: alpha = w·invstd, beta = b − μ·alpha.
            alpha = torch.rsqrt(self.running_var.to(dtype) + self.eps)  # type: ignore[attr-defined]
            if self.weight is not None:  # type: ignore[attr-defined]
                alpha = alpha * self.weight.to(dtype)  # type: ignore[attr-defined]
            beta = -self.running_mean.to(dtype) * alpha  # type: ignore[attr-defined]
            if self.bias is not None:  # type: ignore[attr-defined]
                beta = self.bias.to(dtype) + beta  # type: ignore[attr-defined]
            view = (-1,) + (1,) * (input.dim() - 2)
            alpha = alpha.to(input.dtype).view(view)
            beta = beta.to(input.dtype).view(view)
            return _ChannelAffineFn.apply(input, alpha, beta, _where(self))  # type: ignore[arg-type]


class LeanBatchNorm1d(_LeanBatchNormMixin, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` that, in eval mode, saves only its per-channel scale."""


class LeanBatchNorm2d(_LeanBatchNormMixin, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that, in eval mode, saves only its per-channel scale."""


class LeanBatchNorm3d(_LeanBatchNormMixin, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` that, in eval mode, saves only its per-channel scale."""


#: ``torch.nn`` class -> lean subclass. Conversion requires the exact ``torch.nn`` type:
#: a user subclass may override ``forward``.
