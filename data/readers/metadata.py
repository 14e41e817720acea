"""Metadata files: kohya fine-tune metadata, HCP-Diffusion caption JSON, Hugging Face imagefolder metadata, and
our own JSON / JSONL / CSV / SQLite records.

- kohya (`merge_captions_to_metadata.py`, `merge_dd_tags_to_metadata.py`, `prepare_buckets_latents.py` output,
  e.g. `meta_lat.json`): `{key: {"caption", "tags", "train_resolution"}}`, no image path. The key is the image stem
  (found in `image_dirs` with any supported extension) or, with `--full_path`, the image path. Caption as kohya
  builds it (train_util.FineTuningDataset, no wildcard): `caption`, then `caption_separator + tags` when there are
  tags (tags alone when there is no caption). `train_resolution` (w, h) is the size used for bucketing, as kohya
  uses it, so no image header is read.
- HCP-Diffusion captions (its `caption_file`): a JSON or YAML `{"<image name>": "caption", ...}`, or a folder of
  them / of `.txt` files; every image of `image_dirs` trains, those without a caption on '' (HCP's rule).
- Hugging Face imagefolder `metadata.jsonl` / `metadata.csv`: `file_name` relative to the file's folder, the
  caption in `dataset_caption_column` (default: `text`, else `caption`), other columns carried as metadata.
- Ours / euge-trainer's: `{key: {"image_path", "caption", ...}}` or a list / JSONL / CSV / SQLite of records with
  `image_path` (and optionally `key`); caption = `caption`, else `tags` (euge-trainer's `caption or tags`).
A path that does not exist is looked up by file name in the subset's `image_dirs`.
"""

from __future__ import annotations

import codecs
import csv
import glob
import json
import json.scanner
import logging
import os
import re
import sqlite3
from itertools import repeat
from typing import Any, Callable, Iterator

import numpy as np

from ..images import IMAGE_EXTENSIONS
from ..latent_files import LATENT_EXT, classify_npz
from ..listing import exists_by_listing, exists_many, image_names, image_table, map_chunked, walk_images
from ..locators import stat_sig
from ..spec import SubsetSpec
from .base import CHUNK, Reader, Rows, Source, chunked_rows, register

log = logging.getLogger(__name__)

METADATA_EXTENSIONS = (".json", ".jsonl", ".csv", ".sqlite", ".sqlite3", ".db", ".yaml", ".yml")
PATH_FIELD = "image_path"
HF_FILE_FIELD = "file_name"
HF_CAPTION_FIELDS = ("text", "caption")
PEEK_BYTES = 1 << 16


# ---- parsing ---------------------------------------------------------------------------------------------------

def _first_bad(items: list, ok: Callable[[Any], bool]) -> int:
    return next(i for i, x in enumerate(items) if not ok(x))


def _keyed(recs: list, where: Callable[[int], str]) -> tuple[list[str], list[dict[str, Any]]]:
    """Keys of list-style records: their `key`, else the stem of their image_path."""
    if not all(map(isinstance, recs, repeat(dict))):
        i = _first_bad(recs, lambda r: isinstance(r, dict))
        raise ValueError(f"{where(i)}: expected an object with image_path, got {type(recs[i]).__name__}")
    keys = [r.get("key") for r in recs]
    for i, k in enumerate(keys):
        if not k:  # only records without a key pay for the per-entry work
            p = recs[i].get(PATH_FIELD)
            if p is not None and not isinstance(p, str):  # e.g. an integer in a SQLite column
                raise ValueError(f"{where(i)}: '{PATH_FIELD}' must be text, got {type(p).__name__} {p!r}")
            k = os.path.splitext(os.path.basename(p))[0] if p else None
            if not k:
                raise ValueError(f"{where(i)}: record has neither 'key' nor '{PATH_FIELD}'")
            keys[i] = k
    return list(map(str, keys)), recs


def read_jsonl(path: str) -> tuple[list[dict[str, Any]], list[int]]:
    """(records, line numbers) of a JSONL file."""
    recs, lines = [], []
    for r, ln in iter_jsonl(path):
        recs += r
        lines += ln
    return recs, lines


def iter_jsonl(path: str, chunk: int = CHUNK) -> Iterator[tuple[list[Any], list[int]]]:
    """(records, line numbers) of a JSONL file, at most `chunk` records at a time."""
    # The C scanner on each line skips json.loads' per-call checks and regex matches; errors go through
    # json.loads so their messages are the standard ones.
    scan = json.scanner.make_scanner(json.JSONDecoder())
    recs, lines = [], []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            line = line.strip()
            if not line:
                continue
            try:
                obj, end = scan(line, 0)
                ok = end == len(line)
            except (StopIteration, ValueError):
                ok = False
            if not ok:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"metadata {path!r} line {i + 1} is not valid JSON: {e}") from None
            recs.append(obj)
            lines.append(i + 1)
            if len(recs) >= chunk:
                yield recs, lines
                recs, lines = [], []
    if recs:
        yield recs, lines


STREAM_CHARS = 1 << 22  # characters of a JSON object file parsed per chunk (~35k metadata entries)
LONGEST_ENTRY = 1 << 20  # an entry still unparsable with this much text after its start is an error, not a cut
_WS = re.compile(r"[ \t\n\r]*")
# Where one entry may end and the next begin: a value's end, a comma, a key, a colon and the next value's start
# (an object or a string, as the file's entries are).
_CUTS = {c: re.compile(r'%s[ \t\n\r]*,[ \t\n\r]*"(?:[^"\\]|\\.)*"[ \t\n\r]*:[ \t\n\r]*%s' % (e, c))
         for c, e in (("{", "}"), ('"', '"'))}


