"""Run callbacks: one protocol for progress bars, testing hooks and anything else.

Subclass :class:`RunCallbacks` and override what you need; every method is a no-op by
default, so :func:`advtune.run.run` calls each of them on every callback object.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ComponentClock", "Progress", "RunCallbacks", "TqdmProgress"]


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


def _clock_text(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


@dataclass
class ComponentClock:
    """Time and robust accuracy per component of an ensemble (AutoAttack), for the bar.

    :meth:`mark` starts the clock of a batch; :meth:`component` (the hook of
    :data:`advtune.attacks.autoattack.COMPONENT_PROGRESS`) charges the time since the
    previous event to the component that just finished and records how many samples it
    left robust. The ETA of a component is its seconds per finished image so far times
    the images left.

    Attributes:
        seconds: Seconds spent per component, in run order.
        robust, attacked: Samples left robust / samples in the calls, per component.
        last: The component that finished last.
    """

    now: Callable[[], float] = time.perf_counter
    seconds: dict[str, float] = field(default_factory=dict)
    robust: dict[str, int] = field(default_factory=dict)
    attacked: dict[str, int] = field(default_factory=dict)
    last: str | None = None
    _t: float | None = None

    def mark(self) -> None:
        """A batch starts (or ended): the next component's time runs from here."""
        self._t = self.now()

    def component(self, name: str, robust: int, n: int) -> None:
        t = self.now()
        start = self._t if self._t is not None else t
        self.seconds[name] = self.seconds.get(name, 0.0) + (t - start)
        self.robust[name] = self.robust.get(name, 0) + int(robust)
        self.attacked[name] = self.attacked.get(name, 0) + int(n)
        self.last, self._t = name, t

    def robust_accuracy(self, name: str) -> float | None:
        """Fraction of the samples still robust after ``name``, over all its calls."""
        n = self.attacked.get(name, 0)
        return self.robust[name] / n if n else None

    def eta(self, *, done: int, total: int) -> dict[str, float]:
        """Seconds left per component: its seconds per finished image × images left."""
        if done <= 0:
            return {}
        left = max(0, total - done)
        return {name: s / done * left for name, s in self.seconds.items()}

    def describe(self, *, done: int, total: int) -> str:
        """``"robust after apgd-t 41.2% · ETA apgd-ce 0:12 apgd-t 1:40 ..."`` or ``""``."""
        if self.last is None:
            return ""
        parts = []
        acc = self.robust_accuracy(self.last)
        if acc is not None:
            parts.append(f"robust after {self.last} {100 * acc:.1f}%")
        eta = self.eta(done=done, total=total)
        if eta:
            parts.append("ETA " + " ".join(f"{k} {_clock_text(v)}" for k, v in eta.items()))
        return " · ".join(parts)


class TqdmProgress(RunCallbacks):
    """A tqdm bar on stderr (rank 0 only): images done, the run's success rate and, for
    AutoAttack, the robust accuracy after the latest component and each component's ETA
    (APGD-CE → APGD-T → FAB-T → Square)."""

    def __init__(self) -> None:
        self._bar: Any = None
        self._clock = ComponentClock()
        self._token: Any = None
        self._done = self._total = 0

    def on_start(self, *, total: int, desc: str, is_main: bool) -> None:
        if is_main:
            from tqdm import tqdm

            from advtune.attacks.autoattack import COMPONENT_PROGRESS

            self._bar = tqdm(total=total, unit="img", desc=desc, file=sys.stderr, leave=False)
            self._total, self._done = total, 0
            self._token = COMPONENT_PROGRESS.set(self._component)
            self._clock.mark()

    def _component(self, name: str, robust: int, n: int) -> None:
        self._clock.component(name, robust, n)
        if self._bar is not None:
            self._bar.set_postfix_str(self._postfix(), refresh=True)

    def on_batch(self, batches: int) -> None:
        self._clock.mark()

    def _postfix(self, rate: float | None = None) -> str:
        parts = [f"success {100 * rate:.1f}%"] if rate is not None else []
        text = self._clock.describe(done=self._done, total=self._total)
        return " · ".join([*parts, text] if text else parts)

    def on_progress(self, progress: Progress) -> None:
        if self._bar is not None:
            self._bar.update(progress.images)
            self._done = progress.done
            text = self._postfix(progress.success_rate)
            if text:
                self._bar.set_postfix_str(text)

    def on_end(self) -> None:
        if self._token is not None:
            from advtune.attacks.autoattack import COMPONENT_PROGRESS

            COMPONENT_PROGRESS.reset(self._token)
            self._token = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None
