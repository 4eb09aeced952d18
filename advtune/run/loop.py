"""The loop over a loader: padded attack calls that halve on out-of-memory, timing.

:func:`attack_loader` attacks every batch a loader yields, in calls padded to a fixed
size so results do not depend on how images are grouped, hands each batch's
:class:`~advtune.run.batch.BatchOutput` to a sink, and measures time and memory in
:class:`RunStats`. It knows nothing of output folders, ranks or progress bars.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from advtune.run.batch import BatchOutput, attack_batch, merge_cost
from advtune.run.spec import AttackConfig
from advtune.runtime import concat_results, register_chunk_result, run_with_oom_backoff

__all__ = ["RunStats", "attack_loader", "model_device"]

log = logging.getLogger(__name__)


@dataclass
class RunStats:
    """Timing and memory of one :func:`attack_loader` call (this process only).

    Attributes:
        images: images attacked.
        batches: batches attacked.
        wall_s: wall time of the loop, data loading included.
        attack_s: time inside :func:`~advtune.run.batch.attack_batch`.
        model_calls: forward passes of whole batches.
        cost: model calls by kind and images processed
            (:func:`advtune.run.batch.attack_cost`, summed).
        peak_memory_bytes: ``torch.cuda.max_memory_allocated`` on CUDA, else ``None``.
        oom_backoffs: out-of-memory errors absorbed by halving the attack batch.
        final_batch_size: images per attack call at the end (smaller than the batch
            size after a back-off); ``None`` when calls took whole loader batches.
    """

    images: int = 0
    batches: int = 0
    wall_s: float = 0.0
    attack_s: float = 0.0
    model_calls: int = 0
    cost: dict[str, Any] = field(default_factory=dict)
    peak_memory_bytes: int | None = None
    oom_backoffs: int = 0
    final_batch_size: int | None = None

    @property
    def images_per_s(self) -> float | None:
        return self.images / self.wall_s if self.wall_s > 0 and self.images else None


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); the CPU for neither."""
    for param in model.parameters():
        return param.device
    for buffer in model.buffers():
        return buffer.device
    return torch.device("cpu")


def _as_list(values: Any) -> list[int]:
    if isinstance(values, torch.Tensor):
        return [int(v) for v in values.tolist()]
    return [int(v) for v in values]


