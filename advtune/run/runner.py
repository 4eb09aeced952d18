"""The run session: one loop for one process or every rank of a torchrun job.

:func:`run` is the one entry point. Every process calls it with the same arguments and
its :class:`~advtune.run.comm.Communicator` (the single-process one by default), and the
session goes through four steps, each a method of :class:`_Session`, in this order:

1. :meth:`~_Session.prepare_outputs` — the ranks check they list the same dataset; rank
   0 locks the output folder and prepares it (resume check, ``--overwrite``, folding in
   per-rank manifests a killed torchrun run left), writes a ``running`` report, and every
   rank learns which images are done.
2. :meth:`~_Session.attack_shard` — rank *r* attacks ``remaining[r::W]`` (no padding
   across ranks: no duplicates, no gaps), saving after every batch
   (:meth:`OutputDir.shard_writer`); after every batch the ranks sum a few counts (the
   global progress; a rank's failure is known to all at the next batch). It never
   raises: what went wrong is kept in the :class:`_Shard` it returns.
3. :meth:`~_Session.gather` — rank 0 receives every rank's rows, timings and checks.
4. :meth:`~_Session.finish_report` — rank 0 merges the rows
   (:meth:`OutputDir.collect_rows`), computes the metrics once and writes
   ``report.json``; then :meth:`_Shard.raise_failure` re-raises this process's failure
   or names the rank that failed.

Everything that differs between one process and N lives in the communicator
(``on_main``, ``require_same``, ``describe``; collectives that are the identity for a
single process) and in the output folder's shard layout, not in these steps.
"""

from __future__ import annotations

import contextlib
import socket
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
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
from advtune.run.outputs import OutputDir, adv_relpaths
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
from advtune.storage import ManifestWriter

__all__ = ["run"]


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
    session = _Session(spec, model, dataset, comm, callbacks)
    with session.prepare_outputs():
        result = session.attack_shard()
        gathered = session.gather(result)
        try:
            report = session.finish_report(result, gathered)
        finally:
            if result.comm_error is None:
                # Nobody exits before rank 0 has written the merged files (torchrun stops
                # the other ranks as soon as one exits with an error).
                with contextlib.suppress(CommunicationError):
                    comm.barrier()
    result.raise_failure(comm, str(session.out.root))
    if report is not None:
        _check_finite(report)
    return report


@dataclass
class _Shard:
    """What one rank's attack left: its writer, stats and checks, and what went wrong."""

    writer: ManifestWriter
    stats: RunStats
    checks: list[dict[str, Any]]
    error: BaseException | None = None
    comm_error: CommunicationError | None = None
    failed: frozenset[int] = frozenset()  # ranks that failed (known after the drain)

    def keep(self, error: BaseException) -> None:
        """Remember ``error``; the first one is the cause."""
        self.error = self.error or error
        if isinstance(error, CommunicationError):
            self.comm_error = self.comm_error or error

    def raise_failure(self, comm: Communicator, root: str) -> None:
        """This rank's own failure re-raised, or the failed ranks named; nothing if none."""
        error = self.error
        if self.comm_error is not None:
            raise DistributedRunError(
                f"rank {comm.rank} of {comm.world_size} lost contact with the other ranks "
                f"({self.comm_error}); one probably crashed (see its error). Finished batches "
                f"are saved in {root!r}: rerun the same command with --resume to continue"
            ) from error
        if error is not None and not isinstance(error, PeerFailed):
            raise error
        if self.failed or isinstance(error, PeerFailed):
            others = sorted(self.failed - {comm.rank})
            many = len(others) > 1
            raise DistributedRunError(
                f"rank{'s' if many else ''} {', '.join(map(str, others))} of "
                f"{comm.world_size} failed (see {'their errors' if many else 'its error'}); "
                f"rank {comm.rank} stopped after its current batch. Finished batches are "
                f"saved in {root!r}: rerun the same command with --resume to continue"
            )


