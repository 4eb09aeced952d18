"""Lean convolutions and linear layers: they save only the weight."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from advtune._kernels import kernel_policy
from advtune.lean._common import (
    _amp_operands,
    _AutocastOff,
    _check_frozen,
    _layout,
    _refuse_weight_grads,
    _wants_graph,
)


def _onednn_1x1(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    transposed: bool,
    groups: int,
) -> torch.Tensor | None:
    """A stride-1 1x1 float32 CPU conv through oneDNN (mkldnn) directly, else ``None``.

    Only when the kernel policy's ``onednn_1x1`` is set and oneDNN is available and enabled
    (``torch.backends.mkldnn``). PyTorch sends such convs to its own GEMM kernel
    (``_slow_conv2d_forward``) below 16 images on one thread and to oneDNN otherwise;
    the result is the same to float32 rounding.
    """
    if not (
        kernel_policy().onednn_1x1
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.dim() == weight.dim() == 4  # batched 2-D (an unbatched Conv3d input is 4-D too)
        and not transposed
        and groups == 1
        and weight.shape[2] == 1
        and weight.shape[3] == 1
        and stride[0] == stride[1] == 1
        and not any(padding)
        and torch.backends.mkldnn.is_available()
        and torch._C._get_mkldnn_enabled()
    ):
        return None
    return torch.ops.aten.mkldnn_convolution(x, weight, bias, padding, stride, [1, 1], 1)


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
        out = _onednn_1x1(x, weight, bias, stride, padding, transposed, groups)
        if out is None:
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


def _empty_in_layout_of(grad: torch.Tensor, shape: Any) -> torch.Tensor:
    """An uninitialized gradient buffer of ``shape`` in ``grad``'s dtype, device, layout."""
    return torch.empty(shape, dtype=grad.dtype, device=grad.device, memory_format=_layout(grad))


def _channel_matmul(grad: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """``grad`` ``(N, O, *spatial)`` times ``matrix`` ``(O, C)`` per position: ``(N, C, *spatial)``.

    Keeps the layout: a channels-last ``grad`` gives a channels-last result. The result
    owns its storage (it is not a view): autograd accumulates a gradient in place only
    into a tensor that is not a view, and otherwise allocates a new sum at every
    residual branch point.
    """
    n, o = grad.shape[:2]
    spatial = grad.shape[2:]
    channels = matrix.shape[1]
    result = _empty_in_layout_of(grad, (n, channels, *spatial))
    if _layout(grad) != torch.contiguous_format:
        # (N, *spatial, O) @ (O, C) into the (N, *spatial, C) view of a channels-last result.
        torch.matmul(grad.movedim(1, -1), matrix, out=result.movedim(1, -1))
    else:
        torch.matmul(matrix.t(), grad.reshape(n, o, -1), out=result.view(n, channels, -1))
    return result


def _fold_input_grad(
    grad: torch.Tensor,
    weight: torch.Tensor,
    input_shape: torch.Size,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
) -> torch.Tensor:
    """Input gradient of a 2-D convolution (``groups=1``) as ``W^T @ grad`` then col2im.

    The column buffer of one sample (``C*kh*kw x L``) is the only temporary, so it does
    not grow with the batch; input rows and columns the convolution never read get 0.
    """
    n, out_channels = grad.shape[:2]
    kernel = tuple(weight.shape[2:])
    result = _empty_in_layout_of(grad, input_shape)
    matrix = weight.reshape(out_channels, -1).t()  # (C*kh*kw, O)
    for i in range(n):
        columns = matrix @ grad[i].reshape(out_channels, -1)
        result[i] = F.fold(
            columns, tuple(input_shape[2:]), kernel, dilation=tuple(dilation),
            padding=tuple(padding), stride=tuple(stride),
        )  # fmt: skip
    return result


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
    if (
        grad.device.type == "cpu"
        and nd == 2
        and groups == 1
        and input_shape[1] <= kernel_policy().fold_channels
    ):
        # Image stems: a matmul and F.fold (col2im), one sample at a time; oneDNN's
        # transposed conv into 3 channels is slow (KernelPolicy.fold_channels).
        return _fold_input_grad(grad, weight, input_shape, stride, padding, dilation)
    if all(k == 1 for k in kernel) and not any(padding) and groups == 1:
        # A 1x1 conv mixes channels per pixel (after subsampling, if strided): its input
        # gradient is one matmul. PyTorch runs 1x1 transposed convs through an im2col
        # kernel whose column buffer is as large as the result.
        small = _channel_matmul(grad, weight.flatten(1))
        if max(stride) == 1:
            return small
        grad_input = _empty_in_layout_of(grad, input_shape).zero_()
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

    def _native_forward(self, input: torch.Tensor, output_size: list[int] | None) -> torch.Tensor:
        if output_size is None:
            return super().forward(input)  # type: ignore[misc]
        return super().forward(input, output_size)  # type: ignore[misc]

    def forward(self, input: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        transposed = isinstance(self, nn.modules.conv._ConvTransposeNd)
        if not torch.is_grad_enabled():  # inference: the native layer is the same op
            if (
                not transposed and kernel_policy().onednn_1x1
            ):  # the graph-recording forward's kernel choice
                padding = self.padding  # type: ignore[attr-defined]
                out = _onednn_1x1(
                    input,
                    self.weight,  # type: ignore[attr-defined]
                    self.bias,  # type: ignore[attr-defined]
                    list(self.stride),  # type: ignore[attr-defined]
                    # A 1x1 kernel's "same"/"valid" padding is zero.
                    [0, 0] if isinstance(padding, str) else list(padding),
                    transposed,
                    self.groups,  # type: ignore[attr-defined]
                )
                if out is not None:
                    return out
            return self._native_forward(input, output_size)
        _check_frozen(self, "weight", "bias")  # type: ignore[arg-type]
        if not _wants_graph(input):  # nothing to record, or too small for lean to pay
            return self._native_forward(input, output_size)
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

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return super().forward(input)
        _check_frozen(self, "weight", "bias")
        if not _wants_graph(input):  # nothing to record, or too small for lean to pay
            return super().forward(input)
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
