"""Held-out validation loss: one number per evaluation that moves only when the weights do.

Training loss is dominated by each step's random timestep and noise. Validation instead scores a fixed set of
images with, per image, a fixed noise and a fixed stratified set of timesteps (sigmas for flow matching): K
equal-probability bands of the training sampler's distribution (`objective.timesteps_at`), one timestep in each at
a position within its band fixed per image. Everything random comes from the image's key and validation_seed, so
the number is a function of the weights alone: the same for two runs, for 1 or 8 processes (up to the float64
sum's order) and after a resume. Nothing touches the training RNG streams (own CPU generators, and the global RNG
states restored around the pass), so a run with validation on resumes bit for bit.

- The set: `validation_split` of the training index (a seeded ranking of key hashes: the same on every rank and
  for every world size, and stable as the dataset grows), left out of training; or its own image folders /
  metadata files. With a latent store, latents (and cached text) come from it: a split's rows are training
  records; own sources are cached by cache.py into their own store beside the training one,
  <cache_dir>/validation (their keys are image stems as well, so they may equal training keys), with their index
  there, as the training index lies beside its store. Without a store the images are encoded with the VAE at each
  pass, as training encodes its images at each step.
- The pass: global batches of `validation_batch_size` images of one bucket, each repeated K times (one per
  band), dealt round-robin to the ranks; a rank without a batch of its own runs one at weight 0, so every rank runs
  as many forwards as the others (FSDP gathers in each). Per-band sums and counts are all-reduced in float64.
- The loss is the training objective's (its loss type and weightings, the mask with loss.masked_loss) with every
  image weighted 1, in eval mode (no dropout), under the training autocast. The eval-mode weights of a
  schedule-free optimizer and, with an EMA, its weights too (logged as val_ema/*).

kohya-ss sd-scripts (`train_network.py`, PR #1903) scores 4 fixed timesteps (200, 400, 600, 800) with a fixed seed
per validation; OneTrainer's `GenericTrainer.__validate` one random draw per sample with a fixed seed. Here the
timesteps follow the training sampler (so the mean estimates the training objective) and bands are logged apart.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import math
import os
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from core import dist
from training import speed

MAX_BANDS = 16


# -----------------------------------------------------------------------------
# Which images, in which order


def key_hashes(keys: list[str], seed: int) -> np.ndarray:
    """A uint64 per key from (seed, key) alone: the split and the per-image noise never depend on row order, rank or
    world size."""
    out = np.empty(len(keys), np.uint64)
    for i, k in enumerate(keys):
        out[i] = int.from_bytes(hashlib.blake2b(f"{seed}\x00{k}".encode(), digest_size=8).digest(), "little")
    return out


def split_rows(index: Any, rows: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, validation rows) of `rows`: the round(fraction * n) rows (at least 1 when fraction > 0, and
    never all of them) with the smallest key hashes. Both sorted ascending."""
    rows = np.asarray(rows)
    if fraction <= 0 or len(rows) == 0:
        return rows, rows[:0]
    k = min(len(rows) - 1, max(1, round(fraction * len(rows))))
    h = key_hashes(index.keys.tolist_at(rows), seed)
    chosen = np.zeros(len(rows), bool)
    chosen[np.argsort(h, kind="stable")[:k]] = True
    return rows[~chosen], rows[chosen]


@dataclass
class Item:
    """One validation image: its row, key, bucket and the seed of its noise and band offsets."""

    row: int
    key: str
    bucket: tuple[int, int]
    seed: int


