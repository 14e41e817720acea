"""The latent shard store: a directory of `.safetensors` shards holding many records (pread or memory maps).

Layout of `root/`:
    shards/<time_ns>-r<rank>-<seq>.safetensors   each a valid safetensors file (inspect with safe_open)
    store_index.npz                               merged record table (rank 0 writes it; a cache of the headers)

A shard holds, for every record, tensors named `<key>/<name>` (`latent`, or `mean` + `std`; the flip variant
`flip.latent` ...; text-encoder outputs `te<k>.<name>`) and, in the header's `__metadata__`:
`records` (JSON list: key, source fingerprint, bucket (w, h), original size (h, w), crop (top, left) for both
orientations, tensor table, and with text outputs the caption text of each `te<k>` variant), `cfg` (VAE identity + latent and bucket settings), `crc32` and `data_len`.
Shards are written whole to a temp file, fsynced, then renamed, so a crash loses at most the shard being
written. On open, a shard already in the merged index is trusted when its size and mtime match; any other shard
has its size and full CRC checked; a damaged shard is reported, left out, and its records count as missing.
When the same key is in several shards (re-encoded after going stale) the newest shard wins.
With compression each tensor is stored as a zstd frame (dtype U8) and its real dtype/shape is in the record.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import struct
import threading
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from operator import methodcaller
from queue import Queue
from typing import Any, Iterable

import numpy as np
import torch

from core.fsio import HOST, atomic_write, commit_file, is_temp, remove_quietly, temp_path, with_path
from core.lock import ReaderLock, readers_present

from .columns import StrColumn
from .locators import is_locator, split_locator

log = logging.getLogger(__name__)

SHARD_DIR, INDEX_FILE, SHARD_EXT, DAMAGE_DIR = "shards", "store_index.npz", ".safetensors", "damaged"
SHARD_REPORT = -1  # a damage report's position for a whole shard (its header)
COMPACT_DEAD_SHARE = 0.25  # a shard is rewritten once more than this share of its records is dead
FORMAT = "lean-latent-shard-v2"      # + a CRC32 per tensor (in each record) and of the header itself
FORMAT_V1 = "lean-latent-shard-v1"   # whole-data CRC only: verified whole, once per process, before a first read
_HCRC_FIELD, _HCRC_ZERO = b'"hcrc": "', "00000000"
MAX_OPEN_SHARDS = 64  # mmaps kept open (each holds a file descriptor)
ZSTD_LEVEL = 3  # latents barely compress; a fast level is the right trade
_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.uint8: "U8",
           torch.int32: "I32", torch.int64: "I64", torch.bool: "BOOL"}
_TORCH = {v: k for k, v in _DTYPES.items()}
LATENT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class StoreError(Exception):
    """A shard that cannot be trusted; the message says why."""


@dataclass
class Record:
    """One image's cached outputs, as handed to the writer."""

    key: str
    src: str                              # source fingerprint (size+mtime or content hash)
    bucket: tuple[int, int]               # (w, h) in pixels
    original_size: tuple[int, int]        # (h, w)
    crop_top_left: tuple[int, int]        # (top, left)
    tensors: dict[str, torch.Tensor]      # latent | mean, std; flip.*; te<k>.*
    crop_top_left_flip: tuple[int, int] | None = None
    captions: list[str] | None = None     # the text each te<k> variant was encoded from (index k)
    extra: dict[str, Any] | None = None   # "x": the index row (cache-only rebuild), "imp": the imported file

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def write_shard(path: str, records: list[Record], cfg: str, compress: bool = False, origin: str = "") -> int:
    """Serialise records into one safetensors file, atomically (temp, fsync, rename); returns its size."""
    cctx = None
    if compress:
        import zstandard

        cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    items = []
    for r in records:
        table, parts = {}, []
        for name, t in r.tensors.items():
            t = t.detach().contiguous().cpu()
            if t.dtype not in _DTYPES:
                raise TypeError(f"record {r.key!r} tensor {name!r}: unsupported dtype {t.dtype}")
            raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
            if cctx is not None:
                raw = cctx.compress(raw)
                parts.append((name, f"{r.key}/{name}.zst", "U8", [len(raw)], raw))
            else:
                parts.append((name, f"{r.key}/{name}", _DTYPES[t.dtype], list(t.shape), raw))
            table[name] = [_DTYPES[t.dtype], list(t.shape)]
        meta = {"k": r.key, "src": r.src, "b": list(r.bucket), "o": list(r.original_size),
                "c": list(r.crop_top_left),
                "cf": list(r.crop_top_left_flip) if r.crop_top_left_flip is not None else None, "t": table}
        if r.captions is not None:
            meta["cap"] = list(r.captions)
        if r.extra:
            meta.update(r.extra)
        items.append((meta, parts))
    return _write_items(path, items, cfg, compress, origin)


