"""Training metadata written into every exported model's safetensors header.

Names follow kohya sd-scripts (`ss_*`, train_network.py / the fine-tune trainers' metadata dict) where kohya has
one, so the tools that read them (Civitai, the additional-networks metadata viewer, sd-webui) show them;
ours are namespaced `sdtrain.*`. Values are strings, as safetensors metadata must be (kohya: `str(v)`).

Local paths never go in unless `save.metadata_paths = true` (paths leak user and host names): files and
folders are reduced to their base names, as kohya does for `ss_sd_model_name` and `ss_dataset_dirs`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import time
from typing import Any

import numpy as np

import models
from core.config import path_fields, to_dict
from data.buckets import BucketSettings

# kohya's ss_base_model_version values (sdxl_train_util / sd3_train_utils)


def _base(path: str) -> str:
    return os.path.basename(os.path.normpath(path)) if path else ""


def config_for_metadata(cfg: Any, with_paths: bool) -> dict[str, Any]:
    """The resolved config as a dict; path-valued fields reduced to base names unless `with_paths`."""
    raw = to_dict(cfg)
    if with_paths:
        return raw

    def strip(obj: dict[str, Any], cls: type) -> dict[str, Any]:
        out, paths = {}, path_fields(cls)
        for k, v in obj.items():
            inner = _nested(cls, k)
            if inner is not None and isinstance(v, dict):
                out[k] = strip(v, inner)
            elif inner is not None and isinstance(v, list):
                out[k] = [strip(x, inner) for x in v]
            elif k in paths and v:
                out[k] = [_hook_base(x) for x in v] if isinstance(v, list) else _hook_base(v)
            else:
                out[k] = v
        return out

    return strip(raw, type(cfg))


def _hook_base(v: str) -> str:
    """'path/file.py:function' -> 'file.py:function' ('pkg.module:function' is kept); paths -> base names."""
    if v and ":" in v and v.rsplit(":", 1)[0].endswith(".py"):
        target, fn = v.rsplit(":", 1)
        return f"{_base(target)}:{fn}"
    if ":" in v and os.sep not in v:
        return v
    return _base(v)


def _nested(cls: type, name: str) -> type | None:
    import typing
    tp = typing.get_type_hints(cls).get(name)
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) is list and typing.get_args(tp) and dataclasses.is_dataclass(typing.get_args(tp)[0]):
        return typing.get_args(tp)[0]
    return None


@dataclasses.dataclass
class DatasetGroup:
    """Subsets that share a batch size and bucket settings: one of kohya's [[datasets]] (its batch_size,
    resolution and bucket options), which a batch never mixes with another."""

    batch_size: int
    bucket: BucketSettings
    subsets: list[int]  # positions in index.subsets


def dataset_groups(index: Any, data_cfg: Any) -> list[DatasetGroup]:
    """The run's kohya datasets, in subset order: one unless [[data.subsets]] entries set their own batch_size or
    resolution / bucket options (data.loader.subset_batch_sizes, data.index.subset_bucket_settings)."""
    from data.index import subset_bucket_settings
    from data.loader import subset_batch_sizes
    per = subset_bucket_settings(index.subsets, BucketSettings.from_data_cfg(data_cfg))
    groups: dict[tuple[int, str], DatasetGroup] = {}
    for i, (size, bs) in enumerate(zip(subset_batch_sizes(index, data_cfg).tolist(), per)):
        groups.setdefault((int(size), bs.key()), DatasetGroup(int(size), bs, [])).subsets.append(i)
    return list(groups.values()) or [DatasetGroup(int(data_cfg.batch_size), BucketSettings.from_data_cfg(data_cfg), [])]


def bucket_info(index: Any, subsets: list[int] | None = None) -> dict[str, Any]:
    """kohya's ss_bucket_info: {"buckets": {i: {"resolution": [w, h], "count": n}}, "mean_img_ar_error": e}
    (counts include repeats, as kohya's bucket manager holds repeated images; vectorised for large indexes);
    `subsets`: of these subsets' images only (one kohya dataset's bucket_info)."""
    reps = np.asarray(index.repeats, dtype=np.int64)
    live = reps > 0
    if subsets is not None and len(reps):
        live &= np.isin(np.asarray(index.subset), subsets)
    if not live.any():
        return {"buckets": {}, "mean_img_ar_error": 0.0}
    b = np.asarray(index.buckets)[live]
    uniq, inv = np.unique(b, axis=0, return_inverse=True)
    counts = np.bincount(inv.reshape(-1), weights=reps[live], minlength=len(uniq)).astype(np.int64)
    sizes = np.asarray(index.sizes, dtype=np.float64)[live]
    err = np.abs(sizes[:, 0] / np.maximum(sizes[:, 1], 1) - b[:, 0] / np.maximum(b[:, 1], 1))
    return {"buckets": {str(i): {"resolution": [int(w), int(h)], "count": int(c)}
                        for i, ((w, h), c) in enumerate(zip(uniq.tolist(), counts.tolist()))},
            "mean_img_ar_error": float(err.mean())}


def dataset_dirs(index: Any, with_paths: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """kohya's ss_dataset_dirs / ss_reg_dataset_dirs: {dir or metadata file: {"n_repeats", "img_count"}}."""
    counts = np.bincount(np.asarray(index.subset, dtype=np.int64), minlength=len(index.subsets)) if len(index) else \
        np.zeros(len(index.subsets), np.int64)
    train, reg = {}, {}
    for i, s in enumerate(index.subsets):
        target = reg if s.is_reg else train
        for src in [*s.image_dirs, *s.metadata_files]:
            name = src if with_paths else _base(src)
            k, n = name, 2
            while k in target:  # the same base name twice: numbered, as kohya does
                k, n = f"{name} ({n})", n + 1
            target[k] = {"n_repeats": int(s.num_repeats), "img_count": int(counts[i])}
    return train, reg


