"""``advtune bench``: what each ConvBN mode costs an attack, measured.

Per mode (``eval``, ``tune``, ``deploy``, ``frozen``) and configuration (AMP,
channels_last, compile):

``saved MiB/img``
    Bytes autograd saves for backward per image, counted with
    ``torch.autograd.graph.saved_tensors_hooks`` during the forward of the attack's loss.
    Tensors sharing a storage are counted once (by storage). Marginal per image: the
    difference between two batch sizes divided by the difference of the sizes, so the
    weights (saved by every layer, batch-independent) cancel. Deterministic on CPU;
    measured eagerly (without ``torch.compile``).
``step peak MiB/img`` and ``floor MiB/img`` (every device)
    Peak bytes of tensors alive at once during one gradient step (forward, loss, input
    gradient), and during a ``torch.no_grad()`` forward alone (the floor no attack can go
    under), each marginal per image over two batch sizes like the saved bytes. On CPU
    the bytes come from the allocation events of the PyTorch profiler
    (``profile_memory=True``): every byte PyTorch's CPU allocator hands out and takes
    back, in order, independent of how the C allocator returns memory to the system
    (RSS) and without changing what autograd does (a ``TorchDispatchMode`` tracker would
    stop autograd from accumulating gradients in place). On CUDA,
    ``torch.cuda.max_memory_allocated`` above what was allocated before.
``loop peak MiB/img`` (CUDA only)
    ``torch.cuda.max_memory_allocated`` during the timed PGD loop, minus the memory
    allocated before it (model, images, labels), divided by the batch size.
``img·steps/s``
    Images × gradient steps per second of the registered attack
    (``advtune.attacks.get(attack)``, L∞, ε = 4/255, random start) run through its
    public API, after one warm-up step (which also compiles when ``--compile`` is on).
    With ``repeats > 1`` the modes are timed in turn within each repetition (so noise
    from other processes hits every mode alike) and the median is reported.
``max batch`` (CUDA only)
    The largest batch whose PGD step fits in GPU memory (:func:`advtune.runtime.find_max_batch`).

Models are built by :func:`advtune.models.random_net`: seeded random weights and BN
statistics calibrated by a few train-mode forwards on random images: a benchmark measures
cost, not accuracy, and must not need downloads.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import json
import logging
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from advtune import attacks
from advtune._kernels import kernels
from advtune.convbn import MODES, tune
from advtune.errors import UserError, suggest
from advtune.runtime import amp_dtype, find_max_batch, is_oom_error, parse_device, prepare

__all__ = [
    "ATTACKS",
    "BENCH_MODES",
    "BenchResult",
    "EnsembleBenchResult",
    "ModeResult",
    "build_model",
    "count_saved_bytes",
    "ensemble_bench",
    "gradient_step",
    "peak_bytes",
    "peak_bytes_per_image",
    "pgd_throughput",
    "register_cli",
    "run_bench",
    "saved_bytes_per_image",
]

log = logging.getLogger(__name__)

MIB = 2**20
#: Attacks the benchmark times: registered name -> number of gradient steps (None: ``--steps``).
ATTACKS: dict[str, int | None] = {"pgd": None, "fgsm": 1}
_EPS = 4 / 255
_RECOMPUTE = "frozen+recompute"
# The ConvBN modes plus frozen with selective recomputation (advtune.frozen.freeze).
BENCH_MODES: tuple[str, ...] = (*MODES, _RECOMPUTE)
_MIN_SIZE = {"inception_v3": 75}


# --------------------------------------------------------------------------- models


def build_model(name: str, *, size: int = 224, seed: int = 0, calib_batch: int = 4) -> nn.Module:
    """A classifier with seeded random weights and calibrated BN statistics (eval mode).

    The project's one random-weights builder, :func:`advtune.models.random_net` (any model
    name it knows: torchvision, ``timm:``, ``robustbench:``); the global RNG is untouched.

    Args:
        name: A model name (``resnet50``, ``timm:convnext_tiny``...).
        size: Side of the calibration images.
        seed: Seed for the weights and calibration images.
        calib_batch: Images per calibration forward.

    Raises:
        UserError: Unknown model name.
    """
    from advtune.models import random_net

    return random_net(name, seed=seed, size=size, batch=calib_batch)


# --------------------------------------------------------------------------- measurements


def count_saved_bytes(fn: Callable[[], Any]) -> int:
    """Bytes of the distinct storages autograd saves while ``fn()`` builds its graph.

    ``fn``'s result is kept alive until the count is done, so no saved storage is freed
    and reused in between (which would merge two storages into one address).
    """
    sizes: dict[tuple[str, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            storage = t.untyped_storage()
            key = (str(t.device), storage.data_ptr())
            sizes[key] = max(sizes.get(key, 0), storage.nbytes())
        except (RuntimeError, NotImplementedError):  # tensors without a plain storage
            sizes[("id", id(t))] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    total = sum(sizes.values())
    del result
    return total


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x).float(), y)


def gradient_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """What every attack step does: the input gradient of ``CE(model(x), y)``, like ``x``."""
    xa = x.detach().requires_grad_(True)
    return torch.autograd.grad(_loss(model, xa, y), xa)[0]


def saved_bytes_per_image(
    model: nn.Module,
    *,
    size: int,
    batches: tuple[int, int] = (2, 4),
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> float:
    """Marginal bytes saved for backward per image by ``CE(model(x), y)`` w.r.t. ``x``.

    Args:
        model: The (prepared) classifier.
        size: Image side in pixels.
        batches: Two batch sizes; the result is ``(saved(b2) - saved(b1)) / (b2 - b1)``.
        device: Where to run.
        seed: Seed of the random images.
    """
    return _marginal(
        lambda x, y: count_saved_bytes(lambda: _loss(model, x.requires_grad_(True), y)),
        size=size,
        batches=batches,
        device=device,
        seed=seed,
    )


def _marginal(
    measure: Callable[[torch.Tensor, torch.Tensor], int],
    *,
    size: int,
    batches: tuple[int, int],
    device: torch.device | str,
    seed: int,
) -> float:
    """``(measure(b2) - measure(b1)) / (b2 - b1)`` on random images and zero labels, with
    every lean layer lean (``native_below=0``)."""
    b1, b2 = batches
    if not 0 < b1 < b2:
        raise ValueError(f"batches must be two increasing sizes, got {batches}")
    gen = torch.Generator().manual_seed(seed)
    counts = []
    # A per-image figure is the slope at large batches, where every lean layer is lean:
    # at small ones KernelPolicy.native_below runs small layers natively, and a layer
    # switching between b1 and b2 would make the difference meaningless.
    with kernels(native_below=0):
        for b in (b1, b2):
            x = torch.rand(b, 3, size, size, generator=gen).to(device)
            y = torch.zeros(b, dtype=torch.long, device=device)
            counts.append(measure(x, y))
    return (counts[1] - counts[0]) / (b2 - b1)


#: What the profiler's C++ side (kineto) writes straight to file descriptor 2 on a
#: CPU-only machine: "USDT:... profiler_start" per profile and "gpuGetDeviceCount failed
#: with code 35" once. Noise for a user; every other line is passed on.
_KINETO_NOISE = re.compile(r"^(USDT|ERROR|WARNING|INFO):\d{4}-\d\d-\d\d .*\.cpp:\d+\]")


@contextlib.contextmanager
def _profiler_noise_filtered() -> Iterator[None]:
    """Route fd 2 through a temporary file while profiling; replay all but kineto's noise."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [
                line
                for line in capture.read().decode("utf-8", "replace").splitlines(keepends=True)
                if not _KINETO_NOISE.match(line)
            ]
            if kept:
                sys.stderr.write("".join(kept))


