"""Memory of one rank's epoch batch list (data/loader.EpochBatches) for a large dataset, against the list of
(row, position, epoch) tuples it used to hold.

    python bench/loader_memory.py [--entries 1000000] [--batch-size 1] [--world 1] [--buckets 40]

A synthetic index (random repeats 1..2, --buckets distinct buckets) stands in for the real one: only `repeats` and
`buckets` are read. Memory is what tracemalloc sees retained (numpy reports its buffers to it) after building the
rank's batches for an epoch, and the peak while building them. "before" is the list of (row, position, epoch) tuples
per batch that EpochBatches held until it kept flat arrays, built here from the same batches (its retained size is
the old form's; its peak here is not the old build's, which also held the global list of per-batch arrays).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import tracemalloc
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.loader import EpochBatches  # noqa: E402


def _measure(build):
    tracemalloc.start()
    t = time.perf_counter()
    obj = build()
    dt = time.perf_counter() - t
    cur, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return obj, cur / 2**20, peak / 2**20, dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=1_000_000)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--world", type=int, default=1)
    ap.add_argument("--buckets", type=int, default=40)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    sides = np.stack([np.arange(a.buckets) * 64 + 512, 2048 - np.arange(a.buckets) * 32], 1).astype(np.int32)
    ix = SimpleNamespace(repeats=rng.integers(1, 3, a.entries).astype(np.int32),
                         buckets=sides[rng.integers(0, a.buckets, a.entries)])
    rows = np.arange(a.entries)
    samples = int(ix.repeats.sum())
    print(f"{a.entries} entries, {samples} samples per epoch, batch size {a.batch_size}, world size {a.world}")
    eb, cur, peak, dt = _measure(lambda: EpochBatches(ix, a.batch_size, rows, seed=0, epoch=0, rank=0,
                                                       world_size=a.world))
    print(f"flat arrays (now):      retained {cur:7.1f} MiB, peak {peak:7.1f} MiB while building, {dt:5.2f} s "
          f"({len(eb)} batches on rank 0)")
    old, cur, peak, dt = _measure(lambda: [list(b) for b in eb])  # the former per-rank list of tuples
    print(f"list of tuples (before): retained {cur:7.1f} MiB, peak {peak:7.1f} MiB while building, {dt:5.2f} s")


if __name__ == "__main__":
    main()
