"""Threat models as objects: the set an adversarial image must stay in, and its geometry.

A threat model is a norm ball of radius ``eps`` around the clean image, intersected with
the image box [0, 1]. Everything an attack or a run needs about it lives here once:

* :meth:`ThreatModel.norm` — per-sample norm of a perturbation;
* :meth:`ThreatModel.contains` — whether images lie in the ball and the box;
* :meth:`ThreatModel.project` — back into the ball ∩ box after a step;
* :meth:`ThreatModel.random_start` — a random point of the ball ∩ box, per-sample seeded;
* :meth:`ThreatModel.ascent` — the steepest-ascent direction of a gradient under the norm
  (its sign for L∞, its normalised value for L2);
* :meth:`ThreatModel.quantize` — the 8-bit image to save that stays inside the model.

Find them by name with :func:`threat_model` (``"linf"``, ``"l2"``); ``eps=None`` means
unbounded (minimum-norm attacks such as CW-L2 report their norm but have no budget).
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from advtune.attacks._random import uniform_l2_ball, uniform_l2_radius, uniform_linf_ball
from advtune.errors import UserError, suggest

__all__ = [
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
    immutable values: equal when their type and ``eps`` are equal.

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

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.eps == other.eps  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self), self.eps))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(eps={self.eps!r})"

    def _check_range(self, eps: float) -> None:  # noqa: B027 - optional hook
        """Further checks on ``eps`` for this norm (``ValueError``)."""

    def with_eps(self, eps: float | None) -> ThreatModel:
        """The same threat model with radius ``eps``."""
        return type(self)(eps)

    def _radius(self) -> float:
        if self.eps is None:
            raise ValueError(f"{self!r} has no eps: it is unbounded")
        return self.eps

    # ----------------------------------------------------------------- geometry

    @abstractmethod
    def norm(self, delta: torch.Tensor) -> torch.Tensor:
        """Per-sample norm of ``delta`` ``(N, ...)``; returns ``(N,)``."""

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
    def _ball(
        self, gens: list[torch.Generator], shape: tuple[int, ...], like: torch.Tensor
    ) -> torch.Tensor:
        """``(N, *shape)`` random perturbations inside the ball, one per generator."""

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

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Exact Euclidean projection: both sets are boxes, so clamping the perturbation
        then the image lands on their intersection."""
        eps = self._radius()
        return clip_unit(x + (x_adv - x).clamp(-eps, eps))

    def ascent(self, grad: torch.Tensor) -> torch.Tensor:
        return grad.sign()

    def _ball(
        self, gens: list[torch.Generator], shape: tuple[int, ...], like: torch.Tensor
    ) -> torch.Tensor:
        return uniform_linf_ball(gens, shape, self._radius(), like)

    def _fit(self, d: torch.Tensor, budget: float) -> torch.Tensor:
        # Whole levels within eps per pixel: max |q − c| / 255 <= eps.
        k = math.floor(budget + 1e-6)
        return d.round().clamp(-k, k)


class L2(ThreatModel):
    """The L2 ball: the Euclidean norm of the perturbation is at most ``eps``.

    ``eps`` is measured on [0, 1] images of the attacked size (ImageNet 3×224×224 budgets
    are typically 0.5 to 3.0).
    """

    name = "l2"
    label = "L2"
    default_eps = 0.5
    __slots__ = ()
    #: Random-start distribution (chosen by measurement, see docs/attacks.md):
    #: ``"radius"`` draws the radius uniformly in [0, eps]; ``"volume"`` is uniform in
    #: the ball, whose points in thousands of dimensions all lie near the sphere.
    START = "radius"

    def norm(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.flatten(1).norm(p=2, dim=1)

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

    def _ball(
        self, gens: list[torch.Generator], shape: tuple[int, ...], like: torch.Tensor
    ) -> torch.Tensor:
        return self.ball(gens, shape, like, start=self.START)

    def ball(
        self,
        gens: list[torch.Generator],
        shape: tuple[int, ...],
        like: torch.Tensor,
        *,
        start: str,
    ) -> torch.Tensor:
        """Random perturbations in the ball with the ``start`` distribution (see START)."""
        draw = {"radius": uniform_l2_radius, "volume": uniform_l2_ball}
        if start not in draw:
            raise ValueError(f"start must be one of {', '.join(draw)}; got {start!r}")
        return draw[start](gens, shape, self._radius(), like)

    def _fit(self, d: torch.Tensor, budget: float) -> torch.Tensor:
        """Round; where the rounded norm exceeds the budget, truncate toward zero instead
        the coordinates whose rounding grew ``|d_j|`` the most, greedily, until it fits
        (truncating every coordinate always fits, since ``|trunc(d)| <= |d|``)."""
        n = d.shape[0]
        flat = d.reshape(n, -1)
        rounded = flat.round()
        budget_sq = budget * budget
        over = rounded.square().sum(dim=1) > budget_sq
        if not bool(over.any()):
            return rounded.view_as(d)
        out = rounded.clone()
        for i in torch.nonzero(over).flatten().tolist():
            di = flat[i]
            size = float(di.norm())
            if size > budget:  # x_adv itself may sit a float rounding error outside
                di = di * (budget / size)
            r = di.round()
            t = di.trunc()
            # Truncating coordinate j instead of rounding it lowers ||.||² by cost_j >= 0.
            cost = r.square() - t.square()
            excess = float(r.square().sum()) - budget_sq
            if excess > 0:
                order = torch.argsort(cost, descending=True)
                saved = torch.cumsum(cost[order], dim=0)
                count = int(torch.searchsorted(saved, torch.tensor(excess, dtype=saved.dtype)))
                r[order[: count + 1]] = t[order[: count + 1]]
            out[i] = r
        return out.view_as(d)


_THREAT_MODELS: dict[str, type[ThreatModel]] = {cls.name: cls for cls in (Linf, L2)}


def threat_names() -> list[str]:
    """Names of the threat models, sorted (``["l2", "linf"]``)."""
    return sorted(_THREAT_MODELS)


def threat_model(name: str | ThreatModel, eps: float | None = None) -> ThreatModel:
    """The threat model ``name`` (``"linf"``, ``"l2"``, case-insensitive) with radius ``eps``.

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
