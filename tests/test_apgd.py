"""Auto-PGD (``apgd``) and targeted APGD (``apgd_t``).

The contract (shapes, bounds, hygiene, randomness, ConvBN modes on a tiny net) is tested
for every registered attack in ``test_attacks_contract.py``. Here: the paper's step-size
schedule, the DLR losses, closed-form answers on linear models, masking warnings, AMP, EOT,
and the digits CNN (``tests/digits.py``) — against the official AutoAttack code
(``pyautoattack``) in the slow tests, at the same budget on the 200 held-out images.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import advtune
from advtune import attacks
from advtune.attacks import _masking
from advtune.attacks.apgd import checkpoints, dlr_loss

F64 = torch.float64


def official():
    """The reference APGD classes (the ``pyautoattack`` distribution), or skip."""
    for name in ("pyautoattack.autopgd_base", "autoattack.autopgd_base"):
        try:
            module = __import__(name, fromlist=["APGDAttack"])
        except ImportError:
            continue
        return module.APGDAttack, module.APGDAttack_targeted
    pytest.skip("the official AutoAttack (pyautoattack) is not installed")


# --------------------------------------------------------------------------- schedule, losses


def test_checkpoints_follow_the_paper():
    # p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06); w_j = ⌈p_j N⌉.
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert checkpoints(1000) == [220, 410, 570, 700, 800, 870, 930, 990]
    for n in (1, 2, 5, 10, 37, 250):
        w = checkpoints(n)
        assert w == sorted(set(w)) and w[0] >= 1 and w[-1] <= n


def test_dlr_loss_values_and_invariance():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(20, 7, generator=gen, dtype=F64)
    y = z.argmax(1)
    t = (y + 1 + torch.arange(20) % 6) % 7
    for target in (None, t):
        loss = dlr_loss(z, y, target)
        # Invariant to shifting and positively rescaling the logits.
        torch.testing.assert_close(dlr_loss(3.0 * z + 5.0, y, target), loss)
        srt = z.sort(dim=1, descending=True).values
        zy = z.gather(1, y[:, None])[:, 0]
        if target is None:
            other = z.scatter(1, y[:, None], float("-inf")).amax(1)
            expected = -(zy - other) / (srt[:, 0] - srt[:, 2] + 1e-12)
        else:
            # While the prediction is y, the numerator is the paper's z_y − z_t.
            zt = z.gather(1, t[:, None])[:, 0]
            expected = -(zy - zt) / (srt[:, 0] - 0.5 * (srt[:, 2] + srt[:, 3]) + 1e-12)
        torch.testing.assert_close(loss, expected)
        assert bool((loss <= 0).all())  # correctly classified: not yet a success
    with pytest.raises(ValueError, match="DLR loss needs at least 3 classes, got 2"):
        dlr_loss(z[:, :2], torch.zeros(20, dtype=torch.long), None)
    with pytest.raises(ValueError, match="targeted DLR loss needs at least 4 classes, got 3"):
        dlr_loss(z[:, :3], torch.zeros(20, dtype=torch.long), torch.ones(20, dtype=torch.long))


def test_dlr_loss_is_float32_under_half_logits():
    z = torch.randn(4, 5).to(torch.bfloat16)
    assert dlr_loss(z, z.argmax(1), None).dtype == torch.float32


# --------------------------------------------------------------------------- closed form


def _linear(d: int = 16):
    """4 classes, two far below: the boundary of class 0 vs 1 is a known hyperplane."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(4, d, generator=gen, dtype=F64)
    x = (0.4 + 0.2 * torch.rand(6, 1, 4, 4, generator=gen, dtype=F64)).flatten(1)
    w = weight[1] - weight[0]
    c = -(x @ w).mean()  # boundary through the middle of the points
    lin = nn.Linear(d, 4).to(F64)
    with torch.no_grad():
        lin.weight.copy_(weight)
        lin.bias.copy_(torch.tensor([0.0, float(c), -1e3, -1e3], dtype=F64))
    model = nn.Sequential(nn.Flatten(), lin).eval()
    margin = x @ w + c
    keep = margin.abs() > 0.05
    x, margin = x[keep].reshape(-1, 1, 4, 4), margin[keep]
    return model, x, (margin > 0).long(), w, margin


