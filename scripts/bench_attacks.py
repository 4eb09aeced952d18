#!/usr/bin/env python
"""Attack throughput and autograd memory through Eval- vs Tune-mode models.

For every registered attack (or those given) and every ConvBN mode this measures:

* ``img·steps/s``: images × model calls per second of a full attack call, from the
  fastest of ``--repeats`` timed runs after one warm-up run (the least disturbed one on
  a shared machine; the median time is reported too). Model calls are the attack's own
  ``AttackResult.model_calls`` (gradient steps plus the final evaluation).
* ``saved MiB/img``: bytes autograd saves for backward per image during the attack's
  gradient steps, counted with ``torch.autograd.graph.saved_tensors_hooks`` on every
  model call (storages counted once), as the marginal cost between batch sizes ``B/2``
  and ``B`` so that batch-independent weights cancel.
* ``peak MiB/img`` (CUDA only): ``torch.cuda.max_memory_allocated`` during the attack,
  minus what was allocated before, over the batch size.

The model is a torchvision architecture with random weights and calibrated BN
statistics (``advtune.bench.build_model``): the benchmark measures cost, not accuracy.

Every attack runs with its registered defaults (``advtune.attacks.spec``), its threat
model's usual radius (``ThreatModel.default_eps``) and any ``--set ATTACK.KEY=VALUE``
overrides, parsed and validated by the attack's spec. Nothing here knows an attack or a
hyperparameter by name, so a newly registered attack is benchmarked with no edit.

Example::

    python scripts/bench_attacks.py --model resnet18 --size 64 --batch-size 8 --device cpu \
        --set cw_l2.steps=10 --set cw_l2.binary_search_steps=1 --set cw_l2.abort_early=false
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

import advtune
from advtune import attacks
from advtune.bench import build_model

MIB = 2**20


def hyperparameters(name: str, overrides: list[str]) -> dict:
    """The attack's hyperparameters: the radius its threat model usually gets, then the
    ``ATTACK.KEY=VALUE`` overrides for this attack, typed by its spec."""
    spec = attacks.spec(name)
    kw: dict = {}
    for item in overrides:
        target, _, assignment = item.partition(".")
        key, sep, text = assignment.partition("=")
        if not sep:
            raise SystemExit(f"bench_attacks: --set takes ATTACK.KEY=VALUE, got {item!r}")
        if target == name:
            kw[key.strip()] = spec.parse(key.strip(), text)
    if spec.radius_key is not None and spec.radius_key not in kw:
        kw[spec.radius_key] = spec.threat(kw).default_eps
    return kw


class SavedBytesProbe(nn.Module):
    """Wraps a model; records the bytes autograd saves in each forward that builds a graph."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.per_call: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return self.model(x)
        sizes: dict[tuple[str, int], int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            key = (str(t.device), storage.data_ptr())
            sizes[key] = max(sizes.get(key, 0), storage.nbytes())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = self.model(x)
        self.per_call.append(sum(sizes.values()))
        return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _inputs(batch: int, size: int, device: torch.device, num_classes: int):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, size, size, generator=gen).to(device)
    y = torch.randint(0, num_classes, (batch,), generator=gen).to(device)
    return x, y, torch.arange(batch, dtype=torch.int64)


def saved_mib_per_image(
    fn: Callable, model: nn.Module, kw: dict, *, batch: int, size: int, device: torch.device
) -> float:
    """Marginal saved MiB per image between batches ``batch // 2`` and ``batch``.

    Every gradient step saves the same tensors, so the attack's budgets at their minimum
    (``AttackSpec.probe_hyperparameters``) are enough.
    """
    small = max(batch // 2, 1)
    if small == batch:
        raise ValueError(f"--batch-size must be >= 2 to measure saved bytes, got {batch}")
    counts = []
    for b in (small, batch):
        probe = SavedBytesProbe(model)
        x, y, seeds = _inputs(b, size, device, 1000)
        fn(probe, x, y, seeds=seeds, **kw)
        counts.append(max(probe.per_call))
    return (counts[1] - counts[0]) / (batch - small) / MIB


def measure(
    name: str,
    model: nn.Module,
    *,
    batch: int,
    size: int,
    device: torch.device,
    repeats: int,
    overrides: tuple[str, ...] = (),
) -> dict:
    fn, kw = attacks.get(name), hyperparameters(name, list(overrides))
    x, y, seeds = _inputs(batch, size, device, 1000)
    res = fn(model, x, y, seeds=seeds, **kw)  # warm-up
    times = []
    peak = None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        _sync(device)
        t0 = time.perf_counter()
        res = fn(model, x, y, seeds=seeds, **kw)
        _sync(device)
        times.append(time.perf_counter() - t0)
        if device.type == "cuda":
            peak = (torch.cuda.max_memory_allocated(device) - base) / batch / MIB
    return {
        "attack": name,
        "model_calls": res.model_calls,
        "seconds_min": min(times),
        "seconds_median": statistics.median(times),
        "img_steps_per_s": batch * res.model_calls / min(times),
        "saved_mib_per_img": saved_mib_per_image(
            fn,
            model,
            attacks.spec(name).probe_hyperparameters(kw),
            batch=batch,
            size=size,
            device=device,
        ),
        "hyperparameters": kw,
        "peak_mib_per_img": peak,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18", help="torchvision model name")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--modes", nargs="+", default=["eval", "tune"], choices=advtune.MODES)
    parser.add_argument(
        "--attacks", nargs="+", default=attacks.names(),
        help="registered names (default: all), or torchattacks:<Class>",
    )  # fmt: skip
    parser.add_argument(
        "--set", action="append", default=[], metavar="ATTACK.KEY=VALUE",
        help="override one hyperparameter of one attack (repeatable)",
    )  # fmt: skip
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per cell")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    base = build_model(args.model, size=args.size).to(device).requires_grad_(False)

    rows = []
    for mode in args.modes:
        model = advtune.tune(base, mode) if mode != "eval" else base
        for name in args.attacks:
            row = measure(
                name,
                model,
                batch=args.batch_size,
                size=args.size,
                device=device,
                repeats=args.repeats,
                overrides=tuple(args.set),
            )
            rows.append({"mode": mode, **row})

    when = dt.date.today().isoformat()
    print(
        f"# {args.model} {args.size}px batch {args.batch_size} on {device} "
        f"({torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}), {when}"
    )
    peak_col = device.type == "cuda"
    header = "| attack | mode | calls | s/attack (min) | s/attack (median) | img·steps/s | saved MiB/img |"
    header += " peak MiB/img |" if peak_col else ""
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in sorted(rows, key=lambda r: (r["attack"], args.modes.index(r["mode"]))):
        line = (
            f"| {r['attack']} | {r['mode']} | {r['model_calls']} | {r['seconds_min']:.3f} | "
            f"{r['seconds_median']:.3f} | "
            f"{r['img_steps_per_s']:.1f} | {r['saved_mib_per_img']:.2f} |"
        )
        if peak_col:
            line += f" {r['peak_mib_per_img']:.2f} |"
        print(line)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "date": when, "rows": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
