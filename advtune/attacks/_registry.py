"""A small strict registry of attack functions, and their hyperparameters as data.

``register(name, norm=..., randomized=..., params=...)`` records a function with its
:class:`AttackSpec`. Each hyperparameter is a :class:`Param`: name, type, bounds,
default, its role (the threat-model radius ``eps``, a cost budget such as ``steps``, the
``norm`` switch) and a cheap value for fast tests and batch-size probing. Presets, the
command line, batch-size probing, the benchmark and the contract tests read the spec, so
a new attack needs one file and one registration.

``params`` may be omitted: the spec is then derived from the signature (keyword-only
arguments and their defaults; the type from the default). Derived specs recognise the
conventional names in :data:`CONVENTIONS` (``eps`` is the radius, ``steps`` a budget...);
declare ``params`` to say more. Names are unique; unknown names raise.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
import numbers
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from advtune._numbers import parse_number, parse_value
from advtune.attacks.threat import ThreatModel, threat_model, threat_names
from advtune.errors import UserError, suggest

__all__ = [
    "BUDGET_MAX",
    "CONVENTIONS",
    "NORMS",
    "REQUIRED",
    "AttackSpec",
    "Param",
    "get",
    "names",
    "register",
    "spec",
]

NORMS: tuple[str, ...] = tuple(threat_names())
# Every attack takes these keyword-only arguments; they are not hyperparameters.
_COMMON = ("target", "generator", "seeds")
ROLES = ("radius", "budget", "norm")

F = TypeVar("F", bound=Callable[..., Any])


class _Marker:
    """A named sentinel (readable in reprs)."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


#: Default of a hyperparameter that has none (``eps``).
REQUIRED: Any = _Marker("REQUIRED")
_UNSET: Any = _Marker("UNSET")

#: Ceiling of an integer hyperparameter that declares no ``high``: far above any real
#: budget, low enough that a typo of a few digits is refused before a run that never ends.
INT_CEILING = 10**9
#: The same for a float hyperparameter (and ``eps``): finite is not enough, an L2 eps of
#: 1e308 overflows the 8-bit level arithmetic; no real budget or constant comes near.
FLOAT_CEILING = 1e12
#: The upper bound of a budget that declares none: huge values fail before any work
#: (a typo of ``steps=10**9`` is an error, not a run that never ends).
BUDGET_MAX = 1_000_000

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def _num(v: float) -> str:
    # Bounds as written: 1000000 rather than 1e+06, 0.5 as 0.5.
    return str(int(v)) if float(v).is_integer() and abs(v) < 1e15 else f"{v:g}"


# Integers: digits, or a whole fraction/float such as "20/2" or "1e3".
_INT = re.compile(r"[+-]?[\d.eE+/\s-]+")


