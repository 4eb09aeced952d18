"""Hugging Face transformer blocks callable with one tensor, for ``recompute=True``.

:func:`advtune.frozen.freeze` recomputes a residual block in backward only when the block
is called with exactly one tensor and returns one (``RECOMPUTE_BLOCKS``). ``transformers``
calls its ViT/DeiT layers as ``layer(hidden, attention_mask, **kwargs)`` (the mask is
``None`` for image classifiers) and its Swin layers as ``layer(hidden, (h, w),
always_partition=...)`` returning ``(hidden, attention weights)``. The subclasses here
drop those arguments when they carry nothing (no mask, no kwargs; a square token grid
whose side the tokens give back), so the block sees one tensor; any other call runs the
library's own code unchanged. :func:`adapt` swaps the classes in place (``state_dict``
keys stay the same). Imported only when a ``hf:`` model is built (it imports
``transformers``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers.models.deit.modeling_deit import DeiTLayer as _DeiTLayer
from transformers.models.swin.modeling_swin import SwinLayer as _SwinLayer
from transformers.models.vit.modeling_vit import ViTLayer as _ViTLayer

__all__ = ["DeiTLayer", "SwinLayer", "ViTLayer", "adapt"]


class _MaskFree:
    """``layer(hidden, None)`` → ``layer(hidden)``; anything else unchanged."""

    def __call__(
        self, hidden_states: Any, attention_mask: Any = None, *args: Any, **kwargs: Any
    ) -> Any:
        if attention_mask is None and not args and not kwargs:
            return super().__call__(hidden_states)  # type: ignore[misc]
        return super().__call__(hidden_states, attention_mask, *args, **kwargs)  # type: ignore[misc]


class ViTLayer(_MaskFree, _ViTLayer):  # type: ignore[misc]
    """transformers' ``ViTLayer``, called with one tensor when the mask is ``None``."""


class DeiTLayer(_MaskFree, _DeiTLayer):  # type: ignore[misc]
    """transformers' ``DeiTLayer``, called with one tensor when the mask is ``None``."""


def _square_side(hidden_states: torch.Tensor) -> int | None:
    """Side of the square token grid of ``(N, L, C)`` tokens, or ``None``."""
    if hidden_states.dim() != 3:
        return None
    side = math.isqrt(int(hidden_states.shape[1]))
    return side if side * side == hidden_states.shape[1] else None


class SwinLayer(_SwinLayer):  # type: ignore[misc]
    """transformers' ``SwinLayer``; on a square token grid it takes one tensor.

    The grid side comes back from the token count, so a recomputation in backward needs
    nothing but the saved input (no state kept between forward and backward).
    """

    def __call__(
        self,
        hidden_states: Any,
        input_dimensions: Any = None,
        always_partition: bool = False,
        **kwargs: Any,
    ) -> Any:
        side = _square_side(hidden_states) if isinstance(hidden_states, torch.Tensor) else None
        if (
            not kwargs
            and not always_partition
            and side is not None
            and tuple(input_dimensions or ()) == (side, side)
        ):
            # The stage unpacks (hidden, attention weights); weights are only wanted
            # with output_attentions, which arrives as a kwarg and takes the other path.
            return super().__call__(hidden_states), None
        return super().__call__(hidden_states, input_dimensions, always_partition, **kwargs)

    def forward(  # type: ignore[override]
        self,
        hidden_states: torch.Tensor,
        input_dimensions: tuple[int, int] | None = None,
        always_partition: bool = False,
        **kwargs: Any,
    ) -> Any:
        if input_dimensions is None:
            side = _square_side(hidden_states)
            if side is None:
                raise ValueError(
                    f"SwinLayer without input_dimensions needs a square token grid, got "
                    f"{tuple(hidden_states.shape)}"
                )
            return super().forward(hidden_states, (side, side))[0]
        return super().forward(hidden_states, input_dimensions, always_partition, **kwargs)


_SWAPS: dict[type, type] = {_ViTLayer: ViTLayer, _DeiTLayer: DeiTLayer, _SwinLayer: SwinLayer}


def adapt(model: nn.Module) -> int:
    """Swap every ViT/DeiT/Swin layer of ``model`` for its one-tensor subclass, in place.

    Returns:
        How many layers were swapped.
    """
    swapped = 0
    for module in model.modules():
        new = _SWAPS.get(type(module))  # exact class: a subclass may differ
        if new is not None:
            module.__class__ = new
            swapped += 1
    return swapped
