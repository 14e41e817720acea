"""Masked loss (diffusion/masks.py through the objectives' loss): an all-ones mask is the unmasked loss exactly; a
half mask changes only the masked half's gradient, as computed by hand; the latent-resolution mask is kohya's area
downsampling and commutes with the flip.

References: kohya-ss sd-scripts `library/custom_train_functions.py` apply_masked_loss (loss * area-resized mask);
OneTrainer `modules/util/loss/masked_loss.py` masked_losses (clamp(mask, unmasked_weight, 1), optional division by
the clamped mask's mean)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from core.config import LossConfig
from diffusion.masks import from_stored, latent_mask, masked_elementwise, to_stored
from diffusion.objectives import DDPMObjective, FlowObjective

B, C, H, W = 3, 4, 6, 8

CASES = {  # every objective, and the per-sample weightings stacked on top of the mask
    "eps": lambda c: DDPMObjective(c),
    "eps_min_snr_huber": lambda c: DDPMObjective(dataclasses.replace(c, min_snr_gamma=5.0, loss_type="huber")),
    "v_debiased": lambda c: DDPMObjective(dataclasses.replace(c, debiased_estimation_loss=True), v_parameterization=True),
    "flow": lambda c: FlowObjective(c),
    "flow_sigma_sqrt": lambda c: FlowObjective(dataclasses.replace(c, flow_loss_weighting="sigma_sqrt")),
    "flow_precondition": lambda c: FlowObjective(dataclasses.replace(c, flow_precondition_outputs=True,
                                                                     timestep_sampler_type="logit_normal")),
}


def _batch(obj, seed: int):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, C, H, W, generator=g)
    nb = obj.noise(x0, g)
    pred = torch.randn(B, C, H, W, generator=g)
    weight = torch.rand(B, generator=g) + 0.5
    return nb, pred, weight


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("normalize", [False, True])
def test_opaque_mask_is_the_unmasked_loss_exactly(case, normalize):
    plain = CASES[case](LossConfig())
    masked = CASES[case](LossConfig(masked_loss=True, unmasked_weight=0.3, normalize_masked_area_loss=normalize))
    for seed in range(3):
        nb, pred, weight = _batch(plain, seed)
        ones = torch.ones(B, 1, H, W)
        assert torch.equal(masked.loss(pred, nb, weight, mask=ones), plain.loss(pred, nb, weight))
        # the mask is not read without loss.masked_loss
        assert torch.equal(plain.loss(pred, nb, weight, mask=torch.zeros(B, 1, H, W)), plain.loss(pred, nb, weight))


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("unmasked_weight,normalize", [(0.0, False), (0.25, False), (0.25, True)])
def test_half_mask_changes_only_the_masked_half(case, unmasked_weight, normalize):
    """d(loss.mean()) / d(pred): the left half (mask 1) as without a mask, the right half (mask 0) times
    unmasked_weight; with normalisation both divided by the clamped mask's mean (1 + unmasked_weight) / 2."""
    plain = CASES[case](LossConfig())
    masked = CASES[case](LossConfig(masked_loss=True, unmasked_weight=unmasked_weight,
                                    normalize_masked_area_loss=normalize))
    mask = torch.zeros(B, 1, H, W)
    mask[..., : W // 2] = 1.0
    for seed in range(3):
        nb, pred, weight = _batch(plain, seed)
        p0 = pred.clone().requires_grad_(True)
        plain.loss(p0, nb, weight).mean().backward()
        p1 = pred.clone().requires_grad_(True)
        masked.loss(p1, nb, weight, mask=mask).mean().backward()
        scale = 1.0 / ((1.0 + unmasked_weight) / 2.0) if normalize else 1.0
        left, right = (slice(None), slice(None), slice(None), slice(None, W // 2)), \
            (slice(None), slice(None), slice(None), slice(W // 2, None))
        torch.testing.assert_close(p1.grad[left], p0.grad[left] * scale, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(p1.grad[right], p0.grad[right] * unmasked_weight * scale, rtol=1e-5, atol=1e-8)
        assert p0.grad[right].abs().sum() > 0  # the unmasked gradient there is not zero: the test can fail


def test_masked_elementwise_by_hand():
    loss = torch.arange(2 * 1 * 2 * 2, dtype=torch.float32).view(2, 1, 2, 2) + 1.0
    mask = torch.tensor([[[1.0, 0.0], [0.5, 0.0]], [[1.0, 1.0], [1.0, 1.0]]])  # [B, h, w]
    out = masked_elementwise(loss, mask, unmasked_weight=0.1, normalize=True)
    m0 = torch.tensor([[1.0, 0.1], [0.5, 0.1]])
    torch.testing.assert_close(out[0, 0], loss[0, 0] * m0 / m0.mean())
    assert torch.equal(out[1], loss[1])
    with pytest.raises(ValueError, match="does not match"):
        masked_elementwise(loss, torch.ones(2, 3, 3))


def test_latent_mask_is_area_downsampling_and_commutes_with_flip():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(32, 48), dtype=np.uint8)
    lat = latent_mask(pixels)
    ref = torch.nn.functional.interpolate(torch.from_numpy(pixels).float()[None, None] / 255.0, size=(4, 6),
                                          mode="area")[0, 0]  # kohya apply_masked_loss
    torch.testing.assert_close(torch.from_numpy(lat), ref)
    flipped = latent_mask(pixels[:, ::-1].copy())
    torch.testing.assert_close(from_stored(to_stored(lat), flip=True), from_stored(to_stored(flipped)), rtol=0,
                               atol=0)
    assert torch.equal(from_stored(to_stored(np.ones((4, 6)))), torch.ones(4, 6))
    with pytest.raises(ValueError, match="multiple of 8"):
        latent_mask(np.zeros((12, 16), np.uint8))


def test_pixel_mask_sources_follow_the_image_geometry(tmp_path):
    """Alpha channel, <stem>_mask.png beside, mask_dir: resized and cropped as the image (data/buckets.py), so the
    mask lines up with what is encoded; mask files are not listed as images."""
    from PIL import Image

    from data.buckets import load_resized
    from data.listing import list_images
    from data.masks import pixel_mask

    w, h = 128, 64  # resized to 128 x 64 for a 64 x 64 bucket, centre crop 32 px in from the left
    rgba = np.zeros((h, w, 4), np.uint8)
    rgba[..., :3] = 90
    rgba[:, 48:, 3] = 255  # opaque from x = 48: in the crop (x 32..96) from column 16
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    Image.fromarray(np.full((h, w, 3), 60, np.uint8)).save(tmp_path / "b.jpg")
    m = np.zeros((h, w), np.uint8)
    m[: h // 2] = 255  # the top half
    Image.fromarray(m).save(tmp_path / "b_mask.png")
    Image.fromarray(np.full((h, w, 3), 30, np.uint8)).save(tmp_path / "c.png")  # no mask at all

    _, _, crop = load_resized(str(tmp_path / "a.png"), (64, 64))
    assert crop == (0, 32)
    pm = pixel_mask(str(tmp_path / "a.png"), (64, 64), crop)
    assert pm.shape == (64, 64) and (pm[:, :16] == 0).all() and (pm[:, 16:] == 255).all()
    lat = latent_mask(pm)
    assert (lat[:, :2] == 0).all() and (lat[:, 2:] == 1).all()
    pb = pixel_mask(str(tmp_path / "b.jpg"), (64, 64), crop)
    assert (pb[:32] == 255).all() and (pb[32:] == 0).all()
    assert pixel_mask(str(tmp_path / "c.png"), (64, 64), crop) is None
    other = tmp_path / "masks"
    other.mkdir()
    Image.fromarray(255 - m).save(other / "b.png")
    assert (pixel_mask(str(tmp_path / "b.jpg"), (64, 64), crop, str(other))[:32] == 0).all()  # mask_dir wins
    assert [p.rsplit("/", 1)[1] for p, _, _ in list_images([str(tmp_path)], False)] == ["a.png", "b.jpg", "c.png"]
    # and through the dataset index (the folder reader also lists .npz latent caches: the mask rule must hold there)
    from data.index import build_index
    from core.config import DataConfig
    index = build_index(DataConfig(image_dirs=[str(tmp_path)], resolution=64, min_bucket_reso=64, max_bucket_reso=64,
                                   allow_empty_captions=True))
    assert sorted(index.keys.tolist()) == ["a", "b", "c"]


def test_rgba_masks_cached_once_travel_through_the_store_and_the_flip(tmp_path):
    """cache.py stores an RGBA image's mask with its latents; the training loader hands it out mirrored with the
    flipped latent, and a 2-step masked run trains from it (train.py, the tiny SDXL preset)."""
    from PIL import Image

    from core.config import load_config
    from data.index import load_or_build_index
    from data.loader import make_loader
    from data.store import LatentStore
    from helpers import main_ok

    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        px = np.zeros((64, 64, 4), np.uint8)
        px[..., :3] = rng.integers(0, 255, 3)
        px[:, : 16 + 8 * i, 3] = 255  # opaque on the left, a different width per image
        Image.fromarray(px, "RGBA").save(data / f"im{i}.png")
        (data / f"im{i}.txt").write_text(f"shape {i}")
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(data / "plain.png")  # no mask: trains everywhere
    (data / "plain.txt").write_text("plain")
    argv = ["configs/demo.toml", f"data.image_dirs=['{data}']", f"cache.cache_dir={tmp_path / 'cache'}",
            "data.flip_aug=true", "data.resolution=64", "data.min_bucket_reso=64", "data.max_bucket_reso=64"]
    main_ok("cache", argv)
    cfg = load_config(argv[0], argv[1:])
    store = LatentStore(str(tmp_path / "cache"))
    index = load_or_build_index(cfg.data, str(tmp_path / "cache"), is_main=False)
    stored = {k: store.get(k, ["mask"])["mask"] for k in index.keys.tolist() if "mask" in store.record_info(k)["t"]}
    assert sorted(k.rsplit("/", 1)[-1] for k in stored) == [f"im{i}" for i in range(4)]
    for k, m in stored.items():
        i = int(k[-1])
        assert m.dtype == torch.float16 and m.shape == (8, 8)
        expect = np.zeros((8, 8), np.float32)
        expect[:, : (16 + 8 * i) // 8] = 1.0
        assert torch.equal(m.float(), torch.from_numpy(expect))

    flips = {True: 0, False: 0}
    for epoch in range(4):
        loader = make_loader(index, dataclasses.replace(cfg.data, batch_size=1), store, seed=0, epoch=epoch, rank=0,
                             world_size=1, with_masks=True)
        for b in loader:
            key = b["keys"][0]
            if key not in stored:
                assert "mask" not in b
                continue
            m = b["mask"][0, 0]
            flipped = not torch.equal(m, stored[key].float())
            assert torch.equal(m, torch.flip(stored[key].float(), dims=[-1]) if flipped else stored[key].float())
            flips[flipped] += 1
    assert flips[True] and flips[False]  # both orientations were drawn
    main_ok("train", argv + [f"output_dir={tmp_path / 'run'}", "train.max_train_steps=2", "loss.masked_loss=true",
                             "sample.sample_every_n_steps=0", "save.save_every_n_steps=0", "data.batch_size=2",
                             "optimizer.lr_warmup_steps=0", "optimizer.lr_scheduler=constant"])


def test_kohya_npz_alpha_mask_is_the_records_loss_mask(tmp_path):
    """cache.py --import-npz on kohya caches made with --alpha_mask (strategy_base.save_latents_to_disk: `alpha_mask`
    [H, W] in 0..1 at the bucket's size, beside `latents` / `latents_flipped`): the record's loss mask is the one
    kohya's apply_masked_loss multiplies by (interpolate(mode="area") to the latent grid), stored as cache.py stores
    an alpha channel's, and the training loader hands it out with loss.masked_loss, mirrored for the flipped
    latent. An npz without alpha_mask (or an all-ones one: an image without alpha) trains unmasked."""
    from PIL import Image

    from core.config import load_config
    from data.index import load_or_build_index
    from data.loader import make_loader
    from data.store import LatentStore
    from helpers import main_ok

    data, npz = tmp_path / "data", tmp_path / "kohya"
    data.mkdir()
    npz.mkdir()
    rng = np.random.default_rng(0)
    alphas = {"a": (rng.integers(0, 256, (64, 64)) / 255.0).astype(np.float32), "b": None,
              "c": np.ones((64, 64), np.float32)}
    for stem, alpha in alphas.items():
        Image.fromarray(np.full((64, 64, 3), 100, np.uint8)).save(data / f"{stem}.png")
        (data / f"{stem}.txt").write_text(stem)
        arrays = {"latents": rng.standard_normal((4, 8, 8)).astype(np.float32), "original_size": np.array([64, 64]),
                  "crop_ltrb": np.array([0, 0, 64, 64]),
                  "latents_flipped": rng.standard_normal((4, 8, 8)).astype(np.float32)}
        if alpha is not None:
            arrays["alpha_mask"] = alpha
        np.savez(npz / f"{stem}.npz", **arrays)
    argv = ["configs/demo.toml", f"data.image_dirs=['{data}']", f"cache.cache_dir={tmp_path / 'cache'}",
            "data.flip_aug=true", "data.resolution=64", "data.min_bucket_reso=64", "data.max_bucket_reso=64",
            "cache.cache_text_encoder_outputs=false"]
    main_ok("cache", argv + ["--import-npz", str(npz)])
    cfg = load_config(argv[0], argv[1:])
    store = LatentStore(str(tmp_path / "cache"))
    assert all("imp" in store.record_info(k) for k in alphas)  # imported, not encoded
    want = torch.nn.functional.interpolate(torch.from_numpy(alphas["a"])[None, None], size=(8, 8), mode="area")[0, 0]
    assert torch.equal(store.get("a", ["mask"])["mask"], want.half())
    assert "mask" not in store.record_info("b")["t"] and "mask" not in store.record_info("c")["t"]
    index = load_or_build_index(cfg.data, str(tmp_path / "cache"), is_main=False)
    seen = set()
    for epoch in range(6):
        for b in make_loader(index, dataclasses.replace(cfg.data, batch_size=1), store, seed=0, epoch=epoch, rank=0,
                             world_size=1, with_masks=True):
            if b["keys"][0] != "a":
                assert "mask" not in b
                continue
            m = b["mask"][0, 0]
            flipped = not torch.equal(m, want.half().float())
            assert torch.equal(m, torch.flip(want.half().float(), dims=[-1]) if flipped else want.half().float())
            seen.add(flipped)
    assert seen == {True, False}


def test_a_mask_file_added_changed_or_removed_after_caching_makes_the_record_stale(tmp_path, capsys):
    """The store keeps each image's mask with its latents, so a mask file is part of the record's source
    (data/masks.py record_source): cache.py re-encodes exactly the image whose mask came, changed or went, and the
    record then holds the new mask (was: 'already valid', trained with the old mask or none)."""
    import os
    import re

    from PIL import Image

    from data.store import LatentStore
    from helpers import main_ok

    data = tmp_path / "data"
    data.mkdir()
    for stem in ("a", "b", "c"):
        Image.fromarray(np.full((64, 64, 3), 100, np.uint8)).save(data / f"{stem}.png")
        (data / f"{stem}.txt").write_text(stem)
    argv = ["configs/demo.toml", f"data.image_dirs=['{data}']", f"cache.cache_dir={tmp_path / 'cache'}",
            "data.resolution=64", "data.min_bucket_reso=64", "data.max_bucket_reso=64",
            "cache.cache_text_encoder_outputs=false"]

    def cache(*extra):
        capsys.readouterr()
        main_ok("cache", argv + list(extra))
        encoded, valid = re.search(r"cache: encoded (\d+), already valid (\d+)", capsys.readouterr().out).groups()
        store = LatentStore(str(tmp_path / "cache"))
        masks = {k: store.get(k, ["mask"])["mask"].float() for k in ("a", "b", "c") if "mask" in store.record_info(k)["t"]}
        return int(encoded), int(valid), masks

    def write_mask(path, top_rows):
        m = np.zeros((64, 64), np.uint8)
        m[:top_rows] = 255
        Image.fromarray(m).save(path)
        st = os.stat(path)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a later mtime even on a coarse clock

    def rows_on(top_rows):
        want = torch.zeros(8, 8)
        want[: top_rows // 8] = 1.0
        return want

    assert cache() == (3, 0, {})
    write_mask(data / "b_mask.png", 16)
    encoded, valid, masks = cache()
    assert (encoded, valid) == (1, 2) and masks.keys() == {"b"} and torch.equal(masks["b"], rows_on(16))
    assert cache()[:2] == (0, 3)  # the fingerprint is stable: nothing twice
    write_mask(data / "b_mask.png", 40)
    encoded, valid, masks = cache()
    assert (encoded, valid) == (1, 2) and torch.equal(masks["b"], rows_on(40))
    os.remove(data / "b_mask.png")
    assert cache() == (1, 2, {})
    other = tmp_path / "masks"
    other.mkdir()
    write_mask(other / "c.png", 24)  # data.mask_dir: the same rule
    encoded, valid, masks = cache(f"data.mask_dir={other}")
    assert (encoded, valid) == (1, 2) and masks.keys() == {"c"} and torch.equal(masks["c"], rows_on(24))


def test_mask_files_from_listings_are_mask_file(tmp_path):
    """MaskFiles (one listing per folder, for the fingerprints of a whole dataset) finds what mask_file finds."""
    from data.masks import MaskFiles, mask_file

    (tmp_path / "m").mkdir()
    names = ["a.png", "a_mask.png", "b.jpg", "b-masklabel.png", "c.webp", "c_mask.png", "c-masklabel.png", "d.png",
             "e_mask.png.png", "f.png", "F_mask.png"]
    for n in names:
        (tmp_path / n).write_bytes(b"x")
    (tmp_path / "m" / "d.png").write_bytes(b"x")
    (tmp_path / "m" / "a.png").write_bytes(b"x")
    images = [str(tmp_path / n) for n in ("a.png", "b.jpg", "c.webp", "d.png", "e.png", "f.png")]
    images.append(str(tmp_path / "gone" / "g.png"))
    for mask_dir in ("", str(tmp_path / "m")):
        found = MaskFiles(mask_dir)
        assert [found.find(p) for p in images] == [mask_file(p, mask_dir) for p in images]
    assert [MaskFiles().find(p) is not None for p in images] == [True, True, True, False, False, False, False]
