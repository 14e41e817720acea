"""Tar shards in the webdataset layout (`[[data.subsets]] tar_shards = ["/data/shards/{000000..000999}.tar"]`).

A shard holds samples: files that share a key, `<key>.<ext>`, stored next to each other (what webdataset's
TarWriter / ShardWriter, img2dataset and `tar` over a sorted folder write). The grouping is webdataset's
(tariterators.base_plus_ext / group_by_keys): only regular files count; names `__...__` are webdataset metadata
and skipped; the key is the member name up to the first dot of its base name (folders inside the tar kept:
`a/b.c.jpg` -> key `a/b`, extension `c.jpg`), the extension is lower-cased; consecutive members with the same key
form one sample; a repeated extension within a sample is an error.

Per sample: the image is the `jpg` / `jpeg` / `png` / `webp` ... member (the first one in tar order); the caption
is the `<caption_extension>` member (default `.txt`), else `.txt` / `.caption`, else a `.json` member's `caption`
(else its `tags`, as our metadata records); a `.json` member's other fields are the entry's metadata
(`description`, `tags`, ... as elsewhere). Its `width` / `height` are used for bucketing when present (as for
metadata records); otherwise the size comes from the image header, read while the shard is scanned.

Index rows point at `<shard>::<image member>`. The index scan reads member headers, the caption / JSON members
and the first bytes of each image, moving forward only. Under cache.py every rank scans its own whole shards
(`scan_own_shards`: largest first to the least loaded rank, as cache.py deals shards for encoding) and writes each
shard's scan as one part file (`<index dir>/tar_scan/<digest>.json`, atomic; the digest covers the shard's path,
size, mtime and caption extension), then rank 0 builds the index from the parts, scanning only shards without one
(in threads). Parts are reused by later builds: a changed shard is the only one scanned again. cache.py then gives
each rank whole shards and streams them once from start to end (`stream_members`); nothing seeks back into a tar.
A corrupt image or a sample without one is left out with its reason (skipped.txt), like a bad image file.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import re
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

from core.fsio import atomic_write, is_temp, remove_quietly

from ..images import IMAGE_EXTENSIONS, BadImage, read_size
from ..locators import LOCATOR_SEP, member_bytes, split_locator, stat_sig
from ..spec import SubsetSpec
from .base import Reader, Rows, Source, chunked_rows, deal_largest_first, register
from .metadata import caption_text, size_from_md

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = tuple(e[1:] for e in IMAGE_EXTENSIONS)  # webdataset extensions: "jpg", "png", ...
CAPTION_SUFFIXES = ("txt", "caption")
HEAD_BYTES = 1 << 16  # bytes of an image read for its size while indexing (the whole member when the header is longer)
KEEP_OPEN = 4         # shards whose member table is kept per process for the odd member read (dry-run previews)
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset base_plus_ext: key = up to the first dot of the base name
_META = re.compile(r"__[^/]*__($|/)")               # webdataset's skipped metadata members
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?$")
SCAN_DIR = "tar_scan"  # per-shard scan parts, in the index's folder
SCAN_VERSION = 1


# ---- shard lists -----------------------------------------------------------------------------------------------

def expand_braces(pattern: str) -> list[str]:
    """Brace expansion as bash / webdataset's braceexpand: `{a,b}`, `{000..123}` (zero padded to the wider end when
    an end has a leading zero), `{1..9..2}`, descending ranges, nesting; `{x}` without a comma or range stays as is."""
    i = pattern.find("{")
    if i < 0:
        return [pattern]
    depth, j = 0, i
    for j in range(i, len(pattern)):
        depth += {"{": 1, "}": -1}.get(pattern[j], 0)
        if depth == 0:
            break
    if depth:
        raise ValueError(f"tar_shards pattern {pattern!r}: unbalanced braces")
    head, inner, rest = pattern[:i], pattern[i + 1 : j], expand_braces(pattern[j + 1 :])
    m = _RANGE.match(inner)
    if m:
        left, right, step = m.groups()
        pad = max(len(left), len(right)) if any(s.lstrip("-").startswith("0") and s.lstrip("-") != "0"
                                                for s in (left, right)) else 0
        a, b, k = int(left), int(right), abs(int(step or 1)) or 1
        items = [f"{v:0{pad}d}" for v in (range(a, b + 1, k) if a <= b else range(a, b - 1, -k))]
    else:
        parts, depth, start = [], 0, 0
        for p, c in enumerate(inner):
            depth += {"{": 1, "}": -1}.get(c, 0)
            if c == "," and depth == 0:
                parts.append(inner[start:p])
                start = p + 1
        if not parts:  # no top-level comma: a literal brace pair
            items = ["{" + x + "}" for x in expand_braces(inner)]
        else:
            items = [x for part in parts + [inner[start:]] for x in expand_braces(part)]
    return [head + x + r for x in items for r in rest]


def expand_shards(patterns: list[str], where: str) -> list[str]:
    """Absolute shard paths of tar_shards patterns (braces, then globs), in order, each once; missing shards are an
    error that names them (a glob that matches nothing too)."""
    out: dict[str, None] = {}
    missing: list[str] = []
    for pat in patterns:
        for p in expand_braces(os.path.expanduser(pat)):
            if glob.has_magic(p):
                hits = sorted(glob.glob(p))
                if not hits:
                    missing.append(p)
                out.update(dict.fromkeys(os.path.abspath(h) for h in hits if os.path.isfile(h)))
            elif os.path.isfile(p):
                out[os.path.abspath(p)] = None
            else:
                missing.append(p)
    if missing:
        more = f" ... and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise FileNotFoundError(f"{where}: {len(missing)} tar_shards entr{'y does' if len(missing) == 1 else 'ies do'} "
                                f"not exist: {', '.join(missing[:3])}{more}")
    if not out:
        raise FileNotFoundError(f"{where}: tar_shards {patterns} name no files")
    return list(out)


# ---- samples ---------------------------------------------------------------------------------------------------

def split_key(name: str) -> tuple[str, str] | None:
    """(key, lower-cased extension) of a member name as webdataset splits it; None for names it skips."""
    m = _KEY.match(name)
    return (m.group(1), m.group(2).lower()) if m else None


def group_samples(members: Iterator, shard: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(key, {extension: member}) per sample, webdataset's rule: consecutive regular files with the same key."""
    key, cur = None, {}
    for ti in members:
        if not ti.isreg() or _META.match(ti.name) or ("/" not in ti.name and ti.name.startswith("__")
                                                      and ti.name.endswith("__")):
            continue
        kx = split_key(ti.name)
        if kx is None:
            continue
        k, ext = kx
        if k != key:
            if cur:
                yield key, cur
            key, cur = k, {}
        if ext in cur:
            raise ValueError(f"tar shard {shard!r}: member {ti.name!r} repeats {ext!r} in sample {k!r} (webdataset "
                             f"refuses duplicate file names in a sample)")
        cur[ext] = ti
    if cur:
        yield key, cur


