"""The contract every registered attack obeys (parametrized over ``attacks.names()``).

A new attack registered in ``advtune.attacks`` is tested here automatically: output
bounds and shapes, threat-model norms, no mutation of inputs or model, restored model
state, ``no_grad`` use, determinism, batch-size invariance, the global RNG left alone,
each invalid argument, and agreement between Eval and Tune/Deploy/Frozen models.
"""

from __future__ import annotations

import copy
import math
import sys

import pytest
import torch
from torch import nn

import advtune
from advtune import attacks

F64 = torch.float64
K = 5  # classes of the tiny model
EPS = {"linf": 8 / 255, "l2": 0.5}
# Extra variants of attacks whose options change the code path.
VARIANTS = {
    "pgd": [
        {"norm": "l2"},
        {"loss": "margin", "restarts": 2, "early_stop": True},
        {"norm": "l2", "random_start": False, "early_stop": True},
    ],
    "fab": [{"norm": "l2"}, {"targeted": False}],
    "square": [{"norm": "l2"}, {"loss": "ce", "rescale_schedule": True}],
}


def _cases() -> list[pytest.param]:
    cases = []
    for name in attacks.names():
        cases.append(pytest.param(name, {}, id=name))
        for i, extra in enumerate(VARIANTS.get(name, [])):
            cases.append(pytest.param(name, extra, id=f"{name}-{i}"))
    return cases


CASES = _cases()


def kwargs_for(name: str, extra: dict | None = None) -> dict:
    """Small, valid hyperparameters for any registered attack (kept fast)."""
    spec = attacks.spec(name)
    extra = dict(extra or {})
    kw: dict = {}
    if spec.uses_eps:
        kw["eps"] = EPS[spec.norm_of(extra)]
    if "steps" in spec.defaults:
        kw["steps"] = 5
    if "queries" in spec.defaults:
        kw["queries"] = 30
    if "binary_search_steps" in spec.defaults:
        kw["binary_search_steps"] = 3
    if "lr" in spec.defaults:
        kw["lr"] = 0.05
    kw.update(extra)
    return kw


def tiny_net() -> nn.Module:
    """Conv→BN blocks on 8×8 RGB, float64, BN statistics calibrated, eval mode."""
    gen = torch.Generator().manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, K),
    ).to(F64)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=F64) * 0.5)
        net.train()
        for _ in range(3):
            net(torch.rand(32, 3, 8, 8, generator=gen, dtype=F64))
    return net.eval()


@pytest.fixture(scope="module")
def net() -> nn.Module:
    return tiny_net()


@pytest.fixture(scope="module")
def data(net):
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(8, 3, 8, 8, generator=gen, dtype=F64)
    x[0, 0, :2] = 0.0  # pixels exactly on the box boundary
    x[1, 1, :2] = 1.0
    with torch.no_grad():
        y = net(x).argmax(1)  # labels the model gets right: untargeted attacks must act
    target = (y + 1 + torch.arange(8) % (K - 1)) % K
    seeds = torch.arange(100, 108, dtype=torch.int64)
    return x, y, target, seeds


def run(name, extra, net, x, y, **kw):
    return attacks.get(name)(net, x, y, **kwargs_for(name, extra), **kw)


# --------------------------------------------------------------------------- results


@pytest.mark.parametrize("targeted", [False, True], ids=["untargeted", "targeted"])
@pytest.mark.parametrize(("name", "extra"), CASES)
def test_result_shapes_bounds_and_success(name, extra, targeted, net, data):
    x, y, target, seeds = data
    t = target if targeted else None
    res = run(name, extra, net, x, y, target=t, seeds=seeds)
    assert isinstance(res, attacks.AttackResult)
    n = x.shape[0]
    assert res.x_adv.shape == x.shape and res.x_adv.dtype == x.dtype
    assert res.x_adv.device == x.device
    assert not res.x_adv.requires_grad
    assert float(res.x_adv.min()) >= 0.0 and float(res.x_adv.max()) <= 1.0
    assert res.success.shape == (n,) and res.success.dtype == torch.bool
    assert res.logits.shape == (n, K)
    assert res.linf.shape == (n,) and res.l2.shape == (n,)
    assert isinstance(res.model_calls, int) and res.model_calls >= 2
    # Logits and success are those of x_adv.
    with torch.no_grad():
        logits = net(res.x_adv)
    torch.testing.assert_close(res.logits, logits, rtol=1e-9, atol=1e-9)
    pred = logits.argmax(1)
    assert torch.equal(res.success, pred == target if targeted else pred != y)
    # Reported norms are the norms of the perturbation.
    delta = (res.x_adv - x).flatten(1)
    torch.testing.assert_close(res.linf, delta.abs().amax(1))
    torch.testing.assert_close(res.l2, delta.norm(dim=1))
    # The attacks work on this model: something succeeds.
    assert bool(res.success.any()), f"{name} {extra}: no success at all"


