"""ConvBN modes: find Conv→BatchNorm pairs with ``torch.fx`` and fold them.

Tune mode is the method of "Efficient ConvBN Blocks for Transfer Learning and Beyond"
(ICLR 2024): with BatchNorm in eval mode, ``bn(conv(x))`` equals one convolution with

    W' = W · γ/√(σ² + ε)        b' = β + (b − μ) · γ/√(σ² + ε)

computed on the fly in every forward. The outputs and all gradients (input, weight, γ, β)
equal Eval mode's, but autograd no longer keeps the conv output alive for the BN backward.

Modes of :func:`tune`:

``"eval"``
    The model unchanged: the reference.
``"tune"``
    Fold on the fly in every forward. Exact even if weights or statistics change later;
    weight, γ and β gradients are correct. A BN in training mode falls back to conv→BN.
    Module paths and ``state_dict`` keys stay the same.
``"deploy"``
    Fold once into a plain conv with bias; the BN becomes an identity. An inference
    snapshot: the BN parameters leave the ``state_dict``.
``"frozen"``
    Deploy folding, then layers that save only what *input* gradients need (see
    :mod:`advtune.frozen`). Every parameter stops requiring gradients.

Implementation notes (why it looks like this):

* Pairs are found on an ``torch.fx`` trace of the whole model. Where tracing fails, each
  child is traced on its own (recursively) and the failure is recorded; modules reached
  only by untraced code are never folded.
* A pair is folded only when the conv and the BN are each called once, the conv output
  feeds the BN and nothing else, and the BN tracks running statistics.
* Converted modules keep their identity: their class is swapped for a subclass that
  adds the folding to ``forward`` (we never assign to ``module.forward``). The conv keeps
  a plain (unregistered) reference to its BN, so no parameter appears twice in the
  ``state_dict`` and ``copy.deepcopy``/``torch.save`` keep the link.
"""

from __future__ import annotations

import copy
import sys
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from advtune import _swap
from advtune._compat import autocast_enabled
from advtune._fx import TRACE_LOCK
from advtune.errors import UserError, suggest

__all__ = [
    "MODES",
    "ConvBNReport",
    "FoldedPair",
    "SkippedCandidate",
    "UntracedModule",
    "carry_report",
    "convbn_report",
    "fold_conv_bn",
    "tune",
]

Mode = Literal["eval", "tune", "deploy", "frozen"]
MODES: tuple[str, ...] = ("eval", "tune", "deploy", "frozen")

_CONV_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
_TRANSPOSED_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
# Input rank each BN class accepts; the conv output rank must be among them.
_BN_RANKS: dict[type[nn.Module], tuple[int, ...]] = {
    nn.BatchNorm1d: (2, 3),
    nn.BatchNorm2d: (4,),
    nn.BatchNorm3d: (5,),
    nn.SyncBatchNorm: (3, 4, 5),
}


def _norm_act_types() -> tuple[type[nn.Module], ...]:
    """timm's BatchNorm + activation modules (``BatchNormAct2d`` and friends), if loaded.

    They are BatchNorms whose ``forward`` also applies ``drop`` and ``act``: the BN part
    folds into the conv, ``act(drop(x))`` stays. Looked up in ``sys.modules`` so that
    advtune never imports timm itself (a model holding them has imported it).
    """
    module = sys.modules.get("timm.layers.norm_act")
    if module is None:
        return ()
    names = ("BatchNormAct2d", "SyncBatchNormAct")
    return tuple(t for n in names if isinstance(t := getattr(module, n, None), type))


def _is_norm_act(module: nn.Module) -> bool:
    types = _norm_act_types()
    return bool(types) and type(module) in types


# --------------------------------------------------------------------------- report


@dataclass(frozen=True)
class FoldedPair:
    """A Conv→BN pair that was (or would be) folded."""

    conv: str
    bn: str
    conv_type: str


@dataclass(frozen=True)
class SkippedCandidate:
    """A BatchNorm (or conv) that was left alone, and why."""

    module: str
    reason: str


@dataclass(frozen=True)
class UntracedModule:
    """A module whose ``forward`` could not be traced by ``torch.fx``."""

    module: str
    error: str


