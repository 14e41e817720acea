"""Metadata that used to lose images without a word (#28.2), through the real entry points (train.main / cache.main
in process): a CSV quote never closed, a CSV row with more fields than its header, a JSON object key given twice, a
caption given as an object stop with one line naming the file and the line / key; a caption given as a JSON list of
tags trains as those tags; every metadata file's entries read / used / left out are logged."""
import importlib
import json

import pytest
from PIL import Image

DEMO = "configs/demo.toml"


@pytest.fixture(scope="module")
def meta(tmp_path_factory):
    """Six images and metadata files about them, good and bad."""
    root = tmp_path_factory.mktemp("meta")
    imgs = root / "imgs"
    imgs.mkdir()
    paths = []
    for i in range(6):
        p = imgs / f"i{i}.png"
        Image.new("RGB", (64, 64), (40 * i, 90, 200)).save(p)
        paths.append(str(p))
    rows = "".join(f"{p},shape {i}\n" for i, p in enumerate(paths))
    (root / "ok.csv").write_text("image_path,caption\n" + rows)
    bad = rows.splitlines()
    bad[1] = bad[1].replace("shape 1", '"shape 1')  # one quote never closed
    (root / "quote.csv").write_text("image_path,caption\n" + "\n".join(bad) + "\n")
    bad = rows.splitlines()
    bad[2] = bad[2] + ", red, round"  # a caption with commas and no quotes
    (root / "fields.csv").write_text("image_path,caption\n" + "\n".join(bad) + "\n")
    entries = [f'"k{i}": {json.dumps({"image_path": p, "caption": f"shape {i}"})}' for i, p in enumerate(paths)]
    entries[3] = entries[3].replace('"k3"', '"k1"')  # k1 twice: json.loads would drop i1 and train i3 as k1
    (root / "dupkey.json").write_text("{" + ", ".join(entries) + "}")
    recs = {f"k{i}": {"image_path": p, "caption": ["tag1", f"tag{i}"]} for i, p in enumerate(paths)}
    (root / "listcap.json").write_text(json.dumps(recs))
    recs["k2"]["caption"] = {"text": "x"}
    (root / "objcap.json").write_text(json.dumps(recs))
    recs = {f"k{i}": {"image_path": p if i != 4 else str(imgs / "gone.png"), "caption": "c"} for i, p in enumerate(paths)}
    (root / "onegone.json").write_text(json.dumps(recs))
    return root


def _args(meta, name, tmp_path):
    return [DEMO, f"output_dir={tmp_path / 'run'}", "cache.cache_dir=", "data.image_dirs=[]",
            f"data.metadata_files=['{meta / name}']"]


def _fails(entry, argv, expect, capsys):
    """entry.main(argv) ends with exit code != 0 and one line containing `expect`, no traceback."""
    with pytest.raises(SystemExit) as e:
        importlib.import_module(entry).main([str(a) for a in argv])
    err = capsys.readouterr().err
    code = e.value.code
    assert code not in (0, None), err
    msg = code if isinstance(code, str) else err.strip().splitlines()[-1]
    assert "Traceback" not in err and expect in msg and len(msg.strip().splitlines()) == 1, msg
    return msg


@pytest.mark.parametrize("entry", ["train", "cache"])
@pytest.mark.parametrize("name, expect", [
    ("quote.csv", "quote.csv': the row starting at line 3 is not valid CSV"),
    ("fields.csv", "fields.csv' line 4: 4 fields but the header has 2"),
    ("dupkey.json", "key 'k1' is given 2 times"),
    ("objcap.json", "entry 'k2': a caption must be text or a list of tags, got dict"),
])
def test_metadata_that_would_lose_images_is_one_line(meta, tmp_path, capsys, entry, name, expect):
    argv = _args(meta, name, tmp_path)
    if entry == "cache":
        argv = [a if not a.startswith("cache.cache_dir") else f"cache.cache_dir={tmp_path / 'c'}" for a in argv]
    msg = _fails(entry, argv, expect, capsys)
    assert str(meta / name) in msg


def test_list_caption_trains_as_tags_and_counts_are_reported(meta, tmp_path, capsys, caplog):
    """A caption given as a JSON list of tags is those tags joined by the caption separator (not the list's repr);
    each metadata file's entries read / used / left out are logged (one image missing: 6 read, 5 used)."""
    import cache

    base = [DEMO, f"cache.cache_dir={tmp_path / 'c'}", "data.image_dirs=[]", "data.resolution=64",
            "data.min_bucket_reso=32", "data.max_bucket_reso=128"]
    assert cache.main([*base, f"data.metadata_files=['{meta / 'listcap.json'}']", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "tag1, tag" in out and "['tag1'" not in out
    caplog.clear()  # the dry run above may have logged its own counts (the project loggers' level is set by a run)
    with caplog.at_level("INFO"):
        assert cache.main([*base, f"cache.cache_dir={tmp_path / 'c2'}", f"data.metadata_files=['{meta / 'onegone.json'}']",
                           "--dry-run"]) == 0
    lines = [r.getMessage() for r in caplog.records if "entries read" in r.getMessage()]
    assert lines == [f"metadata {meta / 'onegone.json'}: 6 entries read, 5 used, 1 left out (reasons in skipped.txt)"]
    caplog.clear()
    with caplog.at_level("INFO"):
        assert cache.main([*base, f"cache.cache_dir={tmp_path / 'c3'}", f"data.metadata_files=['{meta / 'ok.csv'}']",
                           "--dry-run"]) == 0
    assert [r.getMessage() for r in caplog.records if "entries read" in r.getMessage()] == \
        [f"metadata {meta / 'ok.csv'}: 6 entries read, 6 used, 0 left out"]
