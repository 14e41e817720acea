"""cache.py end to end under `torchrun --nproc_per_node=2` on CPU (gloo) with the tiny VAE, over an image folder
and webdataset tar shards (written as webdataset's TarWriter lays them out), then train.py from the store.

References: the dataset index and the files on disk (analytic counts), the safetensors library for shard
validity (`--verify` re-checks every CRC), file timestamps for staleness.
"""

import contextlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys

import pytest
from PIL import Image

from data.demo import make_demo_dataset
from data.index import DatasetIndex
from data.store import LatentStore
from helpers import write_webdataset_shard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 14


def _cfg(tmp, tar=False):
    p = tmp / "cfg.toml"
    shards = f"""
[[data.subsets]]
image_dirs = ["{tmp / 'imgs'}"]
[[data.subsets]]
tar_shards = ["{tmp / 'shards'}/{{000000..000003}}.tar"]
flip_aug = false
""" if tar else ""
    p.write_text(f"""
[model]
model_family = "sdxl"
model_preset = "tiny"
[data]
{'' if tar else f'image_dirs = ["{tmp / "imgs"}"]'}
resolution = 64
bucket_reso_step = 32
min_bucket_reso = 32
max_bucket_reso = 64
bucket_no_upscale = true
flip_aug = true
max_dataloader_n_workers = 0
{shards}
[cache]
cache_dir = "{tmp / 'store'}"
num_workers = 0
vae_batch_size = 8
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


def _in_process(cfg, *extra):
    """cache.py as one in-process rank -> its summary line."""
    import cache

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cache.main([cfg, *extra])
    return rc, [l for l in out.getvalue().splitlines() if l.startswith(("cache:", "verify:"))][-1]


TAR_SHARDS, PER_SHARD = 4, 60


def _write_shards(d):
    """4 webdataset shards of 60 tiny images (png / jpg / webp; captions from .txt, .caption or a .json's caption /
    tags / description), one corrupt image, one image without any caption, one sample without an image."""
    rng = random.Random(0)
    os.makedirs(d)
    keys = []
    for s in range(TAR_SHARDS):
        samples = []
        for i in range(PER_SHARD):
            key = f"{s:06d}_{i:04d}"
            w, h = rng.choice([(32, 64), (64, 32), (32, 32)])
            fmt, ext = [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp")][i % 3]
            b = io.BytesIO()
            Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3))).save(b, fmt)
            m = {ext: b.getvalue()}
            kind = i % 4
            if kind == 0:
                m["txt"] = f"a {w}x{h} square, shard {s}\n"
            elif kind == 1:
                m["caption"] = f"colour field {i}"
            else:
                m["json"] = json.dumps({"caption": f"record {i}"} if kind == 2 else
                                       {"tags": f"tag{i}, flat", "description": f"a flat image {i}"})
            if (s, i) == (1, 5):
                m = {"jpg": b"\xff\xd8\xff\xe0 truncated nonsense"}  # corrupt image member
            if (s, i) == (2, 7):
                m = {ext: m[ext]}                                    # no caption at all
            samples.append((key, m))
            keys.append(key)
        if s == 3:
            samples.insert(10, (f"{s:06d}_meta", {"json": "{}"}))  # a sample without an image
        write_webdataset_shard(os.path.join(d, f"{s:06d}.tar"), samples)
    return keys


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One `torchrun --nproc_per_node=2 cache.py` over an image folder (14 images + a broken one) and 4 tar
    shards (240 samples, 1 corrupt, 1 without an image); shared by the tests below."""
    tmp = tmp_path_factory.mktemp("two_ranks")
    paths = make_demo_dataset(str(tmp / "imgs"), n=N, size=(40, 100))
    (tmp / "imgs" / "broken.png").write_bytes(b"\x89PNG garbage")
    tar_keys = _write_shards(str(tmp / "shards"))
    cfg = _cfg(tmp, tar=True)
    return tmp, cfg, paths, tar_keys, _summary(_run(cfg))


@pytest.mark.slow
def test_cache_two_ranks_tar_shards_then_train(two_ranks, tmp_path):
    """2 ranks over folder + tar subsets: each rank streams whole tar shards (every shard's records land in one
    rank's store shard, two tar shards per rank); the corrupt member and the image-less sample are skipped and
    reported; the caption-less image is cached with an empty caption (the empty-caption rule); train.py trains
    from the store and refuses the tar subset without one."""
    import train

    tmp, cfg, _, tar_keys, summary = two_ranks
    good = TAR_SHARDS * PER_SHARD - 1
    assert f"encoded {N + good}, already valid 0, skipped 3" in summary
    shard = lambda s: str(tmp / "shards" / f"{s:06d}.tar")  # noqa: E731
    skipped = (tmp / "store" / "skipped.txt").read_text()
    assert "broken.png" in skipped
    assert f"{shard(1)}::000001_0005.jpg" in skipped and "not a readable image" in skipped
    assert f"{shard(3)}::000003_meta" in skipped and "no image member (has .json)" in skipped
    ix = DatasetIndex.load(str(tmp / "store" / "dataset_index.npz"))
    row = {k: i for i, k in enumerate(ix.keys.tolist())}
    assert ix.captions[row["000002_0007"]] == "" and ix.captions[row["000000_0002"]] == "record 2"
    assert ix.captions[row["000000_0003"]] == "tag3, flat" and ix.descriptions[row["000000_0003"]] == "a flat image 3"
    assert ix.paths[row["000000_0001"]] == f"{shard(0)}::000000_0001.jpg"
    st = LatentStore(str(tmp / "store"))
    want = sorted([k for k in tar_keys if k != "000001_0005"] + [os.path.splitext(os.path.basename(p))[0]
                                                                  for p in two_ranks[2]])
    assert sorted(st.keys()) == want and len(st.shards) == 2
    by_store_shard = {}
    for s in range(TAR_SHARDS):
        homes = {st._loc(k)[0] for k in tar_keys if k.startswith(f"{s:06d}_") and k in st}
        assert len(homes) == 1, f"tar shard {s} was split across ranks"
        by_store_shard.setdefault(homes.pop(), []).append(s)
    assert sorted(map(len, by_store_shard.values())) == [2, 2]
    assert {tuple(st.get(k)["bucket"]) for k in tar_keys if k in st} == {(32, 64), (64, 32), (32, 32)}
    for k in [tar_keys[0]] + [os.path.splitext(os.path.basename(p))[0] for p in two_ranks[2][:2]]:
        rec = st.get(k)
        bw, bh = rec["bucket"]
        assert rec["latent"].shape == (4, bh // 8, bw // 8)
        assert ("flip.latent" in rec) == (k not in tar_keys)  # flip_aug only in the folder subset
    st.close()

    common = [cfg, "train.max_train_steps=2", "optimizer.lr_warmup_steps=0", "sample.sample_every_n_steps=0",
              "save.save_every_n_steps=0", "save.save_state=false", "data.batch_size=4"]
    assert train.main(common + [f"output_dir={tmp_path / 'run'}"]) == 0
    assert os.listdir(tmp_path / "run" / "models")
    with pytest.raises(SystemExit, match="tar_shards are read by cache.py"):
        train.main(common + [f"output_dir={tmp_path / 'run2'}", "cache.cache_dir="])


@pytest.mark.slow
def test_cache_incremental_and_crash(two_ranks, tmp_path):
    """After the 2-rank run: a rerun encodes nothing; a touched image alone is re-encoded; --verify passes;
    kill -9 mid-run, then a rerun completes what it left (in-process reruns: one rank is enough for these)."""
    tmp0, _, _, _, _ = two_ranks
    shutil.copytree(tmp0 / "imgs", tmp_path / "imgs")
    shutil.copytree(tmp0 / "store", tmp_path / "store")
    shutil.copytree(tmp0 / "shards", tmp_path / "shards")  # copy2 keeps sizes + mtimes: the records stay valid
    paths = sorted(str(tmp_path / "imgs" / os.path.basename(p)) for p in two_ranks[2])
    cfg = _cfg(tmp_path, tar=True)
    total = N + TAR_SHARDS * PER_SHARD - 1
    assert f"encoded 0, already valid {total}" in _in_process(cfg)[1]
    os.utime(paths[3])
    assert f"encoded 1, already valid {total - 1}" in _in_process(cfg)[1]
    rc, line = _in_process(cfg, "--verify")
    assert rc == 0 and "0 damaged" in line

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
    import re

    enc, valid = map(int, re.search(r"encoded (\d+), already valid (\d+)", _in_process(cfg)[1]).groups())
    assert enc + valid == total and 1 <= enc <= 8  # whatever the killed run finished is kept, the rest redone
    st = LatentStore(str(tmp_path / "store"))
    assert len(st) == total and not st.damaged
    rc, line = _in_process(cfg, "--verify")
    assert rc == 0 and "0 damaged" in line


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
        for b in make_loader(ix, c.data, st, seed=0, epoch=epoch, rank=0, world_size=1, cached_text=True):
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
