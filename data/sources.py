"""Data sources: which subsets there are, and their rows read into columns.

`resolve_subsets` turns the typed [data] (and its [[data.subsets]]) into `SubsetSpec`s (data/spec.py), expanding kohya DreamBooth
roots (`train_data_dir` / `reg_data_dir`) into one subset per `<repeats>_<class tokens>` folder. `collect` reads
every subset's sources through the reader registry (data/readers/: one reader per format) into columns. Keys
must be unique over the whole dataset: duplicates are an error that lists them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os

import numpy as np

from core.config import DataConfig, SubsetConfig

from .buckets import BucketSettings
from .captions import description_of, options_for_subset
from .columns import PackedRows
from .hooks import COUNTED_FIELDS
from .listing import map_chunked  # noqa: F401  (cache.py imports it from here)
from .readers import reader_for, sources_of, stat_sig
from .readers.folder import dreambooth_subsets
from .readers.metadata import METADATA_EXTENSIONS
from .readers.tar import expand_shards
from .spec import SubsetSpec

log = logging.getLogger(__name__)

EMPTY_CAPTION_WARN = 0.05  # warn when more than this share of a subset's captions is empty


def _subset_fields(s: SubsetConfig) -> list[tuple[SubsetConfig, str, int]]:
    """(subset, layout, repeats) for a configured subset, kohya DreamBooth roots expanded into one subset per
    `<repeats>_<class tokens>` folder (its class tokens unless the subset sets its own)."""
    roots = [(s.train_data_dir, False), (s.reg_data_dir, True)]
    if not any(r for r, _ in roots):
        return [(s, "", int(s.num_repeats))]
    out = []
    for root, is_reg in roots:
        if not root:
            continue
        if not os.path.isdir(root):
            kind = "reg_data_dir" if is_reg else "train_data_dir"
            raise FileNotFoundError(f"[data] {kind} {root!r} is not a directory")
        for folder, repeats, tokens in dreambooth_subsets(root, is_reg):
            sub = dataclasses.replace(s, image_dirs=[folder], metadata_files=[], train_data_dir="", reg_data_dir="",
                                      is_reg=is_reg, class_tokens=s.class_tokens or tokens)
            out.append((sub, "dreambooth", repeats))
    return out


def _only_subset(data: DataConfig) -> SubsetConfig:
    """[data] itself as its one subset (no [[data.subsets]]): every per-subset option unset, so [data]'s apply."""
    return SubsetConfig(image_dirs=list(data.image_dirs), metadata_files=list(data.metadata_files),
                        train_data_dir=data.train_data_dir, reg_data_dir=data.reg_data_dir,
                        dataset_name_or_path=data.dataset_name_or_path, tar_shards=list(data.tar_shards),
                        num_repeats=data.num_repeats)


def resolve_subsets(data: DataConfig) -> list[SubsetSpec]:
    """Subsets of a DataConfig ([data] itself when there are none), validated."""
    subs = list(data.subsets) or [_only_subset(data)]
    out = []
    for i, s0 in enumerate(subs):
        for s, layout, repeats in _subset_fields(s0):
            ds, tars = s.dataset_name_or_path, list(s.tar_shards)
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
            for p in s.image_dirs:
                if not os.path.isdir(p):
                    raise FileNotFoundError(f"[data] subset {i}: image_dirs entry {p!r} is not a directory")
            for p in s.metadata_files:
                if os.path.isdir(p):  # HCP-Diffusion's caption_file may be a folder of caption files
                    continue
                if not os.path.isfile(p):
                    raise FileNotFoundError(f"[data] subset {i}: metadata file {p!r} does not exist")
                if not p.lower().endswith(METADATA_EXTENSIONS):
                    raise ValueError(f"[data] subset {i}: metadata file {p!r} has an unknown extension; "
                                     f"allowed: {', '.join(METADATA_EXTENSIONS)}")
            if ds and not os.path.exists(ds):
                raise FileNotFoundError(f"[data] subset {i}: dataset_name_or_path {ds!r} does not exist (only "
                                        f"local datasets are read: a hub snapshot folder or a save_to_disk folder)")
            out.append(_spec(s, data, layout, repeats, ds, tars, i))
    if len(out) > 32767:
        raise ValueError(f"[data] {len(out)} subsets; at most 32767 are supported")
    return out


BUCKET_FIELDS = ("resolution", "enable_bucket", "bucket_reso_step", "min_bucket_reso", "max_bucket_reso",
                 "bucket_no_upscale", "num_bucket")  # a subset's own bucketing (kohya's [[datasets]], HCP's)


