"""Data sources: which subsets there are, and the walk / listing helpers the readers share.

`resolve_subsets` turns [data] (and its [[data.subsets]]) into plain `SubsetSpec`s, expanding kohya DreamBooth
roots (`train_data_dir` / `reg_data_dir`) into one subset per `<repeats>_<class tokens>` folder. `collect` reads
every subset's sources through the reader registry (data/readers/: one reader per format) into columns. Keys
must be unique over the whole dataset: duplicates are an error that lists them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .columns import PackedRows
from .images import IMAGE_EXTENSIONS
from .readers import Rows, reader_for, sources_of, stat_sig
from .readers.tar import expand_shards
from .readers.metadata import METADATA_EXTENSIONS, PATH_FIELD, read_metadata_file  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

Columns = Rows  # the column lists every reader produces (packed by collect into PackedRows)
EMPTY_CAPTION_WARN = 0.05  # warn when more than this share of a subset's captions is empty


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
    layout: str = ""                                       # "dreambooth": a kohya <repeats>_<tokens> folder
    dataset_name_or_path: str = ""                         # a local Hugging Face dataset (parquet / arrow)
    dataset_image_column: str = ""
    dataset_caption_column: str = ""
    tar_shards: list[str] = field(default_factory=list)    # webdataset tar shards (patterns expanded, absolute)


def _subset_fields(s, data) -> list[tuple[Any, str, int, str]]:
    """(subset, layout, repeats, class tokens) for a configured subset, DreamBooth roots expanded."""
    from .readers.folder import dreambooth_subsets

    roots = [(getattr(s, "train_data_dir", "") or "", False), (getattr(s, "reg_data_dir", "") or "", True)]
    if not any(r for r, _ in roots):
        return [(s, "", int(s.num_repeats), s.class_tokens or "")]
    out = []
    for root, is_reg in roots:
        if not root:
            continue
        if not os.path.isdir(root):
            kind = "reg_data_dir" if is_reg else "train_data_dir"
            raise FileNotFoundError(f"[data] {kind} {root!r} is not a directory")
        for folder, repeats, tokens in dreambooth_subsets(root, is_reg):
            from types import SimpleNamespace

            sub = SimpleNamespace(**{**vars(s), "image_dirs": [folder], "metadata_files": [], "is_reg": is_reg,
                                     "class_tokens": s.class_tokens or tokens})
            out.append((sub, "dreambooth", repeats, sub.class_tokens))
    return out


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
                                flip_aug=None, random_crop=None, loss_weight=1.0,
                                train_data_dir=getattr(data, "train_data_dir", ""),
                                reg_data_dir=getattr(data, "reg_data_dir", ""),
                                dataset_name_or_path=getattr(data, "dataset_name_or_path", ""),
                                tar_shards=list(getattr(data, "tar_shards", [])))]
    prior = float(getattr(data, "prior_loss_weight", 1.0))
    out = []
    for i, s0 in enumerate(subs):
        for s, layout, repeats, tokens in _subset_fields(s0, data):
            ds = getattr(s, "dataset_name_or_path", "") or ""
            tars = list(getattr(s, "tar_shards", None) or [])
            if not s.image_dirs and not s.metadata_files and not ds and not tars:
                raise ValueError(f"[data] subset {i}: needs image_dirs, metadata_files, train_data_dir / "
                                 f"reg_data_dir, dataset_name_or_path or tar_shards (all are empty)")
            if tars and (s.image_dirs or s.metadata_files or ds):
                raise ValueError(f"[data] subset {i}: tar_shards cannot be combined with image_dirs / metadata_files "
                                 f"/ dataset_name_or_path in one subset; give the shards their own [[data.subsets]]")
            if tars:
                tars = expand_shards(tars, f"[data] subset {i}")
            if repeats < 0:
                raise ValueError(f"[data] subset {i}: num_repeats = {repeats} must be >= 0")
            for p in list(s.image_dirs):
                if not os.path.isdir(p):
                    raise FileNotFoundError(f"[data] subset {i}: image_dirs entry {p!r} is not a directory")
            for p in list(s.metadata_files):
                if not os.path.isfile(p):
                    raise FileNotFoundError(f"[data] subset {i}: metadata file {p!r} does not exist")
                if not p.lower().endswith(METADATA_EXTENSIONS):
                    raise ValueError(f"[data] subset {i}: metadata file {p!r} has an unknown extension; "
                                     f"allowed: {', '.join(METADATA_EXTENSIONS)}")
            if ds and not os.path.exists(ds):
                raise FileNotFoundError(f"[data] subset {i}: dataset_name_or_path {ds!r} does not exist (only "
                                        f"local datasets are read: a hub snapshot folder or a save_to_disk folder)")
            s.class_tokens = tokens
            opts = options_for_subset(s, data)
            ext = s.caption_extension if s.caption_extension is not None else data.caption_extension
            is_reg = bool(s.is_reg)
            out.append(SubsetSpec(
                image_dirs=[os.path.abspath(p) for p in s.image_dirs],
                metadata_files=[os.path.abspath(p) for p in s.metadata_files],
                caption_extension=ext if ext.startswith(".") else "." + ext,
                num_repeats=int(repeats), is_reg=is_reg, class_tokens=tokens,
                flip_aug=bool(data.flip_aug if s.flip_aug is None else s.flip_aug),
                random_crop=bool(data.random_crop if s.random_crop is None else s.random_crop),
                # kohya: regularisation images are weighted by prior_loss_weight (through the per-sample weight)
                loss_weight=float(s.loss_weight) * (prior if is_reg else 1.0), caption=opts.__dict__.copy(),
                layout=layout, dataset_name_or_path=os.path.abspath(ds) if ds else "",
                dataset_image_column=getattr(s, "dataset_image_column", None) or getattr(data, "dataset_image_column", ""),
                dataset_caption_column=getattr(s, "dataset_caption_column", None) or getattr(data, "dataset_caption_column", ""),
                tar_shards=tars))
    if len(out) > 32767:
        raise ValueError(f"[data] {len(out)} subsets; at most 32767 are supported")
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
                        try:
                            st = e.stat()
                        except OSError:  # a dangling symlink, an entry gone or unreadable: reported as a bad image
                            files.append((e.path, -1, -1))
                            continue
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
    return stat_sig(path)


def inputs_fingerprint(subsets: list[SubsetSpec], recursive: bool, extra: str) -> str:
    """Hash of everything the index depends on: settings, and what each source's reader says its rows depend on."""
    h = hashlib.sha256(extra.encode())
    h.update(repr(recursive).encode())
    for s in subsets:
        h.update(json.dumps(s.__dict__, sort_keys=True, default=str).encode())
        for src in sources_of(s, recursive):
            reader_for(src).fingerprint(src, h)
        if s.metadata_files:
            # Folders only matter for the fallback lookup: their listing (names) is enough.
            for d in s.image_dirs:
                h.update(f"D{d}:{stat_sig(d)}".encode())
    return h.hexdigest()[:32]


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


