"""Dataset readers: one per on-disk format, all behind one interface, all producing the same index rows.

A subset's *sources* are its metadata files (one source each), its Hugging Face dataset folder, its tar shards (one
source for all of them), or else its image folders (one source for all of them). Each source is read by the first
registered reader whose `claims(source)` is true; the reader streams `Rows` chunks (column lists, never one object
per entry) and hashes what its rows depend on for the index fingerprint. Nothing outside this package knows about
formats.

Adding a format = one module with a `Reader` subclass (data/readers/base.py), decorated with `@register`, imported
below. A container format whose images are members of a bigger file (parquet / arrow tables, tar shards) gives its
rows locators `"<container path>::<member>"` as paths and implements `read_member`; `open_bytes` (data/locators.py)
routes every locator to the reader that made it, so cache.py and the loader decode those images like files. A
`sequential` container (a tar shard) is not read member by member: cache.py hands each rank whole containers and
streams them with `stream_members`, serving the bytes to the decoder through `member_bytes`.
"""

from __future__ import annotations

from ..locators import LOCATOR_SEP, is_locator, member_bytes, open_bytes, split_locator, stat_sig
from .base import (CHUNK, READERS, Reader, Rows, Source, chunked_rows, container_reader, deal_largest_first,
                   reader_for, register, sources_of)

# The formats, in the order they are asked (more specific first); importing a module registers its readers.
from . import metadata  # noqa: F401  (kohya / HCP / HF imagefolder / own metadata)
from . import folder  # noqa: F401  (DreamBooth folders, HF imagefolder dirs, plain folders)
from . import hf  # noqa: F401  (local Hugging Face datasets: parquet / arrow, pyarrow optional)
from . import tar  # noqa: F401  (webdataset tar shards)

__all__ = ["CHUNK", "LOCATOR_SEP", "READERS", "Reader", "Rows", "Source", "chunked_rows", "container_reader",
           "deal_largest_first", "is_locator", "member_bytes", "open_bytes", "reader_for", "register", "sources_of",
           "split_locator", "stat_sig"]
