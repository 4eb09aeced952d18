"""Crash-safe output files: atomic writes, the per-image manifest, report JSON and PNGs.

Every file advtune writes goes through :func:`atomic_write_bytes`: the data lands in a
temporary file in the destination folder, is flushed to disk, then renamed over the
destination with :func:`os.replace` (atomic on POSIX and Windows). A run killed at any
moment leaves either the old or the new version of a file, never a torn one — this is
what makes ``--resume`` trustworthy.

The manifest is a CSV with one row per (image, eps). :class:`ManifestWriter` keeps the
rows in memory and rewrites the whole file atomically after every batch; rows are always
kept sorted by dataset index, so the file of an interrupted-then-resumed run is identical
to that of an uninterrupted one. Per-rank partial manifests (torchrun) are merged with
:func:`merge_manifests`.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "MANIFEST_COLUMNS",
    "ManifestWriter",
    "atomic_write_bytes",
    "atomic_write_text",
    "format_manifest",
    "merge_manifests",
    "parse_manifest",
    "read_json",
    "read_manifest",
    "row_key",
    "save_png",
    "write_json",
]

#: Manifest columns, in file order. The first seven are the documented core; the rest
#: make rows self-describing (dataset index, eps, target, confidences, pre-quantisation
#: success, where the PNG went).
MANIFEST_COLUMNS: tuple[str, ...] = (
    "path",
    "label",
    "clean_pred",
    "adv_pred",
    "success",
    "linf",
    "l2",
    "index",
    "eps",
    "target",
    "clean_conf",
    "adv_conf",
    "attack_success",
    "adv_path",
)

# Column types for parsing. Optional columns hold "" for None.
_INT_COLUMNS = frozenset({"label", "clean_pred", "adv_pred", "index"})
_OPT_INT_COLUMNS = frozenset({"target"})
_BOOL_COLUMNS = frozenset({"success", "attack_success"})
_FLOAT_COLUMNS = frozenset({"linf", "l2", "clean_conf", "adv_conf"})
_OPT_FLOAT_COLUMNS = frozenset({"eps"})


def _umask() -> int:
    """The process umask, read without changing it where the OS allows."""
    # os.umask can only be read by setting it; between the two calls another thread
    # creating a file would get a wrong mode, so prefer Linux's /proc when it says.
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, then rename).

    The file gets the mode a plain ``open(path, "w")`` would give it, ``0o666 & ~umask``
    (``mkstemp`` creates it ``0o600``, readable by its owner only).

    Args:
        path: destination file; its parent folder must exist.
        data: the complete new content.
    """
    path = Path(path)
    # The temporary file must live in the destination folder: os.replace is only atomic
    # within one file system.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # Before the rename: the file never appears under its name with the wrong mode.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        # Also on KeyboardInterrupt: never leave temporary files behind.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Atomically write UTF-8 text (see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return obj.as_posix()
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON: {obj!r}")


def _finite(obj: Any) -> Any:
    # JSON has no NaN/inf; metrics over empty sets are NaN, which we write as null.
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON (NaN and inf become ``null``)."""
    text = json.dumps(_finite(obj), indent=2, default=_json_default, allow_nan=False)
    atomic_write_text(path, text + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def save_png(path: str | os.PathLike[str], image: torch.Tensor) -> None:
    """Atomically save a uint8 image as a lossless PNG, creating parent folders.

    Args:
        path: destination ``.png`` file.
        image: ``(3, H, W)`` or ``(1, H, W)`` uint8 tensor (any device).
    """
    from PIL import Image

    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(
            f"save_png expects a (3, H, W) or (1, H, W) uint8 tensor, got "
            f"{tuple(image.shape)} {image.dtype}"
        )
    array = image.detach().cpu().permute(1, 2, 0).numpy()
    if array.shape[2] == 1:
        array = array[:, :, 0]
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue())


# --------------------------------------------------------------------------- manifest


def _format_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        # repr round-trips exactly, so metrics computed from a re-read manifest equal the
        # metrics computed from the in-memory rows.
        return repr(value)
    return str(value)


def _parse_value(column: str, text: str) -> Any:
    if column in _INT_COLUMNS:
        return int(text)
    if column in _OPT_INT_COLUMNS:
        return int(text) if text != "" else None
    if column in _BOOL_COLUMNS:
        if text not in ("0", "1"):
            raise ValueError(f"manifest column {column!r} must be 0 or 1, got {text!r}")
        return text == "1"
    if column in _FLOAT_COLUMNS:
        return float(text)
    if column in _OPT_FLOAT_COLUMNS:
        return float(text) if text != "" else None
    return text


def row_key(row: Mapping[str, Any]) -> tuple[int, float]:
    """Sort/identity key of a manifest row: (dataset index, eps; no eps sorts first)."""
    eps = row.get("eps")
    return (int(row["index"]), -1.0 if eps is None else float(eps))


def format_manifest(rows: Iterable[Mapping[str, Any]]) -> str:
    """Render rows as manifest CSV text (header included), in the given order."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(MANIFEST_COLUMNS)
    for row in rows:
        writer.writerow([_format_value(row.get(c)) for c in MANIFEST_COLUMNS])
    return buffer.getvalue()


