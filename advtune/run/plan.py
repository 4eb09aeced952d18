"""The run plan: what a ``generate``/``evaluate`` command asks for, checked, nothing built.

The command line turns its flags into one :class:`RunPlan` (:func:`plan_attack` resolves
the attack: defaults < preset < flags) and hands it to
:func:`advtune.run.session.execute`. A plan is plain data: building it loads no model
and reads no image, so every check that costs nothing runs before the slow ones (a typo
never costs a model load). Scripts and notebooks can build one directly::

    from advtune.run.plan import DataPlan, ModelPlan, RunPlan, plan_attack
    from advtune.run.session import execute

    plan = RunPlan(
        command="evaluate",
        attack=plan_attack(attack="apgd", eps=[4 / 255]),
        model=ModelPlan(names=("resnet50",)),
        data=DataPlan(root="/data/imagenet/val", limit=1000),
        out_dir="out",
    )
    report = execute(plan)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from advtune.errors import UserError
from advtune.run.spec import AttackConfig, RunSpec

__all__ = ["DataPlan", "ModelPlan", "RunPlan", "plan_attack"]

#: The attack ``evaluate`` runs when none is named: a robustness number needs a strong
#: attack, and PGD at its defaults overstates robust accuracy (docs/attacks.md).
EVALUATE_DEFAULT_ATTACK = "autoattack"


def plan_attack(
    *,
    attack: str | None = None,
    preset: str | Path | None = None,
    eps: Sequence[float] | None = None,
    norm: str | None = None,
    targeted: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    seed: int = 0,
    command: str = "generate",
) -> AttackConfig:
    """The run's attack: registry defaults < ``preset`` < the given settings.

    Args:
        attack: registry name; default: the preset's, else ``autoattack`` for
            ``evaluate``.
        preset: a preset name or ``.toml`` file.
        eps: budgets (several: an eps curve).
        norm: the threat model's name (``advtune.attacks.threat_names()``), for attacks
            that take one; an attack of one norm refuses another.
        targeted: ``None``, ``"random"`` or ``"least-likely"``.
        overrides: other attack settings (``steps``, ``-p KEY=VALUE``), typed and
            bounded by the attack's declared ``Param``s.
        seed: the run seed.
        command: ``"generate"`` or ``"evaluate"`` (only the default attack differs).

    Raises:
        UserError: an unknown attack, preset or norm, or a setting out of range.
    """
    from advtune import attacks
    from advtune.presets import load_preset, resolve_attack

    loaded = load_preset(preset) if preset is not None else None
    name = attack if attack is not None else getattr(loaded, "attack", None)
    if name is None and command == "evaluate":
        name = EVALUATE_DEFAULT_ATTACK
    settings = dict(overrides or {})
    if norm is not None and norm not in attacks.threat_names():
        from advtune.errors import suggest

        raise UserError(suggest(norm, attacks.threat_names(), what="--norm threat model"))
    if norm is not None and name is not None:
        spec = attacks.spec(name)  # UserError suggesting close names if unknown
        if spec.norm_key is not None:
            settings[spec.norm_key] = norm
        elif norm != spec.norm:
            raise UserError(f"attack {name!r} is {spec.norm} only, got --norm {norm}")
    return resolve_attack(
        name, preset=loaded, eps=eps, targeted=targeted, overrides=settings, seed=seed
    )


@dataclass(frozen=True)
class ModelPlan:
    """Which model to build and how (nothing is built here).

    Attributes:
        names: one model name, or several for an ensemble (``advtune.models.load_model``
            names: torchvision, ``timm:``, ``robustbench:``, ``hf:``, ``pkg.mod:fn``).
        weights: ``"DEFAULT"``, a weights name, a local checkpoint or ``"random"``.
        convbn: ConvBN mode; ``None``: ``advtune.models.DEFAULT_CONVBN``.
        recompute: frozen mode's block recomputation.
        seed: seeds random weights (the run seed).
        ensemble_weights, ensemble_combine: an ensemble's member weights and how it
            averages (``"logits"`` or ``"probs"``).
        amp, channels_last, compile: run-time options (``advtune.runtime.prepare``).
        progress: show download progress.
    """

    names: tuple[str, ...]
    weights: str = "DEFAULT"
    convbn: str | None = None
    recompute: bool = False
    seed: int = 0
    ensemble_weights: tuple[float, ...] | None = None
    ensemble_combine: str | None = None
    amp: str | None = None
    channels_last: bool = False
    compile: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", tuple(self.names))
        if not self.names:
            raise UserError("no model given: pass --model NAME")
        if len(self.names) == 1 and (self.ensemble_weights or self.ensemble_combine):
            raise UserError("--ensemble-weights and --ensemble-combine need two or more --model")
        if self.convbn is None:
            from advtune.models import DEFAULT_CONVBN

            object.__setattr__(self, "convbn", DEFAULT_CONVBN)
        from advtune.convbn import check_mode

        check_mode(self.convbn, recompute=self.recompute, names=("--convbn", "--recompute"))

    @property
    def key(self) -> dict[str, Any]:
        """What ``--batch-size auto``'s cache tells configurations apart by."""
        return {
            "model": "+".join(self.names),
            "convbn": self.convbn,
            "amp": self.amp,
            "channels_last": self.channels_last,
            "compile": self.compile,
        }


