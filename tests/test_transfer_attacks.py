"""Transfer attacks (advtune.attacks.transfer): identities, torchattacks cross-checks, and
the measured transfer gain on the digits models.

torchattacks 3.5 (read in .venv/.../torchattacks/attacks/{difgsm,tifgsm,sinifgsm,vmifgsm,
vnifgsm}.py) averages the loss over the batch where advtune sums it; with a batch of 16
(a power of two) that scaling is exact, and every update divides by the mean absolute
gradient, so the images agree to rounding. torchattacks draws DI's transform and VT's
neighbours from the global RNG for the whole batch; advtune draws them per sample. The
cross-checks therefore switch DI off, and feed both implementations the same VT
neighbours (:func:`_shared_noise`). Where torchattacks deviates from the papers the
docstrings of advtune.attacks.transfer and docs/transfer.md say so.

Run as a script for the table in docs/transfer.md::

    OMP_NUM_THREADS=1 .venv/bin/python tests/test_transfer_attacks.py
"""

from __future__ import annotations

import pytest
import torch
from digits import digits_model, digits_test_set

from advtune import attacks
from advtune.attacks import transfer

F64 = torch.float64
TRANSFER = ("di_fgsm", "ti_fgsm", "si_ni_fgsm", "vmi_fgsm", "vni_fgsm", "admix",
            "mi_di_ti_fgsm", "transfer_fgsm")  # fmt: skip
EPS = 8 / 255
ALPHA = 2 / 255


@pytest.fixture(scope="module")
def digits64(request):
    """The digits CNN in float64 and 16 test images it classifies (a power-of-two batch)."""
    model = digits_model(getattr(request.config, "cache", None)).double()
    x, y = digits_test_set()
    return model, x[:16].double(), y[:16]


def _agree(res, theirs, model, y, *, atol=1e-9):
    """advtune's images equal torchattacks' where torchattacks' last iterate succeeds or
    advtune fails (elsewhere advtune may return an earlier successful iterate)."""
    with torch.no_grad():
        won = model(theirs).argmax(1) != y
    same = won | ~res.success
    assert bool(same.any())
    assert float((res.x_adv[same] - theirs[same]).abs().max()) <= atol
    assert bool((res.success >= won).all())


# --------------------------------------------------------------------------- registry


def test_registered_with_declared_params():
    for name in TRANSFER:
        spec = attacks.spec(name)
        assert spec.declared and spec.norm == "linf" and spec.radius_key == "eps"
        assert spec.defaults["steps"] == 10 and spec.defaults["step_size"] is None
    assert attacks.spec("admix").per_sample is False
    assert all(attacks.spec(n).per_sample for n in TRANSFER if n != "admix")
    d = attacks.spec("vmi_fgsm").defaults
    assert (d["samples"], d["beta"], d["decay"]) == (20, 1.5, 1.0)  # Wang & He 2021
    d = attacks.spec("mi_di_ti_fgsm").defaults
    assert (d["diversity_prob"], d["kernel_size"], d["nsig"]) == (0.5, 15, 3.0)
    assert attacks.spec("si_ni_fgsm").defaults["scale_copies"] == 5  # Lin et al. 2020
    d = attacks.spec("admix").defaults
    assert (d["admix_copies"], d["admix_strength"], d["scale_copies"]) == (3, 0.2, 5)


def test_even_kernel_refused(digits64):
    model, x, y = digits64
    with pytest.raises(ValueError, match="kernel_size must be odd, got 4"):
        attacks.get("ti_fgsm")(model, x, y, eps=EPS, kernel_size=4)
    with pytest.raises(ValueError, match="kernel_size must lie in \\[1, 63\\], got 65"):
        attacks.get("ti_fgsm")(model, x, y, eps=EPS, kernel_size=65)


# --------------------------------------------------------------------------- identities


@pytest.mark.parametrize("decay", [1.0, 0.0], ids=["mi", "i"])
def test_di_without_diversity_is_mifgsm(digits64, decay):
    model, x, y = digits64
    ref = attacks.mifgsm(model, x, y, eps=EPS, step_size=ALPHA, decay=decay)
    res = attacks.get("di_fgsm")(
        model,
        x,
        y,
        eps=EPS,
        step_size=ALPHA,
        decay=decay,
        diversity_prob=0.0,
        seeds=torch.arange(16),
    )
    assert torch.equal(res.x_adv, ref.x_adv) and torch.equal(res.success, ref.success)
    assert res.model_calls == ref.model_calls


