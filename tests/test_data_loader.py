"""Loader: batches depend on (seed, epoch) only; per-epoch coverage for world sizes 1, 2, 3; exact resume.

References: analytic counting (every sample x repeats exactly once across the global list; union over ranks).
"""

import collections

import numpy as np
import pytest
import torch

from core.config import DataConfig
from data.buckets import BucketSettings, assign_buckets
from data.index import DatasetIndex, StrColumn
from data.loader import batches_per_epoch, global_batches, make_loader, rank_batches
from data.sources import SubsetSpec
from data.store import LatentStore, Record, ShardWriter


def make_index(n=23, repeats=None):
    rng = np.random.default_rng(0)
    sizes = rng.integers(32, 160, size=(n, 2)).astype(np.int32)
    bs = BucketSettings(resolution=64, step=16, min_reso=32, max_reso=128)
    sub = SubsetSpec([], [], ".txt", 1, False, "", True, False, 1.0,
                     {"shuffle_caption": True, "keep_tokens": 1})
    keys = [f"k{i}" for i in range(n)]
    return DatasetIndex(keys=StrColumn.from_list(keys), paths=StrColumn.from_list(["/nonexistent"] * n),
                        captions=StrColumn.from_list([f"k{i}, a, b, c, d" for i in range(n)]),
                        metadata=StrColumn.from_list([""] * n), sizes=sizes, buckets=assign_buckets(sizes, bs),
                        subset=np.zeros(n, np.int16),
                        repeats=np.asarray(repeats if repeats is not None else [1 + i % 3 for i in range(n)], np.int32),
                        subsets=[sub], bucket_settings=bs, fingerprint="x")


Cfg = DataConfig(batch_size=4)  # the [data] table the loader reads (batch size, hooks, decoding)


