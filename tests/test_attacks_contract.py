"""The contract every registered attack obeys, one test per (attack, property).

Parametrized over ``attacks.names()`` — every registered attack, including ones added
later — plus wrapped torchattacks classes when torchattacks is installed. Hyperparameters
come from each attack's spec (:meth:`AttackSpec.cheap_hyperparameters`), the radius from
its threat model, so a new attack is tested here with no edit.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import re

import pytest
import torch
from modelzoo import tiny_bn_net
from torch import nn

import advtune
from advtune import attacks
from advtune.attacks import Param

F64 = torch.float64
K = 5  # classes of the tiny model
N = 8
# Radius per threat model: large enough that every attack succeeds on the tiny model.
EPS = {"linf": 8 / 255, "l2": 0.5, "l1": 4.0}
# Extra variants of attacks whose options change the code path.
VARIANTS = {
    "pgd": [
        {"norm": "l2"},
        {"loss": "margin", "restarts": 2, "early_stop": True},
        {"norm": "l2", "random_start": False, "early_stop": True},
        {"norm": "l1"},
    ],
    "apgd": [{"norm": "l1"}, {"norm": "l1", "large_eps": True, "loss": "dlr"}],
    "apgd_t": [{"norm": "l1", "large_eps": True}],
    "fab": [{"norm": "l2"}, {"targeted": False}, {"norm": "l1"}, {"norm": "l1", "targeted": False}],
    "square": [{"norm": "l2"}, {"loss": "ce", "rescale_schedule": True}, {"norm": "l1"}],
}
# torchattacks classes run through the adapter (registered on first lookup).
EXTERNAL = (
    ["torchattacks:FGSM", "torchattacks:PGD", "torchattacks:APGD"]
    if importlib.util.find_spec("torchattacks")
    else []
)
for _name in EXTERNAL:
    attacks.get(_name)
NAMES = attacks.names()


def _cases() -> list:
    cases = []
    for name in NAMES:
        cases.append(pytest.param(name, {}, id=name))
        for i, extra in enumerate(VARIANTS.get(name, [])):
            cases.append(pytest.param(name, extra, id=f"{name}-{i}"))
    return cases


CASES = _cases()


def hyper(name: str, extra: dict | None = None) -> dict:
    """The attack's cheap hyperparameters from its spec, with a radius that works here."""
    spec = attacks.spec(name)
    kw = spec.cheap_hyperparameters(extra)
    if spec.radius_key is not None and spec.radius_key not in (extra or {}):
        kw[spec.radius_key] = EPS[spec.threat(kw).name]
    return kw


@pytest.fixture(scope="module")
def net() -> nn.Module:
    return tiny_bn_net(K)


@pytest.fixture(scope="module")
def data(net):
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(N, 3, 8, 8, generator=gen, dtype=F64)
    x[0, 0, :2] = 0.0  # pixels exactly on the box boundary
    x[1, 1, :2] = 1.0
    with torch.no_grad():
        y = net(x).argmax(1)  # labels the model gets right: untargeted attacks must act
    target = (y + 1 + torch.arange(N) % (K - 1)) % K
    seeds = torch.arange(100, 100 + N, dtype=torch.int64)
    return x, y, target, seeds


def _skip_untargetable(name: str, targeted: bool) -> None:
    if targeted and not attacks.spec(name).targeted:
        pytest.skip("the attack has no targeted mode")


def run(name, extra, model, x, y, **kw):
    _skip_untargetable(name, kw.get("target") is not None)
    return attacks.get(name)(model, x, y, **hyper(name, extra), **kw)


def _expected_success(logits, y, target):
    pred = logits.argmax(1)
    return (pred == target if target is not None else pred != y) & logits.isfinite().all(1)


# --------------------------------------------------------------------------- results


