"""advtune: adversarial examples against frozen classifiers, fast and with little memory.

The core is :func:`tune`, which runs every Conv→BatchNorm block of a model in Tune mode
(BN folded into the conv weight on the fly) or in a leaner mode; attacks live in
:mod:`advtune.attacks`.
"""

from __future__ import annotations

from typing import Any

from advtune._version import __version__

__all__ = ["MODES", "ConvBNReport", "__version__", "convbn_report", "tune"]


def __getattr__(name: str) -> Any:
    # Imported on first use: ``import advtune.cli`` must not import torch, so the command
    # line can route Ctrl-C before the slow imports start.
    if name in ("MODES", "ConvBNReport", "convbn_report", "tune"):
        from advtune import convbn

        return getattr(convbn, name)
    raise AttributeError(f"module 'advtune' has no attribute {name!r}")
