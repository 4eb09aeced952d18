"""Image datasets for attacks: ImageNet validation layouts, plain folders, the sample.

:func:`build_dataset` finds the layout of a folder, lists its images in a deterministic
order, and returns an :class:`ImageDataset` whose samples are the model's preprocessing
of each image, quantised to 8 bits (so an attacked image saved as PNG is exactly what was
attacked). :func:`make_loader` batches it.

Layouts (``ImageDataset.layout``):

``"imagenet-folders"``
    One folder per class named by WordNet id (``n01440764/...``); any subset of the 1000.
``"imagenet-loc-csv"``
    A flat folder of ``ILSVRC2012_val_*.JPEG`` with Kaggle's ``LOC_val_solution.csv``
    (in the folder, up to four levels above it, or given as ``labels``).
``"imagenet-devkit"``
    A flat folder with the devkit's ``ILSVRC2012_validation_ground_truth.txt`` and the
    devkit's id → WordNet id mapping (``meta.mat`` or ``devkit_wnids.txt``).
``"image-folder"``
    Any other folder of images (nested); unlabeled (label ``-1``).
``"sample"``
    The photos bundled with advtune (``root=None``); unlabeled.

See ``docs/data_and_models.md`` for the details and the decisions behind them.
"""

from __future__ import annotations

import csv
import functools
import os
import random
import re
import stat
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torchvision
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, Sampler

from advtune._resources import datasets_dir
from advtune.errors import UserError

__all__ = [
    "IMAGE_EXTENSIONS",
    "LOADER_TIMEOUT",
    "MAX_IMAGE_PIXELS",
    "ImageDataset",
    "Sample",
    "SkipImage",
    "build_dataset",
    "collate_samples",
    "decode_image",
    "imagenet_categories",
    "imagenet_wnids",
    "make_loader",
    "resolve_subset_path",
    "robustbench_subset",
    "sample_dir",
]

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

#: Images with more pixels (width × height, read from the file's header) are skipped
#: before decoding: Pillow's own decompression-bomb threshold (89,478,485 pixels, about
#: 9459 × 9459; 256 MiB as 8-bit RGB), so one file cannot exhaust a worker's memory.
#: (Pillow itself refuses files over twice its threshold while reading the header.)
MAX_IMAGE_PIXELS = 89_478_485

#: Seconds :func:`make_loader`'s default waits for the next batch from its workers before
#: it gives up with a :class:`~advtune.errors.UserError` (a worker stuck on a file that
#: blocks, or a batch that could not be handed over), instead of hanging the run.
LOADER_TIMEOUT = 600.0


def _count(n: int, singular: str, plural: str | None = None) -> str:
    """``"1 image"``, ``"2 images"``."""
    return f"{n} {singular if n == 1 else plural or singular + 's'}"


# --------------------------------------------------------------------------- shipped data


@functools.cache
def _wnids() -> tuple[str, ...]:
    path = datasets_dir() / "imagenet_wnids.txt"
    wnids = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    if len(wnids) != 1000:
        raise RuntimeError(f"{path} lists {len(wnids)} WordNet ids, expected 1000")
    return wnids


