"""`cache.py cfg.toml --dry-run`: what the trainer will see, without loading any model (kohya's debug_dataset,
made useful at scale: counts and histograms over the whole index, examples and a contact sheet from a few rows).

Prints per subset its entries, samples per epoch (repeats counted), reg flag and entries with 0 repeats; the
skipped inputs; the bucket histogram (bucket, images, samples, share of samples); caption statistics (empty
captions over every entry; CLIP tokens, mean and share over max_token_length, over a sample); 8 examples of
processed captions (built-in options, descriptions and hooks, as the loader makes them); and writes a contact sheet
of a few bucketed crops with their captions under them.
"""

from __future__ import annotations

import os
import random
import textwrap
from typing import Any

import numpy as np

from .buckets import resize_and_crop
from .captions import full_caption
from .hooks import load_text_hook
from .images import BadImage, load_image
from .sources import subset_where

TOKEN_SAMPLE = 2000   # captions tokenized for the statistics
EXAMPLES = 8
SHEET_TILES = 8
TILE = 192            # longest side of a tile in the contact sheet
TEXT_H = 64           # caption area under each tile


def _examples(index, data_cfg, rows: list[int], seed: int) -> list[tuple[str, str]]:
    cap = load_text_hook(data_cfg.caption_processor, "caption_processor")
    desc = load_text_hook(data_cfg.description_processor, "description_processor")
    out = []
    for row in rows:
        opts = index.subsets[int(index.subset[row])].caption_options
        md = index.meta(row)
        text = full_caption(index.captions[row], opts, random.Random(seed + row), key=index.keys[row], metadata=md,
                            counter=index.counter, flipped=False, caption_hook=cap, description_hook=desc,
                            description=index.descriptions[row], info=lambda r=row: index.image_info(r))
        out.append((index.keys[row], text))
    return out


def contact_sheet(index, rows: list[int], captions: dict[str, str], path: str) -> int:
    """Write a PNG of bucketed crops (center crop, as cached) with their captions; returns the tiles drawn."""
    from PIL import Image, ImageDraw, ImageFont

    from core.fsio import commit_file

    tiles = []
    for row in rows:
        try:
            im = load_image(index.paths[row])
        except BadImage:
            continue
        bw, bh = (int(v) for v in index.buckets[row])
        crop, _, _ = resize_and_crop(im, (bw, bh), False)
        crop.thumbnail((TILE, TILE))
        tiles.append((crop, captions.get(index.keys[row], index.captions[row]), f"{bw}x{bh}"))
    if not tiles:
        return 0
    cols = min(4, len(tiles))
    nrows = (len(tiles) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * TILE, nrows * (TILE + TEXT_H)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for i, (im, text, bucket) in enumerate(tiles):
        x, y = (i % cols) * TILE, (i // cols) * (TILE + TEXT_H)
        sheet.paste(im, (x + (TILE - im.width) // 2, y + (TILE - im.height) // 2))
        lines = textwrap.wrap(f"[{bucket}] {text}", width=TILE // 6)[:5]
        draw.multiline_text((x + 2, y + TILE + 2), "\n".join(lines), fill=(0, 0, 0), font=font)
    tmp = f"{path}.tmp{os.getpid()}.png"
    sheet.save(tmp)
    commit_file(tmp, path)
    return len(tiles)


def report(index, data_cfg, model_cfg, preview_path: str, seed: int = 0) -> str:
    """The dry-run text (and the contact sheet at preview_path)."""
    n = len(index)
    lines: list[str] = [f"dataset: {n} entries, {int(index.repeats.sum())} samples per epoch "
                        f"(batch size {data_cfg.batch_size}), {len(index.skipped)} inputs skipped"]
    lines.append("subsets:")
    for si, s in enumerate(index.subsets):
        sel = index.subset == si
        src = subset_where(s) or "?"
        lines.append(f"  [{si}] {src}: {int(sel.sum())} images, {int(index.repeats[sel].sum())} samples/epoch, "
                     f"num_repeats {s.num_repeats}{', reg' if s.is_reg else ''}"
                     f"{f', class tokens {s.class_tokens!r}' if s.class_tokens else ''}, "
                     f"{int((index.repeats[sel] == 0).sum())} with 0 repeats, loss weight {s.loss_weight:g}")
    for p, why in list(index.skipped.items())[:5]:
        lines.append(f"  skipped {p}: {why}")
    # buckets
    b = index.buckets.astype(np.int64)
    ids = b[:, 0] * 100_003 + b[:, 1]
    uniq, first, inv = np.unique(ids, return_index=True, return_inverse=True)
    imgs = np.bincount(inv, minlength=len(uniq))
    samples = np.bincount(inv, weights=index.repeats, minlength=len(uniq))
    total = max(1.0, float(samples.sum()))
    lines.append(f"buckets ({len(uniq)}): bucket  images  samples  share")
    for j in np.argsort(-samples, kind="stable"):
        w, h = (int(v) for v in index.buckets[first[j]])
        lines.append(f"  {w:>5}x{h:<5} {int(imgs[j]):>7} {int(samples[j]):>8} {100 * samples[j] / total:6.1f}%")
    # captions
    caps = index.captions.tolist()
    empty = sum(1 for c in caps if not c.strip())
    desc = sum(1 for d in index.descriptions.tolist() if d)
    rng = np.random.default_rng(seed)
    sample = rng.choice(n, size=min(n, TOKEN_SAMPLE), replace=False).tolist()
    limit = int(getattr(model_cfg, "max_token_length", 75))
    try:
        from models.tokenizers import default_tokenizer

        tok = default_tokenizer()
        counts = [len(tok.encode(caps[i])) for i in sample]
    except Exception:  # no vocabulary: words instead
        tok, counts = None, [len(caps[i].split()) for i in sample]
    unit = "CLIP tokens" if tok is not None else "words"
    longest = max(range(n), key=lambda i: len(caps[i])) if n else 0
    lines.append(f"captions: {empty} empty ({100 * empty / max(1, n):.1f}%), {desc} with a description; "
                 f"{unit} over {len(sample)} sampled: mean {np.mean(counts) if counts else 0:.1f}, "
                 f"max {max(counts) if counts else 0}, {sum(c > limit for c in counts)} over {limit}")
    if n:
        lines.append(f"  longest: {index.keys[longest]!r} ({len(caps[longest])} characters)")
    # examples
    ex_rows = sorted(rng.choice(np.flatnonzero(index.repeats > 0) if (index.repeats > 0).any() else np.arange(n),
                                size=min(n, EXAMPLES), replace=False).tolist())
    examples = _examples(index, data_cfg, ex_rows, seed)
    lines.append(f"{len(examples)} processed captions (as the loader makes them):")
    lines += [f"  {k}: {t}" for k, t in examples]
    drawn = contact_sheet(index, ex_rows[:SHEET_TILES], dict(examples), preview_path)
    lines.append(f"contact sheet of {drawn} bucketed crops: {preview_path}" if drawn else
                 "contact sheet: no image could be read (cache-only or missing images)")
    return "\n".join(lines)


__all__: list[Any] = ["report", "contact_sheet"]
