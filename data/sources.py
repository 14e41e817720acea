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
import os
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

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


def list_images(dirs: list[str], recursive: bool) -> list[tuple[str, int, int]]:
    """(path, size, mtime_ns) of every image file under dirs, sorted by path (one stat per file via scandir)."""
    out: list[tuple[str, int, int]] = []

    def walk(d: str) -> None:
        with os.scandir(d) as it:
            for e in it:
                if e.is_dir(follow_symlinks=True):
                    if recursive:
                        walk(e.path)
                elif e.name.lower().endswith(IMAGE_EXTENSIONS):
                    st = e.stat()
                    out.append((e.path, st.st_size, st.st_mtime_ns))

    for d in dirs:
        walk(d)
    out.sort()
    return out


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


def read_metadata_file(path: str) -> list[tuple[str, dict[str, Any]]]:
    """(key, record) pairs of a JSON ({key: {...}} or a list), JSONL, CSV (header row) or SQLite metadata file."""
    low = path.lower()

    def keyed(rec: dict, where: str) -> tuple[str, dict]:
        if not isinstance(rec, dict):
            raise ValueError(f"{where}: expected an object with image_path, got {type(rec).__name__}")
        p = rec.get(PATH_FIELD)
        key = rec.get("key") or (os.path.splitext(os.path.basename(p))[0] if p else None)
        if not key:
            raise ValueError(f"{where}: record has neither 'key' nor '{PATH_FIELD}'")
        return str(key), rec

    if low.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            try:
                obj = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"metadata {path!r} is not valid JSON: {e}") from None
        if isinstance(obj, dict):
            out = []
            for k, v in obj.items():
                if not isinstance(v, dict):
                    raise ValueError(f"metadata {path!r}: entry {k!r} must be an object, got {type(v).__name__}")
                out.append((str(k), v))
            return out
        if isinstance(obj, list):
            return [keyed(r, f"metadata {path!r} item {i}") for i, r in enumerate(obj)]
        raise ValueError(f"metadata {path!r}: top level must be an object {{key: {{...}}}} or a list")
    if low.endswith(".jsonl"):
        out = []
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if line.strip():
                    try:
                        out.append(keyed(json.loads(line), f"metadata {path!r} line {i + 1}"))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"metadata {path!r} line {i + 1} is not valid JSON: {e}") from None
        return out
    if low.endswith(".csv"):
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or PATH_FIELD not in reader.fieldnames:
                raise ValueError(f"metadata {path!r}: the CSV header must contain '{PATH_FIELD}' "
                                 f"(found {reader.fieldnames})")
            return [keyed(dict(r), f"metadata {path!r} row {i + 2}") for i, r in enumerate(reader)]
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
        return [keyed({c: v for c, v in zip(cols, r) if v is not None}, f"metadata {path!r} table {t}")
                for r in rows]
    except sqlite3.DatabaseError as e:
        raise ValueError(f"metadata {path!r} is not a readable SQLite database: {e}") from None
    finally:
        con.close()


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


def _map_chunked(fn: Callable, items: list, threads: int, chunk: int = 2048) -> list:
    """fn over items in threads, one task per chunk (ThreadPoolExecutor.map makes a future per item otherwise)."""
    if len(items) <= chunk:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(threads) as ex:
        parts = ex.map(lambda s: [fn(x) for x in items[s : s + chunk]], range(0, len(items), chunk))
        return [y for part in parts for y in part]


def _exists_many(paths: list[str], threads: int) -> list[bool]:
    return _map_chunked(os.path.exists, paths, threads)


def collect(subsets: list[SubsetSpec], recursive: bool, threads: int = 16) -> Columns:
    """Read every subset into columns; raise on duplicate keys (listing them)."""
    cols = Columns()
    for si, s in enumerate(subsets):
        if s.metadata_files:
            start = len(cols.keys)
            for m in s.metadata_files:
                for key, rec in read_metadata_file(m):
                    p = rec.get(PATH_FIELD) or ""
                    if p and not os.path.isabs(p):
                        p = os.path.join(os.path.dirname(m), p)
                    cap = rec.get("caption")
                    if cap is None:
                        cap = rec.get("tags") or ""
                    w, h = _size_from_md(rec)
                    md = {k: v for k, v in rec.items() if k not in (PATH_FIELD, "caption")}
                    cols.keys.append(key); cols.paths.append(p); cols.captions.append(str(cap))
                    cols.metadata.append(md); cols.widths.append(w); cols.heights.append(h)
                    cols.subset.append(si); cols.origin.append(m)
            new_paths = cols.paths[start:]
            exists = _exists_many(new_paths, threads)
            if not all(exists) and s.image_dirs:
                # Fallback: find a missing image by its file name in the subset's image_dirs.
                by_name: dict[str, str] = {}
                for p, _, _ in list_images(s.image_dirs, True):
                    by_name.setdefault(os.path.basename(p), p)
                for j, ok in enumerate(exists):
                    if not ok:
                        found = by_name.get(os.path.basename(new_paths[j]))
                        if found:
                            cols.paths[start + j] = found
        else:
            files = list_images(s.image_dirs, recursive)
            caps = [os.path.splitext(p)[0] + s.caption_extension for p, _, _ in files]
            texts = _map_chunked(_read_text, caps, threads, 256)
            for (p, _, _), cap in zip(files, texts):
                cols.keys.append(os.path.splitext(os.path.basename(p))[0]); cols.paths.append(p)
                cols.captions.append(cap); cols.metadata.append({}); cols.widths.append(-1)
                cols.heights.append(-1); cols.subset.append(si); cols.origin.append(p)
    check_duplicates(cols)
    return cols


def check_duplicates(cols: Columns, limit: int = 20) -> None:
    """Raise ValueError listing keys that occur more than once (with where each came from)."""
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
