"""Run any `torchattacks <https://github.com/Harry24k/adversarial-attacks-pytorch>`_ attack
as an advtune attack returning :class:`~advtune.attacks.AttackResult`.

torchattacks is optional (``pip install 'advtune[torchattacks]'``). Its attacks differ
from advtune's in ways the adapter smooths over:

* They call ``model.eval()`` (and ``model.train()`` afterwards if the model was
  training): the adapter restores every submodule's flag exactly, like every attack.
* They draw from the *global* RNGs: the adapter seeds them inside a fork of the torch,
  NumPy and Python RNG states and restores those states afterwards, so the caller's
  global RNGs are untouched. Randomness is per batch, not per sample: with ``seeds``
  the batch seed is a hash of all of them, so a randomized torchattacks attack still
  depends on batch composition (advtune's own attacks do not).
* They ``print``: the output goes to the ``advtune.attacks`` logger at debug level.

Registered names: ``attacks.get("torchattacks:APGD")`` (any class, case-insensitive after
the prefix) returns an attack ``fn(model, x, y, *, target, generator, seeds, **hp)`` whose
hyperparameters are the class's keyword arguments, with a spec derived from its
signature (``eps`` is the radius, ``steps``/``n_restarts``/``n_queries`` budgets, and a
``norm`` argument takes advtune's ``"linf"``/``"l2"``). Once looked up the name is in
``attacks.names()``, so the CLI (``--attack torchattacks:APGD``), presets and the
contract suite treat it like any attack.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import random
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from advtune.attacks._random import _splitmix64, resolve_seeds
from advtune.attacks._registry import _ATTACKS, AttackSpec, Param, _derive
from advtune.attacks._result import AttackResult, ModelGuard, check_inputs, finish
from advtune.attacks.threat import threat_names
from advtune.errors import UserError, suggest

__all__ = [
    "PREFIX",
    "MissingDependencyError",
    "TorchattacksAttack",
    "lookup_external",
    "torchattacks",
]

#: Registry prefix of wrapped torchattacks classes: ``"torchattacks:APGD"``.
PREFIX = "torchattacks:"

logger = logging.getLogger("advtune.attacks")

_INSTALL_HINT = "pip install 'advtune[torchattacks]'"


class MissingDependencyError(UserError, ImportError):
    """An optional dependency is not installed (the message says which extra to install)."""


def _import_torchattacks() -> Any:
    try:  # optional dependency, imported on first use
        import torchattacks as ta
    except ImportError as exc:
        raise MissingDependencyError(
            f"torchattacks is not installed; install the extra with: {_INSTALL_HINT}"
        ) from exc
    return ta


def _attack_classes(ta: Any) -> dict[str, type]:
    base = ta.attack.Attack
    return {
        name: obj
        for name, obj in vars(ta).items()
        if isinstance(obj, type) and issubclass(obj, base) and obj is not base
    }


class _Counting(nn.Module):
    """Wraps the model to count forward passes and check the label range once."""

    def __init__(self, model: nn.Module, guard: ModelGuard) -> None:
        super().__init__()
        self.model = model
        # torchattacks reads model.training to decide whether to call .train() afterwards;
        # a fresh Module says True, which would put the wrapped model in training mode.
        self.training = model.training
        self.__dict__["_guard"] = guard  # plain attribute: not a submodule
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        guard = self.__dict__["_guard"]
        # torchattacks differentiates the loss w.r.t. an input that requires grad; a
        # pass under no_grad (or on a plain tensor) is an evaluation.
        guard.count(x.shape[0], gradient=torch.is_grad_enabled() and x.requires_grad)
        out = self.model(x)
        if self.calls == 1:
            guard.check_logits(out, x.shape[0])
        return out


@contextlib.contextmanager
def _seeded_global_rngs(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch/NumPy/Python global RNGs inside, restore their states on exit."""
    cuda = list(range(torch.cuda.device_count())) if device.type == "cuda" else []
    py_state = random.getstate()
    np: Any
    try:
        import numpy as np

        np_state: Any = np.random.get_state()
    except ImportError:  # pragma: no cover - numpy is a dependency
        np, np_state = None, None
    with torch.random.fork_rng(devices=cuda):
        try:
            torch.manual_seed(seed)
            random.seed(seed)
            if np is not None:
                np.random.seed(seed % 2**32)
            yield
        finally:
            random.setstate(py_state)
            if np is not None:
                np.random.set_state(np_state)


