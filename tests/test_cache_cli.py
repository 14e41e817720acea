"""cache.py end to end under `torchrun --nproc_per_node=2` on CPU (gloo) with the tiny VAE.

References: the dataset index and the files on disk (analytic counts), the safetensors library for shard
validity (`--verify` re-checks every CRC), file timestamps for staleness.
"""

import os
import signal
import subprocess
import sys

import pytest

from data.demo import make_demo_dataset
from data.index import DatasetIndex
from data.store import LatentStore

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 14


def _cfg(tmp):
    p = tmp / "cfg.toml"
    p.write_text(f"""
[model]
model_family = "sdxl"
model_preset = "tiny"
[data]
image_dirs = ["{tmp / 'imgs'}"]
resolution = 64
bucket_reso_step = 16
min_bucket_reso = 32
max_bucket_reso = 128
flip_aug = true
[cache]
cache_dir = "{tmp / 'store'}"
num_workers = 0
vae_batch_size = 4
""")
    return str(p)


def _run(cfg, *extra, nproc=2, check=True):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
           os.path.join(ROOT, "cache.py"), cfg, *extra]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _summary(r):
    return [l for l in r.stdout.splitlines() if l.startswith("cache:")][-1]


@pytest.mark.slow
def test_cache_two_ranks_incremental_and_crash(tmp_path):
    """2 ranks: each image once; rerun encodes nothing; a touched image alone is re-encoded; kill -9 recovers."""
    paths = make_demo_dataset(str(tmp_path / "imgs"), n=N, size=(40, 100))
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG garbage")
    cfg = _cfg(tmp_path)
    r = _run(cfg)
    assert "encoded 14, already valid 0, skipped 1" in _summary(r)
    ix = DatasetIndex.load(str(tmp_path / "store" / "dataset_index.npz"))
    keys = ix.keys.tolist()
    assert len(keys) == len(set(keys)) == N
    st = LatentStore(str(tmp_path / "store"))
    assert sorted(st.keys()) == sorted(keys) and len(st.shards) == 2  # one shard per rank
    for k in keys:
        rec = st.get(k)
        bw, bh = rec["bucket"]
        assert rec["latent"].shape == rec["flip.latent"].shape == (4, bh // 8, bw // 8)
    assert "broken.png" in (tmp_path / "store" / "skipped.txt").read_text()

    assert "encoded 0, already valid 14" in _summary(_run(cfg))
    os.utime(paths[3])
    assert "encoded 1, already valid 13" in _summary(_run(cfg))
    assert _run(cfg, "--verify", nproc=1).returncode == 0

    # kill -9 mid-run (after the index is built, while encoding), then re-run: complete and valid.
    for p in paths[:8]:
        os.utime(p, ns=(1, 2 * 10**18))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "cache.py"), cfg, "cache.vae_batch_size=1"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    for line in proc.stdout:
        if "to encode" in line:  # index built, encoding starts: kill now
            break
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    r = _run(cfg)
    import re

    enc, valid = map(int, re.search(r"encoded (\d+), already valid (\d+)", _summary(r)).groups())
    assert enc + valid == N and 1 <= enc <= 8  # whatever the killed run finished is kept, the rest redone
    st = LatentStore(str(tmp_path / "store"))
    assert sorted(st.keys()) == sorted(keys) and not st.damaged
    assert _run(cfg, "--verify", nproc=1).returncode == 0


def test_verify_counts_each_damaged_shard_once(tmp_path, capsys):
    """`cache.py --verify` (in process, one rank): a shard damaged on opening (truncated) and one trusted through
    the merged index but corrupted (found by the CRC re-check) are each reported once. Reference: the bytes
    edited on disk."""
    import glob

    import torch

    import cache
    from data.store import SHARD_DIR, Record, ShardWriter

    (tmp_path / "imgs").mkdir()
    root = tmp_path / "store"
    for i in range(3):
        w = ShardWriter(str(root), "cfg", 0, 1)
        w.add(Record(f"k{i}", "s", (16, 16), (16, 16), (0, 0), {"latent": torch.ones(4, 2, 2)}))
        w.close()
    LatentStore(str(root)).write_index()
    a, b, _ = sorted(glob.glob(str(root / SHARD_DIR / "*.safetensors")))
    with open(a, "r+b") as f:
        f.truncate(os.path.getsize(a) - 4)
    st0 = os.stat(b)
    data = bytearray(open(b, "rb").read()); data[-3] ^= 1
    open(b, "wb").write(data)
    os.utime(b, ns=(st0.st_atime_ns, st0.st_mtime_ns))
    assert cache.main([_cfg(tmp_path), "--verify"]) == 1
    out = capsys.readouterr().out
    assert "records, 2 damaged" in out
    assert out.count("DAMAGED") == 2 and out.count(os.path.basename(b)) == 1


