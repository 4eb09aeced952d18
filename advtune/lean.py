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
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from advtune.masks import (
    dense_order,
    flat_in,
    keep_where,
    pack_bits,
    pack_predicate,
    unflat,
    unpack_bits,
)

__all__ = [
    "LEAN_TYPES",
    "FrozenParameterError",
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


class FrozenParameterError(RuntimeError):
    """A weight gradient was asked of a frozen layer (they give input gradients only)."""


# --------------------------------------------------------------------------- helpers


def _layout(t: torch.Tensor) -> torch.memory_format:
    """The memory format a new tensor shaped like ``t`` should take to match it."""
    if (
        t.dim() == 4
        and not t.is_contiguous()
        and t.is_contiguous(memory_format=torch.channels_last)
    ):
        return torch.channels_last
    if (
        t.dim() == 5
        and not t.is_contiguous()
        and t.is_contiguous(memory_format=torch.channels_last_3d)
    ):
        return torch.channels_last_3d
    return torch.contiguous_format


def _wants_graph(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


def _check_frozen(module: nn.Module, *names: str) -> None:
    """Raise if a parameter of ``module`` requires grad while autograd records."""
    if not torch.is_grad_enabled():
        return
    for name in names:
        p = getattr(module, name, None)
        if isinstance(p, torch.Tensor) and p.requires_grad:
            where = module.__dict__.get("_advtune_name") or type(module).__name__
            raise FrozenParameterError(
                f"parameter {where}.{name} requires grad, but frozen layers compute input "
                "gradients only; call model.requires_grad_(False), or convert with "
                "advtune.tune(model, 'tune') to get weight gradients"
            )


def _refuse_weight_grads(ctx: Any) -> None:
    """In a lean Function's backward (inputs ``x, weight, bias, ...``): weight gradients
    were never recorded, so asking for one is an error, not a silent ``None``."""
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        raise FrozenParameterError(
            f"{getattr(ctx, 'where', 'a frozen layer')}: a weight gradient was requested, "
            "but frozen layers compute input gradients only"
        )


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The autocast compute dtype for ``x``'s device, or ``None`` if autocast is off."""
    device_type = x.device.type
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4
        enabled = (
            torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()
        )
    if not enabled:
        return None
    if hasattr(torch, "get_autocast_dtype"):
        return torch.get_autocast_dtype(device_type)
    return (
        torch.get_autocast_cpu_dtype() if device_type == "cpu" else torch.get_autocast_gpu_dtype()
    )


def _amp_operands(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, bool]:
    """Cast like autocast would for conv/linear; the cast of ``x`` stays in the graph.

    Returns ``(x, weight, bias, autocast_was_on)``. The Function then runs with
    autocast off, so its backward sees the same dtypes as its forward, and the
    differentiable ``x.to(dtype)`` casts the input gradient back to ``x``'s dtype.
    """
    dtype = _autocast_dtype(x)
    if dtype is None or x.dtype == torch.float64 or not x.is_floating_point():
        return x, weight, bias, dtype is not None
    x = x.to(dtype)
    weight = weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    return x, weight, bias, True


class _AutocastOff:
    """``torch.autocast(device, enabled=False)`` only when autocast is on (cheap otherwise)."""

    def __init__(self, device_type: str, active: bool) -> None:
        self._ctx = torch.autocast(device_type=device_type, enabled=False) if active else None

    def __enter__(self) -> None:
        if self._ctx is not None:
            self._ctx.__enter__()

    def __exit__(self, *exc: Any) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(*exc)


# --------------------------------------------------------------------------- conv / linear


class _ConvFn(torch.autograd.Function):
    """Convolution (plain or transposed) that saves only its weight.

    ``spec`` = (stride, padding, dilation, transposed, output_padding, groups, where).
    ``padding`` is numeric; ``pre_pad`` = ``(F.pad amounts, mode)`` or ``None`` covers
    non-zero padding modes and asymmetric ``"same"`` padding.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, spec, pre_pad):  # type: ignore[override]
        stride, padding, dilation, transposed, output_padding, groups, where = spec
        ctx.input_shape = x.shape
        if pre_pad is not None:
            # Inside the Function: a reflect/replicate F.pad would save its input.
            x = F.pad(x, pre_pad[0], mode=pre_pad[1])
        out = torch.ops.aten.convolution(
            x, weight, bias, stride, padding, dilation, transposed, output_padding, groups
        )
        ctx.save_for_backward(weight)
        ctx.spec = spec
        ctx.where = where
        ctx.pre_pad = pre_pad
        ctx.padded_shape = x.shape
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        _refuse_weight_grads(ctx)
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        (weight,) = ctx.saved_tensors
        stride, padding, dilation, transposed, _, groups, _ = ctx.spec
        grad_input = _conv_input_grad(
            grad, weight, ctx.padded_shape, stride, padding, dilation, transposed, groups
        )
        if ctx.pre_pad is not None:
            # Padding is linear: its vector-Jacobian product at any point (zeros) is exact.
            with torch.enable_grad():
                z = grad_input.new_zeros(ctx.input_shape, requires_grad=True)
                padded = F.pad(z, ctx.pre_pad[0], mode=ctx.pre_pad[1])
                (grad_input,) = torch.autograd.grad(padded, z, grad_input)
        return grad_input, None, None, None, None


def _channel_matmul(grad: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """``grad`` ``(N, O, *spatial)`` times ``matrix`` ``(O, C)`` per position: ``(N, C, *spatial)``.

    Keeps the layout: a channels-last ``grad`` gives a channels-last result.
    """
    n, o = grad.shape[:2]
    spatial = grad.shape[2:]
    if _layout(grad) != torch.contiguous_format:
        last = grad.movedim(1, -1)  # contiguous (N, *spatial, O) view
        return (last @ matrix).movedim(-1, 1)
    out = matrix.t() @ grad.reshape(n, o, -1)
    return out.view(n, matrix.shape[1], *spatial)


def _conv_input_grad(
    grad: torch.Tensor,
    weight: torch.Tensor,
    input_shape: torch.Size,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    transposed: bool,
    groups: int,
) -> torch.Tensor:
    """Input gradient of a convolution without its input, as a forward convolution.

    The input gradient of a convolution is the transposed convolution of the output
    gradient (and vice versa). ``aten.convolution_backward`` does the same arithmetic but
    first makes its (unused, expanded) input argument contiguous: a full-size temporary
    that set the backward peak of a whole ResNet. Where the transposed convolution would
    need ``output_padding`` (strided convs), oneDNN does not support it (PyTorch falls
    back to an im2col kernel with a large column buffer, or crops into a copy); there the
    full transposed result is computed without padding and cropped as a view (at most
    ``stride - 1`` rows and columns too many), or, for a strided 1x1 conv, the stride-1
    result is written into a zero grid.
    """
    nd = len(stride)
    zeros = [0] * nd
    if transposed:
        return torch.ops.aten.convolution(
            grad, weight, None, stride, padding, dilation, False, zeros, groups
        )
    in_sizes = input_shape[2:]
    kernel = weight.shape[2:]
    if all(k == 1 for k in kernel) and not any(padding) and groups == 1:
        # A 1x1 conv mixes channels per pixel (after subsampling, if strided): its input
        # gradient is one matmul. PyTorch runs 1x1 transposed convs through an im2col
        # kernel whose column buffer is as large as the result.
        small = _channel_matmul(grad, weight.flatten(1))
        if max(stride) == 1:
            return small
        grad_input = torch.empty(
            input_shape, dtype=grad.dtype, device=grad.device, memory_format=_layout(grad)
        ).zero_()
        index = (
            slice(None),
            slice(None),
            *(slice(0, o * s, s) for o, s in zip(grad.shape[2:], stride)),
        )
        grad_input[index] = small
        return grad_input
    full = [
        (o - 1) * s + d * (k - 1) + 1
        for o, s, d, k in zip(grad.shape[2:], stride, dilation, kernel)
    ]
    if all(f - 2 * p == n for f, p, n in zip(full, padding, in_sizes)):  # no output padding
        return torch.ops.aten.convolution(
            grad, weight, None, stride, padding, dilation, True, zeros, groups
        )
    if all(f >= p + n for f, p, n in zip(full, padding, in_sizes)):
        out = torch.ops.aten.convolution(
            grad, weight, None, stride, zeros, dilation, True, zeros, groups
        )
        index = (slice(None), slice(None), *(slice(p, p + n) for p, n in zip(padding, in_sizes)))
        return out[index]
    return torch.ops.aten.convolution_backward(
        grad,
        grad.new_empty(1).expand(input_shape),
        weight,
        None,
        stride,
        padding,
        dilation,
        False,
        zeros,
        groups,
        (True, False, False),
    )[0]


class _LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, where):  # type: ignore[override]
        ctx.save_for_backward(weight)
        ctx.where = where
        return F.linear(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        _refuse_weight_grads(ctx)
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        (weight,) = ctx.saved_tensors
        return grad.matmul(weight), None, None, None


def _where(module: nn.Module) -> str:
    return module.__dict__.get("_advtune_name") or type(module).__name__


def _lean_conv(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    spec: tuple[Any, ...],
    pre_pad: tuple[list[int], str] | None,
) -> torch.Tensor:
    """:class:`_ConvFn` on a batched or unbatched input, cast as autocast would."""
    x, weight, bias, amp = _amp_operands(input, weight, bias)
    unbatched = x.dim() == weight.dim() - 1
    if unbatched:
        x = x.unsqueeze(0)
    with _AutocastOff(x.device.type, amp):
        out = _ConvFn.apply(x, weight, bias, spec, pre_pad)
    return out.squeeze(0) if unbatched else out


def _lean_linear(
    input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, where: str
) -> torch.Tensor:
    """:class:`_LinearFn`, cast as autocast would."""
    x, weight, bias, amp = _amp_operands(input, weight, bias)
    with _AutocastOff(x.device.type, amp):
        return _LinearFn.apply(x, weight, bias, where)


class _LeanConvMixin:
    """Conv subclass mix-in: autograd keeps the weight, not the input."""

    _advtune_kind = "lean-conv"

    def _pre_pad(self) -> tuple[tuple[int, ...] | None, str, list[int]]:
        """Explicit padding done before the conv (``None``: the conv pads with zeros)."""
        padding = self.padding  # type: ignore[attr-defined]
        nd = len(self.kernel_size)  # type: ignore[attr-defined]
        mode = self.padding_mode  # type: ignore[attr-defined]
        if isinstance(padding, str):
            # "valid" / "same": torch stores the exact F.pad amounts (left, right per dim,
            # last dim first); "same" can be asymmetric for even kernels.
            pads = list(self._reversed_padding_repeated_twice)  # type: ignore[attr-defined]
            symmetric = all(pads[2 * i] == pads[2 * i + 1] for i in range(nd))
            if mode == "zeros" and symmetric:
                result = (None, mode, [pads[2 * (nd - 1 - i)] for i in range(nd)])  # type: ignore[assignment]
            else:
                result = (tuple(pads), mode, [0] * nd)  # type: ignore[assignment]
        elif mode != "zeros":
            result = (tuple(self._reversed_padding_repeated_twice), mode, [0] * nd)  # type: ignore[attr-defined,assignment]
        else:
            result = (None, mode, list(padding))
        return result

    def forward(self, input: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        transposed = isinstance(self, nn.modules.conv._ConvTransposeNd)
        if not torch.is_grad_enabled():  # inference: the native layer is the same op
            if output_size is None:
                return super().forward(input)  # type: ignore[misc]
            return super().forward(input, output_size)  # type: ignore[misc]
        _check_frozen(self, "weight", "bias")  # type: ignore[arg-type]
        nd = self.weight.dim() - 2  # type: ignore[attr-defined]
        pre_pad = None
        if transposed:
            if self.padding_mode != "zeros":  # type: ignore[attr-defined]
                raise ValueError(
                    f"only 'zeros' padding_mode is supported for ConvTranspose, got "
                    f"{self.padding_mode!r}"  # type: ignore[attr-defined]
                )
            output_padding = self._output_padding(  # type: ignore[attr-defined]
                input,
                output_size,
                list(self.stride),  # type: ignore[attr-defined]
                list(self.padding),  # type: ignore[attr-defined]
                list(self.kernel_size),  # type: ignore[attr-defined]
                nd,
                list(self.dilation),  # type: ignore[attr-defined]
            )
            padding = list(self.padding)  # type: ignore[attr-defined]
        else:
            pads, mode, padding = self._pre_pad()
            if pads is not None:
                pre_pad = (list(pads), "constant" if mode == "zeros" else mode)
            output_padding = [0] * nd
        spec = (
            list(self.stride),  # type: ignore[attr-defined]
            padding,
            list(self.dilation),  # type: ignore[attr-defined]
            transposed,
            list(output_padding),
            self.groups,  # type: ignore[attr-defined]
            _where(self),  # type: ignore[arg-type]
        )
        return _lean_conv(input, self.weight, self.bias, spec, pre_pad)  # type: ignore[attr-defined]


class LeanConv1d(_LeanConvMixin, nn.Conv1d):
    """``nn.Conv1d`` whose autograd saves only the weight."""


class LeanConv2d(_LeanConvMixin, nn.Conv2d):
    """``nn.Conv2d`` whose autograd saves only the weight."""


class LeanConv3d(_LeanConvMixin, nn.Conv3d):
    """``nn.Conv3d`` whose autograd saves only the weight."""


class LeanConvTranspose1d(_LeanConvMixin, nn.ConvTranspose1d):
    """``nn.ConvTranspose1d`` whose autograd saves only the weight."""


class LeanConvTranspose2d(_LeanConvMixin, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` whose autograd saves only the weight."""


class LeanConvTranspose3d(_LeanConvMixin, nn.ConvTranspose3d):
    """``nn.ConvTranspose3d`` whose autograd saves only the weight."""


class LeanLinear(nn.Linear):
    """``nn.Linear`` whose autograd saves only the weight."""

    _advtune_kind = "lean-linear"

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return super().forward(input)
        _check_frozen(self, "weight", "bias")
        return _lean_linear(input, self.weight, self.bias, _where(self))


def _ints(value: Any, n: int) -> list[int]:
    return [int(value)] * n if isinstance(value, int) else [int(v) for v in value]


def _functional_conv(
    native: Any,
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: Any,
    padding: Any,
    dilation: Any,
    groups: int,
) -> torch.Tensor:
    nd = weight.dim() - 2
    needs_weight_grad = weight.requires_grad or (bias is not None and bias.requires_grad)
    dilation_l = _ints(dilation, nd)
    if isinstance(padding, str):
        totals = [d * (k - 1) for d, k in zip(dilation_l, weight.shape[2:])]
        if padding == "valid":
            padding_l: list[int] | None = [0] * nd
        elif padding == "same" and not any(t % 2 for t in totals):
            padding_l = [t // 2 for t in totals]
        else:  # asymmetric "same", or an invalid value for torch to report
            padding_l = None
    else:
        padding_l = _ints(padding, nd)
    if not _wants_graph(input) or needs_weight_grad or padding_l is None:
        return native(input, weight, bias, stride, padding, dilation, groups)
    spec = (_ints(stride, nd), padding_l, dilation_l, False, [0] * nd, int(groups), f"conv{nd}d")
    return _lean_conv(input, weight, bias, spec, None)


def _conv_function(native: Any, nd: int) -> Any:
    def conv(
        input: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        stride: Any = 1,
        padding: Any = 0,
        dilation: Any = 1,
        groups: int = 1,
    ) -> torch.Tensor:
        return _functional_conv(native, input, weight, bias, stride, padding, dilation, groups)

    conv.__name__ = conv.__qualname__ = f"conv{nd}d"
    conv.__module__ = __name__
    conv.__doc__ = (
        f"``F.conv{nd}d`` that saves only the weight (natively if a weight needs a gradient)."
    )
    return conv


conv1d = _conv_function(F.conv1d, 1)
conv2d = _conv_function(F.conv2d, 2)
conv3d = _conv_function(F.conv3d, 3)


def linear(
    input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear`` that saves only the weight (natively if a weight needs a gradient)."""
    if not _wants_graph(input) or weight.requires_grad or (bias is not None and bias.requires_grad):
        return F.linear(input, weight, bias)
    return _lean_linear(input, weight, bias, "linear")


# --------------------------------------------------------------------------- activations


# The native hardsigmoid backward multiplies by 1/6 rounded to float32 (``1.0f / 6.0f``),
# even for float64; using the same constant keeps frozen gradients equal to Eval mode's.
_ONE_SIXTH = float(torch.tensor(1.0 / 6.0, dtype=torch.float32))


class _MaskedFn(torch.autograd.Function):
    """Piecewise-linear activation whose derivative is a mask (saved as 1 bit/element).

    ``spec`` = (kind, a, b, inplace):

    * ``"relu"``: ``max(x, 0)``; derivative ``x > 0`` (threshold_backward).
    * ``"leaky"``: slope ``a`` below 0; derivative 1 where ``x > 0`` else ``a``.
    * ``"hardtanh"``: clamp to ``[a, b]``; derivative ``a < x < b`` (hardtanh_backward).
    * ``"hardsigmoid"``: derivative ``1/6`` where ``-3 < x < 3`` (hardsigmoid_backward).
    """

    @staticmethod
    def forward(ctx, x, spec):  # type: ignore[override]
        kind, a, b, inplace = spec
        if kind in ("relu", "leaky"):
            predicate = lambda t: t > 0  # noqa: E731
        elif kind == "hardtanh":
            predicate = lambda t: (t > a) & (t < b)  # noqa: E731
        else:
            predicate = lambda t: (t > -3.0) & (t < 3.0)  # noqa: E731
        # Packed in the input's memory order (channels_last packs without a copy).
        order = dense_order(x)
        packed = pack_predicate(flat_in(x, order), predicate)
        if kind == "relu":
            out = torch.relu_(x) if inplace else torch.relu(x)
        elif kind == "leaky":
            out = F.leaky_relu(x, a, inplace=inplace)
        elif kind == "hardtanh":
            out = F.hardtanh(x, a, b, inplace=inplace)
        else:
            out = F.hardsigmoid(x, inplace=inplace)
        if inplace:
            # Return ``x`` itself: dynamo requires each dirty input to be returned as is.
            ctx.mark_dirty(x)
            out = x
        ctx.save_for_backward(packed)
        ctx.spec = spec
        ctx.shape = x.shape
        ctx.order = order
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        (packed,) = ctx.saved_tensors
        kind, a, _, _ = ctx.spec
        if kind == "leaky":
            mask = unflat(unpack_bits(packed, grad.numel()), ctx.shape, ctx.order)
            # torch.where, not grad * mask: identical to the native kernel, inf/nan included.
            return torch.where(mask, grad, grad * a), None
        # The native hardsigmoid backward scales first (by float32 1/6), then masks.
        g = grad * _ONE_SIXTH if kind == "hardsigmoid" else grad
        flat = flat_in(g, ctx.order)  # a view when grad has the forward's layout
        # In place only on a tensor made here (never on the incoming gradient).
        out = flat if kind == "hardsigmoid" else torch.empty_like(flat)
        keep_where(flat, packed, out)
        return unflat(out, ctx.shape, ctx.order), None


def _masked(input: torch.Tensor, spec: tuple[str, float, float, bool]) -> torch.Tensor:
    return _MaskedFn.apply(input, spec)


def relu(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``F.relu`` that saves a 1-bit mask for backward instead of its output."""
    if not _wants_graph(input):
        return F.relu(input, inplace=inplace)
    return _masked(input, ("relu", 0.0, 0.0, bool(inplace)))


def relu_(input: torch.Tensor) -> torch.Tensor:
    """In-place :func:`relu` (``F.relu_``, ``torch.relu_``)."""
    return relu(input, inplace=True)


def leaky_relu(
    input: torch.Tensor, negative_slope: float = 0.01, inplace: bool = False
) -> torch.Tensor:
    """``F.leaky_relu`` that saves a 1-bit mask for backward instead of its input."""
    if not _wants_graph(input):
        return F.leaky_relu(input, negative_slope, inplace=inplace)
    return _masked(input, ("leaky", float(negative_slope), 0.0, bool(inplace)))


def leaky_relu_(input: torch.Tensor, negative_slope: float = 0.01) -> torch.Tensor:
    """In-place :func:`leaky_relu` (``F.leaky_relu_``)."""
    return leaky_relu(input, negative_slope, inplace=True)


def hardtanh(
    input: torch.Tensor, min_val: float = -1.0, max_val: float = 1.0, inplace: bool = False
) -> torch.Tensor:
    """``F.hardtanh`` that saves a 1-bit mask for backward instead of its input."""
    if not _wants_graph(input):
        return F.hardtanh(input, min_val, max_val, inplace=inplace)
    return _masked(input, ("hardtanh", float(min_val), float(max_val), bool(inplace)))


def hardtanh_(input: torch.Tensor, min_val: float = -1.0, max_val: float = 1.0) -> torch.Tensor:
    """In-place :func:`hardtanh` (``F.hardtanh_``)."""
    return hardtanh(input, min_val, max_val, inplace=True)


def relu6(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``F.relu6`` (a Hardtanh on ``[0, 6]``) saving a 1-bit mask."""
    return hardtanh(input, 0.0, 6.0, inplace)


def hardsigmoid(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``F.hardsigmoid`` that saves a 1-bit mask for backward instead of its input."""
    if not _wants_graph(input):
        return F.hardsigmoid(input, inplace=inplace)
    return _masked(input, ("hardsigmoid", 0.0, 0.0, bool(inplace)))


class LeanReLU(nn.ReLU):
    """``nn.ReLU`` saving a 1-bit mask instead of its output."""

    _advtune_kind = "lean-activation"

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return relu(input, self.inplace)


class LeanLeakyReLU(nn.LeakyReLU):
    """``nn.LeakyReLU`` saving a 1-bit mask instead of its input."""

    _advtune_kind = "lean-activation"

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return leaky_relu(input, self.negative_slope, self.inplace)


class LeanHardtanh(nn.Hardtanh):
    """``nn.Hardtanh`` saving a 1-bit mask instead of its input."""

    _advtune_kind = "lean-activation"

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return hardtanh(input, self.min_val, self.max_val, self.inplace)


class LeanReLU6(LeanHardtanh, nn.ReLU6):
    """``nn.ReLU6`` saving a 1-bit mask instead of its input (a Hardtanh on [0, 6])."""


class LeanHardsigmoid(nn.Hardsigmoid):
    """``nn.Hardsigmoid`` saving a 1-bit mask instead of its input."""

    _advtune_kind = "lean-activation"

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return hardsigmoid(input, self.inplace)


# --------------------------------------------------------------------------- pooling


def _pair(v: Any) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(e) for e in v]


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
        ho, wo = out.shape[-2:]
        # Window origin of each output position (may be negative with padding).
        h0 = (torch.arange(ho, device=x.device) * sh - ph).view(ho, 1)
        w0 = (torch.arange(wo, device=x.device) * sw - pw).view(1, wo)
        # In place and in int32 (a plane index fits): the int64 indices and one int32
        # temporary are the only output-sized buffers alive at once.
        plane = x.shape[-2] * width
        row = indices.to(torch.int32) if plane < 2**31 else indices
        del indices
        col = row.remainder(width).sub_(w0)
        row.div_(width, rounding_mode="floor").sub_(h0)
        if dh != 1:
            row.div_(dh, rounding_mode="floor")
        if dw != 1:
            col.div_(dw, rounding_mode="floor")
        offset = row.mul_(kw).add_(col)
        del col
        ctx.save_for_backward(offset.to(torch.uint8))
        ctx.spec = spec
        ctx.input_shape = x.shape
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        (offset,) = ctx.saved_tensors
        (_, kw), (sh, sw), (ph, pw), (dh, dw), _ = ctx.spec
        width = ctx.input_shape[-1]
        ho, wo = offset.shape[-2:]
        h0 = (torch.arange(ho, device=grad.device) * sh - ph).view(ho, 1)
        w0 = (torch.arange(wo, device=grad.device) * sw - pw).view(1, wo)
        off = offset.long()
        wi = torch.div(off, kw, rounding_mode="floor")
        indices = (h0 + wi * dh) * width + (w0 + (off - wi * kw) * dw)
        del off, wi
        # A plain scatter-add of the output gradient into the flattened input plane: the
        # same sums as the native kernel, with no aliasing tricks, on every device.
        lead = tuple(grad.shape[:-2])
        grad_input = grad.new_zeros(ctx.input_shape)
        grad_input.view(*lead, -1).scatter_add_(
            -1, indices.expand(*lead, ho, wo).reshape(*lead, -1), grad.reshape(*lead, -1)
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

    _advtune_kind = "lean-pool"

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
        fmt = torch.channels_last if dense_order(grad) == (0, 2, 3, 1) else None
        grad_input = grad.new_empty(ctx.input_shape)
        if fmt is not None:
            grad_input = grad_input.contiguous(memory_format=fmt)
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

    _advtune_kind = "lean-pool"

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

    _advtune_kind = "lean-pool"

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return adaptive_avg_pool2d(input, self.output_size)


# --------------------------------------------------------------------------- batch norm


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

    _advtune_kind = "lean-bn"

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if (
            self.training  # type: ignore[attr-defined]
            or self.running_mean is None  # type: ignore[attr-defined]
            or not _wants_graph(input)
        ):
            return super().forward(input)  # type: ignore[misc]
        self._check_input_dim(input)  # type: ignore[attr-defined]
        _check_frozen(self, "weight", "bias")  # type: ignore[arg-type]
        dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
        with _AutocastOff(input.device.type, _autocast_dtype(input) is not None):
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
LEAN_TYPES: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv1d: LeanConv1d,
    nn.Conv2d: LeanConv2d,
    nn.Conv3d: LeanConv3d,
    nn.ConvTranspose1d: LeanConvTranspose1d,
    nn.ConvTranspose2d: LeanConvTranspose2d,
    nn.ConvTranspose3d: LeanConvTranspose3d,
    nn.Linear: LeanLinear,
    nn.ReLU: LeanReLU,
    nn.ReLU6: LeanReLU6,
    nn.LeakyReLU: LeanLeakyReLU,
    nn.Hardtanh: LeanHardtanh,
    nn.Hardsigmoid: LeanHardsigmoid,
    nn.MaxPool2d: LeanMaxPool2d,
    nn.AvgPool2d: LeanAvgPool2d,
    nn.AdaptiveAvgPool2d: LeanAdaptiveAvgPool2d,
    nn.BatchNorm1d: LeanBatchNorm1d,
    nn.BatchNorm2d: LeanBatchNorm2d,
    nn.BatchNorm3d: LeanBatchNorm3d,
}
