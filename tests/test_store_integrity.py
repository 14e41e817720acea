"""Latent store integrity (#28.3, #28.13): bit rot that keeps size and mtime is caught when a record is read, written
down, left out by the next open and rewritten away; dead records are compacted out of their shards, kill-safe.

Damage is made by editing bytes on disk and restoring the mtime, so the merged index still trusts the shard (what
main did: `cache.py` said "already valid" and training read the damaged latent)."""
import glob
import json
import multiprocessing as mp
import os
import signal
import struct
import zlib

import pytest
import torch

from data import store as st_mod
from data.store import (DAMAGE_DIR, SHARD_DIR, DamagedRecord, LatentStore, Record, ShardGone, ShardWriter,
                        StoreError)


def rec(i, src="s1", fill=None):
    g = torch.Generator().manual_seed(i)
    lat = torch.randn(4, 8, 6, generator=g).to(torch.bfloat16) if fill is None else torch.full((4, 8, 6), fill,
                                                                                               dtype=torch.bfloat16)
    return Record(f"k{i}", src, (48, 64), (100, 70), (3, 5), {"latent": lat, "flip.latent": -lat}, (3, 9))


def write(root, recs, compress=False):
    w = ShardWriter(str(root), "cfg", 0, 1, compress)
    for r in recs:
        w.add(r)
    w.close()
    return [os.path.join(str(root), SHARD_DIR, n) for n in w.written]


def rot(path, offset, mask=0x01):
    """Flip bits at `offset` (negative: from the end), keeping size and mtime (what the merged index checks)."""
    st = os.stat(path)
    data = bytearray(open(path, "rb").read())
    data[offset] ^= mask
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def tensor_offset(path, name):
    """Absolute file offset of a tensor's first byte."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return 8 + n + header[name]["data_offsets"][0]


def _values(store, keys):
    return {k: store.get(k)["latent"].clone() for k in keys}


@pytest.mark.parametrize("use_mmap, compress", [(True, False), (False, False), (True, True)])
def test_record_rot_caught_on_read_reported_and_left_out(tmp_path, use_mmap, compress):
    recs = [rec(i) for i in range(4)]
    (shard,) = write(tmp_path, recs, compress)
    LatentStore(str(tmp_path)).write_index()
    rot(shard, tensor_offset(shard, "k2/latent" + (".zst" if compress else "")) + 3)
    st = LatentStore(str(tmp_path), use_mmap=use_mmap)
    assert "k2" in st  # the cheap open trusts size + mtime, as before
    assert torch.equal(st.get("k1")["latent"], recs[1].tensors["latent"])
    assert torch.equal(st.get("k2", ["flip.latent"])["flip.latent"], recs[2].tensors["flip.latent"])  # intact part
    with pytest.raises(DamagedRecord, match="'k2'.*latent"):
        st.get("k2")
    reports = glob.glob(str(tmp_path / DAMAGE_DIR / "*.json"))
    assert len(reports) == 1 and json.load(open(reports[0]))["key"] == "k2"
    again = LatentStore(str(tmp_path))  # the next open (train.py, cache.py) leaves it out
    assert "k2" not in again and set(again.keys()) == {"k0", "k1", "k3"} and "k2" in again.damaged_records
    assert not again.index_is_current()  # cache.py rewrites the index
    again.write_index()  # ... rewriting the shard without it: the bad bytes and the report go
    assert not glob.glob(str(tmp_path / DAMAGE_DIR / "*.json")) and not os.path.exists(shard)
    final = LatentStore(str(tmp_path))
    assert sorted(final.keys()) == ["k0", "k1", "k3"] and not final.damaged_records
    assert all(torch.equal(final.get(f"k{i}")["latent"], recs[i].tensors["latent"]) for i in (0, 1, 3))


def test_header_rot_caught_reported_and_set_aside(tmp_path):
    """A changed digit in the header (still valid JSON: a record's bucket) is caught by the header checksum."""
    (a,) = write(tmp_path, [rec(0), rec(1)])
    (b,) = write(tmp_path, [rec(2)])
    LatentStore(str(tmp_path)).write_index()
    head = open(a, "rb").read(4096)
    at = head.index(b'\\"b\\": [48')  # inside the records JSON string: "b": [48, 64]
    rot(a, at + len(b'\\"b\\": [4'), 0x01)  # 48 -> 49
    st = LatentStore(str(tmp_path))
    with pytest.raises(StoreError, match="header checksum"):
        st.record_info("k0")
    with pytest.raises(StoreError, match="header checksum"):  # remembered in this process
        st.get("k1")
    assert torch.equal(st.get("k2")["latent"], rec(2).tensors["latent"])
    again = LatentStore(str(tmp_path))
    assert set(again.keys()) == {"k2"} and [n for n, _ in again.damaged] == [os.path.basename(a)]
    again.write_index()
    assert os.path.exists(a + ".damaged") and not glob.glob(str(tmp_path / DAMAGE_DIR / "*.json"))


def _write_v1(path, records):
    """A shard as written before per-tensor and header checksums (format v1)."""
    header, chunks, metas, pos = {}, [], [], 0
    for r in records:
        raw = r.tensors["latent"].view(torch.uint8).numpy().tobytes()
        header[f"{r.key}/latent"] = {"dtype": "BF16", "shape": list(r.tensors["latent"].shape),
                                     "data_offsets": [pos, pos + len(raw)]}
        chunks.append(raw)
        pos += len(raw)
        metas.append({"k": r.key, "src": r.src, "b": list(r.bucket), "o": list(r.original_size),
                      "c": list(r.crop_top_left), "cf": None, "t": {"latent": ["BF16", list(r.tensors["latent"].shape)]}})
    data = b"".join(chunks)
    header["__metadata__"] = {"format": st_mod.FORMAT_V1, "cfg": "cfg", "records": json.dumps(metas),
                              "crc32": f"{zlib.crc32(data):08x}", "data_len": str(len(data)), "compressed": ""}
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)) + hb + data)


