"""Strict, typed TOML configuration.

One TOML file describes a run. Each table maps onto a dataclass below; every field has a
default, a type and a one-line doc (``help``). Unknown keys, wrong types and impossible values
are errors that name the file, the table and what is allowed, raised before any model or data
is loaded. A file may name ``base`` files (one or a list, relative to itself; HCP-Diffusion's ``_base_``
too) whose values it overrides, and command-line ``table.key=value`` overrides come last, typed by the field.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import difflib
import importlib
import importlib.util
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib


class ConfigError(ValueError):
    """A configuration problem, with a message meant for the user."""


def opt(default: Any, help: str, *, choices: Sequence[Any] | None = None, min: float | None = None,
        max: float | None = None, min_exclusive: bool = False, max_exclusive: bool = False, path: bool = False) -> Any:
    """A documented config field with optional allowed values / bounds. `path`: its value names local files or
    folders (kept out of exported metadata unless save.metadata_paths)."""
    meta = {"help": help, "choices": tuple(choices) if choices else None, "min": min, "max": max,
            "min_exclusive": min_exclusive, "max_exclusive": max_exclusive, "path": path}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


PRECISIONS = ("fp32", "fp16", "bf16")


def path_fields(cls: type) -> set[str]:
    """Names of a table's fields declared with opt(..., path=True)."""
    return {f.name for f in dataclasses.fields(cls) if f.metadata.get("path")}

# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """[model]: which checkpoint to fine-tune and how its parts are loaded."""
    pretrained_model_name_or_path: str = opt("", "checkpoint (SDXL or SD3): single-file .safetensors, .ckpt / .pt (read with torch.load(weights_only=True)), or a diffusers folder (model_index.json); empty = random init from model_preset", path=True)
    model_family: str = opt("auto", "model family; auto = detect from the checkpoint's keys", choices=("auto", "sdxl", "sd3"))
    model_preset: str = opt("", "preset used when no checkpoint is given (e.g. tiny, base, sd3_medium); weights are random")
    vae: str = opt("", "separate VAE file (original or diffusers naming) overriding the checkpoint's VAE", path=True)
    clip_l: str = opt("", "separate CLIP-L text encoder file (ComfyUI clip_l.safetensors)", path=True)
    clip_g: str = opt("", "separate CLIP-G text encoder file (ComfyUI clip_g.safetensors, SD3)", path=True)
    t5xxl: str = opt("", "separate T5-XXL encoder file (ComfyUI t5xxl_fp16.safetensors, SD3)", path=True)
    t5_tokenizer: str = opt("", "SentencePiece model for T5 (empty = the bundled models/assets/t5_spiece.model)", path=True)
    use_t5: bool = opt(True, "SD3: load and use T5-XXL; false = zeros in its place (as the reference allows), saves memory")
    apply_t5_attn_mask: bool = opt(False, "SD3: mask T5 padding and zero its outputs (kohya option; the reference attends to padding); lets cached T5 outputs be stored without padding")
    v_parameterization: bool | None = opt(None, "SDXL: the model predicts v instead of epsilon; unset = as the checkpoint says (its `v_pred` marker or modelspec.prediction_type), else false")
    max_token_length: int = opt(75, "CLIP tokens per caption (kohya): 75, 150 or 225 (75-token chunks)", choices=(75, 150, 225))
    clip_skip: int | None = opt(None, "CLIP hidden layer the model is conditioned on, counted from the end (kohya / A1111 clip_skip: 1 = last layer, 2 = penultimate; ComfyUI CLIPSetLastLayer -N); unset = the model's own (SDXL / SD3: 2, as they were trained). kohya ignores it for SDXL / SD3; here it is used (docs/lora.md)", min=1)
    t5_max_token_length: int = opt(256, "SD3: T5 tokens per caption (at least 77, as the reference pads to)", min=77)
    clip_l_dropout_rate: float = opt(0.0, "SD3: probability per sample of zeroing CLIP-L's outputs (its context channels and pooled part; kohya sd3_train.py --clip_l_dropout_rate), drawn per sample from the seed like caption_dropout_rate; cached text too", min=0, max=1)
    clip_g_dropout_rate: float = opt(0.0, "SD3: the same for CLIP-G (kohya --clip_g_dropout_rate)", min=0, max=1)
    t5_dropout_rate: float = opt(0.0, "SD3: the same for T5-XXL's context rows (kohya --t5_dropout_rate)", min=0, max=1)
    vae_dtype: str = opt("fp32", "VAE compute precision (the original SDXL VAE overflows in fp16)", choices=PRECISIONS)
    text_encoder_dtype: str = opt("fp32", "precision of frozen text encoders", choices=PRECISIONS)
    fp8_base: bool = opt(False, "LoRA: keep the frozen base (network and text encoders) in fp8 e4m3 with per-channel scales, upcast per layer at use (kohya option; a quarter of fp32, half of bf16; docs/low-vram.md)")
    fp8_base_unet: bool = opt(False, "LoRA: fp8 base for the diffusion network only (kohya's fp8_base_unet); text encoders stay in text_encoder_dtype")


@dataclass
class SubsetConfig:
    """[[data.subsets]]: one data source; unset (None) options inherit the [data] value."""
    image_dirs: list[str] = opt([], "folders of images with same-name caption files", path=True)
    metadata_files: list[str] = opt([], "metadata files (.json, .jsonl, .csv, .sqlite/.db; kohya / HCP / HF imagefolder / ours)", path=True)
    train_data_dir: str = opt("", "kohya DreamBooth root: one subset per <repeats>_<class tokens> folder in it", path=True)
    reg_data_dir: str = opt("", "kohya DreamBooth regularisation root (<repeats>_<class tokens> folders, is_reg)", path=True)
    dataset_name_or_path: str = opt("", "local Hugging Face dataset: hub snapshot (parquet) or save_to_disk folder (needs pyarrow)", path=True)
    dataset_image_column: str | None = opt(None, "image column of the dataset (default: [data])")
    dataset_caption_column: str | None = opt(None, "caption column of the dataset (default: [data])")
    tar_shards: list[str] = opt([], "webdataset tar shards (brace ranges {000000..000999} and globs): key.jpg / .png / .webp with key.txt / .caption / .json; read by cache.py", path=True)
    caption_extension: str | None = opt(None, "caption file extension (default: [data].caption_extension)")
    num_repeats: int = opt(1, "times each image is seen per epoch", min=1)
    is_reg: bool = opt(False, "DreamBooth-style regularisation images")
    class_tokens: str = opt("", "caption used when an image has none (DreamBooth class tokens)")
    shuffle_caption: bool | None = opt(None, "shuffle comma-separated tags (default: [data])")
    keep_tokens: int | None = opt(None, "leading tags kept in place when shuffling (default: [data])", min=0)
    caption_dropout_rate: float | None = opt(None, "probability of an empty caption (default: [data])", min=0, max=1)
    caption_tag_dropout_rate: float | None = opt(None, "probability of dropping each tag (default: [data])", min=0, max=1)
    caption_prefix: str | None = opt(None, "text prepended to every caption (default: [data])")
    caption_suffix: str | None = opt(None, "text appended to every caption (default: [data])")
    flip_aug: bool | None = opt(None, "random horizontal flips (default: [data])")
    random_crop: bool | None = opt(None, "random instead of center crop (default: [data])")
    loss_weight: float = opt(1.0, "per-sample loss weight of this subset (e.g. < 1 for regularisation images)", min=0)
    resolution: int | list[int] | None = opt(None, "this subset's training resolution (kohya [[datasets]] resolution: several resolutions in one run); default [data]", min=64)
    batch_size: int | None = opt(None, "images per GPU per micro-step for this subset's batches (kohya [[datasets]] batch_size; a batch never mixes subsets of different batch sizes); default [data]", min=1)
    enable_bucket: bool | None = opt(None, "aspect-ratio buckets for this subset (false: every image cropped to its resolution, HCP-Diffusion's FixedBucket); default [data]")
    bucket_reso_step: int | None = opt(None, "bucket side step of this subset; default [data]", min=8)
    min_bucket_reso: int | None = opt(None, "smallest bucket side of this subset; default [data]", min=8)
    max_bucket_reso: int | None = opt(None, "largest bucket side of this subset; default [data]", min=8)
    bucket_no_upscale: bool | None = opt(None, "never upscale this subset's small images; default [data]")
    num_bucket: int | None = opt(None, "HCP-Diffusion's RatioBucket: this many buckets, clustered from the subset's image ratios (k-means of log2 w/h), each of the resolution's area; unset = kohya's bucket list", min=1)