def test_vmi_with_zero_radius_is_mifgsm(digits64):
    """β = 0: every neighbour is the iterate, v = ∇ − ∇ = 0 exactly."""
    model, x, y = digits64
    ref = attacks.mifgsm(model, x, y, eps=EPS, step_size=ALPHA)
    res = attacks.get("vmi_fgsm")(model, x, y, eps=EPS, step_size=ALPHA, samples=2, beta=0.0)
    assert torch.equal(res.x_adv, ref.x_adv)
    res0 = attacks.get("vmi_fgsm")(model, x, y, eps=EPS, step_size=ALPHA, samples=0)
    assert torch.equal(res0.x_adv, ref.x_adv)


def test_admix_without_copies_is_si_mi(digits64):
    model, x, y = digits64
    kw = {"eps": EPS, "step_size": ALPHA, "scale_copies": 3}
    ref = attacks.get("transfer_fgsm")(model, x, y, **kw)
    res = attacks.get("admix")(model, x, y, admix_copies=0, seeds=torch.arange(16), **kw)
    assert torch.equal(res.x_adv, ref.x_adv)


def test_admix_partners_have_other_labels():
    y = torch.tensor([0, 0, 1, 2, 2, 2])
    x = torch.zeros(6, 1, 2, 2, dtype=F64)
    recipe = transfer.Recipe(admix_copies=4)
    est = transfer._Estimator(
        None, x, y, None, torch.arange(6), recipe=recipe, eps=0.1, step_size=0.01,  # type: ignore[arg-type]
        model_dtype=F64,
    )  # fmt: skip
    partners = est._partners(torch.arange(6))
    assert partners.shape == (6, 4)
    assert bool((y[partners] != y[:, None]).all())
    alone = transfer._Estimator(
        None, x[:1], y[:1], None, torch.arange(1), recipe=recipe, eps=0.1, step_size=0.01,  # type: ignore[arg-type]
        model_dtype=F64,
    )  # fmt: skip
    assert torch.equal(alone._partners(torch.arange(1)), torch.zeros(1, 4, dtype=torch.long))


def test_diverse_inputs_resize_and_pad():
    x = torch.rand(3, 2, 10, 10, dtype=F64, generator=torch.Generator().manual_seed(0))
    draws = torch.tensor([[0.9, 0.0, 0.0, 0.0], [0.1, 0.0, 0.0, 0.0], [0.1, 0.99, 0.5, 0.5]])
    # rate < 1: resize into [8, 10), pad back to 10; image 0 is left alone (0.9 >= p).
    out, applied = transfer.diverse_inputs(x, draws, diversity_prob=0.5, resize_rate=0.8)
    assert applied.tolist() == [False, True, True] and out.shape == x.shape
    assert torch.equal(out[0], x[0])
    shrunk = torch.nn.functional.interpolate(x[1:2], size=(8, 8), mode="bilinear")
    assert torch.equal(out[1, :, :8, :8], shrunk[0])  # offset (0, 0): zeros right, below
    assert float(out[1, :, 8:].abs().max()) == 0.0 and float(out[1, :, :, 8:].abs().max()) == 0.0
    # size 9 (u = 0.99), offset floor(0.5 · 2) = 1: one zero row and column on each side.
    assert float(out[2, :, 0].abs().max()) == 0.0 and float(out[2, :, :, 0].abs().max()) == 0.0
    none, flags = transfer.diverse_inputs(x, draws, diversity_prob=0.0, resize_rate=1.1)
    assert none is x and not bool(flags.any())
    # rate > 1: the padded image is resized back to the input size.
    big, _ = transfer.diverse_inputs(x, draws, diversity_prob=1.0, resize_rate=1.5)
    assert big.shape == x.shape and bool(big.isfinite().all())


def test_full_composition_is_per_sample_and_in_the_ball(digits64):
    """Every transform but Admix on: sub-batches and order give the same images."""
    model, x, y = digits64
    kw = {"eps": EPS, "steps": 3, "nesterov": True, "diversity_prob": 0.7, "kernel_size": 5,
          "scale_copies": 2, "samples": 2}  # fmt: skip
    seeds = torch.arange(50, 66)
    run = attacks.get("transfer_fgsm")
    full = run(model, x, y, seeds=seeds, **kw)
    parts = [run(model, x[s], y[s], seeds=seeds[s], **kw) for s in (slice(0, 5), slice(5, 16))]
    torch.testing.assert_close(torch.cat([p.x_adv for p in parts]), full.x_adv, rtol=0, atol=1e-12)
    assert bool(attacks.Linf(EPS).contains(full.x_adv, x).all())
    other = run(model, x, y, seeds=seeds + 1, **kw)
    assert not torch.equal(other.x_adv, full.x_adv)
    assert full.model_calls == 3 * 2 * (1 + 2) + 1  # steps × copies × (1 + neighbours) + 1


# --------------------------------------------------------------------------- torchattacks


@pytest.fixture(scope="module")
def ta():
    return pytest.importorskip("torchattacks")


