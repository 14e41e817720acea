"""Encode a dataset into the latent shard store, on every GPU in parallel.

    torchrun --nproc_per_node=N cache.py cfg.toml [key=value ...] [--verify]
    python cache.py cfg.toml

Loads the VAE alone (text encoders only with [cache] cache_text_encoder_outputs), builds or reuses the dataset
index (rank 0), finds the records that are missing or stale, splits them across ranks evenly by bucket, decodes
and resizes images in DataLoader workers, encodes in batches of vae_batch_size, and hands the results to a
background writer so encoding never waits for the disk. Images in tar shards are not read one by one: each rank
gets whole shards and streams them once from start to end, batching the decoded images by bucket as they come.
Each rank writes its own shards; rank 0 merges the store index at the end. Unreadable images are skipped with one
log line and listed in <cache_dir>/skipped.txt. [validation]'s own image folders / metadata files are then
encoded the same way into their own store, <cache_dir>/validation (encode_validation; train.py reads them there).
Exit status 0 unless nothing usable is left (or, with --verify, a shard is damaged).

Cached text: variant k of an image's caption is built by the same `full_caption` call the loader makes (built-in
caption processing, then the [data] caption_processor / description_processor hooks with the record's key,
metadata and the dataset counter), with rng random.Random(_key_seed(key, k)), so the embeddings include the hooks'
effect and the stored caption text is exactly what was encoded. The hooks see flipped=False: a variant is shared
by the plain and the flipped latent (flipped text variants are not cached). The hooks' specs (not their code) are
part of the store fingerprint: changing a hook's code needs a new cache_dir or deleting the store.
"""

from __future__ import annotations

import glob
import itertools
import logging
import os
import random
import time
import zlib
from functools import partial
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

import models
from core import cli, dist
from core.config import CacheConfig, Config
from core.fsio import check_dir_setting, clean_stale_temps
from core.lock import DirLock, LockBusy, acquire_in_step, releases_locks
from data.buckets import flipped_crop, load_resized
from data.masks import MaskFiles, pixel_mask, record_source
from diffusion.masks import latent_mask, to_stored
from training.validation import validation_cache_config, validation_store_dir
from data.captions import CaptionOptions, full_caption
from data.images import BadImage, SkipReport
from data.index import DatasetIndex, load_or_build_index, scan_tar_shards
from data.readers.tar import SCAN_DIR
from data.hooks import load_text_hook
from data.npz_import import row_extra
from data.readers import LOCATOR_SEP, container_reader, deal_largest_first, member_bytes, split_locator
from data.sources import map_chunked
from data.store import (BackgroundWriter, LatentStore, LATENT_DTYPES, Record, SHARD_DIR, ShardWriter,
                        store_cfg_fingerprint)

log = logging.getLogger("cache")

VALID, PENDING, MISSING = 1, 2, 3  # per-row status codes, summed across ranks (each row is checked by one rank)
PROGRESS_EVERY = 8  # batches between all-rank progress sums (a collective: every rank reaches it in lockstep)


def _key_seed(key: str, salt: int = 0) -> int:
    """A record's seed (random crop, caption variant `salt`): from its key, the same on every run and rank."""
    return zlib.crc32(key.encode("utf-8")) * 1_000_003 + salt


class _Decode(Dataset):
    """Decode + bucket one row in a worker process; failures come back as {"row", "error"}."""

    def __init__(self, index: DatasetIndex, content_hash: bool, jpeg_draft: bool, max_pixels: int, mask_dir: str = ""):
        self.index, self.content_hash, self.jpeg_draft, self.max_pixels = index, content_hash, jpeg_draft, max_pixels
        self.mask_dir = mask_dir

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, row: int) -> dict[str, Any]:
        ix = self.index
        path = ix.paths[row]
        sub = ix.subsets[int(ix.subset[row])]
        bucket = (int(ix.buckets[row][0]), int(ix.buckets[row][1]))
        try:
            # A random crop is drawn once per key here, so it is reproducible when the record is rebuilt.
            im, orig, crop = load_resized(path, bucket, sub.random_crop, random.Random(_key_seed(ix.keys[row])),
                                          draft=self.jpeg_draft, max_pixels=self.max_pixels)
            mask = pixel_mask(path, bucket, crop, self.mask_dir, self.max_pixels)  # data/masks.py; None: none
        except BadImage as e:
            return {"row": row, "error": str(e)}
        x = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)
        return {"row": row, "x": x, "orig": orig, "crop": crop, "mask": mask,
                "crop_flip": flipped_crop((orig[1], orig[0]), bucket, crop),
                "src": record_source(path, self.content_hash, self.mask_dir)}  # a mask file is part of it