@dataclass
class DataConfig:
    """[data]: images, captions and aspect-ratio buckets."""
    image_dirs: list[str] = opt([], "folders of images with same-name caption files (a folder with a metadata.jsonl / .csv is read as a Hugging Face imagefolder)", path=True)
    metadata_files: list[str] = opt([], "metadata files: ours / euge-trainer's (.json {key: {image_path, caption, ...}}, .jsonl, .csv, .sqlite), kohya's meta_lat.json, HCP caption JSON, HF imagefolder metadata.jsonl / .csv", path=True)
    train_data_dir: str = opt("", "kohya DreamBooth root: one subset per <repeats>_<class tokens> folder in it (folders without a number are skipped with a warning)", path=True)
    reg_data_dir: str = opt("", "kohya DreamBooth regularisation root: per epoch as many reg samples as training samples (kohya's rule)", path=True)
    prior_loss_weight: float = opt(1.0, "loss weight of regularisation (is_reg) images, times their subset's loss_weight (kohya)", min=0)
    dataset_name_or_path: str = opt("", "local Hugging Face dataset (euge-trainer): a hub snapshot folder of parquet files or a save_to_disk folder; needs pyarrow; nothing is downloaded", path=True)
    dataset_image_column: str = opt("image", "dataset column with the images (HF Image feature: bytes or path)")
    dataset_caption_column: str = opt("", "dataset / imagefolder caption column; empty = `caption` (datasets) or `text`, then `caption` (imagefolder)")
    tar_shards: list[str] = opt([], "webdataset tar shards, e.g. [\"/data/shards/{000000..000999}.tar\"] (brace ranges, globs): samples key.jpg / .png / .webp + key.txt / .caption / .json (caption, tags, description); cached by cache.py (each rank streams whole shards), trained from the store", path=True)
    recursive: bool = opt(False, "search image_dirs recursively")
    caption_extension: str = opt("", "caption file extension; empty = the source tool's: .caption in kohya DreamBooth folders (train_data_dir / reg_data_dir, as kohya), .txt elsewhere")
    resolution: int | list[int] = opt(1024, "training resolution: N (bucket area <= N*N) or kohya's [width, height] (area <= width*height; without buckets images are cropped to it)", min=64)
    enable_bucket: bool = opt(True, "aspect-ratio buckets (false: every image cropped to resolution x resolution)")
    bucket_reso_step: int = opt(64, "bucket side step in pixels", min=8)
    min_bucket_reso: int = opt(256, "smallest bucket side", min=8)
    max_bucket_reso: int = opt(2048, "largest bucket side", min=8)
    bucket_no_upscale: bool = opt(False, "never upscale small images to fill a bucket")
    random_crop: bool = opt(False, "random instead of center crop")
    flip_aug: bool = opt(False, "random horizontal flips (latents cached for both orientations)")
    batch_size: int = opt(1, "images per GPU per micro-step", min=1)
    max_dataloader_n_workers: int = opt(-1, "DataLoader worker processes per rank; -1 = the CPU cores per rank minus one, at most 8 (kohya's default cap)", min=-1)
    jpeg_draft: bool = opt(True, "decode JPEGs at 1/2, 1/4 or 1/8 scale in the DCT when the bucket is that much smaller (2x+ faster on 6-12 MP photos); a sharp image (line art) whose draft would lose quality is decoded at 2.5x the bucket or fully, so both stay >= 40 dB PSNR against the full decode; false = always the full decode")
    persistent_data_loader_workers: bool = opt(True, "keep DataLoader workers alive between epochs")
    shuffle_caption: bool = opt(False, "shuffle comma-separated tags")
    keep_tokens: int = opt(0, "leading tags kept in place when shuffling", min=0)
    keep_tokens_separator: str = opt("", "tags before this separator are kept in place (alternative to keep_tokens)")
    caption_separator: str = opt(",", "tag separator")
    caption_dropout_rate: float = opt(0.0, "probability of an empty caption", min=0, max=1)
    caption_tag_dropout_rate: float = opt(0.0, "probability of dropping each tag", min=0, max=1)
    caption_prefix: str = opt("", "text prepended to every caption")
    caption_suffix: str = opt("", "text appended to every caption")
    description_probability: float = opt(0.5, "entries with tags and a description (`description` / `nl_caption`): probability of training on the description (euge-trainer: 0.5)", min=0, max=1)
    description_with_tags_probability: float = opt(0.0, "entries with both: probability of tags + separator + description instead; tags alone get the rest", min=0, max=1)
    num_repeats: int = opt(1, "times each image is seen per epoch", min=1)
    caption_processor: str = opt("", "user hook 'pkg.module:function' or 'path/file.py:function' (runs user code)", path=True)
    description_processor: str = opt("", "user hook for natural-language descriptions (runs user code)", path=True)
    num_repeats_getter: str = opt("", "user hook returning the repeats of each image (runs user code)", path=True)
    max_image_pixels: int = opt(178_956_970, "images with more pixels (width x height, read from the header before decoding) are skipped as decompression bombs; the default is Pillow's error limit", min=1)
    mask_dir: str = opt("", "folder of loss masks named <image stem>.png (with loss.masked_loss); without it a <stem>_mask.png / <stem>-masklabel.png beside the image, else its alpha channel", path=True)
    allow_empty_captions: bool = opt(False, "train even when every caption is empty (unconditional); otherwise that is an error")
    subsets: list[SubsetConfig] = opt([], "several data sources ([[data.subsets]]); empty = [data] is the only subset")


