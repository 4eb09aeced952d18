"""Threat models as objects: the set an adversarial image must stay in, and its geometry.

A threat model is a norm ball of radius ``eps`` around the clean image, intersected with
the image box [0, 1]. Everything an attack or a run needs about it lives here once:

* :meth:`ThreatModel.norm` — per-sample norm of a perturbation;
* :meth:`ThreatModel.contains` — whether images lie in the ball and the box;
* :meth:`ThreatModel.project` — back into the ball ∩ box after a step;
* :meth:`ThreatModel.random_start` — a random point of the ball ∩ box, per-sample seeded;
* :meth:`ThreatModel.surface_start` — a random point at distance ``radius`` (APGD, FAB);
* :meth:`ThreatModel.ascent` — the steepest-ascent direction of a gradient under the norm
  (its sign for L∞, its normalised value for L2, a sparse sign step for L1);
* :meth:`ThreatModel.dual_norm` — the dual norm of a gradient (distances to a linearised
  boundary);
* :meth:`ThreatModel.quantize` — the 8-bit image to save that stays inside the model.

Find them by name with :func:`threat_model` (``"linf"``, ``"l2"``, ``"l1"``): it is the one
place where an attack's ``norm=``/``eps=`` keywords become a threat object. ``eps=None``
means unbounded (minimum-norm attacks such as CW-L2 report their norm but have no budget).
Adding a norm is one subclass here plus the per-norm tables of the attacks that need more
than this geometry (APGD's inner loop, Square's proposals).
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from advtune.attacks._random import uniform_l2_ball, uniform_l2_radius, uniform_linf_ball
from advtune.errors import UserError, suggest

__all__ = [
    "L1",
    "L2",
    "Linf",
    "ThreatModel",
    "clip_unit",
    "threat_model",
    "threat_names",
]

# 8-bit images: one quantisation level is 1/255 of the [0, 1] range.
LEVELS = 255


def clip_unit(x: torch.Tensor) -> torch.Tensor:
    """Clamp into the image box [0, 1]."""
    return x.clamp(0.0, 1.0)


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    # (N,) -> (N, 1, 1, ...) to broadcast against an (N, ...) batch.
    return values.reshape(-1, *([1] * (like.dim() - 1)))


class ThreatModel(ABC):
    """A norm ball of radius ``eps`` (pixel units of [0, 1] images) intersected with [0, 1].

    Subclasses set :attr:`name` and implement the norm-specific geometry. Instances are
    immutable values: equal when their type, ``eps`` and options (:meth:`_options`, such
    as :class:`L2`'s ``start``) are equal.

    Attributes:
        eps: Radius, ``>= 0``, or ``None`` for an unbounded threat model (no budget).
    """

    name: ClassVar[str]
    #: Label for tables and messages (``"L∞"``).
    label: ClassVar[str]
    #: A usual ImageNet budget for [0, 1] images, used when no eps is given.
    default_eps: ClassVar[float]

    __slots__ = ("eps",)
    eps: float | None

    def __init__(self, eps: float | None = None) -> None:
        if eps is not None:
            if (
                not isinstance(eps, numbers.Real)
                or isinstance(eps, bool)
                or not math.isfinite(float(eps))
                or float(eps) < 0
            ):
                raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
            eps = float(eps)
            self._check_range(eps)
        object.__setattr__(self, "eps", eps)

    def __setattr__(self, key: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def _options(self) -> dict[str, Any]:
        """Constructor options besides ``eps`` (kept by :meth:`with_eps`, part of equality)."""
        return {}

    def __eq__(self, other: object) -> bool:
        return (
            type(self) is type(other)
            and self.eps == other.eps  # type: ignore[attr-defined]
            and self._options() == other._options()  # type: ignore[attr-defined]
        )

    def __hash__(self) -> int:
        return hash((type(self), self.eps, tuple(sorted(self._options().items()))))

    def __repr__(self) -> str:
        defaults = type(self)()._options()
        extra = "".join(f", {k}={v!r}" for k, v in self._options().items() if defaults.get(k) != v)
        return f"{type(self).__name__}(eps={self.eps!r}{extra})"

    def _check_range(self, eps: float) -> None:  # noqa: B027 - optional hook
        """Further checks on ``eps`` for this norm (``ValueError``)."""

    def with_eps(self, eps: float | None) -> ThreatModel:
        """The same threat model (and options) with radius ``eps``."""
        return type(self)(eps, **self._options())

    def _radius(self) -> float:
        if self.eps is None:
            raise ValueError(f"{self!r} has no eps: it is unbounded")
        return self.eps

    # ----------------------------------------------------------------- geometry

    @abstractmethod
    def norm(self, delta: torch.Tensor) -> torch.Tensor:
        """Per-sample norm of ``delta`` ``(N, ...)``; returns ``(N,)``."""

    @abstractmethod
    def dual_norm(self, grad: torch.Tensor) -> torch.Tensor:
        """Per-sample dual norm of ``grad`` ``(N, ...)``; returns ``(N,)``.

        ``|f| / dual_norm(∇f)`` is the distance, in this norm, to the zero of the
        linearisation of ``f`` (L1 for L∞, L2 for L2, L∞ for L1).
        """

    @abstractmethod
    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """A point of the ball around ``x`` ∩ [0, 1] close to ``x_adv`` (same shape)."""

    @abstractmethod
    def ascent(self, grad: torch.Tensor) -> torch.Tensor:
        """Steepest-ascent direction of ``grad`` ``(N, ...)`` with unit norm per sample.

        The step ``x + alpha · ascent(g)`` maximises the linearised objective over the
        ball of radius ``alpha`` in this norm (a zero gradient gives a zero direction).
        """

    @abstractmethod
    def shrink(self, delta: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
        """``delta`` ``(N, ...)`` moved into the balls of per-sample ``radius`` ``(N,)``.

        No box: for attacks whose radius changes per sample and step (FMN), which clip
        into [0, 1] themselves. Perturbations inside their ball are unchanged.
        """

    @abstractmethod
    def _ball(
        self, gens: list[torch.Generator], shape: tuple[int, ...], like: torch.Tensor
    ) -> torch.Tensor:
        """``(N, *shape)`` random perturbations inside the ball, one per generator."""

    def _surface(
        self, gens: list[torch.Generator], shape: tuple[int, ...], like: torch.Tensor
    ) -> torch.Tensor:
        """``(N, *shape)`` random perturbations whose direction :meth:`surface_start` uses
        (any scale: they are rescaled to the radius). Default: a draw of the unit ball."""
        return self.with_eps(1.0)._ball(gens, shape, like)

    def random_start(self, x: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
        """A random start inside the ball around ``x`` ∩ [0, 1].

        Args:
            x: ``(N, C, H, W)`` clean images.
            gens: One CPU generator per sample (see :mod:`advtune.attacks._random`);
                sample *i*'s draw depends only on ``gens[i]``.

        Returns:
            ``x + delta`` clipped into [0, 1], with ``delta`` drawn in the ball.
        """
        self._radius()
        return clip_unit(x + self._ball(gens, tuple(x.shape[1:]), x))

    def surface_start(
        self, x: torch.Tensor, gens: list[torch.Generator], radius: float | None = None
    ) -> torch.Tensor:
        """A random point at distance ``radius`` (default ``eps``) from ``x``, clipped into [0, 1].

        The start of APGD (at ``eps``) and of FAB's restarts (at ``eps / 2``): a draw of
        :meth:`_surface` rescaled to norm ``radius``, so the clipping into the box is the
        only thing that brings it closer.

        Args:
            x: ``(N, C, H, W)`` clean images.
            gens: One CPU generator per sample; sample *i*'s draw depends only on it.
            radius: Distance, ``>= 0``; ``None``: ``eps``.
        """
        r = self._radius() if radius is None else radius
        d = self._surface(gens, tuple(x.shape[1:]), x)
        size = self.norm(d).clamp_min(1e-12)
        return clip_unit(x + r * d / _per_sample(size, d))

    def contains(
        self, x_adv: torch.Tensor, x: torch.Tensor, *, rtol: float | None = None
    ) -> torch.Tensor:
        """``(N,)`` bool: ``x_adv`` lies in [0, 1] and within ``eps`` of ``x``.

        Args:
            x_adv: ``(N, ...)`` images.
            x: ``(N, ...)`` clean images.
            rtol: Relative tolerance on the norm (default: a few units of rounding of
                ``x``'s dtype, which the arithmetic of a projection can leave).
        """
        boxed = ((x_adv >= 0) & (x_adv <= 1)).flatten(1).all(dim=1)
        if self.eps is None:
            return boxed
        finfo = torch.finfo(x.dtype if x.dtype.is_floating_point else torch.float32)
        tol = 16 * finfo.eps if rtol is None else rtol
        size = self.norm((x_adv - x).to(torch.float64))
        return boxed & (size <= self.eps * (1 + tol) + tol)

    # ----------------------------------------------------------------- 8-bit images

    @property
    def survives_quantization(self) -> bool:
        """Whether an 8-bit image can differ from the clean one inside this ball.

        ``False`` when ``eps`` is smaller than one quantisation level (1/255): every
        saved adversarial image would then equal its clean image.
        """
        return self.eps is None or self._levels_within(self.eps) >= 1

    def _levels_within(self, eps: float) -> int:
        # Whole 8-bit levels within eps (one pixel moved by one level has norm 1/255 in
        # every norm); the tolerance absorbs 4/255 * 255 evaluating to 3.9999999999999996.
        return math.floor(eps * LEVELS + 1e-6)

    def quantize(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The uint8 image to save for ``x_adv``, inside this threat model around ``x``.

        ``x`` must be 8-bit quantised (multiples of 1/255), so ``c = x · 255`` is an
        integer image. Rounding ``d = (x_adv − x) · 255`` can move a pixel by half a level
        and step outside the budget; :meth:`_fit` keeps the integer perturbation inside
        it. Unbounded (``eps=None``): plain rounding.

        Args:
            x_adv: ``(N, C, H, W)`` adversarial images in [0, 1].
            x: ``(N, C, H, W)`` clean images in [0, 1], multiples of 1/255.

        Returns:
            ``(N, C, H, W)`` uint8 tensor ``q`` on ``x``'s device with
            ``q / 255`` inside the threat model around ``x``.
        """
        if x_adv.shape != x.shape:
            raise ValueError(f"x_adv shape {tuple(x_adv.shape)} differs from x {tuple(x.shape)}")
        clean = torch.round(x.double() * LEVELS)
        # Work on the perturbation in level units, clipped to the valid pixel range first.
        d = (x_adv.double().clamp(0, 1) * LEVELS) - clean
        fitted = d.round() if self.eps is None else self._fit(d, self.eps * LEVELS)
        return (clean + fitted).clamp_(0, LEVELS).to(torch.uint8)

    @abstractmethod
    def _fit(self, d: torch.Tensor, budget: float) -> torch.Tensor:
        """Integer perturbations close to ``d`` (level units) of norm <= ``budget``."""


class Linf(ThreatModel):
    """The L∞ ball: every pixel moves by at most ``eps``."""

    name = "linf"
    label = "L∞"
    default_eps = 4 / 255
    __slots__ = ()

    def _check_range(self, eps: float) -> None:
        if eps > 1:
            raise ValueError(
                f"eps {eps} is out of range for L∞ on [0, 1] images (0 <= eps <= 1); "
                "did you mean a fraction like 4/255?"
            )

    def norm(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.flatten(1).abs().amax(dim=1)

    def dual_norm(self, grad: torch.Tensor) -> torch.Tensor:
        return grad.flatten(1).abs().sum(dim=1)

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Exact Euclidean projection: both sets are boxes, so clamping the perturbation
        then the image lands on their intersection."""
        eps = self._radius()
        return clip_unit(x + (x_adv - x).clamp(-eps, eps))

    def ascent(self, grad: torch.Tensor) -> torch.Tensor:
        return grad.sign()

    def shrink(self, delta: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
        r = _per_sample(radius, delta)
        return torch.maximum(torch.minimum(delta, r), -r)

    def _ball(
        self, gens: list[torch.Generator], shape: tuple[int, ...], like: torch.Tensor
    ) -> torch.Tensor:
        return uniform_linf_ball(gens, shape, self._radius(), like)

    def _fit(self, d: torch.Tensor, budget: float) -> torch.Tensor:
        # Whole levels within eps per pixel: max |q − c| / 255 <= eps.
        k = math.floor(budget + 1e-6)
        return d.round().clamp(-k, k)


#: Random-start distributions of :class:`L2` (see its ``start`` option).
L2_STARTS = ("radius", "volume")


class L2(ThreatModel):
    """The L2 ball: the Euclidean norm of the perturbation is at most ``eps``.

    ``eps`` is measured on [0, 1] images of the attacked size (ImageNet 3×224×224 budgets
    are typically 0.5 to 3.0).

    Args:
        eps: Radius, or ``None`` (unbounded).
        start: PGD's random-start distribution (:meth:`random_start`, chosen by
            measurement, see docs/attacks.md): ``"radius"`` (default) draws the radius
            uniformly in [0, eps]; ``"volume"`` is uniform in the ball, whose points in
            thousands of dimensions all lie near the sphere. Pass the object as an
            attack's ``norm=`` (``pgd(..., norm=L2(start="volume"))``) to choose it.
    """

    name = "l2"
    label = "L2"
    default_eps = 0.5
    __slots__ = ("start",)
    start: str

    def __init__(self, eps: float | None = None, *, start: str = "radius") -> None:
        if start not in L2_STARTS:
            raise ValueError(f"start must be one of {', '.join(L2_STARTS)}; got {start!r}")
        super().__init__(eps)
        object.__setattr__(self, "start", start)

    def _options(self) -> dict[str, Any]:
        return {"start": self.start}

    def norm(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.flatten(1).norm(p=2, dim=1)

    def dual_norm(self, grad: torch.Tensor) -> torch.Tensor:
        return grad.flatten(1).norm(p=2, dim=1)

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Scale the perturbation into the ball, then clip into [0, 1].

        Clipping only moves coordinates of the perturbation towards 0, so the result stays
        in the ball (the standard PGD-L2 step, not the exact projection onto the
        intersection). Perturbations inside the ball are left unscaled.
        """
        eps = self._radius()
        delta = x_adv - x
        size = self.norm(delta)
        factor = torch.where(size > eps, eps / size, torch.ones_like(size))
        return clip_unit(x + delta * _per_sample(factor, delta))

    def ascent(self, grad: torch.Tensor) -> torch.Tensor:
        size = self.norm(grad).clamp_min(1e-12)
        return grad / _per_sample(size, grad)

    def shrink(self, delta: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
        scale = (radius / self.norm(delta).clamp_min(1e-12)).clamp(max=1.0)
        return delta * _per_sample(scale, delta)

    def _ball(
        self, gens: list[torch.Generator], shape: tuple[int, ...], like: torch.Tensor
    ) -> torch.Tensor:
        return self.ball(gens, shape, like, start=self.start)

    def _surface(
        self, gens: list[torch.Generator], shape: tuple[int, ...], like: torch.Tensor
    ) -> torch.Tensor:
        # A Gaussian direction (the volume draw's radius is rescaled away).
        return uniform_l2_ball(gens, shape, 1.0, like)

    def ball(
        self,
        gens: list[torch.Generator],
        shape: tuple[int, ...],
        like: torch.Tensor,
        *,
        start: str,
    ) -> torch.Tensor:
        """Random perturbations in the ball with the ``start`` distribution (see ``start``)."""
        draw = {"radius": uniform_l2_radius, "volume": uniform_l2_ball}
        if start not in draw:
            raise ValueError(f"start must be one of {', '.join(draw)}; got {start!r}")
        return draw[start](gens, shape, self._radius(), like)

    def _fit(self, d: torch.Tensor, budget: float) -> torch.Tensor:
        return _fit_greedy(d, budget, power=2)


class L1(ThreatModel):
    """The L1 ball: the sum of absolute pixel changes is at most ``eps``.

    The ball meets the [0, 1] box in a polytope whose exact Euclidean projection
    (:meth:`project`) is what makes L1 attacks work: projecting onto the ball and then
    clipping wastes budget on coordinates the box cuts (Croce & Hein, "Mind the box:
    l1-APGD for sparse adversarial attacks on image classifiers", ICML 2021). ``eps``
    is measured on [0, 1] images of the attacked size; :attr:`default_eps` is 12, the
    CIFAR-10 budget of that paper (advtune states no ImageNet L1 budget).
    """

    name = "l1"
    label = "L1"
    default_eps = 12.0
    __slots__ = ()

    def norm(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.flatten(1).abs().sum(dim=1)

    def dual_norm(self, grad: torch.Tensor) -> torch.Tensor:
        return grad.flatten(1).abs().amax(dim=1)

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Exact Euclidean projection onto the L1 ball around ``x`` ∩ [0, 1].

        Coordinate *i* of the perturbation can move by at most its room ``r_i`` to the
        box edge in the direction of ``d_i = x_adv_i − x_i``. The KKT conditions give
        ``δ_i = sign(d_i) · min(max(|d_i| − λ, 0), r_i)`` (soft thresholding, then the
        box), with ``λ = 0`` if that already fits and otherwise the ``λ > 0`` where
        ``Σ_i min(max(|d_i| − λ, 0), r_i) = eps``: a decreasing piecewise-linear function
        of ``λ``, solved exactly by sorting its ``2D`` breakpoints (in float64).
        """
        eps = self._radius()
        delta = x_adv - x
        n = delta.shape[0]
        d = delta.reshape(n, -1).double()
        room = torch.where(d > 0, 1 - x.reshape(n, -1).double(), x.reshape(n, -1).double())
        room = room.clamp_min(0)
        a = d.abs()
        fitted = torch.minimum(a, room)
        total = fitted.sum(dim=1)
        lam = _l1_threshold(a, room, total, eps)
        shrunk = torch.minimum((a - lam[:, None]).clamp_min(0), room)
        mag = torch.where((total <= eps)[:, None], fitted, shrunk)
        return clip_unit(x + (d.sign() * mag).view_as(delta).to(delta.dtype))

    def ascent(
        self, grad: torch.Tensor, *, sparsity: torch.Tensor | float | None = None
    ) -> torch.Tensor:
        """The signs of the largest gradient coordinates, with unit L1 norm per sample.

        ``sparsity`` is the fraction ``k`` of coordinates to move (a float, or ``(N,)``
        per sample): those whose ``|g_i|`` reaches the ``⌊(1 − k) D⌋``-th smallest value
        (so about ``k · D`` of them, ties included) move by ``±1 / count``, as in l1-APGD.
        ``None``: only the largest coordinate(s), the exact steepest-ascent direction of
        the L1 ball (sparse and slow for a multi-step attack; l1-APGD adapts ``k``).
        """
        n = grad.shape[0]
        flat = grad.flatten(1)
        mag = flat.abs()
        if sparsity is None:
            threshold = mag.amax(dim=1, keepdim=True)
        else:
            size = flat.shape[1]
            k = torch.as_tensor(sparsity, dtype=torch.float64, device=grad.device).expand(n)
            index = ((1.0 - k) * size).clamp(0, size - 1).long()
            threshold = mag.sort(dim=1).values.gather(1, index[:, None])
        signs = torch.where(mag >= threshold, flat.sign(), torch.zeros_like(flat))
        count = signs.abs().sum(dim=1, keepdim=True)
        return (signs / (count + 1e-10)).view_as(grad)

    def shrink(self, delta: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
        """Exact projection onto the L1 balls (soft thresholding, no box)."""
        n = delta.shape[0]
        a = delta.reshape(n, -1).double().abs()
        total = a.sum(dim=1)
        r = radius.to(device=a.device, dtype=torch.float64).expand(n)
        lam = _l1_threshold(a, torch.full_like(a, math.inf), total, r)
        mag = torch.where((total <= r)[:, None], a, (a - lam[:, None]).clamp_min(0))
        return (delta.reshape(n, -1).sign() * mag).view_as(delta).to(delta.dtype)

    def _ball(
        self, gens: list[torch.Generator], shape: tuple[int, ...], like: torch.Tensor
    ) -> torch.Tensor:
        # Uniform in the L1 ball: D + 1 exponentials normalised by their sum are uniform
        # on the simplex; the first D with random signs fill the ball uniformly.
        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        size = math.prod(shape)
        out = []
        for g in gens:
            e = torch.empty(size + 1, dtype=torch.float64).exponential_(generator=g)
            signs = torch.randint(0, 2, (size,), generator=g, dtype=torch.float64) * 2 - 1
            out.append((e[:size] / e.sum() * signs).reshape(shape).to(dtype))
        return (torch.stack(out) * self._radius()).to(device=like.device, dtype=like.dtype)

    def surface_start(
        self, x: torch.Tensor, gens: list[torch.Generator], radius: float | None = None
    ) -> torch.Tensor:
        """A standard normal perturbation projected onto the ball of ``radius`` ∩ [0, 1].

        The authors' l1-APGD start: the Gaussian is far outside the ball, so its
        projection (:meth:`project`) lies on the sphere wherever the box allows, on the
        coordinates with the largest draws.
        """
        r = self._radius() if radius is None else radius
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        shape = tuple(x.shape[1:])
        t = torch.stack([torch.randn(shape, dtype=dtype, generator=g) for g in gens])
        return L1(r).project(x + t.to(device=x.device, dtype=x.dtype), x)

    def _fit(self, d: torch.Tensor, budget: float) -> torch.Tensor:
        return _fit_greedy(d, budget, power=1)


def _l1_threshold(
    a: torch.Tensor, room: torch.Tensor, total: torch.Tensor, eps: float | torch.Tensor
) -> torch.Tensor:
    """``(N,)`` λ with ``Σ_i clamp(a_i − λ, 0, room_i) = eps`` (where ``total > eps``).

    ``g(λ) = Σ_i clamp(a_i − λ, 0, room_i)`` is constant (``total``) up to its first
    breakpoint; coordinate *i* starts decreasing at ``max(a_i − room_i, 0)`` (slope −1)
    and stops at ``a_i``. Sorting the breakpoints with weights +1 and −1 gives the
    number of decreasing coordinates on each interval, hence ``g`` at every breakpoint.
    ``eps`` is a float or ``(N,)``.
    """
    n = a.shape[0]
    eps = torch.as_tensor(eps, dtype=a.dtype, device=a.device).expand(n)
    bp = torch.cat([(a - room).clamp_min(0), a], dim=1)
    weight = torch.cat([torch.ones_like(a), -torch.ones_like(a)], dim=1)
    bp, order = bp.sort(dim=1)
    active = weight.gather(1, order).cumsum(dim=1)
    drop = (active[:, :-1] * bp.diff(dim=1)).cumsum(dim=1)
    g = total[:, None] - torch.cat([torch.zeros(n, 1, dtype=a.dtype, device=a.device), drop], 1)
    k = ((g >= eps[:, None]).sum(dim=1) - 1).clamp_min(0)
    g_k = g.gather(1, k[:, None])[:, 0]
    slope = active.gather(1, k[:, None])[:, 0].clamp_min(1)
    lam = bp.gather(1, k[:, None])[:, 0] + (g_k - eps) / slope
    # One Newton step on g itself removes the cancellation error of the running sums.
    g_lam = torch.minimum((a - lam[:, None]).clamp_min(0), room).sum(dim=1)
    moving = ((a - lam[:, None] > 0) & (a - lam[:, None] < room)).sum(dim=1).clamp_min(1)
    return (lam + (g_lam - eps) / moving).clamp_min(0)


def _fit_greedy(d: torch.Tensor, budget: float, *, power: int) -> torch.Tensor:
    """Integer perturbations of ``Σ |q_j|^power <= budget^power`` close to ``d``.

    Round; where the rounded norm exceeds the budget, truncate toward zero instead the
    coordinates whose rounding grew ``|d_j|^power`` the most, greedily, until it fits
    (truncating every coordinate always fits, since ``|trunc(d)| <= |d|``).
    """
    n = d.shape[0]
    flat = d.reshape(n, -1)
    rounded = flat.round()
    limit = budget**power
    over = rounded.abs().pow(power).sum(dim=1) > limit
    if not bool(over.any()):
        return rounded.view_as(d)
    out = rounded.clone()
    for i in torch.nonzero(over).flatten().tolist():
        di = flat[i]
        size = float(di.abs().pow(power).sum()) ** (1 / power)
        if size > budget:  # x_adv itself may sit a float rounding error outside
            di = di * (budget / size)
        r = di.round()
        t = di.trunc()
        # Truncating coordinate j instead of rounding it lowers the sum by cost_j >= 0.
        cost = r.abs().pow(power) - t.abs().pow(power)
        excess = float(r.abs().pow(power).sum()) - limit
        if excess > 0:
            order = torch.argsort(cost, descending=True)
            saved = torch.cumsum(cost[order], dim=0)
            count = int(torch.searchsorted(saved, torch.tensor(excess, dtype=saved.dtype)))
            r[order[: count + 1]] = t[order[: count + 1]]
        out[i] = r
    return out.view_as(d)


_THREAT_MODELS: dict[str, type[ThreatModel]] = {cls.name: cls for cls in (Linf, L2, L1)}


def threat_names() -> list[str]:
    """Names of the threat models, sorted (``["l1", "l2", "linf"]``)."""
    return sorted(_THREAT_MODELS)


def threat_model(name: str | ThreatModel, eps: float | None = None) -> ThreatModel:
    """The threat model ``name`` (``"linf"``, ``"l2"``, ``"l1"``, case-insensitive) with radius ``eps``.

    The one place where an attack's ``norm=`` and ``eps=`` keywords become a threat
    object; ``name`` may already be one (an :class:`L2` with its ``start`` option).

    A :class:`ThreatModel` is returned as is when ``eps`` is ``None``, else with ``eps``.

    Raises:
        UserError: Unknown name (a ``ValueError`` suggesting close names).
        ValueError: Invalid ``eps`` (negative, not finite, L∞ above 1).
    """
    if isinstance(name, ThreatModel):
        return name if eps is None else name.with_eps(eps)
    key = name.lower() if isinstance(name, str) else name
    cls = _THREAT_MODELS.get(key) if isinstance(key, str) else None
    if cls is None:
        raise UserError(suggest(str(name), _THREAT_MODELS, what="threat model"))
    return cls(eps)
