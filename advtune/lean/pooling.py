"""Lean pools: max-pool keeps a window offset, average pools keep nothing but shapes."""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from advtune.lean._common import _layout, _wants_graph


def _pair(v: Any) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(e) for e in v]


def _window_origins(spec: Any, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row ``(Ho, 1)`` and column ``(1, Wo)`` of each pooling window's top-left input
    position for an output (or offsets) tensor ``out``; negative inside the padding."""
    _, (sh, sw), (ph, pw), _, _ = spec
    ho, wo = out.shape[-2:]
    h0 = (torch.arange(ho, device=out.device) * sh - ph).view(ho, 1)
    w0 = (torch.arange(wo, device=out.device) * sw - pw).view(1, wo)
    return h0, w0


@functools.lru_cache(maxsize=64)
def _flat_origins(
    stride: tuple[int, int], padding: tuple[int, int], width: int, ho: int, wo: int,
    device: torch.device,
) -> torch.Tensor:  # fmt: skip
    """Flat input index ``(Ho, Wo)`` (int64) of each window's top-left position.

    Cached per geometry: forward and backward of a lean max-pool each subtract or add
    it, and building it costs five small tensor ops per call, which at the digits CNN's
    2^16-element pool were a measurable part of the layer's cost. Read-only (shared).
    """
    (sh, sw), (ph, pw) = stride, padding
    h0 = torch.arange(ho, device=device) * sh - ph
    w0 = torch.arange(wo, device=device) * sw - pw
    return (h0.view(ho, 1) * width + w0.view(1, wo)).contiguous()


class _MaxPool2dFn(torch.autograd.Function):
    """Max pooling that saves the argmax as a uint8 offset inside its window.

    ``spec`` = (kernel, stride, padding, dilation, ceil_mode), each a 2-list but ceil.
    """

    @staticmethod
    def forward(ctx, x, spec):  # type: ignore[override]
        (kh, kw), (sh, sw), (ph, pw), (dh, dw), ceil_mode = spec
        out, indices = torch.ops.aten.max_pool2d_with_indices(
            x, [kh, kw], [sh, sw], [ph, pw], [dh, dw], ceil_mode
        )
        width = x.shape[-1]
        # Flat index minus the window origin's flat index fits a uint8 when the window
        # spans < 256 flat positions (ResNet's 3x3 pool on 112 columns: 226): one
        # subtraction. Otherwise decompose into (row, column) inside the window.
        ctx.flat = (kh - 1) * dh * width + (kw - 1) * dw < 256
        if ctx.flat:
            origins = _flat_origins((sh, sw), (ph, pw), width, *out.shape[-2:], out.device)
            offset = indices.sub_(origins)
        else:
            h0, w0 = _window_origins(spec, out)
            # In place and in int32 (a plane index fits): the int64 indices and one int32
            # temporary are the only output-sized buffers alive at once.
            plane = x.shape[-2] * width
            row = indices.to(torch.int32) if plane < 2**31 else indices
            col = row.remainder(width).sub_(w0)
            row.div_(width, rounding_mode="floor").sub_(h0)
            if dh != 1:
                row.div_(dh, rounding_mode="floor")
            if dw != 1:
                col.div_(dw, rounding_mode="floor")
            offset = row.mul_(kw).add_(col)
            del col
        del indices
        ctx.save_for_backward(offset.to(torch.uint8))
        ctx.spec = spec
        ctx.input_shape = x.shape
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        (offset,) = ctx.saved_tensors
        (_, kw), _, _, (dh, dw), _ = ctx.spec
        width = ctx.input_shape[-1]
        ho, wo = offset.shape[-2:]
        off = offset.long()
        if ctx.flat:
            _, (sh, sw), (ph, pw), _, _ = ctx.spec
            indices = off.add_(_flat_origins((sh, sw), (ph, pw), width, ho, wo, offset.device))
        else:
            h0, w0 = _window_origins(ctx.spec, offset)
            wi = torch.div(off, kw, rounding_mode="floor")
            indices = (h0 + wi * dh) * width + (w0 + (off - wi * kw) * dw)
            del wi
        del off
        # A plain scatter-add of the output gradient into the flattened input plane: the
        # same sums as the native kernel, with no aliasing tricks, on every device.
        lead = tuple(grad.shape[:-2])
        grad_input = grad.new_zeros(ctx.input_shape)
        grad_input.view(*lead, -1).scatter_add_(
            -1, indices.reshape(*lead, -1), grad.reshape(*lead, -1)
        )
        return grad_input, None


def max_pool2d(
    input: torch.Tensor,
    kernel_size: Any,
    stride: Any = None,
    padding: Any = 0,
    dilation: Any = 1,
    ceil_mode: bool = False,
    return_indices: bool = False,
) -> Any:
    """``F.max_pool2d`` that saves a uint8 argmax offset instead of input + int64 indices.

    Runs natively (same result) when no graph is recorded, when indices are returned, or
    when a window has more than 256 elements (the offset must fit in a uint8).
    """
    kernel = _pair(kernel_size)
    if (
        not _wants_graph(input)
        or return_indices
        or kernel[0] * kernel[1] > 256
        or input.dim() not in (3, 4)
    ):
        return F.max_pool2d(  # type: ignore[call-overload]
            input, kernel_size, stride, padding, dilation, ceil_mode, return_indices
        )
    stride = _pair(stride) if stride not in (None, (), []) else kernel
    spec = (kernel, stride, _pair(padding), _pair(dilation), bool(ceil_mode))
    if input.dim() == 3:
        return _MaxPool2dFn.apply(input.unsqueeze(0), spec).squeeze(0)
    return _MaxPool2dFn.apply(input, spec)


class LeanMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` saving a uint8 argmax offset instead of input + int64 indices.

    See :func:`max_pool2d` for when it runs natively.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return max_pool2d(
            input,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            self.ceil_mode,
            self.return_indices,
        )


class _AvgPool2dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, spec):  # type: ignore[override]
        kernel, stride, padding, ceil_mode, count_include_pad, divisor = spec
        ctx.spec = spec
        ctx.input_shape = x.shape
        return F.avg_pool2d(x, kernel, stride, padding, ceil_mode, count_include_pad, divisor)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        kernel, stride, padding, ceil_mode, count_include_pad, divisor = ctx.spec
        grad_input = torch.empty(
            ctx.input_shape, dtype=grad.dtype, device=grad.device, memory_format=_layout(grad)
        )
        # As for max pooling: the kernel uses its "input" for shape and layout only.
        torch.ops.aten.avg_pool2d_backward.grad_input(
            grad,
            grad_input,
            kernel,
            stride,
            padding,
            ceil_mode,
            count_include_pad,
            divisor,
            grad_input=grad_input,
        )
        return grad_input, None


def avg_pool2d(
    input: torch.Tensor,
    kernel_size: Any,
    stride: Any = None,
    padding: Any = 0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    divisor_override: int | None = None,
) -> torch.Tensor:
    """``F.avg_pool2d`` that keeps no activation for backward (it is linear)."""
    if not _wants_graph(input) or input.dim() != 4:
        return F.avg_pool2d(
            input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override
        )
    kernel = _pair(kernel_size)
    spec = (
        kernel,
        _pair(stride) if stride not in (None, (), []) else kernel,
        _pair(padding),
        bool(ceil_mode),
        bool(count_include_pad),
        divisor_override,
    )
    return _AvgPool2dFn.apply(input, spec)


class LeanAvgPool2d(nn.AvgPool2d):
    """``nn.AvgPool2d`` that keeps no activation for backward (it is linear)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return avg_pool2d(
            input,
            self.kernel_size,
            self.stride,
            self.padding,
            self.ceil_mode,
            self.count_include_pad,
            self.divisor_override,
        )


class _GlobalAvgPoolFn(torch.autograd.Function):
    """``adaptive_avg_pool2d(x, 1)``: the backward spreads ``grad / (H·W)`` evenly."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        ctx.input_shape = x.shape
        return F.adaptive_avg_pool2d(x, 1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        h, w = ctx.input_shape[-2:]
        # Same arithmetic as the native CPU kernel: grad / kh / kw per position.
        return (grad / h / w).expand(ctx.input_shape).contiguous(), None


def adaptive_avg_pool2d(input: torch.Tensor, output_size: Any) -> torch.Tensor:
    """``F.adaptive_avg_pool2d`` keeping no activation for global pooling (output 1×1).

    Other output sizes run natively.
    """
    size = output_size
    is_global = size == 1 or (isinstance(size, (tuple, list)) and tuple(size) == (1, 1))
    if not _wants_graph(input) or not is_global or input.dim() != 4:
        return F.adaptive_avg_pool2d(input, output_size)
    return _GlobalAvgPoolFn.apply(input)


class LeanAdaptiveAvgPool2d(nn.AdaptiveAvgPool2d):
    """``nn.AdaptiveAvgPool2d`` that keeps no activation for backward.

    Only global pooling (output ``1×1``) takes the lean path; other output sizes run
    natively.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return adaptive_avg_pool2d(input, self.output_size)
