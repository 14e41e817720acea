"""Reduced decode (JPEG draft, reduce()) against today's full decode + LANCZOS path: geometry identical, PSNR held."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image

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


def test_photo_jpeg_draft_quality_and_geometry(tmp_path, photo):
    """Draft-decoded JPEG: same size / original_size / crop (random crop from the same rng) and >= 40 dB."""
    p = str(tmp_path / "p.jpg")
    photo.save(p, quality=92)
    old, o1, c1 = old_path(p, BUCKET, True, random.Random(5))
    new, o2, c2 = load_resized(p, BUCKET, True, random.Random(5))
    assert (o1, c1) == (o2, c2) == ((980, 1400), c1) and new.size == old.size == BUCKET
    assert psnr(old, new) >= 40.0
    with Image.open(p) as im:  # the draft really applied: a plain decode is 4x the pixels
        im.draft(None, (457, 320))
        assert im.size == (700, 490)


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


def test_lineart(tmp_path):
    """Line art: draft off is bit-identical to today's path; draft on loses more than on photos (documented in the
    README: ~32 dB at a 2.5x downscale of high-contrast strokes), PNG (no draft) stays >= 40 dB with reduce()."""
    art = synthetic_lineart(1400, 980, seed=2)
    j, p = str(tmp_path / "a.jpg"), str(tmp_path / "a.png")
    art.save(j, quality=92)
    art.save(p)
    old = old_path(j, BUCKET)[0]
    assert np.array_equal(np.asarray(load_resized(j, BUCKET, draft=False)[0]), np.asarray(old))
    assert psnr(old, load_resized(j, BUCKET)[0]) >= 30.0
    small = (192, 128)  # 7.3x: reduce(2) then LANCZOS
    assert psnr(old_path(p, small)[0], load_resized(p, small)[0]) >= 40.0


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
