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

* rewrites functional calls inside a module's own ``forward`` (``F.relu``,
  ``torch.relu``, ``x.relu()``, ``F.relu6``, ``F.leaky_relu``, ``F.hardtanh``,
  ``F.hardsigmoid``, ``F.max_pool2d``, ``F.avg_pool2d``, global ``F.adaptive_avg_pool2d``,
  ``F.conv1d/2d/3d``, ``F.linear``) to the lean functions of :mod:`advtune.lean` (see
  ``_LeanForwardMixin``). Inception, GoogLeNet, the hand-written ``F.relu(self.bn(x))``
  blocks of many robustness-benchmark models and conv subclasses that compute their
  weight (weight standardisation) save masks and weights instead of activations too.

Everything else (smooth activations, LayerNorm, attention, elementwise products)
runs unchanged, unless ``recompute=True``: then each residual block of a known type
(:data:`RECOMPUTE_BLOCKS`) keeps only its input and runs again in backward. Outputs and input gradients equal Eval mode's (≤1e-10 relative in
float64; the tests check every torchvision classification model that fits in RAM).
"""

from __future__ import annotations

import linecache
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from advtune import _swap, lean
from advtune._compat import autocast_dtype, autocast_enabled
from advtune._fx import TRACE_LOCK
from advtune.lean import FrozenParameterError

__all__ = ["RECOMPUTE_BLOCKS", "FreezeReport", "freeze", "freeze_report", "is_frozen"]

_REPORT_ATTR = "_advtune_freeze_report"


@dataclass
class FreezeReport:
    """What :func:`freeze` converted.

    Attributes:
        converted: ``{module path: lean class name}`` for every converted layer.
        native: ``(module path, class name)`` of modules with parameters or buffers that
            kept their native ``forward`` (they may save activations as usual).
        rewritten: ``{module path: names of the functional calls}`` of modules whose own
            ``forward`` calls ``F.relu``, ``F.max_pool2d``, ... and now calls the lean
            functions instead.
        recomputed: paths of the residual blocks that keep only their input and run again
            in backward (``freeze(..., recompute=True)``).
    """

    converted: dict[str, str] = field(default_factory=dict)
    native: list[tuple[str, str]] = field(default_factory=list)
    rewritten: dict[str, list[str]] = field(default_factory=dict)
    recomputed: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Number of converted layers per lean class."""
        return dict(Counter(self.converted.values()))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable view."""
        return {
            "converted": dict(self.converted),
            "native": [list(n) for n in self.native],
            "rewritten": {k: list(v) for k, v in self.rewritten.items()},
            "recomputed": list(self.recomputed),
        }

    def __str__(self) -> str:
        counts = ", ".join(f"{n} {cls}" for cls, n in sorted(self.counts().items()))
        lines = [f"frozen: {len(self.converted)} lean layers ({counts or 'none'})"]
        if self.rewritten:
            calls = Counter(c for names in self.rewritten.values() for c in names)
            text = ", ".join(f"{n} {c}" for c, n in sorted(calls.items()))
            lines.append(f"  {len(self.rewritten)} modules with lean functional calls ({text})")
        if self.recomputed:
            lines.append(f"  {len(self.recomputed)} blocks recomputed in backward")
        lines += [f"  native   {path or '<root>'} ({cls})" for path, cls in self.native]
        return "\n".join(lines)


def _convertible(module: nn.Module) -> type[nn.Module] | None:
    lean = _swap.replacement(module)  # exact type: subclasses may override forward
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


# --------------------------------------------------------------------------- functional calls

#: Functional call -> lean function with the same signature (same result, leaner autograd).
_FUNCTIONS: dict[Callable[..., Any], Callable[..., Any]] = {
    F.relu: lean.relu,
    torch.relu: lean.relu,
    F.relu_: lean.relu_,
    torch.relu_: lean.relu_,
    F.relu6: lean.relu6,
    F.leaky_relu: lean.leaky_relu,
    F.leaky_relu_: lean.leaky_relu_,
    F.hardtanh: lean.hardtanh,
    F.hardtanh_: lean.hardtanh_,
    F.hardsigmoid: lean.hardsigmoid,
    F.max_pool2d: lean.max_pool2d,
    F.avg_pool2d: lean.avg_pool2d,
    F.adaptive_avg_pool2d: lean.adaptive_avg_pool2d,
    F.conv1d: lean.conv1d,
    F.conv2d: lean.conv2d,
    F.conv3d: lean.conv3d,
    F.linear: lean.linear,
}
#: Tensor methods (``x.relu()``) -> lean function taking the tensor first.
_METHODS: dict[str, Callable[..., Any]] = {"relu": lean.relu, "relu_": lean.relu_}

# Generated forwards, shared by modules whose code and globals are the same (the 94
# BasicConv2d blocks of Inception-v3 share one function, and so one dynamo cache entry).
_FORWARDS: dict[tuple[str, tuple[tuple[str, int], ...]], Callable[..., Any]] = {}


class _OwnForwardTracer(torch.fx.Tracer):
    """Traces one module's own ``forward``: every submodule call stays a call."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def _may_rewrite(module: nn.Module) -> bool:
    cls = type(module)
    # torch.nn layers are swapped by class (or left alone); advtune's own are lean already.
    return (
        not _swap.is_advtune(module)
        and not cls.__module__.startswith(("torch.", "advtune."))
        and cls.forward is not nn.Module.forward
    )


