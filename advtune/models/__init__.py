"""Load frozen classifiers that take images in [0, 1], from cards known before building.

:func:`model_card` says everything about a model (source, weights, preprocessing,
classes, published figures) without building or downloading anything; the run builds its
dataset transform from it. :func:`load_model` builds the network the card describes
(torchvision, ``"timm:<name>"``, ``"robustbench:<name>"`` or a user's
``"package.module:function"``), loads its weights (library caches, a local ``.pth`` or
``.safetensors`` checkpoint, or seeded random weights), converts its Conv→BN blocks with
:func:`advtune.tune` and wraps it in an :class:`ImageClassifier` that normalises inside
``forward`` and carries ``.card``. Attacks then work in pixel space.

Files: ``cards`` (ModelCard, Preprocess, the registry), ``classifier``
(ImageClassifier), ``checkpoints`` (reading, strict loading, content hash),
``random_weights`` (seeded build, BN calibration), and one ``*_source`` module per
source. See ``docs/data_and_models.md`` for the user-facing rules.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from advtune.convbn import carry_report, check_mode, tune
from advtune.errors import UserError
from advtune.models import (
    factory_source,
    hf_source,
    robustbench_source,
    timm_source,
    torchvision_source,
)
from advtune.models.cards import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SOURCES,
    ModelCard,
    Preprocess,
    Published,
    get_card,
    list_cards,
    register_card,
)
from advtune.models.checkpoints import checkpoint_sha256, load_checkpoint
from advtune.models.classifier import ImageClassifier
from advtune.models.random_weights import calibrate_batchnorm, seeded
from advtune.runtime import parse_device

__all__ = [
    "DEFAULT_CONVBN",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "REFERENCE_MODELS",
    "SOURCES",
    "ImageClassifier",
    "ModelCard",
    "ModelRow",
    "Preprocess",
    "Published",
    "calibrate_batchnorm",
    "checkpoint_sha256",
    "get_card",
    "list_cards",
    "list_models",
    "load_checkpoint",
    "load_model",
    "model_card",
    "model_rows",
    "random_net",
    "register_card",
]

# Attacks need input gradients only: the frozen mode saves least for backward (see
# docs/performance.md) and gives the same input gradients as Eval mode.
DEFAULT_CONVBN = "frozen"

# The reference set of torchvision models: those whose ConvBN-mode costs
# docs/performance.md records (issue 5's table: ResNet-50 and the nine others, from a
# small ResNet to a BN-free ConvNeXt). The scripts' default model grids use it, so
# their tables and the performance docs cover the same architectures. Not every one
# takes 224 px: inception_v3's weights crop 299 px (each model's ``preprocess`` says).
REFERENCE_MODELS: tuple[str, ...] = (
    "resnet18",
    "resnet50",
    "resnet152",
    "wide_resnet50_2",
    "mobilenet_v2",
    "efficientnet_b0",
    "vgg16_bn",
    "densenet121",
    "inception_v3",
    "convnext_tiny",
)

_PREFIXED = ("torchvision", "timm", "robustbench", "hf")


def _split(name: str) -> tuple[str, str]:
    """``(source, name within the source)`` of a model name."""
    if not isinstance(name, str) or not name:
        raise UserError(f"model name must be a non-empty string, got {name!r}")
    for source in _PREFIXED:
        if name.startswith(source + ":"):
            return source, name[len(source) + 1 :]
    if factory_source.is_factory_spec(name):
        return "factory", name
    return "torchvision", name


@dataclass(frozen=True)
class _Source:
    """How one model source turns a name into a net; every source has the same three.

    Attributes:
        card: ``card(name, weights, *, seed, dataset, threat_model) -> ModelCard``
            (nothing built or downloaded; ``dataset``/``threat_model`` are RobustBench's).
        arch: ``arch(card) -> nn.Module``: the untrained architecture.
        build: ``build(card, *, progress) -> nn.Module``: the net with the card's weights.
    """

    card: Callable[..., ModelCard]
    arch: Callable[[ModelCard], nn.Module]
    build: Callable[..., nn.Module]


def _no_robustbench_selectors(fn: Callable[..., ModelCard]) -> Callable[..., ModelCard]:
    def card(name: str, weights: str, *, seed: int, dataset: Any, threat_model: Any) -> ModelCard:
        return fn(name, weights, seed=seed)  # _resolve refused dataset/threat_model already

    return card


#: The model sources (``factory`` models are built by the user's function, see _resolve).
_SOURCES: dict[str, _Source] = {
    "torchvision": _Source(
        _no_robustbench_selectors(torchvision_source.card),
        lambda card: torchvision_source.build_arch(card.arch),
        torchvision_source.build,
    ),
    "timm": _Source(
        _no_robustbench_selectors(timm_source.card), timm_source.build_arch, timm_source.build
    ),
    "hf": _Source(_no_robustbench_selectors(hf_source.card), hf_source.build_arch, hf_source.build),
    "robustbench": _Source(
        robustbench_source.card, robustbench_source.build_arch, robustbench_source.build
    ),
}


def _resolve(
    name: str,
    weights: str | os.PathLike,
    *,
    seed: int,
    threat_model: str | None,
    dataset: str | None,
) -> tuple[ModelCard, Callable[[bool], nn.Module]]:
    """The card of ``name`` and ``build(progress)``, which builds its (untrained or
    loaded) net."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise UserError(f"seed must be an int, got {seed!r}")
    if not -(1 << 63) <= seed < (1 << 64):  # what torch.manual_seed accepts
        raise UserError(f"seed must be in [-2**63, 2**64 - 1], got {seed}")
    source, inner = _split(name)
    wstr = os.fspath(weights)
    if source != "robustbench" and (threat_model is not None or dataset is not None):
        raise UserError(
            f"threat_model and dataset select RobustBench entries; {name!r} is a {source} model"
        )
    if source == "factory":
        card, net = factory_source.load(inner, wstr, seed=seed)

        def reinit() -> nn.Module:
            for m in net.modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()  # type: ignore[operator]
            return net

        if card.weights == "random":
            return card, lambda progress: seeded(reinit, seed)
        return card, lambda progress: net
    src = _SOURCES[source]
    card = src.card(inner, wstr, seed=seed, dataset=dataset, threat_model=threat_model)
    if card.weights == "random":
        return card, lambda progress: seeded(lambda: src.arch(card), seed)
    return card, lambda progress: src.build(card, progress=progress)


def model_card(
    name: str,
    *,
    weights: str | os.PathLike = "DEFAULT",
    seed: int = 0,
    threat_model: str | None = None,
    dataset: str | None = None,
) -> ModelCard:
    """The card of a model: nothing is built or downloaded (factories excepted).

    Args:
        name: As for :func:`load_model`.
        weights, seed, threat_model, dataset: As for :func:`load_model`.

    Example:
        ``model_card("resnet50").preprocess`` is the transform of torchvision's
        ``DEFAULT`` (V2) weights: resize 232 bilinear, crop 224.

    Raises:
        UserError: Unknown model or weights, missing optional package.
    """
    card, _ = _resolve(name, weights, seed=seed, threat_model=threat_model, dataset=dataset)
    return card


def random_net(
    name: str,
    *,
    seed: int = 0,
    calibrate: bool = True,
    size: int | None = None,
    batch: int = 4,
    passes: int = 2,
    dtype: torch.dtype = torch.float32,
    affine: bool = True,
    threat_model: str | None = None,
    dataset: str | None = None,
) -> nn.Module:
    """The bare network of ``name`` with seeded random weights, BN statistics calibrated.

    The same ``seed`` gives the same tensors in every process; the global RNG is left
    untouched. Calibration: :func:`calibrate_batchnorm` at ``size`` (default: the card's
    crop size) in ``dtype``.

    Returns:
        The unwrapped ``nn.Module`` (no normalisation, no ConvBN conversion) in eval mode.
    """
    card, build = _resolve(name, "random", seed=seed, threat_model=threat_model, dataset=dataset)
    net = build(False).to(dtype)
    if calibrate:
        side = size if size is not None else card.preprocess.crop_size
        calibrate_batchnorm(net, size=side, seed=seed, batch=batch, passes=passes, affine=affine)
    return net.eval()


def list_models() -> list[str]:
    """Names of torchvision's ImageNet classification models, sorted."""
    return torchvision_source.list_names()


@dataclass(frozen=True)
class ModelRow:
    """One line of ``advtune list models``."""

    name: str
    source: str
    weights: str
    preprocessing: str
    published: str = ""

    def format(self) -> str:
        text = f"{self.name:<48} {self.source:<12} {self.weights:<40} {self.preprocessing}"
        return f"{text}  [{self.published}]" if self.published else text


def _row(card: ModelCard) -> ModelRow:
    published = ""
    if card.published is not None:
        p = card.published
        published = f"{p.norm} {p.attack}: clean {p.clean:.2%}, robust {p.robust:.2%}"
    norm = "" if card.mean == IMAGENET_MEAN and card.std == IMAGENET_STD else " (own mean/std)"
    return ModelRow(
        card.name, card.source, card.weights, card.preprocess.describe() + norm, published
    )


def model_rows(
    sources: tuple[str, ...] = ("torchvision", "timm", "robustbench", "hf"),
) -> list[ModelRow]:
    """Rows (name, source, default weights, preprocessing, published figures) per model.

    torchvision: every classification model with its ``DEFAULT`` weights; timm (when
    installed): every pretrained tag; robustbench: the registered cards. Nothing is
    built or downloaded. hf: the image classifiers in the local Hub cache (the Hub
    itself is not listed).
    """
    rows = []
    if "torchvision" in sources:
        rows += [_row(torchvision_source.card(n, "DEFAULT", seed=0)) for n in list_models()]
    if "timm" in sources and importlib.util.find_spec("timm") is not None:
        for tagged in timm_source.list_names():
            try:
                rows.append(_row(timm_source.card(tagged, "DEFAULT", seed=0)))
            except UserError:  # non-square inputs or crop modes advtune cannot express
                continue
    if "robustbench" in sources:
        rows += [_row(get_card(n)) for n in list_cards("robustbench")]
    if "hf" in sources and importlib.util.find_spec("transformers") is not None:
        for repo in hf_source.cached_repos():
            try:
                rows.append(_row(hf_source.card(repo, "DEFAULT", seed=0)))
            except UserError:  # processors advtune cannot express
                continue
    return rows


def load_model(
    name: str,
    *,
    weights: str | os.PathLike = "DEFAULT",
    convbn: str = DEFAULT_CONVBN,
    device: str | torch.device | None = None,
    progress: bool = True,
    seed: int = 0,
    threat_model: str | None = None,
    dataset: str | None = None,
    recompute: bool = False,
) -> ImageClassifier:
    """Build a frozen classifier that takes [0, 1] images.

    Args:
        name: A torchvision classification model (:func:`list_models`; ``"torchvision:"``
            may prefix it); ``"timm:<name>"`` or ``"timm:<name>.<tag>"`` (needs timm);
            ``"robustbench:<name>"`` (:func:`list_cards`); ``"hf:<repo id>"`` or
            ``"hf:/path/to/folder"`` (a ``transformers`` image classifier, needs the
            ``hf`` extra); or ``"package.module:function"``,
            a factory called with no arguments that returns an ``nn.Module`` (see
            ``docs/data_and_models.md`` for its conventions).
        weights: ``"DEFAULT"``; a torchvision weights name (``"IMAGENET1K_V2"`` or
            ``"ResNet50_Weights.IMAGENET1K_V2"``) or timm tag (``"a1_in1k"``), fetched
            through the library's cache; a local checkpoint path (``.safetensors``, or
            ``torch.load(weights_only=True)``); or ``"random"`` (untrained, seeded by
            ``seed``, BN statistics calibrated; a warning says results mean nothing).
        convbn: ConvBN mode applied to the inner net (``advtune.MODES``).
        device: Where to put the model (``None``: stay on the CPU).
        progress: Show the download progress bar.
        seed: Seed of random weights: the same seed gives the same model in every
            process, rank and resume. The global RNG is not touched.
        threat_model, dataset: RobustBench entry (default ``"Linf"``, ``"imagenet"``).
        recompute: With ``convbn="frozen"``: residual blocks of transformer, ConvNeXt and
            MBConv models save only their input and run again in backward
            (:func:`advtune.frozen.freeze`); less memory, about 0.8× the speed.

    Returns:
        An :class:`ImageClassifier` in eval mode with every parameter frozen
        (``requires_grad=False``); ``.card`` is its :class:`ModelCard`.

    Raises:
        UserError: Unknown model, weights or mode; download failure (offline); a checkpoint
            that is missing, unreadable or does not fit the model; CUDA asked for but absent.
    """
    check_mode(convbn, recompute=recompute, names=("convbn", "recompute"))
    if device is not None:
        device = torch.device(parse_device(str(device)))
    card, build = _resolve(name, weights, seed=seed, threat_model=threat_model, dataset=dataset)
    net = build(progress)
    if card.weights == "random":
        warnings.warn(
            f"weights='random': {name} is untrained, so its predictions and any attack "
            "success rate mean nothing (use this only to test the pipeline)",
            UserWarning,
            stacklevel=2,
        )
        calibrate_batchnorm(net, size=card.preprocess.crop_size, seed=seed, batch=2, passes=1)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    if card.num_classes is None:
        num_classes = _infer_classes(net, card.preprocess)
        categories = card.categories
        if categories is None and num_classes == 1000:
            categories = torchvision_source.imagenet_categories()
        card = card.replace(num_classes=num_classes, categories=categories)
    net = tune(net, convbn, inplace=True, recompute=recompute)  # type: ignore[arg-type]
    for p in net.parameters():  # deploy/frozen create new parameters
        p.requires_grad_(False)
    model = ImageClassifier(
        net,
        mean=card.mean,
        std=card.std,
        preprocess=card.preprocess,
        categories=card.categories,
        num_classes=card.num_classes,  # type: ignore[arg-type]
        name=name,
        weights=card.weights,
        convbn=convbn,
        card=card,
    )
    # advtune.convbn_report(model) then describes the conversion (paths relative to
    # model.net), and advtune.tune(model) refuses to convert twice.
    carry_report(net, model)
    model.eval()
    if device is not None:
        model.to(device)
    return model


def _infer_classes(net: nn.Module, preprocess: Preprocess) -> int:
    """Number of outputs, from one forward on a blank image (for factory nets)."""
    param = next(net.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    x = torch.zeros(1, 3, preprocess.crop_size, preprocess.crop_size, dtype=dtype)
    with torch.no_grad():
        out = net(x)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise UserError(
            f"the model must return logits of shape (N, num_classes), got "
            f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}"
        )
    return int(out.shape[1])
