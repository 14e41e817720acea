"""User hooks in both calling conventions: euge-trainer's (unchanged hooks from its config wiki) and ours.

euge-trainer (docs/CONFIG.md, modules/sdxl_dataset_utils.py):
    num_repeats_getter(img_key, img_md, **kwargs) -> int            kwargs: counter
    caption_processor(img_info, **kwargs) -> str                     kwargs: counter, flip_aug
    description_processor(img_info, **kwargs) -> str
`img_md` has every metadata field of the entry plus image_path, caption, description (and euge's default fields
artist, characters, styles, quality, original_size, ... as None when absent); `img_info` is an `ImageInfo`.
Ours (keyword style): num_repeats_getter(*, key, metadata, counter, num_repeats), caption_processor(caption, *,
key, metadata, counter, flipped, rng), description_processor(description, *, ...). The style is told by the
signature: a first parameter named img_info / img_key means euge-trainer's, one named caption / description / text
means ours; otherwise a keyword-only parameter, or one named flipped / rng / metadata / num_repeats, means ours.

The counter is euge-trainer's `count_metadata`: {"category", "artist", "character", "style", "quality"}, names
formatted (lower case, ': ' -> ':', space -> '_', '\\(' -> '('), weighted by repeats; the wiki's plural keys
"characters" / "styles" name the same dicts, so hooks written against either work.
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Callable, Iterable

import numpy as np

from core.config import resolve_hook

# euge-trainer's empty_metadata(): the fields every img_md has (None when unknown).
EUGE_FIELDS = ("image_path", "caption", "description", "artist", "characters", "styles", "quality", "original_size",
               "safe_rating", "safe_level", "perceptual_hash", "aesthetic_score")
COUNTER_KEYS = ("category", "artist", "character", "style", "quality")
# The metadata fields count_metadata reads; entries with none of them cannot change the counts.
COUNTED_FIELDS = frozenset({"artist", "characters", "styles", "quality"})
WIKI_ALIASES = {"characters": "character", "styles": "style"}
_OURS_ONLY = {"flipped", "rng", "metadata", "num_repeats"}
_EUGE_FIRST = {"img_info", "img_key", "image_info", "info"}   # the wiki's first parameter names
_OURS_FIRST = {"caption", "description", "text", "tags"}      # ours: the text itself comes first


def fmt_tag(tag: Any) -> Any:
    """euge-trainer's fmt2dan: lower case, strip, ': ' -> ':', space -> '_', unescape brackets."""
    if isinstance(tag, str):
        return tag.lower().strip().replace(": ", ":").replace(" ", "_").replace("\\(", "(").replace("\\)", ")")
    if isinstance(tag, list):
        return [fmt_tag(t) for t in tag]
    return tag


def caption_metadata(caption: str) -> dict[str, Any]:
    """euge-trainer's caption2metadata: artist / characters / styles / quality from `artist:x`-style tags."""
    md: dict[str, Any] = {}
    chars, styles = [], []
    for tag in (t.strip() for t in caption.split(",")):
        if tag.startswith("artist:"):
            md["artist"] = tag[7:].strip()
        elif tag.startswith("character:"):
            chars.append(tag[10:].strip())
        elif tag.startswith("style:"):
            styles.append(tag[6:].strip())
        elif "quality" in tag:
            md["quality"] = tag.replace("quality", "").strip()
    if chars:
        md["characters"] = ", ".join(chars)
    if styles:
        md["styles"] = ", ".join(styles)
    return md


def _names(value: Any) -> list[str]:
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return str(value).split(", ")  # euge-trainer splits on ', ' exactly


def count_metadata(metadatas: Iterable[dict[str, Any]], weights: Iterable[int] | None = None,
                   paths: Iterable[str] | None = None) -> dict[str, dict[str, int]]:
    """euge-trainer's count_metadata: per entry its weight (repeats) added to its folder (category), formatted
    artist, characters and styles, and quality; each dict sorted by count, largest first."""
    counter: dict[str, dict[str, int]] = {k: {} for k in COUNTER_KEYS}
    weights = iter(weights) if weights is not None else None
    paths = iter(paths) if paths is not None else None

    def bump(kind: str, name: Any, w: int) -> None:
        counter[kind][name] = counter[kind].get(name, 0) + w

    for md in metadatas:
        w = next(weights) if weights is not None else 1
        p = next(paths) if paths is not None else ""
        if p:
            bump("category", os.path.basename(os.path.dirname(p)), w)
        if not md:
            continue
        if md.get("artist"):
            bump("artist", fmt_tag(str(md["artist"])), w)
        for field, kind in (("characters", "character"), ("styles", "style")):
            if md.get(field):
                for name in _names(md[field]):
                    bump(kind, fmt_tag(name), w)
        if md.get("quality"):
            bump("quality", str(md["quality"]), w)
    return {k: dict(sorted(v.items(), key=lambda kv: kv[1], reverse=True)) for k, v in counter.items()}


