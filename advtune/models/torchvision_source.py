"""torchvision classification models: cards from the weights enums, builds, downloads."""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn
from torchvision.transforms import InterpolationMode

from advtune.errors import UserError, suggest
from advtune.models.cards import IMAGENET_MEAN, IMAGENET_STD, ModelCard, Preprocess
from advtune.models.checkpoints import checkpoint_path, load_checkpoint, load_strict

# Models whose pretrained torchvision weights expect ``transform_input=True``: the net
# itself turns ImageNet-normalised input into the [-1, 1] range Google's weights were
# trained on. The wrapper's normalisation is therefore still right.
_TRANSFORM_INPUT_MODELS = {"inception_v3": "AuxLogits.", "googlenet": "aux1."}


def list_names() -> list[str]:
    """Names of torchvision's ImageNet classification models, sorted."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def imagenet_categories() -> tuple[str, ...]:
    # torchvision ships the names in its weights metadata: no download needed.
    return tuple(torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def preprocess_from_weights(weights: Any) -> tuple[Preprocess, tuple, tuple]:
    """Preprocess and mean/std of a torchvision weights enum member (its transforms)."""
    transform = weights.transforms()

    def first(value: Any, default: int) -> int:
        if value is None:
            return default
        return int(value[0]) if isinstance(value, (list, tuple)) else int(value)

    crop = first(getattr(transform, "crop_size", None), 224)
    resize = first(getattr(transform, "resize_size", None), round(crop * 256 / 224))
    interpolation = getattr(transform, "interpolation", InterpolationMode.BILINEAR)
    mean = tuple(float(v) for v in getattr(transform, "mean", IMAGENET_MEAN))
    std = tuple(float(v) for v in getattr(transform, "std", IMAGENET_STD))
    return Preprocess(crop, resize, interpolation), mean, std


def weights_member(name: str, text: str) -> Any | None:
    """The weights enum member ``text`` names for model ``name``; ``None`` if ``text``
    does not look like a weights name (a path, ``"random"``)."""
    enum = torchvision.models.get_model_weights(name)
    if text.upper() == "DEFAULT":
        return enum.DEFAULT
    if text in enum.__members__:
        return enum[text]
    head, dot, tail = text.partition(".")
    if dot and re.fullmatch(r"\w+_Weights", head):
        if head != enum.__name__:
            raise UserError(
                f"weights {text!r} belong to another model; {name} takes: "
                + ", ".join(f"{enum.__name__}.{m}" for m in enum.__members__)
            )
        if tail in enum.__members__:
            return enum[tail]
        raise UserError(suggest(tail, enum.__members__, what=f"{enum.__name__} weights"))
    return None


def weight_names(name: str) -> list[str]:
    enum = torchvision.models.get_model_weights(name)
    return list(dict.fromkeys(["DEFAULT", *enum.__members__]))  # DEFAULT is also a member


def card(name: str, weights: str, *, seed: int) -> ModelCard:
    """The card of torchvision model ``name`` with ``weights`` (nothing is built)."""
    available = list_names()
    if name not in available:
        raise UserError(suggest(name, available, what="model"))
    default = torchvision.models.get_model_weights(name).DEFAULT
    preprocess, mean, std = preprocess_from_weights(default)
    base = ModelCard(
        name=name,
        source="torchvision",
        arch=name,
        weights="random",
        preprocess=preprocess,
        mean=mean,
        std=std,
        categories=imagenet_categories(),
        num_classes=1000,
    )
    if weights.lower() == "random":
        return base.replace(seed=seed)
    member = weights_member(name, weights)
    if member is not None:
        preprocess, mean, std = preprocess_from_weights(member)
        categories = tuple(member.meta["categories"])
        return base.replace(
            weights=str(member),
            preprocess=preprocess,
            mean=mean,
            std=std,
            categories=categories,
            num_classes=len(categories),
        )
    path = checkpoint_path(weights, what=f"weights for {name}", choices=weight_names(name))
    return base.replace(weights=f"checkpoint {path}", checkpoint=path)


def build_arch(arch: str, **kwargs: Any) -> nn.Module:
    """The untrained network (drawn from the global RNG, as torchvision's initialisers do)."""
    if arch in _TRANSFORM_INPUT_MODELS:
        # init_weights=True explicitly: the builders warn when it is left to default;
        # the aux heads cannot run on small inputs in train mode (BN calibration).
        kwargs = {"init_weights": True, "aux_logits": False, **kwargs}
    return torchvision.models.get_model(arch, weights=None, **kwargs)


def build(card: ModelCard, *, progress: bool) -> nn.Module:
    """The network of a card with named weights or a checkpoint."""
    if card.checkpoint is not None:
        return _from_checkpoint(card.arch, card.checkpoint)
    tail = card.weights.partition(".")[2]
    member = torchvision.models.get_model_weights(card.arch)[tail]
    return _download_build(card.arch, member, progress=progress)


def _from_checkpoint(arch: str, path: Path) -> nn.Module:
    state = load_checkpoint(path)
    kwargs: dict[str, Any] = {}
    if arch in _TRANSFORM_INPUT_MODELS:
        # Checkpoints of these nets are taken to be torchvision's pretrained weights
        # (offline copies), which need transform_input=True; aux heads are built only
        # if the file has them (to load strictly), then dropped: eval never uses them.
        has_aux = any(k.startswith(_TRANSFORM_INPUT_MODELS[arch]) for k in state)
        kwargs = {"transform_input": True, "init_weights": False, "aux_logits": has_aux}
    net = torchvision.models.get_model(arch, weights=None, **kwargs)
    load_strict(net, state, path)
    if arch in _TRANSFORM_INPUT_MODELS:
        _drop_aux(net)
    return net


def _download_build(name: str, member: Any, *, progress: bool) -> nn.Module:
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(member.url).path)
    try:
        # torch.hub writes its "Downloading: ..." line to stdout: stdout is for results
        # (advtune list models | ...), progress goes to stderr.
        with contextlib.redirect_stdout(sys.stderr):
            return torchvision.models.get_model(name, weights=member, progress=progress)
    except OSError as err:  # URLError, HTTPError, socket and SSL errors are all OSErrors
        raise UserError(
            f"could not download {member} for {name} ({type(err).__name__}: {err}). "
            f"Offline? Copy {member.url} to {cached}, or pass a local checkpoint path as "
            f"the weights (--weights /path/to/file.pth), or weights 'random' (untrained)"
        ) from err
    except (RuntimeError, pickle.UnpicklingError, EOFError) as err:
        # A hash mismatch or a truncated file in the cache, not a model bug: say which file.
        raise UserError(
            f"could not load {member} for {name} from {cached} "
            f"({type(err).__name__}: {err}); delete that file and try again"
        ) from err


def _drop_aux(net: nn.Module) -> None:
    net.aux_logits = False  # type: ignore[assignment]  # a plain bool attribute
    for attr in ("AuxLogits", "aux1", "aux2"):
        if hasattr(net, attr):
            setattr(net, attr, None)
