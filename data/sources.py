"""Data sources: image folders with caption files, and JSON / JSONL / CSV / SQLite metadata files.

A subset reads its `metadata_files` when it has any (its `image_dirs` then only serve the fallback lookup of
missing image paths by file name); otherwise it scans its `image_dirs` for images and same-stem caption files.
Keys are the metadata keys (or, for folders, CSV and SQLite without a `key` column, the image file stem) and
must be unique over the whole dataset: duplicates are an error that lists them.
"""

from __future__ import annotations

import csv
import hashlib
import json
import json.scanner
import os
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any, Callable

import numpy as np

from .images import IMAGE_EXTENSIONS

METADATA_EXTENSIONS = (".json", ".jsonl", ".csv", ".sqlite", ".sqlite3", ".db")
# Columns / fields with a meaning of their own; everything else is carried as metadata for the hooks.
PATH_FIELD, CAPTION_FIELDS = "image_path", ("caption", "tags")


@dataclass
class SubsetSpec:
    """A subset with every [data] fallback resolved (plain values, picklable)."""

    image_dirs: list[str]
    metadata_files: list[str]
    caption_extension: str
    num_repeats: int
    is_reg: bool
    class_tokens: str
    flip_aug: bool
    random_crop: bool
    loss_weight: float
    caption: dict[str, Any] = field(default_factory=dict)  # CaptionOptions fields


def resolve_subsets(data) -> list[SubsetSpec]:
    """Subsets of a DataConfig ([data] itself when there are none), validated."""
    from .captions import options_for_subset

    subs = list(data.subsets)
    if not subs:
        from types import SimpleNamespace

        subs = [SimpleNamespace(image_dirs=list(data.image_dirs), metadata_files=list(data.metadata_files),
                                caption_extension=None, num_repeats=data.num_repeats, is_reg=False, class_tokens="",
                                shuffle_caption=None, keep_tokens=None, caption_dropout_rate=None,
                                caption_tag_dropout_rate=None, caption_prefix=None, caption_suffix=None,
                                flip_aug=None, random_crop=None, loss_weight=1.0)]
    out = []
    for i, s in enumerate(subs):
        if not s.image_dirs and not s.metadata_files:
            raise ValueError(f"[data] subset {i}: needs image_dirs or metadata_files (both are empty)")
        if int(s.num_repeats) < 0:
            raise ValueError(f"[data] subset {i}: num_repeats = {s.num_repeats} must be >= 0")
        for p in list(s.image_dirs):
            if not os.path.isdir(p):
                raise FileNotFoundError(f"[data] subset {i}: image_dirs entry {p!r} is not a directory")
        for p in list(s.metadata_files):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"[data] subset {i}: metadata file {p!r} does not exist")
            if not p.lower().endswith(METADATA_EXTENSIONS):
                raise ValueError(f"[data] subset {i}: metadata file {p!r} has an unknown extension; "
                                 f"allowed: {', '.join(METADATA_EXTENSIONS)}")
        opts = options_for_subset(s, data)
        ext = s.caption_extension if s.caption_extension is not None else data.caption_extension
        out.append(SubsetSpec(
            image_dirs=[os.path.abspath(p) for p in s.image_dirs],
            metadata_files=[os.path.abspath(p) for p in s.metadata_files],
            caption_extension=ext if ext.startswith(".") else "." + ext,
            num_repeats=int(s.num_repeats), is_reg=bool(s.is_reg), class_tokens=s.class_tokens or "",
            flip_aug=bool(data.flip_aug if s.flip_aug is None else s.flip_aug),
            random_crop=bool(data.random_crop if s.random_crop is None else s.random_crop),
            loss_weight=float(s.loss_weight), caption=opts.__dict__.copy()))
    return out


