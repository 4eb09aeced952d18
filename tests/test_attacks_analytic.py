"""Attacks on linear models, where the right answer is known in closed form (float64).

For logits ``z = W x + b`` with two classes the decision boundary is the hyperplane
``w·x + c = 0`` with ``w = W₁ − W₀``, ``c = b₁ − b₀``: the smallest L2 perturbation that
flips the prediction has norm ``|w·x + c| / ‖w‖₂`` and the smallest L∞ one
``|w·x + c| / ‖w‖₁`` (when the box [0, 1] does not get in the way, as arranged here).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from advtune import attacks
from advtune.attacks._random import sample_generators, uniform_l2_ball, uniform_linf_ball
from advtune.attacks._result import margin_loss
from advtune.attacks.threat import L2, Linf

F64 = torch.float64
SHAPE = (1, 4, 4)
D = 16


def linear_model(weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    lin = nn.Linear(weight.shape[1], weight.shape[0]).to(F64)
    with torch.no_grad():
        lin.weight.copy_(weight)
        lin.bias.copy_(bias)
    return nn.Sequential(nn.Flatten(), lin).eval()


@pytest.fixture(scope="module")
def binary():
    """A two-class linear model and points at known distances from its boundary."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(2, D, generator=gen, dtype=F64)
    w = weight[1] - weight[0]
    x = 0.35 + 0.3 * torch.rand(6, *SHAPE, generator=gen, dtype=F64)
    # Put each point at signed distance s from the boundary: class 0 when s < 0.
    s = torch.tensor([-0.05, -0.1, -0.02, 0.04, 0.08, 0.12], dtype=F64)
    c = (s * w.norm() - x.flatten(1) @ w).mean()
    x = x + ((s * w.norm() - x.flatten(1) @ w - c) / w.norm() ** 2).reshape(
        -1, 1, 1, 1
    ) * w.reshape(1, *SHAPE)
    bias = torch.tensor([0.0, float(c)], dtype=F64)
    model = linear_model(weight, bias)
    margin = x.flatten(1) @ w + c
    y = (margin > 0).long()
    assert float(x.min()) > 0.2 and float(x.max()) < 0.8  # the box never binds
    return model, x, y, w, margin


def test_fgsm_moves_exactly_eps_sign_w(binary):
    model, x, y, w, _ = binary
    eps = 0.01
    res = attacks.fgsm(model, x, y, eps=eps)
    # Untargeted CE ascent pushes class-0 points along +w and class-1 points along −w.
    direction = torch.where(y[:, None] == 0, 1.0, -1.0).to(F64) * w.sign()
    torch.testing.assert_close(
        res.x_adv.flatten(1) - x.flatten(1), eps * direction, rtol=0, atol=1e-15
    )
    assert torch.allclose(res.linf, torch.full_like(res.linf, eps), rtol=0, atol=1e-15)
    assert res.model_calls == 2


def test_fgsm_targeted_follows_target_gradient():
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(4, D, generator=gen, dtype=F64)
    bias = torch.randn(4, generator=gen, dtype=F64)
    model = linear_model(weight, bias)
    x = 0.3 + 0.4 * torch.rand(5, *SHAPE, generator=gen, dtype=F64)
    y = torch.tensor([0, 1, 2, 3, 0])
    target = torch.tensor([1, 2, 3, 0, 2])
    eps = 0.02
    res = attacks.fgsm(model, x, y, eps=eps, target=target)
    p = torch.softmax(x.flatten(1) @ weight.T + bias, dim=1)
    # d(−CE_t)/dx = Wᵀ(e_t − p)
    grad = (nn.functional.one_hot(target, 4).to(F64) - p) @ weight
    torch.testing.assert_close(
        res.x_adv.flatten(1), x.flatten(1) + eps * grad.sign(), rtol=0, atol=1e-15
    )


def test_cw_l2_within_5_percent_of_minimal_distance(binary):
    model, x, y, w, margin = binary
    dist = margin.abs() / w.norm()
    res = attacks.cw_l2(model, x, y)  # default hyperparameters
    assert bool(res.success.all())
    ratio = res.l2 / dist
    # No perturbation can be shorter than the distance to the boundary...
    assert float(ratio.min()) >= 1 - 1e-9
    # ...and CW-L2 finds nearly the shortest one.
    assert float(ratio.max()) <= 1.05, ratio