@dataclass(frozen=True)
class Param:
    """One hyperparameter of an attack, declared once.

    Attributes:
        name: Keyword argument name.
        type: ``int``, ``float``, ``bool`` or ``str``.
        default: Default value, or :data:`REQUIRED` (no default; ``eps``).
        low: Smallest allowed value (numbers), or ``None``.
        high: Largest allowed value (numbers), or ``None`` (a budget then gets
            :data:`BUDGET_MAX`).
        low_open: ``low`` itself is excluded (``> low`` rather than ``>= low``).
        high_open: ``high`` itself is excluded (``< high``).
        choices: Allowed values (strings), or ``None``.
        nullable: ``None`` is allowed (``step_size=None``: derived from other values).
        role: ``"radius"`` (the threat model's ``eps``), ``"budget"`` (a cost: run time
            grows with it and memory does not — steps, restarts, queries), ``"norm"``
            (selects the threat model by name), or ``None``.
        cheap: Value for fast tests (``_UNSET``: the default).
        help: One line for ``advtune list attacks`` and docs.
    """

    name: str
    type: type = float
    default: Any = REQUIRED
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[Any, ...] | None = None
    nullable: bool = False
    role: str | None = None
    cheap: Any = _UNSET
    help: str = ""

    def __post_init__(self) -> None:
        if self.type not in (int, float, bool, str, object):
            raise ValueError(f"Param {self.name!r}: type must be int, float, bool or str")
        if self.role is not None and self.role not in ROLES:
            raise ValueError(f"Param {self.name!r}: role must be one of {ROLES}, got {self.role!r}")
        if self.role == "budget" and self.type is not int:
            raise ValueError(f"Param {self.name!r}: a budget must be an int")
        if self.role == "budget" and self.high is None:
            object.__setattr__(self, "high", BUDGET_MAX)
        if self.default is not REQUIRED:
            self.validate(self.default)
        if self.cheap is not _UNSET:
            self.validate(self.cheap)

    @property
    def required(self) -> bool:
        """Whether the parameter has no default."""
        return self.default is REQUIRED

    @property
    def cheap_value(self) -> Any:
        """The value for fast tests: ``cheap`` if declared, else the default."""
        return self.default if self.cheap is _UNSET else self.cheap

    @property
    def minimum(self) -> Any:
        """The smallest valid value of a budget (``low``), for batch-size probing."""
        if self.low is None:
            return self.cheap_value
        return math.floor(self.low) + (1 if self.low_open else 0)

    def _range(self) -> str:
        """``">= 1"``, ``"<= 5"`` or ``"in (0, 1]"``: the bounds as text (``""``: none)."""
        low, high = self.low, self.high
        if low is not None and high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"in {left}{_num(low)}, {_num(high)}{right}"
        if low is not None:
            return f"{'>' if self.low_open else '>='} {_num(low)}"
        if high is not None:
            return f"{'<' if self.high_open else '<='} {_num(high)}"
        return ""

    def describe(self) -> str:
        """``"steps: integer in [1, 1000000], default 10"``: one line for listings."""
        kind = {int: "integer", float: "number", bool: "bool", str: "string"}.get(
            self.type, "value"
        )
        parts = [kind]
        if self._range():
            parts.append(self._range())
        if self.choices:
            parts = [f"one of {', '.join(map(str, self.choices))}"]
        if self.nullable:
            parts.append("or None")
        text = f"{self.name}: {' '.join(parts)}"
        return text + ("" if self.required else f", default {self.default!r}")

    def validate(self, value: Any) -> Any:
        """``value`` normalised (ints to float for a float), or ``ValueError`` naming it.

        Messages name the value and the bound it violates: ``"steps must be >= 1, got
        0"``, ``"beta must lie in (0, 1], got 1.5"``.
        """
        if value is None and self.nullable:
            return None
        name = self.name
        if self.role == "norm" and isinstance(value, ThreatModel):
            # A threat object in place of its name (an option such as L2's ``start``).
            if self.choices is not None and value.name not in self.choices:
                raise ValueError(
                    f"{name} must be one of {', '.join(map(repr, self.choices))}; got {value!r}"
                )
            return value
        if self.type is bool:
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be a bool, got {value!r}")
            return value
        if self.type is str or self.choices is not None:
            if self.choices is not None and value not in self.choices:
                raise ValueError(
                    f"{name} must be one of {', '.join(map(repr, self.choices))}; got {value!r}"
                )
            if self.type is str and not isinstance(value, str):
                raise ValueError(f"{name} must be a string, got {value!r}")
            return value
        if self.type is object:
            return value
        if self.type is int:
            if not isinstance(value, numbers.Integral) or isinstance(value, bool):
                raise ValueError(f"{name} must be an integer, got {value!r}")
            value = int(value)
        elif (
            not isinstance(value, numbers.Real)
            or isinstance(value, bool)
            or not math.isfinite(float(value))
        ):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        else:
            value = float(value)
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            raise ValueError(
                f"{name} must be {'>' if self.low_open else '>='} {_num(self.low)}, got {value!r}"
            )
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            verb = "be" if self.low is None else "lie"
            raise ValueError(f"{name} must {verb} {self._range()}, got {value!r}")
        ceiling = INT_CEILING if self.type is int else FLOAT_CEILING
        if self.high is None and value > ceiling:
            raise ValueError(
                f"{name} must be <= {ceiling if self.type is int else f'{ceiling:g}'} (no "
                f"larger bound declared), got {value!r}"
            )
        return value

    def parse(self, text: str) -> Any:
        """Type and validate a command-line value (``"4/255"``, ``"10"``, ``"true"``).

        Raises:
            UserError: Naming the parameter, the text and what it expects.
        """
        raw = str(text).strip()
        try:
            if self.nullable and raw.lower() in ("none", "null"):
                return None
            if self.type is bool:
                if raw.lower() not in _TRUE + _FALSE:
                    raise ValueError(f"{self.name} must be true or false, got {raw!r}")
                return raw.lower() in _TRUE
            if self.type is int:
                if not _INT.fullmatch(raw):
                    raise ValueError(f"invalid {self.name} {raw!r}: expected an integer like 10")
                number = parse_number(raw)
                if number != int(number):
                    raise ValueError(f"{self.name} must be a whole number, got {raw!r}")
                return self.validate(int(number))
            if self.type is float:
                return self.validate(parse_number(raw, what=self.name))
            if self.type is object:
                # Untyped (derived from a None default): the generic --param typing.
                return parse_value(raw)
            if self.choices is not None and raw not in self.choices:
                raise UserError(
                    suggest(raw, [str(c) for c in self.choices], what=f"{self.name} value")
                )
            return self.validate(raw)
        except UserError:
            raise
        except ValueError as exc:
            raise UserError(str(exc)) from None