@pytest.mark.parametrize("targeted", [False, True], ids=["untargeted", "targeted"])
@pytest.mark.parametrize(("name", "extra"), CASES)
def test_result_shapes_and_dtypes(name, extra, targeted, net, data):
    x, y, target, seeds = data
    res = run(name, extra, net, x, y, target=target if targeted else None, seeds=seeds)
    assert isinstance(res, attacks.AttackResult)
    assert (res.x_adv.shape, res.x_adv.dtype, res.x_adv.device) == (x.shape, x.dtype, x.device)
    assert not res.x_adv.requires_grad
    assert (res.success.shape, res.success.dtype) == ((N,), torch.bool)
    assert (res.finite.shape, res.finite.dtype) == ((N,), torch.bool)
    assert res.logits.shape == (N, K)
    assert res.linf.shape == (N,) and res.l2.shape == (N,)
    assert isinstance(res.model_calls, int) and res.model_calls >= 2


@pytest.mark.parametrize("targeted", [False, True], ids=["untargeted", "targeted"])
@pytest.mark.parametrize(("name", "extra"), CASES)
def test_inside_box_and_threat_model(name, extra, targeted, net, data):
    _skip_untargetable(name, targeted)
    x, y, target, seeds = data
    kw = hyper(name, extra)
    res = attacks.get(name)(net, x, y, target=target if targeted else None, seeds=seeds, **kw)
    threat = attacks.spec(name).threat(kw)
    assert float(res.x_adv.min()) >= 0.0 and float(res.x_adv.max()) <= 1.0
    assert bool(threat.contains(res.x_adv, x).all()), threat.norm(res.x_adv - x)


@pytest.mark.parametrize("targeted", [False, True], ids=["untargeted", "targeted"])
@pytest.mark.parametrize(("name", "extra"), CASES)
def test_success_consistent_with_logits(name, extra, targeted, net, data):
    x, y, target, seeds = data
    t = target if targeted else None
    res = run(name, extra, net, x, y, target=t, seeds=seeds)
    with torch.no_grad():
        logits = net(res.x_adv)
    torch.testing.assert_close(res.logits, logits, rtol=1e-9, atol=1e-9)
    assert torch.equal(res.success, _expected_success(logits, y, t))


@pytest.mark.parametrize(("name", "extra"), CASES)
def test_reported_norms(name, extra, net, data):
    x, y, _, seeds = data
    res = run(name, extra, net, x, y, seeds=seeds)
    delta = (res.x_adv - x).flatten(1)
    torch.testing.assert_close(res.linf, delta.abs().amax(1))
    torch.testing.assert_close(res.l2, delta.norm(dim=1))


@pytest.mark.parametrize(("name", "extra"), CASES)
def test_attack_succeeds_somewhere(name, extra, net, data):
    x, y, _, seeds = data
    assert bool(run(name, extra, net, x, y, seeds=seeds).success.any())


@pytest.mark.parametrize(("name", "extra"), CASES)
def test_zero_radius_returns_clean(name, extra, net, data):
    spec = attacks.spec(name)
    if spec.radius_key is None:
        pytest.skip("unbounded attack: no radius")
    x, y, _, seeds = data
    kw = hyper(name, extra) | {spec.radius_key: 0.0}
    res = attacks.get(name)(net, x, y, seeds=seeds, **kw)
    assert torch.equal(res.x_adv, x)
    assert not bool(res.success.any())


@pytest.mark.parametrize(("name", "extra"), CASES)
def test_unbounded_failures_return_clean(name, extra, net, data):
    if attacks.spec(name).radius_key is not None:
        pytest.skip("bounded attack")
    x, y, _, seeds = data
    res = run(name, extra, net, x, y, seeds=seeds)
    assert torch.equal(res.x_adv[~res.success], x[~res.success])


# --------------------------------------------------------------------------- purity


def _odd_state(net: nn.Module) -> nn.Module:
    """A copy with unusual but harmless flags: some modules training, some params frozen."""
    odd = copy.deepcopy(net)
    odd[2].train()  # ReLU and Linear behave the same in both modes
    odd[8].train()
    odd[0].weight.requires_grad_(False)
    odd[4].bias.requires_grad_(False)
    return odd