@pytest.mark.parametrize(("name", "extra"), CASES)
def test_threat_model(name, extra, net, data):
    x, y, _, seeds = data
    spec = attacks.spec(name)
    kw = kwargs_for(name, extra)
    res = attacks.get(name)(net, x, y, seeds=seeds, **kw)
    if spec.uses_eps:
        norm = spec.norm_of(kw)
        bound = res.linf if norm == "linf" else res.l2
        assert float(bound.max()) <= kw["eps"] * (1 + 1e-9), (norm, float(bound.max()))
    # Unsuccessful samples of minimum-norm attacks (no eps) come back unchanged.
    if not spec.uses_eps:
        assert torch.equal(res.x_adv[~res.success], x[~res.success])


@pytest.mark.parametrize(("name", "extra"), CASES)
def test_eps_zero_returns_clean(name, extra, net, data):
    if not attacks.spec(name).uses_eps:
        pytest.skip("no eps budget")
    x, y, _, seeds = data
    kw = kwargs_for(name, extra) | {"eps": 0.0}
    kw.pop("step_size", None)
    res = attacks.get(name)(net, x, y, seeds=seeds, **kw)
    assert torch.equal(res.x_adv, x)
    assert not bool(res.success.any())


# --------------------------------------------------------------------------- hygiene


def _odd_state(net: nn.Module) -> nn.Module:
    """A copy with unusual but harmless flags: some modules training, some params frozen."""
    odd = copy.deepcopy(net)
    odd[2].train()  # ReLU and Linear behave the same in both modes
    odd[8].train()
    odd[0].weight.requires_grad_(False)
    odd[4].bias.requires_grad_(False)
    return odd


def _snapshot(model: nn.Module):
    return (
        [(n, m.training) for n, m in model.named_modules()],
        [(n, p.requires_grad) for n, p in model.named_parameters()],
        {k: v.clone() for k, v in model.state_dict().items()},
    )


def _same_snapshot(a, b) -> bool:
    return a[0] == b[0] and a[1] == b[1] and all(torch.equal(a[2][k], b[2][k]) for k in a[2])


@pytest.mark.parametrize(("name", "extra"), CASES)
def test_no_mutation_and_state_restored(name, extra, net, data):
    x, y, target, seeds = data
    model = _odd_state(net)
    before = _snapshot(model)
    xc = x.clone().requires_grad_(False)
    yc, tc, sc = y.clone(), target.clone(), seeds.clone()
    run(name, extra, model, xc, yc, target=tc, seeds=sc)
    assert _same_snapshot(before, _snapshot(model))
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(xc, x) and xc.grad is None and not xc.requires_grad
    assert torch.equal(yc, y) and torch.equal(tc, target) and torch.equal(sc, seeds)


@pytest.mark.parametrize("name", attacks.names())
def test_state_restored_after_error(name, net, data):
    x, y, _, _ = data
    model = _odd_state(net)
    before = _snapshot(model)
    bad_y = y.clone()
    bad_y[-1] = K  # detected at the first model call, inside the attack
    with pytest.raises(ValueError, match="y must be < num_classes"):
        run(name, {}, model, x, bad_y)
    assert _same_snapshot(before, _snapshot(model))


