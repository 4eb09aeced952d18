"""The frozen mode's CPU kernel choices as one immutable policy, set per context.

Every kernel choice the lean layers and the mask kernels make (which library packs a
mask, which kernel takes a stem convolution's input gradient, ...) is a field of
:class:`KernelPolicy`. The policy in force is a :class:`contextvars.ContextVar`, so
``with advtune.lean.kernels(fold_channels=0): ...`` changes it for that block, in that
thread (or asyncio task) only; other threads keep theirs. The defaults were chosen by
measurement (``docs/performance.md``).

Kernels read the policy when they run: forward kernels in the forward, backward kernels
(the mask application, the fold input gradient) in the backward. On CPU PyTorch runs the
backward in the thread that calls it, so a ``with kernels(...)`` around forward and
backward governs both. The choices change speed and memory only, never a result beyond
float rounding (``tests/test_lean.py`` checks each against the native op).
"""

from __future__ import annotations

import contextvars
import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

__all__ = ["KernelPolicy", "kernel_policy", "kernels"]


@dataclass(frozen=True)
class KernelPolicy:
    """The frozen mode's CPU kernel choices (immutable; build a new one to change one).

    Attributes:
        onednn_1x1: Run stride-1 1x1 float32 CPU convs of the frozen forward through
            oneDNN directly. PyTorch sends them to its own GEMM kernel below 16 images on
            one thread. Off: faster in a gradient-step ablation, but it raised a frozen
            ResNet-50's step peak from 9.97 to 11.34 MiB/img (``docs/performance.md``).
        fold_channels: On CPU, 2-D convs with at most this many input channels (image
            stems) take their input gradient as a matmul and ``F.fold`` (col2im) instead
            of oneDNN's transposed convolution into few channels: ResNet-50's 7x7 stem
            at batch 4 took 42-53 ms that way and 23-38 ms this way; at 16 input channels
            the fold was 6x slower (one CPU thread, 2026-12-01). ``0`` turns it off.
        numpy_max_threads: Up to this many torch threads the CPU mask kernels run in
            numpy, above it in torch. numpy's compare, ``packbits`` and ``unpackbits``
            are vectorized where torch's bool kernels are not, but run on one thread: on
            3.2M float32 elements (2026-12-01, 2-core machine) packing took 1.2 ms in
            numpy vs 5.0 in torch at 1 thread, 1.2 vs 3.1 at 2; masking a gradient 2.4
            vs 4.7 and 2.6 vs 3.5. Torch's kernels scale with more threads and numpy's
            do not, so above 2 they are torch's. ``0``: always torch.
        mask_chunk: Elements per chunk of the mask kernels; bounds their temporaries (a
            bool and an integer mask of this many elements) independently of the batch.
            A positive multiple of 8.
        native_below: Lean layers whose input has fewer elements than this (the whole
            tensor, batch included) run the native op under autograd instead. A lean
            layer costs a fixed 30-150 us per call on CPU (a Python autograd Function,
            mask kernels) whatever the size, while what it saves is proportional to the
            size. Below 2^17 elements (512 KiB in float32) the native op's saved tensors
            are at most about that per layer (a 2x2 max-pool's int64 indices add half as
            much again). On the digits CNN lean layers at every size made a gradient
            step 1.4-2.9x the eval model's at batch 1-8, and at 2^16 its two lean layers
            at batch 8 still cost about 0.6 ms of CPU time more than native (deploy's
            whole step: 2.2 ms): frozen 1.12x eval, 0.93x with 2^17. The price, ResNet-50 at 224 px (weights
            excluded): 4.1 MiB more saved at batch 1, 0.46 MiB/img more at batch 4
            (``docs/performance.md``). ``0``: always lean.
    """

    onednn_1x1: bool = False
    fold_channels: int = 4
    numpy_max_threads: int = 2
    mask_chunk: int = 1 << 20
    native_below: int = 1 << 17

    def __post_init__(self) -> None:
        if not isinstance(self.onednn_1x1, bool):
            raise ValueError(f"onednn_1x1 must be a bool, got {self.onednn_1x1!r}")
        for name in ("fold_channels", "numpy_max_threads", "mask_chunk", "native_below"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if self.mask_chunk == 0 or self.mask_chunk % 8:
            raise ValueError(f"mask_chunk must be a positive multiple of 8, got {self.mask_chunk}")


_FIELDS = tuple(f.name for f in dataclasses.fields(KernelPolicy))
_CURRENT: contextvars.ContextVar[KernelPolicy] = contextvars.ContextVar(
    "advtune_kernel_policy",
    default=KernelPolicy(),  # noqa: B039 (frozen: immutable)
)

#: The policy in force in this context (a bound method: one C call per kernel).
kernel_policy = _CURRENT.get


@contextmanager
def kernels(policy: KernelPolicy | None = None, /, **changes: Any) -> Iterator[KernelPolicy]:
    """Run a block under another kernel policy (this thread or task only).

    Args:
        policy: The policy to start from (default: the one in force).
        **changes: Fields of :class:`KernelPolicy` to change, e.g. ``fold_channels=0``.

    Yields:
        The policy in force inside the block.

    Raises:
        ValueError: An unknown field name or an invalid value.

    Example::

        with advtune.lean.kernels(numpy_max_threads=0):  # torch's mask kernels
            loss.backward()
    """
    unknown = sorted(set(changes) - set(_FIELDS))
    if unknown:
        raise ValueError(
            f"unknown kernel policy field {unknown[0]!r}; the fields are {', '.join(_FIELDS)}"
        )
    if policy is not None and not isinstance(policy, KernelPolicy):
        raise ValueError(f"policy must be a KernelPolicy, got {type(policy).__name__}")
    new = dataclasses.replace(policy if policy is not None else _CURRENT.get(), **changes)
    token = _CURRENT.set(new)
    try:
        yield new
    finally:
        _CURRENT.reset(token)
