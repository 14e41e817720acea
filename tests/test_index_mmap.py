"""The dataset index is memory-mapped on load (data/index.py load_npz): same columns as reading it, nothing copied."""
import json

import numpy as np
import pytest

from data.index import DatasetIndex, build_index, load_npz


def test_index_columns_are_memory_mapped_and_equal(tmp_path):
    from core.config import DataConfig
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({f"k{i}": {"image_path": f"/nowhere/k{i}.png", "caption": f"cät {i}",
                                          "image_size": [512 + 64 * i, 768]} for i in range(7)}))
    ix = build_index(DataConfig(metadata_files=[str(meta)], resolution=512, bucket_reso_step=64, min_bucket_reso=256,
                                max_bucket_reso=1024), threads=1)
    path = str(tmp_path / "dataset_index.npz")
    ix.save(path)
    mapped, read = DatasetIndex.load(path), DatasetIndex.load(path, mmap=False)
    assert isinstance(mapped.sizes, np.memmap) and isinstance(mapped.captions.blob, np.memmap)
    assert not isinstance(read.sizes, np.memmap)
    for name in ("sizes", "buckets", "subset", "repeats"):
        assert np.array_equal(getattr(mapped, name), getattr(read, name)) and getattr(mapped, name).dtype == getattr(read, name).dtype
    assert mapped.captions.tolist() == read.captions.tolist() == [f"cät {i}" for i in range(7)]
    assert mapped.keys[3] == "k3" and mapped.row_of("k5") == 5
    with pytest.raises(ValueError):  # read-only: nothing can change the shared copy by accident
        mapped.repeats[0] = 5


def test_load_npz_refuses_compressed_members(tmp_path):
    np.savez_compressed(tmp_path / "c.npz", a=np.arange(10))
    with pytest.raises(ValueError, match="compressed"):
        load_npz(str(tmp_path / "c.npz"))


