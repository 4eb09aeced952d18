"""Crash-safe output files: atomic writes, the per-image manifest, report JSON and PNGs.

Every file advtune writes, except the manifest's appends, goes through
:func:`atomic_write_bytes`: the data lands in a temporary file in the destination folder,
is flushed to disk, then renamed over the destination with :func:`os.replace` (atomic on
POSIX and Windows). A run killed at any moment leaves either the old or the new version
of a file, never a torn one — this is what makes ``--resume`` trustworthy.

The manifest is a CSV with one row per (image, eps). :class:`ManifestWriter` appends each
batch's rows and fsyncs them (linear in the run's length); a kill mid-append leaves at
most one torn last line, which :func:`read_manifest` drops. Rows are kept sorted by
dataset index (an out-of-order batch is sorted in by :meth:`ManifestWriter.close`), so
the file of an interrupted-then-resumed run is identical to that of an uninterrupted one.
Per-rank partial manifests (torchrun) are merged with :func:`merge_manifests`.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import os
import re
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "MANIFEST_COLUMNS",
    "ManifestWriter",
    "TornManifestWarning",
    "atomic_write_bytes",
    "atomic_write_text",
    "file_sha256",
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
#: success, where the PNG went, and for an ensemble attack the component that broke the
#: sample: its name, ``"clean"`` if the clean image already counted as a success, ``""``
#: if none did or the attack is no ensemble), the sha256 of the PNG's bytes, which
#: ``--resume`` checks before it trusts a finished row, and the saved perturbation's L1
#: norm, ``""`` in rows written before that column).
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
    "broken_by",
    "adv_sha256",
    "l1",
)

#: Columns added after the first release: a manifest written before them (which a resume
#: reads) lacks them, and its rows get ``""`` there. A resumed run's first write rewrites
#: the whole file (:meth:`ManifestWriter.extend`), so it then has every column.
_LATER_COLUMNS = frozenset({"broken_by", "adv_sha256", "l1"})

# Column types for parsing. Optional columns hold "" for None.
_INT_COLUMNS = frozenset({"label", "clean_pred", "adv_pred", "index"})
_OPT_INT_COLUMNS = frozenset({"target"})
_BOOL_COLUMNS = frozenset({"success", "attack_success"})
_FLOAT_COLUMNS = frozenset({"linf", "l2", "clean_conf", "adv_conf"})
# ``l1`` is optional: a manifest written before the column existed has no value there.
_OPT_FLOAT_COLUMNS = frozenset({"eps", "l1"})
# Bounds of the numeric columns: predictions and labels are class indices (-1: unknown
# or non-finite logits), distances and budgets are finite and >= 0, a confidence is a
# probability or NaN (the row's logits were not finite). A value outside them was not
# written by advtune (an edited file) and would be a silent hole in a metric.
_INT_LOW = {"label": -1, "clean_pred": -1, "adv_pred": -1, "index": 0, "target": 0}
_CONFIDENCE_COLUMNS = frozenset({"clean_conf", "adv_conf"})
_SHA256 = re.compile(r"[0-9a-f]{64}")


#: Manifest files are UTF-8; file names that are not (POSIX allows any bytes) travel as
#: Python's surrogate escapes, so they round-trip through the file unchanged.
_ENCODING = ("utf-8", "surrogateescape")


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


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, then rename).

    The file gets the mode a plain ``open(path, "w")`` would give it, ``0o666 & ~umask``
    (``mkstemp`` creates it ``0o600``, readable by its owner only).

    Args:
        path: destination file; its parent folder must exist.
        data: the complete new content.
        fsync: flush the data to the disk before the rename (off only for benchmarks).
    """
    path = Path(path)
    # The temporary file must live in the destination folder: os.replace is only atomic
    # within one file system.
    # within one file system. Its name keeps a short prefix of the file's: the file's own
    # may be up to the 255-byte limit, which a longer temporary name would pass.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:64]}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        # Before the rename: the file never appears under its name with the wrong mode.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as e:
        # Also on KeyboardInterrupt: never leave temporary files behind.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise _naming(e, path) from e
        raise


