"""What a run is: the attack configuration, the run specification and its resume key.

* :class:`AttackConfig` — everything about the attack that changes results (built by
  :func:`advtune.presets.resolve_attack`).
* :class:`RunSpec` — one run: the attack, where outputs go, batch settings, the
  result-affecting context (model, preprocessing...). It validates itself and yields the
  one resume key (:meth:`RunSpec.resume_key`) that ``--resume``, the CLI and
  ``scripts/imagenet_robustness.py`` all compare.
* :func:`sample_seeds` — per-sample seeds from the run seed and the dataset index, so
  results never depend on batch size, batch composition or (torchrun) rank.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from advtune._splitmix import splitmix64 as _splitmix64
from advtune.errors import UserError

__all__ = [
    "COMMANDS",
    "AttackConfig",
    "RunSpec",
    "dataset_info",
    "effective_params",
    "model_context",
    "sample_seeds",
]

#: The run commands (recorded in the report; ``generate`` saves PNGs).
COMMANDS = ("generate", "evaluate")

_MASK64 = (1 << 64) - 1
#: Largest run seed: int64, as ``torch.manual_seed`` and the random-weights build take it.
MAX_SEED = (1 << 63) - 1


@dataclass(frozen=True)
class AttackConfig:
    """Everything about the attack that changes results.

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

    def threat(self, eps: float | None = None) -> Any:
        """The threat model of the saved images, with radius ``eps``: the one object the
        run asks for geometry (8-bit fitting, the one-level check). ``norm`` stays a name
        here because it is what ``report.json`` and the resume key record."""
        from advtune.attacks import threat_model

        return threat_model(self.norm, eps)

    def effective_params(self) -> dict[str, Any]:
        """Every hyperparameter's value in this run: the given ones over the attack's
        declared defaults (the radius excluded: it is ``eps``; the norm switch, if the
        attack has one, is ``norm``), sorted by name."""
        return effective_params(self.attack, self.norm, self.params)

    def to_dict(self) -> dict[str, Any]:
        """The attack part of the resume key and of ``report.json``: every effective
        hyperparameter (defaults included), so a report alone reproduces the run."""
        d = asdict(self)
        d["eps"] = list(self.eps) if self.eps is not None else None
        d["params"] = self.effective_params()
        return d


def _plain(value: Any) -> Any:
    # The value as JSON gives it back (tuples are lists), so a stored key compares equal.
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def effective_params(attack: str, norm: str | None, given: Mapping[str, Any]) -> dict[str, Any]:
    """``given`` over the declared defaults of ``attack`` (see
    :meth:`AttackConfig.effective_params`); ``given`` alone for an unknown attack."""
    from advtune import attacks

    try:
        spec = attacks.spec(attack)
    except UserError:
        return {k: _plain(v) for k, v in sorted(given.items())}
    params = {k: v for k, v in spec.defaults.items() if k != spec.radius_key}
    params.update(given)
    if spec.norm_key is not None and norm is not None:
        params[spec.norm_key] = norm
    return {k: _plain(v) for k, v in sorted(params.items())}


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


def dataset_info(dataset: Any) -> dict[str, Any]:
    """What identifies a dataset for resume checks: root, layout, size, paths digest."""
    paths = list(getattr(dataset, "paths", []))
    # surrogateescape: a file name that is not UTF-8 (POSIX allows any bytes) hashes as
    # the bytes it is, as the manifest writes it.
    digest = hashlib.sha256("\n".join(paths).encode("utf-8", "surrogateescape")).hexdigest()[:16]
    root = getattr(dataset, "root", None)
    return {
        "root": str(Path(root).resolve()) if root is not None else None,
        "layout": getattr(dataset, "layout", None),
        "labeled": bool(getattr(dataset, "labeled", True)),
        "num_images": len(paths) if paths else len(dataset),
        "paths_sha256": digest,
    }


