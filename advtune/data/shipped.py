"""The data files shipped with advtune: ImageNet class ids and names, the RobustBench subset, the sample photos."""

from __future__ import annotations

import functools
from pathlib import Path

import torchvision

from advtune._resources import datasets_dir


@functools.cache
def _wnids() -> tuple[str, ...]:
    path = datasets_dir() / "imagenet_wnids.txt"
    wnids = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    if len(wnids) != 1000:
        raise RuntimeError(f"{path} lists {len(wnids)} WordNet ids, expected 1000")
    return wnids


@functools.cache
def _wnid_index() -> dict[str, int]:
    return {w: i for i, w in enumerate(_wnids())}


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet WordNet ids in class-index order (sorted, as torchvision uses)."""
    return list(_wnids())


def imagenet_categories() -> list[str]:
    """torchvision's 1000 ImageNet class names, in class-index order (no download)."""
    return list(torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def robustbench_subset() -> Path:
    """The RobustBench 5000-image ImageNet validation subset (``<wnid>/<file>`` lines)."""
    return datasets_dir() / "imagenet_val_5000_robustbench.txt"


def sample_dir() -> Path:
    """The folder of sample photos bundled with advtune."""
    return datasets_dir() / "sample"