def _write_items(path: str, items: list[tuple[dict[str, Any], list[tuple[str, str, str, list[int], bytes]]]],
                 cfg: str, compressed: bool, origin: str) -> int:
    """Write a shard from records as bytes: [(record meta, [(name, header name, dtype, shape, bytes)])]. Each
    record's meta gets the CRC32 of each of its tensors' bytes ("crc"), the header its own CRC32 ("hcrc")."""
    header: dict[str, Any] = {}
    chunks: list[bytes] = []
    recs_meta = []
    pos = 0
    for meta, parts in items:
        crcs = {}
        for name, hname, dtype, shape, raw in parts:
            header[hname] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + len(raw)]}
            crcs[name] = zlib.crc32(raw)
            chunks.append(raw)
            pos += len(raw)
        recs_meta.append({**meta, "crc": crcs})
    data = b"".join(chunks)
    md = {"format": FORMAT, "cfg": cfg, "records": json.dumps(recs_meta, ensure_ascii=False),
          "crc32": f"{zlib.crc32(data):08x}", "data_len": str(len(data)), "compressed": "zstd" if compressed else ""}
    if origin:  # e.g. "import-npz:<folder>": these latents were not encoded here
        md["origin"] = origin
    header["__metadata__"] = md | {"hcrc": _HCRC_ZERO}  # last: found from the end of the header bytes
    hb = json.dumps(header, ensure_ascii=False).encode("utf-8")
    hb += b" " * (-len(hb) % 8)  # safetensors pads the header to 8 bytes
    at = hb.rindex(_HCRC_FIELD) + len(_HCRC_FIELD)
    hb = hb[:at] + f"{zlib.crc32(hb):08x}".encode() + hb[at + 8 :]
    atomic_write(path, lambda f: (f.write(struct.pack("<Q", len(hb))), f.write(hb), f.write(data)))
    return 8 + len(hb) + len(data)


def _header_crc_error(hb: bytes, md: dict[str, Any]) -> str:
    """Why the header bytes are not the ones written ('' when they are): its CRC32 with the hcrc value zeroed."""
    if md.get("format") == FORMAT_V1:
        return ""  # written before header checksums
    if "hcrc" not in md:
        return "no header checksum (damaged header)"
    at = hb.rfind(_HCRC_FIELD)
    if at < 0:
        return "header checksum field damaged"
    at += len(_HCRC_FIELD)
    crc = f"{zlib.crc32(hb[:at] + _HCRC_ZERO.encode() + hb[at + 8 :]):08x}"
    return "" if crc == md["hcrc"] else f"header checksum {crc} != {md['hcrc']} (damaged header)"


class ShardGone(StoreError):
    """A shard listed when the store was opened is no longer there (removed by a later cache.py run)."""


class DamagedRecord(StoreError):
    """A record whose bytes are not the ones written."""


def read_header(path: str) -> tuple[int, dict[str, Any]]:
    """(data start offset, header dict) of a shard, checking the header's checksum and the size it implies; raises
    StoreError (ShardGone when the file is not there)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise StoreError(f"truncated: {size} bytes")
            (hlen,) = struct.unpack("<Q", head)
            if hlen > size - 8:
                raise StoreError(f"header length {hlen} exceeds the file size {size}")
            hb = f.read(hlen)
            header = json.loads(hb)
    except FileNotFoundError:
        raise ShardGone(f"{os.path.basename(path)} is gone (removed by a cache.py run since the store was opened)") from None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise StoreError(f"unreadable header ({type(e).__name__}: {e})") from None
    md = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(md, dict) or md.get("format") not in (FORMAT, FORMAT_V1):
        raise StoreError(f"not a {FORMAT} shard (format {md.get('format') if isinstance(md, dict) else None!r})")
    why = _header_crc_error(hb, md)
    if why:
        raise StoreError(why)
    try:
        expect = 8 + hlen + int(md["data_len"])
    except (KeyError, ValueError):
        raise StoreError("header without a valid data_len") from None
    if size != expect:
        raise StoreError(f"size {size} != {expect} from its header (truncated or appended)")
    return 8 + hlen, header


def shard_crc(path: str, start: int, chunk: int = 1 << 24) -> str:
    """CRC32 of the data section of a shard."""
    crc = 0
    with open(path, "rb") as f:
        f.seek(start)
        while b := f.read(chunk):
            crc = zlib.crc32(b, crc)
    return f"{crc:08x}"


def _check_crc(path: str, start: int, expected: str) -> None:
    """Raise StoreError when the data section's CRC32 is not the one in the header."""
    crc = shard_crc(path, start)
    if crc != expected:
        raise StoreError(f"checksum {crc} != {expected} (corrupted data)")


@dataclass
class _Shard:
    name: str
    size: int
    mtime_ns: int
    crc: str
    cfg: str
    n: int = -1                  # records in its header (live or not); -1: not known yet (an index written before)
    start: int = -1
    header: dict[str, Any] | None = None
    records: list[dict[str, Any]] | None = None
    checked: bool = False        # a v1 shard's whole-data CRC already verified in this process
    bad: str = ""                # why it cannot be read in this process (damaged header, gone)

    def info(self) -> dict[str, Any]:
        """Its row in store_index.npz."""
        return {"name": self.name, "size": self.size, "mtime_ns": self.mtime_ns, "crc": self.crc, "cfg": self.cfg,
                "n": self.n}


def _shard_names(root: str) -> list[str]:
    d = os.path.join(root, SHARD_DIR)
    if not os.path.isdir(d):
        return []
    return sorted(n for n in os.listdir(d) if n.endswith(SHARD_EXT))


def key_hashes(keys: list[bytes]) -> np.ndarray:
    """64-bit blake2b of each key, uint64 (the same in every process, unlike hash())."""
    h8 = partial(hashlib.blake2b, digest_size=8)
    return np.frombuffer(b"".join(map(methodcaller("digest"), map(h8, keys))), dtype="<u8").copy()


def key_hash(kb: bytes) -> int:
    """key_hashes of one key, as a Python int."""
    return int.from_bytes(hashlib.blake2b(kb, digest_size=8).digest(), "little")