LISTINGS_KEPT = 4096  # folder listings a cache passed to _exists_by_listing holds (cleared when full)


def _exists_by_listing(paths: list[str], threads: int, listings: dict | None = None) -> list[bool | None]:
    """Per path: True / False where the parent folder's listing settles it, None where only the OS can tell.

    None: a name absent from an existing folder (a case-insensitive filesystem may still have it), odd names
    ("a/", "a/.."), unlistable folders.
    """
    parts = [p.rpartition(os.sep) for p in paths]
    # "/x.png" -> head "" but its folder is the root; "x.png" (no separator) -> the current folder.
    folder = [head or (os.sep if sep else os.curdir) for head, sep, _ in parts]
    uniq = list(set(folder))
    if listings is None:
        listed = dict(zip(uniq, map_chunked(_listing, uniq, threads, 8)))
    else:  # kept between calls (the chunks of one source): each folder listed once
        new = [d for d in uniq if d not in listings]
        if len(listings) + len(new) > LISTINGS_KEPT:
            listings.clear()
            new = uniq
        listings.update(zip(new, map_chunked(_listing, new, threads, 8)))
        listed = listings
    return [False if names is _NO_FOLDER else
            (True if names is not None and name in names and name not in (".", "..") else None)
            for (_, _, name), names in zip(parts, map(listed.__getitem__, folder))]


def exists_many(paths: list[str], threads: int = 16, listings: dict | None = None) -> list[bool]:
    """os.path.exists for every path, from one listing per distinct parent folder (parallel over folders).

    A million paths in a few thousand folders cost a few thousand scandir calls instead of a million stats;
    only the paths the listings cannot settle are asked of the OS.
    """
    out = _exists_by_listing(paths, threads, listings)
    ask = [i for i, ok in enumerate(out) if ok is None]
    for i, ok in zip(ask, map_chunked(os.path.exists, [paths[i] for i in ask], threads)):
        out[i] = ok
    return out  # type: ignore[return-value]


def _image_names(dirs: list[str], threads: int) -> dict[str, str]:
    """File name -> path of the images under dirs (recursive); a name found twice maps to the smallest path."""
    files = [p for p, _, _ in _walk(dirs, True, threads, stat=False)]  # sorted by path, no stat needed
    return dict(zip(map(os.path.basename, reversed(files)), reversed(files)))  # later (smaller) paths win


