"""What every attack shares: the result type, input checks, model hygiene, norms, losses.

Attacks are pure functions of ``(model, x, y)``. The helpers here make that true for any
``nn.Module``: :class:`ModelGuard` records and restores every submodule's ``training`` flag
and every parameter's ``requires_grad``, switches parameter gradients off for the duration
(autograd then keeps nothing for weight gradients), counts model calls, and takes input
gradients with :func:`torch.autograd.grad` only.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "LOSSES",
    "AttackResult",
    "ModelGuard",
    "ce_loss",
    "check_choice",
    "check_images",
    "check_inputs",
    "check_int",
    "check_nonnegative",
    "check_positive",
    "clip_unit",
    "finish",
    "least_likely_target",
    "margin_loss",
    "norms",
    "project_l2",
    "project_linf",
    "success_of",
    "work_dtype",
]

# --------------------------------------------------------------------------- result


@dataclass(frozen=True)
class AttackResult:
    """The outcome of one attack on one batch.

    Attributes:
        x_adv: ``(N, C, H, W)`` adversarial images; dtype and device of ``x``, in [0, 1]
            and inside the attack's threat model.
        success: ``(N,)`` bool: prediction on ``x_adv`` differs from ``y`` (untargeted) or
            equals ``target`` (targeted).
        logits: ``(N, K)`` the model's logits on ``x_adv`` (the model's output dtype).
        linf: ``(N,)`` L∞ norm of ``x_adv - x`` per sample (dtype of ``x``).
        l2: ``(N,)`` L2 norm of ``x_adv - x`` per sample (dtype of ``x``).
        model_calls: Forward passes used, each on all or part of the batch (a gradient
            step counts once; the final evaluation of ``x_adv`` is included).
    """

    x_adv: torch.Tensor
    success: torch.Tensor
    logits: torch.Tensor
    linf: torch.Tensor
    l2: torch.Tensor
    model_calls: int


# --------------------------------------------------------------------------- checks


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_nonnegative(name: str, value: object) -> float:
    """``value`` as a float; ``ValueError`` unless it is a finite real ``>= 0``."""
    if not _is_number(value) or not math.isfinite(float(value)) or float(value) < 0:  # type: ignore[arg-type]
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def check_positive(name: str, value: object) -> float:
    """``value`` as a float; ``ValueError`` unless it is a finite real ``> 0``."""
    if not _is_number(value) or not math.isfinite(float(value)) or float(value) <= 0:  # type: ignore[arg-type]
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def check_int(name: str, value: object, *, minimum: int) -> int:
    """``value`` as an int; ``ValueError`` unless it is an integer ``>= minimum``."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices``; otherwise ``ValueError`` naming both."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def _check_labels(name: str, labels: object, n: int, device: torch.device) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"{name} must be a tensor of class indices, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"{name} must have an integer dtype, got {labels.dtype}")
    if labels.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) to match x, got {tuple(labels.shape)}")
    labels = labels.to(device=device, dtype=torch.long)
    if n and int(labels.min()) < 0:
        raise ValueError(f"{name} must be >= 0, got {int(labels.min())}")
    return labels


def check_images(model: object, x: object) -> None:
    """``ValueError`` unless ``model`` is a module and ``x`` a finite ``(N, C, H, W)`` batch in [0, 1]."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() != 4:
        raise ValueError(f"x must have shape (N, C, H, W), got {tuple(x.shape)}")
    if x.shape[0] == 0 or x[0].numel() == 0:
        raise ValueError(f"x must hold at least one non-empty image, got shape {tuple(x.shape)}")
    with torch.no_grad():
        if not bool(torch.isfinite(x).all()):
            raise ValueError("x must be finite, got NaN or infinite values")
        lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 1:
        raise ValueError(f"x must lie in [0, 1], got values in [{lo:g}, {hi:g}]")


def check_inputs(
    model: object,
    x: object,
    y: object,
    target: object,
    *,
    generator: object = None,
    seeds: object = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate what every attack receives.

    Args:
        model: Must be an ``nn.Module``.
        x: ``(N, C, H, W)`` floating tensor, finite, in [0, 1], ``N >= 1``.
        y: ``(N,)`` integer class indices ``>= 0`` (the upper bound is checked against the
            logits at the first model call).
        target: ``None`` or ``(N,)`` integer class indices, each different from ``y``.
        generator: ``None`` or a ``torch.Generator``.
        seeds: ``None`` or an ``(N,)`` integer tensor.

    Returns:
        ``(y, target)`` as ``torch.long`` tensors on ``x``'s device.

    Raises:
        ValueError: Naming the offending argument and value.
    """
    check_images(model, x)
    n = x.shape[0]  # type: ignore[union-attr]
    y = _check_labels("y", y, n, x.device)
    if target is not None:
        target = _check_labels("target", target, n, x.device)
        same = (target == y).nonzero().flatten()
        if same.numel():
            i = int(same[0])
            raise ValueError(
                f"target must differ from y for every sample; sample {i} has "
                f"target == y == {int(y[i])}"
            )
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if seeds is not None:
        if not isinstance(seeds, torch.Tensor) or seeds.dtype not in (
            torch.int64,
            torch.int32,
            torch.int16,
            torch.int8,
            torch.uint8,
        ):
            what = seeds.dtype if isinstance(seeds, torch.Tensor) else type(seeds).__name__
            raise ValueError(f"seeds must be an integer tensor, got {what}")
        if seeds.shape != (n,):
            raise ValueError(f"seeds must have shape ({n},) to match x, got {tuple(seeds.shape)}")
    return y, target