def _flags(model: nn.Module):
    return (
        [(n, m.training) for n, m in model.named_modules()],
        [(n, p.requires_grad) for n, p in model.named_parameters()],
    )


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    # Parameters and buffers (BN running statistics, num_batches_tracked).
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("name", "extra"), CASES)
def test_inputs_unchanged(name, extra, net, data):
    x, y, target, seeds = data
    xc, yc, tc, sc = x.clone(), y.clone(), target.clone(), seeds.clone()
    run(name, extra, net, xc, yc, target=tc, seeds=sc)
    assert torch.equal(xc, x) and xc.grad is None and not xc.requires_grad
    assert torch.equal(yc, y) and torch.equal(tc, target) and torch.equal(sc, seeds)


SNAPSHOTS = {"flags": _flags, "parameters-and-buffers": _tensors}


@pytest.mark.parametrize("part", list(SNAPSHOTS))
@pytest.mark.parametrize(("name", "extra"), CASES)
def test_model_unchanged(name, extra, part, net, data):
    x, y, target, seeds = data
    model = _odd_state(net)
    snapshot = SNAPSHOTS[part]
    before = snapshot(model)
    run(name, extra, model, x, y, target=target, seeds=seeds)
    after = snapshot(model)
    assert _same_tensors(before, after) if isinstance(before, dict) else before == after


@pytest.mark.parametrize(("name", "extra"), CASES)
def test_no_parameter_grad_left(name, extra, net, data):
    x, y, _, seeds = data
    model = copy.deepcopy(net).requires_grad_(True)
    run(name, extra, model, x, y, seeds=seeds)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_state_restored_after_error(name, net, data):
    x, y, _, _ = data
    model = _odd_state(net)
    flags, tensors = _flags(model), _tensors(model)
    bad_y = y.clone()
    bad_y[-1] = K  # detected at the first model call, inside the attack
    with pytest.raises(ValueError, match="y must be < num_classes"):
        run(name, {}, model, x, bad_y)
    assert _flags(model) == flags and _same_tensors(tensors, _tensors(model))


@pytest.mark.parametrize(("name", "extra"), CASES)
def test_same_result_under_no_grad(name, extra, net, data):
    x, y, _, seeds = data
    ref = run(name, extra, net, x, y, seeds=seeds)
    with torch.no_grad():
        res = run(name, extra, net, x, y, seeds=seeds)
        assert not torch.is_grad_enabled()
    assert torch.is_grad_enabled()
    assert torch.equal(res.x_adv, ref.x_adv)


@pytest.mark.parametrize(("name", "extra"), CASES)
def test_x_requiring_grad_gets_none(name, extra, net, data):
    x, y, _, seeds = data
    ref = run(name, extra, net, x, y, seeds=seeds)
    xg = x.clone().requires_grad_(True)
    res = run(name, extra, net, xg, y, seeds=seeds)
    assert xg.grad is None and torch.equal(res.x_adv, ref.x_adv)


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("name", NAMES)
def test_training_batchnorm_refused(name, net, data):
    x, y, _, seeds = data
    model = copy.deepcopy(net).train()
    first_bn = next(p for p, m in model.named_modules() if isinstance(m, nn.BatchNorm2d))
    tensors = _tensors(model)
    with pytest.raises(ValueError, match=rf"module '{re.escape(first_bn)}' \(BatchNorm2d\)"):
        run(name, {}, model, x, y, seeds=seeds)
    assert model.training and _same_tensors(tensors, _tensors(model))


@pytest.mark.parametrize("name", NAMES)
def test_training_dropout_refused(name, net, data):
    x, y, _, seeds = data
    model = nn.Sequential(copy.deepcopy(net), nn.Dropout(0.5)).to(F64)
    model[1].train()
    state = torch.get_rng_state()
    with pytest.raises(ValueError, match=r"module '1' \(Dropout\)"):
        run(name, {}, model, x, y, seeds=seeds)
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("name", NAMES)
def test_dtype_mismatch_refused(name, net, data):
    x, y, _, seeds = data
    with pytest.raises(ValueError, match=r"x has dtype torch\.float16"):
        run(name, {}, net, x.half(), y, seeds=seeds)


