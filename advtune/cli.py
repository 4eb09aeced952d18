"""The ``advtune`` command line: ``generate``, ``evaluate``, ``list`` and ``bench``.

A thin layer over :mod:`advtune.run`: it parses arguments, resolves the attack
(presets < flags), loads the model and the data, and prints the summary. Errors a user
can fix (:class:`advtune.errors.UserError`) become one line ``advtune: error: ...`` on
stderr and exit code 2; SIGINT (Ctrl-C) and SIGTERM exit with 130 and 143 after the
current write and say how to resume. See ``docs/cli.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import re
import signal
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from advtune._version import __version__
from advtune.errors import UserError

__all__ = ["STOP_HOOK_ENV", "build_parser", "main"]

#: Where ``advtune list models`` looks (``advtune.models.model_rows`` sources).
MODEL_SOURCES = ("torchvision", "timm", "robustbench")

#: Testing hook: ``N`` makes generate/evaluate raise KeyboardInterrupt after N batches
#: were written; ``N:kill`` makes the process SIGKILL itself instead (no clean-up at all),
#: ``N:term`` sends itself SIGTERM; ``N@R`` / ``N:kill@R`` do so on torchrun rank ``R``
#: only (the other ranks keep going).
STOP_HOOK_ENV = "ADVTUNE_TEST_STOP_AFTER_BATCHES"

EXIT_FAILED = 1
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130

#: ``--image-size`` upper bound (see ``advtune.run.inputs.MAX_IMAGE_SIZE``; repeated here
#: so parsing needs no torch import).
MAX_IMAGE_SIZE = 4096


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``advtune: error: ...``, exit 2) like UserError."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USER_ERROR, f"advtune: error: {message}\n")


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


def _positive_int(text: str) -> int:
    return _int_at_least(1, text)


def _nonneg_int(text: str) -> int:
    return _int_at_least(0, text)


def _image_size(text: str) -> int:
    value = _positive_int(text)
    if value > MAX_IMAGE_SIZE:
        raise argparse.ArgumentTypeError(f"must be <= {MAX_IMAGE_SIZE}, got {value}")
    return value


def _batch_size(text: str) -> int | str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return _positive_int(text)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{e} (or 'auto')") from None


def _eps_list(text: str) -> list[float]:
    from advtune.presets import parse_number_list

    try:
        return parse_number_list(text, what="eps")
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
        "--model", required=True, help="torchvision model name or pkg.module:factory"
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
        "--seed", type=_nonneg_int, default=0, help="run seed (per-sample seeds derive from it)"
    )
    data = p.add_argument_group("data")
    data.add_argument("--data", help="image folder or ImageNet val (default: the bundled sample)")
    data.add_argument("--limit", type=_positive_int, help="use the first N images")
    data.add_argument("--subset", help="file of relative paths to use, one per line")
    data.add_argument("--shuffle-seed", type=_int, help="shuffle the order with this seed")
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
    run.add_argument("--workers", type=_nonneg_int, default=2, help="data-loading processes")
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

    try:
        from advtune.bench import register_cli
    except ImportError:
        pass
    else:
        register_cli(sub)
        _positive_batch_sizes(sub.choices.get("bench"))
    return parser


def _positive_batch_sizes(parser: argparse.ArgumentParser | None) -> None:
    """``bench --batch-size`` takes whole numbers >= 1 (0 must not mean "the default")."""
    for action in getattr(parser, "_actions", []):
        if action.dest == "batch_size":
            action.type = _positive_int


# --------------------------------------------------------------------------- handlers


def _stop_hook() -> Any:
    value = os.environ.get(STOP_HOOK_ENV)
    if not value:
        return None
    spec, _, only_rank = value.partition("@")
    count, _, mode = spec.partition(":")
    try:
        after = int(count)
        if only_rank and int(only_rank) != int(os.environ.get("RANK", "0")):
            return None
    except ValueError:
        raise UserError(
            f"{STOP_HOOK_ENV} must be N, N:kill, N:term, N@RANK or N:kill@RANK, got {value!r}"
        ) from None
    from advtune.run.callbacks import RunCallbacks

    class StopHook(RunCallbacks):
        def on_batch(self, batches: int) -> None:
            if batches >= after:
                if mode in ("kill", "term"):  # a real signal, handled as users send it
                    os.kill(os.getpid(), signal.SIGKILL if mode == "kill" else signal.SIGTERM)
                    return
                raise KeyboardInterrupt

    return StopHook()


def _attack_config(args: argparse.Namespace) -> Any:
    """``resolve_attack`` with the attack's own spec typing every ``-p`` value."""
    from advtune import attacks
    from advtune.presets import load_preset, resolve_attack

    preset = load_preset(args.preset) if args.preset is not None else None
    name = args.attack if args.attack is not None else getattr(preset, "attack", None)
    if name is None and getattr(args, "command", None) == "evaluate":
        # A robustness number needs a strong attack: AutoAttack (standard version) unless
        # one is named. PGD at its defaults overstates robust accuracy (docs/attacks.md).
        name = "autoattack"
    overrides: dict[str, Any] = dict(args.param)
    for flag in _PARAM_FLAGS:
        value = getattr(args, flag.strip("-").replace("-", "_"))
        if value is not None:
            overrides[flag.strip("-").replace("-", "_")] = value
    if args.norm is not None and args.norm not in attacks.threat_names():
        from advtune.errors import suggest

        raise UserError(suggest(args.norm, attacks.threat_names(), what="--norm threat model"))
    if args.norm is not None and name is not None:
        spec = attacks.spec(name)  # UserError suggesting close names if unknown
        if spec.norm_key is not None:
            overrides[spec.norm_key] = args.norm
        elif args.norm != spec.norm:
            raise UserError(f"attack {name!r} is {spec.norm} only, got --norm {args.norm}")
    return resolve_attack(
        name,
        preset=preset,
        eps=args.eps,
        targeted=args.targeted,
        overrides=overrides,
        seed=args.seed,
    )


