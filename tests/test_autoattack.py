"""The AutoAttack ensemble (``autoattack``) and the gradient-masking checks.

FAB-T and Square are separate registered attacks (``fab``, ``square``); where they are
not registered, small stand-ins are registered for the duration of a test (and removed
after it), so the ensemble's plumbing — order, budgets, per-sample worst case — is
tested either way. The slow tests compare robust accuracy with the official AutoAttack
(``pyautoattack``) on the digits CNN, 200 images, at the same budget.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from fakes import linear_classifier, load_script
from torch import nn

import advtune
from advtune import attacks
from advtune.attacks import _masking, _registry
from advtune.attacks.autoattack import EnsembleResult, MissingComponentWarning

F64 = torch.float64
K = 10


@pytest.fixture(scope="module")
def tiny():
    net = linear_classifier(classes=K).double()  # 8×8 RGB, 10 classes
    x = torch.rand(12, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=F64)
    with torch.no_grad():
        y = net(x).argmax(1)
    return net, x, y, torch.arange(12)


# --------------------------------------------------------------------------- stand-ins

CALLS: list[tuple[str, int, dict]] = []


def _fab_standin(
    model, x, y, *, eps, norm="linf", steps=100, n_targets=9, restarts=1,
    target=None, generator=None, seeds=None,
):  # fmt: skip
    """Stand-in for FAB-T: PGD on the margin loss, recording its call."""
    CALLS.append(
        ("fab", x.shape[0], {"steps": steps, "n_targets": n_targets, "restarts": restarts})
    )
    return attacks.pgd(
        model, x, y, eps=eps, norm=norm, steps=steps, loss="margin", target=target, seeds=seeds
    )


def _square_standin(
    model, x, y, *, eps, norm="linf", queries=5000, p_init=0.8,
    target=None, generator=None, seeds=None,
):  # fmt: skip
    """Stand-in for Square: min(queries, 20) PGD steps, recording its call."""
    CALLS.append(("square", x.shape[0], {"queries": queries, "p_init": p_init}))
    return attacks.pgd(
        model, x, y, eps=eps, norm=norm, steps=min(queries, 20), target=target, seeds=seeds
    )


@pytest.fixture
def standins():
    """Register the stand-ins for ``fab``/``square`` when those are not registered."""
    table = getattr(_registry, "_ATTACKS", None)
    if table is None:
        pytest.skip("the registry has no table to add test stand-ins to")
    added = []
    for name, fn in (("fab", _fab_standin), ("square", _square_standin)):
        if name not in attacks.names():
            attacks.register(name, randomized=True)(fn)
            added.append(name)
    CALLS.clear()
    yield added
    for name in added:
        table.pop(name, None)
    CALLS.clear()


# --------------------------------------------------------------------------- the ensemble


def _consistent(res: EnsembleResult, x, y, target=None):
    assert isinstance(res, EnsembleResult) and isinstance(res, attacks.AttackResult)
    assert res.broken_by.dtype == torch.int64 and res.broken_by.shape == y.shape
    assert torch.equal(res.success, res.broken_by != EnsembleResult.ROBUST)
    pred = res.logits.argmax(1)
    assert torch.equal(res.success, pred != y if target is None else pred == target)
    robust = res.broken_by == EnsembleResult.ROBUST
    assert torch.equal(res.x_adv[robust], x[robust])  # robust samples keep the clean image
    after = list(res.robust_after().values())
    assert after == sorted(after, reverse=True)
    assert after[-1] == pytest.approx(float(robust.float().mean()))
    assert len(after) == len(res.components) + 1 == len(res.component_calls) + 1


def test_standard_version_order_budgets_and_worst_case(tiny, standins):
    net, x, y, seeds = tiny
    res = attacks.autoattack(net, x, y, eps=6 / 255, steps=3, n_targets=2, queries=7, seeds=seeds)
    assert res.components == ("apgd-ce", "apgd-t", "fab-t", "square")
    _consistent(res, x, y)
    assert res.model_calls >= sum(res.component_calls) + 3  # clean, repeat, gradient check
    assert res.checks["randomized"]["ok"] and res.checks["gradients"]["ok"]
    if standins == ["fab", "square"]:
        robust = res.robust_after()
        assert [c[0] for c in CALLS] == ["fab", "square"]
        (_, n_fab, kw_fab), (_, n_sq, kw_sq) = CALLS
        # Each attack sees exactly the samples still robust after the ones before.
        assert n_fab == round(robust["apgd-t"] * len(y)) and n_sq == round(robust["fab-t"] * len(y))
        assert kw_fab == {"steps": 3, "n_targets": 2, "restarts": 1}
        assert kw_sq == {"queries": 7, "p_init": 0.8}


def test_official_budgets_by_default(tiny, standins):
    if standins != ["fab", "square"]:
        pytest.skip("real fab/square registered: their budgets are theirs to test")
    net, x, y, seeds = tiny
    # Official components get the official budgets (APGD's 100 steps are left out here).
    res = attacks.autoattack(net, x, y, eps=0.2 / 255, attacks=["fab-t", "square"], seeds=seeds)
    assert [c[2] for c in CALLS] == [
        {"steps": 100, "n_targets": 9, "restarts": 1},
        {"queries": 5000, "p_init": 0.8},
    ]
    assert bool((res.broken_by == EnsembleResult.ROBUST).any())


def test_components_equal_standalone_attacks_on_the_samples_they_see(digits):
    model, x, y = digits
    m64 = copy.deepcopy(model).double()
    xs, ys, seeds = x[:24].double(), y[:24], torch.arange(24)
    eps, steps = 1.5 / 255, 6
    res = attacks.autoattack(m64, xs, ys, eps=eps, attacks=["apgd-ce", "apgd-t"], steps=steps,
                             n_targets=3, seeds=seeds)  # fmt: skip
    _consistent(res, xs, ys)
    todo = (res.broken_by != EnsembleResult.CLEAN).nonzero().flatten()
    ce = attacks.apgd(m64, xs[todo], ys[todo], eps=eps, steps=steps, seeds=seeds[todo])
    assert torch.equal(res.broken_by[todo] == 0, ce.success)
    rest = todo[~ce.success]
    t = attacks.apgd_t(
        m64, xs[rest], ys[rest], eps=eps, steps=steps, n_targets=3, seeds=seeds[rest]
    )
    assert torch.equal(res.broken_by[rest] == 1, t.success)
    assert torch.equal(res.x_adv[rest[t.success]], t.x_adv[t.success])
    # The ensemble is at least as strong as each component alone.
    assert int(res.success.sum()) >= int(ce.success.sum())


def test_clean_misclassified_samples_are_not_attacked(tiny):
    net, x, y, seeds = tiny
    wrong = y.clone()
    wrong[:3] = (y[:3] + 1) % K
    res = attacks.autoattack(net, x, wrong, eps=2 / 255, attacks=["apgd-ce"], steps=2, seeds=seeds)
    assert bool((res.broken_by[:3] == EnsembleResult.CLEAN).all())
    assert torch.equal(res.x_adv[:3], x[:3]) and bool(res.success[:3].all())
    assert res.robust_after()["clean"] == pytest.approx(9 / 12)
    _consistent(res, x, wrong)


def test_targeted_call(digits):
    model, x, y = digits
    xs, ys, seeds = x[:16], y[:16], torch.arange(16)
    target = (ys + 3) % K
    res = attacks.autoattack(model, xs, ys, eps=8 / 255, attacks=["apgd-ce", "apgd-t"], steps=5,
                             target=target, seeds=seeds)  # fmt: skip
    _consistent(res, xs, ys, target)
    assert bool(res.success.any())


def test_custom_list_entries_and_errors(tiny):
    net, x, y, seeds = tiny
    res = attacks.autoattack(
        net, x, y, eps=4 / 255, attacks=["fgsm", ("apgd", {"loss": "dlr", "steps": 3})], seeds=seeds
    )
    assert res.components == ("fgsm", "apgd")
    _consistent(res, x, y)
    with pytest.raises(ValueError, match="unknown attack 'apgdd'"):
        attacks.autoattack(net, x, y, eps=0.1, attacks=["apgdd"])
    with pytest.raises(ValueError, match='needs version="custom"'):
        attacks.autoattack(net, x, y, eps=0.1, version="rand", attacks=["apgd-ce"])
    with pytest.raises(ValueError, match="non-empty list"):
        attacks.autoattack(net, x, y, eps=0.1, attacks=[])
    with pytest.raises(ValueError, match="cannot contain 'autoattack'"):
        attacks.autoattack(net, x, y, eps=0.1, attacks=["autoattack"])
    with pytest.raises(ValueError, match="version must be one of"):
        attacks.autoattack(net, x, y, eps=0.1, version="bogus")
    with pytest.raises(ValueError, match="queries must be >= 1, got 0"):
        attacks.autoattack(net, x, y, eps=0.1, queries=0)


def test_missing_components_warn_and_are_recorded(tiny):
    if {"fab", "square"} <= set(attacks.names()):
        pytest.skip("fab and square are registered")
    net, x, y, seeds = tiny
    with pytest.warns(MissingComponentWarning, match="not registered"):
        res = attacks.autoattack(net, x, y, eps=1 / 255, steps=2, n_targets=2, seeds=seeds)
    assert set(res.checks["skipped"]) == {"fab-t", "square"} - {
        c for c in ("fab-t", "square") if c in res.components
    }


@pytest.mark.parametrize("mode", ["tune", "deploy", "frozen"])
def test_convbn_modes_give_the_same_decisions(digits, mode):
    model, x, y = digits
    m64 = copy.deepcopy(model).double()
    xs, ys, seeds = x[:16].double(), y[:16], torch.arange(16)
    xc, yc = xs.clone(), ys.clone()
    kw = {"eps": 2 / 255, "attacks": ["apgd-ce", "apgd-t"], "steps": 4, "n_targets": 2}
    ref = attacks.autoattack(m64, xs, ys, seeds=seeds, **kw)
    res = attacks.autoattack(advtune.tune(m64, mode), xs, ys, seeds=seeds, **kw)
    assert torch.equal(res.broken_by, ref.broken_by)
    assert float((res.x_adv - ref.x_adv).abs().max()) <= 1e-6
    assert torch.equal(xs, xc) and torch.equal(ys, yc)


# --------------------------------------------------------------------------- masking checks


class _Noisy(nn.Module):
    """A randomised defence: noise from its own generator is added to the input."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.gen = torch.Generator().manual_seed(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(x.shape, generator=self.gen, dtype=x.dtype) * 0.05
        return self.net((x + noise).clamp(0, 1))


