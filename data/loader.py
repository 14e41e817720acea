"""The training data loader: bucketed batches that depend on (seed, epoch) only, never on the world size.

Each epoch: every row x its repeats goes into exactly one batch; a batch holds one bucket; a bucket's last
partial batch is kept as a smaller batch. The global batch list is shuffled with (seed, epoch); rank r takes
global batches r, r+W, r+2W, ... When the count is not a multiple of W, the final round is completed by reusing
batches from the start of the list, so every rank runs the same number of steps (those few samples are seen
twice that epoch). `skip` counts global batches already consumed, so resume is exact even with another W.

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
from .captions import CaptionOptions, full_caption
from .images import BadImage
from .index import DatasetIndex
from .hooks import load_text_hook

log = logging.getLogger(__name__)

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: decorrelates the (seed, epoch, position) streams


def _seed(*parts: int) -> int:
    h = 0
    for p in parts:
        h = (h * _MIX + int(p) + 1) % (1 << 63)
    return h


def usable_rows(index: DatasetIndex, store=None) -> np.ndarray:
    """Rows with repeats > 0 that can be read (present in the store when one is given)."""
    rows = np.nonzero(index.repeats > 0)[0]
    if store is not None:
        keys = index.keys.tolist()
        have = np.asarray(store.contains_many([keys[i] for i in rows.tolist()]), dtype=bool)
        missing = len(rows) - int(have.sum())
        if missing:
            log.warning("%d of %d training images are not in the latent store; they are left out (run cache.py)",
                        missing, len(rows))
        rows = rows[have]
    return rows


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

    def take(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The batches `ids`, compact: (pairs [n, 2], offsets [len(ids) + 1]); batch j = pairs[offsets[j]:offsets[j+1]]."""
        n = self.ends[ids] - self.starts[ids]
        offsets = np.concatenate([[0], np.cumsum(n)]).astype(np.int64)
        idx = np.repeat(self.starts[ids] - offsets[:-1], n) + np.arange(int(offsets[-1]), dtype=np.int64)
        return self.pairs[idx], offsets


def epoch_plan(index: DatasetIndex, batch_size: int, seed: int, epoch: int,
               rows: np.ndarray | None = None) -> EpochPlan:
    """The epoch's global batch list (see the module docstring), as flat arrays."""
    if batch_size < 1:
        raise ValueError(f"batch_size = {batch_size} must be >= 1")
    rows = np.nonzero(index.repeats > 0)[0] if rows is None else rows
    expanded = np.repeat(rows, index.repeats[rows])                      # every sample x repeats exactly once
    rng = np.random.default_rng(_seed(seed, epoch))
    expanded = expanded[rng.permutation(len(expanded))]                  # position i = the sample's identity
    b = index.buckets
    bucket_id = (b[:, 0].astype(np.int64) * 100_003 + b[:, 1])[expanded]
    order = np.argsort(bucket_id, kind="stable")                         # group by bucket, shuffled within
    pairs = np.empty((len(order), 2), np.int32)                          # rows and positions < 2**31
    pairs[:, 0] = expanded[order]
    pairs[:, 1] = order
    del expanded
    cut = np.flatnonzero(np.diff(bucket_id[order])) + 1
    del bucket_id, order
    g0 = np.concatenate([[0], cut]).astype(np.int64)[: len(pairs)]       # bucket groups [g0, g1)
    g1 = np.concatenate([cut, [len(pairs)]]).astype(np.int64)[: len(pairs)]
    per = (g1 - g0 + batch_size - 1) // batch_size
    first = np.repeat(np.cumsum(per) - per, per)
    starts = np.repeat(g0, per) + (np.arange(int(per.sum())) - first) * batch_size
    del first
    ends = np.minimum(starts + batch_size, np.repeat(g1, per))
    perm = rng.permutation(len(starts))
    return EpochPlan(pairs, starts[perm], ends[perm])


def global_batches(index: DatasetIndex, batch_size: int, seed: int, epoch: int,
                   rows: np.ndarray | None = None) -> list[np.ndarray]:
    """The epoch's global batch list; each batch is an array of (row, position) pairs [b, 2]."""
    plan = epoch_plan(index, batch_size, seed, epoch, rows)
    return [plan.batch(i) for i in range(len(plan))]


def batches_per_epoch(index: DatasetIndex, data_cfg, world_size: int, store=None,
                      rows: np.ndarray | None = None) -> int:
    """Steps each rank runs per epoch (ceil of global batches / world size); `rows` = usable_rows(), if known."""
    rows = usable_rows(index, store) if rows is None else rows
    n = len(epoch_plan(index, int(data_cfg.batch_size), 0, 0, rows))
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