# Roles and cheap values of conventional names, for specs derived from a signature (an
# attack that declares ``params`` does not rely on them).
CONVENTIONS: Mapping[str, Mapping[str, Any]] = {
    "eps": {"role": "radius", "low": 0.0},
    "norm": {"role": "norm", "choices": NORMS},
    "steps": {"role": "budget", "low": 1, "cheap": 3},
    "restarts": {"role": "budget", "low": 1, "cheap": 1},
    "n_restarts": {"role": "budget", "low": 1, "cheap": 1},
    "queries": {"role": "budget", "low": 1, "cheap": 20},
    "n_queries": {"role": "budget", "low": 1, "cheap": 20},
    "binary_search_steps": {"role": "budget", "low": 1, "cheap": 2},
    "n_targets": {"role": "budget", "low": 1, "cheap": 2},
}


def _derive(p: inspect.Parameter) -> Param:
    default = REQUIRED if p.default is inspect.Parameter.empty else p.default
    conv = dict(CONVENTIONS.get(p.name, {}))
    if isinstance(default, bool):
        kind: type = bool
    elif isinstance(default, int):
        kind = int
    elif isinstance(default, float) or p.name == "eps":
        kind = float
    elif isinstance(default, str):
        kind = str
    else:
        kind = object
    if default is None and conv.get("role") == "budget":
        # An optional budget override (None: the attack's own default, as in autoattack):
        # still a budget, so fast tests and batch-size probing shrink it too.
        kind = int
    elif conv.get("role") == "budget" and kind is not int:
        conv = {}
    if "cheap" in conv and default not in (REQUIRED, None):
        conv["cheap"] = min(conv["cheap"], default)
    if "choices" in conv and default not in conv["choices"]:
        conv.pop("choices")
    return Param(p.name, kind, default, nullable=default is None, **conv)


