"""SD3 training with cached text-encoder outputs: the T5 attention mask, the compact text cache, end to end runs.

The end-to-end tests run cache.py / train.py on `configs/demo_sd3.toml` (tiny SD3 preset, random weights) and
small generated datasets: as 2 worker processes with torchrun's environment (gloo on CPU; tests/helpers.py
run_workers), and in this process (cache.main / train.main) for the one-process runs.
"""
import json
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import models
from core.config import load_config
from helpers import main_ok, run_workers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER_JSON = os.path.join(os.path.dirname(__file__), "fixtures", "t5", "tokenizer.json")
CONFIG = "configs/demo_sd3.toml"


def _data_overrides(data, cache):
    return [f"data.image_dirs=['{data}']", f"cache.cache_dir={cache}"]


def _train_overrides(out, steps, *extra):
    return [f"output_dir={out}", f"train.max_train_steps={steps}", "optimizer.lr_warmup_steps=0",
            "optimizer.lr_scheduler=constant", "sample.sample_every_n_steps=0", "save.save_every_n_steps=0", *extra]


def _metrics(out):
    with open(os.path.join(out, "logs", "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _text_comp(cfg):
    """The text encoders exactly as train.py builds them for previews / uncached training (fp32 on CPU)."""
    return models.from_config(cfg.model, device="cpu", seed=cfg.seed, parts=list(models.family("sd3").text_encoders),
                              dtype={"text": torch.float32})


def _cached_batch(comp, items):
    """What train.micro_step_loss feeds the network from the cache: comp.collate_cached_text of per-sample dicts."""
    return comp.collate_cached_text(items)


# ----------------------------------------------------------------------------------------------
# T5 attention mask and the compact cache layout (in process, fast)
# ----------------------------------------------------------------------------------------------


def test_encode_text_t5_mask_matches_transformers():
    """Reference: transformers T5EncoderModel on the same tiny weights with the HF fast tokenizer's ids and
    attention_mask (tokenizer.json, padding to max_length); conversion: none. With apply_t5_attn_mask the T5 part
    of the context is HF's masked output with padding rows set to zero; without it, HF's unmasked output."""
    transformers = pytest.importorskip("transformers")
    hf_tok = transformers.T5TokenizerFast(tokenizer_file=TOKENIZER_JSON)
    length = 80
    comp = models.build("sd3", "tiny", parts=["clip_l", "clip_g", "t5"], t5_max_token_length=length,
                        apply_t5_attn_mask=True)
    c = comp.t5.cfg
    ref = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=c.vocab_size, d_model=c.d_model, d_kv=c.d_kv, d_ff=c.d_ff, num_layers=c.num_layers,
        num_heads=c.num_heads, relative_attention_num_buckets=c.relative_attention_num_buckets,
        relative_attention_max_distance=c.relative_attention_max_distance, feed_forward_proj="gated-gelu",
        dropout_rate=0.0, layer_norm_epsilon=1e-6)).eval()
    ref.load_state_dict(comp.t5.state_dict(), strict=False)
    ref.get_input_embeddings().weight.data.copy_(comp.t5.shared.weight.data)
    caps = ["a red circle", "a blue square, simple background, blue, square", ""]
    enc = hf_tok(caps, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    with torch.no_grad():
        masked = ref(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        unmasked = ref(input_ids=enc["input_ids"]).last_hidden_state
        ours = comp.encode_text(caps)["context"]
        comp.apply_t5_attn_mask = False
        ours_ref = comp.encode_text(caps)["context"]
    want = masked * enc["attention_mask"][..., None]
    assert ours.shape == ours_ref.shape == (3, 77 + length, c.d_model)
    torch.testing.assert_close(ours[:, 77:], want, rtol=1e-5, atol=1e-5)
    real = enc["attention_mask"].bool()
    assert torch.all(ours[:, 77:][~real] == 0)  # exact zeros: what lets the cache drop them
    torch.testing.assert_close(ours_ref[:, 77:], unmasked, rtol=1e-5, atol=1e-5)
    assert (ours_ref[:, 77:][~real] != 0).any(dim=-1).all()  # the reference attends to padding: no zero rows
    torch.testing.assert_close(ours[:, :77], ours_ref[:, :77], rtol=0, atol=0)  # CLIP part untouched


@pytest.mark.parametrize("mask", [False, True])
def test_compact_cache_items_rebuild_encode_text_exactly(mask):
    """Reference: SD3.encode_text (the uncached training path) cast to bf16, compared bit for bit with
    collate_cached_text of the cached items; analytic sizes: 77 CLIP rows, T5 rows = L without the mask,
    = the HF tokenizer's real tokens (EOS included) with it."""
    transformers = pytest.importorskip("transformers")
    hf_tok = transformers.T5TokenizerFast(tokenizer_file=TOKENIZER_JSON)
    comp = models.build("sd3", "tiny", parts=["clip_l", "clip_g", "t5"], t5_max_token_length=96,
                        apply_t5_attn_mask=mask)
    caps = ["a red circle", "a blue square, simple background, blue, square, " * 3, ""]
    with torch.no_grad():
        full = comp.encode_text(caps)
        items = comp.cache_text_items(caps)
    n_real = [len(hf_tok(c, truncation=True, max_length=96)["input_ids"]) for c in caps]
    for it, n in zip(items, n_real):
        assert it["clip"].shape == (77, 64) and it["pooled"].shape == (64,)
        assert it["t5"].shape == ((n if mask else 96), 64)
        assert all(v.dtype == torch.bfloat16 for v in it.values())
    got = _cached_batch(comp, items)
    assert got["context"].shape == full["context"].shape == (3, 77 + 96, 64)
    assert torch.equal(got["context"], full["context"].to(torch.bfloat16))
    assert torch.equal(got["pooled"], full["pooled"].to(torch.bfloat16))


def test_collate_cached_text_rejects_foreign_layouts():
    """Reference: the documented contract (clip/t5/pooled, T5 rows <= t5_max_token_length): an old-layout or
    mismatched cache is an error that says to re-run cache.py, never a silent reshape."""
    comp = models.build("sd3", "tiny", parts=["mmdit"], t5_max_token_length=77)
    with pytest.raises(ValueError, match="re-run cache.py"):
        comp.collate_cached_text([{"context": torch.zeros(154, 64), "pooled": torch.zeros(64)}])
    with pytest.raises(ValueError, match="t5_max_token_length = 77"):
        comp.collate_cached_text([{"clip": torch.zeros(77, 64), "t5": torch.zeros(90, 64), "pooled": torch.zeros(64)}])
    no_t5 = comp.collate_cached_text([{"clip": torch.ones(77, 32), "t5": torch.zeros(0, 64), "pooled": torch.ones(64)}])
    assert no_t5["context"].shape == (1, 154, 64)  # T5 left out (use_t5 = false): all its rows zero
    assert no_t5["context"][0, :77, :32].eq(1).all() and no_t5["context"][0, :77, 32:].eq(0).all()
    assert no_t5["context"][0, 77:].eq(0).all()


# ----------------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from data.demo import make_demo_dataset
    root = tmp_path_factory.mktemp("sd3demo")
    make_demo_dataset(str(root / "data"), n=8, size=(64, 96))
    return root


@pytest.mark.slow
def test_two_process_cached_text_train_export_samples(shapes, tmp_path):
    """2 processes (torchrun's environment, gloo): cache.py with text-encoder outputs, then train.py on the demo SD3 config.
    References: the files on disk (safetensors reload through models.load, PNG previews, metrics rows) and
    SD3.encode_text as the oracle for what the loader hands train.py from the cache."""
    cache, out = tmp_path / "cache", tmp_path / "run"
    run_workers(["cache.py", CONFIG, *_data_overrides(shapes / "data", cache)])
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle --d 5 --s 3\na blue square --d 6 --s 3 --w 64 --h 96\n")
    run_workers(["train.py", CONFIG, *_data_overrides(shapes / "data", cache),
                 *_train_overrides(out, 4, "data.batch_size=2", "save.save_every_n_steps=2",
                                   f"sample.sample_prompts={prompts}", "sample.sample_every_n_steps=4",
                                   "sample.sample_params={width=64, height=64}")])
    comp = models.load(str(out / "models" / "demo_sd3.safetensors"))
    assert comp.family == "sd3" and comp.mmdit is not None and comp.t5 is not None and comp.vae is not None
    assert os.path.isfile(out / "models" / "demo_sd3-step00000002.safetensors")
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in rows)
    pngs = set(os.listdir(out / "samples"))
    assert {"000004_0_5.png", "000004_1_6.png"} <= pngs
    with Image.open(out / "samples" / "000004_1_6.png") as im:
        assert im.size == (64, 96)

    # Cached vs uncached conditioning for the same captions, through the real loader.
    from data.index import load_or_build_index
    from data.loader import make_loader
    from data.store import LatentStore
    cfg = load_config(os.path.join(ROOT, CONFIG), _data_overrides(shapes / "data", cache) + ["data.batch_size=4"])
    store = LatentStore(str(cache))
    rec = store.get(store.keys()[0])
    assert rec["te0.clip"].shape == (77, 64) and rec["te0.t5"].shape == (77, 64)  # mask off: all 77 T5 rows
    index = load_or_build_index(cfg.data, str(cache), is_main=True, barrier=lambda: None)
    comp = _text_comp(cfg)
    n = 0
    for batch in make_loader(index, cfg.data, store, seed=0, epoch=0, rank=0, world_size=1, cached_text=True):
        b = len(batch["captions"])
        items = [{k[3:]: batch[k][i] for k in batch if k.startswith("te.")} for i in range(b)]
        cached = _cached_batch(comp, items)
        with torch.no_grad():
            fresh = comp.encode_text(batch["captions"])
        assert cached["context"].shape == fresh["context"].shape == (b, 77 + 77, 64)
        assert torch.equal(cached["context"], fresh["context"].to(torch.bfloat16))
        assert torch.equal(cached["pooled"], fresh["pooled"].to(torch.bfloat16))
        n += b
    assert n == 8


@pytest.mark.slow
def test_masked_cache_variants_exact_and_rotated_by_epoch(shapes, tmp_path):
    """cache.py with apply_t5_attn_mask, shuffled captions and text_variants = 3. References: SD3.encode_text of
    each variant's caption (process_caption with cache.py's per-variant seed) as the oracle for the stored tensors
    (exact after bf16, trimmed T5 rows = real tokens), and the loader over several epochs."""
    from cache import _key_seed
    from data.captions import CaptionOptions, process_caption
    from data.index import load_or_build_index
    from data.loader import make_loader
    from data.store import LatentStore
    cache = tmp_path / "cache"
    ov = [*_data_overrides(shapes / "data", cache), "model.apply_t5_attn_mask=true", "model.t5_max_token_length=96",
          "cache.text_variants=3", "data.shuffle_caption=true", "data.batch_size=1"]
    main_ok("cache", [CONFIG, *ov])
    cfg = load_config(os.path.join(ROOT, CONFIG), ov)
    store = LatentStore(str(cache))
    index = load_or_build_index(cfg.data, str(cache), is_main=True, barrier=lambda: None)
    comp = _text_comp(cfg)
    distinct_captions = 0
    for row, key in enumerate(index.keys):
        rec = store.get(key)
        opts = CaptionOptions(**index.subsets[int(index.subset[row])].caption)
        caps = [process_caption(index.captions[row], opts, random.Random(_key_seed(key, k))) for k in range(3)]
        distinct_captions = max(distinct_captions, len(set(caps)))
        with torch.no_grad():
            fresh = comp.encode_text(caps)
        n_real = [len(comp.t5_tokenizer.encode(c)) + 1 for c in caps]
        for k in range(3):
            item = {n: rec[f"te{k}.{n}"] for n in ("clip", "t5", "pooled")}
            assert item["t5"].shape == (n_real[k], 64)  # trimmed: real tokens only
            got = _cached_batch(comp, [item])
            assert torch.equal(got["context"][0], fresh["context"][k].to(torch.bfloat16)), (key, k)
            assert torch.equal(got["pooled"][0], fresh["pooled"][k].to(torch.bfloat16))
    assert distinct_captions == 3  # the variants are independent draws, not copies

    # The loader picks one stored variant per sample per epoch; over epochs more than one is used.
    seen: dict[str, set[int]] = {}
    for epoch in range(6):
        for batch in make_loader(index, cfg.data, store, seed=0, epoch=epoch, rank=0, world_size=1, cached_text=True):
            key, t5 = batch["keys"][0], batch["te.t5"][0]
            rec = store.get(key)
            match = [k for k in range(3) if rec[f"te{k}.t5"].shape == t5.shape and torch.equal(rec[f"te{k}.t5"], t5)]
            assert match, key
            seen.setdefault(key, set()).add(match[0])
    assert len(seen) == len(index.keys) and max(len(v) for v in seen.values()) >= 2


def _two_class_dataset(root):
    """Two visually distinct classes: red circles on white, blue squares on black, 8 each, 64 px."""
    os.makedirs(root, exist_ok=True)
    for i in range(8):
        for name, fg, bg in (("red circle", (220, 30, 30), (255, 255, 255)), ("blue square", (30, 60, 220), (0, 0, 0))):
            im = Image.new("RGB", (64, 64), bg)
            d = ImageDraw.Draw(im)
            o = (i % 4) * 3
            (d.ellipse if "circle" in name else d.rectangle)((12 + o, 12 + o, 46 + o, 46 + o), fill=fg)
            stem = os.path.join(root, f"{name.replace(' ', '_')}_{i}")
            im.save(stem + ".png")
            with open(stem + ".txt", "w") as f:
                f.write(f"a {name}")


@pytest.mark.slow
def test_sd3_learns_two_classes_from_cached_text(tmp_path):
    """Training from cached latents and cached text alone (no previews, so train.py loads no text encoder): the
    loss falls, and sampling the export with each caption lands nearer that class's mean latent than the other's.
    As tests/test_learning.py does for SDXL. Reference: analytic - the class means come from the latent store
    (cache.py's independent encode of the images), the labels from the captions; sampler: the product's Euler
    sampler with the SD3 flow schedule on the reloaded export, CFG 4 against the empty prompt (SD3 reference).
    Unlike the SDXL test, the random tiny16 VAE needs no rescaling: with SD3's factors its latents of these images
    already have std ~0.5 (the class means lie ~13 apart)."""
    from diffusion.sampling import sample
    from data.store import LatentStore
    _two_class_dataset(tmp_path / "data")
    cache, out = tmp_path / "cache", tmp_path / "run"
    ov = [*_data_overrides(tmp_path / "data", cache), "data.resolution=64", "data.min_bucket_reso=32",
          "data.max_bucket_reso=128"]
    main_ok("cache", [CONFIG, *ov])
    log = main_ok("train", [CONFIG, *ov, *_train_overrides(out, 300, "save.save_state=false", "log.log_every_n_steps=1")],
                  out / "logs")
    assert "trained text encoders: none" in log
    losses = [r["loss"] for r in _metrics(out)]
    assert len(losses) == 300 and np.mean(losses[-60:]) < 0.6 * np.mean(losses[:60]), (losses[:5], losses[-5:])

    store = LatentStore(str(cache))
    means = {c: torch.stack([store.get(k)["latent"].float() for k in store.keys() if c in k]).mean(0)
             for c in ("red_circle", "blue_square")}
    gap = (means["red_circle"] - means["blue_square"]).norm().item()
    assert gap > 1.0, f"the classes are not distinct in latent space (mean distance {gap})"
    comp = models.load(str(out / "models" / "demo_sd3.safetensors"), t5_max_token_length=77)
    comp.mmdit.eval()
    noise = torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        neg = comp.encode_text([""])
        for c, cap in (("red_circle", "a red circle"), ("blue_square", "a blue square")):
            def rep(d):
                return {k: v.expand(4, *v.shape[1:]) for k, v in d.items()}
            lat = sample(comp.sample_schedule(), comp.network, noise, steps=20, cond=comp.conditioning(rep(comp.encode_text([cap]))),
                         uncond=comp.conditioning(rep(neg)), cfg_scale=4.0)
            other = "blue_square" if c == "red_circle" else "red_circle"
            dist = {k: (lat.mean(0) - m).norm().item() for k, m in means.items()}
            assert dist[c] < dist[other], (c, dist)
            per = {k: (lat - m).flatten(1).norm(dim=1) for k, m in means.items()}  # every sample, not only the mean
            assert bool((per[c] < per[other]).all()), (c, per)
