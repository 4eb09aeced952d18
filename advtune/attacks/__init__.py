"""Adversarial attacks as pure, batched functions.

Every attack is ``fn(model, x, y, *, target=None, generator=None, seeds=None, **hp)``
returning an :class:`AttackResult`; find them by name with :func:`get`, list them with
:func:`names`, and read their declared hyperparameters (:class:`Param`) with :func:`spec`; threat models
are objects (:class:`Linf`, :class:`L2`, :class:`L1`, :func:`threat_model`). ``model`` maps images in
[0, 1] ``(N, C, H, W)`` to logits ``(N, K)`` and should be in eval mode (attacks keep the
modes you give and restore every flag they touch). See ``docs/attacks.md``.

>>> from advtune import attacks
>>> res = attacks.pgd(model, x, y, eps=4 / 255, seeds=seeds)  # doctest: +SKIP
>>> res.success.float().mean()  # doctest: +SKIP

Each public module of this package registers its attacks when imported, and is imported
once, below; a new attack module adds its import here (``tests/test_attacks_contract.py``
fails for a public module that is not imported).
"""

from advtune.attacks._loop import with_restarts
from advtune.attacks._random import random_target
from advtune.attacks._registry import REQUIRED, AttackSpec, Param, get, names, register, spec
from advtune.attacks._result import AttackResult, ModelCalls, least_likely_target
from advtune.attacks.apgd import apgd, apgd_t
from advtune.attacks.autoattack import EnsembleResult, autoattack
from advtune.attacks.cw import cw_l2
from advtune.attacks.ddn import ddn
from advtune.attacks.fab import fab
from advtune.attacks.fgsm import fgsm
from advtune.attacks.fmn import fmn
from advtune.attacks.mifgsm import mifgsm
from advtune.attacks.pgd import pgd
from advtune.attacks.square import square
from advtune.attacks.threat import L1, L2, Linf, ThreatModel, threat_model, threat_names
from advtune.attacks.torchattacks_adapter import (
    MissingDependencyError,
    TorchattacksAttack,
    torchattacks,
)
from advtune.attacks.transfer import (
    admix,
    di_fgsm,
    mi_di_ti_fgsm,
    si_ni_fgsm,
    ti_fgsm,
    transfer_fgsm,
    vmi_fgsm,
    vni_fgsm,
)

__all__ = [
    "L1",
    "L2",
    "REQUIRED",
    "AttackResult",
    "AttackSpec",
    "EnsembleResult",
    "Linf",
    "MissingDependencyError",
    "ModelCalls",
    "Param",
    "ThreatModel",
    "TorchattacksAttack",
    "admix",
    "apgd",
    "apgd_t",
    "autoattack",
    "cw_l2",
    "ddn",
    "di_fgsm",
    "fab",
    "fgsm",
    "fmn",
    "get",
    "least_likely_target",
    "mi_di_ti_fgsm",
    "mifgsm",
    "names",
    "pgd",
    "random_target",
    "register",
    "si_ni_fgsm",
    "spec",
    "square",
    "threat_model",
    "threat_names",
    "ti_fgsm",
    "torchattacks",
    "transfer_fgsm",
    "vmi_fgsm",
    "vni_fgsm",
    "with_restarts",
]
