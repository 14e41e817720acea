"""Latent caches as files (`.npz`, kohya sd-scripts / euge-trainer): which files are latents, and their latent size
read from the array header alone. A leaf module (numpy only): the readers use it to list euge-trainer's layouts b / d
(a folder of `.npz` latents, with `.txt` captions or a metadata file, and no images) and data/npz_import.py to find
caches beside images.
"""

from __future__ import annotations

import os
import re
import zipfile

import numpy as np

LATENT_EXT = ".npz"
STRATEGY_RE = re.compile(r"^(?P<base>.+)_(?P<w>\d+)x(?P<h>\d+)_(?P<arch>sdxl|sd|sd3|flux|lumina|hunyuan_image)\.npz$")
SKIP_SUFFIXES = ("_te_outputs.npz", "_te.npz")  # text-encoder caches: not latents
LATENT_KEYS = ("latents", "arr_0")  # kohya / euge-trainer `latents`; kohya's first fine-tune format `arr_0`


def classify_npz(name: str) -> tuple[str, str] | None:
    """(base name, kind) of an npz file name: kind 'main' (`<base>.npz`) | 'flip' (`<base>_flip.npz`) | 'strategy'
    (`<base>_<W>x<H>_<arch>.npz`); None when it is not a latent cache."""
    low = name.lower()
    if not low.endswith(LATENT_EXT) or low.endswith(SKIP_SUFFIXES):
        return None
    m = STRATEGY_RE.match(name)
    if m:
        return m.group("base"), "strategy"
    if low.endswith("_flip.npz"):
        return name[: -len("_flip.npz")], "flip"
    return name[: -len(LATENT_EXT)], "main"


def is_latent_file(path: str) -> bool:
    """Whether an index path names a latent cache (a row trained from its latents, not from an image)."""
    return path.lower().endswith(LATENT_EXT)


def latent_files(path: str) -> dict[str, str]:
    """{kind: file} of the cache a row's path names: its main / strategy file and a `<base>_flip.npz` beside it."""
    c = classify_npz(os.path.basename(path))
    kind = c[1] if c is not None and c[1] != "flip" else "main"
    out = {kind: path}
    base = c[0] if c is not None else os.path.basename(path)[: -len(LATENT_EXT)]
    flip = os.path.join(os.path.dirname(path), base + "_flip.npz")
    if os.path.isfile(flip):
        out["flip"] = flip
    return out


def latent_hw(path: str) -> tuple[int, int] | str:
    """(h, w) of the latents in an npz, from the array header only; or why there is none (one size is needed: a
    multi-resolution cache holding several is refused)."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
            key = next((k for k in LATENT_KEYS if k in names), None)
            if key is None:
                multi = [k for k in names if k.startswith("latents_")]
                if len(multi) != 1:
                    return (f"no 'latents' array (arrays: {names})" if not multi else
                            f"several latent sizes ({', '.join(multi)}); one is needed")
                key = multi[0]
            with zf.open(key + ".npy") as f:
                version = np.lib.format.read_magic(f)
                shape, _, _ = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                               else np.lib.format.read_array_header_2_0(f))
    except (OSError, ValueError, zipfile.BadZipFile, KeyError, EOFError) as e:
        return f"unreadable npz ({type(e).__name__}: {e})"
    if len(shape) == 4 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 3 or min(shape) < 1:
        return f"latents of shape {tuple(shape)}; [C, h, w] expected"
    return int(shape[1]), int(shape[2])