def _json_error(path: str, msg: str, text: str, pos: int, base_chars: int, base_lines: int, line_start: int) -> ValueError:
    """`metadata ... is not valid JSON` with the position in the whole file (chunks are parsed separately)."""
    nl = text.count("\n", 0, pos)
    col = pos - (text.rfind("\n", 0, pos) + 1) if nl else pos + line_start
    return ValueError(f"metadata {path!r} is not valid JSON: {msg}: line {base_lines + nl + 1} column {col + 1} "
                      f"(char {base_chars + pos})")


def iter_json_object(path: str, chunk_chars: int | None = None, values: str = "{") -> Iterator[dict[str, Any]]:
    """The entries of a JSON object file `{key: value, ...}` as dicts of at most ~chunk_chars of text each, in file
    order, without reading the file whole. Each chunk is cut after an entry and parsed by json.loads at C speed as
    an object of its own; a cut inside a value cannot parse (the value would be left open), and such a chunk is
    read entry by entry instead (`values`: how the entries' values start, "{" or '"', where cuts are sought). A key repeated across chunks comes once per chunk (one json.loads keeps the last:
    PackedRows / check_duplicates resolve it the same way). Other encodings than UTF-8 are read whole."""
    chunk_chars = chunk_chars or STREAM_CHARS
    with open(path, "rb") as f:
        head = f.read(4)
        enc = json.detect_encoding(head) if head else "utf-8"
        if enc not in ("utf-8", "utf-8-sig"):
            f.seek(0)
            obj = _load_json(path)
            if not isinstance(obj, dict):
                raise ValueError(f"metadata {path!r}: top level must be an object {{key: {{...}}}}")
            yield obj
            return
        f.seek(3 if head[:3] == b"\xef\xbb\xbf" else 0)
        dec = codecs.getincrementaldecoder("utf-8")("surrogatepass")
        scan = json.scanner.make_scanner(json.JSONDecoder())
        cut_re = _CUTS[values]

        def more() -> str:
            try:
                return dec.decode(f.read(chunk_chars), final=False)
            except UnicodeDecodeError as e:
                raise ValueError(f"metadata {path!r} is not valid JSON: {e}") from None

        buf, eof = more(), False
        base_chars = base_lines = line_start = 0  # position of buf[0] in the file (chars, newlines, column)
        p = _WS.match(buf).end()
        if p >= len(buf) or buf[p] != "{":
            raise ValueError(f"metadata {path!r}: top level must be an object {{key: {{...}}}}")
        p = _WS.match(buf, p + 1).end()
        if buf[p : p + 1] == "}":  # an empty object
            if buf[p + 1 :].strip():
                raise _json_error(path, "Extra data", buf, p + 1, 0, 0, 0)
            return
        pos = p
        while True:
            while not eof and len(buf) - pos < chunk_chars:
                got = more()
                eof = not got
                nl = buf.count("\n", 0, pos)  # keep the file position of buf[0] for error messages
                line_start = pos - (buf.rfind("\n", 0, pos) + 1) if nl else line_start + pos
                base_lines, base_chars = base_lines + nl, base_chars + pos
                buf, pos = buf[pos:] + got, 0
            if eof:  # the rest: entries (at least one: pos is after "{" or ",") then the closing brace
                try:
                    at = _WS.match(buf, pos).end()
                    if buf[at : at + 1] != '"':
                        raise json.JSONDecodeError("", "", 0)
                    text = "{" + buf[pos:]
                    obj = _unique_keys(json.loads(text), text, path)
                    if obj:
                        yield obj
                    return
                except json.JSONDecodeError:
                    yield from _entries(buf, pos, True, scan, path, base_chars, base_lines, line_start)[0]
                    return
            end = min(len(buf), pos + chunk_chars)
            cuts = list(cut_re.finditer(buf, max(pos, end - (1 << 16)), end))[-3:]
            for cut in reversed(cuts):  # the last cut first; an earlier one when it is inside a value
                text = "{" + buf[pos : cut.start() + 1] + "}"
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError:
                    continue
                yield _unique_keys(obj, text, path)
                pos = cut.start() + 1 + buf[cut.start() + 1 : cut.end()].index(",") + 1
                break
            else:  # no cut that parses (long entries, or a real error: found by the entry-wise read)
                got, pos, done = _entries(buf, pos, False, scan, path, base_chars, base_lines, line_start)
                yield from got
                if done:
                    return
                if not got:  # one entry longer than the buffer: read on
                    chunk_chars *= 2


