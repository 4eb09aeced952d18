#!/usr/bin/env python
"""Time the frozen mode's CPU mask kernels (numpy and torch) next to the native ReLU kernels.

Thin entry over :func:`advtune.bench_kernels.mask_kernel_times`. Example::

    OMP_NUM_THREADS=1 python scripts/bench_masks.py --threads 1 --repeats 15
"""

from advtune.bench_kernels import masks_main

if __name__ == "__main__":
    masks_main()