def test_cw_l2_kappa_buys_a_margin(binary):
    """With κ > 0 a success must beat the other logit by κ: distance (|m| + κ)/‖w‖."""
    model, x, y, w, margin = binary
    kappa = 0.5
    res = attacks.cw_l2(model, x, y, kappa=kappa)
    assert bool(res.success.all())
    assert float(margin_loss(res.logits, y, None).min()) >= kappa - 1e-9
    ratio = res.l2 / ((margin.abs() + kappa) / w.norm())
    assert float(ratio.min()) >= 1 - 1e-9 and float(ratio.max()) <= 1.05, ratio


def test_cw_l2_all_negative_logits():
    """The f-term masks the true class with −inf: right even when every logit is < 0.

    torchattacks' ``max((1 − onehot)·z)`` returns 0 for the "other" logit here, so its
    loss sees a margin that is not there.
    """
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(3, D, generator=gen, dtype=F64) * 0.5
    bias = torch.tensor([-50.0, -50.5, -51.0], dtype=F64)
    model = linear_model(weight, bias)
    x = 0.4 + 0.2 * torch.rand(4, *SHAPE, generator=gen, dtype=F64)
    with torch.no_grad():
        logits = model(x)
    assert bool((logits < 0).all())
    y = logits.argmax(1)
    res = attacks.cw_l2(model, x, y, steps=200, binary_search_steps=12)
    assert bool(res.success.all())
    # Distance to the nearest pairwise boundary lower-bounds the true distance; with
    # three classes the nearest one is reached first here.
    wy = weight[y]
    gaps = torch.stack(
        [
            (logits.gather(1, y[:, None])[:, 0] - logits[:, j]) / (wy - weight[j]).norm(dim=1)
            for j in range(3)
        ],
        dim=1,
    )
    gaps[torch.arange(4), y] = float("inf")
    dist = gaps.min(dim=1).values
    assert float((res.l2 / dist).max()) <= 1.05


def test_cw_l2_moves_pixels_at_exactly_0_and_1():
    """Pixels at 0 or 1 must move (atanh(±1) = ±inf would pin them)."""
    weight = torch.zeros(2, D, dtype=F64)
    weight[1, :8] = 1.0  # only the first 8 pixels matter; raising them flips the class
    weight[1, 8:] = -1.0  # ...and lowering the last 8 does too
    x = torch.cat([torch.zeros(8), torch.ones(8)]).to(F64).reshape(1, *SHAPE)
    bias = torch.tensor([0.0, 8.0 - 1.0], dtype=F64)  # z1 − z0 = −1 at x
    model = linear_model(weight, bias)
    y = torch.tensor([0])
    res = attacks.cw_l2(model, x, y, steps=200, binary_search_steps=10)
    dist = 1.0 / weight[1].norm()
    assert bool(res.success.all())
    moved = (res.x_adv - x).flatten().abs()
    assert bool((moved > 0.01).all())  # every pixel at the boundary moved inwards
    assert float(res.l2[0] / dist) <= 1.05


def test_cw_l2_clean_image_maps_back():
    """With an already misclassified input CW returns x itself (L2 = 0, success)."""
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(2, D, generator=gen, dtype=F64)
    model = linear_model(weight, torch.zeros(2, dtype=F64))
    x = torch.rand(3, *SHAPE, generator=gen, dtype=F64)
    x[0, 0, 0] = 0.0
    x[1, 0, 0] = 1.0
    with torch.no_grad():
        wrong = 1 - model(x).argmax(1)
    res = attacks.cw_l2(model, x, wrong, steps=10, binary_search_steps=1)
    assert bool(res.success.all())
    assert float(res.l2.max()) <= 1e-12


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_pgd_succeeds_just_above_minimal_distance_and_fails_below(binary, norm):
    model, x, y, w, margin = binary
    dual = w.norm() if norm == "l2" else w.abs().sum()
    dist = margin.abs() / dual
    for scale, expect in ((1 + 1e-6, True), (1 - 1e-3, False)):
        for i in range(x.shape[0]):
            res = attacks.pgd(
                model,
                x[i : i + 1],
                y[i : i + 1],
                eps=float(dist[i]) * scale,
                norm=norm,
                steps=20,
                random_start=False,
            )
            assert bool(res.success[0]) is expect, (norm, scale, i)