class _NaNLogits(nn.Module):
    """Logits that are NaN for the images whose first pixel is above one half."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        bad = x[:, 0, 0, 0] > 0.5
        return torch.where(bad[:, None], torch.full_like(out, math.nan), out)


@pytest.mark.parametrize(("name", "extra"), CASES)
def test_nonfinite_logits_never_succeed(name, extra, net, data):
    x, y, _, seeds = data
    x = x.clone()
    x[::2, 0, 0, 0] = 0.9  # NaN logits for the even samples, wherever the attack goes
    x[1::2, 0, 0, 0] = 0.0
    res = run(name, extra, _NaNLogits(net), x, y, seeds=seeds)
    expected_finite = res.x_adv[:, 0, 0, 0] <= 0.5
    assert torch.equal(res.finite, expected_finite)
    assert not bool(res.success[~res.finite].any())
    assert bool(res.x_adv.isfinite().all())


# --------------------------------------------------------------------------- randomness


@pytest.mark.parametrize(("name", "extra"), CASES)
def test_generator_reproducible(name, extra, net, data):
    x, y, _, _ = data
    a = run(name, extra, net, x, y, generator=torch.Generator().manual_seed(5))
    b = run(name, extra, net, x, y, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.success, b.success)


@pytest.mark.parametrize(("name", "extra"), CASES)
def test_seed_dependence_matches_spec(name, extra, net, data):
    x, y, _, _ = data
    a = run(name, extra, net, x, y, generator=torch.Generator().manual_seed(5))
    c = run(name, extra, net, x, y, generator=torch.Generator().manual_seed(6))
    randomized = attacks.spec(name).randomized and hyper(name, extra).get("random_start", True)
    # Only randomized attacks may (and here must) depend on the seed.
    assert torch.equal(a.x_adv, c.x_adv) != bool(randomized)


def _per_sample_or_skip(name: str) -> None:
    if not attacks.spec(name).per_sample:
        pytest.skip("randomness per batch (documented for wrapped torchattacks classes)")


@pytest.mark.parametrize(("name", "extra"), CASES)
def test_sub_batches_give_the_same_result(name, extra, net, data):
    _per_sample_or_skip(name)
    x, y, target, seeds = data
    full = run(name, extra, net, x, y, target=target, seeds=seeds)
    parts = [
        run(name, extra, net, x[s], y[s], target=target[s], seeds=seeds[s])
        for s in (slice(0, 3), slice(3, 4), slice(4, N))
    ]
    torch.testing.assert_close(torch.cat([p.x_adv for p in parts]), full.x_adv, rtol=0, atol=1e-9)
    assert torch.equal(torch.cat([p.success for p in parts]), full.success)


@pytest.mark.parametrize(("name", "extra"), CASES)
def test_batch_order_does_not_matter(name, extra, net, data):
    _per_sample_or_skip(name)
    x, y, target, seeds = data
    full = run(name, extra, net, x, y, target=target, seeds=seeds)
    perm = torch.tensor([5, 2, 7, 0, 1, 6, 3, 4])
    shuffled = run(name, extra, net, x[perm], y[perm], target=target[perm], seeds=seeds[perm])
    torch.testing.assert_close(shuffled.x_adv, full.x_adv[perm], rtol=0, atol=1e-9)


@pytest.mark.parametrize("source", ["none", "seeds", "generator"])
@pytest.mark.parametrize(("name", "extra"), CASES)
def test_global_rng_untouched(name, extra, source, net, data):
    x, y, _, seeds = data
    kw = {"none": {}, "seeds": {"seeds": seeds}}.get(source, {})
    if source == "generator":
        kw = {"generator": torch.Generator().manual_seed(1)}
    state = torch.get_rng_state()
    run(name, extra, net, x, y, **kw)
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize(("name", "extra"), CASES)
def test_results_ignore_global_rng(name, extra, net, data):
    x, y, _, seeds = data
    state = torch.get_rng_state()
    try:
        torch.manual_seed(123)
        a = run(name, extra, net, x, y, seeds=seeds)
        torch.manual_seed(456)
        b = run(name, extra, net, x, y, seeds=seeds)
    finally:
        torch.set_rng_state(state)
    assert torch.equal(a.x_adv, b.x_adv)


# --------------------------------------------------------------------------- precision


@pytest.mark.parametrize(("name", "extra"), CASES)
def test_bfloat16_autocast(name, extra, net, data):
    """Under CPU autocast (bf16 logits) results stay valid: in the threat model, success
    consistent with the returned logits, float32 images."""
    x, y, _, seeds = data
    model, x32 = copy.deepcopy(net).float(), x.float()
    kw = hyper(name, extra)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        res = attacks.get(name)(model, x32, y, seeds=seeds, **kw)
    assert res.x_adv.dtype == torch.float32
    assert bool(attacks.spec(name).threat(kw).contains(res.x_adv, x32).all())
    assert torch.equal(res.success, _expected_success(res.logits, y, None))


# --------------------------------------------------------------------------- ConvBN modes


@pytest.mark.parametrize("mode", ["tune", "deploy", "frozen"])
@pytest.mark.parametrize(("name", "extra"), CASES)
def test_convbn_mode_matches_eval(name, extra, mode, net, data):
    """Through a converted model every attack gives Eval mode's examples (float64, CPU)."""
    x, y, target, seeds = data
    converted = advtune.tune(net, mode)
    ref = run(name, extra, net, x, y, target=target, seeds=seeds)
    res = run(name, extra, converted, x, y, target=target, seeds=seeds)
    assert torch.equal(res.success, ref.success)
    assert float((res.x_adv - ref.x_adv).abs().max()) <= 1e-6
    assert res.model_calls == ref.model_calls