class KeyTable:
    """key -> (shard, record position, source fingerprint) in flat numpy arrays, for millions of keys.

    Sorted 64-bit key hashes locate a row by binary search; the keys themselves (one UTF-8 blob) confirm it, so a
    hash collision only costs a second comparison. About 40 bytes per key instead of ~270 with Python dicts, and
    DataLoader workers share or unpickle it without touching a million objects.
    """

    def __init__(self, keys: list[str], srcs: list[str], shard: np.ndarray, pos: np.ndarray):
        """Rows in shard order; when a key occurs more than once the last (newest shard) wins."""
        kb = list(map(str.encode, keys))
        h = key_hashes(kb)
        order = np.argsort(h, kind="stable")  # equal hashes stay in record order: the newest comes last
        hs = h[order]
        keep = np.ones(len(hs), dtype=bool)
        same = np.nonzero(hs[1:] == hs[:-1])[0]
        if len(same):  # runs of equal hashes: a key re-written in a newer shard (or a true collision)
            brk = np.nonzero(np.diff(same) != 1)[0]
            starts, ends = np.r_[same[:1], same[brk + 1]], np.r_[same[brk], same[-1:]] + 1
            for a, b in zip(starts.tolist(), ends.tolist()):
                seen: set[bytes] = set()
                for p in range(b, a - 1, -1):
                    k = kb[int(order[p])]
                    keep[p] = k not in seen
                    seen.add(k)
        idx = order[keep].tolist()
        self.hash = hs[keep]
        self.keys = StrColumn.from_list([keys[i] for i in idx])
        self.srcs = StrColumn.from_list([srcs[i] for i in idx])
        self.shard = np.asarray(shard, dtype=np.int32)[idx]
        self.pos = np.asarray(pos, dtype=np.int32)[idx]

    def __len__(self) -> int:
        return len(self.hash)

    def nbytes(self) -> int:
        """Memory held by the table's arrays."""
        return sum(a.nbytes for a in (self.hash, self.keys.blob, self.keys.offsets, self.srcs.blob,
                                      self.srcs.offsets, self.shard, self.pos))

    def find(self, key: str) -> int:
        """Row of key, -1 when absent."""
        kb = key.encode()
        h = key_hash(kb)
        i, n = int(self.hash.searchsorted(np.uint64(h))), len(self.hash)
        off, blob = self.keys.offsets, self.keys.blob
        while i < n and int(self.hash[i]) == h:
            if blob[off[i] : off[i + 1]].tobytes() == kb:
                return i
            i += 1
        return -1

    def find_many(self, keys: list[str]) -> np.ndarray:
        """Rows of many keys at once (-1 where absent)."""
        n = len(self.hash)
        if not keys or not n:
            return np.full(len(keys), -1, dtype=np.int64)
        kb = list(map(str.encode, keys))
        h = key_hashes(kb)
        rows = np.minimum(self.hash.searchsorted(h), n - 1)
        cand = np.nonzero(self.hash[rows] == h)[0].tolist()
        o, blob = self.keys.offsets.tolist(), self.keys.blob.tobytes()
        r = rows.tolist()
        out = np.full(len(keys), -1, dtype=np.int64)
        good = [j for j in cand if blob[o[r[j]] : o[r[j] + 1]] == kb[j]]
        out[good] = rows[good]
        for j in set(cand) - set(good):  # the key sits further along a run of equal hashes
            out[j] = self.find(keys[j])
        return out