@dataclass(frozen=True)
class AttackSpec:
    """What callers need to know about a registered attack.

    Attributes:
        name: Registry name.
        norm: Threat model with default hyperparameters, ``"linf"`` or ``"l2"``. An attack
            with a ``norm`` hyperparameter (``pgd``) uses whatever that is set to; see
            :meth:`threat`.
        randomized: Whether results depend on ``generator``/``seeds`` with defaults.
        params: The hyperparameters, in signature order.
        declared: Whether ``params`` were declared (``False``: derived from the signature).
        per_sample: Whether randomness comes from per-sample seeds, so results do not
            depend on batch composition (``False`` for wrapped torchattacks classes).
        targeted: Whether the attack takes ``target`` (all of advtune's do).
        summary: First line of the function's docstring.
    """

    name: str
    norm: str
    randomized: bool
    params: tuple[Param, ...] = ()
    declared: bool = False
    per_sample: bool = True
    targeted: bool = True
    summary: str = ""
    _by_name: Mapping[str, Param] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {p.name: p for p in self.params})

    # ----------------------------------------------------------------- reading

    def param(self, key: str) -> Param:
        """The :class:`Param` ``key``; ``UserError`` suggesting close names if unknown."""
        try:
            return self._by_name[key]
        except KeyError:
            raise UserError(self._unknown(key)) from None

    def _unknown(self, key: str) -> str:
        if self.radius_key is None and CONVENTIONS.get(key, {}).get("role") == "radius":
            return f"attack {self.name!r} takes no {key} (it has no perturbation budget)"
        known = sorted(self._by_name)
        close = difflib.get_close_matches(key, known, n=3)
        if close:
            hint = f"; did you mean: {', '.join(close)}?"
        else:
            hint = f"; it takes: {', '.join(known)}" if known else "; it takes none"
        return f"attack {self.name!r} has no setting {key!r}{hint}"

    @property
    def defaults(self) -> dict[str, Any]:
        """Hyperparameters with a default, and the default (``required`` ones excluded)."""
        return {p.name: p.default for p in self.params if not p.required}

    @property
    def required(self) -> tuple[str, ...]:
        """Hyperparameters without a default (``("eps",)`` for eps attacks)."""
        return tuple(p.name for p in self.params if p.required)

    def _role(self, role: str) -> tuple[str, ...]:
        return tuple(p.name for p in self.params if p.role == role)

    @property
    def radius_key(self) -> str | None:
        """Name of the threat-model radius (``"eps"``), or ``None`` for unbounded attacks."""
        keys = self._role("radius")
        return keys[0] if keys else None

    @property
    def uses_eps(self) -> bool:
        """Whether the attack takes a threat-model radius."""
        return self.radius_key is not None

    @property
    def cost_keys(self) -> tuple[str, ...]:
        """Budgets that cost time but not memory (``steps``, ``restarts``, ``queries``)."""
        return self._role("budget")

    @property
    def budget_keys(self) -> tuple[str, ...]:
        """Every budget: the radius (first, if any) then the cost budgets."""
        return self._role("radius") + self._role("budget")

    # ----------------------------------------------------------------- threat model

    @property
    def norm_key(self) -> str | None:
        """Name of the hyperparameter choosing the threat model (``"norm"``), or ``None``
        for an attack fixed to :attr:`norm`."""
        keys = self._role("norm")
        return keys[0] if keys else None

    def _norm_value(self, hyperparameters: Mapping[str, Any]) -> str | ThreatModel:
        for key in self._role("norm"):
            value = hyperparameters.get(key, self._by_name[key].default)
            return value if isinstance(value, ThreatModel) else str(value)
        return self.norm

    def norm_of(self, hyperparameters: Mapping[str, Any]) -> str:
        """The threat model's name for a call with ``hyperparameters``."""
        value = self._norm_value(hyperparameters)
        return value.name if isinstance(value, ThreatModel) else value

    def threat(self, hyperparameters: Mapping[str, Any] | None = None) -> ThreatModel:
        """The threat model of a call: its norm and radius (``eps=None`` if unbounded).

        The one threat object of a call, for the run side (saving, quantisation, reports):
        the ``norm`` hyperparameter (a name or a :class:`ThreatModel`) or the registered
        norm, with the radius hyperparameter.
        """
        hps = dict(hyperparameters or {})
        radius = self.radius_key
        eps = hps.get(radius) if radius is not None else None
        return threat_model(self._norm_value(hps), eps)

    # ----------------------------------------------------------------- values

    def parse(self, key: str, text: str) -> Any:
        """Type and validate ``-p key=text``; ``UserError`` naming the key and value."""
        return self.param(key).parse(text)

    def validate(self, hyperparameters: Mapping[str, Any]) -> dict[str, Any]:
        """Check a call's hyperparameters against the declaration.

        Returns:
            The values normalised (unknown keys and bad values raise; missing ones are
            not filled in).

        Raises:
            UserError: Unknown key (with suggestions).
            ValueError: A value out of its declared type or range, naming it.
        """
        out = {}
        for key, value in hyperparameters.items():
            out[key] = self.param(key).validate(value)
        return out

    def cheap_hyperparameters(self, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Small valid hyperparameters for fast tests: each param's cheap value.

        A radius without a declared cheap value gets the threat model's usual budget
        (:attr:`ThreatModel.default_eps`). ``overrides`` win.
        """
        hps = {p.name: p.cheap_value for p in self.params if p.cheap is not _UNSET}
        hps.update(overrides or {})
        radius = self.radius_key
        if radius is not None and radius not in hps:
            hps[radius] = type(threat_model(self.norm_of(hps))).default_eps
        return hps

    def probe_hyperparameters(self, hyperparameters: Mapping[str, Any]) -> dict[str, Any]:
        """``hyperparameters`` with every cost budget at its minimum (memory probing:
        the memory of one call does not grow with steps, restarts or queries)."""
        out = dict(hyperparameters)
        for key in self.cost_keys:
            out[key] = self._by_name[key].minimum
        return out


_ATTACKS: dict[str, tuple[Callable[..., Any], AttackSpec]] = {}


def _keyword_hyperparameters(fn: Callable[..., Any], name: str) -> list[inspect.Parameter]:
    params = list(inspect.signature(fn).parameters.values())
    positional = [
        p.name
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    if positional[:3] != ["model", "x", "y"] or len(positional) != 3:
        raise ValueError(
            f"attack {name!r} must take (model, x, y, *, ...) positionally, got {positional}"
        )
    keyword = {p.name: p for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
    missing = [k for k in _COMMON if k not in keyword]
    if missing:
        raise ValueError(f"attack {name!r} lacks keyword-only argument(s) {', '.join(missing)}")
    return [p for k, p in keyword.items() if k not in _COMMON]


def _spec_from(
    fn: Callable[..., Any],
    name: str,
    norm: str,
    randomized: bool,
    params: Sequence[Param] | None,
    per_sample: bool = True,
) -> AttackSpec:
    signature = _keyword_hyperparameters(fn, name)
    if params is None:
        declared = tuple(_derive(p) for p in signature)
    else:
        declared = tuple(params)
        by_sig = {p.name: p for p in signature}
        names_ = [p.name for p in declared]
        if sorted(names_) != sorted(by_sig) or len(set(names_)) != len(names_):
            raise ValueError(
                f"attack {name!r}: params {names_} must name each keyword-only "
                f"hyperparameter once: {list(by_sig)}"
            )
        for p in declared:
            sig_default = by_sig[p.name].default
            sig_default = REQUIRED if sig_default is inspect.Parameter.empty else sig_default
            if sig_default is not p.default and sig_default != p.default:
                raise ValueError(
                    f"attack {name!r}: param {p.name!r} declares default {p.default!r} but "
                    f"the signature has {sig_default!r}"
                )
        order = {k: i for i, k in enumerate(by_sig)}
        declared = tuple(sorted(declared, key=lambda p: order[p.name]))
    doc = inspect.getdoc(fn) or ""
    return AttackSpec(
        name=name,
        norm=norm,
        randomized=randomized,
        params=declared,
        declared=params is not None,
        per_sample=per_sample,
        summary=doc.splitlines()[0] if doc else "",
    )


def register(
    name: str,
    *,
    norm: str = "linf",
    randomized: bool = False,
    params: Iterable[Param] | None = None,
    per_sample: bool = True,
) -> Callable[[F], F]:
    """Decorator adding an attack function to the registry under ``name``.

    Args:
        name: Unique registry name (lower-case identifiers by convention).
        norm: ``"linf"`` or ``"l2"``: the threat model with default hyperparameters.
        randomized: Whether the attack draws random numbers with its defaults.
        params: The hyperparameters as :class:`Param` declarations, one per keyword-only
            hyperparameter with the signature's default. The registered function then
            validates every call against them before its body runs. ``None``: derived
            from the signature (no validation added).
        per_sample: ``False`` for an attack whose results depend on the rest of the
            batch (Admix mixes in other images of the batch).

    Raises:
        ValueError: Duplicate ``name``, bad ``norm``, ``params`` that disagree with the
            signature, or a function not shaped like
            ``fn(model, x, y, *, target=None, generator=None, seeds=None, **hp)``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"attack name must be a non-empty string, got {name!r}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}; got {norm!r}")
    declared = None if params is None else tuple(params)

    def decorator(fn: F) -> F:
        if name in _ATTACKS:
            raise ValueError(f"attack {name!r} is already registered")
        attack_spec = _spec_from(fn, name, norm, randomized, declared, per_sample)
        registered = fn
        if declared is not None:
            registered = _validating(fn, attack_spec)  # type: ignore[assignment]
        _ATTACKS[name] = (registered, attack_spec)
        return registered

    return decorator


