"""Attack a dataset batch by batch, save faithful adversarial PNGs, and measure robustness.

Layers, from the inside out (each usable on its own):

* :func:`sample_seeds` — per-sample seeds from the run seed and the dataset index, so
  results never depend on batch size, batch composition or (torchrun) rank.
* :func:`quantize_adv` — turn a float adversarial image into the uint8 image that is
  saved, staying inside the threat model (L∞ and L2).
* :func:`attack_batch` — clean forward, targets, the attack for each eps, quantisation,
  and a re-check of the model on the quantised images: one manifest row per (image, eps).
* :func:`run_attack` — the loop over a loader: skips done/duplicate indices, attacks each
  batch in padded chunks that halve on out-of-memory, hands each batch's rows (and
  images) to a sink, shows a progress bar, measures time and memory.
* :func:`auto_batch_size` — the largest batch this attack fits in GPU memory (probed with
  the attack itself, cached per configuration).
* :class:`OutputDir` — an output folder: config check for ``--resume``, the manifest,
  PNGs, ``report.json`` and the plot, all written atomically.
* :func:`compute_metrics`, :func:`build_report`, :func:`format_summary`,
  :func:`plot_curve` — metrics are computed from manifest rows only, so an interrupted and
  resumed run (or merged torchrun shards) reports exactly what an uninterrupted run does.
* :func:`run` — all of the above for ``advtune generate`` / ``advtune evaluate``.

Nothing here parses arguments or prints; the CLI (:mod:`advtune.cli`) does that.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from torch import nn

from advtune._version import __version__
from advtune.errors import UserError
from advtune.io import ManifestWriter, read_json, read_manifest, save_png, write_json
from advtune.runtime import CPU_BATCH_SIZE, run_with_oom_backoff

__all__ = [
    "REPORT_FORMAT",
    "AttackConfig",
    "BatchOutput",
    "OutputDir",
    "RunStats",
    "adv_relpaths",
    "attack_batch",
    "auto_batch_size",
    "build_report",
    "compute_metrics",
    "config_differences",
    "format_eps",
    "format_summary",
    "plot_curve",
    "quantize_adv",
    "run",
    "run_attack",
    "run_config",
    "sample_seeds",
    "unwrap_model",
]

log = logging.getLogger(__name__)

REPORT_FORMAT = "advtune-report/1"
MANIFEST_NAME = "manifest.csv"
REPORT_NAME = "report.json"
PLOT_NAME = "robust_accuracy.png"
ADV_DIR = "adv"

_MASK64 = (1 << 64) - 1


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class AttackConfig:
    """Everything about the attack that changes results (built by
    :func:`advtune.presets.resolve_attack`).

    Attributes:
        attack: registry name (``advtune.attacks.names()``).
        norm: threat model of the saved images, ``"linf"`` or ``"l2"``.
        eps: budgets, one run of the attack per value; ``None`` for attacks without an
            eps budget (CW-L2).
        params: other keyword arguments of the attack (``steps``, ``step_size``...).
        targeted: ``None`` (untargeted), ``"random"`` or ``"least-likely"``.
        seed: run seed; sample *i* uses ``sample_seeds(seed, [i])``.
    """

    attack: str
    norm: str
    eps: tuple[float, ...] | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    targeted: str | None = None
    seed: int = 0

    def eps_values(self) -> tuple[float | None, ...]:
        """The budgets to run, ``(None,)`` for an attack without one."""
        return self.eps if self.eps else (None,)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["eps"] = list(self.eps) if self.eps is not None else None
        d["params"] = dict(sorted(self.params.items()))
        return d


# --------------------------------------------------------------------------- seeds


def _splitmix64(z: int) -> int:
    # SplitMix64 finaliser (Steele et al. 2014): a cheap, well-mixed 64-bit hash that is
    # identical in every process (unlike Python's salted hash()).
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def sample_seeds(run_seed: int, indices: Iterable[int] | torch.Tensor) -> torch.Tensor:
    """Per-sample seeds ``hash(run_seed, dataset_index)``.

    Args:
        run_seed: the run's ``--seed``.
        indices: dataset indices (a sequence or an integer tensor ``(N,)``).

    Returns:
        ``(N,)`` int64 CPU tensor of non-negative seeds; entry *i* depends only on
        ``run_seed`` and ``indices[i]``.
    """
    if isinstance(indices, torch.Tensor):
        indices = indices.tolist()
    base = _splitmix64(int(run_seed) & _MASK64)
    # Keep 63 bits so the seeds are valid non-negative int64 values.
    return torch.tensor(
        [_splitmix64(base ^ (int(i) & _MASK64)) >> 1 for i in indices], dtype=torch.int64
    )


# --------------------------------------------------------------------------- quantisation


def _eps_steps(eps: float) -> int:
    # The largest whole number of 8-bit levels within eps; the tolerance absorbs
    # 4/255 * 255 evaluating to 3.9999999999999996.
    return math.floor(eps * 255 + 1e-6)


def quantize_adv(
    x_adv: torch.Tensor, x: torch.Tensor, *, norm: str, eps: float | None
) -> torch.Tensor:
    """The uint8 image to save for ``x_adv``, inside the threat model around ``x``.

    ``x`` must be 8-bit quantised (the datasets guarantee it), so ``x * 255`` is an integer
    image ``c``. Rounding ``x_adv * 255`` can move a pixel by half a level, which can step
    outside the budget; this function keeps the saved image ``q`` within it:

    * L∞: ``q = c + clamp(round(d), -k, k)`` with ``d = (x_adv - x) * 255`` and ``k`` the
      whole levels within ``eps``, so ``max |q - c| / 255 <= eps``.
    * L2: ``round(d)`` when its norm is within ``eps * 255``; otherwise the coordinates
      whose rounding grew ``|d_j|`` the most are truncated toward zero instead, greedily,
      until the norm fits (truncating every coordinate always fits, since ``|trunc(d)| <=
      |d|``), so ``||q - c||_2 / 255 <= eps``.
    * ``eps=None`` (no budget): plain rounding.

    Args:
        x_adv: ``(N, C, H, W)`` adversarial images in [0, 1].
        x: ``(N, C, H, W)`` clean images in [0, 1], multiples of 1/255.
        norm: ``"linf"`` or ``"l2"``.
        eps: the budget in [0, 1] pixel units, or ``None``.

    Returns:
        ``(N, C, H, W)`` uint8 tensor on ``x``'s device.
    """
    if x_adv.shape != x.shape:
        raise ValueError(f"x_adv shape {tuple(x_adv.shape)} differs from x {tuple(x.shape)}")
    if norm not in ("linf", "l2"):
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    clean = torch.round(x.double() * 255)
    # Work on the perturbation in level units, clipped to the valid pixel range first.
    d = (x_adv.double().clamp(0, 1) * 255) - clean
    if eps is None:
        q = clean + d.round()
    elif norm == "linf":
        k = _eps_steps(eps)
        q = clean + d.round().clamp(-k, k)
    else:
        q = clean + _fit_l2(d, eps * 255)
    return q.clamp_(0, 255).to(torch.uint8)


def _fit_l2(d: torch.Tensor, budget: float) -> torch.Tensor:
    """Integer perturbations close to ``d`` (level units) with per-sample L2 norm <= budget."""
    n = d.shape[0]
    flat = d.reshape(n, -1)
    rounded = flat.round()
    budget_sq = budget * budget
    over = rounded.square().sum(dim=1) > budget_sq
    if not bool(over.any()):
        return rounded.view_as(d)
    out = rounded.clone()
    for i in torch.nonzero(over).flatten().tolist():
        di = flat[i]
        norm = float(di.norm())
        if norm > budget:  # x_adv itself may sit a float rounding error outside
            di = di * (budget / norm)
        r = di.round()
        t = di.trunc()
        # Truncating coordinate j instead of rounding it lowers ||.||² by cost_j >= 0.
        cost = r.square() - t.square()
        excess = float(r.square().sum()) - budget_sq
        if excess <= 0:
            out[i] = r
            continue
        order = torch.argsort(cost, descending=True)
        saved = torch.cumsum(cost[order], dim=0)
        count = int(torch.searchsorted(saved, torch.tensor(excess, dtype=saved.dtype))) + 1
        r[order[:count]] = t[order[:count]]
        out[i] = r
    return out.view_as(d)


# --------------------------------------------------------------------------- one batch


@dataclass
class BatchOutput:
    """The result of :func:`attack_batch`.

    Attributes:
        rows: one manifest row per (image, eps), in (image, eps) order.
        images: per eps (same order as ``AttackConfig.eps_values()``), the saved
            ``(N, C, H, W)`` uint8 images.
        model_calls: forward passes of the batch, attacks plus clean and re-check passes.
    """

    rows: list[dict[str, Any]]
    images: list[torch.Tensor]
    model_calls: int


def _attack_kwargs(config: AttackConfig) -> dict[str, Any]:
    """The attack's keyword arguments, with ``norm`` made to agree with ``config.norm``."""
    from advtune import attacks

    kwargs = dict(config.params)
    if config.attack not in attacks.names():
        return kwargs  # a custom attack function: the caller knows its keywords
    spec = attacks.spec(config.attack)
    if "norm" in spec.defaults:
        # The threat model of the saved images and the attack's own must be the same one.
        if kwargs.get("norm", config.norm) != config.norm:
            raise ValueError(
                f"params norm {kwargs['norm']!r} disagrees with config norm {config.norm!r}"
            )
        kwargs["norm"] = config.norm
    elif spec.norm != config.norm:
        raise ValueError(f"attack {config.attack!r} is {spec.norm}, not {config.norm}")
    return kwargs


