#!/usr/bin/env python
"""Benchmark the ConvBN modes (thin entry over :mod:`advtune.bench`, same as ``advtune bench``).

Per mode: bytes saved for backward per image, the peak bytes per image of one gradient
step next to the no-grad forward floor (CPU: PyTorch profiler allocation events; CUDA:
the allocator), images*steps/s of the registered attack (``--repeats R``: modes timed in
turn, medians), and on CUDA the timed loop's peak and the largest batch that fits. Examples::

    python scripts/bench_convbn.py --model resnet50 --device cpu --size 224 --steps 0
    python scripts/bench_convbn.py --model resnet50 --device cpu --batch-size 4 --steps 1 --repeats 3 --no-peak
    python scripts/bench_convbn.py --model resnet50 --device cuda --batch-size 256 --json r50.json
"""

import sys

from advtune.bench import main

if __name__ == "__main__":
    sys.exit(main())
