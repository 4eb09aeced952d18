"""PGD: projected gradient ascent in an L∞ or L2 ball (Madry et al., ICLR 2018)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from advtune.attacks._random import (
    STREAM_START,
    resolve_seeds,
    sample_generators,
    uniform_l2_ball,
    uniform_linf_ball,
)
from advtune.attacks._registry import register
from advtune.attacks._result import (
    LOSSES,
    AttackResult,
    ModelGuard,
    check_choice,
    check_inputs,
    check_int,
    check_nonnegative,
    check_positive,
    clip_unit,
    finish,
    project_l2,
    project_linf,
    success_of,
    work_dtype,
)

__all__ = ["pgd"]

Objective = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


@register("pgd", norm="linf", randomized=True)
def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    steps: int = 10,
    step_size: float | None = None,
    norm: str = "linf",
    random_start: bool = True,
    restarts: int = 1,
    early_stop: bool = False,
    loss: str = "ce",
    target: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    seeds: torch.Tensor | None = None,
) -> AttackResult:
    """Projected Gradient Descent in an L∞ or L2 ball, with random restarts.

    Each step moves ``step_size`` along the signed gradient (L∞) or the L2-normalised
    gradient (L2) of the loss, then projects onto the ``eps``-ball around ``x`` and the
    [0, 1] box. Without random start and with ``restarts=1`` it is step for step the
    update of torchattacks' ``PGD``/``PGDL2``. Reference: Madry et al., "Towards Deep
    Learning Models Resistant to Adversarial Attacks", ICLR 2018 (arXiv:1706.06083).

    Args:
        model: Classifier on [0, 1] images returning logits ``(N, K)``; expected in eval
            mode. Its modes and ``requires_grad`` flags are restored afterwards.
        x: ``(N, C, H, W)`` clean images in [0, 1]. Not modified.
        y: ``(N,)`` true labels.
        eps: Radius of the ball (absolute pixel units), ``>= 0``.
        steps: Gradient steps per restart, ``>= 1``.
        step_size: Absolute step; ``None`` means ``2.5 · eps / steps`` (Madry et al.'s
            rule: enough to cross the ball and come back).
        norm: ``"linf"`` or ``"l2"``.
        random_start: Start from a point drawn uniformly from the ball (then clipped
            into [0, 1]) instead of from ``x``.
        restarts: Runs per sample, ``>= 1``. A sample already successful skips later
            runs; otherwise the run with the highest final loss is kept.
        early_stop: Stop moving a sample as soon as it is successful (fewer model calls,
            smaller perturbations; off by default so results match the reference).
        loss: ``"ce"`` (cross-entropy; −CE of the target when targeted) or ``"margin"``
            (CW logit margin ``max_{j≠y} z_j − z_y``; targeted ``z_t − max_{j≠t} z_j``).
        target: Optional ``(N,)`` target classes (each ≠ ``y``) for a targeted attack.
        generator: Source of the random start when ``seeds`` is not given.
        seeds: ``(N,)`` integer seeds; sample *i*'s random start depends only on
            ``seeds[i]``, so results do not depend on batch composition.

    Returns:
        :class:`AttackResult`. ``model_calls`` counts the gradient steps plus one
        evaluation per restart (calls on a subset of the batch count once each).

    Raises:
        ValueError: Invalid inputs or hyperparameters.
    """
    y, target = check_inputs(model, x, y, target, generator=generator, seeds=seeds)
    eps = check_nonnegative("eps", eps)
    steps = check_int("steps", steps, minimum=1)
    alpha = 2.5 * eps / steps if step_size is None else check_positive("step_size", step_size)
    norm = check_choice("norm", norm, ("linf", "l2"))
    restarts = check_int("restarts", restarts, minimum=1)
    objective = LOSSES[check_choice("loss", loss, tuple(LOSSES))]
    if not isinstance(random_start, bool):
        raise ValueError(f"random_start must be a bool, got {random_start!r}")
    if not isinstance(early_stop, bool):
        raise ValueError(f"early_stop must be a bool, got {early_stop!r}")

    with ModelGuard(model, y=y, target=target) as guard, torch.no_grad():
        x0 = x.detach().to(work_dtype(x))
        n = x0.shape[0]
        gens = (
            sample_generators(resolve_seeds(n, generator=generator, seeds=seeds), STREAM_START)
            if random_start
            else []
        )
        best = x0.clone()
        best_logits: torch.Tensor | None = None
        best_success = torch.zeros(n, dtype=torch.bool, device=x.device)
        best_score = torch.full((n,), float("-inf"), dtype=x0.dtype, device=x.device)
        todo = torch.arange(n, device=x.device)
        for _ in range(restarts):
            xs, ys = x0[todo], y[todo]
            ts = None if target is None else target[todo]
            start = xs.clone()
            if random_start:
                ball = uniform_linf_ball if norm == "linf" else uniform_l2_ball
                picked = [gens[i] for i in todo.tolist()]
                start = clip_unit(xs + ball(picked, tuple(xs.shape[1:]), eps, xs))
            xa, logits = _run(
                guard, xs, start, ys, ts, x.dtype, eps, alpha, steps, norm, objective, early_stop
            )
            if best_logits is None:
                best_logits = torch.empty(n, logits.shape[1], dtype=logits.dtype, device=x.device)
            score = objective(logits, ys, ts).to(x0.dtype)
            won = success_of(logits, ys, ts)
            # Success beats failure; among failures the higher loss wins.
            better = (won & ~best_success[todo]) | (
                (won == best_success[todo]) & (score > best_score[todo])
            )
            keep = todo[better]
            best[keep], best_logits[keep] = xa[better], logits[better]
            best_success[keep], best_score[keep] = won[better], score[better]
            todo = todo[~best_success[todo]]
            if todo.numel() == 0:
                break
        return finish(guard, x, best, y, target, logits=best_logits)


def _run(
    guard: ModelGuard,
    x: torch.Tensor,
    xa: torch.Tensor,
    y: torch.Tensor,
    target: torch.Tensor | None,
    model_dtype: torch.dtype,
    eps: float,
    alpha: float,
    steps: int,
    norm: str,
    objective: Objective,
    early_stop: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One PGD run from ``xa``; returns the final images and their logits."""
    # ``active`` (early stop only) indexes the samples still moving; None means all.
    active: torch.Tensor | None = None
    for _ in range(steps):
        clean, cur, ya, ta = x, xa, y, target
        if active is not None:
            clean, cur, ya = x[active], xa[active], y[active]
            ta = None if target is None else target[active]
        g, logits = guard.grad(cur.to(model_dtype), lambda z, ya=ya, ta=ta: objective(z, ya, ta))
        g = g.to(xa.dtype)
        if early_stop:
            # Successful samples stop where they are; the rest keep going.
            going = ~success_of(logits, ya, ta)
            if active is None:
                active = torch.arange(x.shape[0], device=x.device)
            active, g, clean, cur = active[going], g[going], clean[going], cur[going]
            if active.numel() == 0:
                break
        if norm == "linf":
            new = project_linf(cur + alpha * g.sign(), clean, eps)
        else:
            gnorm = g.flatten(1).norm(p=2, dim=1).clamp_min(1e-12)
            new = project_l2(
                cur + alpha * g / gnorm.reshape(-1, *([1] * (g.dim() - 1))), clean, eps
            )
        if active is None:
            xa = new
        else:
            xa[active] = new
    return xa, guard.logits(xa.to(model_dtype))