def peak_bytes(fn: Callable[[], Any], device: torch.device | str = "cpu") -> int:
    """Peak bytes of tensors PyTorch allocates and holds at once while ``fn()`` runs.

    Counted above what was allocated before the call; ``fn``'s result is dropped inside
    the measurement. CPU: the PyTorch profiler's allocation events (``profile_memory``),
    whose running total is exact and deterministic for a given program. CUDA:
    ``torch.cuda.max_memory_allocated``.

    Raises:
        RuntimeError: This PyTorch build's profiler reports no allocation events.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        result = fn()
        del result
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch._C._profiler import _EventType  # the profiler's typed event tree
    from torch.profiler import ProfilerActivity, profile

    with (
        _profiler_noise_filtered(),
        profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
    ):
        result = fn()
        del result
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.typed[0] == _EventType.Allocation and node.typed[1].device.type == "cpu":
            events.append((node.start_time_ns, node.typed[1]))
    if not events:
        raise RuntimeError("the PyTorch profiler reported no CPU allocation events")
    # The running total counts every allocation made while profiling, including earlier
    # profiling sessions' survivors: subtract the level before the first event.
    first = min(events, key=lambda e: e[0])[1]
    base = first.total_allocated - first.alloc_size
    return max(0, max(e.total_allocated for _, e in events) - base)


def peak_bytes_per_image(
    model: nn.Module,
    *,
    size: int,
    batches: tuple[int, int] = (4, 8),
    device: torch.device | str = "cpu",
    grad: bool = True,
    seed: int = 0,
) -> float:
    """Marginal peak bytes per image of one gradient step (or, ``grad=False``, a forward).

    A gradient step is what every attack step does: ``CE(model(x), y)`` and its gradient
    with respect to ``x``. ``grad=False`` runs ``model(x)`` under ``torch.no_grad()``: the
    floor. The result is ``(peak(b2) - peak(b1)) / (b2 - b1)``, so batch-independent
    buffers (weights, their reorders) cancel.
    """
    warm: list[bool] = []

    def measure(x: torch.Tensor, y: torch.Tensor) -> int:
        def step() -> Any:
            if not grad:
                with torch.no_grad():
                    return model(x)
            return gradient_step(model, x, y)

        if not warm:
            step()  # lazily made buffers (caches, kernel workspaces) do not count
            warm.append(True)
        return peak_bytes(step, device)

    return _marginal(measure, size=size, batches=batches, device=device, seed=seed)


def _pgd_steps(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, attack: str = "pgd"
) -> torch.Tensor:
    """Run the registered ``attack`` for ``steps`` steps through its public API."""
    fn = attacks.get(attack)
    kwargs: dict[str, Any] = {"eps": _EPS, "generator": torch.Generator().manual_seed(0)}
    if ATTACKS.get(attack) is None:
        kwargs["steps"] = steps
    return fn(model, x, y, **kwargs).x_adv


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pgd_throughput(
    model: nn.Module,
    *,
    batch: int,
    size: int,
    steps: int,
    device: torch.device,
    seed: int = 0,
    measure_peak: bool = False,
    attack: str = "pgd",
    warmup: bool = True,
) -> tuple[float, float | None]:
    """Images·steps per second of the registered ``attack`` (and CUDA peak MiB per image).

    One warm-up step runs first unless ``warmup=False`` (it compiles a
    ``torch.compile`` model).

    Returns:
        ``(images_steps_per_s, peak_mib_per_image or None)``.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, size, size, generator=gen).to(device)
    with torch.no_grad():  # attack the model's own predictions (works for any class count)
        y = model(x).argmax(1)
    if warmup:
        _pgd_steps(model, x, y, 1, attack)  # warm-up / compile
    _sync(device)
    peak = None
    if measure_peak and device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    _pgd_steps(model, x, y, steps, attack)
    _sync(device)
    elapsed = time.perf_counter() - start
    if measure_peak and device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - base) / batch / MIB
    return batch * steps / elapsed, peak


