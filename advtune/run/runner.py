"""The run: one loop for one process or every rank of a torchrun job.

:func:`run` is the one entry point. Every process calls it with the same arguments and
its :class:`~advtune.run.comm.Communicator` (the single-process one by default):

1. the ranks check they list the same dataset;
2. rank 0 locks and prepares the output folder (resume check, ``--overwrite``, folding in
   per-rank manifests a killed torchrun run left) and tells the others what is done;
3. rank *r* attacks ``remaining[r::W]`` (no padding across ranks: no duplicates, no
   gaps), saving after every batch: a single process straight into ``manifest.csv``, a
   torchrun rank into ``manifest.rank{r}-of-{W}.csv`` (what survives a kill -9);
4. after every batch the ranks sum a few counts (:meth:`Communicator.sum`): the global
   progress, and a rank's failure is known to all at the next batch;
5. rank 0 gathers the rows and timings in memory, merges them (reading a rank's
   manifest from disk only when that rank could not be reached), writes ``manifest.csv``,
   computes the metrics once from the rows and writes ``report.json``.
"""

from __future__ import annotations

import contextlib
import socket
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from advtune.attacks._masking import GradientMaskingWarning
from advtune.errors import UserError
from advtune.run import signals
from advtune.run.batch import BatchOutput, merge_cost
from advtune.run.callbacks import Progress, RunCallbacks
from advtune.run.comm import (
    CommunicationError,
    Communicator,
    DistributedRunError,
    PeerFailed,
    shard,
)
from advtune.run.loop import RunStats, attack_loader, model_device
from advtune.run.metrics import success_counts
from advtune.run.outputs import (
    OutputDir,
    adv_relpaths,
    merge_rows,
    partial_manifest_name,
    partial_manifests,
)
from advtune.run.report import (
    aggregate_checks,
    build_report,
    check_warnings,
    convbn_info,
    device_info,
    merge_checks,
    plot_curve,
    plural,
)
from advtune.run.spec import RunSpec
from advtune.storage import ManifestWriter, atomic_write_text, format_manifest, read_manifest

__all__ = ["run"]


class _Rounds:
    """One ``Communicator.sum`` per batch: ``[images, successes, eligible, active,
    failed_0 ... failed_{W-1}]``. The k-th call of every rank meets the k-th of the
    others; :meth:`finish` keeps taking part (with zeros) until no rank is active, so a
    rank with fewer batches never leaves the others waiting."""

    def __init__(self, comm: Communicator, callbacks: Sequence[RunCallbacks], total: int):
        self.comm, self.callbacks, self.total = comm, callbacks, total
        self.failed: set[int] = set()
        self.done = self.successes = self.eligible = 0

    def _round(self, images: int, hits: int, eligible: int, *, active: bool, failed: bool) -> int:
        flags = [0] * self.comm.world_size
        if failed:
            flags[self.comm.rank] = 1
        total = self.comm.sum([images, hits, eligible, int(active), *flags])
        self.failed.update(r for r, flag in enumerate(total[4:]) if flag)
        self.done += total[0]
        self.successes += total[1]
        self.eligible += total[2]
        if total[0]:
            progress = Progress(total[0], self.done, self.total, self.successes, self.eligible)
            for cb in self.callbacks:
                cb.on_progress(progress)
        return total[3]

    def batch_done(self, out: BatchOutput, images: int, batches: int, *, targeted: bool) -> None:
        hits, eligible = success_counts(out.rows, targeted=targeted)
        self._round(images, hits, eligible, active=True, failed=False)
        others = self.failed - {self.comm.rank}
        if others:
            raise PeerFailed(sorted(others))
        for cb in self.callbacks:
            cb.on_batch(batches)

    def finish(self, *, failed: bool) -> set[int]:
        while self._round(0, 0, 0, active=False, failed=failed) > 0:
            pass
        if failed:
            self.failed.add(self.comm.rank)
        return set(self.failed)


def _status_of(error: BaseException | None) -> str:
    if error is None:
        return "complete"
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    if isinstance(error, PeerFailed):
        return "stopped"
    return "failed"


def _rank_summary(comm: Communicator, stats: RunStats, error: BaseException | None) -> dict:
    return {
        "rank": comm.rank,
        "local_rank": comm.local_rank,
        "host": socket.gethostname(),
        "device": device_info(comm.device),
        "images": stats.images,
        "wall_s": stats.wall_s,
        "attack_s": stats.attack_s,
        "images_per_s": stats.images_per_s,
        "model_calls": stats.model_calls,
        "cost": stats.cost,
        "oom_backoffs": stats.oom_backoffs,
        "final_batch_size": stats.final_batch_size,
        "peak_memory_bytes": stats.peak_memory_bytes,
        "status": _status_of(error),
        "error": None if error is None else f"{type(error).__name__}: {error}",
    }