class Member:
    """A tar member as the index scan needs it: name, where its data starts, size, whether it is a regular file."""

    __slots__ = ("name", "offset", "size", "reg")

    def __init__(self, name: str, offset: int, size: int, reg: bool):
        self.name, self.offset, self.size, self.reg = name, offset, size, reg

    def isreg(self) -> bool:
        return self.reg


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 (sizes >= 8 GiB)
        return int.from_bytes(field[1:], "big")
    field = field.split(b"\0", 1)[0].strip()
    return int(field, 8) if field else 0


def _pax(data: bytes) -> dict[str, str]:
    """PAX extended header records `<len> <key>=<value>\\n`."""
    out, i = {}, 0
    while i < len(data):
        sp = data.index(b" ", i)
        n = int(data[i:sp])
        k, _, v = data[sp + 1 : i + n - 1].partition(b"=")
        out[k.decode("utf-8", "replace")] = v.decode("utf-8", "surrogateescape")
        i += n
    return out


def iter_members(f, shard: str) -> Iterator[Member]:
    """The members of a tar stream, from their 512-byte headers only (ustar, GNU long names, PAX `path` / `size`),
    seeking over the data (tarfile builds a full TarInfo per member: the scan ran 2.7x slower with it,
    bench/tar_bench.py)."""
    pos, long_name, pax = 0, None, {}
    while True:
        f.seek(pos)
        h = f.read(512)
        if len(h) < 512 or h == bytes(512):
            return  # end of archive (a zero block), or a file cut at a member boundary
        field = h[148:156]
        if _octal(field) != sum(h) - sum(field) + 256:  # the checksum counts its own field as 8 spaces
            raise ValueError(f"tar shard {shard!r}: damaged member header at byte {pos}")
        size = _octal(h[124:136])
        kind = h[156:157]
        data = pos + 512
        pos = data + (size + 511) // 512 * 512
        if kind in (b"x", b"L", b"g"):
            f.seek(data)
            body = f.read(size)
            if kind == b"x":
                pax = _pax(body)
            elif kind == b"L":
                long_name = body.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            continue
        name = h[0:100].split(b"\0", 1)[0]
        if h[257:263] == b"ustar\0" and h[345:346] != b"\0":  # POSIX ustar: a name prefix
            name = h[345:500].split(b"\0", 1)[0] + b"/" + name
        name = pax.get("path") or long_name or name.decode("utf-8", "surrogateescape")
        if "size" in pax:
            size = int(pax["size"])
            pos = data + (size + 511) // 512 * 512
        if kind == b"5":
            name = name.rstrip("/")  # as tarfile names folders
        yield Member(name, data, size, kind in (b"0", b"\0", b"7"))
        long_name, pax = None, {}


