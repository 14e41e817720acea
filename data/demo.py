"""A tiny generated dataset of coloured shapes with captions naming colour and shape (README demo and tests)."""

from __future__ import annotations

import os
import random

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 170, 60), "yellow": (235, 200, 30)}
SHAPES = ("circle", "square", "triangle")


def make_demo_dataset(out_dir: str, n: int = 32, size: tuple[int, int] = (64, 128), seed: int = 0) -> list[str]:
    """Write n PNG images (sides in [size[0], size[1]], varied aspect) + same-stem .txt captions; returns the paths."""
    rng = random.Random(seed)
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for i in range(n):
        w, h = rng.randint(*size), rng.randint(*size)
        colour, shape = rng.choice(list(COLOURS)), SHAPES[i % len(SHAPES)]
        bg = tuple(rng.randint(200, 255) for _ in range(3))
        im = Image.new("RGB", (w, h), bg)
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
        stem = os.path.join(out_dir, f"{i:04d}_{colour}_{shape}")
        im.save(stem + ".png")
        with open(stem + ".txt", "w", encoding="utf-8") as f:
            f.write(f"a {colour} {shape}, simple background, {colour}, {shape}")
        paths.append(stem + ".png")
    return paths