@dataclass(frozen=True)
class DataPlan:
    """Which images (nothing is read here).

    Attributes:
        root: image folder or ImageNet val; ``None``: the bundled sample.
        limit, subset, shuffle_seed, labels: ``advtune.data.build_dataset``'s options.
        image_size: resize+crop to this side instead of the model's preprocessing.
    """

    root: str | None = None
    limit: int | None = None
    subset: str | None = None
    shuffle_seed: int | None = None
    labels: str | None = None
    image_size: int | None = None


@dataclass(frozen=True)
class RunPlan:
    """One ``generate``/``evaluate`` run as asked for; :meth:`spec` completes it.

    Attributes:
        command: ``"generate"`` or ``"evaluate"``.
        attack: from :func:`plan_attack`.
        model, data: what to build and read.
        out_dir: the output folder.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (under torchrun, each rank's
            ``cuda:LOCAL_RANK``).
        batch_size: images per attack call, or ``"auto"`` (probed on CUDA).
        num_workers, resume, overwrite: as in :class:`~advtune.run.spec.RunSpec`.
        quiet: no progress bar.

    Raises:
        UserError: on construction, anything checkable without loading: the run spec's
            checks, the ConvBN mode, an eps below one 8-bit level.
    """

    command: str
    attack: AttackConfig
    model: ModelPlan
    data: DataPlan = field(default_factory=DataPlan)
    out_dir: Path = Path("advtune-out")
    device: str = "auto"
    batch_size: int | str = 32
    num_workers: int = 2
    resume: bool = False
    overwrite: bool = False
    quiet: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        # The run spec validates itself; "auto" is resolved by the session (spec default).
        self.spec(**({} if self.batch_size == "auto" else {"batch_size": self.batch_size}))
        _check_eps_fits_8bit(self.attack)

    def spec(self, **completed: Any) -> RunSpec:
        """The run spec, completed with what is known once the model is built
        (``batch_size``, ``context``, ``settings``)."""
        return RunSpec(
            attack=self.attack, out_dir=self.out_dir, command=self.command,
            num_workers=self.num_workers, resume=self.resume, overwrite=self.overwrite,
            **completed,
        )  # fmt: skip


def _check_eps_fits_8bit(config: AttackConfig) -> None:
    """Budgets below one 8-bit level cannot survive saving as 8-bit images."""
    for eps in config.eps or ():
        if eps > 0 and not config.threat(eps).survives_quantization:
            from advtune.run.report import format_eps

            raise UserError(
                f"eps {format_eps(eps)} is below 1/255: 8-bit images cannot hold a "
                f"{config.threat().label} perturbation smaller than one level, so "
                "every saved image would equal the clean one; use --eps 1/255 or more"
            )
