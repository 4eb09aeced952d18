"""Folder layouts (ImageNet folders, LOC csv, devkit, plain folders) and their labels."""

from __future__ import annotations

import csv
import os
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from advtune.data.constants import (
    _VAL_NUMBER,
    _WNID,
    DEVKIT_FOLDER,
    DEVKIT_GROUND_TRUTH,
    DEVKIT_WNIDS,
    IMAGE_EXTENSIONS,
    LOC_CSV,
    _count,
    _listing,
)
from advtune.data.shipped import _wnid_index
from advtune.errors import UserError


def _list_images(folder: Path, exclude: Iterable[str] = ()) -> list[str]:
    """Relative POSIX paths of the image files under ``folder`` (hidden ones left out).

    ``exclude``: real paths of folders not to enter.
    """
    found = []
    seen: set[str] = set(exclude)  # pruned like a folder already walked
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink loop
            dirnames[:] = []
            continue
        seen.add(real)
        # Hidden files include macOS "._name.jpg" resource forks, which are not images.
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = Path(dirpath).relative_to(folder)
        for name in filenames:
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                found.append((rel_dir / name).as_posix())
    return found


def _detect(
    folder: Path, layout: str | None, labels: str | os.PathLike | None, exclude: Iterable[str]
) -> tuple[str, list[str], Callable[[str], int]]:
    files = _list_images(folder, exclude)
    if not files:
        raise UserError(
            f"no images in {str(folder)!r} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    unlabeled = lambda _f: -1  # noqa: E731
    if layout == "sample":
        if labels is not None:  # the bundled photos have no ImageNet validation names
            raise UserError(
                f"--labels {str(labels)!r} cannot apply to the bundled sample photos (they "
                "are unlabeled); pass --data with the ImageNet validation folder it labels"
            )
        return layout, files, unlabeled

    if labels is not None:
        labels = Path(labels).expanduser()
        if not labels.is_file():
            raise UserError(f"labels file {str(labels)!r} not found")
        if labels.suffix.lower() == ".csv":
            return "imagenet-loc-csv", files, _loc_labels(labels, files)
        return "imagenet-devkit", files, _devkit_labels(labels, files)

    tops = {f.split("/", 1)[0] for f in files if "/" in f}
    at_top = [f for f in files if "/" not in f]
    known = _wnid_index()
    if tops and not at_top and all(t in known for t in tops):
        return "imagenet-folders", files, lambda f: known[f.split("/", 1)[0]]
    wnid_like = sorted(t for t in tops if _WNID.fullmatch(t))
    if wnid_like:
        others = sorted((tops - set(wnid_like)) | set(at_top))
        unknown = [t for t in wnid_like if t not in known]
        why = f"{unknown[0]} is not an ImageNet-1k class" if unknown else f"{others[0]} is not"
        warnings.warn(
            f"{folder} has WordNet-id folders but {why} a class folder; reading it as "
            "an unlabeled image folder",
            stacklevel=3,
        )
        return "image-folder", files, unlabeled

    if at_top and not tops:
        for candidate in [folder, *list(folder.parents)[:4]]:
            if (candidate / LOC_CSV).is_file():
                return "imagenet-loc-csv", files, _loc_labels(candidate / LOC_CSV, files)
        for candidate in (
            folder / DEVKIT_GROUND_TRUTH,
            folder / DEVKIT_FOLDER / "data" / DEVKIT_GROUND_TRUTH,
            folder.parent / DEVKIT_GROUND_TRUTH,
            folder.parent / DEVKIT_FOLDER / "data" / DEVKIT_GROUND_TRUTH,
        ):
            if candidate.is_file():
                return "imagenet-devkit", files, _devkit_labels(candidate, files)
    return "image-folder", files, unlabeled


def _excluded(folder: Path, exclude: Iterable[str | os.PathLike]) -> set[str]:
    """Real paths of the ``exclude`` folders; a UserError if ``folder`` is in one."""
    real = set()
    for item in exclude:
        path = os.path.realpath(Path(item).expanduser())
        if os.path.commonpath([path, str(folder)]) == path:
            raise UserError(
                f"data folder {str(folder)!r} is inside {str(item)!r}, which is excluded "
                "from the data (the output folder?); choose another --data or --out"
            )
        real.add(path)
    return real


def _wnid_to_label(wnid: str, source: Path) -> int:
    label = _wnid_index().get(wnid)
    if label is None:
        raise UserError(f"{str(source)!r}: {wnid!r} is not an ImageNet-1k WordNet id")
    return label


def _require_all(files: list[str], table: dict[str, int], source: Path, key) -> None:
    missing = [f for f in files if key(f) not in table]
    if missing:
        raise UserError(
            f"{_count(len(missing), 'image')} {'has' if len(missing) == 1 else 'have'} no "
            f"label in {str(source)!r}: " + _listing(missing)
        )


def _loc_labels(csv_path: Path, files: list[str]) -> Callable[[str], int]:
    """Kaggle's ``ImageId,PredictionString`` (the string starts with the WordNet id)."""
    table: dict[str, int] = {}
    try:
        with open(csv_path, newline="") as fh:
            rows = csv.reader(fh)
            header = next(rows, None)
            if header is None or [h.strip() for h in header[:2]] != ["ImageId", "PredictionString"]:
                raise UserError(
                    f"{str(csv_path)!r} is not a LOC_val_solution.csv "
                    f"(header {header!r}, expected ImageId,PredictionString)"
                )
            for line, row in enumerate(rows, start=2):
                if not row:
                    continue
                tokens = row[1].split() if len(row) > 1 else []
                if not tokens:
                    raise UserError(f"{str(csv_path)!r} line {line}: no WordNet id in {row!r}")
                table[row[0].strip()] = _wnid_to_label(tokens[0], csv_path)
    except OSError as err:
        raise UserError(f"cannot read {str(csv_path)!r}: {err}") from err

    def key(f: str) -> str:
        return Path(f).stem

    _require_all(files, table, csv_path, key)
    return lambda f: table[key(f)]


def _devkit_labels(truth: Path, files: list[str]) -> Callable[[str], int]:
    """Devkit ids (1..1000, the devkit's own order) → class index via WordNet ids."""
    devkit_wnids = _devkit_mapping(truth.parent)
    try:
        lines = [s.strip() for s in truth.read_text().splitlines() if s.strip()]
        ids = [int(s) for s in lines]
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {str(truth)!r} as devkit ground truth: {err}") from err
    to_label = {i: _wnid_to_label(w, truth.parent) for i, w in devkit_wnids.items()}
    table: dict[str, int] = {}
    for f in files:
        match = _VAL_NUMBER.search(Path(f).name)
        if match and 1 <= int(match.group(1)) <= len(ids):
            devkit_id = ids[int(match.group(1)) - 1]
            if devkit_id not in to_label:
                raise UserError(f"{str(truth)!r}: devkit id {devkit_id} has no WordNet id")
            table[f] = to_label[devkit_id]
    _require_all(files, table, truth, key=lambda f: f)
    return table.__getitem__


def _devkit_mapping(data_dir: Path) -> dict[int, str]:
    """``{devkit id: WordNet id}`` from ``devkit_wnids.txt`` or the devkit's ``meta.mat``."""
    text = data_dir / DEVKIT_WNIDS
    if text.is_file():
        mapping = {}
        for n, line in enumerate(text.read_text().splitlines(), start=1):
            parts = line.split()
            if not parts:
                continue
            try:  # "<id> <wnid>" or just "<wnid>" on line <id>
                key, wnid = (int(parts[0]), parts[1]) if len(parts) > 1 else (n, parts[0])
            except ValueError as err:
                raise UserError(f"{str(text)!r} line {n}: cannot read {line!r}") from err
            mapping[key] = wnid
        return mapping
    meta = data_dir / "meta.mat"
    if not meta.is_file():
        raise UserError(
            f"found {DEVKIT_GROUND_TRUTH} in {str(data_dir)!r} but not the devkit's id → "
            f"WordNet id mapping: put the devkit's meta.mat (or a {DEVKIT_WNIDS}) next to it"
        )
    try:
        from scipy.io import loadmat  # optional dependency
    except ImportError as err:
        raise UserError(
            f"reading {str(meta)!r} needs scipy (pip install scipy), or write the mapping "
            f"as {DEVKIT_WNIDS} (see docs/data_and_models.md)"
        ) from err
    try:
        synsets = loadmat(str(meta), squeeze_me=True)["synsets"]
        ids = np.atleast_1d(synsets["ILSVRC2012_ID"]).astype(int)
        wnids = [str(w) for w in np.atleast_1d(synsets["WNID"])]
        leaves = np.atleast_1d(synsets["num_children"]).astype(int) == 0
    except Exception as err:  # scipy raises many types for files it cannot parse
        raise UserError(f"cannot read synsets from {str(meta)!r}: {err}") from err
    return {int(i): w for i, w, leaf in zip(ids, wnids, leaves) if leaf}