# --------------------------------------------------------------------------- invalid input


def _bad_inputs(x, y, target) -> dict[str, tuple[dict, str]]:
    """Bad call arguments every attack rejects: label -> (overrides, message regex)."""
    nan_x = x.clone()
    nan_x[0, 0, 0, 0] = math.nan
    return {
        "x>1": ({"x": x + 0.5}, r"x must lie in \[0, 1\]"),
        "x<0": ({"x": x - 0.5}, r"x must lie in \[0, 1\]"),
        "x-nan": ({"x": nan_x}, "x must be finite"),
        "x-3d": ({"x": x[0]}, r"x must have shape \(N, C, H, W\)"),
        "x-int": ({"x": (x * 255).to(torch.uint8)}, "floating-point"),
        "x-empty": ({"x": x[:0], "y": y[:0]}, "at least one"),
        "y-too-big": ({"y": torch.full_like(y, K)}, f"y must be < num_classes = {K}, got {K}"),
        "y-negative": ({"y": y - 10}, "y must be >= 0"),
        "y-shape": ({"y": y[:3]}, rf"y must have shape \({N},\)"),
        "y-float": ({"y": y.double()}, "y must have an integer dtype"),
        "target-eq-y": ({"target": y.clone()}, "target must differ from y"),
        "target-shape": ({"target": target[:2]}, rf"target must have shape \({N},\)"),
        "target-range": ({"target": torch.full_like(y, 99)}, "target must be < num_classes"),
        "seeds-shape": ({"seeds": torch.arange(3)}, rf"seeds must have shape \({N},\)"),
        "seeds-float": ({"seeds": torch.rand(N)}, "seeds must be an integer tensor"),
        "generator": ({"generator": 3}, "generator must be a torch.Generator"),
        "model": ({"model": lambda z: z}, "model must be a torch.nn.Module"),
    }