def plan_batches(index: Any, rows: np.ndarray, seed: int, batch_size: int, max_batches: int = 0) -> list[list[Item]]:
    """The global batch list: images in key-hash order, grouped by bucket (buckets in order of their first image),
    `batch_size` at a time; the first `max_batches` when > 0 (kohya's max_validation_steps). The same list for
    every world size."""
    keys = index.keys.tolist_at(np.asarray(rows))
    h = key_hashes(keys, seed)
    by_bucket: dict[tuple[int, int], list[Item]] = {}
    for j in np.argsort(h, kind="stable"):
        r = int(rows[j])
        b = (int(index.buckets[r][0]), int(index.buckets[r][1]))
        by_bucket.setdefault(b, []).append(Item(r, keys[j], b, int(h[j] >> np.uint64(1))))
    batches = [items[i : i + batch_size] for items in by_bucket.values() for i in range(0, len(items), batch_size)]
    return batches[:max_batches] if max_batches > 0 else batches


def rank_share(n_batches: int, rank: int, world_size: int) -> tuple[list[int], int]:
    """This rank's batches (i = rank, rank + W, ...) and how many forwards every rank runs (ceil(n / W), at least
    1): a rank short of that repeats its first batch (or batch 0) at weight 0."""
    mine = list(range(rank, n_batches, world_size))
    return mine, max(1, math.ceil(n_batches / world_size))


# -----------------------------------------------------------------------------
# Fixed noise and timesteps


def band_quantiles(k: int, generator: torch.Generator) -> torch.Tensor:
    """K quantiles, one inside each of K equal-probability bands: (j + r_j) / K with r_j ~ U(0, 1) from the image's
    generator, kept inside (0, 1)."""
    r = torch.rand(k, generator=generator, dtype=torch.float64)
    eps = 1e-6
    return ((torch.arange(k, dtype=torch.float64) + r) / k).clamp(eps, 1.0 - eps)


def band_edges(objective: Any, k: int) -> list[float]:
    """The network timesteps (SDXL t, SD3 sigma x 1000) at the band edges 0, 1/K, ..., 1: the bands' names."""
    u = torch.linspace(0.0, 1.0, k + 1, dtype=torch.float64).clamp(1e-9, 1.0 - 1e-9)
    t = objective.timesteps_at(u).double()
    if t.is_floating_point() and t.max() <= 1.0 + 1e-6:  # flow: sigmas
        t = t * 1000.0
    return [float(v) for v in t]


def band_names(edges: list[float]) -> list[str]:
    """`loss_t<lo>-<hi>` per band, timesteps rounded (both families count 0..1000, noisier upward)."""
    return [f"loss_t{round(a):03d}-{round(b):03d}" for a, b in zip(edges[:-1], edges[1:])]


