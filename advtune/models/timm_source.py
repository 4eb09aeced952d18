"""timm classification models (``"timm:<name>"``): cards from timm's pretrained configs.

timm is an optional extra (``pip install advtune[timm]``). The card's preprocessing is
what ``timm.data.resolve_data_config`` + ``create_transform`` do at evaluation: resize
the shorter side to ``floor(input_size / crop_pct)`` with the config's interpolation,
center crop ``input_size``, normalise with the config's mean/std (inside the classifier).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from torch import nn
from torchvision.transforms import InterpolationMode

from advtune.errors import UserError, first_line, suggest
from advtune.models.cards import ModelCard, Preprocess
from advtune.models.checkpoints import (
    CHECKPOINT_SUFFIXES,
    checkpoint_path,
    load_checkpoint,
    load_strict,
)


def _timm() -> Any:
    try:
        import timm
    except ImportError as err:
        raise UserError("timm models need the 'timm' package: pip install advtune[timm]") from err
    return timm


def list_names(pretrained: bool = True) -> list[str]:
    """timm model names (with their weight tags when ``pretrained``)."""
    timm = _timm()
    return list(timm.list_pretrained() if pretrained else timm.list_models())


def _pretrained_cfg(name: str) -> Any:
    timm = _timm()
    from timm.models import get_pretrained_cfg, split_model_name_tag

    arch, _ = split_model_name_tag(name)
    if not timm.is_model(arch):
        raise UserError(suggest(arch, timm.list_models(), what="timm model"))
    try:
        cfg = get_pretrained_cfg(name, allow_unregistered=False)
    except RuntimeError:  # a tag the architecture does not have
        cfg = None
    if cfg is None:
        tags = timm.list_pretrained(f"{arch}.*")
        raise UserError(suggest(name, tags or [arch], what="timm weights"))
    return cfg


def preprocess_from_cfg(cfg: Any, name: str) -> Preprocess:
    """The evaluation transform of a timm pretrained config, as a :class:`Preprocess`."""
    _, height, width = cfg.input_size
    if height != width:
        raise UserError(
            f"timm model {name!r} takes {height}x{width} input; only square inputs are supported"
        )
    crop_pct = cfg.crop_pct if cfg.crop_pct is not None else 0.875
    scale = math.floor(height / crop_pct)
    interpolation = InterpolationMode(cfg.interpolation or "bilinear")
    mode = cfg.crop_mode or "center"
    if mode == "center":
        return Preprocess(height, scale, interpolation)
    if mode == "squash":
        return Preprocess(height, (scale, scale), interpolation)
    raise UserError(f"timm model {name!r}: crop_mode {mode!r} is not supported")


def card(name: str, weights: str, *, seed: int) -> ModelCard:
    """The card of ``timm:<name>``; ``weights`` is ``DEFAULT``, a weights tag (e.g.
    ``"a1_in1k"``), ``random`` or a checkpoint path. Nothing is built or downloaded."""
    path = None
    if weights.lower() not in ("default", "random"):
        if _looks_like_path(weights):
            path = checkpoint_path(weights, what=f"weights for timm:{name}", choices=["DEFAULT"])
        elif "." in name:
            raise UserError(
                f"timm:{name} names its weights tag already; weights {weights!r} must be "
                "DEFAULT, random or a checkpoint path"
            )
        else:
            name = f"{name}.{weights}"  # a weights tag
    cfg = _pretrained_cfg(name)
    arch, tag = cfg.architecture, cfg.tag
    categories = None
    if cfg.num_classes == 1000:
        from advtune.models.torchvision_source import imagenet_categories

        categories = imagenet_categories()
    base = ModelCard(
        name=f"timm:{name}",
        source="timm",
        arch=arch,
        weights=f"timm/{arch}.{tag}" if tag else f"timm/{arch}",
        preprocess=preprocess_from_cfg(cfg, name),
        mean=tuple(float(v) for v in cfg.mean),  # type: ignore[arg-type]
        std=tuple(float(v) for v in cfg.std),  # type: ignore[arg-type]
        categories=categories,
        num_classes=int(cfg.num_classes),
    )
    if weights.lower() == "random":
        return base.replace(weights="random", seed=seed)
    if path is not None:
        return base.replace(weights=f"checkpoint {path}", checkpoint=path)
    return base


def _looks_like_path(text: str) -> bool:
    return (
        Path(text).expanduser().exists()
        or "/" in text
        or os.sep in text
        or any(text.lower().endswith(s) for s in CHECKPOINT_SUFFIXES)
    )


def build_arch(card: ModelCard) -> nn.Module:
    """The untrained network of a timm card (initialisers draw from the global RNG)."""
    timm = _timm()
    return timm.create_model(card.arch, pretrained=False, num_classes=card.num_classes)


def build(card: ModelCard, *, progress: bool) -> nn.Module:
    """The network with the card's pretrained weights or checkpoint."""
    timm = _timm()
    if card.checkpoint is not None:
        net = build_arch(card)
        load_strict(net, load_checkpoint(card.checkpoint), card.checkpoint)
        return net
    tagged = card.weights.removeprefix("timm/")
    try:
        return timm.create_model(tagged, pretrained=True)
    except (OSError, RuntimeError, ValueError) as err:  # offline hub, bad cache file
        first = first_line(err)
        raise UserError(
            f"could not download timm weights {tagged!r} ({type(err).__name__}: {first}). "
            "Offline? Pass a local checkpoint (--weights /path/to/file.safetensors) or "
            "weights 'random' (untrained)"
        ) from err
