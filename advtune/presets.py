"""Attack presets (``attacks/*.toml``) and the resolution of attack settings.

A preset is a small TOML file naming an attack and its settings::

    description = "ImageNet L∞ PGD-10: eps 4/255, step 1/255"
    attack = "pgd"
    eps = "4/255"          # a number, a fraction string, or a list of them
    norm = "linf"
    steps = 10
    step_size = "1/255"

``attack``, ``description``, ``eps`` and ``targeted`` (``"random"`` or
``"least-likely"``) are reserved keys; every other key is a keyword argument of the
attack function. Strings that read as numbers (``"4/255"``, ``"1e-3"``) become numbers.

:func:`resolve_attack` merges, in increasing priority, the attack's own defaults, a
preset and explicit overrides (command-line flags), validates everything against
``advtune.attacks.spec(name)`` and returns an :class:`advtune.evaluate.AttackConfig`.
"""

from __future__ import annotations

import difflib
import math
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
# Keyword arguments the evaluator supplies itself; never from a preset or --param.
_INTERNAL = frozenset({"target", "generator", "seeds", "model", "x", "y"})
# Integer hyperparameters that must be >= 1, and positive float ones.
_POSITIVE_INTS = frozenset({"steps", "restarts", "binary_search_steps"})
_POSITIVE_FLOATS = frozenset({"step_size", "lr", "initial_const"})
_NORMS = ("linf", "l2")

_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_NUMBER_RE = re.compile(rf"^\s*({_NUMBER})\s*(?:/\s*({_NUMBER})\s*)?$")


def parse_number(value: str | float, *, what: str = "number") -> float:
    """Parse ``"0.5"``, ``"1e-3"`` or a fraction like ``"4/255"`` into a finite float.

    Raises:
        UserError: naming the value when it is not a finite number.
    """
    if isinstance(value, bool):
        raise UserError(f"invalid {what} {value!r}: expected a number")
    if isinstance(value, (int, float)):
        result = float(value)
    else:
        match = _NUMBER_RE.match(str(value))
        if not match:
            raise UserError(f"invalid {what} {value!r}: expected a number like 0.5 or 4/255")
        result = float(match.group(1))
        if match.group(2) is not None:
            denominator = float(match.group(2))
            if denominator == 0:
                raise UserError(f"invalid {what} {value!r}: division by zero")
            result /= denominator
    if not math.isfinite(result):
        raise UserError(f"invalid {what} {value!r}: not a finite number")
    return result


def parse_int(value: str | int, *, what: str = "integer") -> int:
    """Parse an integer; fractions and floats are accepted when they are whole (``"20/2"``)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    number = parse_number(value, what=what)
    if number != int(number):
        raise UserError(f"invalid {what} {value!r}: expected a whole number")
    return int(number)


def parse_number_list(value: str | float | Sequence[Any], *, what: str = "number") -> list[float]:
    """Parse ``"1/255,2/255,4/255"`` (or a number, or a list) into a list of floats."""
    if isinstance(value, (list, tuple)):
        items = list(value)
    elif isinstance(value, str):
        items = [part for part in value.split(",")]
    else:
        items = [value]
    if not items or any(isinstance(i, str) and not i.strip() for i in items):
        raise UserError(f"invalid {what} list {value!r}: empty item")
    return [parse_number(item, what=what) for item in items]


def parse_value(text: str) -> Any:
    """Type a ``--param KEY=VALUE`` value: int, float (fractions too), bool, None or str."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    if re.fullmatch(r"[+-]?\d+", text.strip()):
        return int(text)
    if _NUMBER_RE.match(text):
        return parse_number(text)
    return text


def _coerce_preset_value(value: Any) -> Any:
    if isinstance(value, str) and _NUMBER_RE.match(value):
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