def kohya_datasets(index: Any, groups: list[DatasetGroup], with_paths: bool) -> list[dict[str, Any]]:
    """kohya's ss_datasets (train_network.py with --dataset_config): per dataset its batch_size_per_device,
    image counts (with repeats), resolution, bucket options and bucket_info, and its subsets' settings."""
    reps = np.asarray(index.repeats, dtype=np.int64)
    subset_of = np.asarray(index.subset, dtype=np.int64)
    counts = np.bincount(subset_of, minlength=len(index.subsets)) if len(index) else np.zeros(len(index.subsets))
    out = []
    for g in groups:
        subs = [index.subsets[i] for i in g.subsets]
        train = np.isin(subset_of, [i for i in g.subsets if not index.subsets[i].is_reg])
        reg = np.isin(subset_of, [i for i in g.subsets if index.subsets[i].is_reg])
        entries = []
        for i, sp in zip(g.subsets, subs):
            cap = sp.caption
            entry = {"img_count": int(counts[i]), "num_repeats": int(sp.num_repeats), "flip_aug": bool(sp.flip_aug),
                     "random_crop": bool(sp.random_crop), "shuffle_caption": bool(cap.get("shuffle_caption")),
                     "keep_tokens": int(cap.get("keep_tokens", 0)),
                     "keep_tokens_separator": cap.get("keep_tokens_separator", ""),
                     "caption_prefix": cap.get("caption_prefix", ""), "caption_suffix": cap.get("caption_suffix", "")}
            if sp.image_dirs:
                entry["image_dir"] = sp.image_dirs[0] if with_paths else _base(sp.image_dirs[0])
            if sp.metadata_files:
                entry["metadata_file"] = sp.metadata_files[0] if with_paths else _base(sp.metadata_files[0])
            else:
                entry.update(class_tokens=sp.class_tokens, is_reg=bool(sp.is_reg))
            entries.append(entry)
        out.append({"is_dreambooth": not any(sp.metadata_files for sp in subs), "batch_size_per_device": g.batch_size,
                    "num_train_images": int(reps[train].sum()), "num_reg_images": int(reps[reg].sum()),
                    "resolution": list(g.bucket.size), "enable_bucket": g.bucket.enable_bucket,
                    "min_bucket_reso": g.bucket.min_reso, "max_bucket_reso": g.bucket.max_reso,
                    "bucket_info": bucket_info(index, g.subsets), "subsets": entries})
    return out


