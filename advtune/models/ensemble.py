"""Several classifiers attacked as one: :class:`ModelEnsemble` and :func:`load_ensemble`.

An ensemble is an ``nn.Module`` like any classifier advtune attacks: ``[0, 1]`` images
``(N, 3, H, W)`` in, ``(N, K)`` out. Each member keeps its own normalisation (an
:class:`~advtune.models.ImageClassifier` normalises inside ``forward``), so members with
different means and stds mix freely. Attacks need nothing new: the gradient of their
loss on the ensemble's output is the gradient of the combined members.

Two ways to combine (``combine``), with weights ``w_i >= 0`` normalised to sum to 1:

* ``"logits"`` (default): ``out = sum_i w_i z_i``, the weighted mean of the members'
  logits (the logit ensemble of Liu et al., ICLR 2017, and Dong et al., CVPR 2018, who
  found it the strongest of the three for transfer).
* ``"probs"``: ``out = log(sum_i w_i softmax(z_i))``, the log of the weighted mean of the
  members' probabilities (computed as a ``logsumexp``). ``softmax(out)`` *is* the mean
  probability vector, so cross-entropy on ``out`` is the cross-entropy of the averaged
  prediction, and the manifest's predictions and confidences are the ensemble's.

A *loss* average, ``sum_i w_i CE(z_i, y)``, is not offered: no single output vector
``out`` makes ``CE(out, y) = sum_i w_i CE(z_i, y)`` hold for every class ``y`` (it would
need ``softmax(out)_y = prod_i p_{i,y}^{w_i}``, whose sum over ``y`` is below 1 unless the
members agree), and the model cannot know which ``y`` or target the attack will use. An
attack that wants the loss average can call :meth:`ModelEnsemble.member_logits` itself.

All members must have the same number of classes and, where they say (``.categories``),
the same class order; otherwise construction fails with a one-line ``ValueError``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from advtune.errors import UserError

__all__ = ["COMBINE_MODES", "ModelEnsemble", "ensemble_context", "load_ensemble"]

#: Accepted values of ``combine``.
COMBINE_MODES: tuple[str, ...] = ("logits", "probs")


def _member_name(model: nn.Module, i: int) -> str:
    name = getattr(model, "name", None)
    return str(name) if name else f"{type(model).__name__}[{i}]"


def _check_weights(weights: Sequence[float] | None, count: int) -> tuple[float, ...]:
    if weights is None:
        return tuple(1.0 / count for _ in range(count))
    values = list(weights)
    if len(values) != count:
        raise ValueError(f"ensemble weights need one value per model ({count}), got {len(values)}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"ensemble weights must be finite numbers >= 0, got {v!r}")
    total = math.fsum(values)
    if total <= 0:
        raise ValueError(f"ensemble weights must not all be 0, got {values}")
    return tuple(float(v) / total for v in values)


class ModelEnsemble(nn.Module):
    """A weighted ensemble of classifiers, usable wherever a model is.

    Args:
        models: Two or more (one is allowed) classifiers on ``[0, 1]`` images, each
            returning ``(N, K)`` logits with the same ``K``. They are used as given: build
            them with ``convbn="frozen"`` (:func:`load_ensemble` does) so that backward
            saves little per member.
        weights: One weight ``>= 0`` per model (normalised to sum to 1); default equal.
        combine: ``"logits"`` (weighted mean of logits) or ``"probs"`` (log of the
            weighted mean of probabilities); see the module docs for why there is no
            ``"loss"``.

    Attributes:
        members: the models (an ``nn.ModuleList``).
        member_weights: the normalised weights, a tuple of floats.
        combine, num_classes, categories (of the first member that has them), name
            (``"ensemble(a+b+c)"``), weights (a text naming every member's weights),
            convbn (the members' modes joined by ``+`` when they differ), preprocess
            (the first member's: the run prepares images once, for every member).

    Shapes:
        ``x``: ``(N, 3, H, W)`` in [0, 1] → ``(N, num_classes)``.

    Raises:
        ValueError: no models, a member that is not an ``nn.Module``, members that
            disagree on the number of classes or their order, bad weights or ``combine``.
    """

    def __init__(
        self,
        models: Sequence[nn.Module],
        *,
        weights: Sequence[float] | None = None,
        combine: str = "logits",
    ) -> None:
        super().__init__()
        models = list(models)
        if not models:
            raise ValueError("an ensemble needs at least one model, got none")
        for i, m in enumerate(models):
            if not isinstance(m, nn.Module):
                raise ValueError(
                    f"ensemble member {i} must be an nn.Module, got {type(m).__name__}"
                )
        if combine not in COMBINE_MODES:
            extra = (
                " (a loss average is no function of one output vector: see advtune.models.ensemble)"
                if combine == "loss"
                else ""
            )
            raise ValueError(f"combine must be one of {COMBINE_MODES}, got {combine!r}{extra}")
        self.member_weights = _check_weights(weights, len(models))
        self.combine = combine
        names = [_member_name(m, i) for i, m in enumerate(models)]
        counts = [getattr(m, "num_classes", None) for m in models]
        known = {c for c in counts if c is not None}
        if len(known) > 1:
            shown = ", ".join(f"{n}: {c}" for n, c in zip(names, counts, strict=True))
            raise ValueError(f"ensemble members disagree on the number of classes ({shown})")
        self.num_classes: int | None = known.pop() if known else None
        self.categories: list[str] | None = None
        first_named = None
        for name, m in zip(names, models, strict=True):
            cats = getattr(m, "categories", None)
            if cats is None:
                continue
            if self.categories is None:
                self.categories, first_named = list(cats), name
            elif list(cats) != self.categories:
                raise ValueError(
                    f"ensemble members {first_named} and {name} list their classes in a "
                    "different order (or different classes)"
                )
        self.members = nn.ModuleList(models)
        self.member_names = tuple(names)
        self.name = "ensemble(" + "+".join(names) + ")"
        self.weights = "; ".join(
            f"{n}: {getattr(m, 'weights', '?')}" for n, m in zip(names, models, strict=True)
        )
        modes = sorted({str(getattr(m, "convbn", "?")) for m in models})
        self.convbn = "+".join(modes)
        self.preprocess = getattr(models[0], "preprocess", None)

    def member_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each member's logits on ``x`` (for losses the combined output cannot express).

        Raises:
            ValueError: a member's output is not ``(N, num_classes)``.
        """
        outs: list[torch.Tensor] = []
        for name, m in zip(self.member_names, self.members, strict=True):
            z = m(x)
            if not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape[0] != x.shape[0]:
                shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
                raise ValueError(f"ensemble member {name} returned {shape}, not (N, classes)")
            if outs and z.shape[1] != outs[0].shape[1]:
                raise ValueError(
                    f"ensemble member {name} returned {z.shape[1]} classes, "
                    f"{self.member_names[0]} {outs[0].shape[1]}"
                )
            outs.append(z)
        return outs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = self.member_logits(x)
        if self.combine == "logits":
            total = outs[0] * self.member_weights[0]
            for w, z in zip(self.member_weights[1:], outs[1:], strict=True):
                total = total + w * z
            return total
        # log(sum_i w_i softmax(z_i)) = logsumexp_i(log w_i + log_softmax(z_i)): stable
        # where the probabilities underflow. A zero weight drops its member (log 0 = -inf
        # would give nan gradients through logsumexp's max shift).
        terms = [
            z.log_softmax(dim=1) + math.log(w)
            for w, z in zip(self.member_weights, outs, strict=True)
            if w > 0
        ]
        return torch.logsumexp(torch.stack(terms), dim=0)

    def describe(self) -> dict[str, Any]:
        """What identifies the ensemble for resume keys and reports: the combine rule and
        every member's name, weights, checkpoint sha256 (where one exists), random-weight
        seed, ConvBN mode and ensemble weight."""
        members = []
        for name, m, w in zip(self.member_names, self.members, self.member_weights, strict=True):
            card = getattr(m, "card", None)
            entry: dict[str, Any] = {
                "name": name,
                "weights": getattr(m, "weights", None),
                "convbn": getattr(m, "convbn", None),
                "weight": w,
            }
            digest = getattr(card, "weights_digest", None)
            if digest is not None:
                entry["weights_sha256"] = digest
            seed = getattr(card, "seed", None)
            if seed is not None:
                entry["seed"] = seed
            members.append(entry)
        return {"name": self.name, "combine": self.combine, "members": members}

    def extra_repr(self) -> str:
        weights = ", ".join(f"{w:.4g}" for w in self.member_weights)
        return f"combine={self.combine!r}, weights=({weights})"


def load_ensemble(
    names: Sequence[str],
    *,
    weights: str | os.PathLike | Sequence[str | os.PathLike] = "DEFAULT",
    member_weights: Sequence[float] | None = None,
    combine: str = "logits",
    convbn: str = "frozen",
    device: str | torch.device | None = None,
    progress: bool = True,
    seed: int = 0,
    recompute: bool = False,
) -> ModelEnsemble:
    """Load several models with :func:`advtune.models.load_model` and ensemble them.

    Args:
        names: Model names (as for ``load_model``), at least one.
        weights: One weights spec for every member, or one per member.
        member_weights: Ensemble weights (see :class:`ModelEnsemble`).
        combine: ``"logits"`` or ``"probs"``.
        convbn: ConvBN mode of every member (default ``"frozen"``: backward saves only
            what input gradients need, per member).
        device, progress, recompute: As for ``load_model``.
        seed: Member ``i`` is built with seed ``seed + i`` (only random weights use it),
            so two random copies of one architecture differ.

    Raises:
        UserError: an empty list, a weights list of the wrong length, members that
            disagree on their classes, bad ensemble weights or ``combine``; anything
            ``load_model`` raises.
    """
    from advtune.models import load_model

    names = list(names)
    if not names:
        raise UserError("an ensemble needs at least one model name, got none")
    if isinstance(weights, (str, os.PathLike)):
        per_member: list[str | os.PathLike] = [weights] * len(names)
    else:
        per_member = list(weights)
        if len(per_member) != len(names):
            raise UserError(
                f"got {len(per_member)} weights for {len(names)} ensemble models; give one "
                "for all or one per model"
            )
    # Fail on a bad rule or weights before the slow loads.
    if combine not in COMBINE_MODES:
        raise UserError(f"ensemble combine must be one of {COMBINE_MODES}, got {combine!r}")
    try:
        _check_weights(member_weights, len(names))
    except ValueError as e:
        raise UserError(str(e)) from None
    models = [
        load_model(
            name,
            weights=w,
            convbn=convbn,
            device=device,
            progress=progress,
            seed=seed + i,
            recompute=recompute,
        )
        for i, (name, w) in enumerate(zip(names, per_member, strict=True))
    ]
    try:
        return ModelEnsemble(models, weights=member_weights, combine=combine)
    except ValueError as e:
        raise UserError(str(e)) from None


def ensemble_context(
    ensemble: ModelEnsemble,
    *,
    convbn: str,
    preprocess: Any,
    amp: str | None = None,
    channels_last: bool = False,
) -> dict[str, Any]:
    """The model part of a run's resume key for an ensemble (``RunSpec.context``).

    As :func:`advtune.run.spec.model_context`, with ``"model"`` replaced by
    :meth:`ModelEnsemble.describe` (every member's name, weights, checkpoint sha256,
    seed and ensemble weight; the combine rule), so two different ensembles never mix
    in one output folder.
    """
    from advtune.run.spec import model_context

    first = getattr(ensemble.members[0], "card", None)
    if first is None:
        raise ValueError("ensemble_context needs members built by load_model (with a .card)")
    context = model_context(
        card=first, convbn=convbn, preprocess=preprocess, amp=amp, channels_last=channels_last
    )
    context["model"] = {**ensemble.describe(), "convbn": convbn}
    return context