def _naming(err: OSError, path: Path) -> OSError:
    """``err`` with ``path`` as its file name (so its message says which file failed).

    Disk full, ``ulimit -f`` (``EFBIG``) and the like surface as ``OSError`` from a write
    to a temporary file or descriptor, whose message names no file.
    """
    if err.filename is not None and err.filename == os.fspath(path):
        return err
    return OSError(err.errno, err.strerror or str(err), os.fspath(path))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Atomically write UTF-8 text (see :func:`atomic_write_bytes`).

    Surrogate escapes (from file names that are not UTF-8) are written as the bytes they
    stand for.
    """
    atomic_write_bytes(path, text.encode(*_ENCODING))


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


def save_png(path: str | os.PathLike[str], image: torch.Tensor) -> str:
    """Atomically save a uint8 image as a lossless PNG, creating parent folders.

    Args:
        path: destination ``.png`` file.
        image: ``(3, H, W)`` or ``(1, H, W)`` uint8 tensor (any device).

    Returns:
        The sha256 (hex) of the bytes written (the manifest's ``adv_sha256``).
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
    data = buffer.getvalue()
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | os.PathLike[str]) -> str | None:
    """The sha256 (hex) of a file's bytes; ``None`` when it cannot be read (or is no file)."""
    try:
        with open(path, "rb") as f:  # hashlib.file_digest needs Python 3.11
            digest = hashlib.sha256()
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
            return digest.hexdigest()
    except OSError:
        return None


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


def _parse_int(column: str, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"column {column!r} must be an integer, got {text!r}") from None
    low = _INT_LOW.get(column, 0)
    if value < low:
        raise ValueError(f"column {column!r} must be >= {low}, got {text!r}")
    return value


def _parse_float(column: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"column {column!r} must be a number, got {text!r}") from None
    if column in _CONFIDENCE_COLUMNS:
        if not (math.isnan(value) or 0.0 <= value <= 1.0):
            raise ValueError(f"column {column!r} must be in [0, 1] (or nan), got {text!r}")
    elif not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"column {column!r} must be a finite number >= 0, got {text!r}")
    return value


def _parse_value(column: str, text: str) -> Any:
    if column in _INT_COLUMNS:
        return _parse_int(column, text)
    if column in _OPT_INT_COLUMNS:
        return _parse_int(column, text) if text != "" else None
    if column in _BOOL_COLUMNS:
        if text not in ("0", "1"):
            raise ValueError(f"column {column!r} must be 0 or 1, got {text!r}")
        return text == "1"
    if column in _FLOAT_COLUMNS:
        return _parse_float(column, text)
    if column in _OPT_FLOAT_COLUMNS:
        return _parse_float(column, text) if text != "" else None
    if column == "path" and text == "":
        raise ValueError("column 'path' is empty")
    if column == "adv_sha256" and text and not _SHA256.fullmatch(text):
        raise ValueError(f"column 'adv_sha256' must be 64 hex digits, got {text!r}")
    return text


def row_key(row: Mapping[str, Any]) -> tuple[int, float]:
    """Sort/identity key of a manifest row: (dataset index, eps; no eps sorts first)."""
    eps = row.get("eps")
    return (int(row["index"]), -1.0 if eps is None else float(eps))


def _format_rows(rows: Iterable[Mapping[str, Any]], *, header: bool) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    # Python < 3.12 leaves a lone "\r" unquoted with a "\n" line end, which splits the
    # row when read back: such rows (a file name with a carriage return) are quoted whole.
    quoted = csv.writer(buffer, lineterminator="\n", quoting=csv.QUOTE_ALL)
    if header:
        writer.writerow(MANIFEST_COLUMNS)
    for row in rows:
        values = [_format_value(row.get(c)) for c in MANIFEST_COLUMNS]
        (quoted if any("\r" in v for v in values) else writer).writerow(values)
    return buffer.getvalue()


