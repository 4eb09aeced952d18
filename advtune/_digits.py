"""A small BatchNorm CNN trained on scikit-learn's digits (ships offline), for real-data
tests and for ``scripts/gpu_targets.py``'s success measurement (needs scikit-learn).

The 8×8 grey digits are upsampled to 32×32 RGB in [0, 1]; the model normalises inside,
like every advtune model. Training takes 10–20 s on a 2-core CPU; the state_dict is
cached under pytest's cache directory, keyed by :data:`VERSION` (bump it when the data,
the architecture or the recipe changes). Training seeds the torch RNG inside
``torch.random.fork_rng`` so the caller's global RNG state is left as it was.

Use from a test module (``tests/digits.py`` re-exports it)::

    from digits import digits_model, digits_test_set

    @pytest.fixture(scope="session")
    def digits(request):
        return digits_model(getattr(request.config, "cache", None)), digits_test_set()
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from torch import nn

VERSION = "digits-cnn-v1"
SIZE = 32
TEST_SAMPLES = 200
_MEAN = 0.31  # approximate pixel mean/std of the upsampled digits, used inside the model
_STD = 0.33


class DigitsCNN(nn.Module):
    """Three Conv→BN→ReLU blocks and a linear head; input ``(N, 3, 32, 32)`` in [0, 1]."""

    def __init__(self) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
            conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
            return [conv, nn.BatchNorm2d(cout), nn.ReLU()]

        # The strided first conv keeps training to seconds on one CPU core.
        self.features = nn.Sequential(
            *block(3, 16, stride=2),  # 16x16
            *block(16, 32),
            nn.MaxPool2d(2),  # 8x8
            *block(32, 32),
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features((x - _MEAN) / _STD).flatten(1))


class DigitsMLP(nn.Module):
    """A one-hidden-layer MLP on the flattened image (another architecture, for transfer
    tests); input ``(N, 3, 32, 32)`` in [0, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(3 * SIZE * SIZE, 256), nn.ReLU(), nn.Linear(256, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - _MEAN) / _STD)


class DigitsWideCNN(nn.Module):
    """A wider CNN with 5×5 kernels and no BatchNorm (another architecture, for transfer
    tests); input ``(N, 3, 32, 32)`` in [0, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 48, 5, stride=2, padding=2), nn.ReLU(),  # 16x16
            nn.Conv2d(48, 64, 5, padding=2), nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )  # fmt: skip
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features((x - _MEAN) / _STD).flatten(1))


#: The trainable architectures by name.
ARCHITECTURES: dict[str, type[nn.Module]] = {
    "cnn": DigitsCNN,
    "mlp": DigitsMLP,
    "wide": DigitsWideCNN,
}


def _build(architecture: str) -> nn.Module:
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"architecture must be one of {', '.join(ARCHITECTURES)}; got {architecture!r}"
        )
    return ARCHITECTURES[architecture]()


@functools.lru_cache(maxsize=1)
def digits_dataset() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_test, y_test)``: 32×32 RGB digits in [0, 1], 8-bit levels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # (N,1,8,8)
    images = nn.functional.interpolate(
        images, size=(SIZE, SIZE), mode="bilinear", align_corners=False
    )
    # Quantise to 8 bits like real images; bilinear stays within [0, 1].
    images = (images.clamp(0, 1) * 255).round() / 255
    images = images.expand(-1, 3, -1, -1).contiguous()
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.from_numpy(np.random.default_rng(0).permutation(len(labels)))
    test, train = order[:TEST_SAMPLES], order[TEST_SAMPLES:]
    return images[train], labels[train], images[test], labels[test]


def digits_test_set() -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out ``(x, y)``: ``(200, 3, 32, 32)`` float32 in [0, 1] and ``(200,)`` labels."""
    _, _, x, y = digits_dataset()
    return x.clone(), y.clone()


def train_digits_cnn(
    epochs: int = 6, batch_size: int = 64, *, seed: int = 0, architecture: str = "cnn"
) -> dict[str, torch.Tensor]:
    """Train :class:`DigitsCNN` (or another of :data:`ARCHITECTURES`) from ``seed`` and
    return its ``state_dict`` (the CNN reaches ~98% test accuracy)."""
    x, y, _, _ = digits_dataset()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _build(architecture)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        batches = (len(y) + batch_size - 1) // batch_size
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=epochs * batches)
        gen = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(epochs):
            for idx in torch.randperm(len(y), generator=gen).split(batch_size):
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


_MODEL_CACHE: dict[str, dict[str, torch.Tensor]] = {}


def digits_model(cache=None, *, architecture: str = "cnn", seed: int = 0) -> nn.Module:
    """The trained digits CNN in eval mode with ``requires_grad=False`` (a fresh copy).

    Args:
        cache: ``request.config.cache`` (pytest) to keep the weights between sessions,
            or ``None`` to keep them in memory only.
        architecture: ``"cnn"`` (:class:`DigitsCNN`), ``"mlp"`` (:class:`DigitsMLP`) or
            ``"wide"`` (:class:`DigitsWideCNN`).
        seed: Training seed (other seeds: other models of the same architecture).
    """
    key = VERSION if (architecture, seed) == ("cnn", 0) else f"{VERSION}-{architecture}-s{seed}"
    if key not in _MODEL_CACHE:
        path: Path | None = None
        if cache is not None:
            path = Path(cache.mkdir("advtune-digits")) / f"{key}-torch{torch.__version__}.pt"
        if path is not None and path.is_file():
            _MODEL_CACHE[key] = torch.load(path, weights_only=True)
        else:
            _MODEL_CACHE[key] = train_digits_cnn(seed=seed, architecture=architecture)
            if path is not None:
                torch.save(_MODEL_CACHE[key], path)
    model = _build(architecture)
    model.load_state_dict(_MODEL_CACHE[key])
    model.eval().requires_grad_(False)
    return model
