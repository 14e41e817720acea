"""Issue #25 (data): where we read a tool's data differently from the tool itself, case by case. Each fixture is
written the way the tool writes it, and each expected value comes from the tool's rule, cited by file and function
(kohya-ss/sd-scripts main 2026-02, euge-trainer main `modules/sdxl_dataset_utils.py`, HCP-Diffusion
`hcpdiff/data/`). Where we deliberately differ, docs/data-differences.md says so."""

import json
import os
import random
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from test_data_sources import data_cfg, img  # noqa: E402

from data.index import build_index  # noqa: E402


def rows(ix):
    return {ix.keys[i]: i for i in range(len(ix))}


def kohya_finetune_caption(md: dict, sep: str = ",") -> str:
    """kohya's caption of a metadata entry, written out from library/train_util.py: FineTuningDataset.__init__
    (enable_wildcard off: `caption + subset.caption_separator + tags` when tags are non-empty, tags alone without a
    caption) then BaseDataset.process_caption (no wildcard: `caption.split("\\n")[0]`)."""
    caption, tags = md.get("caption"), md.get("tags")
    if caption is None:
        caption = ""
    if tags is not None and len(tags) > 0:
        if len(caption) > 0:
            caption = caption + sep
        caption = caption + tags
    return caption.split("\n")[0]


# ---- 1. kohya JSONL metadata: caption + caption_separator + tags ------------------------------------------------

