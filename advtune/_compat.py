"""Torch-version compatibility: the one place that knows which torch APIs exist.

The floor is ``pyproject.toml``'s ``torch`` requirement, the lowest version the tests
ran on (README, "Install"; ``.ci/lowest-torch``). Code elsewhere calls these helpers
instead of calling version-dependent torch APIs or branching on the version, so that
lowering the floor (after testing the lower version) is a change to this module only.

* ``torch.is_autocast_enabled(device_type)`` and ``torch.get_autocast_dtype(device_type)``
  take a device type since torch 2.4 (before: ``is_autocast_cpu_enabled``,
  ``get_autocast_gpu_dtype``, ...); the floor is above that, so they are called directly.
"""

from __future__ import annotations

import torch

__all__ = ["autocast_dtype", "autocast_enabled", "autocast_state"]


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (``"cpu"``, ``"cuda"``, ...)."""
    return torch.is_autocast_enabled(device_type)


def autocast_dtype(device_type: str) -> torch.dtype:
    """The dtype autocast computes in on ``device_type`` (whether or not it is on)."""
    return torch.get_autocast_dtype(device_type)


def autocast_state(device_type: str) -> torch.dtype | None:
    """The autocast compute dtype on ``device_type``, or ``None`` if autocast is off."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