def _entries(buf: str, pos: int, final: bool, scan, path: str, base_chars: int, base_lines: int,
             line_start: int) -> tuple[list[dict[str, Any]], int, bool]:
    """Entries of buf from pos (which is at a key) one at a time, as json.loads reads them: ([one dict], the
    position after the last complete entry, whether the closing brace was reached). Not final: an entry cut by the
    end of buf ends the list; final: it is an error with its position in the file."""
    out: dict[str, Any] = {}
    n = len(buf)
    ws = _WS.match

    def fail(msg: str, at: int) -> ValueError:
        return _json_error(path, msg, buf, at, base_chars, base_lines, line_start)

    while True:
        start = p = pos
        try:
            p = ws(buf, pos).end()
            if p >= n:
                raise IndexError
            if buf[p] != '"':
                raise json.JSONDecodeError("Expecting property name enclosed in double quotes", buf, p)
            key, p = scan(buf, p)
            p = ws(buf, p).end()
            if buf[p] != ":":
                raise json.JSONDecodeError("Expecting ':' delimiter", buf, p)
            p = ws(buf, p + 1).end()
            val, p = scan(buf, p)
            p = ws(buf, p).end()
            c = buf[p]
            if c not in ",}":
                raise json.JSONDecodeError("Expecting ',' delimiter", buf, p)
        except (IndexError, StopIteration, json.JSONDecodeError) as e:
            if not final and n - start < LONGEST_ENTRY:  # an entry cut by the end of buf (or an error: read on)
                return [out] if out else [], start, False
            if isinstance(e, json.JSONDecodeError):
                raise fail(e.msg, e.pos) from None
            raise fail("Expecting value" if isinstance(e, StopIteration) else "Unexpected end of data",
                       min(p, n)) from None
        if key in out:
            raise duplicate_key_error(path, key, [out[key], val])
        out[key] = val
        if c == ",":
            pos = p + 1
        else:
            rest = ws(buf, p + 1).end()
            if rest < n:
                raise fail("Extra data", rest)
            return [out], n, True


def _load_json(path: str) -> Any:
    """A whole JSON file (lists, other encodings than UTF-8); a key given twice in one object is an error."""
    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        d = dict(items)
        if len(d) != len(items):
            seen: dict[str, list[Any]] = {}
            for k, v in items:
                seen.setdefault(k, []).append(v)
            k, vals = next((k, v) for k, v in seen.items() if len(v) > 1)
            raise duplicate_key_error(path, k, vals)
        return d

    with open(path, "rb") as f:
        try:
            return json.loads(f.read(), object_pairs_hook=pairs)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"metadata {path!r} is not valid JSON: {e}") from None


def duplicate_key_error(path: str, key: str, values: list[Any]) -> ValueError:
    """A key given more than once in a JSON object: json.loads (and so kohya / euge-trainer) keeps the last value and
    drops the others without a word; we stop and say which."""
    lost = [v.get(PATH_FIELD) for v in values if isinstance(v, dict) and v.get(PATH_FIELD)]
    what = f" (images {', '.join(map(repr, lost))})" if lost else ""
    return ValueError(f"metadata {path!r}: key {key!r} is given {len(values)} times{what}; JSON keeps only the last, "
                      f"so the other entries would be lost: give each entry its own key")


def top_level_entries(text: str) -> int:
    """How many entries the JSON object text `{...}` holds (commas at depth 1 outside strings, + 1), from a
    vectorised scan of its bytes; json.loads keeps one per key, so a smaller dict means a key is repeated."""
    b = np.frombuffer(text.encode("utf-8", "surrogatepass"), np.uint8)
    n = len(b)
    q = np.flatnonzero(b == 0x22)  # '"'
    if len(q):  # a quote preceded by an odd run of backslashes is escaped
        idx = np.arange(n, dtype=np.int64)
        last_plain = np.maximum.accumulate(np.where(b == 0x5C, -1, idx))
        prev = np.maximum(q - 1, 0)
        run = np.where(q > 0, prev - last_plain[prev], 0)
        q = q[run % 2 == 0]
    inside = np.zeros(n + 1, np.int32)  # +1 from an opening quote to its closing quote
    np.add.at(inside, q[0::2], 1)
    np.add.at(inside, q[1::2] + 1, -1)
    out = np.cumsum(inside[:n]) == 0
    step = ((b == 0x7B) | (b == 0x5B)).astype(np.int32) - ((b == 0x7D) | (b == 0x5D))  # { [  and  } ]
    depth = np.cumsum(np.where(out, step, 0))
    commas = int(np.count_nonzero(out & (b == 0x2C) & (depth == 1)))
    body = text.strip()[1:-1].strip()
    return commas + 1 if body else 0


def _unique_keys(obj: dict[str, Any], text: str, path: str) -> dict[str, Any]:
    """obj (json.loads of the object text) when no key was given twice in text, else the error naming it."""
    if len(obj) == top_level_entries(text):
        return obj
    _load_json_text(text, path)  # raises with the key
    return obj


def _load_json_text(text: str, path: str) -> None:
    """Parse an object text keeping every pair, to name the repeated key (the rare path)."""
    seen: dict[str, list[Any]] = {}

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        return dict(items)

    for k, v in json.JSONDecoder(object_pairs_hook=lambda items: items).decode(text):
        seen.setdefault(k, []).append(pairs(v) if isinstance(v, list) and v and isinstance(v[0], tuple) else v)
    for k, vals in seen.items():
        if len(vals) > 1:
            raise duplicate_key_error(path, k, vals)