def model_context(
    *,
    card: Any,
    convbn: str,
    preprocess: Any,
    amp: str | None = None,
    channels_last: bool = False,
) -> dict[str, Any]:
    """The model part of the resume key (``RunSpec.context``), for the CLI and scripts.

    Args:
        card: the model's :class:`~advtune.models.ModelCard` (``model.card``): its name,
            weights, the checkpoint content's sha256 (``card.weights_digest``: another
            file at the same path is another run) and the seed of random weights.
        convbn: the ConvBN mode.
        preprocess: the dataset transform (its ``repr`` is recorded).
        amp, channels_last: run-time options that change the floats.
    """
    model: dict[str, Any] = {"name": card.name, "weights": card.weights, "convbn": convbn}
    digest = card.weights_digest
    if digest is not None:
        model["weights_sha256"] = digest
    if card.seed is not None:
        model["seed"] = card.seed
    return {
        "model": model,
        "preprocess": repr(preprocess),
        "dtype": str(torch.get_default_dtype()),
        "amp": amp,
        "channels_last": channels_last,
    }


@dataclass(frozen=True)
class RunSpec:
    """One run: the attack, the outputs and everything else that changes its results.

    Attributes:
        attack: the attack configuration (its ``seed`` is the run seed).
        out_dir: output folder (``manifest.csv``, ``report.json``, ``adv/``, plot).
        command: ``"generate"`` (saves PNGs) or ``"evaluate"`` (metrics only).
        save_images: write ``adv/<path>.png`` per image; one eps only. Default: ``True``
            for ``generate``.
        batch_size: images per attack call. Every call is padded to this size, so
            results do not depend on how images are grouped.
        num_workers: data-loading processes.
        resume: continue the run in ``out_dir``, skipping images already done.
        overwrite: replace the results in ``out_dir``.
        context: result-affecting settings beyond the attack (model, weights and their
            content hash, ConvBN mode, preprocessing...); part of the resume key.
        settings: other settings (device...), recorded in the report but not checked.
        plot: write the robust-accuracy plot (default: when there are several eps).
    """

    attack: AttackConfig
    out_dir: Path
    command: str = "generate"
    save_images: bool | None = None
    batch_size: int = 32
    num_workers: int = 2
    resume: bool = False
    overwrite: bool = False
    context: Mapping[str, Any] = field(default_factory=dict)
    settings: Mapping[str, Any] = field(default_factory=dict)
    plot: bool | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        if self.save_images is None:
            object.__setattr__(self, "save_images", self.command == "generate")
        self.validate()

    def validate(self) -> None:
        """Check the specification (also run on construction).

        Raises:
            UserError: an unknown command, a batch size below 1, negative workers,
                ``resume`` with ``overwrite``, or saving images for several eps.
        """
        if self.command not in COMMANDS:
            raise UserError(f"command must be one of {COMMANDS}, got {self.command!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int):
            raise UserError(f"batch size must be an integer, got {self.batch_size!r}")
        if self.batch_size < 1:
            raise UserError(f"batch size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise UserError(f"workers must be >= 0, got {self.num_workers}")
        seed = self.attack.seed
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            raise UserError(f"seed must be an integer in [0, {MAX_SEED}] (int64), got {seed!r}")
        if self.resume and self.overwrite:
            raise UserError("--resume and --overwrite exclude each other")
        if self.save_images and len(self.attack.eps_values()) > 1:
            raise UserError(
                f"generate takes one eps, got {len(self.attack.eps_values())}; use "
                "'advtune evaluate' for a curve"
            )

    @property
    def want_plot(self) -> bool:
        return self.plot if self.plot is not None else len(self.attack.eps_values()) > 1

    def resume_key(self, dataset: Any) -> dict[str, Any]:
        """The result-affecting configuration: ``report["config"]``.

        ``--resume`` continues a run only when the stored key equals this one; the grid
        script skips a finished cell on the same condition.
        """
        return {
            "command": self.command,
            "attack": self.attack.to_dict(),
            **dict(self.context),
            "data": dataset_info(dataset),
            "save_images": bool(self.save_images),
        }