def work_dtype(x: torch.Tensor) -> torch.dtype:
    """Dtype for an attack's own arithmetic: float64 stays, anything else is float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- model guard


class ModelGuard:
    """Run a model for an attack and leave it exactly as found.

    On entry it records each submodule's ``training`` flag and each parameter's
    ``requires_grad``, then sets ``requires_grad=False`` on every parameter: the attack
    needs input gradients only, so autograd then saves nothing for weight gradients and
    no ``.grad`` can appear on a parameter. On exit (also after an exception) both are
    restored. Training flags are not changed by advtune's attacks (the caller chooses
    the model's mode; attacks expect an eval-mode model), but they are restored too, so
    adapters that flip modes (torchattacks calls ``model.eval()``) leave no trace.

    Use as ``with ModelGuard(model) as guard:``; :meth:`logits` and :meth:`grad` count
    calls in :attr:`calls`.
    """

    def __init__(self, model: nn.Module, *, y: torch.Tensor, target: torch.Tensor | None):
        self.model = model
        self.calls = 0
        self._labels = (y, target)
        self._checked = False
        self._training: list[tuple[nn.Module, bool]] = []
        self._requires_grad: list[tuple[nn.Parameter, bool]] = []

    def __enter__(self) -> ModelGuard:
        self._training = [(m, m.training) for m in self.model.modules()]
        self._requires_grad = [(p, p.requires_grad) for p in self.model.parameters()]
        if any(
            m.training and isinstance(m, (_BatchNorm, nn.Dropout, nn.AlphaDropout))
            for m in self.model.modules()
        ):
            # Train-mode BN would update its running statistics and dropout would draw
            # from the global RNG: both break the attack contract, so say so.
            warnings.warn(
                "the model has BatchNorm/Dropout layers in training mode; attacks expect an "
                "eval-mode model (call model.eval() first)",
                RuntimeWarning,
                stacklevel=3,
            )
        for p, _ in self._requires_grad:
            p.requires_grad_(False)
        return self

    def restore_modes(self) -> None:
        """Put every submodule's ``training`` flag back as it was on entry."""
        for m, flag in self._training:
            m.training = flag

    def __exit__(self, *exc: object) -> None:
        self.restore_modes()
        for p, flag in self._requires_grad:
            p.requires_grad_(flag)

    def check_logits(self, logits: torch.Tensor, n: int) -> None:
        """``ValueError`` unless ``logits`` is ``(n, K)``; checks labels ``< K`` once."""
        if logits.dim() != 2 or logits.shape[0] != n:
            raise ValueError(
                f"model must return logits of shape (N, num_classes) = ({n}, K), "
                f"got {tuple(logits.shape)}"
            )
        if self._checked:
            return
        k = logits.shape[1]
        for name, labels in zip(("y", "target"), self._labels):
            if labels is not None and int(labels.max()) >= k:
                raise ValueError(f"{name} must be < num_classes = {k}, got {int(labels.max())}")
        self._checked = True

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, K)`` of ``x`` without building a graph (one model call)."""
        self.calls += 1
        with torch.no_grad():
            out = self.model(x)
        self.check_logits(out, x.shape[0])
        return out

    def grad(
        self, x: torch.Tensor, objective: Callable[[torch.Tensor], torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradient of ``objective(logits).sum()`` w.r.t. ``x`` (one model call).

        ``objective`` maps logits ``(N, K)`` to per-sample values ``(N,)``; summing them
        makes sample *i*'s gradient independent of the rest of the batch.

        Returns:
            ``(grad, logits)``: ``grad`` shaped like ``x``; ``logits`` detached.
        """
        self.calls += 1
        with torch.enable_grad():
            xr = x.detach().requires_grad_(True)
            out = self.model(xr)
            self.check_logits(out, x.shape[0])
            (g,) = torch.autograd.grad(objective(out).sum(), xr)
        return g, out.detach()


