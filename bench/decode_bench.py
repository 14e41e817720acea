#!/usr/bin/env python
"""Image decode + bucket resize speed per core: today's path (full decode + LANCZOS) vs the reduced decode.

    python bench/decode_bench.py                     # 2 / 6 / 12 MP photo-like and line-art JPEG, PNG, WebP at 1024
    python bench/decode_bench.py --mp 6,12 --formats jpg --repeats 5 --kind lineart
    python bench/decode_bench.py --calibrate         # the draft-mode error vs margin and sharpness (data/images.py)

Generates the images once (data/demo.py synthetic_photo / synthetic_lineart, JPEG quality 90, WebP quality 90, PNG
level 6) in a temporary folder, then times, in this one process (one core: Pillow's decoders and resize are
single-threaded), `resize_and_crop(load_image(p), bucket)` against `load_resized(p, bucket)` (JPEG draft +
reduce()), alternating the two so machine load hits both alike. Prints img/s of each, the speed-up, the JPEG
decode scale the new path used (1/1 = full decode: a sharp image whose draft would lose quality) and the PSNR of
the new output against the old. The bucket is the one assign_buckets gives the image at --resolution.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image, ImageChops, ImageFilter, JpegImagePlugin

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.buckets import BucketSettings, assign_buckets, load_resized, resize_and_crop  # noqa: E402
from data.demo import synthetic_lineart, synthetic_photo  # noqa: E402
from data.images import draft_sharpness, load_image  # noqa: E402

SIZES = {2: (1728, 1152), 6: (3000, 2000), 12: (4000, 3000)}  # 3:2 / 4:3 camera frames
SAVE = {"jpg": {"quality": 90}, "webp": {"quality": 90}, "png": {"compress_level": 6}}
KINDS = {"photo": synthetic_photo, "lineart": synthetic_lineart}


def psnr(a, b) -> float:
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mse = ((x - y) ** 2).mean()
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


class DecodeScale:
    """Records the size of the last JPEG decode (Pillow JpegImageFile.load) -> the draft scale the path used."""

    def __init__(self) -> None:
        self.sizes: list[tuple[int, int]] = []
        orig = JpegImagePlugin.JpegImageFile.load

        def load(im, *a, **k):
            if im.tile:  # not yet decoded (later calls return at once)
                self.sizes.append(im.size)
            return orig(im, *a, **k)

        JpegImagePlugin.JpegImageFile.load = load


def calibrate() -> None:
    """Error of the plain 1/2 draft (no fallback) against the full decode, at resize margins 1.2-3x, with the draft's
    sharpness: the numbers behind DRAFT_SAFE_MARGIN and DRAFT_SMOOTH_MAX in data/images.py."""
    w, h = SIZES[6]
    rng = np.random.default_rng(0)
    photo, art = synthetic_photo(w, h, seed=4), synthetic_lineart(w, h, seed=5)
    cases = {
        "photo": synthetic_photo(w, h, seed=0),
        "photo, sharpened": photo.filter(ImageFilter.UnsharpMask(3, 150, 0)),
        "grain sigma 10": Image.fromarray(np.clip(128 + 10 * rng.standard_normal((h, w, 3)), 0, 255).astype(np.uint8)),
        "grain sigma 3": Image.fromarray(np.clip(128 + 3 * rng.standard_normal((h, w, 3)), 0, 255).astype(np.uint8)),
        "line art": art,
        "line art, blur 0.7": art.filter(ImageFilter.GaussianBlur(0.7)),
        "line art, blur 1.5": art.filter(ImageFilter.GaussianBlur(1.5)),
        "line art, blur 3": art.filter(ImageFilter.GaussianBlur(3)),
        "photo x line art": ImageChops.multiply(photo, art),
    }
    margins = (1.2, 1.5, 2.0, 2.5, 3.0)
    print(f"{'image (3000x2000 JPEG q90)':28} {'sharpness':>9} " + " ".join(f"{f'{m}x dB':>7}" for m in margins)
          + f" {'MSE / (0.5 + 0.12 S) at 1.2x':>29}")
    for name, im in cases.items():
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90)
        full = Image.open(io.BytesIO(buf.getvalue()))
        full.load()
        half = Image.open(io.BytesIO(buf.getvalue()))
        half.draft(None, (w // 2, h // 2))
        half.load()
        s = draft_sharpness(half)
        row, worst = [], 0.0
        for m in margins:
            size = (round(half.size[0] / m), round(half.size[1] / m))
            err = float(((np.asarray(full.resize(size, Image.LANCZOS), np.float64)
                          - np.asarray(half.resize(size, Image.LANCZOS), np.float64)) ** 2).mean())
            row.append(10 * math.log10(255.0**2 / err) if err else float("inf"))
            worst = max(worst, err / (0.5 + 0.12 * s)) if m == margins[0] else worst
        print(f"{name:28} {s:>9.1f} " + " ".join(f"{v:>7.1f}" for v in row) + f" {worst:>29.2f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mp", default="2,6,12", help="megapixel sizes, from " + ",".join(map(str, SIZES)))
    ap.add_argument("--formats", default="jpg,png,webp")
    ap.add_argument("--kind", default="photo,lineart", help="photo, lineart or both (comma-separated)")
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3, help="timed decodes per path and file")
    ap.add_argument("--calibrate", action="store_true", help="print the draft error table instead")
    args = ap.parse_args()
    if args.calibrate:
        return calibrate()
    settings = BucketSettings(resolution=args.resolution)
    scale = DecodeScale()
    print(f"{'MP':>3} {'fmt':5} {'kind':8} {'size':>10} {'bucket':>9} {'old img/s':>10} {'new img/s':>10} "
          f"{'speed-up':>9} {'draft':>6} {'PSNR dB':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for mp in (int(m) for m in args.mp.split(",")):
            w, h = SIZES[mp]
            bucket = tuple(int(v) for v in assign_buckets(np.array([[w, h]]), settings)[0])
            for kind in args.kind.split(","):
                im = KINDS[kind](w, h, seed=mp)
                for fmt in args.formats.split(","):
                    path = os.path.join(tmp, f"{mp}_{kind}.{fmt}")
                    im.save(path, **SAVE[fmt])
                    t_old = t_new = 0.0
                    for _ in range(args.repeats):
                        t = time.perf_counter()
                        old = resize_and_crop(load_image(path), bucket)[0]
                        t_old += time.perf_counter() - t
                        scale.sizes.clear()
                        t = time.perf_counter()
                        new = load_resized(path, bucket)[0]
                        t_new += time.perf_counter() - t
                    used = f"1/{round(w / scale.sizes[-1][0])}" if scale.sizes else "-"
                    print(f"{mp:>3} {fmt:5} {kind:8} {f'{w}x{h}':>10} {f'{bucket[0]}x{bucket[1]}':>9} "
                          f"{args.repeats / t_old:>10.2f} {args.repeats / t_new:>10.2f} {t_old / t_new:>8.2f}x "
                          f"{used:>6} {psnr(old, new):>8.1f}", flush=True)


if __name__ == "__main__":
    main()
