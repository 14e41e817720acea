"""The dataset index: columnar arrays of keys, paths, captions, sizes, buckets and repeats, built once and reused.

Saved as one uncompressed `.npz` (strings as a UTF-8 blob + offsets) with a fingerprint of its inputs; a later run
whose inputs are unchanged loads it instead of rescanning headers. Loading memory-maps every column straight out of
the file (the members are stored uncompressed, so each is a plain array at a known offset): nothing is read until
used, and the ranks of a node share one copy in the page cache instead of holding one each.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import os
import struct
import zipfile
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from core.fsio import commit_file, remove_quietly, temp_path, with_path

from core.config import DataConfig

from .buckets import BucketSettings, assign_buckets
from .columns import PackedRows, StrColumn, json_encoder
from .hooks import ImageInfo, count_metadata, euge_metadata, load_repeats_hook
from .images import SkipReport, read_sizes
from .latent_files import LATENT_EXT
from .listing import list_images
from .locators import stat_sig
from .readers import Rows
from .readers.metadata import wh_value
from .readers.tar import SCAN_DIR, scan_own_shards, scan_parts
from .record_rows import cached_rows, record_size, subset_signature
from .sources import collect, inputs_fingerprint, resolve_subsets
from .spec import SubsetSpec
from .store import INDEX_FILE as STORE_INDEX_FILE
from .store import SHARD_DIR, LatentStore

log = logging.getLogger(__name__)

INDEX_FILE = "dataset_index.npz"
INDEX_VERSION = 3  # 2: descriptions column; 3: kohya caption rules (#25: DreamBooth class tokens, first lines)


@dataclass
class DatasetIndex:
    """Everything the store, cache.py and the loader need to know about the dataset, column-wise."""

    keys: StrColumn
    paths: StrColumn
    captions: StrColumn
    metadata: StrColumn          # JSON per entry ("" = none)
    sizes: np.ndarray            # [N, 2] int32 (w, h) of the image as displayed
    buckets: np.ndarray          # [N, 2] int32 (w, h)
    subset: np.ndarray           # [N] int16
    repeats: np.ndarray          # [N] int32 (0 = not trained on, still cached)
    subsets: list[SubsetSpec]
    bucket_settings: BucketSettings
    fingerprint: str
    counter: dict[str, dict[str, int]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # path -> reason, for inputs left out at build time
    store_sig: str = ""          # the latent store's index stat when rows came from it (cache-only), else ""
    descriptions: StrColumn | None = None  # natural-language description per entry ("" = none)
    _key_rows: dict[str, int] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.descriptions is None:
            self.descriptions = StrColumn.from_list([""] * len(self.keys))

    def __len__(self) -> int:
        return len(self.sizes)

    def row_of(self, key: str) -> int:
        """Row of a key (O(1) after a one-off dict build); KeyError when absent."""
        if self._key_rows is None:
            self._key_rows = {k: i for i, k in enumerate(self.keys.tolist())}
        return self._key_rows[key]

    def meta(self, i: int) -> dict[str, Any]:
        """The metadata dict of row i."""
        s = self.metadata[i]
        return json.loads(s) if s else {}

    def original_size(self, row: int) -> tuple[int, int] | None:
        """(h, w) the model is told for a row when its metadata gives `original_size` [w, h] (euge-trainer
        sdxl_dataset_utils.Dataset.__getitem__: `img_info.original_size or img_info.image_size`); None = the size of
        the decoded image."""
        s = self.metadata[row]
        if '"original_size"' not in s:  # most rows: no JSON parse
            return None
        wh = wh_value(json.loads(s).get("original_size"))
        return (wh[1], wh[0]) if wh is not None and min(wh) > 0 else None

    def image_info(self, row: int, caption: str | None = None, description: str | None = None) -> ImageInfo:
        """euge-trainer's ImageInfo of a row (for hooks written in its style)."""
        md = self.meta(row)
        w, h = (int(v) for v in self.sizes[row])
        bw, bh = (int(v) for v in self.buckets[row])
        raw_cap, raw_desc = self.captions[row], self.descriptions[row]
        img_md = euge_metadata(md, self.paths[row], raw_cap, raw_desc)
        orig = md.get("original_size")
        orig = tuple(orig) if isinstance(orig, (list, tuple)) and len(orig) == 2 else (w, h)
        return ImageInfo(self.keys[row], image_path=self.paths[row] or None,
                         caption=raw_cap if caption is None else caption,
                         description=(raw_desc or None) if description is None else description, image_size=(w, h),
                         original_size=orig, latent_size=(bw // 8, bh // 8), bucket_size=(bw, bh),
                         num_repeats=int(self.repeats[row]), npz_path=md.get("npz_path"), metadata=img_md)

    def save(self, path: str) -> None:
        """Write atomically (temp file + rename)."""
        info = {"version": INDEX_VERSION, "fingerprint": self.fingerprint, "bucket_settings": self.bucket_settings.__dict__,
                "subsets": [s.to_dict() for s in self.subsets], "counter": self.counter, "skipped": self.skipped,
                "store_sig": self.store_sig}
        arrays = {"sizes": self.sizes, "buckets": self.buckets, "subset": self.subset, "repeats": self.repeats,
                  "info": np.frombuffer(json.dumps(info).encode(), dtype=np.uint8)}
        for name in STR_COLUMNS:
            col: StrColumn = getattr(self, name)
            arrays[f"{name}_blob"], arrays[f"{name}_off"] = col.blob, col.offsets
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = temp_path(path, ".npz")
        try:
            np.savez(tmp, **arrays)
            commit_file(tmp, path)
        except OSError as e:
            remove_quietly(tmp)
            raise with_path(e, path)

    @classmethod
    def load(cls, path: str, mmap: bool = True) -> "DatasetIndex":
        """Read an index written by `save`; `mmap`: columns memory-mapped read-only (see load_npz), else read."""
        try:
            z = load_npz(path) if mmap else dict(np.load(path))
        except (zipfile.BadZipFile, EOFError, struct.error) as e:  # truncated / overwritten: callers rebuild it
            raise ValueError(f"{path} is damaged ({e})") from None
        info = json.loads(z["info"].tobytes().decode())
        if info.get("version") != INDEX_VERSION:
            raise ValueError(f"{path}: index version {info.get('version')} != {INDEX_VERSION}; delete it to rebuild")
        cols = {n: StrColumn(z[f"{n}_blob"], z[f"{n}_off"]) for n in STR_COLUMNS}
        return cls(sizes=z["sizes"], buckets=z["buckets"], subset=z["subset"], repeats=z["repeats"],
                   subsets=[SubsetSpec.from_dict(s) for s in info["subsets"]],
                   bucket_settings=BucketSettings(**info["bucket_settings"]),
                   fingerprint=info["fingerprint"], counter=info["counter"],
                   skipped=info.get("skipped", {}), store_sig=info.get("store_sig", ""), **cols)


STR_COLUMNS = ("keys", "paths", "captions", "metadata", "descriptions")
_ZIP_LOCAL_HEADER = 30  # bytes of a zip local file header before its name and extra field (PKWARE APPNOTE 4.3.7)


def load_npz(path: str) -> dict[str, np.ndarray]:
    """The arrays of an uncompressed .npz (np.savez) memory-mapped read-only, without reading them: each member is
    a .npy file stored as is inside the zip, so its data sits at a fixed offset of the .npz. Pages are read on
    first use and shared by every process that maps the file (the ranks of a node)."""
    out: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
        for member in zf.infolist():
            if member.compress_type != zipfile.ZIP_STORED:
                raise ValueError(f"{path}: member {member.filename} is compressed; cannot memory-map it")
            f.seek(member.header_offset)
            local = f.read(_ZIP_LOCAL_HEADER)
            if local[:4] != b"PK\x03\x04":
                raise ValueError(f"{path}: damaged zip entry {member.filename}")
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            f.seek(member.header_offset + _ZIP_LOCAL_HEADER + name_len + extra_len)
            version = np.lib.format.read_magic(f)
            shape, fortran, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                                     else np.lib.format.read_array_header_2_0(f))
            if dtype.hasobject:
                raise ValueError(f"{path}: member {member.filename} holds Python objects")
            name = member.filename[:-4] if member.filename.endswith(".npy") else member.filename
            if int(np.prod(shape)) == 0:  # mmap cannot map zero bytes
                out[name] = np.empty(shape, dtype)
            else:
                out[name] = np.memmap(path, dtype=dtype, mode="r", offset=f.tell(), shape=shape,
                                      order="F" if fortran else "C")
    return out