def _split_by_bucket(index: DatasetIndex, rows: np.ndarray, batch_size: int, world: int) -> list[list[list[int]]]:
    """One-bucket batches of pending rows, dealt round-robin to ranks (equal counts +-1, identical on all ranks)."""
    b = index.buckets[rows]
    order = np.lexsort((rows, b[:, 1], b[:, 0]))
    rows, b = rows[order], b[order]
    batches: list[list[int]] = []
    if len(rows):
        cut = np.flatnonzero((np.diff(b, axis=0) != 0).any(1)) + 1
        for grp in np.split(rows, cut):
            batches += [grp[i : i + batch_size].tolist() for i in range(0, len(grp), batch_size)]
    return [batches[r::world] for r in range(world)]


def _sequential_rows(index: DatasetIndex, rows: np.ndarray) -> tuple[np.ndarray, dict[str, list[int]]]:
    """Rows decoded one by one (files, table cells) and, per sequential container (a tar shard), its rows."""
    loose: list[int] = []
    streamed: dict[str, list[int]] = {}
    sequential: dict[str, bool] = {}
    for i in rows.tolist():
        p = index.paths[i]
        if LOCATOR_SEP in p:
            c = split_locator(p)[0]
            if c not in sequential:
                r = container_reader(c)
                sequential[c] = r is not None and r.sequential
            if sequential[c]:
                streamed.setdefault(c, []).append(i)
                continue
        loose.append(i)
    return np.asarray(loose, dtype=np.int64), streamed


def _deal_containers(streamed: dict[str, list[int]], world: int) -> list[dict[str, list[int]]]:
    """Whole containers to ranks, largest (in rows) first to the least loaded rank (the same on every rank)."""
    deal = deal_largest_first({c: len(rows) for c, rows in streamed.items()}, world)
    return [{c: streamed[c] for c in mine} for mine in deal]


