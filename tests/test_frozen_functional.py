"""Frozen mode's rewrite of functional calls (``F.relu``, ``F.max_pool2d``, ...) inside a
module's own ``forward``: exact in float64, leaner, verified on the first call, and
surviving train mode, deepcopy and pickle."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from modelzoo import calibrate_bn, output_and_grad, rel_error
from torch import nn

import advtune
from advtune.bench import build_model, saved_bytes_per_image
from advtune.frozen import freeze, freeze_report


class PreActBlock(nn.Module):
    """A pre-activation block as robustness-benchmark models write it: functional calls."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c)
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + x


class EveryCall(nn.Module):
    """One of each supported functional call (and a method call)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = PreActBlock(8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x).relu()
        x = F.max_pool2d(x, 3, stride=2, padding=1)
        x = self.block(x)
        x = F.leaky_relu(self.conv(x), 0.2)
        x = F.relu6(x * 3) + F.hardtanh(x, -0.5, 0.5) + F.hardsigmoid(x)
        x = F.relu_(x - 0.5)
        x = F.avg_pool2d(x, 2, ceil_mode=True, count_include_pad=False)
        x = F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)
        return self.fc(x)


def _calibrated(model: nn.Module, size: int = 16) -> nn.Module:
    torch.manual_seed(0)
    return calibrate_bn(model, (4, 3, size, size), passes=2)


def test_every_supported_call_is_rewritten_and_exact_in_float64():
    model = _calibrated(EveryCall()).double()
    x = torch.rand(3, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref_out, ref_grad = output_and_grad(model, x)
    frozen = advtune.tune(model, "frozen")
    report = freeze_report(frozen)
    assert sorted(report.rewritten[""]) == sorted(
        [
            "relu",
            "max_pool2d",
            "leaky_relu",
            "relu6",
            "hardtanh",
            "hardsigmoid",
            "relu_",
            "avg_pool2d",
            "adaptive_avg_pool2d",
        ]
    )
    assert report.rewritten["block"] == ["relu", "relu"]
    assert "modules with lean functional calls" in str(report)
    assert report.to_dict()["rewritten"]["block"] == ["relu", "relu"]
    out, grad = output_and_grad(frozen, x)
    assert rel_error(out, ref_out) <= 1e-12 and rel_error(grad, ref_grad) <= 1e-12
    # Paths, state_dict keys and repr names are those of the unconverted model.
    assert list(frozen.state_dict()) == list(advtune.tune(model, "deploy").state_dict())
    assert type(frozen.block).__name__ == "PreActBlock" and isinstance(frozen.block, PreActBlock)


def test_rewrite_saves_less_than_native_functional_calls():
    model = _calibrated(EveryCall())
    lean = advtune.tune(model, "frozen")
    native = advtune.tune(model, "deploy")
    freeze(native, functional=False)
    assert not freeze_report(native).rewritten
    saved_lean = saved_bytes_per_image(lean, size=16)
    saved_native = saved_bytes_per_image(native, size=16)
    # Native functional calls keep float32 activations; the lean ones bits and bytes.
    assert saved_lean < 0.2 * saved_native, (saved_lean, saved_native)


def test_inception_v3_saves_like_a_resnet_once_functional_calls_are_lean():
    base = build_model("inception_v3", size=96)
    saved = {
        mode: saved_bytes_per_image(advtune.tune(base, mode), size=96, batches=(1, 2))
        for mode in ("eval", "frozen")
    }
    report = freeze_report(advtune.tune(base, "frozen"))
    assert sum(names.count("relu") for names in report.rewritten.values()) == 94
    assert saved["frozen"] <= 0.05 * saved["eval"], saved


class StdConv2d(nn.Conv2d):
    """Weight-standardised conv (as in BiT ResNets): computes its weight, calls F.conv2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class FunctionalHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(6, 6, 3, 3) / 6)
        self.w2 = nn.Parameter(torch.randn(6, 6, 3) / 6)
        self.fc = nn.Parameter(torch.randn(4, 6) / 3)
        self.fc_bias = nn.Parameter(torch.randn(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.conv2d(x, self.w1, padding="same", dilation=2))
        x = F.conv1d(x.flatten(2), self.w2, stride=2, padding=1)  # (N, 6, L)
        return F.linear(x.mean(-1), self.fc, self.fc_bias)


def test_functional_convs_and_linears_save_only_weights_and_are_exact():
    torch.manual_seed(0)
    model = nn.Sequential(StdConv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), FunctionalHead())
    model = _calibrated(model).double()
    x = torch.rand(3, 3, 12, 12, dtype=torch.float64)
    ref_out, ref_grad = output_and_grad(model, x)
    frozen = advtune.tune(model, "frozen")
    report = freeze_report(frozen)
    assert report.rewritten["0"] == ["conv2d"]
    assert report.rewritten["2"] == ["conv2d", "relu", "conv1d", "linear"]
    out, grad = output_and_grad(frozen, x)
    assert rel_error(out, ref_out) <= 1e-12 and rel_error(grad, ref_grad) <= 1e-12
    native = advtune.tune(model, "deploy")
    freeze(native, functional=False)
    lean, kept = (saved_bytes_per_image(m.float(), size=12) for m in (frozen, native))
    assert lean < 0.25 * kept, (lean, kept)