def _read(f, m: Member, n: int = -1) -> bytes:
    f.seek(m.offset)
    return f.read(m.size if n < 0 else min(n, m.size))


def _text(f, m: Member, shard: str) -> str:
    try:
        return _read(f, m).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"caption {shard}{LOCATOR_SEP}{m.name} is not UTF-8: {e}") from None


def _open_raw(shard: str):
    if shard.lower().endswith((".gz", ".tgz")):
        import gzip

        return gzip.open(shard, "rb")
    return open(shard, "rb")


def _scan_shard(shard: str, caption_ext: str) -> tuple[list, dict[str, str]]:
    """One shard's samples as (key, locator, caption, metadata, w, h) and {locator: why it is unusable}."""
    order = [caption_ext.lstrip(".").lower()] + [e for e in CAPTION_SUFFIXES if e != caption_ext.lstrip(".").lower()]
    out, bad = [], {}
    try:
        tf = _open_raw(shard)
    except OSError as e:
        raise ValueError(f"tar shard {shard!r} cannot be read: {e}") from None
    with tf:
        try:
            for key, sample in group_samples(iter_members(tf, shard), shard):
                img = next((ext for ext in sample if ext in IMAGE_SUFFIXES), None)
                loc = f"{shard}{LOCATOR_SEP}{sample[img].name if img else key}"
                if img is None:
                    bad[loc] = f"sample {key!r} has no image member (has {', '.join('.' + e for e in sample)})"
                    out.append((key, loc, "", {}, -1, -1))
                    continue
                cap = next((_text(tf, sample[e], shard).strip() for e in order if e in sample), None)
                md: dict[str, Any] = {}
                if "json" in sample:
                    try:
                        md = json.loads(_text(tf, sample["json"], shard))
                        if not isinstance(md, dict):
                            raise ValueError(f"an object is expected, got {type(md).__name__}")
                    except ValueError as e:
                        bad[loc] = f"{key}.json is not a JSON object: {e}"
                        out.append((key, loc, "", {}, -1, -1))
                        continue
                    c = md.pop("caption", None)
                    if cap is None:
                        where = f"{shard}{LOCATOR_SEP}{sample['json'].name}"  # our records' rule: caption, else tags
                        cap = (caption_text(c, ",", where) or caption_text(md.get("tags"), ",", where)).strip()
                w, h = size_from_md(md)
                if w <= 0 or h <= 0:
                    w, h = _header_size(tf, sample[img], loc, bad)
                out.append((key, loc, cap or "", md, w, h))
        except (OSError, EOFError) as e:
            raise ValueError(f"tar shard {shard!r} is damaged: {e}") from None
    return out, bad