@dataclass
class CacheConfig:
    """[cache]: the memory-mapped latent shard store written by cache.py."""
    cache_dir: str = opt("", "latent store directory; empty = encode images on the fly while training", path=True)
    vae_batch_size: int = opt(8, "images per VAE batch when caching", min=1)
    num_workers: int = opt(-1, "image decoding workers per rank when caching; -1 = the CPU cores per rank minus one (the main process encodes)", min=-1)
    latent_dtype: str = opt("bf16", "precision of stored latents", choices=PRECISIONS)
    store_posterior: bool = opt(False, "store the posterior mean and std so training samples latents")
    compress: bool = opt(False, "zstd-compress shards (for storage / transfer)")
    shard_size_mb: int = opt(256, "target shard size in MB", min=1)
    check_cache_validity: bool = opt(True, "verify record fingerprints and shard checksums on open")
    content_hash: bool = opt(False, "fingerprint source images by content hash instead of size + mtime")
    vae_tile_size: int = opt(0, "tiled VAE encode with this tile size in pixels; 0 = off", min=0)
    cache_text_encoder_outputs: bool = opt(False, "also cache text-encoder outputs (SD3 T5; SDXL only without caption augmentation)")
    text_variants: int = opt(1, "caption variants cached per image when captions are augmented", min=1)


@dataclass
class TrainConfig:
    """[train]: the loop."""
    max_train_steps: int = opt(0, "optimizer steps; 0 = use max_train_epochs", min=0)
    max_train_epochs: int = opt(1, "epochs when max_train_steps = 0", min=1)
    mixed_precision: str = opt("bf16", "autocast precision", choices=("no", "fp16", "bf16"))
    full_bf16: bool = opt(False, "keep trained weights in bf16 (memory); requires mixed_precision = bf16")
    full_fp16: bool = opt(False, "keep trained weights in fp16 (memory); requires mixed_precision = fp16")
    gradient_checkpointing: bool = opt(False, "recompute activations per block in the backward pass")
    blocks_to_swap: int = opt(0, "keep this many of the network's blocks in CPU memory and stream each to the GPU around its forward and backward (kohya option; needs gradient_checkpointing, and fused_backward_pass for a full fine-tune; docs/low-vram.md)", min=0)
    fused_backward_pass: bool = opt(False, "step each parameter inside backward and free its gradient at once (kohya option; one GPU, no accumulation; max_grad_norm then clips each parameter's gradient on its own)")
    stochastic_rounding: bool = opt(True, "with full_bf16: step in fp32 one parameter at a time and round the new bf16 weight stochastically (unbiased; small updates are not lost)")
    gradient_accumulation_steps: int = opt(1, "micro-steps per optimizer step", min=1)
    train_text_encoder: bool = opt(False, "also train the CLIP text encoders")
    use_ema: bool = opt(False, "keep an exponential moving average of the weights")
    ema_decay: float = opt(0.9999, "EMA decay", min=0, max=1, max_exclusive=True)
    ema_device: str = opt("same", "where the EMA lives: same device as the model, or cpu", choices=("same", "cpu"))
    resume: str = opt("", "resume state folder, or 'auto' = newest complete state in output_dir/state", path=True)
    max_bad_steps: int = opt(10, "consecutive NaN/Inf-loss steps before the run saves and stops", min=1)
    deterministic: bool = opt(False, "deterministic algorithms (slower; for exact reproducibility)")
    fsdp: bool = opt(False, "shard the trained model with FSDP2 instead of DDP (models that do not fit one GPU)")
    compile: bool | None = opt(None, "torch.compile each network block and the middle block, static shapes per bucket (one compile per new bucket shape; tail batches padded, no recompile); unset = on when training on CUDA")
    allow_tf32: bool = opt(True, "CUDA: TF32 tensor cores for fp32 matmuls and convolutions (torch's default is off for matmuls); false for strict fp32")
    cudnn_benchmark: bool = opt(True, "CUDA: cuDNN picks the fastest convolution algorithm per shape (once per bucket shape); off under train.deterministic")
    channels_last: bool | None = opt(None, "channels_last memory format for the UNet / VAE convolutions; unset = off (not measured faster on CUDA yet)")
    sdpa_backend: str = opt("auto", "attention kernel tried first on CUDA; auto = chosen per call by dtype and mask (flash / cudnn for fp16 and bf16, memory-efficient for masks and fp32); calls the named kernel cannot run use the next", choices=("auto", "flash", "efficient", "cudnn", "math"))
    noise_device: str = opt("same", "generator of the training noise and timesteps: same = the training device's "
                            "(fastest); cpu = the CPU's, the same numbers on any GPU or CPU (a small copy per "
                            "micro-step)", choices=("same", "cpu"))


@dataclass
class LossConfig:
    """[loss]: noise, timestep sampling and loss options."""
    loss_type: str = opt("l2", "loss function", choices=("l2", "huber", "smooth_l1"))
    huber_c: float = opt(0.1, "huber / smooth_l1 threshold parameter", min=0, min_exclusive=True)
    huber_schedule: str = opt("snr", "how the huber parameter varies with the timestep", choices=("constant", "exponential", "snr"))
    noise_offset: float = opt(0.0, "per-channel constant noise offset strength", min=0)
    noise_offset_random_strength: bool = opt(False, "random noise offset strength in [0, noise_offset]")
    multires_noise_iterations: int = opt(0, "pyramid (multi-resolution) noise levels; 0 = off", min=0)
    multires_noise_discount: float = opt(0.3, "pyramid noise discount per level", min=0, max=1)
    adaptive_noise_scale: float = opt(0.0, "add noise offset proportional to the latent mean (with noise_offset)")
    ip_noise_gamma: float = opt(0.0, "input perturbation noise strength", min=0)
    ip_noise_gamma_random_strength: bool = opt(False, "random input perturbation strength in [0, ip_noise_gamma]")
    min_snr_gamma: float = opt(0.0, "Min-SNR loss weighting gamma (e.g. 5); 0 = off", min=0)
    scale_v_pred_loss_like_noise_pred: bool = opt(False, "scale v-prediction loss like epsilon loss")
    v_pred_like_loss: float = opt(0.0, "add a v-prediction-like loss with this weight", min=0)
    debiased_estimation_loss: bool = opt(False, "debiased estimation loss weighting")
    zero_terminal_snr: bool | None = opt(None, "rescale betas to zero terminal SNR; unset = as the checkpoint says (its `ztsnr` marker), else false")
    min_timestep: int = opt(0, "smallest sampled timestep", min=0, max=1000)
    max_timestep: int = opt(1000, "largest sampled timestep (exclusive)", min=1, max=1000)
    timestep_sampler_type: str = opt("uniform", "timestep / sigma sampling", choices=("uniform", "logit_normal", "mode", "cosmap"))
    logit_mean: float = opt(0.0, "logit_normal mean (mu)")
    logit_std: float = opt(1.0, "logit_normal standard deviation (sigma)", min=0, min_exclusive=True)
    mode_scale: float = opt(1.29, "scale of the 'mode' sigma sampler")
    discrete_flow_shift: float = opt(3.0, "SD3: shift applied to training sigmas", min=0, min_exclusive=True)
    flow_loss_weighting: str = opt("none", "SD3: loss weighting", choices=("none", "sigma_sqrt", "cosmap"))
    flow_precondition_outputs: bool = opt(False, "SD3: precondition outputs (loss on x0 instead of velocity)")
    masked_loss: bool = opt(False, "weight the loss by each image's mask (kohya --masked_loss): its alpha channel, a <stem>_mask.png / <stem>-masklabel.png beside it, or data.mask_dir; cached with the latents; images without one train unmasked")
    unmasked_weight: float = opt(0.0, "with masked_loss: the smallest weight of a position (OneTrainer; the mask is clamped to [unmasked_weight, 1]; 0 = kohya)", min=0, max=1)
    normalize_masked_area_loss: bool = opt(False, "with masked_loss: divide each image's loss by the mean of its (clamped) mask, so small subjects are not trained more weakly (OneTrainer)")


