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

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
import torchvision
from PIL import Image
from torch import nn

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


class TensorImages(torch.utils.data.Dataset):
    """An in-memory stand-in for ``ImageDataset``: 8-bit images, labels, relative paths.

    Has every attribute the evaluator reads of an ``ImageDataset``.
    """

    def __init__(
        self, n: int, *, size: int = 8, classes: int = 5, seed: int = 0, labeled: bool = True
    ) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randint(0, 256, (n, 3, size, size), generator=g).float() / 255
        self.labels = torch.randint(0, classes, (n,), generator=g).tolist()
        self.paths = [f"c{i % 2}/img{i:02d}.jpg" for i in range(n)]
        self.labeled = labeled
        self.skipped: list[tuple[str, str]] = []
        self.root = Path("fake-root")
        self.layout = "fake"

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        label = self.labels[i] if self.labeled else -1
        return {"image": self.images[i], "label": label, "index": i, "path": self.paths[i]}


SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def load_script(name: str) -> ModuleType:
    """Import ``scripts/<name>.py`` (scripts are not a package) as module ``name``."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def linear_classifier(
    seed: int = 0, *, size: int = 8, classes: int = 5, name: str = "tiny", categories: bool = True
) -> nn.Module:
    """A frozen linear classifier on ``(N, 3, size, size)`` images, seeded weights, no bias.

    Carries what the evaluator reads of a model: ``name``, ``num_classes`` and (with
    ``categories``) ``categories``.
    """
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(3 * size * size, classes)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(linear.weight.shape, generator=g) * 0.5)
        linear.bias.zero_()
    net = nn.Sequential(nn.Flatten(), linear).eval()
    net.requires_grad_(False)
    net.name = name
    if categories:
        net.categories = [f"class{i}" for i in range(classes)]
    net.num_classes = classes
    return net


class CountingModel(nn.Module):
    """Wraps a model and counts its forward calls and the images each one saw (to check
    an attack's ``model_calls`` and per-sample query budgets)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.sizes = net, []

    @property
    def calls(self) -> int:
        return len(self.sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(x.shape[0])
        return self.net(x)


class OOMAbove:
    """Wraps ``attack_batch``: a simulated ``torch.OutOfMemoryError`` for calls of more
    images than the current limit; ``limits[k]`` is the limit after k successful calls."""

    def __init__(self, real, limits):
        self.real, self.limits, self.sizes, self.ok = real, list(limits), [], 0

    def __call__(self, model, images, *args, **kwargs):
        self.sizes.append(images.shape[0])
        if images.shape[0] > self.limits[min(self.ok, len(self.limits) - 1)]:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB (sim)")
        self.ok += 1
        return self.real(model, images, *args, **kwargs)


def write_run_inputs(base: Path) -> tuple[Path, Path]:
    """A 3-class ImageNet folder and a seeded resnet18 checkpoint under ``base``."""
    data = write_imagenet_folder(base / "val")
    ckpt = write_checkpoint(base / "resnet18.pt", "resnet18", seed=1)
    return data, ckpt


def spy_autoattack_components(monkeypatch) -> list:
    """Record ``(registry name, kwargs)`` of every component ``autoattack`` calls.

    Returns the list that fills as the ensemble runs (``target`` and ``seeds`` left out).
    """
    import importlib

    module = importlib.import_module("advtune.attacks.autoattack")
    seen: list = []
    real_get = module.get

    def spying_get(name):
        fn = real_get(name)

        def spy(model, x, y, **kw):
            seen.append((name, {k: v for k, v in kw.items() if k not in ("target", "seeds")}))
            return fn(model, x, y, **kw)

        return spy

    monkeypatch.setattr(module, "get", spying_get)
    return seen
