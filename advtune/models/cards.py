"""Model cards: what a model needs and promises, known before any module is built.

A :class:`ModelCard` says where a model comes from (``source``: torchvision, timm,
robustbench or a user's factory), which weights it uses, how an image becomes its input
(:class:`Preprocess` plus the ``mean``/``std`` applied inside the classifier), its classes
and, for leaderboard entries, the published clean and AutoAttack accuracies. The run
builds its dataset transform from the card and the report reads metadata from it; the
module itself is built later by :func:`advtune.models.load_model`.

Fixed cards (RobustBench entries) live in a small strict registry: :func:`register_card`
refuses a duplicate name, :func:`get_card` returns one, :func:`list_cards` lists them.
Cards of torchvision and timm models are made on demand from the libraries' own metadata
(:func:`advtune.models.model_card`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from advtune.errors import UserError, suggest

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SOURCES",
    "ModelCard",
    "Preprocess",
    "Published",
    "get_card",
    "list_cards",
    "register_card",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
#: Where a model can come from; a model name is ``"<source>:<name>"`` except for
#: torchvision (bare names) and factories (``"package.module:function"``).
SOURCES: tuple[str, ...] = ("torchvision", "timm", "robustbench", "hf", "factory")


# --------------------------------------------------------------------------- preprocessing


@dataclass(frozen=True)
class Preprocess:
    """PIL image → float tensor ``(3, crop_size, crop_size)`` in [0, 1] (no normalisation).

    Resize (antialiased), then center crop: torchvision's ``ImageClassification``
    transform without its normalisation (which lives in
    :class:`~advtune.models.ImageClassifier`). A plain picklable class, so DataLoader
    workers can use it with any start method.

    Attributes:
        crop_size: Side of the square center crop.
        resize_size: An int resizes the shorter side to it (aspect kept); ``(h, w)``
            resizes to exactly that size; ``None`` skips the resize (crop only, as
            RobustBench's ``Crop288``).
        interpolation: Resampling filter of the resize.
    """

    crop_size: int = 224
    resize_size: int | tuple[int, int] | None = 256
    interpolation: InterpolationMode = InterpolationMode.BILINEAR

    def __post_init__(self) -> None:
        if not isinstance(self.crop_size, int) or self.crop_size < 1:
            raise ValueError(f"crop_size must be a positive int, got {self.crop_size!r}")
        sizes = self.resize_size if isinstance(self.resize_size, tuple) else (self.resize_size,)
        if self.resize_size is not None and not all(isinstance(s, int) and s > 0 for s in sizes):
            raise ValueError(f"resize_size must be positive ints or None, got {self.resize_size!r}")

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if not isinstance(image, Image.Image):
            raise TypeError(f"Preprocess expects a PIL image, got {type(image).__name__}")
        image = image.convert("RGB") if image.mode != "RGB" else image
        if self.resize_size is not None:
            size = (
                list(self.resize_size)
                if isinstance(self.resize_size, tuple)
                else [self.resize_size]
            )
            image = TF.resize(image, size, self.interpolation, antialias=True)
        image = TF.center_crop(image, [self.crop_size])
        return TF.pil_to_tensor(image).float().div_(255)

    def describe(self) -> str:
        """One line, e.g. ``"resize 256 bilinear, crop 224"``."""
        if self.resize_size is None:
            return f"crop {self.crop_size} (no resize)"
        size = self.resize_size
        text = f"{size[0]}x{size[1]}" if isinstance(size, tuple) else str(size)
        return f"resize {text} {self.interpolation.value}, crop {self.crop_size}"


# --------------------------------------------------------------------------- the card


@dataclass(frozen=True)
class Published:
    """Accuracies a leaderboard published for a model, to compare a run against.

    Attributes:
        clean: Clean accuracy in [0, 1].
        robust: Robust accuracy in [0, 1] under ``attack`` at ``eps`` (``norm``).
        attack: The attack that measured ``robust`` (e.g. ``"autoattack"``).
        norm: ``"Linf"`` or ``"L2"``.
        eps: The budget in [0, 1] pixel units (4/255 for RobustBench ImageNet Linf).
        images: How many validation images the figures are over.
        reference: Where the figures come from.
    """

    clean: float
    robust: float
    attack: str
    norm: str
    eps: float
    images: int
    reference: str

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ModelCard:
    """Everything known about a model before it is built.

    Attributes:
        name: The model name as the user gives it (``"resnet50"``, ``"timm:resnet18"``,
            ``"robustbench:Salman2020Do_R50"``, ``"pkg.mod:fn"``).
        source: One of :data:`SOURCES` (``"hf"``: Hugging Face ``transformers``).
        arch: The builder's name in its library (``"resnet50"``); the factory spec
            for factories.
        weights: Which weights (``"ResNet50_Weights.IMAGENET1K_V2"``, ``"timm/resnet18.a1_in1k"``,
            ``"random"``, ``"checkpoint /abs/file.pth"``...).
        preprocess: PIL image → ``(3, H, W)`` tensor in [0, 1].
        mean, std: Per-channel normalisation the classifier applies inside ``forward``
            (``(0, 0, 0)``/``(1, 1, 1)`` when the net takes [0, 1] input itself).
        categories: Class names, or ``None``.
        num_classes: Number of outputs, or ``None`` when only a forward can tell
            (factories).
        dataset: What the weights were trained on (``"imagenet"``, ``"cifar10"``).
        threat_model: For robust models, what they were trained against (``"Linf"``).
        published: Leaderboard figures, or ``None``.
        checkpoint: The local checkpoint file the weights come from, or ``None``.
        seed: Seed of random weights (``weights == "random"``), else ``None``.
    """

    name: str
    source: str
    arch: str
    weights: str
    preprocess: Preprocess
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    categories: tuple[str, ...] | None = dataclasses.field(default=None, repr=False)
    num_classes: int | None = None
    dataset: str = "imagenet"
    threat_model: str | None = None
    published: Published | None = None
    checkpoint: Path | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {', '.join(SOURCES)}; got {self.source!r}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need 3 values each, got {self.mean} and {self.std}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be > 0, got {self.std}")

    @property
    def weights_digest(self) -> str | None:
        """SHA-256 of the checkpoint file (cached per path, size and mtime), else ``None``."""
        from advtune.models.checkpoints import checkpoint_sha256

        return checkpoint_sha256(self.checkpoint) if self.checkpoint is not None else None

    def replace(self, **changes: object) -> ModelCard:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, object]:
        """A JSON-serialisable summary (for ``report.json``); no class names."""
        return {
            "name": self.name,
            "source": self.source,
            "arch": self.arch,
            "weights": self.weights,
            "preprocess": self.preprocess.describe(),
            "mean": list(self.mean),
            "std": list(self.std),
            "num_classes": self.num_classes,
            "dataset": self.dataset,
            "threat_model": self.threat_model,
            "published": self.published.to_dict() if self.published else None,
            "checkpoint": str(self.checkpoint) if self.checkpoint else None,
            "seed": self.seed,
        }


# --------------------------------------------------------------------------- registry


_REGISTRY: dict[str, ModelCard] = {}


def register_card(card: ModelCard) -> ModelCard:
    """Add a fixed card (a leaderboard entry) to the registry.

    Raises:
        ValueError: A card of that name is registered already.
    """
    if card.name in _REGISTRY:
        raise ValueError(f"model card {card.name!r} is already registered")
    _REGISTRY[card.name] = card
    return card


def get_card(name: str) -> ModelCard:
    """The registered card ``name`` (e.g. ``"robustbench:Salman2020Do_R50"``).

    Raises:
        UserError: No such card; the message suggests close names.
    """
    card = _REGISTRY.get(name)
    if card is None:
        raise UserError(suggest(name, list(_REGISTRY), what="model card"))
    return card


def list_cards(source: str | None = None) -> list[str]:
    """Names of the registered cards (of one ``source`` if given), in registration order."""
    return [n for n, c in _REGISTRY.items() if source is None or c.source == source]
