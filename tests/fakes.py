"""Tiny stand-ins for ImageNet data and pretrained weights, shared by the end-to-end tests.

No ImageNet and no weights can be downloaded in the test environment, so the CLI, resume,
torchrun and script tests run on a few real JPEGs in an ImageNet class-folder layout and
on randomly initialised torchvision models saved as checkpoints (so every process, and
every reload, gets the very same weights).

Use from a test module (pytest puts ``tests/`` on ``sys.path``, as for ``digits``)::

    from fakes import write_checkpoint, write_imagenet_folder

    @pytest.fixture(scope="module")
    def imagenet(tmp_path_factory):
        return write_imagenet_folder(tmp_path_factory.mktemp("data") / "val")
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

from advtune.data import imagenet_wnids


def write_imagenet_folder(
    root: Path,
    *,
    classes: int = 3,
    per_class: int = 2,
    size: tuple[int, int] = (44, 38),
    seed: int = 0,
) -> Path:
    """Write ``root/<wnid>/<wnid>_<c><i>.JPEG``: real JPEGs with smooth random content.

    Each image is 6×7 random pixels upsampled bilinearly, so it survives JPEG coding and
    resizing like a photo would, yet costs nothing to decode. The same arguments always
    give byte-identical files.

    Args:
        root: Folder to create (must not exist yet).
        classes: Number of classes: the first ``classes`` ImageNet wnids, in order.
        per_class: Images per class.
        size: ``(width, height)`` of every image in pixels.
        seed: Seed of the pixel values.

    Returns:
        ``root``.
    """
    rng = np.random.default_rng(seed)
    for c, wnid in enumerate(imagenet_wnids()[:classes]):
        (root / wnid).mkdir(parents=True)
        for i in range(per_class):
            base = rng.integers(0, 256, size=(6, 7, 3), dtype=np.uint8)
            img = Image.fromarray(base).resize(size, Image.BILINEAR)
            img.save(root / wnid / f"{wnid}_{c}{i}.JPEG", quality=90)
    return root


def write_checkpoint(path: Path, name: str = "resnet18", *, seed: int = 0) -> Path:
    """Save the state_dict of a seeded, randomly initialised torchvision model to ``path``.

    The global torch RNG is seeded inside ``torch.random.fork_rng`` (torchvision's
    initialisers draw from it), so the caller's RNG state is left as it was.

    Args:
        path: Checkpoint file to write.
        name: torchvision model builder, e.g. ``"resnet18"``.
        seed: Seed of the initial weights.

    Returns:
        ``path``.
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = torchvision.models.get_model(name, weights=None)
    torch.save(net.state_dict(), path)
    return path
