"""The trained digits CNN for real-data tests (lives in :mod:`advtune._digits`, which
``scripts/gpu_targets.py`` uses too)."""

from advtune._digits import (
    SIZE,
    TEST_SAMPLES,
    VERSION,
    DigitsCNN,
    DigitsMLP,
    digits_dataset,
    digits_model,
    digits_test_set,
    train_digits_cnn,
)

__all__ = [
    "SIZE",
    "TEST_SAMPLES",
    "VERSION",
    "DigitsCNN",
    "DigitsMLP",
    "digits_dataset",
    "digits_model",
    "digits_test_set",
    "train_digits_cnn",
]
