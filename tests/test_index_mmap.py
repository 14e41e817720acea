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
