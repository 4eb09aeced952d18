"""The ``advtune`` command line: ``generate``, ``evaluate``, ``list`` and ``bench``.

A thin layer over :mod:`advtune.run`: it parses arguments into a
:class:`~advtune.run.plan.RunPlan`, hands it to :func:`advtune.run.session.execute`, and
prints the summary. Errors a user
can fix (:class:`advtune.errors.UserError`) become one line ``advtune: error: ...`` on
stderr and exit code 2; SIGINT (Ctrl-C) and SIGTERM exit with 130 and 143 after the
current write and say how to resume. See ``docs/cli.md``.
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from advtune._version import __version__
from advtune.errors import UserError

__all__ = ["build_parser", "main"]

#: Where ``advtune list models`` looks (``advtune.models.model_rows`` sources).
MODEL_SOURCES = ("torchvision", "timm", "robustbench", "hf")

EXIT_FAILED = 1
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130

#: ``--image-size`` upper bound (see ``advtune.run.inputs.MAX_IMAGE_SIZE``; repeated here
#: so parsing needs no torch import).
MAX_IMAGE_SIZE = 4096
#: Upper bounds of the other number flags, checked while parsing (before any model load):
#: a typo of a few digits must be one line, not a run that never ends or an overflow deep
#: inside torch. Seeds are int64 (``torch.manual_seed``); attack settings (``--steps``,
#: ``-p``) are bounded by the attack's declared ``Param``s.
MAX_SEED = 2**63 - 1
MAX_LIMIT = 10**9
MAX_BATCH_SIZE = 65536
MAX_WORKERS = 256


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``advtune: error: ...``, exit 2) like UserError."""

    _seen: list[str] | None = None

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[no-untyped-def]
        # Kept for error(): argparse checks required flags before it reports unknown
        # ones, so `generate --frobnicate` would only say that --model is missing.
        self._seen = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        unknown = self._unknown_flags() if "required" in message else []
        if unknown:
            message = f"unrecognized arguments: {' '.join(unknown)}"
        self.exit(EXIT_USER_ERROR, f"advtune: error: {message}\n")

    def _unknown_flags(self) -> list[str]:
        """The flags in the parsed arguments that this parser does not know."""
        known = self._option_string_actions
        unknown = []
        for token in self._seen or []:
            if token == "--":
                break
            if not token.startswith("-") or token == "-" or _NUMBER.fullmatch(token):
                continue
            flag = token.split("=", 1)[0]
            if flag.startswith("--"):
                # argparse accepts unambiguous prefixes (--out for --output...).
                ok = flag in known or any(k.startswith(flag) for k in known)
            else:
                ok = flag[:2] in known
            if not ok:
                unknown.append(flag)
        return unknown


_NUMBER = re.compile(r"-\d[\d.eE+/-]*")


# --------------------------------------------------------------------------- value types


def _int(text: str) -> int:
    # Flags without a fixed range (--steps...) are checked later, where the message can
    # name the setting; fixed ranges go through _int_at_least.
    try:
        return int(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid integer {text!r}: expected a whole number like 4"
        ) from None


def _int_at_least(minimum: int, text: str) -> int:
    value = _int(text)
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
    return value


