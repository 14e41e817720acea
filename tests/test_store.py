"""Latent shard store: safetensors validity, O(1) lookup, atomic writes, corruption, staleness, compression.

References: the `safetensors` library reads our shards (independent reader); values compared with the tensors
written; damage is made by editing bytes on disk.
"""

import glob
import os

import pytest
import torch

from data.store import (LatentStore, Record, ShardWriter, source_fingerprint, write_shard, SHARD_DIR)


def rec(i, src="s1", shape=(4, 8, 6), **extra):
    g = torch.Generator().manual_seed(i)
    t = {"latent": torch.randn(shape, generator=g).to(torch.bfloat16), **extra}
    return Record(f"k{i}", src, (48, 64), (100, 70), (3, 5), t, (3, 9))


def write(root, recs, cfg="cfg", compress=False, shard_size_mb=1):
    w = ShardWriter(str(root), cfg, 0, shard_size_mb, compress)
    for r in recs:
        w.add(r)
    w.close()
    return w


@pytest.mark.parametrize("compress", [False, True])
def test_roundtrip_and_safetensors_reader(tmp_path, compress):
    """Records read back bit-exact, with their sizes/crops; shards open with the safetensors library."""
    from safetensors import safe_open

    recs = [rec(i, te0=None) for i in range(5)]
    for r in recs:
        r.tensors.pop("te0")
        r.tensors["te0.t5"] = torch.randn(7, 3)
    write(tmp_path, recs, compress=compress)
    st = LatentStore(str(tmp_path))
    assert len(st) == 5 and "k3" in st and "k9" not in st
    pread = LatentStore(str(tmp_path), use_mmap=False)
    assert all(torch.equal(pread.get(r.key)["latent"], r.tensors["latent"]) for r in recs)
    for r in recs:
        got = st.get(r.key)
        assert torch.equal(got["latent"], r.tensors["latent"]) and torch.equal(got["te0.t5"], r.tensors["te0.t5"])
        assert got["bucket"] == (48, 64) and got["original_size"] == (100, 70) and got["crop_top_left"] == (3, 5)
        assert got["crop_top_left_flip"] == (3, 9)
    (shard,) = glob.glob(str(tmp_path / SHARD_DIR / "*.safetensors"))
    with safe_open(shard, "pt") as f:
        names = set(f.keys())
        if not compress:
            assert torch.equal(f.get_tensor("k2/latent"), recs[2].tensors["latent"])
        else:
            assert "k2/latent.zst" in names
        assert "records" in f.metadata()


def test_zero_copy_mmap(tmp_path):
    """An uncompressed tensor is a view of the shard's memory map (no copy): its storage is not owned memory."""
    write(tmp_path, [rec(0)])
    r = rec(0)
    st = LatentStore(str(tmp_path), use_mmap=True)
    t = st.get("k0")["latent"]
    assert torch.equal(t, r.tensors["latent"])
    # torch.frombuffer over the mmap: the data pointer lies inside the mapping, not in a fresh allocation.
    mm = st._maps[0]
    import ctypes

    base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
    assert base <= t.data_ptr() < base + len(mm)


def test_sharding_and_newest_wins(tmp_path):
    """Records spread over several shards; a re-written key is served from the newest shard; merged index reused."""
    big = [rec(i, shape=(4, 128, 128)) for i in range(20)]  # 128 KiB each -> several 1 MiB shards
    w = write(tmp_path, big)
    assert len(w.written) >= 2
    newer = rec(3, src="s2")
    newer.tensors["latent"] = torch.zeros(4, 8, 8, dtype=torch.bfloat16)
    write(tmp_path, [newer])
    st = LatentStore(str(tmp_path))
    assert torch.equal(st.get("k3")["latent"], newer.tensors["latent"])
    assert st.is_valid("k3", "s2", "cfg") and not st.is_valid("k3", "s1", "cfg") and not st.is_valid("k3", "s2", "other")
    assert st.is_valid_many(["k3", "k3", "k4", "k99", "k5"], ["s2", "s1", "s1", "s1", "s2"], "cfg").tolist() == \
        [True, False, True, False, False]
    assert not st.is_valid_many(["k3", "k4"], ["s2", "s1"], "other").any()
    with pytest.raises(ValueError, match="2 keys but 1 source"):
        st.is_valid_many(["k3", "k4"], ["s2"], "cfg")
    st.write_index()
    st2 = LatentStore(str(tmp_path))
    assert len(st2) == 20 and torch.equal(st2.get("k3")["latent"], newer.tensors["latent"])
    for i in range(20):  # positions survive a merge that dropped a superseded record
        if i != 3:
            assert torch.equal(st2.get(f"k{i}")["latent"], big[i].tensors["latent"]), i
    st2.write_index()  # merging again from a merged index keeps every record
    st3 = LatentStore(str(tmp_path))
    assert sorted(st3.keys()) == sorted(f"k{i}" for i in range(20))
    assert all(torch.equal(st3.get(f"k{i}")["latent"], big[i].tensors["latent"]) for i in range(20) if i != 3)