def read_csv(path: str) -> tuple[list[str], list[dict[str, Any]], list[int]]:
    """(header, records, the line each record starts on) of a CSV file, strictly: a quote opened and never closed
    would otherwise take every row after it into one field (csv's default), losing those rows without a word; it is
    one error naming the line where the bad row starts. A row with more fields than the header is one too."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, strict=True)
        try:
            header = next(reader, [])
            recs, lines, start = [], [], reader.line_num + 1
            for row in reader:
                if len(row) > len(header):
                    raise ValueError(f"metadata {path!r} line {start}: {len(row)} fields but the header has "
                                     f"{len(header)} (a comma inside a value needs quotes)")
                if row:
                    recs.append(dict(zip(header, row)))
                    lines.append(start)
                start = reader.line_num + 1
        except csv.Error as e:
            raise ValueError(f"metadata {path!r}: the row starting at line {start} is not valid CSV ({e}); a quote "
                             f"that is never closed takes every row after it") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"metadata {path!r} is not UTF-8: {e}") from None
    return header, recs, lines


def read_metadata_file(path: str) -> tuple[list[str], list[dict[str, Any]]]:
    """(keys, records) of a JSON ({key: {...}} or a list), JSONL, CSV (header row) or SQLite metadata file."""
    low = path.lower()
    if low.endswith(".json"):
        obj = _load_json(path)
        if isinstance(obj, dict):
            recs = list(obj.values())
            if not all(map(isinstance, recs, repeat(dict))):
                k = list(obj)[_first_bad(recs, lambda r: isinstance(r, dict))]
                raise ValueError(f"metadata {path!r}: entry {k!r} must be an object, got {type(obj[k]).__name__}")
            return list(obj), recs  # JSON object keys are already str
        if isinstance(obj, list):
            return _keyed(obj, lambda i: f"metadata {path!r} item {i}")
        raise ValueError(f"metadata {path!r}: top level must be an object {{key: {{...}}}} or a list")
    if low.endswith(".jsonl"):
        recs, lines = read_jsonl(path)
        return _keyed(recs, lambda j: f"metadata {path!r} line {lines[j]}")
    if low.endswith(".csv"):
        fields, recs, lines = read_csv(path)
        if PATH_FIELD not in fields:
            raise ValueError(f"metadata {path!r}: the CSV header must contain '{PATH_FIELD}' "
                             f"(or '{HF_FILE_FIELD}' for a Hugging Face imagefolder; found {fields})")
        return _keyed(recs, lambda i: f"metadata {path!r} line {lines[i]}")
    # SQLite: the one table that has image_path (and caption) columns.
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        cands = []
        for t in tables:
            cols = [r[1] for r in con.execute(f'PRAGMA table_info("{t}")')]
            if PATH_FIELD in cols:
                cands.append((t, cols))
        if len(cands) != 1:
            raise ValueError(f"metadata {path!r}: need exactly one table with an '{PATH_FIELD}' column; "
                             f"tables: {tables}, with it: {[c[0] for c in cands]}")
        t, cols = cands[0]
        rows = con.execute(f'SELECT * FROM "{t}"').fetchall()
        return _keyed([{c: v for c, v in zip(cols, r) if v is not None} for r in rows],
                      lambda i: f"metadata {path!r} table {t} row {i + 1}")
    except sqlite3.DatabaseError as e:
        raise ValueError(f"metadata {path!r} is not a readable SQLite database: {e}") from None
    finally:
        con.close()


def iter_metadata_file(path: str) -> Iterator[tuple[list[str], list[dict[str, Any]]]]:
    """`read_metadata_file` in chunks: JSON objects and JSONL are streamed (never parsed whole), the other forms
    are read whole and handed out in chunks."""
    low = path.lower()
    if low.endswith(".json") and peek_json(path)[0] == "object":
        for obj in iter_json_object(path):
            recs = list(obj.values())
            if not all(map(isinstance, recs, repeat(dict))):
                k = list(obj)[_first_bad(recs, lambda r: isinstance(r, dict))]
                raise ValueError(f"metadata {path!r}: entry {k!r} must be an object, got {type(obj[k]).__name__}")
            yield list(obj), recs
        return
    if low.endswith(".jsonl"):
        for recs, lines in iter_jsonl(path):
            yield _keyed(recs, lambda j: f"metadata {path!r} line {lines[j]}")
        return
    keys, recs = read_metadata_file(path)
    for a in range(0, len(keys), CHUNK):
        yield keys[a : a + CHUNK], recs[a : a + CHUNK]


def wh_value(v: Any) -> tuple[int, int] | None:
    """(w, h) of a size field: [w, h], or its text ("[w, h]", "w,h", "wxh"); None when it is not one."""
    if isinstance(v, str) and v.strip():
        try:
            v = json.loads(v)
        except ValueError:
            v = [p for p in v.replace("x", ",").split(",")]
    if isinstance(v, (list, tuple)) and len(v) == 2:
        try:
            return int(v[0]), int(v[1])
        except (TypeError, ValueError):
            return None
    return None


def size_from_md(md: dict[str, Any], names: tuple[str, ...] = ("image_size",)) -> tuple[int, int]:
    """(w, h) of the image from `image_size` ([w, h]) or `width`/`height`; (-1, -1) when absent. Not from
    `original_size`: that is the size the model is told (euge-trainer), the bucket comes from the image itself."""
    for k in names:
        wh = wh_value(md.get(k))
        if wh is not None:
            return wh
    if md.get("width") not in (None, "") and md.get("height") not in (None, ""):
        return int(md["width"]), int(md["height"])
    return -1, -1


def sizes_from_records(recs: list[dict[str, Any]], field: str = "image_size") -> np.ndarray:
    """[N, 2] int64 (w, h) per record as `size_from_md` reads it; (-1, -1) when absent."""
    n = len(recs)
    if n == 0:
        return np.zeros((0, 2), np.int64)
    # Fast path, one numpy conversion: every record has field = [int, int].
    try:
        a = np.array([r.get(field) for r in recs])
    except (ValueError, TypeError, OverflowError):  # ragged or odd values
        a = None
    if a is not None and a.shape == (n, 2) and a.dtype.kind in "iu":
        return a.astype(np.int64)
    return np.array([size_from_md(r, (field,)) for r in recs], np.int64).reshape(n, 2)


def peek_json(path: str) -> tuple[str, Any]:
    """('object' | 'list' | '?', the first value) of a JSON file, from its first bytes (no full parse)."""
    with open(path, "rb") as f:
        head = f.read(PEEK_BYTES).decode("utf-8", "ignore").lstrip("\ufeff \t\r\n")
    if head.startswith("["):
        return "list", None
    if not head.startswith("{"):
        return "?", None
    dec = json.JSONDecoder()
    try:
        i = head.index("{") + 1
        while head[i] in " \t\r\n":
            i += 1
        if head[i] == "}":
            return "object", None
        _, i = dec.raw_decode(head, i)  # the first key
        i = head.index(":", i) + 1
        while head[i] in " \t\r\n":
            i += 1
        if head[i] == "{":
            # An object value: only whether it names an image path matters; a record longer than the peek
            # window is judged by what fits.
            try:
                v, _ = dec.raw_decode(head, i)
            except ValueError:
                return "object", {"_partial": head[i:]}
            return "object", v
        v, _ = dec.raw_decode(head, i)
        return "object", v
    except (ValueError, IndexError):
        return "object", None


def _has_path(first: Any) -> bool:
    if isinstance(first, dict) and "_partial" in first:
        return f'"{PATH_FIELD}"' in first["_partial"]
    return isinstance(first, dict) and PATH_FIELD in first


# ---- image lookup ----------------------------------------------------------------------------------------------

def _fallback_by_name(paths: list[str], dirs: list[str], threads: int, cache: dict | None = None) -> list[int]:
    """Replace paths that do not exist by the image of the same file name found in dirs (recursive); returns the
    positions whose image is still missing. `cache` keeps folder listings and the name table between calls (the
    chunks of one source)."""
    cache = {} if cache is None else cache
    exists = exists_by_listing(paths, threads, cache.setdefault("listings", {}))
    miss = [j for j, ok in enumerate(exists) if not ok]
    if not miss:
        return []
    if dirs:
        if "by_name" not in cache:
            cache["by_name"] = image_names(dirs, threads)
        by_name = cache["by_name"]
        hits = [(j, f) for j, f in zip(miss, map(by_name.get, [os.path.basename(paths[j]) for j in miss])) if f]
        for j, found in hits:
            # A path the listings could not settle is asked of the OS only when it would be replaced.
            if exists[j] is False or not os.path.exists(paths[j]):
                paths[j] = found
            exists[j] = True
    return [j for j in miss if exists[j] is False or (exists[j] is None and not os.path.exists(paths[j]))]


def _rows(keys: list[str], paths: list[str], caps: list[str], recs: list[dict[str, Any]], wh: np.ndarray,
          si: int, origin: str) -> Iterator[Rows]:
    return chunked_rows(keys, paths, caps, recs, wh[:, 0].tolist(), wh[:, 1].tolist(), si, origin)


def _record_rows(keys: list[str], paths: list[str], caps: list[str], recs: list[dict[str, Any]], src: Source,
                 si: int, threads: int, cache: dict | None = None) -> Iterator[Rows]:
    """Rows of records that name their images: sizes from the records, missing paths looked up by file name in
    the subset's image_dirs (`cache`: folder listings kept between the chunks of one source)."""
    wh = sizes_from_records(recs)
    cache = {} if cache is None else cache
    missing = _fallback_by_name(paths, src.spec.image_dirs, threads, cache)
    for i in _latents_in_place(keys, paths, missing, src.spec.image_dirs, threads, cache):
        wh[i] = -1  # the size is the latents' (x 8), read with the other sizes
    return _rows(keys, paths, caps, recs, wh, si, src.path)


