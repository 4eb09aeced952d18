"""RobustBench models (``"robustbench:<name>"``): cards for the ImageNet leaderboard
entries whose architecture torchvision or timm builds, with RobustBench's own
preprocessing and its published clean and AutoAttack accuracies.

Weights come from one of:

* the ``robustbench`` package (an optional extra, ``pip install advtune[robustbench]``;
  it pins an old timm and downloads checkpoints from the web), which fetches the
  checkpoint into ``$TORCH_HOME/hub/robustbench``; advtune then loads the same tensors
  strictly into its own build of the architecture;
* a local checkpoint (``weights="/path/Salman2020Do_R50.pt"``, the file RobustBench
  downloads, or a ``.safetensors`` copy): no package and no network needed;
* ``weights="random"`` (untrained, for pipeline tests).

``Standard_R50`` is torchvision's ``ResNet50_Weights.IMAGENET1K_V1`` (RobustBench builds
it with ``resnet50(pretrained=True)``), fetched through torchvision's cache.

Names without a card (CIFAR-10 entries, ensembles, custom architectures) still load
through the package: its module is used as it is (it normalises inside), with the
preprocessing RobustBench names for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.transforms import InterpolationMode

from advtune.errors import UserError, first_line, suggest
from advtune.models import cards, timm_source, torchvision_source
from advtune.models.cards import ModelCard, Preprocess
from advtune.models.checkpoints import checkpoint_path, load_checkpoint, load_strict

DATASETS: tuple[str, ...] = ("imagenet", "cifar10", "cifar100")
THREAT_MODELS: tuple[str, ...] = ("Linf", "L2", "corruptions")
_NUM_CLASSES = {"imagenet": 1000, "cifar10": 10, "cifar100": 100}

#: RobustBench's named preprocessings (``robustbench.data.PREPROCESSINGS``).
PREPROCESSINGS: dict[str, Preprocess] = {
    "Res256Crop224": Preprocess(224, 256, InterpolationMode.BILINEAR),
    "BicubicRes256Crop224": Preprocess(224, 256, InterpolationMode.BICUBIC),
    "Crop288": Preprocess(288, None),
    "Res224": Preprocess(224, (224, 224), InterpolationMode.BILINEAR),
}
_REFERENCE = "RobustBench ImageNet Linf leaderboard, AutoAttack at eps 4/255 on 5000 images"


# RobustBench ImageNet Linf entries whose architecture torchvision/timm builds exactly
# (robustbench 1.1.1 model zoo: normalize_model(arch, ImageNet mean/std)), with the
# leaderboard's clean and AutoAttack accuracy in percent (its README, 5000 images).
_IMAGENET_LINF = """
# name                                     architecture                             preprocessing         clean  AutoAttack
Standard_R50                               torchvision:resnet50                     Res256Crop224         76.52  0.00
Salman2020Do_50_2                          torchvision:wide_resnet50_2              Res256Crop224         68.46  38.14
Salman2020Do_R50                           torchvision:resnet50                     Res256Crop224         64.02  34.96
Engstrom2019Robustness                     torchvision:resnet50                     Res256Crop224         62.56  29.22
Wong2020Fast                               torchvision:resnet50                     Crop288               55.62  26.24
Salman2020Do_R18                           torchvision:resnet18                     Res256Crop224         52.92  25.32
Liu2023Comprehensive_Swin-L                timm:swin_large_patch4_window7_224       BicubicRes256Crop224  78.92  59.56
Liu2023Comprehensive_ConvNeXt-L            timm:convnext_large                      BicubicRes256Crop224  78.02  58.48
Liu2023Comprehensive_Swin-B                timm:swin_base_patch4_window7_224        BicubicRes256Crop224  76.16  56.16
Liu2023Comprehensive_ConvNeXt-B            timm:convnext_base                       BicubicRes256Crop224  76.02  55.82
RodriguezMunoz2024Characterizing_Swin-L    timm:swin_large_patch4_window7_224       BicubicRes256Crop224  79.36  53.82
RodriguezMunoz2024Characterizing_Swin-B    timm:swin_base_patch4_window7_224        BicubicRes256Crop224  77.76  51.56
Mo2022When_Swin-B                          timm:swin_base_patch4_window7_224        Res224                74.66  38.30
Mo2022When_ViT-B                           timm:vit_base_patch16_224                Res224                68.38  34.40
"""
# RobustBench builds Standard_R50 as resnet50(pretrained=True): torchvision's V1 weights.
_TORCHVISION_WEIGHTS = {"Standard_R50": "ResNet50_Weights.IMAGENET1K_V1"}


def _card_from_row(row: str) -> ModelCard:
    name, arch, preprocessing, clean, autoattack = row.split()
    return ModelCard(
        name=f"robustbench:{name}",
        source="robustbench",
        arch=arch,
        weights=_TORCHVISION_WEIGHTS.get(name, f"robustbench {name}"),
        preprocess=PREPROCESSINGS[preprocessing],
        mean=cards.IMAGENET_MEAN,
        std=cards.IMAGENET_STD,
        categories=torchvision_source.imagenet_categories(),
        num_classes=1000,
        dataset="imagenet",
        threat_model="Linf",
        published=cards.Published(
            clean=round(float(clean) / 100, 4),
            robust=round(float(autoattack) / 100, 4),
            attack="autoattack",
            norm="Linf",
            eps=4 / 255,
            images=5000,
            reference=_REFERENCE,
        ),
    )


for _row in _IMAGENET_LINF.strip().splitlines()[1:]:
    cards.register_card(_card_from_row(_row))


def card(
    name: str, weights: str, *, seed: int, dataset: str | None, threat_model: str | None
) -> ModelCard:
    """The card of ``robustbench:<name>`` (nothing is built or downloaded)."""
    dataset = dataset or "imagenet"
    threat_model = threat_model or "Linf"
    if dataset not in DATASETS:
        raise UserError(suggest(dataset, DATASETS, what="RobustBench dataset"))
    if threat_model not in THREAT_MODELS:
        raise UserError(suggest(threat_model, THREAT_MODELS, what="RobustBench threat model"))
    full = f"robustbench:{name}"
    if full in cards.list_cards("robustbench") and (dataset, threat_model) == ("imagenet", "Linf"):
        base = cards.get_card(full)
    else:
        base = _package_card(name, dataset, threat_model)
    wl = weights.lower()
    if wl == "random":
        if base.arch == "package":
            raise UserError(
                f"robustbench:{name} has no card here, so its architecture is unknown "
                f"without the robustbench package's weights; carded models: "
                + ", ".join(n.removeprefix("robustbench:") for n in cards.list_cards("robustbench"))
            )
        return base.replace(weights="random", seed=seed)
    if wl == "default":
        return base
    path = checkpoint_path(weights, what=f"weights for {full}", choices=["DEFAULT"])
    if base.arch == "package":
        raise UserError(
            f"a local checkpoint for robustbench:{name} needs its architecture, which only "
            "the carded models declare; carded: "
            + ", ".join(n.removeprefix("robustbench:") for n in cards.list_cards("robustbench"))
        )
    return base.replace(weights=f"checkpoint {path}", checkpoint=path)


def _robustbench() -> Any:
    try:
        import robustbench.utils
    except ImportError as err:
        raise UserError(
            "this RobustBench model needs the 'robustbench' package to download its "
            "weights (pip install advtune[robustbench]; it pins an old timm, so use its own "
            "environment), or pass the checkpoint file as the weights "
            "(--weights /path/to/<name>.pt)"
        ) from err
    return robustbench


def _package_card(name: str, dataset: str, threat_model: str) -> ModelCard:
    """A card from the robustbench package's model zoo, for names advtune has no card for."""
    try:
        _robustbench()  # a clear error when the package is missing
    except UserError as err:
        carded = [n.removeprefix("robustbench:") for n in cards.list_cards("robustbench")]
        if (dataset, threat_model) != ("imagenet", "Linf") or not carded:
            raise
        # The name is most likely a typo of a carded one: say that first.
        raise UserError(
            suggest(name, carded, what="RobustBench imagenet Linf model")
            + " (models without a card here need the 'robustbench' package: pip install "
            "advtune[robustbench])"
        ) from err
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    zoo = model_dicts[BenchmarkDataset(dataset)][ThreatModel(threat_model)]
    if name not in zoo:
        raise UserError(
            suggest(name, list(zoo), what=f"RobustBench {dataset} {threat_model} model")
        )
    key = zoo[name].get("preprocessing")
    if dataset == "imagenet":
        if key not in PREPROCESSINGS:
            raise UserError(
                f"robustbench:{name}: preprocessing {key!r} is not supported; use a card"
            )
        preprocess = PREPROCESSINGS[key]
    else:
        preprocess = Preprocess(32, None)  # CIFAR images are 32x32: ToTensor only
    categories = torchvision_source.imagenet_categories() if dataset == "imagenet" else None
    return ModelCard(
        name=f"robustbench:{name}",
        source="robustbench",
        arch="package",
        weights=f"robustbench {name}",
        preprocess=preprocess,
        mean=(0.0, 0.0, 0.0),  # the package's module normalises itself
        std=(1.0, 1.0, 1.0),
        categories=categories,
        num_classes=_NUM_CLASSES[dataset],
        dataset=dataset,
        threat_model=threat_model,
    )