def test_corruption_detected_and_reported(tmp_path):
    """A flipped byte (CRC), a truncated shard (size) and a stray temp file: damaged shards left out, others used."""
    write(tmp_path, [rec(0)]); write(tmp_path, [rec(1)]); write(tmp_path, [rec(2)])
    shards = sorted(glob.glob(str(tmp_path / SHARD_DIR / "*.safetensors")))
    data = bytearray(open(shards[0], "rb").read()); data[-5] ^= 0xFF
    open(shards[0], "wb").write(data)
    data = open(shards[1], "rb").read()
    open(shards[1], "wb").write(data[:-10])
    open(shards[2] + ".tmp123", "wb").write(b"partial")  # what a kill -9 mid-write leaves
    st = LatentStore(str(tmp_path))
    assert set(st.keys()) == {"k2"}
    reasons = dict(st.damaged)
    assert "checksum" in reasons[os.path.basename(shards[0])] and "size" in reasons[os.path.basename(shards[1])]
    st.write_index()  # damaged shards are set aside
    assert len(glob.glob(str(tmp_path / SHARD_DIR / "*.damaged"))) == 2


def test_verify_finds_damage_after_merge(tmp_path):
    """A shard trusted through the merged index (same size+mtime) is still caught by verify()."""
    write(tmp_path, [rec(0)])
    LatentStore(str(tmp_path)).write_index()
    (shard,) = glob.glob(str(tmp_path / SHARD_DIR / "*.safetensors"))
    st0 = os.stat(shard)
    data = bytearray(open(shard, "rb").read()); data[-3] ^= 1
    open(shard, "wb").write(data)
    os.utime(shard, ns=(st0.st_atime_ns, st0.st_mtime_ns))
    st = LatentStore(str(tmp_path))
    assert "k0" in st  # cheap open trusts it
    assert len(st.verify()) == 1


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    """A failure while writing leaves no shard (only a temp file that readers ignore)."""
    os.makedirs(tmp_path / SHARD_DIR)

    def boom(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError):
        write_shard(str(tmp_path / SHARD_DIR / "x.safetensors"), [rec(0)], "cfg")
    monkeypatch.undo()
    assert not os.path.exists(tmp_path / SHARD_DIR / "x.safetensors") and len(LatentStore(str(tmp_path))) == 0


def test_source_fingerprint(tmp_path):
    """size+mtime changes on touch; content hash does not (same bytes) but does on an edit."""
    p = tmp_path / "a.bin"; p.write_bytes(b"abc")
    f1, h1 = source_fingerprint(str(p)), source_fingerprint(str(p), True)
    os.utime(p, ns=(1, 10**18))
    assert source_fingerprint(str(p)) != f1 and source_fingerprint(str(p), True) == h1
    p.write_bytes(b"abd")
    assert source_fingerprint(str(p), True) != h1 and source_fingerprint(str(tmp_path / "none")) == ""


def test_key_table_collisions_odd_keys_and_contains_many(tmp_path, monkeypatch):
    """Every key hashing alike still finds the right record, newest wins; keys with newlines / non-ASCII
    survive the merged index; contains_many agrees with `in` (reference: the records written)."""
    import numpy as np

    from data import store as dstore

    odd = [rec(i) for i in range(4)]
    for r, k in zip(odd, ["a\nb", "café", "猫", "k3"]):
        r.key = k
    write(tmp_path, odd)
    newer = rec(9); newer.key = "café"; newer.src = "s2"
    write(tmp_path, [newer])
    monkeypatch.setattr(dstore, "key_hashes", lambda kb: np.zeros(len(kb), dtype=np.uint64))
    monkeypatch.setattr(dstore, "key_hash", lambda kb: 0)
    st = LatentStore(str(tmp_path))  # every key collides
    assert len(st) == 4 and sorted(st.keys()) == sorted(["a\nb", "café", "猫", "k3"])
    assert torch.equal(st.get("café")["latent"], newer.tensors["latent"]) and st.is_valid("café", "s2", "cfg")
    assert torch.equal(st.get("a\nb")["latent"], odd[0].tensors["latent"])
    assert st.contains_many(["猫", "nope", "k3", "a"]).tolist() == [True, False, True, False]
    assert st.is_valid_many(["café", "café", "猫", "nope"], ["s2", "s1", "s1", "s1"], "cfg").tolist() == \
        [True, False, True, False]
    monkeypatch.undo()
    st.write_index()
    st2 = LatentStore(str(tmp_path))
    assert sorted(st2.keys()) == sorted(["a\nb", "café", "猫", "k3"]) and st2.is_valid("café", "s2", "cfg")
    assert torch.equal(st2.get("猫")["latent"], odd[2].tensors["latent"]) and "nope" not in st2
    assert st2.contains_many(["猫", "nope", "a\nb"]).tolist() == [True, False, True]
    assert st2.is_valid_many(["a\nb", "café", "猫"], ["s1", "s2", "s2"], "cfg").tolist() == [True, True, False]
    with pytest.raises(KeyError, match="not in the latent store"):
        st2.get("nope")


@pytest.mark.parametrize("compress", [False, True])
def test_record_captions_and_partial_reads(tmp_path, compress):
    """The caption text of each text variant round-trips in the record header (absent when not given); `get` with
    names returns only those tensors. Reference: the records written."""
    r0, r1 = rec(0), rec(1)
    r0.tensors.update({"te0.t5": torch.ones(3, 2), "te1.t5": torch.zeros(2, 2)})
    r0.captions = ["a, b", "b, a"]
    write(tmp_path, [r0, r1], compress=compress)
    st = LatentStore(str(tmp_path))
    assert st.record_info("k0")["cap"] == ["a, b", "b, a"] and "cap" not in st.record_info("k1")
    got = st.get("k0", ["te1.t5"])
    assert torch.equal(got["te1.t5"], torch.zeros(2, 2)) and "latent" not in got and "te0.t5" not in got
