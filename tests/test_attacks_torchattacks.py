"""Cross-checks against torchattacks 3.5 and the torchattacks adapter.

torchattacks keeps the input dtype (it only moves tensors to the model's device; checked
in .venv/.../torchattacks/attacks/{fgsm,pgd,pgdl2,mifgsm}.py), so the comparisons run in
float64. The update rules are the same with two differences:

* torchattacks averages the loss over the batch where advtune sums it. Signs do not
  change, so FGSM, PGD and MI-FGSM are bit-identical.
* PGDL2 divides the batch-averaged gradient by its norm plus 1e-10: a sample whose
  gradient norm is not far above 1e-10 · N (a saturated softmax) takes a shorter step
  there. advtune's step is exactly ``step_size · g / ‖g‖`` (foolbox's rule). On the tiny
  model below the gradients are large and PGDL2 agrees to 1e-6; on saturated samples it
  does not (``test_pgdl2_steps_shorter_on_saturated_samples``).

advtune keeps a successful iterate when the last one fails (torchattacks returns the
last), so images are compared where torchattacks succeeds or advtune fails.
"""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch
from digits import digits_model, digits_test_set
from modelzoo import tiny_bn_net as tiny_net
from torch import nn

from advtune import attacks

ta = pytest.importorskip("torchattacks")
pytestmark = pytest.mark.torchattacks

F64 = torch.float64


@pytest.fixture(scope="module")
def setup():
    net = tiny_net()
    gen = torch.Generator().manual_seed(7)
    x = torch.rand(16, 3, 8, 8, generator=gen, dtype=F64)
    x[:2, :, :3] = 0.0  # include pixels on the box boundary
    x[2:4, :, :3] = 1.0
    with torch.no_grad():
        y = net(x).argmax(1)
    target = (y + 1 + torch.arange(16) % 4) % 5
    return net, x, y, target


def _ta_run(atk, x, y, target=None):
    if target is not None:
        atk.set_mode_targeted_by_label(quiet=True)
        return atk(x, target)
    return atk(x, y)


CROSS = [
    ("FGSM", {"eps": 8 / 255}, "fgsm", {"eps": 8 / 255}),
    (
        "PGD",
        {"eps": 8 / 255, "alpha": 2 / 255, "steps": 10, "random_start": False},
        "pgd",
        {"eps": 8 / 255, "step_size": 2 / 255, "steps": 10, "random_start": False},
    ),
    (
        "PGDL2",
        {"eps": 0.5, "alpha": 0.1, "steps": 10, "random_start": False},
        "pgd",
        {"eps": 0.5, "step_size": 0.1, "steps": 10, "norm": "l2", "random_start": False},
    ),
    (
        "MIFGSM",
        {"eps": 8 / 255, "alpha": 2 / 255, "steps": 10, "decay": 1.0},
        "mifgsm",
        {"eps": 8 / 255, "step_size": 2 / 255, "steps": 10, "decay": 1.0},
    ),
]


@pytest.mark.parametrize("targeted", [False, True], ids=["untargeted", "targeted"])
@pytest.mark.parametrize(("ta_name", "ta_kw", "name", "kw"), CROSS, ids=[c[0] for c in CROSS])
def test_matches_torchattacks(ta_name, ta_kw, name, kw, targeted, setup):
    net, x, y, target = setup
    t = target if targeted else None
    expected = _ta_run(getattr(ta, ta_name)(net, **ta_kw), x.clone(), y, t)
    res = attacks.get(name)(net, x, y, target=t, **kw)
    assert expected.dtype == F64
    with torch.no_grad():
        pred = net(expected).argmax(1)
    theirs = pred == t if targeted else pred != y
    same = theirs | ~res.success  # elsewhere advtune kept an earlier successful iterate
    assert float((res.x_adv[same] - expected[same]).abs().max()) <= 1e-6
    assert bool((res.success >= theirs).all())
    # The adapter runs the same class and returns the same images.
    adapted = attacks.torchattacks(ta_name, **ta_kw)(net, x, y, target=t)
    assert torch.equal(adapted.x_adv, expected)
    assert torch.equal(adapted.success, theirs)
    assert adapted.model_calls == res.model_calls  # steps + the final evaluation