def _largest_batch(model: nn.Module, *, size: int, device: torch.device, limit: int) -> int:
    def probe(batch: int) -> None:
        x = torch.rand(batch, 3, size, size, device=device)
        y = torch.zeros(batch, dtype=torch.long, device=device)
        _pgd_steps(model, x, y, 1)
        _sync(device)

    return find_max_batch(probe, start=64, limit=limit)


# --------------------------------------------------------------------------- results


@dataclasses.dataclass
class ModeResult:
    """One row of the benchmark: a ConvBN mode under the run's options."""

    mode: str
    saved_mib_per_image: float | None = None
    step_peak_mib_per_image: float | None = None
    floor_mib_per_image: float | None = None
    peak_mib_per_image: float | None = None
    images_steps_per_s: float | None = None
    images_steps_per_s_runs: list[float] = dataclasses.field(default_factory=list)
    max_batch: int | None = None
    error: str | None = None

    @property
    def peak_over_floor(self) -> float | None:
        """Step peak divided by the no-grad forward floor (``None`` if either is missing)."""
        if self.step_peak_mib_per_image is None or not self.floor_mib_per_image:
            return None
        return self.step_peak_mib_per_image / self.floor_mib_per_image


@dataclasses.dataclass
class BenchResult:
    """All rows plus the configuration they were measured under."""

    model: str
    attack: str
    size: int
    device: str
    device_name: str
    batch_size: int
    steps: int
    saved_batches: tuple[int, int]
    peak_batches: tuple[int, int] | None
    repeats: int
    amp: str | None
    channels_last: bool
    compile: bool
    torch_version: str
    date: str
    note: str
    rows: list[ModeResult]

    def ratios(self) -> dict[str, dict[str, float | None]]:
        """Per mode, each figure divided by Eval mode's (``None`` where unavailable)."""
        ref = next((r for r in self.rows if r.mode == "eval"), None)
        out: dict[str, dict[str, float | None]] = {}
        for r in self.rows:
            out[r.mode] = {}
            for f in (
                "saved_mib_per_image",
                "step_peak_mib_per_image",
                "peak_mib_per_image",
                "images_steps_per_s",
            ):
                a, b = getattr(r, f), getattr(ref, f) if ref else None
                out[r.mode][f] = a / b if a is not None and b else None
        return out

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for row, r in zip(d["rows"], self.rows):
            row["peak_over_floor"] = r.peak_over_floor
        d["ratios_vs_eval"] = self.ratios()
        return d

    def table(self) -> str:
        """A readable table (what ``advtune bench`` prints)."""
        ratios = self.ratios()

        def fmt(v: float | None, spec: str) -> str:
            width = int(spec.split(".")[0].rstrip("df"))
            return f"{'n/a':>{width}s}" if v is None else format(v, spec)

        head = (
            f"{'mode':16s} {'saved MiB/img':>14s} {'x eval':>7s} {'step peak':>10s} "
            f"{'floor':>7s} {'x floor':>8s} {'loop peak':>10s} {'img*steps/s':>12s} "
            f"{'x eval':>7s} {'max batch':>10s}"
        )
        timing = (
            f"median of {self.repeats} interleaved runs (order reversed every other run)"
            if self.repeats > 1
            else "1 run"
        )
        lines = [
            f"advtune bench: {self.model}, {self.attack}, {self.size}px, device {self.device} "
            f"({self.device_name}), batch {self.batch_size}, {self.steps} steps, "
            f"amp={self.amp}, channels_last={self.channels_last}, compile={self.compile}",
            f"saved bytes: marginal over batches {self.saved_batches[0]} -> "
            f"{self.saved_batches[1]}; {self.note}",
            "step peak / floor: MiB per image alive at once in one gradient step / in a "
            "no-grad forward"
            + (
                f", marginal over batches {self.peak_batches[0]} -> {self.peak_batches[1]}"
                if self.peak_batches
                else " (not measured)"
            ),
            f"img*steps/s: {timing}"
            + ("; loop peak and max batch: CUDA only" if self.device == "cpu" else ""),
            head,
        ]
        for r in self.rows:
            rr = ratios[r.mode]
            if r.error:
                lines.append(f"{r.mode:16s} failed: {r.error}")
                continue
            lines.append(
                f"{r.mode:16s} {fmt(r.saved_mib_per_image, '14.2f')} "
                f"{fmt(rr['saved_mib_per_image'], '7.3f')} "
                f"{fmt(r.step_peak_mib_per_image, '10.2f')} "
                f"{fmt(r.floor_mib_per_image, '7.2f')} {fmt(r.peak_over_floor, '8.3f')} "
                f"{fmt(r.peak_mib_per_image, '10.2f')} "
                f"{fmt(r.images_steps_per_s, '12.2f')} {fmt(rr['images_steps_per_s'], '7.2f')} "
                f"{fmt(r.max_batch, '10d')}"
            )
        return "\n".join(lines)