def test_mifgsm_reaches_linf_boundary(binary):
    model, x, y, w, margin = binary
    dist = margin.abs() / w.abs().sum()
    for i in range(x.shape[0]):
        eps = float(dist[i]) * (1 + 1e-6)
        res = attacks.mifgsm(model, x[i : i + 1], y[i : i + 1], eps=eps, steps=10)
        assert bool(res.success[0])
        # Constant gradient sign: every pixel moves the full eps along ±sign(w).
        torch.testing.assert_close(res.linf[0], torch.tensor(eps, dtype=F64), rtol=1e-12, atol=0)


def test_pgd_margin_loss_and_early_stop(binary):
    model, x, y, w, margin = binary
    dist = margin.abs() / w.norm()
    eps = float(dist.max()) * 1.5
    full = attacks.pgd(model, x, y, eps=eps, norm="l2", loss="margin", random_start=False)
    early = attacks.pgd(
        model, x, y, eps=eps, norm="l2", loss="margin", random_start=False, early_stop=True
    )
    assert bool(full.success.all()) and bool(early.success.all())
    # Early stop leaves successful samples where they first succeeded: no farther away.
    assert bool((early.l2 <= full.l2 + 1e-12).all())
    assert bool((early.l2 < full.l2).any())
    assert early.model_calls < full.model_calls


