"""SplitMix64, the one integer hash behind every per-sample seed (run seeds, attack streams)."""

from __future__ import annotations

__all__ = ["MASK64", "splitmix64"]

MASK64 = (1 << 64) - 1


def splitmix64(z: int) -> int:
    """The SplitMix64 finaliser (Steele et al. 2014) of ``z``: a cheap, well-mixed 64-bit
    hash that is identical in every process (unlike Python's salted ``hash()``).

    Args:
        z: Any int; only its low 64 bits matter after the first addition.

    Returns:
        An int in ``[0, 2**64)``.
    """
    z = (z + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)