@pytest.mark.parametrize("loss", ["ce", "dlr"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_succeeds_just_above_the_minimal_distance(norm, loss):
    model, x, y, w, margin = _linear()
    dist = margin.abs() / (w.abs().sum() if norm == "linf" else w.norm())
    seeds = torch.arange(len(y))
    for i in range(len(y)):
        xi, yi = x[i : i + 1], y[i : i + 1]
        assert float(xi.min() - dist[i]) > 0 and float(xi.max() + dist[i]) < 1  # box free
        kw = {"norm": norm, "loss": loss, "steps": 100, "seeds": seeds[i : i + 1]}
        above = attacks.apgd(model, xi, yi, eps=float(dist[i]) * 1.001, **kw)
        below = attacks.apgd(model, xi, yi, eps=float(dist[i]) * 0.999, **kw)
        assert bool(above.success.all()) and not bool(below.success.any()), (i, norm, loss)


def test_apgd_t_on_linear_model_uses_the_given_target():
    model, x, y, _, _ = _linear()
    target = torch.full_like(y, 2)  # far below: unreachable at a small eps
    res = attacks.apgd_t(model, x, y, eps=0.05, target=target, steps=10, seeds=torch.arange(len(y)))
    assert not bool(res.success.any())
    assert torch.equal(res.success, res.logits.argmax(1) == target)


# --------------------------------------------------------------------------- digits CNN


def test_apgd_breaks_more_than_pgd_at_equal_steps(digits):
    model, x, y = digits
    xs, ys, seeds = x[:64], y[:64], torch.arange(64)
    eps = 1.5 / 255
    a = attacks.apgd(model, xs, ys, eps=eps, steps=10, seeds=seeds)
    p = attacks.pgd(model, xs, ys, eps=eps, steps=10, seeds=seeds)
    assert int(a.success.sum()) >= int(p.success.sum())
    assert float(a.linf.max()) <= eps + 1e-6
    assert a.model_calls <= 11  # a gradient call per step plus the start, broken ones stop


def test_apgd_t_tries_targets_until_broken(digits):
    model, x, y = digits
    xs, ys, seeds = x[:48], y[:48], torch.arange(48)
    one = attacks.apgd_t(model, xs, ys, eps=1.5 / 255, steps=10, n_targets=1, seeds=seeds)
    three = attacks.apgd_t(model, xs, ys, eps=1.5 / 255, steps=10, n_targets=3, seeds=seeds)
    # The first target's runs are the same; more targets can only add successes.
    assert bool((three.success | ~one.success).all())
    assert torch.equal(three.x_adv[one.success], one.x_adv[one.success])
    assert three.model_calls > one.model_calls


def test_batch_composition_invariance_with_seeds(digits):
    model, x, y = digits
    m64 = copy.deepcopy(model).double()
    xs, ys, seeds = x[:24].double(), y[:24], torch.arange(1000, 1024)
    for name, kw in (("apgd", {"loss": "dlr"}), ("apgd_t", {"n_targets": 2})):
        fn = attacks.get(name)
        full = fn(m64, xs, ys, eps=2 / 255, steps=8, seeds=seeds, **kw)
        perm = torch.randperm(24, generator=torch.Generator().manual_seed(0))
        part = fn(
            m64, xs[perm[:7]], ys[perm[:7]], eps=2 / 255, steps=8, seeds=seeds[perm[:7]], **kw
        )
        torch.testing.assert_close(part.x_adv, full.x_adv[perm[:7]], rtol=0, atol=1e-9)
        assert torch.equal(part.success, full.success[perm[:7]])


@pytest.mark.parametrize("name", ["apgd", "apgd_t"])
def test_convbn_modes_give_the_same_decisions(digits, name):
    model, x, y = digits
    m64 = copy.deepcopy(model).double()
    xs, ys, seeds = x[:16].double(), y[:16], torch.arange(16)
    xc = xs.clone()
    kw = {"eps": 2 / 255, "steps": 6, "seeds": seeds}
    if name == "apgd_t":
        kw["n_targets"] = 2
    ref = attacks.get(name)(m64, xs, ys, **kw)
    for mode in ("tune", "deploy", "frozen"):
        res = attacks.get(name)(advtune.tune(m64, mode), xs, ys, **kw)
        assert torch.equal(res.success, ref.success), mode
        assert float((res.x_adv - ref.x_adv).abs().max()) <= 1e-6, mode
    assert torch.equal(xs, xc)  # inputs untouched


def test_amp_autocast_keeps_float32_losses(digits):
    model, x, y = digits
    xs, ys = x[:16], y[:16]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        res = attacks.apgd(model, xs, ys, eps=2 / 255, steps=5, loss="dlr", seeds=torch.arange(16))
    assert res.x_adv.dtype == torch.float32 and float(res.linf.max()) <= 2 / 255 + 1e-6
    assert bool(torch.isfinite(res.x_adv).all())
    assert torch.equal(res.success, res.logits.argmax(1) != ys)


def test_eot_averages_identical_gradients(digits):
    model, x, y = digits
    xs, ys, seeds = x[:8], y[:8], torch.arange(8)
    one = attacks.apgd(model, xs, ys, eps=1 / 255, steps=3, seeds=seeds)
    three = attacks.apgd(model, xs, ys, eps=1 / 255, steps=3, eot_iter=3, seeds=seeds)
    # A deterministic model: the mean of 3 equal gradients has the same signs.
    assert torch.equal(one.x_adv, three.x_adv)
    assert three.model_calls > one.model_calls


# --------------------------------------------------------------------------- masking


class _Flat(nn.Module):
    """Logits that do not depend on the image: every input gradient is exactly zero."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.tensor([2.0, 0.0, -1.0, -2.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(x.shape[0], -1) + 0.0 * x.flatten(1).sum(1, keepdim=True)


class _NaNGrad(nn.Module):
    """Finite logits, but sqrt at 0 makes the input gradient of sample 0 infinite/NaN."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.flatten(1)[:, :1].sqrt()
        return torch.cat([s + 1, s, -s, 0 * s - 1], dim=1)


def test_zero_gradients_warn():
    x = torch.full((3, 1, 4, 4), 0.5)
    y = torch.zeros(3, dtype=torch.long)
    with pytest.warns(_masking.ZeroGradientWarning, match="3 of 3 samples"):
        res = attacks.apgd(_Flat().eval(), x, y, eps=0.1, steps=3, seeds=torch.arange(3))
    assert not bool(res.success.any())


def test_nonfinite_gradients_warn_and_stay_finite():
    x = torch.full((2, 1, 2, 2), 0.5)
    x[0, 0, 0, 0] = 0.0
    y = torch.zeros(2, dtype=torch.long)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        res = attacks.apgd(_NaNGrad(), x, y, eps=0.0, steps=3, seeds=torch.arange(2))
    assert any(issubclass(w.category, _masking.NonFiniteGradientWarning) for w in seen)
    assert bool(torch.isfinite(res.x_adv).all())


def test_apgd_t_needs_four_classes():
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval()
    x, y = torch.rand(2, 1, 4, 4), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="at least 4 classes, got 3"):
        attacks.apgd_t(net, x, y, eps=0.1, steps=2)
    with pytest.raises(ValueError, match="n_targets must be >= 1, got 0"):
        attacks.apgd_t(net, x, y, eps=0.1, n_targets=0)
    with pytest.raises(ValueError, match="eot_iter must be >= 1, got 0"):
        attacks.apgd(net, x, y, eps=0.1, eot_iter=0)


# --------------------------------------------------------------------------- the reference


def _official_accuracy(model, x, y, attack) -> float:
    with torch.no_grad():
        return float((model(attack.perturb(x, y)).argmax(1) == y).float().mean())


@pytest.mark.parametrize("steps", [10])
def test_apgd_close_to_official_small_budget(digits, steps):
    """Fast cross-check: 100 images, 10 steps, within 3 points of the reference."""
    apgd_ref, _ = official()
    model, x, y = digits
    xs, ys = x[:100], y[:100]
    ours = attacks.apgd(model, xs, ys, eps=2 / 255, steps=steps, seeds=torch.arange(100))
    ref = apgd_ref(model, n_iter=steps, norm="Linf", eps=2 / 255, seed=0, device="cpu")
    acc = 1 - float(ours.success.float().mean())
    assert abs(acc - _official_accuracy(model, xs, ys, ref)) <= 0.03


# Threat models where the digits CNN keeps a middling robust accuracy (30–90 %).
SETTINGS = [("linf", 1 / 255), ("linf", 2 / 255), ("l2", 0.3)]


@pytest.mark.slow
@pytest.mark.parametrize(("norm", "eps"), SETTINGS)
@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_apgd_matches_official(digits, norm, eps, loss, one_thread):
    """Robust accuracy within ±1.5 points of the reference, 100 steps, 200 images."""
    apgd_ref, _ = official()
    model, x, y = digits
    ours = attacks.apgd(model, x, y, eps=eps, norm=norm, loss=loss, seeds=torch.arange(len(y)))
    ref = apgd_ref(
        model, n_iter=100, norm={"linf": "Linf", "l2": "L2"}[norm], eps=eps, loss=loss,
        seed=0, device="cpu",
    )  # fmt: skip
    acc, acc_ref = 1 - float(ours.success.float().mean()), _official_accuracy(model, x, y, ref)
    print(f"apgd-{loss} {norm} eps={eps:.4f}: advtune {acc:.3f} official {acc_ref:.3f}")
    assert abs(acc - acc_ref) <= 0.015


@pytest.mark.slow
@pytest.mark.parametrize(("norm", "eps"), SETTINGS)
def test_apgd_t_matches_official(digits, norm, eps, one_thread):
    """APGD-T, 100 steps × 9 targets, 200 images: within ±1.5 points."""
    _, apgdt_ref = official()
    model, x, y = digits
    ours = attacks.apgd_t(model, x, y, eps=eps, norm=norm, seeds=torch.arange(len(y)))
    ref = apgdt_ref(
        model, n_iter=100, norm={"linf": "Linf", "l2": "L2"}[norm], eps=eps,
        n_target_classes=9, seed=0, device="cpu",
    )  # fmt: skip
    acc, acc_ref = 1 - float(ours.success.float().mean()), _official_accuracy(model, x, y, ref)
    print(f"apgd-t {norm} eps={eps:.4f}: advtune {acc:.3f} official {acc_ref:.3f}")
    assert abs(acc - acc_ref) <= 0.015


class _NaNRows(nn.Module):
    """NaN logits for the images whose first pixel is above one half."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 5).to(F64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.lin(x.flatten(1))
        return torch.where(x[:, :1, 0, 0] > 0.5, torch.full_like(out, float("nan")), out)


@pytest.mark.parametrize("name", ["apgd", "apgd_t"])
def test_nan_logits_are_those_of_the_returned_image(name):
    model = _NaNRows().eval()
    x = torch.rand(4, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    x[::2, 0, 0, 0], x[1::2, 0, 0, 0] = 0.9, 0.0
    y = torch.zeros(4, dtype=torch.long)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", _masking.GradientMaskingWarning)
        res = attacks.get(name)(model, x, y, eps=0.01, steps=3, seeds=torch.arange(4))
    with torch.no_grad():
        ref = model(res.x_adv)
    torch.testing.assert_close(res.logits, ref, equal_nan=True)
    assert bool(torch.isfinite(res.x_adv).all())


# --------------------------------------------------------------------------- official schedule, L1


def test_checkpoints_follow_the_official_integer_schedule():
    # n_iter_2 = max(int(0.22 n), 1), decrement max(int(0.03 n), 1), min max(int(0.06 n), 1).
    assert checkpoints(20) == [4, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]
    assert checkpoints(50) == [11, 21, 30, 38, 45]
    assert checkpoints(10) == [2, 3, 4, 5, 6, 7, 8, 9, 10]


def _mean_official_gap(model, x, y, runs, seeds=3):
    """Mean robust accuracy over ``seeds`` seeds: (advtune, official)."""
    ours, ref = [], []
    for s in range(seeds):
        mine, theirs = runs(s)
        ours.append(1 - float(mine.success.float().mean()))
        ref.append(_official_accuracy(model, x, y, theirs))
    return sum(ours) / seeds, sum(ref) / seeds


@pytest.mark.parametrize("large_eps", [False, True])
def test_apgd_l1_close_to_official_small_budget(digits, large_eps, one_thread):
    """Fast: l1-APGD on 48 images, 20 steps, mean of 2 seeds within 6 points of the reference.

    A sanity bound, not the strength claim (that is the slow 3-seed test): on 48 images one
    image is 2 points, and the digits model trained with 2 threads (CI) put the mean gap at
    exactly 2 images (4.2 points) with ``large_eps``, while 200 images x 3 seeds on that
    model gave advtune 0.317 vs official 0.337 (large_eps) and 0.413 vs 0.398 (without;
    the official's three seeds spread 0.37-0.42), measured 2026-12-06.
    """
    apgd_ref, _ = official()
    model, x, y = digits
    xs, ys = x[:48], y[:48]

    def runs(s):
        mine = attacks.apgd(
            model, xs, ys, eps=4.0, norm="l1", steps=20, large_eps=large_eps,
            seeds=torch.arange(48) + 1000 * s,
        )  # fmt: skip
        assert bool(attacks.L1(4.0).contains(mine.x_adv, xs).all())
        theirs = apgd_ref(model, n_iter=20, norm="L1", eps=4.0, seed=s, device="cpu",
                          use_largereps=large_eps)  # fmt: skip
        return mine, theirs

    acc, acc_ref = _mean_official_gap(model, xs, ys, runs, seeds=2)
    assert abs(acc - acc_ref) <= 0.06, (acc, acc_ref)


def test_large_eps_needs_l1_and_three_steps():
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 4)).eval()
    x, y = torch.rand(2, 1, 4, 4), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="large_eps is for norm='l1' only, got norm='linf'"):
        attacks.apgd(net, x, y, eps=0.1, large_eps=True)
    with pytest.raises(ValueError, match="large_eps needs steps >= 3"):
        attacks.apgd(net, x, y, eps=1.0, norm="l1", steps=2, large_eps=True)


@pytest.mark.slow
@pytest.mark.parametrize(("norm", "eps"), [("linf", 2 / 255), ("l2", 0.3)])
@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_apgd_reduced_budget_never_weaker_than_official(digits, norm, eps, loss, one_thread):
    """20 steps (the official integer checkpoints), 200 images, mean over 5 seeds:
    advtune's robust accuracy at most 0.5 points above the reference's."""
    apgd_ref, _ = official()
    model, x, y = digits

    def runs(s):
        mine = attacks.apgd(model, x, y, eps=eps, norm=norm, loss=loss, steps=20,
                            seeds=torch.arange(len(y)) + 1000 * s)  # fmt: skip
        theirs = apgd_ref(model, n_iter=20, norm={"linf": "Linf", "l2": "L2"}[norm], eps=eps,
                          loss=loss, seed=s, device="cpu")  # fmt: skip
        return mine, theirs

    acc, acc_ref = _mean_official_gap(model, x, y, runs, seeds=5)
    print(f"apgd-{loss} {norm} 20 steps: advtune {acc:.4f} official {acc_ref:.4f}")
    assert acc <= acc_ref + 0.005


@pytest.mark.slow
@pytest.mark.parametrize("eps", [3.0])
@pytest.mark.parametrize("which", ["apgd-ce", "apgd-t"])
def test_apgd_l1_matches_official(digits, eps, which, one_thread):
    """The official L1 ensemble's settings (APGD-CE: 5 restarts; APGD-T: 5 targets; both
    with the three-stage eps schedule), 100 steps, 200 images, mean over 3 seeds:
    advtune's robust accuracy at most 0.5 points above the reference's."""
    apgd_ref, apgdt_ref = official()
    model, x, y = digits

    def runs(s):
        seeds = torch.arange(len(y)) + 1000 * s
        if which == "apgd-ce":
            mine = attacks.apgd(model, x, y, eps=eps, norm="l1", restarts=5, large_eps=True,
                                seeds=seeds)  # fmt: skip
            theirs = apgd_ref(model, n_iter=100, norm="L1", eps=eps, n_restarts=5, seed=s,
                              device="cpu", use_largereps=True)  # fmt: skip
        else:
            mine = attacks.apgd_t(model, x, y, eps=eps, norm="l1", n_targets=5, large_eps=True,
                                  seeds=seeds)  # fmt: skip
            theirs = apgdt_ref(model, n_iter=100, norm="L1", eps=eps, n_target_classes=5,
                               seed=s, device="cpu", use_largereps=True)  # fmt: skip
        return mine, theirs

    acc, acc_ref = _mean_official_gap(model, x, y, runs, seeds=3)
    print(f"{which} L1 eps={eps}: advtune {acc:.4f} official {acc_ref:.4f}")
    assert acc <= acc_ref + 0.005
