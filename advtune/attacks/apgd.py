"""Auto-PGD (Croce & Hein, ICML 2020): PGD with an adaptive step size and momentum.

``apgd`` runs APGD on the cross-entropy or the DLR loss; ``apgd_t`` is the targeted
version of AutoAttack (targeted DLR loss towards each of the top ``n_targets`` classes in
turn, success judged untargeted). Reference: Croce & Hein, "Reliable evaluation of
adversarial robustness with an ensemble of diverse parameter-free attacks", ICML 2020
(arXiv:2003.01690), Section 3 and Algorithm 1.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from advtune.attacks import _masking
from advtune.attacks._loop import EPS
from advtune.attacks._random import resolve_seeds, sample_generators
from advtune.attacks._registry import Param, register
from advtune.attacks._result import (
    AttackResult,
    ModelGuard,
    ce_loss,
    check_inputs,
    finish,
    margin_loss,
    success_of,
    work_dtype,
)
from advtune.attacks.threat import ThreatModel, threat_model

__all__ = ["APGD_PARAMS", "APGD_T_PARAMS", "RUNS", "apgd", "apgd_t", "checkpoints", "dlr_loss"]

Objective = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]

RHO = 0.75  # fraction of successful loss increases below which the step is halved
MOMENTUM = 0.75  # the paper's alpha: weight of the new step against the previous move
# Random-number streams (per-sample seeds are mixed with these): the CE, DLR and
# targeted-DLR runs of one sample start from unrelated points.
_STREAMS = {"ce": 0x41504743, "dlr": 0x41504744, "dlr_t": 0x41504754}


def checkpoints(steps: int) -> list[int]:
    """The iterations ``w_j`` at which APGD may halve its step size (L∞ and L2).

    The official code's integer schedule, which published results use: the first
    period is ``max(int(0.22 · steps), 1)`` iterations, each next one
    ``max(int(0.03 · steps), 1)`` shorter, but never shorter than
    ``max(int(0.06 · steps), 1)``. It equals the paper's
    ``w_j = ⌈p_j · steps⌉`` (``p_1 = 0.22``, ``p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03,
    0.06)``) at multiples of 100 steps (for 100: 22, 41, 57, 70, 80, 87, 93, 99) and
    halves more often at small budgets (for 20: 4, 7, 9, 10, 11, ..., 20). The fractions
    are computed in hundredths, so 0.22 · 100 is exactly 22.
    """
    first = max(22 * steps // 100, 1)
    shrink = max(3 * steps // 100, 1)
    shortest = max(6 * steps // 100, 1)
    out: list[int] = []
    w, period = first, first
    while w <= steps:
        out.append(w)
        period = max(period - shrink, shortest)
        w += period
    return out


def dlr_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """Difference of Logits Ratio, per sample, to *maximise* ``(N,)``.

    Untargeted: ``−(z_y − max_{j≠y} z_j) / (z_π1 − z_π3)``; targeted:
    ``−(max_{j≠t} z_j − z_t) / (z_π1 − (z_π3 + z_π4) / 2)``, where ``π`` sorts the logits
    in decreasing order. The ratio is invariant to shifting and rescaling the logits. The
    targeted numerator uses the best class other than ``t``; while the prediction is
    still ``y`` that is ``z_y``, the paper's numerator, so APGD-T runs are unchanged until
    a sample is broken, and a user-given target is pursued until it is the prediction.

    Raises:
        ValueError: Fewer than 3 classes (4 when targeted).
    """
    k = logits.shape[1]
    need = 3 if target is None else 4
    if k < need:
        kind = "targeted " if target is not None else ""
        raise ValueError(f"the {kind}DLR loss needs at least {need} classes, got {k}")
    z = logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
    top = z.topk(need, dim=1).values
    third = top[:, 2] if target is None else 0.5 * (top[:, 2] + top[:, 3])
    scale = top[:, 0] - third
    return margin_loss(z, y, target) / (scale + 1e-12)


def _ce(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    # Float32 (or float64) loss whatever the logits' dtype: AMP-safe.
    z = logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
    return ce_loss(z, y, target)


LOSSES: dict[str, Objective] = {"ce": _ce, "dlr": dlr_loss}


def _expand(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.dim() - 1)))


@dataclass
class _Run:
    """What one APGD run found for each sample of its batch."""

    x: torch.Tensor  # the successful iterate if broken, else the best-loss iterate
    logits: torch.Tensor  # logits of x
    broken: torch.Tensor  # (n,) bool
    loss: torch.Tensor  # (n,) best loss reached


class _Gradient:
    """Loss gradients with optional EOT averaging and the masking checks on the first one."""

    def __init__(self, guard: ModelGuard, model_dtype: torch.dtype, eot_iter: int) -> None:
        self.guard, self.model_dtype, self.eot_iter = guard, model_dtype, eot_iter
        self.checked = False

    def __call__(
        self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None, objective: Objective
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(grad, logits, loss)`` at ``x``; gradient averaged over ``eot_iter`` calls."""
        total = torch.zeros_like(x)
        losses: list[torch.Tensor] = []

        def f(z: torch.Tensor) -> torch.Tensor:
            value = objective(z, y, t)
            losses.append(value.detach())
            return value

        for _ in range(self.eot_iter):
            g, logits = self.guard.grad(x.to(self.model_dtype), f)
            total += g.to(x.dtype)
        if self.eot_iter > 1:
            total /= self.eot_iter
        if not self.checked:
            # The reference warns about zero gradients; non-finite ones would turn the
            # iterate into NaN, so they are reported and zeroed.
            self.checked = True
            _masking.check_gradients(total, stacklevel=4)
        if not bool(torch.isfinite(total).all()):
            total = torch.nan_to_num(total, nan=0.0, posinf=0.0, neginf=0.0)
        return total, logits, losses[-1].to(x.dtype)


