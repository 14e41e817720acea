"""Columns without per-entry Python objects: strings as one UTF-8 blob + offsets, numbers as numpy arrays.

`StrColumn` is a finished column (what the dataset index saves and memory-maps). `PackedRows` is what the index
build collects the readers' `Rows` chunks into: each chunk is packed as it arrives (its strings joined into one
bytes object, its numbers into arrays, its metadata dicts encoded to JSON once) and then dropped, so a 10M-entry
dataset is never 10M dicts plus 40M strings in one process, only the packed bytes it will save.
"""

from __future__ import annotations

import json
import json.encoder
from typing import Any, Callable, Iterable, Sequence

import numpy as np


class StrColumn:
    """An immutable column of strings stored as one UTF-8 blob plus offsets (no per-string Python objects)."""

    def __init__(self, blob: np.ndarray, offsets: np.ndarray):
        self.blob, self.offsets = blob, offsets

    @classmethod
    def from_list(cls, items: Sequence[str]) -> "StrColumn":
        b = StrBuilder()
        b.add(items if isinstance(items, list) else list(items))
        return b.finish()

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        return self.blob[self.offsets[i] : self.offsets[i + 1]].tobytes().decode("utf-8")

    def tolist(self, a: int = 0, b: int | None = None) -> list[str]:
        """The strings of rows [a, b) (all by default)."""
        b = len(self) if b is None else b
        o = self.offsets[a : b + 1].tolist()
        if not o:
            return []
        base = o[0]
        data = self.blob[o[0] : o[-1]]
        if not len(data) or int(data.max()) < 0x80:  # ASCII: one decode, then str slices
            text = data.tobytes().decode("ascii")
            return [text[x - base : y - base] for x, y in zip(o, o[1:])]
        raw = data.tobytes()
        return [raw[x - base : y - base].decode("utf-8") for x, y in zip(o, o[1:])]

    def tolist_at(self, rows) -> list[str]:
        """The strings of `rows`."""
        return [self[i] for i in np.asarray(rows).tolist()]

    @staticmethod
    def concat(a: "StrColumn", b: "StrColumn") -> "StrColumn":
        return StrColumn(np.concatenate([a.blob, b.blob]), np.concatenate([a.offsets, b.offsets[1:] + a.offsets[-1]]))

    def lengths(self) -> np.ndarray:
        """Byte length of every string."""
        return np.diff(self.offsets)

    def endswith_ascii(self, suffix: str) -> np.ndarray:
        """Bool per string: ends with the ASCII `suffix`, case-insensitively (vectorised: no string objects)."""
        n, end = len(suffix), self.offsets[1:]
        out = self.lengths() >= n
        blob = np.asarray(self.blob)
        for k, ch in enumerate(suffix.encode("ascii")):
            at = np.where(out, end - n + k, 0)
            c = blob[at] if len(blob) else np.zeros(len(at), np.uint8)
            out &= (c == ord(chr(ch).lower())) | (c == ord(chr(ch).upper()))
        return out

    def take(self, rows: np.ndarray) -> "StrColumn":
        """The strings of `rows` (any order, repeats allowed), as a new column; the blob is gathered in slices of
        rows, never one index per byte of the whole column."""
        rows = np.asarray(rows, dtype=np.int64)
        lens = self.lengths()[rows]
        offsets = np.zeros(len(rows) + 1, np.int64)
        np.cumsum(lens, out=offsets[1:])
        blob = np.empty(int(offsets[-1]), np.uint8)
        step = 1 << 16
        for a in range(0, len(rows), step):
            r, n = rows[a : a + step], lens[a : a + step]
            idx = np.repeat(self.offsets[r] - offsets[a : a + len(r)], n) + np.arange(offsets[a], offsets[a + len(r)])
            blob[offsets[a] : offsets[a + len(r)]] = self.blob[idx]
        return StrColumn(blob, offsets)


