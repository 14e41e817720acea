"""Tar-shard sources (data/readers/tar.py), in process: brace expansion against bash itself, webdataset's sample
grouping (its tariterators rule: key = name up to the first dot of the base name, consecutive members, regular
files only, `__...__` skipped), and what the index makes of a shard. The 2-rank cache + train run over tar shards
is in tests/test_cache_cli.py (shared with the image-folder run)."""

import io
import json
import subprocess
import tarfile

import pytest
from PIL import Image

from data.readers.tar import expand_braces, expand_shards, group_samples
from helpers import write_webdataset_shard


def _tar_config(tmp_path, last: str):
    """A tiny SDXL config over the shards tmp_path/000000.tar .. {last}.tar (brace range)."""
    from core.config import load_config
    (tmp_path / "cfg.toml").write_text(f'[model]\nmodel_family = "sdxl"\nmodel_preset = "tiny"\n[data]\n'
                                       f'resolution = 64\nmin_bucket_reso = 32\nmax_bucket_reso = 128\n'
                                       f'bucket_reso_step = 32\n[[data.subsets]]\n'
                                       f'tar_shards = ["{tmp_path}/{{000000..{last}}}.tar"]\n')
    return load_config(str(tmp_path / "cfg.toml"), [])


@pytest.mark.parametrize("pattern", ["s{000000..000003}.tar", "{a,b}{1..2}", "x{9..7}y", "{1..10..3}", "a{b,c{d,e}}f",
                                     "{08..11}", "{0..10}", "{-01..1}", "{x}", "p{000..2}q", "no_braces.tar"])
def test_brace_expansion_matches_bash(pattern):
    want = subprocess.run(["bash", "-c", f"printf '%s\\n' {pattern}"], capture_output=True, text=True,
                          check=True).stdout.split()
    assert expand_braces(pattern) == want


def _tar(names):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for n in names:
            ti = tarfile.TarInfo(n.rstrip("/"))
            if n.endswith("/"):
                ti.type = tarfile.DIRTYPE
                tf.addfile(ti)
            else:
                ti.size = 1
                tf.addfile(ti, io.BytesIO(b"x"))
    buf.seek(0)
    return tarfile.open(fileobj=buf, mode="r")


def test_webdataset_key_grouping():
    """webdataset's group_by_keys over these members (derived by hand from its base_plus_ext regex)."""
    tf = _tar(["__meta__", "a.jpg", "a.txt", "b.seg.PNG", "b.json", "dir/", "dir/c.d.jpg", "noext", "A.JPG",
               "a.txt", "dir/__x__/y.jpg"])
    got = [(k, sorted(s)) for k, s in group_samples(tf, "t.tar")]
    assert got == [("a", ["jpg", "txt"]), ("b", ["json", "seg.png"]), ("dir/c", ["d.jpg"]), ("A", ["jpg"]),
                   ("a", ["txt"]), ("dir/__x__/y", ["jpg"])]
    with pytest.raises(ValueError, match="repeats 'jpg' in sample 'k'"):
        list(group_samples(_tar(["k.jpg", "k.JPG"]), "t.tar"))


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_member_headers_match_tarfile(tmp_path, fmt):
    """The index scan's own header reader against Python's tarfile on the same archive: names (long, nested,
    non-ASCII), sizes, regular-or-not and the data at each offset; streamed (`w|`) and seekable writes."""
    from data.readers.tar import iter_members

    names = ["a.jpg", "d/", "d/" + "x" * 120 + ".png", "é/ü.txt", "empty.txt", "k.json", "z" * 99 + ".caption"]
    if fmt == tarfile.USTAR_FORMAT:
        names = [n for n in names if len(n) <= 100 and n.isascii()]
    for mode in ("w", "w|"):
        path = tmp_path / f"t{fmt}{mode.strip('|')}.tar"
        with tarfile.open(str(path), mode, format=fmt) as tf:
            for i, n in enumerate(names):
                ti = tarfile.TarInfo(n.rstrip("/"))
                if n.endswith("/"):
                    ti.type = tarfile.DIRTYPE
                    tf.addfile(ti)
                else:
                    data = bytes([i]) * (0 if n == "empty.txt" else 700 * i + 3)
                    ti.size, ti.mtime = len(data), 1.5e9 + 0.25  # a float mtime: PAX writes a header for it
                    tf.addfile(ti, io.BytesIO(data))
        with tarfile.open(str(path)) as tf:
            want = [(t.name, t.size, t.isreg(), tf.extractfile(t).read() if t.isreg() else b"") for t in tf]
        with open(path, "rb") as f:
            got = []
            for m in iter_members(f, str(path)):
                f.seek(m.offset)
                got.append((m.name, m.size, m.isreg(), f.read(m.size) if m.isreg() else b""))
        assert got == want
    with tarfile.open(str(path)) as tf:
        second = tf.getmembers()[1].offset  # where its header (or its PAX header) starts
    data = bytearray(path.read_bytes())
    data[second + 10] ^= 0xFF  # inside the second member's name
    path.write_bytes(bytes(data))
    with open(path, "rb") as f, pytest.raises(ValueError, match="damaged member header"):
        list(iter_members(f, str(path)))


