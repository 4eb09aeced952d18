"""``autoattack(version="fast")`` and its MALT-ranked APGD-T (``apgd_malt``)."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from fakes import linear_classifier, spy_autoattack_components

from advtune import attacks
from advtune.attacks import ModelCalls
from advtune.attacks._result import ModelGuard
from advtune.attacks.autoattack_fast import FAST, apgd_malt, malt_targets

aa_module = importlib.import_module("advtune.attacks.autoattack")
F64 = torch.float64


@pytest.mark.parametrize(
    "norm", ["linf", "l2", "l1", attacks.Linf(0.1), attacks.L2(0.5), attacks.L1(3.0)]
)
def test_malt_rank_is_the_linear_distance_to_each_boundary(norm):
    # The ensemble hands its components the threat object, not the name: both rank alike.
    # For logits z = W x the score (z_y - z_t) / ||w_y - w_t||_* is exactly the distance
    # to the boundary between y and t in the norm (ignoring the box).
    net = linear_classifier(0, size=4, classes=10).double()
    x = torch.rand(6, 3, 4, 4, generator=torch.Generator().manual_seed(2), dtype=F64)
    y = net(x).argmax(1)
    w = net[1].weight.double()
    z = net(x)
    dual = {"linf": 1, "l2": 2, "l1": float("inf")}[attacks.threat_model(norm).name]
    dist = (z.gather(1, y[:, None]) - z) / (w[y][:, None, :] - w[None]).norm(p=dual, dim=2)
    dist = dist.scatter(1, y[:, None], float("inf"))
    with ModelGuard(net, y=y, target=None) as guard:
        ranked = malt_targets(guard, x, y, norm=norm, n_targets=4, candidates=9)
        assert guard.counted() == ModelCalls(0, 10, 0, 60)  # z_y and 9 candidates
    assert torch.equal(ranked, dist.argsort(dim=1)[:, :4])


def test_malt_candidates_are_the_top_logits():
    net = linear_classifier(0, size=4, classes=10).double()
    x = torch.rand(5, 3, 4, 4, generator=torch.Generator().manual_seed(3), dtype=F64)
    y = net(x).argmax(1)
    with ModelGuard(net, y=y, target=None) as guard:
        ranked = malt_targets(guard, x, y, norm="linf", n_targets=3, candidates=3)
    top3 = net(x).scatter(1, y[:, None], float("-inf")).topk(3, dim=1).indices
    assert torch.equal(ranked.sort(dim=1).values, top3.sort(dim=1).values)
    assert not (ranked == y[:, None]).any()


def test_apgd_malt_with_a_target_is_apgd_t(digits):
    model, x, y = digits
    x, y = x[:6].double(), y[:6]
    model = copy.deepcopy(model).double()  # .double() is in place
    t = (y + 3) % 10
    a = apgd_malt(model, x, y, eps=8 / 255, steps=5, target=t, seeds=torch.arange(6))
    b = attacks.apgd_t(model, x, y, eps=8 / 255, steps=5, target=t, seeds=torch.arange(6))
    assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.success, b.success)


def test_apgd_malt_breaks_a_linear_model_just_past_its_distance():
    net = linear_classifier(0, size=4, classes=10).double()
    x = 0.25 + 0.5 * torch.rand(4, 3, 4, 4, generator=torch.Generator().manual_seed(4), dtype=F64)
    y = net(x).argmax(1)
    w, z = net[1].weight.double(), net(x)
    d = (z.gather(1, y[:, None]) - z) / (w[y][:, None, :] - w[None]).abs().sum(dim=2)
    d = d.scatter(1, y[:, None], float("inf")).amin(dim=1)
    for i in range(4):
        xi, yi = x[i : i + 1], y[i : i + 1]
        over = apgd_malt(net, xi, yi, eps=float(d[i]) * 1.01, steps=20, n_targets=1)
        under = apgd_malt(net, xi, yi, eps=float(d[i]) * 0.99, steps=20, n_targets=9)
        assert bool(over.success[0]) and not bool(under.success[0])


def test_fast_version_components_budgets_and_overrides(monkeypatch):
    seen = spy_autoattack_components(monkeypatch)
    net = linear_classifier(0, size=4, classes=10)
    x = torch.rand(4, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    y = net(x).argmax(1)
    res = attacks.autoattack(net, x, y, eps=0.0, version="fast", steps=3, queries=5)
    assert res.version == "fast" and res.components == ("apgd-ce", "apgd-malt", "square")
    common = {"eps": 0.0, "norm": attacks.Linf(0.0)}  # the ensemble hands on its threat object
    assert seen == [
        ("apgd", common | FAST["apgd-ce"] | {"steps": 3, "loss": "ce"}),
        ("apgd_malt", common | FAST["apgd-malt"] | {"steps": 3}),
        ("square", common | {"queries": 5, "p_init": 0.8}),
    ]
    assert res.calls == sum(res.component_cost, ModelCalls(2, 1, 8, 4))


def test_fast_apgd_ce_stage_is_the_standard_one(digits):
    # Same component, budget and per-sample seeds: the same images fall to APGD-CE.
    model, x, y = digits
    x, y = x[:24], y[:24]
    kw = {"eps": 2 / 255, "steps": 10, "n_targets": 2, "queries": 20, "seeds": torch.arange(24)}
    fast = attacks.autoattack(model, x, y, version="fast", **kw)
    std = attacks.autoattack(model, x, y, **kw)
    assert torch.equal(fast.broken_by == 0, std.broken_by == 0)
    assert fast.component_cost[0] == std.component_cost[0]


# --------------------------------------------------------------------------- the command line


@pytest.mark.parametrize(
    "how",
    [
        ["--attack", "autoattack", "--eps", "4/255", "-p", "version=fast"],
        ["--preset", "autoattack-fast-imagenet-linf"],
    ],
)
def test_fast_from_the_cli_reports_version_and_cost_and_resumes(how, tmp_path, capsys, monkeypatch):
    import json

    from fakes import write_run_inputs
    from stophook import installed

    from advtune.cli import main
    from advtune.storage import read_manifest

    data, ckpt = write_run_inputs(tmp_path / "in")
    out = tmp_path / "o"
    argv = [
        "evaluate", "--model", "resnet18", "--weights", str(ckpt), "--data", str(data),
        "--out", str(out), "--image-size", "32", "--batch-size", "2", "--workers", "0",
        *how, "-p", "steps=2", "-p", "queries=5", "--limit", "4",
    ]  # fmt: skip
    with installed("1"):  # interrupted after the first batch
        assert main(argv) == 130
    assert main([*argv, "--resume"]) == 0, capsys.readouterr().err
    captured = capsys.readouterr()
    report = json.loads((out / "report.json").read_text())
    assert list(report["metrics"]["robust_after"]) == ["clean", "apgd-ce", "apgd-malt", "square"]
    cost = report["cost"]
    assert cost["versions"] == ["fast"] and set(cost["components"]) == {
        "apgd-ce", "apgd-malt", "square",
    }  # fmt: skip
    sessions = report["timings"]["sessions"]
    assert [s["images"] for s in sessions] == [2, 2]
    for key in ("forward_images", "gradient_images"):
        assert cost[key] == sum(s["cost"].get(key, 0) for s in sessions)
    # At least the clean pass and the re-check of each image.
    assert cost["images"] == 4 and cost["per_image"]["forward_images"] >= 2
    assert "autoattack version fast · model calls per image:" in captured.out
    assert len(read_manifest(out / "manifest.csv")) == 4


def test_evaluate_defaults_to_autoattack(tmp_path, capsys):
    import json

    from fakes import write_run_inputs

    from advtune.cli import main

    data, ckpt = write_run_inputs(tmp_path / "in")
    out = tmp_path / "o"
    argv = [
        "evaluate", "--model", "resnet18", "--weights", str(ckpt), "--data", str(data),
        "--out", str(out), "--image-size", "32", "--batch-size", "2", "--workers", "0",
        "-p", "steps=2", "-p", "queries=5", "-p", "n_targets=2", "--limit", "2",
    ]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["attack"]["attack"] == "autoattack"
    assert report["cost"]["versions"] == ["standard"]


def test_fast_version_refuses_l1():
    # Measured for L∞ and L2 only; L1's official components need restarts and large_eps.
    net = linear_classifier(0, size=4, classes=10)
    x = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(5))
    y = net(x).argmax(1)
    with pytest.raises(ValueError, match="version 'fast' is for norm linf or l2, got norm 'l1'"):
        attacks.autoattack(net, x, y, eps=3.0, norm="l1", version="fast")
