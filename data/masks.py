"""Loss masks of training images, at the pixel resolution of the image's bucket (diffusion/masks.py averages them
down to latent resolution and applies them to the loss).

Where a mask comes from, first found wins:
1. data.mask_dir / <stem>.png (a folder of masks, as OneTrainer's and SimpleTuner's mask datasets);
2. <stem>_mask.png or <stem>-masklabel.png beside the image (OneTrainer names its masks `-masklabel.png`);
3. the image's own alpha channel, when it has one that is not fully opaque (kohya's `alpha_mask`).
White (255) = trained, black (0) = not. A mask goes through the image's geometry: resized to the size the image is
resized to (bilinear), cropped with the image's crop, so it lines up with the latents. Mask files are never listed
as training images (data/listing.py asks `is_mask_file`).

A record in the latent store keeps its mask, so a mask file is part of the record's source: `record_source` adds
the mask file's fingerprint to the image's, and a mask added, changed or removed after caching makes the record
stale (cache.py encodes it again). An alpha channel is part of the image, so the image's own fingerprint covers it.
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageOps

from .buckets import crop_params
from .images import EXIF_ORIENTATION, MAX_PIXELS, BadImage, open_checked
from .latent_files import is_latent_file
from .locators import is_locator
from .store import source_fingerprint

MASK_SUFFIXES = ("_mask.png", "-masklabel.png")


def is_mask_file(name: str, siblings: set[str]) -> bool:
    """Whether file `name` is the mask of an image in the same folder (`siblings`: the stems of its image files):
    `-masklabel.png` always (OneTrainer), `<stem>_mask.png` when <stem> is an image there."""
    low = name.lower()
    if low.endswith("-masklabel.png"):
        return True
    return low.endswith("_mask.png") and name[: -len("_mask.png")] in siblings


def mask_file(image_path: str, mask_dir: str = "") -> str | None:
    """The mask file of an image (sources 1 and 2 above), or None."""
    stem = os.path.splitext(os.path.basename(image_path))[0]
    if mask_dir:
        p = os.path.join(mask_dir, stem + ".png")
        if os.path.isfile(p):
            return p
    base = os.path.splitext(image_path)[0]
    for suffix in MASK_SUFFIXES:
        if os.path.isfile(base + suffix):
            return base + suffix
    return None


class MaskFiles:
    """`mask_file` for a whole dataset: the masks beside the images are found from one listing per image folder
    (only mask-named entries kept: memory stays small) instead of two stats per image; data.mask_dir is still asked
    per image (one stat). Safe to share between threads (a folder listed twice at worst)."""

    def __init__(self, mask_dir: str = ""):
        self.mask_dir = mask_dir
        self._folders: dict[str, frozenset[str] | None] = {}

    def _mask_names(self, folder: str) -> frozenset[str] | None:
        """The mask-named files in `folder` (None: it cannot be listed; then each path is asked)."""
        names = self._folders.get(folder, ())
        if names == ():
            try:
                with os.scandir(folder) as it:
                    names = frozenset(e.name for e in it if e.name.endswith(MASK_SUFFIXES) and e.is_file())
            except FileNotFoundError:
                names = frozenset()
            except OSError:
                names = None
            self._folders[folder] = names
        return names

    def find(self, image_path: str) -> str | None:
        """The image's mask file, as `mask_file` finds it, or None (members of containers have none)."""
        if is_locator(image_path):
            return None
        folder, name = os.path.split(image_path)
        if self.mask_dir:
            p = os.path.join(self.mask_dir, os.path.splitext(name)[0] + ".png")
            if os.path.isfile(p):
                return p
        names = self._mask_names(folder)
        if names is None:
            return mask_file(image_path)
        stem = os.path.splitext(name)[0]
        for suffix in MASK_SUFFIXES:
            if stem + suffix in names:
                return os.path.join(folder, stem + suffix)
        return None


def record_source(image_path: str, content_hash: bool = False, mask_dir: str = "",
                  masks: MaskFiles | None = None) -> str:
    """The source fingerprint of an image's record (data/store.py `source_fingerprint`), with its mask file's when
    it has one: adding, changing or removing the mask makes the record stale. '' when the image is missing.
    `masks`: a shared MaskFiles (whole datasets), else `mask_file` is asked."""
    src = source_fingerprint(image_path, content_hash)
    if not src or is_latent_file(image_path):  # a row trained from an .npz cache takes its mask from the npz
        return src
    path = masks.find(image_path) if masks is not None else None if is_locator(image_path) \
        else mask_file(image_path, mask_dir)
    return src if path is None else f"{src};mask={source_fingerprint(path, content_hash)}"


def _alpha(path: str, max_pixels: int) -> Image.Image | None:
    """The image's alpha channel (EXIF orientation applied), or None without one / when fully opaque."""
    im = open_checked(path, max_pixels)
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode not in ("RGBA", "LA", "La", "RGBa", "PA"):
        return None
    im = ImageOps.exif_transpose(im)
    a = im.getchannel("A")
    return None if a.getextrema()[0] == 255 else a


def pixel_mask(image_path: str, bucket_wh: tuple[int, int], crop_top_left: tuple[int, int], mask_dir: str = "",
               max_pixels: int = MAX_PIXELS) -> np.ndarray | None:
    """The image's mask as uint8 [bucket_h, bucket_w], aligned with the image resized and cropped to its bucket
    (crop_top_left from the image's load), or None when it has none."""
    path = mask_file(image_path, mask_dir)
    try:
        if path is not None:
            m = ImageOps.exif_transpose(open_checked(path, max_pixels)).convert("L")
            with open_checked(image_path, max_pixels) as im:
                full = ImageOps.exif_transpose(im).size if im.getexif().get(EXIF_ORIENTATION, 1) != 1 else im.size
        else:
            m = _alpha(image_path, max_pixels)
            if m is None:
                return None
            full = m.size
    except (OSError, BadImage) as e:
        raise BadImage(f"cannot read its mask: {e}") from None
    (rw, rh), _ = crop_params(full, bucket_wh, False)
    top, left = crop_top_left
    bw, bh = bucket_wh
    m = m.resize((rw, rh), Image.BILINEAR) if m.size != (rw, rh) else m
    return np.asarray(m.crop((left, top, left + bw, top + bh)), dtype=np.uint8)