def _check_eps_fits_8bit(config: Any) -> None:
    """Budgets below one 8-bit level cannot survive saving as 8-bit images."""
    from advtune.attacks import threat_model

    for eps in config.eps or ():
        if eps > 0 and not threat_model(config.norm, eps).survives_quantization:
            from advtune.run.report import format_eps

            raise UserError(
                f"eps {format_eps(eps)} is below 1/255: 8-bit images cannot hold a "
                f"{threat_model(config.norm).label} perturbation smaller than one level, so "
                "every saved image would equal the clean one; use --eps 1/255 or more"
            )


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


def _dataset_and_model(
    args: argparse.Namespace, *, convbn: str, device: str, out_dir: Path
) -> tuple:
    """The model's card (nothing built), the dataset with the card's preprocessing (data
    errors before the slow model load), then the model, seeded by ``--seed``."""
    from advtune.data import build_dataset
    from advtune.models import load_model, model_card
    from advtune.run.inputs import image_size_preprocess

    card = model_card(args.model, weights=args.weights, seed=args.seed)
    transform = image_size_preprocess(card.preprocess, args.image_size)
    dataset = build_dataset(
        args.data,
        transform=transform,
        limit=args.limit,
        subset=args.subset,
        shuffle_seed=args.shuffle_seed,
        labels=args.labels,
        exclude=[out_dir],  # a run never reads its own outputs back as input
    )
    model = load_model(
        args.model, weights=args.weights, convbn=convbn, device=device,
        progress=not args.quiet, seed=args.seed, recompute=args.recompute,
    )  # fmt: skip
    return dataset, model, transform


