"""Store benchmark: random-access reads of the shard store vs one .npz per latent (kohya), and index build time.

    python bench/store_bench.py [--n 2000] [--entries 1000000] [--dir /tmp/store_bench]

Latents are synthetic 4x128x128 (a 1024 px SDXL image) fp16, identical for both layouts; each layout is read
once before it is timed, so both are timed with a warm page cache (what a training epoch after the first sees). Also prints the zstd ratio of the shards.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.index import build_index  # noqa: E402
from data.store import LatentStore, Record, ShardWriter  # noqa: E402


def _data_cfg(meta: str) -> SimpleNamespace:
    return SimpleNamespace(image_dirs=[], metadata_files=[meta], recursive=False, caption_extension=".txt",
                           resolution=1024, enable_bucket=True, bucket_reso_step=64, min_bucket_reso=256,
                           max_bucket_reso=2048, bucket_no_upscale=False, random_crop=False, flip_aug=False,
                           shuffle_caption=False, keep_tokens=0, keep_tokens_separator="", caption_separator=",",
                           caption_dropout_rate=0.0, caption_tag_dropout_rate=0.0, caption_prefix="", caption_suffix="",
                           num_repeats=1, caption_processor="", description_processor="", num_repeats_getter="",
                           subsets=[])


def bench_reads(root: str, n: int) -> None:
    g = torch.Generator().manual_seed(0)
    lats = [torch.randn(4, 128, 128, generator=g).to(torch.float16) for _ in range(n)]
    for compress in (False, True):
        d = os.path.join(root, f"store_{int(compress)}")
        w = ShardWriter(d, "bench", 0, 256, compress)
        t0 = time.perf_counter()
        for i, t in enumerate(lats):
            w.add(Record(f"img{i:07d}", "s", (1024, 1024), (1024, 1024), (0, 0), {"latent": t}))
        w.close()
        size = sum(os.path.getsize(os.path.join(d, "shards", f)) for f in os.listdir(os.path.join(d, "shards")))
        print(f"store write ({'zstd' if compress else 'raw'}): {n / (time.perf_counter() - t0):.0f} samples/s, "
              f"{size / 2**20:.1f} MiB on disk")
    raw = sum(t.numel() * 2 for t in lats)
    npz_dir = os.path.join(root, "npz")
    os.makedirs(npz_dir, exist_ok=True)
    for i, t in enumerate(lats):  # kohya: one .npz per image with "latents" and size arrays
        np.savez(os.path.join(npz_dir, f"img{i:07d}_1024x1024_sdxl.npz"), latents=t.numpy(),
                 original_size=np.array([1024, 1024]), crop_ltrb=np.array([0, 0, 0, 0]))
    order = list(range(n))
    random.Random(0).shuffle(order)
    nbytes = 4 * 128 * 128 * 2

    def timed(name: str, fn) -> None:
        fn(order)  # warm pass right before timing: each layout is timed with its pages cached
        t0 = time.perf_counter()
        fn(order)
        dt = time.perf_counter() - t0
        print(f"{name:28s} {n / dt:10.0f} samples/s {n * nbytes / dt / 2**20:10.1f} MB/s")

    for compress, use_mmap in ((False, False), (False, True), (True, False)):
        st = LatentStore(os.path.join(root, f"store_{int(compress)}"), use_mmap=use_mmap)
        name = "zstd+pread" if compress else ("mmap" if use_mmap else "pread")
        timed(f"store ({name}) random", lambda o: [st.get(f"img{i:07d}")["latent"].clone() for i in o])
    timed("npz per latent random", lambda o: [torch.from_numpy(np.load(os.path.join(
        npz_dir, f"img{i:07d}_1024x1024_sdxl.npz"))["latents"]) for i in o])
    zsize = sum(os.path.getsize(os.path.join(root, "store_1", "shards", f)) for f in os.listdir(os.path.join(root, "store_1", "shards")))
    print(f"zstd ratio on random-normal fp16 latents: {raw / zsize:.3f}x")


def bench_index(root: str, entries: int) -> None:
    rng = np.random.default_rng(0)
    wh = rng.integers(512, 2048, size=(entries, 2))
    meta = os.path.join(root, "meta.json")
    with open(meta, "w") as f:
        json.dump({f"img{i:07d}": {"image_path": f"/data/img{i:07d}.webp", "caption": f"tag{i % 97}, tag{i % 13}",
                                   "image_size": [int(wh[i, 0]), int(wh[i, 1])]} for i in range(entries)}, f)
    t0 = time.perf_counter()
    ix = build_index(_data_cfg(meta), threads=16)
    t1 = time.perf_counter()
    ix.save(os.path.join(root, "dataset_index.npz"))
    t2 = time.perf_counter()
    from data.index import DatasetIndex

    DatasetIndex.load(os.path.join(root, "dataset_index.npz"))
    t3 = time.perf_counter()
    print(f"index of {len(ix)} metadata entries: build {t1 - t0:.2f} s (JSON parse, path checks, buckets), "
          f"save {t2 - t1:.2f} s, load {t3 - t2:.2f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--entries", type=int, default=1_000_000)
    ap.add_argument("--dir", default="/tmp/store_bench")
    a = ap.parse_args()
    shutil.rmtree(a.dir, ignore_errors=True)
    os.makedirs(a.dir)
    try:
        bench_reads(a.dir, a.n)
        bench_index(a.dir, a.entries)
    finally:
        shutil.rmtree(a.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
