"""A local Hugging Face dataset (euge-trainer's `dataset_name_or_path`): a hub snapshot folder of parquet files, one
parquet file, or a `Dataset.save_to_disk` folder (arrow IPC stream files listed in state.json). Read with pyarrow
(optional: requirements-optional.txt); nothing is downloaded.

Columns: `dataset_image_column` (default `image`: the datasets Image feature, a struct of `bytes` and `path`, or
plain bytes, or a path string) and `dataset_caption_column` (default `caption`, else `text`); the others are the
entry's metadata. Keys: a `key` / `id` column when there is one, else `<file stem>/<row>`. Images stored as bytes
get the locator `<file>::<row>@<column>` as their path; cache.py and the loader decode them like files (`read_member`:
arrow files are memory-mapped, parquet row groups are read on demand and the last few kept per process).
"""

from __future__ import annotations

import glob
import json
import os
import threading
from collections import OrderedDict
from typing import Any, Iterator

from ..locators import LOCATOR_SEP, split_locator, stat_sig
from .base import CHUNK, Reader, Rows, Source, register

CAPTION_COLUMNS = ("caption", "text")
KEY_COLUMNS = ("key", "id", "__key__")
KEEP_ROW_GROUPS = 4  # parquet row groups cached per process for member reads
BATCH_ROWS = 256     # parquet rows read at once while indexing (the image column comes with them)


def _pyarrow():
    try:
        import pyarrow  # noqa: F401
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ValueError("reading a Hugging Face dataset (dataset_name_or_path) needs pyarrow: "
                         "pip install -r requirements-optional.txt (or pip install pyarrow)") from None
    return pyarrow


def dataset_files(path: str) -> list[str]:
    """The table files of a local dataset: save_to_disk's state.json list, else every parquet file (sorted)."""
    if os.path.isfile(path):
        return [path]
    state = os.path.join(path, "state.json")
    if os.path.isfile(state):
        with open(state, encoding="utf-8") as f:
            files = [os.path.join(path, d["filename"]) for d in json.load(f).get("_data_files", [])]
        if files:
            return files
    files = sorted(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True))
    if not files:
        files = sorted(glob.glob(os.path.join(path, "**", "*.arrow"), recursive=True))
    if not files:
        raise ValueError(f"dataset_name_or_path {path!r}: no parquet / arrow files (a hub snapshot folder, a parquet "
                         f"file or a save_to_disk folder is expected)")
    return files


def _open_table(path: str):
    pa = _pyarrow()
    if path.lower().endswith(".parquet"):
        return pa.parquet.ParquetFile(path)
    mm = pa.memory_map(path)
    try:
        return pa.ipc.open_stream(mm).read_all()   # what save_to_disk writes
    except pa.ArrowInvalid:
        return pa.ipc.open_file(mm).read_all()


