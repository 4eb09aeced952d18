"""Adversarial attacks as pure, batched functions.

Every attack is ``fn(model, x, y, *, target=None, generator=None, seeds=None, **hp)``
returning an :class:`AttackResult`; find them by name with :func:`get`, list them with
:func:`names`, and read their hyperparameters with :func:`spec`. ``model`` maps images in
[0, 1] ``(N, C, H, W)`` to logits ``(N, K)`` and should be in eval mode (attacks keep the
modes you give and restore every flag they touch). See ``docs/attacks.md``.

>>> from advtune import attacks
>>> res = attacks.pgd(model, x, y, eps=4 / 255, seeds=seeds)  # doctest: +SKIP
>>> res.success.float().mean()  # doctest: +SKIP
"""

from advtune.attacks._random import random_target
from advtune.attacks._registry import AttackSpec, get, names, register, spec
from advtune.attacks._result import AttackResult, least_likely_target
from advtune.attacks.cw import cw_l2
from advtune.attacks.fab import fab
from advtune.attacks.fgsm import fgsm
from advtune.attacks.mifgsm import mifgsm
from advtune.attacks.pgd import pgd
from advtune.attacks.square import square
from advtune.attacks.torchattacks_adapter import (
    MissingDependencyError,
    TorchattacksAttack,
    torchattacks,
)

__all__ = [
    "AttackResult",
    "AttackSpec",
    "MissingDependencyError",
    "TorchattacksAttack",
    "cw_l2",
    "fab",
    "fgsm",
    "get",
    "least_likely_target",
    "mifgsm",
    "names",
    "pgd",
    "random_target",
    "register",
    "spec",
    "square",
    "torchattacks",
]
