"""Constants shared by the data modules."""

from __future__ import annotations

import re
from typing import Any

Sample = dict[str, Any]  # image (3,H,W) float32, label int, index int, path str

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
    | {".ppm", ".pgm", ".pbm", ".pnm"}
)
LOC_CSV = "LOC_val_solution.csv"
DEVKIT_GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
DEVKIT_FOLDER = "ILSVRC2012_devkit_t12"
DEVKIT_WNIDS = "devkit_wnids.txt"
_WNID = re.compile(r"n\d{8}")
_VAL_NUMBER = re.compile(r"ILSVRC2012_val_(\d{8})")
_SHOW = 5  # how many offending names an error message lists


def _count(n: int, singular: str, plural: str | None = None) -> str:
    """``"1 image"``, ``"2 images"``."""
    return f"{n} {singular if n == 1 else plural or singular + 's'}"


def _listing(names: list[str]) -> str:
    """The first :data:`_SHOW` names, comma-separated, with ``", ..."`` if there are more."""
    return ", ".join(names[:_SHOW]) + (", ..." if len(names) > _SHOW else "")
