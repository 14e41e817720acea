"""A tiny generated dataset of coloured shapes with captions naming colour and shape (README demo and tests)."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 170, 60), "yellow": (235, 200, 30)}
SHAPES = ("circle", "square", "triangle")


def draw_shape(rng: random.Random, w: int, h: int, colour: str, shape: str, background: tuple[int, int, int]) -> Image.Image:
    """One w x h image: one filled shape, a third of the short side in radius, at a random place on `background`."""
    im = Image.new("RGB", (w, h), background)
    d = ImageDraw.Draw(im)
    r = min(w, h) // 3
    cx, cy = rng.randint(r, w - r), rng.randint(r, h - r)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        d.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        d.rectangle(box, fill=COLOURS[colour])
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[colour])
    return im


def caption_for(colour: str, shape: str) -> str:
    """The demo caption of one image (also the prompts the demo samples with)."""
    return f"a {colour} {shape}, simple background, {colour}, {shape}"


def random_background(rng: random.Random) -> tuple[int, int, int]:
    """A light background colour (each channel in [200, 255])."""
    return tuple(rng.randint(200, 255) for _ in range(3))


def demo_images(n: int, size: tuple[int, int] = (64, 128), seed: int = 0,
                balanced: bool = False) -> Iterator[tuple[Image.Image, str, str]]:
    """n (image, colour, shape) of the demo's distribution: sides in [size[0], size[1]] (varied aspect), colours and
    backgrounds at random, shapes in turn; `balanced`: every colour x shape pair in turn instead (each n / 12 times:
    no prompt of the demo has fewer examples than another). The same seed gives the same images."""
    rng = random.Random(seed)
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    for i in range(n):
        w, h = rng.randint(*size), rng.randint(*size)
        if balanced:
            colour, shape = pairs[i % len(pairs)]
        else:
            colour, shape = rng.choice(list(COLOURS)), SHAPES[i % len(SHAPES)]
        yield draw_shape(rng, w, h, colour, shape, random_background(rng)), colour, shape


def make_demo_dataset(out_dir: str, n: int = 32, size: tuple[int, int] = (64, 128), seed: int = 0,
                      balanced: bool = False) -> list[str]:
    """Write n PNG images (sides in [size[0], size[1]], varied aspect) + same-stem .txt captions; returns the paths.
    `balanced`: every colour x shape pair equally often (demo_images)."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for i, (im, colour, shape) in enumerate(demo_images(n, size, seed, balanced)):
        stem = os.path.join(out_dir, f"{i:04d}_{colour}_{shape}")
        im.save(stem + ".png")
        with open(stem + ".txt", "w", encoding="utf-8") as f:
            f.write(caption_for(colour, shape))
        paths.append(stem + ".png")
    return paths


def classify_colour(img: Image.Image) -> str | None:
    """A fixed colour classifier for demo pictures: the demo colour whose hue is nearest the saturation-weighted mean
    hue of the shape region, or None without a shape. The region is the pixels farther than 0.25 (max over RGB, in
    [0, 1]) from the median border colour; it must cover 3-70 % of the image with mean saturation >= 0.3."""
    import colorsys

    import numpy as np

    a = np.asarray(img.convert("RGB"), dtype=np.float64) / 255
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    region = np.abs(a - np.median(border, axis=0)).max(axis=-1) > 0.25
    if not 0.03 <= region.mean() <= 0.7:
        return None
    hsv = np.asarray(img.convert("RGB").convert("HSV"), dtype=np.float64)[region] / 255
    if hsv[:, 1].mean() < 0.3:
        return None
    angle = 2 * np.pi * hsv[:, 0]
    mean = np.arctan2((np.sin(angle) * hsv[:, 1]).sum(), (np.cos(angle) * hsv[:, 1]).sum()) / (2 * np.pi) % 1

    def dist(rgb: tuple[int, int, int]) -> float:
        h = colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0]
        return min(abs(mean - h), 1 - abs(mean - h))
    return min(COLOURS, key=lambda name: dist(COLOURS[name]))


def synthetic_photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """Photo-like test image: smooth colour fields at several scales, edges of soft shapes, sensor-like grain."""
    import numpy as np

    rng = np.random.default_rng(seed)
    acc = np.zeros((h, w, 3), np.float32)
    for cells, amp in ((4, 90.0), (16, 45.0), (64, 25.0), (256, 12.0)):  # octaves: coarse light -> fine texture
        small = rng.uniform(-1, 1, (max(2, cells * h // max(w, h)), cells, 3)).astype(np.float32)
        up = Image.fromarray(((small + 1) * 127.5).astype(np.uint8)).resize((w, h), Image.BICUBIC)
        acc += (np.asarray(up, np.float32) / 127.5 - 1) * amp
    acc += rng.standard_normal((h, w, 3), dtype=np.float32) * 4 + 128
    im = Image.fromarray(np.clip(acc, 0, 255, out=acc).astype(np.uint8))
    d = ImageDraw.Draw(im)
    for _ in range(12):  # hard-edged objects
        x, y, r = int(rng.integers(0, w)), int(rng.integers(0, h)), int(rng.integers(min(w, h) // 20, min(w, h) // 5))
        d.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return im


def synthetic_lineart(w: int, h: int, seed: int = 0) -> Image.Image:
    """Line-art-like test image: flat fills and dark anti-aliased strokes on white, pen widths 0.1-0.4% of the short
    side (2-8 px at 2000 px), drawn at 2x and reduced as drawing programs anti-alias."""
    rng = random.Random(seed)
    W, H = 2 * w, 2 * h
    im = Image.new("RGB", (W, H), (255, 255, 255))
    d = ImageDraw.Draw(im)
    s = min(W, H)
    for _ in range(20):
        x, y, r = rng.randrange(W), rng.randrange(H), rng.randrange(s // 30, s // 6)
        d.rectangle((x, y, x + r, y + r), fill=tuple(rng.randrange(150, 256) for _ in range(3)))
    for _ in range(300):
        pts = [(rng.randrange(W), rng.randrange(H)) for _ in range(3)]
        d.line(pts, fill=(rng.randrange(40), rng.randrange(40), rng.randrange(40)),
               width=max(2, int(s * rng.uniform(0.001, 0.004))))
    return im.reduce(2)