def format_manifest(rows: Iterable[Mapping[str, Any]]) -> str:
    """Render rows as manifest CSV text (header included), in the given order."""
    return _format_rows(rows, header=True)


class TornManifestWarning(UserWarning):
    """A manifest's last line was cut short (a run killed mid-write); it was dropped."""


def parse_manifest(
    text: str, *, source: str = "manifest", recover: bool = False
) -> list[dict[str, Any]]:
    """Parse manifest CSV text into typed rows (ints, bools, floats, ``None``).

    Every row is validated: it has one field per header column, each value has its
    column's type, ``index`` is ``>= 0``, ``path`` is not empty, and no two rows share a
    :func:`row_key`.

    Args:
        text: the whole file.
        source: names the file in error messages (``"<source>, line <n>: ..."``).
        recover: drop a torn last record (no final newline, or an unterminated quoted
            field at the end) with a :class:`TornManifestWarning`, as a run killed in the
            middle of an append leaves it. Rows are only ever appended whole and
            newline-terminated, so a last line without its newline is never complete.

    Raises:
        ValueError: not a manifest, or a bad row (the message names ``source`` and the
            line).
    """
    if recover and text and not text.endswith("\n"):
        cut = text.rfind("\n") + 1
        torn_line = text.count("\n") + 1
        warnings.warn(
            f"{source}, line {torn_line}: dropped a torn last line (a run was killed while "
            "writing it); its image will be attacked again on resume",
            TornManifestWarning,
            stacklevel=2,
        )
        text = text[:cut]
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    records = _records(reader, source=source, recover=recover)
    header = next(records, None)
    fields = header[1] if header is not None else []
    missing = [c for c in MANIFEST_COLUMNS if c not in fields and c not in _LATER_COLUMNS]
    if missing:
        raise ValueError(f"{source} is not an advtune manifest: missing columns {missing}")
    position = {c: fields.index(c) for c in MANIFEST_COLUMNS if c in fields}
    rows: list[dict[str, Any]] = []
    first_line: dict[tuple[int, float], int] = {}
    for line_no, raw in records:
        try:
            if len(raw) != len(fields):
                raise ValueError(f"expected {len(fields)} fields, got {len(raw)}")
            row = {
                c: _parse_value(c, raw[position[c]]) if c in position else ""
                for c in MANIFEST_COLUMNS
            }
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}, line {line_no}: {e}") from e
        key = row_key(row)
        if key in first_line:
            raise ValueError(
                f"{source}, line {line_no}: duplicate row for index {key[0]}, eps "
                f"{row['eps']} (first on line {first_line[key]})"
            )
        first_line[key] = line_no
        rows.append(row)
    return rows


def _records(reader: Any, *, source: str, recover: bool) -> Iterator[tuple[int, list[str]]]:
    """``(first line number, fields)`` per non-blank CSV record; csv errors name the line."""
    line = 1
    while True:
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            if recover and "unexpected end of data" in str(e):
                warnings.warn(
                    f"{source}, line {line}: dropped a torn last record (an unterminated "
                    "quoted field)",
                    TornManifestWarning,
                    stacklevel=3,
                )
                return
            raise ValueError(f"{source}, line {line}: {e}") from e
        if record:
            yield line, record
        line = reader.line_num + 1


