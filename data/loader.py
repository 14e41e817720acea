"""The training data loader: bucketed batches that depend on (seed, epoch) only, never on the world size.

Each epoch: every row x its repeats goes into exactly one batch; a batch holds one bucket and one batch size (a
subset may have its own, kohya's [[datasets]] batch_size; and its own resolution, data/index.py); a group's last
partial batch is kept as a smaller batch. The global batch list is shuffled with (seed, epoch); rank r takes
global batches r, r+W, r+2W, ... When the count is not a multiple of W, the final round is completed by reusing
batches from the start of the list, so every rank runs the same number of steps (those few samples are seen
twice that epoch). `skip` counts global batches already consumed, so resume is exact even with another W.

An unreadable sample (bad image, damaged store record) is replaced by a batchmate; a batch with none readable by
other records of its bucket, drawn from (seed, epoch, position), so a resumed run picks the same ones.

With cached text-encoder outputs a sample's `caption` is the text of the cached variant it uses (stored in the
record by cache.py), so the caption and the conditioning always agree; records written before captions were
stored fall back to a fresh draw, which then need not match the cached variant. The caption hooks then ran in
cache.py (same `full_caption` call, flipped=False for every variant, also when the flipped latent is picked) and
are not run again here.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .buckets import flipped_crop, load_resized
from .captions import full_caption
from .images import BadImage
from .masks import pixel_mask
from diffusion.masks import from_stored, latent_mask
from .index import DatasetIndex
from .latent_files import LATENT_EXT
from .store import StoreError
from .hooks import load_text_hook

log = logging.getLogger(__name__)

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: decorrelates the (seed, epoch, position) streams


def _seed(*parts: int) -> int:
    h = 0
    for p in parts:
        h = (h * _MIX + int(p) + 1) % (1 << 63)
    return h


def usable_rows(index: DatasetIndex, store=None, chunk: int = 1 << 20) -> np.ndarray:
    """Rows with repeats > 0 that can be read (present in the store when one is given; without one, images only:
    `.npz` latent caches train from the store cache.py imports them into), int32 (4 bytes a row; rows are < 2**31).
    The store is asked a chunk of keys at a time (never a list of every key)."""
    rows = np.flatnonzero(np.asarray(index.repeats) > 0).astype(np.int32)
    if store is None:
        latent = np.asarray(index.paths.endswith_ascii(LATENT_EXT))[rows]
        if latent.any():
            log.warning("%d of %d training entries are .npz latent caches (in place of images); they train from the "
                        "latent store: set cache.cache_dir and run cache.py first, which imports them. Left out.",
                        int(latent.sum()), len(rows))
            rows = rows[~latent]
    if store is not None:
        have = np.ones(len(rows), dtype=bool)
        for a in range(0, len(rows), chunk):
            part = rows[a : a + chunk]
            have[a : a + chunk] = np.asarray(store.contains_many(index.keys.tolist_at(part)), dtype=bool)
        missing = len(rows) - int(have.sum())
        if missing:
            log.warning("%d of %d training images are not in the latent store; they are left out (run cache.py)",
                        missing, len(rows))
        rows = rows[have]
    return rows


def subset_batch_sizes(index: DatasetIndex, data_cfg) -> np.ndarray:
    """Batch size of each of the index's subsets: its [[data.subsets]] entry's batch_size, else [data]'s."""
    own = [getattr(data_cfg.subsets[s.source], "batch_size", None) if s.source < len(data_cfg.subsets) else None
           for s in index.subsets]
    return np.asarray([int(b or data_cfg.batch_size) for b in own], np.int64)


def _per_subset(index: DatasetIndex, batch_size: "int | np.ndarray") -> np.ndarray:
    """Batch sizes per subset (an int: the same for all), each checked >= 1."""
    bs = np.full(len(index.subsets), int(batch_size), np.int64) if np.ndim(batch_size) == 0 else \
        np.asarray(batch_size, np.int64)
    if len(bs) != len(index.subsets) or (bs < 1).any():
        raise ValueError(f"batch_size = {batch_size} must be >= 1 (one per subset)")
    return bs