def parse_manifest(text: str, *, source: str = "manifest") -> list[dict[str, Any]]:
    """Parse manifest CSV text into typed rows (ints, bools, floats, ``None``)."""
    reader = csv.DictReader(io.StringIO(text))
    fields = reader.fieldnames or []
    missing = [c for c in MANIFEST_COLUMNS if c not in fields]
    if missing:
        raise ValueError(f"{source} is not an advtune manifest: missing columns {missing}")
    rows = []
    for line_no, raw in enumerate(reader, start=2):
        try:
            rows.append({c: _parse_value(c, raw[c]) for c in MANIFEST_COLUMNS})
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}, line {line_no}: {e}") from e
    return rows


def read_manifest(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a manifest CSV; a missing file reads as no rows."""
    path = Path(path)
    if not path.exists():
        return []
    return parse_manifest(path.read_text(encoding="utf-8"), source=str(path))


class ManifestWriter:
    """The rows of one manifest file, rewritten atomically on every :meth:`extend`.

    Args:
        path: the CSV file (e.g. ``OUT/manifest.csv`` or a per-rank
            ``OUT/manifest.rank1.csv``).
        rows: rows already in the file (from :func:`read_manifest` when resuming).

    Rows are identified by :func:`row_key`; adding a row whose key is already present
    raises ``ValueError`` (a resumed run must never attack an image twice).
    """

    def __init__(self, path: str | os.PathLike[str], rows: Sequence[Mapping[str, Any]] = ()):
        self.path = Path(path)
        self._rows: dict[tuple[int, float], dict[str, Any]] = {}
        for row in rows:
            self._add(row)

    def _add(self, row: Mapping[str, Any]) -> None:
        key = row_key(row)
        if key in self._rows:
            raise ValueError(f"duplicate manifest row for index {key[0]}, eps {row.get('eps')}")
        self._rows[key] = dict(row)

    @property
    def rows(self) -> list[dict[str, Any]]:
        """All rows, sorted by (dataset index, eps)."""
        return [self._rows[k] for k in sorted(self._rows)]

    def __len__(self) -> int:
        return len(self._rows)

    def done_paths(self) -> set[str]:
        """Relative paths of the images that have rows."""
        return {row["path"] for row in self._rows.values()}

    def extend(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Add rows and atomically rewrite the file (sorted), so a kill loses nothing written."""
        for row in rows:
            self._add(row)
        self.flush()

    def flush(self) -> None:
        """Atomically (re)write the file with the current rows."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, format_manifest(self.rows))


def merge_manifests(
    sources: Iterable[str | os.PathLike[str]], dest: str | os.PathLike[str]
) -> list[dict[str, Any]]:
    """Merge partial manifests (e.g. one per torchrun rank) into one sorted manifest.

    Identical duplicate rows (a padded sampler giving a sample to two ranks) are kept
    once; two *different* rows for the same (index, eps) raise ``ValueError``.

    Returns:
        The merged rows, sorted by (dataset index, eps).
    """
    merged: dict[tuple[int, float], dict[str, Any]] = {}
    for source in sources:
        for row in read_manifest(source):
            key = row_key(row)
            if key in merged and merged[key] != row:
                raise ValueError(
                    f"conflicting manifest rows for index {key[0]} ({row['path']}) in {source}"
                )
            merged[key] = row
    rows = [merged[k] for k in sorted(merged)]
    atomic_write_text(dest, format_manifest(rows))
    return rows