def _merged_stats(ranks: Sequence[dict[str, Any]]) -> RunStats:
    peaks = [r["peak_memory_bytes"] for r in ranks if r["peak_memory_bytes"]]
    return RunStats(
        images=sum(r["images"] for r in ranks),
        batches=0,
        # The ranks ran side by side: the session took as long as the slowest one.
        wall_s=max((r["wall_s"] for r in ranks), default=0.0),
        attack_s=sum(r["attack_s"] for r in ranks),
        model_calls=sum(r["model_calls"] for r in ranks),
        cost=merge_cost(*(r.get("cost") for r in ranks)),
        peak_memory_bytes=max(peaks) if peaks else None,
        oom_backoffs=sum(r["oom_backoffs"] for r in ranks),
        # A rank that backed off attacks in smaller calls from then on; report the smallest.
        final_batch_size=min(
            (r["final_batch_size"] for r in ranks if r["final_batch_size"]), default=None
        ),
    )


def run(
    spec: RunSpec,
    model: nn.Module,
    dataset: Any,
    *,
    comm: Communicator | None = None,
    callbacks: Sequence[RunCallbacks] = (),
) -> dict[str, Any] | None:
    """Attack ``dataset`` as ``spec`` says, write the outputs and return the report.

    Args:
        spec: the run specification.
        model: classifier on [0, 1] images (an ``advtune.models.ImageClassifier``), on
            ``comm.device``.
        dataset: an ``advtune.data.ImageDataset`` (``paths``, ``labeled``, ``skipped``);
            every rank must list the same one.
        comm: :func:`advtune.run.comm.init_comm`'s communicator; default: a single
            process on the model's device.
        callbacks: progress bars, hooks (:class:`~advtune.run.callbacks.RunCallbacks`).

    Returns:
        The report (also in ``out_dir/report.json``) on rank 0; ``None`` on other ranks.

    Raises:
        UserError: bad output folder or settings (the same on every rank); a model
            whose every clean logit is non-finite.
        DistributedRunError: another rank failed; this rank stopped after its current
            batch (its rows are saved; rerun with ``--resume``).
        KeyboardInterrupt, Exception: this process's own failure, re-raised after the
            results so far were saved and the report marked ``interrupted``/``failed``.
    """
    if comm is None:
        comm = Communicator(str(model_device(model)))
    device = torch.device(comm.device)
    key = spec.resume_key(dataset)
    info = key["data"]
    if comm.is_distributed:
        digests = comm.all_gather((info["num_images"], info["paths_sha256"], socket.gethostname()))
        if len({d[:2] for d in digests}) > 1:
            shown = ", ".join(f"rank {r} ({d[2]}): {d[0]} images" for r, d in enumerate(digests))
            raise UserError(
                f"the ranks list different datasets ({shown}); check --data on every node"
            )

    out = OutputDir(spec.out_dir)
    done: list[str] = []
    message = None
    if comm.is_main:
        try:
            out.lock()
            out.start(key, resume=spec.resume, overwrite=spec.overwrite)
            done = sorted(out.writer.done_paths())
        except UserError as e:
            out.unlock()
            if not comm.is_distributed:
                raise
            message = str(e)
    done, message = comm.broadcast((done, message))
    if message is not None:
        raise UserError(message)
    try:
        return _run_locked(spec, model, dataset, comm, callbacks, out, key, set(done), device)
    finally:
        out.unlock()


