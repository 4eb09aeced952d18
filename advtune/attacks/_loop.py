"""The projected-gradient loop shared by FGSM, MI-FGSM and PGD, and the restart combinator.

:func:`gradient_steps` is steepest ascent in a threat model: a step of ``step_size`` along
:meth:`ThreatModel.ascent` of the gradient (or of a momentum of normalised gradients),
then :meth:`ThreatModel.project`. FGSM is one step from ``x``; MI-FGSM adds momentum; PGD
starts at a random point. A sample that succeeds at any iterate keeps a successful
iterate (the logits of every iterate are computed anyway for its gradient).

A *gradient estimator* (``gradient=`` of :func:`gradient_steps`, built per run by the
``gradient=`` factory of :func:`steepest_ascent`) replaces the plain input gradient: the
transfer attacks (:mod:`advtune.attacks.transfer`) average gradients over transformed
copies of the iterate, smooth them, or tune them with neighbourhood gradients, and the
loop's momentum, step and projection stay as they are.

:func:`with_restarts` runs any randomized attack several times with fresh per-sample
seeds, on the samples not yet broken, and keeps each sample's best run.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from advtune.attacks._random import (
    STREAM_START,
    resolve_seeds,
    restart_seeds,
    sample_generators,
)
from advtune.attacks._registry import Param
from advtune.attacks._result import (
    AttackResult,
    ModelCalls,
    ModelGuard,
    check_inputs,
    finish,
    margin_loss,
    norms,
    success_of,
    work_dtype,
)
from advtune.attacks.threat import ThreatModel

__all__ = [
    "EPS",
    "GradientFactory",
    "GradientFn",
    "Objective",
    "bind",
    "gradient_steps",
    "steepest_ascent",
    "step_size_param",
    "with_restarts",
]

#: The radius hyperparameter of the projected-gradient attacks.
EPS = Param("eps", float, low=0.0, role="radius", help="radius of the threat model's ball")


def step_size_param(rule: str) -> Param:
    """``step_size``: an absolute step ``> 0``, or ``None`` for the attack's ``rule``."""
    return Param(
        "step_size", float, None, low=0.0, low_open=True, nullable=True,
        help=f"absolute step; None: {rule}",
    )  # fmt: skip


Objective = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]

#: A gradient estimator ``(active, x_cur, y, target, momentum) -> (g, rows, logits)``:
#: ``active`` ``(n,)`` indices into the batch, ``x_cur`` ``(n, C, H, W)`` their iterates,
#: ``y``/``target`` their labels, ``momentum`` their accumulated momentum (``None``
#: without momentum). It returns the ascent gradient ``g`` shaped like ``x_cur`` and,
#: where it evaluated the iterate itself, the logits of those images: ``rows`` ``(n,)``
#: bool and ``logits`` ``(n, K)`` valid on ``rows`` (``None, None`` if it saw none).
GradientFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"],
    "tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]",
]
#: Builds a run's :data:`GradientFn` from ``(guard, x, y, target, seeds)``: the model
#: guard, the ``(N, C, H, W)`` clean images (working dtype), labels, targets and the
#: ``(N,)`` int64 per-sample seeds (for per-sample random streams).
GradientFactory = Callable[
    [ModelGuard, torch.Tensor, torch.Tensor, "torch.Tensor | None", torch.Tensor], GradientFn
]


class _Kept:
    """Per sample, the successful iterate with the highest objective seen so far."""

    def __init__(self, like: torch.Tensor) -> None:
        n = like.shape[0]
        self.found = torch.zeros(n, dtype=torch.bool, device=like.device)
        self.score = torch.full((n,), float("-inf"), dtype=torch.float64, device=like.device)
        self.x: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None
        self._like = like

    def offer(
        self,
        idx: torch.Tensor,
        xs: torch.Tensor,
        logits: torch.Tensor,
        won: torch.Tensor,
        score: torch.Tensor,
    ) -> None:
        """Iterates ``xs`` of samples ``idx`` with their logits, success and objective."""
        score = score.double()
        better = won & score.isfinite() & (score > self.score[idx])
        if not bool(better.any()):
            return
        if self.x is None:
            self.x = torch.empty_like(self._like)
            self.logits = logits.new_empty(self._like.shape[0], logits.shape[1])
        pick = idx[better]
        self.x[pick] = xs[better]
        self.logits[pick] = logits[better]  # type: ignore[index]
        self.score[pick] = score[better]
        self.found[pick] = True


def _apply(
    objective: Objective, y: torch.Tensor, target: torch.Tensor | None, logits: torch.Tensor
) -> torch.Tensor:
    return objective(logits, y, target)


