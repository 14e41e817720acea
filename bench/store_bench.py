"""Store benchmark: random-access reads of the shard store vs one .npz per latent (kohya), the cost of checking
every record read against its CRC32 (warm and cold page cache), dataset index build / reuse time for a million
metadata entries, and memory of the store's key table for a million keys.

    python bench/store_bench.py [--n 2000] [--entries 1000000] [--dir /tmp/store_bench]
                                [--only reads|verify|index|lookup] [--repeat 3]

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


def _evict(paths: list[str]) -> None:
    """Drop the files' pages from the page cache (POSIX_FADV_DONTNEED: no root needed; clean, unmapped pages)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def bench_verify(root: str, n: int, repeat: int) -> None:
    """Records/s of LatentStore.get with and without the per-tensor CRC32 check, mmap and pread, warm and cold
    page cache. Each read is consumed as the loader does (`.float()`), so an mmap read touches its pages either way.
    Random order over the whole store; `repeat` passes per case, checked and unchecked interleaved; wall-clock
    records/s (median [range]) and CPU microseconds per record (median; what a shared machine distorts least)."""
    import statistics
    import zlib

    torch.set_num_threads(1)  # as in a DataLoader worker; more threads only add spin-waits to the CPU time
    g = torch.Generator().manual_seed(0)
    d = os.path.join(root, "store_verify")
    w = ShardWriter(d, "bench", 0, 256)
    for i in range(n):
        w.add(Record(f"img{i:07d}", "s", (1024, 1024), (1024, 1024), (0, 0),
                     {"latent": torch.randn(4, 128, 128, generator=g).to(torch.float16)}))
    w.close()
    LatentStore(d).write_index()
    shards = [os.path.join(d, "shards", f) for f in sorted(os.listdir(os.path.join(d, "shards")))]
    order = list(range(n))
    random.Random(0).shuffle(order)
    buf = os.urandom(128 << 20)
    t0 = time.perf_counter()
    zlib.crc32(buf)
    print(f"zlib.crc32: {len(buf) / (time.perf_counter() - t0) / 2**30:.2f} GiB/s on this CPU; records "
          f"4x128x128 fp16 (128 KiB), {n} of them in {len(shards)} shard(s), random order")
    for cold in (False, True):
        for use_mmap in (True, False):
            wall: dict[bool, list[float]] = {False: [], True: []}
            cpu: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(repeat):
                for verify in (False, True):  # interleaved: both see the same load on a shared machine
                    st = LatentStore(d, use_mmap=use_mmap, verify_reads=verify)
                    if cold:
                        _evict(shards)
                    else:
                        [st.get(f"img{i:07d}")["latent"].float() for i in order]  # warm: pages cached
                    t0, c0 = time.perf_counter(), time.process_time()
                    for i in order:
                        st.get(f"img{i:07d}")["latent"].float()
                    wall[verify].append(n / (time.perf_counter() - t0))
                    cpu[verify].append((time.process_time() - c0) / n * 1e6)
                    st.close()
                    del st
            med = {v: statistics.median(wall[v]) for v in wall}
            print(f"{'cold' if cold else 'warm'} {'mmap ' if use_mmap else 'pread'}: unchecked {med[False]:7.0f} rec/s "
                  f"[{min(wall[False]):.0f}-{max(wall[False]):.0f}] {statistics.median(cpu[False]):6.0f} us CPU/rec | "
                  f"checked {med[True]:7.0f} rec/s [{min(wall[True]):.0f}-{max(wall[True]):.0f}] "
                  f"{statistics.median(cpu[True]):6.0f} us CPU/rec | CPU cost of the check "
                  f"{statistics.median(cpu[True]) - statistics.median(cpu[False]):+.0f} us/rec")


def _write_meta(path: str, entries: int, image_path) -> None:
    rng = np.random.default_rng(0)
    wh = rng.integers(512, 2048, size=(entries, 2))
    with open(path, "w") as f:
        json.dump({f"img{i:07d}": {"image_path": image_path(i), "caption": f"tag{i % 97}, tag{i % 13}",
                                   "image_size": [int(wh[i, 0]), int(wh[i, 1])]} for i in range(entries)}, f)