def test_kohya_jsonl_caption_joins_tags(tmp_path):
    """kohya's JSONL metadata (train_util.FineTuningDataset, the `.jsonl` branch: one {"image_path", "caption",
    "image_size", "tags"} per line; the wd14 tagger's --output_path *.jsonl writes the first three) takes the same
    caption rule as its JSON: caption + separator + tags (we used caption, and tags only without one)."""
    d = tmp_path / "img"
    lines = []
    for i, (cap, tags) in enumerate([("a cat", "cat, solo"), ("", "dog"), ("only caption", None), ("x", ""),
                                     ("two\nlines", "t1, t2")]):
        img(d / f"{i}.png", (64, 48))
        rec = {"image_path": str(d / f"{i}.png"), "caption": cap, "image_size": [64, 48]}
        if tags is not None:
            rec["tags"] = tags
        lines.append(json.dumps(rec))
    (tmp_path / "meta.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    ix = build_index(data_cfg(metadata_files=[str(tmp_path / "meta.jsonl")]))
    recs = [json.loads(x) for x in lines]
    got = {ix.keys[i]: ix.captions[i] for i in range(len(ix))}
    assert got == {str(i): kohya_finetune_caption(r) for i, r in enumerate(recs)}
    assert got["0"] == "a cat,cat, solo" and got["4"] == "two"  # the rule, spelled out


# ---- 2. kohya multi-line captions: the first line ---------------------------------------------------------------

def test_kohya_metadata_multiline_caption_trains_first_line(tmp_path):
    """finetune/merge_captions_to_metadata.py stores the whole caption file (`read_text().strip()`), newlines and
    all, and merge_dd_tags_to_metadata.py adds `tags`; kohya then trains on the first line of caption + separator +
    tags (process_caption, wildcards off)."""
    d = tmp_path / "train"
    caps = {"a": "first line\nsecond line", "b": "one line", "c": "l1\r\nl2"}
    meta = {}
    for k, text in caps.items():
        img(d / f"{k}.png", (64, 64))
        (d / f"{k}.caption").write_text(text + "\n", encoding="utf-8")
        meta[k] = {"caption": (d / f"{k}.caption").read_text(encoding="utf-8").strip()}  # merge_captions_to_metadata
    meta["b"]["tags"] = "tag1, tag2"                                                    # merge_dd_tags_to_metadata
    (tmp_path / "meta_cap.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    ix = build_index(data_cfg(metadata_files=[str(tmp_path / "meta_cap.json")], image_dirs=[str(d)]))
    got = {ix.keys[i]: ix.captions[i] for i in range(len(ix))}
    assert got == {k: kohya_finetune_caption(v) for k, v in meta.items()}
    assert got["a"] == "first line" and got["c"] == "l1"  # read_text reads "\r\n" as "\n"


# ---- 3. kohya npz: the flipped crop ------------------------------------------------------------------------------

def kohya_crop_ltrb(bucket_reso, image_size):
    """library/train_util.py BucketManager.get_crop_ltrb, written out (floats, as kohya stores them)."""
    bucket_ar = bucket_reso[0] / bucket_reso[1]
    image_ar = image_size[0] / image_size[1]
    if bucket_ar > image_ar:
        resized_width, resized_height = bucket_reso[1] * image_ar, bucket_reso[1]
    else:
        resized_width, resized_height = bucket_reso[0], bucket_reso[0] / image_ar
    crop_left = (bucket_reso[0] - resized_width) // 2
    crop_top = (bucket_reso[1] - resized_height) // 2
    return crop_left, crop_top, crop_left + resized_width, crop_top + resized_height


def kohya_save_npz(path, latents, original_size, crop_ltrb, flipped=None, alpha_mask=None, suffix=""):
    """strategy_base.LatentsCachingStrategy.save_latents_to_disk: latents / original_size / crop_ltrb (+ flipped,
    alpha_mask), each key with the multi-resolution suffix, np.savez."""
    kw = {"latents" + suffix: latents.astype(np.float32), "original_size" + suffix: np.array(original_size),
          "crop_ltrb" + suffix: np.array(crop_ltrb)}
    if flipped is not None:
        kw["latents_flipped" + suffix] = flipped.astype(np.float32)
    if alpha_mask is not None:
        kw["alpha_mask" + suffix] = alpha_mask.astype(np.float32)
    np.savez(path, **kw)


@pytest.mark.parametrize("size, bucket", [((199, 200), (192, 192)), ((300, 217), (256, 192)), ((1000, 333), (320, 128)),
                                          ((120, 250), (128, 256))])
def test_npz_flipped_crop_is_kohyas(tmp_path, size, bucket):
    """The flipped crop kohya conditions on (train_util.BaseDataset.__getitem__): `target_size[0] - crop_ltrb[2]`
    on the stored floats, then int(); we took int(right) first (1 px off where right is fractional)."""
    from data.npz_import import read_npz

    bw, bh = bucket
    lat = np.zeros((4, bh // 8, bw // 8), np.float32)
    ltrb = kohya_crop_ltrb(bucket, size)
    kohya_save_npz(tmp_path / "x.npz", lat, size, ltrb, flipped=lat)
    _, original, crop, crop_flip = read_npz({"main": str(tmp_path / "x.npz")}, bucket, size, 4)
    assert original == (size[1], size[0])
    assert crop == (int(ltrb[1]), int(ltrb[0]))
    assert crop_flip == (int(ltrb[1]), int(bw - ltrb[2]))


# ---- 9. shuffle_caption with prefix / suffix ---------------------------------------------------------------------

def kohya_process_caption(caption, o, rnd):
    """library/train_util.py BaseDataset.process_caption (wildcards, token warm-up, secondary separator and
    textual-inversion replacements off), written out; `rnd` stands for the `random` module it calls."""
    if o["caption_prefix"]:
        caption = o["caption_prefix"] + " " + caption
    if o["caption_suffix"]:
        caption = caption + " " + o["caption_suffix"]
    if o["caption_dropout_rate"] > 0 and rnd.random() < o["caption_dropout_rate"]:
        return ""
    caption = caption.split("\n")[0]
    if o["shuffle_caption"] or o["caption_tag_dropout_rate"] > 0:
        sep, ks = o["caption_separator"], o["keep_tokens_separator"]
        fixed_tokens, flex_tokens, fixed_suffix_tokens = [], [], []
        if ks and ks in caption:
            fixed_part, flex_part = caption.split(ks, 1)
            if ks in flex_part:
                flex_part, fixed_suffix_part = flex_part.split(ks, 1)
                fixed_suffix_tokens = [t.strip() for t in fixed_suffix_part.split(sep) if t.strip()]
            fixed_tokens = [t.strip() for t in fixed_part.split(sep) if t.strip()]
            flex_tokens = [t.strip() for t in flex_part.split(sep) if t.strip()]
        else:
            tokens = [t.strip() for t in caption.strip().split(sep)]
            flex_tokens = tokens[:]
            if o["keep_tokens"] > 0:
                fixed_tokens = flex_tokens[: o["keep_tokens"]]
                flex_tokens = tokens[o["keep_tokens"]:]
        if o["shuffle_caption"]:
            rnd.shuffle(flex_tokens)
        if o["caption_tag_dropout_rate"] > 0:
            flex_tokens = [t for t in flex_tokens if rnd.random() >= o["caption_tag_dropout_rate"]]
        caption = ", ".join(fixed_tokens + flex_tokens + fixed_suffix_tokens)
    return caption


@pytest.mark.parametrize("opts", [
    dict(shuffle_caption=True, caption_prefix="masterpiece", caption_suffix="by bob"),
    dict(shuffle_caption=True, caption_prefix="pre", caption_suffix="suf", keep_tokens=1),
    dict(shuffle_caption=True, caption_prefix="pre", keep_tokens_separator="|||"),
    dict(shuffle_caption=True, caption_suffix="suf", caption_tag_dropout_rate=0.3, caption_dropout_rate=0.2),
    dict(caption_tag_dropout_rate=0.5, caption_prefix="p", caption_suffix="s", keep_tokens=2),
])
def test_shuffle_caption_moves_prefix_and_suffix_as_kohya(opts):
    """kohya glues caption_prefix / caption_suffix on before the tags are split and shuffled, so they travel with the
    first / last tag (keep_tokens keeps the prefix's tag in place); we added them after shuffling. Same draws,
    same captions, over many seeds."""
    from data.captions import process_caption
    from data.spec import CaptionOptions

    o = {f: getattr(CaptionOptions(), f) for f in CaptionOptions.__dataclass_fields__} | opts
    caps = ["1girl, solo, red hair, smile, outdoors", "a,,b, c", "fixed1, fixed2 ||| f1, f2, f3 ||| end1, end2",
            "single"]
    for seed in range(40):
        for c in caps:
            # (ours strips the ends, which the tokenizers ignore: kohya leaves "a, b, " after an empty last tag)
            assert process_caption(c, CaptionOptions(**o), random.Random(seed)) == \
                kohya_process_caption(c, o, random.Random(seed)).strip(), (seed, c)


# ---- 4. kohya DreamBooth: an empty caption file, and the .caption default ------------------------------------------

def test_dreambooth_empty_caption_file_and_caption_default(tmp_path):
    """kohya DreamBoothDataset.read_caption: a caption file whose first line is empty gives '' (lines[0].strip());
    only an image with no caption file trains on the class tokens. With caption_extension unset kohya reads `.caption`
    (train_util / config_util default), also where `.txt` files sit beside them. Through the real loader."""
    from data.loader import make_loader

    d = tmp_path / "train" / "1_sks dog"
    for k in ("a", "b", "c", "d"):
        img(d / f"{k}.png", (64, 64))
    (d / "a.caption").write_text("\n")                 # only a newline: kohya -> ''
    (d / "b.caption").write_text("a dog\nmore\n")      # first line
    (d / "b.txt").write_text("from the txt file")     # kohya ignores .txt unless caption_extension says so
    (d / "c.txt").write_text("only a txt")            # no .caption: class tokens (and a warning about .txt)
    cfg = data_cfg(train_data_dir=str(tmp_path / "train"), batch_size=1, jpeg_draft=False)
    ix = build_index(cfg)
    seen = {b["keys"][0]: b["captions"][0] for b in make_loader(ix, cfg, None, seed=0, epoch=0, rank=0, world_size=1)}
    assert seen == {"1_sks dog/a": "", "1_sks dog/b": "a dog", "1_sks dog/c": "sks dog", "1_sks dog/d": "sks dog"}
    assert ix.subsets[0].caption_extension == ".caption"
    ix2 = build_index(data_cfg(train_data_dir=str(tmp_path / "train"), caption_extension=".txt"))
    assert {ix2.keys[i]: ix2.captions[i] for i in range(len(ix2))}["1_sks dog/b"] == "from the txt file"


# ---- 5. euge-trainer image_dirs are read recursively ------------------------------------------------------------

def test_images_in_subfolders_are_counted_in_a_warning(tmp_path, caplog):
    """euge-trainer lists image_dirs recursively (modules/sdxl_dataset_utils.py Dataset.__init__: listdir(img_dir,
    recur=True)); without data.recursive we read the top folder only, and now say how many images that leaves out
    and which option takes them (3 of 6 in this layout). With recursive = true all 6 are read, as euge does."""
    d = tmp_path / "dataset"
    for p in ("a.png", "b.png", "c.png", "artist1/d.png", "artist1/e.png", "artist2/x/f.png"):
        img(d / p)
        (d / p).with_suffix(".txt").write_text("tag")
    with caplog.at_level("WARNING"):
        ix = build_index(data_cfg(image_dirs=[str(d)]))
    assert len(ix) == 3
    msg = [r.getMessage() for r in caplog.records if "subfolders" in r.getMessage()]
    assert len(msg) == 1 and "3 images in subfolders are not used" in msg[0] and "data.recursive = true" in msg[0]
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert len(build_index(data_cfg(image_dirs=[str(d)], recursive=True))) == 6
    assert not [r for r in caplog.records if "subfolders" in r.getMessage()]


# ---- 6. euge-trainer original_size: conditioning, not bucketing -------------------------------------------------

def test_metadata_original_size_conditions_and_the_image_buckets(tmp_path):
    """euge-trainer (sdxl_dataset_utils.Dataset): the bucket comes from the image's own size (`get_image_size`), and
    `original_size` from the metadata is what the model is told (`orig_size = img_info.original_size or
    img_info.image_size`, sent as (h, w)). We bucketed a 96x64 image by original_size [2048, 2048] (128x128, a 32 px
    crop) and told the model (64, 96). Checked through the loader from images and from a latent store."""
    import torch

    from data.buckets import BucketSettings, assign_buckets, crop_params
    from data.loader import make_loader
    from data.store import LatentStore, Record, ShardWriter

    d = tmp_path / "img"
    img(d / "wide.png", (96, 64)); img(d / "plain.png", (64, 64))
    meta = {"wide": {"image_path": str(d / "wide.png"), "caption": "wide", "original_size": [2048, 2048]},
            "plain": {"image_path": str(d / "plain.png"), "caption": "plain"}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    cfg = data_cfg(metadata_files=[str(tmp_path / "meta.json")], batch_size=1, jpeg_draft=False)
    ix = build_index(cfg)
    r = rows(ix)
    want_bucket = assign_buckets(np.array([[96, 64]]), BucketSettings.from_data_cfg(cfg))[0]
    assert ix.sizes[r["wide"]].tolist() == [96, 64] and ix.buckets[r["wide"]].tolist() == want_bucket.tolist()
    got = {b["keys"][0]: (tuple(b["original_size"][0].tolist()), tuple(b["crop_top_left"][0].tolist()))
           for b in make_loader(ix, cfg, None, seed=0, epoch=0, rank=0, world_size=1)}
    assert got["wide"] == ((2048, 2048), crop_params((96, 64), tuple(want_bucket), False)[1])
    assert got["plain"][0] == (64, 64)
    # From a store whose records say the decoded size: the metadata's original_size still conditions.
    w = ShardWriter(str(tmp_path / "store"), "cfg")
    for k in ("wide", "plain"):
        bw, bh = (int(v) for v in ix.buckets[r[k]])
        w.add(Record(k, "", (bw, bh), (int(ix.sizes[r[k]][1]), int(ix.sizes[r[k]][0])), (0, 0),
                     {"latent": torch.zeros(4, bh // 8, bw // 8)}))
    w.close()
    store = LatentStore(str(tmp_path / "store"))
    got = {b["keys"][0]: tuple(b["original_size"][0].tolist())
           for b in make_loader(ix, cfg, store, seed=0, epoch=0, rank=0, world_size=1)}
    assert got == {"wide": (2048, 2048), "plain": (64, 64)}


# ---- 10. kohya npz alpha_mask: kept with the record ---------------------------------------------------------------

def test_npz_alpha_mask_is_imported_with_the_record(tmp_path):
    """kohya caches `alpha_mask` ([H, W] at the bucket's pixel size, 0..1: train_util.load_images_and_masks_for_caching,
    saved by strategy_base.save_latents_to_disk) with --alpha_mask. The import keeps it as the record's loss `mask`,
    reduced to the latent grid exactly as kohya's masked loss reduces it (custom_train_functions.apply_masked_loss:
    F.interpolate(mode="area")); it was dropped. Latents are scaled, the mask is not."""
    import torch

    from data.npz_import import import_npz
    from models.vae import PRESETS

    d = tmp_path / "img"
    img(d / "a.png", (64, 48)); img(d / "b.png", (64, 48))
    cfg = data_cfg(image_dirs=[str(d)], allow_empty_captions=True)
    ix = build_index(cfg)
    bw, bh = (int(v) for v in ix.buckets[0])
    rng = np.random.default_rng(0)
    alpha = (rng.integers(0, 256, (bh, bw)) / 255.0).astype(np.float32)  # an 8-bit alpha channel / 255, as kohya
    lat = rng.standard_normal((4, bh // 8, bw // 8)).astype(np.float32)
    kohya_save_npz(d / "a.npz", lat, (64, 48), kohya_crop_ltrb((bw, bh), (64, 48)), alpha_mask=alpha)
    kohya_save_npz(d / "b.npz", lat, (64, 48), kohya_crop_ltrb((bw, bh), (64, 48)))  # cached without the option
    got = []

    class Writer:
        put = got.append

    vae = PRESETS["tiny"]
    res = import_npz(ix, str(d), Writer(), vae, torch.float32)
    assert res["imported"] == 2 and res["alpha_masks"] == 1
    rec = {r.key: r for r in got}
    want = torch.nn.functional.interpolate(torch.from_numpy(alpha)[None, None], size=lat.shape[1:], mode="area")[0, 0]
    # the record's loss mask, stored as cache.py stores one (float16: tests/test_masked_loss.py trains with it)
    assert torch.equal(rec["a"].tensors["mask"], want.half()) and rec["a"].tensors["mask"].dtype == torch.float16
    assert torch.allclose(rec["a"].tensors["latent"], (torch.from_numpy(lat) - vae.shift_factor) * vae.scaling_factor)
    assert "mask" not in rec["b"].tensors


# ---- 7. HCP-Diffusion captions -------------------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["json", "yaml", "txt_folder", "json_in_folder"])
def test_hcp_captions_every_image_trains(tmp_path, form):
    """HCP-Diffusion (hcpdiff/data/caption_loader.py auto_caption_loader, source/text2img.py Text2ImageSource): the
    images are img_root's; captions come from a JSON or YAML {name: caption} file, or a caption folder (its first
    .json, else .yaml, else one .txt per image named by the file name up to its first dot), possibly outside
    img_root. An image the captions do not name trains on '' (the template's {caption} filled with ''). YAML and
    caption folders were refused, and images missing from the captions dropped."""
    import yaml

    d = tmp_path / "img_root"
    for n in ("1.png", "2.jpg", "3.png", "4.webp"):
        img(d / n)
    caps = {"1": "caption one", "2.jpg": "caption two", "3": "caption three", "gone": "no such image"}
    cap_dir = tmp_path / "captions"  # outside img_root, as HCP allows
    cap_dir.mkdir()
    if form == "json":
        src = tmp_path / "image_captions.json"
        src.write_text(json.dumps(caps))
    elif form == "yaml":
        src = tmp_path / "image_captions.yaml"
        src.write_text(yaml.safe_dump(caps))
    elif form == "json_in_folder":
        src = cap_dir
        (cap_dir / "captions.json").write_text(json.dumps(caps))
    else:
        src = cap_dir
        for k, v in caps.items():
            (cap_dir / (k.split(".")[0] + ".txt")).write_text(v + "\n")
    ix = build_index(data_cfg(metadata_files=[str(src)], image_dirs=[str(d)], allow_empty_captions=True))
    got = {ix.keys[i]: ix.captions[i] for i in range(len(ix))}
    assert got == {"1": "caption one", "2": "caption two", "3": "caption three", "4": ""}
    assert ix.paths[rows(ix)["4"]] == str(d / "4.webp")


# ---- 8. euge-trainer layouts b and d: .npz latents in place of images ---------------------------------------------

def euge_save_latents(path, latents, original_size, crop_ltrb=(0, 0, 0, 0), flipped=None):
    """euge-trainer sdxl_dataset_utils.save_latents_to_disk: latents, original_size (w, h), crop_ltrb
    (+ latents_flipped), np.savez, <image stem>.npz."""
    kw = dict(latents=latents, original_size=np.array(original_size), crop_ltrb=np.array(crop_ltrb))
    if flipped is not None:
        kw["latents_flipped"] = flipped
    np.savez(path, **kw)


def euge_latent_dir(root, n=3, caption_files=True):
    """euge-trainer README layout b: latent_dir/imageN.npz (+ imageN.txt), no images. Latents of 2 sizes."""
    rng = np.random.default_rng(1)
    lat = {}
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        h, w = (6, 8) if i % 2 else (8, 8)
        lat[f"image{i}"] = rng.standard_normal((4, h, w)).astype(np.float32)
        euge_save_latents(root / f"image{i}.npz", lat[f"image{i}"], (w * 8 * 4, h * 8 * 4),
                          flipped=-lat[f"image{i}"])
        if caption_files:
            (root / f"image{i}.txt").write_text(f"caption {i}")
    return lat


@pytest.mark.parametrize("layout", ["b_txt", "d_metadata"])
def test_euge_npz_layouts_index_as_latents(tmp_path, layout):
    """euge-trainer's README layouts b (latents + same-name .txt) and d (latents + a metadata.json whose image_path
    no longer exists): Dataset.search_data takes `<stem>.npz` from image_dirs (stem2files, recursive), and
    load_data sizes the entry from the latents (`image_size = latents_size * 8`, `bucket_reso = image_size`). They
    stopped with "no usable images". Rows point at the .npz, captions come from the .txt / the metadata, the bucket
    is the latents' size, and the records import from them."""
    import torch

    from data.npz_import import import_latent_rows
    from models.vae import PRESETS

    d = tmp_path / "latent_dir"
    lat = euge_latent_dir(d, caption_files=layout == "b_txt")
    if layout == "b_txt":
        cfg = data_cfg(image_dirs=[str(d)])
    else:
        meta = {k: {"image_path": f"/gone/{k}.jpg", "caption": f"meta {k}"} for k in lat}
        (tmp_path / "metadata.json").write_text(json.dumps(meta))
        cfg = data_cfg(metadata_files=[str(tmp_path / "metadata.json")], image_dirs=[str(d)])
    ix = build_index(cfg)
    r = rows(ix)
    assert set(r) == set(lat)
    for k, a in lat.items():
        i = r[k]
        assert ix.paths[i] == str(d / f"{k}.npz")
        assert ix.captions[i] == (f"caption {k[-1]}" if layout == "b_txt" else f"meta {k}")
        assert ix.sizes[i].tolist() == [a.shape[2] * 8, a.shape[1] * 8] == ix.buckets[i].tolist()
    got = []

    class Writer:
        put = got.append

    vae = PRESETS["tiny"]
    res = import_latent_rows(ix, list(range(len(ix))), Writer(), vae, torch.float32)
    assert res["imported"] == 3 and not res["rejected"]
    for rec in got:
        want = (torch.from_numpy(lat[rec.key]) - vae.shift_factor) * vae.scaling_factor
        assert torch.allclose(rec.tensors["latent"], want) and torch.allclose(rec.tensors["flip.latent"], -want)
        assert rec.original_size == (lat[rec.key].shape[1] * 32, lat[rec.key].shape[2] * 32)  # (h, w) from the npz


def test_npz_beside_images_stays_a_cache_and_training_without_a_store_says_what_to_do(tmp_path, caplog):
    """A kohya cache beside its image is not an entry of its own (the image is: --import-npz brings the cache);
    a latents-only entry without a latent store is left out with the line that says how to train it."""
    from data.loader import usable_rows

    d = tmp_path / "mixed"
    img(d / "photo.png", (64, 64))
    np.savez(d / "photo.npz", latents=np.zeros((4, 8, 8), np.float32))
    euge_latent_dir(d, n=1)
    ix = build_index(data_cfg(image_dirs=[str(d)]))
    assert sorted(ix.keys.tolist()) == ["image0", "photo"] and ix.paths[rows(ix)["photo"]] == str(d / "photo.png")
    with caplog.at_level("WARNING"):
        kept = usable_rows(ix, None)
    assert [ix.keys[int(i)] for i in kept] == ["photo"]
    assert any("1 of 2 training entries are .npz latent caches" in m and "run cache.py" in m for m in caplog.messages)


def test_euge_latent_folder_trains_through_cache_and_train(tmp_path, capsys):
    """Layout b as a user runs it: `cache.py cfg` imports the caches (the index rows are the caches; each rank
    imports its stripe instead of decoding), a second run finds them current, then `train.py cfg` trains from the
    store. No image exists."""
    import cache
    import train
    from data.store import LatentStore

    d = tmp_path / "latent_dir"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):  # the demo VAE: 4 channels; 64x64 and 96x64 buckets (multiples of bucket_reso_step 32)
        h, w = (8, 12) if i % 2 else (8, 8)
        euge_save_latents(d / f"image{i}.npz", rng.standard_normal((4, h, w)).astype(np.float32), (w * 8, h * 8))
        (d / f"image{i}.txt").write_text(f"a red shape {i}")
    common = ["configs/demo.toml", f"data.image_dirs=['{d}']", f"cache.cache_dir={tmp_path / 'store'}",
              "data.resolution=64", "data.min_bucket_reso=32", "data.max_bucket_reso=128", "data.batch_size=2"]
    assert cache.main(common) == 0
    assert "already valid 4" in capsys.readouterr().out  # imported before the status check, nothing to decode
    assert cache.main(common) == 0
    assert "already valid 4" in capsys.readouterr().out
    st = LatentStore(str(tmp_path / "store"))
    assert sorted(st.keys()) == [f"image{i}" for i in range(4)] and st.get("image1")["latent"].shape == (4, 8, 12)
    st.close()
    assert train.main([*common, f"output_dir={tmp_path / 'run'}", "train.max_train_steps=2",
                       "optimizer.lr_warmup_steps=0", "optimizer.lr_scheduler=constant", "sample.sample_every_n_steps=0",
                       "save.save_every_n_steps=0", "save.save_state=false"]) == 0
    assert os.listdir(tmp_path / "run" / "models")
