"""Moved to :mod:`advtune.run`; kept so ``advtune.presets`` imports keep working.

# merge: switch ``advtune.presets`` to ``from advtune.run.spec import AttackConfig`` and
# delete this module.
"""

from advtune.run.spec import AttackConfig

__all__ = ["AttackConfig"]