def model_dir() -> Path:
    """Where the robustbench package downloads checkpoints: ``$TORCH_HOME/hub/robustbench``."""
    return Path(torch.hub.get_dir()) / "robustbench"


def build_arch(card: ModelCard) -> nn.Module:
    """The untrained architecture of a carded RobustBench model."""
    source, _, arch = card.arch.partition(":")
    if source == "timm":
        return timm_source.build_arch(card.replace(arch=arch))
    return torchvision_source.build_arch(arch)


def adapt_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys of a RobustBench checkpoint → keys of the bare architecture.

    RobustBench wraps nets as ``Sequential(normalize, model)``: checkpoints carry
    ``model.`` prefixes and sometimes ``normalize.mean``/``normalize.std`` (the card
    holds the normalisation).
    """
    out = {}
    for key, value in state.items():
        if key in ("normalize.mean", "normalize.std"):
            continue
        while key.startswith("model."):
            key = key[len("model.") :]
        out[key] = value
    return out


def _load_into_arch(card: ModelCard, state: dict[str, torch.Tensor], path: Path) -> nn.Module:
    net = build_arch(card)
    state = adapt_state(state)
    if "swin" in card.arch and set(state) != set(net.state_dict()):
        # Checkpoints saved with older timm Swin layouts; timm converts them itself.
        from timm.models.swin_transformer import checkpoint_filter_fn

        state = checkpoint_filter_fn(state, net)
    load_strict(net, state, path)
    return net


def build(card: ModelCard, *, progress: bool) -> nn.Module:
    """The network of a RobustBench card with its weights (package, torchvision or file)."""
    name = card.name.removeprefix("robustbench:")
    if card.checkpoint is not None:
        return _load_into_arch(card, load_checkpoint(card.checkpoint), card.checkpoint)
    if not card.weights.startswith("robustbench "):  # Standard_R50: torchvision's V1
        tv = card.replace(arch=card.arch.partition(":")[2])
        return torchvision_source.build(tv, progress=progress)
    rb = _robustbench()
    directory = model_dir()
    try:
        module = rb.utils.load_model(
            name, model_dir=directory, dataset=card.dataset, threat_model=card.threat_model
        )
    except Exception as err:  # the package raises many types for failed downloads
        first = first_line(err)
        target = directory / card.dataset / str(card.threat_model) / f"{name}.pt"
        raise UserError(
            f"robustbench could not load {name} ({type(err).__name__}: {first}). "
            f"Offline? Put the checkpoint at {target}, or pass it as the weights "
            f"(--weights /path/to/{name}.pt)"
        ) from err
    if card.arch == "package":
        return module
    state = {k: v for k, v in module.state_dict().items()}
    return _load_into_arch(card, state, directory / card.dataset / str(card.threat_model))
