"""Per-encoder caption dropout for SD3: kohya's clip_l_dropout_rate / clip_g_dropout_rate / t5_dropout_rate
(library/sd3_train_utils.py add_sd3_training_arguments; applied in library/strategy_sd3.py Sd3TextEncodingStrategy:
encode_tokens zeroes a dropped encoder's outputs, drop_cached_text_encoder_outputs the same on cached ones).

What is checked: `drop_text` gives, on the encoded and on the cached layout, exactly kohya's zeroed outputs assembled
as kohya assembles them (concat_encodings); the flags are drawn per sample from (seed, epoch, position) like the
caption dropout, each encoder from its own draw, so a loader resumed mid-epoch draws what the straight one drew; a
train.py run with the rates on resumes bit for bit and trains differently from one without; SDXL refuses the
options in one line."""
from __future__ import annotations

import itertools
import os

import pytest
import torch
import torch.nn.functional as F

import models
from helpers import main_ok

CAPTIONS = ["a red circle", "a blue square, simple background", "a green triangle", "a yellow circle",
            "", "a red square", "a blue triangle, red", "green"]
FLAGS = torch.tensor(list(itertools.product([False, True], repeat=3)))  # every combination, one per sample


@pytest.fixture(scope="module")
def comp():
    return models.build("sd3", "tiny", parts=["clip_l", "clip_g", "t5"], seed=0, t5_max_token_length=77)


def kohya_reference(comp, captions, drop):
    """What kohya's encode_tokens returns for these flags, assembled by its concat_encodings: a dropped CLIP's hidden
    states and pooled output are zeros (its 768 / 1280 channels; here the tiny towers' widths), a dropped T5's
    output is zeros; lg_out = cat(l_out, g_out) padded to T5's width, then cat with t5_out on the token axis."""
    clip_ctx, t5_out, pooled, _ = comp._encode_parts(captions, "cpu")
    wl = comp.clip_l.cfg.hidden_size
    l_out, g_out = clip_ctx[..., :wl].clone(), clip_ctx[..., wl:].clone()
    l_pooled, g_pooled = pooled[:, :wl].clone(), pooled[:, wl:].clone()
    t5_out = t5_out.clone()
    for i, (dl, dg, dt) in enumerate(drop.tolist()):
        if dl:
            l_out[i], l_pooled[i] = 0, 0
        if dg:
            g_out[i], g_pooled[i] = 0, 0
        if dt:
            t5_out[i] = 0
    lg_out = F.pad(torch.cat([l_out, g_out], dim=-1), (0, comp.context_dim - clip_ctx.shape[-1]))
    return torch.cat([lg_out, t5_out], dim=-2), torch.cat([l_pooled, g_pooled], dim=-1)


def test_drop_text_is_kohyas_zeroing_on_encoded_and_cached_text(comp):
    with torch.no_grad():
        text = comp.encode_text(CAPTIONS, "cpu")
        ref_ctx, ref_pooled = kohya_reference(comp, CAPTIONS, FLAGS)
        got = comp.drop_text(text, FLAGS)
        assert torch.equal(got["context"], ref_ctx) and torch.equal(got["pooled"], ref_pooled)
        assert comp.clip_l_width == comp.clip_l.cfg.hidden_size
        # every encoder's part is non-zero where kept: the test can tell the parts apart
        wl = comp.clip_l_width
        for j, part in enumerate((got["context"][:, :77, :wl], got["context"][:, :77, wl:2 * wl],
                                  got["context"][:, 77:])):
            kept = ~FLAGS[:, j]
            assert (part[kept].flatten(1).abs().sum(1) > 0).all() and (part[~kept] == 0).all()
        # the cached layout (bf16 items, collated back): the same zeros, the same kept values (zeroing commutes
        # with the cache's rounding); components without CLIP-L loaded still know its width
        cached = comp.collate_cached_text(comp.cache_text_items(CAPTIONS, "cpu"))
        unloaded = models.build("sd3", "tiny", parts=["mmdit"], seed=0, t5_max_token_length=77)
        for c in (comp, unloaded):
            got_c = c.drop_text(cached, FLAGS)
            assert torch.equal(got_c["context"], got["context"].bfloat16())
            assert torch.equal(got_c["pooled"], got["pooled"].bfloat16())


