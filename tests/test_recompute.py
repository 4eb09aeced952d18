"""Frozen mode with selective recomputation (``freeze(..., recompute=True)``): residual
blocks of ViT, Swin, ConvNeXt and EfficientNet keep only their input for backward; outputs
and input gradients equal Eval mode's in float64, and the bytes saved per image fall
below issue 14's targets (deterministic counts on CPU)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torchvision
from modelzoo import output_and_grad, rel_error
from torch import nn

import advtune
from advtune.bench import saved_bytes_per_image
from advtune.frozen import RECOMPUTE_BLOCKS, freeze, freeze_report
from advtune.lean import FrozenParameterError
from advtune.models import random_net

# Bytes saved for backward per image, frozen + recompute ÷ eval (parameters frozen in
# both): issue 14's targets at 224 px, checked here at the test's small size.
TARGETS = {"vit": 0.35, "swin_t": 0.35, "convnext_tiny": 0.25, "efficientnet_b0": 0.25}
SIZES = {"vit": 32, "swin_t": 64, "convnext_tiny": 32, "efficientnet_b0": 32}


def _build(name: str) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if name == "vit":  # ViT-B/16's blocks at toy width
            model = torchvision.models.VisionTransformer(
                image_size=32,
                patch_size=8,
                num_layers=3,
                num_heads=2,
                hidden_dim=16,
                mlp_dim=64,
                num_classes=10,
            )
            nn.init.normal_(model.heads.head.weight, std=0.5)  # torchvision zeroes the head
        elif name == "efficientnet_b0":
            return random_net(name, seed=0, size=SIZES[name], batch=8, dtype=torch.float64)
        else:
            model = torchvision.models.get_model(name, weights=None, num_classes=10)
    return model.double().eval()


def _x(name: str, batch: int = 2) -> torch.Tensor:
    size = SIZES[name]
    gen = torch.Generator().manual_seed(3)
    return torch.rand(batch, 3, size, size, dtype=torch.float64, generator=gen)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_recompute_equals_eval_in_float64(name):
    model = _build(name)
    x = _x(name)
    ref_out, ref_grad = output_and_grad(model.requires_grad_(False), x)
    frozen = advtune.tune(model, "frozen", recompute=True)
    assert freeze_report(frozen).recomputed  # the blocks were found
    out, grad = output_and_grad(frozen, x)
    assert ref_grad.abs().max() > 0
    assert rel_error(out, ref_out) <= 1e-10
    assert rel_error(grad, ref_grad) <= 1e-10


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_recompute_meets_saved_bytes_target(name):
    model = _build(name).float().requires_grad_(False)  # bench measures float32 images
    size = SIZES[name]
    eval_bytes = saved_bytes_per_image(model, size=size, batches=(1, 2))
    plain = advtune.tune(model, "frozen")
    lean = advtune.tune(model, "frozen", recompute=True)
    plain_bytes = saved_bytes_per_image(plain, size=size, batches=(1, 2))
    lean_bytes = saved_bytes_per_image(lean, size=size, batches=(1, 2))
    assert lean_bytes < plain_bytes
    assert lean_bytes / eval_bytes <= TARGETS[name]


def test_recompute_is_off_by_default_and_only_in_frozen_mode():
    model = _build("vit")
    assert not freeze_report(advtune.tune(model, "frozen")).recomputed
    with pytest.raises(ValueError, match="recompute"):
        advtune.tune(model, "deploy", recompute=True)


def test_train_mode_no_grad_and_keys_untouched():
    model = _build("convnext_tiny")
    frozen = advtune.tune(model, "frozen", recompute=True)
    block = frozen.features[1][0]
    assert type(block).__name__ == "CNBlock"
    assert isinstance(block, torchvision.models.convnext.CNBlock)
    assert frozen.state_dict().keys() == model.state_dict().keys()
    x = _x("convnext_tiny")
    with torch.no_grad():  # no-grad calls run the plain forward
        assert torch.equal(frozen(x), model(x))
    # Train mode: the block's own forward, gradients of the graph it records.
    frozen.train()
    model.train()
    torch.manual_seed(0)
    a = frozen(x)
    torch.manual_seed(0)
    b = model(x)
    assert torch.equal(a, b)
    assert a.grad_fn is None  # parameters are frozen and x does not require grad
    h = torch.rand(2, 96, 8, 8, dtype=torch.float64, requires_grad=True)
    assert "Recompute" not in type(block(h).grad_fn).__name__


def test_recomputed_block_saves_only_its_input():
    frozen = advtune.tune(_build("vit"), "frozen", recompute=True)
    block = frozen.encoder.layers[0]
    x = torch.rand(2, 17, 16, dtype=torch.float64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = block(x)
    assert "Recompute" in type(out.grad_fn).__name__
    assert len(saved) == 1 and saved[0] is x


def test_pickle_and_deepcopy_keep_recompute():
    model = _build("vit")
    frozen = advtune.tune(model, "frozen", recompute=True)
    buf = io.BytesIO()
    torch.save(frozen, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    x = _x("vit")
    ref_out, ref_grad = output_and_grad(frozen, x)
    for clone in (loaded, copy.deepcopy(frozen)):
        assert type(clone.encoder.layers[0]) is type(frozen.encoder.layers[0])
        out, grad = output_and_grad(clone, x)
        assert torch.equal(out, ref_out) and torch.equal(grad, ref_grad)


def test_parameters_requiring_grad_are_refused_not_dropped():
    # A block called on its own with trainable parameters runs its plain forward, whose
    # lean layers refuse (recomputation would silently drop the weight gradients).
    frozen = advtune.tune(_build("vit"), "frozen", recompute=True)
    block = frozen.encoder.layers[0].requires_grad_(True)
    x = torch.rand(2, 17, 16, dtype=torch.float64, requires_grad=True)
    with pytest.raises(FrozenParameterError):
        block(x)


def test_freeze_twice_does_not_wrap_twice():
    model = _build("vit")
    report = freeze(model, recompute=True)
    again = freeze(model, recompute=True)
    assert report.recomputed == [f"encoder.layers.encoder_layer_{i}" for i in range(3)]
    assert again.recomputed == report.recomputed
    assert "recomputed" in again.to_dict() and "3 blocks recomputed" in str(again)


def test_recompute_block_names_exist():
    # Every torchvision name in RECOMPUTE_BLOCKS is a real class (catches renames).
    import importlib

    for qual in RECOMPUTE_BLOCKS:
        module, _, cls = qual.rpartition(".")
        if module.startswith("torchvision."):
            assert isinstance(getattr(importlib.import_module(module), cls), type)


def test_recompute_redoes_autocast_in_backward():
    lean = advtune.tune(_build("vit").float(), "frozen", recompute=True)
    dtypes = []
    lean.encoder.layers[0].mlp[0].register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    x = _x("vit").float().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lean(x)
    (grad,) = torch.autograd.grad(out.float().sum(), x)  # backward outside autocast
    assert grad.abs().max() > 0
    # The MLP's first linear ran twice (forward, recomputation), both times in bf16.
    assert dtypes == [torch.bfloat16, torch.bfloat16]


def test_double_backward_raises_rather_than_returning_zero():
    frozen = advtune.tune(_build("vit"), "frozen", recompute=True)
    block = frozen.encoder.layers[0]
    x = torch.rand(2, 17, 16, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(block(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(g.sum(), x)


@pytest.mark.parametrize("name", ["test_vit", "test_convnext", "test_efficientnet"])
def test_timm_blocks_recompute_equal_eval(name):
    pytest.importorskip("timm")
    model = random_net(f"timm:{name}", seed=0, size=64, batch=4, dtype=torch.float64)
    x = torch.rand(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref_out, ref_grad = output_and_grad(model.requires_grad_(False), x)
    frozen = advtune.tune(model, "frozen", recompute=True)
    assert freeze_report(frozen).recomputed
    out, grad = output_and_grad(frozen, x)
    assert ref_grad.abs().max() > 0
    assert rel_error(out, ref_out) <= 1e-10
    assert rel_error(grad, ref_grad) <= 1e-10