def test_v1_shard_is_read_and_checked_whole(tmp_path):
    os.makedirs(tmp_path / SHARD_DIR)
    path = str(tmp_path / SHARD_DIR / "00000000000000000001-r0000-00000.safetensors")
    recs = [rec(0), rec(1)]
    _write_v1(path, recs)
    LatentStore(str(tmp_path)).write_index()
    st = LatentStore(str(tmp_path))
    assert torch.equal(st.get("k1")["latent"], recs[1].tensors["latent"])
    rot(path, -3)
    with pytest.raises(StoreError, match="checksum"):  # a new process (fresh store object) checks it whole first
        LatentStore(str(tmp_path)).get("k0")
    assert len(glob.glob(str(tmp_path / DAMAGE_DIR / "*.shard.json"))) == 1


def test_verify_writes_reports_per_record(tmp_path):
    (shard,) = write(tmp_path, [rec(i) for i in range(5)])
    LatentStore(str(tmp_path)).write_index()
    rot(shard, tensor_offset(shard, "k1/flip.latent"))
    rot(shard, tensor_offset(shard, "k4/latent") + 7)
    bad = LatentStore(str(tmp_path)).verify()
    assert len(bad) == 1 and "2 damaged record(s)" in bad[0][1]
    assert set(LatentStore(str(tmp_path)).keys()) == {"k0", "k2", "k3"}


def _shard_records(root):
    """Records physically present in the shards (live or dead)."""
    n = 0
    for p in glob.glob(os.path.join(str(root), SHARD_DIR, "*.safetensors")):
        with open(p, "rb") as f:
            (hl,) = struct.unpack("<Q", f.read(8))
            n += len(json.loads(json.loads(f.read(hl))["__metadata__"]["records"]))
    return n


def test_compaction_threshold_and_values(tmp_path):
    first = [rec(i) for i in range(8)]
    (old,) = write(tmp_path, first)
    LatentStore(str(tmp_path)).write_index()
    write(tmp_path, [rec(0, "s2", fill=1.0)])  # 1 of 8 dead: below the threshold, left as is
    LatentStore(str(tmp_path)).write_index()
    assert os.path.exists(old) and _shard_records(tmp_path) == 9
    write(tmp_path, [rec(1, "s2", fill=1.0), rec(2, "s2", fill=2.0)])  # 3 of 8 dead: rewritten
    LatentStore(str(tmp_path)).write_index()
    assert not os.path.exists(old) and _shard_records(tmp_path) == 8
    st = LatentStore(str(tmp_path))
    assert st.index_is_current()
    fills = {0: 1.0, 1: 1.0, 2: 2.0}  # the newest value of each re-encoded key
    for i in range(8):
        want = torch.full((4, 8, 6), fills[i], dtype=torch.bfloat16) if i in fills else first[i].tensors["latent"]
        assert torch.equal(st.get(f"k{i}")["latent"], want), i
        assert st.is_valid(f"k{i}", "s2" if i in fills else "s1", "cfg")


def _kill_at(root, target, attr, calls):
    """Child: run write_index and SIGKILL itself at the `calls`-th call of target.attr (before it runs)."""
    real, n = getattr(target, attr), [0]

    def hooked(*a, **k):
        n[0] += 1
        if n[0] == calls:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*a, **k)
    setattr(target, attr, hooked)
    LatentStore(root).write_index()
    os._exit(0)


