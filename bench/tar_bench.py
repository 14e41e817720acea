"""Tar-shard sources: index scan rate (member headers, captions and image headers read), with one process scanning
every shard and with --ranks processes each scanning its own shards into part files (data/readers/tar.py
scan_own_shards, what cache.py's ranks do) and rank 0 merging the parts into the index rows; and the rate at which
one rank streams its shards (members read front to back, no decode), on synthetic webdataset shards.

    python bench/tar_bench.py [--shards 8] [--per-shard 1000] [--side 512] [--json 0.5] [--ranks 2] [--dir /tmp/tar_bench]

Each sample is `<key>.jpg` (a --side x --side JPEG of noise, ~incompressible like photos) + `<key>.txt`, and for a
--json share of samples also `<key>.json` with img2dataset's `width` / `height` (so their image header is not read).
The first pass after writing is timed with a warm page cache (what a re-index sees); pass --drop to have the script
ask the kernel to drop caches first (needs root).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from data.readers import Source  # noqa: E402
from data.readers.tar import TarShardReader, scan_own_shards, scan_parts  # noqa: E402
from helpers import write_webdataset_shard  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--per-shard", type=int, default=1000)
    ap.add_argument("--side", type=int, default=512)
    ap.add_argument("--json", type=float, default=0.5, help="share of samples with a .json width / height")
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--ranks", type=int, default=2, help="processes scanning their own shards")
    ap.add_argument("--dir", default="/tmp/tar_bench")
    ap.add_argument("--drop", action="store_true")
    a = ap.parse_args()
    shutil.rmtree(a.dir, ignore_errors=True)
    os.makedirs(a.dir)
    rng = np.random.default_rng(0)
    b = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (a.side, a.side, 3), dtype=np.uint8)).save(b, "JPEG", quality=90)
    jpg = b.getvalue()
    shards = []
    for s in range(a.shards):
        samples = []
        for i in range(a.per_shard):
            m = {"jpg": jpg, "txt": f"sample {s} {i}"}
            if rng.random() < a.json:
                m["json"] = json.dumps({"width": a.side, "height": a.side, "url": "http://x/y.jpg"})
            samples.append((f"{s:06d}{i:05d}", m))
        shards.append(os.path.join(a.dir, f"{s:06d}.tar"))
        write_webdataset_shard(shards[-1], samples)
    total = sum(os.path.getsize(p) for p in shards)
    n = a.shards * a.per_shard
    print(f"{a.shards} shards x {a.per_shard} samples, {len(jpg) / 1024:.0f} KiB JPEGs, {total / 2**20:.0f} MiB")

    def drop():
        if a.drop:
            os.system("sync; echo 3 > /proc/sys/vm/drop_caches")

    r = TarShardReader()
    spec = SimpleNamespace(tar_shards=shards, caption_extension=".txt")
    drop()
    t, c = time.perf_counter(), time.process_time()
    rows = sum(len(c) for c in r.read(Source("tar", "", spec), 0, a.threads))
    dt, cpu = time.perf_counter() - t, time.process_time() - c
    print(f"index scan, 1 process ({a.threads} threads): {rows} rows in {dt:.2f} s = {rows / dt:,.0f} samples/s "
          f"(CPU {cpu:.2f} s)")
    parts = os.path.join(a.dir, "parts")
    drop()
    t = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, __file__, "_rank", parts, str(k), str(a.ranks), str(a.threads)] + shards,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, text=True)
             for k in range(a.ranks)]
    own = [json.loads(p.communicate()[0]) for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit("a scanning process failed")
    t1 = time.perf_counter()
    with scan_parts(parts):  # rank 0's index build: every shard from its part
        rows = sum(len(c) for c in TarShardReader().read(Source("tar", "", spec), 0, a.threads))
    t2 = time.perf_counter()
    print(f"index scan, {a.ranks} processes (each its own shards -> parts, then rank 0 merges): {rows} rows, scan "
          f"{t1 - t:.2f} s (with process start-up; the slowest rank's own scan {max(o['s'] for o in own):.2f} s, CPU "
          f"{'/'.join(format(o['cpu'], '.2f') for o in own)} s, "
          f"{'/'.join(str(o['shards']) for o in own)} shards) + merge {t2 - t1:.2f} s = {rows / (t2 - t):,.0f} "
          f"samples/s ({rows / (max(o['s'] for o in own) + t2 - t1):,.0f} without start-up)")
    drop()
    t = time.perf_counter()
    got = 0
    for p in shards:
        wanted = {f"{p.rsplit('/', 1)[1][:6]}{i:05d}.jpg" for i in range(a.per_shard)}
        for _, data, _ in r.stream_members(p, wanted):
            got += len(data)
    dt = time.perf_counter() - t
    print(f"stream (one process): {n} images in {dt:.2f} s = {n / dt:,.0f} images/s, {got / dt / 2**20:,.0f} MiB/s")
    shutil.rmtree(a.dir)


if __name__ == "__main__":
    if sys.argv[1:2] == ["_rank"]:  # one scanning rank: parts dir, rank, world, threads, shards
        d, rank, world, threads = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
        t, c = time.perf_counter(), time.process_time()
        n = scan_own_shards([SimpleNamespace(tar_shards=sys.argv[6:], caption_extension=".txt")], d, rank, world, threads)
        print(json.dumps({"s": time.perf_counter() - t, "cpu": time.process_time() - c, "shards": n}))
    else:
        main()