def hook_counter(counter: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """The counter as hooks see it: euge-trainer's singular keys and the wiki's plural ones (same dicts)."""
    out = {k: counter.get(k, {}) for k in COUNTER_KEYS}
    out.update({alias: out[k] for alias, k in WIKI_ALIASES.items()})
    return out


def euge_metadata(md: dict[str, Any], image_path: str, caption: str, description: str) -> dict[str, Any]:
    """euge-trainer's img_md: its default fields, the entry's metadata, image_path / caption / description."""
    out = dict.fromkeys(EUGE_FIELDS)
    if not any(md.get(k) for k in ("artist", "characters", "styles", "quality")) and caption:
        out.update(caption_metadata(caption))  # a folder entry: euge-trainer parses its caption file so
    out.update(md)
    out["image_path"] = image_path or None
    out["caption"] = caption if caption else md.get("caption")
    out["description"] = description or md.get("description") or md.get("nl_caption")
    return out


class ImageInfo:
    """euge-trainer's ImageInfo, with the fields its wiki lists (and the rest of its attributes)."""

    def __init__(self, key: str, image_path: str | None = None, caption: str | None = None,
                 description: str | None = None, image_size=None, original_size=None, crop_ltrb=None,
                 latent_size=None, bucket_size=None, num_repeats: int = 1, npz_path: str | None = None,
                 latents=None, latents_flipped=None, metadata: dict[str, Any] | None = None):
        self.key, self.image_path, self.caption, self.description = key, image_path, caption, description
        self.image_size, self.original_size, self.crop_ltrb = image_size, original_size, crop_ltrb
        self.latent_size, self.bucket_size, self.num_repeats = latent_size, bucket_size, num_repeats
        self.npz_path, self.latents, self.latents_flipped, self.metadata = npz_path, latents, latents_flipped, metadata

    def dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def __repr__(self) -> str:
        return f"ImageInfo(key={self.key!r}, caption={self.caption!r}, bucket_size={self.bucket_size})"


def hook_style(fn: Callable) -> str:
    """'ours' (keyword style) or 'euge' (positional img_key, img_md / img_info + **kwargs), from the signature."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: called the euge way
        return "euge"
    params = list(params)
    positional = [p for p in params if p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                  inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    if positional and positional[0].name in _EUGE_FIRST:
        return "euge"
    if positional and positional[0].name in _OURS_FIRST:
        return "ours"
    ours = any(p.kind is inspect.Parameter.KEYWORD_ONLY or (p.name in _OURS_ONLY and p.kind is not
               inspect.Parameter.VAR_KEYWORD) for p in params)
    return "ours" if ours else "euge"


class HookError(ValueError):
    """A user hook returned something unusable (the message names the hook and the key)."""


def _check(value: Any, want: type, hook: str, key: str, what: str) -> Any:
    ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
    if not ok or (want is int and value < 0):
        raise HookError(f"{hook} returned {value!r} ({type(value).__name__}) for {key!r}; it must return {what}")
    return value


class RepeatsHook:
    """num_repeats_getter in either style -> int >= 0 (0 drops the entry)."""

    def __init__(self, fn: Callable):
        self.fn, self.style = fn, hook_style(fn)

    def __call__(self, *, key: str, metadata: dict[str, Any], counter: dict, num_repeats: int,
                 img_md: Callable[[], dict[str, Any]]) -> int:
        if self.style == "euge":
            r = self.fn(key, img_md(), counter=hook_counter(counter))
        else:
            r = self.fn(key=key, metadata=metadata, counter=counter, num_repeats=num_repeats)
        if isinstance(r, np.integer):
            r = int(r)
        return _check(r, int, "num_repeats_getter", key, "an int >= 0")


class TextHook:
    """caption_processor / description_processor in either style -> str."""

    def __init__(self, fn: Callable, name: str):
        self.fn, self.name, self.style = fn, name, hook_style(fn)

    def __call__(self, text: str, *, key: str, metadata: dict[str, Any], counter: dict, flipped: bool, rng,
                 info: Callable[[], ImageInfo] | None = None) -> str:
        if self.style == "euge":
            ii = info() if info is not None else ImageInfo(key, metadata=metadata)
            if self.name == "caption_processor":
                ii.caption = text
            else:
                ii.description = text
            out = self.fn(ii, counter=hook_counter(counter), flip_aug=flipped)
        else:
            out = self.fn(text, key=key, metadata=metadata, counter=counter, flipped=flipped, rng=rng)
        return _check(out, str, self.name, key, "str")


def load_hook(spec: str) -> Callable | None:
    """Resolve a user hook spec through core.config.resolve_hook ("" = no hook)."""
    return resolve_hook(spec) if spec else None


def load_text_hook(spec: str, name: str) -> TextHook | None:
    """caption_processor / description_processor of a [data] spec, wrapped (None: no hook)."""
    fn = load_hook(spec)
    return TextHook(fn, name) if fn is not None else None


def load_repeats_hook(spec: str) -> RepeatsHook | None:
    """num_repeats_getter of a [data] spec, wrapped (None: no hook)."""
    fn = load_hook(spec)
    return RepeatsHook(fn) if fn is not None else None