def test_trainee_drops_the_encoded_text_as_the_cached(comp):
    """The training forward with text encoded on the fly (text=None) and with the same text given: equal
    predictions for the same flags, different from no dropout."""
    from training.trainable import Trainee

    full = models.build("sd3", "tiny", seed=0, t5_max_token_length=77, parts=["mmdit", "clip_l", "clip_g", "t5"])
    trainee = Trainee(full, train_text_encoder=False).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(len(CAPTIONS), 16, 8, 8, generator=g)
    t = torch.rand(len(CAPTIONS), generator=g) * 1000
    sizes = (None, None, None)
    with torch.no_grad():
        fly = trainee(x, t, None, CAPTIONS, sizes, FLAGS)
        given = trainee(x, t, full.encode_text(CAPTIONS, "cpu"), CAPTIONS, sizes, FLAGS)
        plain = trainee(x, t, None, CAPTIONS, sizes)
    assert torch.equal(fly, given)
    assert torch.equal(fly[0], plain[0]) and not torch.equal(fly[1:], plain[1:])  # sample 0 drops nothing


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from data.demo import make_demo_dataset
    root = tmp_path_factory.mktemp("tdrop")
    make_demo_dataset(str(root / "data"), n=8, size=(64, 64))
    return root


def drawn(shapes, rates, epochs=8, skip=0, epoch0=0):
    """{(epoch, position): flags} of the training loader (no store: images decoded), batch size 1."""
    from core.config import load_config
    from data.index import build_index
    from data.loader import make_loader
    cfg = load_config("configs/demo_sd3.toml", [f"data.image_dirs=['{shapes / 'data'}']", "data.resolution=64",
                                                  "data.batch_size=1"])
    index = build_index(cfg.data)
    out = {}
    for epoch in range(epoch0, epochs):
        loader = make_loader(index, cfg.data, None, seed=3, epoch=epoch, rank=0, world_size=1,
                             skip=skip if epoch == epoch0 else 0, text_dropout=rates)
        for i, b in enumerate(loader, skip if epoch == epoch0 else 0):
            assert b["text_drop"].shape == (1, 3) and b["text_drop"].dtype == torch.bool
            out[(epoch, i)] = tuple(b["text_drop"][0].tolist())
    return out


def test_flags_are_drawn_per_sample_from_the_seed(shapes):
    a = drawn(shapes, (0.5, 0.0, 1.0))
    assert a == drawn(shapes, (0.5, 0.0, 1.0))  # a function of (seed, epoch, position)
    l_drops = sum(f[0] for f in a.values())
    assert 16 <= l_drops <= 48  # 64 draws at rate 0.5
    assert not any(f[1] for f in a.values()) and all(f[2] for f in a.values())  # rates 0 and 1
    assert len({tuple(f[0] for k, f in a.items() if k[0] == e) for e in range(8)}) > 1  # epochs differ
    # each encoder has its own draw: another CLIP-G / T5 rate leaves CLIP-L's flags as they were
    b = drawn(shapes, (0.5, 0.3, 0.2))
    assert [f[0] for f in b.values()] == [f[0] for f in a.values()]
    assert 0 < sum(f[1] for f in b.values()) < 64
    # a loader resumed mid-epoch (skip = batches done) draws what the straight one drew
    resumed = drawn(shapes, (0.5, 0.3, 0.2), epochs=3, skip=5, epoch0=1)
    assert resumed == {k: v for k, v in b.items() if (k[0] == 1 and k[1] >= 5) or k[0] == 2}


def test_train_with_per_encoder_dropout_resumes_bit_for_bit(shapes, tmp_path):
    """train.py on the tiny SD3 preset from cached text: with the three rates at 0.5, resuming at step 2 gives the
    straight run's weights bit for bit; without them the weights differ (the dropout reaches the network)."""
    from safetensors.torch import load_file

    base = ["configs/demo_sd3.toml", f"data.image_dirs=['{shapes / 'data'}']", f"cache.cache_dir={tmp_path / 'cache'}",
            "data.resolution=64"]
    main_ok("cache", base)
    run = base + ["train.max_train_steps=4", "data.batch_size=2", "optimizer.lr_warmup_steps=0",
                  "optimizer.lr_scheduler=constant", "sample.sample_every_n_steps=0", "save.save_every_n_steps=2",
                  "save.save_last_n_states=3"]
    rates = ["model.clip_l_dropout_rate=0.5", "model.clip_g_dropout_rate=0.5", "model.t5_dropout_rate=0.5"]
    straight, resumed, plain = tmp_path / "straight", tmp_path / "resumed", tmp_path / "plain"
    main_ok("train", run + rates + [f"output_dir={straight}"])
    main_ok("train", run + rates + [f"output_dir={resumed}", f"train.resume={straight / 'state' / 'step-00000002'}"])
    main_ok("train", run + [f"output_dir={plain}"])
    a, b, c = (load_file(os.path.join(d, "models", "demo_sd3.safetensors")) for d in (straight, resumed, plain))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_sdxl_refuses_the_sd3_options(tmp_path):
    with pytest.raises(SystemExit, match=r"config error: configs/demo.toml: model.clip_l_dropout_rate / clip_g_dropout_rate / "
                                         r"t5_dropout_rate are SD3 options"):
        main_ok("train", ["configs/demo.toml", "model.t5_dropout_rate=0.1", f"output_dir={tmp_path / 'run'}"])
    assert not (tmp_path / "run").exists()  # before anything is written