def _run_locked(
    spec: RunSpec,
    model: nn.Module,
    dataset: Any,
    comm: Communicator,
    callbacks: Sequence[RunCallbacks],
    out: OutputDir,
    key: dict[str, Any],
    done: set[str],
    device: torch.device,
) -> dict[str, Any] | None:
    from advtune.data import make_loader

    config = spec.attack
    paths = list(dataset.paths)
    remaining = [i for i in range(len(paths)) if paths[i] not in done]
    mine = shard(remaining, comm.rank, comm.world_size)
    writer = (
        ManifestWriter(
            out.root / partial_manifest_name(comm.rank, comm.world_size), keep_sorted=False
        )
        if comm.is_distributed
        else out.writer
    )
    # Never pad beyond the dataset: 5 images with --batch-size 32 are attacked as 5. The
    # dataset's size (not what is left) keeps the call shape, and so the results, the
    # same on --resume and on every rank.
    batch_size = max(1, min(spec.batch_size, len(paths)))
    settings: dict[str, Any] = {
        **dict(spec.settings),
        "batch_size": spec.batch_size,
        "num_workers": spec.num_workers,
        "final_batch_size": batch_size,
        "oom_backoffs": 0,
    }
    if comm.is_distributed:
        settings.update(world_size=comm.world_size, backend=comm.backend)
    outputs = {
        "manifest": str(out.manifest_path),
        "report": str(out.report_path),
        "adv_dir": str(out.adv_dir) if spec.save_images else None,
    }
    convbn = convbn_info(model)

    def report(rows, status, stats, skipped, ranks=None, checks=None):
        return build_report(
            command=spec.command, status=status, config=key, attack=config, rows=rows,
            model=model, dataset=dataset, device=device, settings=settings, stats=stats,
            previous=out.previous_report, outputs=outputs, convbn=convbn, skipped=skipped,
            distributed=(
                {"world_size": comm.world_size, "backend": comm.backend, "ranks": ranks}
                if comm.is_distributed else None
            ),
            checks=checks,
        )  # fmt: skip

    if comm.is_main and out.previous_report is None:
        # Written first, so a run killed at any point can be resumed and checked.
        out.write_report(report(out.writer.rows, "running", None, [], []))
    # Nobody writes before rank 0 has prepared the folder (it deletes partial files).
    comm.barrier()

    adv_paths = adv_relpaths(paths) if spec.save_images else None
    targeted = config.targeted is not None
    eps_count = len(config.eps_values())
    rounds = _Rounds(comm, callbacks, len(remaining))
    for cb in callbacks:
        cb.on_start(total=len(remaining), desc=config.attack, is_main=comm.is_main)

    batch_checks: list[dict[str, Any]] = []

    def save(batch: BatchOutput) -> None:
        with signals.deferred():  # a signal waits until the batch is on disk
            if spec.save_images:
                out.save_images(batch)
            writer.extend(batch.rows)
            batch_checks.extend(batch.checks)

    stats = RunStats()
    error: BaseException | None = None
    comm_error: CommunicationError | None = None
    try:
        if mine:
            # A list of indices is a valid sampler (DataLoader iterates it).
            loader = make_loader(
                dataset, batch_size=batch_size, num_workers=spec.num_workers,
                device=str(device), sampler=mine,  # type: ignore[arg-type]
            )  # fmt: skip
            with warnings.catch_warnings():
                # Per batch they would repeat: aggregated into report.json's checks and
                # warned once each at the end (check_warnings).
                warnings.simplefilter("ignore", GradientMaskingWarning)
                attack_loader(
                    model, loader, config, sink=save, adv_paths=adv_paths, device=device,
                    stats=stats, pad_to=batch_size,
                    on_batch=lambda o, b: rounds.batch_done(
                        o, len(o.rows) // eps_count, b, targeted=targeted
                    ),
                )  # fmt: skip
    except CommunicationError as e:
        error = comm_error = e
    except BaseException as e:
        error = e
    try:
        with signals.deferred():
            writer.close()  # sorted on disk again if a batch came out of order
    except BaseException as e:
        error = error or e
    failed: set[int] = set()
    if comm_error is None:
        try:
            failed = rounds.finish(failed=error is not None and not isinstance(error, PeerFailed))
        except CommunicationError as e:
            comm_error = e
            error = error or e
        except BaseException as e:  # e.g. a second Ctrl-C while draining
            error = error or e
    for cb in callbacks:
        cb.on_end()

    payload = {
        "rows": writer.rows if comm.is_distributed else [],
        "summary": _rank_summary(comm, stats, error),
        "skipped": list(getattr(dataset, "skipped", [])),
        "checks": aggregate_checks(batch_checks),
    }
    gathered = None
    if comm_error is None:
        try:
            gathered = comm.gather(payload)
        except CommunicationError as e:
            comm_error = e
            error = error or e

    final = None
    try:
        if comm.is_main:
            final = _finish_main(
                spec, comm, out, dataset, gathered, payload, error, failed, model, report
            )
    finally:
        if comm_error is None and comm.is_distributed:
            # Nobody exits before rank 0 has written the merged files (torchrun stops the
            # other ranks as soon as one exits with an error).
            with contextlib.suppress(CommunicationError):
                comm.barrier()
    if comm_error is not None:
        raise DistributedRunError(
            f"rank {comm.rank} of {comm.world_size} lost contact with the other ranks "
            f"({comm_error}); one probably crashed (see its error). Finished batches are "
            f"saved in {str(out.root)!r}: rerun the same command with --resume to continue"
        ) from error
    if error is not None and not isinstance(error, PeerFailed):
        raise error
    if failed or isinstance(error, PeerFailed):
        others = sorted(failed - {comm.rank})
        raise DistributedRunError(
            f"rank{'s' if len(others) > 1 else ''} {', '.join(map(str, others))} of "
            f"{comm.world_size} failed (see {'their errors' if len(others) > 1 else 'its error'}); "
            f"rank {comm.rank} stopped after its current batch. Finished batches are saved "
            f"in {str(out.root)!r}: rerun the same command with --resume to continue"
        )
    if final is not None:
        _check_finite(final)
    return final