def test_global_list_covers_every_sample_once():
    """Each row appears repeats times; each batch one bucket; only a bucket's last batch is short."""
    ix = make_index()
    bl = global_batches(ix, 4, seed=1, epoch=0)
    rows = collections.Counter(int(r) for b in bl for r in b[:, 0])
    assert rows == {i: int(ix.repeats[i]) for i in range(len(ix))}
    assert len({int(p) for b in bl for p in b[:, 1]}) == int(ix.repeats.sum())
    per_bucket = collections.Counter()
    for b in bl:
        assert len({tuple(ix.buckets[r]) for r in b[:, 0]}) == 1
        per_bucket[tuple(ix.buckets[b[0, 0]])] += 1
    short = collections.Counter(tuple(ix.buckets[b[0, 0]]) for b in bl if len(b) < 4)
    assert all(v <= 1 for v in short.values())
    assert [b.tolist() for b in bl] == [b.tolist() for b in global_batches(ix, 4, seed=1, epoch=0)]
    assert [b.tolist() for b in bl] != [b.tolist() for b in global_batches(ix, 4, seed=1, epoch=1)]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_ranks_partition_and_resume(world):
    """Union over ranks covers the global list; equal step counts; `skip` resumes exactly, even with another W."""
    ix = make_index()
    bl = global_batches(ix, 4, seed=5, epoch=2)
    per_rank = [rank_batches(bl, r, world) for r in range(world)]
    assert len({len(x) for x in per_rank}) == 1 and len(per_rank[0]) == batches_per_epoch(ix, Cfg, world)
    seen = collections.Counter(tuple(b[:, 1].tolist()) for x in per_rank for b in x)
    assert set(seen) == {tuple(b[:, 1].tolist()) for b in bl}
    assert sum(seen.values()) - len(bl) == (-len(bl)) % world  # only the wrapped final round repeats
    # resume after k global batches with world size 2 -> remaining batches with this world size
    k = 4
    resumed = [rank_batches(bl, r, world, skip=k) for r in range(world)]
    assert len({len(x) for x in resumed}) == 1  # equal step counts also when k is not a multiple of W
    rest = [tuple(b[:, 1].tolist()) for x in resumed for b in x]
    n = len(bl)
    wrapped = [bl[p % n] for p in range(n, k + -(-(n - k) // world) * world)]
    assert set(rest) == {tuple(b[:, 1].tolist()) for b in bl[k:] + wrapped}


def test_make_loader_from_store_deterministic(tmp_path):
    """Batches from the store: latents, captions (keep_tokens first), sizes; same (seed, epoch) -> same batches."""
    ix = make_index(n=10, repeats=[1] * 10)
    w = ShardWriter(str(tmp_path), "cfg", 0, 1)
    for i in range(10):
        bw, bh = (int(v) for v in ix.buckets[i])
        lat = torch.full((4, bh // 8, bw // 8), float(i), dtype=torch.bfloat16)
        w.add(Record(f"k{i}", "s", (bw, bh), (7, 9), (1, 2), {"latent": lat, "flip.latent": -lat}, (1, 5)))
    w.close()
    st = LatentStore(str(tmp_path))

    def run(rank, world):
        return list(make_loader(ix, Cfg, st, seed=3, epoch=1, rank=rank, world_size=world))

    a, b = run(0, 1), run(0, 1)
    assert [x["keys"] for x in a] == [x["keys"] for x in b] and [x["captions"] for x in a] == [x["captions"] for x in b]
    assert sorted(k for x in a for k in x["keys"]) == sorted(f"k{i}" for i in range(10))
    for x in a:
        for j, key in enumerate(x["keys"]):
            i = int(key[1:])
            v = x["latents"][j].flatten()[0].item()
            assert v in (i, -i)
            if i:  # flipped latents were stored negated: the flip variant's crop must come with them
                assert x["crop_top_left"][j].tolist() == ([1, 5] if v < 0 else [1, 2])
            assert x["captions"][j].startswith(f"k{i}")
        assert x["original_size"][0].tolist() == [7, 9]
        assert x["target_size"][0].tolist() == [x["latents"].shape[2] * 8, x["latents"].shape[3] * 8]
    two = run(0, 2) + run(1, 2)
    assert set(k for x in two for k in x["keys"]) == set(k for x in a for k in x["keys"])  # (+ wrapped round)


def test_persistent_workers_follow_set_epoch(tmp_path):
    """One DataLoader for the whole run: with persistent workers, set_epoch gives exactly the batches (and the
    per-epoch caption / flip randomness) that a fresh loader for that epoch gives."""
    ix = make_index(n=8, repeats=[1] * 8)
    w = ShardWriter(str(tmp_path), "cfg", 0, 1)
    for i in range(8):
        bw, bh = (int(v) for v in ix.buckets[i])
        lat = torch.full((4, bh // 8, bw // 8), float(i), dtype=torch.bfloat16)
        w.add(Record(f"k{i}", "s", (bw, bh), (7, 9), (1, 2), {"latent": lat, "flip.latent": -lat}, (1, 5)))
    w.close()
    st = LatentStore(str(tmp_path))
    persistent = make_loader(ix, Cfg, st, seed=3, epoch=0, rank=0, world_size=1, num_workers=1, persistent_workers=True)
    assert persistent.persistent_workers
    for epoch in (0, 1, 2):
        persistent.batch_sampler.set_epoch(epoch, skip=1 if epoch == 1 else 0)
        got = list(persistent)
        fresh = list(make_loader(ix, Cfg, st, seed=3, epoch=epoch, rank=0, world_size=1, skip=1 if epoch == 1 else 0))
        assert [x["keys"] for x in got] == [x["keys"] for x in fresh]
        assert [x["captions"] for x in got] == [x["captions"] for x in fresh]
        assert all(torch.equal(a["latents"], b["latents"]) for a, b in zip(got, fresh))


def test_caption_is_the_cached_variants_text(tmp_path):
    """With cached text variants, each sample's caption is the text of the variant whose tensors it got, and over
    epochs more than one variant is used. Reference: the records written (variant k's tensors are filled with k)."""
    ix = make_index(n=6, repeats=[1] * 6)
    w = ShardWriter(str(tmp_path), "cfg", 0, 1)
    for i in range(6):
        bw, bh = (int(v) for v in ix.buckets[i])
        te = {f"te{k}.t5": torch.full((2, 3), float(k)) for k in range(3)}
        w.add(Record(f"k{i}", "s", (bw, bh), (7, 9), (1, 2),
                     {"latent": torch.zeros(4, bh // 8, bw // 8, dtype=torch.bfloat16), **te}, None,
                     [f"cap {i} v{k}" for k in range(3)]))
    w.close()
    st = LatentStore(str(tmp_path))
    used = set()
    for epoch in range(4):
        for x in make_loader(ix, Cfg, st, seed=3, epoch=epoch, rank=0, world_size=1, cached_text=True):
            for j, key in enumerate(x["keys"]):
                k = int(x["te.t5"][j][0, 0].item())
                assert x["captions"][j] == f"cap {key[1:]} v{k}"
                used.add(k)
    assert len(used) >= 2


def test_on_the_fly_flip_crop(tmp_path):
    """Images decoded in the loader: a flipped sample's crop_top_left is the mirrored window. Analytic: a 5x8
    image into a 2x4 bucket is resized to 3x4 (5 * 0.5 = 2.5 rounds half up, as PIL's resize target), the
    centred window starts at left 0, so the mirrored one starts at 3 - 2 - 0 = 1."""
    from PIL import Image

    from data.buckets import resize_and_crop

    path = str(tmp_path / "a.png")
    Image.fromarray(np.tile(np.arange(0, 250, 50, dtype=np.uint8)[None, :, None], (8, 1, 3))).save(path)
    ix = make_index(n=1, repeats=[1])
    ix.paths = StrColumn.from_list([path])
    ix.sizes, ix.buckets = np.array([[5, 8]], np.int32), np.array([[2, 4]], np.int32)
    im, _, _ = resize_and_crop(Image.open(path).convert("RGB"), (2, 4))
    x0 = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 127.5 - 1.0
    seen = set()
    for epoch in range(8):
        (x,) = list(make_loader(ix, Cfg, None, seed=0, epoch=epoch, rank=0, world_size=1))
        flipped = not torch.equal(x["images"][0], x0)
        assert flipped == torch.equal(x["images"][0], torch.flip(x0, dims=[2]))
        assert x["crop_top_left"][0].tolist() == ([0, 1] if flipped else [0, 0])
        seen.add(flipped)
    assert seen == {True, False}


def test_resume_skip_not_multiple_of_world_size_keeps_ranks_in_step():
    """A state saved with W=3 resumed with W=2: skip=3 of 8 batches; both ranks run the same number of steps and
    together cover every remaining batch."""
    batches = [np.array([[i, i]]) for i in range(8)]
    got = [rank_batches(batches, r, 2, skip=3) for r in range(2)]
    assert len(got[0]) == len(got[1]) == 3
    seen = {int(b[0, 0]) for g in got for b in g}
    assert {3, 4, 5, 6, 7} <= seen


def _te_store(tmp_path, ix):
    """A store whose records hold a latent and one cached text variant (`te0.*`) with its caption."""
    w = ShardWriter(str(tmp_path), "cfg", 0, 1)
    for i in range(len(ix)):
        bw, bh = (int(v) for v in ix.buckets[i])
        w.add(Record(f"k{i}", "s", (bw, bh), (7, 9), (1, 2),
                     {"latent": torch.zeros(4, bh // 8, bw // 8), "te0.crossattn": torch.ones(3, 8)},
                     captions=[f"cached caption {i}"]))
    w.close()
    return LatentStore(str(tmp_path))


def test_cached_text_is_read_only_when_the_run_trains_from_it(tmp_path):
    """#28.10: the loader handed the store's cached text to every run whose records had it, so a run that trains
    the text encoders (cache_text_encoder_outputs = false) never ran them. The store's text is read only with
    cached_text (the run's cache.cache_text_encoder_outputs); otherwise batches carry captions to encode."""
    ix = make_index(n=6, repeats=[1] * 6)
    st = _te_store(tmp_path, ix)
    off = [b for b in make_loader(ix, Cfg, st, seed=0, epoch=0, rank=0, world_size=1)]
    on = [b for b in make_loader(ix, Cfg, st, seed=0, epoch=0, rank=0, world_size=1, cached_text=True)]
    assert off and not any(k.startswith("te.") for b in off for k in b)
    assert all(c.startswith("k") for b in off for c in b["captions"])  # the index captions, processed
    assert all("te.crossattn" in b for b in on)
    assert all(c.startswith("cached caption") for b in on for c in b["captions"])


def test_lora_text_encoder_adapters_train_on_a_store_with_cached_text(tmp_path):
    """The reported run: a store cached with cache_text_encoder_outputs = true, then a LoRA run with text-encoder
    adapters and cache_text_encoder_outputs = false. Its text-encoder lora_up weights (initialised to 0) must move
    (they stayed exactly 0: the encoders never ran)."""
    from safetensors.torch import load_file

    import cache
    import train
    from data.demo import make_demo_dataset

    make_demo_dataset(str(tmp_path / "data"), n=4, size=(64, 64))
    common = ["configs/demo.toml", f"data.image_dirs=['{tmp_path / 'data'}']", f"cache.cache_dir={tmp_path / 'store'}",
              "data.resolution=64", "data.min_bucket_reso=32", "data.max_bucket_reso=128", "data.batch_size=2"]
    assert cache.main([*common, "cache.cache_text_encoder_outputs=true"]) == 0
    assert train.main([*common, f"output_dir={tmp_path / 'run'}", "train.max_train_steps=2", "network.network_module=lora",
                       "network.network_dim=4", "optimizer.learning_rate=1e-2", "optimizer.lr_warmup_steps=0",
                       "optimizer.lr_scheduler=constant", "sample.sample_every_n_steps=0", "save.save_every_n_steps=0",
                       "save.save_state=false", "save.save_precision=fp32"]) == 0
    lora_file = next((tmp_path / "run" / "models").glob("*.safetensors"))
    sd = load_file(str(lora_file))
    te_up = [v for k, v in sd.items() if k.startswith(("lora_te1_", "lora_te2_")) and k.endswith("lora_up.weight")]
    assert te_up and sum(int(v.count_nonzero()) for v in te_up) > 0
