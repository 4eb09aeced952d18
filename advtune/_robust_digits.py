"""Adversarially trained digits CNNs: robust models of known make for tests and benchmarks.

:func:`train_robust_digits_cnn` trains :class:`advtune._digits.DigitsCNN` with PGD
adversarial training (Madry et al., ICLR 2018) in an L∞ or L2 ball, in seconds to a
minute on one CPU core. The attack step runs the model in eval mode (advtune's attacks
refuse a training-mode BatchNorm), the weight update in training mode.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from advtune._digits import DigitsCNN, digits_dataset, train_digits_cnn

__all__ = ["ROBUST_RECIPES", "robust_digits_model", "train_robust_digits_cnn"]

#: name → (norm, training eps, epochs): the recipes the tests and benchmarks use.
ROBUST_RECIPES: dict[str, tuple[str, float, int]] = {
    "at-linf-8": ("linf", 8 / 255, 10),
    "at-l2-1": ("l2", 1.0, 10),
}


def train_robust_digits_cnn(
    norm: str, eps: float, *, epochs: int = 10, steps: int = 5, batch_size: int = 64, seed: int = 0
) -> dict[str, torch.Tensor]:
    """PGD adversarial training of :class:`DigitsCNN`; returns its ``state_dict``.

    Starts from the standard model's weights (:func:`advtune._digits.train_digits_cnn`,
    same ``seed``), then trains on PGD examples (``steps`` steps, random start, step
    ``2.5·eps/steps``) with Adam, all randomness from ``seed``.
    """
    from advtune.attacks import pgd

    x, y, _, _ = digits_dataset()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsCNN()
        model.load_state_dict(train_digits_cnn(seed=seed))
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        batches = (len(y) + batch_size - 1) // batch_size
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=epochs * batches)
        gen = torch.Generator().manual_seed(seed)
        for epoch in range(epochs):
            for b, idx in enumerate(torch.randperm(len(y), generator=gen).split(batch_size)):
                model.eval()
                seeds = torch.arange(len(idx)) + 1000 * (epoch * batches + b)
                adv = pgd(model, x[idx], y[idx], eps=eps, norm=norm, steps=steps, seeds=seeds).x_adv
                model.train()
                loss = nn.functional.cross_entropy(model(adv), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@functools.lru_cache(maxsize=4)
def _weights(name: str, path: str | None) -> dict[str, torch.Tensor]:
    from pathlib import Path

    if path is not None and Path(path).is_file():
        return torch.load(path, weights_only=True)
    norm, eps, epochs = ROBUST_RECIPES[name]
    state = train_robust_digits_cnn(norm, eps, epochs=epochs)
    if path is not None:
        torch.save(state, path)
    return state


def robust_digits_model(name: str, cache_dir: str | None = None) -> DigitsCNN:
    """An adversarially trained digits CNN of :data:`ROBUST_RECIPES`, eval mode, frozen.

    Args:
        name: A key of :data:`ROBUST_RECIPES`.
        cache_dir: Folder to keep the weights in between processes (trained once), or
            ``None`` to keep them in memory only.

    Raises:
        ValueError: Unknown ``name``.
    """
    if name not in ROBUST_RECIPES:
        raise ValueError(
            f"name must be one of {', '.join(map(repr, ROBUST_RECIPES))}; got {name!r}"
        )
    path = None
    if cache_dir is not None:
        path = f"{cache_dir}/robust-digits-{name}-torch{torch.__version__}.pt"
    model = DigitsCNN()
    model.load_state_dict(_weights(name, path))
    model.eval().requires_grad_(False)
    return model
