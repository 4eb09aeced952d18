#!/usr/bin/env python
"""Time one manifest batch write against the number of rows already in the file.

For each size (rows on disk), a :class:`advtune.storage.ManifestWriter` is filled to that
size, then one batch is written, again and again: ``append`` is what a run does per batch
(:meth:`~advtune.storage.ManifestWriter.extend`), ``rewrite`` is a whole-file atomic rewrite
(:meth:`~advtune.storage.ManifestWriter.flush`, what every batch cost before appends). The
sizes are interleaved within each repeat, so background load hits them alike; medians
are printed.

Example::

    python scripts/bench_manifest.py --sizes 1000,10000,50000 --repeats 30
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from advtune.storage import ManifestWriter


def _row(index: int) -> dict:
    return {
        "path": f"n01440764/ILSVRC2012_val_{index:08d}.JPEG",
        "label": 0, "clean_pred": 0, "adv_pred": 7, "success": True,
        "linf": 4 / 255, "l2": 1.2345678901234567, "index": index, "eps": 4 / 255,
        "target": None, "clean_conf": 0.87654321, "adv_conf": 0.123456789,
        "attack_success": True, "adv_path": f"n01440764/ILSVRC2012_val_{index:08d}.png",
    }  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000,50000", help="rows on disk")
    parser.add_argument("--batch", type=int, default=32, help="rows per batch")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--no-fsync", action="store_true", help="skip fsync (page cache only)")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        writers, next_index = {}, {}
        for n in sizes:
            w = ManifestWriter(Path(tmp) / f"m{n}.csv", fsync=not args.no_fsync)
            w.extend(_row(i) for i in range(n))
            writers[n], next_index[n] = w, n
        times: dict[tuple[str, int], list[float]] = {}
        for _ in range(args.repeats):
            for n in sizes:
                w = writers[n]
                batch = [_row(next_index[n] + i) for i in range(args.batch)]
                next_index[n] += args.batch
                t0 = time.perf_counter()
                w.extend(batch)
                t1 = time.perf_counter()
                w.flush()
                t2 = time.perf_counter()
                times.setdefault(("append", n), []).append(t1 - t0)
                times.setdefault(("rewrite", n), []).append(t2 - t1)
    print(f"batch {args.batch} rows, {args.repeats} repeats, fsync {not args.no_fsync}")
    print("rows on disk | append median ms | rewrite median ms")
    for n in sizes:
        a = statistics.median(times[("append", n)]) * 1e3
        r = statistics.median(times[("rewrite", n)]) * 1e3
        print(f"{n:>12} | {a:>16.3f} | {r:>17.3f}")


if __name__ == "__main__":
    main()