class _Session:
    """One run on one rank: the four steps of :func:`run`, in the order they run."""

    def __init__(
        self,
        spec: RunSpec,
        model: nn.Module,
        dataset: Any,
        comm: Communicator,
        callbacks: Sequence[RunCallbacks],
    ) -> None:
        self.spec, self.model, self.dataset = spec, model, dataset
        self.comm, self.callbacks = comm, callbacks
        self.device = torch.device(comm.device)
        self.key = spec.resume_key(dataset)
        self.out = OutputDir(spec.out_dir)
        self.paths = list(dataset.paths)
        self.done: set[str] = set()
        # Never pad beyond the dataset: 5 images with --batch-size 32 are attacked as 5.
        # The dataset's size (not what is left) keeps the call shape, and so the results,
        # the same on --resume and on every rank.
        self.batch_size = max(1, min(spec.batch_size, len(self.paths)))
        self.settings: dict[str, Any] = {
            **dict(spec.settings),
            "batch_size": spec.batch_size,
            "num_workers": spec.num_workers,
            "final_batch_size": self.batch_size,
            "oom_backoffs": 0,
            **(comm.describe() or {}),
        }
        self.convbn = convbn_info(model)

    # ------------------------------------------------------------ 1. prepare outputs

    @contextlib.contextmanager
    def prepare_outputs(self) -> Iterator[None]:
        """Lock and prepare the folder (rank 0), learn what is done; unlock at the end."""
        info = self.key["data"]
        self.comm.require_same(
            (info["num_images"], info["paths_sha256"]),
            label=plural(info["num_images"], "image"),
            what="datasets",
            hint="check --data on every node",
        )
        self.done = set(self.comm.on_main(self._start_folder))
        try:
            if self.comm.is_main and self.out.previous_report is None:
                # Written first, so a run killed at any point can be resumed and checked.
                self.out.write_report(self._report(self.out.writer.rows, "running", None, []))
            # Nobody writes before rank 0 has prepared the folder (it deletes partial files).
            self.comm.barrier()
            yield
        finally:
            self.out.unlock()

    def _start_folder(self) -> list[str]:
        self.out.lock()
        try:
            self.out.start(self.key, resume=self.spec.resume, overwrite=self.spec.overwrite)
        except BaseException:
            self.out.unlock()
            raise
        return sorted(self.out.writer.done_paths())

    # ------------------------------------------------------------ 2. attack the shard

    def attack_shard(self) -> _Shard:
        """Attack this rank's share of what is left, saving after every batch."""
        from advtune.data import make_loader

        spec, comm = self.spec, self.comm
        remaining = [i for i, path in enumerate(self.paths) if path not in self.done]
        mine = shard(remaining, comm.rank, comm.world_size)
        writer = self.out.shard_writer(comm.rank, comm.world_size)
        result = _Shard(writer, RunStats(), [])
        rounds = _Rounds(comm, self.callbacks, len(remaining))
        eps_count = len(spec.attack.eps_values())
        targeted = spec.attack.targeted is not None
        for cb in self.callbacks:
            cb.on_start(total=len(remaining), desc=spec.attack.attack, is_main=comm.is_main)

        def save(batch: BatchOutput) -> None:
            with signals.deferred():  # a signal waits until the batch is on disk
                if spec.save_images:
                    self.out.save_images(batch)
                writer.extend(batch.rows)
                result.checks.extend(batch.checks)

        try:
            if mine:
                # A list of indices is a valid sampler (DataLoader iterates it).
                loader = make_loader(
                    self.dataset, batch_size=self.batch_size, num_workers=spec.num_workers,
                    device=str(self.device), sampler=mine,  # type: ignore[arg-type]
                )  # fmt: skip
                with warnings.catch_warnings():
                    # Per batch they would repeat: aggregated into report.json's checks and
                    # warned once each at the end (check_warnings).
                    warnings.simplefilter("ignore", GradientMaskingWarning)
                    attack_loader(
                        self.model, loader, spec.attack, sink=save, device=self.device,
                        adv_paths=adv_relpaths(self.paths) if spec.save_images else None,
                        stats=result.stats, pad_to=self.batch_size,
                        on_batch=lambda o, b: rounds.batch_done(
                            o, len(o.rows) // eps_count, b, targeted=targeted
                        ),
                    )  # fmt: skip
        except BaseException as e:
            result.keep(e)
        try:
            with signals.deferred():
                writer.close()  # sorted on disk again if a batch came out of order
        except BaseException as e:
            result.keep(e)
        if result.comm_error is None:
            try:
                own = result.error is not None and not isinstance(result.error, PeerFailed)
                result.failed = frozenset(rounds.finish(failed=own))
            except BaseException as e:  # a lost peer, or a second Ctrl-C while draining
                result.keep(e)
        for cb in self.callbacks:
            cb.on_end()
        return result

    # ------------------------------------------------------------ 3. gather

    def gather(self, result: _Shard) -> list[dict[str, Any]] | None:
        """Every rank's payload on rank 0 (``None`` elsewhere, or when a rank was lost)."""
        payload = self._payload(result)
        if result.comm_error is None:
            try:
                return self.comm.gather(payload)
            except CommunicationError as e:
                result.keep(e)
        # A rank was lost: rank 0 finishes with its own payload (and the partial files).
        return [payload] if self.comm.is_main else None

    def _payload(self, result: _Shard) -> dict[str, Any]:
        return {
            # Rank 0's own rows are in its folder's writer; a single process has no other.
            "rows": result.writer.rows if self.comm.is_distributed else [],
            "summary": _rank_summary(self.comm, result.stats, result.error),
            "skipped": list(getattr(self.dataset, "skipped", [])),
            "checks": aggregate_checks(result.checks),
        }

    # ------------------------------------------------------------ 4. finish the report

    def finish_report(
        self, result: _Shard, payloads: list[dict[str, Any]] | None
    ) -> dict[str, Any] | None:
        """Rank 0: merge the rows, write ``manifest.csv``, ``report.json`` and the plot."""
        if not self.comm.is_main or payloads is None:
            return None
        out, spec = self.out, self.spec
        complete = result.comm_error is None
        rows = out.collect_rows(
            [p["rows"] for p in payloads], world_size=self.comm.world_size, complete=complete
        )
        order = {p: i for i, p in enumerate(self.paths)}
        skipped = sorted(
            {tuple(s) for p in payloads for s in p["skipped"]}, key=lambda s: order.get(s[0], -1)
        )
        ranks = sorted((p["summary"] for p in payloads), key=lambda s: s["rank"])
        stats = _merged_stats(ranks)
        statuses = {r["status"] for r in ranks}
        if result.error is None and not result.failed and complete:
            status = "complete"
        elif statuses <= {"complete", "interrupted", "stopped"} and "interrupted" in statuses:
            status = "interrupted"
        else:
            status = "failed"
        checks = merge_checks(*(p["checks"] for p in payloads))
        final = self._report(rows, status, stats, skipped, ranks, checks=checks)
        for line in check_warnings(final["checks"]):
            warnings.warn(line, GradientMaskingWarning, stacklevel=2)
        final["settings"]["oom_backoffs"] = stats.oom_backoffs
        final["settings"]["final_batch_size"] = stats.final_batch_size or final["settings"].get(
            "final_batch_size"
        )
        if not complete and final.get("distributed"):
            final["distributed"]["note"] = "other ranks unreachable: only rank 0's timings"
        metrics = final["metrics"] or {}
        if status == "complete" and metrics and metrics.get("mean_clean_confidence") is None:
            final["status"] = status = "failed"  # every clean logit non-finite: _check_finite
        if status == "complete" and spec.want_plot and metrics:
            name = final["model"].get("name") or ""
            title = f"{name} · {spec.attack.attack} {spec.attack.norm}"
            if final["model"].get("random_weights"):
                title += " · RANDOM WEIGHTS (untrained; not a result)"
            if plot_curve(final["metrics"], out.plot_path, title=title):
                final["outputs"]["plot"] = str(out.plot_path)
        out.write_report(final)
        if complete and self.comm.is_distributed:
            # Every rank's rows are in manifest.csv now; the partial files are redundant. A
            # rank that could not be reached may still be writing, so keep them then.
            out.drop_partial_manifests()
        return final

    def _report(
        self,
        rows: list[dict[str, Any]],
        status: str,
        stats: RunStats | None,
        skipped: list[Any],
        ranks: list[dict[str, Any]] | None = None,
        checks: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        shape = self.comm.describe()
        out = self.out
        return build_report(
            command=self.spec.command, status=status, config=self.key, attack=self.spec.attack,
            rows=rows, model=self.model, dataset=self.dataset, device=self.device,
            settings=self.settings, stats=stats, previous=out.previous_report,
            outputs={
                "manifest": str(out.manifest_path),
                "report": str(out.report_path),
                "adv_dir": str(out.adv_dir) if self.spec.save_images else None,
            },
            convbn=self.convbn, skipped=skipped,
            distributed=None if shape is None else {**shape, "ranks": ranks or []},
            checks=checks,
        )  # fmt: skip


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