def _walk(dirs: list[str], recursive: bool, threads: int, stat: bool) -> list[tuple[str, int, int]]:
    """(path, size, mtime_ns) of image files under dirs (size, mtime -1 unless stat), one folder level at a time.

    Folders of a level are scanned in parallel threads (scandir and stat release the GIL).
    """
    out: list[tuple[str, int, int]] = []

    def scan(d: str) -> tuple[list[str], list[tuple[str, int, int]]]:
        subdirs, files = [], []
        with os.scandir(d) as it:
            for e in it:
                if e.is_dir(follow_symlinks=True):
                    if recursive:
                        subdirs.append(e.path)
                elif e.name.lower().endswith(IMAGE_EXTENSIONS):
                    if stat:
                        st = e.stat()
                        files.append((e.path, st.st_size, st.st_mtime_ns))
                    else:
                        files.append((e.path, -1, -1))
        return subdirs, files

    level = list(dirs)
    with ThreadPoolExecutor(max(1, threads)) as ex:
        while level:
            nxt: list[str] = []
            for subdirs, files in (ex.map(scan, level) if len(level) > 1 else map(scan, level)):
                nxt += subdirs
                out += files
            level = nxt
    out.sort()
    return out


def list_images(dirs: list[str], recursive: bool, threads: int = 16) -> list[tuple[str, int, int]]:
    """(path, size, mtime_ns) of every image file under dirs, sorted by path (one stat per file via scandir)."""
    return _walk(dirs, recursive, threads, stat=True)


def _stat_sig(path: str) -> str:
    try:
        st = os.stat(path)
        return f"{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        return "-"


def inputs_fingerprint(subsets: list[SubsetSpec], recursive: bool, extra: str) -> str:
    """Hash of everything the index depends on: settings, metadata file stats, image folder listings."""
    h = hashlib.sha256(extra.encode())
    h.update(repr(recursive).encode())
    for s in subsets:
        h.update(json.dumps(s.__dict__, sort_keys=True, default=str).encode())
        for m in s.metadata_files:
            h.update(f"M{m}:{_stat_sig(m)}".encode())
        if s.metadata_files:
            # Folders only matter for the fallback lookup: their listing (names) is enough.
            for d in s.image_dirs:
                h.update(f"D{d}:{_stat_sig(d)}".encode())
        else:
            for p, size, mt in list_images(s.image_dirs, recursive):
                h.update(f"{p}:{size}:{mt}:{_stat_sig(os.path.splitext(p)[0] + s.caption_extension)}".encode())
    return h.hexdigest()[:32]


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except FileNotFoundError:
        return ""
    except UnicodeDecodeError as e:
        raise ValueError(f"caption file {path!r} is not UTF-8: {e}") from None


def _size_from_md(md: dict[str, Any]) -> tuple[int, int]:
    """(w, h) from `image_size` / `original_size` ([w, h]) or `width`/`height`; (-1, -1) when absent."""
    for k in ("image_size", "original_size"):
        v = md.get(k)
        if isinstance(v, str) and v.strip():
            try:
                v = json.loads(v)
            except ValueError:
                v = [p for p in v.replace("x", ",").split(",")]
        if isinstance(v, (list, tuple)) and len(v) == 2:
            try:
                return int(v[0]), int(v[1])
            except (TypeError, ValueError):
                pass
    if md.get("width") not in (None, "") and md.get("height") not in (None, ""):
        return int(md["width"]), int(md["height"])
    return -1, -1


def _first_bad(items: list, ok: Callable[[Any], bool]) -> int:
    return next(i for i, x in enumerate(items) if not ok(x))


def _keyed(recs: list, where: Callable[[int], str]) -> tuple[list[str], list[dict[str, Any]]]:
    """Keys of list-style records: their `key`, else the stem of their image_path."""
    if not all(map(isinstance, recs, repeat(dict))):
        i = _first_bad(recs, lambda r: isinstance(r, dict))
        raise ValueError(f"{where(i)}: expected an object with image_path, got {type(recs[i]).__name__}")
    keys = [r.get("key") for r in recs]
    for i, k in enumerate(keys):
        if not k:  # only records without a key pay for the per-entry work
            p = recs[i].get(PATH_FIELD)
            k = os.path.splitext(os.path.basename(p))[0] if p else None
            if not k:
                raise ValueError(f"{where(i)}: record has neither 'key' nor '{PATH_FIELD}'")
            keys[i] = k
    return list(map(str, keys)), recs