def collect(subsets: list[SubsetSpec], recursive: bool, threads: int = 16, allow_empty: bool = False,
            keep_dicts: bool = False) -> PackedRows:
    """Read every subset's sources (each through its format's reader) into packed columns, chunk by chunk (see
    data/columns.py); raise on duplicate keys. `keep_dicts`: also keep the parsed metadata dicts (hooks)."""
    from .captions import description_of
    from .index import COUNTED_FIELDS

    cols = PackedRows(COUNTED_FIELDS, description_of, keep_dicts)
    for si, s in enumerate(subsets):
        for src in sources_of(s, recursive):
            for chunk in reader_for(src).read(src, si, threads):
                cols.add(chunk)
    cols.finish()
    check_duplicates(cols)
    sub = cols.subset.astype(np.int64)
    total = np.bincount(sub, minlength=len(subsets))
    empty = np.bincount(sub[cols.captions.lengths() == 0], minlength=len(subsets))
    for si, s in enumerate(subsets):
        warn_empty_captions(int(total[si]), int(empty[si]), s, si, allow_empty)
    return cols


def subset_where(s: SubsetSpec) -> str:
    """Where a subset's entries come from, for messages (its first folder / file / dataset / shard)."""
    return (s.image_dirs or s.metadata_files or s.tar_shards or [s.dataset_name_or_path])[0]


def warn_empty_captions(n: int, empty: int, s: SubsetSpec, si: int, allow_empty: bool = False) -> None:
    """One warning when more than a few percent of a subset's n captions are empty (class tokens do not count); with
    data.allow_empty_captions (empty captions are intended) it is an info line."""
    if not n or s.class_tokens:
        return
    if empty > EMPTY_CAPTION_WARN * n:
        look = "the shards' .txt / .caption / .json members" if s.tar_shards else "caption_extension / the caption column"
        log.log(logging.INFO if allow_empty else logging.WARNING,
                "subset %d (%s): %d of %d captions are empty (%.0f%%); they train as unconditional samples. Check %s, "
                "set class_tokens to give them a caption, or set data.allow_empty_captions = true if that is intended",
                si, subset_where(s), empty, n, 100.0 * empty / n, look)


def require_store_for_containers(data, use_store: bool) -> None:
    """train.py without a latent store decodes images itself: tar shards are read only by cache.py (in order)."""
    if use_store:
        return
    for s in [data] + list(data.subsets):
        if getattr(s, "tar_shards", None):
            raise ValueError("tar_shards are read by cache.py, not by train.py: set [cache] cache_dir and run "
                             "`torchrun --nproc_per_node=N cache.py <config>` first; train.py then trains from the "
                             "latent store")



def _object_json(origin: str) -> bool:
    """Whether an origin is a JSON object file ({key: ...}: a repeated key is json.loads' last-one-wins)."""
    from .readers.metadata import _peek_json

    return origin.lower().endswith(".json") and os.path.isfile(origin) and _peek_json(origin)[0] == "object"


def check_duplicates(cols: PackedRows, limit: int = 20) -> None:
    """Raise ValueError listing keys that occur more than once (with where each came from); found from 64-bit key
    hashes (sorted), the strings compared only where hashes meet. A key repeated inside one JSON object file (its
    chunks are parsed apart) is resolved as json.loads does: the last value, at the first one's place."""
    h = cols.hash
    if len(np.unique(h)) == len(h):  # the common case
        return
    order = np.argsort(h, kind="stable")
    hs = h[order]
    hit = np.flatnonzero(hs[1:] == hs[:-1])
    cand = np.unique(np.concatenate([order[hit], order[hit + 1]]))
    rows_of: dict[str, list[int]] = {}
    keys = cols.keys
    for i in cand.tolist():
        rows_of.setdefault(keys[i], []).append(i)
    groups = sorted((rows for rows in rows_of.values() if len(rows) > 1), key=lambda r: r[1])
    if not groups:
        return
    dups: dict[str, list[str]] = {}
    sel = np.arange(len(cols), dtype=np.int64)
    drop: list[int] = []
    for rows in groups:
        origins = [cols.origin_of(i) for i in rows]
        if len(set(origins)) == 1 and _object_json(origins[0]):
            sel[rows[0]] = rows[-1]
            drop += rows[1:]
        else:
            dups[keys[rows[0]]] = origins
    if dups:
        lines = [f"  {k!r}: {', '.join(v)}" for k, v in list(dups.items())[:limit]]
        more = f"\n  ... and {len(dups) - limit} more" if len(dups) > limit else ""
        raise ValueError(f"{len(dups)} duplicate dataset key(s) (keys are image file stems or metadata keys and "
                         f"must be unique; rename the files or give metadata keys):\n" + "\n".join(lines) + more)
    keep = np.ones(len(cols), bool)
    keep[drop] = False
    cols.take(sel[keep])


def load_hook(spec: str) -> Callable | None:
    """Resolve a user hook spec through core.config.resolve_hook ("" = no hook)."""
    if not spec:
        return None
    from core.config import resolve_hook

    return resolve_hook(spec)
