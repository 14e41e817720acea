#!/usr/bin/env python
"""Image decode + bucket resize speed per core: today's path (full decode + LANCZOS) vs the reduced decode.

    python bench/decode_bench.py                     # 2 / 6 / 12 MP photo-like JPEG, PNG, WebP at resolution 1024
    python bench/decode_bench.py --mp 6,12 --formats jpg --repeats 5 --kind lineart

Generates the images once (data/demo.py synthetic_photo / synthetic_lineart, JPEG quality 90, WebP quality 90, PNG
level 6) in a temporary folder, then times, in this one process (one core: Pillow's decoders and resize are
single-threaded), `resize_and_crop(load_image(p), bucket)` against `load_resized(p, bucket)` (JPEG draft +
reduce()), alternating the two so machine load hits both alike. Prints img/s of each, the speed-up and the PSNR
of the new output against the old. The bucket is the one assign_buckets gives the image at --resolution.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.buckets import BucketSettings, assign_buckets, load_resized, resize_and_crop  # noqa: E402
from data.demo import synthetic_lineart, synthetic_photo  # noqa: E402
from data.images import load_image  # noqa: E402

SIZES = {2: (1728, 1152), 6: (3000, 2000), 12: (4000, 3000)}  # 3:2 / 4:3 camera frames
SAVE = {"jpg": {"quality": 90}, "webp": {"quality": 90}, "png": {"compress_level": 6}}


def psnr(a, b) -> float:
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mse = ((x - y) ** 2).mean()
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mp", default="2,6,12", help="megapixel sizes, from " + ",".join(map(str, SIZES)))
    ap.add_argument("--formats", default="jpg,png,webp")
    ap.add_argument("--kind", default="photo", choices=("photo", "lineart"))
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3, help="timed decodes per path and file")
    args = ap.parse_args()
    gen = synthetic_photo if args.kind == "photo" else synthetic_lineart
    settings = BucketSettings(resolution=args.resolution)
    print(f"{'MP':>3} {'fmt':5} {'size':>10} {'bucket':>9} {'old img/s':>10} {'new img/s':>10} {'speed-up':>9} {'PSNR dB':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for mp in (int(m) for m in args.mp.split(",")):
            w, h = SIZES[mp]
            im = gen(w, h, seed=mp)
            bucket = tuple(int(v) for v in assign_buckets(np.array([[w, h]]), settings)[0])
            for fmt in args.formats.split(","):
                path = os.path.join(tmp, f"{mp}.{fmt}")
                im.save(path, **SAVE[fmt])
                t_old = t_new = 0.0
                for _ in range(args.repeats):
                    t = time.perf_counter()
                    old = resize_and_crop(load_image(path), bucket)[0]
                    t_old += time.perf_counter() - t
                    t = time.perf_counter()
                    new = load_resized(path, bucket)[0]
                    t_new += time.perf_counter() - t
                q = psnr(old, new)
                print(f"{mp:>3} {fmt:5} {f'{w}x{h}':>10} {f'{bucket[0]}x{bucket[1]}':>9} {args.repeats / t_old:>10.2f} "
                      f"{args.repeats / t_new:>10.2f} {t_old / t_new:>8.2f}x {q:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