@functools.cache
def _wnid_index() -> dict[str, int]:
    return {w: i for i, w in enumerate(_wnids())}


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet WordNet ids in class-index order (sorted, as torchvision uses)."""
    return list(_wnids())


def imagenet_categories() -> list[str]:
    """torchvision's 1000 ImageNet class names, in class-index order (no download)."""
    return list(torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def robustbench_subset() -> Path:
    """The RobustBench 5000-image ImageNet validation subset (``<wnid>/<file>`` lines)."""
    return datasets_dir() / "imagenet_val_5000_robustbench.txt"


def sample_dir() -> Path:
    """The folder of sample photos bundled with advtune."""
    return datasets_dir() / "sample"


# --------------------------------------------------------------------------- decoding


def decode_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file as 8-bit RGB, upright.

    EXIF orientation is applied. Transparent pixels are composited on white. 16-bit and
    32-bit integer grayscale (``I;16*``, ``I``) are scaled from 0..65535; float images
    (``F``) from 0..1 when all values lie there, else clipped to 0..255. CMYK and the
    other modes use Pillow's conversion. No colour management (ICC profiles are ignored).

    The file is checked before anything is decoded: it must be a regular file (a FIFO,
    socket or device named like an image is refused without reading from it; a broken
    symbolic link too) and its header's width × height must not exceed
    :data:`MAX_IMAGE_PIXELS`.

    Raises:
        SkipImage: not a regular file, or too many pixels (the reason is the message).
        Whatever Pillow raises for an undecodable file (``OSError`` and others).
    """
    with _open_regular(path) as fh, warnings.catch_warnings():
        # Pillow warns between 1x and 2x its threshold; ours refuses those below.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(fh)
        except Image.UnidentifiedImageError:
            # Pillow would name the file object, not the file.
            raise Image.UnidentifiedImageError(
                f"cannot identify image file {os.fspath(path)!r}"
            ) from None
        with img:
            width, height = img.size
            if width * height > MAX_IMAGE_PIXELS:
                raise SkipImage(
                    f"{width}x{height} = {width * height:,} pixels, over the limit of "
                    f"{MAX_IMAGE_PIXELS:,} (advtune.data.MAX_IMAGE_PIXELS)"
                )
            img.load()
            upright = ImageOps.exif_transpose(img)
    return _to_rgb(upright)


class SkipImage(ValueError):
    """A file that is not read as an image; the message is the reason."""


def _reason(err: Exception) -> str:
    """One line saying why a file was skipped."""
    text = str(err) if isinstance(err, SkipImage) else f"{type(err).__name__}: {err}"
    return " ".join(text.split())


def _decode_error(path: Path) -> str | None:
    """Why ``path`` cannot be decoded, or ``None`` when it can (silently: Pillow's
    warnings come when the file is read for real)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            decode_image(path)
    except Exception as err:  # as in ImageDataset._load
        return _reason(err)
    return None


_KINDS = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISDIR, "a folder"),
)


def _not_regular(mode: int) -> str:
    kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    return f"{kind}, not a regular file" if kind != "not a regular file" else kind


def _open_regular(path: str | os.PathLike) -> Any:
    """Open ``path`` for reading only if it is a regular file, never blocking on it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            target = os.readlink(os.fspath(path))
            raise SkipImage(f"broken symbolic link to {target!r}") from None
        raise
    if not stat.S_ISREG(st.st_mode):
        raise SkipImage(_not_regular(st.st_mode))
    # O_NONBLOCK: should the file have been swapped for a FIFO since the stat, opening it
    # still returns at once, and the fstat below refuses it.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SkipImage(_not_regular(st.st_mode))
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(img.convert("I") if mode != "I" else img, dtype=np.float64)
        gray = np.clip(values, 0, 65535) * (255 / 65535)
        return Image.fromarray(np.round(gray).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        values = np.asarray(img, dtype=np.float64)
        values = np.nan_to_num(values, nan=0.0, posinf=255.0, neginf=0.0)
        if values.size and values.min() >= 0.0 and values.max() <= 1.0:
            values = values * 255
        gray = np.clip(values, 0, 255)
        return Image.fromarray(np.round(gray).astype(np.uint8), "L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


# --------------------------------------------------------------------------- dataset


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


# --------------------------------------------------------------------------- layouts


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
            f"label in {str(source)!r}: "
            + ", ".join(missing[:_SHOW])
            + (", ..." if len(missing) > _SHOW else "")
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


# --------------------------------------------------------------------------- subsets


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
            f"{'is' if len(missing) == 1 else 'are'} not in the data folder: "
            + ", ".join(missing[:_SHOW])
            + (", ..." if len(missing) > _SHOW else "")
        )
    return list(dict.fromkeys(index[k] for k in keys))


# --------------------------------------------------------------------------- loading


def collate_samples(items: Sequence[Sample | _Skipped | None]) -> dict[str, Any]:
    """Stack samples into a batch; undecodable ones are left out.

    Returns:
        ``{"image": (B, 3, H, W), "label": (B,) int64, "index": (B,) int64,
        "path": list[str], "skipped": list[(path, reason)]}``; ``B`` may be smaller than
        the number of items (``0`` gives an empty ``image`` tensor).
    """
    samples = [s for s in items if isinstance(s, dict)]
    skipped = [(s.path, s.reason) for s in items if isinstance(s, _Skipped)]
    images = torch.stack([s["image"] for s in samples]) if samples else torch.empty(0, 3, 0, 0)
    return {
        "image": images,
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.int64),
        "index": torch.tensor([s["index"] for s in samples], dtype=torch.int64),
        "path": [s["path"] for s in samples],
        "skipped": skipped,
    }


class ImageLoader(DataLoader):
    """A DataLoader that records undecodable images on its dataset.

    Batches are :func:`collate_samples` dicts. Undecodable images are warned about and
    added to ``dataset.skipped`` here, in the main process, even when worker processes
    found them; a batch whose images were all undecodable is not yielded.

    A worker that produces no batch within ``timeout`` seconds, or that dies, ends the
    iteration with a one-line :class:`~advtune.errors.UserError` instead of a hang or
    torch's multi-line error.
    """

    def __iter__(self) -> Iterator[dict[str, Any]]:  # type: ignore[override]
        batches = super().__iter__()
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except RuntimeError as err:
                raise _worker_error(err, self.timeout) from err
            if batch["skipped"]:
                _record_skipped(self.dataset, batch["skipped"])
            if batch["path"]:
                yield batch


def _worker_error(err: RuntimeError, timeout: float) -> Exception:
    """torch's errors for stuck or dead workers, as one line saying what to do."""
    message = str(err)
    if message.startswith("DataLoader timed out"):
        return UserError(
            f"the data loader's worker processes produced no batch in {timeout:g} s (stuck "
            "on a file that does not answer, e.g. a stalled network file system, or a "
            "batch that could not be handed over: see any error printed above); rerun with "
            "--workers 0 to load in this process"
        )
    if message.startswith("DataLoader worker") and (
        "exited unexpectedly" in message or "killed by signal" in message
    ):
        return UserError(
            f"{' '.join(message.split()).rstrip('.')}; if it ran out of memory, lower "
            "--batch-size or --workers (--workers 0 loads in this process)"
        )
    return err