@pytest.mark.filterwarnings("ignore:Using padding=.same.")
def test_functional_conv_falls_back_where_it_must():
    from advtune import lean

    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    w = torch.randn(4, 3, 2, 2)
    # Even kernel with "same": asymmetric padding, done natively (same result).
    torch.testing.assert_close(lean.conv2d(x, w, padding="same"), F.conv2d(x, w, padding="same"))
    # A weight that needs its gradient gets it: the native op runs.
    wg = w.clone().requires_grad_(True)
    lean.conv2d(x, wg).sum().backward()
    assert wg.grad is not None and x.grad is not None
    with pytest.raises(RuntimeError):  # torch's own error for a bad padding string
        lean.conv2d(x, w, padding="full")


class Branchy(nn.Module):
    """Takes a different branch for a tensor than for the fx proxy seen while tracing."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.Tensor):
            return F.relu(x)
        return F.relu(-x)


class BranchyInPlace(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.Tensor):
            return F.relu(x) + 1
        return F.relu_(x)


def test_a_rewrite_that_disagrees_is_dropped_with_a_warning():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), Branchy()).eval()
    frozen = advtune.tune(model, "frozen")
    assert "1" in freeze_report(frozen).rewritten
    x = torch.randn(2, 3, 4, 4)
    with pytest.warns(RuntimeWarning, match=r"'1' \(Branchy\) disagrees"):
        out, grad = output_and_grad(frozen, x)
    ref_out, ref_grad = output_and_grad(model, x)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(grad, ref_grad)
    # Later calls run the module's own forward, silently.
    out2, _ = output_and_grad(frozen, x)
    torch.testing.assert_close(out2, ref_out)


def test_a_disagreeing_in_place_rewrite_leaves_the_input_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), BranchyInPlace()).eval()
    frozen = advtune.tune(model, "frozen")
    x = torch.randn(2, 3, 4, 4)
    with pytest.warns(RuntimeWarning, match="disagrees"):
        out, grad = output_and_grad(frozen, x)
    ref_out, ref_grad = output_and_grad(model, x)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(grad, ref_grad)


def test_train_mode_runs_the_module_own_forward():
    frozen = advtune.tune(_calibrated(EveryCall()), "frozen")
    generated = frozen.block.__dict__["_advtune_forward"]
    calls = []

    def spy(*args, **kwargs):
        calls.append(frozen.training)
        return generated(*args, **kwargs)

    frozen.block.__dict__["_advtune_forward"] = spy
    x = torch.rand(2, 3, 16, 16)
    frozen(x)  # first call: checked against the own forward (which runs the block too)
    calls.clear()
    frozen.train()
    frozen(x)
    assert calls == []  # train mode: the own forward
    frozen.eval()
    frozen(x)
    assert calls == [False]


def test_rewrite_survives_deepcopy_and_pickle():
    model = _calibrated(EveryCall())
    frozen = advtune.tune(model, "frozen")
    x = torch.rand(2, 3, 16, 16)
    out, grad = output_and_grad(frozen, x)
    buf = io.BytesIO()
    torch.save(frozen, buf)
    buf.seek(0)
    for other in (copy.deepcopy(frozen), torch.load(buf, weights_only=False)):
        assert other.block.__dict__.get("_advtune_forward") is not None
        assert saved_bytes_per_image(other, size=16) == saved_bytes_per_image(frozen, size=16)
        out2, grad2 = output_and_grad(other, x)
        torch.testing.assert_close(out2, out, rtol=0, atol=0)
        torch.testing.assert_close(grad2, grad, rtol=0, atol=0)


def test_untraceable_module_keeps_its_code():
    class DataDependent(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.relu(x) if x.sum() > 0 else -x

    model = nn.Sequential(nn.Conv2d(3, 4, 1), DataDependent()).eval()
    frozen = advtune.tune(model, "frozen")
    assert "1" not in freeze_report(frozen).rewritten
    assert type(frozen[1]) is DataDependent
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(frozen(x), model(x))


@pytest.mark.parametrize("checked_before_compile", [True, False])
def test_compiled_rewrite_equals_eager(checked_before_compile):
    """torch.compile traces the generated forwards (aot_eager: no C++ build on CI)."""
    from advtune.runtime import prepare

    torch._dynamo.reset()
    model = _calibrated(EveryCall())
    eager = advtune.tune(model, "frozen")
    x = torch.rand(2, 3, 16, 16)
    if checked_before_compile:
        output_and_grad(eager, x)
    compiled = prepare(copy.deepcopy(eager), compile=True, compile_options={"backend": "aot_eager"})
    for _ in range(2):  # the second call runs the already checked forwards
        out, grad = output_and_grad(compiled, x)
        ref_out, ref_grad = output_and_grad(model, x)
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-5)


# Names the float64 tests above see rewritten: EveryCall's forward and FunctionalHead's.
_REWRITE_TESTED = {
    "relu", "max_pool2d", "leaky_relu", "relu6", "hardtanh", "hardsigmoid", "relu_",
    "avg_pool2d", "adaptive_avg_pool2d", "conv2d", "conv1d", "linear",
}  # fmt: skip


def test_every_rewritten_function_is_tested_exact():
    from advtune.frozen import _FUNCTIONS, _METHODS

    names = {f.__name__ for f in [*_FUNCTIONS.values(), *_METHODS.values()]}
    # conv3d, leaky_relu_ and hardtanh_ share their code path with conv1d/2d and the
    # out-of-place versions; they are checked directly here.
    direct = {"conv3d", "leaky_relu_", "hardtanh_"}
    assert names - _REWRITE_TESTED == direct, names - _REWRITE_TESTED
    from advtune import lean

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 6, 6, dtype=torch.float64, generator=gen)
    w = torch.randn(4, 3, 3, 3, 3, dtype=torch.float64, generator=gen)
    for fn, native, args in [
        (lean.conv3d, F.conv3d, (w, None, 2, 1)),
        (lean.leaky_relu_, F.leaky_relu_, (0.1,)),
        (lean.hardtanh_, F.hardtanh_, (-0.5, 0.5)),
    ]:
        results = []
        for f in (fn, native):
            xr = x.clone().requires_grad_(True)
            out = f(xr * 1.0, *args)
            results.append((out, torch.autograd.grad(out.sum(), xr)[0]))
        assert rel_error(results[0][0], results[1][0]) <= 1e-12
        assert rel_error(results[0][1], results[1][1]) <= 1e-12
