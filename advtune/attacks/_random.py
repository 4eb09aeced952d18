"""Per-sample randomness that never touches the global RNGs.

Each sample *i* gets its own CPU ``torch.Generator`` seeded from ``seeds[i]`` (mixed with a
*stream* number so that, say, the random start and a random target drawn from the same
seed are unrelated). Draws happen on the CPU and are then moved to the input's device, so
sample *i*'s random numbers depend only on ``seeds[i]`` — not on the batch it is in, the
rank that runs it, or the device.
"""

from __future__ import annotations

import torch

from advtune._splitmix import splitmix64 as _splitmix64

__all__ = [
    "STREAM_START",
    "STREAM_TARGET",
    "random_target",
    "resolve_seeds",
    "restart_seeds",
    "sample_generators",
    "uniform_l2_ball",
    "uniform_l2_radius",
    "uniform_linf_ball",
    "uniforms",
]

# Stream ids: independent random sequences derived from one per-sample seed.
STREAM_START = 1
STREAM_TARGET = 2

_MASK64 = (1 << 64) - 1
_SEED_HIGH = 1 << 62  # seeds drawn from a generator lie in [0, 2**62)


def resolve_seeds(
    n: int, *, generator: torch.Generator | None, seeds: torch.Tensor | None
) -> torch.Tensor:
    """One int64 seed per sample, on the CPU.

    Args:
        n: Batch size.
        generator: Used only when ``seeds`` is ``None``: ``n`` seeds are drawn from it.
        seeds: ``(n,)`` integer tensor; returned as int64 (takes precedence).

    Returns:
        ``(n,)`` int64 CPU tensor. With neither argument the seeds come from a fresh,
        nondeterministically seeded local generator (the global RNG is not used).
    """
    if seeds is not None:
        return seeds.detach().to(device="cpu", dtype=torch.int64)
    if generator is None:
        generator = torch.Generator()
        generator.seed()  # OS entropy; a local generator, so global state is untouched
    return torch.randint(
        0, _SEED_HIGH, (n,), generator=generator, device=generator.device, dtype=torch.int64
    ).cpu()


def restart_seeds(seeds: torch.Tensor, restart: int) -> torch.Tensor:
    """Per-sample seeds for run ``restart`` of an attack with restarts.

    Run 0 keeps ``seeds`` (one restart is the plain attack); later runs hash in the
    restart index, so each run draws fresh, per-sample, reproducible randomness.

    Args:
        seeds: ``(N,)`` int64 CPU seeds (from :func:`resolve_seeds`).
        restart: Run index ``>= 0``.

    Returns:
        ``(N,)`` int64 CPU tensor of non-negative seeds.
    """
    if restart == 0:
        return seeds
    salt = _splitmix64(0x5EED ^ restart)
    return torch.tensor(
        [_splitmix64((s & _MASK64) ^ salt) >> 2 for s in seeds.tolist()], dtype=torch.int64
    )


def sample_generators(seeds: torch.Tensor, stream: int) -> list[torch.Generator]:
    """A CPU generator per sample, seeded from ``(seeds[i], stream)``."""
    gens = []
    for s in seeds.tolist():
        g = torch.Generator()
        g.manual_seed(_splitmix64((s & _MASK64) ^ _splitmix64(stream)))
        gens.append(g)
    return gens