def _file_size_limit() -> int | None:
    """The soft ``RLIMIT_FSIZE`` (``ulimit -f``) in bytes, ``None`` when unlimited."""
    try:
        import resource
    except ImportError:  # not POSIX
        return None
    soft, _hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else int(soft)


def _record_skipped(dataset: Any, items: list) -> None:
    # Reach through wrappers such as torch.utils.data.Subset to the ImageDataset.
    while not isinstance(dataset, ImageDataset) and hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    if isinstance(dataset, ImageDataset):
        dataset._record_skipped(tuple(item) for item in items)
    else:
        for path, reason in items:
            warnings.warn(f"skipping {path}: cannot decode it ({reason})", stacklevel=3)


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    num_workers: int = 2,
    device: str | torch.device = "cpu",
    sampler: Sampler | Sequence[int] | None = None,
    timeout: float | None = None,
) -> ImageLoader:
    """Batch a dataset in order (or by ``sampler``), decoding in worker processes.

    Args:
        dataset: Usually an :class:`ImageDataset`.
        batch_size: Images per batch (a batch may hold fewer: the last one, or when
            images were undecodable).
        num_workers: Decoding processes (``0``: in this process).
        device: Where the batches will go; memory is pinned only for CUDA.
        sampler: E.g. a ``DistributedSampler`` or a list of indices; default:
            sequential order.
        timeout: Seconds to wait for each batch from the workers before a
            :class:`~advtune.errors.UserError` (default :data:`LOADER_TIMEOUT`; ``0``:
            forever). Unused with ``num_workers=0``.

    With a finite file-size limit (``ulimit -f``) workers are not used (a warning says
    so): torch hands their batches over through shared-memory files, which that limit
    also caps, and a worker whose batch cannot be handed over leaves the run waiting.

    Returns:
        An :class:`ImageLoader` yielding :func:`collate_samples` batches.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch size must be a positive integer, got {batch_size!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise UserError(f"num_workers must be an integer >= 0, got {num_workers!r}")
    if timeout is None:
        timeout = LOADER_TIMEOUT
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0:
        raise UserError(f"loader timeout must be a number of seconds >= 0, got {timeout!r}")
    limit = _file_size_limit() if num_workers > 0 else None
    if limit is not None:
        warnings.warn(
            f"the file size limit (ulimit -f) is {limit} bytes: loading images in this "
            "process, since worker processes hand batches over through shared-memory "
            "files that the limit also caps",
            stacklevel=2,
        )
        num_workers = 0
    return ImageLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_samples,
        pin_memory=torch.device(device).type == "cuda",
        persistent_workers=False,
        drop_last=False,
        timeout=float(timeout) if num_workers > 0 else 0.0,
    )
