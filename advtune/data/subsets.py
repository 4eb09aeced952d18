"""Subset files: which images of a folder a run uses."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from advtune._resources import datasets_dir
from advtune.data.constants import _count, _listing
from advtune.errors import UserError


def resolve_subset_path(subset: str | os.PathLike) -> Path:
    """The subset file ``subset`` names, from any working directory.

    A path that exists is used as given. A relative one starting with ``datasets/`` that
    does not exist here is looked up in advtune's packaged ``datasets`` folder, so the
    README's ``--subset datasets/imagenet_val_5000_robustbench.txt`` works outside the
    repository too.

    Raises:
        UserError: no such file; the message lists every path tried.
    """
    path = Path(subset).expanduser()
    if path.is_file():
        return path
    tried = [str(path)]
    parts = Path(subset).parts
    if not path.is_absolute() and len(parts) > 1 and parts[0] == "datasets":
        packaged = datasets_dir().joinpath(*parts[1:])
        if packaged.is_file():
            return packaged
        tried.append(str(packaged))
    what = "is not a file" if path.exists() else "not found"
    raise UserError(f"subset file {str(subset)!r} {what} (tried {', '.join(tried)})")


def _read_subset(subset: str | os.PathLike | Sequence[str]) -> list[str]:
    if isinstance(subset, (str, os.PathLike)):
        path = resolve_subset_path(subset)
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"cannot read subset file {str(subset)!r}: {err}") from err
        source = str(subset)
    else:
        lines, source = list(subset), "the subset"
    entries = []
    for line in lines:
        entry = line.split("#", 1)[0].strip().replace("\\", "/").removeprefix("./")
        if entry:
            entries.append(entry)
    if not entries:
        raise UserError(f"{source!r} lists no image paths")
    return list(dict.fromkeys(entries))  # drop repeats, keep order


def _apply_subset(files: list[str], entries: list[str], *, by_name: bool) -> list[str]:
    if by_name:
        index = {Path(f).name: f for f in files}
        keys = [Path(e).name for e in entries]
    else:
        index = {f: f for f in files}
        keys = entries
    missing = [e for e, k in zip(entries, keys) if k not in index]
    if missing:
        raise UserError(
            f"{len(missing)} of {_count(len(entries), 'subset entry', 'subset entries')} "
            f"{'is' if len(missing) == 1 else 'are'} not in the data folder: " + _listing(missing)
        )
    return list(dict.fromkeys(index[k] for k in keys))