class TorchattacksAttack:
    """A torchattacks attack class plus its keyword arguments, callable like any attack.

    Call as ``attack(model, x, y, *, target=None, generator=None, seeds=None)``; returns
    an :class:`AttackResult`. ``model_calls`` counts torchattacks' forward passes plus
    the final evaluation.

    Attributes:
        name: The torchattacks class name (``"PGD"``, ``"CW"``, ...).
        kwargs: Keyword arguments for the class (besides the model).
    """

    def __init__(self, cls: type, kwargs: dict[str, Any]) -> None:
        self.cls = cls
        self.name = cls.__name__
        self.kwargs = dict(kwargs)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        return f"advtune.attacks.torchattacks({self.name!r}{', ' if args else ''}{args})"

    def __call__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        target: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        seeds: torch.Tensor | None = None,
    ) -> AttackResult:
        """Run the attack on ``(N, C, H, W)`` images ``x`` in [0, 1] with labels ``y``."""
        y, target = check_inputs(model, x, y, target, generator=generator, seeds=seeds)
        seed = 0
        for s in resolve_seeds(x.shape[0], generator=generator, seeds=seeds).tolist():
            seed = _splitmix64(seed ^ (s & (2**64 - 1)))
        with ModelGuard(model, y=y, target=target) as guard:
            counting = _Counting(model, guard)
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                attack = self.cls(counting, **self.kwargs)
                attack.set_device(x.device)
                labels = y
                if target is not None:
                    if "targeted" not in getattr(attack, "supported_mode", ()):
                        raise ValueError(f"torchattacks {self.name} has no targeted mode")
                    attack.set_mode_targeted_by_label(quiet=True)
                    labels = target
                try:
                    with _seeded_global_rngs(seed, x.device), torch.enable_grad():
                        x_adv = attack(x.detach().clone(), labels)
                finally:
                    # Before the final evaluation: torchattacks may leave modes changed.
                    guard.restore_modes()
            if out.getvalue().strip():
                logger.debug("torchattacks %s: %s", self.name, out.getvalue().strip())
            with torch.no_grad():
                return finish(guard, x, x_adv.detach(), y, target)


def _find_class(name: str) -> type:
    ta = _import_torchattacks()
    classes = _attack_classes(ta)
    cls = classes.get(name) if isinstance(name, str) else None
    if cls is None and isinstance(name, str):
        folded = {k.lower(): v for k, v in classes.items()}
        cls = folded.get(name.lower())
    if cls is None:
        raise UserError(suggest(str(name), classes, what="torchattacks attack"))
    return cls


# torchattacks spells norms "Linf"/"L2"; advtune's are lower case.
_TA_NORM = {"linf": "Linf", "l2": "L2", "l1": "L1"}


def _class_spec(cls: type, name: str) -> AttackSpec:
    params = []
    norm = "l2" if "L2" in cls.__name__ or cls.__name__ in ("CW", "DeepFool") else "linf"
    for p in list(inspect.signature(cls).parameters.values())[1:]:  # after the model
        if p.kind not in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
            continue
        if p.name == "norm" and isinstance(p.default, str):
            norm = p.default.lower()
            params.append(Param("norm", str, norm, choices=tuple(threat_names()), role="norm"))
            continue
        params.append(_derive(p))
    randomized = any(p.name == "random_start" and p.default is True for p in params)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            modes = cls(nn.Linear(1, 2)).supported_mode
    except Exception:
        modes = ()
    doc = (inspect.getdoc(cls) or "").splitlines()
    return AttackSpec(
        name=name,
        norm=norm,
        randomized=randomized,
        params=tuple(params),
        declared=False,
        per_sample=False,
        targeted="targeted" in modes,
        summary=f"torchattacks {cls.__name__}" + (f": {doc[0]}" if doc else ""),
    )


def lookup_external(name: str) -> tuple[Any, AttackSpec] | None:
    """Register and return ``"torchattacks:<Class>"``; ``None`` for another prefix.

    Raises:
        MissingDependencyError: torchattacks is not installed.
        UserError: Unknown class (with suggestions).
    """
    if not name.lower().startswith(PREFIX):
        return None
    cls = _find_class(name[len(PREFIX) :])
    canonical = PREFIX + cls.__name__
    if canonical in _ATTACKS:
        return _ATTACKS[canonical]

    def attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **kwargs: Any) -> AttackResult:
        # kwargs: target, generator, seeds and the class's hyperparameters.
        common = {k: kwargs.pop(k, None) for k in ("target", "generator", "seeds")}
        hyperparameters = entry[1].validate(kwargs)
        entry[1].threat(hyperparameters)  # eps in range for the norm
        if isinstance(hyperparameters.get("norm"), str):
            norm = hyperparameters["norm"]
            hyperparameters["norm"] = _TA_NORM.get(norm.lower(), norm)
        return torchattacks(cls.__name__, **hyperparameters)(model, x, y, **common)

    attack.__name__ = attack.__qualname__ = canonical
    attack.__doc__ = f"torchattacks {cls.__name__} through the adapter (see advtune.attacks)."
    entry = (attack, _class_spec(cls, canonical))
    _ATTACKS[canonical] = entry
    return entry


def torchattacks(name: str, **kwargs: Any) -> TorchattacksAttack:
    """Wrap the torchattacks attack class ``name`` as an advtune attack.

    Args:
        name: A torchattacks class name, e.g. ``"PGD"``, ``"PGDL2"``, ``"CW"``,
            ``"AutoAttack"`` (case-insensitive).
        **kwargs: Arguments of that class besides the model (``eps=8/255``, ...).

    Returns:
        A callable ``fn(model, x, y, *, target=None, generator=None, seeds=None)``
        returning an :class:`AttackResult`, usable on Eval-, Tune- or Deploy-mode models.

    Raises:
        MissingDependencyError: torchattacks is not installed (an ``ImportError`` and a
            ``UserError``; the message names the extra to install).
        UserError: Unknown attack name, or keyword arguments the class does not take.
    """
    cls = _find_class(name)
    try:
        inspect.signature(cls).bind(None, **kwargs)
    except TypeError as exc:
        raise UserError(f"bad arguments for torchattacks {cls.__name__}: {exc}") from None
    return TorchattacksAttack(cls, kwargs)
