"""Attack presets (``attacks/*.toml``) and the resolution of attack settings.

A preset is a small TOML file naming an attack and its settings::

    description = "ImageNet L∞ PGD-10: eps 4/255, step 1/255"
    attack = "pgd"
    eps = "4/255"          # a number, a fraction string, or a list of them
    norm = "linf"
    steps = 10
    step_size = "1/255"

``attack``, ``description``, ``eps`` (the attack's threat-model radius, whatever its
spec calls it) and ``targeted`` (``"random"`` or ``"least-likely"``) are reserved keys;
every other key is a hyperparameter declared in the attack's spec. Strings that read as
numbers (``"4/255"``, ``"1e-3"``) become numbers.

:func:`resolve_attack` merges, in increasing priority, the attack's own defaults, a
preset and explicit overrides (command-line flags; raw strings are parsed with
:meth:`advtune.attacks.AttackSpec.parse`), validates everything against the attack's
declared :class:`~advtune.attacks.Param` s and threat model, and returns an
:class:`advtune.run.spec.AttackConfig`. Nothing here knows a hyperparameter by name.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from advtune._numbers import NUMBER_RE, parse_int, parse_number, parse_number_list, parse_value
from advtune._resources import presets_dir
from advtune.errors import UserError, suggest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = [
    "TARGETED_MODES",
    "Preset",
    "list_presets",
    "load_preset",
    "parse_int",
    "parse_number",
    "parse_number_list",
    "parse_value",
    "preset_names",
    "resolve_attack",
]

#: Accepted values of ``targeted`` (``None`` means untargeted).
TARGETED_MODES: tuple[str, ...] = ("random", "least-likely")

# Keys of a preset file that are not attack keyword arguments.
_RESERVED = frozenset({"attack", "description", "eps", "targeted"})


def _coerce_preset_value(value: Any) -> Any:
    if isinstance(value, str) and NUMBER_RE.match(value):
        return parse_number(value)
    return value


@dataclass(frozen=True)
class Preset:
    """One attack preset file.

    Attributes:
        name: file stem (``"imagenet-linf-pgd"``) or the path for a user file.
        path: the TOML file.
        attack: registry name of the attack.
        description: one line for ``advtune list presets``.
        eps: budgets, or ``None`` when the preset gives none.
        targeted: ``None``, ``"random"`` or ``"least-likely"``.
        params: attack keyword arguments (numbers already parsed).
    """

    name: str
    path: Path
    attack: str
    description: str = ""
    eps: tuple[float, ...] | None = None
    targeted: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)


def preset_names() -> list[str]:
    """Names of the shipped presets, sorted."""
    return sorted(p.stem for p in presets_dir().glob("*.toml"))


def _parse_preset(path: Path, name: str) -> Preset:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read preset {str(path)!r}: {e}") from e
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"invalid preset {str(path)!r}: {e}") from e
    except RecursionError:  # arrays or tables nested deeper than the parser's stack
        raise UserError(f"invalid preset {str(path)!r}: nested too deeply") from None
    attack = data.get("attack")
    if not isinstance(attack, str) or not attack:
        raise UserError(f'preset {str(path)!r} must set attack = "<name>"')
    eps = data.get("eps")
    targeted = data.get("targeted")
    if targeted is not None and targeted not in TARGETED_MODES:
        raise UserError(
            f"preset {str(path)!r}: targeted must be one of {', '.join(TARGETED_MODES)}, "
            f"got {targeted!r}"
        )
    params = {k: _coerce_preset_value(v) for k, v in data.items() if k not in _RESERVED}
    return Preset(
        name=name,
        path=path,
        attack=attack,
        description=str(data.get("description", "")),
        eps=None if eps is None else tuple(parse_number_list(eps, what=f"eps in {path.name}")),
        targeted=targeted,
        params=params,
    )


def load_preset(name_or_path: str | Path) -> Preset:
    """Load a shipped preset by name (``"imagenet-linf-pgd"``) or a user TOML file by path.

    Raises:
        UserError: unknown name (with suggestions), unreadable or invalid file.
    """
    text = str(name_or_path)
    candidate = Path(text).expanduser()
    looks_like_path = text.endswith(".toml") or "/" in text or "\\" in text
    if candidate.is_file() and (looks_like_path or candidate.suffix == ".toml"):
        return _parse_preset(candidate, text)
    if looks_like_path:
        raise UserError(f"preset file {text!r} not found")
    shipped = presets_dir() / f"{text}.toml"
    if not shipped.is_file():
        raise UserError(suggest(text, preset_names(), what="preset"))
    return _parse_preset(shipped, text)


def list_presets() -> list[Preset]:
    """All shipped presets, sorted by name."""
    return [load_preset(name) for name in preset_names()]


def _check_param(spec: Any, key: str, value: Any) -> Any:
    """``value`` typed and validated against the attack's declared :class:`Param`."""
    if spec.radius_key is not None and key == spec.radius_key:
        raise UserError(
            f"{key} is the budget of attack {spec.name!r}, not a setting: give it with "
            f"--eps (several values for a curve, e.g. --eps 1/255,4/255) or as eps = in a preset"
        )
    param = spec.param(key)  # UserError with suggestions for an unknown key
    if isinstance(value, str):
        return param.parse(value)
    if param.type is int and isinstance(value, float) and value.is_integer():
        value = int(value)  # "20/2" in a preset file
    try:
        return param.validate(value)
    except ValueError as e:
        raise UserError(str(e)) from None