def fixed_noise(item: Item, shape: tuple[int, ...], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise [K, C, h, w], band quantiles [K]) of an image: a CPU generator seeded by its key, so any device and
    any rank draws the same numbers."""
    g = torch.Generator().manual_seed(item.seed)
    u = band_quantiles(k, g)
    noise = torch.randn((k, *shape), generator=g, dtype=torch.float32)
    return noise, u


# -----------------------------------------------------------------------------
# Reading a batch


class BatchReader:
    """A validation batch's inputs, as the training loader gives them (data/loader.py collate), deterministically:
    the record's plain latent (the posterior mean with store_posterior), never the flipped one, the first cached
    text variant and its caption; without a record, the image centre-cropped to its bucket and encoded with the
    VAE, and its caption without dropout or shuffling."""

    def __init__(self, index: Any, store: Any, data_cfg: Any, comp: Any, device: torch.device, with_masks: bool):
        from data.captions import options_for_subset  # noqa: F401  (data/ is imported lazily: tests without it)
        self.index, self.store, self.data_cfg, self.comp, self.device = index, store, data_cfg, comp, device
        self.with_masks = with_masks
        self.opts = [dataclasses.replace(s.caption_options, caption_dropout_rate=0.0, caption_tag_dropout_rate=0.0,
                                         shuffle_caption=False) for s in index.subsets]
        self.in_store: dict[str, bool] = {}

    def has_record(self, key: str) -> bool:
        return self.store is not None and bool(self.store.contains_many([key])[0])

    def read(self, batch: list[Item]) -> dict[str, Any]:
        """{latents [n, C, h, w] float32 on the device, text (dict or None), captions, sizes, mask or None}."""
        lat, caps, orig, crop, texts, masks = [], [], [], [], [], []
        for it in batch:
            row = it.row
            bw, bh = it.bucket
            caption = None
            if self.has_record(it.key):
                info = self.store.record_info(it.key)
                names = info["t"]
                want = ["latent"] if "latent" in names else ["mean"]
                te = sorted({n.split(".", 1)[0] for n in names if n.startswith("te")})
                v = te[0] if te else None
                want += [n for n in names if v is not None and n.startswith(v + ".")]
                if self.with_masks and "mask" in names:
                    want.append("mask")
                rec = self.store.get(it.key, want)
                lat.append(rec[want[0]].float())
                orig.append(tuple(rec["original_size"]))
                crop.append(tuple(rec["crop_top_left"]))
                if v is not None:
                    texts.append({n.split(".", 1)[1]: rec[n] for n in want if n.startswith(v + ".")})
                    if info.get("cap") is not None:
                        caption = info["cap"][int(v[2:])]
                masks.append(rec["mask"].float() if "mask" in rec else None)
            else:
                x, o, c, m = self._encode_image(row, (bw, bh))
                lat.append(x)
                orig.append(o)
                crop.append(c)
                masks.append(m)
            caps.append(self._caption(row, it.key) if caption is None else caption)
        out: dict[str, Any] = {"latents": torch.stack(lat).to(self.device, torch.float32), "captions": caps}
        n = len(batch)
        out["sizes"] = (torch.tensor(orig, dtype=torch.long), torch.tensor(crop, dtype=torch.long),
                        torch.tensor([(b.bucket[1], b.bucket[0]) for b in batch], dtype=torch.long))
        out["text"] = None
        if texts and len(texts) == n:
            with torch.autocast(self.device.type, enabled=False):
                out["text"] = {k: v.to(self.device) for k, v in self.comp.collate_cached_text(texts).items()}
        out["mask"] = None
        if self.with_masks and any(m is not None for m in masks):
            h, w = out["latents"].shape[-2:]
            out["mask"] = torch.stack([m if m is not None else torch.ones(h, w) for m in masks])[:, None]
        return out

    def _caption(self, row: int, key: str) -> str:
        from data.captions import full_caption
        ix = self.index
        rng = random.Random(key)  # a draw between tags and description (when both) fixed per image
        return full_caption(ix.captions[row], self.opts[int(ix.subset[row])], rng, key=key,
                            metadata=ix.meta(row), counter=ix.counter, flipped=False,
                            description=ix.descriptions[row], info=lambda: ix.image_info(row))

    def _encode_image(self, row: int, bucket: tuple[int, int]) -> tuple[torch.Tensor, Any, Any, Any]:
        from data.buckets import load_resized
        im, orig, crop = load_resized(self.index.paths[row], bucket, False, None,
                                      draft=bool(self.data_cfg.jpeg_draft), max_pixels=self.data_cfg.max_image_pixels)
        x = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 127.5 - 1.0
        with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
            z = self.comp.encode_images(x[None].to(self.device)).float()[0].cpu()
        mask = None
        if self.with_masks:
            from data.masks import pixel_mask
            from diffusion.masks import latent_mask
            pm = pixel_mask(self.index.paths[row], bucket, crop, self.data_cfg.mask_dir, self.data_cfg.max_image_pixels)
            mask = torch.from_numpy(latent_mask(pm)) if pm is not None else None
        return z, orig, crop, mask


# -----------------------------------------------------------------------------
# The pass


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode (dropout off) for the block, each one's own mode back after it."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, was in modes:
            m.training = was


@contextlib.contextmanager
def training_rng_untouched(device: torch.device) -> Iterator[None]:
    """The global CPU (and CUDA) RNG states restored after the block: the training stream cannot move."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


