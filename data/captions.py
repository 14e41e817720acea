"""Caption processing at load time (kohya options), descriptions, and the user hooks (data/hooks.py).

Per sample: an entry with tags (its caption) and a natural-language description (`description`, euge-trainer's
`nl_caption`) trains on the description with `description_probability`, on tags + separator + description with
`description_with_tags_probability`, else on the tags (euge-trainer: one or the other, 0.5 each); an entry with
only one of them trains on that one. Tags go through the kohya options, then caption_processor; a description
goes through description_processor. Hooks may be written in euge-trainer's style or ours (data/hooks.py).
"""

from __future__ import annotations

import random
from typing import Any, Callable

from core.config import DataConfig, SubsetConfig

from .spec import CaptionOptions  # noqa: F401  (the options these functions take; its home is data/spec.py)


def _pick(sub_value, data_value):
    return data_value if sub_value is None else sub_value


def options_for_subset(sub: SubsetConfig, data: DataConfig) -> CaptionOptions:
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
        description_probability=float(data.description_probability),
        description_with_tags_probability=float(data.description_with_tags_probability),
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
    """kohya's order (library/train_util.py BaseDataset.process_caption, wildcards off): class tokens for an empty
    caption, prefix / suffix glued on (so they shuffle with the first / last tag), whole-caption dropout, then
    keep_tokens / keep_tokens_separator (a second separator fixes trailing tags), shuffle and tag dropout, joined with
    ", ". Without shuffle or tag dropout the keep_tokens_separator becomes the caption separator (kohya leaves it in
    the text: docs/data-differences.md)."""
    if not caption.strip():
        caption = opts.class_tokens
    if opts.caption_prefix:
        caption = f"{opts.caption_prefix} {caption}"
    if opts.caption_suffix:
        caption = f"{caption} {opts.caption_suffix}"
    if opts.caption_dropout_rate > 0 and rng.random() < opts.caption_dropout_rate:
        return ""
    sep, ks = opts.caption_separator, opts.keep_tokens_separator
    if opts.shuffle_caption or opts.caption_tag_dropout_rate > 0:
        fixed: list[str] = []
        fixed_end: list[str] = []
        if ks and ks in caption:
            fixed_text, flex_text = caption.split(ks, 1)
            if ks in flex_text:
                flex_text, end_text = flex_text.split(ks, 1)
                fixed_end = _split(end_text, sep)
            fixed, flex = _split(fixed_text, sep), _split(flex_text, sep)
        else:
            flex = [t.strip() for t in caption.strip().split(sep)]  # kohya keeps empty tags here
            if opts.keep_tokens > 0:
                fixed, flex = flex[: opts.keep_tokens], flex[opts.keep_tokens :]
        if opts.shuffle_caption:
            rng.shuffle(flex)
        if opts.caption_tag_dropout_rate > 0:
            flex = [t for t in flex if rng.random() >= opts.caption_tag_dropout_rate]
        caption = ", ".join(fixed + flex + fixed_end)
    elif ks:
        caption = caption.replace(ks, sep)
    return caption.strip()


def description_of(metadata: dict[str, Any] | None) -> str:
    """The entry's natural-language description: `description`, else euge-trainer's `nl_caption`."""
    if not metadata:
        return ""
    d = metadata.get("description") or metadata.get("nl_caption") or ""
    return d if isinstance(d, str) else str(d)


def full_caption(caption: str, opts: CaptionOptions, rng: random.Random, *, key: str, metadata: dict[str, Any],
                 counter: dict, flipped: bool, caption_hook: Callable | None = None,
                 description_hook: Callable | None = None, description: str | None = None,
                 info: Callable[[], Any] | None = None) -> str:
    """The caption a sample trains on: tags and / or the description (see the module docstring), with the
    built-in processing and the hooks (TextHook objects, data/hooks.py). `description` defaults to the
    metadata's; `info()` builds the euge-style ImageInfo when a hook needs one."""
    desc = description_of(metadata) if description is None else description
    use_tags, use_desc = True, False
    if desc:
        if not (caption.strip() or opts.class_tokens):
            use_tags, use_desc = False, True
        else:
            r = rng.random()
            p_desc, p_both = opts.description_probability, opts.description_with_tags_probability
            use_tags, use_desc = (False, True) if r < p_desc else ((True, True) if r < p_desc + p_both else (True, False))
    text = ""
    if use_tags:
        text = process_caption(caption, opts, rng)
        if caption_hook is not None:
            text = caption_hook(text, key=key, metadata=metadata, counter=counter, flipped=flipped, rng=rng, info=info)
    if use_desc:
        if description_hook is not None:
            desc = description_hook(desc, key=key, metadata=metadata, counter=counter, flipped=flipped, rng=rng,
                                    info=info)
        if desc:
            text = f"{text}{opts.caption_separator} {desc}" if text else desc
    return text
