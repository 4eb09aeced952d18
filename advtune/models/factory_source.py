"""A user's own model: ``"package.module:function"`` returns an ``nn.Module``.

The exception to "cards before modules": a factory's preprocessing and classes are
attributes of the module it returns, so its card is read from a built module.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
from typing import Any

from torch import nn

from advtune.errors import UserError, suggest
from advtune.models.cards import IMAGENET_MEAN, IMAGENET_STD, ModelCard, Preprocess
from advtune.models.checkpoints import checkpoint_path, load_checkpoint, load_strict


def is_factory_spec(name: str) -> bool:
    """``"pkg.mod:fn"`` (and not a Windows path such as ``C:\\models``)."""
    return ":" in name and not re.match(r"^[A-Za-z]:[\\/]", name)


def load(spec: str, weights: str, *, seed: int) -> tuple[ModelCard, nn.Module]:
    """Call the factory; return its card and its net with ``weights`` applied.

    ``weights == "random"`` leaves re-initialisation to the caller (seeded there).
    """
    module_name, _, func_name = spec.partition(":")
    if not module_name or not func_name.isidentifier():
        raise UserError(
            f"model {spec!r}: a factory is written 'package.module:function', e.g. "
            "'mymodels:build_net'"
        )
    module = _import(module_name, spec)
    factory = getattr(module, func_name, None)
    if not callable(factory):
        choices = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        raise UserError(suggest(func_name, choices, what=f"function in {module_name}"))
    _check_builder(factory, spec)
    net = factory()
    if not isinstance(net, nn.Module):
        raise UserError(
            f"model factory {spec!r} must return an nn.Module, got {type(net).__name__}"
        )
    size = getattr(net, "advtune_input_size", 224)
    if not isinstance(size, int) or size < 1:
        raise UserError(f"{spec}: advtune_input_size must be a positive int, got {size!r}")
    if getattr(net, "advtune_normalized_input", True):
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    categories = getattr(net, "categories", None)
    declared = getattr(net, "num_classes", None)
    card = ModelCard(
        name=spec,
        source="factory",
        arch=spec,
        weights=f"factory {spec}",
        preprocess=Preprocess(size, round(size * 256 / 224)),
        mean=mean,
        std=std,
        categories=tuple(categories) if categories is not None else None,
        num_classes=declared if isinstance(declared, int) and declared > 0 else None,
    )
    wl = weights.lower()
    if wl == "random":
        return card.replace(weights="random", seed=seed), net
    if wl != "default":
        path = checkpoint_path(weights, what=f"weights for {spec}", choices=["DEFAULT", "random"])
        load_strict(net, load_checkpoint(path), path)
        card = card.replace(weights=f"checkpoint {path}", checkpoint=path)
    return card, net


def _check_builder(factory: Any, spec: str) -> None:
    """A model factory is called without arguments: refuse one that needs some (e.g.
    ``json:loads``) before calling it, naming what it needs."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # some builtins have no signature: just call them
        return
    needed = [
        name
        for name, p in signature.parameters.items()
        if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    if needed:
        raise UserError(
            f"model factory {spec!r} is not a model builder: it needs argument(s) "
            f"{', '.join(needed)}; advtune calls it with none and expects an nn.Module"
        )


def _import(module_name: str, spec: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        top = module_name.split(".")[0]
        cwd = os.getcwd()
        # The `advtune` console script does not put the working directory on sys.path
        # (python -m does); a factory in ./mymodels.py should still be found.
        if err.name == top and cwd not in sys.path:
            sys.path.insert(0, cwd)
            try:
                return importlib.import_module(module_name)
            except ModuleNotFoundError:
                sys.path.remove(cwd)
        raise UserError(
            f"model {spec!r}: cannot import module {module_name!r} ({err}); it must be "
            "importable (installed, on PYTHONPATH, or in the current directory)"
        ) from err
