"""Frozen mode (advtune.tune(model, "frozen") / advtune.frozen.freeze): exact input
gradients for every torchvision BN model, paths and state_dict keys kept, weight-gradient
requests refused, and the saved-bytes reduction measured deterministically on CPU."""

from __future__ import annotations

import io

import modelzoo
import pytest
import torch
import torchvision
from modelzoo import output_and_grad, rel_error
from torch import nn

import advtune
from advtune.bench import build_model, saved_bytes_per_image
from advtune.convbn import DeployedBatchNorm
from advtune.frozen import freeze, freeze_report, is_frozen
from advtune.lean import FrozenParameterError, LeanConv2d, LeanReLU

# The default run checks these (small, and together every lean layer kind); the rest of
# the torchvision BN models run with -m slow.
FAST = {
    "resnet18",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "densenet121",
    "shufflenet_v2_x0_5",
    "regnet_x_400mf",
    "mnasnet0_5",
    "googlenet",
}


def _params():
    return [modelzoo.zoo_param(name, fast=FAST) for name in modelzoo.bn_model_names()]


def _build(name: str) -> nn.Module:
    if name == "inception_v3":
        # modelzoo calibrates in train mode, where inception's auxiliary head cannot run
        # at 75 px; advtune.bench builds it without the head (eval never runs it).
        return build_model(name, size=modelzoo.input_size(name)).double()
    return modelzoo.build_calibrated(name)


@pytest.mark.parametrize("name", _params())
def test_frozen_input_gradients_equal_eval_float64(name):
    model = _build(name)
    size = modelzoo.input_size(name)
    x = torch.rand(
        2, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(3)
    )
    ref_out, ref_grad = output_and_grad(model, x)
    frozen = advtune.tune(model, "frozen")
    out, grad = output_and_grad(frozen, x)
    assert rel_error(out, ref_out) <= 1e-10
    assert rel_error(grad, ref_grad) <= 1e-10
    report = freeze_report(frozen)
    assert report is not None and report.converted, "nothing was converted"
    assert any(cls.startswith("LeanConv") for cls in report.converted.values())
    assert advtune.convbn_report(frozen).mode == "frozen"
    assert not any(p.requires_grad for p in frozen.parameters())
    # Every functional-call rewrite passed its first-call check (none was dropped).
    modules = dict(frozen.named_modules())
    dropped = [p for p in report.rewritten if "_advtune_forward" not in modules[p].__dict__]
    assert not dropped
    # The caller's model is untouched.
    assert any(p.requires_grad for p in model.parameters())


def test_frozen_keeps_paths_and_state_dict_keys_of_deploy():
    model = modelzoo.build_calibrated("resnet18", dtype=torch.float32)
    deploy = advtune.tune(model, "deploy")
    frozen = advtune.tune(model, "frozen")
    assert [n for n, _ in frozen.named_modules()] == [n for n, _ in deploy.named_modules()]
    assert list(frozen.state_dict()) == list(deploy.state_dict())
    frozen.load_state_dict(deploy.state_dict())
    assert isinstance(frozen.conv1, LeanConv2d) and isinstance(frozen.conv1, nn.Conv2d)
    assert isinstance(frozen.relu, LeanReLU) and frozen.relu.inplace
    assert isinstance(frozen.bn1, DeployedBatchNorm)
    assert "LeanConv2d" in str(freeze_report(frozen))