def _check_param(attack: str, key: str, value: Any) -> Any:
    if key in _POSITIVE_INTS:
        try:
            value = parse_int(value, what=key)
        except UserError as e:
            raise UserError(f"attack {attack!r}: {e}") from None
        if value < 1:
            raise UserError(f"{key} must be >= 1, got {value}")
    elif key in _POSITIVE_FLOATS and value is not None:
        value = parse_number(value, what=key)
        if value <= 0:
            raise UserError(f"{key} must be > 0, got {value}")
    elif key == "norm" and value not in _NORMS:
        raise UserError(f"norm must be one of {', '.join(_NORMS)}, got {value!r}")
    return value


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
        An :class:`advtune.evaluate.AttackConfig`.

    Raises:
        UserError: unknown attack, preset/attack mismatch, unknown or out-of-range
            setting (the message names the value).
    """
    from advtune import attacks
    from advtune.evaluate import AttackConfig

    loaded = load_preset(preset) if isinstance(preset, (str, Path)) else preset
    if attack is None:
        if loaded is None:
            raise UserError("no attack given: pass --attack NAME or --preset NAME")
        attack = loaded.attack
    names = attacks.names()
    if attack not in names:
        raise UserError(suggest(attack, names, what="attack"))
    if loaded is not None and loaded.attack != attack:
        raise UserError(
            f"preset {loaded.name!r} is for attack {loaded.attack!r}, not {attack!r}; "
            "drop --attack or choose another preset"
        )
    spec = attacks.spec(attack)
    allowed = set(spec.defaults) - _INTERNAL - {"eps"}

    params: dict[str, Any] = {}
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    for source in (loaded.params if loaded else {}, given):
        for key, value in source.items():
            if key not in allowed:
                known = sorted(allowed)
                close = difflib.get_close_matches(key, known, n=3)
                if close:
                    hint = f"; did you mean: {', '.join(close)}?"
                else:
                    hint = f"; it takes: {', '.join(known)}" if known else "; it takes none"
                raise UserError(f"attack {attack!r} has no setting {key!r}{hint}")
            params[key] = _check_param(attack, key, value)

    norm = spec.norm_of(params)
    if norm not in _NORMS:
        raise UserError(f"norm must be one of {', '.join(_NORMS)}, got {norm!r}")

    eps_values: tuple[float, ...] | None
    if eps is not None:
        eps_values = tuple(float(e) for e in eps)
    elif loaded is not None and loaded.eps is not None:
        eps_values = loaded.eps
    else:
        eps_values = None
    if spec.uses_eps:
        if eps_values is None:
            default = spec.defaults.get("eps")
            eps_values = (float(default),) if default is not None else (_default_eps(norm),)
        for value in eps_values:
            if not math.isfinite(value) or value < 0:
                raise UserError(f"eps must be >= 0, got {value}")
            if norm == "linf" and value > 1:
                raise UserError(
                    f"eps {value} is out of range for L∞ on [0, 1] images (0 <= eps <= 1); "
                    "did you mean a fraction like 4/255?"
                )
        if len(set(eps_values)) != len(eps_values):
            raise UserError(f"eps values must be distinct, got {list(eps_values)}")
    elif eps_values is not None:
        raise UserError(f"attack {attack!r} takes no eps (it has no perturbation budget)")

    targeted = targeted if targeted is not None else (loaded.targeted if loaded else None)
    if targeted is not None and targeted not in TARGETED_MODES:
        raise UserError(f"targeted must be one of {', '.join(TARGETED_MODES)}, got {targeted!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UserError(f"seed must be a non-negative integer, got {seed!r}")
    return AttackConfig(
        attack=attack,
        norm=norm,
        eps=eps_values if spec.uses_eps else None,
        params=params,
        targeted=targeted,
        seed=seed,
    )


def _default_eps(norm: str) -> float:
    # The standard ImageNet budgets: L∞ 4/255, L2 0.5 (on [0, 1] images).
    return 4 / 255 if norm == "linf" else 0.5