def five_class_linear(seed: int, n: int):
    """A random 5-class linear model, ``n`` random images and the labels it gives them."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(5, D, generator=gen, dtype=F64)
    model = linear_model(weight, torch.zeros(5, dtype=F64))
    x = torch.rand(n, *SHAPE, generator=gen, dtype=F64)
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


def test_pgd_restarts_keep_successes():
    model, x, y = five_class_linear(4, 32)
    seeds = torch.arange(32)
    one = attacks.pgd(model, x, y, eps=0.02, steps=2, seeds=seeds)
    three = attacks.pgd(model, x, y, eps=0.02, steps=2, seeds=seeds, restarts=3)
    # The first restart is the same run; later ones only add successes.
    assert bool((three.success >= one.success).all())
    assert torch.equal(three.x_adv[one.success], one.x_adv[one.success])
    assert three.model_calls > one.model_calls


def test_random_start_is_inside_the_ball(binary):
    model, x, y, _, _ = binary
    seeds = torch.arange(6)
    for norm, eps in (("linf", 0.05), ("l2", 0.2)):
        # A negligible step: x_adv is (almost) the random start itself.
        res = attacks.pgd(model, x, y, eps=eps, norm=norm, steps=1, step_size=1e-12, seeds=seeds)
        size = res.linf if norm == "linf" else res.l2
        assert float(size.max()) <= eps * (1 + 1e-12) and float(size.min()) > 0


def test_uniform_ball_samplers():
    gens = sample_generators(torch.arange(4000), stream=1)
    like = torch.zeros(1, dtype=F64)
    d = 3
    l2 = uniform_l2_ball(gens, (d,), 2.0, like)
    r = l2.norm(dim=1) / 2.0
    assert float(r.max()) <= 1.0
    # Uniform in volume: (r)^d is uniform on [0, 1] (mean 1/2, sd ≈ 0.0046 here).
    assert abs(float((r**d).mean()) - 0.5) < 0.02
    linf = uniform_linf_ball(sample_generators(torch.arange(4000), 1), (d,), 0.5, like)
    assert float(linf.abs().max()) <= 0.5
    assert abs(float(linf.mean())) < 0.02 and abs(float(linf.abs().mean()) - 0.25) < 0.02
    # Per-sample: a generator depends only on its own seed.
    again = uniform_linf_ball(sample_generators(torch.arange(10, 20), 1), (d,), 0.5, like)
    torch.testing.assert_close(again, linf[10:20], rtol=0, atol=0)


def test_projections():
    gen = torch.Generator().manual_seed(5)
    x = torch.rand(50, *SHAPE, generator=gen, dtype=F64)
    x_adv = x + torch.randn(50, *SHAPE, generator=gen, dtype=F64)
    p = Linf(0.1).project(x_adv, x)
    assert float((p - x).abs().max()) <= 0.1 + 1e-15 and float(p.min()) >= 0 and float(p.max()) <= 1
    # Exact projection onto the intersection of two boxes: coordinate-wise clamp.
    lo, hi = (x - 0.1).clamp(min=0), (x + 0.1).clamp(max=1)
    torch.testing.assert_close(p, torch.maximum(torch.minimum(x_adv, hi), lo))
    q = L2(0.5).project(x_adv, x)
    assert float((q - x).flatten(1).norm(dim=1).max()) <= 0.5 + 1e-12
    assert float(q.min()) >= 0 and float(q.max()) <= 1
    inside = x + 0.01 * (x_adv - x) / (x_adv - x).flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(L2(0.5).project(inside.clamp(0, 1), x), inside.clamp(0, 1))
    assert torch.equal(L2(0.0).project(x, x), x)


def test_margin_loss_masks_with_minus_inf():
    logits = torch.tensor([[-1.0, -2.0, -3.0], [5.0, 1.0, 7.0]], dtype=F64)
    y = torch.tensor([0, 2])
    torch.testing.assert_close(margin_loss(logits, y, None), torch.tensor([-1.0, -2.0], dtype=F64))
    t = torch.tensor([2, 1])
    torch.testing.assert_close(margin_loss(logits, y, t), torch.tensor([-2.0, -6.0], dtype=F64))


class _Band(nn.Module):
    """Two classes; class 1 exactly when ``t = mean(x) − c`` lies in (−0.1, 0.1)."""

    def __init__(self, c: float) -> None:
        super().__init__()
        self.c = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.flatten(1).sum(dim=1) - self.c
        return torch.stack([torch.zeros_like(t), 1 - 100 * t * t], dim=1)


@pytest.mark.parametrize("steps", [2, 4])
def test_pgd_keeps_a_successful_iterate(steps):
    """Each step moves t by ±0.3 across the band: iterates 1, 3, ... succeed, 0, 2, ... fail.

    With an even number of steps the last iterate fails; PGD returns iterate 1 instead.
    """
    x = torch.full((1, *SHAPE), 0.5, dtype=F64)
    model = _Band(c=float(x.sum()) + 0.25).eval()  # t = −0.25 at x
    alpha = 0.3 / D  # sum(x) moves by D · alpha = 0.3 per L∞ step
    y = torch.tensor([0])
    res = attacks.pgd(model, x, y, eps=0.05, steps=steps, step_size=alpha, random_start=False)
    assert bool(res.success[0])
    torch.testing.assert_close(res.x_adv, x + alpha, rtol=0, atol=1e-15)
    with torch.no_grad():
        torch.testing.assert_close(res.logits, model(res.x_adv))


def test_linf_and_l2_threat_models():
    from advtune.attacks import L2, Linf, threat_model

    assert threat_model("LINF", 0.1) == Linf(0.1) and threat_model("l2") == L2(None)
    assert threat_model(Linf(0.1), 0.2) == Linf(0.2)
    gen = torch.Generator().manual_seed(6)
    g = torch.randn(5, *SHAPE, generator=gen, dtype=F64)
    for threat, dual in (
        (Linf(0.1), g.flatten(1).abs().sum(1)),
        (L2(0.1), g.flatten(1).norm(dim=1)),
    ):
        step = threat.ascent(g)
        # Steepest ascent: unit norm and <g, step> equals the dual norm of g.
        torch.testing.assert_close(threat.norm(step), torch.ones(5, dtype=F64))
        torch.testing.assert_close((g * step).flatten(1).sum(1), dual)
    x = torch.rand(5, *SHAPE, generator=gen, dtype=F64)
    for threat in (Linf(0.1), L2(0.3)):
        p = threat.project(x + g, x)
        assert bool(threat.contains(p, x).all())
        outside = threat.project(x + g, x) + 1e-3 * threat.ascent(p - x + 1e-9)
        assert not bool(threat.contains(outside.clamp(0, 1), x, rtol=0).all())


@pytest.mark.parametrize("call", [
    lambda: __import__("advtune.attacks", fromlist=["x"]).threat_model("l3"),
    lambda: __import__("advtune.attacks", fromlist=["x"]).Linf(1.5),
    lambda: __import__("advtune.attacks", fromlist=["x"]).L2(-1.0),
], ids=["unknown", "linf>1", "negative"])  # fmt: skip
def test_threat_model_errors(call):
    with pytest.raises(ValueError, match=r"threat model 'l3'|eps 1\.5 is out of range|got -1\.0"):
        call()


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_random_starts_inside_ball_and_per_sample(norm):
    from advtune.attacks import threat_model

    threat = threat_model(norm, 0.05 if norm == "linf" else 0.3)
    x = torch.full((20, *SHAPE), 0.5, dtype=F64)
    start = threat.random_start(x, sample_generators(torch.arange(20), stream=1))
    assert bool(threat.contains(start, x).all()) and bool((start != x).any())
    again = threat.random_start(x[5:9], sample_generators(torch.arange(5, 9), stream=1))
    torch.testing.assert_close(again, start[5:9], rtol=0, atol=0)


def test_l2_start_radius_is_uniform():
    from advtune.attacks import L2

    like = torch.zeros(1, dtype=F64)
    draws = L2(2.0).ball(sample_generators(torch.arange(4000), 1), (300,), like, start="radius")
    r = draws.norm(dim=1) / 2.0
    assert float(r.max()) <= 1.0
    assert abs(float(r.mean()) - 0.5) < 0.02  # uniform on [0, 1]; volume-uniform gives ~0.997


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("eps_levels", [0.4, 1.0, 2.5, 4.0])
def test_quantize_stays_inside_and_matches_evaluate(norm, eps_levels):
    from advtune.attacks import threat_model
    from advtune.run.quantize import quantize_adv

    gen = torch.Generator().manual_seed(7)
    x = torch.randint(0, 256, (6, 3, 5, 5), generator=gen).double() / 255
    eps = eps_levels / 255 * (1 if norm == "linf" else 6.0)
    threat = threat_model(norm, eps)
    direction = torch.randn(x.shape, generator=gen, dtype=F64)
    x_adv = threat.project(x + direction, x)  # on the sphere: rounding would step out
    q = threat.quantize(x_adv, x)
    assert q.dtype == torch.uint8
    assert bool(threat.contains(q.double() / 255, x, rtol=1e-12).all())
    # The same as the run's saving code (which the coordinator points at this method).
    assert torch.equal(q, quantize_adv(x_adv, x, norm=norm, eps=eps))
    assert threat.survives_quantization == (eps * 255 >= 1 - 1e-9)


def test_with_restarts_is_a_generic_combinator():
    """Wrapping the one-restart registered PGD reproduces PGD's own restarts exactly."""
    from advtune.attacks._loop import bind

    model, x, y = five_class_linear(8, 16)
    seeds = torch.arange(16)
    run = bind(attacks.pgd, eps=0.02, steps=2)
    wrapped = attacks.with_restarts(run, model, x, y, restarts=3, randomized=True, seeds=seeds)
    own = attacks.pgd(model, x, y, eps=0.02, steps=2, restarts=3, seeds=seeds)
    assert torch.equal(wrapped.x_adv, own.x_adv) and torch.equal(wrapped.success, own.success)
    assert wrapped.model_calls == own.model_calls
    with pytest.raises(ValueError, match="restarts=2 without randomness"):
        attacks.with_restarts(
            bind(attacks.fgsm, eps=0.1), model, x, y, restarts=2, randomized=False
        )


