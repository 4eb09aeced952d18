"""advtune.tune: Tune and Deploy modes equal Eval mode, pair detection, edge cases."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from modelzoo import bn_model_names, build_calibrated, input_size, rel_error, zoo_param
from torch import nn

import advtune
from advtune.convbn import DeployedBatchNorm, fold_conv_bn

F64 = torch.float64


def _outputs_and_grads(model: nn.Module, x: torch.Tensor, w: torch.Tensor, params: bool):
    """Logits, input gradient and (optionally) parameter gradients of sum(w * logits)."""
    x = x.clone().requires_grad_(True)
    out = model(x)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad] if params else []
    # allow_unused: e.g. GoogLeNet's auxiliary heads take no part in eval mode.
    grads = torch.autograd.grad((out * w).sum(), [x] + [p for _, p in named], allow_unused=True)
    pgrads = {n: g for (n, _), g in zip(named, grads[1:]) if g is not None}
    return out.detach(), grads[0], pgrads


def _zoo_params():
    return [zoo_param(n) for n in bn_model_names()]


@pytest.mark.parametrize("name", _zoo_params())
def test_torchvision_models_match_eval(name):
    model = build_calibrated(name)
    size = input_size(name)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, size, size, generator=gen, dtype=F64)
    w = torch.randn(2, 1000, generator=gen, dtype=F64)
    ref_out, ref_gx, ref_gp = _outputs_and_grads(model, x, w, True)
    for mode in ("tune", "deploy"):
        tuned = advtune.tune(model, mode)
        report = advtune.convbn_report(tuned)
        assert len(report.folded) > 0, f"{name}: no Conv->BN pair folded in {mode} mode"
        out, gx, gp = _outputs_and_grads(tuned, x, w, params=mode == "tune")
        assert rel_error(out, ref_out) <= 1e-10, (name, mode, "logits")
        assert rel_error(gx, ref_gx) <= 1e-10, (name, mode, "input grad")
        for pname, g in gp.items():
            assert rel_error(g, ref_gp[pname]) <= 1e-10, (name, mode, pname)
        if mode == "tune":
            assert set(gp) == set(ref_gp)


# --------------------------------------------------------------------------- helpers


def _calibrate(model: nn.Module, *shape: int) -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None
            if m.affine:
                with torch.no_grad():
                    m.weight.uniform_(0.5, 1.5, generator=gen)
                    m.bias.normal_(0, 0.1, generator=gen)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(*shape, generator=gen, dtype=F64))
    return model.eval()


def _check_equal(model: nn.Module, *shape: int, modes=("tune", "deploy")):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(*shape, generator=gen, dtype=F64)
    ref = model(x)
    w = torch.randn(ref.shape, generator=gen, dtype=F64)
    ref_out, ref_gx, ref_gp = _outputs_and_grads(model, x, w, True)
    reports = {}
    for mode in modes:
        tuned = advtune.tune(model, mode)
        out, gx, gp = _outputs_and_grads(tuned, x, w, params=mode == "tune")
        assert rel_error(out, ref_out) <= 1e-10, mode
        assert rel_error(gx, ref_gx) <= 1e-10, mode
        for pname, g in gp.items():
            assert rel_error(g, ref_gp[pname]) <= 1e-10, (mode, pname)
        reports[mode] = advtune.convbn_report(tuned)
    return reports


class Seq(nn.Sequential):
    pass


# --------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize(
    "conv, bn, shape",
    [
        (nn.Conv1d(3, 6, 3, bias=True), nn.BatchNorm1d(6), (4, 3, 10)),
        (nn.Conv2d(4, 8, 3, groups=2, bias=False), nn.BatchNorm2d(8), (4, 4, 9, 9)),
        (nn.Conv2d(6, 6, 3, groups=6, padding=1), nn.BatchNorm2d(6), (4, 6, 7, 7)),
        (nn.Conv2d(3, 5, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d(5), (4, 3, 6, 6)),
        (nn.Conv3d(2, 4, 3, dilation=1, stride=2), nn.BatchNorm3d(4), (4, 2, 7, 7, 7)),
        (nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False), (4, 3, 8, 8)),
        (
            nn.ConvTranspose2d(6, 8, 3, stride=2, groups=2, output_padding=1),
            nn.BatchNorm2d(8),
            (4, 6, 5, 5),
        ),
        (nn.ConvTranspose1d(3, 4, 3, bias=False), nn.BatchNorm1d(4), (4, 3, 6)),
    ],
    ids=[
        "conv1d-bias",
        "grouped",
        "depthwise",
        "reflect-pad",
        "conv3d",
        "bn-no-affine",
        "convT2d-grouped",
        "convT1d",
    ],
)
def test_single_block_variants(conv, bn, shape):
    model = _calibrate(Seq(conv, bn, nn.ReLU()).to(F64), *shape)
    reports = _check_equal(model, *shape)
    for report in reports.values():
        assert [(p.conv, p.bn) for p in report.folded] == [("0", "1")]


class ConvUsedTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(self.conv(x)))


class ConvOutputShared(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class BNTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv2(self.bn(self.conv1(x))))


class NoRunningStats(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4, track_running_stats=False)

    def forward(self, x):
        return self.bn(self.conv(x))


@pytest.mark.parametrize(
    "cls, reason",
    [
        (ConvUsedTwice, "conv conv is used 2 times"),
        (ConvOutputShared, "output is also used by"),
        (BNTwice, "BN is applied 2 times"),
        (NoRunningStats, "does not track running statistics"),
    ],
)
def test_unfoldable_pairs_are_skipped_with_reason(cls, reason):
    model = _calibrate(cls().to(F64), 4, 3, 8, 8)
    reports = _check_equal(model, 4, 3, 8, 8)
    for report in reports.values():
        assert report.folded == []
        assert any(reason in s.reason and s.module == "bn" for s in report.skipped), report


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace this forward."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.inner = Seq(nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4))

    def forward(self, x):
        if x.sum() > 0:
            x = x * 2
        return self.inner(self.bn(self.conv(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = Seq(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.odd = Untraceable()
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        return self.head(self.odd(self.stem(x)).mean((2, 3)))


def test_untraceable_submodule_traced_per_child():
    model = _calibrate(Net().to(F64), 4, 3, 8, 8)
    reports = _check_equal(model, 4, 3, 8, 8)
    report = reports["tune"]
    assert {(p.conv, p.bn) for p in report.folded} == {
        ("stem.0", "stem.1"),
        ("odd.inner.0", "odd.inner.1"),
    }
    assert {u.module for u in report.untraced} == {"", "odd"}
    # The pair called directly from untraced code stays Eval-mode, with a reason.
    assert any(s.module == "odd.bn" and "untraced" in s.reason for s in report.skipped)
    assert "untraced" in str(report)


def test_state_dict_round_trip_and_module_paths():
    model = _calibrate(Net().to(F64), 4, 3, 8, 8)
    tuned = advtune.tune(model, "tune")
    assert list(tuned.state_dict()) == list(model.state_dict())
    assert [n for n, _ in tuned.named_modules()] == [n for n, _ in model.named_modules()]
    # A checkpoint of the plain model loads into the tuned one and back.
    other = _calibrate(Net().to(F64), 4, 3, 8, 8)
    tuned.load_state_dict(other.state_dict())
    x = torch.randn(2, 3, 8, 8, dtype=F64)
    assert rel_error(tuned(x), other(x)) <= 1e-10
    model.load_state_dict(tuned.state_dict())
    assert rel_error(model(x), other(x)) <= 1e-10
    # Deploy keeps module paths; the BN is an identity that names its conv.
    deployed = advtune.tune(model, "deploy")
    assert [n for n, _ in deployed.named_modules()] == [n for n, _ in model.named_modules()]
    assert isinstance(deployed.stem[1], DeployedBatchNorm)
    assert deployed.stem[1].folded_into == "stem.0"


def test_tuned_model_survives_deepcopy_and_save_load():
    model = _calibrate(Net().to(F64), 4, 3, 8, 8)
    tuned = advtune.tune(model)
    x = torch.randn(2, 3, 8, 8, dtype=F64)
    clone = copy.deepcopy(tuned)
    assert clone.stem[0].__dict__["_advtune_bn"] is clone.stem[1]
    buf = io.BytesIO()
    torch.save(tuned, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for m in (clone, loaded):
        assert rel_error(m(x), model(x)) <= 1e-10
    # The fold is computed on the fly: a changed statistic is seen immediately.
    with torch.no_grad():
        clone.stem[1].running_var.mul_(2.0)
        model.stem[1].running_var.mul_(2.0)
    assert rel_error(clone(x), model(x)) <= 1e-10


def test_callers_model_untouched_unless_inplace():
    model = _calibrate(Net().to(F64), 4, 3, 8, 8)
    before = copy.deepcopy(model.state_dict())
    classes = [type(m) for m in model.modules()]
    for mode in ("tune", "deploy"):
        advtune.tune(model, mode)
    assert [type(m) for m in model.modules()] == classes
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    same = advtune.tune(model, "tune", inplace=True)
    assert same is model
    assert type(model.stem[0]).__name__ == "TuneConv2d"


def test_train_mode_falls_back_to_conv_bn():
    torch.manual_seed(0)
    model = _calibrate(Net().to(F64), 4, 3, 8, 8)
    tuned = advtune.tune(model)
    x = torch.randn(4, 3, 8, 8, dtype=F64)
    model.train()
    tuned.train()
    out_ref, out = model(x), tuned(x)
    assert rel_error(out, out_ref) <= 1e-10
    # Running statistics were updated identically in both.
    for (k, a), b in zip(model.state_dict().items(), tuned.state_dict().values()):
        assert torch.allclose(a.to(F64), b.to(F64), rtol=1e-12, atol=0), k
    model.eval()
    tuned.eval()
    assert rel_error(tuned(x), model(x)) <= 1e-10


def test_eval_mode_returns_unchanged_copy():
    model = _calibrate(Net().to(F64), 4, 3, 8, 8)
    same = advtune.tune(model, "eval")
    assert same is not model
    assert [type(m) for m in same.modules()] == [type(m) for m in model.modules()]
    assert advtune.convbn_report(same).mode == "eval"
    assert len(advtune.convbn_report(same).folded) == 2  # what tune would fold


def test_bad_arguments():
    model = Net()
    with pytest.raises(ValueError, match="'fast'"):
        advtune.tune(model, "fast")
    tuned = advtune.tune(model)
    with pytest.raises(ValueError, match="already converted"):
        advtune.tune(tuned, "deploy")
    with pytest.raises(TypeError, match=r"nn\.Module"):
        advtune.tune("resnet50")


def test_fold_is_float32_under_autocast_and_float64_stays():
    conv, bn = nn.Conv2d(3, 4, 3).to(F64), nn.BatchNorm2d(4).to(F64)
    w, b = fold_conv_bn(conv, bn)
    assert w.dtype == b.dtype == F64
    conv, bn = nn.Conv2d(3, 4, 3).to(torch.bfloat16), nn.BatchNorm2d(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w, b = fold_conv_bn(conv, bn)
    assert w.dtype == b.dtype == torch.float32
    model = _calibrate(Seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).to(F64), 4, 3, 8, 8).float()
    tuned = advtune.tune(model)
    x = torch.randn(2, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = tuned(x), model(x)
    assert out.dtype == ref.dtype == torch.bfloat16
    assert rel_error(out.float(), ref.float()) < 2e-2
    # Half-precision model without autocast: folded in float32, cast for the conv.
    half = advtune.tune(model.to(torch.bfloat16))
    assert half(x.to(torch.bfloat16)).dtype == torch.bfloat16
