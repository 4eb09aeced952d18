#!/usr/bin/env python
"""Benchmark the ConvBN modes (thin entry over :mod:`advtune.bench`, same as ``advtune bench``).

Per mode: bytes saved for backward per image (CPU or CUDA, via saved_tensors_hooks,
marginal over two batch sizes), and on CUDA peak MiB per image, images*steps/s of a
PGD-10 loop and the largest batch that fits. Examples::

    python scripts/bench_convbn.py --model resnet50 --device cpu --size 224 --steps 0
    python scripts/bench_convbn.py --model resnet50 --device cuda --batch-size 256 --json r50.json
"""

import sys

from advtune.bench import main

if __name__ == "__main__":
    sys.exit(main())