@pytest.mark.parametrize("name", ["000000.tar", "000000.tar.gz"])
def test_stream_and_read_members(tmp_path, name):
    """stream_members yields the wanted members' bytes in tar order and then each missing one with a reason;
    read_member / open_bytes give one member (plain and gzip-compressed shards)."""
    import gzip
    import shutil

    from data.readers import open_bytes
    from data.readers.tar import TarShardReader

    samples = [(f"k{i}", {"png": bytes([i]) * (100 + i), "txt": f"c{i}"}) for i in range(5)]
    write_webdataset_shard(tmp_path / "000000.tar", samples)
    shard = tmp_path / name
    if name.endswith(".gz"):
        with open(tmp_path / "000000.tar", "rb") as f, gzip.open(shard, "wb") as g:
            shutil.copyfileobj(f, g)
    r = TarShardReader()
    got = list(r.stream_members(str(shard), {"k3.png", "k1.txt", "k9.png"}))
    assert got[:2] == [("k1.txt", b"c1", ""), ("k3.png", bytes([3]) * 103, "")]
    assert got[2][0] == "k9.png" and got[2][1] is None and "not in the shard" in got[2][2]
    assert open_bytes(f"{shard}::k4.png") == bytes([4]) * 104
    with pytest.raises(FileNotFoundError, match="no member 'k4.jpg'"):
        open_bytes(f"{shard}::k4.jpg")


def test_expand_shards_globs_ranges_and_missing(tmp_path):
    for i in range(3):
        (tmp_path / f"{i:06d}.tar").write_bytes(b"")
    d = str(tmp_path)
    assert expand_shards([f"{d}/{{000000..000002}}.tar"], "s") == [f"{d}/{i:06d}.tar" for i in range(3)]
    assert expand_shards([f"{d}/*.tar", f"{d}/000001.tar"], "s") == [f"{d}/{i:06d}.tar" for i in range(3)]
    with pytest.raises(FileNotFoundError, match=r"1 tar_shards entry does not exist: .*000003\.tar"):
        expand_shards([f"{d}/{{000000..000003}}.tar"], "s")
    with pytest.raises(FileNotFoundError, match=r"\*\.tgz"):
        expand_shards([f"{d}/*.tgz"], "s")


def _img(size, fmt="PNG"):
    b = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(b, fmt)
    return b.getvalue()


def test_index_of_a_shard(tmp_path):
    """Captions: caption_extension member, else .txt / .caption, else the JSON's caption, else its tags; the JSON's
    other fields are metadata (description used); JSON width / height are trusted as for metadata records; a
    corrupt image, a sample without image and a broken JSON are skipped with their reasons."""
    from data.images import SkipReport
    from data.index import build_index

    write_webdataset_shard(tmp_path / "000000.tar", [
        ("k0", {"jpg": _img((40, 24), "JPEG"), "txt": " a cat \n", "json": json.dumps({"caption": "not this"})}),
        ("k1", {"webp": _img((24, 40), "WEBP"), "caption": "a dog"}),
        ("k2", {"png": _img((32, 32)), "json": json.dumps({"tags": "t1, t2", "description": "a bird", "width": 64,
                                                         "height": 32})}),
        ("k3", {"png": _img((32, 32))}),
        ("bad", {"jpg": b"\xff\xd8 not a jpeg", "txt": "x"}),
        ("noimg", {"json": "{}", "txt": "y"}),
        ("badjson", {"png": _img((32, 32)), "json": "{oops"}),
    ])
    c = _tar_config(tmp_path, "000000")
    sk = SkipReport()
    ix = build_index(c.data, sk)
    shard = str(tmp_path / "000000.tar")
    assert ix.keys.tolist() == ["k0", "k1", "k2", "k3"]
    assert ix.paths.tolist() == [f"{shard}::k0.jpg", f"{shard}::k1.webp", f"{shard}::k2.png", f"{shard}::k3.png"]
    assert ix.captions.tolist() == ["a cat", "a dog", "t1, t2", ""]
    assert ix.descriptions[2] == "a bird" and json.loads(ix.metadata[2])["tags"] == "t1, t2"
    assert ix.sizes.tolist() == [[40, 24], [24, 40], [64, 32], [32, 32]]
    assert set(sk.items) == {f"{shard}::bad.jpg", f"{shard}::noimg", f"{shard}::badjson.png"}
    assert "no image member (has .json, .txt)" in sk.items[f"{shard}::noimg"]
    assert "not a readable image" in sk.items[f"{shard}::bad.jpg"]


