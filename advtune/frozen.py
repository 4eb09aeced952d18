"""The ``frozen`` ConvBN mode: a model whose autograd keeps only what input gradients need.

:func:`advtune.tune` with ``mode="frozen"`` folds every Conv→BatchNorm pair as in deploy
mode and then calls :func:`freeze`, which

* swaps the class of each supported ``torch.nn`` layer for its lean subclass from
  :mod:`advtune.lean` (conv and linear keep only the weight, piecewise-linear activations
  a 1-bit mask, MaxPool2d a uint8 argmax offset, average pools and eval-mode BatchNorm
  nothing per image). The swap keeps module identity, paths, parameters, buffers, hooks
  and ``state_dict`` keys;
* sets ``requires_grad=False`` on every parameter;
* registers a forward pre-hook on the model that raises
  :class:`~advtune.lean.FrozenParameterError` if a parameter is made to require grad
  again: a frozen model gives input gradients only, and says so rather than returning
  wrong or missing weight gradients.

Everything else (smooth activations, LayerNorm, attention, functional calls such as
``F.relu`` inside a ``forward``) runs unchanged. Outputs and input gradients equal Eval
mode's (≤1e-10 relative in float64; the tests check every torchvision BN model).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from advtune.lean import LEAN_TYPES, FrozenParameterError

__all__ = ["FreezeReport", "freeze", "freeze_report", "is_frozen"]

_REPORT_ATTR = "_advtune_freeze_report"


@dataclass
class FreezeReport:
    """What :func:`freeze` converted.

    Attributes:
        converted: ``{module path: lean class name}`` for every converted layer.
        native: ``(module path, class name)`` of modules with parameters or buffers that
            kept their native ``forward`` (they may save activations as usual).
    """

    converted: dict[str, str] = field(default_factory=dict)
    native: list[tuple[str, str]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Number of converted layers per lean class."""
        return dict(Counter(self.converted.values()))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable view."""
        return {"converted": dict(self.converted), "native": [list(n) for n in self.native]}

    def __str__(self) -> str:
        counts = ", ".join(f"{n} {cls}" for cls, n in sorted(self.counts().items()))
        lines = [f"frozen: {len(self.converted)} lean layers ({counts or 'none'})"]
        lines += [f"  native   {path or '<root>'} ({cls})" for path, cls in self.native]
        return "\n".join(lines)


def _convertible(module: nn.Module) -> type[nn.Module] | None:
    lean = LEAN_TYPES.get(type(module))  # exact type: subclasses may override forward
    if lean is None:
        return None
    if isinstance(module, nn.MaxPool2d):
        k = module.kernel_size
        kh, kw = (k, k) if isinstance(k, int) else k
        if module.return_indices or kh * kw > 256:  # offsets must fit in a uint8
            return None
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not module.track_running_stats:
        return None  # normalises with batch statistics even in eval mode
    return lean


def _guard(module: nn.Module, args: Any) -> None:
    """Forward pre-hook: refuse to record weight gradients through a frozen model."""
    if not torch.is_grad_enabled():
        return
    for p in module.parameters():
        if p.requires_grad:
            name = next(n for n, q in module.named_parameters() if q is p)
            raise FrozenParameterError(
                f"parameter {name!r} requires grad, but a frozen model (advtune mode "
                "'frozen') computes input gradients only; call model.requires_grad_(False), "
                "or convert with advtune.tune(model, 'tune') to get weight gradients"
            )


def freeze(model: nn.Module) -> FreezeReport:
    """Convert ``model`` in place to lean layers that save only what input gradients need.

    Usually reached through ``advtune.tune(model, "frozen")`` (which folds BatchNorm
    first); calling it on any model works too, folded or not. Calling it twice is
    harmless.

    Args:
        model: The module to convert (modified in place).

    Returns:
        A :class:`FreezeReport`; :func:`freeze_report` returns it again later.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    report = FreezeReport()
    seen: set[int] = set()
    for name, module in model.named_modules(remove_duplicate=False):
        if id(module) in seen:
            continue
        seen.add(id(module))
        lean = _convertible(module)
        if lean is not None:
            # Class swap (never assigning module.forward): identity, parameters,
            # buffers, hooks and state_dict keys all stay.
            module.__class__ = lean
            module.__dict__["_advtune_name"] = name
            report.converted[name] = lean.__name__
        elif not hasattr(module, "_advtune_kind") and (
            next(module.parameters(recurse=False), None) is not None
            or next(module.buffers(recurse=False), None) is not None
        ):
            report.native.append((name, type(module).__name__))
    model.requires_grad_(False)
    previous = model.__dict__.get(_REPORT_ATTR)
    if previous is None:
        model.register_forward_pre_hook(_guard)
    else:  # a second call: keep the first hook and merge the record
        previous.converted.update(report.converted)
        report = FreezeReport(previous.converted, report.native)
    model.__dict__[_REPORT_ATTR] = report
    return report


def freeze_report(model: nn.Module) -> FreezeReport | None:
    """The :class:`FreezeReport` of a model converted by :func:`freeze` (else ``None``)."""
    return model.__dict__.get(_REPORT_ATTR)


def is_frozen(model: nn.Module) -> bool:
    """Whether :func:`freeze` converted ``model``."""
    return _REPORT_ATTR in model.__dict__