def _read_jsonl(path: str) -> tuple[list[str], list[dict[str, Any]]]:
    # The C scanner on each line skips json.loads' per-call checks and regex matches; errors go through
    # json.loads so their messages are the standard ones.
    scan = json.scanner.make_scanner(json.JSONDecoder())
    recs, lines = [], []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            line = line.strip()
            if not line:
                continue
            try:
                obj, end = scan(line, 0)
                ok = end == len(line)
            except (StopIteration, ValueError):
                ok = False
            if not ok:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"metadata {path!r} line {i + 1} is not valid JSON: {e}") from None
            recs.append(obj)
            lines.append(i + 1)
    return _keyed(recs, lambda j: f"metadata {path!r} line {lines[j]}")


def read_metadata_file(path: str) -> tuple[list[str], list[dict[str, Any]]]:
    """(keys, records) of a JSON ({key: {...}} or a list), JSONL, CSV (header row) or SQLite metadata file."""
    low = path.lower()
    if low.endswith(".json"):
        with open(path, "rb") as f:
            try:
                obj = json.loads(f.read())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"metadata {path!r} is not valid JSON: {e}") from None
        if isinstance(obj, dict):
            recs = list(obj.values())
            if not all(map(isinstance, recs, repeat(dict))):
                k = list(obj)[_first_bad(recs, lambda r: isinstance(r, dict))]
                raise ValueError(f"metadata {path!r}: entry {k!r} must be an object, got {type(obj[k]).__name__}")
            return list(obj), recs  # JSON object keys are already str
        if isinstance(obj, list):
            return _keyed(obj, lambda i: f"metadata {path!r} item {i}")
        raise ValueError(f"metadata {path!r}: top level must be an object {{key: {{...}}}} or a list")
    if low.endswith(".jsonl"):
        return _read_jsonl(path)
    if low.endswith(".csv"):
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or PATH_FIELD not in reader.fieldnames:
                raise ValueError(f"metadata {path!r}: the CSV header must contain '{PATH_FIELD}' "
                                 f"(found {reader.fieldnames})")
            return _keyed(list(reader), lambda i: f"metadata {path!r} row {i + 2}")
    # SQLite: the one table that has image_path (and caption) columns.
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        cands = []
        for t in tables:
            cols = [r[1] for r in con.execute(f'PRAGMA table_info("{t}")')]
            if PATH_FIELD in cols:
                cands.append((t, cols))
        if len(cands) != 1:
            raise ValueError(f"metadata {path!r}: need exactly one table with an '{PATH_FIELD}' column; "
                             f"tables: {tables}, with it: {[c[0] for c in cands]}")
        t, cols = cands[0]
        rows = con.execute(f'SELECT * FROM "{t}"').fetchall()
        return _keyed([{c: v for c, v in zip(cols, r) if v is not None} for r in rows],
                      lambda i: f"metadata {path!r} table {t}")
    except sqlite3.DatabaseError as e:
        raise ValueError(f"metadata {path!r} is not a readable SQLite database: {e}") from None
    finally:
        con.close()


def _sizes_from_records(recs: list[dict[str, Any]]) -> np.ndarray:
    """[N, 2] int64 (w, h) per record as `_size_from_md` reads it; (-1, -1) when absent."""
    n = len(recs)
    if n == 0:
        return np.zeros((0, 2), np.int64)
    # Fast path, one numpy conversion: every record has image_size = [int, int].
    try:
        a = np.array([r.get("image_size") for r in recs])
    except (ValueError, TypeError, OverflowError):  # ragged or odd values
        a = None
    if a is not None and a.shape == (n, 2) and a.dtype.kind in "iu":
        return a.astype(np.int64)
    return np.array([_size_from_md(r) for r in recs], np.int64).reshape(n, 2)


