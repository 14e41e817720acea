"""Robust image loading: header-only sizes, mode conversion, EXIF orientation, a skip report."""

from __future__ import annotations

import io
import logging
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable

import numpy as np
from PIL import Image, ImageOps

from core.fsio import atomic_write

from .latent_files import is_latent_file, latent_hw
from .locators import is_locator, open_bytes

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp") + tuple(
    ext for ext, fmt in ((".avif", "AVIF"), (".jxl", "JXL")) if fmt in Image.registered_extensions().values()
)
# Default of [data] max_image_pixels: Pillow's decompression-bomb *error* threshold (2 x Image.MAX_IMAGE_PIXELS,
# ~179 MP = 0.5 GiB of RGB). Bigger images are skipped, judged from the header before any decoding.
MAX_PIXELS = 178_956_970
# The limit is ours (checked in open_checked, configurable): Pillow's own check, which warns from ~89.5 MP and
# raises from ~179 MP whatever the setting, is turned off so a legitimate 144 MP scan is not lost.
Image.MAX_IMAGE_PIXELS = None
# EXIF orientation tag; values 5..8 rotate by 90 degrees, so width and height swap.
EXIF_ORIENTATION = 0x0112
# JPEG draft decode (libjpeg's DCT-domain downscale by 1/2, 1/4, 1/8) acts like a box prefilter: it aliases and
# softens what the final LANCZOS would have kept. Measured against the full decode + LANCZOS
# (`python bench/decode_bench.py --calibrate`: 3000x2000 JPEGs at quality 90, photo-like, sharpened, grain, line art
# plain / blurred, photo x line art):
# - a draft at least DRAFT_SAFE_MARGIN x the resize target on each side stayed >= 41.4 dB on every case (line art
#   42.9 dB; 40.1 dB at 2x, 32 dB at 1.2x) and >= 51.6 dB on photo-like ones;
# - a closer draft (1x .. DRAFT_SAFE_MARGIN x) is kept only when its luma is smooth: `draft_sharpness` (mean squared
#   neighbour difference) <= DRAFT_SMOOTH_MAX. At 1.2x the error was MSE <= 0.66 x (0.5 + 0.12 x sharpness) on every
#   case, so the bound keeps MSE < 6.5 (40 dB); a sharper draft is decoded again at the safe margin (line art from
#   6-12 MP to a 1024 bucket: the full decode, bit-identical to draft = false).
DRAFT_SAFE_MARGIN = 2.5
DRAFT_SMOOTH_MAX = 48.0


class BadImage(Exception):
    """An image that cannot be used; the message says why."""