@contextlib.contextmanager
def _gc_paused():
    """Pause the cyclic GC: parsing a million small dicts otherwise triggers full collections over and over
    (measured: JSON parse of 1M entries 3.0 s with it, 1.6 s without). Nothing built here forms cycles."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _fingerprint(data: DataConfig, subsets: list[SubsetSpec]) -> str:
    """The saved index's input fingerprint: the subsets' sources plus every setting the build depends on."""
    bs = BucketSettings.from_data_cfg(data)
    return inputs_fingerprint(subsets, bool(data.recursive), _settings_key(data) + bs.key())


def _settings_key(data: DataConfig) -> str:
    return json.dumps({"num_repeats_getter": data.num_repeats_getter, "recursive": bool(data.recursive),
                       "max_image_pixels": data.max_image_pixels, "v": INDEX_VERSION}, sort_keys=True)


def build_index(data: DataConfig, skipped: SkipReport | None = None, threads: int = 16,
                known_sizes: Callable[[str], tuple[int, int] | None] | None = None,
                store: LatentStore | None = None) -> DatasetIndex:
    """Scan sources, read missing sizes from image headers in parallel, assign buckets and repeats.

    Entries whose size is unknown and whose image cannot be read are left out and reported in `skipped`.
    `known_sizes(key)` may supply sizes for images that no longer exist. With `store` (the opened latent store of
    this index), entries whose images are gone come back from the store's records (cache-only training; logged).
    """
    with _gc_paused():
        return _build_index(data, skipped, threads, known_sizes, store)


def store_signature(store_root: str) -> str:
    """The latent store's index stat (an index whose rows came from the store is rebuilt when it changes)."""
    return stat_sig(os.path.join(store_root, STORE_INDEX_FILE))