def uniforms(
    gens: list[torch.Generator], k: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """``(M, k)`` float64 uniforms in [0, 1), row *i* from ``gens[i]`` (drawn on the CPU,
    so each sample's numbers do not depend on the device or on the other samples)."""
    rows = [torch.rand(k, generator=g, dtype=torch.float64) for g in gens]
    return torch.stack(rows).to(device)


def uniform_linf_ball(
    gens: list[torch.Generator], shape: tuple[int, ...], eps: float, like: torch.Tensor
) -> torch.Tensor:
    """``(N, *shape)`` perturbations uniform in the L∞ ball of radius ``eps``.

    One draw of ``shape`` per generator; returned with ``like``'s dtype and device.
    """
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    draws = [torch.empty(shape, dtype=dtype).uniform_(-eps, eps, generator=g) for g in gens]
    return torch.stack(draws).to(device=like.device, dtype=like.dtype)


def _l2_draws(
    gens: list[torch.Generator],
    shape: tuple[int, ...],
    eps: float,
    like: torch.Tensor,
    exponent: float,
) -> torch.Tensor:
    # Gaussian direction, radius eps · u**exponent with u ~ U(0, 1), one per generator.
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    out = []
    for g in gens:
        direction = torch.randn(shape, dtype=dtype, generator=g)
        u = torch.rand((), dtype=torch.float64, generator=g)
        radius = eps * float(u) ** exponent
        out.append(direction * (radius / direction.norm().clamp_min(1e-30)))
    return torch.stack(out).to(device=like.device, dtype=like.dtype)


def uniform_l2_ball(
    gens: list[torch.Generator], shape: tuple[int, ...], eps: float, like: torch.Tensor
) -> torch.Tensor:
    """``(N, *shape)`` perturbations uniform in the L2 ball of radius ``eps``.

    Direction from a standard normal, radius ``eps · u^(1/d)`` with ``u ~ U(0, 1)`` and
    ``d = prod(shape)`` (uniform in the *volume*, so in thousands of dimensions nearly
    every draw lies close to the sphere).
    """
    d = 1
    for s in shape:
        d *= s
    return _l2_draws(gens, shape, eps, like, 1.0 / d)


def uniform_l2_radius(
    gens: list[torch.Generator], shape: tuple[int, ...], eps: float, like: torch.Tensor
) -> torch.Tensor:
    """``(N, *shape)`` perturbations in the L2 ball with a radius uniform in [0, eps].

    Direction from a standard normal, radius ``eps · u`` with ``u ~ U(0, 1)``: starts
    spread over all distances from the centre (not uniform in the volume, which in
    thousands of dimensions puts nearly every start on the sphere).
    """
    return _l2_draws(gens, shape, eps, like, 1.0)


def random_target(
    y: torch.Tensor,
    num_classes: int,
    *,
    generator: torch.Generator | None = None,
    seeds: torch.Tensor | None = None,
) -> torch.Tensor:
    """A target class drawn uniformly from the classes other than ``y``, per sample.

    Args:
        y: ``(N,)`` integer labels in ``[0, num_classes)``.
        num_classes: Number of classes ``K >= 2``.
        generator: Source of randomness (per-sample seeds are drawn from it first).
        seeds: ``(N,)`` integer per-sample seeds; sample *i*'s target depends only on
            ``seeds[i]`` and ``y[i]`` (the stream differs from the attacks' random start).

    Returns:
        ``(N,)`` long tensor on ``y``'s device with ``target != y``.

    Raises:
        ValueError: Bad ``num_classes``, labels out of range or wrongly shaped seeds.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.dtype.is_floating_point:
        what = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"y must be a 1-D integer tensor, got {what}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(
            f"y must lie in [0, {num_classes}), got values in [{int(y.min())}, {int(y.max())}]"
        )
    if seeds is not None and (not isinstance(seeds, torch.Tensor) or seeds.shape != y.shape):
        what = tuple(seeds.shape) if isinstance(seeds, torch.Tensor) else type(seeds).__name__
        raise ValueError(f"seeds must have shape {tuple(y.shape)} to match y, got {what}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    per_sample = resolve_seeds(y.shape[0], generator=generator, seeds=seeds)
    gens = sample_generators(per_sample, STREAM_TARGET)
    # An offset in [1, K) added modulo K is uniform over the K − 1 other classes.
    offset = torch.tensor(
        [int(torch.randint(1, num_classes, (), generator=g)) for g in gens], dtype=torch.long
    )
    return (y.long() + offset.to(y.device)) % num_classes
