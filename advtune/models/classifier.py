"""The classifier every attack sees: [0, 1] images in, logits out, normalisation inside."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image
from torch import nn

from advtune.convbn import ConvBNReport, convbn_report
from advtune.models.cards import IMAGENET_MEAN, IMAGENET_STD, ModelCard, Preprocess

__all__ = ["ImageClassifier"]


class ImageClassifier(nn.Module):
    """A classifier on [0, 1] images: ``forward(x) = net((x - mean) / std)``.

    Args:
        net: The network; takes normalised ``(N, 3, H, W)`` input, returns logits ``(N, K)``.
        mean, std: Per-channel normalisation (3 floats each). ``(0, 0, 0)`` / ``(1, 1, 1)``
            for a net that takes [0, 1] input itself.
        preprocess: PIL image → ``(3, H, W)`` float tensor in [0, 1].
        categories: Class names (``K`` of them) or ``None``.
        num_classes: ``K``.
        name: Model name as the user gave it.
        weights: Where the weights came from (e.g. ``"ResNet50_Weights.IMAGENET1K_V2"``,
            ``"random"``, ``"checkpoint /path/to/file.pth"``).
        convbn: The ConvBN mode ``net`` was converted with.
        card: The :class:`~advtune.models.ModelCard` the model was built from; ``None``
            makes a ``"factory"`` card from the other arguments.

    Shapes:
        ``x``: ``(N, 3, H, W)`` in [0, 1] → logits ``(N, num_classes)``.
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        preprocess: Callable[[Image.Image], torch.Tensor] | None = None,
        categories: Sequence[str] | None = None,
        num_classes: int,
        name: str,
        weights: str,
        convbn: str = "eval",
        card: ModelCard | None = None,
    ) -> None:
        super().__init__()
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values each, got {mean} and {std}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be > 0, got {std}")
        self.net = net
        self._mean = tuple(float(v) for v in mean)
        self._std = tuple(float(v) for v in std)
        # Non-persistent: the state_dict stays the net's own, so checkpoints of the
        # wrapper and of the bare net differ only by the "net." prefix.
        self.register_buffer("mean", torch.tensor(self._mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self._std).view(1, 3, 1, 1), persistent=False)
        self.preprocess = preprocess if preprocess is not None else Preprocess()
        self.categories = list(categories) if categories is not None else None
        self.num_classes = int(num_classes)
        self.name = name
        self.weights = weights
        self.convbn = convbn
        if card is None:
            card = ModelCard(
                name=name,
                source="factory",
                arch=name,
                weights=weights,
                preprocess=self.preprocess
                if isinstance(self.preprocess, Preprocess)
                else Preprocess(),
                mean=self._mean,  # type: ignore[arg-type]
                std=self._std,  # type: ignore[arg-type]
                categories=tuple(self.categories) if self.categories is not None else None,
                num_classes=self.num_classes,
            )
        self.card = card

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Not while torch.fx traces the model (advtune.tune): a Proxy has no shape yet.
        if not isinstance(x, torch.fx.Proxy) and (x.dim() != 4 or x.shape[1] != 3):
            raise ValueError(
                f"{self.name} takes images of shape (N, 3, H, W), got input of shape "
                f"{tuple(x.shape)}"
            )
        mean: torch.Tensor = self.mean  # type: ignore[assignment]  # registered buffers
        std: torch.Tensor = self.std  # type: ignore[assignment]
        return self.net((x - mean) / std)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        super()._apply(fn, recurse)
        # Rebuild the constants in the new dtype from the exact values, so that
        # model.double() normalises with float64 constants, not widened float32 ones.
        for name, values in (("mean", self._mean), ("std", self._std)):
            old = getattr(self, name)
            new = torch.tensor(values, dtype=old.dtype, device=old.device).view(1, 3, 1, 1)
            setattr(self, name, new)
        return self

    @property
    def convbn_report(self) -> ConvBNReport:
        """What :func:`advtune.tune` folded in the inner net."""
        return convbn_report(self.net)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, weights={self.weights!r}, convbn={self.convbn!r}"