@dataclass
class OptimizerConfig:
    """[optimizer]: optimizer, learning rates and schedule."""
    optimizer_type: str = opt("AdamW", "AdamW | AdamW8bit | Lion | Lion8bit | Prodigy | CAME | Adafactor | SGD | AdamWScheduleFree | SGDScheduleFree | RAdamScheduleFree | ProdigyPlusScheduleFree | 'module.Class' (schedule-free: lr_scheduler constant or constant_with_warmup; exports hold the eval-mode weights)")
    learning_rate: float = opt(1e-5, "learning rate of the diffusion network", min=0)
    learning_rate_te1: float | None = opt(None, "learning rate of text encoder 1 (CLIP-L); default learning_rate", min=0)
    learning_rate_te2: float | None = opt(None, "learning rate of text encoder 2 (bigG / CLIP-G); default learning_rate", min=0)
    optimizer_kwargs: dict = opt({}, "extra keyword arguments for the optimizer (weight_decay, betas, ...)")
    lr_scheduler: str = opt("constant", "learning-rate schedule",
                            choices=("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"))
    lr_warmup_steps: int = opt(0, "linear warm-up steps", min=0)
    lr_scheduler_num_cycles: int = opt(1, "cycles of cosine_with_restarts", min=1)
    lr_scheduler_power: float = opt(1.0, "power of the polynomial schedule", min=0)
    lr_scheduler_kwargs: dict = opt({}, "more arguments of the schedule's diffusers function (euge-trainer lr_scheduler_kwargs, kohya --lr_scheduler_args): cosine {num_cycles = 0.5}, polynomial {lr_end = 1e-7}")
    max_grad_norm: float = opt(1.0, "gradient clipping norm; 0 = off", min=0)
    param_groups: list[dict] = opt([], "block-wise learning rates: [{pattern = 'regex', lr = 1e-6}], first match wins")


@dataclass
class NetworkConfig:
    """[network]: train LoRA / LoCon adapters instead of the whole network (kohya's option names). Adapters are
    saved in kohya's LoRA format (ComfyUI, A1111 / Forge, diffusers load it); the base model stays frozen."""
    network_module: str = opt("", "'' = full fine-tune; 'lora' = LoRA on linear layers; 'locon' = LoRA on linear layers and convolutions (conv_dim / conv_alpha); 'loha' / 'lokr' = LyCORIS LoHa / LoKr on the same layers as locon (kohya: network_module = 'lycoris.kohya', network_args algo = ...)", choices=("", "lora", "locon", "loha", "lokr"))
    network_dim: int = opt(16, "rank of each linear (and 1x1 convolution) adapter", min=1)
    network_alpha: float = opt(1.0, "scale numerator: the adapter output is multiplied by network_alpha / network_dim (kohya)", min=0, min_exclusive=True)
    conv_dim: int = opt(0, "locon: rank of 3x3 convolution adapters; 0 = network_dim", min=0)
    conv_alpha: float | None = opt(None, "locon: alpha of 3x3 convolution adapters; default network_alpha", min=0, min_exclusive=True)
    network_dropout: float = opt(0.0, "dropout on the adapter's rank activations while training", min=0, max=1, max_exclusive=True)
    rank_dropout: float = opt(0.0, "probability of dropping each rank (per sample) while training", min=0, max=1, max_exclusive=True)
    module_dropout: float = opt(0.0, "probability of skipping a whole adapter for a step while training", min=0, max=1, max_exclusive=True)
    dora_wd: bool = opt(False, "DoRA (LyCORIS network_args dora_wd): a trained magnitude per output row times the direction of W + the adapter's update; any network_module")
    factor: int = opt(-1, "lokr: the Kronecker split of each side (LyCORIS factor); -1 = the most balanced split", min=-1)
    decompose_both: bool = opt(False, "lokr: also factorise the smaller Kronecker half into two rank-network_dim matrices (LyCORIS decompose_both)")
    full_matrix: bool = opt(False, "lokr: both Kronecker halves as full matrices, no rank (LyCORIS full_matrix)")
    network_train_unet_only: bool = opt(False, "adapters on the diffusion network only (required with cached text-encoder outputs)")
    network_train_text_encoder_only: bool = opt(False, "adapters on the CLIP text encoders only")
    target_modules: list[str] = opt([], "regexes (full match) over kohya LoRA names (lora_unet_..., lora_te1_..., lora_te2_...) of linear layers to adapt; empty = kohya's defaults of the family (docs/lora.md)")
    conv_target_modules: list[str] = opt([], "locon: regexes over LoRA names of convolutions to adapt; empty = kohya's defaults (SDXL ResNet / down / up-sampling convolutions)")
    exclude_modules: list[str] = opt([], "regexes over LoRA names never adapted (applied after the targets)")
    block_args: list[dict] = opt([], "block-wise settings: [{pattern = 'regex over LoRA names', dim = 8, alpha = 4.0, lr = 1e-4}], first match wins; dim 0 leaves the matched layers out")
    network_weights: str = opt("", "adapter file to continue (ours, kohya's, LyCORIS's: LoRA / LoCon / LoHa / LoKr / DoRA): the network takes its layers, algorithms, ranks and alphas; dropouts and block_args lr still apply")
    unet_lr: float | None = opt(None, "learning rate of the diffusion network's adapters; default optimizer.learning_rate", min=0)
    text_encoder_lr: float | None = opt(None, "learning rate of the text encoders' adapters; default optimizer.learning_rate", min=0)