def validation_sums(model: nn.Module, objective: Any, reader: BatchReader, batches: list[list[Item]], k: int,
                    device: torch.device, autocast: Callable[[], Any]) -> torch.Tensor:
    """This rank's share of the pass: float64 [2, K] (loss sums per band, sample counts per band), before the
    all-reduce. Collective under FSDP (every rank runs the same number of forwards)."""
    mine, forwards = rank_share(len(batches), dist.rank(), dist.world_size())
    sums = torch.zeros(2, k, dtype=torch.float64, device=device)
    order = mine + [mine[0] if mine else 0] * (forwards - len(mine))  # padding forwards count 0
    for j, bi in enumerate(order):
        batch = batches[bi]
        inp = reader.read(batch)
        x0 = inp["latents"]
        n = x0.shape[0]
        noise, u = zip(*(fixed_noise(it, tuple(x0.shape[1:]), k) for it in batch))
        noise = torch.cat(noise).to(device)  # [n * K, C, h, w], image-major
        t = objective.timesteps_at(torch.cat(u))
        x0k = x0.repeat_interleave(k, dim=0)
        nb = objective.noise_at(x0k, noise, t.to(device))
        text = None if inp["text"] is None else {name: v.repeat_interleave(k, dim=0) for name, v in inp["text"].items()}
        captions = [c for c in inp["captions"] for _ in range(k)]
        sizes = tuple(s.repeat_interleave(k, dim=0).to(device) for s in inp["sizes"])
        mask = None if inp["mask"] is None else inp["mask"].repeat_interleave(k, dim=0).to(device)
        with torch.no_grad(), autocast():
            pred = model(nb.x_t, nb.t, text, captions, sizes)
        loss = objective.loss(pred.float(), nb, None, mask=mask).double().view(n, k)  # [n, K]
        if j < len(mine):
            sums[0] += loss.sum(dim=0)
            sums[1] += n
    return sums


@dataclass
class ValidationResult:
    """The reduced numbers of one pass: the mean over every (image, band) and each band's mean."""

    loss: float
    bands: dict[str, float]
    images: int

    def row(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}/loss": self.loss, **{f"{prefix}/{name}": v for name, v in self.bands.items()}}


def reduce_sums(sums: torch.Tensor, names: list[str]) -> ValidationResult:
    """All ranks' sums added (float64 all-reduce), then the means."""
    total = dist.all_reduce_sum(sums.clone()).cpu()
    loss = float(total[0].sum() / total[1].sum())
    bands = {name: float(total[0, j] / total[1, j]) for j, name in enumerate(names)}
    return ValidationResult(loss, bands, int(total[1, 0]))


# -----------------------------------------------------------------------------
# Set-up and the loop's one call


@dataclass
class HeldOut:
    """The validation set: rows of `index` (the training index for a split, its own for own sources), the latent
    store they are read from (None: encoded at each pass; then the VAE and text encoders are loaded)."""

    index: Any
    rows: np.ndarray
    store: Any
    needs_encoders: bool = False


VALIDATION_STORE = "validation"  # own sources' store and index: <cache_dir>/validation (cache.py writes it)


def validation_store_dir(cache_dir: str) -> str:
    """Where cache.py caches [validation]'s own image folders / metadata files: their own store beside the
    training one (keys are image stems in both, so a validation image may share a training image's key)."""
    return os.path.join(cache_dir, VALIDATION_STORE)


