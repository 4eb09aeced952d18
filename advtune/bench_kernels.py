"""Which kernels the frozen mode uses on CPU, and what each choice is worth.

Two measurements behind the choices in :mod:`advtune.masks` and :mod:`advtune.lean.conv`
(``docs/performance.md`` has the figures):

* :func:`mask_kernel_times`: the mask kernels (pack ``x > 0``, mask a gradient) in both
  implementations (numpy, torch) next to the native ReLU kernels, on one activation.
* :func:`frozen_kernel_ablation`: one gradient step (forward, cross-entropy, input
  gradient) of a model in deploy mode and in frozen mode with each kernel choice flipped
  in turn, timed in the same process with the order reversed every other
  repetition; medians, and the median of per-repetition differences against frozen.

Scripts: ``scripts/bench_masks.py`` and ``scripts/bench_frozen_kernels.py``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from advtune import masks
from advtune._kernels import KernelPolicy, kernels

__all__ = ["SWITCHES", "frozen_kernel_ablation", "mask_kernel_times"]

_DEFAULT = KernelPolicy()

#: Each CPU kernel choice of the frozen mode: (policy field, its other setting). The
#: ablation flips one at a time away from the defaults (:class:`KernelPolicy`).
SWITCHES: dict[str, tuple[str, Any]] = {
    "numpy masks": ("numpy_max_threads", 0),
    "oneDNN 1x1": ("onednn_1x1", not _DEFAULT.onednn_1x1),
    "fold stem": ("fold_channels", 0),
    "lean at every size": ("native_below", 0),
}


def _flipped(names: Sequence[str]) -> AbstractContextManager[KernelPolicy]:
    return kernels(_DEFAULT, **dict(SWITCHES[name] for name in names))


def _label(name: str) -> str:
    field, other = SWITCHES[name]
    return f"frozen, {field}={other!r}"


def _check_repeats(repeats: int) -> None:
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")


def _median_ms(values: list[float]) -> float:
    return 1000 * statistics.median(values)


def mask_kernel_times(
    shape: tuple[int, ...] = (4, 256, 56, 56), *, repeats: int = 15
) -> dict[str, dict[str, float]]:
    """Median milliseconds of the mask kernels on a float32 activation of ``shape``.

    Returns:
        ``{kernel: {"numpy": ms, "torch": ms}}`` for ``"pack x > 0"`` and
        ``"mask a gradient"``, and ``{kernel: {"native": ms}}`` for the native ReLU
        forward and ``threshold_backward``. Kernels run in turn within each repetition
        after one warm-up repetition.
    """
    _check_repeats(repeats)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).reshape(-1)
    grad = torch.randn(shape, generator=gen).reshape(-1)
    packed = masks.pack_between(x, 0.0)
    out = torch.empty_like(grad)
    native: dict[str, Callable[[], object]] = {
        "native relu": lambda: torch.relu(x),
        "native threshold_backward": lambda: torch.ops.aten.threshold_backward(grad, x, 0),
    }
    ours: dict[str, Callable[[], object]] = {
        "pack x > 0": lambda: masks.pack_between(x, 0.0),
        "mask a gradient": lambda: masks.keep_where(grad, packed, out),
    }
    # (implementation, context, kernels): numpy and torch forced whatever the threads.
    runs: list[tuple[str, Callable[[], Any], dict[str, Callable[[], object]]]] = [
        ("native", nullcontext, native),
        ("numpy", lambda: kernels(numpy_max_threads=1 << 30), ours),
        ("torch", lambda: kernels(numpy_max_threads=0), ours),
    ]
    times: dict[str, dict[str, list[float]]] = {name: {} for name in (*native, *ours)}
    for rep in range(repeats + 1):  # repetition 0 warms up
        for impl, context, fns in runs:
            with context():
                for name, fn in fns.items():
                    start = time.perf_counter()
                    fn()
                    if rep:
                        times[name].setdefault(impl, []).append(time.perf_counter() - start)
    return {name: {impl: _median_ms(v) for impl, v in d.items()} for name, d in times.items()}


def frozen_kernel_ablation(
    model: torch.nn.Module,
    *,
    size: int = 224,
    batch: int = 4,
    repeats: int = 16,
    seed: int = 0,
    steps: int = 1,
) -> list[dict[str, Any]]:
    """Time one gradient step of ``model`` in deploy mode and frozen mode variants.

    Variants: ``eval`` (the model as given), ``deploy``; ``frozen`` (the default :class:`KernelPolicy`); ``frozen,
    FIELD=VALUE`` for each of :data:`SWITCHES` flipped alone. Each repetition runs every variant once, in reverse
    order every other repetition.

    Args:
        model: An eval-mode model (converted here, on copies).
        size, batch: Input images ``(batch, 3, size, size)``, uniform in [0, 1].
        repeats: Timed repetitions (after one untimed warm-up repetition).
        seed: Seed of the images and labels.
        steps: Gradient steps per timed sample (more for small models, whose single
            steps are too short to time on a loaded machine).

    Returns:
        One dict per variant: ``variant``, ``median_s`` (per step), ``runs_s``,
        ``paired_vs_frozen_ms`` (median of per-repetition differences against frozen) and
        ``paired_vs_eval`` (median of per-repetition ratios to eval).
    """
    from advtune.bench import gradient_step
    from advtune.convbn import tune

    _check_repeats(repeats)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    models = {
        "eval": copy.deepcopy(model).eval().requires_grad_(False),
        "deploy": tune(copy.deepcopy(model), "deploy").requires_grad_(False),
        "frozen": tune(copy.deepcopy(model), "frozen").requires_grad_(False),
    }
    variants: dict[str, tuple[str, tuple[str, ...]]] = {
        "eval": ("eval", ()),
        "deploy": ("deploy", ()),
        "frozen": ("frozen", ()),
        **{_label(name): ("frozen", (name,)) for name in SWITCHES},
    }
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, size, size, generator=gen)
    with torch.no_grad():
        y = models["deploy"](x).argmax(1)

    runs: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    for rep in range(repeats + 1):
        for name in order if rep % 2 == 0 else order[::-1]:
            mode, off = variants[name]
            with _flipped(off):
                start = time.perf_counter()
                for _ in range(steps):
                    gradient_step(models[mode], x, y)
                elapsed = (time.perf_counter() - start) / steps
            if rep:
                runs[name].append(elapsed)
    base, eval_runs = runs["frozen"], runs["eval"]
    return [
        {
            "variant": name,
            "median_s": statistics.median(values),
            "runs_s": values,
            "paired_vs_frozen_ms": _median_ms([v - b for v, b in zip(values, base)]),
            "paired_vs_eval": statistics.median([v / e for v, e in zip(values, eval_runs)]),
        }
        for name, values in runs.items()
    ]


def _shape(text: str) -> tuple[int, ...]:
    from advtune.cli import _positive_int

    return tuple(_positive_int(v) for v in text.split(","))


def _parser(description: str) -> argparse.ArgumentParser:
    """The CLI's parser (one-line errors, exit 2) with ``--threads`` and ``--repeats``."""
    from advtune.cli import _Parser, _positive_int

    p = _Parser(description=description)
    p.add_argument("--threads", type=_positive_int, default=1, help="torch threads (1)")
    p.add_argument("--repeats", type=_positive_int, default=16, help="timed repetitions")
    return p