def row_extra(index: DatasetIndex, row: int) -> dict[str, Any]:
    """The record's copy of its index row (enough to rebuild the row without the image; data/record_rows.py)."""
    w, h = (int(v) for v in index.sizes[row])
    spec = index.subsets[int(index.subset[row])]
    return {"x": {"p": index.paths[row], "c": index.captions[row], "d": index.descriptions[row],
                  "m": index.metadata[row], "wh": [w, h], "s": subset_signature(spec)}}


def _add_cached_rows(cols: PackedRows, subsets: list[SubsetSpec], store: LatentStore) -> bool:
    """Rows of entries whose images (or source entries) are gone, from the store's records; whether any came."""
    add = list(cached_rows(store, cols.keys.tolist(), subsets))
    if not add:
        return False
    log.warning("%d dataset entries are no longer in their sources (images moved or deleted); their records in the "
                "latent store %s are used instead (cache-only training)", len(add), store.root)
    more = Rows()
    for si, key, x in add:
        more.keys.append(key); more.paths.append(x.get("p", "")); more.captions.append(x.get("c", ""))
        more.metadata.append(json.loads(x["m"]) if x.get("m") else {})
        more.widths.append(int(x["wh"][0])); more.heights.append(int(x["wh"][1]))
        more.subset.append(si); more.origin.append(f"latent store {store.root}")
    cols.append(more)
    return True


SIZE_CHUNK = 65536  # image headers read per call while building (paths listed per chunk, not all at once)