class LatentStore:
    """Read side of the store: O(1) lookup by key, tensors are zero-copy views of memory-mapped shards.

    Every tensor read is checked against the CRC32 its record holds (a v1 shard: the whole shard once per process);
    a damaged record raises DamagedRecord, a damaged header or a shard removed meanwhile StoreError, and the damage
    is written down in <root>/damaged/ so that the next open leaves those records out and the next cache.py run
    re-encodes them (see docs/store.md).
    """

    def __init__(self, root: str, check_validity: bool = True, use_mmap: bool = True,
                 verify_reads: bool | None = None, read_lock: bool = False):
        self.root = root
        # mmap: zero-copy views. use_mmap=False reads each tensor with one pread instead, for filesystems where
        # page faults are expensive (network / sandboxed); bench/store_bench.py measures both.
        self.use_mmap = use_mmap
        self.verify_reads = check_validity if verify_reads is None else verify_reads
        self._fds: OrderedDict[int, int] = OrderedDict()
        self.check_validity = check_validity
        self.shards: list[_Shard] = []
        self.damaged: list[tuple[str, str]] = []           # shards with damage found: (name, why)
        self._set_aside: list[str] = []                    # ... of those, the ones left out whole
        self.damaged_records: dict[str, str] = {}          # key -> why, records left out or found damaged
        self._table = KeyTable([], [], np.zeros(0, np.int32), np.zeros(0, np.int32))  # key -> shard, record
        self._maps: OrderedDict[int, mmap.mmap] = OrderedDict()
        self._lock = threading.Lock()
        self._dctx = None
        self._reader = ReaderLock(root) if read_lock else None  # cache.py keeps the shards this reader may open
        self._open()

    # -- opening ---------------------------------------------------------------------------------------------
    def _load_merged(self) -> dict[str, tuple[_Shard, list[str], list[str], list[int]]]:
        """Shard name -> (shard, keys, srcs, record positions) from store_index.npz ({} when absent or unreadable)."""
        path = os.path.join(self.root, INDEX_FILE)
        if not os.path.exists(path):
            return {}
        try:
            with np.load(path) as z:
                info = json.loads(z["info"].tobytes().decode())
                if "key_off" in z:  # blob + offsets (keys may contain any character)
                    keys = StrColumn(z["keys"], z["key_off"]).tolist()
                    srcs = StrColumn(z["srcs"], z["src_off"]).tolist()
                else:  # the first format: newline-joined
                    keys = z["keys"].tobytes().decode("utf-8").split("\n") if len(z["keys"]) else []
                    srcs = z["srcs"].tobytes().decode("utf-8").split("\n") if len(z["srcs"]) else []
                counts = z["counts"].tolist()
                positions = z["positions"].tolist()
        except Exception as e:  # a damaged merged index only costs a header rescan
            log.warning("store index %s unreadable (%s); rescanning shard headers", path, e)
            return {}
        out, pos = {}, 0
        for s, n in zip(info["shards"], counts):
            out[s["name"]] = (_Shard(**s), keys[pos : pos + n], srcs[pos : pos + n], positions[pos : pos + n])
            pos += n
        return out

    def _open(self) -> None:
        merged = self._load_merged()
        reports = read_damage_reports(self.root)
        self._indexed, self._from_index = len(merged), 0  # shards in store_index.npz / taken from it unchanged
        self._left_out = 0  # records in the index left out for reported damage
        self._to_compact: set[str] = set()  # shards holding such records: rewritten by write_index
        self._listed: list[int] = []  # records each shard brought to the table (before newer shards superseded any)
        all_keys: list[str] = []
        all_srcs: list[str] = []
        shard_of: list[np.ndarray] = []
        pos_of: list[np.ndarray] = []
        for name in _shard_names(self.root):
            path = os.path.join(self.root, SHARD_DIR, name)
            st = os.stat(path)
            m = merged.get(name)
            bad = reports.get(name, {})
            if SHARD_REPORT in bad:
                self._report_damaged(name, bad[SHARD_REPORT][1])
                continue
            if m is not None and m[0].size == st.st_size and m[0].mtime_ns == st.st_mtime_ns:
                shard, keys, srcs, positions = m
                self._from_index += 1
            else:
                try:
                    start, header = read_header(path)
                    md = header["__metadata__"]
                    if self.check_validity:
                        _check_crc(path, start, md["crc32"])
                    recs = json.loads(md["records"])
                except (StoreError, KeyError, ValueError) as e:
                    self._report_damaged(name, str(e))
                    continue
                shard = _Shard(name, st.st_size, st.st_mtime_ns, md["crc32"], md["cfg"], len(recs), start, header,
                               recs, checked=self.check_validity)
                keys, srcs = [r["k"] for r in recs], [r["src"] for r in recs]
                positions = list(range(len(recs)))
            if bad:  # records found damaged when read: left out (cache.py re-encodes them, then rewrites the shard)
                self._to_compact.add(name)
                keep = [i for i, p in enumerate(positions) if p not in bad]
                for i, p in enumerate(positions):
                    if p in bad:
                        self.damaged_records[keys[i]] = f"{name}: {bad[p][1]}"
                self._left_out += len(positions) - len(keep)
                keys, srcs, positions = [keys[i] for i in keep], [srcs[i] for i in keep], [positions[i] for i in keep]
            self._listed.append(len(keys))
            shard_of.append(np.full(len(keys), len(self.shards), dtype=np.int32))
            pos_of.append(np.asarray(positions, dtype=np.int32))
            all_keys += keys
            all_srcs += srcs
            self.shards.append(shard)
        # Shards are sorted by creation time and the table keeps a key's last row: the newest record wins.
        if all_keys:
            self._table = KeyTable(all_keys, all_srcs, np.concatenate(shard_of), np.concatenate(pos_of))
        if self.damaged_records:
            log.warning("latent store: %d record(s) found damaged earlier are left out until cache.py re-encodes "
                        "them (%s)", len(self.damaged_records), os.path.join(self.root, DAMAGE_DIR))

    def _report_damaged(self, name: str, reason: str) -> None:
        self.damaged.append((name, reason))
        self._set_aside.append(name)
        log.warning("latent store: shard %s is damaged (%s); its records will be re-encoded", name, reason)

    # -- lookup ----------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._table)

    def __contains__(self, key: str) -> bool:
        return self._table.find(key) >= 0

    def contains_many(self, keys: list[str]) -> np.ndarray:
        """Bool per key, all at once (use this over `in` for a whole dataset)."""
        return self._table.find_many(keys) >= 0

    def keys(self) -> list[str]:
        """Every key (in hash order)."""
        return self._table.keys.tolist()

    def _loc(self, key: str) -> tuple[int, int]:
        i = self._table.find(key)
        if i < 0:
            raise KeyError(f"{key!r} is not in the latent store {self.root}")
        return int(self._table.shard[i]), int(self._table.pos[i])

    def is_valid(self, key: str, src: str, cfg: str) -> bool:
        """Whether the key is present and was produced from this source with these settings."""
        i = self._table.find(key)
        return i >= 0 and self._table.srcs[i] == src and self.shards[int(self._table.shard[i])].cfg == cfg

    def is_valid_many(self, keys: list[str], srcs: list[str], cfg: str) -> np.ndarray:
        """`is_valid` of many (key, source) pairs at once, bool per key (use this for a whole dataset)."""
        if len(keys) != len(srcs):
            raise ValueError(f"is_valid_many: {len(keys)} keys but {len(srcs)} source fingerprints")
        t = self._table
        rows = t.find_many(keys)
        cfg_ok = np.array([sh.cfg == cfg for sh in self.shards], dtype=bool)
        ok = rows >= 0
        ok[ok] = cfg_ok[t.shard[rows[ok]]]
        sel = np.flatnonzero(ok)
        found = rows[sel]
        blob = t.srcs.blob.tobytes()
        a, b = t.srcs.offsets[found].tolist(), t.srcs.offsets[found + 1].tolist()
        ok[sel] = [blob[x:y] == srcs[j].encode() for j, x, y in zip(sel.tolist(), a, b)]
        return ok

    def _ensure_header(self, si: int) -> _Shard:
        """The shard with its header read (and checked); StoreError when it cannot be (damage is reported)."""
        sh = self.shards[si]
        if sh.records is None:
            with self._lock:
                if sh.bad:
                    raise StoreError(f"latent store shard {sh.name}: {sh.bad}")
                if sh.records is None:
                    try:
                        start, header = read_header(os.path.join(self.root, SHARD_DIR, sh.name))
                        records = json.loads(header["__metadata__"]["records"])
                    except (StoreError, KeyError, ValueError) as e:
                        sh.bad = str(e)
                        if not isinstance(e, ShardGone):
                            self._write_report(sh.name, SHARD_REPORT, "", sh.bad)
                        raise StoreError(f"latent store shard {sh.name}: {sh.bad}") from None
                    sh.start, sh.header, sh.records = start, header, records
        return sh

    def _path(self, si: int) -> str:
        return os.path.join(self.root, SHARD_DIR, self.shards[si].name)

    def _map(self, si: int) -> mmap.mmap:
        with self._lock:
            mm = self._maps.get(si)
            if mm is None:
                with _opened(self._path(si)) as f:
                    # ACCESS_COPY: a private mapping is writable for torch.frombuffer yet never copies on read.
                    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
                self._maps[si] = mm
                if len(self._maps) > MAX_OPEN_SHARDS:
                    self._maps.popitem(last=False)  # tensors still referencing it keep the mapping alive
            else:
                self._maps.move_to_end(si)
            return mm

    def _fd(self, si: int) -> int:
        with self._lock:
            fd = self._fds.get(si)
            if fd is None:
                try:
                    fd = os.open(self._path(si), os.O_RDONLY)
                except FileNotFoundError:
                    raise ShardGone(f"latent store shard {self.shards[si].name} is gone (removed by a cache.py run "
                                    "since the store was opened)") from None
                self._fds[si] = fd
                if len(self._fds) > MAX_OPEN_SHARDS:
                    os.close(self._fds.popitem(last=False)[1])
            else:
                self._fds.move_to_end(si)
            return fd

    def _read(self, si: int, offset: int, length: int) -> bytearray:
        buf = bytearray(length)
        got = os.preadv(self._fd(si), [buf], offset)
        if got != length:
            raise StoreError(f"shard {self.shards[si].name}: short read at {offset} ({got} of {length} bytes)")
        return buf

    def record_info(self, key: str) -> dict[str, Any]:
        """The record's header entry (bucket, sizes, crops, tensor table); StoreError when its shard is damaged."""
        si, j = self._loc(key)
        return self._ensure_header(si).records[j]

    def first_readable(self, keys: Iterable[str]) -> tuple[str, dict[str, Any]] | None:
        """(key, record_info) of the first of `keys` whose shard header reads (None: none does)."""
        for key in keys:
            try:
                return key, self.record_info(key)
            except StoreError:
                continue
        return None

    def _check_v1(self, si: int, sh: _Shard) -> None:
        """A shard written before per-tensor checksums: its whole-data CRC, once per process."""
        if not sh.checked:
            try:
                _check_crc(self._path(si), sh.start, sh.header["__metadata__"]["crc32"])
            except StoreError as e:
                sh.bad = str(e)
                self._write_report(sh.name, SHARD_REPORT, "", sh.bad)
                raise StoreError(f"latent store shard {sh.name}: {sh.bad}") from None
            except FileNotFoundError:
                raise ShardGone(f"latent store shard {sh.name} is gone (removed by a cache.py run since the store "
                                "was opened)") from None
            sh.checked = True

    def get(self, key: str, names: list[str] | None = None) -> dict[str, Any]:
        """Tensors of a record (all, or `names`) plus bucket (w, h), original_size (h, w), crops. Each tensor's
        bytes are checked against the record's CRC32 (unless verify_reads is off): DamagedRecord when they differ."""
        si, j = self._loc(key)
        sh = self._ensure_header(si)
        rec = sh.records[j]
        crcs = rec.get("crc")
        if self.verify_reads and crcs is None:
            self._check_v1(si, sh)
        mm = self._map(si) if self.use_mmap else None
        compressed = bool(sh.header["__metadata__"].get("compressed"))
        out: dict[str, Any] = {"bucket": tuple(rec["b"]), "original_size": tuple(rec["o"]),
                               "crop_top_left": tuple(rec["c"]),
                               "crop_top_left_flip": tuple(rec["cf"]) if rec.get("cf") else None}
        for name in names if names is not None else rec["t"]:
            dtype_s, shape = rec["t"][name]
            dtype = _TORCH[dtype_s]
            a, b = sh.header[f"{key}/{name}.zst" if compressed else f"{key}/{name}"]["data_offsets"]
            if mm is not None:
                if b > a and self.verify_reads and crcs is not None:
                    with memoryview(mm) as view:  # no copy: the CRC reads the mapped pages the tensor will use
                        got = zlib.crc32(view[sh.start + a : sh.start + b])
                    self._check_tensor(sh, j, key, name, got, crcs)
                raw = mm[sh.start + a : sh.start + b] if compressed else None
            else:
                raw = self._read(si, sh.start + a, b - a) if b > a else bytearray()
                if b > a and self.verify_reads and crcs is not None:
                    self._check_tensor(sh, j, key, name, zlib.crc32(raw), crcs)
            if compressed:
                if self._dctx is None:
                    import zstandard

                    self._dctx = zstandard.ZstdDecompressor()
                data = bytearray(self._dctx.decompress(raw)) if b > a else bytearray()
                t = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
            else:
                n = int(np.prod(shape)) if shape else 1
                if b == a:
                    t = torch.empty(0, dtype=dtype)
                elif mm is not None:
                    t = torch.frombuffer(mm, dtype=dtype, count=n, offset=sh.start + a)
                else:
                    t = torch.frombuffer(raw, dtype=dtype)
            out[name] = t.reshape(shape)
        return out

    def _check_tensor(self, sh: _Shard, j: int, key: str, name: str, got: int, crcs: dict[str, int]) -> None:
        want = crcs.get(name)
        if want is not None and got == want:
            return
        why = (f"tensor {name!r}: no checksum in its record" if want is None else
               f"tensor {name!r}: checksum {got:08x} != {want:08x}")
        self.damaged_records[key] = f"{sh.name}: {why}"
        self._write_report(sh.name, j, key, why)
        raise DamagedRecord(f"latent store record {key!r} in shard {sh.name} is damaged ({why}); it is left out "
                            "until the next cache.py run re-encodes it")

    def _write_report(self, shard: str, pos: int, key: str, why: str) -> None:
        """Write damage down for the next open and the next cache.py run (the raised error says it here)."""
        write_damage_report(self.root, shard, pos, key, why)

    # -- maintenance -----------------------------------------------------------------------------------------
    def verify(self) -> list[tuple[str, str]]:
        """Re-check every record (per-tensor CRCs; a v1 shard's whole CRC): [(shard, reason)] of the shards with
        damage (also added to .damaged), each written down (damaged/) so the next cache.py run re-encodes exactly
        what is damaged."""
        bad = []
        for si, sh in enumerate(self.shards):
            path = self._path(si)
            try:
                start, header = read_header(path)
                recs = json.loads(header["__metadata__"]["records"])
                if not recs or recs[0].get("crc") is None:
                    _check_crc(path, start, header["__metadata__"]["crc32"])
                    continue
            except (StoreError, KeyError, ValueError) as e:
                bad.append((sh.name, str(e)))
                self._report_damaged(sh.name, str(e))
                write_damage_report(self.root, sh.name, SHARD_REPORT, "", str(e))
                continue
            compressed = bool(header["__metadata__"].get("compressed"))
            damaged = []
            with open(path, "rb") as f:
                for j, rec in enumerate(recs):
                    for name in rec["t"]:
                        a, b = header[f"{rec['k']}/{name}.zst" if compressed else f"{rec['k']}/{name}"]["data_offsets"]
                        f.seek(start + a)
                        got, want = zlib.crc32(f.read(b - a)), rec["crc"].get(name)
                        if got != want:
                            why = f"tensor {name!r}: checksum {got:08x} != {want if want is None else f'{want:08x}'}"
                            damaged.append(f"{rec['k']!r} ({why})")
                            self.damaged_records[rec["k"]] = f"{sh.name}: {why}"
                            write_damage_report(self.root, sh.name, j, rec["k"], why)
                            break
            if damaged:
                bad.append((sh.name, f"{len(damaged)} damaged record(s): {', '.join(damaged[:3])}"
                            + (" ..." if len(damaged) > 3 else "")))
                self.damaged.append(bad[-1])  # listed, not set aside: its intact records stay
        return bad

    def _live_rows(self) -> list[list[int]]:
        """Per shard, the table rows of its live records in record order."""
        t = self._table
        order = np.lexsort((t.pos, t.shard))  # live rows by (shard, position)
        bounds = np.searchsorted(t.shard[order], np.arange(len(self.shards) + 1))
        return [order[bounds[si] : bounds[si + 1]].tolist() for si in range(len(self.shards))]

    def _records_in(self, si: int) -> int:
        """How many records a shard holds, live or dead (its header, read when the index did not say)."""
        sh = self.shards[si]
        if sh.n < 0:
            sh.n = len(self._ensure_header(si).records)
        return sh.n

    def write_index(self, compact_dead_share: float = COMPACT_DEAD_SHARE) -> str:
        """Write store_index.npz (the newest record per key only); rewrite the shards whose dead records (superseded
        or damaged) pass `compact_dead_share` of their records; remove shards with no live record and set damaged
        ones aside as <name>.damaged. Order, so a kill at any point loses nothing: new shards written, then the
        index, then old shards removed (kept while a train.py reads this store: the next run removes them)."""
        live = self._live_rows()
        keys_all, srcs_all = self._table.keys.tolist(), self._table.srcs.tolist()
        entries: list[tuple[_Shard, list[str], list[str], list[int]]] = []
        retire: list[str] = []
        for si, sh in enumerate(self.shards):
            rows = live[si]
            if not rows:
                retire.append(sh.name)  # fully superseded
                continue
            try:  # an index written before "n" was kept: the header says, read only where a record died since
                dead = (self._records_in(si) if sh.n >= 0 or len(rows) < self._listed[si] else len(rows)) - len(rows)
            except StoreError as e:  # its header turned out damaged: set aside, its records re-encoded next run
                self._report_damaged(sh.name, str(e))
                continue
            rk, rs, rp = [keys_all[r] for r in rows], [srcs_all[r] for r in rows], self._table.pos[rows].tolist()
            if dead > 0 and (dead > compact_dead_share * sh.n or sh.name in self._to_compact):
                new = self._compact(si, rp)
                if new is not None:
                    retire.append(sh.name)
                    got = {p: i for i, p in enumerate(rp)}
                    kept = [got[p] for p in new[1]]
                    entries.append((new[0], [rk[i] for i in kept], [rs[i] for i in kept], list(range(len(kept)))))
                    continue
            # Only records that are live here go in; superseded ones would otherwise shadow newer shards.
            entries.append((sh, rk, rs, rp))
        entries.sort(key=lambda e: e[0].name)  # compacted shards are the newest: their records stay the winners
        path = os.path.join(self.root, INDEX_FILE)
        tmp = temp_path(path, ".npz")
        kc = StrColumn.from_list([k for e in entries for k in e[1]])
        sc = StrColumn.from_list([s for e in entries for s in e[2]])
        positions = [np.asarray(e[3], dtype=np.int64) for e in entries]
        try:
            np.savez(tmp, info=np.frombuffer(json.dumps({"shards": [e[0].info() for e in entries]}).encode(),
                                             dtype=np.uint8),
                     keys=kc.blob, key_off=kc.offsets, srcs=sc.blob, src_off=sc.offsets,
                     counts=np.asarray([len(e[1]) for e in entries], dtype=np.int64),
                     positions=np.concatenate(positions) if positions else np.zeros(0, np.int64))
            commit_file(tmp, path)
        except OSError as e:
            remove_quietly(tmp)
            raise with_path(e, path)
        if retire and readers_present(self.root):
            log.info("latent store: %d superseded shard(s) kept while a training run reads this store; the next "
                     "cache.py run removes them", len(retire))
        else:
            for name in retire:
                remove_quietly(os.path.join(self.root, SHARD_DIR, name))
        for name in self._set_aside:
            p = os.path.join(self.root, SHARD_DIR, name)
            if os.path.exists(p):
                os.replace(p, p + ".damaged")
        clear_damage_reports(self.root)
        return path

    def _compact(self, si: int, positions: list[int]) -> tuple[_Shard, list[int]] | None:
        """Rewrite shard si with only the records at `positions` (each checked; a damaged one is left out and
        reported): (the new shard, the positions it kept), or None when the shard cannot be read."""
        sh = self._ensure_header(si)
        md = sh.header["__metadata__"]
        compressed = bool(md.get("compressed"))
        path = self._path(si)
        items, kept = [], []
        try:
            if sh.records and sh.records[0].get("crc") is None:
                _check_crc(path, sh.start, md["crc32"])
            with open(path, "rb") as f:
                for p in positions:
                    rec = sh.records[p]
                    parts, ok = [], True
                    for name, (dtype, shape) in rec["t"].items():
                        hname = f"{rec['k']}/{name}.zst" if compressed else f"{rec['k']}/{name}"
                        a, b = sh.header[hname]["data_offsets"]
                        f.seek(sh.start + a)
                        raw = f.read(b - a)
                        want = (rec.get("crc") or {}).get(name, zlib.crc32(raw))
                        if zlib.crc32(raw) != want:
                            self.damaged_records[rec["k"]] = f"{sh.name}: tensor {name!r} checksum"
                            log.warning("latent store: record %r of %s is damaged; left out (re-encoded by the "
                                        "next cache.py run)", rec["k"], sh.name)
                            ok = False
                            break
                        parts.append((name, hname, "U8" if compressed else dtype,
                                      [len(raw)] if compressed else shape, raw))
                    if ok:
                        meta = {k: v for k, v in rec.items() if k != "crc"}
                        items.append((meta, parts))
                        kept.append(p)
        except (OSError, StoreError) as e:
            log.warning("latent store: shard %s not compacted (%s)", sh.name, e)
            return None
        name = f"{time.time_ns():020d}-c{si:08d}{SHARD_EXT}"  # the newest name: its records stay the winners
        new_path = os.path.join(self.root, SHARD_DIR, name)
        _write_items(new_path, items, md["cfg"], compressed, md.get("origin", ""))
        st = os.stat(new_path)
        start, header = read_header(new_path)
        log.info("latent store: compacted %s (%d of %d records live) into %s", sh.name, len(kept), sh.n, name)
        return _Shard(name, st.st_size, st.st_mtime_ns, header["__metadata__"]["crc32"], md["cfg"], len(kept)), kept

    def index_is_current(self) -> bool:
        """Whether store_index.npz already says what write_index would write (so a read-only store can be used)."""
        return (not self.damaged and not self._left_out and os.path.exists(os.path.join(self.root, INDEX_FILE))
                and self._from_index == len(self.shards) == self._indexed)

    def close(self) -> None:
        self._maps.clear()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        if self._reader is not None:
            self._reader.release()

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers get their own mmaps and lock (the readers lock stays with the process that took it).
        st = self.__dict__.copy()
        st["_maps"], st["_fds"], st["_lock"], st["_dctx"], st["_reader"] = OrderedDict(), OrderedDict(), None, None, None
        return st

    def __setstate__(self, st: dict[str, Any]) -> None:
        self.__dict__.update(st)
        self._lock = threading.Lock()


