"""advtune.runtime: OOM back-off (simulated OOMs), batch-size search and its cache,
AMP / channels_last / compile options on CPU."""

from __future__ import annotations

import dataclasses
import json
import os
import time

import pytest
import torch
from modelzoo import calibrate_bn
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
    return calibrate_bn(model, (8, 3, 12, 12))


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


# --------------------------------------------------------------------------- padded chunks


def test_oom_backoff_pads_every_call_to_the_chunk_size():
    model = advtune.tune(_tiny_model(), "frozen")
    gen = torch.Generator().manual_seed(1)
    batch = {"x": torch.rand(7, 3, 12, 12, generator=gen), "seeds": torch.arange(7)}

    def attack(chunk):
        return _per_sample_attack({**chunk, "model": model})

    fake = _FakeOOM(attack, limit=2)
    result = run_with_oom_backoff(fake, batch, chunk_size=4, pad=True)
    # 4 fails; then every call has exactly 2 rows: [0,1] [2,3] [4,5] [6 + a copy of 6].
    assert fake.sizes == [4, 2, 2, 2, 2]
    assert result.oom_count == 1 and result.chunk_size == 2
    assert result.value.x_adv.shape[0] == 7 and result.value.success.shape == (7,)
    # Each row equals a call of the same shape (size 2) on that row alone plus padding.
    solo = attack({"x": batch["x"][[6, 6]], "seeds": batch["seeds"][[6, 6]]})
    assert torch.equal(result.value.x_adv[6], solo.x_adv[0])


def test_oom_backoff_halves_the_padded_size_not_the_short_tail():
    # A 1-image tail padded to 4 that runs out of memory: the next size is 2, not 0 or 1.
    sizes = iter([10, 3])  # the memory limit drops after the first call

    limit = {"now": next(sizes)}

    def fn(chunk):
        n = chunk.shape[0]
        if n > limit["now"]:
            raise torch.OutOfMemoryError("simulated")
        limit["now"] = next(sizes, limit["now"])
        return chunk * 2

    result = run_with_oom_backoff(fn, torch.arange(5.0), chunk_size=4, pad=True)
    assert torch.equal(result.value, torch.arange(5.0) * 2)
    assert result.chunk_size == 2 and result.oom_count == 1


def test_trim_results_recurses():
    value = _Result(torch.arange(5), torch.ones(5, dtype=torch.bool), model_calls=3)
    trimmed = runtime.trim_results({"r": value, "t": (torch.zeros(5, 2), torch.tensor(1.0))}, 2)
    assert torch.equal(trimmed["r"].x_adv, torch.arange(2)) and trimmed["r"].model_calls == 3
    assert trimmed["t"][0].shape == (2, 2) and trimmed["t"][1].dim() == 0


# --------------------------------------------------------------------------- auto batch size


class _Probe:
    """A probe step that 'runs out of memory' above ``fits`` images; counts its calls."""

    def __init__(self, fits):
        self.fits, self.calls = fits, []

    def __call__(self, model, x):
        self.calls.append(x.shape[0])
        if self.fits is not None and x.shape[0] > self.fits:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")


def test_auto_batch_size_probes_backs_off_and_caches_in_a_file(tmp_path):
    # The "meta" device stands in for a GPU: not a CPU, so auto_batch_size probes.
    model = nn.Linear(2, 2)
    cache = tmp_path / "sub" / "batch_size.json"
    key = {"model": "m", "convbn": "frozen", "image": 32}
    probe = _Probe(fits=37)
    kw = {"input_shape": (3, 4, 4), "device": "meta", "key": key, "cache_file": cache}
    assert auto_batch_size(model, step=probe, **kw) == int(37 * 0.9)
    assert max(probe.calls) > 37 and len(probe.calls) > 3
    doc = json.loads(cache.read_text())
    [entry] = doc["entries"].values()
    assert entry["batch_size"] == 33 and entry["max_fitting"] == 37 and entry["key"] == key
    assert cache.stat().st_mode & 0o777 == 0o666 & ~_umask()
    assert [p.name for p in cache.parent.iterdir()] == ["batch_size.json"]  # no temp files

    # Another process (the in-memory cache cleared) reads the file and does not probe.
    runtime.clear_batch_size_cache()
    again = _Probe(fits=None)
    assert auto_batch_size(model, step=again, **kw) == 33
    assert again.calls == []
    # ...and never answers above the limit.
    assert auto_batch_size(model, step=again, **{**kw, "limit": 5}) == 5
    # Another configuration probes again; both entries are kept.
    other = _Probe(fits=9)
    assert auto_batch_size(model, step=other, **{**kw, "key": {**key, "convbn": "eval"}}) == 8
    assert other.calls and len(json.loads(cache.read_text())["entries"]) == 2