@pytest.mark.parametrize(("name", "extra"), CASES)
def test_works_under_no_grad_and_inference_callers(name, extra, net, data):
    x, y, _, seeds = data
    ref = run(name, extra, net, x, y, seeds=seeds)
    with torch.no_grad():
        res = run(name, extra, net, x, y, seeds=seeds)
        assert not torch.is_grad_enabled()
    assert torch.equal(res.x_adv, ref.x_adv)
    assert torch.is_grad_enabled()
    # x that requires grad is fine too and gets no .grad.
    xg = x.clone().requires_grad_(True)
    res = run(name, extra, net, xg, y, seeds=seeds)
    assert xg.grad is None and torch.equal(res.x_adv, ref.x_adv)


def test_train_mode_batchnorm_warns(net, data):
    x, y, _, _ = data
    model = copy.deepcopy(net).train()
    with pytest.warns(RuntimeWarning, match="eval-mode model"):
        attacks.fgsm(model, x, y, eps=0.01)
    assert model.training  # the mode the caller chose is kept


# --------------------------------------------------------------------------- randomness


@pytest.mark.parametrize(("name", "extra"), CASES)
def test_deterministic_with_generator(name, extra, net, data):
    x, y, _, _ = data
    a = run(name, extra, net, x, y, generator=torch.Generator().manual_seed(5))
    b = run(name, extra, net, x, y, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.success, b.success)
    c = run(name, extra, net, x, y, generator=torch.Generator().manual_seed(6))
    kw = kwargs_for(name, extra)
    randomized = attacks.spec(name).randomized and kw.get("random_start", True)
    # Only randomized attacks may (and here must) depend on the seed.
    assert torch.equal(a.x_adv, c.x_adv) != bool(randomized)


@pytest.mark.parametrize(("name", "extra"), CASES)
def test_batch_size_and_order_invariance(name, extra, net, data):
    x, y, target, seeds = data
    full = run(name, extra, net, x, y, target=target, seeds=seeds)
    parts = [
        run(name, extra, net, x[s], y[s], target=target[s], seeds=seeds[s])
        for s in (slice(0, 3), slice(3, 4), slice(4, 8))
    ]
    torch.testing.assert_close(torch.cat([p.x_adv for p in parts]), full.x_adv, rtol=0, atol=1e-9)
    assert torch.equal(torch.cat([p.success for p in parts]), full.success)
    perm = torch.tensor([5, 2, 7, 0, 1, 6, 3, 4])
    shuffled = run(name, extra, net, x[perm], y[perm], target=target[perm], seeds=seeds[perm])
    torch.testing.assert_close(shuffled.x_adv, full.x_adv[perm], rtol=0, atol=1e-9)


@pytest.mark.parametrize(("name", "extra"), CASES)
def test_global_rng_untouched(name, extra, net, data):
    x, y, _, seeds = data
    state = torch.get_rng_state()
    for kw in ({}, {"seeds": seeds}, {"generator": torch.Generator().manual_seed(1)}):
        run(name, extra, net, x, y, **kw)
    assert torch.equal(state, torch.get_rng_state())
    # ...and results with seeds do not depend on the global RNG either.
    torch.manual_seed(123)
    a = run(name, extra, net, x, y, seeds=seeds)
    torch.manual_seed(456)
    b = run(name, extra, net, x, y, seeds=seeds)
    torch.set_rng_state(state)
    assert torch.equal(a.x_adv, b.x_adv)


# --------------------------------------------------------------------------- invalid input


