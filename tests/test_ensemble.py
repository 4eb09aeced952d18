"""ModelEnsemble: the documented averages in float64, the refusals, load_ensemble."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from modelzoo import tiny_bn_net
from torch import nn

from advtune import attacks
from advtune.errors import UserError
from advtune.models import ImageClassifier, Preprocess
from advtune.models.ensemble import ModelEnsemble, load_ensemble

pytestmark = pytest.mark.filterwarnings("ignore:weights='random'")


class TinyNet(nn.Module):
    """Conv→BN→ReLU→linear on 8×8 images (factories "test_ensemble:tiny_a"/"tiny_b")."""

    advtune_input_size = 8

    def __init__(self, seed: int, classes: int = 10) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, classes)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            self.bn.running_mean.uniform_(-0.5, 0.5, generator=g)
            self.bn.running_var.uniform_(0.5, 2.0, generator=g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc(x.mean(dim=(2, 3)))


def tiny_a() -> nn.Module:
    return TinyNet(1)


def tiny_b() -> nn.Module:
    return TinyNet(2)


def tiny_five() -> nn.Module:
    return TinyNet(3, classes=5)


def _member(seed: int, *, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.25), classes=5, cats=None):
    net = tiny_bn_net(classes)
    with torch.no_grad():  # another member: other weights, same architecture
        g = torch.Generator().manual_seed(seed)
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    model = ImageClassifier(
        net, mean=mean, std=std, num_classes=classes, name=f"m{seed}", weights=f"w{seed}",
        categories=cats, preprocess=Preprocess(crop_size=8, resize_size=None),
    )  # fmt: skip
    return model.double().eval().requires_grad_(False)


@pytest.fixture
def pair():
    # Different normalisations: each member keeps its own.
    return _member(1), _member(2, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def _x(n=6):
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(9), dtype=torch.float64)


def test_logits_is_the_weighted_mean_of_logits_float64(pair):
    x = _x()
    ens = ModelEnsemble(pair, weights=[1.0, 3.0])
    assert ens.member_weights == (0.25, 0.75)
    expected = 0.25 * pair[0](x) + 0.75 * pair[1](x)
    torch.testing.assert_close(ens(x), expected, rtol=1e-13, atol=1e-13)
    # Default weights: the plain mean.
    torch.testing.assert_close(
        ModelEnsemble(pair)(x), (pair[0](x) + pair[1](x)) / 2, rtol=1e-13, atol=1e-13
    )


def test_probs_is_the_log_of_the_weighted_mean_of_probabilities_float64(pair):
    x = _x()
    ens = ModelEnsemble(pair, weights=[2, 1], combine="probs")
    p = (2 * pair[0](x).softmax(1) + pair[1](x).softmax(1)) / 3
    out = ens(x)
    torch.testing.assert_close(out, p.log(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.softmax(1), p, rtol=1e-12, atol=1e-12)
    # Cross-entropy on the output is that of the averaged prediction, gradients included.
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    xa = x.clone().requires_grad_(True)
    (g_ens,) = torch.autograd.grad(F.cross_entropy(ens(xa), y), xa)
    xb = x.clone().requires_grad_(True)
    p_b = (2 * pair[0](xb).softmax(1) + pair[1](xb).softmax(1)) / 3
    (g_ref,) = torch.autograd.grad(F.nll_loss(p_b.log(), y), xb)
    torch.testing.assert_close(g_ens, g_ref, rtol=1e-10, atol=1e-12)


def test_zero_weight_drops_a_member(pair):
    x = _x()
    for combine in ("logits", "probs"):
        out = ModelEnsemble(pair, weights=[0, 1], combine=combine)(x)
        ref = pair[1](x) if combine == "logits" else pair[1](x).log_softmax(1)
        torch.testing.assert_close(out, ref, rtol=1e-13, atol=1e-13)


def test_attacks_take_an_ensemble_like_a_model(pair):
    x, y = _x(4), torch.tensor([0, 1, 2, 3])
    ens = ModelEnsemble(pair)
    res = attacks.pgd(ens, x, y, eps=8 / 255, steps=3, generator=torch.Generator().manual_seed(0))
    assert res.x_adv.shape == x.shape and float(res.linf.max()) <= 8 / 255 + 1e-12
    torch.testing.assert_close(res.logits, ens(res.x_adv).to(res.logits.dtype))
    fgsm = attacks.fgsm(ens, x, y, eps=4 / 255)  # the gradient is that of the average
    xg = x.clone().requires_grad_(True)
    loss = F.cross_entropy((pair[0](xg) + pair[1](xg)) / 2, y)
    (g,) = torch.autograd.grad(loss, xg)
    assert torch.equal(fgsm.x_adv, (x + 4 / 255 * g.sign()).clamp(0, 1))


def test_refusals_are_one_line(pair):
    cases = [
        (lambda: ModelEnsemble([]), "at least one model"),
        (lambda: ModelEnsemble([pair[0], "x"]), "member 1 must be an nn.Module"),
        (lambda: ModelEnsemble(pair, combine="loss"), "loss average"),
        (lambda: ModelEnsemble(pair, combine="mean"), "'mean'"),
        (lambda: ModelEnsemble(pair, weights=[1]), "one value per model (2)"),
        (lambda: ModelEnsemble(pair, weights=[1, -1]), "-1"),
        (lambda: ModelEnsemble(pair, weights=[0, 0]), "all be 0"),
        (lambda: ModelEnsemble(pair, weights=[1, float("nan")]), "nan"),
        (lambda: ModelEnsemble([pair[0], _member(3, classes=6)]), "m1: 5, m3: 6"),
    ]
    for build, text in cases:
        with pytest.raises(ValueError, match=None) as info:
            build()
        assert text in str(info.value) and "\n" not in str(info.value)


def test_class_order_must_agree():
    a = _member(1, cats=[f"c{i}" for i in range(5)])
    b = _member(2, cats=[f"c{i}" for i in (1, 0, 2, 3, 4)])
    with pytest.raises(ValueError, match="m1 and m2 list their classes in a different order"):
        ModelEnsemble([a, b])
    same = ModelEnsemble([a, _member(3, cats=list(a.categories)), _member(4)])
    assert same.categories == a.categories and same.num_classes == 5


def test_describe_names_every_member(pair):
    ens = ModelEnsemble(pair, weights=[1, 3], combine="probs")
    d = ens.describe()
    assert d["combine"] == "probs" and d["name"] == "ensemble(m1+m2)"
    assert [(m["name"], m["weights"], m["weight"]) for m in d["members"]] == [
        ("m1", "w1", 0.25),
        ("m2", "w2", 0.75),
    ]


def test_load_ensemble_frozen_members_same_gradients_as_eval():
    names = ["test_ensemble:tiny_a", "test_ensemble:tiny_b"]
    frozen = load_ensemble(names, member_weights=[1, 2]).double()
    plain = load_ensemble(names, member_weights=[1, 2], convbn="eval").double()
    assert [m.convbn for m in frozen.members] == ["frozen", "frozen"]
    assert frozen.convbn == "frozen" and plain.convbn == "eval"
    assert frozen.num_classes == 10
    x = _x(3)
    y = torch.tensor([1, 2, 3])
    grads = []
    for ens in (frozen, plain):
        xg = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(ens(xg), y), xg)
        grads.append(g)
    # load_model folds BN into the convs in float32 (before .double()): float32 rounding.
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-7)
    # The ensemble's input-gradient equals the average of its members' by construction.
    xg = x.clone().requires_grad_(True)
    m = plain.members
    (g_ref,) = torch.autograd.grad(F.cross_entropy((m[0](xg) + 2 * m[1](xg)) / 3, y), xg)
    torch.testing.assert_close(grads[1], g_ref, rtol=1e-12, atol=1e-14)


def test_load_ensemble_refusals():
    with pytest.raises(UserError, match="at least one model"):
        load_ensemble([])
    with pytest.raises(UserError, match="got 3 weights for 2"):
        load_ensemble(["test_ensemble:tiny_a", "test_ensemble:tiny_b"], weights=["a", "b", "c"])
    with pytest.raises(UserError, match="combine"):
        load_ensemble(["test_ensemble:tiny_a"], combine="loss")
    with pytest.raises(UserError, match="disagree on the number of classes"):
        load_ensemble(["test_ensemble:tiny_a", "test_ensemble:tiny_five"])


def test_bench_ensemble_memory_figures(tmp_path, capsys):
    import json

    from advtune.bench import ensemble_bench, main

    out = tmp_path / "ens.json"
    rc = main(["--ensemble", "resnet18,resnet18,resnet18", "--modes", "eval,frozen",
               "--size", "32", "--no-peak", "--device", "cpu", "--json", str(out)])  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "ensemble of 3 (resnet18, resnet18, resnet18)" in printed
    assert "frozen ensemble saves" in printed
    rows = json.loads(out.read_text())["rows"]
    for mode in ("eval", "frozen"):
        one, ens = rows[mode]["one"], rows[mode]["ensemble"]
        # Three members save at most three times one (the shared input is saved once).
        assert 2 * one < ens <= 3 * one + 1e-9
    assert rows["frozen"]["ensemble"] < rows["eval"]["ensemble"] / 4
    with pytest.raises(UserError, match="two or more"):
        ensemble_bench(["resnet18"], size=32, device="cpu")
