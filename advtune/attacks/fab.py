"""FAB: the Fast Adaptive Boundary attack (Croce & Hein, ICML 2020), targeted as in AutoAttack.

FAB looks for the *smallest* perturbation that changes the decision, then the attack
succeeds only if that perturbation fits the ``eps`` budget. Each step linearises the
decision boundary at the current iterate, projects both the iterate and the clean image
onto that hyperplane (intersected with the [0, 1] box), and moves to a convex combination
of the two projections, pushed a little past the hyperplane (``eta``). Once an iterate is
adversarial it is recorded if it is the smallest so far and pulled back towards the clean
image (``beta``), so the search keeps shrinking the perturbation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from advtune.attacks._loop import EPS
from advtune.attacks._random import STREAM_START, resolve_seeds, sample_generators
from advtune.attacks._registry import Param, register
from advtune.attacks._result import (
    AttackResult,
    ModelGuard,
    check_inputs,
    clip_unit,
    finish,
    margin_loss,
    success_of,
    work_dtype,
)
from advtune.attacks.threat import ThreatModel, threat_model

__all__ = ["FAB_PARAMS", "fab", "project_hyperplane_box"]


def _waterfill(
    aw: torch.Tensor, room: torch.Tensor, need: torch.Tensor, *, weight: Callable[..., torch.Tensor]
) -> torch.Tensor:
    """``min(μ·v, room)`` ``(M, D)`` with ``v = weight(aw)`` and ``Σ aw·min(μ v, room) = need``.

    The gap closed, ``G(μ) = Σ_i |w_i|·min(μ v_i, room_i)``, is piecewise linear and
    increasing in ``μ``: sorting the breakpoints ``room_i / v_i`` finds ``μ`` exactly.
    """
    v = weight(aw)
    # Breakpoints where a coordinate hits the box; coordinates that cannot move get 0 and
    # weight 0, so they sort first and change nothing.
    bp = torch.where(v > 0, room / v.clamp_min(torch.finfo(aw.dtype).tiny), torch.zeros_like(aw))
    bp, order = bp.sort(dim=1)
    aw_s, room_s, v_s = aw.gather(1, order), room.gather(1, order), v.gather(1, order)
    done = (aw_s * room_s).cumsum(dim=1)  # gap closed by the saturated coordinates
    # Slope from the coordinates at and after each breakpoint (a tail sum: no cancellation).
    slope_from = (aw_s * v_s).flip(1).cumsum(dim=1).flip(1)
    slope_after = torch.cat([slope_from[:, 1:], torch.zeros_like(slope_from[:, :1])], dim=1)
    reached = done + bp * slope_after  # G at each breakpoint
    k = (reached <= need[:, None]).sum(dim=1).clamp_max(aw.shape[1] - 1)
    done_before = torch.where(
        k > 0, done.gather(1, (k - 1).clamp_min(0)[:, None])[:, 0], torch.zeros_like(need)
    )
    mu = ((need - done_before) / slope_from.gather(1, k[:, None])[:, 0].clamp_min(1e-30)).clamp_min(
        0
    )
    return torch.minimum(mu[:, None] * v, room)


def _greedy_l1(aw: torch.Tensor, room: torch.Tensor, need: torch.Tensor) -> torch.Tensor:
    """Minimal-L1 magnitudes ``(M, D)`` with ``Σ aw·|d| = need``, ``|d| <= room``.

    Closing gap ``aw_i`` per unit of ``|d_i|``, the cheapest coordinates are those with the
    largest ``|w_i|``: saturate them in that order (stable sort: ties keep their index
    order) and move the first one that would overshoot only by what is still needed.
    """
    order = aw.argsort(dim=1, descending=True, stable=True)
    aw_s, room_s = aw.gather(1, order), room.gather(1, order)
    done = (aw_s * room_s).cumsum(dim=1)  # gap closed once the first k+1 are saturated
    before = done - aw_s * room_s
    partial = ((need[:, None] - before) / aw_s.clamp_min(torch.finfo(aw.dtype).tiny)).clamp(
        min=torch.zeros_like(room_s), max=room_s
    )
    # Saturated while the gap is still open after them; the crossing one gets the rest.
    mag_s = torch.where(
        done <= need[:, None], room_s, torch.where(before < need[:, None], partial, 0)
    )
    return torch.zeros_like(aw).scatter(1, order, mag_s)


#: Per threat model (by name), the weight ``v_i`` of coordinate *i* in the minimal move
#: onto a hyperplane (see :func:`project_hyperplane_box`) from ``|w_i|``, for the norms
#: whose minimal move spreads over coordinates (a water-filling).
_WEIGHTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "linf": torch.ones_like,
    "l2": lambda aw: aw,
}

#: Per threat model (by name), the magnitudes ``|d_i|`` ``(M, D)`` of the minimal move onto
#: a reachable hyperplane from ``(|w|, room, need)`` (see :func:`project_hyperplane_box`).
#: A norm FAB supports is a key here.
_MOVES: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    **{name: functools.partial(_waterfill, weight=v) for name, v in _WEIGHTS.items()},
    "l1": _greedy_l1,
}

#: FAB's hyperparameters, declared once (validation, presets, CLI, tests read them).
FAB_PARAMS = (
    EPS,
    Param("norm", str, "linf", choices=tuple(_MOVES), role="norm", help="threat model"),
    Param("steps", int, 100, low=1, role="budget", cheap=3, help="iterations per run"),
    Param("n_targets", int, 9, low=1, high=1000, role="budget", cheap=2,
          help="FAB-T: runner-up classes tried"),
    Param("targeted", bool, True, help="FAB-T (one boundary per run) or untargeted FAB"),
    Param("restarts", int, 1, low=1, high=1000, role="budget", cheap=1,
          help="runs per target class"),
    Param("alpha_max", float, 0.1, low=0.0, high=1.0, help="largest weight of x's projection"),
    Param("eta", float, 1.05, low=1.0, high=10.0, help="overshoot past the boundary"),
    Param("beta", float, 0.9, low=0.0, low_open=True, high=1.0,
          help="backward step towards x after a success"),
)  # fmt: skip


@register("fab", norm="linf", randomized=False, params=FAB_PARAMS)
def fab(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    norm: str = "linf",
    steps: int = 100,
    n_targets: int = 9,
    targeted: bool = True,
    restarts: int = 1,
    alpha_max: float = 0.1,
    eta: float = 1.05,
    beta: float = 0.9,
    target: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    seeds: torch.Tensor | None = None,
) -> AttackResult:
    """Fast Adaptive Boundary attack (L∞, L2 or L1); by default FAB-T as in AutoAttack.

    With ``targeted=True`` (FAB-T, AutoAttack's "standard" version) the attack runs once
    per class among the ``n_targets`` classes with the highest clean logits other than
    ``y``, each run linearising only the boundary between ``y`` and that class; with
    ``targeted=False`` every step linearises all boundaries (one gradient per class) and
    follows the closest one. Either way success means a prediction other than ``y``; a
    run keeps the smallest-norm adversarial iterate it met, and a sample counts as broken
    when that norm is ``<= eps``. Later runs attack only the samples still robust.

    Each step: ``d1``, ``d2`` = minimal-norm moves of the iterate and of the clean image
    onto the linearised boundary inside [0, 1]; ``alpha = min(‖d1‖ / (‖d1‖ + ‖d2‖),
    alpha_max)``; ``x1 ← clip((1 − alpha)(x1 + eta·d1) + alpha(x + eta·d2))``; if ``x1``
    is adversarial, ``x1 ← x + beta(x1 − x)``. Reference: Croce & Hein, "Minimally
    distorted Adversarial Examples with a Fast Adaptive Boundary Attack", ICML 2020
    (arXiv:1907.02044); targeted use: Croce & Hein, "Reliable evaluation of adversarial
    robustness with an ensemble of diverse parameter-free attacks", ICML 2020.

    Args:
        model: Classifier on [0, 1] images returning logits ``(N, K)``; eval mode.
        x: ``(N, C, H, W)`` clean images in [0, 1]. Not modified.
        y: ``(N,)`` true labels.
        eps: Budget (absolute pixel units) a perturbation must fit to count, ``>= 0``.
        norm: ``"linf"``, ``"l2"`` or ``"l1"``: the norm minimised and bounded by ``eps``.
        steps: Iterations per run, ``>= 1`` (two model calls each: a gradient step and
            the adversarial check).
        n_targets: FAB-T only: how many runner-up classes to try, ``>= 1`` (capped at
            ``K − 1``).
        targeted: FAB-T (``True``) or untargeted FAB (``False``, ``K`` gradients per
            step from one forward pass). Ignored when ``target`` is given.
        restarts: Runs per target class, ``>= 1``; runs after the first start from a
            random point at distance ``eps / 2`` (in ``norm``) from ``x``.
        alpha_max: Largest weight of the clean image's projection, in [0, 1].
        eta: Overshoot past the linearised boundary, ``>= 1``.
        beta: Backward step towards ``x`` after a success, in (0, 1].
        target: Optional ``(N,)`` classes (each ≠ ``y``): every step linearises the
            boundary between ``target`` and the strongest other class, and success means
            predicting ``target`` (``n_targets`` and ``targeted`` are then ignored).
        generator: Source of the random restarts when ``seeds`` is not given.
        seeds: ``(N,)`` integer seeds; sample *i*'s random restarts depend only on
            ``seeds[i]``. With ``restarts=1`` the attack is deterministic.

    Returns:
        :class:`AttackResult`; samples not broken within ``eps`` come back as ``x``.
        ``model_calls`` counts one clean evaluation, two calls per step and run, and the
        final evaluation.

    Raises:
        ValueError: Invalid inputs or hyperparameters.
    """
    y, target = check_inputs(model, x, y, target, generator=generator, seeds=seeds)
    threat = threat_model(norm, eps)

    with ModelGuard(model, y=y, target=target) as guard, torch.no_grad():
        x0 = x.detach().to(work_dtype(x))
        n = x0.shape[0]
        clean_logits = guard.logits(x)
        robust = ~success_of(clean_logits, y, target)
        best = x0.clone()
        if eps == 0 or not bool(robust.any()):
            # Nothing fits a zero budget but x itself, which is not adversarial.
            return finish(guard, x, best, y, target, logits=clean_logits)
        gens = (
            sample_generators(resolve_seeds(n, generator=generator, seeds=seeds), STREAM_START)
            if restarts > 1
            else []
        )
        run = _Run(guard, x.dtype, threat, steps, alpha_max, eta, beta)
        if target is not None:
            plans: list[torch.Tensor | None] = [target]
        elif targeted:
            # Runner-up classes of the clean image, best first. Only robust samples are
            # attacked, and they rank y first (stable sort and argmax agree on ties).
            k = min(n_targets, clean_logits.shape[1] - 1)
            ranked = clean_logits.to(x0.dtype).argsort(dim=1, descending=True, stable=True)
            plans = [ranked[:, i + 1] for i in range(k)]
        else:
            plans = [None]
        for plan in plans:
            for restart in range(restarts):
                todo = robust.nonzero().flatten()
                if todo.numel() == 0:
                    break
                xs = x0[todo]
                start = xs
                if restart > 0:
                    start = threat.surface_start(xs, [gens[i] for i in todo.tolist()], eps / 2)
                cls = None if plan is None else plan[todo]
                found, dist = run(xs, start, y[todo], cls, user_target=target is not None)
                won = dist <= eps
                best[todo[won]] = found[won]
                robust[todo[won]] = False
        return finish(guard, x, best, y, target)


def project_hyperplane_box(
    t: torch.Tensor, w: torch.Tensor, b: torch.Tensor, norm: str | ThreatModel
) -> torch.Tensor:
    """Smallest move ``d`` (in ``norm``) with ``w·(t + d) = b`` and ``t + d`` in [0, 1].

    Each coordinate *i* moves in the direction ``s_i`` that closes the gap, by at most its
    room ``room_i`` to the box edge; only the magnitudes depend on the norm
    (:data:`_MOVES`). L∞ and L2: ``|d_i| = min(μ·v_i, room_i)`` with ``v_i = 1`` (L∞) or
    ``|w_i|`` (L2; KKT of the least-squares problem), ``μ`` found exactly
    (:func:`_waterfill`). L1 (a linear programme): the coordinates with the largest
    ``|w_i|`` close the most gap per unit of norm, so they go to the box edge in that
    order until the gap is closed, the last one partly (:func:`_greedy_l1`; the FAB
    paper's L1 projection). If even the whole box cannot close the gap, every coordinate
    goes to its edge (the closest the box allows).

    Args:
        t: ``(M, D)`` points in [0, 1].
        w: ``(M, D)`` hyperplane normals.
        b: ``(M,)`` offsets.
        norm: ``"linf"``, ``"l2"`` or ``"l1"``, or a threat model of that name.

    Returns:
        ``(M, D)`` moves ``d``.
    """
    gap = (w * t).sum(dim=1) - b  # the move must change w·t by -gap
    # Direction of each coordinate's move; 0 where w_i = 0 (moving it cannot help).
    s = -torch.sign(gap)[:, None] * torch.sign(w)
    room = torch.where(s > 0, 1 - t, t).clamp_min(0) * (s != 0)
    aw = w.abs()
    need = gap.abs()
    whole = (aw * room).sum(dim=1)
    d = s * _MOVES[threat_model(norm).name](aw, room, need)
    # Unreachable hyperplane: go as far as the box allows.
    return torch.where((need >= whole)[:, None], s * room, d)


class _Run:
    """One FAB run on a subset: returns the smallest adversarial iterate and its norm."""

    def __init__(
        self,
        guard: ModelGuard,
        model_dtype: torch.dtype,
        threat: ThreatModel,
        steps: int,
        alpha_max: float,
        eta: float,
        beta: float,
    ) -> None:
        self.guard, self.model_dtype, self.threat = guard, model_dtype, threat
        self.steps, self.alpha_max, self.eta, self.beta = steps, alpha_max, eta, beta

    def _size(self, delta: torch.Tensor) -> torch.Tensor:
        return self.threat.norm(delta)

    def _boundary(
        self, x1: torch.Tensor, y: torch.Tensor, cls: torch.Tensor | None, user_target: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(f, g)``: a decision-function value ``(M,)`` (< 0 on y's side) and its gradient."""
        wd = x1.dtype
        rows = torch.arange(x1.shape[0], device=x1.device)
        if cls is not None:

            def objective(z: torch.Tensor) -> torch.Tensor:
                z = z.to(wd)  # float32 decision values, also under autocast
                if user_target:
                    # Reach the target: its margin over the strongest other class.
                    return margin_loss(z, y, cls)
                return z[rows, cls] - z[rows, y]

            g, logits = self.guard.grad(x1.to(self.model_dtype), objective)
            return objective(logits), g.to(wd)
        # Untargeted: every class's boundary with y, keep the closest in the dual norm.
        logits, jac = _jacobian(self.guard, x1.to(self.model_dtype))
        z, jac = logits.to(wd), jac.to(wd)
        f = z - z[rows, y][:, None]  # (M, K)
        g = jac - jac[rows, y][:, None]  # (M, K, C, H, W)
        dual = self.threat.dual_norm(g.flatten(0, 1)).view(f.shape)
        dist = f.abs() / (dual + 1e-12)
        dist[rows, y] = float("inf")
        j = dist.argmin(dim=1)
        return f[rows, j], g[rows, j]

    def __call__(
        self,
        xs: torch.Tensor,
        x1: torch.Tensor,
        y: torch.Tensor,
        cls: torch.Tensor | None,
        *,
        user_target: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        m = xs.shape[0]
        shape = (-1, *([1] * (xs.dim() - 1)))
        found = xs.clone()
        dist = torch.full((m,), float("inf"), dtype=xs.dtype, device=xs.device)
        x0f = xs.flatten(1)
        for _ in range(self.steps):
            f, g = self._boundary(x1, y, cls, user_target)
            w = g.flatten(1)
            b = (w * x1.flatten(1)).sum(dim=1) - f  # the linearised boundary: w·x = b
            d = project_hyperplane_box(
                torch.cat([x1.flatten(1), x0f]), torch.cat([w, w]), torch.cat([b, b]), self.threat
            )
            size = self._size(d).clamp_min(1e-8)
            d1, d2 = d[:m].view_as(xs), d[m:].view_as(xs)
            alpha = (size[:m] / (size[:m] + size[m:])).clamp(0, self.alpha_max).reshape(shape)
            x1 = clip_unit((x1 + self.eta * d1) * (1 - alpha) + (xs + self.eta * d2) * alpha)
            logits = self.guard.logits(x1.to(self.model_dtype))
            adv = success_of(logits, y, cls if user_target else None)
            if bool(adv.any()):
                size1 = self._size(x1 - xs)
                better = adv & (size1 < dist)
                found[better], dist[better] = x1[better], size1[better]
                x1 = torch.where(adv.reshape(shape), xs + (x1 - xs) * self.beta, x1)
        return found, dist


def _jacobian(guard: ModelGuard, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``(N, K)`` and their input Jacobian ``(N, K, *x.shape[1:])``: one forward.

    One backward per class through the same graph (logit *k* summed over the batch, so
    each sample's gradient is its own); counted as one gradient call.
    """
    guard.count(x.shape[0], gradient=True)
    with torch.enable_grad():
        xr = x.detach().requires_grad_(True)
        out = guard.model(xr)
        guard.check_logits(out, x.shape[0])
        k = out.shape[1]
        grads = [
            torch.autograd.grad(out[:, c].sum(), xr, retain_graph=c < k - 1)[0] for c in range(k)
        ]
    return out.detach(), torch.stack(grads, dim=1)