class _Items(Dataset):
    """Map-style dataset over (row, position) pairs: latents from the store or images decoded and bucketed."""

    def __init__(self, index: DatasetIndex, data_cfg, store, seed: int, epoch: int):
        self.index, self.store, self.seed, self.epoch = index, store, seed, epoch
        self.max_pixels = data_cfg.max_image_pixels
        self.opts = [CaptionOptions(**s.caption) for s in index.subsets]
        self.caption_hook = load_text_hook(data_cfg.caption_processor, "caption_processor")
        self.description_hook = load_text_hook(data_cfg.description_processor, "description_processor")
        self.jpeg_draft = bool(data_cfg.jpeg_draft)

    def __len__(self) -> int:
        return len(self.index)

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
            info = self.store.record_info(key)
            names = info["t"]  # the record's tensors; only the chosen ones are read (or decompressed)
            flip = flip and ("flip.latent" in names or "flip.mean" in names)
            pre = "flip." if flip else ""
            want = [pre + "latent"] if pre + "latent" in names else [pre + "mean", pre + "std"]
            variants = sorted({n.split(".", 1)[0] for n in names if n.startswith("te")})
            v = variants[rng.randrange(len(variants))] if variants else None
            want += [n for n in names if v is not None and n.startswith(v + ".")]
            rec = self.store.get(key, want)
            if pre + "latent" in rec:
                lat = rec[pre + "latent"].float()
            else:
                mean, std = rec[pre + "mean"].float(), rec[pre + "std"].float()
                g = torch.Generator().manual_seed(_seed(self.seed, epoch, pos, 1) % (1 << 62))
                lat = mean + std * torch.randn(mean.shape, generator=g)
            out["latents"] = lat
            out["original_size"] = rec["original_size"]
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
            if flip:
                x = torch.flip(x, dims=[2])
                crop = flipped_crop((orig[1], orig[0]), (bw, bh), crop)
            out.update(images=x, original_size=orig, crop_top_left=crop)
        if caption is None:
            md = ix.meta(row) if self.caption_hook or self.description_hook else {}  # only the hooks read it
            caption = full_caption(ix.captions[row], self.opts[int(ix.subset[row])], rng, key=key, metadata=md,
                                   counter=ix.counter, flipped=flip, caption_hook=self.caption_hook,
                                   description_hook=self.description_hook, description=ix.descriptions[row],
                                   info=lambda: ix.image_info(row))
        out["caption"] = caption
        out["target_size"] = (bh, bw)
        return out


def collate(items: list[dict[str, Any] | None]) -> dict[str, Any]:
    """Stack a one-bucket batch; an unreadable item is replaced by another of the batch so step counts stay equal."""
    good = [it for it in items if it is not None]
    if not good:
        raise RuntimeError("every image of a batch failed to load; see the log for the reasons")
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
    for name in items[0]:
        if name.startswith("te."):
            batch[name] = [it[name] for it in items]  # per-sample, padding trimmed: lengths may differ
    return batch


class EpochBatches:
    """Batch sampler of one rank: the epoch's batches from `skip`; `set_epoch` moves it to another epoch, so one
    DataLoader (and its persistent workers) serves the whole run. Items carry their epoch: (row, position, epoch)."""

    def __init__(self, index: DatasetIndex, batch_size: int, rows: np.ndarray, *, seed: int, epoch: int, rank: int,
                 world_size: int, skip: int = 0):
        self.index, self.batch_size, self.rows = index, batch_size, rows
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.set_epoch(epoch, skip)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch = epoch
        plan = epoch_plan(self.index, self.batch_size, self.seed, epoch, self.rows)
        # Only this rank's batches are kept, as two flat arrays (not a list of tuples: ~1/10 of the memory).
        self.pairs, self.offsets = plan.take(rank_batch_ids(len(plan), self.rank, self.world_size, skip))

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        pairs, off, epoch = self.pairs, self.offsets.tolist(), self.epoch
        for j in range(len(off) - 1):
            yield [(r, p, epoch) for r, p in pairs[off[j] : off[j + 1]].tolist()]

    def __len__(self) -> int:
        return len(self.offsets) - 1


def make_loader(index: DatasetIndex, data_cfg, store, *, seed: int, epoch: int, rank: int, world_size: int,
                skip: int = 0, num_workers: int = 0, pin_memory: bool = False,
                persistent_workers: bool = False, rows: np.ndarray | None = None) -> DataLoader:
    """Batches for one rank (dicts, see `collate`) starting at `epoch`, `skip` = global batches already consumed;
    `rows` = usable_rows(index, store) when the caller already has them (one store lookup pass per run).
    For the next epoch call `loader.batch_sampler.set_epoch(epoch)` and iterate again (workers are kept alive when
    `persistent_workers` and num_workers > 0)."""
    rows = usable_rows(index, store) if rows is None else rows
    sampler = EpochBatches(index, int(data_cfg.batch_size), rows, seed=seed, epoch=epoch, rank=rank,
                           world_size=world_size, skip=skip)
    return DataLoader(_Items(index, data_cfg, store, seed, epoch), batch_sampler=sampler, collate_fn=collate,
                      num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=persistent_workers and num_workers > 0,
                      prefetch_factor=4 if num_workers > 0 else None)