def _bad_calls(name: str, x, y, target):
    """(label, kwargs overriding the call, regex the message must match)."""
    spec = attacks.spec(name)
    nan_x = x.clone()
    nan_x[0, 0, 0, 0] = math.nan
    calls = [
        ("x>1", {"x": x + 0.5}, r"x must lie in \[0, 1\]"),
        ("x<0", {"x": x - 0.5}, r"x must lie in \[0, 1\]"),
        ("x nan", {"x": nan_x}, "x must be finite"),
        ("x 3-D", {"x": x[0]}, r"x must have shape \(N, C, H, W\)"),
        ("x int", {"x": (x * 255).to(torch.uint8)}, "floating-point"),
        ("x empty", {"x": x[:0], "y": y[:0]}, "at least one"),
        ("y too big", {"y": torch.full_like(y, K)}, f"y must be < num_classes = {K}, got {K}"),
        ("y negative", {"y": y - 10}, "y must be >= 0"),
        ("y shape", {"y": y[:3]}, r"y must have shape \(8,\)"),
        ("y float", {"y": y.double()}, "y must have an integer dtype"),
        ("target == y", {"target": y.clone()}, "target must differ from y"),
        ("target shape", {"target": target[:2]}, r"target must have shape \(8,\)"),
        ("target range", {"target": torch.full_like(y, 99)}, "target must be < num_classes"),
        ("seeds shape", {"seeds": torch.arange(3)}, r"seeds must have shape \(8,\)"),
        ("seeds float", {"seeds": torch.rand(8)}, "seeds must be an integer tensor"),
        ("generator", {"generator": 3}, "generator must be a torch.Generator"),
        ("model", {"model": lambda z: z}, "model must be a torch.nn.Module"),
    ]
    if spec.uses_eps:
        calls += [
            ("eps<0", {"eps": -0.1}, "eps must be a finite number >= 0, got -0.1"),
            ("eps nan", {"eps": math.nan}, "eps must be a finite number >= 0, got nan"),
            ("eps str", {"eps": "0.1"}, "eps must be a finite number >= 0"),
        ]
    for key, bad in (("steps", 0), ("binary_search_steps", 0), ("restarts", 0)):
        if key in spec.defaults:
            calls.append((f"{key}={bad}", {key: bad}, f"{key} must be an integer >= 1, got {bad}"))
    if "steps" in spec.defaults:
        calls.append(("steps float", {"steps": 2.5}, "steps must be an integer >= 1, got 2.5"))
    for key in ("step_size", "lr", "initial_const"):
        if key in spec.defaults:
            calls.append((f"{key}<=0", {key: -1.0}, f"{key} must be a finite number > 0"))
    for key in ("decay", "kappa"):
        if key in spec.defaults:
            calls.append((f"{key}<0", {key: -1.0}, f"{key} must be a finite number >= 0"))
    for key, bad in (("norm", "l1"), ("loss", "hinge")):
        if key in spec.defaults:
            calls.append((f"{key}={bad}", {key: bad}, f"{key} must be one of .*got '{bad}'"))
    return calls


@pytest.mark.parametrize("name", attacks.names())
def test_invalid_arguments_raise(name, net, data):
    x, y, target, _ = data
    for label, override, pattern in _bad_calls(name, x, y, target):
        call = {"model": net, "x": x, "y": y} | kwargs_for(name) | override
        model, xx, yy = call.pop("model"), call.pop("x"), call.pop("y")
        with pytest.raises(ValueError, match=pattern):
            attacks.get(name)(model, xx, yy, **call)
        assert label  # every case carries a readable label for failure reports


# --------------------------------------------------------------------------- ConvBN modes


MODES = ["tune", "deploy", "frozen"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("name", "extra"), CASES)
def test_convbn_modes_match_eval(name, extra, mode, net, data):
    """Through a converted model every attack gives Eval mode's examples (float64, CPU)."""
    if mode == "frozen":
        pytest.importorskip("advtune.frozen", reason="frozen mode not built yet")
    x, y, target, seeds = data
    converted = advtune.tune(net, mode)
    for t in (None, target):
        ref = run(name, extra, net, x, y, target=t, seeds=seeds)
        res = run(name, extra, converted, x, y, target=t, seeds=seeds)
        assert torch.equal(res.success, ref.success), (name, mode)
        assert float((res.x_adv - ref.x_adv).abs().max()) <= 1e-6, (name, mode)
        assert res.model_calls == ref.model_calls


# --------------------------------------------------------------------------- registry