@register
class HfDatasetReader(Reader):
    """Parquet / arrow tables of a local Hugging Face dataset."""

    name = "hf-dataset"
    container_exts = (".parquet", ".arrow")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tables: OrderedDict[str, Any] = OrderedDict()

    def claims(self, src: Source) -> bool:
        return src.kind == "dataset"

    def fingerprint(self, src: Source, h) -> None:
        for f in dataset_files(src.path):
            h.update(f"{self.name}:{f}:{stat_sig(f)}".encode())

    def read(self, src: Source, si: int, threads: int) -> Iterator[Rows]:
        _pyarrow()
        spec = src.spec
        for f in dataset_files(src.path):
            t = _open_table(f)
            schema = t.schema_arrow if hasattr(t, "schema_arrow") else t.schema
            cols = list(schema.names)
            img_col = spec.dataset_image_column or "image"
            if img_col not in cols:
                raise ValueError(f"dataset {f!r}: dataset_image_column {img_col!r} is not a column (columns: {cols})")
            cap_col = spec.dataset_caption_column or next((c for c in CAPTION_COLUMNS if c in cols), None)
            if cap_col and cap_col not in cols:
                raise ValueError(f"dataset {f!r}: dataset_caption_column {cap_col!r} is not a column "
                                 f"(columns: {cols})")
            key_col = next((c for c in KEY_COLUMNS if c in cols), None)
            other = [c for c in cols if c not in (img_col, cap_col)]
            stem = os.path.splitext(os.path.relpath(f, src.path) if os.path.isdir(src.path) else
                                    os.path.basename(f))[0]
            row0 = 0
            for batch in _batches(t, [c for c in [cap_col, key_col, *other] if c] + [img_col]):
                n = batch.num_rows
                d = {c: batch.column(c) for c in batch.schema.names}
                img = d[img_col]
                paths = _image_paths(img, f, img_col, row0, n)
                caps = [str(c or "").strip() for c in d[cap_col].to_pylist()] if cap_col else [""] * n
                keys = ([str(k) for k in d[key_col].to_pylist()] if key_col else
                        [f"{stem}/{row0 + i}" for i in range(n)])
                md_cols = {c: d[c].to_pylist() for c in other if c in d}
                mds = [{c: v[i] for c, v in md_cols.items() if v[i] is not None} for i in range(n)]
                yield Rows(keys=keys, paths=paths, captions=caps, metadata=mds, widths=[-1] * n, heights=[-1] * n,
                           subset=[si] * n, origin=[f] * n)
                row0 += n

    def read_member(self, locator: str) -> bytes:
        path, member = split_locator(locator)
        row_s, _, column = member.partition("@")
        row = int(row_s)
        with self._lock:
            t = self._tables.get(path)
            if t is None:
                t = _open_table(path)
                self._tables[path] = t
                while len(self._tables) > 8:
                    self._tables.popitem(last=False)
        value = _row_value(t, row, column, path)
        if isinstance(value, dict):
            if value.get("bytes"):
                return value["bytes"]
            value = value.get("path")
        if isinstance(value, (bytes, bytearray)):
            return bytes(value)
        raise FileNotFoundError(f"{locator}: the image cell holds no bytes ({type(value).__name__})")

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers open their own tables
        return {}

    def __setstate__(self, st: dict[str, Any]) -> None:
        self.__init__()


_groups: OrderedDict[tuple[str, int, str], Any] = OrderedDict()
_groups_lock = threading.Lock()


def _row_value(t, row: int, column: str, path: str) -> Any:
    """The image cell of one row: arrow tables are memory-mapped; parquet reads (and keeps) its row group."""
    if not hasattr(t, "read_row_group"):  # an arrow Table (memory-mapped)
        return t.column(column)[row].as_py()
    md = t.metadata
    start = 0
    for g in range(md.num_row_groups):
        n = md.row_group(g).num_rows
        if row < start + n:
            with _groups_lock:
                tab = _groups.get((path, g, column))
                if tab is None:
                    tab = t.read_row_group(g, columns=[column])
                    _groups[(path, g, column)] = tab
                    while len(_groups) > KEEP_ROW_GROUPS:
                        _groups.popitem(last=False)
                else:
                    _groups.move_to_end((path, g, column))
            return tab.column(0)[row - start].as_py()
        start += n
    raise FileNotFoundError(f"{path}: row {row} is past the end ({start} rows)")


def _batches(t, columns: list[str]):
    if hasattr(t, "iter_batches"):  # parquet: streamed, a few hundred rows (their image bytes) at a time
        yield from t.iter_batches(batch_size=BATCH_ROWS, columns=columns)
    else:
        yield from t.select(columns).to_batches(max_chunksize=CHUNK)


def _image_paths(img, f: str, column: str, row0: int, n: int) -> list[str]:
    """Per row: the image file when the cell is a path without bytes, else the locator `<file>::<row>@<column>`
    (only the struct's `path` field and the bytes' null mask are looked at: no image bytes become Python objects)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    t = img.type
    if pa.types.is_struct(t):
        names = [t.field(i).name for i in range(t.num_fields)]
        has = (pc.fill_null(pc.greater(pc.binary_length(img.field("bytes")), 0), False).to_pylist()
               if "bytes" in names else [False] * n)
        where = img.field("path").to_pylist() if "path" in names else [None] * n
    elif pa.types.is_string(t) or pa.types.is_large_string(t):
        has, where = [False] * n, img.to_pylist()
    else:  # binary
        has, where = [True] * n, [None] * n
    return [f"{f}{LOCATOR_SEP}{row0 + i}@{column}" if b or not w else w for i, (b, w) in enumerate(zip(has, where))]