def _build_index(data: DataConfig, skipped: SkipReport | None, threads: int,
                 known_sizes: Callable[[str], tuple[int, int] | None] | None,
                 store: LatentStore | None) -> DatasetIndex:
    skipped = skipped if skipped is not None else SkipReport()
    subsets = resolve_subsets(data)
    bs = BucketSettings.from_data_cfg(data)
    fp = _fingerprint(data, subsets)
    hooked = bool(data.num_repeats_getter or data.caption_processor or data.description_processor)
    cols = collect(subsets, bool(data.recursive), threads, bool(data.allow_empty_captions), keep_dicts=hooked)
    from_store = store is not None and _add_cached_rows(cols, subsets, store)
    if store is not None and known_sizes is None:
        known_sizes = lambda key: record_size(store, key)  # noqa: E731
    n = len(cols)
    sizes = np.stack([cols.cols.pop("widths"), cols.cols.pop("heights")], 1).astype(np.int32, copy=False).reshape(n, 2)
    cols.cols.pop("hash", None)  # duplicates were checked
    need = np.nonzero((sizes <= 0).any(1))[0]
    for a in range(0, len(need), SIZE_CHUNK):  # image headers, a chunk of paths at a time
        part = need[a : a + SIZE_CHUNK]
        got, errors = read_sizes(cols.paths.tolist_at(part), threads, data.max_image_pixels)
        sizes[part] = got
        for j, reason in errors.items():
            i = int(part[j])
            ks = known_sizes(cols.keys[i]) if known_sizes else None
            if ks:
                sizes[i] = ks
            else:
                skipped.add(cols.paths[i] or cols.keys[i], reason)
    per = subset_bucket_settings(subsets, bs)
    step = np.asarray([p.step for p in per], np.int64)[cols.subset]
    latent = cols.paths.endswith_ascii(LATENT_EXT)  # .npz caches in place of images: their bucket is their size
    for i in np.flatnonzero(latent & (sizes > 0).all(1) & (sizes % step[:, None] != 0).any(1)).tolist():
        w, h = (int(v) for v in sizes[i])
        skipped.add(cols.paths[i], f"latent cache of {w}x{h} px is not a multiple of bucket_reso_step "
                                   f"{int(step[i])} (euge-trainer refuses it too)")
        sizes[i] = -1
    keep = np.nonzero((sizes > 0).all(1))[0]
    report_metadata_counts(cols, keep, {m for s in subsets for m in s.metadata_files})
    if len(keep) < n:
        cols.take(keep)
        sizes, latent = sizes[keep], latent[keep]
    if len(sizes) == 0:
        raise ValueError(no_images_message(subsets, bool(data.recursive), n, len(skipped), threads))
    subset_arr = cols.subset
    repeats = np.asarray([s.num_repeats for s in subsets], dtype=np.int32)[subset_arr]
    mds: list[dict[str, Any]] = []
    if hooked:  # euge-trainer's img_md per entry, counted its way (folder captions parsed, folders counted)
        paths, caps, descs = cols.paths.tolist(), cols.captions.tolist(), cols.descriptions.tolist()
        mds = [euge_metadata(m, p, c, d) for m, p, c, d in zip(cols.dicts, paths, caps, descs)]
        w0 = [m["num_repeats"] if isinstance(m.get("num_repeats"), int) else 1 for m in mds]
        counter = count_metadata(mds, w0, paths)
    else:  # only entries with a counted field are decoded again (count_metadata's order: row order)
        counter = count_metadata(cols.metadata_dicts(np.flatnonzero(cols.counted).tolist()))
    getter = load_repeats_hook(data.num_repeats_getter)
    if getter is not None:
        keys = cols.keys.tolist()
        for i in range(len(repeats)):
            repeats[i] = getter(key=keys[i], metadata=cols.dicts[i], counter=counter,
                                num_repeats=int(repeats[i]), img_md=lambda: mds[i])
    balance_reg(repeats, np.asarray([s.is_reg for s in subsets], bool)[subset_arr])
    if hooked:  # what the caption hooks see: counts weighted by repeats (euge-trainer counts dropped ones once)
        counter = count_metadata(mds, np.where(repeats > 0, repeats, 1).tolist(), paths)
    if getter is not None:  # the metadata as the hook left it (as saved before packing)
        enc = json_encoder()
        cols.cols["metadata"] = StrColumn.from_list([enc(m) if m else "" for m in cols.dicts])
    buckets = assign_subset_buckets(sizes, subset_arr, per)
    buckets[latent] = sizes[latent]  # euge-trainer: "directly use latents_size as bucket_reso"
    return DatasetIndex(keys=cols.keys, paths=cols.paths, captions=cols.captions, metadata=cols.metadata,
                        descriptions=cols.descriptions,
                        sizes=sizes, buckets=buckets, subset=subset_arr,
                        repeats=repeats, subsets=subsets, bucket_settings=run_bucket_settings(bs, per), fingerprint=fp,
                        counter=counter,
                        skipped=dict(skipped.items), store_sig=store_signature(store.root) if from_store else "")


def subset_bucket_settings(subsets: list[SubsetSpec], bs: BucketSettings) -> list[BucketSettings]:
    """Each subset's bucket settings: its own (kohya [[datasets]] resolution, bucket options) or [data]'s."""
    return [BucketSettings(**s.bucket) if s.bucket else bs for s in subsets]