class _opened:
    """open(path, 'rb') whose missing file is ShardGone (a later cache.py run removed it), not a crash."""

    def __init__(self, path: str):
        try:
            self.f = open(path, "rb")
        except FileNotFoundError:
            raise ShardGone(f"latent store shard {os.path.basename(path)} is gone (removed by a cache.py run since "
                            "the store was opened)") from None

    def __enter__(self):
        return self.f

    def __exit__(self, *exc: Any) -> None:
        self.f.close()


# ---------------------------------------------------------------------------------------------------------------------
# Damage found when reading: written down, one file per damaged record (or shard), read back on every open


def _report_path(root: str, shard: str, pos: int) -> str:
    return os.path.join(root, DAMAGE_DIR, f"{shard}.{'shard' if pos == SHARD_REPORT else pos}.json")


def write_damage_report(root: str, shard: str, pos: int, key: str, why: str) -> None:
    """Note that record `pos` (SHARD_REPORT: the whole shard) of `shard` is damaged; best effort (read-only store:
    only the log says it). One file per record, so concurrent readers never write the same file twice over."""
    try:
        os.makedirs(os.path.join(root, DAMAGE_DIR), exist_ok=True)
        body = json.dumps({"shard": shard, "pos": pos, "key": key, "why": why, "host": HOST, "pid": os.getpid(),
                           "time": time.strftime("%Y-%m-%d %H:%M:%S")}).encode()
        atomic_write(_report_path(root, shard, pos), lambda f: f.write(body))
    except OSError as e:
        log.warning("latent store: cannot record the damage in %s (%s)", os.path.join(root, DAMAGE_DIR), e)