def bench_index(root: str, entries: int) -> None:
    """1M JSON entries with sizes: plain; then with image_dirs (every path checked, fallback by name); reuse."""
    from data.index import DatasetIndex, load_or_build_index

    meta = os.path.join(root, "meta.json")
    _write_meta(meta, entries, lambda i: f"/data/img{i:07d}.webp")
    t0 = time.perf_counter()
    ix = build_index(_data_cfg(meta), threads=16)
    t1 = time.perf_counter()
    ix.save(os.path.join(root, "dataset_index.npz"))
    t2 = time.perf_counter()
    DatasetIndex.load(os.path.join(root, "dataset_index.npz"))
    t3 = time.perf_counter()
    print(f"index of {len(ix)} metadata entries: build {t1 - t0:.2f} s (JSON parse, path checks, buckets), "
          f"save {t2 - t1:.2f} s, load {t3 - t2:.2f} s")
    del ix
    # Paths in 1000 folders: 200 exist holding 1% of the images; 0.5% more were moved to image_dirs (found by
    # name); the rest are gone (sizes from metadata keep them in the index).
    imgs, moved = os.path.join(root, "imgs"), os.path.join(root, "moved")
    path = lambda i: os.path.join(imgs, f"f{i % 1000:03d}", f"img{i:07d}.webp")  # noqa: E731
    present, found = range(0, entries, 100), range(1, entries, 200)
    for i in present:
        os.makedirs(os.path.dirname(path(i)), exist_ok=True)
        open(path(i), "wb").close()
    os.makedirs(moved)
    for i in found:
        open(os.path.join(moved, os.path.basename(path(i))), "wb").close()
    meta2 = os.path.join(root, "meta_dirs.json")
    _write_meta(meta2, entries, path)
    cfg = _data_cfg(meta2)
    cfg.image_dirs = [moved]
    t0 = time.perf_counter()
    ix = load_or_build_index(cfg, os.path.join(root, "index_dirs"))
    t1 = time.perf_counter()
    ix2 = load_or_build_index(cfg, os.path.join(root, "index_dirs"))
    t2 = time.perf_counter()
    n_moved = sum(ix.paths[i].startswith(moved) for i in found)
    assert n_moved == len(found) and ix2.fingerprint == ix.fingerprint
    print(f"index of {len(ix)} metadata entries with image_dirs ({len(present)} paths exist, {n_moved} found by "
          f"name): build+save {t1 - t0:.2f} s, reuse (inputs unchanged) {t2 - t1:.2f} s")


def bench_lookup(entries: int) -> None:
    """Memory and speed of the store's key -> record table for `entries` keys: Python dicts vs KeyTable."""
    import tracemalloc

    from data.store import KeyTable

    keys = [f"img{i:07d}" for i in range(entries)]
    srcs = [f"s{100000 + i}:{1700000000000000000 + i}" for i in range(entries)]
    shard, pos = np.arange(entries, dtype=np.int32) // 100_000, np.arange(entries, dtype=np.int32) % 100_000
    probe = random.Random(0).sample(keys, min(entries, 100_000))
    tracemalloc.start()
    t0 = time.perf_counter()
    rows, src = {}, {}
    for k, s, si, j in zip(keys, srcs, shard.tolist(), pos.tolist()):  # what the store held before
        rows[k], src[k] = (si, j), s
    t1 = time.perf_counter()
    dict_mem = tracemalloc.get_traced_memory()[0] + sum(map(sys.getsizeof, keys)) + sum(map(sys.getsizeof, srcs))
    tracemalloc.stop()
    t2 = time.perf_counter()
    _ = [rows[k] for k in probe]
    t3 = time.perf_counter()
    del rows, src
    t4 = time.perf_counter()
    table = KeyTable(keys, srcs, shard, pos)
    t5 = time.perf_counter()
    _ = [table.find(k) for k in probe]
    t6 = time.perf_counter()
    table.find_many(keys)
    t7 = time.perf_counter()
    print(f"store key table, {entries} keys: dicts {dict_mem / 2**20:.0f} MiB (keys and srcs included), "
          f"build {t1 - t0:.2f} s, lookup {(t3 - t2) / len(probe) * 1e6:.2f} us | KeyTable "
          f"{table.nbytes() / 2**20:.0f} MiB, build {t5 - t4:.2f} s, lookup {(t6 - t5) / len(probe) * 1e6:.2f} us, "
          f"find_many(all) {t7 - t6:.2f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--entries", type=int, default=1_000_000)
    ap.add_argument("--dir", default="/tmp/store_bench")
    ap.add_argument("--only", choices=["reads", "verify", "index", "lookup"], default=None, help="run one part only")
    ap.add_argument("--repeat", type=int, default=3, help="passes per case in the verify part")
    a = ap.parse_args()
    shutil.rmtree(a.dir, ignore_errors=True)
    os.makedirs(a.dir)
    try:
        if a.only in (None, "reads"):
            bench_reads(a.dir, a.n)
        if a.only in (None, "verify"):
            bench_verify(a.dir, a.n, a.repeat)
        if a.only in (None, "index"):
            bench_index(a.dir, a.entries)
        if a.only in (None, "lookup"):
            bench_lookup(a.entries)
    finally:
        shutil.rmtree(a.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
