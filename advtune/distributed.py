"""torchrun support: one device per rank, sharding, per-rank manifests, merge, resume.

``torchrun --nproc-per-node N -m advtune evaluate ...`` (or ``generate``), on one node or
several, runs N copies of the CLI. Each reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``
from the environment (torchrun sets them) and:

1. joins the process group (NCCL on CUDA, with device ``cuda:LOCAL_RANK``; gloo on the
   CPU) plus a gloo *control* group for the small messages advtune exchanges (counts,
   status, rows), so control traffic never touches the GPUs;
2. checks that every rank lists the same dataset (a digest of the relative paths);
3. rank 0 prepares the output folder (config check, ``--resume``/``--overwrite``, folding
   partial manifests left by an interrupted run into ``manifest.csv``) and tells the
   others which images are already done;
4. rank *r* attacks the remaining dataset indices ``remaining[r::W]`` (no padding, so no
   duplicates and no gaps) and writes ``manifest.rank{r}-of-{W}.csv`` (rewritten
   atomically after every batch) and its PNGs;
5. after every batch the ranks sum a small tensor of counts (``all_reduce`` on the
   control group): rank 0 shows one progress bar with the global count, and a rank that
   failed is known to all at the next batch;
6. rank 0 gathers the rows, writes the merged ``manifest.csv`` sorted by dataset index,
   computes the metrics from the merged rows (so they equal a single-process run's) and
   writes ``report.json`` with per-rank and total timings; the partial files are removed.

Without ``WORLD_SIZE`` (or with ``WORLD_SIZE=1``) nothing here creates a process group and
the CLI behaves exactly like a single process. See ``docs/distributed.md``.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import logging
import os
import socket
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from advtune.errors import UserError

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "TIMEOUT_ENV",
    "DistContext",
    "DistributedRunError",
    "GlobalProgress",
    "PeerFailed",
    "consolidate",
    "env_world",
    "init",
    "partial_files",
    "partial_names",
    "resolve_device",
    "run",
    "shard",
    "shutdown",
]

log = logging.getLogger(__name__)

#: Seconds a collective may wait for the other ranks (``init_process_group(timeout=)``).
#: Ranks move in step batch by batch, so waits are short (one batch, model loading at
#: start); the default is generous so a slow first download or a large ``--data`` listing
#: on one node never trips it.
TIMEOUT_ENV = "ADVTUNE_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 3 * 3600

_PARTIAL_MANIFEST_GLOB = "manifest.rank*-of-*.csv"
_PARTIAL_REPORT_GLOB = "report.rank*-of-*.json"


class DistributedRunError(RuntimeError):
    """Another rank failed (or could not be reached); this rank stopped too.

    The CLI prints it as one line and exits with code 1 on every surviving rank.
    """


class PeerFailed(Exception):
    """Raised inside a rank's batch loop when another rank reported a failure.

    Args:
        ranks: the ranks that failed.
    """

    def __init__(self, ranks: Sequence[int]) -> None:
        self.ranks = sorted(ranks)
        super().__init__(f"rank(s) {', '.join(map(str, self.ranks))} failed")


class _CommunicationError(RuntimeError):
    """A collective failed: a peer died or the timeout passed."""


# --------------------------------------------------------------------------- context


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a torchrun job.

    Attributes:
        rank: global rank (``RANK``), 0 for a single process.
        world_size: number of processes (``WORLD_SIZE``), 1 for a single process.
        local_rank: rank on this node (``LOCAL_RANK``): the CUDA device index.
        device: this rank's device (``"cuda:LOCAL_RANK"`` or ``"cpu"``).
        backend: ``"nccl"`` or ``"gloo"``; ``None`` without a process group.
        group: the gloo control group (``None`` without a process group).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    backend: str | None = None
    group: Any = None

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (picklable objects)."""
        if not self.is_distributed:
            return obj
        box = [obj if self.is_main else None]
        _collective(torch.distributed.broadcast_object_list, box, src=0, group=self.group)
        return box[0]

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.is_distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        _collective(torch.distributed.all_gather_object, out, obj, group=self.group)
        return out

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` in rank order on rank 0; ``None`` on the others."""
        if not self.is_distributed:
            return [obj]
        out: list[Any] | None = [None] * self.world_size if self.is_main else None
        _collective(
            torch.distributed.gather_object, obj, out, dst=0, group=self.group
        )  # fmt: skip
        return out


def _collective(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # gloo raises RuntimeError/DistBackendError on a dead peer
        raise _CommunicationError(f"{type(e).__name__}: {e}") from e


def env_world(environ: Mapping[str, str] | None = None) -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's environment variables.

    Missing variables mean a single process: ``(0, 1, 0)``.

    Raises:
        UserError: a variable that is not a non-negative integer, or a rank outside
            ``[0, world_size)``.
    """
    env = os.environ if environ is None else environ

    def read(name: str, default: int) -> int:
        text = env.get(name)
        if text is None or text.strip() == "":
            return default
        try:
            value = int(text)
        except ValueError:
            raise UserError(f"{name} must be an integer, got {text!r}") from None
        if value < 0:
            raise UserError(f"{name} must be >= 0, got {value}")
        return value

    world = read("WORLD_SIZE", 1)
    if world < 1:
        raise UserError(f"WORLD_SIZE must be >= 1, got {world}")
    rank = read("RANK", 0)
    local = read("LOCAL_RANK", 0)
    if rank >= world:
        raise UserError(f"RANK {rank} is out of range for WORLD_SIZE {world}")
    return rank, world, local


def _timeout() -> datetime.timedelta:
    text = os.environ.get(TIMEOUT_ENV)
    if text is None or text.strip() == "":
        return datetime.timedelta(seconds=DEFAULT_TIMEOUT_S)
    try:
        seconds = float(text)
    except ValueError:
        raise UserError(f"{TIMEOUT_ENV} must be a number of seconds, got {text!r}") from None
    if not seconds > 0:
        raise UserError(f"{TIMEOUT_ENV} must be > 0 seconds, got {text!r}")
    return datetime.timedelta(seconds=seconds)


def _rank_device(device: str, local_rank: int) -> str:
    """This rank's device for ``--device`` under torchrun: one CUDA device per rank."""
    text = device.strip().lower()
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return "cpu"
    if text == "cuda":
        if not torch.cuda.is_available():
            raise UserError(
                f"--device cuda asked for, but CUDA is not available (torch "
                f"{torch.__version__}); use --device cpu"
            )
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise UserError(
                f"LOCAL_RANK {local_rank} has no GPU: only {count} CUDA device(s) visible "
                "on this node; start at most that many processes per node"
            )
        return f"cuda:{local_rank}"
    if text.startswith("cuda:"):
        raise UserError(
            f"--device {device} would put every rank on one GPU; under torchrun use "
            "--device cuda (rank r uses cuda:LOCAL_RANK) and choose GPUs with "
            "CUDA_VISIBLE_DEVICES"
        )
    raise UserError(f"unknown device {device!r}; use auto, cpu or cuda")


def resolve_device(device: str, ctx: DistContext | None = None) -> str:
    """The device to run on for ``--device``: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

    Under torchrun (``ctx.is_distributed``) this is the rank's device (``ctx.device``).

    Raises:
        UserError: CUDA asked for but absent, a missing ``cuda:N``, an unknown name.
    """
    if ctx is not None and ctx.is_distributed:
        return ctx.device
    text = device.strip().lower()
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return "cpu"
    if text == "cuda" or (text.startswith("cuda:") and text[5:].isdigit()):
        if not torch.cuda.is_available():
            raise UserError(
                f"--device {text} asked for, but CUDA is not available "
                f"(torch {torch.__version__}); use --device cpu"
            )
        if ":" in text and int(text[5:]) >= torch.cuda.device_count():
            raise UserError(
                f"--device {text}: only {torch.cuda.device_count()} CUDA device(s) visible"
            )
        return text
    raise UserError(f"unknown device {text!r}; use auto, cpu, cuda or cuda:N")


_CONTEXT: DistContext | None = None


def init(device: str = "auto") -> DistContext:
    """Join the torchrun job described by the environment (idempotent).

    Without ``WORLD_SIZE`` (or ``WORLD_SIZE=1``) this returns a single-process context
    and creates no process group; the caller resolves ``device`` itself.

    Args:
        device: ``--device``: ``auto``, ``cpu`` or ``cuda`` (each rank then uses
            ``cuda:LOCAL_RANK``).

    Returns:
        The :class:`DistContext`.

    Raises:
        UserError: bad environment, a device that cannot be used, or ``cuda:N``.
    """
    global _CONTEXT
    rank, world, local = env_world()
    if world == 1:
        return DistContext()
    if _CONTEXT is not None:
        return _CONTEXT
    import torch.distributed as dist

    if not dist.is_available():
        raise UserError("this torch build has no torch.distributed; run a single process")
    dev = _rank_device(device, local)
    backend, group = _join(dev, _timeout())
    _CONTEXT = DistContext(
        rank=rank, world_size=world, local_rank=local, device=dev, backend=backend, group=group
    )
    return _CONTEXT


def _accepts_device_id(init_process_group: Callable[..., Any]) -> bool:
    # init_process_group(device_id=...) exists from torch 2.3 on; torch 2.2 (supported)
    # raises TypeError on the keyword.
    try:
        return "device_id" in inspect.signature(init_process_group).parameters
    except (TypeError, ValueError):
        return False


def _join(dev: str, timeout: datetime.timedelta) -> tuple[str, Any]:
    """Join the default process group for this rank's device; make the control group.

    Args:
        dev: this rank's device, ``"cuda:N"`` (NCCL) or ``"cpu"`` (gloo).
        timeout: for the process groups' collectives.

    Returns:
        ``(backend, control group)``: every collective advtune runs goes through the
        control group, which is gloo (CPU tensors and pickled objects only), also when
        the default group is NCCL: NCCL cannot carry CPU tensors.
    """
    import torch.distributed as dist

    backend = "nccl" if dev.startswith("cuda") else "gloo"
    if backend == "nccl":
        # Before anything touches CUDA: the current device is what NCCL, the data
        # loader's pin-memory thread and unindexed "cuda" tensors use.
        torch.cuda.set_device(torch.device(dev))
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {}
        if backend == "nccl" and _accepts_device_id(dist.init_process_group):
            # Binds the communicator to this rank's GPU up front (no device guessing).
            kwargs["device_id"] = torch.device(dev)
        dist.init_process_group(backend=backend, timeout=timeout, **kwargs)
    if backend == "gloo":
        return backend, dist.group.WORLD
    # Control messages (counts, rows, status) go through gloo on the CPU: no GPU sync
    # per batch, and object collectives need no device juggling.
    return backend, dist.new_group(backend="gloo", timeout=timeout)


def shutdown() -> None:
    """Leave the process group created by :func:`init` (no-op without one)."""
    global _CONTEXT
    if _CONTEXT is None:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    _CONTEXT = None


# --------------------------------------------------------------------------- files


def shard(indices: Sequence[int], rank: int, world_size: int) -> list[int]:
    """Rank ``rank``'s share: ``indices[rank::world_size]``.

    Every index goes to exactly one rank (no padding: unlike a ``DistributedSampler``
    nothing is duplicated to even out the shards).
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    return list(indices[rank::world_size])


def partial_names(rank: int, world_size: int) -> tuple[str, str]:
    """``(manifest, report)`` file names of one rank's partial results."""
    return f"manifest.rank{rank}-of-{world_size}.csv", f"report.rank{rank}-of-{world_size}.json"


def partial_files(out_dir: str | Path) -> tuple[list[Path], list[Path]]:
    """Per-rank partial manifests and reports in ``out_dir`` (any world size), sorted."""
    root = Path(out_dir)
    return sorted(root.glob(_PARTIAL_MANIFEST_GLOB)), sorted(root.glob(_PARTIAL_REPORT_GLOB))


def _merge_rows(
    groups: Iterable[Iterable[Mapping[str, Any]]], *, source: str
) -> list[dict[str, Any]]:
    """Union of row groups keyed by (index, eps); identical duplicates kept once."""
    from advtune.io import row_key

    merged: dict[tuple[int, float], dict[str, Any]] = {}
    for group in groups:
        for row in group:
            key = row_key(row)
            if key in merged and merged[key] != row:
                raise UserError(
                    f"conflicting results for image {row['path']!r} (index {key[0]}) in "
                    f"{source}; remove the folder's partial manifests or use --overwrite"
                )
            merged[key] = dict(row)
    return [merged[k] for k in sorted(merged)]


def consolidate(out_dir: str | Path, *, resume: bool, overwrite: bool) -> None:
    """Deal with partial manifests that an interrupted torchrun run left in ``out_dir``.

    Called before the output folder is checked (by rank 0, or by a single process):

    * ``resume``: their rows are merged into ``manifest.csv`` (atomically, sorted), then
      the partial files are removed; the run continues from the merged manifest, with
      any world size.
    * ``overwrite``: they are removed, with the PNGs their rows list.
    * neither: a :class:`UserError` if they hold any rows (results would be lost).

    Raises:
        UserError: see above; unreadable or conflicting partial manifests.
    """
    from advtune.evaluate import ADV_DIR, MANIFEST_NAME
    from advtune.io import atomic_write_text, format_manifest, read_manifest

    root = Path(out_dir)
    manifests, reports = partial_files(root)
    if not manifests and not reports:
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
            for row in rows:
                if row.get("adv_path"):
                    (root / ADV_DIR / row["adv_path"]).unlink(missing_ok=True)
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
        rows = _merge_rows([existing, *groups], source=str(root))
        atomic_write_text(merged_path, format_manifest(rows))
        log.info("merged %d partial manifest(s) into %s", len(manifests), merged_path)
    # Only now, with every row safe in manifest.csv (or deliberately dropped).
    for path in [*manifests, *reports]:
        path.unlink(missing_ok=True)


# --------------------------------------------------------------------------- progress


class GlobalProgress:
    """Per-batch ``all_reduce`` of counts: the global progress bar and failure news.

    Every rank calls :meth:`batch_done` after each batch and :meth:`finish` once at the
    end (also after an error). Each call is one ``all_reduce`` of ``[images, rows,
    successes, active, failed_0 ... failed_{W-1}]`` on the control group, so the k-th
    call of every rank meets the k-th call of the others; :meth:`finish` keeps taking
    part (contributing zeros) until no rank is active, so ranks with fewer batches do
    not leave the others waiting on a collective that never comes.

    Args:
        ctx: the distributed context.
        total: images all ranks will attack this session (for the bar).
        show: draw a tqdm bar (rank 0 only).
        desc: the bar's label.
    """

    def __init__(self, ctx: DistContext, *, total: int, show: bool, desc: str = "") -> None:
        self.ctx = ctx
        self.failed: set[int] = set()
        self.images = 0
        self.rows = 0
        self.successes = 0
        self.rounds = 0
        self._bar = None
        if show and ctx.is_main:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total, unit="img", desc=f"{desc} ×{ctx.world_size} ranks",
                file=sys.stderr, leave=False,
            )  # fmt: skip

    def _round(self, images: int, rows: int, successes: int, *, active: bool, failed: bool) -> int:
        counts = torch.zeros(4 + self.ctx.world_size, dtype=torch.int64)
        counts[:4] = torch.tensor([images, rows, successes, int(active)])
        if failed:
            counts[4 + self.ctx.rank] = 1
        if self.ctx.is_distributed:
            _collective(torch.distributed.all_reduce, counts, group=self.ctx.group)
        self.rounds += 1
        total_images, total_rows, total_successes, active_ranks = counts[:4].tolist()
        self.failed.update(r for r, flag in enumerate(counts[4:].tolist()) if flag)
        self.images += total_images
        self.rows += total_rows
        self.successes += total_successes
        if self._bar is not None and total_images:
            self._bar.update(total_images)
            self._bar.set_postfix_str(f"success {100 * self.successes / max(self.rows, 1):.1f}%")
        return int(active_ranks)

    def batch_done(self, *, images: int, rows: int, successes: int) -> None:
        """Report a finished batch (its rows are saved).

        Raises:
            PeerFailed: another rank reported a failure; stop this rank's loop.
        """
        self._round(images, rows, successes, active=True, failed=False)
        others = self.failed - {self.ctx.rank}
        if others:
            raise PeerFailed(sorted(others))

    def finish(self, *, failed: bool) -> set[int]:
        """Take part in rounds until every rank is done; returns the ranks that failed.

        Args:
            failed: this rank stopped because of its own error.
        """
        try:
            while self._round(0, 0, 0, active=False, failed=failed) > 0:
                pass
        finally:
            self.close()
        if failed:
            self.failed.add(self.ctx.rank)
        return set(self.failed)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


# --------------------------------------------------------------------------- the run


class _MergedDataset:
    """What :func:`advtune.evaluate.build_report` reads of a dataset, with every rank's
    undecodable images."""

    def __init__(self, dataset: Any, skipped: list[tuple[str, str]]) -> None:
        self.paths = list(dataset.paths)
        self.root = getattr(dataset, "root", None)
        self.layout = getattr(dataset, "layout", None)
        self.labeled = bool(getattr(dataset, "labeled", True))
        self.skipped = skipped

    def __len__(self) -> int:
        return len(self.paths)


def _rank_summary(ctx: DistContext, report_path: Path, error: BaseException | None) -> dict:
    """This rank's timings (from its partial report) for the merged report."""
    from advtune.evaluate import device_info
    from advtune.io import read_json

    session: dict[str, Any] = {}
    peak = None
    try:
        partial = read_json(report_path)
        sessions = partial.get("timings", {}).get("sessions") or []
        session = dict(sessions[-1]) if sessions else {}
        peak = partial.get("peak_memory_bytes")
    except (OSError, ValueError):
        pass  # failed before its report was written
    return {
        "rank": ctx.rank,
        "local_rank": ctx.local_rank,
        "host": socket.gethostname(),
        "device": device_info(ctx.device),
        "images": int(session.get("images", 0)),
        "wall_s": float(session.get("wall_s", 0.0)),
        "attack_s": float(session.get("attack_s", 0.0)),
        "images_per_s": session.get("images_per_s"),
        "model_calls": int(session.get("model_calls", 0)),
        "oom_backoffs": int(session.get("oom_backoffs") or 0),
        "final_batch_size": session.get("final_batch_size"),
        "peak_memory_bytes": peak,
        "status": "complete" if error is None else _status_of(error),
        "error": None if error is None else f"{type(error).__name__}: {error}",
    }


def _status_of(error: BaseException) -> str:
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    if isinstance(error, PeerFailed):
        return "stopped"
    return "failed"


def run(
    ctx: DistContext,
    model: nn.Module,
    dataset: Any,
    config: Any,
    *,
    out_dir: str | Path,
    command: str = "generate",
    save_images: bool = True,
    batch_size: int = 32,
    num_workers: int = 2,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = False,
    context: Mapping[str, Any] | None = None,
    settings: Mapping[str, Any] | None = None,
    plot: bool | None = None,
    on_batch_done: Callable[[int], None] | None = None,
) -> dict[str, Any] | None:
    """:func:`advtune.evaluate.run` across the ranks of a torchrun job.

    Every rank calls it with the same arguments (each with its own model on
    ``ctx.device``). With a single-process ``ctx`` it is exactly
    :func:`advtune.evaluate.run` (after :func:`consolidate`).

    Args:
        ctx: from :func:`init`.
        model, dataset, config: as for :func:`advtune.evaluate.run`; every rank must list
            the same dataset.
        out_dir: the output folder, shared by all ranks (on several nodes: a shared file
            system).
        command, save_images, batch_size, num_workers, resume, overwrite, context,
        settings, plot, on_batch_done: as for :func:`advtune.evaluate.run`.
        progress: one bar on rank 0 with the global count.

    Returns:
        The merged report on rank 0 (also in ``out_dir/report.json``); ``None`` on the
        other ranks.

    Raises:
        UserError: bad output folder or settings (the same on every rank).
        DistributedRunError: another rank failed; this rank stopped after its current
            batch (its rows are saved; rerun with ``--resume``).
        KeyboardInterrupt, Exception: this rank's own failure, re-raised after the
            partial results were merged.
    """
    from advtune import evaluate
    from advtune.io import read_manifest

    if not ctx.is_distributed:
        consolidate(out_dir, resume=resume, overwrite=overwrite)
        return evaluate.run(
            model, dataset, config, out_dir=out_dir, command=command,
            save_images=save_images, batch_size=batch_size, num_workers=num_workers,
            device=ctx.device, resume=resume, overwrite=overwrite, progress=progress,
            context=context, settings=settings, plot=plot, on_batch_done=on_batch_done,
        )  # fmt: skip

    out_dir = Path(out_dir)
    if save_images and len(config.eps_values()) > 1:
        raise UserError("saving images takes a single eps; use 'advtune evaluate' for several eps")
    full_config = evaluate.run_config(
        command=command, config=config, context=context, dataset=dataset, save_images=save_images
    )
    info = full_config["data"]
    digests = ctx.all_gather((info["num_images"], info["paths_sha256"], socket.gethostname()))
    if len({d[:2] for d in digests}) > 1:
        shown = ", ".join(f"rank {r} ({d[2]}): {d[0]} images" for r, d in enumerate(digests))
        raise UserError(f"the ranks list different datasets ({shown}); check --data on every node")

    # Rank 0 prepares the folder; the others learn the outcome (or its error).
    merged_out = None
    if ctx.is_main:
        try:
            consolidate(out_dir, resume=resume, overwrite=overwrite)
            merged_out = evaluate.OutputDir(out_dir)
            merged_out.start(full_config, resume=resume, overwrite=overwrite)
            done = sorted(merged_out.writer.done_paths())
            message = None
        except UserError as e:
            done, message = [], str(e)
    else:
        done, message = [], None
    done, message = ctx.broadcast((done, message))
    if message is not None:
        raise UserError(message)
    done_set = set(done)
    paths = list(dataset.paths)
    remaining = [i for i in range(len(paths)) if paths[i] not in done_set]
    mine = shard(remaining, ctx.rank, ctx.world_size)
    manifest_name, report_name = partial_names(ctx.rank, ctx.world_size)
    run_settings = {
        **dict(settings or {}),
        "batch_size": batch_size,
        "num_workers": num_workers,
        "world_size": ctx.world_size,
        "backend": ctx.backend,
    }
    outputs = {
        "manifest": str(out_dir / evaluate.MANIFEST_NAME),
        "report": str(out_dir / evaluate.REPORT_NAME),
        "adv_dir": str(out_dir / evaluate.ADV_DIR) if save_images else None,
    }
    convbn = evaluate._convbn(model)

    def merged_report(rows, status, stats, skipped, ranks):
        report = evaluate.build_report(
            command=command, status=status, config=full_config, attack=config, rows=rows,
            model=model, dataset=_MergedDataset(dataset, skipped), device=ctx.device,
            settings=run_settings, stats=stats, previous=merged_out.previous_report,
            outputs=outputs, convbn=convbn,
        )  # fmt: skip
        report["distributed"] = {
            "world_size": ctx.world_size,
            "backend": ctx.backend,
            "ranks": ranks,
        }
        return report

    if ctx.is_main and merged_out.previous_report is None:
        # Written first, so a run killed at any point can be resumed and checked.
        merged_out.write_report(merged_report(merged_out.writer.rows, "running", None, [], []))
    # Nobody starts before rank 0 has consolidated the folder (it deletes partial files).
    ctx.broadcast(None)

    bar = GlobalProgress(ctx, total=len(remaining), show=bool(progress), desc=config.attack)
    error: BaseException | None = None
    comm_error: _CommunicationError | None = None
    try:
        evaluate.run(
            model, dataset, config, out_dir=out_dir, command=command,
            save_images=save_images, batch_size=batch_size, num_workers=num_workers,
            device=ctx.device, resume=False, overwrite=False, progress=bar,
            context=context, settings=run_settings, indices=mine,
            manifest_name=manifest_name, report_name=report_name, plot_name=None,
            plot=False, on_batch_done=on_batch_done,
        )  # fmt: skip
    except _CommunicationError as e:
        error = comm_error = e
    except BaseException as e:
        error = e
    failed: set[int] = set()
    if comm_error is None:
        try:
            failed = bar.finish(failed=error is not None and not isinstance(error, PeerFailed))
        except _CommunicationError as e:
            comm_error = e
            error = error or e
    bar.close()

    summary = _rank_summary(ctx, out_dir / report_name, error)
    try:
        own_rows = read_manifest(out_dir / manifest_name)
    except ValueError:
        own_rows = []
    payload = {"rows": own_rows, "summary": summary, "skipped": list(dataset.skipped)}
    gathered = None
    if comm_error is None:
        try:
            gathered = ctx.gather(payload)
        except _CommunicationError as e:
            comm_error = e
            error = error or e

    report = None
    try:
        if ctx.is_main:
            report = _finish_main(
                ctx, out_dir, dataset, merged_out, gathered, payload, error, failed, config,
                plot, model, merged_report,
            )  # fmt: skip
    finally:
        if comm_error is None:
            # Nobody exits before rank 0 has written the merged files (torchrun stops the
            # other ranks as soon as one exits with an error), nor waits for a rank 0
            # that failed while merging.
            with contextlib.suppress(_CommunicationError):
                ctx.broadcast(None)
    if comm_error is not None:
        raise DistributedRunError(
            f"rank {ctx.rank} of {ctx.world_size} lost contact with the other ranks "
            f"({comm_error}); one probably crashed (see its error). Finished batches are "
            f"saved in {str(out_dir)!r}: rerun the same command with --resume to continue"
        ) from error
    if error is not None and not isinstance(error, PeerFailed):
        raise error
    if failed or isinstance(error, PeerFailed):
        others = sorted(failed - {ctx.rank})
        raise DistributedRunError(
            f"rank{'s' if len(others) > 1 else ''} {', '.join(map(str, others))} of "
            f"{ctx.world_size} failed (see {'their errors' if len(others) > 1 else 'its error'}); "
            f"rank {ctx.rank} stopped after its current batch. Finished batches are saved "
            f"in {str(out_dir)!r}: rerun the same command with --resume to continue"
        )
    return report


def _finish_main(
    ctx: DistContext,
    out_dir: Path,
    dataset: Any,
    merged_out: Any,
    gathered: list[Any] | None,
    payload: Mapping[str, Any],
    error: BaseException | None,
    failed: set[int],
    config: Any,
    plot: bool | None,
    model: nn.Module,
    merged_report: Callable[..., dict[str, Any]],
) -> dict[str, Any]:
    """Rank 0: merge rows and timings, write ``manifest.csv`` and ``report.json``."""
    from advtune import evaluate
    from advtune.io import atomic_write_text, format_manifest, read_manifest

    payloads = gathered if gathered is not None else [payload]
    manifests, reports = partial_files(out_dir)
    groups = [merged_out.writer.rows, *(p["rows"] for p in payloads)]
    # Partial files are the durable record: they also cover a rank that could not send
    # its rows (it died), provided the folder is shared.
    for path in manifests:
        try:
            groups.append(read_manifest(path))
        except ValueError:
            log.warning("ignoring unreadable partial manifest %s", path)
    rows = _merge_rows(groups, source=str(out_dir))
    atomic_write_text(out_dir / evaluate.MANIFEST_NAME, format_manifest(rows))

    order = {p: i for i, p in enumerate(dataset.paths)}
    skipped = sorted(
        {tuple(s) for p in payloads for s in p["skipped"]}, key=lambda s: order.get(s[0], -1)
    )
    ranks = sorted((p["summary"] for p in payloads), key=lambda s: s["rank"])
    peaks = [r["peak_memory_bytes"] for r in ranks if r["peak_memory_bytes"]]
    stats = evaluate.RunStats(
        images=sum(r["images"] for r in ranks),
        batches=0,
        # The ranks ran side by side: the session took as long as the slowest one.
        wall_s=max((r["wall_s"] for r in ranks), default=0.0),
        attack_s=sum(r["attack_s"] for r in ranks),
        model_calls=sum(r["model_calls"] for r in ranks),
        peak_memory_bytes=max(peaks) if peaks else None,
        oom_backoffs=sum(r["oom_backoffs"] for r in ranks),
        # A rank that backed off attacks in smaller calls from then on; report the smallest.
        final_batch_size=min(
            (r["final_batch_size"] for r in ranks if r["final_batch_size"]), default=None
        ),
    )
    statuses = {r["status"] for r in ranks}
    if error is None and not failed and gathered is not None:
        status = "complete"
    elif statuses <= {"complete", "interrupted", "stopped"} and "interrupted" in statuses:
        status = "interrupted"
    else:
        status = "failed"
    report = merged_report(rows, status, stats, skipped, ranks)
    # As a single process reports them (advtune.evaluate.run); per rank under "distributed".
    report["settings"]["oom_backoffs"] = stats.oom_backoffs
    report["settings"]["final_batch_size"] = stats.final_batch_size or report["settings"].get(
        "batch_size"
    )
    if gathered is None:
        report["distributed"]["note"] = "other ranks unreachable: only rank 0's timings"
    want_plot = plot if plot is not None else len(config.eps_values()) > 1
    if status == "complete" and want_plot and report["metrics"]:
        name = getattr(evaluate.unwrap_model(model), "name", "")
        if evaluate.plot_curve(
            report["metrics"], merged_out.plot_path, title=f"{name} · {config.attack} {config.norm}"
        ):
            report["outputs"]["plot"] = str(merged_out.plot_path)
    merged_out.write_report(report)
    if gathered is not None:
        # Every rank's rows are in manifest.csv now; the partial files are redundant. A
        # rank that could not be reached may still be writing, so keep them then.
        for path in [*manifests, *reports]:
            path.unlink(missing_ok=True)
    return report
