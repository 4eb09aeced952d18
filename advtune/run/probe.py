"""``--batch-size auto``: the largest batch the attack fits in free GPU memory."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from advtune._version import __version__
from advtune.run.batch import attack_batch
from advtune.run.loop import model_device
from advtune.run.spec import AttackConfig
from advtune.runtime import CPU_BATCH_SIZE

__all__ = ["auto_batch_size", "dataset_batch_size"]


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_name(index)
    return device.type


def auto_batch_size(
    model: nn.Module,
    config: AttackConfig,
    *,
    input_shape: Sequence[int],
    device: torch.device | str | None = None,
    key: Mapping[str, Any] | None = None,
    limit: int = 16384,
    cache_file: str | os.PathLike[str] | None = None,
    cpu_batch_size: int = CPU_BATCH_SIZE,
) -> int:
    """The largest batch the run loop can attack at once in free GPU memory.

    Probes :func:`~advtune.run.batch.attack_batch` itself — clean forward, the attack
    reduced to its cheapest per eps (``attack_kwargs(..., probe=True)``: memory does not
    grow with the step count, but does with the number of eps), 8-bit quantisation and the
    re-check — on random images, doubling then bisecting the batch and backing off on OOM
    (:func:`advtune.runtime.auto_batch_size`, which keeps 90 % of the largest size that
    fits). On a CPU nothing is probed: the answer is ``cpu_batch_size``.

    Args:
        model: the prepared model (ConvBN mode, AMP, channels_last, compile applied).
        config: the attack configuration.
        input_shape: ``(C, H, W)`` of one image.
        device: where the model runs (default: its parameters' device).
        key: what identifies the configuration besides the attack and the device (model
            name, ConvBN mode, AMP, channels_last, compile); ``None`` disables caching.
            The attack name, the input shape, the device name and the torch and advtune
            versions are added.
        limit: never more than this (the number of images: a larger batch only pads).
        cache_file: JSON file keeping answers across runs
            (:func:`advtune.runtime.default_batch_size_cache`); ``None``: this process.
        cpu_batch_size: the answer on a CPU (clamped to ``limit``).

    Returns:
        The batch size, ``1 <= size <= limit``.
    """
    from advtune import runtime

    device = torch.device(device) if device is not None else model_device(model)

    def step(m: nn.Module, x: torch.Tensor) -> None:
        x = (x * 255).round_().div_(255)  # 8-bit images, as the datasets give
        n = x.shape[0]
        unknown = torch.full((n,), -1, dtype=torch.long)
        attack_batch(m, x, unknown, range(n), [""] * n, config, probe=True)

    full_key = None
    if key is not None:
        full_key = {
            **dict(key),
            "attack": config.attack,
            "eps_count": len(config.eps or ()),  # each eps's results use memory too
            "input_shape": list(input_shape),
            "device": _device_name(device),
            "torch": torch.__version__,
            "advtune": __version__,
        }
    return runtime.auto_batch_size(
        model, input_shape=input_shape, device=device, step=step, key=full_key, limit=limit,
        cache_file=cache_file, cpu_batch_size=cpu_batch_size,
    )  # fmt: skip


def dataset_batch_size(
    model: nn.Module,
    config: AttackConfig,
    *,
    dataset: Any,
    transform: Any,
    device: torch.device | str | None = None,
    key: Mapping[str, Any] | None = None,
) -> int:
    """``--batch-size auto`` for a run over ``dataset``: :func:`auto_batch_size` on its
    images' shape, at most ``len(dataset)``, cached in
    :func:`advtune.runtime.default_batch_size_cache`.

    Args:
        model, config, device, key: as for :func:`auto_batch_size`.
        dataset: the run's dataset (``len``, ``root``, items ``{"image": (C, H, W)}`` or
            ``None`` for an undecodable file).
        transform: its preprocessing; an ``int`` ``crop_size`` gives the shape without
            decoding an image.

    Raises:
        UserError: no image of ``dataset`` decodes (its shape is needed).
    """
    from advtune import runtime
    from advtune.errors import UserError

    crop = getattr(transform, "crop_size", None)
    if isinstance(crop, int):
        input_shape: tuple[int, ...] = (3, crop, crop)
    else:  # a custom model's preprocessing: look at one image
        sample = next((s for s in (dataset[i] for i in range(len(dataset))) if s), None)
        if sample is None:
            raise UserError(f"no decodable image in {str(dataset.root)!r}")
        input_shape = tuple(sample["image"].shape)
    # Never more than the images: a larger batch would only be padding. The number of
    # images (not of those left to do) keeps the batch shape, and so the results, the
    # same on --resume.
    return auto_batch_size(
        model, config, input_shape=input_shape, device=device, key=key, limit=len(dataset),
        cache_file=runtime.default_batch_size_cache(),
    )  # fmt: skip
