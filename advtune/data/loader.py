"""Batching: :func:`make_loader` and the loader that cannot hang a run."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from advtune.data.constants import Sample
from advtune.data.dataset import ImageDataset, _Skipped
from advtune.errors import UserError

#: Seconds :func:`make_loader`'s default waits for the next batch from its workers before
#: it gives up with a :class:`~advtune.errors.UserError` (a worker stuck on a file that
#: blocks, or a batch that could not be handed over), instead of hanging the run.
LOADER_TIMEOUT = 600.0


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
