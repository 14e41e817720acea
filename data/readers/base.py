"""The reader interface every dataset format implements (`Reader`), the rows it yields (`Rows`), the registry and the
rule that finds a subset's sources. The formats (metadata, folder, hf, tar) import this module; the package
`data.readers` imports them in order, which registers them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Iterator

from ..locators import register_opener, stat_sig
from ..spec import SubsetSpec

CHUNK = 65536       # rows per streamed chunk


@dataclass
class Source:
    """One thing to read: a metadata file, a dataset folder, or a subset's image folders."""

    kind: str                      # "metadata" | "dataset" | "tar" | "folders"
    path: str                      # the file / folder ("" for "folders" and "tar")
    spec: SubsetSpec               # the subset (image_dirs, caption_extension, options ...)
    recursive: bool = False


@dataclass
class Rows:
    """Raw dataset entries, column-wise (lists; turned into numpy columns by the index)."""

    keys: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    metadata: list[dict[str, Any]] = field(default_factory=list)
    widths: list[int] = field(default_factory=list)    # -1 = read from the image header
    heights: list[int] = field(default_factory=list)
    subset: list[int] = field(default_factory=list)
    origin: list[str] = field(default_factory=list)    # where the entry came from, for error messages

    def __len__(self) -> int:
        return len(self.keys)

    def extend(self, other: "Rows") -> None:
        for name in self.__dataclass_fields__:
            getattr(self, name).extend(getattr(other, name))

    def take(self, sel: list[int]) -> "Rows":
        """The rows at positions sel (a new object)."""
        return Rows(**{n: [getattr(self, n)[i] for i in sel] for n in self.__dataclass_fields__})


class Reader:
    """One dataset format. Subclasses set `name` and implement `claims`, `read` (and `fingerprint` when the
    default, the source file's size + mtime, is not what its rows depend on)."""

    name = "?"
    container_exts: tuple[str, ...] = ()  # locator containers this reader opens in `read_member`
    sequential = False  # containers read front to back only (tar): cache.py streams them whole, `stream_members`

    def claims(self, src: Source) -> bool:
        raise NotImplementedError

    def read(self, src: Source, subset_index: int, threads: int) -> Iterator[Rows]:
        """Stream the source's rows in chunks; every row's `subset` is subset_index."""
        raise NotImplementedError

    def fingerprint(self, src: Source, h: "hashlib._Hash") -> None:
        """Feed what the rows depend on into h (cheap: stats and listings, never file contents of images)."""
        h.update(f"{self.name}:{src.path}:{stat_sig(src.path)}".encode())

    def read_member(self, locator: str) -> bytes:
        """The bytes of one member of a container file (only readers with container_exts)."""
        raise NotImplementedError(f"reader {self.name} has no container members")

    def stream_members(self, container: str, wanted: set[str]) -> Iterator[tuple[str, "bytes | None", str]]:
        """(member, bytes, '') of the wanted members in container order, then (member, None, why) for each one
        that could not be read (only sequential readers)."""
        raise NotImplementedError(f"reader {self.name} does not stream containers")


READERS: list[Reader] = []


def deal_largest_first(weight: dict[str, int], world: int) -> list[list[str]]:
    """Whole items (shards, containers) to ranks: largest weight first to the least loaded rank, ties by name and by
    rank, so every rank computes the same deal."""
    out: list[list[str]] = [[] for _ in range(world)]
    load = [0] * world
    for item in sorted(weight, key=lambda c: (-weight[c], c)):
        r = min(range(world), key=lambda r: (load[r], r))
        out[r].append(item)
        load[r] += weight[item]
    return out


def register(cls: type[Reader]) -> type[Reader]:
    """Class decorator: add a reader (readers registered earlier are asked first); a container format's
    `read_member` becomes the opener of its locators (data/locators.open_bytes)."""
    r = cls()
    READERS.append(r)
    if r.container_exts:
        register_opener(r.container_exts, lambda locator, r=r: r.read_member(locator))
    return cls


def reader_for(src: Source) -> Reader:
    """The reader of a source; a clear error when no format matches."""
    for r in READERS:
        if r.claims(src):
            return r
    raise ValueError(f"{src.kind} {src.path!r}: no reader recognises this format "
                     f"(readers: {', '.join(r.name for r in READERS)})")


def sources_of(spec: SubsetSpec, recursive: bool) -> list[Source]:
    """A subset's sources: each metadata file, else its dataset folder, else its tar shards, else its image folders."""
    if spec.metadata_files:
        return [Source("metadata", m, spec, recursive) for m in spec.metadata_files]
    if spec.dataset_name_or_path:
        return [Source("dataset", spec.dataset_name_or_path, spec, recursive)]
    if spec.tar_shards:
        return [Source("tar", "", spec, recursive)]
    return [Source("folders", "", spec, recursive)]


def chunked_rows(keys: list[str], paths: list[str], captions: list[str], metadata: list[dict[str, Any]],
                 widths: list[int], heights: list[int], subset_index: int, origin: str) -> Iterator[Rows]:
    """Column lists of one source as `Rows` chunks of at most CHUNK entries (every row from `origin`)."""
    for a in range(0, len(keys), CHUNK):
        b = min(len(keys), a + CHUNK)
        yield Rows(keys=keys[a:b], paths=paths[a:b], captions=captions[a:b], metadata=metadata[a:b],
                   widths=widths[a:b], heights=heights[a:b], subset=[subset_index] * (b - a),
                   origin=[origin] * (b - a))


def container_reader(container: str) -> Reader | None:
    """The reader that owns a locator container's extension (None: no reader does)."""
    low = container.lower()
    return next((r for r in READERS if r.container_exts and low.endswith(r.container_exts)), None)