def _latents_in_place(keys: list[str], paths: list[str], miss: list[int], dirs: list[str], threads: int,
                      cache: dict) -> list[int]:
    """euge-trainer's layout d (a metadata file with `.npz` latents and no images; sdxl_dataset_utils.Dataset
    search_data): a record whose image is missing uses `<image path without extension>.npz`, else the cache named
    by its key (or its image's name) under image_dirs (recursive). `miss`: the positions whose image is missing.
    Replaces those paths in place; returns their positions."""
    if not miss:
        return []
    beside = [os.path.splitext(paths[i])[0] + LATENT_EXT if paths[i] else "" for i in miss]
    found = exists_many(beside, threads, cache["listings"])
    if "npz_by_name" not in cache:  # base name -> cache file under image_dirs (largest path first: smallest wins)
        files = [p for p, _, _ in walk_images(dirs, True, threads, stat=False, exts=(LATENT_EXT,))] if dirs else []
        table: dict[str, str] = {}
        for p in reversed(files):
            c = classify_npz(os.path.basename(p))
            if c is not None and c[1] != "flip":
                table[c[0]] = p
        cache["npz_by_name"] = table
    table = cache["npz_by_name"]
    out = []
    for i, b, ok in zip(miss, beside, found):
        hit = b if ok else table.get(keys[i]) or table.get(os.path.splitext(os.path.basename(paths[i]))[0])
        if hit:
            paths[i] = hit
            out.append(i)
    return out