def _bucket_ids(index: DatasetIndex, rows: np.ndarray, bs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(one int64 id per row's batch group: its bucket (w * 100003 + h) and batch size, equal ids = rows that may
    share a batch; the batch size of each row). With one batch size the ids order like the buckets."""
    b = np.asarray(index.buckets)
    size = bs[np.asarray(index.subset)[rows]]
    return ((b[rows, 0].astype(np.int64) * 100_003 + b[rows, 1]) << 31) | size, size


def _permutation(rng: np.random.Generator, n: int) -> np.ndarray:
    """rng.permutation(n) as int32 (the same draws and result: permutation shuffles an arange), half the bytes."""
    if n >= 1 << 31:
        return rng.permutation(n)
    a = np.arange(n, dtype=np.int32)
    rng.shuffle(a)
    return a


def release_freed_memory() -> None:
    """Hand the heap pages freed by an epoch's transient arrays back to the OS (glibc malloc_trim; elsewhere a no-op).
    Without it a rank keeps ~20 MB per million samples of freed heap resident after each set_epoch (measured,
    bench/scale_bench.py ranks)."""
    global _TRIM
    if _TRIM is None:
        try:
            import ctypes

            _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM = None


class _Epoch:
    """What an epoch's batch list is made of, without the list (see the module docstring): the shuffled samples
    (row of each position), the bucket group of each position, the batch count of each group and the shuffled batch
    order. Batch k of the unshuffled list is the j-th run of batch_size positions (ascending) of its group; global
    batch i is unshuffled batch `perm[i]`. Peak memory ~10 bytes per sample (int32 / int16 arrays)."""

    def __init__(self, index: DatasetIndex, batch_size: "int | np.ndarray", seed: int, epoch: int, rows: np.ndarray):
        bs = _per_subset(index, batch_size)
        rows = np.asarray(rows)
        reps = np.asarray(index.repeats)[rows]
        rng = np.random.default_rng(_seed(seed, epoch))
        expanded = np.repeat(rows.astype(np.int32, copy=False), reps)        # every sample x repeats exactly once
        self.samples = expanded[_permutation(rng, len(expanded))]         # position i = the sample's identity
        del expanded
        ids, size = _bucket_ids(index, rows, bs)                            # the batch group of each usable row
        uniq = np.unique(ids)                                              # groups in bucket-id order
        gdt = np.int16 if len(uniq) < 1 << 15 else np.int32
        group_of_row = np.zeros(len(index.repeats), gdt)
        group_of_row[rows] = np.searchsorted(uniq, ids).astype(gdt)
        self.group = group_of_row[self.samples]                            # group of each position
        del group_of_row
        self.count = np.bincount(self.group, minlength=len(uniq)).astype(np.int64)
        self.batch = np.zeros(len(uniq), np.int64)                         # the batch size of each group
        self.batch[np.searchsorted(uniq, ids)] = size
        del size
        self.per = (self.count + self.batch - 1) // self.batch             # batches of each group
        self.first = np.concatenate([[0], np.cumsum(self.per)]).astype(np.int64)  # first batch of each group
        self.perm = _permutation(rng, int(self.first[-1]))

    def __len__(self) -> int:
        return len(self.perm)

    def take(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global batches `ids` (in that order): (pairs [n, 2] int32 (row, position), offsets [len(ids) + 1] int32);
        batch j = pairs[offsets[j]:offsets[j+1]]. Only these batches' pairs are made: each group's positions are
        found once (ascending), and the wanted runs of them gathered."""
        idt = np.int32 if len(self.samples) < 1 << 31 else np.int64          # 4 bytes a batch where it fits
        k = self.perm[ids]                                                  # unshuffled batch of each
        g = (np.searchsorted(self.first, k, side="right") - 1).astype(idt)
        start = ((k - self.first[g]) * self.batch[g]).astype(idt)
        n = (np.minimum(start + self.batch[g], self.count[g]) - start).astype(idt)
        del k
        offsets = np.zeros(len(ids) + 1, np.int64)
        np.cumsum(n, out=offsets[1:])
        if offsets[-1] < 1 << 31:
            offsets = offsets.astype(np.int32)
        pairs = np.empty((int(offsets[-1]), 2), np.int32)
        by_group = np.argsort(g, kind="stable")
        cut = np.flatnonzero(np.diff(g[by_group])) + 1
        sort_all = len(self.count) > 64  # many groups: one sort of every position beats a scan per group
        order = np.argsort(self.group, kind="stable") if sort_all else None
        gstart = np.concatenate([[0], np.cumsum(self.count)]) if sort_all else None  # each group's first in `order`
        for sel in np.split(by_group, cut) if len(by_group) else []:
            gi = int(g[sel[0]])
            pos = (order[int(gstart[gi]) : int(gstart[gi + 1])] if sort_all
                   else np.flatnonzero(self.group == gi))                 # the group's positions, ascending
            lens = n[sel]
            total = int(lens.sum())
            src = np.repeat(start[sel] - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens) + np.arange(total)
            dst = np.repeat(offsets[sel] - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens) + np.arange(total)
            p = pos[src]
            pairs[dst, 0] = self.samples[p]
            pairs[dst, 1] = p
        return pairs, offsets


@dataclass
class EpochPlan:
    """An epoch's global batch list, flat: batch i is `pairs[starts[i]:ends[i]]`, (row, position) pairs [b, 2]
    (int32), instead of a list of small arrays: 1M samples cost ~8 MB + 16 bytes per batch."""

    pairs: np.ndarray   # [N, 2] (row, position), grouped by batch
    starts: np.ndarray  # [n_batches] in the shuffled batch order
    ends: np.ndarray

    def __len__(self) -> int:
        return len(self.starts)

    def batch(self, i: int) -> np.ndarray:
        return self.pairs[self.starts[i] : self.ends[i]]


def epoch_plan(index: DatasetIndex, batch_size: "int | np.ndarray", seed: int, epoch: int,
               rows: np.ndarray | None = None) -> EpochPlan:
    """The epoch's whole global batch list (see the module docstring), as flat arrays; a rank needs only its share
    (EpochBatches: `_Epoch.take`)."""
    rows = np.flatnonzero(np.asarray(index.repeats) > 0) if rows is None else rows
    ep = _Epoch(index, batch_size, seed, epoch, rows)
    pairs, offsets = ep.take(np.arange(len(ep)))
    return EpochPlan(pairs, offsets[:-1], offsets[1:])


def global_batches(index: DatasetIndex, batch_size: "int | np.ndarray", seed: int, epoch: int,
                   rows: np.ndarray | None = None) -> list[np.ndarray]:
    """The epoch's global batch list; each batch is an array of (row, position) pairs [b, 2]."""
    plan = epoch_plan(index, batch_size, seed, epoch, rows)
    return [plan.batch(i) for i in range(len(plan))]


def global_batch_count(index: DatasetIndex, batch_size: "int | np.ndarray", rows: np.ndarray) -> int:
    """Batches in every epoch's global list: per batch group ceil(samples / its batch size) (no shuffle needed)."""
    rows = np.asarray(rows)
    ids, size = _bucket_ids(index, rows, _per_subset(index, batch_size))
    uniq, inv = np.unique(ids, return_inverse=True)
    count = np.bincount(inv.ravel(), weights=np.asarray(index.repeats)[rows], minlength=len(uniq)).astype(np.int64)
    group_size = np.zeros(len(uniq), np.int64)
    group_size[inv.ravel()] = size
    return int(((count + group_size - 1) // group_size).sum())


def batches_per_epoch(index: DatasetIndex, data_cfg, world_size: int, store=None,
                      rows: np.ndarray | None = None) -> int:
    """Steps each rank runs per epoch (ceil of global batches / world size); `rows` = usable_rows(), if known."""
    rows = usable_rows(index, store) if rows is None else rows
    n = global_batch_count(index, subset_batch_sizes(index, data_cfg), rows)
    return math.ceil(n / max(1, world_size))


def rank_batch_ids(n: int, rank: int, world_size: int, skip: int = 0) -> np.ndarray:
    """Positions in the global batch list of rank's batches: rank, rank+W, ... from `skip`; the last round wraps to
    the start of the list. Every rank gets the same count, also when `skip` is not a multiple of W (a resume under
    another world size)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, {world_size})")
    if n == 0:
        return np.zeros(0, np.int64)
    total = skip + math.ceil(max(0, n - skip) / world_size) * world_size
    return np.arange(skip + rank, total, world_size, dtype=np.int64) % n


def rank_batches(batches: list[np.ndarray], rank: int, world_size: int, skip: int = 0) -> list[np.ndarray]:
    """The batches of `rank_batch_ids` from a batch list."""
    return [batches[i] for i in rank_batch_ids(len(batches), rank, world_size, skip).tolist()]


class NoReadableData(RuntimeError):
    """No record of a batch, nor any other of its bucket, could be read: the run cannot fill that batch."""

    @property
    def line(self) -> str:
        """The message as one line, also when a loader worker raised it (the DataLoader then re-raises it in the
        main process with the worker's traceback in the message, the original line last)."""
        text = str(self.args[0]) if self.args else ""
        last = text.rstrip().splitlines()[-1] if text.strip() else ""
        return last.partition(f"{type(self).__name__}: ")[2] or last


# Records of the bucket tried per item of a batch that could not be read, once at least one stand-in was found.
STAND_IN_TRIES = 4


class _Items(Dataset):
    """Map-style dataset over (row, position) pairs: latents from the store or images decoded and bucketed; the
    store's text-encoder outputs only with `cached_text` (the run trains from cached text: no text encoder trains).
    `rows`: the usable rows, where stand-ins for a batch of unreadable records are found (`__getitems__`).
    `text_dropout`: per-encoder caption dropout rates (SD3: CLIP-L, CLIP-G, T5); each item then carries its flags,
    drawn from (seed, epoch, position) like its caption dropout, so a resumed run draws the same."""

    def __init__(self, index: DatasetIndex, data_cfg, store, seed: int, epoch: int, cached_text: bool = False,
                 with_masks: bool = False, rows: np.ndarray | None = None, text_dropout: tuple[float, ...] = ()):
        self.index, self.store, self.seed, self.epoch, self.cached_text = index, store, seed, epoch, cached_text
        self.text_dropout = tuple(text_dropout)
        self.rows = np.flatnonzero(np.asarray(index.repeats) > 0) if rows is None else np.asarray(rows)
        self._mates: dict[tuple[int, int], np.ndarray] = {}  # bucket -> its usable rows (filled on first need)
        self.with_masks, self.mask_dir = with_masks, getattr(data_cfg, "mask_dir", "")  # loss.masked_loss
        self.max_pixels = data_cfg.max_image_pixels
        self.opts = [s.caption_options for s in index.subsets]
        self.caption_hook = load_text_hook(data_cfg.caption_processor, "caption_processor")
        self.description_hook = load_text_hook(data_cfg.description_processor, "description_processor")
        self.jpeg_draft = bool(data_cfg.jpeg_draft)

    def __len__(self) -> int:
        return len(self.index)

    def __getitems__(self, items: list[tuple[int, ...]]) -> list[dict[str, Any] | None]:
        """A batch's items (the DataLoader's batched fetch). An unreadable one is None (collate puts a batchmate in
        its place); when none can be read, other records of the bucket stand in (`_stand_ins`)."""
        out = [self[it] for it in items]
        return out if any(o is not None for o in out) else self._stand_ins(items)

    def _stand_ins(self, items: list[tuple[int, ...]]) -> list[dict[str, Any]]:
        """Readable records of the batch's bucket in place of its unreadable ones: the bucket's other usable rows
        in an order drawn from (seed, epoch, the batch's first position), each read with the position of the slot
        it fills (flip, caption, latent draw). The same batch always gets the same stand-ins (given the same
        damage), so a resumed run matches a straight one. Raises NoReadableData when the bucket has none left."""
        row = int(items[0][0])
        epoch = int(items[0][2]) if len(items[0]) > 2 else self.epoch
        bucket = tuple(int(v) for v in self.index.buckets[row])
        if bucket not in self._mates:
            b = np.asarray(self.index.buckets)[self.rows]
            self._mates[bucket] = self.rows[(b[:, 0] == bucket[0]) & (b[:, 1] == bucket[1])]
        mates = self._mates[bucket]
        mates = mates[~np.isin(mates, [int(it[0]) for it in items])]
        order = np.random.default_rng(_seed(self.seed, epoch, int(items[0][1]), 2)).permutation(len(mates))
        got: list[dict[str, Any]] = []
        for tried, j in enumerate(order.tolist()):
            if len(got) == len(items) or (got and tried >= STAND_IN_TRIES * len(items)):
                break
            it = self[(int(mates[j]), int(items[len(got)][1]), epoch)]
            if it is not None:
                got.append(it)
        keys = ", ".join(str(self.index.keys[int(it[0])]) for it in items[:3]) + (" ..." if len(items) > 3 else "")
        if not got:
            raise NoReadableData(
                f"no record of bucket {bucket[0]}x{bucket[1]} can be read: the batch's {len(items)} ({keys}) and "
                f"its {len(mates)} other(s) failed to load (the warnings above say why; cache.py re-encodes "
                f"damaged records)")
        log.warning("no record of a batch could be read (%s): trained on %s of the same bucket in its place", keys,
                    ", ".join(str(it["key"]) for it in got))
        return got

    def __getitem__(self, item: tuple[int, ...]) -> dict[str, Any] | None:
        row, pos = int(item[0]), int(item[1])
        epoch = int(item[2]) if len(item) > 2 else self.epoch  # the sampler says which epoch (persistent workers)
        rng = random.Random(_seed(self.seed, epoch, pos))
        ix = self.index
        sub = ix.subsets[int(ix.subset[row])]
        key = ix.keys[row]
        flip = sub.flip_aug and rng.random() < 0.5
        out: dict[str, Any] = {"key": key, "loss_weight": sub.loss_weight}
        bw, bh = (int(v) for v in ix.buckets[row])
        caption = None
        if self.store is not None:
            try:
                info = self.store.record_info(key)
            except StoreError as e:  # a damaged shard header: written down for cache.py to re-encode
                log.warning("skipped %s at load time: %s", key, e)
                return None
            names = info["t"]  # the record's tensors; only the chosen ones are read (or decompressed)
            flip = flip and ("flip.latent" in names or "flip.mean" in names)
            pre = "flip." if flip else ""
            want = [pre + "latent"] if pre + "latent" in names else [pre + "mean", pre + "std"]
            variants = sorted({n.split(".", 1)[0] for n in names if n.startswith("te")}) if self.cached_text else []
            v = variants[rng.randrange(len(variants))] if variants else None
            want += [n for n in names if v is not None and n.startswith(v + ".")]
            want += ["mask"] if self.with_masks and "mask" in names else []
            try:
                rec = self.store.get(key, want)
            except StoreError as e:  # damaged bytes (checksum; written down for cache.py) or a shard removed since
                log.warning("skipped %s at load time: %s", key, e)
                return None
            if pre + "latent" in rec:
                lat = rec[pre + "latent"].float()
            else:
                mean, std = rec[pre + "mean"].float(), rec[pre + "std"].float()
                g = torch.Generator().manual_seed(_seed(self.seed, epoch, pos, 1) % (1 << 62))
                lat = mean + std * torch.randn(mean.shape, generator=g)
            out["latents"] = lat
            if "mask" in rec:  # one mask per record: the flipped latent's is its mirror
                out["mask"] = from_stored(rec["mask"], flip=bool(pre))
            out["original_size"] = ix.original_size(row) or rec["original_size"]
            out["crop_top_left"] = (rec["crop_top_left_flip"] if flip and rec["crop_top_left_flip"] else
                                    rec["crop_top_left"])
            if v is not None:
                out.update({"te." + n.split(".", 1)[1]: rec[n] for n in want if n.startswith(v + ".")})
                if info.get("cap") is not None:  # the text this variant was encoded from
                    caption = info["cap"][int(v[2:])]
        else:
            try:
                im, orig, crop = load_resized(ix.paths[row], (bw, bh), sub.random_crop, rng, draft=self.jpeg_draft,
                                              max_pixels=self.max_pixels)
            except BadImage as e:
                log.warning("skipped %s at load time: %s", ix.paths[row], e)
                return None
            x = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 127.5 - 1.0
            try:
                pm = pixel_mask(ix.paths[row], (bw, bh), crop, self.mask_dir, self.max_pixels) if self.with_masks \
                    else None
            except BadImage as e:
                log.warning("skipped %s at load time: %s", ix.paths[row], e)
                return None
            if pm is not None:
                out["mask"] = from_stored(torch.from_numpy(latent_mask(pm)), flip=flip)
            if flip:
                x = torch.flip(x, dims=[2])
                crop = flipped_crop((orig[1], orig[0]), (bw, bh), crop)
            out.update(images=x, original_size=ix.original_size(row) or orig, crop_top_left=crop)
        if caption is None:
            md = ix.meta(row) if self.caption_hook or self.description_hook else {}  # only the hooks read it
            caption = full_caption(ix.captions[row], self.opts[int(ix.subset[row])], rng, key=key, metadata=md,
                                   counter=ix.counter, flipped=flip, caption_hook=self.caption_hook,
                                   description_hook=self.description_hook, description=ix.descriptions[row],
                                   info=lambda: ix.image_info(row))
        out["caption"] = caption
        out["target_size"] = (bh, bw)
        if self.text_dropout:  # its own stream: one draw per encoder, whatever the rates (kohya: random() < rate)
            drops = random.Random(_seed(self.seed, epoch, pos, 3))
            out["text_drop"] = [drops.random() < rate for rate in self.text_dropout]
        return out


def collate(items: list[dict[str, Any] | None]) -> dict[str, Any]:
    """Stack a one-bucket batch; an unreadable item is replaced by another of the batch so step counts stay equal."""
    good = [it for it in items if it is not None]
    if not good:  # _Items.__getitems__ finds stand-ins first
        raise NoReadableData("every image of a batch failed to load; see the log for the reasons")
    items = [it if it is not None else good[i % len(good)] for i, it in enumerate(items)]
    x = "latents" if "latents" in items[0] else "images"
    batch: dict[str, Any] = {
        x: torch.stack([it[x] for it in items]),
        "captions": [it["caption"] for it in items],
        "original_size": torch.tensor([it["original_size"] for it in items], dtype=torch.long),
        "crop_top_left": torch.tensor([it["crop_top_left"] for it in items], dtype=torch.long),
        "target_size": torch.tensor([it["target_size"] for it in items], dtype=torch.long),
        "loss_weight": torch.tensor([it["loss_weight"] for it in items], dtype=torch.float32),
        "keys": [it["key"] for it in items],
    }
    if any("mask" in it for it in items):  # images without a mask train everywhere (weight 1)
        lat = batch[x].shape[-2:] if x == "latents" else tuple(s // 8 for s in batch[x].shape[-2:])
        batch["mask"] = torch.stack([it.get("mask", torch.ones(lat)) for it in items])[:, None]  # [B, 1, h, w]
    if "text_drop" in items[0]:  # [B, encoders] bool: the model zeroes those encoders' outputs (models/sd3.py)
        batch["text_drop"] = torch.tensor([it["text_drop"] for it in items], dtype=torch.bool)
    for name in items[0]:
        if name.startswith("te."):
            batch[name] = [it[name] for it in items]  # per-sample, padding trimmed: lengths may differ
    return batch


class EpochBatches:
    """Batch sampler of one rank: the epoch's batches from `skip`; `set_epoch` moves it to another epoch, so one
    DataLoader (and its persistent workers) serves the whole run. Items carry their epoch: (row, position, epoch)."""

    def __init__(self, index: DatasetIndex, batch_size: "int | np.ndarray", rows: np.ndarray, *, seed: int, epoch: int, rank: int,
                 world_size: int, skip: int = 0):
        self.index, self.batch_size, self.rows = index, batch_size, rows
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.set_epoch(epoch, skip)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch = epoch
        ep = _Epoch(self.index, self.batch_size, self.seed, epoch, self.rows)
        # Only this rank's batches are made and kept, as two flat arrays (never the whole epoch's list).
        self.pairs, self.offsets = ep.take(rank_batch_ids(len(ep), self.rank, self.world_size, skip))
        del ep
        release_freed_memory()

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        pairs, off, epoch = self.pairs, self.offsets.tolist(), self.epoch
        for j in range(len(off) - 1):
            yield [(r, p, epoch) for r, p in pairs[off[j] : off[j + 1]].tolist()]

    def __len__(self) -> int:
        return len(self.offsets) - 1


def make_loader(index: DatasetIndex, data_cfg, store, *, seed: int, epoch: int, rank: int, world_size: int,
                skip: int = 0, num_workers: int = 0, pin_memory: bool = False,
                persistent_workers: bool = False, rows: np.ndarray | None = None,
                cached_text: bool = False, with_masks: bool = False,
                text_dropout: tuple[float, ...] = ()) -> DataLoader:
    """Batches for one rank (dicts, see `collate`) starting at `epoch`, `skip` = global batches already consumed;
    `rows` = usable_rows(index, store) when the caller already has them (one store lookup pass per run).
    `cached_text`: batches carry the store's text-encoder outputs (`te.*`) and the captions they were encoded from;
    what is trained decides it (cache.cache_text_encoder_outputs, which no text-encoder training may combine with):
    without it the store's cached text is never read, so the text encoders run on every caption (#28.10).
    `text_dropout`: per-encoder caption dropout rates; batches then carry `text_drop` [B, encoders] (bool).
    For the next epoch call `loader.batch_sampler.set_epoch(epoch)` and iterate again (workers are kept alive when
    `persistent_workers` and num_workers > 0)."""
    rows = usable_rows(index, store) if rows is None else rows
    sampler = EpochBatches(index, subset_batch_sizes(index, data_cfg), rows, seed=seed, epoch=epoch, rank=rank,
                           world_size=world_size, skip=skip)
    items = _Items(index, data_cfg, store, seed, epoch, cached_text, with_masks, rows, text_dropout)
    return DataLoader(items, batch_sampler=sampler, collate_fn=collate,
                      num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=persistent_workers and num_workers > 0,
                      prefetch_factor=4 if num_workers > 0 else None)
