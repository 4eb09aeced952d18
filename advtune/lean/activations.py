"""Lean activations: a 1-bit mask instead of the input or output."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from advtune.lean._common import _NUMPY_INT_OF, _layout, _numpy_one_chunk, _wants_graph
from advtune.masks import (
    dense_order,
    flat_in,
    keep_where,
    pack_between,
    unflat,
    unpack_bits,
)

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
        # The derivative is non-zero strictly inside these bounds.
        if kind in ("relu", "leaky"):
            low, high = 0.0, None
        elif kind == "hardtanh":
            low, high = a, b
        else:
            low, high = -3.0, 3.0
        if _numpy_one_chunk(x):
            order = None
            packed = _pack_one_chunk(x.detach().numpy().reshape(-1), low, high)
        else:
            # Packed in the input's memory order (channels_last packs without a copy).
            order = dense_order(x)
            packed = pack_between(flat_in(x, order), low, high)
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
        ctx.layout = _layout(x)  # the memory format dense in ``order``
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
        if ctx.order is None and _numpy_one_chunk(g):
            return _keep_one_chunk(g, packed, in_place=kind == "hardsigmoid"), None
        # The result is a tensor of its own, not a view: autograd sums a gradient in place
        # only into a non-view (else every residual branch point allocates a new sum).
        if (
            kind == "hardsigmoid"
            and dense_order(g) == ctx.order
            and g.is_contiguous(memory_format=ctx.layout)
        ):
            result = g  # made here, so masked in place (never the incoming gradient)
        else:
            result = torch.empty(
                ctx.shape,
                dtype=g.dtype,
                device=g.device,
                memory_format=ctx.layout,
            )
        # flat_in(g) is a view when grad has the forward's layout (else a copy).
        keep_where(flat_in(g, ctx.order), packed, flat_in(result, ctx.order))
        return result, None


def _pack_one_chunk(source: np.ndarray, low: float, high: float | None) -> torch.Tensor:
    """:func:`advtune.masks.pack_between` of a flat array of at most one mask chunk, in
    the fewest calls (see :func:`~advtune.lean._common._numpy_one_chunk`); the bool
    flags live in a buffer torch allocates, so memory trackers see them."""
    hits = torch.empty(source.shape, dtype=torch.bool).numpy()
    np.greater(source, low, out=hits)
    if high is not None:
        hits &= source < high
    packed = torch.empty((source.size + 7) // 8, dtype=torch.uint8)
    packed.numpy()[:] = np.packbits(hits, bitorder="little")
    return packed


def _keep_one_chunk(g: torch.Tensor, packed: torch.Tensor, *, in_place: bool) -> torch.Tensor:
    """:func:`advtune.masks.keep_where` of a contiguous gradient of at most one chunk:
    ``g & (0 or -1)`` on its bits, into a new tensor, or into ``g`` when ``in_place``
    (a tensor the backward made itself)."""
    result = g if in_place else torch.empty_like(g, memory_format=torch.contiguous_format)
    itype = _NUMPY_INT_OF[g.dtype]
    flags = np.unpackbits(packed.numpy(), count=g.numel(), bitorder="little").view(np.int8)
    np.negative(flags, out=flags)  # 0/1 -> 0/-1: int8 -1 widens to all ones in the and
    source = (g.detach() if g.requires_grad else g).numpy().reshape(-1).view(itype)
    np.bitwise_and(source, flags, out=result.numpy().reshape(-1).view(itype))
    return result


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

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return relu(input, self.inplace)


class LeanLeakyReLU(nn.LeakyReLU):
    """``nn.LeakyReLU`` saving a 1-bit mask instead of its input."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return leaky_relu(input, self.negative_slope, self.inplace)


class LeanHardtanh(nn.Hardtanh):
    """``nn.Hardtanh`` saving a 1-bit mask instead of its input."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return hardtanh(input, self.min_val, self.max_val, self.inplace)


class LeanReLU6(LeanHardtanh, nn.ReLU6):
    """``nn.ReLU6`` saving a 1-bit mask instead of its input (a Hardtanh on [0, 6])."""


class LeanHardsigmoid(nn.Hardsigmoid):
    """``nn.Hardsigmoid`` saving a 1-bit mask instead of its input."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return hardsigmoid(input, self.inplace)
