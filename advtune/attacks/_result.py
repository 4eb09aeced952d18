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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd
from torch.nn.modules.instancenorm import _InstanceNorm

from advtune.attacks.threat import clip_unit

__all__ = [
    "LOSSES",
    "AttackResult",
    "ModelCalls",
    "ModelGuard",
    "ce_loss",
    "check_choice",
    "check_images",
    "check_inputs",
    "check_int",
    "check_model_dtype",
    "check_nonnegative",
    "check_positive",
    "clip_unit",
    "finish",
    "finite_rows",
    "least_likely_target",
    "margin_loss",
    "norms",
    "refuse_training_layers",
    "success_of",
    "work_dtype",
]

# --------------------------------------------------------------------------- result


@dataclass(frozen=True)
class ModelCalls:
    """What an attack paid in model calls, forward-only and forward+backward apart.

    A *call* is one pass of the model on all or part of a batch; the ``*_images`` counts
    add up the images in those calls, so they measure work whatever the batch size (an
    ensemble that attacks 3 survivors pays 3 images per call, not a batch's worth).

    Attributes:
        forward: Calls without gradient (evaluations, Square's queries).
        gradient: Calls with a backward pass (an input gradient; a K-class Jacobian of
            one forward pass counts once, though it takes K backward passes).
        forward_images: Images summed over the ``forward`` calls.
        gradient_images: Images summed over the ``gradient`` calls.
    """

    forward: int = 0
    gradient: int = 0
    forward_images: int = 0
    gradient_images: int = 0

    @property
    def total(self) -> int:
        """All calls: ``forward + gradient`` (what ``AttackResult.model_calls`` holds)."""
        return self.forward + self.gradient

    def __add__(self, other: ModelCalls) -> ModelCalls:
        if not isinstance(other, ModelCalls):
            return NotImplemented
        return ModelCalls(
            self.forward + other.forward,
            self.gradient + other.gradient,
            self.forward_images + other.forward_images,
            self.gradient_images + other.gradient_images,
        )

    def as_dict(self) -> dict[str, int]:
        """JSON-ready ``{"forward": ..., "gradient": ..., "forward_images": ..., ...}``."""
        return {
            "forward": self.forward,
            "gradient": self.gradient,
            "forward_images": self.forward_images,
            "gradient_images": self.gradient_images,
        }


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
        finite: ``(N,)`` bool: every logit of the sample is finite. A sample with a NaN
            or infinite logit is never a success (its prediction means nothing), and a
            run should flag it rather than count it robust. When not given it is
            computed from ``logits``; ``success`` is always masked with it.
        calls: The same calls split into forward-only and forward+backward, with the
            images each kind processed (:class:`ModelCalls`; ``calls.total ==
            model_calls``). ``None`` only for a result built by hand without counts.
    """

    x_adv: torch.Tensor
    success: torch.Tensor
    logits: torch.Tensor
    linf: torch.Tensor
    l2: torch.Tensor
    model_calls: int
    finite: torch.Tensor | None = None
    calls: ModelCalls | None = None

    def __post_init__(self) -> None:
        if self.calls is not None and self.calls.total != self.model_calls:
            raise ValueError(
                f"calls.total ({self.calls.total}) must equal model_calls ({self.model_calls})"
            )
        finite = self.finite
        if finite is None:
            finite = finite_rows(self.logits)
        # The rule is enforced here too, so a result built by hand cannot break it.
        object.__setattr__(self, "finite", finite)
        object.__setattr__(self, "success", self.success & finite)


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
    x = cast(torch.Tensor, x)  # checked above
    check_model_dtype(cast(nn.Module, model), x)
    n = x.shape[0]
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


def _training_layer_reason(module: nn.Module) -> str | None:
    if not module.training:
        return None
    if isinstance(module, _BatchNorm):
        return (
            "normalises with the statistics of the batch and updates its running "
            "statistics, so results would depend on batch composition and the model changes"
        )
    if isinstance(module, _InstanceNorm) and module.track_running_stats:
        return "updates its running statistics, so the model would change"
    if isinstance(module, _DropoutNd):
        return "draws random masks from the global RNG, so results would not be reproducible"
    return None


def refuse_training_layers(model: nn.Module) -> None:
    """``ValueError`` naming the first BatchNorm or Dropout layer of ``model`` in training mode.

    Attacks must not change the model (a training-mode BatchNorm updates its running
    statistics) and their results must not depend on the rest of the batch (it also
    normalises with the batch's statistics) or on the global RNG (dropout): call
    ``model.eval()`` first. Other modules in training mode are harmless and allowed.
    """
    for path, module in model.named_modules():
        reason = _training_layer_reason(module)
        if reason is not None:
            where = f"module {path!r}" if path else "the model itself"
            raise ValueError(
                f"{where} ({type(module).__name__}) is in training mode: it {reason}; "
                "call model.eval() before attacking"
            )


def check_model_dtype(model: nn.Module, x: torch.Tensor) -> None:
    """``ValueError`` unless ``x``'s dtype is supported and matches the model's parameters.

    Supported: float32, float64, bfloat16 and float16, with the dtype of the model's
    floating-point parameters (mixed precision is ``torch.autocast``'s job: the attack
    casts nothing itself).
    """
    if x.dtype not in _DTYPES:
        raise ValueError(f"x must have dtype {', '.join(str(d) for d in _DTYPES)}; got {x.dtype}")
    for p in model.parameters():
        if p.dtype.is_floating_point:
            if p.dtype != x.dtype:
                raise ValueError(
                    f"x has dtype {x.dtype} but the model's parameters are {p.dtype}; "
                    f"pass x.to({p.dtype}) (use torch.autocast for mixed precision)"
                )
            return


_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


class ModelGuard:
    """Run a model for an attack and leave it exactly as found.

    On entry it records each submodule's ``training`` flag and each parameter's
    ``requires_grad``, then sets ``requires_grad=False`` on every parameter: the attack
    needs input gradients only, so autograd then saves nothing for weight gradients and
    no ``.grad`` can appear on a parameter. On exit (also after an exception) both are
    restored. A BatchNorm or Dropout layer in training mode is refused with a
    ``ValueError`` (:func:`refuse_training_layers`): it would change the model or make
    results depend on the batch or the global RNG. Training flags are not changed by
    advtune's attacks, but they are restored too, so adapters that flip modes
    (torchattacks calls ``model.eval()``) leave no trace.

    Use as ``with ModelGuard(model) as guard:``; :meth:`logits` and :meth:`grad` count
    calls (:attr:`calls`, split in :meth:`counted`); code that runs the model itself
    reports its passes with :meth:`count`.
    """

    def __init__(self, model: nn.Module, *, y: torch.Tensor, target: torch.Tensor | None):
        self.model = model
        self._counts = [0, 0, 0, 0]  # forward, gradient, forward images, gradient images
        self._labels = (y, target)
        self._checked = False
        self._training: list[tuple[nn.Module, bool]] = []
        self._requires_grad: list[tuple[nn.Parameter, bool]] = []

    def __enter__(self) -> ModelGuard:
        self._training = [(m, m.training) for m in self.model.modules()]
        self._requires_grad = [(p, p.requires_grad) for p in self.model.parameters()]
        refuse_training_layers(self.model)
        for p, _ in self._requires_grad:
            p.requires_grad_(False)
        return self

    @property
    def calls(self) -> int:
        """Model calls so far, forward-only and forward+backward together."""
        return self._counts[0] + self._counts[1]

    def count(self, images: int, *, gradient: bool) -> None:
        """Record one model call on ``images`` images (``gradient``: with a backward pass)."""
        k = 1 if gradient else 0
        self._counts[k] += 1
        self._counts[k + 2] += int(images)

    def counted(self) -> ModelCalls:
        """The calls so far as :class:`ModelCalls`."""
        return ModelCalls(*self._counts)

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
        self.count(x.shape[0], gradient=False)
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
        self.count(x.shape[0], gradient=True)
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


def finite_rows(logits: torch.Tensor) -> torch.Tensor:
    """``(N,)`` bool: every logit of the sample is finite (no NaN, no ±inf)."""
    return torch.isfinite(logits).all(dim=1)


def success_of(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """``(N,)`` bool: argmax ≠ ``y`` (untargeted) or argmax == ``target`` (targeted).

    A sample with a non-finite logit is never a success: ``argmax`` of a row holding NaN
    points at the NaN, which would otherwise read as a changed prediction.
    """
    pred = logits.argmax(dim=1)
    won = pred != y if target is None else pred == target
    return won & finite_rows(logits)


# --------------------------------------------------------------------------- geometry


def norms(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(linf, l2)`` per sample of ``delta`` ``(N, ...)``; each ``(N,)``."""
    flat = delta.flatten(1)
    return flat.abs().amax(dim=1), flat.norm(p=2, dim=1)


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
    exactly these images are given. Samples with non-finite logits are flagged in
    ``finite`` and never count as successes.
    """
    x_adv = x_adv.to(x.dtype).detach()
    # A non-finite image (an attack fed NaN gradients) is replaced by the clean one, so
    # x_adv always lies in [0, 1] and inside the threat model.
    x_adv = clip_unit(torch.where(torch.isfinite(x_adv), x_adv, x.detach()))
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
        calls=guard.counted(),
    )
