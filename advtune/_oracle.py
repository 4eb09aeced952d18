"""advtune's AutoAttack against the official one, per image: a benchmark and test helper.

Private (like :mod:`advtune._robust_digits`): the measuring core behind
``tests/test_oracle.py`` and ``scripts/oracle_autoattack.py``. For one model, one
threat model and one *row* of :data:`ROWS`, :func:`measure` runs advtune's attack and the
official AutoAttack (the ``pyautoattack`` distribution, imported only when called) with
the same budget on the same images, once per seed ``s`` (advtune:
``seeds=torch.arange(n) + 1000·s``; official: ``seed=s``), and compares which images each
breaks. Nothing here is a dependency of advtune: without ``pyautoattack`` the official
side raises ``ImportError``.

Rows (both sides at the official budgets unless :class:`Budget` overrides them):

* ``apgd-ce``: APGD, cross-entropy, 100 steps, one restart (official ``APGDAttack``).
* ``apgd-t``: targeted APGD, 100 steps × 9 targets (official ``APGDAttack_targeted``).
* ``standard``: the standard ensemble (APGD-CE → APGD-T → FAB-T → Square).
* ``plus``: the plus version.
* ``l1``: the standard version at L1 (``autoattack(norm="l1")`` against the official
  ``norm="L1"`` standard version, both with restarts and the three-stage eps schedule).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

__all__ = ["ROWS", "Budget", "advtune_broken", "measure", "official_broken", "summarise"]

ROWS: tuple[str, ...] = ("apgd-ce", "apgd-t", "standard", "plus", "l1")

_OFFICIAL_NORM = {"linf": "Linf", "l2": "L2", "l1": "L1"}


@dataclasses.dataclass(frozen=True)
class Budget:
    """Budgets for both sides (``None``: the official default of the row).

    Attributes:
        steps: Iterations of the gradient attacks (APGD, APGD-T, FAB); official 100.
        queries: Square's queries; official 5000.
    """

    steps: int | None = None
    queries: int | None = None


def _norm_of(row: str, norm: str) -> str:
    return "l1" if row == "l1" else norm


def advtune_broken(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, row: str, norm: str, eps: float,
    seed: int, budget: Budget = Budget(),
) -> torch.Tensor:  # fmt: skip
    """Which images advtune's attack of ``row`` breaks, ``(N,)`` bool.

    Args:
        model: Classifier in eval mode; ``x`` ``(N, C, H, W)`` in [0, 1], ``y`` ``(N,)``.
        row: One of :data:`ROWS`.
        norm: ``"linf"`` or ``"l2"`` (ignored for ``row="l1"``, which is L1).
        eps: Radius of the threat model.
        seed: Seed index ``s``: per-sample seeds ``arange(N) + 1000·s``.
        budget: Overrides of the official budgets.

    Raises:
        ValueError: Unknown ``row``.
    """
    from advtune import attacks

    seeds = torch.arange(len(y)) + 1000 * seed
    steps = 100 if budget.steps is None else budget.steps
    if row == "apgd-ce":
        res = attacks.apgd(model, x, y, eps=eps, norm=norm, loss="ce", steps=steps, seeds=seeds)
    elif row == "apgd-t":
        res = attacks.apgd_t(model, x, y, eps=eps, norm=norm, steps=steps, n_targets=9,
                             seeds=seeds)  # fmt: skip
    elif row in ("standard", "plus", "l1"):
        res = attacks.autoattack(
            model, x, y, eps=eps, norm=_norm_of(row, norm),
            version="plus" if row == "plus" else "standard",
            steps=budget.steps, queries=budget.queries, seeds=seeds,
        )  # fmt: skip
    else:
        raise ValueError(f"row must be one of {', '.join(ROWS)}; got {row!r}")
    return res.success.detach().clone()


def official_broken(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, row: str, norm: str, eps: float,
    seed: int, budget: Budget = Budget(),
) -> torch.Tensor:  # fmt: skip
    """Which images the official AutoAttack's ``row`` breaks, ``(N,)`` bool.

    Same arguments as :func:`advtune_broken` (``seed`` is the official ``seed``). The
    official code reseeds the global RNG; it runs inside :func:`torch.random.fork_rng`
    so the caller's RNG state is left as it was.

    Raises:
        ImportError: ``pyautoattack`` is not installed.
        ValueError: Unknown ``row``.
    """
    if row not in ROWS:
        raise ValueError(f"row must be one of {', '.join(ROWS)}; got {row!r}")
    import pyautoattack
    from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted

    official_norm = _OFFICIAL_NORM[_norm_of(row, norm)]
    steps = 100 if budget.steps is None else budget.steps
    with torch.random.fork_rng(devices=[]):
        if row in ("apgd-ce", "apgd-t"):
            if row == "apgd-ce":
                ref: Any = APGDAttack(model, n_iter=steps, norm=official_norm, eps=eps, loss="ce",
                                      n_restarts=1, seed=seed, device="cpu")  # fmt: skip
            else:
                ref = APGDAttack_targeted(model, n_iter=steps, norm=official_norm, eps=eps,
                                          n_target_classes=9, n_restarts=1, seed=seed,
                                          device="cpu")  # fmt: skip
            x_adv = ref.perturb(x, y)
            with torch.no_grad():
                pred = model(x_adv).argmax(1)
        else:
            aa = pyautoattack.AutoAttack(
                model, device="cpu", eps=eps, norm=official_norm, seed=seed,
                version="plus" if row == "plus" else "standard",
            )  # fmt: skip
            if budget.steps is not None:
                for a in (aa.apgd, aa.apgd_targeted):
                    _set_official_apgd_steps(a, budget.steps)
                aa.fab.n_iter = budget.steps
            if budget.queries is not None:
                aa.square.n_queries = budget.queries
            _, pred = aa.run_standard_evaluation(x, y, batch_size=len(y))
    return (pred != y).detach().clone()


def _set_official_apgd_steps(attack: Any, steps: int) -> None:
    # The official APGD derives its checkpoint schedule (and, with use_largereps, the
    # three stages' lengths) from n_iter in __init__: setting n_iter alone afterwards
    # would keep the 100-step schedule. Recompute them as its __init__ does.
    attack.n_iter = attack.n_iter_orig = steps
    attack.n_iter_2 = max(int(0.22 * steps), 1)
    attack.n_iter_min = max(int(0.06 * steps), 1)
    attack.size_decr = max(int(0.03 * steps), 1)


def summarise(ours: torch.Tensor, theirs: torch.Tensor) -> dict[str, Any]:
    """Robust accuracy and per-image agreement from broken flags of several seeds.

    Args:
        ours: ``(S, N)`` bool, advtune's broken images per seed.
        theirs: ``(S, N)`` bool, the official ones.

    Returns:
        JSON-ready dict: ``advtune``/``official`` (mean robust accuracy over the seeds),
        ``advtune_per_seed``/``official_per_seed``, ``delta_points`` (advtune − official,
        in percentage points: positive means advtune is weaker), ``agreement`` (the
        fraction of (seed, image) pairs where both say the same, broken or robust),
        ``official_only`` (images the official breaks under some seed that advtune breaks
        under none), ``advtune_only`` (the reverse), ``images``, ``seeds``.
    """
    if ours.shape != theirs.shape or ours.dim() != 2:
        raise ValueError(
            f"ours and theirs must both be (seeds, images); got {tuple(ours.shape)} and "
            f"{tuple(theirs.shape)}"
        )
    acc_ours = 1 - ours.float().mean(1)
    acc_theirs = 1 - theirs.float().mean(1)
    mean_ours, mean_theirs = float(acc_ours.mean()), float(acc_theirs.mean())
    ever_ours, ever_theirs = ours.any(0), theirs.any(0)
    return {
        "images": int(ours.shape[1]),
        "seeds": int(ours.shape[0]),
        "advtune": mean_ours,
        "official": mean_theirs,
        "advtune_per_seed": acc_ours.tolist(),
        "official_per_seed": acc_theirs.tolist(),
        "delta_points": 100 * (mean_ours - mean_theirs),
        "agreement": float((ours == theirs).float().mean()),
        "official_only": int((ever_theirs & ~ever_ours).sum()),
        "advtune_only": int((ever_ours & ~ever_theirs).sum()),
    }


def measure(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, row: str, norm: str, eps: float,
    seeds: int = 3, budget: Budget = Budget(),
) -> dict[str, Any]:  # fmt: skip
    """Both implementations of ``row`` on ``(x, y)`` for seeds ``0..seeds-1``.

    Returns :func:`summarise`'s dict plus ``row``, ``norm`` (``"l1"`` for the L1 row),
    ``eps``, the per-seed broken flags (``advtune_broken``, ``official_broken``: lists of
    ``N`` 0/1 per seed) and ``seconds`` (wall time of each side, summed over the seeds).
    """
    import time

    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    ours, theirs = [], []
    t_ours = t_theirs = 0.0
    for s in range(seeds):
        t0 = time.perf_counter()
        ours.append(advtune_broken(model, x, y, row=row, norm=norm, eps=eps, seed=s,
                                   budget=budget))  # fmt: skip
        t1 = time.perf_counter()
        theirs.append(official_broken(model, x, y, row=row, norm=norm, eps=eps, seed=s,
                                      budget=budget))  # fmt: skip
        t_ours, t_theirs = t_ours + t1 - t0, t_theirs + time.perf_counter() - t1
    a, b = torch.stack(ours), torch.stack(theirs)
    out = {"row": row, "norm": _norm_of(row, norm), "eps": eps, **summarise(a, b)}
    out["advtune_broken"] = a.int().tolist()
    out["official_broken"] = b.int().tolist()
    out["seconds"] = {"advtune": t_ours, "official": t_theirs}
    return out