def held_out(cfg: Any, index: Any, rows: np.ndarray, store: Any, state_dir: str) -> tuple[np.ndarray, HeldOut]:
    """(the training rows, the validation set) of [validation]: a split of `rows`, or its own sources (rank 0
    builds their index, every rank reads it): with a latent store, read from the store cache.py wrote for them
    (`validation_store_dir`; their index beside it); without one, indexed in state_dir/validation and encoded at
    each pass. No set when [validation] names none. ValueError: own sources with a store that lacks all of them."""
    v = cfg.validation
    if v.validation_split > 0:
        seed = cfg.seed if v.validation_seed is None else v.validation_seed
        train_rows, val_rows = split_rows(index, rows, v.validation_split, seed)
        return train_rows, HeldOut(index, val_rows, store, needs_encoders=store is None)
    if v.image_dirs or v.metadata_files:
        from data.index import load_or_build_index
        from data.loader import usable_rows
        from data.store import LatentStore
        vdata = validation_data_config(cfg.data, v)
        vdir = validation_store_dir(cfg.cache.cache_dir) if store is not None else os.path.join(state_dir, "validation")
        vstore = LatentStore(vdir, check_validity=cfg.cache.check_cache_validity, read_lock=True) \
            if store is not None and os.path.isdir(vdir) else None
        if store is not None and vstore is None:
            raise ValueError(f"[validation] image_dirs / metadata_files are not cached: run cache.py with this config "
                             f"(it caches them into {vdir})")
        dist.main_first(functools.partial(load_or_build_index, vdata, vdir, is_main=True))
        vindex = load_or_build_index(vdata, vdir, is_main=False)
        vrows = usable_rows(vindex)
        if vstore is not None:
            have = np.asarray(vstore.contains_many(vindex.keys.tolist_at(vrows)), dtype=bool)
            if not have.all():
                logging.getLogger(__name__).warning(
                    f"{int((~have).sum())} of {len(vrows)} validation images are not in the latent store {vdir}; "
                    "they are left out (run cache.py with this config)")
            if len(vrows) and not have.any():
                raise ValueError(f"none of the {len(vrows)} [validation] images is in the latent store {vdir}: run "
                                 "cache.py with this config")
            vrows = vrows[have]
        return rows, HeldOut(vindex, vrows, vstore, needs_encoders=vstore is None)
    return rows, HeldOut(index, np.asarray(rows)[:0], store)


def validation_data_config(data_cfg: Any, vcfg: Any) -> Any:
    """[data] with [validation]'s own sources in place of the training ones (same buckets, resolution, limits and
    caption rules) and nothing random: captions as written (no dropout, tag dropout or shuffling), centre crops, no
    flipped latents, one repeat. cache.py caches with it, train.py indexes with it."""
    return dataclasses.replace(data_cfg, image_dirs=list(vcfg.image_dirs), metadata_files=list(vcfg.metadata_files),
                               train_data_dir="", reg_data_dir="", dataset_name_or_path="", tar_shards=[], subsets=[],
                               num_repeats=1, caption_dropout_rate=0.0, caption_tag_dropout_rate=0.0,
                               shuffle_caption=False, random_crop=False, flip_aug=False)


def validation_cache_config(cfg: Any) -> Any | None:
    """The config cache.py encodes [validation]'s own sources with (their data, one cached caption each), or None
    when [validation] names no own sources (a split's images are cached with the training ones)."""
    v = cfg.validation
    if not (v.image_dirs or v.metadata_files):
        return None
    return dataclasses.replace(cfg, data=validation_data_config(cfg.data, v),
                               cache=dataclasses.replace(cfg.cache, text_variants=1))


def enabled(vcfg: Any) -> bool:
    """Whether [validation] names a held-out set."""
    return vcfg.validation_split > 0 or bool(vcfg.image_dirs or vcfg.metadata_files)


def check_validation_settings(cfg: Any) -> None:
    """[validation] combinations that cannot work, said before anything loads (ValueError)."""
    v = cfg.validation
    if (v.validate_every_n_steps or v.validate_every_n_epochs) and not enabled(v):
        raise ValueError("[validation] validate_every_n_steps / _epochs are set but there is no validation set: set "
                         "validation.validation_split or validation.image_dirs / metadata_files")
    if v.validation_split > 0 and (v.image_dirs or v.metadata_files):
        raise ValueError("[validation] give validation_split or image_dirs / metadata_files, not both")