def _rss_anon_mb() -> float:
    """This process's anonymous resident memory (what each extra rank costs; mapped file pages are shared)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:")) / 1024


def test_mapped_index_columns_cost_no_private_memory_when_read(tmp_path):
    """The numbers for 1M entries and 2 ranks come from bench/scale_bench.py ranks; this checks the mechanism: reading
    every page of a mapped 32 MB column adds file-backed (shared) pages, not anonymous memory; reading it in does."""
    path = str(tmp_path / "big.npz")
    np.savez(path, col=np.arange(4 << 20, dtype=np.int64))  # 32 MB, stored uncompressed as DatasetIndex.save does
    base = _rss_anon_mb()
    mapped = load_npz(path)["col"]
    assert int(mapped.sum()) == (4 << 20) * ((4 << 20) - 1) // 2  # every page touched
    mapped_cost = _rss_anon_mb() - base
    del mapped
    base = _rss_anon_mb()
    with np.load(path) as z:
        read = z["col"]
        read_cost = _rss_anon_mb() - base
    assert mapped_cost < 4 and read_cost > 28, (mapped_cost, read_cost)


def test_streamed_json_object_parse_equals_json_loads(tmp_path):
    """data/readers/metadata.iter_json_object reads a {key: value} file in chunks (cut after an entry, parsed at C
    speed; a cut inside a value falls back to entry-wise reading); with tiny chunks every cut lands somewhere odd:
    nested objects, strings holding `}, "k": {`, escapes, non-ASCII, whitespace. Errors give json's message and
    position in the whole file."""
    import random

    from data.readers.metadata import iter_json_object

    rng = random.Random(0)
    tricky = ["x}, \"k\": {", "é\"},\"", "a\\\"}\n,\"b", "\u2028", 3, -2.5, None, True]

    def value(depth=0):
        r = rng.random()
        if depth > 2 or r < 0.3:
            return rng.choice(tricky)
        if r < 0.6:
            return [value(depth + 1) for _ in range(rng.randint(0, 3))]
        return {rng.choice(["a", "}", '","']): value(depth + 1) for _ in range(rng.randint(0, 3))}

    p = tmp_path / "m.json"
    for trial in range(60):
        obj = {f"k{i}" + rng.choice(["", "}", '","']): value() for i in range(rng.randint(0, 30))}
        p.write_text(json.dumps(obj, indent=rng.choice([None, 1]), ensure_ascii=trial % 2 == 0), encoding="utf-8")
        for chunk in (5, 64, 1 << 20):
            got: dict = {}
            for part in iter_json_object(str(p), chunk, rng.choice(["{", '"'])):
                got.update(part)
            assert got == obj
    for bad in ['{"a": 1,}', '{"a" 1}', '{"a": 1} x', '{"a": [1, 2}', '{"a":{"b":1},\n"c":2 "d":3}']:
        p.write_text(bad)
        with pytest.raises(json.JSONDecodeError) as want:
            json.loads(bad)
        for chunk in (3, 1 << 20):
            with pytest.raises(ValueError) as got:
                list(iter_json_object(str(p), chunk))
            assert str(got.value).endswith(str(want.value)), (bad, chunk)


def test_batch_json_encode_equals_one_encode_each():
    from data.columns import encode_many, json_encoder

    enc = json_encoder()
    for values in ([{"image_size": [i, 7]} for i in range(300)], [{}, {"a": "é\u2028"}, None, {"b": [1, {"c": "\x00sdtrain"}]}],
                   [{"x": "\x00sdtrain"}, {"y": 2}], [{}], [{"a": 1}], [], [{"t": "\\u0000sdtrain"}, {"u": 1}]):
        blob, lens = encode_many(values, enc)
        want = [enc(v) if v else "" for v in values]
        assert blob == "".join(want).encode() and lens.tolist() == [len(w.encode()) for w in want]


def test_index_from_chunks_equals_whole_parse(tmp_path, monkeypatch):
    """A metadata JSON object parsed in many chunks builds the index json.loads would give (order, captions,
    descriptions / counted fields / sizes as parsed whole). A key repeated in the object, in the same chunk or in
    another one, is an error naming it (json.loads would keep the last entry and lose the first, #28.2); a
    repeated key in a JSON list stays an error."""
    import data.readers.metadata as md
    from core.config import DataConfig

    recs = {f"k{i}": {"image_path": f"/nowhere/{i}.png", "caption": f"c{i}", "image_size": [512, 512 + 64 * (i % 5)],
                      **({"description": f"d{i}", "artist": "Bob"} if i % 3 == 0 else {})} for i in range(400)}
    text = json.dumps(recs)
    (tmp_path / "m.json").write_text(text)
    cfg = DataConfig(metadata_files=[str(tmp_path / "m.json")], resolution=512, bucket_reso_step=64,
                     min_bucket_reso=256, max_bucket_reso=1024)
    monkeypatch.setattr(md, "STREAM_CHARS", 512)
    ix = build_index(cfg, threads=1)
    want = json.loads(text)
    assert ix.keys.tolist() == list(want) and ix.captions.tolist() == [r["caption"] for r in want.values()]
    assert ix.descriptions.tolist() == [r.get("description", "") for r in want.values()]
    assert ix.counter["artist"] == {"bob": 134} and ix.meta(3) == {"image_size": [512, 704], "description": "d3",
                                                                   "artist": "Bob"}
    late = ', "k7": {"image_path": "/nowhere/late.png", "caption": "late", "image_size": [640, 512]}}'
    for chars in (512, 1 << 22):  # the repeat in another chunk / in the same chunk
        monkeypatch.setattr(md, "STREAM_CHARS", chars)
        (tmp_path / "m.json").write_text(text[:-1] + late)
        with pytest.raises(ValueError, match=r"key 'k7' is given 2 times \(images '/nowhere/7.png', "
                                             r"'/nowhere/late.png'\)|duplicate dataset key"):
            build_index(cfg, threads=1)
    (tmp_path / "l.json").write_text(json.dumps([{"key": "a", "image_path": "/n/a.png", "image_size": [512, 512]}] * 2))
    with pytest.raises(ValueError, match="duplicate dataset key"):
        build_index(DataConfig(metadata_files=[str(tmp_path / "l.json")], resolution=512), threads=1)