def _bad_values(p: Param) -> list:
    """Values outside a declared parameter's type or bounds."""
    if p.type is bool:
        return ["yes"]
    if p.choices is not None:
        return ["not-a-choice"]
    if p.type is int and p.low is not None:
        return [p.minimum - 1, 2.5]
    if p.type is float and p.low is not None:
        return [p.low - 1.0, math.nan, "0.1"]
    return []


def _bad_hyperparameter_cases() -> list:
    cases = []
    for name in NAMES:
        for p in attacks.spec(name).params:
            for bad in _bad_values(p):
                cases.append(pytest.param(name, p.name, bad, id=f"{name}-{p.name}={bad!r}"))
    return cases


BAD_INPUTS = ("x>1", "x<0", "x-nan", "x-3d", "x-int", "x-empty", "y-too-big", "y-negative",
              "y-shape", "y-float", "target-eq-y", "target-shape", "target-range", "seeds-shape",
              "seeds-float", "generator", "model")  # fmt: skip


@pytest.mark.parametrize("case", BAD_INPUTS)
@pytest.mark.parametrize("name", NAMES)
def test_bad_input_raises(name, case, net, data):
    _skip_untargetable(name, case.startswith("target"))
    x, y, target, _ = data
    override, pattern = _bad_inputs(x, y, target)[case]
    call = {"model": net, "x": x, "y": y} | hyper(name) | override
    model, xx, yy = call.pop("model"), call.pop("x"), call.pop("y")
    with pytest.raises(ValueError, match=pattern):
        attacks.get(name)(model, xx, yy, **call)


@pytest.mark.parametrize(("name", "key", "bad"), _bad_hyperparameter_cases())
def test_bad_hyperparameter_raises_naming_it(name, key, bad, net, data):
    x, y, _, _ = data
    kw = hyper(name) | {key: bad}
    with pytest.raises(ValueError, match=rf"{key}\b.*{re.escape(repr(bad))}"):
        attacks.get(name)(net, x, y, **kw)


def test_bad_input_labels_cover_every_case(data):
    x, y, target, _ = data
    assert set(BAD_INPUTS) == set(_bad_inputs(x, y, target))


# --------------------------------------------------------------------------- registry


def test_registry_names_get_spec():
    names = attacks.names()
    assert names == sorted(names)
    assert {"fgsm", "pgd", "mifgsm", "cw_l2"} <= set(names)
    assert attacks.get("pgd") is attacks.pgd
    pgd = attacks.spec("pgd")
    assert (pgd.name, pgd.norm, pgd.uses_eps, pgd.randomized) == ("pgd", "linf", True, True)
    assert pgd.defaults["steps"] == 10 and pgd.defaults["step_size"] is None
    assert pgd.required == ("eps",) and pgd.radius_key == "eps"
    assert pgd.budget_keys == ("eps", "steps", "restarts")
    assert pgd.cost_keys == ("steps", "restarts")
    assert pgd.norm_of({"norm": "l2"}) == "l2" and pgd.norm_of({}) == "linf"
    assert pgd.threat({"eps": 0.5, "norm": "l2"}) == attacks.L2(0.5)
    cw = attacks.spec("cw_l2")
    # Every built-in attack declares its Params (the signature-derived spec is for adapters).
    assert (cw.norm, cw.uses_eps, cw.randomized, cw.declared) == ("l2", False, False, True)
    assert cw.threat({}) == attacks.L2(None)
    assert cw.defaults == {
        "steps": 100,
        "lr": 0.01,
        "initial_const": None,  # chosen from the number of rounds
        "binary_search_steps": 9,
        "kappa": 0.0,
        "abort_early": False,
        "warm_start": True,
    }
    assert set(cw.cost_keys) == {"steps", "binary_search_steps"}