def _spec(s: SubsetConfig, data: DataConfig, layout: str, repeats: int, ds: str, tars: list[str],
          source: int) -> SubsetSpec:
    """The SubsetSpec of a validated subset: its own values, else [data]'s."""
    own = any(getattr(s, f) is not None for f in BUCKET_FIELDS)
    bucket = dataclasses.asdict(BucketSettings.from_data_cfg(data, s, f"[data] subset {source}")) if own else {}
    ext = s.caption_extension if s.caption_extension is not None else data.caption_extension
    ext = ext or (".caption" if layout == "dreambooth" else ".txt")  # kohya's default in its own layout
    opts = options_for_subset(s, data)
    if layout == "dreambooth":  # the reader gives an image without a caption file its class tokens, as kohya
        opts = dataclasses.replace(opts, class_tokens="")
    # kohya: regularisation images are weighted by prior_loss_weight (through the per-sample weight)
    weight = float(s.loss_weight) * (float(data.prior_loss_weight) if s.is_reg else 1.0)
    return SubsetSpec(
        image_dirs=[os.path.abspath(p) for p in s.image_dirs],
        metadata_files=[os.path.abspath(p) for p in s.metadata_files],
        caption_extension=ext if ext.startswith(".") else "." + ext,
        num_repeats=int(repeats), is_reg=bool(s.is_reg), class_tokens=s.class_tokens,
        flip_aug=bool(data.flip_aug if s.flip_aug is None else s.flip_aug),
        random_crop=bool(data.random_crop if s.random_crop is None else s.random_crop),
        loss_weight=weight, caption=dataclasses.asdict(opts),
        layout=layout, dataset_name_or_path=os.path.abspath(ds) if ds else "",
        dataset_image_column=s.dataset_image_column or data.dataset_image_column,
        dataset_caption_column=s.dataset_caption_column or data.dataset_caption_column,
        tar_shards=tars, bucket=bucket, source=source)


def inputs_fingerprint(subsets: list[SubsetSpec], recursive: bool, extra: str) -> str:
    """Hash of everything the index depends on: settings, and what each source's reader says its rows depend on."""
    h = hashlib.sha256(extra.encode())
    h.update(repr(recursive).encode())
    for s in subsets:
        h.update(json.dumps(s.to_dict(), sort_keys=True, default=str).encode())
        for src in sources_of(s, recursive):
            reader_for(src).fingerprint(src, h)
        if s.metadata_files:
            # Folders only matter for the fallback lookup: their listing (names) is enough.
            for d in s.image_dirs:
                h.update(f"D{d}:{stat_sig(d)}".encode())
    return h.hexdigest()[:32]


def collect(subsets: list[SubsetSpec], recursive: bool, threads: int = 16, allow_empty: bool = False,
            keep_dicts: bool = False) -> PackedRows:
    """Read every subset's sources (each through its format's reader) into packed columns, chunk by chunk (see
    data/columns.py); raise on duplicate keys. `keep_dicts`: also keep the parsed metadata dicts (hooks)."""
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
    return s.where()


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


def require_store_for_containers(data: DataConfig, use_store: bool) -> None:
    """train.py without a latent store decodes images itself: tar shards are read only by cache.py (in order)."""
    if use_store:
        return
    for s in [data, *data.subsets]:
        if s.tar_shards:
            raise ValueError("tar_shards are read by cache.py, not by train.py: set [cache] cache_dir and run "
                             "`torchrun --nproc_per_node=N cache.py <config>` first; train.py then trains from the "
                             "latent store")

def check_duplicates(cols: PackedRows, limit: int = 20) -> None:
    """Raise ValueError listing keys that occur more than once (with where each came from); found from 64-bit key
    hashes (sorted), the strings compared only where hashes meet. A key repeated inside one JSON object file is one
    too (json.loads would keep the last entry and lose the others: data/readers/metadata.duplicate_key_error)."""
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
    dups = {keys[rows[0]]: [cols.origin_of(i) for i in rows]
            for rows in sorted((r for r in rows_of.values() if len(r) > 1), key=lambda r: r[1])}
    if dups:
        lines = [f"  {k!r}: {', '.join(v)}" for k, v in list(dups.items())[:limit]]
        more = f"\n  ... and {len(dups) - limit} more" if len(dups) > limit else ""
        raise ValueError(f"{len(dups)} duplicate dataset key(s) (keys are image file stems or metadata keys and "
                         f"must be unique; rename the files or give metadata keys):\n" + "\n".join(lines) + more)