@pytest.mark.parametrize("margin", [20.0, 25.0])
def test_pgdl2_steps_shorter_on_saturated_samples(margin):
    """A linear model whose softmax is saturated (logit margin 20–25): the CE gradient
    norm is ~1e-9..1e-11, and torchattacks' +1e-10 shortens its step; advtune's is exact."""
    lin = nn.Sequential(nn.Flatten(), nn.Linear(16, 2)).to(F64).eval()
    with torch.no_grad():
        lin[1].weight.copy_(torch.stack([torch.zeros(16), torch.ones(16)]).to(F64))
        lin[1].bias.copy_(torch.tensor([0.0, margin - 8.0], dtype=F64))  # z1 − z0 = margin
    x = torch.full((4, 1, 4, 4), 0.5, dtype=F64)
    y = torch.ones(4, dtype=torch.long)
    kw = {"eps": 0.5, "steps": 1, "random_start": False}
    ours = attacks.pgd(lin, x, y, norm="l2", step_size=0.1, **kw)
    theirs = ta.PGDL2(lin, alpha=0.1, **kw)(x, y)
    torch.testing.assert_close(ours.l2, torch.full((4,), 0.1, dtype=F64), rtol=1e-12, atol=0)
    assert float((theirs - x).flatten(1).norm(dim=1).max()) < 0.1 * 0.99


def test_adapter_hygiene_and_rng(setup):
    net, x, y, _ = setup
    model = copy.deepcopy(net)
    model[8].train()  # harmless odd flag: torchattacks' model.eval()/train() must not stick
    model[0].weight.requires_grad_(False)
    flags = [m.training for m in model.modules()]
    grads = [p.requires_grad for p in model.parameters()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch_rng, np_rng, py_rng = torch.get_rng_state(), np.random.get_state(), random.getstate()
    pgd = attacks.torchattacks("pgd", eps=8 / 255, alpha=2 / 255, steps=3)  # random start on
    a = pgd(model, x, y, seeds=torch.arange(16))
    b = pgd(model, x, y, seeds=torch.arange(16))
    c = pgd(model, x, y, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.x_adv, b.x_adv) and not torch.equal(a.x_adv, c.x_adv)
    assert float(a.linf.max()) <= 8 / 255 + 1e-12
    assert [m.training for m in model.modules()] == flags
    assert [p.requires_grad for p in model.parameters()] == grads
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch_rng, torch.get_rng_state())
    assert random.getstate() == py_rng
    np_now = np.random.get_state()
    assert np_now[0] == np_rng[0] and np.array_equal(np_now[1], np_rng[1])
    assert "PGD" in repr(pgd)


def test_adapter_cw_leaves_no_parameter_grad(setup):
    net, x, y, _ = setup
    model = copy.deepcopy(net).requires_grad_(True)  # CW calls cost.backward()
    res = attacks.torchattacks("CW", c=1.0, steps=5)(model, x, y)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert res.model_calls >= 2


def test_adapter_errors(setup):
    net, x, y, _ = setup
    with pytest.raises(ValueError, match="unknown torchattacks attack 'PGDD'; did you mean"):
        attacks.torchattacks("PGDD")
    with pytest.raises(ValueError, match="bad arguments for torchattacks PGD"):
        attacks.torchattacks("PGD", epsilon=0.1)
    with pytest.raises(ValueError, match="y must be < num_classes"):
        attacks.torchattacks("FGSM")(net, x, torch.full_like(y, 5))
    with pytest.raises(ValueError, match="target must differ from y"):
        attacks.torchattacks("FGSM")(net, x, y, target=y)


def test_cw_l2_beats_torchattacks_cw_with_equal_steps(request):
    """Same total gradient steps (5 × 50 vs 250): success ≥ and median L2 ≤ torchattacks CW.

    torchattacks' CW has no binary search (fixed c = 1, its documented advice), pins
    pixels at exactly 0 or 1 (atanh(±1) = ±inf; the digits images are 29% zeros) and
    uses ``max((1 − onehot)·z)`` for the runner-up logit.
    """
    model = digits_model(getattr(request.config, "cache", None))
    x, y = digits_test_set()
    with torch.no_grad():
        right = model(x).argmax(1) == y
    x, y = x[right][:48], y[right][:48]
    ours = attacks.cw_l2(model, x, y, steps=50, binary_search_steps=5)
    theirs = attacks.torchattacks("CW", c=1.0, kappa=0.0, steps=250, lr=0.01)(model, x, y)
    assert float(ours.success.float().mean()) >= float(theirs.success.float().mean())
    assert float(ours.l2[ours.success].median()) <= float(theirs.l2[theirs.success].median())


def test_registered_names_and_norm_spelling(setup):
    net, x, y, _ = setup
    fn = attacks.get("torchattacks:apgd")
    assert fn is attacks.get("torchattacks:APGD") and "torchattacks:APGD" in attacks.names()
    spec = attacks.spec("torchattacks:APGD")
    assert spec.radius_key == "eps" and {"steps", "n_restarts"} <= set(spec.cost_keys)
    assert spec.threat({"norm": "l2", "eps": 0.5}) == attacks.L2(0.5)
    res = fn(net, x, y, eps=0.5, norm="l2", steps=2)  # advtune's spelling, mapped to "L2"
    assert float(res.l2.max()) <= 0.5 * (1 + 1e-9)
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        fn(net, x, y, steps=0)
    with pytest.raises(ValueError, match="unknown torchattacks attack 'nope'"):
        attacks.get("torchattacks:nope")