def _stream_batch_count(index: DatasetIndex, containers: dict[str, list[int]], batch_size: int) -> int:
    """Batches `_streamed_batches` makes of these containers' rows: ceil(rows / batch size) per bucket."""
    rows = [r for rs in containers.values() for r in rs]
    if not rows:
        return 0
    _, n = np.unique(index.buckets[np.asarray(rows)], axis=0, return_counts=True)
    return int(((n + batch_size - 1) // batch_size).sum())


class _Stream(IterableDataset):
    """Decoded items of whole sequential containers, each read once from start to end (`stream_members`); DataLoader
    workers take every n-th container. A member that cannot be read comes back as {"row", "error"}."""

    def __init__(self, decode: _Decode, containers: dict[str, list[int]]):
        self.decode, self.containers = decode, containers

    def __iter__(self):
        ix = self.decode.index
        todo = sorted(self.containers)
        w = get_worker_info()
        for c in todo[w.id :: w.num_workers] if w is not None else todo:
            by_member = {split_locator(ix.paths[r])[1]: r for r in self.containers[c]}
            for member, data, why in container_reader(c).stream_members(c, set(by_member)):
                row = by_member[member]
                if data is None:
                    yield {"row": row, "error": why}
                    continue
                with member_bytes(ix.paths[row], data):
                    item = self.decode[row]
                yield item


def _as_is(x: Any) -> Any:
    """DataLoader collate that keeps the item as it is."""
    return x


def _streamed_batches(decode: _Decode, containers: dict[str, list[int]], batch_size: int,
                      workers: int) -> Iterator[list[dict[str, Any]]]:
    """One-bucket batches of the streamed items (as they arrive; each bucket's last partial batch at the end)."""
    if not containers:
        return
    n = min(workers, len(containers))
    items = DataLoader(_Stream(decode, containers), batch_size=None, collate_fn=_as_is, num_workers=n,
                       prefetch_factor=4 if n > 0 else None)
    pending: dict[tuple[int, int], list] = {}
    for it in items:
        b = tuple(int(v) for v in decode.index.buckets[it["row"]])
        group = pending.setdefault(b, [])
        group.append(it)
        if len(group) == batch_size:
            yield pending.pop(b)
    yield from pending.values()


def _encode(vae: nn.Module, x: torch.Tensor, tile: int, posterior: bool, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Pixels [B,3,H,W] in [-1, 1] -> latent (or scaled mean + std), on CPU in the store dtype."""
    mean, logvar = vae.encode(x, tile_size=tile or None)
    lat = vae.to_latents(mean)
    out = {"latent": lat} if not posterior else {
        "mean": lat, "std": vae.to_latents(mean + torch.exp(0.5 * logvar)) - lat}  # to_latents is affine
    return {k: v.to(dtype).cpu() for k, v in out.items()}


def _sum_over_ranks(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Sum of a CPU tensor over ranks as a new CPU tensor (NCCL reduces device tensors only)."""
    return dist.all_reduce_sum(t.to(device, copy=True)).cpu() if dist.is_dist() else t.clone()


@cli.one_line_errors("cache.py")
@releases_locks
def main(argv: list[str] | None = None) -> int:
    """cache.py's three modes: --verify, --dry-run, or encode (after --import-npz when given)."""
    cfg, args = cli.parse(argv, "cache.py", __doc__ or "", extra_flags=[
        ("--verify", "re-check the checksum of every shard and exit"),
        ("--dry-run", "build the index and report what would be trained on (subsets, buckets, captions, 8 examples, "
                      "<cache_dir>/dataset_preview.png) without loading any model, then exit"),
        ("--import-npz", {"metavar": "DIR", "default": "",
                          "help": "first bring kohya / euge-trainer .npz latents found under DIR into the store (no "
                                  "re-encode; their VAE must be the configured one), then encode what they did not cover"})])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    dist.init()
    root = prepare_store_dir(cfg.cache)
    if args.verify:
        vroot = validation_store_dir(root)
        code = max(verify(root), verify(vroot) if os.path.isdir(vroot) else 0)
    else:
        skipped = SkipReport()
        threads = max(4, dist.default_workers(cfg.cache.num_workers) * 4)
        index = build_index(cfg, root, skipped, threads)
        code = dry_run(cfg, index, root) if args.dry_run else encode(cfg, index, root, skipped, threads, args.import_npz)
        if not args.dry_run:
            code = max(code, encode_validation(cfg, threads))
    dist.barrier()
    dist.shutdown()
    return code


def prepare_store_dir(cc: CacheConfig) -> str:
    """The store folder ([cache] cache_dir, created), after the settings check, with its lock held (one cache.py per
    store: a second one waits, then finds the records valid and encodes nothing twice) and what a killed or failed
    run left there removed (rank 0; never a live writer's: see core/fsio.py)."""
    if not cc.cache_dir:
        raise SystemExit("cache.py: [cache] cache_dir is empty; set it to the latent store directory")
    if cc.latent_dtype not in LATENT_DTYPES:
        raise SystemExit(f"cache.py: [cache] latent_dtype {cc.latent_dtype!r} not one of {sorted(LATENT_DTYPES)}")
    root = cc.cache_dir
    try:
        check_dir_setting("cache.cache_dir", root)
        took = acquire_in_step(DirLock(root, "cache.py") if dist.is_main() else None, dist.broadcast_object,
                               wait=True, on_wait=log.info)
    except (ValueError, LockBusy) as e:
        raise SystemExit(f"cache.py: {'config error: ' if isinstance(e, ValueError) else ''}{e}") from None
    if took:
        log.warning(took)
    os.makedirs(root, exist_ok=True)
    if dist.is_main():
        clean_stale_temps([root, os.path.join(root, SHARD_DIR), os.path.join(root, SCAN_DIR)], log=log.info)
    return root


def verify(root: str) -> int:
    """--verify: rank 0 re-checks every shard's checksum and lists the damaged ones; 1 when there are any."""
    bad = []
    if dist.is_main():
        store = LatentStore(root, check_validity=True)
        store.verify()  # adds what it finds to store.damaged, next to the shards already left out on opening
        bad = store.damaged
        print(f"verify: {len(store.shards)} shards, {len(store)} records, {len(bad)} damaged")
        for name, why in bad:
            print(f"  DAMAGED {name}: {why}")
        if bad:
            print("  written down in damaged/: the next cache.py run re-encodes these records")
    return 1 if bad else 0


def build_index(cfg: Config, root: str, skipped: SkipReport, threads: int) -> DatasetIndex:
    """The dataset index beside the store: tar shards scanned by every rank (rank 0 merges), then built (or
    reused) by rank 0 and read by every rank; a failure on rank 0 stops every rank with its message."""
    scan_tar_shards(cfg.data, root, dist.rank(), dist.world_size(), threads)
    dist.barrier()
    try:
        dist.main_first(partial(load_or_build_index, cfg.data, root, is_main=True, skipped=skipped, threads=threads))
        return load_or_build_index(cfg.data, root, is_main=False)
    except (dist.MainRankError, OSError, ValueError) as e:
        raise SystemExit(cli.error_line("data error", e, "cache.py")) from None


def dry_run(cfg: Config, index: DatasetIndex, root: str) -> int:
    """--dry-run: what would be trained on (data/dry_run.py), printed by rank 0, and a preview picture."""
    if dist.is_main():
        from data.dry_run import report

        print(report(index, cfg.data, cfg.model, os.path.join(root, "dataset_preview.png"), cfg.seed))
    return 0


def encode_validation(cfg: Config, threads: int) -> int:
    """[validation]'s own image folders / metadata files, encoded as the training images are (same VAE, buckets,
    text encoders) into their own store beside the training one (training/validation.py validation_store_dir),
    their index beside it; captions as written, no flips, one text variant. train.py reads them from there. 0
    without own validation sources; 1 when none of them is usable."""
    vcfg = validation_cache_config(cfg)
    if vcfg is None:
        return 0
    root = validation_store_dir(cfg.cache.cache_dir)
    os.makedirs(root, exist_ok=True)
    if dist.is_main():
        log.info("[validation] image_dirs / metadata_files -> %s", root)
        clean_stale_temps([root, os.path.join(root, SHARD_DIR)], log=log.info)
    skipped = SkipReport()
    return encode(vcfg, build_index(vcfg, root, skipped, threads), root, skipped, threads, "", label="validation")


def encode(cfg: Config, index: DatasetIndex, root: str, skipped: SkipReport, threads: int, import_npz: str,
           label: str = "") -> int:
    """Encode every entry the store lacks or holds stale (after --import-npz when given), each rank its share of
    the batches, then merge the skip lists and the store index (rank 0; the summary line names `label`). 1 when
    nothing usable is left."""
    cc, device = cfg.cache, dist.info().device
    te, hooks, te_ident = text_encoders_for(cfg, device)
    variants = max(1, int(cc.text_variants))
    flip_any = any(s.flip_aug for s in index.subsets)
    cfg_fp = store_cfg_fingerprint(models.vae_identity(cfg.model, seed=cfg.seed), index.bucket_settings.key(),
                                   cc.latent_dtype, cc.store_posterior, flip_any, te_ident, variants if te else 0)
    if import_npz:
        _import_npz(import_npz, cfg, index, root, cfg_fp, dist.world_size())
    import_latent_caches_in_place(cfg, index, root, cfg_fp)
    store = LatentStore(root, check_validity=cc.check_cache_validity)
    status = row_status(cfg, index, store, cfg_fp, threads)
    pending = np.flatnonzero(status == PENDING)
    n_valid = int((status == VALID).sum())
    if dist.is_main():
        for i in np.flatnonzero(status == MISSING).tolist():
            damaged = store.damaged_records.get(index.keys[i])  # found damaged by a reader: left out of the store
            skipped.add(index.paths[i] or index.keys[i], f"image not found, and its record is damaged ({damaged})"
                        if damaged else "image not found and not in the store")
        for key, why in store.damaged_records.items():  # damaged, and no longer in the dataset: nothing to redo
            try:
                index.row_of(key)
            except KeyError:
                skipped.add(key, f"its record is damaged ({why}) and its image is gone: not re-encoded")
        log.info("%d entries: %d already valid, %d to encode on %d rank(s)", len(index), n_valid, len(pending),
                 dist.world_size())
    counts = torch.zeros(3, dtype=torch.int64)  # encoded, skipped, failed
    waited = torch.zeros(2, dtype=torch.float64)  # seconds waiting for decoded images, seconds in the loop (all ranks)
    bar = _progress_bar(len(pending))
    if len(pending):
        waited = encode_rows(cfg, index, root, pending, cfg_fp, te, hooks, variants, skipped, counts, bar)
    skipped.write(os.path.join(root, f"skipped.r{dist.rank()}.txt"))
    totals = _sum_over_ranks(counts, device)
    if bar is not None:
        bar.update(int(totals.sum()) - bar.n)
        bar.close()
    dist.barrier()
    if dist.is_main():
        finish_store(cfg, index, root, totals, n_valid, waited if len(pending) else None, label)
    return 0 if n_valid + int(totals[0]) > 0 else 1


def text_encoders_for(cfg: Config, device: torch.device) -> tuple[Any, tuple[Any, Any], str]:
    """With [cache] cache_text_encoder_outputs: the frozen text encoders, the caption hooks and the identity of
    both (part of the store fingerprint: another hook spec makes the records stale); else (None, (None, None), "")."""
    if not cfg.cache.cache_text_encoder_outputs:
        return None, (None, None), ""
    te = models.load_text_encoders(cfg.model, device, LATENT_DTYPES[cfg.model.text_encoder_dtype], seed=cfg.seed)
    hooks = (load_text_hook(cfg.data.caption_processor, "caption_processor"),
             load_text_hook(cfg.data.description_processor, "description_processor"))
    ident = te.identity
    if any(hooks):  # cached captions depend on the hooks
        ident += f";hooks={cfg.data.caption_processor}|{cfg.data.description_processor}"
    return te, hooks, ident


def row_status(cfg: Config, index: DatasetIndex, store: LatentStore, cfg_fp: str, threads: int) -> np.ndarray:
    """VALID / PENDING / MISSING per index row, on every rank: each rank checks its stripe (stats in threads, one
    batched lookup), a sum over ranks merges them. A record is stale when its image or its mask file changed (or a
    mask file came or went: data/masks.py record_source). An image gone with its record in the store is still VALID
    (training from the cache alone)."""
    rank, world = dist.rank(), dist.world_size()
    keys = index.keys.tolist()[rank::world]
    srcs = map_chunked(partial(record_source, content_hash=cfg.cache.content_hash, masks=MaskFiles(cfg.data.mask_dir)),
                       index.paths.tolist()[rank::world], threads)  # with each image's mask file (data/masks.py)
    gone = np.array([not s for s in srcs], dtype=bool)
    ok = np.zeros(len(keys), dtype=bool)
    ok[gone] = store.contains_many([keys[j] for j in np.flatnonzero(gone).tolist()])
    here = np.flatnonzero(~gone).tolist()
    ok[~gone] = store.is_valid_many([keys[j] for j in here], [srcs[j] for j in here], cfg_fp)
    status = torch.zeros(len(index), dtype=torch.int32)
    status[rank::world] = torch.from_numpy(np.where(ok, VALID, np.where(gone, MISSING, PENDING)).astype(np.int32))
    return _sum_over_ranks(status, dist.info().device).numpy()


def _progress_bar(total: int) -> Any:
    """The all-rank progress bar, on rank 0 when there is something to encode (else None)."""
    if not (total and dist.is_main()):
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc=f"encode x{dist.world_size()}", dynamic_ncols=True)


def encode_rows(cfg: Config, index: DatasetIndex, root: str, pending: np.ndarray, cfg_fp: str, te: Any,
                hooks: tuple[Any, Any], variants: int, skipped: SkipReport, counts: torch.Tensor,
                bar: Any) -> torch.Tensor:
    """This rank's share of the pending rows: loose files as one-bucket batches dealt round-robin, tar shards
    whole and streamed once; decoded in workers, encoded in batches of vae_batch_size (BatchEncoder), written by a
    background writer into this rank's shards. `counts` (encoded, skipped, failed) is added to; the bar shows
    every rank's total. Returns (seconds waiting for decoded images, seconds in the loop), summed over ranks."""
    cc, rank, world, device = cfg.cache, dist.rank(), dist.world_size(), dist.info().device
    bs, workers = max(1, cc.vae_batch_size), dist.default_workers(cc.num_workers)
    loose, streamed = _sequential_rows(index, pending)
    split = _split_by_bucket(index, loose, bs, world)
    shards = _deal_containers(streamed, world)  # sequential containers (tar shards): whole ones per rank
    # progress collectives only while every rank still has batches
    in_step = min(len(split[r]) + _stream_batch_count(index, shards[r], bs) for r in range(world))
    vae = models.load_vae(cfg.model, device, LATENT_DTYPES[cfg.model.vae_dtype], seed=cfg.seed).eval().requires_grad_(False)
    ds = _Decode(index, cc.content_hash, cfg.data.jpeg_draft, cfg.data.max_image_pixels, cfg.data.mask_dir)
    loader = DataLoader(ds, batch_sampler=split[rank], collate_fn=list, num_workers=workers,
                        prefetch_factor=4 if workers > 0 else None)
    loader = itertools.chain(loader, _streamed_batches(ds, shards[rank], bs, workers))
    waits = InputWait()
    writer = BackgroundWriter(ShardWriter(root, cfg_fp, rank, cc.shard_size_mb, cc.compress))
    encode_batch = BatchEncoder(cc, index, vae, te, hooks, variants, writer, skipped, counts, device)
    for step, items in enumerate(waits.timed(loader), 1):
        encode_batch(items)
        # counts sums to the items this rank has handled; the bar shows every rank's total.
        if world == 1 and bar is not None:
            bar.update(len(items))
        elif world > 1 and step % PROGRESS_EVERY == 0 and step <= in_step:
            done = int(_sum_over_ranks(counts, device).sum())
            if bar is not None:
                bar.update(done - bar.n)
    writer.close()
    return _sum_over_ranks(torch.tensor([waits.waited, waits.total], dtype=torch.float64), device)


class BatchEncoder:
    """One decoded batch -> store records: latents (and the flipped image's, for flip_aug subsets), the cached
    text-encoder outputs of each caption variant, handed to the background writer. Unreadable items are skipped;
    a batch that fails to encode (e.g. out of memory on a huge bucket) is skipped whole, the run goes on.
    `counts`: (encoded, skipped, failed), added to."""

    def __init__(self, cc: CacheConfig, index: DatasetIndex, vae: nn.Module, te: Any, hooks: tuple[Any, Any],
                 variants: int, writer: BackgroundWriter, skipped: SkipReport, counts: torch.Tensor,
                 device: torch.device):
        self.cc, self.index, self.vae, self.te, self.hooks, self.variants = cc, index, vae, te, hooks, variants
        self.writer, self.skipped, self.counts, self.device = writer, skipped, counts, device
        self.vae_dtype, self.dtype = next(vae.parameters()).dtype, LATENT_DTYPES[cc.latent_dtype]

    def __call__(self, items: list[dict[str, Any]]) -> None:
        index, cc = self.index, self.cc
        good = []
        for it in items:
            if "error" in it:
                self.skipped.add(index.paths[it["row"]], it["error"])
                self.counts[1] += 1
            else:
                good.append(it)
        if not good:
            return
        # Outside the per-batch guard below: a failing user hook stops the run instead of skipping images.
        caps = _variant_captions(index, [it["row"] for it in good], self.variants, *self.hooks) \
            if self.te is not None else [None] * len(good)
        try:
            x = torch.stack([it["x"] for it in good]).to(self.device, self.vae_dtype) / 127.5 - 1.0
            with torch.no_grad():
                enc = _encode(self.vae, x, cc.vae_tile_size, cc.store_posterior, self.dtype)
                flips = [j for j, it in enumerate(good) if index.subsets[int(index.subset[it["row"]])].flip_aug]
                enc_f = _encode(self.vae, torch.flip(x[flips], dims=[3]), cc.vae_tile_size, cc.store_posterior,
                                self.dtype) if flips else {}
            texts = _encode_texts(self.te, caps) if self.te is not None else [{} for _ in good]
        except Exception as e:  # one bad batch must not end the run
            log.error("encoding failed for %d images (%s): %s", len(good), index.paths[good[0]["row"]], e)
            for it in good:
                self.skipped.add(index.paths[it["row"]], f"encode failed: {e}")
            self.counts[2] += len(good)
            return
        for j, it in enumerate(good):
            row = it["row"]
            tensors = {k: v[j].clone() for k, v in enc.items()}
            f = flips.index(j) if j in flips else -1
            if f >= 0:
                tensors.update({f"flip.{k}": v[f].clone() for k, v in enc_f.items()})
            tensors.update(texts[j])
            if it.get("mask") is not None:  # the loss mask at latent resolution; flipped latents mirror it
                tensors["mask"] = to_stored(latent_mask(it["mask"]))
            self.writer.put(Record(index.keys[row], it["src"], tuple(int(v) for v in index.buckets[row]),
                                   it["orig"], it["crop"], tensors, it["crop_flip"] if f >= 0 else None, caps[j],
                                   row_extra(index, row)))
        self.counts[0] += len(good)


def finish_store(cfg: Config, index: DatasetIndex, root: str, totals: torch.Tensor, n_valid: int,
                 waited: torch.Tensor | None, label: str = "") -> None:
    """Rank 0, once every rank is done: the ranks' skip lists merged into skipped.txt, the store index written
    (unless unchanged), the temporaries removed, one summary line (`waited`: the encode loop's input wait)."""
    merged = SkipReport()
    merged.items.update(index.skipped)
    for p in sorted(glob.glob(os.path.join(root, "skipped.r*.txt"))):
        merged.items.update(SkipReport.read(p))
        os.remove(p)
    merged.write(os.path.join(root, "skipped.txt"))
    final = LatentStore(root, check_validity=cfg.cache.check_cache_validity)
    if final.index_is_current():
        log.info("store index unchanged")  # nothing written: a read-only store with nothing to do is fine
    else:
        final.write_index()
    clean_stale_temps([root, os.path.join(root, SHARD_DIR)])
    workers = dist.default_workers(cfg.cache.num_workers)
    print(f"cache{f' ({label})' if label else ''}: encoded {int(totals[0])}, already valid {n_valid}, skipped {len(merged)}, "
          f"failed {int(totals[2])}; store has {len(final)} records in {len(final.shards)} shards"
          + (f"; {len(final.damaged)} damaged shard(s) set aside" if final.damaged else "")
          + (f"; input-bound {InputWait.share(*waited.tolist()):.0f}% with {workers} decode worker(s) per rank "
             "(the encoder waited this share of the time for images: add cache.num_workers if high)"
             if waited is not None else ""))


class InputWait:
    """Time the consumer spends waiting for the next item of an iterable (the share says whether it is input-bound)."""

    def __init__(self) -> None:
        self.waited = self.total = 0.0

    def timed(self, it: Iterable[Any]) -> Iterator[Any]:
        """`it`'s items, timing the waits for each."""
        start = last = time.perf_counter()
        for item in it:
            now = time.perf_counter()
            self.waited += now - last
            yield item
            last = time.perf_counter()
            self.total = last - start
        self.total = time.perf_counter() - start

    @staticmethod
    def share(waited: float, total: float) -> float:
        """Percent of the time spent waiting."""
        return 100.0 * waited / total if total > 0 else 0.0


def import_latent_caches_in_place(cfg: Config, index: DatasetIndex, root: str, cfg_fp: str) -> None:
    """Entries that are .npz latent caches with no image (euge-trainer's layouts b / d) are imported, not decoded:
    each rank its stripe (data/npz_import.import_latent_caches), then a barrier, so the status check sees them."""
    from data.npz_import import import_latent_caches, latent_rows

    rows = latent_rows(index)
    if not len(rows):
        return
    if cfg.cache.cache_text_encoder_outputs:
        raise SystemExit(f"cache.py: {len(rows)} entries are .npz latent caches, which bring latents only; run with "
                         "cache.cache_text_encoder_outputs=false")
    vae_cfg = models.load_vae(cfg.model, "cpu", torch.float32, seed=cfg.seed).cfg
    res = import_latent_caches(index, rows, root, cfg_fp, vae_cfg, LATENT_DTYPES[cfg.cache.latent_dtype],
                               cfg.cache.content_hash, dist.rank(), dist.world_size(), cfg.cache.shard_size_mb,
                               cfg.cache.compress)
    log.info("rank %d: %d .npz latent caches imported in place of images (%d rejected)", dist.rank(),
             res["imported"], len(res["rejected"]))
    dist.barrier()


def _import_npz(folder: str, cfg: Config, index: DatasetIndex, root: str, cfg_fp: str, world: int) -> None:
    """cache.py --import-npz: kohya / euge-trainer latents under `folder` into the store (data/npz_import.py)."""
    from data.npz_import import import_npz

    if world > 1:
        raise SystemExit("cache.py: run --import-npz as a single process (then torchrun cache.py encodes the rest)")
    if not os.path.isdir(folder):
        raise SystemExit(f"cache.py: --import-npz {folder!r} is not a directory")
    if cfg.cache.cache_text_encoder_outputs:
        raise SystemExit("cache.py: --import-npz brings latents only; run it with "
                         "cache.cache_text_encoder_outputs=false (kohya / euge text caches are not imported)")
    vae_cfg = models.load_vae(cfg.model, "cpu", torch.float32, seed=cfg.seed).cfg
    writer = BackgroundWriter(ShardWriter(root, cfg_fp, 0, cfg.cache.shard_size_mb, cfg.cache.compress,
                                          origin=f"import-npz:{os.path.abspath(folder)}"))
    res = import_npz(index, folder, writer, vae_cfg, LATENT_DTYPES[cfg.cache.latent_dtype], cfg.cache.content_hash)
    writer.close()
    LatentStore(root, check_validity=False).write_index()
    print(f"import-npz: {res['imported']} imported from {folder} ({res['no_flip']} without the flipped latent "
          f"flip_aug wants), {res['unmatched']} npz files match no dataset entry, {len(res['rejected'])} rejected")
    for p, why in list(res["rejected"].items())[:10]:
        print(f"  rejected {p}: {why}")


def _variant_captions(index: DatasetIndex, rows: list[int], variants: int, caption_hook: Any = None,
                      description_hook: Any = None) -> list[list[str]]:
    """Each row's caption text per variant k: the loader's `full_caption` with rng from (key, k) and flipped=False.
    Variants k > 0 exist only when the caption can differ between draws (augmented, or a user hook is set)."""
    out: list[list[str]] = []
    for row in rows:
        key = index.keys[row]
        opts = CaptionOptions(**index.subsets[int(index.subset[row])].caption)
        md = index.meta(row) if caption_hook or description_hook else {}  # only the hooks read it
        n = variants if opts.augmented or caption_hook or description_hook or index.descriptions[row] else 1
        caps = []
        for k in range(n):
            try:
                caps.append(full_caption(index.captions[row], opts, random.Random(_key_seed(key, k)), key=key,
                                         metadata=md, counter=index.counter, flipped=False, caption_hook=caption_hook,
                                         description_hook=description_hook, description=index.descriptions[row],
                                         info=lambda: index.image_info(row)))
            except Exception as e:
                raise SystemExit(f"cache.py: building caption variant {k} of {key!r} failed (check "
                                 f"data.caption_processor / description_processor): {type(e).__name__}: {e}") from e
        out.append(caps)
    return out


def _encode_texts(te: Any, caps: list[list[str]]) -> list[dict[str, torch.Tensor]]:
    """Text-encoder outputs per item, `te<k>.<name>` for each of the item's caption variants k (caps[item][k])."""
    out: list[dict[str, torch.Tensor]] = [{} for _ in caps]
    for k in range(max(map(len, caps), default=0)):
        todo = [j for j, c in enumerate(caps) if k < len(c)]
        enc = te.encode([caps[j][k] for j in todo])
        for j, d in zip(todo, enc):
            out[j].update({f"te{k}.{name}": t.detach().cpu().clone() for name, t in d.items()})
    return out


if __name__ == "__main__":
    cli.run_entry(main, dist.shutdown)  # flushed, then no interpreter teardown
