"""Aspect-ratio buckets as in kohya sd-scripts, vectorised over the whole dataset."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .images import MAX_PIXELS, load_image_reduced

# Pillow resize(reducing_gap=...): first a box reduce() by an integer factor while the remaining factor stays above
# this, then the filter; 3.0 is Pillow's "indistinguishable from fair resampling" setting (Image.resize docs).
REDUCING_GAP = 3.0


@dataclass(frozen=True)
class BucketSettings:
    """The settings that decide every image's bucket (part of the store fingerprint)."""

    resolution: int = 1024       # width of the training resolution (the square's side when height is 0)
    enable_bucket: bool = True
    step: int = 64
    min_reso: int = 256
    max_reso: int = 2048
    no_upscale: bool = False
    height: int = 0              # kohya's `resolution = "w,h"`: bucket area <= w * h; 0 = square
    subsets: str = ""            # the keys of subsets with settings of their own (kohya [[datasets]]), "" = none
    num_bucket: int = 0          # HCP-Diffusion's RatioBucket.from_files: this many buckets from the images' ratios

    @property
    def size(self) -> tuple[int, int]:
        """(w, h) of the training resolution."""
        return self.resolution, self.height or self.resolution

    @property
    def max_area(self) -> int:
        w, h = self.size
        return w * h

    @classmethod
    def from_data_cfg(cls, d, sub=None, where: str = "[data]") -> "BucketSettings":
        """Read the bucket fields of a DataConfig (a SubsetConfig's own values, where set, over them), validating
        them."""
        def pick(name: str):
            v = getattr(sub, name, None) if sub is not None else None
            return getattr(d, name) if v is None else v

        res = pick("resolution")
        w, h = parse_resolution(res)
        s = cls(w, bool(pick("enable_bucket")), int(pick("bucket_reso_step")), int(pick("min_bucket_reso")),
                int(pick("max_bucket_reso")), bool(pick("bucket_no_upscale")), 0 if h == w else h,
                num_bucket=int(getattr(sub, "num_bucket", None) or 0))
        if min(w, h) <= 0 or s.step <= 0:
            raise ValueError(f"{where} resolution ({res}) and bucket_reso_step ({s.step}) must be > 0")
        if w % s.step or h % s.step:
            raise ValueError(f"{where} resolution {res} must be a multiple of bucket_reso_step {s.step}")
        if not (0 < s.min_reso <= min(w, h) and max(w, h) <= s.max_reso):
            raise ValueError(f"{where} need 0 < min_bucket_reso ({s.min_reso}) <= resolution ({res}) "
                             f"<= max_bucket_reso ({s.max_reso})")
        return s

    def key(self) -> str:
        """A stable string for fingerprints (a latent record is valid for these settings only)."""
        res = f"{self.resolution}x{self.height}" if self.height else str(self.resolution)
        own = f",subsets=[{self.subsets}]" if self.subsets else ""
        k = f",num_bucket={self.num_bucket}" if self.num_bucket else ""
        return (f"res={res},bucket={int(self.enable_bucket)},step={self.step},min={self.min_reso},"
                f"max={self.max_reso},noup={int(self.no_upscale)}{k}{own}")


def parse_resolution(v) -> tuple[int, int]:
    """(w, h) of `resolution = N` or kohya's `[w, h]` (also "w,h")."""
    if isinstance(v, str):
        v = [p for p in v.replace("x", ",").split(",") if p.strip()]
    if isinstance(v, (list, tuple)):
        if len(v) == 1:
            v = v[0]
        elif len(v) == 2:
            return int(v[0]), int(v[1])
        else:
            raise ValueError(f"[data] resolution {v!r}: give N or [width, height]")
    return int(v), int(v)


