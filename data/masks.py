"""Loss masks of training images, at the pixel resolution of the image's bucket (diffusion/masks.py averages them
down to latent resolution and applies them to the loss).

Where a mask comes from, first found wins:
1. data.mask_dir / <stem>.png (a folder of masks, as OneTrainer's and SimpleTuner's mask datasets);
2. <stem>_mask.png or <stem>-masklabel.png beside the image (OneTrainer names its masks `-masklabel.png`);
3. the image's own alpha channel, when it has one that is not fully opaque (kohya's `alpha_mask`).
White (255) = trained, black (0) = not. A mask goes through the image's geometry: resized to the size the image is
resized to (bilinear), cropped with the image's crop, so it lines up with the latents. Mask files are never listed
as training images (data/listing.py asks `is_mask_file`).
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageOps

from .buckets import crop_params
from .images import EXIF_ORIENTATION, MAX_PIXELS, BadImage, open_checked

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
