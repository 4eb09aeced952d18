"""A cost-aware AutoAttack: ``autoattack(version="fast")`` and its MALT-ranked APGD-T.

The standard AutoAttack spends most of its budget on the images that stay robust: APGD-T
and FAB-T try 9 target classes each (100 steps per target) and Square 5000 queries,
about 1,900 gradients and 5,900 forward passes per robust image. ``version="fast"``
keeps APGD-CE as it is (the same per-sample seeds, so it breaks exactly the images the
standard version's APGD-CE breaks) and spends the rest where it matters:

* **Target ranking by Jacobian-normalised margin** (MALT: Melamed, Yehudai & Shamir,
  "MALT Powers Up Adversarial Attacks", NeurIPS 2024, arXiv:2407.02240). Instead of
  the classes with the highest logits, APGD-T attacks the classes with the smallest
  linearised distance to the decision boundary, ``(z_y − z_t) / ‖∇ₓ(z_y − z_t)‖_*``
  (``‖·‖_*`` the dual norm: L1 for L∞, L2 for L2), so fewer targets find the same
  images. :func:`apgd_malt` is that attack (registered as ``apgd_malt``).
* **Only survivors go on**: each component sees the images every earlier one failed to
  break (as in the standard version), and the expensive black-box stage is a short
  Square run.

Its default budgets are in :data:`FAST`; ``docs/autoattack.md`` has the measured cost and
robust accuracy against the standard version on trained models of different robustness
(``scripts/bench_autoattack_fast.py`` reproduces the table).
"""

from __future__ import annotations

import torch
from torch import nn

from advtune.attacks._registry import NORMS, Param, register
from advtune.attacks._result import AttackResult, ModelGuard
from advtune.attacks.threat import ThreatModel, threat_model

__all__ = ["FAST", "FAST_COMPONENTS", "FAST_NORMS", "apgd_malt", "malt_targets"]

#: The fast version's components: label → (registry name, fixed keyword arguments).
FAST_COMPONENTS: dict[str, tuple[str, dict[str, object]]] = {
    "apgd-ce": ("apgd", {"loss": "ce"}),
    "apgd-malt": ("apgd_malt", {}),
    "square": ("square", {"p_init": 0.8}),
}
#: The fast version's default budgets per component (``steps``, ``n_targets`` and
#: ``queries`` given to ``autoattack`` override them, as for the official versions).
FAST: dict[str, dict[str, int]] = {
    "apgd-ce": {"steps": 100, "restarts": 1, "eot_iter": 1},
    "apgd-malt": {"steps": 100, "n_targets": 2, "restarts": 1, "eot_iter": 1},
    "square": {"queries": 1000},
}

#: The norms the fast version was measured on (against standard; docs/autoattack.md).
FAST_NORMS = ("linf", "l2")

#: Classes scored per image (the top logits other than the true class); MALT scores the
#: top 100 on ImageNet. Each costs one backward pass.
_CANDIDATES = 20

APGD_MALT_PARAMS = (
    Param("eps", float, low=0.0, role="radius", help="radius of the norm ball"),
    Param("norm", str, "linf", choices=NORMS, role="norm", help="threat model"),
    Param("steps", int, 100, low=1, role="budget", cheap=3, help="iterations per target"),
    Param("n_targets", int, 9, low=1, role="budget", cheap=2, help="targets tried per image"),
    Param(
        "candidates", int, _CANDIDATES, low=1, help="top-logit classes scored by the MALT rank"
    ),
    Param("restarts", int, 1, low=1, role="budget", cheap=1, help="runs per target"),
    Param("eot_iter", int, 1, low=1, role="budget", cheap=1, help="gradients averaged per step"),
)  # fmt: skip