def make_buckets(s: BucketSettings) -> np.ndarray:
    """The predefined bucket list [B, 2] (w, h), sorted, every side a multiple of step, area <= w * h of the
    training resolution (kohya `make_bucket_resolutions`: the square side is sqrt(area) floored to the step)."""
    max_area = s.max_area
    side = int(math.sqrt(max_area) // s.step) * s.step
    resos = {(side, side)}
    w = s.min_reso - s.min_reso % s.step or s.step
    while w <= s.max_reso:
        h = min(s.max_reso, (max_area // w) // s.step * s.step)
        if h >= s.min_reso:
            resos.add((w, h))
            resos.add((h, w))
        w += s.step
    return np.array(sorted(resos), dtype=np.int32)


def kmeans_1d(x: np.ndarray, k: int, iters: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """(sorted centres, label per value) of Lloyd's k-means on 1-D values, started from the values' quantiles
    (deterministic: the same clusters for the same values in any order). In one dimension each cluster is a run of
    the sorted values, so an iteration is a searchsorted over the midpoints between centres."""
    x = np.asarray(x, np.float64)
    u, counts = np.unique(x, return_counts=True)
    k = max(1, min(k, len(u)))
    c = np.quantile(np.repeat(u, counts), (np.arange(k) + 0.5) / k)
    c = np.unique(c)
    for _ in range(iters):
        lab = np.searchsorted((c[1:] + c[:-1]) / 2, u)
        s = np.bincount(lab, weights=u * counts, minlength=len(c))
        n = np.bincount(lab, weights=counts, minlength=len(c))
        new = np.where(n > 0, s / np.maximum(n, 1), c)
        if np.allclose(new, c, rtol=0, atol=1e-12):
            c = new
            break
        c = np.unique(new)
    return c, np.searchsorted((c[1:] + c[:-1]) / 2, x)


def ratio_buckets(sizes: np.ndarray, s: BucketSettings) -> np.ndarray:
    """HCP-Diffusion's RatioBucket.from_files (hcpdiff/data/bucket.py build_buckets_from_images): num_bucket
    clusters of log2(w / h) over the images; each cluster's bucket has the target area at its centre ratio r,
    h = sqrt(area / r), w = h * r, each rounded to the step. HCP clusters with sklearn's KMeans (k-means++ starts,
    random_state 3407); ours is `kmeans_1d` (quantile starts): the same buckets for well separated ratios, a
    boundary image may land in the neighbouring one."""
    ratio = np.log2(sizes[:, 0] / sizes[:, 1])
    centres, label = kmeans_1d(ratio, s.num_bucket)
    r = 2.0 ** centres
    h_all = np.sqrt(s.max_area / r)
    w_all = h_all * r
    wh = np.stack([np.round(w_all / s.step) * s.step, np.round(h_all / s.step) * s.step], 1).astype(np.int32)
    return np.maximum(wh, s.step)[label]


def assign_buckets(sizes: np.ndarray, s: BucketSettings) -> np.ndarray:
    """Bucket (w, h) per image from sizes [N, 2] (w, h), all at once."""
    sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
    if (sizes <= 0).any():
        raise ValueError("assign_buckets: every size must be positive (w, h)")
    if s.num_bucket and s.enable_bucket and len(sizes):
        return ratio_buckets(sizes, s)
    if not s.enable_bucket:
        return np.tile(np.array([s.size], np.int32), (len(sizes), 1))
    w, h = sizes[:, 0].astype(np.float64), sizes[:, 1].astype(np.float64)
    if s.no_upscale:
        # Own bucket per image: scale down to fit the area (never up), floor each side to the step.
        max_area = float(s.max_area)
        scale = np.minimum(1.0, np.sqrt(max_area / (w * h)))
        bw = np.floor(w * scale / s.step) * s.step
        bh = np.floor(h * scale / s.step) * s.step
        # An image smaller than one step cannot be represented without upscaling; use one step.
        bw, bh = np.maximum(bw, s.step), np.maximum(bh, s.step)
        bw, bh = np.minimum(bw, s.max_reso), np.minimum(bh, s.max_reso)
        return np.stack([bw, bh], 1).astype(np.int32)
    buckets = make_buckets(s)
    # Nearest aspect ratio (kohya compares w/h directly); searchsorted on the sorted ratios avoids an N x B matrix.
    bar = buckets[:, 0] / buckets[:, 1]
    order = np.argsort(bar, kind="stable")
    sbar = bar[order]
    ar = w / h
    j = np.clip(np.searchsorted(sbar, ar), 1, len(sbar) - 1)
    left_better = np.abs(ar - sbar[j - 1]) <= np.abs(sbar[j] - ar)
    j = np.where(left_better, j - 1, j)
    if len(sbar) == 1:
        j = np.zeros_like(j)
    return buckets[order[j]].astype(np.int32)


def crop_params(size_wh: tuple[int, int], bucket_wh: tuple[int, int], random_crop: bool,
                rng: random.Random | None = None) -> tuple[tuple[int, int], tuple[int, int]]:
    """Resize so the image covers the bucket, then crop -> ((resized_w, resized_h), (crop_top, crop_left))."""
    w, h = size_wh
    bw, bh = bucket_wh
    scale = max(bw / w, bh / h)
    rw, rh = max(bw, int(math.floor(w * scale + 0.5))), max(bh, int(math.floor(h * scale + 0.5)))
    if random_crop:
        rng = rng or random.Random()
        top, left = rng.randint(0, rh - bh), rng.randint(0, rw - bw)
    else:
        top, left = (rh - bh) // 2, (rw - bw) // 2
    return (rw, rh), (top, left)


def flipped_crop(size_wh: tuple[int, int], bucket_wh: tuple[int, int],
                 crop_top_left: tuple[int, int]) -> tuple[int, int]:
    """crop_top_left of the same window after a horizontal flip: its left edge measured from the right."""
    (rw, _), _ = crop_params(size_wh, bucket_wh, False)
    top, left = crop_top_left
    return top, rw - bucket_wh[0] - left


def resize_and_crop(im: Image.Image, bucket_wh: tuple[int, int], random_crop: bool = False,
                    rng: random.Random | None = None) -> tuple[Image.Image, tuple[int, int], tuple[int, int]]:
    """Resize-then-crop to the bucket -> (image, original_size (h, w), crop_top_left (top, left))."""
    (rw, rh), (top, left) = crop_params(im.size, bucket_wh, random_crop, rng)
    bw, bh = bucket_wh
    if (rw, rh) != im.size:
        # LANCZOS when shrinking keeps detail (kohya uses INTER_AREA); BICUBIC when enlarging.
        resample = Image.LANCZOS if rw < im.size[0] else Image.BICUBIC
        out = im.resize((rw, rh), resample)
    else:
        out = im
    out = out.crop((left, top, left + bw, top + bh))
    return out, (im.size[1], im.size[0]), (top, left)


def load_resized(path: str, bucket_wh: tuple[int, int], random_crop: bool = False,
                 rng: random.Random | None = None, draft: bool = True, max_pixels: int = MAX_PIXELS
                 ) -> tuple[Image.Image, tuple[int, int], tuple[int, int]]:
    """`resize_and_crop(load_image(path), ...)` with a reduced decode: JPEG draft (unless `draft` is false) and
    reduce() before the filter for large downscales (`REDUCING_GAP`).

    Same geometry as the full path: original_size and the crop come from the full displayed size, the crop rng is
    drawn the same way, and the decoded image is resized to exactly the size the full image would have been.
    """
    geom: list = []

    def need(size_wh: tuple[int, int]) -> tuple[int, int]:
        geom.append(crop_params(size_wh, bucket_wh, random_crop, rng))
        return geom[0][0]

    im, (w, h) = load_image_reduced(path, need, draft, max_pixels)
    (rw, rh), (top, left) = geom[0]
    bw, bh = bucket_wh
    if (rw, rh) != im.size:
        resample = Image.LANCZOS if rw < w else Image.BICUBIC  # as resize_and_crop, judged on the full size
        im = im.resize((rw, rh), resample, reducing_gap=REDUCING_GAP if rw < im.size[0] else None)
    return im.crop((left, top, left + bw, top + bh)), (h, w), (top, left)
