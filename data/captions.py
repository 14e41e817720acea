"""Caption processing at load time (kohya options) and euge-trainer style user hooks.

Hooks are resolved from "pkg.mod:fn" or "path/file.py:fn" specs and always called with keyword arguments:

- caption_processor(caption, *, key, metadata, counter, flipped, rng) -> str          (after the built-in steps)
- description_processor(description, *, key, metadata, counter, flipped, rng) -> str (metadata["description"])
- num_repeats_getter(*, key, metadata, counter, num_repeats) -> int                   (at index build; 0 drops)

`counter` is {"artist": {name: n}, "character": {...}, "style": {...}, "quality": {...}} over the whole dataset,
as euge-trainer's `count_metadata` builds it; `metadata` is the entry's metadata dict.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, Iterable


@dataclass(frozen=True)
class CaptionOptions:
    """Per-subset caption settings (subset values with [data] fallbacks resolved)."""

    shuffle_caption: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    caption_separator: str = ","
    caption_dropout_rate: float = 0.0
    caption_tag_dropout_rate: float = 0.0
    caption_prefix: str = ""
    caption_suffix: str = ""
    class_tokens: str = ""

    @property
    def augmented(self) -> bool:
        """Whether the caption can differ between epochs."""
        return self.shuffle_caption or self.caption_dropout_rate > 0 or self.caption_tag_dropout_rate > 0


def _pick(sub_value, data_value):
    return data_value if sub_value is None else sub_value


def options_for_subset(sub, data) -> CaptionOptions:
    """Resolve a SubsetConfig's caption settings against the DataConfig defaults."""
    o = CaptionOptions(
        shuffle_caption=bool(_pick(sub.shuffle_caption, data.shuffle_caption)),
        keep_tokens=int(_pick(sub.keep_tokens, data.keep_tokens)),
        keep_tokens_separator=data.keep_tokens_separator,
        caption_separator=data.caption_separator or ",",
        caption_dropout_rate=float(_pick(sub.caption_dropout_rate, data.caption_dropout_rate)),
        caption_tag_dropout_rate=float(_pick(sub.caption_tag_dropout_rate, data.caption_tag_dropout_rate)),
        caption_prefix=_pick(sub.caption_prefix, data.caption_prefix) or "",
        caption_suffix=_pick(sub.caption_suffix, data.caption_suffix) or "",
        class_tokens=sub.class_tokens or "",
    )
    for name in ("caption_dropout_rate", "caption_tag_dropout_rate"):
        if not 0.0 <= getattr(o, name) <= 1.0:
            raise ValueError(f"{name} = {getattr(o, name)} must be within [0, 1]")
    if o.keep_tokens < 0:
        raise ValueError(f"keep_tokens = {o.keep_tokens} must be >= 0")
    return o


def _split(text: str, sep: str) -> list[str]:
    return [t.strip() for t in text.split(sep) if t.strip()]


def process_caption(caption: str, opts: CaptionOptions, rng: random.Random) -> str:
    """kohya's order: class tokens for an empty caption, prefix/suffix, whole-caption dropout, keep/shuffle/tag-dropout."""
    if not caption.strip():
        caption = opts.class_tokens
    if opts.caption_dropout_rate > 0 and rng.random() < opts.caption_dropout_rate:
        return ""
    sep = opts.caption_separator
    if opts.shuffle_caption or opts.caption_tag_dropout_rate > 0:
        if opts.keep_tokens_separator and opts.keep_tokens_separator in caption:
            fixed_text, _, flex_text = caption.partition(opts.keep_tokens_separator)
            fixed, flex = _split(fixed_text, sep), _split(flex_text, sep)
        else:
            tokens = _split(caption, sep)
            fixed, flex = tokens[: opts.keep_tokens], tokens[opts.keep_tokens :]
        if opts.shuffle_caption:
            rng.shuffle(flex)
        if opts.caption_tag_dropout_rate > 0:
            flex = [t for t in flex if rng.random() >= opts.caption_tag_dropout_rate]
        caption = ", ".join(fixed + flex)
    elif opts.keep_tokens_separator:
        caption = caption.replace(opts.keep_tokens_separator, sep)
    if opts.caption_prefix:
        caption = f"{opts.caption_prefix} {caption}" if caption else opts.caption_prefix
    if opts.caption_suffix:
        caption = f"{caption} {opts.caption_suffix}" if caption else opts.caption_suffix
    return caption.strip()


def count_metadata(metadatas: Iterable[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Counters of artists / characters / styles / quality over all entries (euge-trainer `count_metadata`)."""
    counter: dict[str, dict[str, int]] = {"artist": {}, "character": {}, "style": {}, "quality": {}}

    def bump(kind: str, value: Any) -> None:
        if not value:
            return
        values = value if isinstance(value, (list, tuple)) else (
            [v.strip() for v in value.split(",") if v.strip()] if kind in ("character", "style") else [value])
        for v in values:
            v = str(v)
            counter[kind][v] = counter[kind].get(v, 0) + 1

    for md in metadatas:
        if md:
            bump("artist", md.get("artist"))
            bump("character", md.get("characters"))
            bump("style", md.get("styles"))
            bump("quality", md.get("quality"))
    return counter


def full_caption(caption: str, opts: CaptionOptions, rng: random.Random, *, key: str, metadata: dict[str, Any],
                 counter: dict, flipped: bool, caption_hook: Callable | None = None,
                 description_hook: Callable | None = None) -> str:
    """Built-in processing, then the user hooks; a description (metadata) is appended after the tags."""
    text = process_caption(caption, opts, rng)
    if caption_hook is not None:
        text = caption_hook(text, key=key, metadata=metadata, counter=counter, flipped=flipped, rng=rng)
        if not isinstance(text, str):
            raise TypeError(f"caption_processor returned {type(text).__name__} for {key!r}; it must return str")
    desc = metadata.get("description") if metadata else None
    if desc and description_hook is not None:
        desc = description_hook(desc, key=key, metadata=metadata, counter=counter, flipped=flipped, rng=rng)
        if not isinstance(desc, str):
            raise TypeError(f"description_processor returned {type(desc).__name__} for {key!r}; it must return str")
        if desc:
            text = f"{text}{opts.caption_separator} {desc}" if text else desc
    return text
