"""Locate the data files shipped with advtune.

The repository keeps them in the top-level ``datasets/`` and ``attacks/`` folders (data,
not Python). A wheel maps them to ``advtune/_datasets`` and ``advtune/_presets``; an
editable install or a source checkout reads them from the repository itself.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent
_REPO_DIR = _PACKAGE_DIR.parent


def _locate(installed: str, in_repo: str) -> Path:
    for candidate in (_PACKAGE_DIR / installed, _REPO_DIR / in_repo):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"advtune data folder not found: looked for {_PACKAGE_DIR / installed} "
        f"and {_REPO_DIR / in_repo}; reinstall advtune"
    )


def datasets_dir() -> Path:
    """The folder holding the class index, subset lists and the bundled sample."""
    return _locate("_datasets", "datasets")


def presets_dir() -> Path:
    """The folder holding the attack preset files (``*.toml``)."""
    return _locate("_presets", "attacks")