def _trace_own_forward(module: nn.Module) -> torch.fx.Graph | None:
    """fx graph of ``module.forward`` in eval mode, or ``None`` if it cannot be traced."""
    modes = [(m, m.training) for m in module.modules()]
    before = (set(module.__dict__), set(module._parameters), set(module._buffers))
    cls = module.__class__
    module.__class__ = _swap.native_class(module)  # fx traces type(module).forward
    try:
        for m, _ in modes:  # trace the eval-mode code path (the only one used later)
            m.training = False
        with TRACE_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = _OwnForwardTracer().trace(module)
    except Exception:  # untraceable code (data-dependent control flow, ...): stays native
        return None
    finally:
        module.__class__ = cls
        for m, training in modes:
            m.training = training
        # Tracing stores tensors created in forward as attributes of the module: undo.
        added = set(module.__dict__) - before[0]
        added |= set(module._parameters) - before[1]
        added |= set(module._buffers) - before[2]
        for name in added:
            module.__dict__.pop(name, None)
            module._parameters.pop(name, None)
            module._buffers.pop(name, None)
    if added:  # the graph would read constants that are gone
        return None
    return graph


def _rewrite_calls(graph: torch.fx.Graph) -> list[str]:
    """Point the graph's supported functional calls at the lean functions (in place)."""
    names = []
    for node in graph.nodes:
        if node.op == "call_function":
            try:
                target = _FUNCTIONS.get(node.target)
            except TypeError:  # an unhashable callable
                target = None
        elif node.op == "call_method" and isinstance(node.target, str):
            target = _METHODS.get(node.target)
        else:
            target = None
        if target is not None:
            node.op, node.target = "call_function", target
            names.append(target.__name__)
    return names


def _compile_forward(graph: torch.fx.Graph, cls: type) -> Callable[..., Any]:
    graph.lint()
    code = graph.python_code(root_module="self")
    key = (code.src, tuple(sorted((k, id(v)) for k, v in code.globals.items())))
    fn = _FORWARDS.get(key)
    if fn is None:
        filename = f"<advtune frozen {cls.__module__}.{cls.__qualname__}.forward #{len(_FORWARDS)}>"
        namespace = dict(code.globals)
        exec(compile(code.src, filename, "exec"), namespace)  # fx-generated, as GraphModule does
        linecache.cache[filename] = (len(code.src), None, code.src.splitlines(True), filename)
        fn = _FORWARDS[key] = namespace["forward"]
    return fn


def _install_lean_forward(module: nn.Module) -> list[str]:
    """Generate a lean ``forward`` for ``module``; returns the rewritten calls ([] if none)."""
    graph = _trace_own_forward(module)
    names = _rewrite_calls(graph) if graph is not None else []
    if names and graph is not None:
        module.__dict__["_advtune_forward"] = _compile_forward(graph, _swap.native_class(module))
    return names


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _leaves(v)]
    if isinstance(value, dict):
        return [t for k in sorted(value, key=str) for t in _leaves(value[k])]
    return [value]


def _clone_tensors(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_clone_tensors(v) for v in value)
    if isinstance(value, list):
        return [_clone_tensors(v) for v in value]
    if isinstance(value, dict):
        return {k: _clone_tensors(v) for k, v in value.items()}
    return value


def _agree(out: Any, ref: Any) -> bool:
    """Whether two forward results match (up to a few ulps: GPU kernels may differ)."""
    a, b = _leaves(out), _leaves(ref)
    if len(a) != len(b):
        return False
    eps = torch.finfo(_least_precise(a, b)).eps
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if not isinstance(x, torch.Tensor):
            if type(x) is not type(y):
                return False
            continue
        if x.shape != y.shape or x.dtype != y.dtype:
            return False
        if not x.is_floating_point():
            if not torch.equal(x, y):
                return False
            continue
        x, y = x.detach().double(), y.detach().double()
        if not torch.equal(x.isnan(), y.isnan()):
            return False
        x, y = x.nan_to_num(), y.nan_to_num()
        tol = 16 * eps * float(y.abs().max().clamp_min(1e-30))
        if y.numel() and float((x - y).abs().max()) > tol:
            return False
    return True