def test_registry_names_get_spec():
    names = attacks.names()
    assert names == sorted(names)
    assert {"fgsm", "pgd", "mifgsm", "cw_l2"} <= set(names)
    assert attacks.get("pgd") is attacks.pgd
    pgd = attacks.spec("pgd")
    assert (pgd.name, pgd.norm, pgd.uses_eps, pgd.randomized) == ("pgd", "linf", True, True)
    assert pgd.defaults["steps"] == 10 and pgd.defaults["step_size"] is None
    assert pgd.required == ("eps",)
    assert pgd.norm_of({"norm": "l2"}) == "l2" and pgd.norm_of({}) == "linf"
    cw = attacks.spec("cw_l2")
    assert (cw.norm, cw.uses_eps, cw.randomized) == ("l2", False, False)
    assert cw.defaults == {
        "steps": 100,
        "lr": 0.01,
        "initial_const": 1e-3,
        "binary_search_steps": 9,
        "kappa": 0.0,
        "abort_early": True,
    }
    assert (attacks.spec("fgsm").norm, attacks.spec("mifgsm").defaults["decay"]) == ("linf", 1.0)
    for name in names:
        spec = attacks.spec(name)
        assert not {"target", "generator", "seeds"} & set(spec.defaults)
        assert spec.summary


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown attack 'pgdd'; did you mean: pgd"):
        attacks.get("pgdd")
    with pytest.raises(ValueError, match="unknown attack 'nope'"):
        attacks.spec("nope")
    with pytest.raises(ValueError, match="'fgsm' is already registered"):
        attacks.register("fgsm")(attacks.fgsm)
    with pytest.raises(ValueError, match="norm must be one of"):
        attacks.register("x_bad_norm", norm="l1")

    def no_seeds(model, x, y, *, eps, target=None, generator=None):
        raise AssertionError

    with pytest.raises(ValueError, match="lacks keyword-only argument"):
        attacks.register("x_no_seeds")(no_seeds)

    def positional(model, x, y, eps, *, target=None, generator=None, seeds=None):
        raise AssertionError

    with pytest.raises(ValueError, match="positionally"):
        attacks.register("x_positional")(positional)
    assert not {"x_bad_norm", "x_no_seeds", "x_positional"} & set(attacks.names())


# --------------------------------------------------------------------------- targets


def test_random_target():
    y = torch.arange(10).repeat(50)
    seeds = torch.arange(500, dtype=torch.int64)
    t = attacks.random_target(y, 10, seeds=seeds)
    assert t.dtype == torch.long and t.shape == y.shape
    assert not bool((t == y).any()) and int(t.min()) >= 0 and int(t.max()) <= 9
    assert len(set(t.tolist())) == 10  # every class is used as a target
    # Per-sample: a sub-batch with the same seeds gets the same targets.
    assert torch.equal(attacks.random_target(y[7:20], 10, seeds=seeds[7:20]), t[7:20])
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(
        attacks.random_target(y, 10, generator=g1), attacks.random_target(y, 10, generator=g2)
    )
    state = torch.get_rng_state()
    attacks.random_target(y, 10)
    assert torch.equal(state, torch.get_rng_state())
    with pytest.raises(ValueError, match="num_classes must be an integer >= 2, got 1"):
        attacks.random_target(torch.zeros(3, dtype=torch.long), 1)
    with pytest.raises(ValueError, match=r"y must lie in \[0, 10\)"):
        attacks.random_target(torch.tensor([3, 10]), 10)
    with pytest.raises(ValueError, match="seeds must have shape"):
        attacks.random_target(y, 10, seeds=seeds[:4])


def test_least_likely_target(net, data):
    x, _, _, _ = data
    model = _odd_state(net)
    before = _snapshot(model)
    t = attacks.least_likely_target(model, x)
    with torch.no_grad():
        assert torch.equal(t, net(x).argmin(1))
    assert _same_snapshot(before, _snapshot(model))
    with pytest.raises(ValueError, match=r"x must lie in \[0, 1\]"):
        attacks.least_likely_target(net, x * 3)


# --------------------------------------------------------------------------- torchattacks


def test_missing_torchattacks_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchattacks", None)  # import now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'advtune\[torchattacks\]'") as info:
        attacks.torchattacks("PGD")
    assert isinstance(info.value, attacks.MissingDependencyError)
    assert isinstance(info.value, ValueError)  # a UserError: the CLI prints it as one line