@pytest.mark.torchattacks
@pytest.mark.parametrize(("size", "nsig"), [(1, 3.0), (3, 1.0), (7, 3.0), (15, 3.0), (9, 2.5)])
def test_kernel_matches_torchattacks(ta, size, nsig):
    atk = ta.TIFGSM(torch.nn.Identity(), len_kernel=size, nsig=nsig)
    ours = transfer.gaussian_kernel(size, nsig)
    theirs64 = torch.from_numpy(atk.gkern(size, nsig))  # their formula in float64
    torch.testing.assert_close(ours, theirs64, rtol=0, atol=1e-15)
    # The kernel TIFGSM convolves with: three float32 copies of the same.
    stacked = atk.stacked_kernel
    assert stacked.shape == (3, 1, size, size)
    torch.testing.assert_close(stacked[1, 0].double(), ours, rtol=1e-6, atol=1e-9)


def _float64_kernel(atk) -> None:
    # TIFGSM stores a float32 kernel, and conv2d refuses to mix it with float64 gradients:
    # give it its own formula in float64 (equal to advtune's, test above).
    k = torch.from_numpy(atk.gkern(atk.len_kernel, atk.nsig))
    atk.stacked_kernel = k.expand(3, 1, *k.shape).contiguous()


@pytest.mark.torchattacks
@pytest.mark.parametrize("decay", [0.0, 1.0], ids=["ti", "ti-mi"])
def test_ti_matches_torchattacks_without_diversity(ta, digits64, decay):
    model, x, y = digits64
    atk = ta.TIFGSM(model, eps=EPS, alpha=ALPHA, steps=10, decay=decay, len_kernel=7, nsig=3,
                    diversity_prob=0.0)  # fmt: skip
    _float64_kernel(atk)
    with torch.random.fork_rng(devices=[]):  # TIFGSM draws (unused) DI numbers globally
        theirs = atk(x.clone(), y)
    res = attacks.get("ti_fgsm")(model, x, y, eps=EPS, step_size=ALPHA, decay=decay, kernel_size=7)
    _agree(res, theirs, model, y)


@pytest.mark.torchattacks
def test_mi_di_ti_matches_torchattacks_without_diversity(ta, digits64):
    model, x, y = digits64
    atk = ta.TIFGSM(model, eps=EPS, alpha=ALPHA, decay=1.0, len_kernel=15, diversity_prob=0.0)
    _float64_kernel(atk)
    with torch.random.fork_rng(devices=[]):
        theirs = atk(x.clone(), y)
    res = attacks.get("mi_di_ti_fgsm")(
        model, x, y, eps=EPS, step_size=ALPHA, diversity_prob=0.0, seeds=torch.arange(16)
    )
    _agree(res, theirs, model, y)


@pytest.mark.torchattacks
@pytest.mark.parametrize("m", [1, 5])
def test_si_ni_matches_torchattacks(ta, digits64, m):
    model, x, y = digits64
    theirs = ta.SINIFGSM(model, eps=EPS, alpha=ALPHA, steps=10, decay=1.0, m=m)(x.clone(), y)
    res = attacks.get("si_ni_fgsm")(model, x, y, eps=EPS, step_size=ALPHA, scale_copies=m)
    # Nesterov never evaluates the iterate itself: advtune returns the last iterate too.
    torch.testing.assert_close(res.x_adv, theirs, rtol=0, atol=1e-9)


