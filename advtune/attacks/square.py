"""Square Attack: score-based random search (Andriushchenko et al., ECCV 2020).

No gradients: each query changes the current best image inside one random square window
and keeps the change if the loss falls. The window's area is a fraction ``p`` of the
image that shrinks on a fixed schedule over the query budget. Every random number of
sample *i* comes from its own generator, so results do not depend on the batch.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from advtune.attacks._loop import EPS
from advtune.attacks._random import STREAM_START, resolve_seeds, sample_generators, uniforms
from advtune.attacks._registry import Param, register
from advtune.attacks._result import (
    LOSSES,
    AttackResult,
    ModelGuard,
    check_inputs,
    clip_unit,
    finish,
    norms,
    success_of,
    work_dtype,
)
from advtune.attacks.threat import ThreatModel, threat_model

__all__ = ["SQUARE_PARAMS", "p_schedule", "square"]


@dataclass(frozen=True)
class _Proposal:
    """Square's per-norm proposal: the start and step methods of :class:`_Search` (by
    name), the window side for a nominal side ``round(sqrt(p · H · W))`` and the number
    of uniforms one step draws per sample for ``C`` channels."""

    start: str
    step: str
    window: Callable[[int, int, int], int]
    uniforms: Callable[[int], int]


#: Square's proposals per threat model (by name); a norm Square supports is a key here.
_PROPOSALS: dict[str, _Proposal] = {
    # L∞: a window at least 1 pixel wide.
    # Uniforms: window position (2) and one sign per channel.
    "linf": _Proposal(
        "_linf_start", "_linf_step", lambda s, h, w: min(max(s, 1), h, w), lambda c: 2 + c
    ),
    # L2: at least 3 and odd, so the two halves of the pattern have a centre.
    "l2": _Proposal(
        "_l2_start",
        "_l2_step",
        lambda s, h, w: min(max(s, 3) + 1 - max(s, 3) % 2, h, w),
        lambda c: 5 + c,  # two window positions (4), the pattern's orientation, C signs
    ),
    # L1: the L2 windows, with a more peaked pattern of unit L1 norm.
    "l1": _Proposal(
        "_l1_start",
        "_l1_step",
        lambda s, h, w: min(max(s, 3) + 1 - max(s, 3) % 2, h, w),
        lambda c: 5 + c,  # as L2: two window positions, the orientation, C signs
    ),
}

#: Square's hyperparameters, declared once (validation, presets, CLI, tests read them).
SQUARE_PARAMS = (
    EPS,
    Param("norm", str, "linf", choices=tuple(_PROPOSALS), role="norm", help="threat model"),
    Param("queries", int, 5000, low=1, role="budget", cheap=20, help="queries per sample"),
    Param("p_init", float, 0.8, low=0.0, low_open=True, high=1.0,
          help="initial fraction of the image a window covers"),
    Param("loss", str, "margin", choices=tuple(LOSSES), help="objective: margin or ce"),
    Param("rescale_schedule", bool, False, help="stretch p's schedule over queries"),
)  # fmt: skip

# Rescaled iteration counts (out of 10 000) after which p halves, as in the paper.
_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


@register("square", norm="linf", randomized=True, params=SQUARE_PARAMS)
def square(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    norm: str = "linf",
    queries: int = 5000,
    p_init: float = 0.8,
    loss: str = "margin",
    rescale_schedule: bool = False,
    target: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    seeds: torch.Tensor | None = None,
) -> AttackResult:
    """Square Attack (L∞, L2 or L1): random search over square windows, model scores only.

    L∞: starts from vertical stripes (``±eps`` per column and channel) and each query sets
    one random ``s × s`` window to ``±eps`` per channel (a ``±2·eps`` change, projected
    back into the ball). L2: starts from a grid of windows each holding a centred pattern
    of two halves with opposite signs, and each query moves the perturbation mass of a
    second window into a first one, refilled with a fresh pattern, keeping ``‖δ‖₂ = eps``.
    L1: the L2 scheme with L1 masses and a more peaked pattern (unit L1 norm), each
    proposal brought back by the exact projection onto the L1 ball ∩ [0, 1], as in the
    reference code (the start is the grid of patterns, unscaled, projected).
    ``s`` is ``round(sqrt(p · H · W))`` (at least 1, or 3 and odd for L2), where ``p``
    starts at ``p_init`` and halves after iterations 10, 50, 200, 500, 1000, 2000, 4000,
    6000 and 8000 (the paper's schedule for 10 000 queries, which AutoAttack uses as is
    for its 5000; ``rescale_schedule=True`` stretches it over ``queries``, see
    :func:`p_schedule`). A change is kept when the loss
    falls or the sample becomes adversarial; a sample stops as soon as it is adversarial.
    Only samples not already adversarial are attacked. No gradients are taken.
    Reference: Andriushchenko, Croce, Flammarion & Hein, "Square Attack: a query-efficient
    black-box adversarial attack via random search", ECCV 2020 (arXiv:1912.00049).

    Args:
        model: Classifier on [0, 1] images returning logits ``(N, K)``; eval mode.
        x: ``(N, C, H, W)`` clean images in [0, 1]. Not modified.
        y: ``(N,)`` true labels.
        eps: Radius of the ball (absolute pixel units), ``>= 0``.
        norm: ``"linf"``, ``"l2"`` or ``"l1"``.
        queries: Random-search iterations per sample, ``>= 1``; each is one model query
            on that sample, after one query for the starting point (at most
            ``queries + 1`` per sample, as in the reference implementation).
        p_init: Initial fraction of the image a window covers, in (0, 1].
        loss: ``"margin"`` (``z_y − max_{j≠y} z_j``; targeted ``max_{j≠t} z_j − z_t``)
            or ``"ce"`` (``−CE(y)``; targeted ``CE(t)``), minimised; float32 or float64.
        rescale_schedule: Halve ``p`` at the same *fractions* of ``queries`` as the
            paper's 10 000-query schedule instead of at the same iteration numbers.
        target: Optional ``(N,)`` target classes (each ≠ ``y``) for a targeted attack.
        generator: Source of the per-sample seeds when ``seeds`` is not given.
        seeds: ``(N,)`` integer seeds; all of sample *i*'s random draws come from a
            generator seeded by ``seeds[i]``, so results do not depend on the batch.

    Returns:
        :class:`AttackResult`. ``model_calls`` counts the clean evaluation, the starting
        point and one call per iteration with samples still robust (each on those
        samples only); the logits of the returned images are those already computed.

    Raises:
        ValueError: Invalid inputs or hyperparameters.
    """
    y, target = check_inputs(model, x, y, target, generator=generator, seeds=seeds)
    threat = threat_model(norm, eps)
    objective = LOSSES[loss]

    with ModelGuard(model, y=y, target=target) as guard, torch.no_grad():
        wd = work_dtype(x)
        x0 = x.detach().to(wd)
        best_logits = guard.logits(x)
        todo = (~success_of(best_logits, y, target)).nonzero().flatten()
        best = x0.clone()
        if eps == 0 or todo.numel() == 0:
            # A zero budget leaves x itself, which is not adversarial.
            return finish(guard, x, best, y, target, logits=best_logits)
        gens = sample_generators(
            resolve_seeds(x.shape[0], generator=generator, seeds=seeds), STREAM_START
        )
        search = _Search(guard, x.dtype, threat, objective, y, target)
        xs = x0[todo]
        picked = [gens[i] for i in todo.tolist()]
        start = search.start(xs, picked)
        schedule = functools.partial(
            p_schedule, queries=queries if rescale_schedule else None, p_init=p_init
        )
        found, logits = search.run(xs, start, todo, picked, queries, schedule)
        best[todo] = found
        best_logits = best_logits.clone()
        best_logits[todo] = logits.to(best_logits.dtype)
        return finish(guard, x, best, y, target, logits=best_logits)


def p_schedule(i: int, *, queries: int | None, p_init: float) -> float:
    """Window area fraction at iteration ``i`` (0-based): the paper's schedule.

    ``p_init`` halves after iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000
    of a 10 000-query budget. With ``queries`` the iteration is first mapped to
    ``int(i / queries · 10000)`` (the schedule stretched over ``queries``); with ``None``
    it is used as is (AutoAttack's setting).
    """
    it = i if queries is None else int(i / queries * 10000)
    return p_init / 2 ** sum(it > t for t in _HALVINGS)


# Queries whose uniforms each sample draws at once: one ``torch.rand`` per sample per
# block instead of per query. A generator's stream is the same whether drawn k numbers at
# a time or k·B at once, so every sample sees exactly the numbers it saw query by query.
_BLOCK = 128


def _offsets(u: torch.Tensor, size: int, s: int) -> torch.Tensor:
    """Window corners uniform in ``{0, …, size − s}`` from uniforms ``u``."""
    return (u * (size - s + 1)).floor().long().clamp_max(size - s)


def _window_mask(top: torch.Tensor, left: torch.Tensor, s: int, h: int, w: int) -> torch.Tensor:
    """``(M, 1, H, W)`` bool: the ``s × s`` window at ``(top, left)`` of each sample."""
    rows = torch.arange(h, device=top.device)
    cols = torch.arange(w, device=top.device)
    in_rows = (rows >= top[:, None]) & (rows < top[:, None] + s)
    in_cols = (cols >= left[:, None]) & (cols < left[:, None] + s)
    return (in_rows[:, :, None] & in_cols[:, None, :])[:, None]


def _signs(u: torch.Tensor) -> torch.Tensor:
    return torch.where(u < 0.5, -1.0, 1.0).to(u.dtype)


@functools.lru_cache(maxsize=64)
def _half_pattern(a: int, b: int, p: int = 2) -> torch.Tensor:
    """``(a, b)`` float64: mass ``Σ_{k ≥ r} 1/(k+1)^q`` at Chebyshev distance ``r`` from the
    centre ``(a // 2, b // 2)`` (nested rectangles), unit Lp norm; ``q = 2`` for ``p = 2``
    and ``q = 4`` for ``p = 1`` (the L1 pattern is more peaked, as in the reference code)."""
    rows = (torch.arange(a) - a // 2).abs()
    cols = (torch.arange(b) - b // 2).abs()
    r = torch.maximum(rows[:, None], cols[None, :])
    levels = max(a // 2, b // 2) + 1
    weights = 1.0 / torch.arange(1, levels + 1, dtype=torch.float64) ** (6 - 2 * p)
    tail = weights.flip(0).cumsum(0).flip(0)  # tail[r] = Σ_{k ≥ r} 1/(k+1)^q
    out = tail[r]
    return out / out.norm(p=p)


@functools.lru_cache(maxsize=64)
def _l2_pattern(s: int, p: int = 2) -> torch.Tensor:
    """``(s, s)`` float64: upper half positive, lower half negative, unit Lp norm."""
    out = torch.cat([_half_pattern(s // 2, s, p), -_half_pattern(s - s // 2, s, p)])
    return out / out.norm(p=p)


def _patterns(s: int, flip: torch.Tensor, like: torch.Tensor, p: int = 2) -> torch.Tensor:
    """``(M, 1, s, s)``: the Lp pattern, transposed where ``flip`` (M,) is true."""
    pat = _l2_pattern(s, p).to(device=like.device, dtype=like.dtype)
    return torch.where(flip[:, None, None, None], pat.t(), pat)


def _unit_l2(delta: torch.Tensor) -> torch.Tensor:
    return delta / (norms(delta)[1].reshape(-1, 1, 1, 1) + 1e-12)


class _Search:
    """The random search for one set of hyperparameters (all tensors in the work dtype)."""

    def __init__(
        self,
        guard: ModelGuard,
        model_dtype: torch.dtype,
        threat: ThreatModel,
        objective: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor],
        y: torch.Tensor,
        target: torch.Tensor | None,
    ) -> None:
        self.guard, self.model_dtype, self.threat = guard, model_dtype, threat
        self.eps = threat._radius()
        self.proposal = _PROPOSALS[threat.name]
        self.objective, self.y, self.target = objective, y, target

    def evaluate(
        self, xa: torch.Tensor, idx: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(loss to minimise, success, logits)`` of images ``xa`` of samples ``idx``."""
        logits = self.guard.logits(xa.to(self.model_dtype))
        ys, ts = self.y[idx], None if self.target is None else self.target[idx]
        score = self.objective(logits.to(xa.dtype), ys, ts)  # float32/64 under autocast too
        return -score, success_of(logits, ys, ts), logits

    def start(self, xs: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
        return getattr(self, self.proposal.start)(xs, gens)

    def _linf_start(self, xs: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
        m, c, _, w = xs.shape
        # Vertical stripes: one sign per column and channel.
        u = uniforms(gens, c * w, xs.device).to(xs.dtype)
        return clip_unit(xs + self.eps * _signs(u).reshape(m, c, 1, w))

    def _l2_start(self, xs: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
        return clip_unit(xs + self.eps * _unit_l2(self._grid(xs, gens, 2)))

    def _l1_start(self, xs: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
        # The reference code projects the unscaled grid (unit L1 per window and channel)
        # onto the ball ∩ box: far outside the ball, it keeps the windows' peaks.
        return self.threat.project(xs + self._grid(xs, gens, 1), xs)

    def _grid(self, xs: torch.Tensor, gens: list[torch.Generator], p: int) -> torch.Tensor:
        """A grid of windows of side ``H // 5``, each a random-signed Lp pattern per channel."""
        m, c, h, w = xs.shape
        s = max(h // 5, 1)
        first = (h - 5 * s) // 2
        corners = [
            (top, left)
            for top in range(first, first + (h // s) * s, s)
            for left in range(first, first + (w // s) * s, s)
        ]
        u = uniforms(gens, len(corners) * (1 + c), xs.device).to(xs.dtype).reshape(m, -1, 1 + c)
        delta = torch.zeros_like(xs)
        for k, (top, left) in enumerate(corners):
            pat = _patterns(s, u[:, k, 0] < 0.5, xs, p) * _signs(u[:, k, 1:])[:, :, None, None]
            win = delta[:, :, top : top + s, left : left + s]  # may be cut at the border
            win += pat[:, :, : win.shape[2], : win.shape[3]]
        return delta

    def run(
        self,
        xs: torch.Tensor,
        x_best: torch.Tensor,
        idx: torch.Tensor,
        gens: list[torch.Generator],
        queries: int,
        schedule: Callable[[int], float],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Search from ``x_best`` for samples ``idx``; best images and their logits."""
        loss_best, won, logits_best = self.evaluate(x_best, idx)
        x_best = x_best.clone()
        c, h, w = xs.shape[1:]
        k = self.proposal.uniforms(c)  # uniforms per query and sample
        active = (~won).nonzero().flatten()
        block = torch.empty(0, 0, k, dtype=xs.dtype)
        rows = active  # row of each active sample in ``block``
        for i in range(queries):
            if active.numel() == 0:
                break
            if i % _BLOCK == 0:
                depth = min(_BLOCK, queries - i)
                cur_gens = [gens[j] for j in active.tolist()]
                block = uniforms(cur_gens, depth * k, xs.device).to(xs.dtype)
                block = block.view(active.numel(), depth, k)
                rows = torch.arange(active.numel(), device=xs.device)
            u = block[rows, i % _BLOCK]
            p = schedule(i)
            side = round(math.sqrt(p * h * w))
            xa, xb = xs[active], x_best[active]
            step = getattr(self, self.proposal.step)
            x_new = step(xa, xb, u, self.proposal.window(side, h, w))
            loss, success, logits = self.evaluate(x_new, idx[active])
            better = success | (loss < loss_best[active])
            keep = active[better]
            x_best[keep], loss_best[keep] = x_new[better], loss[better]
            logits_best[keep] = logits[better]
            active, rows = active[~success], rows[~success]
        return x_best, logits_best

    def _linf_step(
        self, xa: torch.Tensor, xb: torch.Tensor, u: torch.Tensor, s: int
    ) -> torch.Tensor:
        """One L∞ proposal per sample from its ``2 + C`` uniforms ``u`` ``(M, 2 + C)``."""
        h, w = xa.shape[2:]
        mask = _window_mask(_offsets(u[:, 0], h, s), _offsets(u[:, 1], w, s), s, h, w)
        step = (2 * self.eps) * _signs(u[:, 2:])[:, :, None, None] * mask
        return self.threat.project(xb + step, xa)

    def _l2_step(self, xa: torch.Tensor, xb: torch.Tensor, u: torch.Tensor, s: int) -> torch.Tensor:
        """One L2 proposal per sample from its ``5 + C`` uniforms ``u`` ``(M, 5 + C)``."""
        m, c, h, w = xa.shape
        top, left = _offsets(u[:, 0], h, s), _offsets(u[:, 1], w, s)
        top2, left2 = _offsets(u[:, 2], h, s), _offsets(u[:, 3], w, s)
        mask1 = _window_mask(top, left, s, h, w)
        mask2 = _window_mask(top2, left2, s, h, w)
        delta = xb - xa
        # Per channel: the mass now in window 1, and in windows 1 and 2 together.
        in_first = (delta * mask1).square().sum(dim=(2, 3), keepdim=True).sqrt()
        in_both = (delta * (mask1 | mask2)).square().sum(dim=(2, 3), keepdim=True).sqrt()
        total = norms(delta)[1].reshape(-1, 1, 1, 1)
        # Window 1's content as an (M, C, s, s) block (advanced indexing per sample).
        span = torch.arange(s, device=xa.device)
        rows, cols = (top[:, None] + span)[:, :, None], (left[:, None] + span)[:, None, :]
        batch = torch.arange(m, device=xa.device)[:, None, None]
        old = delta.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)
        new = _patterns(s, u[:, 4] < 0.5, xa) * _signs(u[:, 5:])[:, :, None, None]
        new = new + old / (in_first + 1e-12)
        # The budget left unused plus what both windows held goes into window 1.
        budget = ((self.eps**2 - total.square()).clamp_min(0) / c + in_both.square()).sqrt()
        new = new / (new.square().sum(dim=(2, 3), keepdim=True).sqrt() + 1e-12) * budget
        delta = delta.masked_fill(mask2, 0.0)
        delta.permute(0, 2, 3, 1)[batch, rows, cols] = new.permute(0, 2, 3, 1)
        return clip_unit(xa + self.eps * _unit_l2(delta))

    def _l1_step(self, xa: torch.Tensor, xb: torch.Tensor, u: torch.Tensor, s: int) -> torch.Tensor:
        """One L1 proposal per sample from its ``5 + C`` uniforms ``u`` ``(M, 5 + C)``."""
        # The L2 step with L1 masses: window 1 gets a fresh pattern plus its old content,
        # scaled per channel to (unused budget / C + what both windows held) · C as in the
        # reference code (more than the ball holds when C > 1), window 2 is emptied, and
        # the exact projection onto the ball ∩ box brings the image back.
        m, c, h, w = xa.shape
        top, left = _offsets(u[:, 0], h, s), _offsets(u[:, 1], w, s)
        mask1 = _window_mask(top, left, s, h, w)
        mask2 = _window_mask(_offsets(u[:, 2], h, s), _offsets(u[:, 3], w, s), s, h, w)
        delta = xb - xa
        in_first = (delta * mask1).abs().sum(dim=(2, 3), keepdim=True)
        in_both = (delta * (mask1 | mask2)).abs().sum(dim=(2, 3), keepdim=True)
        total = self.threat.norm(delta).reshape(-1, 1, 1, 1)
        span = torch.arange(s, device=xa.device)
        rows, cols = (top[:, None] + span)[:, :, None], (left[:, None] + span)[:, None, :]
        batch = torch.arange(m, device=xa.device)[:, None, None]
        old = delta.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)
        new = _patterns(s, u[:, 4] < 0.5, xa, 1) * _signs(u[:, 5:])[:, :, None, None]
        new = new + old / (in_first + 1e-12)
        budget = ((self.eps - total).clamp_min(0) / c + in_both) * c
        new = new / (new.abs().sum(dim=(2, 3), keepdim=True) + 1e-12) * budget
        delta = delta.masked_fill(mask2, 0.0)
        delta.permute(0, 2, 3, 1)[batch, rows, cols] = new.permute(0, 2, 3, 1)
        return self.threat.project(xa + delta, xa)
