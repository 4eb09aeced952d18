"""Every model call counted: forward-only and forward+backward apart, with the images each
processed, in ``AttackResult.calls``, ``EnsembleResult.component_cost`` and the report."""

from __future__ import annotations

import pytest
import torch
from fakes import TensorImages, linear_classifier
from torch import nn

from advtune import attacks
from advtune.attacks import AttackResult, ModelCalls
from advtune.run import AttackConfig, RunSpec, format_summary
from advtune.run import run as run_spec
from advtune.run.batch import merge_cost


class Recorder(nn.Module):
    """Records ``(images, with_gradient)`` of every forward pass of the wrapped model."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.passes = net, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.passes.append((x.shape[0], torch.is_grad_enabled() and x.requires_grad))
        return self.net(x)

    def expected(self) -> ModelCalls:
        fwd = [n for n, g in self.passes if not g]
        grad = [n for n, g in self.passes if g]
        return ModelCalls(len(fwd), len(grad), sum(fwd), sum(grad))


def _robust(n_classes: int = 10) -> nn.Module:
    # Class 0 wins by 100 logits whatever the input: nothing breaks, every step runs.
    lin = nn.Linear(12, n_classes)
    with torch.no_grad():
        lin.weight.copy_(torch.linspace(-0.01, 0.01, 12 * n_classes).view(n_classes, 12))
        lin.bias.zero_()
        lin.bias[0] = 100.0
    return nn.Sequential(nn.Flatten(), lin).eval().requires_grad_(False)


pytestmark = pytest.mark.filterwarnings("ignore::advtune.attacks._masking.GradientMaskingWarning")

X = torch.rand(5, 3, 2, 2, generator=torch.Generator().manual_seed(0))
Y = torch.zeros(5, dtype=torch.long)


@pytest.mark.parametrize(("steps", "restarts"), [(1, 1), (4, 3), (7, 2)])
def test_pgd_counts_exactly(steps, restarts):
    res = attacks.pgd(
        _robust(), X, Y, eps=0.03, steps=steps, restarts=restarts, seeds=torch.arange(5)
    )
    assert not res.success.any()
    # Per run: one gradient per step and one final evaluation, on all 5 images.
    assert res.calls == ModelCalls(restarts, restarts * steps, 5 * restarts, 5 * restarts * steps)
    assert res.model_calls == res.calls.total


def test_apgd_fgsm_square_count_exactly():
    seeds = torch.arange(5)
    apgd = attacks.apgd(_robust(), X, Y, eps=0.03, steps=6, seeds=seeds)
    assert apgd.calls == ModelCalls(0, 7, 0, 35)  # the start and 6 steps; no extra evaluation
    fgsm = attacks.fgsm(_robust(), X, Y, eps=0.03)
    assert fgsm.calls == ModelCalls(1, 1, 5, 5)
    square = attacks.square(_robust(), X, Y, eps=0.03, queries=7, seeds=seeds)
    assert square.calls.gradient == 0 and square.calls.forward == square.model_calls


CASES = [
    ("pgd", {"eps": 0.1, "steps": 3, "restarts": 2}),
    ("apgd", {"eps": 0.1, "steps": 5}),
    ("apgd_t", {"eps": 0.1, "steps": 4, "n_targets": 2}),
    ("fab", {"eps": 0.1, "steps": 3}),
    ("square", {"eps": 0.1, "queries": 20}),
    ("fgsm", {"eps": 0.1}),
    ("cw_l2", {"steps": 5, "binary_search_steps": 2}),
    ("autoattack", {"eps": 0.1, "steps": 3, "n_targets": 2, "queries": 10}),
]


@pytest.mark.parametrize(("name", "kw"), CASES, ids=[c[0] for c in CASES])
def test_counts_match_what_the_model_saw(name, kw):
    # Some images break and drop out, so sub-batch calls are counted too.
    net = Recorder(linear_classifier(0, size=4, classes=5))
    x = torch.rand(6, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    y = net.net(x).argmax(1)
    res = attacks.get(name)(net, x, y, seeds=torch.arange(6), **kw)
    assert res.calls == net.expected()
    assert res.model_calls == len(net.passes)


def test_ensemble_counts_per_component():
    net = Recorder(linear_classifier(0, size=4, classes=5))
    x = torch.rand(6, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    y = net.net(x).argmax(1)
    res = attacks.autoattack(
        net, x, y, eps=0.05, steps=3, n_targets=2, queries=10, seeds=torch.arange(6)
    )
    assert len(res.component_cost) == len(res.components)
    assert [c.total for c in res.component_cost] == list(res.component_calls)
    own = res.calls
    for c in res.component_cost:
        own = ModelCalls(
            own.forward - c.forward, own.gradient - c.gradient,
            own.forward_images - c.forward_images, own.gradient_images - c.gradient_images,
        )  # fmt: skip
    # The ensemble's own: clean pass and its repeat, one gradient check, no final
    # evaluation (the components' logits are reused).
    assert own == ModelCalls(2, 1, 12, 6)


def test_result_refuses_inconsistent_counts():
    with pytest.raises(ValueError, match=r"calls\.total"):
        AttackResult(
            X, Y.bool(), torch.zeros(5, 2), Y.float(), Y.float(), 3, calls=ModelCalls(1, 1)
        )


def test_torchattacks_adapter_splits_calls():
    pytest.importorskip("torchattacks")
    net = Recorder(_robust())
    res = attacks.torchattacks("PGD", eps=0.03, alpha=0.01, steps=3)(net, X, Y)
    assert res.calls == net.expected()
    assert res.calls.gradient == 3


def test_merge_cost_adds_numbers_merges_dicts_unions_lists():
    a = {"forward": 1, "components": {"apgd-ce": {"forward": 2}}, "versions": ["fast"]}
    b = {
        "forward": 3,
        "gradient": 1,
        "components": {"apgd-ce": {"forward": 1}, "square": {"forward": 5}},
        "versions": ["standard"],
    }
    assert merge_cost(a, None, b) == {
        "forward": 4,
        "gradient": 1,
        "components": {"apgd-ce": {"forward": 3}, "square": {"forward": 5}},
        "versions": ["fast", "standard"],
    }


def test_report_counts_every_call(tmp_path):
    ds = TensorImages(5)
    config = AttackConfig(attack="fgsm", norm="linf", eps=(1 / 255, 4 / 255))
    spec = RunSpec(
        attack=config, out_dir=tmp_path / "o", command="evaluate", save_images=False,
        batch_size=5, num_workers=0,
    )  # fmt: skip
    # One batch of 5: a smaller last batch would be padded, and padding is work counted.
    report = run_spec(spec, linear_classifier(0, size=8, classes=5), ds)
    cost = report["cost"]
    # Per batch: the clean pass; per eps FGSM's gradient and evaluation and the re-check.
    assert cost["gradient_images"] == 2 * 5 and cost["forward_images"] == 5 * (1 + 2 * 2)
    assert cost["per_image"] == {"forward_images": 5.0, "gradient_images": 2.0}
    assert report["timings"]["sessions"][0]["cost"]["gradient"] == 2
    assert "model calls per image: 5.0 forward, 2.0 forward+backward" in format_summary(report)


def test_ensemble_result_names_its_version():
    net = linear_classifier(0, size=4, classes=5)
    x = torch.rand(3, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    y = net(x).argmax(1)
    res = attacks.autoattack(
        net, x, y, eps=0.01, version="rand", steps=2, eot_iter=1, seeds=torch.arange(3)
    )
    assert res.version == "rand"
    custom = attacks.autoattack(net, x, y, eps=0.01, attacks=["fgsm"], seeds=torch.arange(3))
    assert custom.version == "custom"