def gradient_steps(
    guard: ModelGuard,
    x: torch.Tensor,
    start: torch.Tensor,
    y: torch.Tensor,
    target: torch.Tensor | None,
    *,
    threat: ThreatModel,
    steps: int,
    step_size: float,
    objective: Objective,
    model_dtype: torch.dtype,
    momentum: float | None = None,
    early_stop: bool = False,
    gradient: GradientFn | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Projected steepest ascent of ``objective`` from ``start`` inside ``threat`` around ``x``.

    Args:
        guard: The attack's :class:`ModelGuard` (counts calls, takes input gradients).
        x: ``(N, C, H, W)`` clean images in the attack's working dtype.
        start: ``(N, C, H, W)`` first iterate, inside the threat model.
        y: ``(N,)`` labels.
        target: ``(N,)`` targets or ``None``.
        threat: Threat model with its radius.
        steps: Gradient steps ``>= 1``.
        step_size: Length of each step in the threat model's norm.
        objective: Per-sample objective to maximise, ``(logits, y, target) -> (N,)``.
        model_dtype: Dtype the model is called with (``x``'s original dtype).
        momentum: ``None`` for plain steps; a decay μ for MI-FGSM's momentum
            ``m ← μ·m + g / mean|g|`` (the step follows ``ascent(m)``).
        early_stop: Stop moving a sample once it is successful.
        gradient: ``None`` for the input gradient of ``objective`` at the iterate, or a
            :data:`GradientFn` (then ``early_stop`` must be off: the estimator may not
            evaluate the iterate itself). Iterates it did evaluate are kept like any other.

    Returns:
        ``(x_adv, logits)``: the final iterate, or — for a sample whose final iterate
        fails but an earlier one succeeded — the successful iterate with the highest
        objective; and the logits of exactly those images.
    """
    if early_stop and gradient is not None:
        raise ValueError("early_stop needs the iterate's own logits; not with a gradient estimator")
    xa = start.clone()
    n = x.shape[0]
    mom = torch.zeros_like(x) if momentum is not None else None
    kept = _Kept(x)
    everyone = torch.arange(n, device=x.device)
    active = everyone
    for _ in range(steps):
        whole = active.numel() == n
        clean, cur = (x, xa) if whole else (x[active], xa[active])
        ya = y if whole else y[active]
        ta = None if target is None else (target if whole else target[active])
        if gradient is None:
            g, logits = guard.grad(
                cur.to(model_dtype), functools.partial(_apply, objective, ya, ta)
            )
            won = success_of(logits, ya, ta)
            kept.offer(active, cur, logits, won, objective(logits, ya, ta))
        else:
            g, rows, seen = gradient(active, cur, ya, ta, None if mom is None else mom[active])
            if rows is not None and seen is not None and bool(rows.any()):
                yr, tr = ya[rows], None if ta is None else ta[rows]
                won_r = success_of(seen[rows], yr, tr)
                kept.offer(
                    active[rows], cur[rows], seen[rows], won_r, objective(seen[rows], yr, tr)
                )
        # A non-finite gradient (a model returning NaN/inf) would poison the iterate: such
        # a sample does not move (its logits make it a failure anyway).
        g = torch.nan_to_num(g.to(xa.dtype), nan=0.0, posinf=0.0, neginf=0.0)
        if early_stop:
            # Successful samples stop where they are; the rest keep going.
            going = ~won
            active, g, clean, cur = active[going], g[going], clean[going], cur[going]
            if active.numel() == 0:
                break
        if mom is not None and momentum is not None:
            # A zero gradient (saturated softmax) would divide 0/0: keep it at zero.
            scale = g.abs().flatten(1).mean(dim=1).reshape(-1, *([1] * (g.dim() - 1)))
            g = g / torch.where(scale > 0, scale, torch.ones_like(scale))
            g = mom[active] * momentum + g
            mom[active] = g
        xa[active] = threat.project(cur + step_size * threat.ascent(g), clean)
    logits = guard.logits(xa.to(model_dtype))
    if kept.x is not None:
        use = kept.found & ~success_of(logits, y, target)
        if bool(use.any()):
            xa[use] = kept.x[use]
            logits[use] = kept.logits[use].to(logits.dtype)  # type: ignore[index]
    return xa, logits


def steepest_ascent(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    threat: ThreatModel,
    steps: int,
    step_size: float,
    objective: Objective,
    momentum: float | None = None,
    early_stop: bool = False,
    random_start: bool = False,
    gradient: GradientFactory | None = None,
    target: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    seeds: torch.Tensor | None = None,
) -> AttackResult:
    """A whole projected-gradient attack: checks, model guard, start, steps, result.

    FGSM, MI-FGSM and one PGD run are this function with different arguments (see
    :func:`gradient_steps`). ``random_start`` draws the first iterate with
    :meth:`ThreatModel.random_start` from per-sample seeds (stream ``STREAM_START``).
    ``gradient`` builds the run's gradient estimator from the guard, the clean images,
    the labels and the per-sample seeds (the same seeds the random start uses).
    """
    y, target = check_inputs(model, x, y, target, generator=generator, seeds=seeds)
    with ModelGuard(model, y=y, target=target) as guard, torch.no_grad():
        x0 = x.detach().to(work_dtype(x))
        start = x0
        per_sample = None
        if random_start or gradient is not None:
            per_sample = resolve_seeds(x0.shape[0], generator=generator, seeds=seeds)
        if random_start and per_sample is not None:
            start = threat.random_start(x0, sample_generators(per_sample, STREAM_START))
        estimator = None
        if gradient is not None and per_sample is not None:
            estimator = gradient(guard, x0, y, target, per_sample)
        xa, logits = gradient_steps(
            guard, x0, start, y, target, threat=threat, steps=steps, step_size=step_size,
            objective=objective, model_dtype=x.dtype, momentum=momentum, early_stop=early_stop,
            gradient=estimator,
        )  # fmt: skip
        return finish(guard, x, xa, y, target, logits=logits)


def with_restarts(
    run: Callable[..., AttackResult],
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    restarts: int,
    randomized: bool,
    target: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    seeds: torch.Tensor | None = None,
) -> AttackResult:
    """Run ``run`` up to ``restarts`` times with fresh per-sample seeds; keep the best.

    Run *r* attacks only the samples no earlier run broke, with
    :func:`~advtune.attacks._random.restart_seeds` (run 0 uses the caller's seeds, so one
    restart is exactly one call of ``run``). Per sample, a success beats a failure;
    among failures the run with the larger logit margin (closer to the boundary) is kept.

    Args:
        run: An attack ``run(model, x, y, *, target, generator, seeds) -> AttackResult``
            (hyperparameters already bound).
        model, x, y, target, generator, seeds: As for any attack.
        restarts: Runs ``>= 1``.
        randomized: Whether ``run`` draws random numbers. Restarts of a deterministic run
            would repeat identical work, so ``restarts > 1`` is refused for it.

    Returns:
        :class:`AttackResult`; ``model_calls`` sums the runs' calls.

    Raises:
        ValueError: ``restarts > 1`` for a deterministic run, or invalid inputs.
    """
    if restarts > 1 and not randomized:
        raise ValueError(
            f"restarts={restarts} without randomness would repeat one identical run; "
            "use restarts=1 or enable the random start"
        )
    if restarts == 1:
        return run(model, x, y, target=target, generator=generator, seeds=seeds)
    y, target = check_inputs(model, x, y, target, generator=generator, seeds=seeds)
    n = x.shape[0]
    base = resolve_seeds(n, generator=generator, seeds=seeds)
    x_adv = x.detach().clone()
    logits: torch.Tensor | None = None
    success = torch.zeros(n, dtype=torch.bool, device=x.device)
    score = torch.full((n,), float("-inf"), dtype=torch.float64, device=x.device)
    calls = 0
    cost: ModelCalls | None = ModelCalls()
    todo = torch.arange(n, device=x.device)
    for r in range(restarts):
        ts = None if target is None else target[todo]
        seeds_r = restart_seeds(base, r)[todo.cpu()]
        part = run(model, x[todo], y[todo], target=ts, generator=None, seeds=seeds_r)
        calls += part.model_calls
        cost = None if cost is None or part.calls is None else cost + part.calls
        if logits is None:
            logits = part.logits.new_empty(n, part.logits.shape[1])
        s = margin_loss(part.logits.double(), y[todo], ts)
        # Run 0 fills every sample (also those whose margin is NaN).
        better = (
            (part.success & ~success[todo])
            | ((part.success == success[todo]) & (s > score[todo]))
            | (r == 0)
        )
        pick = todo[better]
        x_adv[pick] = part.x_adv[better]
        logits[pick] = part.logits[better]
        success[pick], score[pick] = part.success[better], s[better]
        todo = todo[~success[todo]]
        if todo.numel() == 0:
            break
    linf, l2 = norms(x_adv - x.detach())
    return AttackResult(x_adv, success, logits, linf, l2, calls, calls=cost)  # type: ignore[arg-type]


def bind(fn: Callable[..., AttackResult], **hyperparameters: Any) -> Callable[..., AttackResult]:
    """``fn`` with ``hyperparameters`` bound, as ``run(model, x, y, *, target, generator,
    seeds)`` for :func:`with_restarts`."""

    def run(model: Any, x: Any, y: Any, **common: Any) -> AttackResult:
        return fn(model, x, y, **common, **hyperparameters)

    return run
