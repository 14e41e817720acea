"""Drop-in data layouts of kohya sd-scripts, euge-trainer, HCP-Diffusion and Hugging Face, built in tmp dirs the
way those tools write them; counts, repeats, captions (against the old tool's rule) and buckets are checked."""

import csv
import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
from test_data_sources import data_cfg, img  # noqa: E402

from data.index import build_index  # noqa: E402


def rows(ix):
    return {ix.keys[i]: i for i in range(len(ix))}


def kohya_fixture(root, full_path):
    """Images + kohya's merge_captions_to_metadata / merge_dd_tags_to_metadata / prepare_buckets_latents output:
    meta_lat.json = {key: {"caption", "tags", "train_resolution": [w, h]}} (json.dump with indent=2, as kohya)."""
    d = root / "train"
    img(d / "a.png", (50, 50)); img(d / "b.jpg", (50, 50))  # headers square: sizes must come from train_resolution
    img(d / "c.webp", (48, 48)); img(d / "e.png", (40, 40))
    entries = {
        "a": {"caption": "a photo of a cat", "tags": "cat, solo", "train_resolution": [128, 64]},
        "b": {"tags": "dog, outdoors", "train_resolution": [64, 128]},          # tags only
        "c": {"caption": "only a caption"},                                     # no tags, no size
        "e": {"caption": "", "tags": "x, y"},                                   # empty caption + tags
    }
    ext = {"a": ".png", "b": ".jpg", "c": ".webp", "e": ".png"}
    meta = {(str(d / (k + ext[k])) if full_path else k): v for k, v in entries.items()}
    p = root / "meta_lat.json"
    with open(p, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
    return p, d


@pytest.mark.parametrize("full_path", [False, True])
def test_kohya_finetune_metadata(tmp_path, full_path):
    """Stem keys (with image_dirs) and --full_path keys; caption + separator + tags as kohya builds it;
    train_resolution is the bucketing size."""
    p, d = kohya_fixture(tmp_path, full_path)
    ix = build_index(data_cfg(metadata_files=[str(p)], image_dirs=[] if full_path else [str(d)]))
    r = rows(ix)
    key = (lambda k, e: str(d / (k + e))) if full_path else (lambda k, e: k)
    a, b, c, e = key("a", ".png"), key("b", ".jpg"), key("c", ".webp"), key("e", ".png")
    assert set(r) == {a, b, c, e}
    # kohya (train_util.FineTuningDataset, enable_wildcard off): caption + caption_separator + tags
    assert ix.captions[r[a]] == "a photo of a cat" + "," + "cat, solo"
    assert ix.captions[r[b]] == "dog, outdoors"
    assert ix.captions[r[c]] == "only a caption"
    assert ix.captions[r[e]] == "x, y"
    assert ix.paths[r[a]] == str(d / "a.png") and ix.paths[r[c]] == str(d / "c.webp")
    assert ix.sizes[r[a]].tolist() == [128, 64] and ix.sizes[r[b]].tolist() == [64, 128]  # train_resolution
    assert ix.sizes[r[c]].tolist() == [48, 48]                                            # from the header
    assert ix.buckets[r[a]].tolist() == [80, 48] and ix.buckets[r[b]].tolist() == [48, 80]  # 2:1 -> nearest (5:3)
    assert ix.meta(r[a]) == {"train_resolution": [128, 64]}


def test_kohya_caption_separator_is_the_subsets(tmp_path):
    p, d = kohya_fixture(tmp_path, False)
    ix = build_index(data_cfg(metadata_files=[str(p)], image_dirs=[str(d)], caption_separator=", "))
    assert ix.captions[rows(ix)["a"]] == "a photo of a cat, cat, solo"


def test_hcp_caption_json(tmp_path):
    """HCP-Diffusion: {"<name>": "caption"} beside an image folder (names with or without the extension)."""
    d = tmp_path / "imgs"
    img(d / "1.png"); img(d / "2.jpg"); img(d / "3.png")
    (tmp_path / "image_captions.json").write_text(json.dumps({"1": "caption 1", "2.jpg": "caption 2", "3": " c3 "}))
    ix = build_index(data_cfg(metadata_files=[str(tmp_path / "image_captions.json")], image_dirs=[str(d)]))
    r = rows(ix)
    assert {k: ix.captions[i] for k, i in r.items()} == {"1": "caption 1", "2": "caption 2", "3": "c3"}
    assert ix.paths[r["2"]] == str(d / "2.jpg")


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_hf_imagefolder_metadata(tmp_path, fmt):
    """datasets' imagefolder: metadata.jsonl / metadata.csv with file_name + text; as a metadata file or as the
    folder itself; extra columns are metadata."""
    d = tmp_path / "ds"
    img(d / "0001.png", (64, 32)); img(d / "sub" / "0002.png", (32, 64))
    recs = [{"file_name": "0001.png", "text": "first", "score": 5},
            {"file_name": "sub/0002.png", "text": "second", "score": 7}]
    if fmt == "jsonl":
        (d / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    else:
        with open(d / "metadata.csv", "w", newline="") as f:
            w = csv.DictWriter(f, ["file_name", "text", "score"])
            w.writeheader(); w.writerows(recs)
    for cfg in (data_cfg(metadata_files=[str(d / f"metadata.{fmt}")]), data_cfg(image_dirs=[str(d)])):
        ix = build_index(cfg)
        r = rows(ix)
        assert set(r) == {"0001", "sub/0002"}
        assert ix.captions[r["0001"]] == "first" and ix.captions[r["sub/0002"]] == "second"
        assert ix.paths[r["sub/0002"]] == str(d / "sub" / "0002.png")
        assert ix.sizes[r["sub/0002"]].tolist() == [32, 64]
        assert str(ix.meta(r["0001"])["score"]) == "5"


def test_reader_registry_one_reader_per_source(tmp_path):
    """Each source is claimed by exactly the reader of its format (the registry is the only dispatch)."""
    from data.readers import Source, reader_for
    from data.sources import resolve_subsets

    p, d = kohya_fixture(tmp_path, False)
    (tmp_path / "hcp.json").write_text(json.dumps({"a": "x"}))
    (tmp_path / "ours.json").write_text(json.dumps({"a": {"image_path": str(d / "a.png"), "caption": "x"}}))
    spec = resolve_subsets(data_cfg(image_dirs=[str(d)]))[0]
    names = {n: reader_for(Source("metadata", str(tmp_path / n), spec)).name
             for n in ("meta_lat.json", "hcp.json", "ours.json")}
    assert names == {"meta_lat.json": "kohya-metadata", "hcp.json": "hcp-captions", "ours.json": "metadata"}
    assert reader_for(Source("folders", "", spec)).name == "folder"


def test_caption_extension_hint_and_empty_caption_warning(tmp_path, caplog):
    """kohya's default `.caption` files with the default `.txt`: one warning with counts and the fix; the
    captions are empty and a second warning says how many."""
    d = tmp_path / "d"
    for i in range(4):
        img(d / f"{i}.png"); (d / f"{i}.caption").write_text(f"tag{i}")
    with caplog.at_level("WARNING"):
        ix = build_index(data_cfg(image_dirs=[str(d)]))
    msgs = [r.getMessage() for r in caplog.records]
    assert any("4 of 4 images have no .txt caption file, but 4 have a .caption file" in m
               and 'caption_extension = ".caption"' in m for m in msgs), msgs
    assert any("4 of 4 captions are empty" in m for m in msgs), msgs
    caplog.clear()
    with caplog.at_level("WARNING"):
        ix = build_index(data_cfg(image_dirs=[str(d)], caption_extension=".caption"))
    assert sorted(ix.captions.tolist()) == ["tag0", "tag1", "tag2", "tag3"]
    assert not [r for r in caplog.records if "caption" in r.getMessage()]


def kohya_kwargs_resolution(max_reso, min_size, max_size, divisible):
    """kohya model_util.make_bucket_resolutions, restated: the oracle for [w, h] resolutions."""
    import math

    max_area = max_reso[0] * max_reso[1]
    resos = {(int(math.sqrt(max_area) // divisible) * divisible,) * 2}
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resos.add((width, height)); resos.add((height, width))
        width += divisible
    return sorted(resos)


def test_resolution_width_height_and_int(tmp_path):
    """`resolution = [w, h]` (kohya's "w,h") and `= N`, through the config file as users write them."""
    from core.config import ConfigError, load_config
    from data.buckets import BucketSettings, assign_buckets, make_buckets

    for res, want in (("[768, 1024]", (768, 1024)), ("1024", (1024, 1024))):
        p = tmp_path / "c.toml"
        p.write_text(f"[data]\nresolution = {res}\n")
        bs = BucketSettings.from_data_cfg(load_config(str(p)).data)
        assert bs.size == want
        assert [tuple(b) for b in make_buckets(bs).tolist()] == kohya_kwargs_resolution(want, 256, 2048, 64)
    assert bs.key().startswith("res=1024,")  # square keys unchanged: existing stores stay valid
    flat = BucketSettings.from_data_cfg(load_config(str(tmp_path / "c.toml"), ["data.resolution=[768, 1024]",
                                                                             "data.enable_bucket=false"]).data)
    assert assign_buckets(np.array([[500, 300]]), flat).tolist() == [[768, 1024]]
    with pytest.raises(ConfigError, match="resolution"):
        load_config(str(tmp_path / "c.toml"), ["data.resolution=[768, 1024, 5]"])
    with pytest.raises(ConfigError, match="expected integer or array of integer"):
        load_config(str(tmp_path / "c.toml"), ["data.resolution=\"big\""])


def dreambooth_fixture(root, n_train=5, train_repeats=10, n_reg=80):
    """kohya's DreamBooth layout: train_data_dir/<repeats>_<tokens>/, reg_data_dir/<repeats>_<tokens>/."""
    for i in range(n_train):
        img(root / "train" / f"{train_repeats}_sks dog" / f"{i:03d}.png")
    (root / "train" / f"{train_repeats}_sks dog" / "000.caption").write_text("sks dog on grass\nsecond line")
    img(root / "train" / "no_number" / "x.png")  # no <repeats>_: skipped with a warning
    for i in range(n_reg):
        img(root / "reg" / "1_dog" / f"{i:03d}.png")
    return root / "train", root / "reg"


def test_dreambooth_folders_repeats_captions_and_reg_balance(tmp_path, caplog):
    """Repeats and class tokens from folder names, kohya's first-line .caption, reg balanced per epoch:
    5 train x 10 repeats + 80 reg -> 50 reg samples (30 unused); the loader's batches carry prior_loss_weight."""
    from data.loader import global_batches

    tr, reg = dreambooth_fixture(tmp_path)
    cfg = data_cfg(train_data_dir=str(tr), reg_data_dir=str(reg), caption_extension=".caption",
                   prior_loss_weight=0.25)
    with caplog.at_level("WARNING"):
        ix = build_index(cfg)
    assert any("no_number" in r.getMessage() and "<repeats>_" in r.getMessage() for r in caplog.records)
    r = rows(ix)
    assert len(ix) == 85 and "10_sks dog/000" in r and "reg/1_dog/079" in r
    assert ix.captions[r["10_sks dog/000"]] == "sks dog on grass"          # kohya read_caption: first line
    assert ix.captions[r["10_sks dog/001"]] == "sks dog"                   # no caption file: the class tokens
    assert [s.class_tokens for s in ix.subsets] == ["sks dog", "dog"]
    assert {int(ix.repeats[r[f"10_sks dog/{i:03d}"]]) for i in range(5)} == {10}
    reg_rep = [int(ix.repeats[r[f"reg/1_dog/{i:03d}"]]) for i in range(80)]
    assert reg_rep == [1] * 50 + [0] * 30
    assert ix.subsets[1].is_reg and ix.subsets[1].loss_weight == 0.25 and ix.subsets[0].loss_weight == 1.0
    epoch = np.concatenate(global_batches(ix, 4, seed=0, epoch=0))[:, 0]
    assert int(ix.subset[epoch].astype(bool).sum()) == 50 and len(epoch) == 100


def test_reg_images_too_few_are_repeated(tmp_path):
    """20 reg images for 50 training samples: repeated to 50 (kohya adds one repeat to each in turn)."""
    tr, reg = dreambooth_fixture(tmp_path, n_reg=20)
    ix = build_index(data_cfg(train_data_dir=str(tr), reg_data_dir=str(reg)))
    r = rows(ix)
    reg_rep = [int(ix.repeats[r[f"reg/1_dog/{i:03d}"]]) for i in range(20)]
    assert reg_rep == [3] * 10 + [2] * 10 and sum(reg_rep) == 50


def test_dreambooth_loader_class_tokens_and_loss_weight(tmp_path):
    """Through the real loader: an image without a caption file trains on its folder's tokens; reg samples carry
    prior_loss_weight into the per-sample loss weight (the objective's weighting path)."""
    from data.loader import make_loader

    tr, reg = dreambooth_fixture(tmp_path, n_train=2, train_repeats=1, n_reg=2)
    cfg = data_cfg(train_data_dir=str(tr), reg_data_dir=str(reg), caption_extension=".caption",
                   prior_loss_weight=0.25, batch_size=1, jpeg_draft=False)
    ix = build_index(cfg)
    seen = {}
    for b in make_loader(ix, cfg, None, seed=0, epoch=0, rank=0, world_size=1):
        seen[b["keys"][0]] = (b["captions"][0], float(b["loss_weight"][0]))
    assert seen == {"1_sks dog/000": ("sks dog on grass", 1.0), "1_sks dog/001": ("sks dog", 1.0),
                    "reg/1_dog/000": ("dog", 0.25), "reg/1_dog/001": ("dog", 0.25)}


# Hooks as euge-trainer users have them. `get_num_repeats` and `fmt2dan` / `QUALITY2NRP` are euge-trainer's own
# example (configs/more/aidxl_config.py), word for word; `process_caption` / `process_description` use exactly the
# fields of the wiki's tables (docs/CONFIG.md: img_md[...], img_info.<field>, kwargs['counter'][...], flip_aug).
EUGE_HOOKS = '''
def get_num_repeats(img_key, img_md, **kwargs):
    r"""
    提高弱势类别数据的训练权重，以及图片高质量图像的权重。
    """
    artist_benchmark = 100
    character_benchmark = 1000
    min_num_repeats = 1
    max_num_repeats = 10

    counter = kwargs.get('counter')  # 获取计数器

    num_repeats = 1

    artist = fmt2dan(img_md['artist'])
    if artist is not None:
        cnt = counter['artist'][artist]
        if cnt >= 25:
            num_repeats *= max(1, artist_benchmark / cnt)

    characters = fmt2dan(img_md['characters'])
    if characters is not None:
        for character in characters:
            cnt = counter['character'][character]
            if cnt >= 50:
                num_repeats *= max(1, character_benchmark / cnt)

    quality = img_md.get('quality')
    if quality in ('horrible', 'worst', 'low'):
        return 0  # 不训练
    elif quality in QUALITY2NRP:
        num_repeats *= QUALITY2NRP[quality]

    num_repeats = int(num_repeats)
    num_repeats = min(max_num_repeats, num_repeats)
    num_repeats = max(min_num_repeats, num_repeats)
    return num_repeats


def fmt2dan(tag):
    if isinstance(tag, str):
        tag = tag.lower().strip()
        tag = tag.replace(' ', '_').replace('\\\\(', '(').replace('\\\\)', ')').replace(': ', ':')
        return tag
    elif isinstance(tag, list):
        return [fmt2dan(t) for t in tag]
    else:
        return tag


QUALITY2NRP = {
    'amazing': 5,
    'best': 2.5,
    'high': 1.5,
    'normal': 1,
}


def wiki_repeats(img_key, img_md, **kwargs):
    counter = kwargs['counter']
    assert set(counter) >= {'artist', 'characters', 'styles', 'quality'}
    assert img_md['image_path'].endswith('.png') and img_md['caption']
    assert img_md['aesthetic_score'] is None and img_md['safe_level'] is None
    n = counter['artist'][fmt2dan(img_md['artist'])] if img_md['artist'] else 1
    return n


def process_caption(img_info, **kwargs):
    counter = kwargs['counter']
    tags = img_info.caption.split(', ')
    if kwargs['flip_aug']:
        tags = [tag.replace('left', 'right') for tag in tags]
    md = img_info.metadata
    tags.append(f"artist={counter['artist'][fmt2dan(md['artist'])]}")
    tags.append(f"chars={counter['characters'].get('alice_(wonderland)', 0)}")
    tags.append(f"styles={sorted(counter['styles'])}")
    tags.append(f"quality={counter['quality']}")
    tags.append(f"key={img_info.key}, n={img_info.num_repeats}, size={img_info.image_size}, "
                f"orig={img_info.original_size}, latent={img_info.latent_size}, bucket={img_info.bucket_size}, "
                f"npz={img_info.npz_path}, desc={img_info.description}")
    return ', '.join(tags)


def process_description(img_info, **kwargs):
    return img_info.description.upper() + (' (flipped)' if kwargs['flip_aug'] else '')


def bad_repeats(img_key, img_md, **kwargs):
    return '2'


def bad_caption(img_info, **kwargs):
    return None
'''


def euge_fixture(root):
    d = root / "imgs"
    img(d / "a.png", (64, 32)); img(d / "b.png", (64, 32)); img(d / "c.png", (32, 64))
    # euge-trainer's metadata file: {key: {image_path, caption, artist, characters, styles, quality, ...}}
    md = {"a": {"image_path": str(d / "a.png"), "caption": "1girl, left hand", "artist": "Bob Ross",
                "characters": ["alice \\(wonderland\\)"], "styles": "oil painting, sketch", "quality": "best"},
          "b": {"image_path": str(d / "b.png"), "caption": "scenery", "artist": "bob ross", "quality": "normal",
                "nl_caption": "a wide valley"},
          "c": {"image_path": str(d / "c.png"), "caption": "ugly", "artist": "eve", "quality": "low"}}
    (root / "md.json").write_text(json.dumps(md))
    (root / "hooks.py").write_text(EUGE_HOOKS)
    return root / "md.json", root / "hooks.py"


def test_euge_hooks_unchanged(tmp_path):
    """euge-trainer's own num_repeats_getter (positional img_key, img_md, counter under its singular keys) and
    wiki-table caption / description processors run unchanged; counters keyed and formatted as the wiki says."""
    import random

    from data.captions import CaptionOptions, full_caption
    from data.hooks import load_text_hook

    md, hooks = euge_fixture(tmp_path)
    ix = build_index(data_cfg(metadata_files=[str(md)], num_repeats_getter=f"{hooks}:get_num_repeats",
                              caption_processor=f"{hooks}:process_caption"))
    r = rows(ix)
    assert {k: int(ix.repeats[i]) for k, i in r.items()} == {"a": 2, "b": 1, "c": 0}  # best x2.5 -> 2, low -> 0
    assert ix.counter["artist"] == {"bob_ross": 3, "eve": 1}  # weighted by repeats; dropped ones once (euge)
    assert ix.descriptions[r["b"]] == "a wide valley"
    cap = load_text_hook(f"{hooks}:process_caption", "caption_processor")
    desc = load_text_hook(f"{hooks}:process_description", "description_processor")
    out = full_caption(ix.captions[r["a"]], CaptionOptions(), random.Random(0), key="a", metadata=ix.meta(r["a"]),
                       counter=ix.counter, flipped=True, caption_hook=cap, description_hook=desc,
                       description=ix.descriptions[r["a"]], info=lambda: ix.image_info(r["a"]))
    assert out == ("1girl, right hand, artist=3, chars=2, styles=['oil_painting', 'sketch'], "
                   "quality={'best': 2, 'normal': 1, 'low': 1}, key=a, n=2, size=(64, 32), orig=(64, 32), "
                   "latent=(10, 6), bucket=(80, 48), npz=None, desc=None")
    # b has tags and a description: euge-trainer's default is one or the other, half the time each
    outs = {full_caption(ix.captions[r["b"]], CaptionOptions(), random.Random(s), key="b", metadata=ix.meta(r["b"]),
                         counter=ix.counter, flipped=False, caption_hook=None, description_hook=desc,
                         description=ix.descriptions[r["b"]], info=lambda: ix.image_info(r["b"])) for s in range(40)}
    assert outs == {"scenery", "A WIDE VALLEY"}
    only_desc = CaptionOptions(description_probability=1.0)
    assert full_caption("x", only_desc, random.Random(0), key="b", metadata={}, counter={}, flipped=False,
                        description="d") == "d"
    both = CaptionOptions(description_probability=0.0, description_with_tags_probability=1.0)
    assert full_caption("x", both, random.Random(0), key="b", metadata={}, counter={}, flipped=False,
                        description="d") == "x, d"


def test_wiki_hook_fields_and_wrong_return_types(tmp_path):
    """img_md carries the wiki's fields (None when absent); a hook returning a wrong type names the key."""
    from data.hooks import HookError

    md, hooks = euge_fixture(tmp_path)
    ix = build_index(data_cfg(metadata_files=[str(md)], num_repeats_getter=f"{hooks}:wiki_repeats"))
    assert {ix.keys[i]: int(ix.repeats[i]) for i in range(len(ix))} == {"a": 2, "b": 2, "c": 1}
    with pytest.raises(HookError, match=r"num_repeats_getter returned '2' \(str\) for 'a'"):
        build_index(data_cfg(metadata_files=[str(md)], num_repeats_getter=f"{hooks}:bad_repeats"))
    import random

    from data.captions import CaptionOptions, full_caption
    from data.hooks import load_text_hook

    bad = load_text_hook(f"{hooks}:bad_caption", "caption_processor")
    with pytest.raises(HookError, match=r"caption_processor returned None \(NoneType\) for 'a'"):
        full_caption("x", CaptionOptions(), random.Random(0), key="a", metadata={}, counter={}, flipped=False,
                     caption_hook=bad, info=lambda: ix.image_info(0))


def test_keyword_style_hooks_still_work(tmp_path):
    """Today's keyword style is told apart by its signature and called as before."""
    from data.hooks import hook_style

    def ours(*, key, metadata, counter, num_repeats):
        return num_repeats

    def ours_cap(caption, *, key, metadata, counter, flipped, rng):
        return caption

    def euge(img_key, img_md, **kwargs):
        return 1

    def euge_cap(img_info, **kwargs):
        return ""

    def ours_loose(caption, **kw):
        return caption

    def euge_named(x, y, **kwargs):
        return 1

    assert [hook_style(f) for f in (ours, ours_cap, euge, euge_cap, ours_loose, euge_named)] == \
        ["ours", "ours", "euge", "euge", "ours", "euge"]


def test_import_npz_then_train_without_images(tmp_path, capsys, caplog):
    """kohya / euge .npz caches (written as those tools write them) imported without re-encoding, shape-checked
    against the bucket (a wrong one is rejected and encoded instead); then the images are deleted and train.py
    trains from the store alone (index rebuilt from the records, logged)."""
    import torch

    import cache
    import models
    import train
    from core.config import load_config
    from data.demo import make_demo_dataset
    from data.index import DatasetIndex
    from data.store import LatentStore, read_header

    paths = make_demo_dataset(str(tmp_path / "imgs"), n=4, size=(64, 64))
    common = ["configs/demo.toml", f"data.image_dirs=['{tmp_path / 'imgs'}']", f"cache.cache_dir={tmp_path / 'store'}",
              "data.resolution=64", "data.max_bucket_reso=128", "data.flip_aug=true", "data.batch_size=2"]
    c = load_config(common[0], common[1:])
    vae = models.load_vae(c.model, "cpu", torch.float32, seed=c.seed).cfg
    C = vae.z_channels
    rng = np.random.default_rng(0)
    raw = {p: rng.standard_normal((C, 8, 8)).astype(np.float32) for p in paths}          # bucket 64x64 -> 8x8
    flip = {p: rng.standard_normal((C, 8, 8)).astype(np.float32) for p in paths}
    stem = [os.path.splitext(p)[0] for p in paths]
    # euge-trainer save_latents_to_disk: <stem>.npz, crop_ltrb (0, 0, 0, 0), original_size = image size (w, h)
    np.savez(stem[0] + ".npz", latents=raw[paths[0]], original_size=np.array([64, 64]),
             crop_ltrb=np.array((0, 0, 0, 0)), latents_flipped=flip[paths[0]])
    # kohya strategy: <stem>_<WWWW>x<HHHH>_sdxl.npz with latents / original_size / crop_ltrb / latents_flipped
    np.savez(stem[1] + "_0064x0064_sdxl.npz", latents=raw[paths[1]], original_size=np.array([64, 64]),
             crop_ltrb=np.array([0, 4, 64, 60]), latents_flipped=flip[paths[1]])
    # kohya's first fine-tune format (prepare_buckets_latents.py): np.savez(file, latents) -> arr_0, + _flip.npz
    np.savez(stem[2] + ".npz", raw[paths[2]]); np.savez(stem[2] + "_flip.npz", flip[paths[2]])
    # a cache made for another bucket: rejected, encoded afresh
    np.savez(stem[3] + ".npz", latents=rng.standard_normal((C, 16, 8)).astype(np.float32),
             original_size=np.array([64, 64]), crop_ltrb=np.array((0, 0, 0, 0)))
    assert cache.main([*common, "--import-npz", str(tmp_path / "imgs")]) == 0
    out = capsys.readouterr().out
    assert "import-npz: 3 imported" in out and "1 rejected" in out and "does not match the bucket 64x64" in out
    assert "cache: encoded 1, already valid 3" in out
    ix = DatasetIndex.load(str(tmp_path / "store" / "dataset_index.npz"))
    st = LatentStore(str(tmp_path / "store"))
    for i, p in enumerate(paths[:3]):
        key = os.path.splitext(os.path.basename(p))[0]
        rec = st.get(key)
        want = (torch.from_numpy(raw[p]) - vae.shift_factor) * vae.scaling_factor
        assert torch.allclose(rec["latent"].float(), want, rtol=1e-2, atol=1e-2), key
        assert torch.allclose(rec["flip.latent"].float(), (torch.from_numpy(flip[p]) - vae.shift_factor)
                              * vae.scaling_factor, rtol=1e-2, atol=1e-2)
        assert st.record_info(key)["imp"].endswith(".npz")
    k1 = os.path.splitext(os.path.basename(paths[1]))[0]
    assert st.get(k1)["crop_top_left"] == (4, 0) and st.get(k1)["crop_top_left_flip"] == (4, 0)  # T, W - R
    origins = {read_header(os.path.join(st.root, "shards", s.name))[1]["__metadata__"].get("origin", "")
               for s in st.shards}
    assert any(o.startswith("import-npz:") for o in origins) and "" in origins  # imported + encoded shards
    st.close()
    for p in paths:  # the images and their caches (a folder of caches alone is a dataset of its own: euge layout b)
        os.remove(p)
    for f in os.listdir(tmp_path / "imgs"):
        if f.endswith(".npz"):
            os.remove(tmp_path / "imgs" / f)
    with caplog.at_level("WARNING"):
        assert train.main([*common, f"output_dir={tmp_path / 'run'}", "train.max_train_steps=2",
                           "optimizer.lr_warmup_steps=0", "optimizer.lr_scheduler=constant",
                           "sample.sample_every_n_steps=0", "save.save_every_n_steps=0", "save.save_state=false"]) == 0
    assert any("4 dataset entries are no longer in their sources" in r.getMessage() and "cache-only" in r.getMessage()
               for r in caplog.records)
    ix2 = DatasetIndex.load(str(tmp_path / "store" / "dataset_index.npz"))
    assert len(ix2) == 4 and sorted(ix2.captions.tolist()) == sorted(ix.captions.tolist())
    assert os.path.exists(tmp_path / "run" / "models")


def _png_bytes(size, colour):
    import io

    b = io.BytesIO()
    Image.new("RGB", size, colour).save(b, format="PNG")
    return b.getvalue()


HF_FEATURES = {"image": {"_type": "Image"}, "text": {"dtype": "string", "_type": "Value"},
               "score": {"dtype": "int64", "_type": "Value"}}


def hf_table(pa, sizes, start=0):
    """A table as `datasets` writes one with an Image feature: image = struct<bytes: binary, path: string>."""
    ids = range(start, start + len(sizes))
    img = pa.array([{"bytes": _png_bytes(s, (100 * i, 20, 30)), "path": f"{i}.png"} for i, s in zip(ids, sizes)],
                   type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    t = pa.table({"image": img, "text": [f"caption {i}" for i in ids], "score": list(ids)})
    return t.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": HF_FEATURES}})})


@pytest.mark.parametrize("layout", ["hub_parquet", "save_to_disk"])
def test_hf_dataset_parquet_and_arrow(tmp_path, layout):
    """euge-trainer's dataset_name_or_path, local only: a hub snapshot (data/train-*.parquet) or a save_to_disk
    folder (arrow stream + state.json); images stored as bytes are decoded by cache.py's decoder like files."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.ipc  # noqa: F401
    import pyarrow.parquet as pq

    import cache

    sizes = [(64, 32), (32, 64), (48, 48)]
    root = tmp_path / "ds"
    if layout == "hub_parquet":
        (root / "data").mkdir(parents=True)
        pq.write_table(hf_table(pa, sizes[:2]), root / "data" / "train-00000-of-00002.parquet", row_group_size=1)
        pq.write_table(hf_table(pa, sizes[2:], 2), root / "data" / "train-00001-of-00002.parquet")
        (root / "README.md").write_text("---\ndataset_info:\n  features: []\n---\n")
    else:
        root.mkdir()
        with pa.OSFile(str(root / "data-00000-of-00001.arrow"), "wb") as f:
            t = hf_table(pa, sizes)
            with pa.ipc.new_stream(f, t.schema) as w:
                w.write_table(t)
        (root / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}],
                                                     "_fingerprint": "x", "_format_type": None, "_split": "train"}))
        (root / "dataset_info.json").write_text(json.dumps({"features": HF_FEATURES}))
    ix = build_index(data_cfg(dataset_name_or_path=str(root), dataset_caption_column="text",
                              dataset_image_column="image"))
    assert len(ix) == 3
    assert sorted(ix.captions.tolist()) == ["caption 0", "caption 1", "caption 2"]
    got = {ix.captions[i]: tuple(ix.sizes[i].tolist()) for i in range(len(ix))}
    assert got == {"caption 0": (64, 32), "caption 1": (32, 64), "caption 2": (48, 48)}  # from the bytes' headers
    assert all("::" in ix.paths[i] for i in range(len(ix)))
    assert {ix.meta(i)["score"] for i in range(len(ix))} == {0, 1, 2}
    from data.images import MAX_PIXELS

    dec = cache._Decode(ix, content_hash=False, jpeg_draft=False, max_pixels=MAX_PIXELS)
    for i in range(len(ix)):
        item = dec[i]
        assert "error" not in item, item
        bw, bh = (int(v) for v in ix.buckets[i])
        assert tuple(item["x"].shape) == (3, bh, bw) and item["src"].startswith("s")
        red = 100 * int(ix.meta(i)["score"])                   # each row decodes its own pixels
        assert abs(float(item["x"][0].float().mean()) - red) <= 1 and int(item["x"][1, 0, 0]) == 20


def test_hf_dataset_without_pyarrow_is_a_clear_error(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_pyarrow(name, *a, **kw):
        if name.startswith("pyarrow"):
            raise ImportError("No module named 'pyarrow'")
        return real(name, *a, **kw)

    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "x.parquet").write_bytes(b"PAR1")
    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    with pytest.raises(ValueError, match="needs pyarrow: pip install -r requirements-optional.txt"):
        build_index(data_cfg(dataset_name_or_path=str(tmp_path / "ds")))


def test_cache_dry_run_reports_without_models(tmp_path, capsys, monkeypatch):
    """cache.py --dry-run: per-subset counts (reg balanced), bucket histogram, caption stats, 8 processed captions
    and the contact sheet, with every model loader made to fail (none may be called)."""
    import cache
    import models

    for name in ("load_vae", "load_text_encoders", "from_config", "load"):
        monkeypatch.setattr(models, name, lambda *a, **k: (_ for _ in ()).throw(AssertionError("model loaded")))
    tr, reg = dreambooth_fixture(tmp_path, n_train=4, train_repeats=3, n_reg=20)
    img(tr / "3_sks dog" / "wide.png", (96, 32))
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(f"""
[model]
model_family = "sdxl"
model_preset = "tiny"
[data]
train_data_dir = "{tr}"
reg_data_dir = "{reg}"
caption_extension = ".caption"
resolution = 64
bucket_reso_step = 16
min_bucket_reso = 32
max_bucket_reso = 128
caption_prefix = "photo,"
[cache]
cache_dir = "{tmp_path / 'store'}"
""")
    assert cache.main([str(cfg), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dataset: 25 entries, 30 samples per epoch" in out
    assert "3_sks dog: 5 images, 15 samples/epoch, num_repeats 3, class tokens 'sks dog'" in out
    assert "1_dog: 20 images, 15 samples/epoch, num_repeats 1, reg, class tokens 'dog', 5 with 0 repeats" in out
    assert "buckets (2): bucket  images  samples  share" in out
    assert "     80x48         24       27   90.0%" in out and "     96x32          1        3   10.0%" in out
    assert "captions: 0 empty (0.0%)" in out and "CLIP tokens over 25 sampled" in out  # class tokens stand in
    ex = out.split("processed captions (as the loader makes them):\n")[1].splitlines()[:8]
    assert len(ex) == 8 and all(e.split(": ", 1)[1].startswith("photo, ") for e in ex)
    assert any(e.endswith("photo, sks dog") or e.endswith("photo, dog") for e in ex)
    sheet = Image.open(tmp_path / "store" / "dataset_preview.png")
    assert sheet.size == (4 * 192, 2 * (192 + 64)) and "contact sheet of 8 bucketed crops" in out
