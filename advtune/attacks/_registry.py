"""A small strict registry of attack functions.

``register(name, norm=..., randomized=...)`` records a function and derives its
:class:`AttackSpec` from the signature: the keyword-only hyperparameters and their
defaults, and whether it takes an ``eps`` budget. Names are unique; unknown names raise.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from advtune.errors import UserError, suggest

__all__ = ["NORMS", "AttackSpec", "get", "names", "register", "spec"]

NORMS: tuple[str, ...] = ("linf", "l2")
# Every attack takes these keyword-only arguments; they are not hyperparameters.
_COMMON = ("target", "generator", "seeds")

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class AttackSpec:
    """What callers need to know about a registered attack.

    Attributes:
        name: Registry name.
        norm: Threat model with default hyperparameters, ``"linf"`` or ``"l2"``. An attack
            with a ``norm`` hyperparameter (``pgd``) uses whatever that is set to; see
            :meth:`norm_of`.
        uses_eps: Whether the attack takes an ``eps`` budget (required, no default).
        randomized: Whether results depend on ``generator``/``seeds`` with defaults.
        defaults: Keyword-only hyperparameters and their defaults (excludes ``target``,
            ``generator``, ``seeds`` and required ones such as ``eps``).
        required: Hyperparameters without a default (``("eps",)`` for eps attacks).
        summary: First line of the function's docstring.
    """

    name: str
    norm: str
    uses_eps: bool
    randomized: bool
    defaults: Mapping[str, Any] = field(default_factory=dict)
    required: tuple[str, ...] = ()
    summary: str = ""

    def norm_of(self, hyperparameters: Mapping[str, Any]) -> str:
        """The threat model for a call with ``hyperparameters`` (honours a ``norm`` key)."""
        if "norm" in self.defaults:
            return str(hyperparameters.get("norm", self.defaults["norm"]))
        return self.norm


_ATTACKS: dict[str, tuple[Callable[..., Any], AttackSpec]] = {}


def _spec_from(fn: Callable[..., Any], name: str, norm: str, randomized: bool) -> AttackSpec:
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
    hyper = {k: p for k, p in keyword.items() if k not in _COMMON}
    defaults = {k: p.default for k, p in hyper.items() if p.default is not inspect.Parameter.empty}
    required = tuple(k for k, p in hyper.items() if p.default is inspect.Parameter.empty)
    doc = inspect.getdoc(fn) or ""
    return AttackSpec(
        name=name,
        norm=norm,
        uses_eps="eps" in hyper,
        randomized=randomized,
        defaults=defaults,
        required=required,
        summary=doc.splitlines()[0] if doc else "",
    )


def register(name: str, *, norm: str = "linf", randomized: bool = False) -> Callable[[F], F]:
    """Decorator adding an attack function to the registry under ``name``.

    Args:
        name: Unique registry name (lower-case identifiers by convention).
        norm: ``"linf"`` or ``"l2"``: the threat model with default hyperparameters.
        randomized: Whether the attack draws random numbers with its defaults.

    Raises:
        ValueError: Duplicate ``name``, bad ``norm``, or a function not shaped like
            ``fn(model, x, y, *, target=None, generator=None, seeds=None, **hp)``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"attack name must be a non-empty string, got {name!r}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}; got {norm!r}")

    def decorator(fn: F) -> F:
        if name in _ATTACKS:
            raise ValueError(f"attack {name!r} is already registered")
        _ATTACKS[name] = (fn, _spec_from(fn, name, norm, randomized))
        return fn

    return decorator


def _lookup(name: str) -> tuple[Callable[..., Any], AttackSpec]:
    try:
        return _ATTACKS[name]
    except (KeyError, TypeError):
        raise UserError(suggest(str(name), _ATTACKS, what="attack")) from None


def get(name: str) -> Callable[..., Any]:
    """The attack function registered as ``name``; ``ValueError`` (``UserError``) if unknown."""
    return _lookup(name)[0]


def spec(name: str) -> AttackSpec:
    """The :class:`AttackSpec` of ``name``; ``ValueError`` (``UserError``) if unknown."""
    return _lookup(name)[1]


def names() -> list[str]:
    """Registered attack names, sorted."""
    return sorted(_ATTACKS)