@pytest.mark.parametrize("name", NAMES)
def test_spec_is_complete(name):
    spec = attacks.spec(name)
    assert not {"target", "generator", "seeds"} & {p.name for p in spec.params}
    assert spec.summary
    assert spec.threat(spec.cheap_hyperparameters()).name in attacks.threat_names()
    probe = spec.probe_hyperparameters(spec.cheap_hyperparameters())
    assert all(probe[k] == spec.param(k).minimum for k in spec.cost_keys)


def test_spec_parse_types_and_errors():
    spec = attacks.spec("pgd")
    assert spec.parse("steps", "20") == 20 and isinstance(spec.parse("steps", "20"), int)
    assert spec.parse("eps", "4/255") == 4 / 255
    assert spec.parse("step_size", "none") is None
    assert spec.parse("random_start", "false") is False
    assert spec.parse("norm", "l2") == "l2"
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        spec.parse("steps", "0")
    with pytest.raises(ValueError, match=r"steps must be a whole number, got '2\.5'"):
        spec.parse("steps", "2.5")
    with pytest.raises(ValueError, match="invalid steps 'abc': expected an integer"):
        spec.parse("steps", "abc")
    with pytest.raises(ValueError, match="unknown norm value 'l3'; choose from: l1, l2, linf"):
        spec.parse("norm", "l3")
    with pytest.raises(ValueError, match="random_start must be true or false, got 'maybe'"):
        spec.parse("random_start", "maybe")
    with pytest.raises(ValueError, match="'pgd' has no setting 'stepz'; did you mean: steps"):
        spec.parse("stepz", "3")
    with pytest.raises(ValueError, match="'cw_l2' takes no eps"):
        attacks.spec("cw_l2").parse("eps", "0.5")
    assert spec.param("steps").describe() == "steps: integer in [1, 1000000], default 10"
    assert spec.param("norm").describe() == "norm: one of l1, l2, linf, default 'linf'"
    untyped = Param("n_targets", object, None, nullable=True)
    assert untyped.parse("5") == 5 and untyped.parse("none") is None


def test_register_declared_params_validate_and_must_match_signature():
    def toy(model, x, y, *, eps, steps=4, target=None, generator=None, seeds=None):
        return steps

    declared = (Param("eps", float, low=0.0, role="radius"),
                Param("steps", int, 4, low=1, role="budget", cheap=1))  # fmt: skip
    fn = attacks.register("x_toy", params=declared)(toy)
    try:
        assert attacks.spec("x_toy").declared and attacks.get("x_toy") is fn
        assert fn(None, None, None, eps=1, steps=2) == 2
        with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
            fn(None, None, None, eps=1, steps=0)
        assert attacks.spec("x_toy").cheap_hyperparameters() == {"steps": 1, "eps": 4 / 255}
    finally:
        from advtune.attacks._registry import _ATTACKS

        _ATTACKS.pop("x_toy")
    with pytest.raises(ValueError, match=r"params .* must name each keyword-only"):
        attacks.register("x_toy2", params=declared[:1])(toy)
    with pytest.raises(ValueError, match=r"declares default 5 but the signature has 4"):
        attacks.register("x_toy3", params=(declared[0], Param("steps", int, 5, low=1)))(toy)
    assert not {"x_toy2", "x_toy3"} & set(attacks.names())


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown attack 'pgdd'; did you mean: pgd"):
        attacks.get("pgdd")
    with pytest.raises(ValueError, match="unknown attack 'nope'"):
        attacks.spec("nope")
    with pytest.raises(ValueError, match="'fgsm' is already registered"):
        attacks.register("fgsm")(attacks.fgsm)
    with pytest.raises(ValueError, match="norm must be one of"):
        attacks.register("x_bad_norm", norm="l3")

    def no_seeds(model, x, y, *, eps, target=None, generator=None):
        raise AssertionError

    with pytest.raises(ValueError, match="lacks keyword-only argument"):
        attacks.register("x_no_seeds")(no_seeds)

    def positional(model, x, y, eps, *, target=None, generator=None, seeds=None):
        raise AssertionError

    with pytest.raises(ValueError, match="positionally"):
        attacks.register("x_positional")(positional)
    assert not {"x_bad_norm", "x_no_seeds", "x_positional"} & set(attacks.names())