@dataclass
class SaveConfig:
    """[save]: exported models and resumable states."""
    output_name: str = opt("model", "file name stem of exported models")
    save_precision: str = opt("fp16", "precision of exported models", choices=PRECISIONS)
    save_model_as: str = opt("safetensors", "format of exported full models (kohya's option): safetensors = the original single file; diffusers = a diffusers folder (model_index.json, one sub-folder per part, scheduler and tokenizers) named like the file without the suffix. LoRA files are always .safetensors", choices=("safetensors", "diffusers"))
    save_every_n_steps: int = opt(0, "export every N optimizer steps; 0 = off", min=0)
    save_every_n_epochs: int = opt(0, "export every N epochs; 0 = off", min=0)
    save_on_train_end: bool = opt(True, "export when training ends")
    save_last_n: int = opt(0, "keep only the last N exported models; 0 = keep all", min=0)
    save_clip: bool | None = opt(None, "SD3: CLIP-L and CLIP-G inside each exported file (kohya's --save_clip); unset = as they were loaded: inside when the checkpoint held them, left out when they came as model.clip_l / clip_g files (trained ones are then written beside the export as <name>_clip_l / _clip_g.safetensors, kohya's names). SDXL exports always hold their text encoders")
    save_t5xxl: bool | None = opt(None, "SD3: T5-XXL inside each exported file (kohya's --save_t5xxl; 9.8 GB in fp16); unset = as it was loaded: inside when the checkpoint held it, left out when it came as a model.t5xxl file")
    save_state: bool = opt(True, "write a resumable state with every export")
    save_last_n_states: int = opt(2, "resumable states kept", min=1)
    save_on_keyboard_interrupt: bool = opt(True, "Ctrl-C saves a resumable state and exits (a second Ctrl-C aborts)")
    save_on_exception: bool = opt(True, "an exception in the loop saves a resumable state first")
    save_on_signal: bool = opt(True, "SIGTERM / SIGUSR1 (SLURM preemption, time limit) save a state and exit cleanly")
    metadata_title: str = opt("", "modelspec.title of exported models (kohya --metadata_title); empty = the file name")
    metadata_author: str = opt("", "modelspec.author of exported models (kohya --metadata_author)")
    metadata_description: str = opt("", "modelspec.description of exported models (kohya --metadata_description)")
    metadata_license: str = opt("", "modelspec.license of exported models (kohya --metadata_license)")
    metadata_tags: str = opt("", "modelspec.tags of exported models, comma-separated (kohya --metadata_tags)")
    metadata_paths: bool = opt(False, "put local paths (checkpoint, data folders, full config) into exported metadata; false = base names only (paths leak user names)")


@dataclass
class SampleConfig:
    """[sample]: preview images during training."""
    sample_prompts: str = opt("", "prompt file (.txt with kohya options, .toml or .json); empty = no previews", path=True)
    sample_benchmark: str = opt("", "euge-trainer's name for sample_prompts (its JSON list of {prompt, negative_prompt, steps, width, height, scale, seed, sample_name}; sample_name names the image files); set one of the two", path=True)
    sample_every_n_steps: int = opt(0, "previews every N optimizer steps; 0 = off", min=0)
    sample_every_n_epochs: int = opt(0, "previews every N epochs; 0 = off", min=0)
    sample_at_first: bool = opt(False, "previews before training starts")
    sample_sampler: str = opt("euler", "default sampler: euler, euler_a, ddim, heun, dpmpp_2m, dpmpp_2m_sde, lms, dpm_2, dpm_2_ancestral, dpm_solver_2m, dpmpp_2s, pndm, or a kohya name (k_lms, k_dpm_2, k_dpm_2_a, dpmsolver, dpmsolver++, dpmsingle, ...)")
    sample_sigmas: str = opt("normal", "default sigma spacing: the schedule's own, or karras (Karras et al. 2022); prompts may set their own (--sigmas, sigmas =)", choices=("normal", "karras"))
    sample_params: dict = opt({}, "defaults for prompts that do not set them (width, height, steps, scale, seed, negative_prompt, ...)")


@dataclass
class ValidationConfig:
    """[validation]: held-out validation loss with fixed noise and timesteps per image (docs/validation.md)."""
    validation_split: float = opt(0.0, "fraction of the training images held out for validation (kohya): a seeded choice by key, the same for every world size; those images are not trained on", min=0, max=1, max_exclusive=True)
    image_dirs: list[str] = opt([], "validation images of their own (folders with captions, as data.image_dirs) instead of a split", path=True)
    metadata_files: list[str] = opt([], "validation metadata files (as data.metadata_files) instead of a split", path=True)
    validation_seed: int | None = opt(None, "seed of the split and of the fixed noise / timesteps (kohya); unset = seed", min=0)
    validate_every_n_steps: int = opt(0, "validation every N optimizer steps (kohya); 0 = off. A validation set is also scored at the end of training", min=0)
    validate_every_n_epochs: int = opt(0, "validation every N epochs (kohya); 0 = off", min=0)
    max_validation_steps: int = opt(0, "at most this many validation batches per pass (kohya); 0 = the whole set", min=0)
    validation_batch_size: int = opt(0, "images per validation forward (each repeated timesteps_per_image times); 0 = data.batch_size", min=0)
    timesteps_per_image: int = opt(4, "timesteps (sigmas) scored per image, one in each of this many equal-probability bands of the training sampler (kohya scores 4)", min=1, max=16)
    validate_ema: bool = opt(True, "with train.use_ema, also score the EMA weights (val_ema/*)")


@dataclass
class LogConfig:
    """[log]: console, log files and metrics."""
    log_every_n_steps: int = opt(1, "write metrics every N optimizer steps", min=1)
    loss_recorder_stride: int = opt(100, "window of the loss recorder's mean", min=1)
    loss_recorder_gamma: float = opt(0.9, "factor of the loss recorder's moving average", min=0, max=1)
    tensorboard: bool = opt(False, "write TensorBoard events (scalars, every param group's lr, preview images) to logs/tensorboard; needs the tensorboard package (requirements-optional.txt)")
    wandb: bool = opt(False, "log the same rows (and preview / validation images) to Weights & Biases; needs the wandb package (requirements-optional.txt); files under logs/wandb")
    wandb_project: str = opt("sdtrain", "wandb project (kohya: log_tracker_name)")
    wandb_run_name: str = opt("", "wandb run name (kohya: wandb_run_name); empty = the run folder's name")
    wandb_tags: list[str] = opt([], "wandb run tags")
    wandb_entity: str = opt("", "wandb entity (team or user); empty = your default")
    wandb_mode: str = opt("online", "online, or offline (written locally; upload later with `wandb sync logs/wandb/offline-run-*`)", choices=("online", "offline"))