def test_randomized_model_is_flagged_and_rand_version_uses_eot(tiny):
    net, x, y, seeds = tiny
    noisy = _Noisy(net)
    with pytest.warns(_masking.RandomizedModelWarning, match='version="rand"'):
        res = attacks.autoattack(
            noisy, x, y, eps=2 / 255, attacks=["apgd-ce"], steps=2, seeds=seeds
        )
    assert not res.checks["randomized"]["ok"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", _masking.RandomizedModelWarning)
        rand = attacks.autoattack(noisy, x, y, eps=2 / 255, version="rand", steps=2, seeds=seeds)
    assert rand.components == ("apgd-ce", "apgd-dlr") and "randomized" not in rand.checks
    # 20 EOT gradients per step: each APGD run costs 20 × (steps + 1) calls at least.
    assert rand.component_calls[0] >= 20 * 3


def test_zero_gradients_are_flagged():
    class Flat(nn.Module):
        def forward(self, x):
            return torch.arange(K, dtype=x.dtype).expand(x.shape[0], -1) + 0 * x.sum()

    x = torch.rand(4, 3, 8, 8, dtype=F64)
    y = torch.full((4,), K - 1)
    with pytest.warns(_masking.ZeroGradientWarning, match="4 of 4 samples"):
        res = attacks.autoattack(Flat(), x, y, eps=0.1, attacks=["apgd-ce"], steps=2)
    assert res.checks["gradients"] == {
        "check": "gradients", "samples": 4, "zero": 4, "nonfinite": 0, "ok": False,
    }  # fmt: skip


def test_black_box_beating_white_box_is_flagged(tiny, standins):
    if "square" not in standins:
        pytest.skip("the real square attack is registered")
    net, x, y, seeds = tiny
    with pytest.warns(_masking.BlackBoxWinsWarning, match="square"):
        res = attacks.autoattack(net, x, y, eps=8 / 255, attacks=["fgsm", "square"], seeds=seeds)
    assert not res.checks["black_box"]["ok"]
    assert res.checks["black_box"]["broken_by_black_box"]["square"] > 0


def test_check_black_box_threshold():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ok = _masking.check_black_box({"apgd-ce": 5, "square": 0}, black_box={"square"}, samples=10)
    assert ok["ok"] and ok["broken_by_black_box"] == {"square": 0}
    with pytest.warns(_masking.BlackBoxWinsWarning):
        bad = _masking.check_black_box({"square": 1}, black_box={"square"}, samples=10)
    assert not bad["ok"]


def test_check_monotone():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ok = _masking.check_monotone([(1 / 255, 0.8), (4 / 255, 0.2), (2 / 255, 0.5)])
    assert ok == {"check": "monotone", "what": "eps", "violations": [], "ok": True}
    with pytest.warns(_masking.NonMonotoneWarning, match="grows with steps"):
        bad = _masking.check_monotone({10: 0.5, 20: 0.52, 50: 0.4}, what="steps")
    assert bad["violations"] == [{"from": 10, "to": 20, "accuracy_from": 0.5, "accuracy_to": 0.52}]
    assert _masking.check_monotone({10: 0.5, 20: 0.52}, what="steps", tol=0.05)["ok"]
    with pytest.raises(ValueError, match="must appear once"):
        _masking.check_monotone([(1, 0.5), (1, 0.4)])
    with pytest.raises(ValueError, match="finite"):
        _masking.check_monotone([(1, float("nan"))])


def test_check_randomized_scale_free():
    z = torch.randn(5, 7, dtype=F64)
    assert _masking.check_randomized(z, z.clone())["ok"]
    with pytest.warns(_masking.RandomizedModelWarning):
        assert not _masking.check_randomized(z, z + 0.1)["ok"]


# --------------------------------------------------------------------------- the reference


def _official_autoattack(model, eps, norm, components, n_targets=9):
    try:
        from pyautoattack import AutoAttack
    except ImportError:
        try:
            from autoattack import AutoAttack
        except ImportError:
            pytest.skip("the official AutoAttack (pyautoattack) is not installed")
    aa = AutoAttack(model, attacks=list(components), device="cpu", eps=eps, seed=0,
                    norm={"linf": "Linf", "l2": "L2"}[norm], version="custom")  # fmt: skip
    aa.apgd.n_restarts = 1  # the standard version's budget (its custom default is 5)
    aa.apgd_targeted.n_target_classes = n_targets
    aa.fab.n_restarts, aa.fab.n_target_classes = 1, n_targets
    aa.square.n_queries = 5000
    return aa


@pytest.mark.slow
@pytest.mark.parametrize(("norm", "eps"), [("linf", 2 / 255), ("l2", 0.3)])
def test_ensemble_not_weaker_than_official(digits, norm, eps, one_thread):
    """APGD-CE → APGD-T (100 steps, 9 targets), 200 images: ≤ official + 1 point."""
    model, x, y = digits
    comps = ["apgd-ce", "apgd-t"]
    aa = _official_autoattack(model, eps, norm, comps)
    x_ref, _ = aa.run_standard_evaluation(x, y, batch_size=200)
    with torch.no_grad():
        acc_ref = float((model(x_ref).argmax(1) == y).float().mean())
    res = attacks.autoattack(
        model, x, y, eps=eps, norm=norm, attacks=comps, seeds=torch.arange(200)
    )
    acc = 1 - float(res.success.float().mean())
    print(
        f"ensemble {'+'.join(comps)} {norm} eps={eps:.4f}: advtune {acc:.3f} official {acc_ref:.3f}"
    )
    print("advtune robust after:", res.robust_after())
    assert acc <= acc_ref + 0.01


@pytest.mark.slow
def test_standard_ensemble_not_weaker_than_official(digits, one_thread):
    """The full standard version, once ``fab`` and ``square`` are registered."""
    if not {"fab", "square"} <= set(attacks.names()):
        pytest.skip("fab/square not registered in this build")
    model, x, y = digits
    eps = 2 / 255
    aa = _official_autoattack(model, eps, "linf", ["apgd-ce", "apgd-t", "fab-t", "square"])
    x_ref, _ = aa.run_standard_evaluation(x, y, batch_size=200)
    with torch.no_grad():
        acc_ref = float((model(x_ref).argmax(1) == y).float().mean())
    res = attacks.autoattack(model, x, y, eps=eps, seeds=torch.arange(200))
    acc = 1 - float(res.success.float().mean())
    print(f"standard linf eps={eps:.4f}: advtune {acc:.3f} official {acc_ref:.3f}")
    assert acc <= acc_ref + 0.01


@pytest.mark.slow
def test_bench_worker_measures_both_implementations():
    """The benchmark's worker on a tiny budget: both sides run the same components."""
    pytest.importorskip("pyautoattack")
    bench = load_script("bench_autoattack")
    out = {}
    for impl in bench.IMPLS:
        args = bench.argparse.Namespace(
            model="resnet18", size=16, n=2, eps=0.1 / 255, norm="linf", steps=1,
            n_targets=1, queries=2, threads=1, worker=impl,
        )  # fmt: skip
        out[impl] = bench.worker(args)
    assert out["advtune"]["components"] == out["official"]["components"]
    for r in out.values():
        assert r["wall_s"] > 0 and r["peak_mib"] >= 0 and 0 <= r["robust_accuracy"] <= 1


# --------------------------------------------------------------------------- L1


def test_l1_version_runs_all_four_components_with_the_official_settings(tiny, monkeypatch):
    net, x, y, _ = tiny
    calls = []
    real = {name: attacks.get(name) for name in ("apgd", "apgd_t", "fab", "square")}
    keys = ("restarts", "n_targets", "large_eps", "steps", "queries")

    def spy(name):
        def run(*args, **kwargs):
            calls.append((name, {k: kwargs[k] for k in keys if k in kwargs}))
            return real[name](*args, **kwargs)

        return run

    for name in real:
        monkeypatch.setitem(_registry._ATTACKS, name, (spy(name), attacks.spec(name)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", MissingComponentWarning)  # nothing is skipped now
        res = attacks.autoattack(net, x, y, eps=0.5, norm="l1", steps=3, queries=5,
                                 seeds=torch.arange(len(y)))  # fmt: skip
    assert res.components == ("apgd-ce", "apgd-t", "fab-t", "square")
    assert "skipped" not in res.checks
    expected = {
        "apgd": {"restarts": 5, "large_eps": True, "steps": 3},
        "apgd_t": {"restarts": 1, "n_targets": 5, "large_eps": True, "steps": 3},
        "fab": {"restarts": 1, "n_targets": 9, "steps": 3},
        "square": {"queries": 5},
    }
    assert calls and calls[0][0] == "apgd"
    for name, kw in calls:  # later components run only while samples stay robust
        assert kw == expected[name], name
    assert bool(attacks.L1(0.5).contains(res.x_adv, x).all())
    # FAB-T and Square run on L1 samples on their own too (a custom list).
    custom = attacks.autoattack(net, x, y, eps=0.5, norm="l1", attacks=["fab-t", "square"],
                                steps=3, queries=5, seeds=torch.arange(len(y)))  # fmt: skip
    assert custom.components == ("fab-t", "square")
    assert bool(attacks.L1(0.5).contains(custom.x_adv, x).all())
    with pytest.raises(ValueError, match="attack 'fgsm' has no L1 version"):
        attacks.autoattack(net, x, y, eps=2.0, norm="l1", attacks=["fgsm"])


@pytest.mark.slow
def test_l1_ensemble_never_weaker_than_official(digits, one_thread):
    """autoattack(norm="l1") against the official L1 standard version (both run APGD-CE,
    APGD-T, FAB-T and Square), 100 images, eps 3: advtune at most 0.5 points above."""
    try:
        from pyautoattack import AutoAttack
    except ImportError:
        pytest.skip("the official AutoAttack (pyautoattack) is not installed")
    model, x, y = digits
    xs, ys = x[:100], y[:100]
    ours = attacks.autoattack(model, xs, ys, eps=3.0, norm="l1", seeds=torch.arange(100))
    assert ours.components == ("apgd-ce", "apgd-t", "fab-t", "square")
    ref = AutoAttack(model, norm="L1", eps=3.0, version="standard", seed=0, device="cpu")
    with torch.no_grad():
        adv = ref.run_standard_evaluation(xs, ys, batch_size=100)
        adv = adv[0] if isinstance(adv, tuple) else adv
        acc_ref = float((model(adv).argmax(1) == ys).float().mean())
    acc = 1 - float(ours.success.float().mean())
    print(f"autoattack L1 eps=3: advtune {acc:.3f} official {acc_ref:.3f}")
    assert acc <= acc_ref + 0.005