def test_restarts_without_random_start_refused(net, data):
    x, y, _, _ = data
    with pytest.raises(ValueError, match="restarts=3 without randomness"):
        attacks.pgd(net, x, y, eps=0.1, restarts=3, random_start=False)


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


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: attacks.random_target(torch.zeros(3, dtype=torch.long), 1),
         "num_classes must be an integer >= 2, got 1"),
        (lambda: attacks.random_target(torch.tensor([3, 10]), 10), r"y must lie in \[0, 10\)"),
        (lambda: attacks.random_target(torch.arange(5), 10, seeds=torch.arange(4)),
         "seeds must have shape"),
    ],
    ids=["classes", "range", "seeds"],
)  # fmt: skip
def test_random_target_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_least_likely_target(net, data):
    x, _, _, _ = data
    model = _odd_state(net)
    flags, tensors = _flags(model), _tensors(model)
    t = attacks.least_likely_target(model, x)
    with torch.no_grad():
        assert torch.equal(t, net(x).argmin(1))
    assert _flags(model) == flags and _same_tensors(tensors, _tensors(model))
    with pytest.raises(ValueError, match=r"x must lie in \[0, 1\]"):
        attacks.least_likely_target(net, x * 3)


def test_missing_torchattacks_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torchattacks", None)  # import now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'advtune\[torchattacks\]'") as info:
        attacks.torchattacks("PGD")
    assert isinstance(info.value, attacks.MissingDependencyError)
    assert isinstance(info.value, ValueError)  # a UserError: the CLI prints it as one line


@pytest.mark.parametrize("name", attacks.names())
def test_norm_key_is_the_hyperparameter_that_picks_the_threat_model(name):
    spec = attacks.spec(name)
    key = spec.norm_key
    if key is None:  # fixed to one threat model
        assert spec.norm_of({}) == spec.norm
        return
    for norm in ("linf", "l2"):
        assert spec.norm_of({key: norm}) == norm


def test_run_refuses_params_whose_norm_disagrees_with_the_config():
    from advtune.run.batch import attack_kwargs
    from advtune.run.spec import AttackConfig

    config = AttackConfig(attack="pgd", norm="l2", eps=(0.5,), params={"norm": "linf"})
    with pytest.raises(ValueError, match="params norm 'linf' disagrees with config norm 'l2'"):
        attack_kwargs(config, 0.5)
    assert attack_kwargs(AttackConfig(attack="pgd", norm="l2", eps=(0.5,)), 0.5)["norm"] == "l2"


def test_every_public_attack_module_is_imported_once_by_the_package():
    # The package imports its modules explicitly (no second pass through pkgutil): a new
    # attack module must be imported in advtune/attacks/__init__.py to register.
    import pkgutil
    import sys

    import advtune.attacks as package

    public = [m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_")]
    assert public
    missing = [m for m in public if f"advtune.attacks.{m}" not in sys.modules]
    assert not missing, f"not imported by advtune/attacks/__init__.py: {missing}"


@pytest.mark.parametrize("name", ["apgd", "apgd_t", "fab", "square", "autoattack", "fmn", "ddn"])
def test_builtin_attacks_declare_params_with_bounded_budgets(name):
    spec = attacks.spec(name)
    assert spec.declared
    for p in spec.params:
        if p.type in (int, float) and p.name != "eps":
            assert p.high is not None, (name, p.name)


def test_huge_budget_fails_naming_the_bound_before_any_work(net, data):
    x, y, _, _ = data
    with pytest.raises(ValueError, match=r"steps must lie in \[1, 1000000\], got 10000000000"):
        attacks.apgd(net, x, y, eps=0.01, steps=10**10)
    with pytest.raises(ValueError, match=r"restarts must lie in \[1, 1000\], got 5000"):
        attacks.fab(net, x, y, eps=0.01, restarts=5000)
