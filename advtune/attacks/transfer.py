"""Transfer attacks: gradient transforms composed over the one steepest-ascent loop.

Black-box transfer attacks craft on a white-box surrogate and hope the images fool other
models. The usual recipes change only *which gradient* the L∞ sign step of MI-FGSM
follows, so here they are one :data:`~advtune.attacks._loop.GradientFn` (:class:`_Estimator`)
plugged into :func:`~advtune.attacks._loop.steepest_ascent`, configured by a
:class:`Recipe`. Per step, for the look-ahead point ``p`` (the iterate, or Nesterov's
``x + step·μ·m``):

* **input copies** — the gradient is averaged over transformed copies of ``p``: admixed
  ``p + η·x'`` with images ``x'`` of other classes (Admix), each scaled by ``1/2^i``
  (SI), each, with probability ``diversity_prob``, randomly resized and padded (DI);
* **variance tuning** (VT) — the previous step's ``v = mean(∇ at N neighbours) − ∇`` is
  added to the gradient;
* **translation invariance** (TI) — the gradient is smoothed by a Gaussian kernel;

then the loop normalises it by its mean absolute value, accumulates momentum (MI, NI), and
takes the signed step and the projection of :class:`~advtune.attacks.Linf`.

Every random number comes from per-sample generators (one stream per transform, seeded
from the per-sample seeds), so a sample's result does not depend on the rest of the batch
— except Admix, whose mixing partners *are* other images of the batch (``per_sample`` is
``False`` in its spec). The registered attacks are thin bindings of the recipe:

=================  ====================================================  ==================
name               recipe                                                reference
=================  ====================================================  ==================
``di_fgsm``        DI (+ momentum with ``decay > 0``: M-DI²-FGSM)        Xie et al. 2019
``ti_fgsm``        TI (+ momentum with ``decay > 0``)                    Dong et al. 2019
``si_ni_fgsm``     SI + Nesterov momentum                                Lin et al. 2020
``vmi_fgsm``       VT + momentum                                         Wang & He 2021
``vni_fgsm``       VT + Nesterov momentum                                Wang & He 2021
``admix``          Admix + SI + momentum                                 Wang et al. 2021
``mi_di_ti_fgsm``  momentum + DI + TI (the composed default)             Dong et al. 2019
``transfer_fgsm``  every transform, each off by default (MI-FGSM)        —
=================  ====================================================  ==================
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn
from torch.nn import functional as F

from advtune.attacks._loop import EPS, steepest_ascent, step_size_param
from advtune.attacks._random import sample_generators, uniform_linf_ball, uniforms
from advtune.attacks._registry import Param, register
from advtune.attacks._result import AttackResult, ModelGuard, ce_loss
from advtune.attacks.threat import Linf

__all__ = [
    "Recipe",
    "admix",
    "di_fgsm",
    "diverse_inputs",
    "gaussian_kernel",
    "mi_di_ti_fgsm",
    "si_ni_fgsm",
    "ti_fgsm",
    "transfer_fgsm",
    "vmi_fgsm",
    "vni_fgsm",
]

# Random streams of the transforms, distinct from _random's (STREAM_START = 1,
# STREAM_TARGET = 2), so each transform's draws are independent of the others'.
STREAM_DIVERSITY = 11
STREAM_NEIGHBOURS = 12
STREAM_ADMIX = 13

# --------------------------------------------------------------------------- hyperparameters
# Each declared once; an attack whose paper uses another default takes a copy with it.

STEPS = Param("steps", int, 10, low=1, role="budget", cheap=3, help="iterations")
STEP_SIZE = step_size_param("eps / steps")
DECAY = Param("decay", float, 1.0, low=0.0, high=10.0, help="momentum factor μ (0: no momentum)")
DIVERSITY_PROB = Param(
    "diversity_prob", float, 0.5, low=0.0, high=1.0,
    help="DI: probability of resizing and padding a copy",
)  # fmt: skip
RESIZE_RATE = Param(
    "resize_rate", float, 1.1, low=0.5, high=2.0,
    help="DI: padded side / image side (> 1, then resized back) or smallest resize (< 1)",
)  # fmt: skip
KERNEL_SIZE = Param(
    "kernel_size", int, 15, low=1, high=63, help="TI: side of the Gaussian kernel (odd; 1: off)"
)
NSIG = Param(
    "nsig", float, 3.0, low=0.0, low_open=True, high=10.0,
    help="TI: the kernel spans ±nsig standard deviations (σ = (kernel_size−1)/(2·nsig) px)",
)  # fmt: skip
SCALE_COPIES = Param(
    "scale_copies", int, 5, low=1, high=16, cheap=2, help="SI: copies x/2^i, i < scale_copies"
)
SAMPLES = Param(
    "samples", int, 20, low=0, high=1000, cheap=2,
    help="VT: neighbours N per step (0: no variance tuning)",
)  # fmt: skip
BETA = Param("beta", float, 1.5, low=0.0, high=10.0, help="VT: neighbourhood radius β·eps (L∞)")
ADMIX_COPIES = Param(
    "admix_copies", int, 3, low=0, high=16, cheap=2,
    help="Admix: mixed images per scale copy (0: no admix)",
)  # fmt: skip
ADMIX_STRENGTH = Param(
    "admix_strength", float, 0.2, low=0.0, high=1.0, help="Admix: weight η of the other image"
)
NESTEROV = Param("nesterov", bool, False, help="NI: gradient at the look-ahead x + step·μ·m")


def _with(p: Param, default: object) -> Param:
    """``p`` with another default (also its cheap test value: a transform off by default
    stays off in the cheap settings, so the spec's ``randomized`` holds for them)."""
    return dataclasses.replace(p, default=default, cheap=default)


# --------------------------------------------------------------------------- the recipe


@dataclass(frozen=True)
class Recipe:
    """Which transforms a transfer attack composes (all off: MI-FGSM with ``decay``).

    Attributes:
        decay: Momentum factor μ ``>= 0`` (0: plain I-FGSM steps).
        nesterov: Take the gradient at Nesterov's look-ahead ``x + step_size·μ·m``.
        diversity_prob: DI probability ``p`` per copy and step (0: off).
        resize_rate: DI size rule (see :func:`diverse_inputs`).
        kernel_size: TI kernel side, odd (1: off).
        nsig: TI kernel extent in standard deviations.
        scale_copies: SI copies ``m`` (1: the image only).
        admix_copies: Admix images per scale copy (0: off).
        admix_strength: Admix weight η.
        samples: VT neighbours ``N`` (0: off).
        beta: VT neighbourhood radius as a multiple of ``eps``.
    """

    decay: float = 1.0
    nesterov: bool = False
    diversity_prob: float = 0.0
    resize_rate: float = 1.1
    kernel_size: int = 1
    nsig: float = 3.0
    scale_copies: int = 1
    admix_copies: int = 0
    admix_strength: float = 0.2
    samples: int = 0
    beta: float = 1.5

    def __post_init__(self) -> None:
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {self.kernel_size}")

    @property
    def randomized(self) -> bool:
        """Whether the recipe draws random numbers."""
        return self.diversity_prob > 0 or self.samples > 0 or self.admix_copies > 0


def gaussian_kernel(size: int, nsig: float, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """TI's ``(size, size)`` Gaussian kernel, summing to 1.

    The outer product of ``exp(−t²/2)`` at ``size`` points evenly spaced on
    ``[−nsig, nsig]`` (the kernel of Dong et al.'s code: a Gaussian of standard deviation
    ``(size − 1) / (2·nsig)`` pixels, cut at ``nsig`` deviations), normalised.

    Args:
        size: Side ``>= 1``, odd (the kernel is centred on a pixel).
        nsig: Extent ``> 0`` in standard deviations.
        dtype: Floating dtype of the result.

    Returns:
        ``(size, size)`` tensor, non-negative, summing to 1.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1 or size % 2 == 0:
        raise ValueError(f"kernel size must be an odd integer >= 1, got {size!r}")
    if not (isinstance(nsig, (int, float)) and math.isfinite(nsig) and nsig > 0):
        raise ValueError(f"nsig must be a finite number > 0, got {nsig!r}")
    t = torch.linspace(-nsig, nsig, size, dtype=torch.float64)
    k1 = torch.exp(-0.5 * t * t)
    k = torch.outer(k1, k1)
    return (k / k.sum()).to(dtype)


def _side(size: int, rate: float) -> tuple[int, int]:
    """DI's ``(smallest resize, padded side)`` along one image side of ``size`` pixels.

    ``rate >= 1`` (Xie et al.: 299 → a size in [299, 330), padded to 330): resize into
    ``[size, S)`` and pad to ``S = round(rate·size)``. ``rate < 1`` (torchattacks' rule):
    resize into ``[round(rate·size), size)`` and pad back to ``size``. Either way at least
    one pixel of padding, so tiny images are still diversified.
    """
    a = round(rate * size)
    if rate >= 1:
        return size, max(a, size + 1)
    return max(1, min(a, size - 1)), size


def diverse_inputs(
    x: torch.Tensor, draws: torch.Tensor, *, diversity_prob: float, resize_rate: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """DI's random resize-and-pad, one transform per image (Xie et al., CVPR 2019).

    Image *i* is transformed when ``draws[i, 0] < diversity_prob``: bilinearly resized to
    ``(h, w)`` drawn uniformly in ``[lo, S)`` per side (one uniform for both sides, so a
    square image stays square; see :func:`_side`), zero-padded at a uniformly random
    offset to ``(S_h, S_w)``, and, when that is larger than the image, bilinearly resized
    back to ``(H, W)`` so the surrogate sees its own input size (as the reference code of
    the VT and Admix papers does; Xie et al. fed the 330-pixel image to the network).

    Differentiable in ``x`` (the draws are constants).

    Args:
        x: ``(N, C, H, W)`` images (any values).
        draws: ``(N, 4)`` uniforms in [0, 1): apply, size, top offset, left offset.
        diversity_prob: Probability of transforming an image.
        resize_rate: Size rule of :func:`_side`.

    Returns:
        ``(out, applied)``: ``out`` ``(N, C, H, W)`` (``x`` itself when no image is
        transformed); ``applied`` ``(N,)`` bool.
    """
    applied = (draws[:, 0] < diversity_prob).cpu()  # the draws live on the CPU
    if not bool(applied.any()):
        return x, applied.to(x.device)
    height, width = x.shape[-2:]
    (lo_h, pad_h), (lo_w, pad_w) = _side(height, resize_rate), _side(width, resize_rate)
    rows = []
    for i in range(x.shape[0]):
        xi = x[i : i + 1]
        if not bool(applied[i]):
            rows.append(xi)
            continue
        u, top_u, left_u = (float(v) for v in draws[i, 1:])
        h = lo_h + math.floor(u * (pad_h - lo_h))
        w = lo_w + math.floor(u * (pad_w - lo_w))
        top = math.floor(top_u * (pad_h - h + 1))
        left = math.floor(left_u * (pad_w - w + 1))
        z = F.interpolate(xi, size=(h, w), mode="bilinear", align_corners=False)
        z = F.pad(z, (left, pad_w - w - left, top, pad_h - h - top))
        if (pad_h, pad_w) != (height, width):
            z = F.interpolate(z, size=(height, width), mode="bilinear", align_corners=False)
        rows.append(z)
    return torch.cat(rows), applied.to(x.device)


class _Estimator:
    """The :data:`GradientFn` of a :class:`Recipe` for one attack run."""

    def __init__(
        self,
        guard: ModelGuard,
        x: torch.Tensor,
        y: torch.Tensor,
        target: torch.Tensor | None,
        seeds: torch.Tensor,
        *,
        recipe: Recipe,
        eps: float,
        step_size: float,
        model_dtype: torch.dtype,
    ) -> None:
        self.guard, self.x, self.y, self.recipe = guard, x, y, recipe
        self.eps, self.step_size, self.model_dtype = eps, step_size, model_dtype
        r = recipe
        self.di_gens = sample_generators(seeds, STREAM_DIVERSITY) if r.diversity_prob > 0 else []
        self.vt_gens = sample_generators(seeds, STREAM_NEIGHBOURS) if r.samples > 0 else []
        self.admix_gens = sample_generators(seeds, STREAM_ADMIX) if r.admix_copies > 0 else []
        self.variance = torch.zeros_like(x) if r.samples > 0 else None
        self.kernel = None
        if r.kernel_size > 1:
            k = gaussian_kernel(r.kernel_size, r.nsig, dtype=x.dtype)
            self.kernel = k.expand(x.shape[1], 1, *k.shape).contiguous()

    # ------------------------------------------------------------------ pieces

    def _partners(self, active: torch.Tensor) -> torch.Tensor:
        """``(n, admix_copies)`` batch indices of the images admixed into each sample.

        Drawn uniformly among the batch's images of another label; if there is none,
        among the other images; for a batch of one, the image itself.
        """
        n_all = self.y.shape[0]
        labels = self.y.cpu()
        out = torch.empty(active.numel(), self.recipe.admix_copies, dtype=torch.long)
        for row, i in enumerate(active.tolist()):
            others = torch.nonzero(labels != labels[i]).flatten()
            if others.numel() == 0:
                others = torch.tensor([j for j in range(n_all) if j != i] or [i])
            pick = torch.randint(
                others.numel(), (self.recipe.admix_copies,), generator=self.admix_gens[i]
            )
            out[row] = others[pick]
        return out.to(active.device)

    def _draws(self, active: torch.Tensor) -> torch.Tensor:
        """``(n, 4)`` DI uniforms for one copy, from each sample's own stream (CPU)."""
        return uniforms([self.di_gens[i] for i in active.tolist()], 4)

    def _copies_grad(
        self,
        active: torch.Tensor,
        point: torch.Tensor,
        ya: torch.Tensor,
        ta: torch.Tensor | None,
        partners: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Mean input gradient at ``point`` over the admix × scale × DI copies.

        Returns ``(g, rows, logits)``: ``rows``/``logits`` are the untransformed first
        copy's (the point itself), where DI left it unchanged.
        """
        r = self.recipe
        objective = functools.partial(_objective, ya, ta)
        total = torch.zeros_like(point)
        rows = seen = None
        mixes: list[torch.Tensor | None] = [None]
        if partners is not None:
            mixes = [self.x[partners[:, j]] for j in range(r.admix_copies)]
        for mix in mixes:
            for i in range(r.scale_copies):
                draws = self._draws(active) if self.di_gens else None
                with torch.enable_grad():
                    p = point.detach().requires_grad_(True)
                    t = p if mix is None else p + r.admix_strength * mix
                    if i:
                        t = t * (0.5**i)
                    applied = None
                    if draws is not None:
                        with _no_autocast(t):
                            t, applied = diverse_inputs(
                                t,
                                draws,
                                diversity_prob=r.diversity_prob,
                                resize_rate=r.resize_rate,
                            )
                    g_t, logits = self.guard.grad(t.detach().to(self.model_dtype), objective)
                    g_t = torch.nan_to_num(g_t.to(t.dtype), nan=0.0, posinf=0.0, neginf=0.0)
                    (g,) = (g_t,) if t is p else torch.autograd.grad(t, p, g_t)
                total += g
                if mix is None and i == 0:
                    rows = torch.ones_like(ya, dtype=torch.bool) if applied is None else ~applied
                    seen = logits
        return total / (len(mixes) * r.scale_copies), rows, seen

    # ------------------------------------------------------------------ the estimator

    def __call__(
        self,
        active: torch.Tensor,
        cur: torch.Tensor,
        ya: torch.Tensor,
        ta: torch.Tensor | None,
        mom: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        r = self.recipe
        nesterov = r.nesterov and mom is not None
        point = cur + (self.step_size * r.decay) * mom if nesterov else cur  # type: ignore[operator]
        partners = self._partners(active) if self.admix_gens else None
        g, rows, seen = self._copies_grad(active, point, ya, ta, partners)
        if nesterov:  # the look-ahead's logits are not the iterate's
            rows = seen = None
        if self.variance is not None:
            # VT (Wang & He): this step follows g + v of the previous step; the new v is
            # the mean gradient at N uniform neighbours of the iterate minus g.
            tuned = g + self.variance[active]
            neighbours = torch.zeros_like(g)
            shape = tuple(cur.shape[1:])
            gens = [self.vt_gens[i] for i in active.tolist()]
            for _ in range(r.samples):
                noise = uniform_linf_ball(gens, shape, r.beta * self.eps, cur)
                neighbours += self._copies_grad(active, cur + noise, ya, ta, partners)[0]
            self.variance[active] = neighbours / r.samples - g
            g = tuned
        if self.kernel is not None:
            with _no_autocast(g):
                pad = r.kernel_size // 2
                g = F.conv2d(g, self.kernel.to(g.dtype), padding=pad, groups=g.shape[1])
        return g, rows, seen


def _no_autocast(like: torch.Tensor) -> torch.autocast:
    # The transforms and the kernel are the attack's own arithmetic: in the working dtype
    # even when the model runs under autocast (only the model call is autocast).
    return torch.autocast(device_type=like.device.type, enabled=False)


def _objective(y: torch.Tensor, target: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
    return ce_loss(logits, y, target)


def _run(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    steps: int,
    step_size: float | None,
    recipe: Recipe,
    target: torch.Tensor | None,
    generator: torch.Generator | None,
    seeds: torch.Tensor | None,
) -> AttackResult:
    """One transfer attack: the recipe's estimator in the shared L∞ loop."""
    step = eps / steps if step_size is None else step_size
    factory = functools.partial(
        _Estimator, recipe=recipe, eps=eps, step_size=step, model_dtype=x.dtype
    )
    return steepest_ascent(
        model, x, y, threat=Linf(eps), steps=steps, step_size=step, objective=ce_loss,
        momentum=recipe.decay, gradient=factory, target=target, generator=generator, seeds=seeds,
    )  # fmt: skip


_ARGS = """
        model: Classifier on [0, 1] images returning logits ``(N, K)``, in eval mode
            (the surrogate). Its modes and ``requires_grad`` flags are restored.
        x: ``(N, C, H, W)`` clean images in [0, 1]. Not modified.
        y: ``(N,)`` true labels.
        eps: L∞ budget ``>= 0`` (16/255 in the usual ImageNet transfer protocol).
        steps: Iterations ``>= 1``.
        step_size: Absolute step; ``None`` means ``eps / steps``."""

_COMMON = """
        target: Optional ``(N,)`` target classes (each ≠ ``y``): descend their CE.
        generator: Source of the per-sample seeds when ``seeds`` is not given.
        seeds: ``(N,)`` integer seeds; sample *i*'s random draws depend only on
            ``seeds[i]``.

    Returns:
        :class:`AttackResult` on the surrogate. ``model_calls`` counts one call per
        transformed copy (and neighbour) per step plus the final evaluation. Where a
        step evaluated the iterate itself (its first, untransformed copy), a sample
        whose final iterate fails but that iterate succeeded returns it, as MI-FGSM does.

    Raises:
        ValueError: Invalid inputs or hyperparameters."""


_F = TypeVar("_F", bound=Callable[..., AttackResult])


def _doc(fn: _F) -> _F:
    """Fill the shared argument sections into ``fn``'s docstring."""
    fn.__doc__ = (fn.__doc__ or "").replace("{ARGS}", _ARGS).replace("{COMMON}", _COMMON)
    return fn


# --------------------------------------------------------------------------- the attacks


@register("transfer_fgsm", params=(
    EPS, STEPS, STEP_SIZE, DECAY, NESTEROV, _with(DIVERSITY_PROB, 0.0), RESIZE_RATE,
    _with(KERNEL_SIZE, 1), NSIG, _with(SCALE_COPIES, 1), _with(ADMIX_COPIES, 0),
    ADMIX_STRENGTH, _with(SAMPLES, 0), BETA,
))  # fmt: skip
@_doc
def transfer_fgsm(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    steps: int = 10,
    step_size: float | None = None,
    decay: float = 1.0,
    nesterov: bool = False,
    diversity_prob: float = 0.0,
    resize_rate: float = 1.1,
    kernel_size: int = 1,
    nsig: float = 3.0,
    scale_copies: int = 1,
    admix_copies: int = 0,
    admix_strength: float = 0.2,
    samples: int = 0,
    beta: float = 1.5,
    target: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    seeds: torch.Tensor | None = None,
) -> AttackResult:
    """Any composition of the transfer transforms (L∞); with defaults, MI-FGSM.

    Switch transforms on by their settings: ``nesterov`` (NI), ``diversity_prob`` (DI),
    ``kernel_size > 1`` (TI), ``scale_copies > 1`` (SI), ``admix_copies > 0`` (Admix;
    batch-dependent, see :func:`admix`), ``samples > 0`` (VT), e.g. VMI-DI-TI-SI-FGSM.
    Randomized when DI, VT or Admix is on. The order per step is the authors' (VT
    paper's code): copies (Admix, SI, DI) at the look-ahead, then ``+ v``, then the TI
    kernel, then normalisation and momentum.

    Args:{ARGS}
        decay: Momentum factor μ ``>= 0``.
        nesterov: Gradient at the look-ahead ``x + step_size·μ·m``.
        diversity_prob: DI probability in [0, 1].
        resize_rate: DI size rule (see :func:`di_fgsm`).
        kernel_size: Odd TI kernel side, 1 to 63 (1: off).
        nsig: TI kernel extent in standard deviations.
        scale_copies: SI copies in 1..16 (1: off).
        admix_copies: Admix images per scale copy, 0..16 (0: off).
        admix_strength: Admix weight η in [0, 1].
        samples: VT neighbours, 0..1000 (0: off).
        beta: VT radius as a multiple of ``eps``.{COMMON}
    """
    recipe = Recipe(
        decay=decay, nesterov=nesterov, diversity_prob=diversity_prob, resize_rate=resize_rate,
        kernel_size=kernel_size, nsig=nsig, scale_copies=scale_copies, admix_copies=admix_copies,
        admix_strength=admix_strength, samples=samples, beta=beta,
    )  # fmt: skip
    return _run(
        model, x, y, eps=eps, steps=steps, step_size=step_size, recipe=recipe,
        target=target, generator=generator, seeds=seeds,
    )  # fmt: skip


# The named attacks are bindings of transfer_fgsm: a subset of its settings (with the
# paper's defaults) exposed, the others fixed. Their signatures are built from the
# declared Params, so each setting is written once.

_SHARED = ("eps", "steps", "step_size")
_POS = inspect.Parameter.POSITIONAL_OR_KEYWORD
_KW = inspect.Parameter.KEYWORD_ONLY


def _annotation(p: Param) -> str:
    return p.type.__name__ + (" | None" if p.nullable else "")


def _binding(
    name: str,
    *,
    params: tuple[Param, ...],
    fixed: dict[str, object] | None = None,
    randomized: bool = False,
    per_sample: bool = True,
    doc: str,
) -> Callable[..., AttackResult]:
    """Register ``name``: :func:`transfer_fgsm` with ``params`` exposed (their defaults)
    and the ``fixed`` recipe settings; ``doc`` is its docstring before the Args section."""
    defaults = {p.name: p.default for p in params if not p.required}
    allowed = {p.name for p in params}
    required = [p.name for p in params if p.required]

    def attack(
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        target: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        seeds: torch.Tensor | None = None,
        **hyperparameters: object,
    ) -> AttackResult:
        unknown = sorted(set(hyperparameters) - allowed)
        if unknown:
            raise TypeError(f"{name}() got an unexpected keyword argument {unknown[0]!r}")
        missing = [k for k in required if k not in hyperparameters]
        if missing:
            raise TypeError(f"{name}() missing required keyword-only argument {missing[0]!r}")
        kw: dict = {**defaults, **hyperparameters, **(fixed or {})}
        recipe = Recipe(**{k: v for k, v in kw.items() if k not in _SHARED})
        return _run(
            model, x, y, eps=kw["eps"], steps=kw["steps"], step_size=kw["step_size"],
            recipe=recipe, target=target, generator=generator, seeds=seeds,
        )  # fmt: skip

    signature = [inspect.Parameter(k, _POS, annotation="torch.Tensor") for k in ("x", "y")]
    signature.insert(0, inspect.Parameter("model", _POS, annotation="nn.Module"))
    for p in params:
        default = inspect.Parameter.empty if p.required else p.default
        signature.append(inspect.Parameter(p.name, _KW, default=default, annotation=_annotation(p)))
    for k in ("target", "generator", "seeds"):
        signature.append(inspect.Parameter(k, _KW, default=None))
    attack.__signature__ = inspect.Signature(signature, return_annotation="AttackResult")  # type: ignore[attr-defined]
    attack.__name__ = attack.__qualname__ = name
    lines = [f"        {p.name}: {p.help}." for p in params if p.name not in _SHARED]
    attack.__doc__ = doc.rstrip() + "\n\n    Args:{ARGS}\n" + "\n".join(lines) + "{COMMON}\n    "
    _doc(attack)
    return register(name, randomized=randomized, per_sample=per_sample, params=params)(attack)


di_fgsm = _binding(
    "di_fgsm",
    params=(EPS, STEPS, STEP_SIZE, _with(DECAY, 0.0), DIVERSITY_PROB, RESIZE_RATE),
    randomized=True,
    doc="""DI²-FGSM: iterative FGSM on randomly resized and padded inputs (L∞).

    Each step, with probability ``diversity_prob`` per image, the gradient is taken
    through a random resize-and-pad of the iterate (:func:`diverse_inputs`); with
    ``decay > 0`` it is M-DI²-FGSM (momentum), and with ``diversity_prob=0`` exactly
    MI-FGSM (I-FGSM for ``decay=0``). ``resize_rate > 1``: resize into [W, rate·W), pad
    to rate·W, resize back to W; ``< 1``: resize into [rate·W, W), pad to W
    (torchattacks' rule). Reference: Xie et al., "Improving Transferability of
    Adversarial Examples with Input Diversity", CVPR 2019 (arXiv:1803.06978); defaults
    p = 0.5, 330/299 ≈ 1.1, no momentum.""",
)

ti_fgsm = _binding(
    "ti_fgsm",
    params=(EPS, STEPS, STEP_SIZE, _with(DECAY, 0.0), KERNEL_SIZE, NSIG),
    doc="""TI-FGSM: iterative FGSM on a Gaussian-smoothed gradient (L∞).

    The gradient is convolved (per channel, zero padding) with :func:`gaussian_kernel`
    before the step, which approximates averaging gradients over translated images.
    ``decay > 0`` gives TI-MI-FGSM. Deterministic. Reference: Dong et al., "Evading
    Defenses to Transferable Adversarial Examples by Translation-Invariant Attacks", CVPR
    2019 (arXiv:1904.02884); defaults kernel 15, nsig 3.""",
)

si_ni_fgsm = _binding(
    "si_ni_fgsm",
    params=(EPS, STEPS, STEP_SIZE, DECAY, SCALE_COPIES),
    fixed={"nesterov": True},
    doc="""SI-NI-FGSM: Nesterov momentum on gradients averaged over scaled copies (L∞).

    Each step the gradient is the mean over ``x_nes / 2^i``, ``i < scale_copies``, at the
    look-ahead ``x_nes = x + step_size·μ·m`` (not projected). Deterministic. Reference:
    Lin et al., "Nesterov Accelerated Gradient and Scale Invariance for Adversarial
    Attacks", ICLR 2020 (arXiv:1908.06281); defaults m = 5, μ = 1.""",
)

vmi_fgsm = _binding(
    "vmi_fgsm",
    params=(EPS, STEPS, STEP_SIZE, DECAY, SAMPLES, BETA),
    randomized=True,
    doc="""VMI-FGSM: MI-FGSM with variance tuning (L∞).

    Step *t* follows ``g_t + v_{t−1}``, where ``v = mean_k ∇(x + r_k) − ∇(x)`` over
    ``samples`` neighbours ``r_k`` uniform in the L∞ ball of radius ``beta·eps`` (per
    sample, from its own stream). ``samples=0`` or ``beta=0`` gives MI-FGSM. Reference:
    Wang & He, "Enhancing the Transferability of Adversarial Attacks through Variance
    Tuning", CVPR 2021 (arXiv:2103.15571); defaults N = 20, β = 1.5, μ = 1.""",
)

vni_fgsm = _binding(
    "vni_fgsm",
    params=(EPS, STEPS, STEP_SIZE, DECAY, SAMPLES, BETA),
    fixed={"nesterov": True},
    randomized=True,
    doc="""VNI-FGSM: Nesterov momentum with variance tuning (L∞).

    As :func:`vmi_fgsm`, with the gradient taken at the look-ahead ``x + step_size·μ·m``;
    the neighbours are sampled around the iterate ``x`` (not the look-ahead), and ``v``
    subtracts the look-ahead's gradient, as in the authors' code. Reference: Wang & He,
    CVPR 2021 (arXiv:2103.15571); defaults N = 20, β = 1.5, μ = 1.""",
)

admix = _binding(
    "admix",
    params=(EPS, STEPS, STEP_SIZE, DECAY, SCALE_COPIES, ADMIX_COPIES, ADMIX_STRENGTH),
    randomized=True,
    per_sample=False,
    doc="""Admix-MI-FGSM: gradients over admixed, scaled copies, with momentum (L∞).

    Each step the gradient is the mean over ``(x + η·x'_j) / 2^i`` for
    ``admix_copies`` images ``x'_j`` and ``i < scale_copies``. The ``x'_j`` are clean
    images of the same batch with another label, drawn per sample and step from its own
    stream (the paper samples "images of other categories"; the authors' code mixes a
    shuffled copy of the batch's current iterates). The result therefore depends on the
    batch: keep batches fixed to reproduce a run. ``admix_copies=0`` is SI-MI-FGSM.
    Reference: Wang et al., "Admix: Enhancing the Transferability of Adversarial
    Attacks", ICCV 2021 (arXiv:2102.00436); defaults m1 = 5, m2 = 3, η = 0.2, μ = 1.""",
)

mi_di_ti_fgsm = _binding(
    "mi_di_ti_fgsm",
    params=(EPS, STEPS, STEP_SIZE, DECAY, DIVERSITY_PROB, RESIZE_RATE, KERNEL_SIZE, NSIG),
    randomized=True,
    doc="""MI-DI-TI-FGSM: momentum, diverse inputs and a smoothed gradient (L∞).

    The composed default for transfer: the gradient through a random resize-and-pad
    (:func:`di_fgsm`), smoothed by a Gaussian kernel (:func:`ti_fgsm`), accumulated with
    momentum (MI-FGSM). Reference: the TI-DIM attack of Dong et al., "Evading Defenses to
    Transferable Adversarial Examples by Translation-Invariant Attacks", CVPR 2019
    (arXiv:1904.02884), over Dong et al., "Boosting Adversarial Attacks with Momentum",
    CVPR 2018 (arXiv:1710.06081) and Xie et al., CVPR 2019; defaults μ = 1, p = 0.5,
    kernel 15, nsig 3.""",
)
