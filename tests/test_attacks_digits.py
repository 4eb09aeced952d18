"""Real data: attacks on a BatchNorm CNN trained on scikit-learn's digits (32×32 RGB).

The model (see ``tests/digits.py``) reaches about 98% test accuracy; it is trained once
per session (seconds) and cached under pytest's cache directory.
"""

from __future__ import annotations

import copy

import pytest
import torch
from digits import digits_model, digits_test_set

import advtune
from advtune import attacks

EPS = 4 / 255  # moderate for these images: FGSM keeps some accuracy, PGD almost none


@pytest.fixture(scope="session")
def digits(request):
    model = digits_model(getattr(request.config, "cache", None))
    x, y = digits_test_set()
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    return model, x, y, correct


def test_clean_accuracy(digits):
    _, _, _, correct = digits
    assert float(correct.float().mean()) >= 0.95


def test_pgd_drives_accuracy_near_zero_fgsm_less_so(digits):
    model, x, y, correct = digits
    seeds = torch.arange(len(y))
    pgd = attacks.pgd(model, x, y, eps=EPS, steps=20, seeds=seeds)
    fgsm = attacks.fgsm(model, x, y, eps=EPS)
    pgd_acc = float((~pgd.success).float().mean())
    fgsm_acc = float((~fgsm.success).float().mean())
    assert pgd_acc <= 0.03, pgd_acc
    assert fgsm_acc >= pgd_acc + 0.05, (fgsm_acc, pgd_acc)
    assert float(pgd.linf.max()) <= EPS + 1e-6 and float(fgsm.linf.max()) <= EPS + 1e-6
    # Robust accuracy never exceeds clean accuracy by more than the label noise of success.
    assert pgd_acc <= float(correct.float().mean())


def test_cw_l2_succeeds_on_correctly_classified(digits):
    model, x, y, correct = digits
    xs, ys = x[correct][:64], y[correct][:64]
    res = attacks.cw_l2(model, xs, ys, steps=50, binary_search_steps=5)
    assert float(res.success.float().mean()) >= 0.95
    # Minimum-norm attack: its successes are far smaller than PGD's L∞ budget in L2 terms.
    assert float(res.l2[res.success].median()) < EPS * (3 * 32 * 32) ** 0.5


@pytest.mark.parametrize("name", attacks.names())
def test_eval_and_tune_agree(digits, name):
    """Every attack gives the same examples through the Tune-mode model (float64)."""
    model, x, y, _ = digits
    ref_model = copy.deepcopy(model).double()  # the session model stays float32
    tuned = advtune.tune(ref_model, "tune")
    xs, ys = x[:32].double(), y[:32]
    seeds = torch.arange(32)
    spec = attacks.spec(name)
    kw: dict = {"eps": EPS if spec.norm == "linf" else 0.5} if spec.uses_eps else {}
    if name == "cw_l2":
        kw |= {"steps": 30, "binary_search_steps": 3}
    if "queries" in spec.defaults:  # score-based attacks: a short budget keeps this fast
        kw["queries"] = 50
    if name == "fab":
        kw["steps"] = 10
    ref = attacks.get(name)(ref_model, xs, ys, seeds=seeds, **kw)
    res = attacks.get(name)(tuned, xs, ys, seeds=seeds, **kw)
    assert torch.equal(res.success, ref.success)
    assert float((res.x_adv - ref.x_adv).abs().max()) <= 1e-6
    assert bool(ref.success.any())