def malt_targets(
    guard: ModelGuard,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    norm: str | ThreatModel,
    n_targets: int,
    candidates: int = _CANDIDATES,
) -> torch.Tensor:
    """The ``n_targets`` classes nearest to the boundary by MALT's linearised distance.

    Scores ``(z_y − z_t) / ‖∇ₓ z_y − ∇ₓ z_t‖_*`` at ``x`` for the ``candidates``
    classes with the highest logits other than ``y`` and returns them in increasing
    order of the score. One forward pass and one backward pass per scored class plus
    one for ``z_y``; each backward is counted in ``guard`` as a gradient call (an upper
    bound of the work: the forward pass is shared).

    Args:
        guard: The attack's :class:`ModelGuard` (counts the calls).
        x: ``(N, C, H, W)`` images in the model's dtype.
        y: ``(N,)`` true labels.
        norm: ``"linf"``, ``"l2"``, ``"l1"`` or a threat object (its dual norm of the
            gradient difference is the denominator).
        n_targets: Targets returned per image (at most ``K − 1``).
        candidates: Classes scored per image (at most ``K − 1``; at least ``n_targets``).

    Returns:
        ``(N, min(n_targets, K − 1))`` long tensor of classes, best first.
    """
    n = x.shape[0]
    with torch.enable_grad():
        xr = x.detach().requires_grad_(True)
        out = guard.model(xr)
        guard.check_logits(out, n)
        k = out.shape[1]
        m = min(max(candidates, n_targets), k - 1)
        z = out.detach().double()
        cand = z.scatter(1, y[:, None], float("-inf")).topk(m, dim=1).indices
        cols = torch.cat([y[:, None], cand], dim=1)  # (N, 1 + m): z_y first
        grads = []
        for j in range(1 + m):
            (g,) = torch.autograd.grad(
                out.gather(1, cols[:, j : j + 1]).sum(), xr, retain_graph=j < m
            )
            grads.append(g.flatten(1).double())
    for _ in range(1 + m):
        guard.count(n, gradient=True)
    g_y = grads[0]
    # The threat object's dual norm: ``norm`` may be a name or (inside the ensemble) the
    # object itself, so comparing it with a string would silently pick the wrong one.
    threat = threat_model(norm)
    gap = z.gather(1, y[:, None]) - z.gather(1, cand)  # (N, m), > 0 while correct
    size = torch.stack([threat.dual_norm(g_y - g) for g in grads[1:]], dim=1)
    score = gap / size.clamp_min(1e-30)
    # NaN scores (non-finite logits) go last; ties keep the logit order (stable sort).
    score = torch.nan_to_num(score, nan=float("inf"))
    order = score.argsort(dim=1, stable=True)[:, : min(n_targets, k - 1)]
    return cand.gather(1, order)


@register("apgd_malt", norm="linf", randomized=True, params=APGD_MALT_PARAMS)
def apgd_malt(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    norm: str = "linf",
    steps: int = 100,
    n_targets: int = 9,
    candidates: int = _CANDIDATES,
    restarts: int = 1,
    eot_iter: int = 1,
    target: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    seeds: torch.Tensor | None = None,
) -> AttackResult:
    """APGD-T with MALT's target order: the targeted DLR loss towards the nearest classes.

    Exactly AutoAttack's APGD-T (:func:`~advtune.attacks.apgd_t`: targeted DLR loss,
    success judged untargeted, a sample stops once broken) except for which classes
    are tried: the ``n_targets`` of the ``candidates`` top-logit classes with the
    smallest Jacobian-normalised margin at the clean image (:func:`malt_targets`),
    nearest first. Melamed, Yehudai & Shamir, NeurIPS 2024 (arXiv:2407.02240).

    Args:
        model, x, y, eps, norm, steps, restarts, eot_iter, generator, seeds: As for
            :func:`~advtune.attacks.apgd_t` (``K >= 4`` classes; the same random
            streams, so sample *i*'s starts depend only on ``seeds[i]``).
        n_targets: Targets tried per sample, nearest first (at most ``K − 1``).
        candidates: Top-logit classes scored, ``>= 1`` (each costs a backward pass).
        target: If given, the only target and success means reaching it (as
            :func:`~advtune.attacks.apgd_t`); no ranking is done.

    Returns:
        :class:`AttackResult`; ``calls`` includes the ranking's ``1 + min(candidates,
        K − 1)`` gradient calls on the clean images.

    Raises:
        ValueError: Invalid inputs or hyperparameters, fewer than 4 classes.
    """
    # APGD's driver and streams: the same runs as apgd_t once the targets are chosen.
    from advtune.attacks.apgd import _STREAMS, _drive, _restarts, dlr_loss

    def rounds(
        guard: ModelGuard, x0: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None, runs: int
    ) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
        if t is not None:
            return _restarts(guard, x0, y, t, runs)
        ranked = malt_targets(
            guard, x0.to(x.dtype), y, norm=norm, n_targets=n_targets, candidates=candidates
        )
        return [(ranked[:, r], None) for r in range(ranked.shape[1]) for _ in range(runs)]

    return _drive(
        model, x, y, target=target, generator=generator, seeds=seeds, eps=eps, norm=norm,
        steps=steps, restarts=restarts, eot_iter=eot_iter, large_eps=False, stream=_STREAMS["dlr_t"],
        objective=dlr_loss, rounds=rounds,
    )  # fmt: skip