def _finish_main(
    spec: RunSpec,
    comm: Communicator,
    out: OutputDir,
    dataset: Any,
    gathered: list[Any] | None,
    payload: dict[str, Any],
    error: BaseException | None,
    failed: set[int],
    model: nn.Module,
    report: Callable[..., dict[str, Any]],
) -> dict[str, Any]:
    """Rank 0: merge rows and timings in memory, write ``manifest.csv`` and the report."""
    payloads = gathered if gathered is not None else [payload]
    if comm.is_distributed:
        groups = [out.writer.rows, *(p["rows"] for p in payloads)]
        # Only when a rank could not send its rows (it died): its manifest is the record.
        manifests = partial_manifests(out.root)
        if gathered is None:
            for path in manifests:
                try:
                    groups.append(read_manifest(path))
                except ValueError:
                    warnings.warn(f"ignoring unreadable partial manifest {path}", stacklevel=2)
        rows = merge_rows(groups, source=str(out.root))
        atomic_write_text(out.manifest_path, format_manifest(rows))
    else:
        rows = out.writer.rows
    order = {p: i for i, p in enumerate(dataset.paths)}
    skipped = sorted(
        {tuple(s) for p in payloads for s in p["skipped"]}, key=lambda s: order.get(s[0], -1)
    )
    ranks = sorted((p["summary"] for p in payloads), key=lambda s: s["rank"])
    stats = _merged_stats(ranks)
    statuses = {r["status"] for r in ranks}
    if error is None and not failed and gathered is not None:
        status = "complete"
    elif statuses <= {"complete", "interrupted", "stopped"} and "interrupted" in statuses:
        status = "interrupted"
    else:
        status = "failed"
    final = report(
        rows, status, stats, skipped, ranks, checks=merge_checks(*(p["checks"] for p in payloads))
    )
    for line in check_warnings(final["checks"]):
        warnings.warn(line, GradientMaskingWarning, stacklevel=2)
    final["settings"]["oom_backoffs"] = stats.oom_backoffs
    final["settings"]["final_batch_size"] = stats.final_batch_size or final["settings"].get(
        "final_batch_size"
    )
    if comm.is_distributed and gathered is None:
        final["distributed"]["note"] = "other ranks unreachable: only rank 0's timings"
    metrics = final["metrics"] or {}
    if status == "complete" and metrics and metrics.get("mean_clean_confidence") is None:
        final["status"] = status = "failed"  # every clean logit non-finite: see _check_finite
    config = spec.attack
    if status == "complete" and spec.want_plot and final["metrics"]:
        name = final["model"].get("name") or ""
        title = f"{name} · {config.attack} {config.norm}"
        if final["model"].get("random_weights"):
            title += " · RANDOM WEIGHTS (untrained; not a result)"
        if plot_curve(final["metrics"], out.plot_path, title=title):
            final["outputs"]["plot"] = str(out.plot_path)
    out.write_report(final)
    if comm.is_distributed and gathered is not None:
        # Every rank's rows are in manifest.csv now; the partial files are redundant. A
        # rank that could not be reached may still be writing, so keep them then.
        for path in partial_manifests(out.root):
            path.unlink(missing_ok=True)
    return final


def _check_finite(report: dict[str, Any]) -> None:
    """Warn about non-finite logits; refuse a run where no clean logit was finite."""
    metrics = report.get("metrics") or {}
    count = metrics.get("num_nonfinite") or 0
    if not count:
        return
    total = metrics.get("num_images", 0)
    if metrics.get("mean_clean_confidence") is None:  # no image had finite clean logits
        raise UserError(
            f"the model's clean logits are non-finite (NaN/inf) on all {plural(total, 'image')}; "
            "no result can be trusted: check the weights, the preprocessing and --amp"
        )
    warnings.warn(
        f"{plural(count, 'image')} of {total} had non-finite logits (NaN/inf); they count as "
        "neither correct nor robust (report.json: metrics.num_nonfinite)",
        RuntimeWarning,
        stacklevel=3,
    )