def test_frozen_model_survives_deepcopy_and_pickle():
    torch.manual_seed(0)
    model = modelzoo.build_calibrated("mobilenet_v3_small", dtype=torch.float32)
    frozen = advtune.tune(model, "frozen")
    x = torch.rand(2, 3, 32, 32)
    buf = io.BytesIO()
    torch.save(frozen, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert is_frozen(loaded)
    out, grad = output_and_grad(frozen, x)
    out2, grad2 = output_and_grad(loaded, x)
    torch.testing.assert_close(out2, out, rtol=0, atol=0)
    torch.testing.assert_close(grad2, grad, rtol=0, atol=0)
    loaded.features[0][0].weight.requires_grad_(True)  # the guard came along too
    with pytest.raises(FrozenParameterError):
        loaded(x)


def test_weight_gradient_request_raises():
    frozen = advtune.tune(modelzoo.build_calibrated("resnet18", dtype=torch.float32), "frozen")
    x = torch.rand(1, 3, 32, 32, requires_grad=True)
    frozen.requires_grad_(True)
    with pytest.raises(FrozenParameterError, match=r"conv1\.weight.*input gradients only"):
        frozen(x)
    with torch.no_grad():
        frozen(x)  # inference records nothing: allowed
    frozen.requires_grad_(False)
    frozen(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # Asking autograd directly for a parameter's gradient fails too (it is not in the graph).
    loss = frozen(x).sum()
    with pytest.raises(RuntimeError, match="does not require grad"):
        torch.autograd.grad(loss, frozen.fc.weight)


def test_guard_covers_layers_that_stay_native():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.rand(1, 3, 6, 6))  # materialise the lazy layer
    frozen = advtune.tune(model, "frozen")
    report = freeze_report(frozen)
    assert ("1", "GroupNorm") in report.native
    frozen[1].weight.requires_grad_(True)
    with pytest.raises(FrozenParameterError, match=r"'1\.weight'"):
        frozen(torch.rand(1, 3, 6, 6, requires_grad=True))


def test_freeze_twice_and_tune_refuses_frozen():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    frozen = advtune.tune(model, "frozen")
    n_hooks = len(frozen._forward_pre_hooks)
    report = freeze(frozen)
    assert len(frozen._forward_pre_hooks) == n_hooks
    assert set(report.converted) == {"0", "2"}
    with pytest.raises(ValueError, match="already converted"):
        advtune.tune(frozen, "tune")


def test_unfolded_batchnorm_becomes_lean_and_train_mode_stays_native():
    # BN before its conv (pre-activation, as in DenseNet) cannot fold: it turns lean.
    model = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 4, 3)).eval()
    model[0].running_mean.normal_()
    frozen = advtune.tune(model, "frozen")
    assert freeze_report(frozen).converted["0"] == "LeanBatchNorm2d"
    x = torch.rand(2, 3, 5, 5, dtype=torch.float32)
    torch.testing.assert_close(frozen(x), model(x))
    frozen.train()
    torch.testing.assert_close(frozen(x), model.train()(x))


def test_resnet50_frozen_saves_under_a_tenth_of_eval():
    """The deterministic CPU measurement: ResNet-50, 64 px, float32, batches 2 vs 4."""
    base = build_model("resnet50", size=64)
    saved = {
        mode: saved_bytes_per_image(advtune.tune(base, mode), size=64, batches=(2, 4))
        for mode in ("eval", "tune", "frozen")
    }
    assert saved["frozen"] <= 0.1 * saved["eval"], saved
    assert saved["tune"] < 0.6 * saved["eval"], saved
    assert saved["frozen"] > 0  # the masks and offsets are per image


def test_model_without_batchnorm_gets_lean_layers():
    torch.manual_seed(0)
    model = torchvision.models.squeezenet1_1(weights=None).eval().double()
    x = torch.rand(2, 3, 48, 48, dtype=torch.float64)
    ref_out, ref_grad = output_and_grad(model, x)
    frozen = advtune.tune(model, "frozen")
    out, grad = output_and_grad(frozen, x)
    assert rel_error(out, ref_out) <= 1e-10 and rel_error(grad, ref_grad) <= 1e-10
    assert freeze_report(frozen).counts()["LeanConv2d"] == 26


# Models without BatchNorm: frozen mode converts their convs, linears, ReLUs and pools and
# leaves LayerNorm, GELU, attention and the rest native; gradients must still equal eval's.
# One per family that adds layer kinds to the default run (alexnet and the plain VGGs hold
# only the conv/ReLU/pool/linear kinds squeezenet already covers: slow only).
_NO_BN_FAST = {"squeezenet1_0", "convnext_tiny"}
_NO_BN_SIZE = {"vit": 224, "swin": 64, "alexnet": 64}
# Float64 copies (model, frozen copy, gradients) of these exceed what the 24 GiB, shared
# test machine can hold next to other jobs.
_NO_BN_MAX_PARAMS = 150_000_000


def _no_bn_params():
    params = []
    for name in torchvision.models.list_models(module=torchvision.models):
        if name in modelzoo.bn_model_names():
            continue
        marks = [] if name in _NO_BN_FAST else [pytest.mark.slow]
        if modelzoo._meta_info()[name][1] > _NO_BN_MAX_PARAMS:
            marks.append(pytest.mark.skip(reason="over 150M parameters: float64 copies need RAM"))
        params.append(pytest.param(name, marks=marks))
    return params


@pytest.mark.parametrize("name", _no_bn_params())
def test_frozen_input_gradients_equal_eval_float64_without_batchnorm(name):
    size = next((s for k, s in _NO_BN_SIZE.items() if name.startswith(k)), 32)
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval().double()
    x = torch.rand(
        2, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    ref_out, ref_grad = output_and_grad(model, x)
    frozen = advtune.tune(model, "frozen")
    out, grad = output_and_grad(frozen, x)
    assert rel_error(out, ref_out) <= 1e-10 and rel_error(grad, ref_grad) <= 1e-10
    assert freeze_report(frozen).converted  # something was made lean