@dataclass
class _Task:
    """What the runs of one round share: the samples, their targets and the objective.

    ``t_loss`` is the target the loss aims at, ``t_goal`` the one success is judged on
    (``None``: untargeted). APGD-T uses a ``t_loss`` with ``t_goal=None``.
    """

    grad: _Gradient
    x: torch.Tensor
    y: torch.Tensor
    t_loss: torch.Tensor | None
    t_goal: torch.Tensor | None
    objective: Objective

    def __call__(self, z: torch.Tensor, s: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """``(grad, logits, loss)`` at iterates ``z`` of the samples in state ``s``."""
        return self.grad(z, s["y"], s.get("tl"), self.objective)


class _State:
    """What one APGD run tracks: per-sample tensors of the samples still attacked (``s``,
    ``idx`` maps them into the batch) and what the run returns for every sample."""

    def __init__(
        self,
        x: torch.Tensor,
        start: torch.Tensor,
        y: torch.Tensor,
        t_loss: torch.Tensor | None,
        t_goal: torch.Tensor | None,
        first: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        *,
        stop_on_success: bool = True,
    ) -> None:
        g, logits, loss = first
        self.out_x, self.out_logits = start.clone(), logits.clone()
        self.out_broken = success_of(logits, y, t_goal)
        if not stop_on_success:
            self.out_broken = torch.zeros_like(self.out_broken)
        self.stop_on_success = stop_on_success
        self.out_loss = loss.clone()
        self.idx = (~self.out_broken).nonzero().flatten()
        idx = self.idx
        self.s = {
            "x0": x[idx], "y": y[idx], "cur": start[idx], "g": g[idx], "best": start[idx],
            "g_best": g[idx], "best_logits": logits[idx], "loss_best": loss[idx],
        }  # fmt: skip
        for key, full in (("tl", t_loss), ("tg", t_goal)):
            if full is not None:
                self.s[key] = full[idx]

    def add(self, **values: torch.Tensor) -> None:
        """More per-sample state (already restricted to the samples attacked)."""
        self.s.update(values)

    def record(
        self, z: torch.Tensor, g: torch.Tensor, logits: torch.Tensor, loss: torch.Tensor
    ) -> None:
        """The new iterate and its gradient; the best point where the loss rose."""
        s = self.s
        s["cur"], s["g"] = z, g
        better = loss > s["loss_best"]
        s["best"] = torch.where(_expand(better, z), z, s["best"])
        s["g_best"] = torch.where(_expand(better, g), g, s["g_best"])
        s["best_logits"] = torch.where(better[:, None], logits, s["best_logits"])
        s["loss_best"] = torch.where(better, loss, s["loss_best"])

    def restart(self, where: torch.Tensor) -> None:
        """Move the samples ``where`` back to their best point and its gradient."""
        s = self.s
        s["cur"] = torch.where(_expand(where, s["cur"]), s["best"], s["cur"])
        s["g"] = torch.where(_expand(where, s["g"]), s["g_best"], s["g"])

    def drop_won(self, z: torch.Tensor, logits: torch.Tensor, loss: torch.Tensor) -> None:
        """Keep the successful iterates and stop attacking those samples."""
        if not self.stop_on_success:
            return
        won = success_of(logits, self.s["y"], self.s.get("tg"))
        if bool(won.any()):
            hit = self.idx[won]
            self.out_x[hit], self.out_logits[hit], self.out_broken[hit] = z[won], logits[won], True
            self.out_loss[hit] = loss[won]
            keep = ~won
            self.idx = self.idx[keep]
            self.s = {key: v[keep] for key, v in self.s.items()}

    def result(self) -> _Run:
        """Successful iterates where broken, the best-loss point elsewhere."""
        idx, s = self.idx, self.s
        if idx.numel():
            self.out_x[idx], self.out_logits[idx] = s["best"], s["best_logits"]
            self.out_loss[idx] = s["loss_best"]
        return _Run(
            x=self.out_x, logits=self.out_logits, broken=self.out_broken, loss=self.out_loss
        )


def _run(
    task: _Task,
    start: torch.Tensor,
    threat: ThreatModel,
    steps: int,
) -> _Run:
    """One APGD run (Algorithm 1, L∞ or L2) from ``start``; broken samples stop being attacked."""
    x = task.x
    first = task.grad(start, task.y, task.t_loss, task.objective)
    state = _State(x, start, task.y, task.t_loss, task.t_goal, first)
    eps = threat._radius()
    marks = set(checkpoints(steps))
    last_mark = 0
    n, loss0 = state.idx.numel(), first[2][state.idx]
    state.add(
        prev=state.s["cur"], loss_prev=loss0, loss_mark=loss0,
        eta=torch.full((n,), 2.0 * eps, dtype=x.dtype, device=x.device),
        ups=torch.zeros(n, dtype=torch.long, device=x.device),
        halved=torch.zeros(n, dtype=torch.bool, device=x.device),
    )  # fmt: skip
    for k in range(steps):
        if state.idx.numel() == 0:
            break
        s = state.s
        eta = _expand(s["eta"], s["cur"])
        z = threat.project(s["cur"] + eta * threat.ascent(s["g"]), s["x0"])
        if k > 0:
            # Momentum: a = 0.75 of the new step plus 0.25 of the last move.
            move = s["cur"] - s["prev"]
            z = threat.project(
                s["cur"] + MOMENTUM * (z - s["cur"]) + (1 - MOMENTUM) * move, s["x0"]
            )
        s["prev"] = s["cur"]
        g, logits, loss = task(z, s)
        state.record(z, g, logits, loss)
        s["ups"] += (loss > s["loss_prev"]).long()
        s["loss_prev"] = loss
        if k + 1 in marks:
            w = k + 1
            # Condition 1: too few of the steps since the last checkpoint raised the loss.
            cond1 = s["ups"].double() < RHO * (w - last_mark)
            # Condition 2: step size and best loss both unchanged since the last one.
            cond2 = ~s["halved"] & (s["loss_best"] <= s["loss_mark"])
            halve = cond1 | cond2
            s["eta"] = torch.where(halve, s["eta"] / 2, s["eta"])
            # Restart the halved samples from their best point (and its gradient).
            state.restart(halve)
            s["halved"], s["loss_mark"] = halve, s["loss_best"].clone()
            s["ups"].zero_()
            last_mark = w
        state.drop_won(z, logits, loss)
    return state.result()


class _Best:
    """The per-sample best over runs: any success beats failure, then the higher loss."""

    def __init__(self, x: torch.Tensor) -> None:
        n = x.shape[0]
        self.x = x.clone()
        self.logits: torch.Tensor | None = None
        self.broken = torch.zeros(n, dtype=torch.bool, device=x.device)
        self.loss = torch.full((n,), float("-inf"), dtype=x.dtype, device=x.device)
        self.seen = torch.zeros(n, dtype=torch.bool, device=x.device)

    def update(self, todo: torch.Tensor, run: _Run) -> None:
        if self.logits is None:
            n, k = self.x.shape[0], run.logits.shape[1]
            self.logits = torch.empty(n, k, dtype=run.logits.dtype, device=self.x.device)
        # A sample's first run always counts (its loss may be NaN, which wins no
        # comparison, and its logits must still be those of the image returned).
        better = (
            ~self.seen[todo]
            | (run.broken & ~self.broken[todo])
            | ((run.broken == self.broken[todo]) & (run.loss > self.loss[todo]))
        )
        keep = todo[better]
        self.seen[keep] = True
        self.x[keep], self.logits[keep] = run.x[better], run.logits[better]
        self.broken[keep], self.loss[keep] = run.broken[better], run.loss[better]


_Targets = tuple["torch.Tensor | None", "torch.Tensor | None"]
_Gens = list[torch.Generator]


def _drive(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    target: torch.Tensor | None,
    generator: torch.Generator | None,
    seeds: torch.Tensor | None,
    eps: float,
    norm: str | ThreatModel,
    steps: int,
    restarts: int,
    eot_iter: int,
    large_eps: bool,
    stream: int,
    objective: Objective,
    rounds: Callable[..., list[_Targets]],
) -> AttackResult:
    """Run APGD rounds on the samples still robust, keeping each one's best.

    Hyperparameters arrive validated against the declared :class:`Param` s (the
    registry wraps the attack). ``rounds(guard, x0, y, target, restarts)`` lists one ``(loss
    target, success target)`` pair of ``(N,)`` tensors (or ``None``) per run: restarts,
    or APGD-T's targets in turn. ``norm`` and ``eps`` become one threat object here; its
    name picks the inner loop (:data:`RUNS`).
    """
    y, target = check_inputs(model, x, y, target, generator=generator, seeds=seeds)
    threat = threat_model(norm, eps)
    if large_eps and threat.name != "l1":
        raise ValueError(f"large_eps is for norm='l1' only, got norm={threat.name!r}")
    if large_eps and steps < 3:
        raise ValueError(f"large_eps needs steps >= 3 (three stages), got {steps}")
    run_once = functools.partial(RUNS[threat.name], large_eps=large_eps)
    with ModelGuard(model, y=y, target=target) as guard, torch.no_grad():
        x0 = x.detach().to(work_dtype(x))
        n = x0.shape[0]
        gens = sample_generators(resolve_seeds(n, generator=generator, seeds=seeds), stream)
        grad = _Gradient(guard, x.dtype, eot_iter)
        best = _Best(x0)
        todo = torch.arange(n, device=x.device)
        for t_loss, t_goal in rounds(guard, x0, y, target, restarts):
            if todo.numel() == 0:
                break
            tl = None if t_loss is None else t_loss[todo]
            tg = None if t_goal is None else t_goal[todo]
            picked = [gens[i] for i in todo.tolist()]
            task = _Task(grad, x0[todo], y[todo], tl, tg, objective)
            run = run_once(task, picked, threat, steps)
            best.update(todo, run)
            todo = todo[~best.broken[todo]]
        return finish(guard, x, best.x, y, target, logits=best.logits)


def _run_from_surface(task: _Task, gens: _Gens, threat: ThreatModel, steps: int, **_: bool) -> _Run:
    # L∞ and L2: Algorithm 1 from a random point at distance exactly eps (``large_eps``
    # is refused for them before any work).
    return _run(task, threat.surface_start(task.x, gens), threat, steps)


L1_SHRINK = 1.5  # l1-APGD: step-size divisor at a checkpoint, and sparsity = L0 / 1.5
L1_MIN_STEP = 10  # ... the step never falls below eps / 10
L1_SPARSITY = 0.2  # the fraction of coordinates the first steps move


def _l0(delta: torch.Tensor) -> torch.Tensor:
    return (delta != 0).flatten(1).sum(dim=1).to(delta.dtype)


def _run_l1(
    task: _Task,
    start: torch.Tensor,
    threat: ThreatModel,
    steps: int,
    *,
    sparsity_from_start: bool,
    stop_on_success: bool,
) -> _Run:
    """One l1-APGD run (Croce & Hein, ICML 2021) from ``start``.

    Each step moves the ``k · D`` coordinates with the largest gradient by ``±η / count``
    (:meth:`L1.ascent` with ``sparsity=k``) and projects exactly onto the L1 ball ∩ box;
    no momentum. Every ``max(int(0.04 · steps), 1)`` steps ``k`` becomes the sparsity of
    the best point over 1.5; where that sparsity fell below 95 % of the last one, ``η``
    resets to ``eps`` and the iterate to the best point, elsewhere ``η`` is divided by
    1.5 (never below ``eps / 10``). ``k`` starts at 0.2 (or, from a given start, at its
    sparsity over 1.5). Without ``stop_on_success`` every sample runs every step and
    returns its best-loss point (the larger-eps stages of :func:`_run_l1_stages`).
    """
    eps = threat._radius()
    x = task.x
    n_fts = x[0].numel()
    first = task.grad(start, task.y, task.t_loss, task.objective)
    state = _State(
        x, start, task.y, task.t_loss, task.t_goal, first, stop_on_success=stop_on_success
    )
    period = max(4 * steps // 100, 1)
    idx = state.idx
    if sparsity_from_start:
        sp_old = _l0(start[idx] - x[idx])
        k = sp_old / n_fts / L1_SHRINK
    else:
        k = torch.full((idx.numel(),), L1_SPARSITY, dtype=x.dtype, device=x.device)
        sp_old = torch.full_like(k, float(n_fts))
    state.add(eta=torch.full_like(k, eps), k=k, sp_old=sp_old)
    ascent = threat.ascent
    for i in range(steps):
        if state.idx.numel() == 0:
            break
        s = state.s
        step = _expand(s["eta"], s["cur"]) * ascent(s["g"], sparsity=s["k"])  # type: ignore[call-arg]
        z = threat.project(s["cur"] + step, s["x0"])
        g, logits, loss = task(z, s)
        state.record(z, g, logits, loss)
        if (i + 1) % period == 0:
            sp = _l0(s["best"] - s["x0"])
            reset = sp / s["sp_old"] < 0.95
            s["k"], s["sp_old"] = sp / n_fts / L1_SHRINK, sp
            eta = torch.where(reset, torch.full_like(s["eta"], eps), s["eta"] / L1_SHRINK)
            s["eta"] = eta.clamp(eps / L1_MIN_STEP, eps)
            state.restart(reset)
        state.drop_won(z, logits, loss)
    return state.result()


def _run_l1_stages(
    task: _Task,
    gens: list[torch.Generator],
    threat: ThreatModel,
    steps: int,
    *,
    large_eps: bool,
) -> _Run:
    """l1-APGD from a projected Gaussian; with ``large_eps`` in three stages.

    ``large_eps`` (the official L1 ensemble's setting): ``ceil(0.3 · steps)`` steps at
    ``3 · eps``, as many at ``2 · eps``, the rest at ``eps``, each stage starting from
    the previous stage's best point projected onto its ball; only the last stage's
    successes count. ``0.3 · steps`` is a float, as in the official code
    (``ceil(0.3 · 100) = 31``: stages of 31, 31 and 38 steps).
    """
    eps, x = threat._radius(), task.x
    if not large_eps:
        start = threat.surface_start(x, gens)
        return _run_l1(task, start, threat, steps, sparsity_from_start=False, stop_on_success=True)
    first = math.ceil(0.3 * steps)
    current = threat.with_eps(3 * eps).surface_start(x, gens)
    for radius in (3 * eps, 2 * eps):
        stage = threat.with_eps(radius)
        current = _run_l1(
            task, stage.project(current, x), stage, first,
            sparsity_from_start=True, stop_on_success=False,
        ).x  # fmt: skip
    return _run_l1(
        task, threat.project(current, x), threat, steps - 2 * first,
        sparsity_from_start=True, stop_on_success=True,
    )  # fmt: skip


#: The inner loop per threat model (by name): ``(task, gens, threat, steps, *,
#: large_eps) -> _Run``. A norm APGD supports is a key here.
RUNS: dict[str, Callable[..., _Run]] = {
    "linf": _run_from_surface,
    "l2": _run_from_surface,
    "l1": _run_l1_stages,
}


def _apgd_params(*extra: Param) -> tuple[Param, ...]:
    norm = Param("norm", str, "linf", choices=tuple(RUNS), role="norm", help="threat model")
    steps = Param("steps", int, 100, low=1, role="budget", cheap=3, help="iterations per run")
    restarts = Param(
        "restarts", int, 1, low=1, high=1000, role="budget", cheap=1,
        help="runs per sample (per target class for apgd_t)",
    )  # fmt: skip
    eot_iter = Param("eot_iter", int, 1, low=1, high=1000, help="EOT gradients per step")
    large_eps = Param(
        "large_eps", bool, False,
        help="l1 only: 30 % of the steps at 3·eps, 30 % at 2·eps, then eps (official L1)",
    )  # fmt: skip
    return (EPS, norm, steps, restarts, eot_iter, large_eps, *extra)


#: APGD's hyperparameters, declared once (validation, presets, CLI, tests read them).
APGD_PARAMS = _apgd_params(
    Param("loss", str, "ce", choices=tuple(LOSSES), help="objective: ce or dlr"),
)
#: APGD-T's hyperparameters.
APGD_T_PARAMS = _apgd_params(
    Param(
        "n_targets", int, 9, low=1, high=1000, role="budget", cheap=2,
        help="target classes tried per sample",
    ),
)  # fmt: skip


@register("apgd", norm="linf", randomized=True, params=APGD_PARAMS)
def apgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    norm: str = "linf",
    loss: str = "ce",
    steps: int = 100,
    restarts: int = 1,
    eot_iter: int = 1,
    large_eps: bool = False,
    target: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    seeds: torch.Tensor | None = None,
) -> AttackResult:
    """Auto-PGD: PGD with momentum and a step size halved at checkpoints when progress stalls.

    From a random point at distance ``eps`` the step size starts at ``2 · eps`` and is
    halved at the checkpoints ``w_j`` (:func:`checkpoints`) for each sample where fewer
    than 75 % of the steps since the last checkpoint raised the loss, or where neither
    the step size nor the best loss changed since then; a halved sample restarts from its
    best point. Each step mixes the projected gradient step (weight 0.75) with the last
    move (0.25). A sample stops being attacked once it is broken (its successful iterate
    is kept); the others return their highest-loss iterate. Croce & Hein, ICML 2020
    (arXiv:2003.01690).

    Args:
        model: Classifier on [0, 1] images returning logits ``(N, K)``, in eval mode.
        x: ``(N, C, H, W)`` clean images in [0, 1]. Not modified.
        y: ``(N,)`` true labels.
        eps: Radius of the ``norm`` ball (absolute pixel units), ``>= 0``.
        norm: ``"linf"``, ``"l2"`` or ``"l1"`` (l1-APGD, Croce & Hein, ICML 2021: sparse
            steps, exact projection onto the L1 ball ∩ box, an adaptive sparsity; see
            docs/autoattack.md), or a threat object of one of these.
        loss: ``"ce"`` (cross-entropy; −CE of the target when targeted) or ``"dlr"`` (the
            Difference of Logits Ratio, :func:`dlr_loss`; targeted DLR when targeted).
        steps: Iterations per run, ``>= 1`` (the checkpoints scale with it).
        restarts: Runs per sample, each from a new random point; broken samples skip the
            remaining runs, the others keep the run with the highest loss.
        eot_iter: Gradients averaged per step (Expectation over Transformation, for
            randomised models); ``1`` for deterministic models.
        large_eps: L1 only: 30 % of the steps at ``3 · eps``, 30 % at ``2 · eps``, the
            rest at ``eps`` (the official L1 ensemble's setting); ``steps >= 3``.
        target: Optional ``(N,)`` target classes (each ≠ ``y``): success means the
            prediction equals the target.
        generator: Source of the random starts when ``seeds`` is not given.
        seeds: ``(N,)`` integer seeds; sample *i*'s random starts depend only on
            ``seeds[i]``, so results do not depend on batch composition.

    Returns:
        :class:`AttackResult`; ``model_calls`` counts ``steps + 1`` gradient calls per run
        and EOT draw on the samples still attacked (no extra final evaluation).

    Raises:
        ValueError: Invalid inputs or hyperparameters; DLR with fewer than 3 classes.
    """
    return _drive(
        model, x, y, target=target, generator=generator, seeds=seeds, eps=eps, norm=norm,
        steps=steps, restarts=restarts, eot_iter=eot_iter, large_eps=large_eps,
        stream=_STREAMS[loss if target is None or loss == "ce" else "dlr_t"],
        objective=LOSSES[loss], rounds=_restarts,
    )  # fmt: skip


def _restarts(
    guard: ModelGuard, x0: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None, restarts: int
) -> list[_Targets]:
    return [(target, target)] * restarts


@register("apgd_t", norm="linf", randomized=True, params=APGD_T_PARAMS)
def apgd_t(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    norm: str = "linf",
    steps: int = 100,
    n_targets: int = 9,
    restarts: int = 1,
    eot_iter: int = 1,
    large_eps: bool = False,
    target: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    seeds: torch.Tensor | None = None,
) -> AttackResult:
    """Targeted APGD (AutoAttack's APGD-T): the targeted DLR loss towards each top class in turn.

    For each sample the ``n_targets`` classes with the highest clean logits other than
    ``y`` are tried in order of decreasing logit, ``restarts`` APGD runs each (see
    :func:`apgd`), on the targeted DLR loss (:func:`dlr_loss`). Success is *untargeted*
    (prediction ≠ ``y``), as in AutoAttack: a sample stops once broken. Croce & Hein,
    ICML 2020 (arXiv:2003.01690).

    Args:
        model: Classifier on [0, 1] images returning logits ``(N, K)``, ``K >= 4``.
        x: ``(N, C, H, W)`` clean images in [0, 1]. Not modified.
        y: ``(N,)`` true labels.
        eps: Radius of the ``norm`` ball, ``>= 0``.
        norm: ``"linf"``, ``"l2"`` or ``"l1"`` (see :func:`apgd`).
        steps: Iterations per run, ``>= 1``.
        n_targets: Target classes tried per sample, ``>= 1``; at most ``K − 1`` are used
            (a larger value runs every other class, as there are no more).
        restarts: Runs per target class, ``>= 1``.
        eot_iter: Gradients averaged per step (EOT), ``>= 1``.
        large_eps: L1 only: the three-stage radius schedule (see :func:`apgd`).
        target: If given, ``(N,)`` classes (each ≠ ``y``) used as the only target, and
            success then means the prediction equals it (a targeted attack, like every
            advtune attack with ``target=``); ``n_targets`` is ignored.
        generator: Source of the random starts when ``seeds`` is not given.
        seeds: ``(N,)`` integer seeds; sample *i*'s random starts depend only on
            ``seeds[i]``.

    Returns:
        :class:`AttackResult`. ``model_calls`` includes one clean forward pass (to rank
        the target classes) when ``target`` is not given.

    Raises:
        ValueError: Invalid inputs or hyperparameters, fewer than 4 classes.
    """

    def rounds(
        guard: ModelGuard, x0: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None, runs: int
    ) -> list[_Targets]:
        if t is not None:
            return _restarts(guard, x0, y, t, runs)
        # Rank the other classes by their clean logit (the true class masked out).
        clean = guard.logits(x0.to(x.dtype)).to(x0.dtype)
        masked = clean.scatter(1, y[:, None], float("-inf"))
        ranked = masked.topk(min(n_targets, clean.shape[1] - 1), dim=1).indices
        return [(ranked[:, r], None) for r in range(ranked.shape[1]) for _ in range(runs)]

    return _drive(
        model, x, y, target=target, generator=generator, seeds=seeds, eps=eps, norm=norm,
        steps=steps, restarts=restarts, eot_iter=eot_iter, large_eps=large_eps,
        stream=_STREAMS["dlr_t"],
        objective=dlr_loss, rounds=rounds,
    )  # fmt: skip
