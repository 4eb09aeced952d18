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


@pytest.fixture(scope="session")
def digits(request):
    """``(model, x, y)``: the trained digits CNN and its held-out set (tests/digits.py).

    Modules that need another view of it (only the correctly classified images, say)
    define their own ``digits``, which overrides this one.
    """
    from advtune._digits import digits_model, digits_test_set

    model = digits_model(getattr(request.config, "cache", None))
    x, y = digits_test_set()
    return model, x, y