# --------------------------------------------------------------------------- L1 threat model


def _l1_projection_by_bisection(z, x, eps):
    """The projection onto the L1 ball ∩ [0, 1] by bisection on the threshold (reference)."""
    d = z - x
    room = torch.where(d > 0, 1 - x, x)
    a = d.abs()
    fitted = torch.minimum(a, room)
    lo, hi = torch.zeros(len(z), dtype=F64), a.amax(dim=1)
    for _ in range(200):
        mid = (lo + hi) / 2
        over = torch.minimum((a - mid[:, None]).clamp_min(0), room).sum(dim=1) > eps
        lo, hi = torch.where(over, mid, lo), torch.where(over, hi, mid)
    lam = torch.where(fitted.sum(dim=1) <= eps, torch.zeros_like(lo), hi)
    return (x + d.sign() * torch.minimum((a - lam[:, None]).clamp_min(0), room)).clamp(0, 1)


def test_l1_projection_is_exact_onto_ball_and_box():
    from advtune.attacks import L1

    gen = torch.Generator().manual_seed(3)
    for trial in range(50):
        d = int(torch.randint(1, 60, (), generator=gen))
        x = torch.rand(4, d, generator=gen, dtype=F64)
        z = x + 2 * torch.rand((), generator=gen, dtype=F64) * torch.randn(
            4, d, generator=gen, dtype=F64
        )
        eps = 3 * float(torch.rand((), generator=gen))
        p = L1(eps).project(z, x)
        torch.testing.assert_close(p, _l1_projection_by_bisection(z, x, eps), rtol=0, atol=1e-9)
        assert bool(L1(eps).contains(p, x).all()), trial
    inside = torch.full((2, 10), 0.5, dtype=F64)
    assert torch.equal(L1(1.0).project(inside + 0.01, inside), inside + 0.01)  # unchanged
    assert torch.equal(L1(0.0).project(inside + 0.3, inside), inside)