class Validator:
    """The held-out loss at a step, logged (log line, metrics.jsonl, TensorBoard, wandb) by rank 0. Every rank
    calls `maybe(step, epoch_end)`; nothing happens without a validation set or off schedule."""

    def __init__(self, cfg: Any, held: HeldOut, objective: Any, comp: Any, model: nn.Module, ema: Any,
                 ema_module: nn.Module | None, optimizer_mode: Any, device: torch.device, autocast: Callable[[], Any],
                 metrics: Any, log: logging.Logger):
        v = cfg.validation
        index, rows, store = held.index, held.rows, held.store
        self.cfg, self.v, self.objective, self.model = cfg, v, objective, model
        self.ema, self.ema_module, self.optimizer_mode = ema, ema_module, optimizer_mode
        self.device, self.autocast, self.metrics, self.log = device, autocast, metrics, log
        self.seed = cfg.seed if v.validation_seed is None else v.validation_seed
        self.k = v.timesteps_per_image
        bs = v.validation_batch_size or cfg.data.batch_size
        self.batches = plan_batches(index, rows, self.seed, bs, v.max_validation_steps) if len(rows) else []
        self.names = band_names(band_edges(objective, self.k))
        self.reader = BatchReader(index, store, cfg.data, comp, device, with_masks=cfg.loss.masked_loss)
        self.last_step = -1
        if self.batches:
            n = sum(len(b) for b in self.batches)
            log.info(f"validation: {n} held-out image(s) in {len(self.batches)} batch(es), {self.k} timesteps each "
                     f"({', '.join(self.names)}), seed {self.seed}")

    def due(self, step: int, epoch_end: int | None = None) -> bool:
        """Whether a pass is scheduled: every validate_every_n_steps (step > 0) or, at an epoch's end,
        every validate_every_n_epochs."""
        if not self.batches or step == self.last_step:
            return False
        if epoch_end is not None:
            return bool(self.v.validate_every_n_epochs) and epoch_end % self.v.validate_every_n_epochs == 0
        return bool(self.v.validate_every_n_steps) and step > 0 and step % self.v.validate_every_n_steps == 0

    def maybe(self, step: int, epoch_end: int | None = None) -> None:
        """A pass when one is due (the loop's one call, after a step and at an epoch's end)."""
        if self.due(step, epoch_end):
            self.run(step)

    def at_end(self, step: int) -> None:
        """The final weights' pass (unless this step had one already)."""
        if self.batches and step != self.last_step:
            self.run(step)

    def run(self, step: int) -> dict[str, float]:
        """Every rank: the pass with the eval-mode weights (and the EMA's when kept); rank 0 logs the row."""
        row: dict[str, float] = {}
        # speed.eager: compiled regions run eagerly (no second set of graphs for no-grad batches of another size)
        with speed.eager(), self.optimizer_mode.evaluating(), training_rng_untouched(self.device), \
                eval_mode(self.model):
            row.update(self._one("val").row("val"))
            if self.ema is not None and self.v.validate_ema and self.ema_module is not None:
                with self.ema.swapped_into(self.ema_module):
                    row.update(self._one("val_ema").row("val_ema"))
        self.last_step = step
        self.metrics.write(step, row)
        self.log.info(f"validation at step {step}: loss {row['val/loss']:.6f}"
                      + (f", EMA {row['val_ema/loss']:.6f}" if "val_ema/loss" in row else "")
                      + " (" + ", ".join(f"{n[5:]} {row['val/' + n]:.4f}" for n in self.names) + ")")
        return row

    def _one(self, what: str) -> ValidationResult:
        sums = validation_sums(self.model, self.objective, self.reader, self.batches, self.k, self.device,
                               self.autocast)
        return reduce_sums(sums, self.names)
