"""The dataset: :class:`ImageDataset` and :func:`build_dataset`."""

from __future__ import annotations

import os
import random
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from PIL import Image
from torch.utils.data import Dataset

from advtune.data.constants import Sample, _count
from advtune.data.decode import _decode_error, _reason, decode_image
from advtune.data.layouts import _detect, _excluded
from advtune.data.shipped import sample_dir
from advtune.data.subsets import _apply_subset, _read_subset
from advtune.errors import UserError


class _Skipped(NamedTuple):
    """Stands in for an undecodable image between the dataset and the collate."""

    path: str
    reason: str


class ImageDataset(Dataset):
    """Images under ``root`` with their labels, in a fixed order.

    A sample is ``{"image": (3, H, W) float32 in [0, 1] (8-bit values), "label": int
    (-1 unknown), "index": int (position here), "path": str (relative POSIX)}``.
    ``dataset[i]`` is ``None`` for an image that cannot be decoded: it is recorded in
    :attr:`skipped` with a warning. Decoding is lazy, so that happens when it is read.

    Attributes:
        root: The folder (absolute).
        paths: Relative POSIX paths, in dataset order.
        labels: Class index per image (``-1`` when unlabeled).
        layout: ``"imagenet-folders"``, ``"imagenet-loc-csv"``, ``"imagenet-devkit"``,
            ``"image-folder"`` or ``"sample"``.
        labeled: ``False`` when labels are unknown (use the model's clean predictions).
        skipped: ``(relative path, reason)`` for each image found undecodable so far in
            this process (a loader from :func:`make_loader` also records what its worker
            processes found).
        transform: PIL image → float tensor ``(3, H, W)`` in [0, 1].
    """

    def __init__(
        self,
        root: str | os.PathLike,
        paths: Sequence[str],
        labels: Sequence[int],
        *,
        transform: Callable[[Image.Image], torch.Tensor],
        layout: str,
        labeled: bool,
    ) -> None:
        if len(paths) != len(labels):
            raise ValueError(f"got {len(paths)} paths but {len(labels)} labels")
        self.root = Path(root)
        self.paths = list(paths)
        self.labels = [int(v) for v in labels]
        self.transform = transform
        self.layout = layout
        self.labeled = labeled
        self.skipped: list[tuple[str, str]] = []
        self._skipped_paths: set[str] = set()

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        return (
            f"ImageDataset(root={str(self.root)!r}, layout={self.layout!r}, "
            f"images={len(self)}, labeled={self.labeled})"
        )

    def __getitem__(self, index: int) -> Sample | None:
        item = self._load(index)
        if isinstance(item, _Skipped):
            self._record_skipped([item])
            return None
        return item

    def __getitems__(self, indices: list[int]) -> list[Sample | _Skipped]:
        # Used by DataLoader (also in worker processes): skipped images travel to the
        # collate as markers, and the loader records them in the main process.
        return [self._load(i) for i in indices]

    def _load(self, index: int) -> Sample | _Skipped:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {_count(len(self), 'image')}")
        index %= len(self)
        rel = self.paths[index]
        try:
            img = decode_image(self.root / rel)
        except Exception as err:  # Pillow plugins raise many types on broken files
            return _Skipped(rel, _reason(err))
        image = self.transform(img)
        if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(
                f"transform must return a (3, H, W) tensor, got "
                f"{tuple(image.shape) if isinstance(image, torch.Tensor) else type(image)}"
            )
        if image.dtype == torch.uint8:
            image = image.float().div_(255)
        else:
            # 8-bit values, so the PNG written after the attack holds what was attacked.
            image = image.float().clamp_(0, 1).mul_(255).round_().div_(255)
        return {"image": image, "label": self.labels[index], "index": index, "path": rel}

    def _record_skipped(self, items: Iterable[_Skipped | tuple[str, str]]) -> None:
        for path, reason in items:
            if path in self._skipped_paths:
                continue
            self._skipped_paths.add(path)
            self.skipped.append((path, reason))
            warnings.warn(f"skipping {path}: cannot decode it ({reason})", stacklevel=3)

    def _require_one_image(self) -> None:
        """UserError unless some image decodes; stops at the first that does.

        Nothing is recorded: undecodable files are still found (and warned about) when
        read, in the process that reads them, as without this check.
        """
        first: tuple[str, str] | None = None
        for rel in self.paths:
            reason = _decode_error(self.root / rel)
            if reason is None:
                return
            first = first or (rel, reason)
        if first is not None:
            raise UserError(
                f"no decodable image in {str(self.root)!r}: all {len(self)} failed; the first, "
                f"{first[0]}: {first[1]}"
            )


