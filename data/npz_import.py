"""Existing kohya / euge-trainer `.npz` latent caches into the shard store.

The file layouts read (kohya library/train_util.py, strategy_base.py / strategy_sd.py; euge-trainer
modules/sdxl_dataset_utils.py), each beside its image or under the imported folder:
    <stem>.npz                        `latents` [C, h, w] float32, `original_size` [W, H], `crop_ltrb` [L, T, R, B],
                                      optional `latents_flipped` (kohya before its caching strategies; euge-trainer)
    <stem>.npz + <stem>_flip.npz      `arr_0` each (kohya's first fine-tune format, prepare_buckets_latents.py)
    <stem>_<WWWW>x<HHHH>_sdxl.npz     the strategy format (W x H = the image size); keys as the first line, or with
                                      a `_<h>x<w>` suffix per latent size (multi-resolution caches); `alpha_mask`
                                      [H, W] 0..1 when cached with --alpha_mask
The arrays are the VAE's raw samples (`latent_dist.sample()`), so they are scaled into the diffusion model's latent
space like our own encodes ((z - shift) * scale of the configured VAE). A latent whose size is not the bucket's
(after our bucketing) is not imported, with the reason. Which VAE made them is the user's word: the records get
the configured VAE's fingerprint and say in `imp` which file they came from. An `alpha_mask` becomes the record's
loss mask `mask`, the tensor cache.py stores for an image's alpha channel or mask file (diffusion/masks.py
`to_stored`: float16 at latent size), reduced to the latent grid as kohya's masked loss reduces it, so
loss.masked_loss trains with it (a flipped latent uses its mirror); an all-ones mask (kohya writes one for an image
without alpha) is not stored, as cache.py stores none for an opaque image. Like every record cache.py writes,
an imported one carries its index row (`row_extra`, data/record_rows.py: cache-only training).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import torch

from diffusion.masks import to_stored

from .buckets import crop_params, flipped_crop
from .index import DatasetIndex, row_extra
from .latent_files import LATENT_EXT, classify_npz, is_latent_file, latent_files
from .store import BackgroundWriter, LatentStore, Record, ShardWriter, source_fingerprint

log = logging.getLogger(__name__)


# ---- the import ------------------------------------------------------------------------------------------------

def find_npz(root: str) -> dict[str, dict[str, str]]:
    """base path (folder + base name) -> {kind: npz path} for every latent cache under root (one walk)."""
    out: dict[str, dict[str, str]] = {}
    for d, _, files in os.walk(root):
        for f in files:
            c = classify_npz(f)
            if c is not None:
                out.setdefault(os.path.join(d, c[0]), {})[c[1]] = os.path.join(d, f)
    return out


def _pick(z, name: str, latent_hw: tuple[int, int]) -> np.ndarray | None:
    """`name` or its multi-resolution form `name_<h>x<w>` from an npz."""
    for k in (name, f"{name}_{latent_hw[0]}x{latent_hw[1]}"):
        if k in z.files:
            return z[k]
    return None


MASK = "mask"  # the record's loss mask (as cache.py stores it): kohya's alpha mask at latent size, never scaled


def alpha_mask_at_latent_size(mask: np.ndarray, latent_hw: tuple[int, int]) -> np.ndarray:
    """kohya's alpha mask ([H, W] at the bucket's pixel size, 0..1) reduced to the latent grid as kohya reduces it
    when it weights the loss (library/custom_train_functions.py apply_masked_loss: interpolate(mode="area") to the
    loss's size), so the record keeps exactly what kohya's masked loss multiplies by, 64x smaller."""
    t = torch.from_numpy(np.ascontiguousarray(mask))[None, None]
    return torch.nn.functional.interpolate(t, size=latent_hw, mode="area")[0, 0].numpy()


def read_npz(files: dict[str, str], bucket_wh: tuple[int, int], size_wh: tuple[int, int], channels: int
             ) -> tuple[dict[str, np.ndarray], tuple[int, int], tuple[int, int], tuple[int, int] | None] | str:
    """(raw arrays {latent, flip.latent, mask}, original_size (h, w), crop (top, left), flipped crop) of one
    entry's files, or the reason it cannot be imported."""
    bw, bh = bucket_wh
    lhw = (bh // 8, bw // 8)
    main = files.get("strategy") or files.get("main")
    if main is None:
        return "only a _flip.npz, no latents file"
    try:
        with np.load(main) as z:
            lat = _pick(z, "latents", lhw)
            if lat is None:
                lat = z["arr_0"] if "arr_0" in z.files else None
            if lat is None:
                return f"{os.path.basename(main)} has no 'latents' (or 'arr_0') array (arrays: {z.files})"
            flip = _pick(z, "latents_flipped", lhw)
            orig = _pick(z, "original_size", lhw)
            ltrb = _pick(z, "crop_ltrb", lhw)
            mask = _pick(z, "alpha_mask", lhw)
        if flip is None and "flip" in files:
            with np.load(files["flip"]) as zf:
                flip = zf["latents"] if "latents" in zf.files else zf["arr_0"]
    except (OSError, ValueError, KeyError, EOFError) as e:  # np.load raises these for damaged files
        return f"unreadable npz ({type(e).__name__}: {e})"
    arrays = {"latent": lat} if flip is None else {"latent": lat, "flip.latent": flip}
    for name, a in list(arrays.items()):
        a = np.asarray(a)
        if a.ndim == 4 and a.shape[0] == 1:
            a = a[0]
        if a.shape != (channels, lhw[0], lhw[1]):
            return (f"{name} shape {tuple(a.shape)} does not match the bucket {bw}x{bh} "
                    f"(expected {(channels, lhw[0], lhw[1])})")
        if not np.isfinite(a).all():
            return f"{name} has NaN / Inf values"
        arrays[name] = a
    if mask is not None:
        mask = np.asarray(mask, np.float32)
        if mask.shape != (bh, bw):
            return f"alpha_mask shape {tuple(mask.shape)} does not match the bucket {bw}x{bh} (expected {(bh, bw)})"
        arrays[MASK] = alpha_mask_at_latent_size(mask, lhw)
    if orig is not None and np.asarray(orig).size == 2:
        w, h = (int(v) for v in np.asarray(orig).tolist())
        original = (h, w)
    else:
        original = (size_wh[1], size_wh[0])
    if ltrb is not None and np.asarray(ltrb).size == 4:
        # kohya (train_util.BaseDataset.__getitem__): crop (int(top), int(left)); flipped left =
        # int(target_w - crop_ltrb[2]) on the stored values, which are floats (BucketManager.get_crop_ltrb)
        left, top, right, _ = np.asarray(ltrb, np.float64).tolist()
        crop, crop_flip = (int(top), int(left)), (int(top), int(bw - right))
    else:  # the oldest format records no crop: our center crop of the image size
        _, crop = crop_params(size_wh, bucket_wh, False)
        crop_flip = flipped_crop(size_wh, bucket_wh, crop)
    return arrays, original, crop, (crop_flip if "flip.latent" in arrays else None)


def import_npz(index: DatasetIndex, root: str, writer, vae_cfg, dtype: torch.dtype,
               content_hash: bool = False) -> dict[str, Any]:
    """Write a record per index entry that has a usable npz under root (matched by image path without extension,
    else by key or file stem) through `writer` (a store writer's `put`); returns counts and the reasons for the
    files left out."""
    found = find_npz(os.path.abspath(root))
    by_base: dict[str, int] = {}
    paths, keys = index.paths.tolist(), index.keys.tolist()
    for i, p in enumerate(paths):
        if p:
            by_base[os.path.splitext(p)[0]] = i
    by_key = {k: i for i, k in enumerate(keys)}
    by_stem: dict[str, int] = {}
    for i, k in enumerate(keys):
        by_stem.setdefault(os.path.basename(k), i)
    used: set[int] = set()
    out = _counts()
    for base, files in sorted(found.items()):
        rel = os.path.relpath(base, os.path.abspath(root))
        row = by_base.get(base)
        if row is None:
            row = by_key.get(rel, by_key.get(os.path.basename(base), by_stem.get(os.path.basename(base))))
        if row is None or row in used:
            out["unmatched"] += 1
            continue
        if _import_row(index, row, files, writer, vae_cfg, dtype, content_hash, out):
            used.add(row)
    return out


def import_latent_rows(index: DatasetIndex, rows: list[int], writer, vae_cfg, dtype: torch.dtype,
                       content_hash: bool = False) -> dict[str, Any]:
    """Write the record of each index row whose path is a latent cache (euge-trainer's layouts b / d: `.npz` files
    in place of images; data/latent_files.py) from that file, as `import_npz` does; returns the same counts."""
    out = _counts()
    for row in rows:
        path = index.paths[row]
        if is_latent_file(path):
            _import_row(index, row, latent_files(path), writer, vae_cfg, dtype, content_hash, out)
    return out


def _counts() -> dict[str, Any]:
    return {"imported": 0, "no_flip": 0, "unmatched": 0, "alpha_masks": 0, "rejected": {}}


def _import_row(index: DatasetIndex, row: int, files: dict[str, str], writer, vae_cfg, dtype: torch.dtype,
                content_hash: bool, out: dict[str, Any]) -> bool:
    """One row's record from its npz files through `writer.put` (counts and rejections into `out`); whether it was
    written. Latents are scaled into the model's latent space ((z - shift) * scale), the alpha mask is not."""
    bucket = (int(index.buckets[row][0]), int(index.buckets[row][1]))
    size = (int(index.sizes[row][0]), int(index.sizes[row][1]))
    got = read_npz(files, bucket, size, int(vae_cfg.z_channels))
    if isinstance(got, str):
        out["rejected"][next(iter(files.values()))] = got
        return False
    arrays, original, crop, crop_flip = got
    if index.subsets[int(index.subset[row])].flip_aug and "flip.latent" not in arrays:
        out["no_flip"] += 1
    scale, shift = float(vae_cfg.scaling_factor), float(vae_cfg.shift_factor)
    tensors = {k: ((torch.from_numpy(np.ascontiguousarray(a)).float() - shift) * scale).to(dtype)
               for k, a in arrays.items() if k != MASK}
    if MASK in arrays and float(arrays[MASK].min()) < 1.0:  # all ones = no mask (cache.py stores none either)
        tensors[MASK] = to_stored(arrays[MASK])  # the loss mask the loader reads with loss.masked_loss
        out["alpha_masks"] += 1
    path = index.paths[row]
    src = source_fingerprint(path, content_hash) if path else ""
    extra = {**row_extra(index, row), "imp": os.path.abspath(files.get("strategy") or files["main"])}
    writer.put(Record(index.keys[row], src, bucket, original, crop, tensors, crop_flip, None, extra))
    out["imported"] += 1
    return True


def latent_rows(index: DatasetIndex) -> np.ndarray:
    """Rows whose path is a latent cache (euge-trainer's layouts b / d), from the path column (no string objects)."""
    return np.flatnonzero(index.paths.endswith_ascii(LATENT_EXT))


def import_latent_caches(index: DatasetIndex, rows: np.ndarray, root: str, cfg_fp: str, vae_cfg,
                         dtype: torch.dtype, content_hash: bool, rank: int, world: int, shard_size_mb: int,
                         compress: bool) -> dict[str, Any]:
    """cache.py, every rank before the status check: this rank's stripe of `rows` (latent caches in place of
    images) imported into its own shards, those whose record is already current skipped. Returns the counts."""
    mine = np.asarray(rows)[rank::world].tolist()
    store = LatentStore(root, check_validity=False)
    keys = [index.keys[r] for r in mine]
    srcs = [source_fingerprint(index.paths[r], content_hash) for r in mine]
    current = store.is_valid_many(keys, srcs, cfg_fp) if mine else np.zeros(0, bool)
    store.close()
    todo = [r for r, ok in zip(mine, current.tolist()) if not ok]
    out = _counts()
    if todo:
        writer = BackgroundWriter(ShardWriter(root, cfg_fp, rank, shard_size_mb, compress, origin="npz-in-place"))
        try:
            out = import_latent_rows(index, todo, writer, vae_cfg, dtype, content_hash)
        finally:
            writer.close()
    for path, why in out["rejected"].items():
        log.warning("latent cache %s not imported: %s", path, why)
    return out
