"""An output folder: lock, resume check, manifest, PNGs, ``report.json`` and the plot.

* One run per folder at a time: :meth:`OutputDir.lock` takes an advisory
  ``fcntl.flock`` on ``OUT/.advtune.lock`` (the OS drops it when the process dies, so a
  crashed run never leaves it stuck).
* ``--overwrite`` and ``--resume`` only ever touch paths inside the folder, whatever the
  manifest says: :func:`inside` refuses absolute paths, ``..`` and symlinks that lead out.
* Per-rank manifests of a killed torchrun run (``manifest.rank{r}-of-{W}.csv``) are folded
  into ``manifest.csv`` on ``--resume`` (:func:`consolidate`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from advtune.errors import UserError
from advtune.run.batch import BatchOutput
from advtune.storage import (
    ManifestWriter,
    atomic_write_text,
    file_sha256,
    format_manifest,
    read_json,
    read_manifest,
    row_key,
    save_png,
    write_json,
)

__all__ = [
    "ADV_DIR",
    "LOCK_NAME",
    "MANIFEST_NAME",
    "PLOT_NAME",
    "REPORT_NAME",
    "OutputDir",
    "adv_relpaths",
    "config_differences",
    "consolidate",
    "inside",
    "merge_rows",
    "partial_manifest_name",
    "partial_manifests",
    "stored_run_matches",
]

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.csv"
REPORT_NAME = "report.json"
PLOT_NAME = "robust_accuracy.png"
ADV_DIR = "adv"
LOCK_NAME = ".advtune.lock"
_PARTIAL_GLOB = "manifest.rank*-of-*.csv"
# Partial reports of older versions (no longer written); removed with the manifests.
_OLD_PARTIAL_REPORT_GLOB = "report.rank*-of-*.json"


def adv_relpaths(paths: Iterable[str]) -> dict[str, str]:
    """Relative PNG path under ``adv/`` for each image path (``a/b.JPEG`` → ``a/b.png``).

    When two images would collide (``x.jpg`` and ``x.png``), both keep their full name
    plus ``.png`` instead.
    """
    paths = list(paths)
    plain = {p: PurePosixPath(p).with_suffix(".png").as_posix() for p in paths}
    counts: dict[str, int] = {}
    for target in plain.values():
        counts[target] = counts.get(target, 0) + 1
    return {p: _fit_name(t if counts[t] == 1 else f"{p}.png", p) for p, t in plain.items()}


#: Longest file name (bytes) on common file systems (ext4, XFS, APFS, NTFS in UTF-16 units).
_NAME_MAX = 255


def _fit_name(target: str, source: str) -> str:
    """``target`` with a last component too long for the file system shortened: a prefix
    of it plus a hash of the image's path (so two long names stay apart)."""
    folder, _, name = target.rpartition("/")
    if len(name.encode("utf-8", "surrogateescape")) <= _NAME_MAX:
        return target
    digest = hashlib.sha256(source.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    head = name.encode("utf-8", "surrogateescape")[:160].decode("utf-8", "ignore")
    short = f"{head}-{digest}.png"
    return f"{folder}/{short}" if folder else short


def inside(root: Path, relative: str) -> Path | None:
    """``root / relative`` when that stays inside ``root``, else ``None``.

    Refuses absolute paths, ``..`` components and paths whose resolved location (after
    symlinks) leaves ``root``.
    """
    if not relative:
        return None
    rel = PurePosixPath(relative.replace("\\", "/"))
    if rel.is_absolute() or ".." in rel.parts or os.path.isabs(relative):
        return None
    path = root / Path(*rel.parts)
    base = root.resolve()
    try:
        path.parent.resolve().relative_to(base)
        # A symlink at the last component is replaced or removed, never followed (nor
        # read): the link itself lies inside, whatever it points to.
        if not path.is_symlink():
            path.resolve().relative_to(base)
    except (ValueError, OSError, RuntimeError):  # RuntimeError: a symlink loop (3.10-3.12)
        return None
    return path


def _with_default_params(stored: Mapping[str, Any]) -> Mapping[str, Any]:
    """``stored`` with the attack parameters it lacks filled in with their defaults.

    Reports written before every effective hyperparameter was recorded hold only the
    ones that were given; a missing one had its default (a ``--resume`` of such a run
    compares equal to the same run today).
    """
    from advtune.run.spec import effective_params

    attack = stored.get("attack")
    if not isinstance(attack, Mapping) or not isinstance(attack.get("params"), Mapping):
        return stored
    name, norm = attack.get("attack"), attack.get("norm")
    if not isinstance(name, str) or not isinstance(norm, (str, type(None))):
        return stored
    filled = effective_params(name, norm, attack["params"])
    return {**stored, "attack": {**attack, "params": filled}}


def _check_row_eps(rows: Iterable[Mapping[str, Any]], config: Mapping[str, Any], *, source: str):
    """Every resumed row's eps must be one of the run's (an edited manifest is refused)."""
    attack = config.get("attack")
    eps = attack.get("eps") if isinstance(attack, Mapping) else None
    allowed = set(eps) if eps else {None}
    for row in rows:
        if row.get("eps") not in allowed:
            shown = sorted(e for e in allowed if e is not None)
            raise UserError(
                f"cannot resume: {source} has a row for {row['path']!r} (index "
                f"{row['index']}) with eps {row.get('eps')!r}, but this run's eps are {shown}"
            )


def config_differences(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two (nested) config dicts."""
    out: list[str] = []
    for key in sorted(set(stored) | set(current)):
        a, b = stored.get(key, "<missing>"), current.get(key, "<missing>")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out.extend(f"{key}.{sub}" for sub in config_differences(a, b))
        elif a != b:
            out.append(key)
    return out


def stored_run_matches(stored: Any, current: Mapping[str, Any]) -> bool:
    """Whether a stored ``report["config"]`` is the run ``current`` describes, compared
    as ``--resume`` compares them (older reports' missing defaults filled in)."""
    if not isinstance(stored, Mapping):
        return False
    return not config_differences(_with_default_params(stored), current)


def _lookup(d: Mapping[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, Mapping) or part not in d:
            return "<missing>"
        d = d[part]
    return d


def _same_row(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    # repr: NaN confidences (non-finite logits) compare equal to themselves.
    return {k: repr(v) for k, v in a.items()} == {k: repr(v) for k, v in b.items()}


def merge_rows(
    groups: Iterable[Iterable[Mapping[str, Any]]], *, source: str
) -> list[dict[str, Any]]:
    """Union of row groups keyed by (index, eps), sorted; identical duplicates kept once.

    Raises:
        UserError: two different rows for one (index, eps).
    """
    merged: dict[tuple[int, float], dict[str, Any]] = {}
    for group in groups:
        for row in group:
            key = row_key(row)
            if key in merged and not _same_row(merged[key], row):
                raise UserError(
                    f"conflicting results for image {row['path']!r} (index {key[0]}) in "
                    f"{source}; remove the folder's partial manifests or use --overwrite"
                )
            merged[key] = dict(row)
    return [merged[k] for k in sorted(merged)]


def partial_manifest_name(rank: int, world_size: int) -> str:
    """The file name of one torchrun rank's manifest."""
    return f"manifest.rank{rank}-of-{world_size}.csv"


def partial_manifests(out_dir: str | Path) -> list[Path]:
    """Per-rank manifests in ``out_dir`` (any world size), sorted."""
    return sorted(Path(out_dir).glob(_PARTIAL_GLOB))


def _remove_adv(root: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """Delete the PNGs ``rows`` list, only inside ``root/adv``."""
    adv = root / ADV_DIR
    skipped = 0
    for row in rows:
        if not row.get("adv_path"):
            continue
        path = inside(adv, row["adv_path"]) if adv.is_dir() and not adv.is_symlink() else None
        if path is None:
            skipped += 1
            continue
        path.unlink(missing_ok=True)
    if skipped:
        warnings.warn(
            f"left {skipped} file(s) that the manifest lists outside {adv} alone",
            stacklevel=2,
        )


def consolidate(out_dir: str | Path, *, resume: bool, overwrite: bool) -> None:
    """Deal with per-rank manifests that an interrupted torchrun run left in ``out_dir``.

    * ``resume``: their rows are merged into ``manifest.csv`` (atomically, sorted), then
      the partial files are removed; the run continues with any world size.
    * ``overwrite``: they are removed, with the PNGs their rows list.
    * neither: a :class:`UserError` if they hold any rows (results would be lost).

    Raises:
        UserError: see above; unreadable or conflicting partial manifests.
    """
    root = Path(out_dir)
    manifests = partial_manifests(root)
    old_reports = sorted(root.glob(_OLD_PARTIAL_REPORT_GLOB))
    if not manifests and not old_reports:
        return
    if resume and overwrite:
        raise UserError("--resume and --overwrite exclude each other")
    groups = []
    for path in manifests:
        try:
            groups.append(read_manifest(path))
        except ValueError as e:
            raise UserError(f"cannot read partial manifest {str(path)!r}: {e}") from e
    has_rows = any(groups)
    if overwrite:
        for rows in groups:
            _remove_adv(root, rows)
    elif has_rows and not resume:
        raise UserError(
            f"output folder {str(root)!r} already holds results (partial manifests of a "
            "torchrun run); pass --resume to continue that run, --overwrite to replace "
            "it, or choose another --out"
        )
    elif has_rows:
        merged_path = root / MANIFEST_NAME
        try:
            existing = read_manifest(merged_path)
        except ValueError as e:
            raise UserError(f"cannot resume: {e}") from e
        rows = merge_rows([existing, *groups], source=str(root))
        atomic_write_text(merged_path, format_manifest(rows))
        log.info("merged %d partial manifest(s) into %s", len(manifests), merged_path)
    # Only now, with every row safe in manifest.csv (or deliberately dropped).
    for path in [*manifests, *old_reports]:
        path.unlink(missing_ok=True)


#: Lock descriptors this process holds. An flock belongs to the open file, which a fork
#: shares: a child closes its copies at once, so the lock lives exactly as long as the
#: process that took it (a kill -9 frees it even while DataLoader workers still exit).
_HELD: set[int] = set()


def _close_held_locks() -> None:
    for fd in list(_HELD):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_held_locks)


class OutputDir:
    """An output folder: ``manifest.csv``, ``report.json``, ``adv/`` and the plot.

    Args:
        root: the folder (created if needed).

    Raises:
        UserError: the folder cannot be created or written.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            # A unique probe name: torchrun ranks probe the same folder at the same time.
            fd, probe = tempfile.mkstemp(prefix=".advtune-write-test.", dir=self.root)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            reason = e.strerror or type(e).__name__
            raise UserError(f"output folder {str(self.root)!r} is not writable: {reason}") from e
        self.manifest_path = self.root / MANIFEST_NAME
        self.report_path = self.root / REPORT_NAME
        self.adv_dir = self.root / ADV_DIR
        self.plot_path = self.root / PLOT_NAME
        # Appends only, even out of order (a resumed torchrun run); the run loop's close()
        # sorts the file once at the end.
        self.writer = ManifestWriter(self.manifest_path, keep_sorted=False)
        self.previous_report: dict[str, Any] | None = None
        self._lock_fd: int | None = None

    # ------------------------------------------------------------------ lock

    def lock(self) -> None:
        """Take the folder's advisory lock for this process (released by :meth:`unlock`
        or when the process ends, however it ends).

        Raises:
            UserError: another run holds it.
        """
        import fcntl

        path = self.root / LOCK_NAME
        # O_CLOEXEC: a program this run starts does not hold the lock; _HELD: neither
        # does a forked child (DataLoader workers), which would keep it for seconds after
        # a kill -9 of this process.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 64).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise UserError(
                f"output folder {str(self.root)!r} is in use by another advtune run (pid "
                f"{holder}); wait for it to finish or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        self._lock_fd = fd
        _HELD.add(fd)

    def unlock(self) -> None:
        """Release the lock taken by :meth:`lock` (no-op without one)."""
        if self._lock_fd is not None:
            _HELD.discard(self._lock_fd)
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
            self._lock_fd = None

    # ------------------------------------------------------------------ start

    def has_results(self) -> bool:
        """Whether the folder holds manifest rows (a run without any has nothing to keep)."""
        try:
            return bool(read_manifest(self.manifest_path))
        except ValueError:
            return True  # not ours to parse: protect it

    def _check_layout(self) -> None:
        for path in (self.manifest_path, self.report_path, self.plot_path):
            if path.is_dir():
                raise UserError(
                    f"{str(path)!r} is a folder, not a file; move it away or choose another --out"
                )
        if self.adv_dir.is_symlink():
            raise UserError(
                f"{str(self.adv_dir)!r} is a symlink; advtune writes only inside --out: "
                "remove it or choose another --out"
            )

    def start(self, config: Mapping[str, Any], *, resume: bool, overwrite: bool) -> None:
        """Check the folder against ``config`` and load rows to resume from.

        Per-rank manifests of an interrupted torchrun run are folded in first
        (:func:`consolidate`).

        Raises:
            UserError: results exist and neither ``resume`` nor ``overwrite``; on resume,
                a stored config that differs in anything that changes results, a
                manifest without its report, or rows listing files outside the folder.
        """
        if resume and overwrite:
            raise UserError("--resume and --overwrite exclude each other")
        self._check_layout()
        consolidate(self.root, resume=resume, overwrite=overwrite)
        if not self.has_results():
            self._clear()  # a stale report of a run that attacked nothing
            return
        if overwrite:
            self._clear()
            return
        if not resume:
            raise UserError(
                f"output folder {str(self.root)!r} already holds results; pass --resume to "
                "continue that run, --overwrite to replace it, or choose another --out"
            )
        if not self.report_path.exists():
            raise UserError(
                f"cannot resume: {str(self.manifest_path)!r} exists but "
                f"{str(self.report_path)!r} does not"
            )
        try:
            stored = read_json(self.report_path)
            stored_config = stored["config"]
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
            # RecursionError: JSON nested deeper than the parser's stack (a file that
            # advtune did not write).
            reason = "nested too deeply" if isinstance(e, RecursionError) else str(e)
            raise UserError(
                f"cannot resume: {str(self.report_path)!r} is unreadable ({reason})"
            ) from None
        if not isinstance(stored_config, Mapping):
            raise UserError(
                f"cannot resume: {str(self.report_path)!r} is unreadable (its 'config' is "
                f"{type(stored_config).__name__}, not an object)"
            )
        stored_config = _with_default_params(stored_config)
        diffs = config_differences(stored_config, config)
        if diffs:
            shown = "; ".join(
                f"{k}: {_lookup(stored_config, k)!r} -> {_lookup(config, k)!r}" for k in diffs[:4]
            )
            raise UserError(
                f"cannot resume {str(self.root)!r}: settings differ from the stored run ({shown})"
            )
        try:
            rows = read_manifest(self.manifest_path)
        except ValueError as e:
            raise UserError(f"cannot resume: {e}") from e
        bad = [r["adv_path"] for r in rows if r.get("adv_path") and inside(self.adv_dir, r["adv_path"]) is None]  # fmt: skip
        if bad:
            raise UserError(
                f"cannot resume: {str(self.manifest_path)!r} lists {len(bad)} file(s) outside "
                f"{str(self.adv_dir)!r} (e.g. {bad[0]!r}); it was not written by advtune"
            )
        _check_row_eps(rows, config, source=str(self.manifest_path))
        if any(r.get("adv_path") for r in rows):
            rows = self._verified(rows)
        self.writer = ManifestWriter(self.manifest_path, rows, keep_sorted=False)
        self.previous_report = stored

    def _verified(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The rows whose PNG is there with its recorded hash; the others are dropped
        (and the manifest rewritten without them), so the run attacks them again.

        A manifest row promises its PNG: a deleted or edited file must not pass as done.
        Rows of manifests written before ``adv_sha256`` existed are checked for the file
        only. A symlink or anything but a plain file is never read (it could be a FIFO
        or ``/dev/zero``): it fails.
        """
        failed: set[str] = set()
        for row in rows:
            if not row.get("adv_path"):
                continue
            path = inside(self.adv_dir, row["adv_path"])
            ok = path is not None and not path.is_symlink() and path.is_file()
            if ok and row.get("adv_sha256"):
                ok = file_sha256(path) == row["adv_sha256"]  # type: ignore[arg-type]
            if not ok:
                failed.add(row["path"])
        if not failed:
            return rows
        kept = [r for r in rows if r["path"] not in failed]
        example = next(r["adv_path"] for r in rows if r["path"] in failed)
        warnings.warn(
            f"{len(failed)} finished image(s) in {str(self.manifest_path)!r} have a missing "
            f"or changed PNG (e.g. {example!r}); they are attacked again",
            stacklevel=3,
        )
        # Rewritten now: a run stopped before its first write must not leave the rows.
        atomic_write_text(self.manifest_path, format_manifest(kept))
        return kept

    def _clear(self) -> None:
        # Remove only what an advtune run wrote: files listed in the old manifest, and
        # only inside the folder.
        try:
            old = read_manifest(self.manifest_path)
        except ValueError:
            old = []
        _remove_adv(self.root, old)
        for path in (self.manifest_path, self.report_path, self.plot_path):
            path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ shards

    def shard_writer(self, rank: int, world_size: int) -> ManifestWriter:
        """Where a rank's rows go, batch by batch: ``manifest.csv`` itself for a single
        process, ``manifest.rank{r}-of-{W}.csv`` for a torchrun rank (what survives a
        kill -9 of that rank; :meth:`collect_rows` folds them in)."""
        if world_size == 1:
            return self.writer
        return ManifestWriter(
            self.root / partial_manifest_name(rank, world_size), keep_sorted=False
        )

    def collect_rows(
        self, shards: Sequence[Sequence[Mapping[str, Any]]], *, world_size: int, complete: bool
    ) -> list[dict[str, Any]]:
        """Rank 0: every row of the run, sorted, also written as ``manifest.csv``.

        Args:
            shards: the rows each reachable rank sent (none for a single process: its
                rows are in :attr:`writer` already).
            world_size: the number of ranks.
            complete: every rank sent its rows; otherwise the partial manifests on disk
                are the record of the ranks that could not be reached.
        """
        if world_size == 1:
            return self.writer.rows
        groups = [self.writer.rows, *shards]
        if not complete:
            for path in partial_manifests(self.root):
                try:
                    groups.append(read_manifest(path))
                except ValueError:
                    warnings.warn(f"ignoring unreadable partial manifest {path}", stacklevel=2)
        rows = merge_rows(groups, source=str(self.root))
        atomic_write_text(self.manifest_path, format_manifest(rows))
        return rows

    def drop_partial_manifests(self) -> None:
        """Remove the per-rank manifests once ``manifest.csv`` holds every rank's rows."""
        for path in partial_manifests(self.root):
            path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ writes

    def save_images(self, out: BatchOutput) -> None:
        """Save a batch's PNGs (before its rows: a row implies its PNG) and record each
        file's sha256 in its row's ``adv_sha256``."""
        eps_count = len(out.images)
        for position, row in enumerate(out.rows):
            image_i, eps_i = divmod(position, eps_count)
            if row["adv_path"]:
                path = inside(self.adv_dir, row["adv_path"])
                if path is None:
                    raise ValueError(f"adv_path {row['adv_path']!r} leaves {self.adv_dir}")
                # The hash goes into the row, which is written after the PNG.
                row["adv_sha256"] = save_png(path, out.images[eps_i][image_i])

    def write_report(self, report: Mapping[str, Any]) -> None:
        write_json(self.report_path, report)
