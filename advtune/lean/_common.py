"""What every lean layer shares: the weight-gradient refusal, layouts, autocast operands."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from advtune._compat import autocast_state
from advtune._kernels import kernel_policy


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
    """Whether a lean Function should record ``x``'s op: autograd records it and ``x`` is
    large enough for the lean layer to pay (else the native op runs, under autograd if it
    records: :attr:`KernelPolicy.native_below <advtune.lean.KernelPolicy>`)."""
    return torch.is_grad_enabled() and x.requires_grad and x.numel() >= kernel_policy().native_below


#: float dtype -> the numpy integer type of the same width (gradient masking on the bits).
_NUMPY_INT_OF = {torch.float64: np.int64, torch.float32: np.int32}


def _numpy_one_chunk(t: torch.Tensor) -> bool:
    """Whether ``t`` takes the lean layers' short numpy path: a contiguous float32/64 CPU
    tensor of at most one mask chunk, with the policy's numpy mask kernels in force.

    The general path (:mod:`advtune.masks`) makes the same result in 20-odd Python and
    dispatcher calls per layer; on the digits CNN at batch 8 (two lean layers at 2^16
    elements) those calls, not the kernels, were most of what the lean layers cost
    (``docs/performance.md``). This path makes one numpy view per operand and no chunk
    loop.
    """
    if t.device.type != "cpu" or t.dtype not in _NUMPY_INT_OF or not t.is_contiguous():
        return False
    policy = kernel_policy()
    return t.numel() <= policy.mask_chunk and torch.get_num_threads() <= policy.numpy_max_threads


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


def _amp_operands(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, bool]:
    """Cast like autocast would for conv/linear; the cast of ``x`` stays in the graph.

    Returns ``(x, weight, bias, autocast_was_on)``. The Function then runs with
    autocast off, so its backward sees the same dtypes as its forward, and the
    differentiable ``x.to(dtype)`` casts the input gradient back to ``x``'s dtype.
    """
    dtype = autocast_state(x.device.type)
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
