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
from test_data_sources import data_cfg, img, subset  # noqa: E402

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