def _int_in(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: a whole number in ``[low, high]``, the bound named if not."""

    def parse(text: str) -> int:
        value = _int_at_least(low, text)
        if value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high}, got {value}")
        return value

    parse.__name__ = f"integer in [{low}, {high}]"  # argparse names the type on errors
    return parse


def _positive_int(text: str) -> int:
    return _int_at_least(1, text)


_image_size = _int_in(1, MAX_IMAGE_SIZE)
_seed = _int_in(0, MAX_SEED)
_limit = _int_in(1, MAX_LIMIT)
_workers = _int_in(0, MAX_WORKERS)
_batch_int = _int_in(1, MAX_BATCH_SIZE)


def _shuffle_seed(text: str) -> int:
    value = _int(text)
    if abs(value) > MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be between -{MAX_SEED} and {MAX_SEED}, got {value}")
    return value


def _batch_size(text: str) -> int | str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return _batch_int(text)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{e} (or 'auto')") from None


def _eps_list(text: str) -> list[float]:
    from advtune.presets import parse_number_list

    try:
        return parse_number_list(text, what="eps")
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _ensemble_weights(text: str) -> list[float]:
    from advtune.presets import parse_number_list

    try:
        return parse_number_list(text, what="ensemble weight")
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _key_value(text: str) -> tuple[str, str]:
    # The value stays text: the attack's spec types and validates it (resolve_attack).
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip().replace("-", "_"), value


# --------------------------------------------------------------------------- parser


#: Flags that are shorthands for ``-p KEY=VALUE`` of a common attack setting.
_PARAM_FLAGS = {"--steps": "iterations", "--step-size": "step size, e.g. 1/255"}


def _add_run_arguments(p: argparse.ArgumentParser, *, several_eps: bool) -> None:
    model = p.add_argument_group("model")
    model.add_argument(
        "--model",
        required=True,
        action="append",
        help="torchvision model name or pkg.module:factory; repeat it to attack an ensemble "
        "(evaluate --adv-from: the target models)",
    )
    model.add_argument(
        "--ensemble-weights",
        type=_ensemble_weights,
        metavar="W1,W2,...",
        help="ensemble: one weight per --model (normalised; default equal)",
    )
    model.add_argument(
        "--ensemble-combine",
        choices=("logits", "probs"),
        help="ensemble: average logits (default) or probabilities (docs/transfer_eval.md)",
    )
    model.add_argument(
        "--weights",
        default="DEFAULT",
        help="DEFAULT, a torchvision weights name, a local checkpoint file, or 'random'",
    )
    model.add_argument(
        "--convbn",
        default=None,
        help="ConvBN mode: eval, tune, deploy or frozen (default: advtune.models.DEFAULT_CONVBN)",
    )
    model.add_argument(
        "--recompute",
        action="store_true",
        help="frozen mode: ViT/Swin/ConvNeXt/MBConv blocks keep only their input and run "
        "again in backward (less memory, about 0.8x the speed; same results)",
    )
    attack = p.add_argument_group("attack (flags override --preset)")
    attack.add_argument("--attack", help="attack name (advtune list attacks)")
    attack.add_argument("--preset", help="preset name (advtune list presets) or a .toml file")
    if several_eps:
        attack.add_argument(
            "--eps", type=_eps_list, help="budget(s), comma-separated: 1/255,2/255,4/255"
        )
    else:
        attack.add_argument("--eps", type=_eps_list, help="budget, e.g. 4/255 (L∞) or 0.5 (L2)")
    # Shorthands for -p KEY=VALUE (their values are typed by the attack's spec).
    for flag, what in _PARAM_FLAGS.items():
        attack.add_argument(flag, metavar=flag.strip("-").upper().replace("-", "_"), help=what)
    # Checked against advtune.attacks.threat_names() after parsing: importing the attacks
    # (and torch) here would slow --help and widen the window before Ctrl-C is one line.
    attack.add_argument(
        "--norm", help="threat model (advtune.attacks.threat_names()), for attacks that take one"
    )
    attack.add_argument(
        "--targeted", choices=("random", "least-likely"), help="targeted attack and target choice"
    )
    attack.add_argument(
        "-p",
        "--param",
        type=_key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other attack setting, e.g. -p restarts=2 -p loss=margin",
    )
    attack.add_argument(
        "--seed", type=_seed, default=0, help="run seed (per-sample seeds derive from it)"
    )
    data = p.add_argument_group("data")
    data.add_argument("--data", help="image folder or ImageNet val (default: the bundled sample)")
    data.add_argument("--limit", type=_limit, help="use the first N images")
    data.add_argument("--subset", help="file of relative paths to use, one per line")
    data.add_argument("--shuffle-seed", type=_shuffle_seed, help="shuffle the order with this seed")
    data.add_argument("--labels", help="LOC_val_solution.csv or devkit ground truth elsewhere")
    data.add_argument(
        "--image-size",
        type=_image_size,
        help="advanced: resize+crop to this side (at most "
        f"{MAX_IMAGE_SIZE}) instead of the model's preprocessing",
    )
    run = p.add_argument_group("run")
    run.add_argument("--out", help="output folder")
    run.add_argument(
        "--batch-size",
        type=_batch_size,
        default=32,
        metavar="N|auto",
        help="images per batch (default 32); 'auto': the largest that fits in free GPU "
        "memory (probed once per configuration and cached), 32 on a CPU",
    )
    run.add_argument("--workers", type=_workers, default=2, help="data-loading processes")
    run.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    run.add_argument(
        "--amp", choices=("bf16", "fp16"), help="mixed precision (autocast; float32 logits)"
    )
    run.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    run.add_argument("--compile", action="store_true", help="wrap the model in torch.compile")
    run.add_argument("--resume", action="store_true", help="continue the run in --out")
    run.add_argument("--overwrite", action="store_true", help="replace results in --out")
    run.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no summary")


def build_parser() -> argparse.ArgumentParser:
    """The ``advtune`` argument parser."""
    parser = _Parser(
        prog="advtune",
        description="Adversarial examples against frozen ImageNet classifiers.",
    )
    parser.add_argument("--version", action="version", version=f"advtune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    gen = sub.add_parser(
        "generate",
        help="attack images and save the adversarial PNGs",
        description="Attack images; write OUT/adv/*.png, OUT/manifest.csv, OUT/report.json.",
    )
    _add_run_arguments(gen, several_eps=False)
    gen.set_defaults(handler=_generate, default_out="advtune-out")

    ev = sub.add_parser(
        "evaluate",
        help="measure robust accuracy (several eps give a curve)",
        description="Attack images and report metrics only (no PNGs); several --eps "
        "values give a robust-accuracy curve and OUT/robust_accuracy.png.",
    )
    _add_run_arguments(ev, several_eps=True)
    ev.add_argument(
        "--adv-from",
        metavar="RUN",
        help="measure the saved PNGs of the generate run in RUN on each --model (no "
        "attack; docs/transfer_eval.md)",
    )
    ev.set_defaults(handler=_evaluate, default_out="advtune-eval")

    ls = sub.add_parser("list", help="list models, attacks or presets")
    ls.add_argument("what", choices=("models", "attacks", "presets"))
    ls.add_argument(
        "--source",
        action="append",
        choices=MODEL_SOURCES,
        help="models only: list this source (repeatable; default: all; timm alone is "
        "~1,900 rows and takes seconds)",
    )
    ls.set_defaults(handler=_list)

    rep = sub.add_parser(
        "report",
        help="write OUT/report.html (a self-contained page) from a run's folder",
        description="Write OUT/report.html from OUT/report.json, manifest.csv and the PNGs: "
        "settings, accuracies, per-component and per-class tables, plot, warnings, gallery.",
    )
    rep.add_argument("out", metavar="OUT", help="the run's output folder")
    rep.add_argument(
        "--gallery", type=_int_in(0, 10_000), default=24, help="adversarial examples shown (24)"
    )
    rep.set_defaults(handler=_report)

    from advtune.bench import register_cli  # ships with advtune; imports no torch

    register_cli(sub)
    _bounded_ints(sub.choices.get("bench"))
    return parser


#: ``advtune bench`` integer flags: their range (``batch_size`` 0 must not mean "the
#: default"); any other integer flag it adds gets ``[0, MAX_LIMIT]``.
_BENCH_INT_RANGES = {
    "batch_size": (1, MAX_BATCH_SIZE),
    "size": (1, MAX_IMAGE_SIZE),
    "steps": (0, 10**6),
    "repeats": (1, 1000),
    "max_batch_limit": (0, 1 << 20),
}


def _bounded_ints(parser: argparse.ArgumentParser | None) -> None:
    """Every plain-``int`` flag of ``parser`` gets a bounded type (one line, bound named)."""
    for action in getattr(parser, "_actions", []):
        if action.type is int:
            action.type = _int_in(*_BENCH_INT_RANGES.get(action.dest, (0, MAX_LIMIT)))


# --------------------------------------------------------------------------- handlers


def _plan(args: argparse.Namespace, *, command: str) -> Any:
    """The flags as a :class:`~advtune.run.plan.RunPlan` (checked; nothing loaded)."""
    from advtune.run.plan import DataPlan, ModelPlan, RunPlan, plan_attack

    model = ModelPlan(
        names=tuple(_model_names(args)), weights=args.weights, convbn=args.convbn,
        recompute=args.recompute, seed=args.seed,
        ensemble_weights=tuple(args.ensemble_weights) if args.ensemble_weights else None,
        ensemble_combine=args.ensemble_combine, amp=args.amp,
        channels_last=args.channels_last, compile=args.compile, progress=not args.quiet,
    )  # fmt: skip
    overrides: dict[str, Any] = dict(args.param)
    for flag in _PARAM_FLAGS:
        dest = flag.strip("-").replace("-", "_")
        if getattr(args, dest) is not None:
            overrides[dest] = getattr(args, dest)
    attack = plan_attack(
        attack=args.attack, preset=args.preset, eps=args.eps, norm=args.norm,
        targeted=args.targeted, overrides=overrides, seed=args.seed, command=command,
    )  # fmt: skip
    data = DataPlan(
        root=args.data, limit=args.limit, subset=args.subset, shuffle_seed=args.shuffle_seed,
        labels=args.labels, image_size=args.image_size,
    )  # fmt: skip
    return RunPlan(
        command=command, attack=attack, model=model, data=data,
        out_dir=Path(args.out or args.default_out), device=args.device,
        batch_size=args.batch_size, num_workers=args.workers, resume=args.resume,
        overwrite=args.overwrite, quiet=args.quiet,
    )  # fmt: skip


def _run(args: argparse.Namespace, *, command: str) -> int:
    from advtune.run import format_summary
    from advtune.run.comm import env_world
    from advtune.run.session import execute

    plan = _plan(args, command=command)
    if not args.quiet and env_world()[0] == 0:  # rank 0 only, as the summary
        _note_out_in_data(args.data, plan.out_dir)
    report = execute(plan)
    if report is not None and not args.quiet:  # rank 0 prints the merged summary
        print(format_summary(report))
    return 0


def _note_out_in_data(data: str | None, out_dir: Path) -> None:
    """One line when the output folder is inside the data folder: its files are left out
    of the input (``build_dataset(exclude=...)``), so a run never reads its own PNGs."""
    if data is None:
        return
    root, out = Path(data).expanduser().resolve(), out_dir.expanduser().resolve()
    if root in out.parents:
        print(
            f"advtune: note: --out {str(out_dir)!r} is inside --data {data!r}; its files "
            "are left out of the input",
            file=sys.stderr,
        )


def _report(args: argparse.Namespace) -> int:
    from advtune.run.html import write_html

    print(write_html(Path(args.out), gallery=args.gallery))
    return 0


def _model_names(args: argparse.Namespace) -> list[str]:
    """The ``--model`` values (repeatable: an ensemble, or --adv-from's targets)."""
    return [args.model] if isinstance(args.model, str) else list(args.model)


def _generate(args: argparse.Namespace) -> int:
    return _run(args, command="generate")


def _evaluate(args: argparse.Namespace) -> int:
    if args.adv_from is not None:
        return _evaluate_saved(args)
    return _run(args, command="evaluate")


#: Flags that choose an attack, which ``evaluate --adv-from`` does not run.
_ATTACK_DESTS = ("attack", "preset", "eps", "steps", "step_size", "norm", "targeted", "param")


def _evaluate_saved(args: argparse.Namespace) -> int:
    """``evaluate --adv-from RUN --model M...``: measure RUN's saved PNGs on each M."""
    from advtune import models
    from advtune.run.comm import parse_device
    from advtune.run.transfer_eval import (
        evaluate_saved,
        format_transfer,
        load_saved_set,
        load_targets,
        write_transfer,
    )

    given = [d for d in _ATTACK_DESTS if getattr(args, d) not in (None, [])]
    given += [d for d in ("ensemble_weights", "ensemble_combine") if getattr(args, d)]
    if given:
        flag = "--" + given[0].replace("_", "-")
        raise UserError(f"--adv-from measures saved images and runs no attack: drop {flag}")
    convbn = args.convbn if args.convbn is not None else models.DEFAULT_CONVBN
    saved = load_saved_set(args.adv_from, data=args.data)  # cheap checks before loads
    targets = load_targets(
        _model_names(args), weights=args.weights, convbn=convbn, device=parse_device(args.device),
        seed=args.seed, progress=not args.quiet,
    )  # fmt: skip
    batch_size = args.batch_size if isinstance(args.batch_size, int) else 32
    result = evaluate_saved(saved, targets, batch_size=batch_size)
    if args.out is not None:
        write_transfer(result, args.out)
    if not args.quiet:
        print(format_transfer(result))
    return 0


def _list(args: argparse.Namespace) -> int:
    if args.source and args.what != "models":
        raise UserError(f"--source applies to 'list models', not 'list {args.what}'")
    if args.what == "models":
        from advtune.models import model_rows

        for row in model_rows(tuple(args.source or MODEL_SOURCES)):
            print(row.format())
    elif args.what == "attacks":
        from advtune import attacks

        for name in attacks.names():
            spec = attacks.spec(name)
            print(f"{name:<12} {spec.norm:<5} {spec.summary}")
            for param in spec.params:
                print(f"    {param.describe()}")
    else:
        from advtune.presets import list_presets
        from advtune.run import format_eps

        presets = list_presets()
        table = [
            (p.name, p.attack, "eps=" + (",".join(map(format_eps, p.eps)) if p.eps else "-"))
            for p in presets
        ]
        # Columns as wide as their longest entry: a long preset name must not shift the rest.
        widths = [max((len(cells[i]) for cells in table), default=0) for i in range(3)]
        for cells, preset in zip(table, presets):
            line = " ".join(f"{cell:<{w}}" for cell, w in zip(cells, widths))
            print(f"{line} {preset.description}".rstrip())
    return 0


# --------------------------------------------------------------------------- entry point


_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-_]|[\x00-\x08\x0b-\x1f\x7f]")


def one_line(text: object) -> str:
    """``text`` on one line: terminal escape sequences and control characters removed,
    whitespace runs collapsed (error and warning lines must stay one plain line)."""
    return " ".join(_ANSI.sub(" ", str(text)).split())


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    # Warnings are for the user here: one line, no source location.
    print(f"advtune: warning: {one_line(message)}", file=file if file is not None else sys.stderr)


#: Write failures that a user can fix (space, quota, file-size limit, permissions...).
_WRITE_ERRNOS = frozenset(
    getattr(errno, name)
    for name in ("ENOSPC", "EDQUOT", "EFBIG", "EISDIR", "ENOTDIR", "EROFS", "EACCES", "EPERM")
    if hasattr(errno, name)
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``advtune`` command line; returns the exit code.

    Args:
        argv: arguments without the program name (default ``sys.argv[1:]``).

    Returns:
        0 on success, 2 for a user error or a failed write (one line on stderr), 130
        after SIGINT and 143 after SIGTERM (one line saying how to resume), 1 when
        another torchrun rank failed (one line on stderr).
    """
    from advtune.run import signals

    previous = signals.install()  # before the slow imports: Ctrl-C at any time is one line
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help, --version, usage errors
            return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        handler = getattr(args, "handler", None)
        if handler is None:
            parser.print_help()
            return 0
        try:
            return _recorded(_dispatch)(handler, args)
        finally:
            from advtune.run.comm import shutdown

            shutdown()
    except KeyboardInterrupt as e:  # before a run started (imports, parsing)
        print("advtune: interrupted", file=sys.stderr)
        return signals.exit_code(e)
    except BrokenPipeError:  # `advtune list models | head`: the reader left; not an error
        # Point stdout at devnull so the interpreter's final flush cannot raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        signals.restore(previous)


def _dispatch(handler: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a sub-command; expected failures become one line on stderr and an exit code."""
    from advtune.run import signals
    from advtune.run.comm import DistributedRunError

    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return int(handler(args) or 0)
    except DistributedRunError as e:
        print(f"advtune: error: {one_line(e)}", file=sys.stderr)
        return EXIT_FAILED
    except UserError as e:
        print(f"advtune: error: {one_line(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as e:
        if e.errno not in _WRITE_ERRNOS:
            raise
        where = f" {e.filename}" if e.filename else ""
        print(
            f"advtune: error: cannot write{where}: {e.strerror or e}; finished batches are "
            "saved: fix that and rerun the same command with --resume",
            file=sys.stderr,
        )
        return EXIT_USER_ERROR
    except KeyboardInterrupt as e:
        print(
            "advtune: interrupted; finished batches are saved. Run the same command "
            "with --resume to continue.",
            file=sys.stderr,
        )
        return signals.exit_code(e)


def _recorded(fn: Callable[..., int]) -> Callable[..., int]:
    # Under torchrun, an unexpected exception's traceback also goes to the error file
    # torchrun's agent reads, so its failure summary names the root cause (expected
    # failures are handled in _dispatch and write none: they are not the root cause).
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        from torch.distributed.elastic.multiprocessing.errors import record

        return record(fn)  # type: ignore[return-value]  # record keeps fn's return type
    return fn
