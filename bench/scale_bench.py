"""Scaling benchmark: dataset index build time / peak memory at N entries, the memory each extra rank of a node adds
when the index is memory-mapped (vs read into every process), and the sharded-state write time per rank.

    python bench/scale_bench.py index --entries 1000000          # build + save + mmap load, peak RSS
    python bench/scale_bench.py ranks --entries 1000000          # 2 processes on one node: RSS / PSS / private MB each
    python bench/scale_bench.py state                            # torch.distributed.checkpoint write, 2 gloo ranks

`ranks`: each process loads the saved index and does what a training rank does with it before the first step
(usable rows, the epoch's global batch list, its own share of it), then both report at the same moment.
Private (Private_Clean + Private_Dirty of /proc/self/smaps_rollup) is what one more rank costs the node; RSS also
counts the shared page-cache pages of the mapped index, PSS splits those between the processes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _mem() -> dict[str, float]:
    """RSS / PSS / private memory of this process in MB (Linux smaps_rollup)."""
    out = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("Rss", "Pss", "Private_Clean", "Private_Dirty"):
                out[k] = int(v.split()[0]) / 1024
    return {"rss": out["Rss"], "pss": out["Pss"], "private": out["Private_Clean"] + out["Private_Dirty"]}


def _peak_rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_meta(path: str, entries: int) -> None:
    """Synthetic metadata JSON: key -> image_path, caption (tag list), image_size (so no image header is read)."""
    rng = np.random.default_rng(0)
    wh = rng.integers(512, 2048, size=(entries, 2))
    with open(path, "w") as f:
        f.write("{")
        for i in range(entries):
            f.write(("," if i else "") + json.dumps(f"img{i:08d}") + ":" + json.dumps(
                {"image_path": f"/data/{i % 1000:03d}/img{i:08d}.webp", "caption": f"tag{i % 97}, tag{i % 13}, tag{i % 7}",
                 "image_size": [int(wh[i, 0]), int(wh[i, 1])]}))
        f.write("}")


def data_cfg(meta: str):
    from core.config import DataConfig
    return DataConfig(metadata_files=[meta], resolution=1024, bucket_reso_step=64, min_bucket_reso=256,
                      max_bucket_reso=2048)


def bench_index(root: str, entries: int) -> None:
    from data.index import DatasetIndex, build_index

    meta = os.path.join(root, f"meta_{entries}.json")
    if not os.path.exists(meta):
        t = time.perf_counter()
        write_meta(meta, entries)
        print(f"wrote {entries} metadata entries ({os.path.getsize(meta) / 2**20:.0f} MB) in {time.perf_counter() - t:.1f} s")
    t0 = time.perf_counter()
    ix = build_index(data_cfg(meta), threads=16)
    t1 = time.perf_counter()
    path = os.path.join(root, f"index_{entries}.npz")
    ix.save(path)
    t2 = time.perf_counter()
    del ix
    back = DatasetIndex.load(path)
    t3 = time.perf_counter()
    n = len(back)
    print(f"index of {n} entries: build {t1 - t0:.1f} s, save {t2 - t1:.1f} s, mmap load {1000 * (t3 - t2):.0f} ms, "
          f"file {os.path.getsize(path) / 2**20:.0f} MB, peak RSS of the building process {_peak_rss_mb():.0f} MB")


def _barrier(barrier_dir: str, name: str, world: int) -> None:
    """Every process at the same point (so pages both mapped count as shared, not as one's private)."""
    open(os.path.join(barrier_dir, f"{name}{os.getpid()}"), "w").close()
    while len([n for n in os.listdir(barrier_dir) if n.startswith(name)]) < world:
        time.sleep(0.05)


def _rank_worker(path: str, rank: int, world: int, mmap: bool, barrier_dir: str) -> None:
    from data.index import STR_COLUMNS, DatasetIndex
    from data.loader import EpochBatches, usable_rows

    before = _mem()
    ix = DatasetIndex.load(path, mmap=mmap)
    rows = usable_rows(ix)
    for name in ("sizes", "buckets", "subset", "repeats"):  # touch every page of every column
        np.asarray(getattr(ix, name)).sum()
    for name in STR_COLUMNS:
        col = getattr(ix, name)
        int(col.blob.sum()) + int(col.offsets.sum())
    _barrier(barrier_dir, "index", world)
    index_only = _mem()
    sampler = EpochBatches(ix, 4, rows, seed=0, epoch=0, rank=rank, world_size=world)  # the loader's per-rank batches
    _barrier(barrier_dir, "ready", world)
    after = _mem()
    print(json.dumps({"rank": rank, "mmap": mmap, "batches": len(sampler), "peak_rss": round(_peak_rss_mb()),
                      "index_private": round(index_only["private"] - before["private"], 1),
                      **{k: round(after[k] - before[k], 1) for k in after}}), flush=True)
    _barrier(barrier_dir, "done", world)


def bench_ranks(root: str, entries: int, world: int = 2, mmap_only: bool = False) -> None:
    path = os.path.join(root, f"index_{entries}.npz")
    if not os.path.exists(path):
        bench_index(root, entries)
    for mmap in (True,) if mmap_only else (True, False):
        with tempfile.TemporaryDirectory(dir=root) as bar:
            procs = [subprocess.Popen([sys.executable, __file__, "_rank", path, str(r), str(world), str(int(mmap)), bar],
                                      stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
                     for r in range(world)]
            outs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
        for o in outs:
            print(f"{entries} entries, index {'memory-mapped' if mmap else 'read into memory'}: rank {o['rank']} added "
                  f"RSS {o['rss']:.0f} MB, PSS {o['pss']:.0f} MB, private {o['private']:.0f} MB, of which the index "
                  f"{o['index_private']:.0f} MB and its epoch batches ({o['batches']}, data.loader.EpochBatches) the rest; "
                  f"peak RSS of the process {o['peak_rss']} MB")


def _state_worker(rank: int, world: int, store: str) -> None:
    import torch
    import torch.distributed as tdist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    tdist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    import models
    from core import dist
    from training import resume as rstate
    from training.ema import EMA

    dist.init("cpu")
    net = models.build("sdxl", "tiny", parts=["unet"]).unet
    dist.wrap_fsdp(net, list(net.input_blocks) + list(net.output_blocks))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    ema = EMA(net, 0.999)
    numel = sum(p.numel() for p in net.parameters())
    for trial in range(3):
        tmp = os.path.join(os.path.dirname(store), f"state{trial}")
        tdist.barrier()
        t0 = time.perf_counter()
        rstate.write_rank_rng(tmp, rank)
        rstate.write_sharded(tmp, rstate.sharded_state_dict(net, opt, ema))
        t1 = time.perf_counter()
        rstate.hash_files(tmp, rstate.rank_files(tmp, rank))
        t2 = time.perf_counter()
        size = sum(os.path.getsize(os.path.join(tmp, f)) for f in rstate.rank_files(tmp, rank))
        print(f"rank {rank} trial {trial}: {numel / 1e6:.1f}M parameters (+AdamW +EMA), own files "
              f"{size / 2**20:.1f} MB, DCP write {t1 - t0:.2f} s, hash {t2 - t1:.3f} s", flush=True)
    tdist.destroy_process_group()


def bench_state(root: str, world: int = 2) -> None:
    import torch.multiprocessing as mp

    store = os.path.join(tempfile.mkdtemp(dir=root), "store")
    mp.spawn(_state_worker, args=(world, store), nprocs=world)


if __name__ == "__main__":
    if sys.argv[1] == "_rank":
        _rank_worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), bool(int(sys.argv[5])), sys.argv[6])
        sys.exit(0)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("index", "ranks", "state"))
    ap.add_argument("--entries", type=int, default=1_000_000)
    ap.add_argument("--mmap-only", action="store_true", help="ranks: skip the index-read-into-memory comparison")
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "scale_bench"))
    a = ap.parse_args()
    os.makedirs(a.dir, exist_ok=True)
    {"index": lambda: bench_index(a.dir, a.entries), "ranks": lambda: bench_ranks(a.dir, a.entries, mmap_only=a.mmap_only),
     "state": lambda: bench_state(a.dir)}[a.what]()