def resolve_attack(
    attack: str | None = None,
    *,
    preset: str | Path | Preset | None = None,
    eps: Sequence[float] | None = None,
    targeted: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    seed: int = 0,
):
    """Merge attack defaults < preset < overrides into a validated attack configuration.

    Args:
        attack: registry name; may be omitted when ``preset`` names one.
        preset: a preset name, TOML path or loaded :class:`Preset`.
        eps: budgets from the command line (several give an eps curve).
        targeted: ``None``, ``"random"`` or ``"least-likely"``; overrides the preset.
        overrides: attack keyword arguments from the command line (``steps``, ``norm``...);
            ``None`` values mean "not given" and are ignored.
        seed: the run seed (per-sample seeds derive from it and the dataset index).

    Returns:
        An :class:`advtune.run.spec.AttackConfig`.

    Raises:
        UserError: unknown attack, preset/attack mismatch, unknown or out-of-range
            setting (the message names the value).
    """
    from advtune import attacks
    from advtune.run.spec import AttackConfig

    loaded = load_preset(preset) if isinstance(preset, (str, Path)) else preset
    if attack is None:
        if loaded is None:
            raise UserError("no attack given: pass --attack NAME or --preset NAME")
        attack = loaded.attack
    attacks.spec(attack)  # UserError suggesting close names if unknown
    if loaded is not None and loaded.attack != attack:
        raise UserError(
            f"preset {loaded.name!r} is for attack {loaded.attack!r}, not {attack!r}; "
            "drop --attack or choose another preset"
        )
    spec = attacks.spec(attack)
    params: dict[str, Any] = {}
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    for source in (loaded.params if loaded else {}, given):
        for key, value in source.items():
            params[key] = _check_param(spec, key, value)

    eps_values: tuple[float, ...] | None
    if eps is not None:
        eps_values = tuple(float(e) for e in eps)
    elif loaded is not None and loaded.eps is not None:
        eps_values = loaded.eps
    else:
        eps_values = None
    radius = spec.radius_key
    try:
        threat = spec.threat(params)
    except ValueError as e:
        raise UserError(str(e)) from None
    if radius is not None:
        if eps_values is None:
            default = spec.defaults.get(radius)
            eps_values = (float(default) if default is not None else threat.default_eps,)
        for value in eps_values:
            try:
                spec.param(radius).validate(value)
                threat.with_eps(value)
            except ValueError as e:
                raise UserError(str(e)) from None
        if len(set(eps_values)) != len(eps_values):
            raise UserError(f"eps values must be distinct, got {list(eps_values)}")
    elif eps_values is not None:
        raise UserError(f"attack {attack!r} takes no eps (it has no perturbation budget)")

    targeted = targeted if targeted is not None else (loaded.targeted if loaded else None)
    if targeted is not None and targeted not in TARGETED_MODES:
        raise UserError(f"targeted must be one of {', '.join(TARGETED_MODES)}, got {targeted!r}")
    if targeted is not None and not spec.targeted:
        raise UserError(f"attack {attack!r} has no targeted mode; drop --targeted")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UserError(f"seed must be a non-negative integer, got {seed!r}")
    return AttackConfig(
        attack=attack,
        norm=threat.name,
        eps=eps_values if radius is not None else None,
        params=params,
        targeted=targeted,
        seed=seed,
    )
