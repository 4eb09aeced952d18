"""advtune._swap: the one registry of swapped classes, and how their instances pickle."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import advtune
from advtune import _swap
from advtune.convbn import DeployedBatchNorm
from advtune.frozen import _LeanForwardMixin, _RecomputeMixin
from advtune.lean import LEAN_TYPES, LeanConv2d


class Block(nn.Module):
    """A user module with a functional call (gets a generated forward)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))


def test_every_swapped_class_has_a_kind_and_a_native_class():
    assert _swap.replacements() == dict(LEAN_TYPES)
    assert _swap.replacement(nn.ReLU()) is LEAN_TYPES[nn.ReLU]
    assert _swap.replacement(type("MyReLU", (nn.ReLU,), {})()) is None  # exact class only
    for native, lean in LEAN_TYPES.items():
        assert _swap.native_class(lean) is native and _swap.kind(lean).startswith("lean-")
    assert _swap.kind(DeployedBatchNorm("x")) == "deployed-bn"
    assert _swap.kind(nn.Conv2d(1, 1, 1)) is None and not _swap.is_advtune(nn.ReLU())
    tuned = advtune.tune(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval(), "tune")
    assert [_swap.kind(m) for m in tuned] == ["tune-conv", "tune-bn"]
    assert type(tuned[0]).__name__ == "TuneConv2d" and _swap.native_class(tuned[0]) is nn.Conv2d


def test_registering_twice_raises_naming_the_class():
    with pytest.raises(ValueError, match="LeanConv2d is registered already"):
        _swap.register(LeanConv2d, "lean-conv")
    with pytest.raises(ValueError, match="Conv2d has a replacement already"):
        _swap.register_replacement(nn.Conv2d, LeanConv2d, "lean-conv")
    with pytest.raises(TypeError, match="mixin must be a Mixin subclass"):
        _swap.mixed_class(object, nn.ReLU)  # type: ignore[arg-type]


def test_stacked_mixins_pickle_from_their_native_class():
    """A recomputed block whose forward was also generated: two mix-ins over one native
    class; pickle and deepcopy rebuild both from importable parts."""
    block = Block().requires_grad_(False)
    once = _swap.mixed_class(_LeanForwardMixin, Block)
    twice = _swap.mixed_class(_RecomputeMixin, once)
    assert _swap.mixed_class(_RecomputeMixin, once) is twice  # made once per pair
    assert _swap.native_class(twice) is Block and _swap.kind(twice) == "recompute"
    assert twice.__qualname__ == "Block<lean-forward><recompute>" and twice.__name__ == "Block"
    block.__class__ = twice
    x = torch.rand(2, 3, 5, 5, requires_grad=True)
    for clone in (copy.deepcopy(block), pickle.loads(pickle.dumps(block))):
        assert type(clone) is twice
        torch.testing.assert_close(clone(x), block(x), rtol=0, atol=0)


def test_frozen_model_round_trips_through_torch_save():
    model = nn.Sequential(Block(), nn.Flatten(), nn.Linear(100, 3)).eval()
    frozen = advtune.tune(model, "frozen")
    buf = io.BytesIO()
    torch.save(frozen, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert [type(m) for m in loaded.modules()] == [type(m) for m in frozen.modules()]
    x = torch.rand(2, 3, 5, 5)
    torch.testing.assert_close(loaded(x), model(x))