def read_damage_reports(root: str) -> dict[str, dict[int, tuple[str, str]]]:
    """shard -> {record position (SHARD_REPORT: whole shard): (key, why)} from <root>/damaged/."""
    d = os.path.join(root, DAMAGE_DIR)
    try:
        names = os.listdir(d)
    except OSError:
        return {}
    out: dict[str, dict[int, tuple[str, str]]] = {}
    for n in names:
        if not n.endswith(".json") or is_temp(n):
            continue
        try:
            with open(os.path.join(d, n), "rb") as f:
                r = json.loads(f.read())
            out.setdefault(str(r["shard"]), {})[int(r["pos"])] = (str(r.get("key", "")), str(r.get("why", "")))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a report that cannot be read is no evidence of anything
    return out


def clear_damage_reports(root: str) -> None:
    """Remove the reports whose shard is no longer in shards/ (rewritten without the record, or set aside)."""
    present = set(_shard_names(root))
    for shard in read_damage_reports(root).keys() - present:
        for n in os.listdir(os.path.join(root, DAMAGE_DIR)):
            if n.startswith(shard + "."):
                remove_quietly(os.path.join(root, DAMAGE_DIR, n))


class ShardWriter:
    """Collects records and writes a shard whenever `shard_size_mb` is reached (and on close)."""

    def __init__(self, root: str, cfg: str, rank: int = 0, shard_size_mb: int = 256, compress: bool = False,
                 origin: str = ""):
        self.dir = os.path.join(root, SHARD_DIR)
        os.makedirs(self.dir, exist_ok=True)
        self.cfg, self.rank, self.compress, self.origin = cfg, rank, compress, origin
        self.limit = max(1, int(shard_size_mb)) << 20
        self.pending: list[Record] = []
        self.pending_bytes = 0
        self.seq = 0
        self.written: list[str] = []
        self.records_written = 0

    def add(self, r: Record) -> None:
        self.pending.append(r)
        self.pending_bytes += r.nbytes()
        if self.pending_bytes >= self.limit:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"{time.time_ns():020d}-r{self.rank:04d}-{self.seq:05d}{SHARD_EXT}"
        write_shard(os.path.join(self.dir, name), self.pending, self.cfg, self.compress, self.origin)
        self.written.append(name)
        self.records_written += len(self.pending)
        self.seq += 1
        self.pending, self.pending_bytes = [], 0

    def close(self) -> None:
        self.flush()