def _run(args: argparse.Namespace, *, command: str) -> int:
    from advtune import models
    from advtune.run import RunSpec, TqdmProgress, format_summary, init_comm, run
    from advtune.run.outputs import OutputDir
    from advtune.run.spec import model_context

    # Cheap checks first: a typo should not cost a model load.
    config = _attack_config(args)
    _check_eps_fits_8bit(config)
    spec = RunSpec(  # validates itself; completed once the model is known
        attack=config,
        out_dir=Path(args.out or args.default_out),
        command=command,
        num_workers=args.workers,
        resume=args.resume,
        overwrite=args.overwrite,
    )
    out_dir = spec.out_dir
    # Under torchrun (WORLD_SIZE > 1): join the process group, one device per rank.
    comm = init_comm(args.device)
    device = comm.device
    if device.startswith("cuda:") and not comm.is_distributed:
        import torch

        # The current device is what the loader's pin-memory thread and any unindexed
        # "cuda" tensor use; without this a run on cuda:1 also opens a context on GPU 0.
        torch.cuda.set_device(torch.device(device))
    convbn = args.convbn if args.convbn is not None else models.DEFAULT_CONVBN
    if convbn not in models.MODES:  # before the model load (which checks it too)
        from advtune.errors import suggest

        raise UserError(suggest(str(convbn), models.MODES, what="ConvBN mode"))
    if args.recompute and convbn != "frozen":
        raise UserError(f"--recompute needs --convbn frozen, got {convbn!r}")
    OutputDir(out_dir)  # fails early if the folder is not writable
    if args.subset is not None:
        from advtune.data import resolve_subset_path

        resolve_subset_path(args.subset)  # a typo costs no model load; any cwd works
    dataset, model, transform = _dataset_and_model(
        args, convbn=convbn, device=device, out_dir=out_dir
    )
    if comm.is_main and not args.quiet:
        _note_out_in_data(args.data, out_dir)
    card = model.card
    if args.amp or args.channels_last or args.compile:
        from advtune.runtime import prepare

        model = prepare(model, channels_last=args.channels_last, amp=args.amp, compile=args.compile)
    if len(dataset) == 0:
        raise UserError(f"no images found in {str(dataset.root)!r}")
    batch_size = args.batch_size
    if batch_size == "auto":
        batch_size = _auto_batch_size(args, model, config, dataset, transform, device, convbn)
        if comm.is_distributed:
            # Every rank must attack with the same batch shape (results depend on it).
            batch_size = min(comm.all_gather(batch_size))
    spec = dataclasses.replace(
        spec,
        batch_size=batch_size,
        context=model_context(
            card=card,
            convbn=convbn,
            preprocess=transform,
            amp=args.amp,
            channels_last=args.channels_last,
        ),
        settings={
            "device": device,
            "compile": args.compile,
            "recompute": args.recompute,
            "batch_size_requested": args.batch_size,
        },
    )
    callbacks = [cb for cb in (None if args.quiet else TqdmProgress(), _stop_hook()) if cb]
    report = run(spec, model, dataset, comm=comm, callbacks=callbacks)
    if report is not None and not args.quiet:  # rank 0 prints the merged summary
        print(format_summary(report))
    return 0


def _auto_batch_size(
    args: argparse.Namespace,
    model: Any,
    config: Any,
    dataset: Any,
    transform: Any,
    device: str,
    convbn: str,
) -> int:
    """``--batch-size auto``: probed on CUDA (and cached), the CPU default otherwise."""
    from advtune import runtime
    from advtune.run import auto_batch_size

    crop = getattr(transform, "crop_size", None)
    if isinstance(crop, int):
        input_shape = (3, crop, crop)
    else:  # a custom model's preprocessing: look at one image
        sample = next((s for s in (dataset[i] for i in range(len(dataset))) if s), None)
        if sample is None:
            raise UserError(f"no decodable image in {str(dataset.root)!r}")
        input_shape = tuple(sample["image"].shape)
    key = {
        "model": args.model,
        "convbn": convbn,
        "amp": args.amp,
        "channels_last": args.channels_last,
        "compile": args.compile,
    }
    # Never more than the images: a larger batch would only be padding. The number of
    # images (not of those left to do) keeps the batch shape, and so the results, the
    # same on --resume.
    return auto_batch_size(
        model,
        config,
        input_shape=input_shape,
        device=device,
        key=key,
        limit=len(dataset),
        cache_file=runtime.default_batch_size_cache(),
    )


def _generate(args: argparse.Namespace) -> int:
    return _run(args, command="generate")


def _evaluate(args: argparse.Namespace) -> int:
    return _run(args, command="evaluate")


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

        for preset in list_presets():
            eps = ",".join(format_eps(e) for e in preset.eps) if preset.eps else "-"
            print(f"{preset.name:<18} {preset.attack:<8} eps={eps:<8} {preset.description}")
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