class _Uniform:
    """Stands in for ``torch.randn_like(images)``: its ``uniform_(lo, hi)`` returns the
    next shared uniforms mapped to [lo, hi] (lo = −hi in VMI/VNI)."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def uniform_(self, lo, hi):
        return (2 * next(self.stream) - 1) * hi


def _shared_noise(monkeypatch, shape, count):
    """Make torchattacks and advtune draw the same VT neighbours, in order."""
    gen = torch.Generator().manual_seed(11)
    noise = [torch.rand(shape, dtype=F64, generator=gen) for _ in range(count)]
    theirs, ours = iter(noise), iter(noise)
    monkeypatch.setattr(torch, "randn_like", lambda images: _Uniform(theirs))

    def ball(gens, shape_, eps, like):
        return (2 * next(ours) - 1) * eps

    monkeypatch.setattr(transfer, "uniform_linf_ball", ball)


@pytest.mark.torchattacks
@pytest.mark.parametrize(("ta_name", "name"), [("VMIFGSM", "vmi_fgsm"), ("VNIFGSM", "vni_fgsm")])
def test_variance_tuning_matches_torchattacks_with_shared_neighbours(
    ta, digits64, ta_name, name, monkeypatch
):
    model, x, y = digits64
    steps, n = 10, 3
    kw = {"eps": EPS, "steps": steps, "decay": 1.0, "beta": 1.5}
    _shared_noise(monkeypatch, x.shape, steps * n)
    theirs = getattr(ta, ta_name)(model, alpha=ALPHA, N=n, **kw)(x.clone(), y)
    monkeypatch.undo()
    _shared_noise(monkeypatch, x.shape, steps * n)
    res = attacks.get(name)(model, x, y, step_size=ALPHA, samples=n, **kw)
    monkeypatch.undo()
    assert not torch.equal(theirs, attacks.mifgsm(model, x, y, eps=EPS, step_size=ALPHA).x_adv)
    if name == "vni_fgsm":  # Nesterov: the last iterate, as torchattacks
        torch.testing.assert_close(res.x_adv, theirs, rtol=0, atol=1e-9)
    else:
        _agree(res, theirs, model, y)


# --------------------------------------------------------------------------- transfer


TRANSFER_EPS = 16 / 255
#: Targets: the surrogate's architecture with another seed, and two other architectures.
TARGETS = {"cnn seed 1": ("cnn", 1), "wide CNN": ("wide", 0), "MLP": ("mlp", 0)}
#: TI's kernel for 32-pixel images (Dong et al.'s 15 is for 299-pixel ones).
DIGITS_KERNEL = 5


def transfer_rates(cache=None, runs=None) -> dict[str, dict[str, float]]:
    """Transfer success per attack and target: fooled / correctly classified clean by the
    target, on the 200 digits test images, crafted on the digits CNN (seed 0)."""
    surrogate = digits_model(cache)
    targets = {k: digits_model(cache, architecture=a, seed=s) for k, (a, s) in TARGETS.items()}
    x, y = digits_test_set()
    seeds = torch.arange(len(y))
    if runs is None:
        runs = {
            "I-FGSM": ("mifgsm", {"decay": 0.0}),
            "mi_di_ti_fgsm": ("mi_di_ti_fgsm", {"kernel_size": DIGITS_KERNEL}),
        }
    out = {}
    for label, (name, kw) in runs.items():
        res = attacks.get(name)(surrogate, x, y, eps=TRANSFER_EPS, seeds=seeds, **kw)
        row = {"surrogate": float(res.success.float().mean())}
        for tname, model in targets.items():
            with torch.no_grad():
                clean_ok = model(x).argmax(1) == y
                fooled = model(res.x_adv).argmax(1) != y
            row[tname] = float((fooled & clean_ok).sum()) / float(clean_ok.sum())
        out[label] = row
    return out


@pytest.mark.slow
def test_composed_attack_transfers_better_than_ifgsm(request):
    """Measured (docs/transfer.md): on the digits CNN of seed 1, MI-DI-TI-FGSM fools
    about 0.49 of the images against I-FGSM's 0.29 at eps 16/255, 10 steps."""
    rates = transfer_rates(getattr(request.config, "cache", None))
    base, composed = rates["I-FGSM"], rates["mi_di_ti_fgsm"]
    assert base["surrogate"] >= 0.99 and composed["surrogate"] >= 0.99
    assert composed["cnn seed 1"] >= base["cnn seed 1"] + 0.1, rates
    assert all(composed[t] >= base[t] for t in TARGETS), rates


# Every attack of the table in docs/transfer.md, with the settings used there.
TABLE = {
    "I-FGSM (`mifgsm` decay 0)": ("mifgsm", {"decay": 0.0}),
    "`mifgsm`": ("mifgsm", {}),
    "`di_fgsm`": ("di_fgsm", {}),
    "`di_fgsm` decay 1 (M-DI²)": ("di_fgsm", {"decay": 1.0}),
    f"`ti_fgsm` kernel {DIGITS_KERNEL}": ("ti_fgsm", {"kernel_size": DIGITS_KERNEL}),
    "`si_ni_fgsm`": ("si_ni_fgsm", {}),
    "`vmi_fgsm`": ("vmi_fgsm", {}),
    "`vni_fgsm`": ("vni_fgsm", {}),
    "`admix` (batch of 200)": ("admix", {}),
    f"`mi_di_ti_fgsm` kernel {DIGITS_KERNEL}": ("mi_di_ti_fgsm", {"kernel_size": DIGITS_KERNEL}),
    "`mi_di_ti_fgsm` (kernel 15)": ("mi_di_ti_fgsm", {}),
}


if __name__ == "__main__":
    table = transfer_rates(runs=TABLE)
    cols = ["surrogate", *TARGETS]
    print("| attack | " + " | ".join(cols) + " |")
    print("|---|" + "---:|" * len(cols))
    for label, row in table.items():
        print(f"| {label} | " + " | ".join(f"{row[c]:.3f}" for c in cols) + " |")