class BackgroundWriter:
    """Runs a ShardWriter in a thread so the encoder never waits for the disk; errors surface on put/close."""

    def __init__(self, writer: ShardWriter, max_queue: int = 64):
        self.writer = writer
        self.q: Queue = Queue(max_queue)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="shard-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            r = self.q.get()
            if r is None:
                break
            if self.error is None:
                try:
                    self.writer.add(r)
                except BaseException as e:  # re-raised in the caller's thread
                    self.error = e
        if self.error is None:
            try:
                self.writer.close()
            except BaseException as e:
                self.error = e

    def put(self, r: Record) -> None:
        self._raise()
        self.q.put(r)

    def close(self) -> None:
        self.q.put(None)
        self.thread.join()
        self._raise()

    def _raise(self) -> None:
        if isinstance(self.error, OSError):  # a full disk stays an OSError naming the shard (one line at the top)
            raise self.error
        if self.error is not None:
            raise RuntimeError(f"shard writer failed: {self.error}") from self.error


def source_fingerprint(path: str, content_hash: bool = False) -> str:
    """Identity of a source image: size + mtime (cheap) or a content hash ('' when the file is missing). A locator
    (`<container>::<member>`, a row of a dataset table) is its container's size + mtime and the member."""
    member = ""
    if is_locator(path):
        path, member = split_locator(path)
    try:
        st = os.stat(path)
    except OSError:
        return ""
    if member:
        return f"s{st.st_size}:{st.st_mtime_ns}:{member}"
    if not content_hash:
        return f"s{st.st_size}:{st.st_mtime_ns}"
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while b := f.read(1 << 20):
            h.update(b)
    return "h" + h.hexdigest()


def store_cfg_fingerprint(vae_identity: str, bucket_key: str, latent_dtype: str, store_posterior: bool,
                          flip_aug: bool, text_identity: str = "", text_variants: int = 1) -> str:
    """Everything besides the source image that decides a record's content."""
    return (f"vae={vae_identity};{bucket_key};dtype={latent_dtype};post={int(store_posterior)};flip={int(flip_aug)};"
            f"te={text_identity};tv={text_variants}")