def open_checked(path: str, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open lazily (header only) and reject empty files, non-images and images over `max_pixels` before decoding.
    A locator (`<container>::<member>`, data/readers) is opened from the bytes its reader returns."""
    src: Any = path
    try:
        if is_locator(path):
            src = io.BytesIO(open_bytes(path))
        if (src.getbuffer().nbytes if isinstance(src, io.BytesIO) else os.path.getsize(path)) == 0:
            raise BadImage("zero-byte file")
    except (OSError, ValueError) as e:
        raise BadImage(f"cannot stat: {e}") from None
    try:
        im = Image.open(src)
    except Exception as e:  # PIL raises many types for non-images
        why = str(e).replace(repr(src), "the member's bytes") if isinstance(src, io.BytesIO) else e  # no address
        raise BadImage(f"not a readable image ({type(e).__name__}: {why})") from None
    w, h = im.size
    if w * h > max_pixels:
        im.close()
        raise BadImage(f"decompression bomb: {w}x{h} = {w * h} pixels > limit {max_pixels} "
                       f"([data] max_image_pixels)")
    if w < 1 or h < 1:
        im.close()
        raise BadImage(f"empty image {w}x{h}")
    return im


def read_size(path: str, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """(width, height) as displayed (EXIF orientation applied), from the header only. A latent cache (`.npz`) in
    place of an image: its latents' size x 8 (euge-trainer: `image_size = latents_size * 8`)."""
    if is_latent_file(path):
        hw = latent_hw(path)
        if isinstance(hw, str):
            raise BadImage(f"latent cache: {hw}")
        return hw[1] * 8, hw[0] * 8
    im = open_checked(path, max_pixels)
    try:
        w, h = im.size
        try:
            orientation = im.getexif().get(EXIF_ORIENTATION, 1)
        except Exception:
            orientation = 1
        return (h, w) if orientation in (5, 6, 7, 8) else (w, h)
    finally:
        im.close()


def read_sizes(paths: list[str], num_threads: int = 16,
               max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, dict[int, str]]:
    """Header sizes of many images in parallel threads -> ([N, 2] int32 (w, h), -1 where bad; {row: reason})."""
    sizes = np.full((len(paths), 2), -1, dtype=np.int32)
    errors: dict[int, str] = {}

    def one(i: int) -> None:
        try:
            sizes[i] = read_size(paths[i], max_pixels)
        except BadImage as e:
            errors[i] = str(e)

    if paths:
        chunk = 512  # one task per chunk: ThreadPoolExecutor.map makes a future per item (chunksize is ignored)
        with ThreadPoolExecutor(max(1, num_threads)) as ex:
            list(ex.map(lambda s: [one(i) for i in range(s, min(s + chunk, len(paths)))], range(0, len(paths), chunk)))
    return sizes, errors


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; alpha is composited on white (transparent = background)."""
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit greyscale: scale to 8 bits instead of clipping (Pillow's convert("L") clips at 255).
        arr = np.asarray(im, dtype=np.uint32 if im.mode == "I" else np.uint16).astype(np.float64)
        peak = 65535.0 if arr.max() > 255 or im.mode != "I" else 255.0
        arr = np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        im = Image.fromarray(arr, "L")
    if im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")
    if im.mode in ("LA", "La", "RGBa", "PA"):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, im).convert("RGB")
    if im.mode != "RGB":
        im = im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV
    return im


def load_image(path: str, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode fully to RGB with EXIF orientation applied; raises BadImage with the reason."""
    im = open_checked(path, max_pixels)
    try:
        im.load()  # truncated files raise here (ImageFile.LOAD_TRUNCATED_IMAGES stays False)
        im = ImageOps.exif_transpose(im)
        return _to_rgb(im)
    except BadImage:
        raise
    except Exception as e:
        raise BadImage(f"cannot decode ({type(e).__name__}: {e})") from None


def draft_sharpness(im: Image.Image) -> float:
    """Mean squared difference of horizontally / vertically neighbouring luma values (every 4th row pair: the
    statistic DRAFT_SMOOTH_MAX bounds; high for sharp strokes and edges, low for photos)."""
    y = np.asarray(im.convert("L"))
    a, b = y[0:-1:4].astype(np.int32), y[1::4].astype(np.int32)  # rows 0, 4, 8, ... and the rows below them
    if a.shape[0] == 0 or a.shape[1] < 2:
        return 0.0
    return float((np.square(a[:, 1:] - a[:, :-1]).mean() + np.square(b - a).mean()) / 2)


def _draft_jpeg(im: Image.Image, reopen: Callable[[], Image.Image], tw: int, th: int, swap: bool) -> Image.Image:
    """Decode a JPEG at the smallest DCT scale that is still >= (tw, th) (stored orientation when `swap`); a draft
    closer than DRAFT_SAFE_MARGIN x the target that is not smooth is decoded again at the safe margin."""
    def draft(j: Image.Image, margin: float) -> Image.Image:
        dw, dh = math.ceil(tw * margin), math.ceil(th * margin)
        j.draft(None, (dh, dw) if swap else (dw, dh))  # Pillow picks the largest 1/s still >= this on both sides
        j.load()
        return j

    full = im.size
    im = draft(im, 1.0)
    if im.size != full:  # a draft scale applied
        margin = min(im.size[0] / (th if swap else tw), im.size[1] / (tw if swap else th))
        if margin < DRAFT_SAFE_MARGIN and draft_sharpness(im) > DRAFT_SMOOTH_MAX:
            im.close()
            im = draft(reopen(), DRAFT_SAFE_MARGIN)
    return im


def load_image_reduced(path: str, need: Callable[[tuple[int, int]], tuple[int, int]], draft: bool = True,
                       max_pixels: int = MAX_PIXELS) -> tuple[Image.Image, tuple[int, int]]:
    """Decode to RGB no larger than needed -> (image, full displayed size (w, h)); EXIF orientation applied.

    `need(full_size)` returns the (w, h) the caller will resize to. A JPEG is decoded in draft mode: libjpeg scales
    the DCT by 1/2, 1/4 or 1/8 while decoding (Pillow `Image.draft`), to the smallest scale still at least `need` on
    both sides, or at least DRAFT_SAFE_MARGIN x `need` when that draft is sharp (`_draft_jpeg`); other formats (and
    `draft=False`) decode fully.
    """
    im = open_checked(path, max_pixels)
    try:
        w, h = im.size
        try:
            orientation = im.getexif().get(EXIF_ORIENTATION, 1)
        except Exception:
            orientation = 1
        swap = orientation in (5, 6, 7, 8)
        full = (h, w) if swap else (w, h)
        tw, th = need(full)
        if draft and im.format == "JPEG":
            im = _draft_jpeg(im, lambda: open_checked(path, max_pixels), tw, th, swap)
        else:
            im.load()
        im = ImageOps.exif_transpose(im)
        return _to_rgb(im), full
    except BadImage:
        raise
    except Exception as e:
        raise BadImage(f"cannot decode ({type(e).__name__}: {e})") from None


class SkipReport:
    """Collects skipped inputs (one log line each) and writes them to a `skipped.txt` report."""

    def __init__(self) -> None:
        self.items: dict[str, str] = {}
        self._lock = threading.Lock()

    def add(self, path: str, reason: str) -> None:
        with self._lock:
            if path not in self.items:
                self.items[path] = reason
                log.warning("skipped %s: %s", path, reason)

    def extend(self, pairs: Iterable[tuple[str, str]]) -> None:
        for p, r in pairs:
            self.add(p, r)

    def __len__(self) -> int:
        return len(self.items)

    def write(self, path: str) -> None:
        """Write `path<TAB>reason` lines atomically (an empty report removes an old file; an unchanged one is left
        as it is, so a read-only folder with nothing new is fine)."""
        if not self.items:
            if os.path.exists(path):
                os.remove(path)
            return
        if os.path.exists(path) and self.read(path) == self.items:
            return
        text = "".join(f"{p}\t{r}\n" for p, r in sorted(self.items.items()))
        atomic_write(path, lambda f: f.write(text.encode("utf-8")))

    @staticmethod
    def read(path: str) -> dict[str, str]:
        """Read a report written by `write` ({} when absent)."""
        if not os.path.exists(path):
            return {}
        out = {}
        with open(path, encoding="utf-8") as f:
            for line in f:
                p, _, r = line.rstrip("\n").partition("\t")
                out[p] = r
        return out
