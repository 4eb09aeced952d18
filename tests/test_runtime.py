"""advtune.runtime: OOM back-off (simulated OOMs), batch-size search and its cache,
AMP / channels_last / compile options on CPU."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch
from torch import nn

import advtune
from advtune import runtime
from advtune.runtime import (
    AmpModel,
    auto_batch_size,
    find_max_batch,
    is_oom_error,
    prepare,
    run_with_oom_backoff,
)


@pytest.fixture(autouse=True)
def _clean_cache():
    runtime.clear_batch_size_cache()
    yield
    runtime.clear_batch_size_cache()


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU6(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )
    model.train()
    with torch.no_grad():
        model(torch.rand(8, 3, 12, 12))
    return model.eval()


@dataclasses.dataclass(frozen=True)
class _Result:
    x_adv: torch.Tensor
    success: torch.Tensor
    model_calls: int


def _per_sample_attack(chunk):
    """A deterministic per-sample 'attack': gradient sign step with per-sample seeded noise."""
    x, seeds = chunk["x"], chunk["seeds"]
    noise = torch.stack(
        [torch.rand(x.shape[1:], generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    )
    model = chunk["model"]
    xa = (x + 0.01 * noise).requires_grad_(True)
    (g,) = torch.autograd.grad(model(xa).logsumexp(1).sum(), xa)
    x_adv = (xa + 0.03 * g.sign()).detach()
    return _Result(x_adv, model(x_adv).argmax(1) != 0, model_calls=2)


class _FakeOOM:
    """Wraps fn; raises an OOM whenever a chunk is larger than ``limit``."""

    def __init__(self, fn, limit, exc=torch.OutOfMemoryError):
        self.fn, self.limit, self.exc, self.sizes = fn, limit, exc, []

    def __call__(self, chunk):
        n = chunk["x"].shape[0] if isinstance(chunk, dict) else chunk.shape[0]
        self.sizes.append(n)
        if n > self.limit:
            raise self.exc("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return self.fn(chunk)


@pytest.mark.parametrize(
    "exc",
    [torch.OutOfMemoryError, torch.cuda.OutOfMemoryError, RuntimeError],
    ids=["torch.OutOfMemoryError", "torch.cuda.OutOfMemoryError", "RuntimeError"],
)
def test_oom_backoff_halves_and_results_are_identical(exc):
    model = advtune.tune(_tiny_model(), "frozen")
    gen = torch.Generator().manual_seed(0)
    batch = {
        "x": torch.rand(11, 3, 12, 12, generator=gen),
        "seeds": torch.arange(100, 111),
        "model": model,  # non-tensor entries go to every chunk
    }
    direct = _per_sample_attack(batch)
    fake = _FakeOOM(_per_sample_attack, limit=3, exc=exc)
    result = run_with_oom_backoff(fake, batch)
    assert result.oom_count == 2  # 11 -> 5 -> 2
    assert result.chunk_size == 2
    assert fake.sizes[:3] == [11, 5, 2]
    assert torch.equal(result.value.x_adv, direct.x_adv)
    assert torch.equal(result.value.success, direct.success)
    assert result.value.model_calls == 2


def test_oom_backoff_with_tensor_batch_and_start_chunk():
    x = torch.arange(10.0)
    fake = _FakeOOM(lambda c: c * 2, limit=4)
    result = run_with_oom_backoff(fake, x, chunk_size=6)
    assert torch.equal(result.value, x * 2)
    assert result.chunk_size == 3 and result.oom_count == 1
    assert sum(fake.sizes) - 6 == 10  # the failed chunk was redone, nothing else


def test_oom_backoff_gives_up_at_min_chunk_and_passes_other_errors():
    with pytest.raises(torch.OutOfMemoryError):
        run_with_oom_backoff(_FakeOOM(lambda c: c, limit=0), torch.zeros(4))
    with pytest.raises(torch.OutOfMemoryError):
        run_with_oom_backoff(_FakeOOM(lambda c: c, limit=1), torch.zeros(8), min_chunk_size=4)

    def bad(chunk):
        raise ValueError("not an OOM")

    with pytest.raises(ValueError, match="not an OOM"):
        run_with_oom_backoff(bad, torch.zeros(4))
    with pytest.raises(ValueError, match="chunk_size"):
        run_with_oom_backoff(bad, torch.zeros(4), chunk_size=0)


def test_is_oom_error():
    assert is_oom_error(torch.OutOfMemoryError("x"))
    assert is_oom_error(RuntimeError("CUDA out of memory. Tried to allocate"))
    assert not is_oom_error(RuntimeError("shape mismatch"))
    assert not is_oom_error(ValueError("out of memory"))


def test_find_max_batch_bisects_and_caches():
    calls = []

    def probe(b):
        calls.append(b)
        if b > 37:
            raise torch.OutOfMemoryError("simulated")

    assert find_max_batch(probe, start=8, tolerance=0, key=("m", "frozen", 224)) == 37
    n = len(calls)
    assert find_max_batch(probe, start=8, tolerance=0, key=("m", "frozen", 224)) == 37
    assert len(calls) == n  # cached: not probed again
    assert find_max_batch(probe, start=100, tolerance=0) == 37  # backs off from a large start
    assert find_max_batch(lambda b: None, start=8, limit=50) == 50


def test_find_max_batch_errors():
    def always_oom(b):
        raise torch.OutOfMemoryError("simulated")

    with pytest.raises(RuntimeError, match="batch size 1"):
        find_max_batch(always_oom)

    def broken(b):
        raise TypeError("bug in the probe")

    with pytest.raises(TypeError, match="bug"):
        find_max_batch(broken)


def test_auto_batch_size_on_cpu_does_not_probe():
    model = _tiny_model()
    assert auto_batch_size(model, cpu_batch_size=17) == 17


def test_prepare_amp_bf16_and_channels_last_on_cpu():
    base = _tiny_model()
    x = torch.rand(4, 3, 12, 12)
    ref = base(x)
    for mode in ("tune", "frozen"):
        model = prepare(advtune.tune(base, mode), channels_last=True, amp="bf16")
        assert isinstance(model, AmpModel)
        xi = x.clone().requires_grad_(True)
        logits = model(xi)
        assert logits.dtype == torch.float32  # logits (and so the loss) in float32
        torch.testing.assert_close(logits, ref, rtol=0.05, atol=0.05)
        loss = nn.functional.cross_entropy(logits, torch.zeros(4, dtype=torch.long))
        assert loss.dtype == torch.float32
        (g,) = torch.autograd.grad(loss, xi)
        assert g.dtype == torch.float32 and torch.isfinite(g).all() and g.abs().sum() > 0
    with pytest.raises(ValueError, match="amp must be"):
        prepare(base, amp="fp8")
    assert prepare(base) is base


def test_autocast_helper():
    with runtime.autocast("cpu", "bf16"):
        assert torch.nn.functional.linear(torch.rand(2, 3), torch.rand(4, 3)).dtype == (
            torch.bfloat16
        )
    with runtime.autocast("cpu", None):
        assert torch.nn.functional.linear(torch.rand(2, 3), torch.rand(4, 3)).dtype == (
            torch.float32
        )


@pytest.mark.parametrize("mode", ["tune", "frozen"])
def test_compile_keeps_folding_exact(mode):
    """torch.compile over a folded model (aot_eager backend: no C++ build on CI)."""
    torch._dynamo.reset()
    base = _tiny_model()
    eager = advtune.tune(base, mode)
    compiled = prepare(eager, compile=True, compile_options={"backend": "aot_eager"})
    x = torch.rand(2, 3, 12, 12)
    outs = []
    for m in (eager, compiled):
        xi = x.clone().requires_grad_(True)
        out = m(xi)
        (g,) = torch.autograd.grad(out.square().sum(), xi)
        outs.append((out, g))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(outs[0][0], base(x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["tune", "deploy", "frozen"])
def test_compile_inductor_cpu(mode):
    torch._dynamo.reset()
    base = _tiny_model()
    compiled = prepare(advtune.tune(base, mode), compile=True)
    x = torch.rand(2, 3, 12, 12, requires_grad=True)
    start = time.perf_counter()
    out = compiled(x)
    (g,) = torch.autograd.grad(out.sum(), x)
    assert time.perf_counter() - start < 600
    xr = x.detach().clone().requires_grad_(True)
    ref = base(xr)
    (gr,) = torch.autograd.grad(ref.sum(), xr)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, gr, rtol=1e-5, atol=1e-5)