def test_train_refuses_uncached_tar_shards():
    from core.config import DataConfig, SubsetConfig
    from data.sources import require_store_for_containers

    data = DataConfig(subsets=[SubsetConfig(tar_shards=["/x/{0..3}.tar"])])
    require_store_for_containers(data, use_store=True)
    with pytest.raises(ValueError, match="run `torchrun --nproc_per_node=N cache.py"):
        require_store_for_containers(data, use_store=False)


def test_two_ranks_scan_their_own_shards_and_rank0_merges(tmp_path, monkeypatch):
    """cache.py's index scan of tar shards: each of 2 ranks scans its own whole shards (largest first to the least
    loaded rank) into part files; rank 0's build then reads the parts and scans nothing; the index equals a
    single-process scan (order, captions, sizes, skipped members). A changed shard is the only one scanned again."""
    import os
    import time

    import data.readers.tar as tar
    from data.images import SkipReport
    from data.index import build_index, load_or_build_index, scan_tar_shards

    sizes = [3, 7, 2, 5]  # samples per shard: shards differ in size, so the deal is not round robin
    for s, n in enumerate(sizes):
        samples = [(f"s{s}k{i}", {"png": _img((32 + 16 * (i % 3), 32)), "txt": f"c{s} {i}"}) for i in range(n)]
        if s == 1:
            samples.append((f"s{s}bad", {"png": b"not a png", "txt": "x"}))
        write_webdataset_shard(tmp_path / f"{s:06d}.tar", samples)
    c = _tar_config(tmp_path, "000003")
    want_skip = SkipReport()
    want = build_index(c.data, want_skip, threads=1)  # no parts: one process scans everything

    scanned: list[str] = []
    real = tar._scan_shard
    monkeypatch.setattr(tar, "_scan_shard", lambda shard, ext: scanned.append(os.path.basename(shard)) or real(shard, ext))
    root = str(tmp_path / "store")
    mine = [scan_tar_shards(c.data, root, r, 2, threads=1) for r in (0, 1)]
    deal = tar.deal_shards([str(tmp_path / f"{s:06d}.tar") for s in range(4)], 2)
    assert mine == [2, 2] and sorted(map(os.path.basename, deal[0] + deal[1])) == sorted(scanned)
    assert {os.path.basename(p) for p in deal[0]} == {"000001.tar", "000002.tar"}  # by bytes: 8+2 vs 5+3 samples
    scanned.clear()
    sk = SkipReport()
    ix = load_or_build_index(c.data, root, skipped=sk, threads=1)
    assert scanned == []  # rank 0 merged the parts
    for name in ("keys", "paths", "captions", "metadata"):
        assert getattr(ix, name).tolist() == getattr(want, name).tolist()
    assert ix.sizes.tolist() == want.sizes.tolist() and dict(sk.items) == dict(want_skip.items)
    assert list(sk.items) == [f"{tmp_path}/000001.tar::s1bad.png"]

    time.sleep(0.01)
    write_webdataset_shard(tmp_path / "000002.tar", [("s2new", {"png": _img((32, 32)), "txt": "new"})])
    assert [scan_tar_shards(c.data, root, r, 2, threads=1) for r in (0, 1)] in ([1, 0], [0, 1])
    assert scanned == ["000002.tar"]
    ix = load_or_build_index(c.data, root, threads=1)
    assert "s2new" in ix.keys.tolist() and "s2k0" not in ix.keys.tolist() and scanned == ["000002.tar"]
    assert len(os.listdir(os.path.join(root, tar.SCAN_DIR))) == 4  # the old part of 000002 removed