def run_bucket_settings(bs: BucketSettings, per: list[BucketSettings]) -> BucketSettings:
    """[data]'s settings with the subsets' own ones folded into its key (the latent store's fingerprint: a record
    is valid for the bucketing it was cut for)."""
    own = [f"{i}:{p.key()}" for i, p in enumerate(per) if p != bs]
    return dataclasses.replace(bs, subsets=";".join(own)) if own else bs


def assign_subset_buckets(sizes: np.ndarray, subset: np.ndarray, per: list[BucketSettings]) -> np.ndarray:
    """[N, 2] int32 buckets, each row by its subset's settings (rows of subsets sharing settings at once, in chunks)."""
    out = np.empty((len(sizes), 2), np.int32)
    groups: dict[BucketSettings, list[int]] = {}
    for si, p in enumerate(per):
        groups.setdefault(p, []).append(si)
    for p, sis in groups.items():
        rows = np.arange(len(sizes)) if len(groups) == 1 else np.flatnonzero(np.isin(subset, sis))
        chunk = len(rows) if p.num_bucket else SIZE_CHUNK * 16  # num_bucket clusters the whole subset at once
        for a in range(0, len(rows), max(1, chunk)):
            part = rows[a : a + chunk]
            out[part] = assign_buckets(sizes[part], p)
    return out


def report_metadata_counts(cols: PackedRows, keep: np.ndarray, files: set[str]) -> dict[str, tuple[int, int]]:
    """One line per metadata file: entries read, used, and left out (their reasons are in skipped.txt); a file
    whose entries were all left out is a warning. Returns {file: (read, used)}."""
    if not files or not len(cols):
        return {}
    starts = np.asarray([a for a, _ in cols.origins], np.int64)
    names = [o for _, o in cols.origins]
    run = np.searchsorted(starts, np.arange(len(cols)), side="right") - 1
    read = np.bincount(run, minlength=len(names))
    used = np.bincount(run[keep], minlength=len(names))
    out: dict[str, tuple[int, int]] = {}
    for j, name in enumerate(names):
        if name in files:
            r, u = out.get(name, (0, 0))
            out[name] = (r + int(read[j]), u + int(used[j]))
    for name, (r, u) in out.items():
        log.log(logging.WARNING if u == 0 or u < r else logging.INFO,
                "metadata %s: %d entries read, %d used, %d left out%s", name, r, u, r - u,
                " (reasons in skipped.txt)" if u < r else "")
    return out


def balance_reg(repeats: np.ndarray, is_reg: np.ndarray) -> None:
    """kohya's DreamBooth rule (train_util.DreamBoothDataset), in place: per epoch the regularisation images give
    as many samples as the training images with their repeats. Reg images are taken in index order with their own
    repeats until that count is reached (the rest get 0: unused, still cached); when all of them are too few, one
    more repeat is added to each in turn, from the first, until the count is reached. No training images -> no reg."""
    reg = np.flatnonzero(is_reg & (repeats > 0))
    if not len(reg):
        return
    target = int(repeats[~is_reg].sum())
    r = repeats[reg].astype(np.int64)
    cum = np.cumsum(r)
    if target == 0:
        r[:] = 0
    elif cum[-1] >= target:
        k = int(np.searchsorted(cum, target))  # first image that reaches the count
        r[k + 1 :] = 0
    else:
        full, rem = divmod(target - int(cum[-1]), len(r))
        r += full
        r[:rem] += 1
    repeats[reg] = r
    log.info("regularisation images: %d samples per epoch for %d training samples (%d of %d reg images used)",
             int(r.sum()), target, int((r > 0).sum()), len(r))


def no_images_message(subsets: list[SubsetSpec], recursive: bool, found: int, skipped: int, threads: int) -> str:
    """'no usable images' naming where it looked, and `recursive` when subfolders hold images."""
    where = [p for s in subsets for p in (s.metadata_files or s.image_dirs or s.tar_shards or [s.dataset_name_or_path])
             if p]
    msg = (f"the dataset has no usable images: looked in {', '.join(where[:5])}{' ...' if len(where) > 5 else ''} "
           f"({found} found, {skipped} skipped; see the log / skipped.txt)")
    if not recursive:
        dirs = [d for s in subsets if not s.metadata_files for d in s.image_dirs]
        deeper = len(list_images(dirs, True, threads)) if dirs else 0
        if deeper:
            msg += f"; {deeper} images are in subfolders: set data.recursive = true to use them"
    return msg