def _validating(fn: F, attack_spec: AttackSpec) -> F:
    by_name = attack_spec._by_name

    @functools.wraps(fn)
    def attack(model: Any, x: Any, y: Any, **kwargs: Any) -> Any:
        for key, value in kwargs.items():
            if key in by_name:
                kwargs[key] = by_name[key].validate(value)
        # Unknown or missing keywords: Python's own TypeError from the call below.
        return fn(model, x, y, **kwargs)

    return attack  # type: ignore[return-value]


def _lookup(name: str) -> tuple[Callable[..., Any], AttackSpec]:
    try:
        return _ATTACKS[name]
    except (KeyError, TypeError):
        pass
    if isinstance(name, str) and ":" in name:
        from advtune.attacks.torchattacks_adapter import lookup_external

        found = lookup_external(name)
        if found is not None:
            return found
    raise UserError(suggest(str(name), _ATTACKS, what="attack")) from None


def get(name: str) -> Callable[..., Any]:
    """The attack function registered as ``name``; ``ValueError`` (``UserError``) if unknown.

    ``"torchattacks:<Class>"`` (``"torchattacks:APGD"``) wraps a torchattacks class on
    first use (the optional ``torchattacks`` extra); its hyperparameters are the class's.
    """
    return _lookup(name)[0]


def spec(name: str) -> AttackSpec:
    """The :class:`AttackSpec` of ``name``; ``ValueError`` (``UserError``) if unknown."""
    return _lookup(name)[1]


def names() -> list[str]:
    """Registered attack names, sorted (torchattacks classes appear once used)."""
    return sorted(_ATTACKS)
