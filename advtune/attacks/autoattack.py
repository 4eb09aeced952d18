"""AutoAttack: an ensemble of parameter-free attacks with a per-sample worst case.

Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", ICML 2020 (arXiv:2003.01690). Samples misclassified clean are
not attacked; each attack then sees only the samples every attack before it failed to
break, and a sample counts as robust only if all of them fail. The components are looked
up by name in the attack registry at call time (``apgd``, ``apgd_t``, ``fab``,
``square``), so any registered attack can join a custom ensemble.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
from torch import nn

from advtune.attacks import _masking
from advtune.attacks._loop import EPS
from advtune.attacks._random import resolve_seeds
from advtune.attacks._registry import Param, get, names, register, spec
from advtune.attacks._result import (
    AttackResult,
    ModelCalls,
    ModelGuard,
    ce_loss,
    check_choice,
    check_inputs,
    finish,
    success_of,
)
from advtune.attacks.autoattack_fast import FAST, FAST_COMPONENTS, FAST_NORMS
from advtune.attacks.threat import threat_model
from advtune.errors import UserError, suggest

__all__ = [
    "AUTOATTACK_PARAMS",
    "BLACK_BOX",
    "COMPONENTS",
    "RESTARTS",
    "VERSIONS",
    "EnsembleResult",
    "MissingComponentWarning",
    "autoattack",
]

#: Progress hook, e.g. a progress bar's: ``hook(component, robust, n)`` after each
#: component that attacked samples (``robust`` of the ``n`` samples still unbroken).
#: A context variable, not a keyword: it never enters the attack's hyperparameters.
COMPONENT_PROGRESS: ContextVar[Callable[[str, int, int], None] | None] = ContextVar(
    "advtune_autoattack_progress", default=None
)

#: AutoAttack's component names → (registry name, fixed keyword arguments).
COMPONENTS: dict[str, tuple[str, dict[str, Any]]] = {
    "apgd-ce": ("apgd", {"loss": "ce"}),
    "apgd-dlr": ("apgd", {"loss": "dlr"}),
    "apgd-t": ("apgd_t", {}),
    "fab": ("fab", {"targeted": False}),
    "fab-t": ("fab", {}),
    "square": ("square", {"p_init": 0.8}),
    **{k: v for k, v in FAST_COMPONENTS.items() if k == "apgd-malt"},
}
#: The official versions: which components run, in order.
VERSIONS: dict[str, tuple[str, ...]] = {
    "standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
    "plus": ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"),
    "rand": ("apgd-ce", "apgd-dlr"),
    # advtune's cost-aware version (not official): advtune/attacks/autoattack_fast.py.
    "fast": tuple(FAST_COMPONENTS),
}
#: The threat models of the official versions.
NORMS = ("linf", "l2", "l1")
#: Per (version, norm), settings of official components that differ from the L∞/L2
#: budgets: the official L1 version runs APGD-CE with 5 restarts and APGD-T with 5
#: targets, both with the three-stage eps schedule (``large_eps``).
NORM_SETTINGS: dict[tuple[str, str], dict[str, dict[str, Any]]] = {
    ("standard", "l1"): {
        "apgd-ce": {"restarts": 5, "large_eps": True},
        "apgd-t": {"n_targets": 5, "large_eps": True},
    },
}
#: Restarts per component where a version's official budget is not one run
#: (pyautoattack's ``_set_version``: ``plus`` gives APGD and untargeted FAB 5 restarts;
#: its Square, APGD-T and FAB-T keep 1).
RESTARTS: dict[str, dict[str, int]] = {"plus": {"apgd-ce": 5, "apgd-dlr": 5, "fab": 5}}
#: Registry names of score-based (black-box) attacks, for the masking check.
BLACK_BOX = frozenset({"square"})
# The official budgets (AutoAttack's standard version).
_STEPS, _N_TARGETS, _QUERIES, _EOT_RAND = 100, 9, 5000, 20


#: AutoAttack's hyperparameters, declared once (validation, presets, CLI, tests read them).
AUTOATTACK_PARAMS = (
    EPS,
    Param("norm", str, "linf", choices=NORMS, role="norm", help="threat model"),
    Param("version", str, None, choices=(*VERSIONS, "custom"), nullable=True,
          help="official version (None: standard, or custom with attacks)"),
    Param("attacks", object, None, nullable=True, help="custom list of components"),
    Param("steps", int, None, low=1, nullable=True, role="budget", cheap=3,
          help="iterations of the gradient components (official: 100)"),
    Param("n_targets", int, None, low=1, high=1000, nullable=True, role="budget", cheap=2,
          help="target classes of APGD-T and FAB-T (official: 9)"),
    Param("queries", int, None, low=1, nullable=True, role="budget", cheap=20,
          help="queries of Square (official: 5000)"),
    Param("eot_iter", int, None, low=1, high=1000, nullable=True,
          help="EOT gradients per APGD step (official: 1, or 20 with rand)"),
)  # fmt: skip


class MissingComponentWarning(UserWarning):
    """A component of an official version is not registered and was skipped."""


@dataclass(frozen=True)
class EnsembleResult(AttackResult):
    """An :class:`AttackResult` that also says which component broke each sample.

    Attributes:
        version: The version that ran (``"standard"``, ``"plus"``, ``"rand"``,
            ``"fast"`` or ``"custom"``).
        components: Names of the components that ran, in order (``"apgd-ce"``, ...).
        broken_by: ``(N,)`` int64 on ``x``'s device: index into ``components`` of the
            attack that broke the sample, :attr:`ROBUST` (−1) if none did, or
            :attr:`CLEAN` (−2) if the clean image already counted as a success
            (misclassified; with ``target``, already the target) and was not attacked.
        component_calls: Model calls used by each component.
        component_cost: Each component's calls as :class:`ModelCalls` (forward-only and
            forward+backward apart, with the images they processed; ``None`` for a
            component whose result carried no counts).
        checks: Gradient-masking checks (JSON-ready dicts from
            :mod:`advtune.attacks._masking`) and ``"skipped"`` components.

    ``x_adv`` is the breaking attack's image for broken samples and the clean image
    otherwise (as in the reference implementation); ``model_calls`` and ``calls`` include
    every component's calls and the ensemble's own (clean pass, randomness check,
    gradient check, final evaluation).
    """

    # Keyword-only: AttackResult may end with fields that have defaults.
    version: str = field(kw_only=True, default="custom")
    components: tuple[str, ...] = field(kw_only=True)
    broken_by: torch.Tensor = field(kw_only=True)
    component_calls: tuple[int, ...] = field(kw_only=True)
    component_cost: tuple[ModelCalls | None, ...] = field(kw_only=True, default=())
    checks: Mapping[str, Any] = field(kw_only=True)

    ROBUST: ClassVar[int] = -1
    CLEAN: ClassVar[int] = -2

    def robust_after(self) -> dict[str, float]:
        """Robust accuracy after the clean pass and after each component, in run order.

        Returns:
            ``{"clean": a0, components[0]: a1, ...}``: fraction of the batch not yet a
            success after each stage (the official log's "robust accuracy after ...").
        """
        n = self.broken_by.numel()
        out = {"clean": float((self.broken_by != self.CLEAN).sum()) / n}
        for i, name in enumerate(self.components):
            alive = (self.broken_by == self.ROBUST) | (self.broken_by > i)
            out[name] = float(alive.sum()) / n
        return out


def _plan(
    version: str | None,
    components: Sequence[Any] | None,
) -> tuple[str, list[tuple[str, str, dict[str, Any], bool]]]:
    """``(version, [(label, registry name, fixed kwargs, official), ...])``."""
    if components is None:
        version = check_choice(
            "version", "standard" if version is None else version, tuple(VERSIONS)
        )
        return version, [(c, *COMPONENTS[c], True) for c in VERSIONS[version]]
    if version not in (None, "custom"):
        raise ValueError(
            f'attacks= needs version="custom" (or no version), got version={version!r}'
        )
    if (
        isinstance(components, (str, bytes))
        or not isinstance(components, Sequence)
        or not components
    ):
        raise ValueError(f"attacks must be a non-empty list of attack names, got {components!r}")
    plan = []
    for entry in components:
        fixed: dict[str, Any] = {}
        if isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[1], Mapping):
            entry, fixed = entry[0], dict(entry[1])
        if not isinstance(entry, str):
            raise ValueError(
                f"attacks entries must be names or (name, kwargs) pairs, got {entry!r}"
            )
        if entry == "autoattack":
            raise ValueError("attacks cannot contain 'autoattack' itself")
        if entry in COMPONENTS:
            reg, base = COMPONENTS[entry]
            plan.append((entry, reg, base | fixed, True))
        elif entry in names():
            plan.append((entry, entry, fixed, False))
        else:
            known = sorted(set(names()) | set(COMPONENTS))
            raise UserError(suggest(entry, known, what="attack"))
    return "custom", plan


def _budget(
    official: bool,
    version: str,
    label: str,
    steps: int | None,
    n_targets: int | None,
    queries: int | None,
    eot_iter: int | None,
) -> dict[str, Any]:
    """Budget keywords for a component: official values unless overridden."""
    if not official:
        given = {"steps": steps, "n_targets": n_targets, "queries": queries, "eot_iter": eot_iter}
        return {k: v for k, v in given.items() if v is not None}
    if version == "fast":
        given = {"steps": steps, "n_targets": n_targets, "queries": queries, "eot_iter": eot_iter}
        return FAST[label] | {k: v for k, v in given.items() if v is not None and k in FAST[label]}
    eot = eot_iter if eot_iter is not None else (_EOT_RAND if version == "rand" else 1)
    return {
        "steps": _STEPS if steps is None else steps,
        "n_targets": _N_TARGETS if n_targets is None else n_targets,
        "queries": _QUERIES if queries is None else queries,
        "restarts": RESTARTS.get(version, {}).get(label, 1),
        "eot_iter": eot,
    }


@register("autoattack", norm="linf", randomized=True, params=AUTOATTACK_PARAMS)
def autoattack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    norm: str = "linf",
    version: str | None = None,
    attacks: Sequence[Any] | None = None,
    steps: int | None = None,
    n_targets: int | None = None,
    queries: int | None = None,
    eot_iter: int | None = None,
    target: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    seeds: torch.Tensor | None = None,
) -> EnsembleResult:
    """AutoAttack: APGD-CE → APGD-T → FAB-T → Square, each on the samples still robust.

    ``version="standard"`` (the default) runs the official ensemble with its budgets:
    APGD-CE 100 steps, APGD-T 100 steps × 9 targets, FAB-T 100 steps × 9 targets and
    Square 5000 queries (p_init 0.8), one restart each. ``version="plus"`` runs the
    official plus version: APGD-CE and APGD-DLR with 5 restarts, untargeted FAB with 5
    restarts, Square (5000 queries, one run, as in the official code), APGD-T and
    FAB-T (9 targets each). ``version="rand"`` (randomised
    defences) runs APGD-CE and APGD-DLR with 20 EOT gradients per step. ``attacks=[...]``
    runs a custom list: AutoAttack's component names (``"apgd-ce"``, ``"apgd-dlr"``,
    ``"apgd-t"``, ``"fab"``, ``"fab-t"``, ``"square"``), any registered attack name, or
    ``(name, {kwargs})`` pairs. Components are looked up in the registry when called;
    an unregistered component of an official version is skipped with a
    :class:`MissingComponentWarning` (recorded in ``checks["skipped"]``).

    The model's clean predictions come first (misclassified samples are not attacked),
    then a second identical call (outputs that change mean a randomised model, except
    with ``version="rand"``) and one input gradient (zero or non-finite gradients); a
    black-box component breaking samples warns too. See :mod:`advtune.attacks._masking`.

    Args:
        model: Classifier on [0, 1] images returning logits ``(N, K)``, in eval mode.
        x: ``(N, C, H, W)`` clean images in [0, 1]. Not modified.
        y: ``(N,)`` true labels.
        eps: Radius of the ``norm`` ball, ``>= 0``.
        norm: ``"linf"``, ``"l2"`` or ``"l1"`` (or a threat object). The official L1
            version runs APGD-CE (5 restarts) and APGD-T (5 targets), both with the
            three-stage eps schedule (:func:`~advtune.attacks.apgd`'s ``large_eps``),
            then FAB-T (L1 projection, 9 targets) and Square (L1 proposal), as the
            official code does. A custom component without the threat model raises.
        version: ``"standard"``, ``"plus"``, ``"rand"``, ``"fast"``, or ``"custom"`` with ``attacks``
            (``None``: ``"standard"``, or ``"custom"`` when ``attacks`` is given).
        attacks: The custom list of components (see above).
        steps: Iterations of the gradient components (official: 100).
        n_targets: Target classes of APGD-T and FAB-T (official: 9).
        queries: Queries of Square (official: 5000).
        eot_iter: EOT gradients per APGD step (official: 1, or 20 with ``"rand"``).
        target: Optional ``(N,)`` target classes (each ≠ ``y``): every component runs
            targeted on it and success means the prediction equals it.
        generator: Source of per-sample seeds when ``seeds`` is not given.
        seeds: ``(N,)`` integer seeds passed on to every component (sample *i*'s result
            depends only on ``seeds[i]``).

    Returns:
        :class:`EnsembleResult`.

    Raises:
        ValueError: Invalid inputs or hyperparameters, unknown components.
    """
    y, target = check_inputs(model, x, y, target, generator=generator, seeds=seeds)
    threat = threat_model(norm, eps)
    version, plan = _plan(version, attacks)
    if version == "fast" and threat.name not in FAST_NORMS:
        # Its budgets were measured against standard for these norms only; for L1 the
        # official version needs restarts and the eps schedule fast does not have.
        raise ValueError(
            f"version 'fast' is for norm {' or '.join(FAST_NORMS)}, got norm {threat.name!r}; "
            "use version='standard'"
        )
    n = x.shape[0]
    per_sample = resolve_seeds(n, generator=generator, seeds=seeds).to(x.device)

    with ModelGuard(model, y=y, target=target) as guard, torch.no_grad():
        checks: dict[str, Any] = {}
        clean_logits = guard.logits(x)
        done = success_of(clean_logits, y, target)  # already a success: not attacked
        broken_by = torch.full((n,), EnsembleResult.ROBUST, dtype=torch.int64, device=x.device)
        broken_by[done] = EnsembleResult.CLEAN
        if version != "rand":
            checks["randomized"] = _masking.check_randomized(
                clean_logits, guard.logits(x), stacklevel=3
            )
        todo = (~done).nonzero().flatten()
        if todo.numel():
            checks["gradients"] = _gradient_check(guard, x[todo], y[todo], target, todo)

        x_adv, logits = x.detach().clone(), clean_logits.clone()
        ran: list[str] = []
        calls: list[int] = []
        costs: list[ModelCalls | None] = []
        broken_counts: dict[str, int] = {}
        skipped: list[str] = []
        for label, reg, fixed, official in plan:
            if reg not in names():
                if official:
                    skipped.append(label)
                    warnings.warn(
                        f"autoattack: component {label!r} needs the attack {reg!r}, which is "
                        "not registered; skipped (robust accuracy may be overestimated)",
                        MissingComponentWarning,
                        stacklevel=2,
                    )
                    continue
                get(reg)  # raises, naming it
            fn, accepted = get(reg), _accepted(reg)
            if not _supports(reg, threat.name):
                if not official:
                    raise ValueError(f"attack {reg!r} has no {threat.label} version")
                skipped.append(label)
                warnings.warn(
                    f"autoattack: component {label!r} has no {threat.label} version in "
                    "advtune; skipped (robust accuracy may be overestimated)",
                    MissingComponentWarning,
                    stacklevel=2,
                )
                continue
            wanted = {"eps": threat.eps, "norm": threat} | _budget(
                official, version, label, steps, n_targets, queries, eot_iter
            )
            if official:
                tuned = NORM_SETTINGS.get((version, threat.name), {}).get(label, {})
                given = {"n_targets": n_targets, "steps": steps}
                wanted |= {k: v for k, v in tuned.items() if given.get(k) is None}
            kwargs = {k: v for k, v in wanted.items() if k in accepted} | fixed
            ran.append(label)
            if todo.numel() == 0:
                calls.append(0)
                costs.append(ModelCalls())
                broken_counts[label] = 0
                continue
            sub_t = None if target is None else target[todo]
            with warnings.catch_warnings():
                # Reported once by the ensemble's own gradient check above.
                warnings.simplefilter("ignore", _masking.ZeroGradientWarning)
                warnings.simplefilter("ignore", _masking.NonFiniteGradientWarning)
                res = fn(model, x[todo], y[todo], target=sub_t, seeds=per_sample[todo], **kwargs)
            calls.append(int(res.model_calls))
            costs.append(res.calls)
            won = res.success
            hit = todo[won]
            x_adv[hit] = res.x_adv[won].to(x_adv.dtype)
            logits[hit] = res.logits[won].to(logits.dtype)
            broken_by[hit] = len(ran) - 1
            broken_counts[label] = int(won.sum())
            todo = todo[~won]
            if (hook := COMPONENT_PROGRESS.get()) is not None:
                hook(label, int(todo.numel()), n)
        if skipped:
            checks["skipped"] = skipped
        black = {label for label, reg, _, _ in plan if reg in BLACK_BOX and label in ran}
        if black:
            checks["black_box"] = _masking.check_black_box(
                broken_counts, black_box=black, samples=n, stacklevel=3
            )
        base = finish(guard, x, x_adv, y, target, logits=logits)
    fields_ = {f.name: getattr(base, f.name) for f in fields(AttackResult)}
    fields_["model_calls"] = base.model_calls + sum(calls)
    known = [c for c in costs if c is not None]
    fields_["calls"] = (
        sum(known, base.calls) if base.calls is not None and len(known) == len(costs) else None
    )
    return EnsembleResult(
        **fields_,
        version=version,
        components=tuple(ran),
        broken_by=broken_by,
        component_calls=tuple(calls),
        component_cost=tuple(costs),
        checks=checks,
    )


def _supports(name: str, norm: str) -> bool:
    """Whether the attack ``name`` runs in the threat model ``norm``."""
    s = spec(name)
    key = s.norm_key
    if key is None:
        return s.norm == norm
    choices = s.param(key).choices
    return choices is None or norm in choices


def _accepted(name: str) -> set[str]:
    s = spec(name)
    return set(s.defaults) | set(s.required)


def _gradient_check(
    guard: ModelGuard,
    x: torch.Tensor,
    y: torch.Tensor,
    target: torch.Tensor | None,
    todo: torch.Tensor,
) -> dict[str, Any]:
    """Input gradient of the CE loss at the clean images still to attack (one call)."""
    t = None if target is None else target[todo]
    g, _ = guard.grad(x, lambda z: ce_loss(z.float() if z.dtype != torch.float64 else z, y, t))
    return _masking.check_gradients(g, stacklevel=4)
