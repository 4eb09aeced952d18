"""Attack a dataset, save faithful adversarial PNGs, and measure robustness.

One entry point for one process and for every rank of a torchrun job::

    from advtune.run import AttackConfig, RunSpec, init_comm, run

    spec = RunSpec(attack=AttackConfig("pgd", "linf", eps=(4 / 255,)), out_dir="out")
    report = run(spec, model, dataset, comm=init_comm("auto"))

Modules, each named for what it holds:

* :mod:`~advtune.run.spec` — :class:`AttackConfig`, :class:`RunSpec` (validates itself,
  gives the resume key), per-sample seeds.
* :mod:`~advtune.run.batch` — one batch: targets, the attack per eps, the re-check.
* :mod:`~advtune.run.quantize` — 8-bit saving inside the threat model.
* :mod:`~advtune.run.loop` — the loop over a loader, OOM back-off, :class:`RunStats`.
* :mod:`~advtune.run.probe` — ``--batch-size auto``.
* :mod:`~advtune.run.comm` — communicators (single process / torch.distributed), devices.
* :mod:`~advtune.run.outputs` — the output folder: lock, resume check, files.
* :mod:`~advtune.run.metrics` — metrics from manifest rows.
* :mod:`~advtune.run.report` — ``report.json``, the summary table, the plot.
* :mod:`~advtune.run.callbacks` — progress and hooks.
* :mod:`~advtune.run.signals` — SIGINT/SIGTERM after the current write.
* :mod:`~advtune.run.plan` — :class:`RunPlan`: what a command asks for, checked.
* :mod:`~advtune.run.session` — :func:`execute`: a plan to a report (what the CLI runs).
* :mod:`~advtune.run.runner` — :func:`run`: prepare outputs, attack the shard, gather,
  finish the report.
"""

from __future__ import annotations

import importlib
from typing import Any

# Public name -> the module that holds it. Imported on first use (PEP 562), so that
# ``advtune.run.signals`` can be installed before torch is imported.
_EXPORTS = {
    "AttackConfig": "spec",
    "BatchOutput": "batch",
    "Communicator": "comm",
    "DataPlan": "plan",
    "DistributedRunError": "comm",
    "ModelPlan": "plan",
    "Progress": "callbacks",
    "RunCallbacks": "callbacks",
    "RunPlan": "plan",
    "RunSpec": "spec",
    "RunStats": "loop",
    "TorchCommunicator": "comm",
    "TqdmProgress": "callbacks",
    "attack_batch": "batch",
    "attack_kwargs": "batch",
    "attack_loader": "loop",
    "auto_batch_size": "probe",
    "build_report": "report",
    "compute_metrics": "metrics",
    "dataset_info": "spec",
    "execute": "session",
    "format_eps": "report",
    "format_summary": "report",
    "image_size_preprocess": "inputs",
    "init_comm": "comm",
    "parse_device": "comm",
    "plan_attack": "plan",
    "plot_curve": "report",
    "quantize_adv": "quantize",
    "run": "runner",
    "sample_seeds": "spec",
    "shutdown": "comm",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'advtune.run' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"advtune.run.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
