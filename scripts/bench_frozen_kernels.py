#!/usr/bin/env python
"""Time a gradient step in deploy mode and in frozen mode with each CPU kernel choice off.

Thin entry over :func:`advtune.bench_kernels.frozen_kernel_ablation`. Example::

    OMP_NUM_THREADS=1 python scripts/bench_frozen_kernels.py --model resnet50 --repeats 16
"""

from advtune.bench_kernels import ablation_main

if __name__ == "__main__":
    ablation_main()