def check_captions(index: DatasetIndex, allow_empty: bool) -> None:
    """An error when every caption is empty (no caption file / field, and no class_tokens / prefix / suffix to stand
    in), unless allow_empty; the message counts them per subset and says where the captions were looked for.
    (A partly empty subset is one warning from data/sources.warn_empty_captions.)"""
    empty = np.diff(index.captions.offsets) == 0
    if not len(index) or not empty.all() or allow_empty:
        return
    if any(s.class_tokens or s.caption.get("caption_prefix") or s.caption.get("caption_suffix") for s in index.subsets):
        return  # an empty caption becomes the class tokens / prefix / suffix
    tot = np.bincount(index.subset.astype(np.int64), minlength=len(index.subsets))
    parts = []
    for i, s in enumerate(index.subsets):
        if tot[i]:
            src = (f"no caption or tags field in {', '.join(map(os.path.basename, s.metadata_files))}"
                   if s.metadata_files else f"no .txt / .caption / .json caption members in {len(s.tar_shards)} "
                   f"tar shard(s)" if s.tar_shards else f"no caption column in {s.dataset_name_or_path}"
                   if s.dataset_name_or_path else f"no {s.caption_extension} caption files")
            parts.append(f"subset {i}: {tot[i]} of {tot[i]} ({src})")
    raise ValueError(f"every caption is empty ({'; '.join(parts)}); set data.allow_empty_captions = true to train "
                     f"without captions")


def load_or_build_index(data: DataConfig, index_dir: str, *, is_main: bool = True, barrier: Callable[[], None] | None = None,
                        skipped: SkipReport | None = None, threads: int = 16,
                        known_sizes: Callable[[str], tuple[int, int] | None] | None = None) -> DatasetIndex:
    """Rank 0 reuses the saved index when its input fingerprint matches, else rebuilds and saves it; others load."""
    path = os.path.join(index_dir, INDEX_FILE)
    store_root = index_dir if os.path.isdir(os.path.join(index_dir, SHARD_DIR)) else ""
    # caption hooks may build a caption from the metadata: empty stored captions are then not a mistake
    allow_empty = data.allow_empty_captions or bool(data.caption_processor or data.description_processor)
    if is_main:
        index = None
        if os.path.exists(path):
            try:
                old = DatasetIndex.load(path)
                subsets = resolve_subsets(data)
                if old.fingerprint == _fingerprint(data, subsets) \
                        and (not old.store_sig or old.store_sig == store_signature(index_dir)):
                    index = old
                    if skipped is not None:
                        skipped.extend(old.skipped.items())
                    log.info("dataset index unchanged, reusing %s (%d entries)", path, len(old))
            except (ValueError, OSError, KeyError) as e:
                log.warning("cannot reuse %s (%s); rebuilding", path, e)
        if index is None:
            store = LatentStore(store_root, check_validity=False) if store_root else None
            try:
                with scan_parts(os.path.join(index_dir, SCAN_DIR)):  # tar shards: the ranks' scans (scan_tar_shards)
                    index = build_index(data, skipped, threads, known_sizes, store)
            finally:
                if store is not None:
                    store.close()
            check_captions(index, allow_empty)  # before saving: a refused index is not reused
            index.save(path)
            log.info("dataset index built: %d entries -> %s", len(index), path)
        else:
            check_captions(index, allow_empty)
    if barrier is not None:
        barrier()
    if not is_main:
        index = DatasetIndex.load(path)
    return index


def scan_tar_shards(data: DataConfig, index_dir: str, rank: int, world: int, threads: int = 4) -> int:
    """Every rank (before rank 0 builds the index, then a barrier): scan this rank's share of the tar shards into
    part files the build reads (data/readers/tar.py), unless the saved index is current. Returns the shards this
    rank scanned. Any problem (a bad config, a damaged shard) is left to rank 0's build, which reports it."""
    try:
        subsets = resolve_subsets(data)
        if not any(s.tar_shards for s in subsets):
            return 0
        path = os.path.join(index_dir, INDEX_FILE)
        if os.path.exists(path):
            if DatasetIndex.load(path).fingerprint == _fingerprint(data, subsets):
                return 0
        return scan_own_shards(subsets, os.path.join(index_dir, SCAN_DIR), rank, world, threads)
    except (ValueError, OSError, KeyError) as e:
        log.debug("rank %d: tar shards not pre-scanned (%s); the index build scans them", rank, e)
        return 0