# What kohya writes per dataset in ss_datasets instead of once (with --dataset_config): left out of the flat keys
# when the subsets form several datasets.
PER_DATASET_KEYS = ("ss_batch_size_per_device", "ss_total_batch_size", "ss_resolution", "ss_enable_bucket",
                    "ss_min_bucket_reso", "ss_max_bucket_reso", "ss_bucket_no_upscale", "ss_bucket_info",
                    "ss_flip_aug", "ss_random_crop", "ss_shuffle_caption", "ss_keep_tokens")


def training_metadata(cfg: Any, *, family: str, index: Any, batches_per_epoch: int, world_size: int,
                      num_epochs: int, optimizer: Any) -> dict[str, str]:
    """The run's fixed training metadata (computed once, at start-up); `export_metadata` adds step / epoch."""
    t, o, l, d, m, s = cfg.train, cfg.optimizer, cfg.loss, cfg.data, cfg.model, cfg.save
    with_paths = s.metadata_paths
    reps = np.asarray(index.repeats, dtype=np.int64)
    is_reg = np.array([sp.is_reg for sp in index.subsets], dtype=bool)
    reg_rows = is_reg[np.asarray(index.subset, dtype=np.int64)] if len(index) else np.zeros(0, bool)
    train_dirs, reg_dirs = dataset_dirs(index, with_paths)
    opt_args = ",".join(f"{k}={v}" for k, v in o.optimizer_kwargs.items())
    te_lrs = [x for x in (o.learning_rate_te1, o.learning_rate_te2) if x is not None]
    model_name = m.pretrained_model_name_or_path
    groups = dataset_groups(index, d)
    one = groups[0]  # the flat keys: the run's one dataset (several: ss_datasets instead, as kohya)
    meta: dict[str, Any] = {
        "ss_session_id": random.randint(0, 2**32),
        "ss_training_started_at": time.time(),
        "ss_output_name": s.output_name,
        "ss_learning_rate": o.learning_rate,
        "ss_unet_lr": o.learning_rate,
        "ss_text_encoder_lr": (te_lrs[0] if len(te_lrs) == 1 else json.dumps(te_lrs) if te_lrs else o.learning_rate)
        if t.train_text_encoder else None,
        "ss_num_train_images": int(reps[~reg_rows].sum()),
        "ss_num_reg_images": int(reps[reg_rows].sum()),
        "ss_num_batches_per_epoch": batches_per_epoch,
        "ss_num_epochs": num_epochs,
        "ss_batch_size_per_device": one.batch_size,
        "ss_total_batch_size": one.batch_size * world_size * t.gradient_accumulation_steps,
        "ss_gradient_checkpointing": t.gradient_checkpointing,
        "ss_clip_skip": cfg.model.clip_skip,  # kohya's key; None when unset (the model's own layer)
        "ss_gradient_accumulation_steps": t.gradient_accumulation_steps,
        "ss_max_train_steps": t.max_train_steps or None,
        "ss_lr_warmup_steps": o.lr_warmup_steps,
        "ss_lr_scheduler": o.lr_scheduler,
        "ss_base_model_version": models.family(family).base_model_version,
        "ss_mixed_precision": t.mixed_precision,
        "ss_full_fp16": t.full_fp16,
        "ss_full_bf16": t.full_bf16,
        "ss_v2": False,
        "ss_max_token_length": m.max_token_length,
        "ss_cache_latents": bool(cfg.cache.cache_dir),
        "ss_seed": cfg.seed,
        "ss_noise_offset": l.noise_offset or None,
        "ss_noise_offset_random_strength": l.noise_offset_random_strength,
        "ss_multires_noise_iterations": l.multires_noise_iterations or None,
        "ss_multires_noise_discount": l.multires_noise_discount,
        "ss_adaptive_noise_scale": l.adaptive_noise_scale or None,
        "ss_zero_terminal_snr": bool(l.zero_terminal_snr),
        "ss_ip_noise_gamma": l.ip_noise_gamma or None,
        "ss_ip_noise_gamma_random_strength": l.ip_noise_gamma_random_strength,
        "ss_min_snr_gamma": l.min_snr_gamma or None,
        "ss_debiased_estimation": l.debiased_estimation_loss,
        "ss_loss_type": l.loss_type,
        "ss_huber_schedule": l.huber_schedule,
        "ss_huber_c": l.huber_c,
        "ss_min_timestep": l.min_timestep,
        "ss_max_timestep": l.max_timestep,
        "ss_optimizer": f"{type(optimizer).__module__}.{type(optimizer).__name__}" + (f"({opt_args})" if opt_args else ""),
        "ss_max_grad_norm": o.max_grad_norm,
        "ss_caption_dropout_rate": d.caption_dropout_rate,
        "ss_caption_tag_dropout_rate": d.caption_tag_dropout_rate,
        "ss_resolution": "({}, {})".format(*one.bucket.size),
        "ss_enable_bucket": one.bucket.enable_bucket,
        "ss_bucket_no_upscale": one.bucket.no_upscale,
        "ss_min_bucket_reso": one.bucket.min_reso,
        "ss_max_bucket_reso": one.bucket.max_reso,
        "ss_flip_aug": d.flip_aug,
        "ss_random_crop": d.random_crop,
        "ss_shuffle_caption": d.shuffle_caption,
        "ss_keep_tokens": d.keep_tokens,
        "ss_dataset_dirs": json.dumps(train_dirs),
        "ss_reg_dataset_dirs": json.dumps(reg_dirs),
        "ss_bucket_info": json.dumps(bucket_info(index)),
        "ss_training_type": "full-finetune",
        "ss_sd_model_name": (model_name if with_paths else _base(model_name)) if model_name else None,
        "ss_vae_name": (m.vae if with_paths else _base(m.vae)) if m.vae else None,
        "sdtrain.model_family": family,
        "sdtrain.world_size": world_size,
        "sdtrain.v_parameterization": bool(m.v_parameterization),
        "sdtrain.train_text_encoder": t.train_text_encoder,
        "sdtrain.use_ema": t.use_ema,
        "sdtrain.config": json.dumps(config_for_metadata(cfg, with_paths), sort_keys=True),
    }
    if len(groups) > 1:
        for k in PER_DATASET_KEYS:
            meta.pop(k)
        meta["ss_datasets"] = json.dumps(kohya_datasets(index, groups, with_paths))
    if model_name and os.path.isfile(model_name):
        from core.hashes import model_hash_legacy, sha256_file
        meta["ss_sd_model_hash"] = model_hash_legacy(model_name)  # kohya: both of A1111's hashes of the base model
        meta["ss_new_sd_model_hash"] = sha256_file(model_name)
    return {k: str(v) for k, v in meta.items() if v is not None}


def export_metadata(base: dict[str, str], *, step: int, epoch: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    """What one export adds to the run's metadata (kohya: ss_steps, ss_epoch, ss_training_finished_at)."""
    return {**base, "ss_steps": str(step), "ss_epoch": str(epoch), "ss_training_finished_at": str(time.time()),
            "sdtrain.step": str(step), **(extra or {})}