@dataclass
class ConvBNReport:
    """What :func:`tune` folded and what it skipped.

    Attributes:
        mode: The mode the model was converted with (``"eval"`` when unconverted).
        folded: Pairs folded (or, for an unconverted model, foldable).
        skipped: Candidates left alone with the reason for each.
        untraced: Modules ``torch.fx`` could not trace; their children were traced instead.
    """

    mode: str
    folded: list[FoldedPair] = field(default_factory=list)
    skipped: list[SkippedCandidate] = field(default_factory=list)
    untraced: list[UntracedModule] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable view (used in ``report.json``)."""
        return {
            "mode": self.mode,
            "folded": [vars(p) for p in self.folded],
            "skipped": [vars(s) for s in self.skipped],
            "untraced": [vars(u) for u in self.untraced],
        }

    def __str__(self) -> str:
        verb = "foldable" if self.mode == "eval" else "folded"
        lines = [
            f"ConvBN ({self.mode} mode): {len(self.folded)} pairs {verb}, "
            f"{len(self.skipped)} skipped, {len(self.untraced)} untraced modules"
        ]
        lines += [f"  {verb:8s} {p.conv} -> {p.bn}" for p in self.folded]
        lines += [f"  skipped  {s.module}: {s.reason}" for s in self.skipped]
        lines += [f"  untraced {u.module or '<root>'}: {u.error}" for u in self.untraced]
        return "\n".join(lines)


# --------------------------------------------------------------------------- folding


def _fold_dtype(weight: torch.Tensor) -> torch.dtype:
    # Fold in float32 even for half/bf16 weights; float64 stays float64 (reference runs).
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def fold_conv_bn(conv: _ConvNd, bn: _BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode BatchNorm into the preceding convolution.

    Differentiable: gradients flow to the conv weight/bias and to γ, β.

    Args:
        conv: A ``torch.nn`` convolution (transposed or not) whose output feeds ``bn``.
        bn: A BatchNorm tracking running statistics, with ``conv.out_channels`` features.

    Returns:
        ``(weight, bias)``: the folded weight, shaped like ``conv.weight``, and the bias
        of shape ``(out_channels,)``, both in float32 (float64 if the conv weight is).
    """
    weight = conv.weight
    dtype = _fold_dtype(weight)
    device_type = weight.device.type
    if autocast_enabled(device_type):
        with torch.autocast(device_type=device_type, enabled=False):
            return _fold(conv, bn, dtype)
    return _fold(conv, bn, dtype)