def _by_stem(keys: list[str], spec: SubsetSpec, recursive: bool, threads: int, what: str, path: str,
             cache: dict | None = None) -> list[str]:
    """Image path of each key: the key itself when it is an existing path, else `<image_dir>/<key>.<ext>`
    (`cache`: listings and the image table kept between the chunks of one source)."""
    cache = {} if cache is None else cache
    as_path = [k if os.path.isabs(k) else "" for k in keys]
    ok = exists_many([p for p in as_path if p], threads, cache.setdefault("listings", {})) if any(as_path) else []
    it = iter(ok)
    paths = [p if p and next(it) else "" for p in as_path]
    need = [i for i, p in enumerate(paths) if not p]
    if need:
        if not spec.image_dirs:
            raise ValueError(f"{what} {path!r}: its keys are image names, so the subset needs image_dirs "
                             f"(the folder with the images)")
        if "table" not in cache:
            cache["table"] = image_table(spec.image_dirs, recursive, threads)
        table = cache["table"]
        for i in need:
            k = keys[i]
            stem = os.path.splitext(k)[0] if k.lower().endswith(IMAGE_EXTENSIONS) else k
            paths[i] = table.get(stem) or table.get(os.path.basename(stem), "")
    return paths


# ---- readers ---------------------------------------------------------------------------------------------------

@register
class KohyaMetadataReader(Reader):
    """kohya fine-tune metadata JSON: {key: {caption, tags, train_resolution}} without image paths."""

    name = "kohya-metadata"

    def claims(self, src: Source) -> bool:
        if src.kind != "metadata" or not src.path.lower().endswith(".json"):
            return False
        kind, first = peek_json(src.path)
        return kind == "object" and isinstance(first, dict) and not _has_path(first)

    def read(self, src: Source, si: int, threads: int) -> Iterator[Rows]:
        sep = src.spec.caption_options.caption_separator
        cache: dict = {}
        for keys, recs in iter_metadata_file(src.path):  # streamed: chunks of the object's entries
            caps = [kohya_caption(r.pop("caption", None), r.pop("tags", None), sep,
                                  f"metadata {src.path!r} entry {k!r}") for k, r in zip(keys, recs)]
            wh = sizes_from_records(recs, "train_resolution")
            miss = (wh <= 0).any(1)
            if miss.any():  # newer kohya writes image_size when it knows it
                wh[miss] = sizes_from_records([recs[i] for i in np.flatnonzero(miss).tolist()])
            paths = _by_stem(keys, src.spec, src.recursive, threads, "kohya metadata", src.path, cache)
            yield from _rows(keys, paths, caps, recs, wh, si, src.path)


def kohya_caption(caption: Any, tags: Any, sep: str, where: str = "") -> str:
    """The caption kohya trains on for a fine-tune metadata entry (JSON or JSONL): `caption`, plus `sep + tags`
    when tags are non-empty (library/train_util.py FineTuningDataset.__init__), then only its first line
    (BaseDataset.process_caption without wildcards: `caption.split("\\n")[0]`)."""
    caption, tags = caption_text(caption, sep, where), caption_text(tags, sep, where)
    if tags:
        caption = (caption + sep if caption else "") + tags
    return caption.split("\n")[0]


def caption_text(value: Any, sep: str, where: str) -> str:
    """A caption / tags field as text: a string as it is; a list of tags (a JSON array) joined with the caption
    separator (kohya would fail on it, euge-trainer train on the list's repr); a number as its text; None as ''.
    Anything else (an object, true / false) is one error naming the entry."""
    if type(value) is str:
        return value
    if value is None:
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, (list, tuple)) and all(type(t) in (str, int, float) for t in value):
        return (sep if sep.endswith(" ") else sep + " ").join(str(t).strip() for t in value)
    raise ValueError(f"{where}: a caption must be text or a list of tags, got {type(value).__name__} {value!r:.80}")


HCP_YAML = (".yaml", ".yml")
HCP_IMAGE_TYPES = ("bmp", "gif", "ico", "jpeg", "jpg", "png", "tiff", "webp")  # hcpdiff/utils/img_size_tool.py


def hcp_name(filename: str) -> str:
    """HCP's name of an image or a .txt caption: the file name up to its first dot (DataSource.get_image_name:
    `img_name.rsplit('.')[0]`; TXTCaptionLoader: `basename(file).split('.')[0]`)."""
    return os.path.basename(filename).split(".")[0]


def hcp_clean_ext(name: str) -> str:
    """A JSON / YAML caption key without its image extension (BaseCaptionLoader.clean_ext)."""
    stem, ext = os.path.splitext(name)
    return stem if ext[1:].lower() in HCP_IMAGE_TYPES else name


def hcp_caption_source(path: str) -> tuple[str, str]:
    """(kind, path) of what HCP's auto_caption_loader reads for a caption_file: a .json / .yaml file, or in a folder
    its first .json, else its first .yaml / .yml (sorted here: HCP takes glob's order), else its .txt files."""
    if os.path.isdir(path):
        for kind, exts in (("json", (".json",)), ("yaml", HCP_YAML)):
            files = sorted(glob.glob(os.path.join(glob.escape(path), "*")))
            hit = [f for f in files if f.lower().endswith(exts) and os.path.isfile(f)]
            if hit:
                return kind, hit[0]
        if glob.glob(os.path.join(glob.escape(path), "*.txt")):
            return "txt", path
        raise ValueError(f"caption folder {path!r} holds no .json, .yaml or .txt captions (HCP-Diffusion caption_file)")
    return ("yaml" if path.lower().endswith(HCP_YAML) else "json"), path


