"""Torch-version compatibility: every API that differs between supported torch versions.

The floor is ``pyproject.toml``'s ``torch`` requirement (README, "Install"); code
elsewhere in the package calls these helpers instead of branching on the version.

* ``torch.is_autocast_enabled(device_type)`` and ``torch.get_autocast_dtype(device_type)``
  take a device type from torch 2.4; before, there were per-device functions
  (``is_autocast_cpu_enabled``, ``get_autocast_gpu_dtype``, ...).
"""

from __future__ import annotations

import torch

__all__ = ["autocast_dtype", "autocast_enabled", "autocast_state"]

_DEVICE_ARGUMENT = hasattr(torch, "get_autocast_dtype")  # torch >= 2.4


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (``"cpu"``, ``"cuda"``, ...)."""
    if _DEVICE_ARGUMENT:
        return torch.is_autocast_enabled(device_type)
    if device_type == "cpu":  # torch < 2.4
        return torch.is_autocast_cpu_enabled()
    return torch.is_autocast_enabled()


def autocast_dtype(device_type: str) -> torch.dtype:
    """The dtype autocast computes in on ``device_type`` (whether or not it is on)."""
    if _DEVICE_ARGUMENT:
        return torch.get_autocast_dtype(device_type)
    if device_type == "cpu":  # torch < 2.4
        return torch.get_autocast_cpu_dtype()
    return torch.get_autocast_gpu_dtype()


def autocast_state(device_type: str) -> torch.dtype | None:
    """The autocast compute dtype on ``device_type``, or ``None`` if autocast is off."""
    return autocast_dtype(device_type) if autocast_enabled(device_type) else None