@pytest.mark.parametrize("stage", ["shard rename", "index commit", "old shard removal"])
def test_compaction_is_kill_safe(tmp_path, stage):
    recs = [rec(i) for i in range(6)]
    write(tmp_path, recs)
    LatentStore(str(tmp_path)).write_index()
    newer = [rec(i, "s2", fill=float(i)) for i in range(3)]  # half dead: compaction due
    write(tmp_path, newer)
    target, attr, calls = {"shard rename": (os, "replace", 1), "index commit": (st_mod, "commit_file", 1),
                           "old shard removal": (st_mod, "remove_quietly", 1)}[stage]
    p = mp.get_context("fork").Process(target=_kill_at, args=(str(tmp_path), target, attr, calls))
    p.start()
    p.join(60)
    assert p.exitcode == -signal.SIGKILL
    want = {f"k{i}": (newer[i] if i < 3 else recs[i]).tensors["latent"] for i in range(6)}
    st = LatentStore(str(tmp_path))  # whatever the kill left: every key, with its newest value
    assert sorted(st.keys()) == sorted(want) and all(torch.equal(st.get(k)["latent"], v) for k, v in want.items())
    st.write_index()
    from core.fsio import clean_stale_temps
    clean_stale_temps([str(tmp_path / SHARD_DIR), str(tmp_path)])
    assert _shard_records(tmp_path) == 6  # and the next run leaves no dead record
    assert not [n for n in os.listdir(tmp_path / SHARD_DIR) if not n.endswith(".safetensors")]
    st = LatentStore(str(tmp_path))
    assert all(torch.equal(st.get(k)["latent"], v) for k, v in want.items())


def test_readers_keep_superseded_shards(tmp_path):
    """While a train.py (read_lock=True) reads the store, compaction writes the new shard and index but keeps the old
    file, which the reader opened the store with; the next run after it removes it."""
    recs = [rec(i) for i in range(4)]
    (old,) = write(tmp_path, recs)
    LatentStore(str(tmp_path)).write_index()
    reader = LatentStore(str(tmp_path), read_lock=True)
    write(tmp_path, [rec(i, "s2", fill=7.0) for i in range(2)])
    LatentStore(str(tmp_path)).write_index()
    assert os.path.exists(old)
    assert all(torch.equal(reader.get(f"k{i}")["latent"], recs[i].tensors["latent"]) for i in range(4))
    reader.close()
    LatentStore(str(tmp_path)).write_index()
    assert not os.path.exists(old) and _shard_records(tmp_path) == 4


def test_removed_shard_is_a_store_error(tmp_path):
    """A reader whose shard a cache.py run removed (no flock to tell it) gets ShardGone, not a crash."""
    (old,) = write(tmp_path, [rec(0)])
    st = LatentStore(str(tmp_path))
    os.remove(old)
    with pytest.raises(ShardGone):
        st.get("k0")
    assert not os.path.exists(tmp_path / DAMAGE_DIR)  # gone is not damage


def test_training_loader_skips_a_damaged_record(tmp_path):
    """The loader (what train.py iterates) replaces a damaged record by a batchmate, never trains on it, and the
    next open of the store leaves it out of the epoch."""
    from data.loader import make_loader, usable_rows
    from test_data_loader import Cfg, make_index

    ix = make_index(n=10, repeats=[1] * 10)
    w = ShardWriter(str(tmp_path), "cfg", 0, 1)
    for i in range(10):
        bw, bh = (int(v) for v in ix.buckets[i])
        lat = torch.full((4, bh // 8, bw // 8), float(i + 1), dtype=torch.bfloat16)
        w.add(Record(f"k{i}", "s", (bw, bh), (7, 9), (1, 2), {"latent": lat, "flip.latent": -lat}, (1, 5)))
    w.close()
    LatentStore(str(tmp_path)).write_index()
    (shard,) = glob.glob(str(tmp_path / SHARD_DIR / "*.safetensors"))
    mates = [i for i in range(10) if i != 3 and tuple(ix.buckets[i]) == tuple(ix.buckets[3])]
    assert mates, "k3 needs a batchmate in its bucket"
    rot(shard, tensor_offset(shard, "k3/latent"))
    rot(shard, tensor_offset(shard, "k3/flip.latent"))
    batches = list(make_loader(ix, Cfg, LatentStore(str(tmp_path)), seed=3, epoch=0, rank=0, world_size=1))
    seen = [k for b in batches for k in b["keys"]]
    assert "k3" not in seen and len(seen) == 10
    assert all(abs(v) != 4.0 for b in batches for v in b["latents"][:, 0, 0, 0].tolist())  # k3's value never used
    again = LatentStore(str(tmp_path))
    assert 3 not in usable_rows(ix, again).tolist() and len(usable_rows(ix, again)) == 9


def test_index_without_record_counts_compacts_where_records_died(tmp_path):
    """An index written before shards' record counts ("n") were kept: headers are read only for shards where a
    record died since, and those still compact."""
    import numpy as np
    a = write(tmp_path, [rec(i) for i in range(4)])[0]
    b = write(tmp_path, [rec(i) for i in range(4, 8)])[0]
    LatentStore(str(tmp_path)).write_index()
    idx = tmp_path / "store_index.npz"
    with np.load(idx) as z:
        arrays = dict(z)
    info = json.loads(arrays["info"].tobytes())
    for s in info["shards"]:
        del s["n"]
    arrays["info"] = np.frombuffer(json.dumps(info).encode(), dtype=np.uint8)
    np.savez(idx, **arrays)
    write(tmp_path, [rec(i, "s2", fill=1.0) for i in (0, 1)])  # half of a's records die; none of b's
    st = LatentStore(str(tmp_path))
    st.write_index()
    assert not os.path.exists(a) and os.path.exists(b) and st.shards[1].records is None  # b's header never read
    assert _shard_records(tmp_path) == 8