def _header_size(f, m: Member, loc: str, bad: dict[str, str]) -> tuple[int, int]:
    """Displayed size from the first bytes of the member (all of it when its header is longer); -1 when unusable."""
    data = _read(f, m, HEAD_BYTES)
    while True:
        try:
            with member_bytes(loc, data):
                return read_size(loc)
        except BadImage as e:
            if len(data) < m.size:
                data = _read(f, m)
                continue
            bad[loc] = str(e)
            return -1, -1


# ---- scan parts: one file per scanned shard, written by the rank that scanned it ---------------------------------

_parts = threading.local()  # .dir: the folder of scan parts the index build reads / writes ("" = none)


@contextlib.contextmanager
def scan_parts(directory: str):
    """Within the block, TarShardReader.read takes shards' scans from part files in `directory` and writes the
    scans it makes there."""
    old = getattr(_parts, "dir", "")
    _parts.dir = directory
    try:
        yield
    finally:
        _parts.dir = old


def part_path(directory: str, shard: str, caption_ext: str) -> str:
    """The part file of a shard's scan: named by a digest of what the scan depends on (a changed shard: a new name)."""
    h = hashlib.sha256(f"{SCAN_VERSION}\0{shard}\0{stat_sig(shard)}\0{caption_ext}".encode()).hexdigest()[:32]
    return os.path.join(directory, f"{h}.json")


def _write_part(path: str, shard: str, samples: list, bad: dict[str, str]) -> None:
    cut = len(shard) + len(LOCATOR_SEP)
    body = {"shard": shard, "samples": [[k, loc[cut:], c, m, w, h] for k, loc, c, m, w, h in samples],
            "bad": {loc[cut:]: why for loc, why in bad.items()}}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write(path, lambda f: f.write(json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()))


def _read_part(path: str, shard: str) -> tuple[list, dict[str, str]] | None:
    """A shard's scan from its part file; None when there is none (or it is unreadable: scanned again)."""
    try:
        with open(path, "rb") as f:
            body = json.loads(f.read())
        if body.get("shard") != shard:
            return None
        pre = shard + LOCATOR_SEP
        samples = [(k, pre + m, c, md, w, h) for k, m, c, md, w, h in body["samples"]]
        return samples, {pre + m: why for m, why in body["bad"].items()}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def deal_shards(shards: list[str], world: int) -> list[list[str]]:
    """Whole shards to ranks, largest (in bytes) first to the least loaded rank, in the same way on every rank
    (cache.py deals shards for encoding by the same rule, by rows)."""
    size = {}
    for p in shards:
        try:
            size[p] = os.path.getsize(p)
        except OSError:
            size[p] = 0
    return deal_largest_first(size, world)


def scan_own_shards(specs: list[SubsetSpec], directory: str, rank: int, world: int, threads: int = 4) -> int:
    """This rank's share of every subset's tar shards scanned into part files (those without a current one);
    returns how many it scanned. A shard that cannot be scanned is left to the index build (rank 0), which reports
    it the usual way. Rank 0 also removes parts no current shard uses."""
    jobs = sorted({(shard, s.caption_extension) for s in specs for shard in (s.tar_shards or [])})
    if not jobs:
        return 0
    mine = set(deal_shards(sorted({j[0] for j in jobs}), world)[rank])
    todo = [(sh, ext, part_path(directory, sh, ext)) for sh, ext in jobs if sh in mine]
    todo = [j for j in todo if not os.path.exists(j[2])]
    if rank == 0 and os.path.isdir(directory):
        keep = {os.path.basename(part_path(directory, sh, ext)) for sh, ext in jobs}
        for name in os.listdir(directory):
            if name.endswith(".json") and name not in keep and not is_temp(name):
                remove_quietly(os.path.join(directory, name))

    def one(job) -> bool:
        shard, ext, path = job
        try:
            samples, bad = _scan_shard(shard, ext)
        except ValueError:  # damaged / unreadable: rank 0's build meets it again and says so
            return False
        _write_part(path, shard, samples, bad)
        return True

    with ThreadPoolExecutor(max(1, min(threads, len(todo) or 1))) as ex:
        done = sum(ex.map(one, todo))
    if done:
        log.info("rank %d: scanned %d of its %d tar shards (%d others already had a current scan)", rank, done,
                 len(mine), len(mine) - len(todo))
    return done


