"""Fixtures shared by several test modules (helpers live in fakes.py, modelzoo.py, digits.py)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a whole module.

    torchrun runs each rank with OMP_NUM_THREADS=1; in-process references must use the
    same thread count, since CPU kernels may sum in another order with more threads (and
    it keeps two-core CI machines from oversubscribing when subprocesses run too).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