def test_auto_batch_size_capped_by_the_limit(tmp_path):
    model = nn.Linear(2, 2)
    kw = {"input_shape": (3, 4, 4), "device": "meta", "key": "k", "cache_file": tmp_path / "c"}
    probe = _Probe(fits=None)
    assert auto_batch_size(model, step=probe, limit=20, **kw) == 20  # all of it fits
    assert max(probe.calls) == 20
    probe.calls.clear()
    assert auto_batch_size(model, step=probe, limit=12, **kw) == 12
    assert probe.calls == []  # known: 20 fits, so 12 does
    runtime.clear_batch_size_cache()
    assert auto_batch_size(model, step=probe, limit=50, **kw) == 50
    assert max(probe.calls) == 50  # 20 fitting says nothing about 50: probed again


def test_auto_batch_size_ignores_a_broken_cache_file(tmp_path, caplog):
    cache = tmp_path / "batch_size.json"
    cache.write_text("{not json")
    probe = _Probe(fits=10)
    kw = {"input_shape": (3, 4, 4), "device": "meta", "key": "k", "cache_file": cache}
    assert auto_batch_size(nn.Linear(2, 2), step=probe, **kw) == 9
    assert "unreadable batch-size cache" in caplog.text
    assert json.loads(cache.read_text())["format"] == "advtune-batch-size/1"


def test_default_batch_size_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert runtime.default_batch_size_cache() == tmp_path / "advtune" / "batch_size.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    expected = tmp_path / "home" / ".cache" / "advtune" / "batch_size.json"
    assert runtime.default_batch_size_cache() == expected


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_dataset_batch_size_takes_the_shape_from_the_transform_or_an_image(tmp_path):
    """--batch-size auto's one entry point: on a CPU the default, clamped to the images."""
    from types import SimpleNamespace

    from advtune.errors import UserError
    from advtune.run import AttackConfig
    from advtune.run.probe import dataset_batch_size

    config = AttackConfig(attack="fgsm", norm="linf", eps=(4 / 255,))
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 2))

    class Images(list):
        root = tmp_path

    images = Images([None, {"image": torch.zeros(3, 4, 4)}])
    cropped = SimpleNamespace(crop_size=4)
    assert dataset_batch_size(model, config, dataset=images, transform=cropped) == 2
    assert dataset_batch_size(model, config, dataset=images, transform=None) == 2
    with pytest.raises(UserError, match="no decodable image in"):
        dataset_batch_size(model, config, dataset=Images([None]), transform=None)


def test_registered_chunk_rules_join_and_trim_their_type():
    from advtune.runtime import concat_results, register_chunk_result, trim_results

    class Rows(list):
        pass

    register_chunk_result(Rows, join=lambda parts: Rows(r for p in parts for r in p),
                          trim=lambda rows, n: Rows(rows[:n]))  # fmt: skip
    assert concat_results([Rows([1, 2]), Rows([3])]) == [1, 2, 3]
    assert trim_results(Rows([1, 2, 3]), 2) == [1, 2]
    assert concat_results([[torch.ones(1)], [torch.zeros(1)]])[0].tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="registered already"):
        register_chunk_result(Rows, join=list, trim=lambda r, n: r)