def test_caption_hook_runs_in_cache_for_cached_text(tmp_path, capsys):
    """[data] caption_processor with [cache] cache_text_encoder_outputs (in process, one rank, tiny SDXL): every
    cached variant's stored caption carries the hook's marker (seen with flipped=False, a per-variant rng draw),
    the stored embeddings are those of that text, and the loader returns the stored text with the matching
    variant's tensors. References: the hook's own output format (marker + rng draw), the tiny text encoders run
    afresh on the stored caption text (and on the caption without the hook, which must differ), the records."""
    import torch

    import cache
    import models
    from core.config import load_config
    from data.loader import make_loader

    make_demo_dataset(str(tmp_path / "imgs"), n=4, size=(40, 100))
    hook = tmp_path / "hooks.py"
    hook.write_text("def proc(caption, *, key, metadata, counter, flipped, rng):\n"
                    "    assert isinstance(metadata, dict) and 'artist' in counter\n"
                    "    return f\"{caption}, zzmark-{'flip' if flipped else 'plain'}-{rng.randrange(10**9)}\"\n"
                    "def other(caption, **kw):\n    return caption + ', other'\n")
    cfg = _cfg(tmp_path)
    ov = ["cache.cache_text_encoder_outputs=true", "cache.text_variants=2", f"data.caption_processor='{hook}:proc'"]
    assert cache.main([cfg, *ov]) == 0
    out = capsys.readouterr().out
    assert "encoded 4, already valid 0" in out
    share = float(out.split("input-bound ")[1].split("%")[0])  # the encoder's wait for decoded images, in percent
    assert 0.0 <= share <= 100.0
    ix = DatasetIndex.load(str(tmp_path / "store" / "dataset_index.npz"))
    st = LatentStore(str(tmp_path / "store"))
    c = load_config(cfg, ov)
    te = models.load_text_encoders(c.model, "cpu", torch.float32, seed=c.seed)
    for row, key in enumerate(ix.keys.tolist()):
        caps = st.record_info(key)["cap"]
        assert len(caps) == 2 and caps[0] != caps[1]  # not augmented, but the hook draws from the variant's rng
        rec = st.get(key)
        plain = te.encode([ix.captions[row]])[0]
        for k, (cap, fresh) in enumerate(zip(caps, te.encode(caps))):
            assert cap.startswith(ix.captions[row] + ", zzmark-plain-")
            for name, t in fresh.items():
                assert torch.allclose(rec[f"te{k}.{name}"].float(), t.float(), atol=2e-2), (key, k, name)
            assert any(not torch.allclose(fresh[n].float(), plain[n].float(), atol=2e-2) for n in fresh)
    seen = set()
    for epoch in range(3):
        for b in make_loader(ix, c.data, st, seed=0, epoch=epoch, rank=0, world_size=1):
            for j, key in enumerate(b["keys"]):
                caps = st.record_info(key)["cap"]
                k = caps.index(b["captions"][j])  # the stored text, not a fresh load-time hook draw
                name = next(n for n in b if n.startswith("te."))
                assert torch.equal(b[name][j], st.get(key)[f"te{k}.{name[3:]}"])
                seen.add(k)
    assert seen == {0, 1}
    # Another hook spec makes the cached records stale; the same spec keeps them.
    assert cache.main([cfg, *ov]) == 0
    assert "encoded 0, already valid 4" in capsys.readouterr().out
    assert cache.main([cfg, *ov[:2], f"data.caption_processor='{hook}:other'"]) == 0
    assert "encoded 4, already valid 0" in capsys.readouterr().out
    st = LatentStore(str(tmp_path / "store"))
    assert all(t.endswith(", other") for k in ix.keys.tolist() for t in st.record_info(k)["cap"])
