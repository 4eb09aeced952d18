"""A ``generate``/``evaluate`` session: from a :class:`~advtune.run.plan.RunPlan` to a report.

:func:`execute` is what the command line calls once it has a plan; it reads top to
bottom:

1. join the process group (torchrun) and pick the device;
2. check the output folder is writable (a failed start leaves no empty folder);
3. :func:`build_inputs`: the model's card (nothing built), the dataset with the card's
   preprocessing (data errors before the slow model load), then the model;
4. complete the run spec: the batch size (``auto`` probed on CUDA), the resume key's
   model part, the recorded settings;
5. :func:`advtune.run.runner.run`: prepare outputs → attack the shard → gather →
   finish the report;
6. the report page (``report.html``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from advtune.errors import UserError
from advtune.run.callbacks import RunCallbacks
from advtune.run.plan import ModelPlan, RunPlan

__all__ = ["build_inputs", "execute"]


def execute(
    plan: RunPlan, *, callbacks: Sequence[RunCallbacks] | None = None
) -> dict[str, Any] | None:
    """Run ``plan``: build the data and the model, attack, write every output.

    Args:
        plan: the checked plan.
        callbacks: progress and hooks; default: a tqdm bar unless ``plan.quiet``.

    Returns:
        The report on rank 0 (``None`` on the other ranks of a torchrun job).

    Raises:
        UserError: bad data, model or folder (one line); see :func:`~advtune.run.runner.run`.
    """
    from advtune.run import runner
    from advtune.run.comm import init_comm
    from advtune.run.outputs import OutputDir

    # Under torchrun (WORLD_SIZE > 1): join the process group, one device per rank.
    comm = init_comm(plan.device)
    if comm.device.startswith("cuda:") and not comm.is_distributed:
        import torch

        # The current device is what the loader's pin-memory thread and any unindexed
        # "cuda" tensor use; without this a run on cuda:1 also opens a context on GPU 0.
        torch.cuda.set_device(torch.device(comm.device))
    created = not plan.out_dir.exists()
    OutputDir(plan.out_dir)  # fails early if the folder is not writable
    try:
        dataset, model, transform = build_inputs(plan, device=comm.device)
        batch_size = plan.batch_size
        if batch_size == "auto":
            from advtune.run.probe import dataset_batch_size

            batch_size = dataset_batch_size(
                model, plan.attack, dataset=dataset, transform=transform, device=comm.device,
                key=plan.model.key,
            )  # fmt: skip
            # Every rank must attack with the same batch shape (results depend on it).
            batch_size = min(comm.all_gather(batch_size))
        spec = plan.spec(
            batch_size=batch_size,
            context=_model_context(plan.model, model, transform),
            settings={
                "device": comm.device,
                "compile": plan.model.compile,
                "recompute": plan.model.recompute,
                "batch_size_requested": plan.batch_size,
            },
        )
        if callbacks is None:
            from advtune.run.callbacks import TqdmProgress

            callbacks = [] if plan.quiet else [TqdmProgress()]
        report = runner.run(spec, model, dataset, comm=comm, callbacks=callbacks)
        if report is not None:  # rank 0: the page of the finished run
            from advtune.run.html import write_html

            write_html(plan.out_dir)
        return report
    except BaseException:
        if created and comm.is_main:
            _remove_if_empty(plan.out_dir)  # a failed start leaves no empty folder behind
        raise


def build_inputs(plan: RunPlan, *, device: str) -> tuple[Any, Any, Any]:
    """``(dataset, model, transform)`` for ``plan``, cheapest checks first.

    The model's card (nothing built), the dataset with the card's preprocessing (a data
    error costs no model load), the ImageNet label check for labeled data, then the model
    (an ensemble for several names; seeded by the run seed), prepared for
    ``amp``/``channels_last``/``compile``.
    """
    from advtune.data import build_dataset, resolve_subset_path
    from advtune.models import model_card
    from advtune.run.inputs import image_size_preprocess

    data, spec = plan.data, plan.model
    if data.subset is not None:
        resolve_subset_path(data.subset)  # a typo costs no model load; any cwd works
    # An ensemble's images are prepared once, with its first member's preprocessing.
    card = model_card(spec.names[0], weights=spec.weights, seed=spec.seed)
    transform = image_size_preprocess(card.preprocess, data.image_size)
    dataset = build_dataset(
        data.root, transform=transform, limit=data.limit, subset=data.subset,
        shuffle_seed=data.shuffle_seed, labels=data.labels,
        exclude=[plan.out_dir],  # a run never reads its own outputs back as input
    )  # fmt: skip
    if getattr(dataset, "labeled", True):  # ImageNet labels: hf: classes must be ours
        from advtune.models.hf_source import require_imagenet

        require_imagenet(card)
    if len(dataset) == 0:
        raise UserError(f"no images found in {str(dataset.root)!r}")
    model = _load(spec, device=device)
    if spec.amp or spec.channels_last or spec.compile:
        from advtune.runtime import prepare

        model = prepare(model, channels_last=spec.channels_last, amp=spec.amp, compile=spec.compile)
    return dataset, model, transform


def _load(spec: ModelPlan, *, device: str) -> Any:
    common: dict[str, Any] = dict(
        weights=spec.weights, convbn=spec.convbn, device=device, progress=spec.progress,
        seed=spec.seed, recompute=spec.recompute,
    )  # fmt: skip
    if len(spec.names) > 1:
        from advtune.models.ensemble import load_ensemble

        return load_ensemble(
            list(spec.names), member_weights=spec.ensemble_weights,
            combine=spec.ensemble_combine or "logits", **common,
        )  # fmt: skip
    from advtune.models import load_model

    return load_model(spec.names[0], **common)


def _model_context(spec: ModelPlan, model: Any, transform: Any) -> dict[str, Any]:
    """The resume key's model part; an ensemble's names every member."""
    from advtune.run.report import unwrap_model
    from advtune.run.spec import model_context

    options = dict(
        convbn=spec.convbn, preprocess=transform, amp=spec.amp, channels_last=spec.channels_last
    )
    inner = unwrap_model(model)
    card = getattr(inner, "card", None)  # an ensemble has none: its members do
    if card is None:
        from advtune.models.ensemble import ModelEnsemble, ensemble_context

        if isinstance(inner, ModelEnsemble):
            return ensemble_context(inner, **options)
    return model_context(card=card, **options)


def _remove_if_empty(folder: Path) -> None:
    """Remove ``folder`` if it holds nothing (or only the run's lock file)."""
    from advtune.run.outputs import LOCK_NAME

    try:
        entries = list(folder.iterdir())
        if all(e.name == LOCK_NAME for e in entries):
            for e in entries:
                e.unlink()
            folder.rmdir()
    except OSError:
        pass  # another process wrote into it meanwhile: it is not empty, keep it
