"""Locators: how an image that is a member of a bigger file is named, and how its bytes are found.

A container format (parquet / arrow tables, tar shards) names its images `"<container path>::<member>"`. The
reader of the format registers an opener for its container extensions (data/readers: `register`), and
`open_bytes` routes a locator to it, so data/images.py decodes members like files without knowing any format.
A streaming reader that already holds a member's bytes serves them with `member_bytes` for the time of a block.

A leaf module (standard library only): the readers, images and the store all import it.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Callable, Iterator

LOCATOR_SEP = "::"  # "<container file>::<member>" (a member of a parquet / arrow table, a tar shard, ...)

Opener = Callable[[str], bytes]
_OPENERS: list[tuple[tuple[str, ...], Opener]] = []  # (container extensions, the reader's read_member)


def is_locator(path: str) -> bool:
    """Whether a path names a member of a container file."""
    return LOCATOR_SEP in path


def split_locator(path: str) -> tuple[str, str]:
    """(container path, member) of a locator."""
    container, _, member = path.rpartition(LOCATOR_SEP)
    return container, member


def stat_sig(path: str) -> str:
    """size:mtime_ns of a path ('-' when missing); locators use their container's."""
    if is_locator(path):
        path = split_locator(path)[0]
    try:
        st = os.stat(path)
        return f"{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        return "-"


def register_opener(exts: tuple[str, ...], opener: Opener) -> None:
    """Route locators whose container ends with one of `exts` (lower case) to `opener` (first registered wins)."""
    _OPENERS.append((exts, opener))


def opener_for(container: str) -> Opener | None:
    """The opener of a container file's extension (None: no reader opens it)."""
    low = container.lower()
    return next((fn for exts, fn in _OPENERS if low.endswith(exts)), None)


_served = threading.local()  # locator -> bytes already read by a streaming reader, per thread


@contextlib.contextmanager
def member_bytes(locator: str, data: bytes) -> Iterator[None]:
    """Within the block, `open_bytes(locator)` (and so every image function given the locator) returns `data`."""
    d = _served.__dict__.setdefault("m", {})
    d[locator] = data
    try:
        yield
    finally:
        d.pop(locator, None)


def open_bytes(locator: str) -> bytes:
    """The bytes behind a locator: served by `member_bytes`, else from the reader that owns its container."""
    served = getattr(_served, "m", None)
    if served and locator in served:
        return served[locator]
    container, _ = split_locator(locator)
    fn = opener_for(container)
    if fn is None:
        raise FileNotFoundError(f"{locator!r}: no reader opens {container!r}")
    return fn(locator)