@register
class TarShardReader(Reader):
    """webdataset tar shards of a subset: read forward only, shards in parallel threads."""

    name = "tar-shards"
    container_exts = (".tar", ".tar.gz", ".tgz")
    sequential = True

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: OrderedDict[str, dict[str, Member]] = OrderedDict()  # member tables of the last shards
        self._bad: dict[str, str] = {}  # locator -> reason, from this process's scans (read_member reports it)

    def claims(self, src: Source) -> bool:
        return src.kind == "tar"

    def fingerprint(self, src: Source, h) -> None:
        for shard in src.spec.tar_shards:
            h.update(f"{self.name}:{shard}:{stat_sig(shard)}".encode())

    def read(self, src: Source, si: int, threads: int) -> Iterator[Rows]:
        shards, ext = src.spec.tar_shards, src.spec.caption_extension
        directory = getattr(_parts, "dir", "")

        def scan(shard: str) -> tuple[list, dict[str, str]]:
            if not directory:
                return _scan_shard(shard, ext)
            path = part_path(directory, shard, ext)
            got = _read_part(path, shard) if os.path.exists(path) else None
            if got is None:  # no rank scanned it yet (or its part is unreadable)
                got = _scan_shard(shard, ext)
                _write_part(path, shard, *got)
            return got

        with ThreadPoolExecutor(max(1, min(threads, len(shards)))) as ex:  # they overlap the reads
            scans = ex.map(scan, shards)
            for shard, (samples, bad) in zip(shards, scans):
                self._bad.update(bad)
                if samples:
                    keys, locs, caps, mds, ws, hs = map(list, zip(*samples))
                    yield from chunked_rows(keys, locs, caps, mds, ws, hs, si, shard)

    def read_member(self, locator: str) -> bytes:
        """One member (a few reads: previews); a locator found unusable while indexing raises its reason."""
        if locator in self._bad:
            raise BadImage(self._bad[locator])
        shard, member = split_locator(locator)
        with self._lock:
            members = self._open.get(shard)
            if members is None:
                with _open_raw(shard) as f:
                    members = self._open[shard] = {m.name: m for m in iter_members(f, shard)}
                while len(self._open) > KEEP_OPEN:
                    self._open.popitem(last=False)
            self._open.move_to_end(shard)
        if member not in members:
            raise FileNotFoundError(f"{shard} has no member {member!r}")
        with _open_raw(shard) as f:
            return _read(f, members[member])

    def stream_members(self, shard: str, wanted: set[str]) -> Iterator[tuple[str, bytes | None, str]]:
        """(member, bytes, '') for the wanted members in tar order, reading the shard once from start to end; then
        (member, None, why) for each wanted member that is not there (or past a damaged part)."""
        left = set(wanted)
        why = "not in the shard (changed since it was indexed?)"
        try:
            with _open_raw(shard) as f:
                for m in iter_members(f, shard):
                    if m.reg and m.name in left:
                        left.discard(m.name)
                        yield m.name, _read(f, m), ""
                        if not left:
                            break
        except (OSError, EOFError, ValueError) as e:
            why = f"tar shard unreadable: {e}"
        for m in sorted(left):
            yield m, None, why

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers open their own shards
        return {}

    def __setstate__(self, st: dict[str, Any]) -> None:
        self.__init__()