def build_dataset(
    root: str | os.PathLike | None = None,
    *,
    transform: Callable[[Image.Image], torch.Tensor],
    limit: int | None = None,
    subset: str | os.PathLike | Sequence[str] | None = None,
    shuffle_seed: int | None = None,
    labels: str | os.PathLike | None = None,
    exclude: Iterable[str | os.PathLike] = (),
) -> ImageDataset:
    """Find the layout of ``root`` and list its images.

    Args:
        root: A folder (see the module docs for the layouts); ``None``: the bundled sample.
        transform: PIL image → float tensor ``(3, H, W)`` in [0, 1], typically the model's
            ``preprocess``.
        limit: Keep the first ``limit`` images (after ``subset`` and ordering).
        subset: A file of relative paths, one per line (``#`` comments and blank lines
            ignored), or a sequence of them. Flat ImageNet layouts match by file name,
            so ``<wnid>/<file>`` lists such as :func:`robustbench_subset` fit every
            ImageNet layout.
        shuffle_seed: Shuffle (deterministically) instead of sorting by path.
        labels: A ``LOC_val_solution.csv`` or ``ILSVRC2012_validation_ground_truth.txt``
            that is not where it would be found automatically.
        exclude: Folders whose images are left out, e.g. the run's output folder, so
            that ``--data .`` does not read a run's own (or an earlier run's) adversarial
            images back as input. Ones outside ``root`` change nothing.

    Returns:
        An :class:`ImageDataset`. Order: subset → sort (or shuffle) → limit.

    Raises:
        UserError: Missing/empty folder, bad limit, subset entries not found, images
            without labels, unreadable label files, no decodable image, ``root`` inside
            an ``exclude`` folder.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UserError(f"limit must be a positive integer, got {limit!r}")
    if shuffle_seed is not None and (
        isinstance(shuffle_seed, bool) or not isinstance(shuffle_seed, int)
    ):
        raise UserError(f"shuffle_seed must be an integer, got {shuffle_seed!r}")
    if root is None:
        folder, layout = sample_dir(), "sample"
    else:
        folder, layout = Path(root).expanduser(), None
        if not folder.exists():
            raise UserError(f"data folder {str(root)!r} not found")
        if not folder.is_dir():
            raise UserError(f"data path {str(root)!r} is not a folder")
    folder = folder.resolve()
    if layout is None and folder == sample_dir().resolve():
        layout = "sample"
    excluded = _excluded(folder, exclude)
    layout, files, label_of = _detect(folder, layout, labels, excluded)

    flat = layout in ("imagenet-loc-csv", "imagenet-devkit")
    if subset is not None:
        files = _apply_subset(files, _read_subset(subset), by_name=flat)
    files = sorted(files)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(files)
    if limit is not None:
        files = files[:limit]
    ys = [label_of(f) for f in files]
    labeled = layout not in ("image-folder", "sample")
    dataset = ImageDataset(folder, files, ys, transform=transform, layout=layout, labeled=labeled)
    # Like an empty folder, a folder of files that are all undecodable is an error, not a
    # complete run over 0 images. Normally this decodes one image.
    dataset._require_one_image()
    return dataset
