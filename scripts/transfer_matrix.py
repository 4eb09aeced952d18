#!/usr/bin/env python
"""Surrogate × target transfer matrix: one generation per surrogate, measured on every target.

Each surrogate (a model name, or ``a+b+c`` for an ensemble of those models) gets one
``advtune generate`` run in ``OUT/runs/<surrogate>/`` (resumed if it is there already),
then every target model classifies the saved PNGs
(:func:`advtune.run.transfer_eval.transfer_matrix`, the same code as ``advtune evaluate
--adv-from``). Writes ``OUT/transfer_matrix.md``, ``.csv`` and ``.png`` (a heat map) and
prints the Markdown table. See ``docs/transfer_eval.md``.

Example (the usual ImageNet transfer setting)::

    python scripts/transfer_matrix.py --data /data/imagenet/val --limit 1000 \\
        --surrogates resnet50,vgg16_bn,resnet50+densenet121+vgg16_bn \\
        --targets resnet50,densenet121,vgg16_bn,inception_v3,convnext_tiny \\
        --attack mifgsm --eps 16/255 --steps 10 --step-size 1.6/255 --out transfer-out
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from advtune.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="transfer_matrix", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    p.add_argument("--surrogates", required=True, help="comma-separated; a+b is an ensemble")
    p.add_argument("--targets", required=True, help="comma-separated target models")
    p.add_argument("--weights", default="DEFAULT", help="weights of every model (as advtune)")
    p.add_argument("--attack", default="mifgsm", help="attack name (default mifgsm)")
    p.add_argument("--eps", default="16/255", help="budget (default 16/255)")
    p.add_argument("--steps", help="iterations")
    p.add_argument("--step-size", help="step size, e.g. 1.6/255")
    p.add_argument("--targeted", choices=("random", "least-likely"))
    p.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--data", help="image folder or ImageNet val (default: the bundled sample)")
    p.add_argument("--limit", help="use the first N images")
    p.add_argument("--image-size", help="advanced: crop side instead of the model's")
    p.add_argument("--batch-size", default="32")
    p.add_argument("--workers", default="2")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", default="0")
    p.add_argument("--out", default="transfer-out", help="output folder")
    p.add_argument("-q", "--quiet", action="store_true", help="print the table only")
    return p


def _names(text: str, what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UserError(f"--{what} lists no model, got {text!r}")
    if len(set(names)) != len(names):
        raise UserError(f"--{what} lists a model twice: {text!r}")
    return names


def generate_argv(args: argparse.Namespace, surrogate: str, out: Path) -> list[str]:
    """The ``advtune generate`` arguments of one surrogate's run."""
    argv = ["generate"]
    for member in surrogate.split("+"):
        argv += ["--model", member]
    argv += ["--weights", args.weights, "--attack", args.attack, "--eps", args.eps]
    for flag in ("steps", "step_size", "targeted", "data", "limit", "image_size"):
        value = getattr(args, flag)
        if value is not None:
            argv += ["--" + flag.replace("_", "-"), value]
    for kv in args.param:
        argv += ["-p", kv]
    argv += ["--batch-size", args.batch_size, "--workers", args.workers, "--device", args.device]
    argv += ["--seed", args.seed, "--out", str(out), "--resume", "-q"]
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    from advtune import cli
    from advtune.run.comm import parse_device
    from advtune.run.transfer_eval import load_targets, transfer_matrix, write_matrix

    args = build_parser().parse_args(argv)
    try:
        surrogates = _names(args.surrogates, "surrogates")
        targets = _names(args.targets, "targets")
        out = Path(args.out)
        runs = {}
        for surrogate in surrogates:
            run_dir = out / "runs" / surrogate.replace("/", "_")
            rc = cli.main(generate_argv(args, surrogate, run_dir))
            if rc != 0:
                raise UserError(f"generation on {surrogate} failed (advtune exit code {rc})")
            runs[surrogate] = run_dir
        models = load_targets(
            targets, weights=args.weights, device=parse_device(args.device),
            seed=int(args.seed), progress=not args.quiet,
        )  # fmt: skip
        matrix = transfer_matrix(
            runs, models, data=args.data,
            batch_size=int(args.batch_size) if args.batch_size.isdigit() else 32,
            device=parse_device(args.device),
        )  # fmt: skip
        title = f"{args.attack} eps={args.eps}" + (f" ({args.targeted})" if args.targeted else "")
        paths = write_matrix(matrix, out, title=title)
    except UserError as e:
        print(f"transfer_matrix: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(matrix.to_markdown(), end="")
    if not args.quiet:
        print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
