"""Sources, metadata formats, fallback lookup, subsets/repeats, buckets, captions and robust image loading.

References: analytic answers (bucket invariants, pixel values of composited/scaled images) and Pillow's own
conversions (CMYK -> RGB, EXIF transpose) applied independently of data/images.py.
"""

import csv
import json
import os
import random
import sqlite3

import numpy as np
import pytest
from PIL import Image

from core.config import DataConfig, SubsetConfig
from data.buckets import BucketSettings, assign_buckets, crop_params, make_buckets, resize_and_crop
from data.captions import full_caption, process_caption
from data.hooks import count_metadata
from data.spec import CaptionOptions
from data.images import BadImage, SkipReport, load_image, read_size
from data.index import build_index, load_or_build_index


def data_cfg(**kw) -> DataConfig:
    """A typed [data] table at tiny sizes (the shared fixture of the data tests)."""
    d = dict(resolution=64, bucket_reso_step=16, min_bucket_reso=32, max_bucket_reso=128, batch_size=2,
             max_dataloader_n_workers=0, persistent_data_loader_workers=False)
    d.update(kw)
    return DataConfig(**d)


def subset(**kw) -> SubsetConfig:
    """A typed [[data.subsets]] entry."""
    return SubsetConfig(**kw)


def img(path, size=(40, 24), colour=(10, 20, 30)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def test_image_folder_and_caption_files(tmp_path):
    """Folder scan: same-stem .txt captions, sizes from headers (analytic: the sizes written)."""
    img(tmp_path / "a" / "x.png", (40, 24)); (tmp_path / "a" / "x.txt").write_text("cat, dog")
    img(tmp_path / "a" / "y.jpg", (24, 40))
    ix = build_index(data_cfg(image_dirs=[str(tmp_path / "a")]))
    rows = {ix.keys[i]: i for i in range(len(ix))}
    assert set(rows) == {"x", "y"}
    assert ix.captions[rows["x"]] == "cat, dog" and ix.captions[rows["y"]] == ""
    assert ix.sizes[rows["x"]].tolist() == [40, 24] and ix.sizes[rows["y"]].tolist() == [24, 40]


@pytest.mark.parametrize("fmt", ["json", "csv", "sqlite"])
def test_metadata_formats_and_fallback(tmp_path, fmt):
    """JSON / CSV / SQLite metadata; a missing image path is found by file name in image_dirs; extras carried."""
    img(tmp_path / "imgs" / "sub" / "p1.png", (64, 32))
    img(tmp_path / "elsewhere" / "p2.png", (32, 64))
    recs = [{"key": "k1", "image_path": str(tmp_path / "gone" / "p1.png"), "caption": "one", "artist": "bob"},
            {"key": "k2", "image_path": str(tmp_path / "elsewhere" / "p2.png"), "caption": "two", "artist": "bob",
             "image_size": [320, 640]}]
    if fmt == "json":
        p = tmp_path / "md.json"
        p.write_text(json.dumps({r["key"]: {k: v for k, v in r.items() if k != "key"} for r in recs}))
    elif fmt == "csv":
        p = tmp_path / "md.csv"
        with open(p, "w", newline="") as f:
            w = csv.DictWriter(f, ["key", "image_path", "caption", "artist", "width", "height"])
            w.writeheader()
            w.writerow({**{k: recs[0][k] for k in ("key", "image_path", "caption", "artist")}, "width": "", "height": ""})
            w.writerow({**{k: recs[1][k] for k in ("key", "image_path", "caption", "artist")}, "width": 320, "height": 640})
    else:
        p = tmp_path / "md.sqlite"
        con = sqlite3.connect(p)
        con.execute("CREATE TABLE images (key TEXT, image_path TEXT, caption TEXT, artist TEXT, width INT, height INT)")
        con.execute("INSERT INTO images VALUES (?,?,?,?,NULL,NULL)", ("k1", recs[0]["image_path"], "one", "bob"))
        con.execute("INSERT INTO images VALUES (?,?,?,?,320,640)", ("k2", recs[1]["image_path"], "two", "bob"))
        con.commit(); con.close()
    ix = build_index(data_cfg(metadata_files=[str(p)], image_dirs=[str(tmp_path / "imgs")]))
    rows = {ix.keys[i]: i for i in range(len(ix))}
    assert ix.paths[rows["k1"]] == str(tmp_path / "imgs" / "sub" / "p1.png")  # fallback by file name
    assert ix.sizes[rows["k1"]].tolist() == [64, 32]                          # from the header
    assert ix.sizes[rows["k2"]].tolist() == [320, 640]                        # from metadata, not the header
    assert ix.captions[rows["k2"]] == "two" and ix.meta(rows["k2"])["artist"] == "bob"
    assert ix.counter["artist"] == {"bob": 2}


def test_duplicates_reported(tmp_path):
    """Same stem in two folders -> an error naming the key and both files."""
    img(tmp_path / "a" / "dup.png"); img(tmp_path / "b" / "dup.jpg")
    with pytest.raises(ValueError, match=r"(?s)duplicate.*'dup'.*a/dup.png.*b/dup.jpg"):
        build_index(data_cfg(image_dirs=[str(tmp_path / "a"), str(tmp_path / "b")]))


def test_bad_config_messages(tmp_path):
    """Unknown metadata extension and missing folders give clear errors."""
    (tmp_path / "m.xml").write_text("x")
    with pytest.raises(ValueError, match="unknown extension"):
        build_index(data_cfg(metadata_files=[str(tmp_path / "m.xml")]))
    with pytest.raises(FileNotFoundError, match="not a directory"):
        build_index(data_cfg(image_dirs=[str(tmp_path / "nope")]))


def test_subsets_repeats_hook_and_index_reuse(tmp_path):
    """Per-subset repeats / is_reg / loss weight, num_repeats_getter hook, index reused when inputs unchanged."""
    for i in range(3):
        img(tmp_path / "t" / f"t{i}.png")
    img(tmp_path / "r" / "r0.png")
    hook = tmp_path / "hooks.py"
    hook.write_text("def rep(*, key, metadata, counter, num_repeats):\n    return 0 if key == 't2' else num_repeats\n")
    cfg = data_cfg(num_repeats_getter=f"{hook}:rep", subsets=[
        subset(image_dirs=[str(tmp_path / "t")], num_repeats=3),
        subset(image_dirs=[str(tmp_path / "r")], is_reg=True, class_tokens="a photo", loss_weight=0.5)])
    skipped = SkipReport()
    ix = load_or_build_index(cfg, str(tmp_path / "store"), skipped=skipped)
    rep = {ix.keys[i]: int(ix.repeats[i]) for i in range(len(ix))}
    assert rep == {"t0": 3, "t1": 3, "t2": 0, "r0": 6}  # reg balanced to the 6 training samples (kohya)
    assert ix.subsets[1].is_reg and ix.subsets[1].loss_weight == 0.5
    mtime = os.path.getmtime(tmp_path / "store" / "dataset_index.npz")
    ix2 = load_or_build_index(cfg, str(tmp_path / "store"))
    assert os.path.getmtime(tmp_path / "store" / "dataset_index.npz") == mtime and ix2.fingerprint == ix.fingerprint
    img(tmp_path / "t" / "t3.png")  # a new image changes the fingerprint -> rebuilt
    ix3 = load_or_build_index(cfg, str(tmp_path / "store"))
    assert len(ix3) == 5 and ix3.fingerprint != ix.fingerprint


@pytest.mark.parametrize("no_upscale", [False, True])
def test_bucket_invariants(no_upscale):
    """Every image in exactly one bucket; sides multiples of step; area <= resolution^2; no upscale when asked."""
    s = BucketSettings(resolution=256, step=32, min_reso=64, max_reso=512, no_upscale=no_upscale)
    rng = np.random.default_rng(0)
    sizes = rng.integers(40, 2000, size=(3000, 2))
    b = assign_buckets(sizes, s)
    assert b.shape == (3000, 2)
    assert (b % 32 == 0).all() and (b[:, 0] * b[:, 1] <= 256 * 256).all() and (b >= 32).all()
    if no_upscale:
        big = (sizes >= 32).all(1)
        assert (b[big] <= sizes[big]).all()
    else:
        allowed = {tuple(x) for x in make_buckets(s).tolist()}
        assert {tuple(x) for x in b.tolist()} <= allowed
        assert all(64 <= v <= 512 for x in allowed for v in x)
        # nearest aspect ratio, checked by brute force
        bl = make_buckets(s)
        err = np.abs(sizes[:, :1] / sizes[:, 1:] - (bl[:, 0] / bl[:, 1])[None])
        assert np.allclose(np.abs(sizes[:, 0] / sizes[:, 1] - b[:, 0] / b[:, 1]), err.min(1))


def test_resize_and_crop_records_offsets():
    """Resize covers the bucket, crop offsets inside the resized image; analytic center crop."""
    im = Image.new("RGB", (200, 100))
    out, orig, crop = resize_and_crop(im, (64, 64))
    assert out.size == (64, 64) and orig == (100, 200) and crop == (0, (128 - 64) // 2)
    (rw, rh), (t, l) = crop_params((200, 100), (64, 48), True, random.Random(3))
    assert rh == 48 and rw == 96 and 0 <= t <= rh - 48 and 0 <= l <= rw - 64


def test_caption_processing():
    """keep_tokens fixed, shuffle permutes the rest, tag dropout, dropout, prefix/suffix, class tokens, separator."""
    o = CaptionOptions(shuffle_caption=True, keep_tokens=1)
    outs = {process_caption("a, b, c, d, e", o, random.Random(i)) for i in range(30)}
    assert all(x.startswith("a, ") and sorted(x.split(", ")) == list("abcde") for x in outs) and len(outs) > 3
    o = CaptionOptions(shuffle_caption=True, keep_tokens_separator="|||")
    x = process_caption("p, q ||| b, c, d", o, random.Random(1))
    assert x.startswith("p, q, ") and sorted(x.split(", ")[2:]) == ["b", "c", "d"]
    assert process_caption("a, b", CaptionOptions(caption_dropout_rate=1.0), random.Random(0)) == ""
    assert process_caption("a, b, c", CaptionOptions(caption_tag_dropout_rate=1.0, keep_tokens=1), random.Random(0)) == "a"
    assert process_caption("a", CaptionOptions(caption_prefix="pre", caption_suffix="suf"), random.Random(0)) == "pre a suf"
    assert process_caption("", CaptionOptions(class_tokens="sks dog"), random.Random(0)) == "sks dog"


def test_caption_hooks_get_euge_arguments():
    """caption_processor / description_processor get key, metadata, counter, flipped (euge-trainer arguments)."""
    md = {"artist": "bob", "characters": ["x", "y"], "description": "a cat on the left"}
    counter = count_metadata([md, {"artist": "bob", "quality": "best"}])
    assert counter["artist"] == {"bob": 2} and counter["character"] == {"x": 1, "y": 1} and counter["quality"] == {"best": 1}
    seen = {}

    def cap(c, *, key, metadata, counter, flipped, rng):
        seen.update(key=key, n=counter["artist"]["bob"], flipped=flipped)
        return c + ", by " + metadata["artist"]

    def desc(d, *, key, metadata, counter, flipped, rng):
        return d.replace("left", "right") if flipped else d

    from data.hooks import TextHook

    both = CaptionOptions(description_probability=0.0, description_with_tags_probability=1.0)
    out = full_caption("cat", both, random.Random(0), key="k", metadata=md, counter=counter, flipped=True,
                       caption_hook=TextHook(cap, "caption_processor"),
                       description_hook=TextHook(desc, "description_processor"))
    assert out == "cat, by bob, a cat on the right" and seen == {"key": "k", "n": 2, "flipped": True}


def test_bad_images_skipped(tmp_path, monkeypatch):
    """Corrupt, truncated, zero-byte, non-image and bomb files -> BadImage; index skips them into the report."""
    d = tmp_path / "imgs"
    img(d / "good.png", (48, 48))
    (d / "zero.png").write_bytes(b"")
    (d / "text.jpg").write_text("hello, not an image")
    big = img(d / "trunc.png", (64, 64))
    rnd = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    rnd.save(big)
    data = open(big, "rb").read()
    open(big, "wb").write(data[: len(data) // 2])
    (d / "corrupt.png").write_bytes(data[:16] + bytes(64))
    for name, why in [("zero.png", "zero-byte"), ("text.jpg", "not a readable image"), ("corrupt.png", "readable|decode")]:
        with pytest.raises(BadImage, match=why):
            load_image(str(d / name))
    with pytest.raises(BadImage, match="decode"):
        load_image(str(d / "trunc.png"))  # header fine, data cut: only decoding notices
    img(d / "huge.png", (300, 300))
    with pytest.raises(BadImage, match="decompression bomb"):
        read_size(str(d / "huge.png"), max_pixels=300 * 300 - 1)
    skipped = SkipReport()
    ix = build_index(data_cfg(image_dirs=[str(d)], max_image_pixels=300 * 300 - 1), skipped)
    assert sorted(ix.keys.tolist()) == ["good", "trunc"]  # trunc's header is readable; cache.py skips it later
    assert {os.path.basename(p) for p in skipped.items} == {"zero.png", "text.jpg", "corrupt.png", "huge.png"}
    skipped.write(str(tmp_path / "skipped.txt"))
    assert len(open(tmp_path / "skipped.txt").read().splitlines()) == 4


def test_image_modes_converted(tmp_path):
    """CMYK / 16-bit / palette / LA / RGBA-on-white / EXIF rotation -> RGB (analytic values or Pillow's conversion)."""
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0)); cmyk.save(tmp_path / "c.jpg")
    ref = np.asarray(Image.open(tmp_path / "c.jpg").convert("RGB"))
    assert np.array_equal(np.asarray(load_image(str(tmp_path / "c.jpg"))), ref)
    g16 = Image.fromarray(np.array([[65535, 32768], [0, 257]], dtype=np.uint16)); g16.save(tmp_path / "g.png")
    assert Image.open(tmp_path / "g.png").mode.startswith("I")
    assert np.asarray(load_image(str(tmp_path / "g.png")))[..., 0].tolist() == [[255, 128], [0, 1]]
    rgba = Image.new("RGBA", (2, 1)); rgba.putpixel((0, 0), (255, 0, 0, 0)); rgba.putpixel((1, 0), (255, 0, 0, 128))
    rgba.save(tmp_path / "a.png")
    px = np.asarray(load_image(str(tmp_path / "a.png")))
    assert px[0, 0].tolist() == [255, 255, 255] and px[0, 1, 0] == 255 and abs(int(px[0, 1, 1]) - 127) <= 1
    la = Image.new("LA", (1, 1), (0, 0)); la.save(tmp_path / "la.png")
    assert np.asarray(load_image(str(tmp_path / "la.png"))).tolist() == [[[255, 255, 255]]]
    p = Image.new("P", (2, 2)); p.putpalette([0, 0, 255] * 256); p.save(tmp_path / "p.png")
    assert np.asarray(load_image(str(tmp_path / "p.png")))[0, 0].tolist() == [0, 0, 255]
    im = Image.new("RGB", (30, 10)); ex = Image.Exif(); ex[0x0112] = 6
    im.save(tmp_path / "r.jpg", exif=ex.tobytes())
    assert read_size(str(tmp_path / "r.jpg")) == (10, 30) and load_image(str(tmp_path / "r.jpg")).size == (10, 30)


def test_exists_many_matches_os_path_exists(tmp_path, monkeypatch):
    """Listing-based existence == os.path.exists (the reference) on files, folders, symlinks and odd paths."""
    from data.listing import exists_many

    img(tmp_path / "d" / "a.png"); (tmp_path / "d" / "sub").mkdir()
    (tmp_path / "d" / "link.png").symlink_to(tmp_path / "d" / "a.png")
    (tmp_path / "d" / "broken.png").symlink_to(tmp_path / "d" / "gone.png")
    monkeypatch.chdir(tmp_path / "d")
    d = str(tmp_path / "d")
    paths = [f"{d}/a.png", f"{d}/b.png", f"{d}/link.png", f"{d}/broken.png", f"{d}/sub", f"{d}/sub/", f"{d}/..",
             f"{d}//a.png", f"{d}/a.png/x", f"{tmp_path}/nope/a.png", "a.png", "b.png", "", "/", "/nonexistent-x.png",
             f"{d}/sub/../a.png"]
    assert exists_many(paths, threads=4) == [os.path.exists(p) for p in paths]


def test_metadata_columns_sizes_captions_paths(tmp_path):
    """Size forms, tags fallback, relative paths, list/JSONL keys (analytic: the values written)."""
    img(tmp_path / "m" / "rel.png", (48, 16)); img(tmp_path / "m" / "nosize.png", (40, 24))
    recs = {"a": {"image_path": "rel.png", "caption": "c", "image_size": [640, 480]},
            "b": {"image_path": "rel.png", "tags": "t1, t2", "image_size": [640.9, 480.2]},
            "c": {"image_path": "rel.png", "caption": None, "tags": "x", "image_size": "512x768"},
            "d": {"image_path": "rel.png", "width": "320", "height": 200},
            "e": {"image_path": "nosize.png", "caption": 7},
            "f": {"image_path": "rel.png", "original_size": [30, 20], "image_size": [1, 2, 3]}}
    (tmp_path / "m" / "md.json").write_text(json.dumps(recs))
    ix = build_index(data_cfg(metadata_files=[str(tmp_path / "m" / "md.json")]))
    got = {ix.keys[i]: (ix.sizes[i].tolist(), ix.captions[i], ix.paths[i]) for i in range(len(ix))}
    rel = str(tmp_path / "m" / "rel.png")
    assert got == {"a": ([640, 480], "c", rel), "b": ([640, 480], "t1, t2", rel), "c": ([512, 768], "x", rel),
                   "d": ([320, 200], "", rel), "e": ([40, 24], "7", str(tmp_path / "m" / "nosize.png")),
                   "f": ([48, 16], "", rel)}  # original_size is not the image's size (euge): its header is read
    assert ix.meta(list(got).index("b")) == {"tags": "t1, t2", "image_size": [640.9, 480.2]}
    # JSONL and list JSON: key from `key`, else the image file stem; a bad line is named with its number.
    lines = [json.dumps({"key": "k1", "image_path": rel, "caption": "one"}), "",
             json.dumps({"image_path": str(tmp_path / "m" / "nosize.png"), "caption": "two"})]
    (tmp_path / "m" / "md.jsonl").write_text("\n".join(lines) + "\n")
    ix = build_index(data_cfg(metadata_files=[str(tmp_path / "m" / "md.jsonl")]))
    assert sorted(ix.keys.tolist()) == ["k1", "nosize"] and ix.meta(ix.row_of("k1")) == {"key": "k1"}
    (tmp_path / "m" / "bad.jsonl").write_text(lines[0] + "\n\n" + '{"image_path": "x.png"} {}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl' line 3 is not valid JSON"):
        build_index(data_cfg(metadata_files=[str(tmp_path / "m" / "bad.jsonl")]))
    (tmp_path / "m" / "list.json").write_text(json.dumps([{"image_path": rel}, 5]))
    with pytest.raises(ValueError, match=r"item 1: expected an object"):
        build_index(data_cfg(metadata_files=[str(tmp_path / "m" / "list.json")]))
    (tmp_path / "m" / "num.json").write_text(json.dumps({"k": {"image_path": 5}}))
    with pytest.raises(ValueError, match=r"entry 'k' has a non-text image_path"):
        build_index(data_cfg(metadata_files=[str(tmp_path / "m" / "num.json")]))


def test_fallback_only_replaces_missing_and_prefers_smallest_path(tmp_path):
    """Existing paths are kept; a missing one (folder present or not) is found by name; smallest path wins."""
    img(tmp_path / "here" / "keep.png"); img(tmp_path / "dirs" / "b" / "keep.png")
    img(tmp_path / "dirs" / "b" / "x.png", (16, 16)); img(tmp_path / "dirs" / "a" / "x.png", (16, 16))
    img(tmp_path / "dirs" / "y.png")
    recs = {"keep": {"image_path": str(tmp_path / "here" / "keep.png")},
            "x": {"image_path": str(tmp_path / "gone" / "x.png")},
            "y": {"image_path": str(tmp_path / "here" / "y.png")}}  # folder exists, file does not
    (tmp_path / "md.json").write_text(json.dumps(recs))
    ix = build_index(data_cfg(metadata_files=[str(tmp_path / "md.json")], image_dirs=[str(tmp_path / "dirs")]))
    got = {ix.keys[i]: ix.paths[i] for i in range(len(ix))}
    assert got == {"keep": str(tmp_path / "here" / "keep.png"), "x": str(tmp_path / "dirs" / "a" / "x.png"),
                   "y": str(tmp_path / "dirs" / "y.png")}


def test_metadata_duplicates_and_str_column_unicode(tmp_path):
    """Duplicate keys across metadata files are listed with both files; non-ASCII strings round-trip."""
    from data.index import StrColumn

    for name in ("m1.json", "m2.json"):
        (tmp_path / name).write_text(json.dumps({"same": {"image_path": "a.png", "image_size": [64, 64]}}))
    with pytest.raises(ValueError, match=r"(?s)1 duplicate.*'same'.*m1.json.*m2.json"):
        build_index(data_cfg(metadata_files=[str(tmp_path / "m1.json"), str(tmp_path / "m2.json")]))
    items = ["", "abc", "café", "猫, 犬", "x"]
    col = StrColumn.from_list(items)
    assert col.tolist() == items and [col[i] for i in range(5)] == items
    assert StrColumn.from_list(["ab", "c"]).offsets.tolist() == [0, 2, 3]