@dataclass
class Columns:
    """Raw dataset entries, column-wise (lists; turned into numpy columns by the index)."""

    keys: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    metadata: list[dict[str, Any]] = field(default_factory=list)
    widths: list[int] = field(default_factory=list)
    heights: list[int] = field(default_factory=list)
    subset: list[int] = field(default_factory=list)
    origin: list[str] = field(default_factory=list)  # where the entry came from, for error messages


def map_chunked(fn: Callable, items: list, threads: int, chunk: int = 2048) -> list:
    """fn over items in threads, one task per chunk (ThreadPoolExecutor.map makes a future per item otherwise)."""
    if len(items) <= chunk:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(threads) as ex:
        parts = ex.map(lambda s: [fn(x) for x in items[s : s + chunk]], range(0, len(items), chunk))
        return [y for part in parts for y in part]


_NO_FOLDER: frozenset[str] = frozenset()  # the folder does not exist: nothing in it does


def _listing(d: str) -> frozenset[str] | set[str] | None:
    """Names in folder d that os.path.exists would accept (broken symlinks left out); None if unlistable."""
    try:
        with os.scandir(d) as it:
            return {e.name for e in it if not e.is_symlink() or os.path.exists(e.path)}
    except (FileNotFoundError, NotADirectoryError):
        return _NO_FOLDER
    except OSError:  # e.g. no read permission on the folder: per-path checks still work
        return None


def _exists_by_listing(paths: list[str], threads: int) -> list[bool | None]:
    """Per path: True / False where the parent folder's listing settles it, None where only the OS can tell.

    None: a name absent from an existing folder (a case-insensitive filesystem may still have it), odd names
    ("a/", "a/.."), unlistable folders.
    """
    parts = [p.rpartition(os.sep) for p in paths]
    # "/x.png" -> head "" but its folder is the root; "x.png" (no separator) -> the current folder.
    folder = [head or (os.sep if sep else os.curdir) for head, sep, _ in parts]
    uniq = list(set(folder))
    listed = dict(zip(uniq, map_chunked(_listing, uniq, threads, 8)))
    return [False if names is _NO_FOLDER else
            (True if names is not None and name in names and name not in (".", "..") else None)
            for (_, _, name), names in zip(parts, map(listed.__getitem__, folder))]


def exists_many(paths: list[str], threads: int = 16) -> list[bool]:
    """os.path.exists for every path, from one listing per distinct parent folder (parallel over folders).

    A million paths in a few thousand folders cost a few thousand scandir calls instead of a million stats;
    only the paths the listings cannot settle are asked of the OS.
    """
    out = _exists_by_listing(paths, threads)
    ask = [i for i, ok in enumerate(out) if ok is None]
    for i, ok in zip(ask, map_chunked(os.path.exists, [paths[i] for i in ask], threads)):
        out[i] = ok
    return out  # type: ignore[return-value]


def _image_names(dirs: list[str], threads: int) -> dict[str, str]:
    """File name -> path of the images under dirs (recursive); a name found twice maps to the smallest path."""
    files = [p for p, _, _ in _walk(dirs, True, threads, stat=False)]  # sorted by path, no stat needed
    return dict(zip(map(os.path.basename, reversed(files)), reversed(files)))  # later (smaller) paths win