@contextmanager
def _no_grad_guard(model: nn.Module) -> Iterator[ModelGuard]:
    # Helper for plain forward passes that need no labels (least_likely_target).
    empty = torch.zeros(0, dtype=torch.long)
    with ModelGuard(model, y=empty, target=None) as guard, torch.no_grad():
        guard._checked = True
        yield guard


def least_likely_target(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The class the model finds least likely for each image (a classic hard target).

    Args:
        model: Classifier taking ``(N, C, H, W)`` images in [0, 1].
        x: ``(N, C, H, W)`` images in [0, 1].

    Returns:
        ``(N,)`` long tensor: ``argmin`` of the logits on ``x``. If that equals the true
        label (only possible for a model that ranks the true class last), an attack given
        it as ``target`` raises ``ValueError``.
    """
    check_images(model, x)
    with _no_grad_guard(model) as guard:
        return guard.logits(x).argmin(dim=1)


# --------------------------------------------------------------------------- losses


def _other_max(logits: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    # Max over the classes other than ``cls``. Masking with -inf (not multiplying by
    # 1 - onehot) keeps it right when every other logit is negative.
    masked = logits.masked_fill(nn.functional.one_hot(cls, logits.shape[1]).bool(), float("-inf"))
    return masked.amax(dim=1)


def ce_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """Per-sample objective to *maximise*: CE(y) untargeted, −CE(target) targeted. ``(N,)``."""
    if target is None:
        return nn.functional.cross_entropy(logits, y, reduction="none")
    return -nn.functional.cross_entropy(logits, target, reduction="none")


def margin_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """Per-sample CW logit margin to *maximise* ``(N,)``.

    Untargeted ``max_{j≠y} z_j − z_y``; targeted ``z_t − max_{j≠t} z_j``. Positive exactly
    when the attack succeeds (up to ties).
    """
    if target is None:
        return _other_max(logits, y) - logits.gather(1, y[:, None])[:, 0]
    return logits.gather(1, target[:, None])[:, 0] - _other_max(logits, target)


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]] = {
    "ce": ce_loss,
    "margin": margin_loss,
}


def success_of(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """``(N,)`` bool: argmax ≠ ``y`` (untargeted) or argmax == ``target`` (targeted)."""
    pred = logits.argmax(dim=1)
    return pred != y if target is None else pred == target


# --------------------------------------------------------------------------- geometry


def norms(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(linf, l2)`` per sample of ``delta`` ``(N, ...)``; each ``(N,)``."""
    flat = delta.flatten(1)
    return flat.abs().amax(dim=1), flat.norm(p=2, dim=1)


def clip_unit(x: torch.Tensor) -> torch.Tensor:
    """Clamp into the image box [0, 1]."""
    return x.clamp(0.0, 1.0)


def project_linf(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Nearest point to ``x_adv`` in the L∞ ball of radius ``eps`` around ``x``, in [0, 1].

    Both sets are boxes, so clamping the perturbation then the image is the exact
    Euclidean projection onto their intersection.
    """
    delta = (x_adv - x).clamp(-eps, eps)
    return clip_unit(x + delta)


def project_l2(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Scale ``x_adv − x`` into the L2 ball of radius ``eps``, then clip into [0, 1].

    Clipping only shrinks every coordinate of the perturbation towards 0, so the result
    stays in the ball (it is the standard PGD-L2 step, not the exact projection onto the
    intersection).
    """
    delta = x_adv - x
    l2 = delta.flatten(1).norm(p=2, dim=1)
    # Only perturbations outside the ball are scaled (also avoids 0/0 when eps = 0).
    factor = torch.where(l2 > eps, eps / l2, torch.ones_like(l2))
    return clip_unit(x + delta * factor.reshape(-1, *([1] * (delta.dim() - 1))))


def finish(
    guard: ModelGuard,
    x: torch.Tensor,
    x_adv: torch.Tensor,
    y: torch.Tensor,
    target: torch.Tensor | None,
    *,
    logits: torch.Tensor | None = None,
) -> AttackResult:
    """Build the :class:`AttackResult` for ``x_adv`` (cast to ``x``'s dtype).

    Recomputes the logits on the final images (one model call) unless ``logits`` of
    exactly these images are given.
    """
    x_adv = clip_unit(x_adv.to(x.dtype)).detach()
    if logits is None:
        logits = guard.logits(x_adv)
    linf, l2 = norms(x_adv - x)
    return AttackResult(
        x_adv=x_adv,
        success=success_of(logits, y, target),
        logits=logits.detach(),
        linf=linf,
        l2=l2,
        model_calls=guard.calls,
    )