def masks_main(argv: Sequence[str] | None = None) -> None:
    """CLI of ``scripts/bench_masks.py``."""
    p = _parser("Time the CPU mask kernels (numpy, torch, native).")
    p.add_argument("--shape", type=_shape, default="4,256,56,56", help="(4,256,56,56)")
    p.set_defaults(repeats=15)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    shape = args.shape
    result = mask_kernel_times(shape, repeats=args.repeats)
    print(f"{shape} float32, {args.threads} thread(s), medians of {args.repeats}, ms")
    for name, cells in result.items():
        print(f"  {name:26s} " + "   ".join(f"{k} {v:6.2f}" for k, v in cells.items()))


def ablation_main(argv: Sequence[str] | None = None) -> None:
    """CLI of ``scripts/bench_frozen_kernels.py``."""
    from advtune.cli import _positive_int
    from advtune.errors import UserError
    from advtune.models import random_net

    p = _parser("Frozen-mode CPU kernel choices, each flipped.")
    p.add_argument(
        "--model",
        default="resnet50",
        help="torchvision architecture, or 'digits' (advtune._digits' CNN, 32 px) (resnet50)",
    )
    p.add_argument("--size", type=_positive_int, default=224, help="image size (224)")
    p.add_argument("--batch-size", type=_positive_int, default=4, help="images per step (4)")
    p.add_argument("--steps", type=_positive_int, default=1, help="steps per timed sample (1)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model: torch.nn.Module
    if args.model == "digits":
        from advtune._digits import SIZE, DigitsCNN

        torch.manual_seed(0)
        model, args.size = DigitsCNN().eval(), SIZE  # timing only: weights need no training
    else:
        try:
            model = random_net(args.model, size=args.size)
        except UserError as e:
            p.error(str(e))
    rows = frozen_kernel_ablation(
        model, size=args.size, batch=args.batch_size, repeats=args.repeats, steps=args.steps
    )
    print(
        f"{args.model}, {args.size}px, batch {args.batch_size}, {args.threads} thread(s), "
        f"one gradient step, medians of {args.repeats} (order reversed every other run)"
    )
    print(f"  {'variant':34s} {'ms/step':>8s} {'÷ eval, paired':>15s} {'vs frozen, paired':>18s}")
    for r in rows:
        print(
            f"  {r['variant']:34s} {1000 * r['median_s']:8.2f} {r['paired_vs_eval']:15.3f} "
            f"{r['paired_vs_frozen_ms']:+15.1f} ms"
        )
