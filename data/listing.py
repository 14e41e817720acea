"""Folder listings the readers share: image files under folders (parallel scandir), existence checks of many paths
from one listing per folder, and file name -> path tables for the metadata fallback lookup.

Imports only data/images.py (for the image extensions), so every reader and data/sources.py can use it.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from .images import IMAGE_EXTENSIONS
from .masks import is_mask_file

LISTINGS_KEPT = 4096  # folder listings a cache passed to exists_by_listing holds (cleared when full)


def walk_images(dirs: list[str], recursive: bool, threads: int, stat: bool,
                exts: tuple[str, ...] = IMAGE_EXTENSIONS) -> list[tuple[str, int, int]]:
    """(path, size, mtime_ns) of files under dirs whose lower-case name ends with one of `exts` (image files by
    default; size, mtime -1 unless stat), sorted by path, one folder level at a time. Folders of a level are scanned
    in parallel threads (scandir and stat release the GIL)."""
    out: list[tuple[str, int, int]] = []

    def scan(d: str) -> tuple[list[str], list[tuple[str, int, int]]]:
        subdirs, files = [], []
        with os.scandir(d) as it:
            entries = list(it)
        stems = {os.path.splitext(e.name)[0] for e in entries if e.name.lower().endswith(IMAGE_EXTENSIONS)} \
            if set(exts) & set(IMAGE_EXTENSIONS) else set()  # image stems: their masks are not images
        for e in entries:
            if e.is_dir(follow_symlinks=True):
                if recursive:
                    subdirs.append(e.path)
            elif e.name.lower().endswith(exts) and not (stems and is_mask_file(e.name, stems)):  # data/masks.py
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


def list_images(dirs: list[str], recursive: bool, threads: int = 16,
                exts: tuple[str, ...] = IMAGE_EXTENSIONS) -> list[tuple[str, int, int]]:
    """(path, size, mtime_ns) of every image file (or file with `exts`) under dirs, sorted by path (one stat per
    file via scandir)."""
    return walk_images(dirs, recursive, threads, stat=True, exts=exts)


def map_chunked(fn: Callable[[Any], Any], items: list, threads: int, chunk: int = 2048) -> list:
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


def exists_by_listing(paths: list[str], threads: int, listings: dict | None = None) -> list[bool | None]:
    """Per path: True / False where the parent folder's listing settles it, None where only the OS can tell.

    None: a name absent from an existing folder (a case-insensitive filesystem may still have it), odd names
    ("a/", "a/.."), unlistable folders. `listings` keeps folder listings between calls (the chunks of one source).
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
    out = exists_by_listing(paths, threads, listings)
    ask = [i for i, ok in enumerate(out) if ok is None]
    for i, ok in zip(ask, map_chunked(os.path.exists, [paths[i] for i in ask], threads)):
        out[i] = ok
    return out  # type: ignore[return-value]


def image_names(dirs: list[str], threads: int) -> dict[str, str]:
    """File name -> path of the images under dirs (recursive); a name found twice maps to the smallest path."""
    files = [p for p, _, _ in walk_images(dirs, True, threads, stat=False)]  # sorted by path, no stat needed
    return dict(zip(map(os.path.basename, reversed(files)), reversed(files)))  # later (smaller) paths win


def image_table(dirs: list[str], recursive: bool, threads: int) -> dict[str, str]:
    """Relative path without extension (= the stem for files at the top) -> image path, from one listing per folder
    (no stat); the smallest path wins when a name exists with several extensions."""
    out: dict[str, str] = {}
    for d in dirs:
        files = [p for p, _, _ in walk_images([d], recursive, threads, stat=False)]
        cut = len(d.rstrip(os.sep)) + 1
        for p in reversed(files):  # sorted ascending: reversed, so the smallest path is written last
            out[os.path.splitext(p[cut:])[0]] = p
    return out