def _least_precise(a: list[Any], b: list[Any]) -> torch.dtype:
    """The least precise floating dtype among the compared tensors."""
    dtypes = [t.dtype for t in a + b if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return max(dtypes, key=lambda d: torch.finfo(d).eps, default=torch.float64)


class _LeanForwardMixin(_swap.Mixin):
    """Runs the ``forward`` :func:`freeze` generated, with lean functional calls.

    In training mode (or if no forward was generated) the class's own ``forward`` runs.
    The first eval-mode call first runs both forwards on copies of the inputs (without
    autograd) and compares: tracing bakes in Python-level decisions (an ``isinstance`` on
    an input, say), and a rewrite that disagrees is dropped with a warning rather than
    trusted.
    """

    _advtune_kind = "lean-forward"

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        fn = self.__dict__.get("_advtune_forward")
        if fn is None or self.training:  # type: ignore[attr-defined]
            return super().forward(*args, **kwargs)  # type: ignore[misc]
        if self.__dict__.get("_advtune_checked"):
            return fn(self, *args, **kwargs)
        return self._advtune_checked_call(fn, args, kwargs)

    def _advtune_checked_call(self, fn: Callable[..., Any], args: Any, kwargs: Any) -> Any:
        native = super().forward  # type: ignore[misc]
        # Both on copies and without autograd: the submodules then take the same code
        # path in both runs (lean layers run natively), so a faithful rewrite gives the
        # same numbers, and the caller's tensors are untouched until the verdict.
        with torch.no_grad():
            copies = _clone_tensors((args, kwargs))
            ref = native(*copies[0], **copies[1])
            copies = _clone_tensors((args, kwargs))
            test = fn(self, *copies[0], **copies[1])
        self.__dict__["_advtune_checked"] = True
        if _agree(test, ref):
            return fn(self, *args, **kwargs)
        del self.__dict__["_advtune_forward"]
        where = self.__dict__.get("_advtune_name") or type(self).__name__
        warnings.warn(
            f"advtune.freeze: the lean forward generated for {where!r} "
            f"({_swap.native_class(self).__name__}) disagrees with its own forward on the "
            "first call (it may branch on input types or state); it runs its own forward",
            RuntimeWarning,
            stacklevel=2,
        )
        return native(*args, **kwargs)

    def _advtune_state(self) -> dict[str, Any]:
        # The forward is generated code: pickle (and deepcopy) the state without it; it
        # is generated again on load.
        return {k: v for k, v in self.__dict__.items() if k != "_advtune_forward"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        nn.Module.__setstate__(self, state)  # type: ignore[arg-type]
        _install_lean_forward(self)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- recomputation

# Residual blocks whose forward takes one tensor and returns one, by ``module.qualname``
# of their exact class (no import of torchvision or timm needed to match them).
RECOMPUTE_BLOCKS: frozenset[str] = frozenset(
    {
        "torchvision.models.vision_transformer.EncoderBlock",
        "torchvision.models.swin_transformer.SwinTransformerBlock",
        "torchvision.models.swin_transformer.SwinTransformerBlockV2",
        "torchvision.models.convnext.CNBlock",
        "torchvision.models.efficientnet.MBConv",
        "torchvision.models.efficientnet.FusedMBConv",
        "torchvision.models.mobilenetv2.InvertedResidual",
        "torchvision.models.mobilenetv3.InvertedResidual",
        "torchvision.models.regnet.ResBottleneckBlock",
        "timm.models.vision_transformer.Block",
        "timm.models.convnext.ConvNeXtBlock",
        "timm.models._efficientnet_blocks.InvertedResidual",
        "timm.models._efficientnet_blocks.DepthwiseSeparableConv",
        # Hugging Face: one-tensor subclasses of transformers' ViT/DeiT/Swin layers
        # (advtune.models.hf_blocks), and ConvNeXt's layer as it is.
        "advtune.models.hf_blocks.ViTLayer",
        "advtune.models.hf_blocks.DeiTLayer",
        "advtune.models.hf_blocks.SwinLayer",
        "transformers.models.convnext.modeling_convnext.ConvNextLayer",
    }
)


def _recomputable(module: nn.Module) -> bool:
    cls = type(module)  # exact class: a subclass may change forward's signature
    return f"{cls.__module__}.{cls.__qualname__}" in RECOMPUTE_BLOCKS


class _Recompute(torch.autograd.Function):
    """``block(x)`` that saves only ``x`` and runs the block again in backward.

    A custom Function rather than ``torch.utils.checkpoint``: the reentrant checkpoint
    refuses ``torch.autograd.grad`` (which the attacks call), and the non-reentrant one
    keeps ``x`` alive outside autograd's saved tensors, where ``saved_tensors_hooks``
    (and so ``advtune bench``) cannot see it. Weight gradients are never needed: the
    block's parameters do not require grad (checked by the caller).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, block: _RecomputeMixin) -> torch.Tensor:  # type: ignore[override]
        ctx.block = block
        device = x.device.type
        # Backward runs outside the caller's autocast region: record it to redo it.
        ctx.autocast = (device, autocast_enabled(device), autocast_dtype(device))
        ctx.save_for_backward(x)
        return block._advtune_plain_forward(x)  # grad mode is off inside forward

    @staticmethod
    @torch.autograd.function.once_differentiable  # double backward raises, never wrong
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        device, enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
            inner = x.detach().requires_grad_(True)
            out = ctx.block._advtune_plain_forward(inner)
        (gx,) = torch.autograd.grad(out, inner, grad)
        return gx, None


class _RecomputeMixin(_swap.Mixin):
    """Eval-mode gradient calls keep only the block's input and recompute it in backward.

    Train mode, ``torch.no_grad()``, an input that does not require grad, any other call
    signature or a parameter that requires grad all run the block's own ``forward``.
    """

    _advtune_kind = "recompute"

    def _advtune_plain_forward(self, x: torch.Tensor) -> Any:
        return super().forward(x)  # type: ignore[misc]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if (
            self.training  # type: ignore[attr-defined]
            or kwargs
            or len(args) != 1
            or not isinstance(args[0], torch.Tensor)
            or not args[0].requires_grad
            or not torch.is_grad_enabled()
            or any(p.requires_grad for p in self.parameters())  # type: ignore[attr-defined]
        ):
            return super().forward(*args, **kwargs)  # type: ignore[misc]
        return _Recompute.apply(args[0], self)


def freeze(model: nn.Module, *, functional: bool = True, recompute: bool = False) -> FreezeReport:
    """Convert ``model`` in place to lean layers that save only what input gradients need.

    Usually reached through ``advtune.tune(model, "frozen")`` (which folds BatchNorm
    first); calling it on any model works too, folded or not. Calling it twice is
    harmless.

    Args:
        model: The module to convert (modified in place).
        functional: Also rewrite supported functional calls (``F.relu``,
            ``F.max_pool2d``, ...) inside each module's own ``forward``: the module is
            traced with ``torch.fx`` (its submodules stay calls) and gets a generated
            ``forward`` calling the lean functions, used in eval mode (see
            ``_LeanForwardMixin``). Modules that cannot be traced keep their code.
        recompute: Selective recomputation for modern architectures: each residual block
            of a known type (:data:`RECOMPUTE_BLOCKS`: torchvision's ViT, Swin, ConvNeXt,
            EfficientNet, MobileNet and RegNet blocks, timm's ViT, ConvNeXt and
            EfficientNet blocks) keeps only its input ``(N, ...)`` for backward and runs
            its forward again there (its lean layers apply both times). Far fewer bytes
            saved per image (LayerNorm inputs, GELU/SiLU inputs and attention matrices
            are no longer kept) for about one more forward of those blocks per gradient
            step; results are unchanged. Forward hooks inside the blocks fire again
            during backward. Off by default because it costs time.

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
        elif not _swap.is_advtune(module) and (
            next(module.parameters(recurse=False), None) is not None
            or next(module.buffers(recurse=False), None) is not None
        ):
            report.native.append((name, type(module).__name__))
    if functional:
        for name, module in model.named_modules():
            if _may_rewrite(module):
                calls = _install_lean_forward(module)
                if calls:
                    module.__class__ = _swap.mixed_class(_LeanForwardMixin, type(module))
                    module.__dict__["_advtune_name"] = name
                    report.rewritten[name] = calls
    if recompute:
        for name, module in model.named_modules():
            if _recomputable(module):
                module.__class__ = _swap.mixed_class(_RecomputeMixin, type(module))
                report.recomputed.append(name)
    model.requires_grad_(False)
    previous = model.__dict__.get(_REPORT_ATTR)
    if previous is None:
        model.register_forward_pre_hook(_guard)
    else:  # a second call: keep the first hook and merge the record
        previous.converted.update(report.converted)
        previous.rewritten.update(report.rewritten)
        recomputed = previous.recomputed + report.recomputed
        report = FreezeReport(previous.converted, report.native, previous.rewritten, recomputed)
    model.__dict__[_REPORT_ATTR] = report
    return report


def freeze_report(model: nn.Module) -> FreezeReport | None:
    """The :class:`FreezeReport` of a model converted by :func:`freeze` (else ``None``)."""
    return model.__dict__.get(_REPORT_ATTR)


def is_frozen(model: nn.Module) -> bool:
    """Whether :func:`freeze` converted ``model``."""
    return _REPORT_ATTR in model.__dict__