def test_l1_geometry_start_ascent_dual_and_quantisation():
    from advtune.attacks import L1

    x = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    threat = L1(5.0)
    start = threat.random_start(x, sample_generators(torch.arange(6), 1))
    assert bool(threat.contains(start, x).all())
    surface = threat.surface_start(x, sample_generators(torch.arange(6), 1))
    torch.testing.assert_close(threat.norm(surface - x), torch.full((6,), 5.0), rtol=1e-5, atol=0)
    again = threat.surface_start(x[2:4], sample_generators(torch.arange(2, 4), 1))
    torch.testing.assert_close(again, surface[2:4], rtol=0, atol=0)  # per-sample draws
    g = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    top = threat.ascent(g)  # exact steepest ascent: the largest coordinate only
    assert bool(((top != 0).flatten(1).sum(1) == 1).all())
    torch.testing.assert_close(threat.norm(top), torch.ones(6))
    sparse = threat.ascent(g, sparsity=0.1)
    assert bool(((sparse != 0).flatten(1).sum(1) == 20).all())  # 192 − ⌊0.9 · 192⌋, no ties
    assert bool((sparse.sign() == torch.where(sparse != 0, g.sign(), 0)).all())
    torch.testing.assert_close(threat.dual_norm(g), g.flatten(1).abs().amax(1))
    clean = (x * 255).round() / 255
    adv = threat.project(clean + 0.5 * torch.randn_like(clean), clean)
    q = threat.quantize(adv, clean)
    assert bool(threat.contains(q.float() / 255, clean).all())
    shrunk = threat.shrink(g, torch.tensor([1.0, 2.0, 3.0, 1e9, 0.5, 0.0]))
    torch.testing.assert_close(threat.norm(shrunk)[:3], torch.tensor([1.0, 2.0, 3.0]))
    assert torch.equal(shrunk[3], g[3]) and bool((shrunk[5] == 0).all())


def test_l2_start_option_is_part_of_the_value():
    assert attacks.L2(0.5, start="volume").with_eps(1.0) == attacks.L2(1.0, start="volume")
    assert attacks.L2(0.5) != attacks.L2(0.5, start="volume")
    assert repr(attacks.L2(0.5, start="volume")) == "L2(eps=0.5, start='volume')"
    with pytest.raises(ValueError, match="start must be one of radius, volume; got 'x'"):
        attacks.L2(0.5, start="x")