def _metadata_subset(s: SubsetSpec, si: int, cols: Columns, threads: int) -> None:
    """Append a metadata subset's entries column-wise (no per-entry Python work beyond list comprehensions)."""
    paths: list[str] = []
    n0 = len(cols.keys)
    for m in s.metadata_files:
        keys, recs = read_metadata_file(m)
        # The records are ours (freshly parsed): pop path and caption so the rest is the entry's metadata as is.
        ps = [r.pop(PATH_FIELD, None) or "" for r in recs]
        if not all(map(isinstance, ps, repeat(str))):
            i = _first_bad(ps, lambda p: isinstance(p, str))
            raise ValueError(f"metadata {m!r}: entry {keys[i]!r} has a non-text {PATH_FIELD} {ps[i]!r}")
        base = os.path.dirname(m)
        for i in [i for i, p in enumerate(ps) if p and not p.startswith(os.sep)]:
            if not os.path.isabs(ps[i]):  # relative to the metadata file
                ps[i] = os.path.join(base, ps[i])
        caps = [r.pop("caption", None) for r in recs]
        for i in [i for i, c in enumerate(caps) if c is None]:
            caps[i] = recs[i].get("tags") or ""
        wh = _sizes_from_records(recs)
        cols.keys += keys; paths += ps; cols.captions += map(str, caps); cols.metadata += recs
        cols.widths += wh[:, 0].tolist(); cols.heights += wh[:, 1].tolist()
        cols.subset += [si] * len(keys); cols.origin += [m] * len(keys)
    if s.image_dirs:
        # Fallback: find a missing image by its file name in the subset's image_dirs.
        exists = _exists_by_listing(paths, threads)
        if not all(exists):
            by_name = _image_names(s.image_dirs, threads)
            miss = [j for j, ok in enumerate(exists) if not ok]
            hits = [(j, f) for j, f in zip(miss, map(by_name.get, [os.path.basename(paths[j]) for j in miss])) if f]
            for j, found in hits:
                # A path the listings could not settle is asked of the OS only when it would be replaced.
                if exists[j] is False or not os.path.exists(paths[j]):
                    paths[j] = found
    cols.paths += paths
    assert len(cols.paths) == len(cols.keys) == n0 + len(paths)


def collect(subsets: list[SubsetSpec], recursive: bool, threads: int = 16) -> Columns:
    """Read every subset into columns; raise on duplicate keys (listing them)."""
    cols = Columns()
    for si, s in enumerate(subsets):
        if s.metadata_files:
            _metadata_subset(s, si, cols, threads)
        else:
            files = list_images(s.image_dirs, recursive, threads)
            caps = [os.path.splitext(p)[0] + s.caption_extension for p, _, _ in files]
            texts = map_chunked(_read_text, caps, threads, 256)
            for (p, _, _), cap in zip(files, texts):
                cols.keys.append(os.path.splitext(os.path.basename(p))[0]); cols.paths.append(p)
                cols.captions.append(cap); cols.metadata.append({}); cols.widths.append(-1)
                cols.heights.append(-1); cols.subset.append(si); cols.origin.append(p)
    check_duplicates(cols)
    return cols


def check_duplicates(cols: Columns, limit: int = 20) -> None:
    """Raise ValueError listing keys that occur more than once (with where each came from)."""
    if len(set(cols.keys)) == len(cols.keys):  # the common case, at C speed
        return
    seen: dict[str, int] = {}
    dups: dict[str, list[str]] = {}
    for i, k in enumerate(cols.keys):
        j = seen.setdefault(k, i)
        if j != i:
            dups.setdefault(k, [cols.origin[j]]).append(cols.origin[i])
    if dups:
        lines = [f"  {k!r}: {', '.join(v)}" for k, v in list(dups.items())[:limit]]
        more = f"\n  ... and {len(dups) - limit} more" if len(dups) > limit else ""
        raise ValueError(f"{len(dups)} duplicate dataset key(s) (keys are image file stems or metadata keys and "
                         f"must be unique; rename the files or give metadata keys):\n" + "\n".join(lines) + more)


def load_hook(spec: str) -> Callable | None:
    """Resolve a user hook spec through core.config.resolve_hook ("" = no hook)."""
    if not spec:
        return None
    from core.config import resolve_hook

    return resolve_hook(spec)