def _fold(conv: _ConvNd, bn: _BatchNorm, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    assert bn.running_var is not None and bn.running_mean is not None  # checked at pairing
    mean = bn.running_mean.to(dtype)
    scale = torch.rsqrt(bn.running_var.to(dtype) + bn.eps)
    if bn.weight is not None:
        scale = bn.weight.to(dtype) * scale
    bias = -mean * scale
    if bn.bias is not None:
        bias = bn.bias.to(dtype) + bias
    if conv.bias is not None:
        bias = bias + conv.bias.to(dtype) * scale
    weight = conv.weight.to(dtype)
    spatial = (1,) * (weight.dim() - 2)
    if isinstance(conv, _TRANSPOSED_TYPES):
        # Transposed weights are (in, out/groups, *k): output channel g*(out/groups)+j
        # lives at group block g, column j.
        g = conv.groups
        in_ch, out_per_group = weight.shape[0], weight.shape[1]
        w = weight.reshape(g, in_ch // g, out_per_group, *weight.shape[2:])
        w = w * scale.reshape(g, 1, out_per_group, *spatial)
        weight = w.reshape(weight.shape)
    else:
        weight = weight * scale.reshape(-1, 1, *spatial)
    return weight, bias


class _TuneConvMixin(_swap.Mixin):
    """Conv subclass mix-in: folds the paired BN into the weight when BN is in eval mode."""

    _advtune_kind = "tune-conv"
    _advtune_prefix = "Tune"

    def forward(self, input: torch.Tensor, *args: Any) -> torch.Tensor:
        bn: _BatchNorm = self.__dict__["_advtune_bn"]
        if bn.training:
            # BN normalises with batch statistics: fold is not valid, run conv -> BN.
            return super().forward(input, *args)  # type: ignore[misc]
        weight, bias = fold_conv_bn(self, bn)  # type: ignore[arg-type]
        if not autocast_enabled(input.device.type):
            # Under autocast the conv casts its operands itself; otherwise match the input.
            weight, bias = weight.to(input.dtype), bias.to(input.dtype)
        return _run_conv(self, input, weight, bias)  # type: ignore[arg-type]


class _FoldedBNMixin(_swap.Mixin):
    """BN subclass mix-in: the identity in eval mode (its conv already applied it); a
    BN + activation module (timm's ``BatchNormAct2d``) keeps its ``act(drop(x))``."""

    _advtune_kind = "tune-bn"
    _advtune_prefix = "Folded"

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.training:  # type: ignore[attr-defined]
            return super().forward(input)  # type: ignore[misc]
        if isinstance(self, _norm_act_types()):
            return self.act(self.drop(input))  # type: ignore[attr-defined,operator]
        return input


class DeployedBatchNorm(nn.Identity):
    """Stands where a BatchNorm was after ``deploy``/``frozen`` folding (an identity).

    Args:
        folded_into: Qualified name of the conv that absorbed this BN.
    """

    def __init__(self, folded_into: str) -> None:
        super().__init__()
        self.folded_into = folded_into

    def extra_repr(self) -> str:
        return f"folded_into={self.folded_into!r}"


class DeployedBatchNormAct(nn.Module):
    """Stands where a BatchNorm + activation module (timm's ``BatchNormAct2d``) was after
    ``deploy``/``frozen`` folding: ``act(drop(x))``, the BN part being in the conv.

    Args:
        folded_into: Qualified name of the conv that absorbed the BN.
        drop, act: The original module's ``drop`` and ``act`` children.
    """

    def __init__(self, folded_into: str, drop: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.folded_into = folded_into
        self.drop = drop
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))

    def extra_repr(self) -> str:
        return f"folded_into={self.folded_into!r}"


def _run_conv(
    conv: _ConvNd, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    if isinstance(conv, _TRANSPOSED_TYPES):
        fn = {1: nn.functional.conv_transpose1d, 2: nn.functional.conv_transpose2d}.get(
            weight.dim() - 2, nn.functional.conv_transpose3d
        )
        return fn(
            input,
            weight,
            bias,
            conv.stride,
            conv.padding,  # type: ignore[arg-type]
            conv.output_padding,
            conv.groups,
            conv.dilation,
        )
    # _conv_forward handles padding_mode ("reflect", "circular", ...).
    return conv._conv_forward(input, weight, bias)  # type: ignore[operator]


_swap.register(DeployedBatchNorm, "deployed-bn")
_swap.register(DeployedBatchNormAct, "deployed-bn")


# --------------------------------------------------------------------------- detection


class _LeafTracer(torch.fx.Tracer):
    """Treats advtune's converted modules as leaves, like the ``torch.nn`` ones."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (
            _swap.is_advtune(m)
            or _is_norm_act(m)
            or super().is_leaf_module(m, module_qualified_name)
        )


@dataclass
class _Analysis:
    pairs: list[FoldedPair]
    skipped: list[SkippedCandidate]
    untraced: list[UntracedModule]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else (prefix or name)


def _trace_graphs(
    module: nn.Module, prefix: str, out: list[tuple[str, nn.Module, torch.fx.Graph]], untraced
) -> None:
    try:
        with TRACE_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = _LeafTracer().trace(module)
    except Exception as exc:  # any failure means "trace the children instead"
        first_line = (str(exc).strip().splitlines() or [""])[0]
        untraced.append(UntracedModule(prefix, f"{type(exc).__name__}: {first_line}"[:200]))
        for name, child in module.named_children():
            if next(child.children(), None) is not None:  # a leaf cannot hold a pair
                _trace_graphs(child, _join(prefix, name), out, untraced)
        return
    out.append((prefix, module, graph))


def _supported_conv(module: nn.Module) -> bool:
    # Exact torch.nn conv behaviour only: a subclass overriding forward (weight
    # standardisation, say) would make the fold wrong.
    return isinstance(module, _CONV_TYPES) and type(module).forward in {
        t.forward for t in _CONV_TYPES
    }


def _bn_base(module: nn.Module) -> type | None:
    """The ``torch.nn`` BatchNorm class ``module`` behaves as, or ``None`` if unsupported.

    A subclass that overrides ``forward`` is unsupported, except timm's BN + activation
    modules, whose BN part is exactly their base class's.
    """
    norm_act = _is_norm_act(module)
    for base in _BN_RANKS:
        if isinstance(module, base) and (norm_act or type(module).forward is base.forward):
            return base
    return None


def _analyze(model: nn.Module) -> _Analysis:
    graphs: list[tuple[str, nn.Module, torch.fx.Graph]] = []
    untraced: list[UntracedModule] = []
    _trace_graphs(model, "", graphs, untraced)

    calls: Counter[int] = Counter()
    bn_nodes: list[tuple[str, nn.Module, torch.fx.Node, str]] = []
    for prefix, root, graph in graphs:
        for node in graph.nodes:
            if node.op != "call_module":
                continue
            sub = root.get_submodule(node.target)
            calls[id(sub)] += 1
            if isinstance(sub, _BatchNorm):
                bn_nodes.append((prefix, root, node, _join(prefix, node.target)))

    pairs: list[FoldedPair] = []
    skipped: list[SkippedCandidate] = []
    seen_bn: set[int] = set()
    used_conv: set[int] = set()
    for prefix, root, node, bn_name in bn_nodes:
        bn = root.get_submodule(node.target)  # type: ignore[arg-type]
        if id(bn) in seen_bn:
            continue
        seen_bn.add(id(bn))
        reason, conv_name, conv = _check_pair(prefix, root, node, bn, calls, used_conv)
        if reason:
            skipped.append(SkippedCandidate(bn_name, reason))
            continue
        used_conv.add(id(conv))
        pairs.append(FoldedPair(conv_name, bn_name, type(conv).__name__))

    # Every BN the traces never reached is reported too: nothing is dropped silently.
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm) and id(module) not in seen_bn:
            seen_bn.add(id(module))
            skipped.append(
                SkippedCandidate(name, "not reached by any fx trace (called from untraced code)")
            )
    return _Analysis(pairs, skipped, untraced)


def _check_pair(prefix, root, node, bn, calls, used_conv) -> tuple[str, str, nn.Module | None]:
    """Return ``(reason, conv_name, conv)``; ``reason`` is empty when the pair folds."""
    base = _bn_base(bn)
    if base is None:
        return f"unsupported BatchNorm type {type(bn).__name__}", "", None
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        return "BN does not track running statistics (track_running_stats=False)", "", None
    if calls[id(bn)] != 1:
        return f"BN is applied {calls[id(bn)]} times", "", None
    if len(node.args) != 1 or node.kwargs:
        return "BN is called with extra arguments", "", None
    src = node.args[0]
    if not isinstance(src, torch.fx.Node) or src.op != "call_module":
        what = getattr(src, "target", src)
        name = getattr(what, "__name__", what)
        return f"input is not a conv output (comes from {name})", "", None
    conv = root.get_submodule(src.target)
    conv_name = _join(prefix, src.target)  # type: ignore[arg-type]
    if not _supported_conv(conv):
        return f"input comes from {conv_name} ({type(conv).__name__}), not a conv", "", None
    if calls[id(conv)] != 1:
        return f"conv {conv_name} is used {calls[id(conv)]} times", conv_name, None
    if id(conv) in used_conv:
        return f"conv {conv_name} already folded with another BN", conv_name, None
    users = [u.name for u in src.users if u is not node]
    if users:
        return f"conv {conv_name} output is also used by {', '.join(users)}", conv_name, None
    if len(src.args) != 1 or src.kwargs:
        return f"conv {conv_name} is called with extra arguments", conv_name, None
    if conv.out_channels != bn.num_features:
        return (
            f"conv {conv_name} has {conv.out_channels} output channels, BN {bn.num_features}",
            conv_name,
            None,
        )
    rank = conv.weight.dim()  # conv output rank = batch + channels + spatial = weight rank
    if rank not in _BN_RANKS[base]:
        return f"conv {conv_name} output rank {rank} does not suit {base.__name__}", "", None
    return "", conv_name, conv


# --------------------------------------------------------------------------- transform

_REPORT_ATTR = "_advtune_convbn_report"


def _modules_by_id(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """id(module) -> [(parent, attribute name)] for every place it is registered."""
    places: dict[int, list[tuple[nn.Module, str]]] = defaultdict(list)
    for parent in model.modules():
        for name, child in parent._modules.items():
            if child is not None:
                places[id(child)].append((parent, name))
    return places


def check_mode(
    mode: object, *, recompute: bool = False, names: tuple[str, str] = ("mode", "recompute")
) -> None:
    """Check a ConvBN mode and the recompute flag: the one check behind :func:`tune`,
    ``advtune.models.load_model`` and the CLI's ``--convbn`` / ``--recompute``.

    Args:
        mode: The ConvBN mode.
        recompute: Whether recomputation was asked for.
        names: What the caller calls the two (the CLI: ``("--convbn", "--recompute")``),
            for the message.

    Raises:
        advtune.errors.UserError: (a ``ValueError``) an unknown mode, with close matches;
            ``recompute`` with a mode other than ``"frozen"``.
    """
    if mode not in MODES:
        raise UserError(suggest(str(mode), MODES, what="ConvBN mode"))
    if recompute and mode != "frozen":
        raise UserError(f"{names[1]} needs {names[0]} 'frozen', got {mode!r}")


def tune(
    model: nn.Module, mode: Mode = "tune", *, inplace: bool = False, recompute: bool = False
) -> nn.Module:
    """Convert every foldable Conv→BatchNorm block of ``model`` to the given ConvBN mode.

    Args:
        model: Any ``nn.Module`` (typically a classifier). Left untouched unless
            ``inplace=True``.
        mode: ``"eval"``, ``"tune"``, ``"deploy"`` or ``"frozen"`` (see module docs).
        inplace: Convert ``model`` itself instead of a deep copy.
        recompute: ``"frozen"`` only: residual blocks keep only their input and run
            again in backward (see :func:`advtune.frozen.freeze`).

    Returns:
        The converted model. :func:`convbn_report` says what was folded and skipped.

    Raises:
        ValueError: Unknown ``mode``, ``recompute`` outside frozen mode
            (:class:`~advtune.errors.UserError`, from :func:`check_mode`), or ``model`` was
            already converted.
    """
    check_mode(mode, recompute=recompute)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    previous = getattr(model, _REPORT_ATTR, None)
    if previous is not None or any(_swap.is_advtune(m) for m in model.modules()):
        done = previous.mode if previous is not None else "unknown"
        raise ValueError(
            f"model was already converted by advtune.tune (mode={done!r}); convert the "
            "original model instead"
        )
    if not inplace:
        model = copy.deepcopy(model)
    analysis = _analyze(model)
    report = ConvBNReport(mode, list(analysis.pairs), analysis.skipped, analysis.untraced)
    if mode == "tune":
        _apply_tune(model, analysis.pairs)
    elif mode in ("deploy", "frozen"):
        _apply_deploy(model, analysis.pairs)
    if mode == "frozen":
        from advtune.frozen import freeze  # frozen builds on this module

        freeze(model, recompute=recompute)
    if mode != "eval":  # "eval" leaves the model exactly as it was
        model.__dict__[_REPORT_ATTR] = report
    return model


def _apply_tune(model: nn.Module, pairs: list[FoldedPair]) -> None:
    for pair in pairs:
        conv = model.get_submodule(pair.conv)
        bn = model.get_submodule(pair.bn)
        # Class swap keeps identity, parameters, buffers, hooks and state_dict keys.
        conv.__class__ = _swap.mixed_class(_TuneConvMixin, type(conv))
        # A norm-act module keeps its own class as the base (its act/drop and training
        # forward); a plain BN is based on its torch.nn class.
        base = type(bn) if _is_norm_act(bn) else _bn_base(bn)
        bn.__class__ = _swap.mixed_class(_FoldedBNMixin, base)  # type: ignore[arg-type]
        conv.__dict__["_advtune_bn"] = bn


@torch.no_grad()
def _apply_deploy(model: nn.Module, pairs: list[FoldedPair]) -> None:
    places = _modules_by_id(model)
    for pair in pairs:
        conv = model.get_submodule(pair.conv)
        bn = model.get_submodule(pair.bn)
        weight, bias = fold_conv_bn(conv, bn)  # type: ignore[arg-type]
        dtype = conv.weight.dtype
        conv.weight = nn.Parameter(weight.to(dtype), requires_grad=conv.weight.requires_grad)  # type: ignore[arg-type]
        conv.bias = nn.Parameter(bias.to(dtype), requires_grad=conv.weight.requires_grad)  # type: ignore[arg-type]
        if _is_norm_act(bn):
            replacement: nn.Module = DeployedBatchNormAct(pair.conv, bn.drop, bn.act)  # type: ignore[arg-type]
        else:
            replacement = DeployedBatchNorm(pair.conv)
        for parent, name in places[id(bn)]:
            setattr(parent, name, replacement)


def convbn_report(model: nn.Module) -> ConvBNReport:
    """Say which Conv→BN pairs are folded in ``model`` and which candidates were skipped.

    For a model returned by :func:`tune` this is the record of the conversion; for any
    other model it is what ``tune`` would fold (``mode="eval"``), computed without
    changing the model.
    """
    report = getattr(model, _REPORT_ATTR, None)
    if report is not None:
        return report
    analysis = _analyze(model)
    return ConvBNReport("eval", analysis.pairs, analysis.skipped, analysis.untraced)


def carry_report(source: nn.Module, wrapper: nn.Module) -> None:
    """Record ``source``'s conversion report (from :func:`tune`) on ``wrapper``, a module
    around it: :func:`convbn_report` of the wrapper then describes the conversion and
    :func:`tune` refuses to convert the wrapper again. No-op for an unconverted source."""
    report = getattr(source, _REPORT_ATTR, None)
    if report is not None:
        wrapper.__dict__[_REPORT_ATTR] = report