def _hcp_captions(path: str, threads: int) -> Iterator[dict[str, str]]:
    """HCP's caption dict of a caption_file, in chunks: {name: caption} (names as HCP matches them)."""
    kind, f = hcp_caption_source(path)
    if kind == "txt":
        files = sorted(glob.glob(os.path.join(glob.escape(f), "*.txt")))
        for a in range(0, len(files), CHUNK):
            part = files[a : a + CHUNK]
            yield dict(zip(map(hcp_name, part), map_chunked(_read_caption_txt, part, threads, 256)))
        return
    if kind == "yaml":
        try:
            import yaml
        except ImportError:
            raise ValueError(f"caption file {f!r}: reading YAML needs PyYAML (pip install pyyaml)") from None
        try:
            with open(f, encoding="utf-8") as fh:
                obj = yaml.safe_load(fh)
        except yaml.YAMLError as e:
            raise ValueError(f"caption file {f!r} is not valid YAML: {e}") from None
        if not isinstance(obj, dict):
            raise ValueError(f"caption file {f!r}: expected a mapping {{name: caption}}, got {type(obj).__name__}")
        chunks: Iterator[dict] = iter([obj])
    else:
        chunks = iter_json_object(f, values='"')  # streamed: chunks of the object's entries
    for obj in chunks:
        names, caps = list(obj), list(obj.values())
        if not all(map(isinstance, caps, repeat(str))):
            k = names[_first_bad(caps, lambda c: isinstance(c, str))]
            raise ValueError(f"caption file {f!r}: the caption of {k!r} must be a string, got {type(obj[k]).__name__}")
        yield dict(zip(map(hcp_clean_ext, map(str, names)), caps))