# --------------------------------------------------------------------------- driver


def _resolve_device(device: str) -> torch.device:
    """``--device`` as a ``torch.device`` (:func:`advtune.runtime.parse_device` checks it)."""
    return torch.device(parse_device(device))


class _OOMGuard:
    """Records an out-of-memory error on ``row`` and goes on; other errors propagate."""

    def __init__(self, row: ModeResult, device: torch.device) -> None:
        self.row, self.device = row, device

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> bool:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if exc is None or not is_oom_error(exc):
            return False
        self.row.error = f"out of memory ({type(exc).__name__})"
        return True


def run_bench(
    model_name: str = "resnet50",
    *,
    attack: str = "pgd",
    modes: Sequence[str] = ("eval", "tune", "deploy", "frozen"),
    batch_size: int | None = None,
    size: int = 224,
    steps: int = 10,
    device: str = "auto",
    amp: str | None = None,
    channels_last: bool = False,
    compile: bool = False,
    saved_batches: tuple[int, int] = (2, 4),
    peak_batches: tuple[int, int] | None = (4, 8),
    repeats: int = 1,
    max_batch_limit: int = 16384,
    seed: int = 0,
    model_factory: Callable[[], nn.Module] | None = None,
    recompute: bool = False,
) -> BenchResult:
    """Measure every mode of ``modes`` (see the module docs for the figures).

    Args:
        model_name: torchvision model name (used for building unless ``model_factory``).
        attack: ``"pgd"`` (``steps`` steps) or ``"fgsm"`` (1 step).
        modes: ConvBN modes to compare.
        batch_size: Batch of the throughput loop (default: 128 on CUDA, 4 on CPU).
        size: Image side in pixels.
        steps: PGD steps timed (0: skip the throughput loop).
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        amp, channels_last, compile: Run-time options (:func:`advtune.runtime.prepare`).
        saved_batches: The two batch sizes of the saved-bytes measurement.
        peak_batches: The two batch sizes of the step-peak and floor measurements
            (``None``: skip them).
        repeats: Timed runs per mode, interleaved across modes; the median is reported.
        max_batch_limit: Largest batch probed for "max batch" (CUDA only); 0 skips the
            probe (under ``compile`` each probed size would compile again).
        seed: Seed for weights and images.
        model_factory: Builds the eval-mode model instead of :func:`build_model`.
        recompute: Measure ``"frozen"`` with selective recomputation
            (``tune(model, "frozen", recompute=True)``); the row is named
            ``"frozen+recompute"``. That name may also be given in ``modes`` directly, next
            to ``"frozen"``, to time both in the same interleaved runs.

    Raises:
        UserError: Unknown model, mode, attack or device; bad sizes.
    """
    if attack not in ATTACKS:
        raise UserError(suggest(attack, ATTACKS, what="bench attack"))
    if recompute:
        modes = [_RECOMPUTE if m == "frozen" else m for m in modes]
    bad = [m for m in modes if m not in BENCH_MODES]
    if bad or not modes:
        raise UserError(f"--modes must be a comma list of {', '.join(BENCH_MODES)}; got {modes!r}")
    try:
        amp_dtype(amp)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    dev = _resolve_device(device)
    if size < _MIN_SIZE.get(model_name, 1):
        raise UserError(f"--size {size} is too small for {model_name}")
    if steps < 0:
        raise UserError(f"--steps must be >= 0, got {steps}")
    if max_batch_limit < 0:
        raise UserError(f"--max-batch-limit must be >= 0, got {max_batch_limit}")
    if repeats < 1:
        raise UserError(f"--repeats must be >= 1, got {repeats}")
    if ATTACKS[attack] is not None:
        steps = min(steps, ATTACKS[attack] or steps) if steps else 0
    batch = batch_size or (128 if dev.type == "cuda" else 4)
    if batch < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch}")

    base = model_factory() if model_factory else build_model(model_name, size=size, seed=seed)
    base = base.eval()
    rows = [ModeResult(mode) for mode in modes]
    runners: dict[str, nn.Module] = {}
    for row in rows:  # memory: one mode at a time
        with _OOMGuard(row, dev):
            # Parameters frozen in every mode, as the attacks run them (ModelGuard):
            # autograd then skips what only weight gradients need where PyTorch can.
            mode, _, extra = row.mode.partition("+")
            converted = tune(base, mode, recompute=bool(extra))  # type: ignore[arg-type]
            converted = converted.to(dev).requires_grad_(False)
            eager = prepare(converted, channels_last=channels_last, amp=amp)
            row.saved_mib_per_image = (
                saved_bytes_per_image(eager, size=size, batches=saved_batches, device=dev) / MIB
            )
            if peak_batches is not None:
                for grad in (True, False):
                    value = peak_bytes_per_image(
                        eager, size=size, batches=peak_batches, device=dev, grad=grad
                    )
                    if grad:
                        row.step_peak_mib_per_image = value / MIB
                    else:
                        row.floor_mib_per_image = value / MIB
            runners[row.mode] = prepare(
                converted, channels_last=channels_last, amp=amp, compile=compile
            )
    # Speed: every mode in turn within each repetition, so that load from other
    # processes falls on all modes alike; the median per mode is reported.
    # The order reverses every other repetition, so no mode always follows the same one.
    for rep in range(repeats if steps else 0):
        for row in rows if rep % 2 == 0 else rows[::-1]:
            if row.error is not None:
                continue
            with _OOMGuard(row, dev):
                rate, peak = pgd_throughput(
                    runners[row.mode],
                    batch=batch,
                    size=size,
                    steps=steps,
                    device=dev,
                    seed=seed,
                    measure_peak=rep == 0,
                    attack=attack,
                    warmup=rep == 0,
                )
                row.images_steps_per_s_runs.append(rate)
                if rep == 0:
                    row.peak_mib_per_image = peak
    for row in rows:
        if row.images_steps_per_s_runs:
            row.images_steps_per_s = statistics.median(row.images_steps_per_s_runs)
        if row.error is None and dev.type == "cuda" and max_batch_limit > 0:
            with _OOMGuard(row, dev):
                row.max_batch = _largest_batch(
                    runners[row.mode], size=size, device=dev, limit=max_batch_limit
                )
    runners.clear()

    device_name = (
        torch.cuda.get_device_name(dev)
        if dev.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    return BenchResult(
        model=model_name,
        attack=attack,
        size=size,
        device=dev.type,
        device_name=device_name,
        batch_size=batch,
        steps=steps,
        saved_batches=(saved_batches[0], saved_batches[1]),
        peak_batches=None if peak_batches is None else (peak_batches[0], peak_batches[1]),
        repeats=repeats,
        amp=amp,
        channels_last=channels_last,
        compile=compile,
        torch_version=torch.__version__,
        date=_dt.date.today().isoformat(),
        note="random weights (weights=None), BN statistics calibrated on random images: "
        "cost, not accuracy",
        rows=rows,
    )


# --------------------------------------------------------------------------- ensembles


@dataclasses.dataclass
class EnsembleBenchResult:
    """Memory of an ensemble surrogate against one member, per ConvBN mode.

    ``rows[mode]`` holds ``one`` and ``ensemble`` saved MiB per image (and, with peaks,
    ``one_peak``/``ensemble_peak``: step peak MiB per image); ``None`` where not measured.
    """

    models: list[str]
    size: int
    device_name: str
    saved_batches: tuple[int, int]
    peak_batches: tuple[int, int] | None
    date: str
    rows: dict[str, dict[str, float | None]]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def table(self) -> str:
        def cell(v: float | None, fmt: str = "{:.2f}") -> str:
            return "-" if v is None else fmt.format(v)

        def ratio(a: float | None, b: float | None) -> float | None:
            return a / b if a is not None and b else None

        head = (
            f"ensemble of {len(self.models)} ({', '.join(self.models)}) vs one "
            f"({self.models[0]}), {self.size}px, {self.device_name}, saved batches "
            f"{self.saved_batches}"
            + (f", peak batches {self.peak_batches}" if self.peak_batches else "")
        )
        cols = f"{'mode':<18} {'one saved':>10} {'ens saved':>10} {'ens/one':>8}"
        if self.peak_batches:
            cols += f" {'one peak':>10} {'ens peak':>10} {'ens/one':>8}"
        lines = [head, cols + "   (MiB per image)"]
        for mode, r in self.rows.items():
            line = (
                f"{mode:<18} {cell(r['one']):>10} {cell(r['ensemble']):>10} "
                f"{cell(ratio(r['ensemble'], r['one'])):>8}"
            )
            if self.peak_batches:
                line += (
                    f" {cell(r.get('one_peak')):>10} {cell(r.get('ensemble_peak')):>10} "
                    f"{cell(ratio(r.get('ensemble_peak'), r.get('one_peak'))):>8}"
                )
            lines.append(line)
        eval_row, frozen_row = self.rows.get("eval"), self.rows.get("frozen")
        if eval_row and frozen_row and eval_row["ensemble"] and frozen_row["ensemble"]:
            saved = eval_row["ensemble"] - frozen_row["ensemble"]
            lines.append(
                f"frozen ensemble saves {saved:.2f} MiB/img for backward vs the eval "
                f"ensemble ({frozen_row['ensemble'] / eval_row['ensemble']:.3f}x); "
                f"frozen ensemble / one eval model: "
                f"{cell(ratio(frozen_row['ensemble'], eval_row['one']), '{:.3f}')}x"
            )
        return "\n".join(lines)


def ensemble_bench(
    models: Sequence[str],
    *,
    modes: Sequence[str] = ("eval", "frozen"),
    size: int = 224,
    device: str = "auto",
    saved_batches: tuple[int, int] = (2, 4),
    peak_batches: tuple[int, int] | None = None,
    seed: int = 0,
) -> EnsembleBenchResult:
    """Saved bytes per image (and optionally step peaks) of a logit ensemble of
    ``models`` (:class:`advtune.models.ensemble.ModelEnsemble`, member ``i`` seeded
    ``seed + i``) against its first member alone, in each ConvBN mode.

    Raises:
        UserError: fewer than two models, an unknown model or mode, a bad device.
    """
    from advtune.models.ensemble import ModelEnsemble

    models = list(models)
    if len(models) < 2:
        raise UserError(f"--ensemble needs two or more models, got {models!r}")
    bad = [m for m in modes if m not in BENCH_MODES]
    if bad or not modes:
        raise UserError(f"--modes must be a comma list of {', '.join(BENCH_MODES)}; got {modes!r}")
    dev = _resolve_device(device)
    bases = [build_model(name, size=size, seed=seed + i).eval() for i, name in enumerate(models)]
    rows: dict[str, dict[str, float | None]] = {}
    for mode_name in modes:  # memory: one mode at a time
        mode, _, extra = mode_name.partition("+")
        members = [
            tune(b, mode, recompute=bool(extra)).to(dev).requires_grad_(False)  # type: ignore[arg-type]
            for b in bases
        ]
        row: dict[str, float | None] = {}
        for key, model in (("one", members[0]), ("ensemble", ModelEnsemble(members))):
            row[key] = (
                saved_bytes_per_image(model, size=size, batches=saved_batches, device=dev) / MIB
            )
            if peak_batches is not None:
                peak = peak_bytes_per_image(model, size=size, batches=peak_batches, device=dev)
                row[key + "_peak"] = peak / MIB
        rows[mode_name] = row
        del members
    device_name = (
        torch.cuda.get_device_name(dev)
        if dev.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    return EnsembleBenchResult(
        models=models, size=size, device_name=device_name,
        saved_batches=(saved_batches[0], saved_batches[1]),
        peak_batches=None if peak_batches is None else (peak_batches[0], peak_batches[1]),
        date=_dt.date.today().isoformat(), rows=rows,
    )  # fmt: skip


# --------------------------------------------------------------------------- CLI


def _parse_pair(text: str) -> tuple[int, int]:
    try:
        a, b = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two sizes like 2,4, got {text!r}") from None
    if not 1 <= a < b:  # a marginal cost needs two different, increasing batch sizes
        raise argparse.ArgumentTypeError(f"expected two increasing sizes like 2,4, got {text!r}")
    return a, b


def register_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``bench`` sub-command to an ``argparse`` subparsers object.

    The parser gets ``set_defaults(handler=fn)`` with ``fn(args) -> int``.
    """
    p = subparsers.add_parser(
        "bench",
        help="measure memory and speed of each ConvBN mode",
        description="Per ConvBN mode: bytes saved for backward per image, peak MiB per "
        "image of a gradient step next to the no-grad forward floor (every device), "
        "images*steps/s of the registered attack (median of interleaved repeats), and "
        "on CUDA the peak of the timed loop and the largest batch that fits; ratios "
        "against Eval mode. Models have random weights with calibrated BN statistics: "
        "this measures cost, not accuracy.",
    )
    p.add_argument("--model", default="resnet50", help="torchvision model (default resnet50)")
    p.add_argument("--attack", default="pgd", choices=sorted(ATTACKS))
    p.add_argument("--batch-size", type=int, default=None, help="throughput batch size")
    p.add_argument("--size", type=int, default=224, help="image side in pixels (224)")
    p.add_argument("--modes", default=",".join(MODES), help="comma list (all modes)")
    p.add_argument("--amp", choices=("bf16", "fp16"), default=None)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument(
        "--recompute",
        action="store_true",
        help="measure frozen with selective recomputation (row frozen+recompute); the "
        "mode frozen+recompute may also be listed in --modes next to frozen",
    )
    p.add_argument("--steps", type=int, default=10, help="timed PGD steps (0: skip)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    for flag, default, what in (
        ("--saved-batches", (2, 4), "saved-bytes measurement"),
        ("--peak-batches", (4, 8), "step-peak and floor measurements"),
    ):
        p.add_argument(
            flag,
            type=_parse_pair,
            default=default,
            metavar="B1,B2",
            help=f"batch sizes of the marginal {what} ({default[0]},{default[1]})",
        )
    p.add_argument(
        "--no-peak", action="store_true", help="skip the step-peak and floor measurements"
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        metavar="R",
        help="timed runs per mode, interleaved across modes; the median is reported (1)",
    )
    p.add_argument(
        "--max-batch-limit",
        type=int,
        default=16384,
        metavar="N",
        help="largest batch probed for max batch (CUDA; 0: skip the probe)",
    )
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="write results")
    p.add_argument(
        "--ensemble",
        metavar="M1,M2,...",
        help="instead: saved bytes per image (and step peaks unless --no-peak) of an "
        "ensemble of these models vs the first alone, per --modes (e.g. eval,frozen)",
    )
    p.set_defaults(handler=_cli_main)
    return p


def _cli_main(args: argparse.Namespace) -> int:
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if getattr(args, "ensemble", None):
        ens = ensemble_bench(
            [m.strip() for m in args.ensemble.split(",") if m.strip()], modes=modes,
            size=args.size, device=args.device, saved_batches=args.saved_batches,
            peak_batches=None if args.no_peak else args.peak_batches,
        )  # fmt: skip
        sys.stdout.write(ens.table() + "\n")
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(ens.to_dict(), indent=2) + "\n")
        return 0
    result = run_bench(
        args.model,
        attack=args.attack,
        modes=modes,
        batch_size=args.batch_size,
        size=args.size,
        steps=args.steps,
        device=args.device,
        amp=args.amp,
        channels_last=args.channels_last,
        compile=args.compile,
        saved_batches=args.saved_batches,
        peak_batches=None if args.no_peak else args.peak_batches,
        repeats=args.repeats,
        max_batch_limit=args.max_batch_limit,
        recompute=args.recompute,
    )
    sys.stdout.write(result.table() + "\n")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``advtune bench`` on its own (``scripts/bench_convbn.py`` calls this)."""
    parser = argparse.ArgumentParser(prog="advtune bench")
    sub = parser.add_subparsers()
    register_cli(sub)
    args = parser.parse_args(["bench", *(argv if argv is not None else sys.argv[1:])])
    try:
        return args.handler(args)
    except UserError as exc:
        sys.stderr.write(f"advtune bench: error: {exc}\n")
        return 2
