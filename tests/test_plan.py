"""The run plan (``advtune.run.plan``): checked on construction, nothing loaded."""

from __future__ import annotations

import pytest

from advtune.errors import UserError
from advtune.run.plan import DataPlan, ModelPlan, RunPlan, plan_attack


def _plan(**kwargs):
    base = dict(
        command="generate",
        attack=plan_attack(attack="fgsm", eps=[4 / 255]),
        model=ModelPlan(names=("resnet18",), weights="random"),
        out_dir="out",
    )
    return RunPlan(**{**base, **kwargs})


def test_plan_is_plain_data_and_completes_into_the_run_spec(tmp_path):
    plan = _plan(out_dir=tmp_path / "o", batch_size="auto", num_workers=0)
    spec = plan.spec(batch_size=5, context={"k": 1})
    assert (spec.batch_size, spec.num_workers, spec.out_dir) == (5, 0, tmp_path / "o")
    assert spec.attack is plan.attack and spec.context == {"k": 1}
    assert not (tmp_path / "o").exists()  # a plan touches no file


def test_evaluate_defaults_to_autoattack_and_generate_needs_an_attack():
    assert plan_attack(command="evaluate", eps=[4 / 255]).attack == "autoattack"
    with pytest.raises(UserError, match="no attack given"):
        plan_attack(command="generate", eps=[4 / 255])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"norm": "l3"}, "l3"),
        ({"attack": "pgd", "norm": "l2"}, None),  # pgd takes a norm: accepted
        ({"attack": "cw_l2", "norm": "linf"}, "is l2 only, got --norm linf"),
    ],
)
def test_norm_flag(kwargs, message):
    if message is None:
        assert plan_attack(eps=[0.5], **kwargs).norm == "l2"
        return
    with pytest.raises(UserError, match=message):
        plan_attack(eps=[0.5], **kwargs)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"batch_size": 0}, "batch size must be >= 1, got 0"),
        ({"resume": True, "overwrite": True}, "--resume and --overwrite exclude each other"),
        ({"attack": plan_attack(attack="fgsm", eps=[0.5 / 255])}, "below 1/255"),
    ],
)
def test_plan_refuses_what_it_can_check_without_loading(change, message):
    with pytest.raises(UserError, match=message):
        _plan(**change)


def test_model_plan_checks_ensemble_flags_and_the_convbn_mode():
    with pytest.raises(UserError, match="need two or more --model"):
        ModelPlan(names=("resnet18",), ensemble_combine="probs")
    with pytest.raises(UserError, match=r"unknown ConvBN mode 'nosuch'"):
        ModelPlan(names=("resnet18",), convbn="nosuch")
    with pytest.raises(UserError, match="no model given"):
        ModelPlan(names=())
    from advtune.models import DEFAULT_CONVBN

    plan = ModelPlan(names=("resnet18", "resnet34"), ensemble_weights=(1.0, 2.0))
    assert plan.convbn == DEFAULT_CONVBN
    assert plan.key["model"] == "resnet18+resnet34"


def test_data_plan_defaults_to_the_bundled_sample():
    assert DataPlan().root is None


def test_a_stored_run_without_recorded_defaults_still_matches():
    """``scripts/imagenet_robustness.py`` skips a finished cell by this comparison; a
    report written before every default was recorded must still count as finished."""
    from advtune.run.outputs import stored_run_matches

    current = {"attack": plan_attack(attack="pgd", eps=[4 / 255]).to_dict(), "data": {"n": 2}}
    older = {**current, "attack": {**current["attack"], "params": {}}}
    assert stored_run_matches(current, current) and stored_run_matches(older, current)
    changed = {**current, "attack": {**current["attack"], "params": {"steps": 3}}}
    assert not stored_run_matches(changed, current)
    assert not stored_run_matches({**current, "data": {"n": 3}}, current)
    assert not stored_run_matches(None, current) and not stored_run_matches([1], current)
