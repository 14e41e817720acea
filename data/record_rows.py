"""Cache-only training: every record cache.py writes (and every imported one) carries its index row in `x` (image
path, caption, description, metadata, size, subset signature), so the dataset index can be rebuilt from a latent
store whose images are gone. data/index.py `row_extra` writes that copy; `cached_rows` and `record_size` read it
back from an opened store (the index build is handed the store).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Iterator

from .spec import SubsetSpec
from .store import LatentStore


def subset_signature(spec: SubsetSpec) -> str:
    """What identifies a subset across runs (its sources), for records of the cache-only rebuild."""
    tars = spec.tar_shards
    src = json.dumps([spec.image_dirs, spec.metadata_files, spec.dataset_name_or_path, spec.layout]
                     + ([sorted({os.path.dirname(t) for t in tars})] if tars else []))
    return hashlib.sha1(src.encode()).hexdigest()[:12]


def cached_rows(store: LatentStore, have_keys: list[str], subsets: list[SubsetSpec]
                ) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """(subset index, key, x) of store records whose entry the sources no longer list (their image is gone)."""
    if len(store) == 0:
        return
    present = store.contains_many(have_keys)
    if int(present.sum()) == len(store):  # every stored key is listed: nothing to add (no header read)
        return
    sig = {subset_signature(s): i for i, s in enumerate(subsets)}
    listed = set(have_keys)
    for key in store.keys():
        if key in listed:
            continue
        x = store.record_info(key).get("x")
        if x and x.get("s") in sig:
            yield sig[x["s"]], key, x


def record_size(store: LatentStore, key: str) -> tuple[int, int] | None:
    """The image size (w, h) a store's record copied from its index row (None: no record, or no copy)."""
    if key not in store:
        return None
    wh = (store.record_info(key).get("x") or {}).get("wh")
    return (int(wh[0]), int(wh[1])) if wh else None