def read_manifest(path: str | os.PathLike[str], *, recover: bool = True) -> list[dict[str, Any]]:
    """Read a manifest CSV; a missing file reads as no rows.

    A torn last line (a run killed mid-append) is dropped with a
    :class:`TornManifestWarning` (``recover=False``: it is an error). Rows come in file
    order: sorted, except in the file of a run still appending out of order (see
    :class:`ManifestWriter`).

    Raises:
        ValueError: the file cannot be read or decoded, is not a manifest, or holds a bad
            row; the message names the file (and the line).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as e:
        raise ValueError(f"cannot read manifest {str(path)!r}: {e.strerror or e}") from e
    return parse_manifest(data.decode(*_ENCODING), source=str(path), recover=recover)


class ManifestWriter:
    """The rows of one manifest file, appended to it batch by batch.

    Args:
        path: the CSV file (e.g. ``OUT/manifest.csv`` or a per-rank
            ``OUT/manifest.rank1.csv``).
        rows: rows already in the file (from :func:`read_manifest` when resuming; or use
            :meth:`resume`).
        fsync: flush each batch to the disk (off only for tests and benchmarks).
        keep_sorted: rewrite the file when a batch comes out of order, so it is sorted
            after every :meth:`extend` (``False``: only at :meth:`close`).

    Rows are identified by :func:`row_key`; adding a row whose key is already present
    raises ``ValueError`` (a resumed run must never attack an image twice).

    The file, how it grows:

    * The first :meth:`extend` writes the whole file atomically (header, the rows given
      here and the batch, sorted): a torn line left by a crash is gone from then on, and
      a file that held other rows is replaced, as before.
    * Every later :meth:`extend` appends the batch's rows (sorted) in one write, then
      flushes and fsyncs: the cost is that of the batch, not of the file, so a 50,000
      image run writes its manifest in linear time. A kill mid-write leaves at most one
      torn last line, which :func:`read_manifest` drops (the row's image is attacked
      again on resume); rows are written after their PNGs, so every complete row has one.
    * While each batch's keys lie above every key on disk (a sequential run, or a resume
      of one) the file stays sorted, byte for byte what a rewrite would give. A batch
      that does not (e.g. resuming a torchrun run's scattered rows) is, by default
      (``keep_sorted=True``), sorted in by an atomic rewrite of the whole file, so the
      file is sorted after every call. With ``keep_sorted=False`` it is appended too, and
      :meth:`close` rewrites the file sorted, once; until then the rows are all there
      but out of order (:attr:`sorted_on_disk` is ``False``). Use that (and call
      :meth:`close`, e.g. as a context manager, when the run ends) to stay linear then.
    * Before appending, the file's size and inode are checked against what this writer
      last left there: a file replaced, truncated or grown by someone else (another run
      on the same folder) raises :class:`~advtune.errors.UserError` instead of mixing
      two runs' rows.

    Append cost (``python scripts/bench_manifest.py``, 2026-12-01, 2 shared CPU cores,
    medians of interleaved repeats in one process, 32-row batches, fsync on): flat at
    about the cost of one fsync for 1k, 10k and 50k rows on disk; see
    ``docs/data_and_models.md`` for the numbers.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        rows: Sequence[Mapping[str, Any]] = (),
        *,
        fsync: bool = True,
        keep_sorted: bool = True,
    ):
        self.path = Path(path)
        self._fsync = fsync
        self._keep_sorted = keep_sorted
        self._rows: dict[tuple[int, float], dict[str, Any]] = {}
        self._sorted_cache: list[dict[str, Any]] | None = None
        # What this writer last left on disk: (st_ino, size), None before its first write.
        self._disk: tuple[int, int] | None = None
        self._max_on_disk: tuple[int, float] | None = None
        self._sorted_on_disk = True
        for row in rows:
            self._add(row)

    @classmethod
    def resume(
        cls, path: str | os.PathLike[str], *, fsync: bool = True, keep_sorted: bool = True
    ) -> ManifestWriter:
        """A writer holding the rows already in ``path`` (a torn last line dropped).

        Raises:
            ValueError: the file is unreadable or holds a bad row (names file and line).
        """
        return cls(path, read_manifest(path), fsync=fsync, keep_sorted=keep_sorted)

    def _add(self, row: Mapping[str, Any]) -> None:
        key = row_key(row)
        if key in self._rows:
            raise ValueError(self._duplicate(row))
        self._rows[key] = dict(row)
        self._sorted_cache = None

    def _duplicate(self, row: Mapping[str, Any]) -> str:
        return (
            f"duplicate manifest row for index {row['index']}, eps {row.get('eps')} "
            f"({row.get('path')}) in {str(self.path)!r}"
        )

    @property
    def rows(self) -> list[dict[str, Any]]:
        """All rows, sorted by (dataset index, eps)."""
        if self._sorted_cache is None:
            self._sorted_cache = [self._rows[k] for k in sorted(self._rows)]
        return list(self._sorted_cache)

    @property
    def sorted_on_disk(self) -> bool:
        """Whether the file holds its rows sorted (``False`` until :meth:`close` after an
        out-of-order batch)."""
        return self._sorted_on_disk

    def __len__(self) -> int:
        return len(self._rows)

    def __enter__(self) -> ManifestWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def done_paths(self) -> set[str]:
        """Relative paths of the images that have rows."""
        return {row["path"] for row in self._rows.values()}

    def extend(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Add rows and make them durable (see the class docs), so a kill loses nothing.

        Raises:
            ValueError: a row's key is already present (nothing is added then).
            UserError: the file was changed by someone else since this writer wrote it.
            OSError: the write failed (disk full, file size limit, ...); the batch is not
                added, and the file holds the rows it held before.
        """
        batch = sorted((dict(r) for r in rows), key=row_key)
        seen: set[tuple[int, float]] = set()
        for row in batch:  # check the whole batch first: all or nothing is added
            key = row_key(row)
            if key in self._rows or key in seen:
                raise ValueError(self._duplicate(row))
            seen.add(key)
        for row in batch:
            self._rows[row_key(row)] = row
        self._sorted_cache = None
        try:
            in_order = (
                self._max_on_disk is None or not batch or row_key(batch[0]) > self._max_on_disk
            )
            if self._disk is None or (self._keep_sorted and not in_order):
                self.flush()
            elif batch:
                self._append(batch)
        except BaseException:
            # Memory mirrors the disk: rows that did not reach it are not done.
            for key in seen:
                del self._rows[key]
            self._sorted_cache = None
            raise

    def _append(self, batch: list[dict[str, Any]]) -> None:
        data = _format_rows(batch, header=False).encode(*_ENCODING)
        # Unbuffered, so a failed write leaves no buffer behind to retry at close.
        with open(self.path, "ab", buffering=0) as f:
            st = os.fstat(f.fileno())
            if self._disk != (st.st_ino, st.st_size):
                from advtune.errors import UserError

                expected = self._disk[1] if self._disk else 0
                raise UserError(
                    f"manifest {str(self.path)!r} was changed by another process since this "
                    f"run last wrote it ({expected} bytes expected, {st.st_size} found); "
                    "is another run using the same output folder?"
                )
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(f.fileno(), view) :]
                if self._fsync:
                    os.fsync(f.fileno())
            except BaseException as e:
                # A failed write (EFBIG, ENOSPC) may have left part of the batch: cut it,
                # so the file keeps whole rows and the next append finds the size it expects.
                with contextlib.suppress(OSError):
                    os.ftruncate(f.fileno(), st.st_size)
                if isinstance(e, OSError):
                    raise _naming(e, self.path) from e
                raise
        self._disk = (st.st_ino, st.st_size + len(data))
        first, last = row_key(batch[0]), row_key(batch[-1])
        if self._max_on_disk is not None and first <= self._max_on_disk:
            self._sorted_on_disk = False
        if self._max_on_disk is None or last > self._max_on_disk:
            self._max_on_disk = last

    def flush(self) -> None:
        """Atomically (re)write the whole file with the current rows, sorted."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = format_manifest(self.rows).encode(*_ENCODING)
        atomic_write_bytes(self.path, data, fsync=self._fsync)
        st = os.stat(self.path)
        self._disk = (st.st_ino, st.st_size)
        self._max_on_disk = max(self._rows) if self._rows else None
        self._sorted_on_disk = True

    def close(self) -> None:
        """Rewrite the file sorted if a batch was appended out of order (else nothing)."""
        if not self._sorted_on_disk:
            self.flush()


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