def _least_likely(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # argmin of the clean logits; if the model ranks the true class last (an untrained
    # model can), the next least likely class, so the target never equals the label.
    order = logits.argsort(dim=1)
    first, second = order[:, 0], order[:, 1]
    return torch.where(first == labels, second, first)


def attack_batch(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    indices: Sequence[int],
    paths: Sequence[str],
    config: AttackConfig,
    *,
    attack_fn: Callable[..., Any] | None = None,
    adv_paths: Mapping[str, str] | None = None,
) -> BatchOutput:
    """Attack one batch for every eps and describe each saved image.

    Args:
        model: classifier on [0, 1] images → logits ``(N, K)``.
        images: ``(N, C, H, W)`` clean images in [0, 1], 8-bit quantised, on the model's
            device.
        labels: ``(N,)`` labels; ``-1`` means unknown and is replaced by the model's clean
            prediction.
        indices: dataset index of each image (per-sample seeds derive from it).
        paths: relative path of each image.
        config: the attack configuration.
        attack_fn: the attack function (default ``advtune.attacks.get(config.attack)``).
        adv_paths: relative PNG path for each image path (``adv_path`` column); ``None``
            when images are not saved.

    Returns:
        A :class:`BatchOutput`. ``success``/``adv_pred``/norms describe the *saved*
        (quantised) images; ``attack_success`` is the attack's own verdict before
        quantisation.
    """
    if attack_fn is None:
        from advtune import attacks

        attack_fn = attacks.get(config.attack)
    base_kwargs = _attack_kwargs(config)
    n = images.shape[0]
    labels = labels.to(images.device).long()
    with torch.no_grad():
        clean_logits = model(images).float()
    clean_prob = clean_logits.softmax(dim=1)
    clean_conf, clean_pred = clean_prob.max(dim=1)
    num_classes = clean_logits.shape[1]
    if n and int(labels.max()) >= num_classes:
        raise UserError(
            f"label {int(labels.max())} is out of range for a model with {num_classes} "
            "classes; is this the right model for the dataset?"
        )
    labels = torch.where(labels < 0, clean_pred, labels)
    seeds = sample_seeds(config.seed, indices)
    target = None
    if config.targeted == "random":
        from advtune.attacks._random import random_target

        target = random_target(labels, num_classes, seeds=seeds)
    elif config.targeted == "least-likely":
        target = _least_likely(clean_logits, labels)
    elif config.targeted is not None:
        raise ValueError(
            f"targeted must be None, 'random' or 'least-likely', got {config.targeted!r}"
        )

    rows: list[dict[str, Any]] = []
    saved: list[torch.Tensor] = []
    calls = 1
    per_eps: list[tuple[float | None, dict[str, list[Any]]]] = []
    for eps in config.eps_values():
        kwargs = dict(base_kwargs)
        if eps is not None:
            kwargs["eps"] = eps
        try:
            result = attack_fn(model, images, labels, target=target, seeds=seeds, **kwargs)
        except UserError:
            raise
        except ValueError as e:
            # Bad hyperparameters surface here (the attacks validate them); the chained
            # exception keeps the traceback for library users.
            raise UserError(f"attack {config.attack!r} rejected its settings: {e}") from e
        calls += int(result.model_calls) + 1
        q = quantize_adv(result.x_adv, images, norm=config.norm, eps=eps)
        x_q = q.to(images.dtype) / 255
        with torch.no_grad():
            adv_logits = model(x_q).float()
        adv_conf, adv_pred = adv_logits.softmax(dim=1).max(dim=1)
        success = adv_pred == target if target is not None else adv_pred != labels
        delta = (q.double() - torch.round(images.double() * 255)).flatten(1) / 255
        saved.append(q)
        per_eps.append(
            (
                eps,
                {
                    "adv_pred": adv_pred.tolist(),
                    "success": success.tolist(),
                    "attack_success": result.success.tolist(),
                    "linf": delta.abs().amax(dim=1).tolist() if n else [],
                    "l2": delta.norm(dim=1).tolist(),
                    "adv_conf": adv_conf.tolist(),
                },
            )
        )
    label_list = labels.tolist()
    clean_list = clean_pred.tolist()
    conf_list = clean_conf.tolist()
    target_list = target.tolist() if target is not None else [None] * n
    for i in range(n):
        for eps, cols in per_eps:
            rows.append(
                {
                    "path": paths[i],
                    "label": label_list[i],
                    "clean_pred": clean_list[i],
                    "adv_pred": cols["adv_pred"][i],
                    "success": bool(cols["success"][i]),
                    "linf": float(cols["linf"][i]),
                    "l2": float(cols["l2"][i]),
                    "index": int(indices[i]),
                    "eps": eps,
                    "target": target_list[i],
                    "clean_conf": float(conf_list[i]),
                    "adv_conf": float(cols["adv_conf"][i]),
                    "attack_success": bool(cols["attack_success"][i]),
                    "adv_path": adv_paths[paths[i]] if adv_paths else "",
                }
            )
    return BatchOutput(rows=rows, images=saved, model_calls=calls)


# --------------------------------------------------------------------------- the loop


@dataclass
class RunStats:
    """Timing and memory of one :func:`run_attack` call (this process only).

    Attributes:
        images: images attacked.
        batches: batches attacked.
        wall_s: wall time of the loop, data loading included.
        attack_s: time inside :func:`attack_batch`.
        model_calls: forward passes of whole batches.
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
    peak_memory_bytes: int | None = None
    oom_backoffs: int = 0
    final_batch_size: int | None = None

    @property
    def images_per_s(self) -> float | None:
        return self.images / self.wall_s if self.wall_s > 0 and self.images else None


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_attack(
    model: nn.Module,
    loader: Iterable[Mapping[str, Any]],
    config: AttackConfig,
    *,
    sink: Callable[[BatchOutput], None] | None = None,
    skip: Iterable[int] = (),
    adv_paths: Mapping[str, str] | None = None,
    progress: bool | Any = False,
    total: int | None = None,
    device: torch.device | str | None = None,
    on_batch_done: Callable[[int], None] | None = None,
    stats: RunStats | None = None,
    pad_to: int | None = None,
) -> RunStats:
    """Attack every batch of ``loader`` and hand the results to ``sink``.

    Args:
        model: classifier on [0, 1] images.
        loader: yields batches ``{"image": (N, C, H, W), "label": (N,), "index": (N,),
            "path": list[str]}`` (``advtune.data.make_loader``).
        config: the attack configuration.
        sink: called with each batch's :class:`BatchOutput` (saves PNGs, appends rows).
        skip: dataset indices not to attack (done in an earlier session). Indices seen
            twice (a padded distributed sampler) are attacked once.
        adv_paths: forwarded to :func:`attack_batch`.
        progress: ``True`` for a tqdm bar on stderr, or a tqdm-like object with
            ``update(n)`` and ``set_postfix_str(s)``, or an object with
            ``batch_done(*, images, rows, successes)`` that gets each batch's counts
            (``advtune.distributed.GlobalProgress``: the global bar of a torchrun run,
            which may raise to stop this rank when another rank failed).
        total: number of images expected (for the bar).
        device: where images go (default: the model's device).
        on_batch_done: called with the number of batches finished after each sink call
            (the CLI's testing hook uses it to simulate a kill).
        stats: a :class:`RunStats` to fill in (so a caller still has the numbers when the
            loop is interrupted); a new one by default.
        pad_to: pad smaller batches (the last one, a resumed run's, a torchrun rank's)
            to this size by repeating their last image, whose extra results are dropped,
            so that results are the same however the images are batched or sharded.

    Out of memory: an OOM error (``torch.OutOfMemoryError``, CUDA's, or an allocator's
    "out of memory" RuntimeError) in an attack call halves the number of images per call
    and redoes the failed part (:func:`advtune.runtime.run_with_oom_backoff`); the smaller
    size is kept for the rest of the loop, nothing is lost and each image is attacked
    once. A warning is issued at the first back-off; ``stats.oom_backoffs`` counts them.
    With ``pad_to``, every call is padded to the size in effect, so an image's results
    depend only on that size: identical to an uninterrupted run wherever the kernels
    give the same per-image floats at both sizes, and otherwise equal to a run at the
    smaller size (see ``docs/cli.md``, *Out of memory*).

    Returns:
        :class:`RunStats` for this call.
    """
    from advtune import attacks

    attack_fn = attacks.get(config.attack)
    device = torch.device(device) if device is not None else _model_device(model)
    seen = set(int(i) for i in skip)
    stats = stats if stats is not None else RunStats()
    bar = None
    own_bar = False
    if progress is True:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="img", desc=config.attack, file=sys.stderr, leave=False)
        own_bar = True
    elif progress:
        bar = progress
    successes = 0
    rows_done = 0
    # Images per attack call: pad_to (None: each loader batch whole) until an OOM halves it.
    chunk = pad_to
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    try:
        for batch in loader:
            keep = []
            for position, index in enumerate(_as_list(batch["index"])):
                if index not in seen:
                    seen.add(index)
                    keep.append(position)
            if not keep:
                continue
            images = batch["image"]
            labels = batch["label"]
            if not isinstance(labels, torch.Tensor):
                labels = torch.as_tensor(labels)
            indices = _as_list(batch["index"])
            paths = list(batch["path"])
            if len(keep) < len(indices):
                sel = torch.tensor(keep)
                images, labels = images[sel], labels[sel]
                indices = [indices[k] for k in keep]
                paths = [paths[k] for k in keep]
            images = images.to(device, non_blocking=True)
            n = len(indices)
            t0 = time.perf_counter()
            # With pad_to, a short chunk (the last batch, a resumed run's, a torchrun
            # rank's, the tail of a batch split after an OOM) repeats its last image up to
            # the chunk size and the copies' results are dropped: every attack call then
            # has the same shape, so results do not depend on which images share a call
            # (kernels may pick another algorithm, summing in another order, for another
            # batch size).
            result = run_with_oom_backoff(
                _ChunkAttack(model, indices, paths, config, attack_fn, adv_paths),
                {"image": images, "label": labels, "position": torch.arange(n)},
                chunk_size=chunk,
                pad=pad_to is not None,
                trim=_trim_output,
                combine=_join_outputs,
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
            _sync(device)
            stats.attack_s += time.perf_counter() - t0
            if sink is not None:
                sink(out)
            stats.images += len(indices)
            stats.batches += 1
            stats.model_calls += out.model_calls
            successes += sum(row["success"] for row in out.rows)
            rows_done += len(out.rows)
            if bar is not None and hasattr(bar, "batch_done"):
                bar.batch_done(
                    images=len(indices),
                    rows=len(out.rows),
                    successes=sum(row["success"] for row in out.rows),
                )
            elif bar is not None:
                bar.update(len(indices))
                bar.set_postfix_str(f"success {100 * successes / max(rows_done, 1):.1f}%")
            if on_batch_done is not None:
                on_batch_done(stats.batches)
    finally:
        stats.wall_s = time.perf_counter() - start
        if own_bar:
            bar.close()
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
    )


def _join_outputs(parts: Sequence[BatchOutput]) -> BatchOutput:
    if len(parts) == 1:
        return parts[0]
    return BatchOutput(
        rows=[row for part in parts for row in part.rows],
        images=[torch.cat(qs) for qs in zip(*(part.images for part in parts))],
        # Each chunk ran the attack on its share of the batch: the batch took as many
        # passes as its longest chunk (attacks that stop early may differ per chunk).
        model_calls=max(part.model_calls for part in parts),
    )


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_name(index)
    return device.type


def _probe_config(config: AttackConfig) -> AttackConfig:
    """``config`` reduced to one iteration per eps: the memory of a batch does not grow
    with the number of steps, restarts or binary-search rounds, but it does with the
    number of eps (each eps's 8-bit images stay on the device until the batch is done,
    and one eps's result is alive while the next is attacked)."""
    from advtune import attacks

    keys = set(config.params)
    if config.attack in attacks.names():
        keys |= set(attacks.spec(config.attack).defaults)
    params = dict(config.params)
    for name in ("steps", "restarts", "binary_search_steps"):
        if name in keys:
            params[name] = 1
    return AttackConfig(
        attack=config.attack, norm=config.norm, eps=config.eps, params=params,
        targeted=config.targeted, seed=config.seed,
    )  # fmt: skip


def auto_batch_size(
    model: nn.Module,
    config: AttackConfig,
    *,
    input_shape: Sequence[int],
    device: torch.device | str | None = None,
    key: Mapping[str, Any] | None = None,
    limit: int = 16384,
    cache_file: str | os.PathLike[str] | None = None,
    cpu_batch_size: int = CPU_BATCH_SIZE,
) -> int:
    """The largest batch :func:`run_attack` can attack at once in free GPU memory.

    Probes :func:`attack_batch` itself — clean forward, the attack reduced to one
    iteration per eps (:func:`_probe_config`: memory does not grow with the step count), 8-bit
    quantisation and the re-check — on random images, doubling then bisecting the batch
    and backing off on OOM (:func:`advtune.runtime.auto_batch_size`, which keeps 90 % of
    the largest size that fits). On a CPU nothing is probed: the answer is
    ``cpu_batch_size``.

    Args:
        model: the prepared model (ConvBN mode, AMP, channels_last, compile applied).
        config: the attack configuration.
        input_shape: ``(C, H, W)`` of one image.
        device: where the model runs (default: its parameters' device).
        key: what identifies the configuration besides the attack and the device (model
            name, ConvBN mode, AMP, channels_last, compile); ``None`` disables caching.
            The attack name, the input shape, the device name and the torch and advtune
            versions are added.
        limit: never more than this (the number of images: a larger batch only pads).
        cache_file: JSON file keeping answers across runs
            (:func:`advtune.runtime.default_batch_size_cache`); ``None``: this process.
        cpu_batch_size: the answer on a CPU (clamped to ``limit``).

    Returns:
        The batch size, ``1 <= size <= limit``.
    """
    from advtune import runtime

    device = torch.device(device) if device is not None else _model_device(model)
    probe_config = _probe_config(config)

    def step(m: nn.Module, x: torch.Tensor) -> None:
        x = (x * 255).round_().div_(255)  # 8-bit images, as the datasets give
        n = x.shape[0]
        unknown = torch.full((n,), -1, dtype=torch.long)
        attack_batch(m, x, unknown, range(n), [""] * n, probe_config)

    full_key = None
    if key is not None:
        full_key = {
            **dict(key),
            "attack": config.attack,
            "eps_count": len(config.eps or ()),  # each eps's results use memory too
            "input_shape": list(input_shape),
            "device": _device_name(device),
            "torch": torch.__version__,
            "advtune": __version__,
        }
    return runtime.auto_batch_size(
        model, input_shape=input_shape, device=device, step=step, key=full_key, limit=limit,
        cache_file=cache_file, cpu_batch_size=cpu_batch_size,
    )  # fmt: skip


def _as_list(values: Any) -> list[int]:
    if isinstance(values, torch.Tensor):
        return [int(v) for v in values.tolist()]
    return [int(v) for v in values]


# --------------------------------------------------------------------------- metrics


# Metrics over an empty set are None (null in JSON), not NaN: NaN != NaN would make equal
# reports compare unequal.


def _mean(values: Sequence[float]) -> float | None:
    # fsum: exact, so the result does not depend on row order.
    return math.fsum(values) / len(values) if values else None


def _median(values: Sequence[float]) -> float | None:
    return float(statistics.median(values)) if values else None


def _rate(flags: Sequence[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def _group_metrics(rows: Sequence[Mapping[str, Any]], targeted: bool) -> dict[str, Any]:
    correct = [r for r in rows if r["clean_pred"] == r["label"]]
    success_rate = _rate(
        [r["success"] for r in rows] if targeted else [r["success"] for r in correct]
    )
    return {
        "num_images": len(rows),
        "clean_accuracy": _rate([r["clean_pred"] == r["label"] for r in rows]),
        "robust_accuracy": _rate([r["adv_pred"] == r["label"] for r in rows]),
        "success_rate": success_rate,
    }


def compute_metrics(
    rows: Sequence[Mapping[str, Any]],
    config: AttackConfig,
    *,
    categories: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Metrics of a run from its manifest rows alone.

    Args:
        rows: manifest rows (any order; each (index, eps) once).
        config: the attack configuration (eps order, targeted).
        categories: class names for the per-class breakdown.

    Returns:
        ``{"num_images", "clean_accuracy", "mean_clean_confidence", "targeted",
        "per_eps": [...]}``; each ``per_eps`` entry has ``eps``, ``num_images``,
        ``clean_accuracy``, ``robust_accuracy``, ``success_rate`` (untargeted: over the
        images the model classified correctly; targeted: target hit rate over all),
        ``success_rate_all``, ``num_correct``, ``quantization_flips``, ``linf_mean``,
        ``linf_median``, ``l2_mean``, ``l2_median``, ``mean_adv_confidence`` and
        ``per_class`` (by label: ``name``, ``num_images``, ``clean_accuracy``,
        ``robust_accuracy``, ``success_rate``). With a single eps its entries are also
        copied to the top level.
    """
    targeted = config.targeted is not None
    by_eps: dict[float | None, list[Mapping[str, Any]]] = {e: [] for e in config.eps_values()}
    for row in rows:
        eps = row["eps"]
        if eps not in by_eps:
            raise ValueError(f"manifest row for {row['path']} has eps {eps}, not in {list(by_eps)}")
        by_eps[eps].append(row)
    first = by_eps[config.eps_values()[0]]
    per_eps = []
    for eps, group in by_eps.items():
        group = sorted(group, key=lambda r: r["index"])
        correct = [r for r in group if r["clean_pred"] == r["label"]]
        entry = {"eps": eps, **_group_metrics(group, targeted)}
        entry.update(
            {
                "success_rate_all": _rate([r["success"] for r in group]),
                "num_correct": len(correct),
                "quantization_flips": sum(r["success"] != r["attack_success"] for r in group),
                "linf_mean": _mean([r["linf"] for r in group]),
                "linf_median": _median([r["linf"] for r in group]),
                "l2_mean": _mean([r["l2"] for r in group]),
                "l2_median": _median([r["l2"] for r in group]),
                "mean_adv_confidence": _mean([r["adv_conf"] for r in group]),
            }
        )
        classes: dict[int, list[Mapping[str, Any]]] = {}
        for r in group:
            classes.setdefault(r["label"], []).append(r)
        entry["per_class"] = {
            str(label): {
                "name": categories[label] if categories and 0 <= label < len(categories) else None,
                **_group_metrics(members, targeted),
            }
            for label, members in sorted(classes.items())
        }
        per_eps.append(entry)
    metrics: dict[str, Any] = {
        "num_images": len(first),
        "clean_accuracy": _rate([r["clean_pred"] == r["label"] for r in first]),
        "mean_clean_confidence": _mean([r["clean_conf"] for r in first]),
        "targeted": config.targeted,
        "per_eps": per_eps,
    }
    if len(per_eps) == 1:
        metrics.update({k: v for k, v in per_eps[0].items() if k not in metrics})
    return metrics


# --------------------------------------------------------------------------- outputs


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
    return {p: (t if counts[t] == 1 else f"{p}.png") for p, t in plain.items()}


def config_differences(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two (nested) config dicts."""
    out = []
    for key in sorted(set(stored) | set(current)):
        a, b = stored.get(key, "<missing>"), current.get(key, "<missing>")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out.extend(f"{key}.{sub}" for sub in config_differences(a, b))
        elif a != b:
            out.append(key)
    return out


def _lookup(d: Mapping[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, Mapping) or part not in d:
            return "<missing>"
        d = d[part]
    return d


class OutputDir:
    """An output folder: ``manifest.csv``, ``report.json``, ``adv/`` and the plot.

    Args:
        root: the folder (created if needed).
        manifest_name, report_name: file names; torchrun ranks use per-rank names and
            rank 0 merges them (:mod:`advtune.distributed`).
        plot_name: the robust-accuracy plot's file name; ``None`` for a folder view
            that owns no plot (a torchrun rank's partial files: clearing them must not
            delete the merged plot).

    Raises:
        UserError: the folder cannot be created or written.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        manifest_name: str = MANIFEST_NAME,
        report_name: str = REPORT_NAME,
        plot_name: str | None = PLOT_NAME,
    ) -> None:
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
        self.manifest_path = self.root / manifest_name
        self.report_path = self.root / report_name
        self.adv_dir = self.root / ADV_DIR
        self.plot_path = self.root / plot_name if plot_name is not None else None
        self.writer = ManifestWriter(self.manifest_path)
        self.previous_report: dict[str, Any] | None = None

    def has_results(self) -> bool:
        """Whether the folder holds manifest rows (a run without any has nothing to keep)."""
        try:
            return bool(read_manifest(self.manifest_path))
        except ValueError:
            return True  # not ours to parse: protect it

    def start(self, config: Mapping[str, Any], *, resume: bool, overwrite: bool) -> None:
        """Check the folder against ``config`` and load rows to resume from.

        Raises:
            UserError: results exist and neither ``resume`` nor ``overwrite``; on resume,
                a stored config that differs in anything that changes results, or a
                manifest without its report.
        """
        if resume and overwrite:
            raise UserError("--resume and --overwrite exclude each other")
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
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"cannot resume: {str(self.report_path)!r} is unreadable ({e})") from e
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
        self.writer = ManifestWriter(self.manifest_path, rows)
        self.previous_report = stored

    def _clear(self) -> None:
        # Remove only what an advtune run wrote: files listed in the old manifest.
        try:
            old = read_manifest(self.manifest_path)
        except ValueError:
            old = []
        for row in old:
            if row.get("adv_path"):
                (self.adv_dir / row["adv_path"]).unlink(missing_ok=True)
        for path in (self.manifest_path, self.report_path, self.plot_path):
            if path is not None:
                path.unlink(missing_ok=True)

    def save_batch(self, out: BatchOutput, *, save_images: bool) -> None:
        """Save a batch: PNGs first, then the manifest rows (so a row implies its PNG)."""
        if save_images:
            eps_count = len(out.images)
            for position, row in enumerate(out.rows):
                image_i, eps_i = divmod(position, eps_count)
                if row["adv_path"]:
                    save_png(self.adv_dir / row["adv_path"], out.images[eps_i][image_i])
        self.writer.extend(out.rows)

    def write_report(self, report: Mapping[str, Any]) -> None:
        write_json(self.report_path, report)


def versions() -> dict[str, str | None]:
    """Versions of advtune, Python, torch, torchvision (and CUDA when built with it)."""
    try:
        import torchvision

        tv = torchvision.__version__
    except ImportError:  # pragma: no cover - torchvision is a dependency
        tv = None
    return {
        "advtune": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": tv,
        "cuda": torch.version.cuda,
    }


def device_info(device: torch.device | str) -> dict[str, Any]:
    device = torch.device(device)
    info: dict[str, Any] = {"type": device.type, "name": platform.processor() or platform.machine()}
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        info["name"] = torch.cuda.get_device_name(index)
        info["index"] = index
        info["total_memory_bytes"] = torch.cuda.get_device_properties(index).total_memory
    else:
        info["threads"] = torch.get_num_threads()
    return info


def dataset_info(dataset: Any) -> dict[str, Any]:
    """What identifies a dataset for resume checks: root, layout, size, paths digest."""
    paths = list(getattr(dataset, "paths", []))
    digest = hashlib.sha256("\n".join(paths).encode("utf-8")).hexdigest()[:16]
    root = getattr(dataset, "root", None)
    return {
        "root": str(Path(root).resolve()) if root is not None else None,
        "layout": getattr(dataset, "layout", None),
        "labeled": bool(getattr(dataset, "labeled", True)),
        "num_images": len(paths) if paths else len(dataset),
        "paths_sha256": digest,
    }


def unwrap_model(model: nn.Module) -> nn.Module:
    """The classifier inside run-time wrappers (``advtune.runtime.AmpModel``,
    ``torch.compile``), which carries ``name``, ``categories``, ``net``..."""
    seen = 0
    while not hasattr(model, "categories") and seen < 8:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            break
        model, seen = inner, seen + 1
    return model


def _convbn(model: nn.Module) -> dict[str, Any] | None:
    try:
        from advtune import convbn_report

        inner = unwrap_model(model)
        return convbn_report(getattr(inner, "net", inner)).to_dict()
    except Exception as e:  # a report is nice to have; never fail a run over it
        log.debug("no ConvBN report: %s", e)
        return None


def build_report(
    *,
    command: str,
    status: str,
    config: Mapping[str, Any],
    attack: AttackConfig,
    rows: Sequence[Mapping[str, Any]],
    model: nn.Module,
    dataset: Any,
    device: torch.device | str,
    settings: Mapping[str, Any],
    stats: RunStats | None = None,
    previous: Mapping[str, Any] | None = None,
    outputs: Mapping[str, Any] | None = None,
    convbn: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``report.json`` document (see ``docs/cli.md`` for every key).

    ``metrics`` come from ``rows`` only; ``timings`` add this session to the sessions
    recorded in ``previous`` (the report of an interrupted run being resumed).
    """
    inner = unwrap_model(model)
    categories = getattr(inner, "categories", None)
    labeled = bool(getattr(dataset, "labeled", True))
    metrics = compute_metrics(rows, attack, categories=categories) if rows else None
    prev_t = (previous or {}).get("timings") or {}
    session = {
        "images": stats.images if stats else 0,
        "wall_s": stats.wall_s if stats else 0.0,
        "attack_s": stats.attack_s if stats else 0.0,
        "images_per_s": stats.images_per_s if stats else None,
        "model_calls": stats.model_calls if stats else 0,
        "oom_backoffs": stats.oom_backoffs if stats else 0,
        "final_batch_size": stats.final_batch_size if stats else None,
    }
    sessions = list(prev_t.get("sessions", []))
    if stats is not None and stats.images:
        sessions.append(session)
    total_wall = math.fsum(s["wall_s"] for s in sessions)
    total_images = sum(s["images"] for s in sessions)
    peaks = [
        p
        for p in ((previous or {}).get("peak_memory_bytes"), stats and stats.peak_memory_bytes)
        if p
    ]
    skipped = [{"path": p, "reason": r} for p, r in getattr(dataset, "skipped", [])]
    return {
        "format": REPORT_FORMAT,
        "command": command,
        "status": status,
        "config": dict(config),
        "settings": dict(settings),
        "versions": versions(),
        "device": device_info(device),
        "model": {
            "name": getattr(inner, "name", type(inner).__name__),
            "weights": getattr(inner, "weights", None),
            "convbn": getattr(inner, "convbn", None),
            "num_classes": getattr(inner, "num_classes", None),
            "wrapper": type(model).__name__ if inner is not model else None,
        },
        "convbn": dict(convbn) if convbn is not None else None,
        "data": {
            **dataset_info(dataset),
            "label_source": "dataset" if labeled else "model clean predictions",
            "skipped": skipped,
        },
        "metrics": metrics,
        "timings": {
            "wall_s": total_wall,
            "images_per_s": total_images / total_wall if total_wall > 0 and total_images else None,
            "images_this_session": session["images"],
            "resumed": previous is not None,
            "sessions": sessions,
        },
        "peak_memory_bytes": max(peaks) if peaks else None,
        "outputs": dict(outputs or {}),
    }


def format_eps(eps: float | None) -> str:
    """``4/255`` for multiples of 1/255, else the number (``0.5``); ``-`` for none."""
    if eps is None:
        return "-"
    k = eps * 255
    if eps > 0 and abs(k - round(k)) < 1e-6 and eps <= 1:
        return f"{round(k)}/255"
    return f"{eps:g}"


def _pct(value: float | None) -> str:
    return (
        "n/a"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else f"{100 * value:.1f}%"
    )


def _num(value: float | None) -> str:
    return (
        "n/a"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else f"{value:.4g}"
    )


def format_summary(report: Mapping[str, Any]) -> str:
    """A short plain-text table of a report (the CLI prints it)."""
    config = report["config"]
    attack = config["attack"]
    metrics = report.get("metrics") or {}
    model = report.get("model", {})
    lines = [
        f"advtune {report['command']}: {model.get('name')} ({model.get('weights')}) · "
        f"{attack['attack']} {attack['norm']}"
        + (f" targeted={attack['targeted']}" if attack.get("targeted") else "")
        + f" · {metrics.get('num_images', 0)} images · {report['device']['type']}"
    ]
    if report["data"]["label_source"] != "dataset":
        lines.append("labels: the model's clean predictions (unlabeled images)")
    header = f"{'eps':>10}  {'clean acc':>9}  {'robust acc':>10}  {'success':>8}  {'mean linf':>9}  {'mean l2':>8}"
    lines.append(header)
    for entry in metrics.get("per_eps", []):
        lines.append(
            f"{format_eps(entry['eps']):>10}  {_pct(entry['clean_accuracy']):>9}  "
            f"{_pct(entry['robust_accuracy']):>10}  {_pct(entry['success_rate']):>8}  "
            f"{_num(entry['linf_mean']):>9}  {_num(entry['l2_mean']):>8}"
        )
    timings = report.get("timings", {})
    peak = report.get("peak_memory_bytes")
    lines.append(
        f"wall {timings.get('wall_s', 0):.1f} s · {_num(timings.get('images_per_s'))} img/s · "
        f"peak memory {'n/a' if peak is None else f'{peak / 2**20:.0f} MiB'}"
    )
    outputs = report.get("outputs", {})
    if outputs:
        lines.append("outputs: " + ", ".join(str(v) for v in outputs.values() if v))
    return "\n".join(lines)


def plot_curve(metrics: Mapping[str, Any], path: str | Path, *, title: str = "") -> bool:
    """Plot robust accuracy against eps (clean accuracy at eps 0) into a PNG.

    Returns:
        ``True`` if written; ``False`` (with a warning) when matplotlib is missing.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        import warnings

        warnings.warn(
            "matplotlib is not installed, so no robust-accuracy plot was written; "
            "install it with: pip install 'advtune[plot]'",
            stacklevel=2,
        )
        return False
    points = sorted(
        (e["eps"], e["robust_accuracy"])
        for e in metrics["per_eps"]
        if e["eps"] is not None and e["robust_accuracy"] is not None
    )
    if points and points[0][0] != 0 and metrics.get("clean_accuracy") is not None:
        points.insert(0, (0.0, metrics["clean_accuracy"]))
    # An explicit Figure + Agg canvas: no pyplot global state, no display backend.
    fig = Figure(figsize=(5, 3.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs = [p[0] for p in points]
    ax.plot(xs, [100 * p[1] for p in points], marker="o")
    ax.set_xticks(xs, [format_eps(x) if x else "0" for x in xs], rotation=45)
    ax.set_xlabel("eps")
    ax.set_ylabel("robust accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    import io as _io

    from advtune.io import atomic_write_bytes

    buffer = _io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())
    return True


# --------------------------------------------------------------------------- the whole run


def run_config(
    *,
    command: str,
    config: AttackConfig,
    context: Mapping[str, Any] | None,
    dataset: Any,
    save_images: bool,
) -> dict[str, Any]:
    """The result-affecting configuration of a run: ``report["config"]``, which
    ``--resume`` compares against the stored run (see :meth:`OutputDir.start`)."""
    return {
        "command": command,
        "attack": config.to_dict(),
        **dict(context or {}),
        "data": dataset_info(dataset),
        "save_images": save_images,
    }


def run(
    model: nn.Module,
    dataset: Any,
    config: AttackConfig,
    *,
    out_dir: str | Path,
    command: str = "generate",
    save_images: bool = True,
    batch_size: int = 32,
    num_workers: int = 2,
    device: torch.device | str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool | Any = False,
    context: Mapping[str, Any] | None = None,
    settings: Mapping[str, Any] | None = None,
    indices: Sequence[int] | None = None,
    manifest_name: str = MANIFEST_NAME,
    report_name: str = REPORT_NAME,
    plot_name: str | None = PLOT_NAME,
    plot: bool | None = None,
    on_batch_done: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Attack ``dataset``, write the outputs to ``out_dir`` and return the report.

    Args:
        model: classifier on [0, 1] images (an ``advtune.models.ImageClassifier``).
        dataset: an ``advtune.data.ImageDataset`` (``paths``, ``labeled``, ``skipped``).
        config: the attack configuration.
        out_dir: output folder (``manifest.csv``, ``report.json``, ``adv/``, plot).
        command: ``"generate"`` or ``"evaluate"`` (recorded in the report).
        save_images: write ``adv/<path>.png`` per image (generate; one eps only).
        batch_size, num_workers: loader settings. Every attack call is padded to
            ``batch_size`` images, so results do not depend on how images are grouped;
            see :func:`run_attack` for what an out-of-memory back-off changes.
        device: where to run (default: the model's device).
        resume: continue the run in ``out_dir``, skipping images already in its manifest.
        overwrite: replace the results in ``out_dir``.
        progress: ``True`` for a tqdm bar, or a tqdm-like object.
        context: result-affecting settings beyond the attack (model, weights, ConvBN
            mode, preprocessing...); stored in ``report["config"]`` and checked on resume.
        settings: other settings (device...), recorded but not checked; ``batch_size``,
            ``num_workers``, ``final_batch_size`` and ``oom_backoffs`` are added.
        indices: dataset indices this process attacks (default all; torchrun shards).
        manifest_name, report_name, plot_name: output file names (per-rank names and
            no plot under torchrun, where :func:`advtune.distributed.run` merges the
            partial manifests and calls :func:`build_report`).
        plot: write the robust-accuracy plot (default: when there are several eps).
        on_batch_done: see :func:`run_attack`.

    Returns:
        The report (also written to ``out_dir/report.json``).

    Raises:
        UserError: see :meth:`OutputDir.start`; ``save_images`` with several eps.
    """
    from advtune.data import make_loader

    if save_images and len(config.eps_values()) > 1:
        raise UserError("saving images takes a single eps; use 'advtune evaluate' for several eps")
    device = torch.device(device) if device is not None else _model_device(model)
    out = OutputDir(
        out_dir, manifest_name=manifest_name, report_name=report_name, plot_name=plot_name
    )
    full_config = run_config(
        command=command, config=config, context=context, dataset=dataset,
        save_images=save_images,
    )  # fmt: skip
    out.start(full_config, resume=resume, overwrite=overwrite)
    paths = list(dataset.paths)
    adv_paths = adv_relpaths(paths) if save_images else None
    done_paths = out.writer.done_paths()
    wanted = range(len(dataset)) if indices is None else indices
    todo = [i for i in wanted if paths[i] not in done_paths]
    skip = [i for i in wanted if paths[i] in done_paths]
    settings = {
        **dict(settings or {}),
        "batch_size": batch_size,
        "num_workers": num_workers,
        "final_batch_size": batch_size,
        "oom_backoffs": 0,
    }
    convbn = _convbn(model)

    def note_backoffs(stats: RunStats) -> None:
        # This session's back-offs (the report is rewritten with them after every run).
        settings["oom_backoffs"] = stats.oom_backoffs
        settings["final_batch_size"] = stats.final_batch_size or batch_size

    outputs = {
        "manifest": str(out.manifest_path),
        "report": str(out.report_path),
        "adv_dir": str(out.adv_dir) if save_images else None,
    }

    def report(status: str, stats: RunStats | None) -> dict[str, Any]:
        return build_report(
            command=command, status=status, config=full_config, attack=config,
            rows=out.writer.rows, model=model, dataset=dataset, device=device,
            settings=settings, stats=stats, previous=out.previous_report,
            outputs=outputs, convbn=convbn,
        )  # fmt: skip

    # Written first, so an interrupted run can always be resumed and checked.
    if out.previous_report is None:
        out.write_report(report("running", None))
    stats = RunStats()
    try:
        if todo:
            loader = make_loader(
                dataset, batch_size=batch_size, num_workers=num_workers,
                device=str(device), sampler=todo,
            )  # fmt: skip
            stats = run_attack(
                model, loader, config,
                sink=lambda b: out.save_batch(b, save_images=save_images),
                skip=skip, adv_paths=adv_paths, progress=progress, total=len(todo),
                device=device, on_batch_done=on_batch_done, stats=stats, pad_to=batch_size,
            )  # fmt: skip
    except BaseException as e:
        # Record the partial state (the manifest already holds every finished batch).
        status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
        note_backoffs(stats)
        out.write_report(report(status, stats))
        raise
    note_backoffs(stats)
    final = report("complete", stats)
    want_plot = plot if plot is not None else len(config.eps_values()) > 1
    if want_plot and final["metrics"] and out.plot_path is not None:
        title = f"{getattr(unwrap_model(model), 'name', '')} · {config.attack} {config.norm}"
        if plot_curve(final["metrics"], out.plot_path, title=title):
            final["outputs"]["plot"] = str(out.plot_path)
    out.write_report(final)
    return final