def attack_loader(
    model: nn.Module,
    loader: Iterable[Mapping[str, Any]],
    config: AttackConfig,
    *,
    sink: Callable[[BatchOutput], None] | None = None,
    on_batch: Callable[[BatchOutput, int], None] | None = None,
    adv_paths: Mapping[str, str] | None = None,
    device: torch.device | str | None = None,
    stats: RunStats | None = None,
    pad_to: int | None = None,
) -> RunStats:
    """Attack every batch of ``loader`` and hand the results to ``sink``.

    Args:
        model: classifier on [0, 1] images.
        loader: yields batches ``{"image": (N, C, H, W), "label": (N,), "index": (N,),
            "path": list[str]}`` (``advtune.data.make_loader``); each index once.
        config: the attack configuration.
        sink: called with each batch's :class:`BatchOutput` (saves PNGs, appends rows).
        on_batch: called after ``sink`` with the batch's output and this call's number
            of finished batches (progress, failure news from other ranks; it may raise
            to stop the loop: the batch is saved by then).
        adv_paths: forwarded to :func:`~advtune.run.batch.attack_batch`.
        device: where images go (default: the model's device).
        stats: a :class:`RunStats` to fill in (so a caller still has the numbers when the
            loop is interrupted); a new one by default.
        pad_to: pad smaller batches (the last one, a resumed run's, a torchrun rank's)
            to this size by repeating their last image, whose extra results are dropped,
            so that results are the same however the images are batched or sharded.

    Out of memory: an OOM error in an attack call halves the number of images per call
    and redoes the failed part (:func:`advtune.runtime.run_with_oom_backoff`); the smaller
    size is kept for the rest of the loop, nothing is lost and each image is attacked
    once. A warning is issued at the first back-off; ``stats.oom_backoffs`` counts them.
    With ``pad_to``, every call is padded to the size in effect, so an image's results
    depend only on that size (see ``docs/cli.md``, *Out of memory*).

    Returns:
        :class:`RunStats` for this call.
    """
    from advtune import attacks

    attack_fn = attacks.get(config.attack)
    device = torch.device(device) if device is not None else model_device(model)
    stats = stats if stats is not None else RunStats()
    # Images per attack call: pad_to (None: each loader batch whole) until an OOM halves it.
    chunk = pad_to
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    try:
        for batch in loader:
            indices = _as_list(batch["index"])
            if not indices:
                continue
            labels = batch["label"]
            if not isinstance(labels, torch.Tensor):
                labels = torch.as_tensor(labels)
            paths = list(batch["path"])
            images = batch["image"].to(device, non_blocking=True)
            n = len(indices)
            t0 = time.perf_counter()
            result = run_with_oom_backoff(
                _ChunkAttack(model, indices, paths, config, attack_fn, adv_paths),
                {"image": images, "label": labels, "position": torch.arange(n)},
                chunk_size=chunk,
                pad=pad_to is not None,
            )
            out = result.value
            if result.oom_count:
                if stats.oom_backoffs == 0:
                    warnings.warn(
                        f"out of memory attacking {chunk or n} images at once; continuing "
                        f"with {result.chunk_size} per call (nothing is lost; report.json "
                        "counts settings.oom_backoffs)",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                log.info("out of memory: %d images per attack call now", result.chunk_size)
                stats.oom_backoffs += result.oom_count
                chunk = result.chunk_size
            stats.final_batch_size = chunk
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            stats.attack_s += time.perf_counter() - t0
            if sink is not None:
                sink(out)
            stats.images += n
            stats.batches += 1
            stats.model_calls += out.model_calls
            stats.cost = merge_cost(stats.cost, out.cost)
            if on_batch is not None:
                on_batch(out, stats.batches)
    finally:
        stats.wall_s = time.perf_counter() - start
        if device.type == "cuda":
            stats.peak_memory_bytes = int(torch.cuda.max_memory_allocated(device))
    return stats


class _ChunkAttack:
    """:func:`attack_batch` on a chunk ``{"image", "label", "position"}`` of one loader
    batch (positions index the batch's dataset indices and paths)."""

    def __init__(self, model, indices, paths, config, attack_fn, adv_paths) -> None:
        self.model, self.indices, self.paths = model, indices, paths
        self.config, self.attack_fn, self.adv_paths = config, attack_fn, adv_paths

    def __call__(self, chunk: Mapping[str, torch.Tensor]) -> BatchOutput:
        positions = chunk["position"].tolist()
        return attack_batch(
            self.model,
            chunk["image"],
            chunk["label"],
            [self.indices[p] for p in positions],
            [self.paths[p] for p in positions],
            self.config,
            attack_fn=self.attack_fn,
            adv_paths=self.adv_paths,
        )


def _trim_output(out: BatchOutput, n: int) -> BatchOutput:
    # Rows are in (image, eps) order: the first n images' rows come first.
    return BatchOutput(
        rows=out.rows[: n * len(out.images)],
        images=[q[:n] for q in out.images],
        model_calls=out.model_calls,
        checks=out.checks,
        cost=out.cost,
    )


def _join_outputs(parts: list[BatchOutput]) -> BatchOutput:
    if len(parts) == 1:
        return parts[0]
    # Rows and checks are lists of records, concatenated; the per-eps image tensors and
    # model_calls combine as run_with_oom_backoff combines anything (dim 0, maximum: the
    # batch took as many passes as its longest chunk; attacks that stop early may differ).
    return BatchOutput(
        rows=[row for part in parts for row in part.rows],
        images=concat_results([part.images for part in parts]),
        model_calls=concat_results([part.model_calls for part in parts]),
        checks=[c for part in parts for c in part.checks],
        # Images add up over the chunks (disjoint images); so do calls, unlike model_calls.
        cost=merge_cost(*(part.cost for part in parts)),
    )


register_chunk_result(BatchOutput, join=_join_outputs, trim=_trim_output)
