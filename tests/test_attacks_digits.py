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
    kw = spec.cheap_hyperparameters()
    if spec.radius_key is not None:
        kw[spec.radius_key] = {"linf": EPS, "l2": 0.5}[spec.threat(kw).name]
    ref = attacks.get(name)(ref_model, xs, ys, seeds=seeds, **kw)
    res = attacks.get(name)(tuned, xs, ys, seeds=seeds, **kw)
    assert torch.equal(res.success, ref.success)
    assert float((res.x_adv - ref.x_adv).abs().max()) <= 1e-6
    assert bool(ref.success.any())


def l2_start_table(models, x, y, *, eps: float, steps: int, seed_sets: int = 3) -> dict:
    """Robust accuracy of PGD-L2 per model and random-start distribution (mean over
    ``seed_sets`` sets of per-sample seeds): ``{(model_index, start): accuracy}``."""
    from advtune.attacks import L2

    table = {}
    for m, model in enumerate(models):
        for start in ("volume", "radius", "none"):
            threat = L2(start="volume" if start == "none" else start)
            accs = []
            for s in range(seed_sets if start != "none" else 1):
                res = attacks.pgd(
                    model, x, y, eps=eps, norm=threat, steps=steps,
                    random_start=start != "none", seeds=torch.arange(len(y)) + 1000 * s,
                )  # fmt: skip
                accs.append(float((~res.success).float().mean()))
            table[(m, start)] = sum(accs) / len(accs)
    return table


@pytest.mark.slow
def test_l2_random_start_choice(digits):
    """On two digits CNNs the L2 random start PGD uses (``L2().start``) leaves no more robust
    accuracy than the other distribution (+1 point of noise). The table, with no random
    start for comparison, is printed (``-s``) and quoted in docs/attacks.md."""
    from digits import DigitsCNN, train_digits_cnn

    from advtune.attacks import L2

    model, x, y, correct = digits
    second = DigitsCNN()
    second.load_state_dict(train_digits_cnn(seed=1))
    second.eval().requires_grad_(False)
    xs, ys = x[correct], y[correct]
    table = l2_start_table([model, second], xs, ys, eps=0.35, steps=10)
    for key, acc in sorted(table.items()):
        print(f"model {key[0]} start {key[1]:<6} robust accuracy {acc:.4f}")
    default = L2().start
    other = "volume" if default == "radius" else "radius"
    for m in (0, 1):
        assert table[(m, default)] <= table[(m, other)] + 0.01, table
