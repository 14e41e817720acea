"""Reduced decode (JPEG draft, reduce()) against today's full decode + LANCZOS path: geometry identical, PSNR held."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from data.buckets import load_resized, resize_and_crop
from data.demo import synthetic_lineart, synthetic_photo
from data.images import EXIF_ORIENTATION, load_image

BUCKET = (448, 320)  # 1400 x 980 sources shrink ~3x, so the JPEG draft decodes at 1/2


def psnr(a: Image.Image, b: Image.Image) -> float:
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mse = ((x - y) ** 2).mean()
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def old_path(path: str, bucket, random_crop=False, rng=None):
    return resize_and_crop(load_image(path), bucket, random_crop, rng)


@pytest.fixture(scope="module")
def photo():
    return synthetic_photo(1400, 980, seed=1)


@pytest.fixture
def decodes(monkeypatch):
    """The (w, h) of every JPEG decode (stored orientation): which draft scales the reduced path used."""
    sizes = []
    orig = JpegImagePlugin.JpegImageFile.load

    def load(im, *a, **k):
        if im.tile:  # not yet decoded (later calls return at once)
            sizes.append(im.size)
        return orig(im, *a, **k)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "load", load)
    return sizes


def test_photo_jpeg_draft_quality_and_geometry(tmp_path, photo, decodes):
    """Draft-decoded JPEG: same size / original_size / crop (random crop from the same rng) and >= 40 dB; the smooth
    photo keeps its 1/2 draft although it is only 1.5x the target."""
    p = str(tmp_path / "p.jpg")
    photo.save(p, quality=92)
    old, o1, c1 = old_path(p, BUCKET, True, random.Random(5))
    decodes.clear()
    new, o2, c2 = load_resized(p, BUCKET, True, random.Random(5))
    assert (o1, c1) == (o2, c2) == ((980, 1400), c1) and new.size == old.size == BUCKET
    assert decodes == [(700, 490)]  # one decode, at 1/2
    assert psnr(old, new) >= 40.0


def test_exif_orientation_kept(tmp_path, photo):
    """EXIF orientation 6 (rotate 90): the draft size is requested in stored orientation, output as displayed."""
    p = str(tmp_path / "r.jpg")
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    photo.save(p, quality=92, exif=exif)
    bucket = (BUCKET[1], BUCKET[0])
    old, o1, c1 = old_path(p, bucket)
    new, o2, c2 = load_resized(p, bucket)
    assert o1 == o2 == (1400, 980) and c1 == c2 and new.size == bucket
    assert psnr(old, new) >= 40.0


@pytest.fixture(scope="module")
def art():
    return synthetic_lineart(1400, 980, seed=2)


def test_lineart(tmp_path, decodes, art):
    """Line art keeps >= 40 dB with draft on: a sharp draft closer than DRAFT_SAFE_MARGIN x the target is decoded
    again at the safe margin (here: full at 3x, 1/2 instead of 1/4 at 7.3x); draft off is bit-identical to today's
    path; a PNG (no draft) stays >= 40 dB with reduce()."""
    j, p = str(tmp_path / "a.jpg"), str(tmp_path / "a.png")
    art.save(j, quality=92)
    art.save(p)
    old = old_path(j, BUCKET)[0]
    assert np.array_equal(np.asarray(load_resized(j, BUCKET, draft=False)[0]), np.asarray(old))
    decodes.clear()
    assert psnr(old, load_resized(j, BUCKET)[0]) >= 40.0
    assert decodes == [(700, 490), (1400, 980)]  # 1/2 draft too sharp at 1.5x -> full decode
    small = (192, 128)  # 7.3x
    decodes.clear()
    new = load_resized(j, small)[0]
    assert decodes == [(350, 245), (700, 490)]  # 1/4 draft too sharp at 1.8x -> 1/2 (3.6x >= DRAFT_SAFE_MARGIN)
    assert 40.0 <= psnr(old_path(j, small)[0], new) < float("inf")
    assert psnr(old_path(p, small)[0], load_resized(p, small)[0]) >= 40.0  # reduce(2) then LANCZOS


def test_draft_sharpness_bound(photo, art):
    """The smoothness statistic of a 2x reduction separates the test kinds with room on both sides of the bound."""
    from data.images import DRAFT_SMOOTH_MAX, draft_sharpness

    assert draft_sharpness(photo.reduce(2)) < DRAFT_SMOOTH_MAX / 2
    assert draft_sharpness(art.reduce(2)) > DRAFT_SMOOTH_MAX * 10
    flat = Image.new("RGB", (64, 1), (9, 9, 9))
    assert draft_sharpness(flat) == 0.0 and draft_sharpness(Image.new("RGB", (1, 1))) == 0.0


def test_upscale_and_bad_file(tmp_path):
    """A small image is enlarged as before (BICUBIC, no draft); a broken file is a BadImage."""
    from data.images import BadImage

    p = str(tmp_path / "s.jpg")
    synthetic_photo(300, 200).save(p)
    assert np.array_equal(np.asarray(load_resized(p, BUCKET)[0]), np.asarray(old_path(p, BUCKET)[0]))
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8garbage")
    with pytest.raises(BadImage):
        load_resized(str(tmp_path / "bad.jpg"), BUCKET)


def test_input_wait_share():
    """cache.py's input-bound share: time waiting for the next item over the loop's time."""
    import time

    from cache import InputWait

    def slow():
        for i in range(3):
            time.sleep(0.02)
            yield i

    w = InputWait()
    for _ in w.timed(slow()):
        pass  # the consumer does nothing: ~all the time is waiting
    assert w.share(w.waited, w.total) > 80.0
    w = InputWait()
    for _ in w.timed(range(3)):
        time.sleep(0.02)  # the consumer is the bottleneck
    assert w.share(w.waited, w.total) < 20.0
    assert InputWait.share(0.0, 0.0) == 0.0
