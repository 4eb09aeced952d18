"""Run callbacks: one protocol for progress bars, testing hooks and anything else.

Subclass :class:`RunCallbacks` and override what you need; every method is a no-op by
default, so :func:`advtune.run.run` calls each of them on every callback object.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

__all__ = ["Progress", "RunCallbacks", "TqdmProgress"]


@dataclass(frozen=True)
class Progress:
    """Counts of the whole run (all torchrun ranks) after one round of batches.

    Attributes:
        images: images finished in this round.
        done: images finished this session.
        total: images to attack this session.
        successes, eligible: the attack's successes among the eligible rows this
            session, by the rule of the report's ``success_rate``
            (:func:`advtune.run.metrics.success_counts`).
    """

    images: int
    done: int
    total: int
    successes: int
    eligible: int

    @property
    def success_rate(self) -> float | None:
        return self.successes / self.eligible if self.eligible else None


class RunCallbacks:
    """Hooks of :func:`advtune.run.run` (no-ops; override what you need)."""

    def on_start(self, *, total: int, desc: str, is_main: bool) -> None:
        """Before the first batch: ``total`` images to attack this session (all ranks);
        ``is_main`` is ``False`` on torchrun ranks other than 0."""

    def on_batch(self, batches: int) -> None:
        """This process finished (and saved) its ``batches``-th batch of the session.

        May raise (e.g. ``KeyboardInterrupt``) to stop the run after that batch.
        """

    def on_progress(self, progress: Progress) -> None:
        """Global counts after a round in which images were finished."""

    def on_end(self) -> None:
        """After the last batch, also when the run stopped early."""


class TqdmProgress(RunCallbacks):
    """A tqdm bar on stderr (rank 0 only) with the run's success rate."""

    def __init__(self) -> None:
        self._bar: Any = None

    def on_start(self, *, total: int, desc: str, is_main: bool) -> None:
        if is_main:
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="img", desc=desc, file=sys.stderr, leave=False)

    def on_progress(self, progress: Progress) -> None:
        if self._bar is not None:
            self._bar.update(progress.images)
            rate = progress.success_rate
            if rate is not None:
                self._bar.set_postfix_str(f"success {100 * rate:.1f}%")

    def on_end(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