def _read_caption_txt(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except UnicodeDecodeError as e:
        raise ValueError(f"caption file {path!r} is not UTF-8: {e}") from None


@register
class HcpCaptionReader(Reader):
    """HCP-Diffusion captions (hcpdiff/data/caption_loader.py): a JSON or YAML {"<image name>": "caption"} file, or a
    caption folder (its first .json / .yaml, else one .txt per image), for the images of the subset's image_dirs
    (HCP's img_root; Text2ImageSource.get_image_list). Every image trains: one the captions do not name trains on ''
    (HCP fills the prompt template's {caption} with ''); a caption naming no image is counted in one warning."""

    name = "hcp-captions"

    def claims(self, src: Source) -> bool:
        if src.kind != "metadata":
            return False
        low = src.path.lower()
        if os.path.isdir(src.path) or low.endswith(HCP_YAML):
            return True
        if not low.endswith(".json"):
            return False
        kind, first = peek_json(src.path)
        return kind == "object" and isinstance(first, str)

    def fingerprint(self, src: Source, h) -> None:
        kind, f = hcp_caption_source(src.path)
        files = sorted(glob.glob(os.path.join(glob.escape(f), "*.txt"))) if kind == "txt" else [f]
        for p in files:
            h.update(f"{self.name}:{p}:{stat_sig(p)}".encode())

    def read(self, src: Source, si: int, threads: int) -> Iterator[Rows]:
        if not src.spec.image_dirs:
            raise ValueError(f"HCP captions {src.path!r}: the subset needs image_dirs (HCP's img_root: the folder "
                             f"whose images the captions name)")
        images = [p for p, _, _ in walk_images(src.spec.image_dirs, src.recursive, threads, stat=False)]
        by_name: dict[str, list[str]] = {}
        for p in images:
            by_name.setdefault(hcp_name(p), []).append(p)
        unmatched: list[str] = []
        for caps in _hcp_captions(src.path, threads):
            paths, texts = [], []
            for name, cap in caps.items():
                hit = by_name.pop(name, None)
                if hit is None:
                    unmatched.append(name)
                for p in hit or ():
                    paths.append(p)
                    texts.append(cap.strip())
            yield from _image_rows(paths, texts, si, src.path)
        rest = sorted(p for ps in by_name.values() for p in ps)
        yield from _image_rows(rest, [""] * len(rest), si, src.path)
        if rest:
            log.info("%s: %d of %d images have no caption there; they train on '' (as HCP-Diffusion)", src.path,
                     len(rest), len(images))
        if unmatched:
            log.warning("%s: %d captions name no image in %s (e.g. %s); they are not used", src.path, len(unmatched),
                        ", ".join(src.spec.image_dirs), ", ".join(map(repr, unmatched[:3])))


def _image_rows(paths: list[str], captions: list[str], si: int, origin: str) -> Iterator[Rows]:
    """Rows of image files: key = file stem, sizes from the headers later."""
    n = len(paths)
    keys = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    return chunked_rows(keys, paths, captions, [{} for _ in range(n)], [-1] * n, [-1] * n, si, origin)


def hf_caption_column(spec: SubsetSpec, fields: list[str], where: str) -> str | None:
    """The caption column: dataset_caption_column when set (must exist), else `text`, else `caption`."""
    want = spec.dataset_caption_column
    if want:
        if want not in fields:
            raise ValueError(f"{where}: dataset_caption_column {want!r} is not a column (columns: {fields})")
        return want
    return next((c for c in HF_CAPTION_FIELDS if c in fields), None)


@register
class HfImagefolderReader(Reader):
    """Hugging Face imagefolder metadata.jsonl / metadata.csv (file_name + caption column)."""

    name = "hf-imagefolder"

    def claims(self, src: Source) -> bool:
        if src.kind != "metadata":
            return False
        low = src.path.lower()
        if low.endswith(".csv"):
            with open(src.path, encoding="utf-8", newline="") as f:
                header = next(csv.reader(f), [])
            return HF_FILE_FIELD in header and PATH_FIELD not in header
        if low.endswith(".jsonl"):
            with open(src.path, encoding="utf-8") as f:
                line = next((ln for ln in f if ln.strip()), "")
            try:
                first = json.loads(line) if line else {}
            except ValueError:
                return False
            return isinstance(first, dict) and HF_FILE_FIELD in first and PATH_FIELD not in first
        return False

    def read(self, src: Source, si: int, threads: int) -> Iterator[Rows]:
        if src.path.lower().endswith(".csv"):
            _, recs, lines = read_csv(src.path)
            where = lambda i: f"metadata {src.path!r} line {lines[i]}"  # noqa: E731
        else:
            recs, lines = read_jsonl(src.path)
            where = lambda i: f"metadata {src.path!r} line {lines[i]}"  # noqa: E731
        fields = list(recs[0]) if recs else []
        col = hf_caption_column(src.spec, fields, f"metadata {src.path!r}")
        base = os.path.dirname(src.path)
        files = [r.pop(HF_FILE_FIELD, None) for r in recs]
        for i, f in enumerate(files):
            if not isinstance(f, str) or not f:
                raise ValueError(f"{where(i)}: '{HF_FILE_FIELD}' must be a file name, got {f!r}")
        paths = [os.path.join(base, f) for f in files]
        keys = [os.path.splitext(f)[0] for f in files]  # relative to the folder: unique within it
        sep = src.spec.caption_options.caption_separator
        caps = [caption_text(r.pop(col, None), sep, where(i)).strip() if col else "" for i, r in enumerate(recs)]
        yield from _record_rows(keys, paths, caps, recs, src, si, threads)


@register
class MetadataReader(Reader):
    """Our / euge-trainer's records: JSON {key: {image_path, caption, ...}} or a list, CSV, SQLite (caption, else
    tags: euge-trainer's `caption or tags`); JSONL records `{"image_path", "caption", "tags", "image_size"}` are
    kohya's format (train_util.FineTuningDataset, PR #2186) and take kohya's caption (`kohya_caption`)."""

    name = "metadata"

    def claims(self, src: Source) -> bool:
        return src.kind == "metadata" and src.path.lower().endswith(METADATA_EXTENSIONS)

    def read(self, src: Source, si: int, threads: int) -> Iterator[Rows]:
        m = src.path
        base = os.path.dirname(m)
        cache: dict = {}
        kohya, sep = m.lower().endswith(".jsonl"), src.spec.caption_options.caption_separator
        for keys, recs in iter_metadata_file(m):  # JSON objects and JSONL streamed in chunks
            # The records are ours (freshly parsed): pop path and caption so the rest is the entry's metadata as is.
            ps = [r.pop(PATH_FIELD, None) or "" for r in recs]
            if not all(map(isinstance, ps, repeat(str))):
                i = _first_bad(ps, lambda p: isinstance(p, str))
                raise ValueError(f"metadata {m!r}: entry {keys[i]!r} has a non-text {PATH_FIELD} {ps[i]!r}")
            for i in [i for i, p in enumerate(ps) if p and not p.startswith(os.sep)]:
                if not os.path.isabs(ps[i]):  # relative to the metadata file
                    ps[i] = os.path.join(base, ps[i])
            where = [f"metadata {m!r} entry {k!r}" for k in keys]
            if kohya:
                caps = [kohya_caption(r.pop("caption", None), r.pop("tags", None), sep, w) for r, w in zip(recs, where)]
            else:  # euge-trainer: caption or tags
                caps = [caption_text(r.pop("caption", None), sep, w) for r, w in zip(recs, where)]
                for i in [i for i, c in enumerate(caps) if not c]:
                    caps[i] = caption_text(recs[i].get("tags"), sep, where[i])
            yield from _record_rows(keys, ps, caps, recs, src, si, threads, cache)


@register
class HfImagefolderDirReader(Reader):
    """A Hugging Face imagefolder given as an image folder: the folder's own metadata.jsonl / metadata.csv."""

    name = "hf-imagefolder-dir"

    @staticmethod
    def _file(src: Source) -> str | None:
        if src.kind != "folders" or len(src.spec.image_dirs) != 1 or src.spec.layout:
            return None
        for name in ("metadata.jsonl", "metadata.csv"):
            p = os.path.join(src.spec.image_dirs[0], name)
            if os.path.isfile(p):
                return p
        return None

    def claims(self, src: Source) -> bool:
        p = self._file(src)
        return p is not None and HfImagefolderReader().claims(Source("metadata", p, src.spec, src.recursive))

    def fingerprint(self, src: Source, h) -> None:
        p = self._file(src)
        h.update(f"{self.name}:{p}:{stat_sig(p)}".encode())

    def read(self, src: Source, si: int, threads: int) -> Iterator[Rows]:
        yield from HfImagefolderReader().read(Source("metadata", self._file(src), src.spec, src.recursive), si,
                                              threads)