@dataclass
class Config:
    """A whole run. Top-level keys: output_dir, seed; the rest are tables."""
    output_dir: str = opt("output", "run folder (may contain {date} / {time}); holds models/ samples/ logs/ state/", path=True)
    seed: int = opt(42, "random seed; per-rank seeds derive from it", min=0)
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "model"})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "data"})
    cache: CacheConfig = field(default_factory=CacheConfig, metadata={"help": "cache"})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "train"})
    loss: LossConfig = field(default_factory=LossConfig, metadata={"help": "loss"})
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig, metadata={"help": "optimizer"})
    network: NetworkConfig = field(default_factory=NetworkConfig, metadata={"help": "network"})
    save: SaveConfig = field(default_factory=SaveConfig, metadata={"help": "save"})
    sample: SampleConfig = field(default_factory=SampleConfig, metadata={"help": "sample"})
    validation: ValidationConfig = field(default_factory=ValidationConfig, metadata={"help": "validation"})
    log: LogConfig = field(default_factory=LogConfig, metadata={"help": "log"})


# ----------------------------------------------------------------------------------------------
# Loading: base inheritance, overrides, strict conversion
# ----------------------------------------------------------------------------------------------


def _read_toml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None


def _merge(base: dict, over: dict) -> dict:
    """Deep-merge tables; scalars, arrays and arrays of tables in `over` replace those of `base`."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in _FREE_DICT_FIELDS:
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


# dict-typed fields whose keys are free-form (merged as a whole, not checked against a schema)
_FREE_DICT_FIELDS = {"optimizer_kwargs", "sample_params", "lr_scheduler_kwargs"}


BASE_KEYS = ("base", "_base_")  # ours; HCP-Diffusion's spelling


def _load_with_bases(path: str, seen: tuple[str, ...] = ()) -> dict:
    """A config file with its base files merged under it. `base` (or HCP-Diffusion's `_base_`) names one file or a
    list, relative to this file; as in HCP (hcpdiff/utils/utils.py load_config: each base merged under what came
    before) the file's own values win, then its first base's, then the next one's."""
    path = os.path.abspath(path)
    if path in seen:
        raise ConfigError(f"{path}: circular base chain: {' -> '.join(seen + (path,))}")
    raw = _read_toml(path)
    _check_keys(raw, Config, path, table="")
    given = [k for k in BASE_KEYS if k in raw]
    if len(given) > 1:
        raise ConfigError(f"{path}: both `base` and `_base_` are set; give the base files in one of them")
    key = given[0] if given else "base"
    base = raw.pop(key, None)
    try:  # type- and range-check this file's own values, so errors name the file they are in
        _build(Config, raw, "")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    if base is None:
        return raw
    bases = [base] if isinstance(base, str) else base
    if not isinstance(bases, list) or not bases or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: `{key}` must be a file name or a list of file names, got {base!r}")
    merged: dict = {}
    for b in reversed(bases):  # the last base lowest, the first one over it
        base_path = b if os.path.isabs(b) else os.path.join(os.path.dirname(path), b)
        if not os.path.isfile(base_path):
            raise ConfigError(f"{path}: base file not found: {base_path} (from `{key}`: \"{b}\", relative to this "
                              f"file)")
        merged = _merge(merged, _load_with_bases(base_path, seen + (path,)))
    return _merge(merged, raw)


def _field_map(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _suggest(key: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f" (did you mean `{close[0]}`?)" if close else ""


def _home_of(key: str, cls: type) -> str | None:
    """The table (other than cls) that has a field `key`, as written in TOML ("[optimizer]"), or None."""
    hints = _hints(Config)
    homes = [("the top level", Config)] + [(f"[{f.name}]", _dataclass_of(hints[f.name]))
                                           for f in dataclasses.fields(Config) if _dataclass_of(hints[f.name])]
    homes.append(("[[data.subsets]]", SubsetConfig))
    for name, c in homes:
        if c is not cls and key in _field_map(c) and not (c is Config and _dataclass_of(hints[key])):
            return name
    return None


def _check_keys(raw: dict, cls: type, source: str, table: str) -> None:
    """Raise on any key not in the schema, recursively, naming file, table and the closest key."""
    fields = _field_map(cls)
    hints = _hints(cls)
    valid = list(fields) + (list(BASE_KEYS) if cls is Config else [])
    for key, value in raw.items():
        if key not in valid:
            where = f"[{table}]" if table else "the top level"
            home = _home_of(key, cls)
            if home:
                raise ConfigError(f"{source}: unknown key `{key}` in {where}: {key} belongs in {home}")
            raise ConfigError(f"{source}: unknown key `{key}` in {where}{_suggest(key, valid)}. "
                              f"Valid keys there: {', '.join(sorted(valid))}")
        if key in BASE_KEYS:
            continue
        sub = _dataclass_of(hints[key])
        name = f"{table}.{key}" if table else key
        if sub is not None and isinstance(value, dict):
            _check_keys(value, sub, source, name)
        elif sub is not None and isinstance(value, list) and _is_list_of_dataclass(hints[key]):
            for i, item in enumerate(value):
                if isinstance(item, dict):
                    _check_keys(item, sub, source, f"{name}[{i}]")


def _is_list_of_dataclass(tp: Any) -> bool:
    return typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0])


def _dataclass_of(tp: Any) -> type | None:
    if dataclasses.is_dataclass(tp):
        return tp
    if _is_list_of_dataclass(tp):
        return typing.get_args(tp)[0]
    return None


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "none"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is list:
        (arg,) = typing.get_args(tp) or (Any,)
        return f"array of {_type_name(arg)}" if arg is not Any else "array"
    if origin is dict or tp is dict:
        return "table"
    if dataclasses.is_dataclass(tp):
        return "table"
    return {bool: "boolean", int: "integer", float: "number", str: "string"}.get(tp, str(tp))


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check/convert a TOML value to the field type; raise ConfigError saying what is allowed."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return _convert(value, args[0], where)
        for a in args:  # the first alternative the value fits
            try:
                return _convert(value, a, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {type(value).__name__} {value!r}")
        return _build(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
        (arg,) = typing.get_args(tp)
        return [_convert(v, arg, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {type(value).__name__} {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected a boolean (true / false), got {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported field type {tp}")  # pragma: no cover


def _check_value(value: Any, f: dataclasses.Field, where: str) -> None:
    meta = f.metadata
    if value is None:
        return
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{where}: {value!r} is not allowed; allowed values: {', '.join(map(repr, choices))}")
    lo, hi = meta.get("min"), meta.get("max")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if lo is not None and (value < lo or (meta.get("min_exclusive") and value == lo)):
            rel = ">" if meta.get("min_exclusive") else ">="
            raise ConfigError(f"{where}: {value!r} is out of range; must be {rel} {lo}")
        if hi is not None and (value > hi or (meta.get("max_exclusive") and value == hi)):
            rel = "<" if meta.get("max_exclusive") else "<="
            raise ConfigError(f"{where}: {value!r} is out of range; must be {rel} {hi}")


def _build(cls: type, raw: dict, where: str) -> Any:
    fields = _field_map(cls)
    hints = _hints(cls)
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:  # already reported with its file by _check_keys; overrides land here
            raise ConfigError(f"{where}: unknown key `{key}`{_suggest(key, list(fields))}")
        fw = f"{where}.{key}" if where else key
        v = _convert(value, hints[key], fw)
        _check_value(v, fields[key], fw)
        kwargs[key] = v
    return cls(**kwargs)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"command line: override `{item}` must look like table.key=value (e.g. train.max_train_steps=100)")
    key, text = item.split("=", 1)
    path = key.strip().split(".")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text  # bare words are strings: model.vae=my_vae.safetensors
    return path, value


def _apply_override(raw: dict, path: list[str], value: Any, item: str) -> None:
    cls: type = Config
    node = raw
    for i, part in enumerate(path):
        fields = _field_map(cls)
        if part not in fields:
            table = ".".join(path[:i]) or "the top level"
            home = _home_of(part, cls)
            hint = f": {part} belongs in {home}" if home else _suggest(part, list(fields))
            raise ConfigError(f"command line: unknown key `{part}` in {table} (from `{item}`){hint}")
        tp = _hints(cls)[part]
        if i == len(path) - 1:
            # typed by the field: a number given for a string field stays a string
            if tp is str or (typing.get_origin(tp) in (typing.Union, types.UnionType) and str in typing.get_args(tp)):
                value = item.split("=", 1)[1] if not isinstance(value, str) else value
            node[part] = value
            return
        sub = _dataclass_of(tp)
        if sub is None or _is_list_of_dataclass(tp):
            raise ConfigError(f"command line: `{'.'.join(path[:i + 1])}` is not a table (from `{item}`)")
        node = node.setdefault(part, {})
        cls = sub


def _validate(cfg: Config) -> None:
    """Cross-field checks: impossible combinations, said before anything is loaded."""
    t, l, d = cfg.train, cfg.loss, cfg.data
    format_output_dir(cfg.output_dir)  # an unknown {placeholder} is said now, not after the data is indexed
    smp = cfg.sample
    if smp.sample_benchmark:  # euge-trainer's name of the prompt file
        if smp.sample_prompts and smp.sample_prompts != smp.sample_benchmark:
            raise ConfigError("sample.sample_prompts and sample.sample_benchmark (euge-trainer's name for it) are both "
                              "set; set one")
        smp.sample_prompts = smp.sample_benchmark
    if t.full_bf16 and t.full_fp16:
        raise ConfigError("train.full_bf16 and train.full_fp16 cannot both be true")
    if t.full_bf16 and t.mixed_precision != "bf16":
        raise ConfigError("train.full_bf16 requires train.mixed_precision = \"bf16\"")
    if t.full_fp16 and t.mixed_precision != "fp16":
        raise ConfigError("train.full_fp16 requires train.mixed_precision = \"fp16\"")
    if l.min_timestep >= l.max_timestep:
        raise ConfigError(f"loss.min_timestep ({l.min_timestep}) must be smaller than loss.max_timestep ({l.max_timestep})")
    if d.description_probability + d.description_with_tags_probability > 1:
        raise ConfigError(f"data.description_probability ({d.description_probability}) + "
                          f"data.description_with_tags_probability ({d.description_with_tags_probability}) must be <= 1")
    if d.min_bucket_reso > d.max_bucket_reso:
        raise ConfigError(f"data.min_bucket_reso ({d.min_bucket_reso}) is larger than data.max_bucket_reso ({d.max_bucket_reso})")
    res = d.resolution if isinstance(d.resolution, list) else [d.resolution]
    if len(res) not in (1, 2) or any(v < 64 or v % 8 for v in res):
        raise ConfigError(f"data.resolution = {d.resolution}: give N or [width, height], each >= 64 and a multiple of 8")
    for name in ("min_bucket_reso", "max_bucket_reso"):
        if getattr(d, name) % 8:
            raise ConfigError(f"data.{name} = {getattr(d, name)} must be a multiple of 8 (the VAE downsamples by 8)")
    if d.bucket_reso_step % 8:
        raise ConfigError(f"data.bucket_reso_step = {d.bucket_reso_step} must be a multiple of 8")
    if t.train_text_encoder and cfg.cache.cache_text_encoder_outputs:
        raise ConfigError("train.train_text_encoder cannot be combined with cache.cache_text_encoder_outputs "
                          "(cached outputs would not follow the trained encoders)")
    for i, g in enumerate(cfg.optimizer.param_groups):
        if set(g) - {"pattern", "lr"} or not isinstance(g.get("pattern"), str):
            raise ConfigError(f"optimizer.param_groups[{i}]: expected {{pattern = 'regex', lr = number}}, got {g!r}")
        try:
            re.compile(g["pattern"])
        except re.error as e:
            raise ConfigError(f"optimizer.param_groups[{i}].pattern {g['pattern']!r} is not a valid regex: {e}") from None
    _validate_network(cfg)
    _validate_low_vram(cfg)
    for spec in (d.caption_processor, d.description_processor, d.num_repeats_getter):
        if spec and ":" not in spec:
            raise ConfigError(f"data: hook `{spec}` must look like 'package.module:function' or 'path/file.py:function'")


def _validate_low_vram(cfg: Config) -> None:
    """Block swap and fp8 base weights: the combinations they need (training/blockswap.py, training/fp8.py)."""
    t, m = cfg.train, cfg.model
    if t.blocks_to_swap:
        if not t.gradient_checkpointing:
            raise ConfigError("train.blocks_to_swap needs train.gradient_checkpointing = true (without it autograd "
                              "keeps every block's weights for the backward pass and swapping saves nothing)")
        if t.fsdp:
            raise ConfigError("train.blocks_to_swap cannot be combined with train.fsdp (FSDP shards the blocks instead)")
        if not cfg.network.network_module and not t.fused_backward_pass:
            raise ConfigError("train.blocks_to_swap in a full fine-tune needs train.fused_backward_pass = true (each "
                              "parameter is stepped while its block is on the GPU)")
    if (m.fp8_base or m.fp8_base_unet) and not cfg.network.network_module:
        raise ConfigError("model.fp8_base / fp8_base_unet are for [network] (LoRA) runs: the frozen base is stored in "
                          "fp8; trained weights cannot be")


def _validate_network(cfg: Config) -> None:
    """[network] combinations that cannot work, said before anything is loaded."""
    n = cfg.network
    if not n.network_module:
        return
    if cfg.save.save_model_as != "safetensors":
        raise ConfigError(f"save.save_model_as = {cfg.save.save_model_as!r} is for full fine-tunes; [network] runs write "
                          "kohya-format LoRA .safetensors files")
    if n.network_train_unet_only and n.network_train_text_encoder_only:
        raise ConfigError("network.network_train_unet_only and network.network_train_text_encoder_only cannot both be true")
    if (n.network_module in ("loha", "lokr") or n.dora_wd) and (n.network_dropout or n.rank_dropout):
        raise ConfigError(f"network.network_dropout / rank_dropout act on LoRA's rank activations, which "
                          f"{'DoRA' if n.dora_wd else n.network_module} does not have; use module_dropout")
    if n.factor == 0:
        raise ConfigError("network.factor = 0: give -1 (the most balanced split) or a factor >= 1")
    if cfg.train.train_text_encoder:
        raise ConfigError("train.train_text_encoder is for full fine-tunes; with [network] the text encoders get adapters "
                          "unless network.network_train_unet_only = true")
    if cfg.cache.cache_text_encoder_outputs and not n.network_train_unet_only:
        raise ConfigError("cache.cache_text_encoder_outputs needs network.network_train_unet_only = true (cached outputs "
                          "would not follow text-encoder adapters)")
    for i, g in enumerate(n.block_args):
        if set(g) - {"pattern", "dim", "alpha", "lr"} or not isinstance(g.get("pattern"), str):
            raise ConfigError(f"network.block_args[{i}]: expected {{pattern = 'regex', dim = int, alpha = number, "
                              f"lr = number}} (all but pattern optional), got {g!r}")
    for name in ("target_modules", "conv_target_modules", "exclude_modules"):
        for pat in getattr(n, name):
            try:
                re.compile(pat)
            except re.error as e:
                raise ConfigError(f"network.{name}: {pat!r} is not a valid regex: {e}") from None
    for i, g in enumerate(n.block_args):
        try:
            re.compile(g["pattern"])
        except re.error as e:
            raise ConfigError(f"network.block_args[{i}].pattern {g['pattern']!r} is not a valid regex: {e}") from None


def load_config(path: str, overrides: Sequence[str] = ()) -> Config:
    """Read a TOML file (with its base chain), apply `table.key=value` overrides, validate strictly."""
    raw = _load_with_bases(path)
    for item in overrides:
        keys, value = _parse_override(item)
        _apply_override(raw, keys, value, item)
    cfg = _build(Config, raw, "")
    try:
        _validate(cfg)
    except ConfigError as e:  # combinations of values (from the file, its bases or the overrides): name the file
        raise ConfigError(f"{path}: {e}") from None
    return cfg


def config_from_dict(raw: dict) -> Config:
    """Build and validate a Config from a plain dict (same rules as files)."""
    _check_keys(raw, Config, "<dict>", table="")
    cfg = _build(Config, raw, "")
    _validate(cfg)
    return cfg


# ----------------------------------------------------------------------------------------------
# Printing (TOML) and docs
# ----------------------------------------------------------------------------------------------


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        r = repr(v)
        return r if any(c in r for c in ".en") else r + ".0"
    if isinstance(v, str):
        out = v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
        return f'"{out}"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items() if x is not None) + "}"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def _toml_key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else _toml_value(k)


def _is_table(v: Any) -> bool:
    return dataclasses.is_dataclass(v) or (isinstance(v, list) and bool(v) and dataclasses.is_dataclass(v[0]))


def _toml_table(obj: Any, path: str, lines: list[str]) -> None:
    """Append obj's values (None omitted), then its sub-tables ([path.name]) and arrays of tables ([[path.name]])."""
    nested = []
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if _is_table(v):
            nested.append((f"{path}.{f.name}" if path else f.name, v))
        elif v is not None:
            lines.append(f"{f.name} = {_toml_value(v)}")
    for name, v in nested:
        for item in v if isinstance(v, list) else [v]:
            lines.append(f"\n[[{name}]]" if isinstance(v, list) else f"\n[{name}]")
            _toml_table(item, name, lines)


def to_toml(cfg: Config) -> str:
    """The fully resolved config as TOML (None values, meaning 'inherit', are omitted)."""
    lines: list[str] = []
    _toml_table(cfg, "", lines)
    return "\n".join(lines) + "\n"


def to_dict(cfg: Any) -> dict:
    """Plain-dict form (JSON-serialisable)."""
    return dataclasses.asdict(cfg)


def reference_markdown() -> str:
    """The config reference, generated from the dataclass docs (docs/config-reference.md, so it cannot drift)."""
    out = []

    def table(cls: type, title: str) -> None:
        out.append(f"#### `{title}`\n\n{(cls.__doc__ or '').strip()}\n")
        out.append("| key | type | default | description |\n|---|---|---|---|")
        hints = _hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]) or _is_list_of_dataclass(hints[f.name]):
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            d = "—" if default is None else _toml_value(default)
            doc = f.metadata.get("help", "")
            if f.metadata.get("choices"):
                doc += " — one of " + ", ".join(f"`{c}`" for c in f.metadata["choices"])
            out.append(f"| `{f.name}` | {_type_name(hints[f.name])} | `{d}` | {doc} |")
        out.append("")

    table(Config, "top level")
    for f in dataclasses.fields(Config):
        sub = _dataclass_of(_hints(Config)[f.name])
        if sub is not None:
            table(sub, f"[{f.name}]")
            if sub is DataConfig:
                table(SubsetConfig, "[[data.subsets]]")
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------
# Hooks and output folder
# ----------------------------------------------------------------------------------------------


def resolve_hook(spec: str) -> Callable:
    """'pkg.module:function' or 'path/to/file.py:function' -> the callable. This RUNS USER CODE."""
    if ":" not in spec:
        raise ConfigError(f"hook `{spec}` must look like 'package.module:function' or 'path/file.py:function'")
    target, name = spec.rsplit(":", 1)
    if target.endswith(".py"):
        if not os.path.isfile(target):
            raise ConfigError(f"hook `{spec}`: file not found: {target}")
        mod_name = "_user_hook_" + os.path.splitext(os.path.basename(target))[0]
        s = importlib.util.spec_from_file_location(mod_name, target)
        assert s is not None and s.loader is not None
        module = importlib.util.module_from_spec(s)
        try:
            s.loader.exec_module(module)
        except Exception as e:
            raise ConfigError(f"hook `{spec}`: importing {target} failed: {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise ConfigError(f"hook `{spec}`: cannot import module `{target}`: {e}") from e
    fn = getattr(module, name, None)
    if fn is None:
        raise ConfigError(f"hook `{spec}`: `{target}` has no attribute `{name}`")
    if not callable(fn):
        raise ConfigError(f"hook `{spec}`: `{name}` is not callable")
    return fn


RUN_SUBDIRS = ("models", "samples", "logs", "state")


def format_output_dir(template: str, now: _dt.datetime | None = None) -> str:
    """Fill {date} (YYYYMMDD) and {time} (HHMMSS) in output_dir; other braces are an error."""
    now = now or _dt.datetime.now()
    try:
        return template.format(date=now.strftime("%Y%m%d"), time=now.strftime("%H%M%S"))
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"output_dir `{template}`: only {{date}} and {{time}} may be used ({e})") from None


def run_dirs(output_dir: str) -> dict[str, str]:
    """Paths of output_dir/{models,samples,logs,state} by name (nothing is created)."""
    return {name: os.path.join(output_dir, name) for name in RUN_SUBDIRS}


def make_run_dirs(output_dir: str) -> dict[str, str]:
    """Create output_dir/{models,samples,logs,state}; return their paths."""
    paths = run_dirs(output_dir)
    for p in paths.values():
        os.makedirs(p, exist_ok=True)
    return paths