class StrBuilder:
    """Appends lists of strings to a future StrColumn, one bytes object + one lengths array per list."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.lens: list[np.ndarray] = []

    def add(self, items: list[str]) -> np.ndarray:
        """Append items; returns their byte lengths."""
        blob = "".join(items).encode("utf-8")
        lens = np.fromiter(map(len, items), dtype=np.int64, count=len(items))
        if len(blob) != int(lens.sum()):  # non-ASCII text: byte lengths differ from character lengths
            lens = np.fromiter((len(s.encode("utf-8")) for s in items), dtype=np.int64, count=len(items))
        self.parts.append(blob)
        self.lens.append(lens)
        return lens

    def add_encoded(self, blob: bytes, lens: np.ndarray) -> None:
        """Append strings already encoded: their UTF-8 bytes one after the other and the length of each."""
        self.parts.append(blob)
        self.lens.append(lens)

    def finish(self) -> StrColumn:
        """The column; the builder is emptied part by part while the blob is filled (one copy of the bytes)."""
        lens = np.concatenate(self.lens) if self.lens else np.zeros(0, np.int64)
        offsets = np.zeros(len(lens) + 1, np.int64)
        np.cumsum(lens, out=offsets[1:])
        blob = np.empty(int(offsets[-1]), np.uint8)
        pos = 0
        self.parts.reverse()
        while self.parts:
            part = self.parts.pop()
            blob[pos : pos + len(part)] = np.frombuffer(part, np.uint8)
            pos += len(part)
        self.lens = []
        return StrColumn(blob, offsets)


def json_encoder() -> Callable[[Any], str]:
    """Compact JSON of one value (default=str), through one C encoder object when available."""
    if json.encoder.c_make_encoder is None:
        return json.JSONEncoder(ensure_ascii=False, default=str, separators=(",", ":")).encode
    # Same arguments JSONEncoder.iterencode passes (no circular check: parsed metadata has no cycles); building
    # the encoder once instead of per json.dumps call is what makes a million entries cheap.
    enc = json.encoder.c_make_encoder(None, str, json.encoder.encode_basestring, None, ":", ",", False, False, True)
    return lambda o: "".join(enc(o, 0))


_SENTINEL = "\x00sdtrain"  # between the values of one batch encode: "\u0000sdtrain" (control characters are escaped)


def encode_many(values: list[Any], enc: Callable[[Any], str] | None = None) -> tuple[bytes, np.ndarray]:
    """Compact JSON of each value ("" for empty ones) as (the concatenated UTF-8 bytes, byte length of each): one C
    encoder call for the whole list (values interleaved with a sentinel string, whose encoded form is then cut out
    with numpy), 2-3x faster than an encode per value. Falls back to one encode per value when the sentinel's count
    is off (a value holding that very string) or the C encoder is missing."""
    enc = enc or json_encoder()
    n = len(values)
    keep = np.fromiter(map(bool, values), bool, n)
    lens = np.zeros(n, np.int64)
    if not keep.any():
        return b"", lens
    sel = values if keep.all() else [v for v in values if v]
    c_enc = json.encoder.c_make_encoder
    if c_enc is not None and len(sel) > 1:
        mixed = [_SENTINEL] * (2 * len(sel) - 1)
        mixed[::2] = sel
        raw = enc(mixed).encode("utf-8", "surrogatepass")
        arr = np.frombuffer(raw, np.uint8)
        pat = np.frombuffer(("," + json.encoder.encode_basestring(_SENTINEL) + ",").encode(), np.uint8)
        cand = np.flatnonzero(arr == pat[2]) - 2  # the backslash: rare in anything else
        cand = cand[(cand >= 0) & (cand + len(pat) <= len(arr))]
        for j in range(len(pat)):
            cand = cand[arr[cand + j] == pat[j]]
        if len(cand) == len(sel) - 1:
            starts = np.concatenate([[1], cand + len(pat)])
            ends = np.concatenate([cand, [len(arr) - 1]])
            lens[keep] = ends - starts
            drop = np.zeros(len(arr), bool)
            drop[[0, len(arr) - 1]] = True
            drop[(cand[:, None] + np.arange(len(pat))).ravel()] = True
            return arr[~drop].tobytes(), lens
    texts = [enc(v) for v in sel]
    blob = "".join(texts).encode("utf-8", "surrogatepass")
    lens[keep] = [len(t.encode("utf-8", "surrogatepass")) for t in texts]
    return blob, lens


DESCRIPTION_FIELDS = ("description", "nl_caption")  # data/captions.description_of reads these


class PackedRows:
    """The dataset's rows, packed chunk by chunk as the readers stream them (see the module docstring).

    Metadata dicts are JSON-encoded on arrival; `counted` marks the entries that have a field of `counted_fields`
    (what count_metadata reads), so counting later decodes only those. With `keep_dicts` the parsed dicts are also
    kept (the euge-trainer hooks need them as parsed)."""

    STRS = ("keys", "paths", "captions", "metadata", "descriptions")

    def __init__(self, counted_fields: frozenset[str], describe: Callable[[dict[str, Any]], str],
                 keep_dicts: bool = False):
        self._b = {n: StrBuilder() for n in self.STRS}
        self._nums: dict[str, list[np.ndarray]] = {n: [] for n in ("widths", "heights", "subset", "counted", "hash")}
        self.origins: list[tuple[int, str]] = []  # (first row, origin) runs
        self.dicts: list[dict[str, Any]] | None = [] if keep_dicts else None
        self._counted, self._describe, self._enc = counted_fields, describe, json_encoder()
        self.n = 0
        self.cols: dict[str, Any] = {}

    def __len__(self) -> int:
        return self.n

    def add(self, rows) -> None:
        """Pack one `Rows` chunk (data/readers.Rows)."""
        n = len(rows.keys)
        if not n:
            return
        enc, counted, describe = self._enc, self._counted, self._describe
        mds = rows.metadata
        self._b["keys"].add(rows.keys)
        self._b["paths"].add(rows.paths)
        self._b["captions"].add(rows.captions)
        self._b["metadata"].add_encoded(*encode_many(mds, enc))
        self._b["descriptions"].add([describe(m) if m and any(f in m for f in DESCRIPTION_FIELDS) else ""
                                     for m in mds])
        self._nums["counted"].append(np.fromiter((bool(m) and not counted.isdisjoint(m) for m in mds), bool, n))
        self._nums["hash"].append(np.fromiter(map(hash, rows.keys), np.int64, n))
        self._nums["widths"].append(np.asarray(rows.widths, np.int32))
        self._nums["heights"].append(np.asarray(rows.heights, np.int32))
        self._nums["subset"].append(np.asarray(rows.subset, np.int16))
        o = rows.origin
        runs = [(0, o[0])] if o.count(o[0]) == n else [(i, o[i]) for i in range(n) if i == 0 or o[i] != o[i - 1]]
        for a, org in runs:  # (first row, origin) runs: usually one per chunk
            if not self.origins or self.origins[-1][1] != org:
                self.origins.append((self.n + a, org))
        if self.dicts is not None:
            self.dicts.extend(mds)
        self.n += n

    def finish(self) -> "PackedRows":
        """Turn the parts into columns (self.cols: StrColumns and arrays); returns self."""
        for name in self.STRS:  # one column's parts and blob at a time
            self.cols[name] = self._b.pop(name).finish()
        for name, parts in self._nums.items():
            self.cols[name] = (np.concatenate(parts) if parts else
                               np.zeros(0, {"counted": bool, "hash": np.int64, "subset": np.int16}.get(name, np.int32)))
        self._nums = {}
        return self

    def append(self, rows) -> None:
        """Add a `Rows` chunk after finish (the latent store's rows of entries gone from the sources)."""
        more = PackedRows(self._counted, self._describe, self.dicts is not None)
        more.add(rows)
        more.finish()
        self.origins += [(self.n + a, o) for a, o in more.origins]
        for name, col in self.cols.items():
            other = more.cols[name]
            self.cols[name] = StrColumn.concat(col, other) if isinstance(col, StrColumn) else np.concatenate([col, other])
        if self.dicts is not None:
            self.dicts += more.dicts
        self.n += more.n

    def __getattr__(self, name: str):
        cols = self.__dict__.get("cols")
        if cols and name in cols:
            return cols[name]
        raise AttributeError(name)

    def origin_of(self, i: int) -> str:
        starts = [a for a, _ in self.origins]
        return self.origins[int(np.searchsorted(starts, i, side="right")) - 1][1]

    def keys_list(self) -> list[str]:
        """Every key so far (a temporary list; before or after finish)."""
        if "keys" in self.cols:
            return self.cols["keys"].tolist()
        return [k for part, lens in zip(self._b["keys"].parts, self._b["keys"].lens)
                for k in _split(part, lens)]

    def take(self, rows: np.ndarray) -> None:
        """Keep only `rows`, in that order (finished columns)."""
        starts = [a for a, _ in self.origins]
        where = np.searchsorted(starts, rows, side="right") - 1
        firsts = np.concatenate([[0], np.flatnonzero(np.diff(where)) + 1]).astype(np.int64) if len(rows) else []
        runs = [(j, self.origins[int(where[j])][1]) for j in list(firsts)]
        self.origins = runs
        for name, col in self.cols.items():
            self.cols[name] = col.take(rows) if isinstance(col, StrColumn) else col[rows]
        if self.dicts is not None:
            self.dicts = [self.dicts[i] for i in rows.tolist()]
        self.n = len(rows)

    def metadata_dicts(self, rows: Iterable[int]) -> Iterable[dict[str, Any]]:
        """The metadata dicts of rows, decoded one at a time from the packed JSON."""
        col: StrColumn = self.cols["metadata"]
        for i in rows:
            s = col[i]
            yield json.loads(s) if s else {}


def _split(part: bytes, lens: np.ndarray) -> list[str]:
    o = np.concatenate([[0], np.cumsum(lens)]).tolist()
    return [part[a:b].decode("utf-8") for a, b in zip(o, o[1:])]
