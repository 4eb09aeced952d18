"""Presets (attacks/*.toml), number parsing and attack-setting resolution."""

from __future__ import annotations

import pytest

from advtune import attacks
from advtune.errors import UserError
from advtune.presets import (
    list_presets,
    load_preset,
    parse_int,
    parse_number,
    parse_number_list,
    parse_value,
    preset_names,
    resolve_attack,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("4/255", 4 / 255), (" 8 / 255 ", 8 / 255), ("0.5", 0.5), ("1e-3", 1e-3), (".25", 0.25),
     ("0.4/255", 0.4 / 255), ("3", 3.0), (2, 2.0), (0.5, 0.5), ("-1", -1.0)],
)  # fmt: skip
def test_parse_number(text, expected):
    assert parse_number(text) == pytest.approx(expected, rel=0, abs=0)


@pytest.mark.parametrize("text", ["", "abc", "4/0", "inf", "nan", "1/2/3", "4//255", True])
def test_parse_number_rejects(text):
    with pytest.raises(UserError, match="invalid"):
        parse_number(text, what="eps")


def test_parse_int_and_lists():
    assert parse_int("20/2") == 10
    assert parse_int(7) == 7
    with pytest.raises(UserError, match="whole number"):
        parse_int("2.5")
    assert parse_number_list("1/255,2/255, 4/255") == [1 / 255, 2 / 255, 4 / 255]
    assert parse_number_list(["1/255", 0.5]) == [1 / 255, 0.5]
    with pytest.raises(UserError, match="empty item"):
        parse_number_list("1/255,,2/255")


def test_parse_value_types():
    assert parse_value("3") == 3 and isinstance(parse_value("3"), int)
    assert parse_value("4/255") == 4 / 255
    assert parse_value("true") is True and parse_value("False") is False
    assert parse_value("none") is None
    assert parse_value("margin") == "margin"
    assert parse_value("linf") == "linf"


def test_shipped_presets_load_and_resolve():
    names = preset_names()
    assert {"imagenet-linf-pgd", "imagenet-l2-pgd", "fgsm", "cw-l2", "mifgsm"} <= set(names)
    for preset in list_presets():
        assert preset.attack in attacks.names()
        assert preset.description
        config = resolve_attack(preset=preset.name)  # every setting is valid for its attack
        assert config.attack == preset.attack


def test_linf_pgd_preset_values():
    config = resolve_attack(preset="imagenet-linf-pgd")
    assert config.attack == "pgd" and config.norm == "linf"
    assert config.eps == (4 / 255,)
    assert config.params["steps"] == 10
    assert config.params["step_size"] == 1 / 255
    l2 = resolve_attack(preset="imagenet-l2-pgd")
    assert l2.norm == "l2" and l2.eps == (0.5,)
    cw = resolve_attack(preset="cw-l2")
    assert cw.eps is None and cw.norm == "l2" and cw.eps_values() == (None,)


def test_flags_override_preset():
    config = resolve_attack(
        "pgd",
        preset="imagenet-linf-pgd",
        eps=[8 / 255],
        overrides={"steps": 3, "step_size": None},  # None means "not given"
        targeted="random",
        seed=5,
    )
    assert config.eps == (8 / 255,)
    assert config.params["steps"] == 3
    assert config.params["step_size"] == 1 / 255  # from the preset
    assert config.targeted == "random" and config.seed == 5


def test_user_preset_file(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('attack = "pgd"\neps = ["1/255", "2/255"]\nsteps = 3\nrestarts = 2\n')
    preset = load_preset(str(path))
    assert preset.eps == (1 / 255, 2 / 255)
    config = resolve_attack(preset=path)
    assert config.params == {"steps": 3, "restarts": 2}
    assert config.eps == (1 / 255, 2 / 255)


def test_defaults_without_preset():
    config = resolve_attack("pgd")
    assert config.eps == (4 / 255,) and config.params == {}
    config = resolve_attack("pgd", overrides={"norm": "l2"})
    assert config.eps == (0.5,) and config.norm == "l2"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"attack": "pgdd"}, "unknown attack 'pgdd'; did you mean: pgd"),
        ({"attack": None}, "no attack given"),
        ({"preset": "imagenet-linf-pdg"}, "unknown preset 'imagenet-linf-pdg'; did you mean"),
        ({"preset": "missing/file.toml"}, "preset file 'missing/file.toml' not found"),
        ({"attack": "fgsm", "preset": "cw-l2"}, "preset 'cw-l2' is for attack 'cw_l2'"),
        ({"attack": "pgd", "eps": [-0.1]}, "eps must be >= 0, got -0.1"),
        ({"attack": "pgd", "eps": [1.5]}, "eps 1.5 is out of range"),
        ({"attack": "pgd", "eps": [0.1, 0.1]}, "distinct"),
        ({"attack": "cw_l2", "eps": [0.5]}, "'cw_l2' takes no eps"),
        ({"attack": "pgd", "overrides": {"steps": 0}}, "steps must be >= 1, got 0"),
        ({"attack": "pgd", "overrides": {"step_size": -1.0}}, "step_size must be > 0"),
        ({"attack": "pgd", "overrides": {"norm": "l3"}}, "unknown norm value 'l3'"),
        (
            {"attack": "pgd", "overrides": {"norm": 3}},
            "norm must be one of 'l1', 'l2', 'linf'; got 3",
        ),
        ({"attack": "pgd", "overrides": {"eps": "4/255"}}, "eps is the budget of attack 'pgd'"),
        ({"attack": "pgd", "overrides": {"steps": "abc"}}, "invalid steps 'abc': expected an"),
        ({"attack": "pgd", "overrides": {"steps": 2.5}}, "steps must be an integer, got 2.5"),
        ({"attack": "cw_l2", "overrides": {"eps": 0.5}}, "'cw_l2' takes no eps"),
        ({"attack": "pgd", "overrides": {"stepz": 3}}, "no setting 'stepz'; did you mean: steps"),
        ({"attack": "fgsm", "overrides": {"steps": 3}}, "'fgsm' has no setting 'steps'"),
        ({"attack": "pgd", "targeted": "all"}, "targeted must be one of"),
        ({"attack": "pgd", "seed": -1}, "seed must be a non-negative integer"),
    ],
)
def test_resolve_errors(kwargs, match):
    attack = kwargs.pop("attack", None)
    with pytest.raises(UserError, match=match.replace("(", r"\(")):
        resolve_attack(attack, **kwargs)


def test_torchattacks_names_resolve_against_their_spec():
    pytest.importorskip("torchattacks")
    config = resolve_attack("torchattacks:APGD", overrides={"steps": "5", "norm": "l2"})
    assert config.norm == "l2" and config.params == {"steps": 5, "norm": "l2"}
    assert config.eps == (8 / 255,)  # the class's own default eps
    with pytest.raises(UserError, match="'torchattacks:APGD' has no targeted mode"):
        resolve_attack("torchattacks:APGD", targeted="random")


def test_bad_preset_files(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("attack = \n")
    with pytest.raises(UserError, match="invalid preset"):
        load_preset(bad)
    no_attack = tmp_path / "none.toml"
    no_attack.write_text("eps = 0.1\n")
    with pytest.raises(UserError, match="must set attack"):
        load_preset(no_attack)
    bad_eps = tmp_path / "eps.toml"
    bad_eps.write_text('attack = "pgd"\neps = "four"\n')
    with pytest.raises(UserError, match="'four'"):
        load_preset(bad_eps)
