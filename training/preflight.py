"""What a run will read later, checked before anything is written (issue #28.1 / #28.7): a wrong path or a setting
that cannot work ends the run with one line at start, not hours later at the first export, preview or resume.

- model files: every part the run loads now or reads later (a full fine-tune's exports are whole checkpoints: the
  VAE and text encoders training never loaded are read at the first export) has a source, and each source's header
  holds that part's exact keys and shapes (models.from_config(check_only=True): no tensor is read);
- the other files: hooks (imported), a resume state folder (its marker and files present), LoRA network_weights,
  the T5 tokenizer;
- data sources and bucket settings (data.sources.resolve_subsets, rank 0 only: it lists folders), the optimizer's
  name, learning rates that train nothing, preview sizes the network cannot render.

train.py calls `check_run` from its settings step; generate.py calls `check_prompt_sizes` once its model is loaded.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import models
from core.config import Config, ConfigError, resolve_hook
from training.exports import SEPARABLE, export_layout
from training.optim import check_optimizer_type

# model.<option> -> the parts it gives (models.load's separate files)
SEPARATE_FILES = {"vae": ("vae",), "clip_l": ("te1", "clip_l"), "clip_g": ("clip_g",), "t5xxl": ("t5",)}
HOOKS = ("caption_processor", "description_processor", "num_repeats_getter")


def check_run(cfg: Config, family: models.Family, prompts: Sequence[Any]) -> list[str]:
    """Every rank, before the run folder is created: the files and settings above. Raises ValueError (a
    CheckpointError for model files) with one line naming the key and the file; returns notes for the run log
    (settings that are allowed but probably not meant)."""
    notes = check_model_files(cfg, family, parts_needed(cfg, family, bool(prompts)))
    check_other_files(cfg)
    check_prompt_sizes(prompts, preview_max_side(cfg, family), "sample.sample_prompts")
    check_optimizer_type(cfg.optimizer)
    notes += learning_rate_notes(cfg, family) + prediction_notes(cfg, family)
    return notes


def check_data(cfg: Config) -> None:
    """Rank 0, before the run folder is created: every data source exists and the bucket settings fit
    (the checks the index build would make after the run folder exists). Raises ValueError / OSError."""
    from data.buckets import BucketSettings
    from data.sources import resolve_subsets
    BucketSettings.from_data_cfg(cfg.data)
    resolve_subsets(cfg.data)


def parts_needed(cfg: Config, family: models.Family, previews: bool) -> list[str]:
    """The model parts a run reads at some point: those train.load_components loads (the VAE without a latent store
    or for previews / own validation images, the text encoders unless their outputs are cached and none trains), and
    for a full fine-tune those its exports hold (training.exports.export_layout: read at the first export)."""
    own_val = bool(cfg.validation.image_dirs or cfg.validation.metadata_files)
    need_text = not cfg.cache.cache_text_encoder_outputs or previews or own_val or cfg.train.train_text_encoder
    parts = [family.network] + (["vae"] if not cfg.cache.cache_dir or previews or own_val else []) \
        + (list(family.text_encoders) if need_text else [])
    if not cfg.network.network_module:
        parts += export_layout(cfg, family)[0]
    return [p for p in family.prefix if p in parts and (cfg.model.use_t5 or p not in family.optional_parts)]


def check_model_files(cfg: Config, family: models.Family, parts: Sequence[str]) -> list[str]:
    """Each separately given part file opens (named by its key), then the sources of `parts` hold exactly the
    keys and shapes loading expects. Returns notes on files the family has no use for."""
    m, notes = cfg.model, []
    for option, names in SEPARATE_FILES.items():
        path = getattr(m, option)
        if not path:
            continue
        if not any(n in family.prefix for n in names):
            notes.append(f"model.{option} is set, but {family.name} models have no such part: not used")
            continue
        try:
            models.open_checkpoint(path)
        except models.CheckpointError as e:
            raise models.CheckpointError(f"model.{option}: {e}") from None
    try:
        models.from_config(m, parts=list(parts), check_only=True)
    except models.CheckpointError as e:
        raise models.CheckpointError(" ".join(str(e).split())) from None  # a key listing: one line
    for option in sorted({o for o, _ in SEPARABLE.values()}):
        if getattr(cfg.save, option) is not None and not any(
                SEPARABLE[p][0] == option for p in family.prefix if p in SEPARABLE):
            notes.append(f"save.{option} is set, but {family.name} exports always hold their text encoders: not used")
    return notes


def check_other_files(cfg: Config) -> None:
    """Hooks import, the resume state's files are there, LoRA network_weights and the T5 tokenizer exist."""
    for name in HOOKS:
        spec = getattr(cfg.data, name)
        if spec:
            try:
                resolve_hook(spec)
            except ConfigError as e:
                raise ValueError(f"data.{name}: {e}") from None
    resume = cfg.train.resume
    if resume and resume != "auto":
        from training import resume as rstate
        reason = rstate.check_state_files(resume)
        if reason:
            raise ValueError(f"train.resume: cannot resume from {resume}: {reason}")
    weights = cfg.network.network_weights
    if weights and cfg.network.network_module:
        try:
            models.checkpoint.SafeTensorFile(weights)
        except models.CheckpointError as e:
            raise ValueError(f"network.network_weights: {e}") from None
    if cfg.model.t5_tokenizer and not os.path.isfile(cfg.model.t5_tokenizer):
        raise ValueError(f"model.t5_tokenizer: file not found: {cfg.model.t5_tokenizer}")


def network_max_side(net_cfg: Any) -> int | None:
    """The largest image side the network can render, in pixels: an MMDiT's position table covers
    pos_embed_max_size patches per side (models/mmdit.py cropped_pos_embed); a UNet has no such limit (None)."""
    size = getattr(net_cfg, "pos_embed_max_size", None)
    return size * net_cfg.patch_size * 8 if size else None


def preview_max_side(cfg: Config, family: models.Family) -> int | None:
    """network_max_side of the run's network, from the checkpoint's header or the preset (nothing loaded)."""
    path, preset = cfg.model.pretrained_model_name_or_path, cfg.model.model_preset
    if path:
        shapes = models.open_checkpoint(path).shapes()
        net_cfg = family.configs_from_shapes(shapes).get(family.network)
    else:
        net_cfg = family.preset_configs(preset).get(family.network) if preset else None
    return network_max_side(net_cfg) if net_cfg is not None else None


def check_prompt_sizes(prompts: Sequence[Any], max_side: int | None, where: str) -> None:
    """Preview / generation sizes the network can render (diffusion.prompts checks the absolute limits)."""
    if max_side is None:
        return
    for p in prompts:
        if max(p.width, p.height) > max_side:
            raise ValueError(f"{where}: prompt {p.index + 1} ({p.prompt[:40]!r}): {p.width}x{p.height} is larger "
                             f"than this model renders ({max_side} px per side: its position table)")


def learning_rate_notes(cfg: Config, family: models.Family) -> list[str]:
    """Learning rates of 0: an error when nothing would train, a note naming each part that would not."""
    o, n = cfg.optimizer, cfg.network
    lrs: dict[str, float] = {}
    if n.network_module:
        if not n.network_train_text_encoder_only:
            lrs["network adapters (network.unet_lr)"] = o.learning_rate if n.unet_lr is None else n.unet_lr
        if not n.network_train_unet_only:
            lrs["text-encoder adapters (network.text_encoder_lr)"] = \
                o.learning_rate if n.text_encoder_lr is None else n.text_encoder_lr
    else:
        lrs[f"the {family.network} (optimizer.learning_rate)"] = o.learning_rate
        if cfg.train.train_text_encoder:
            for part, fld in family.trainable_text_lr.items():
                value = getattr(o, fld)
                lrs[f"{part} (optimizer.{fld})"] = o.learning_rate if value is None else value
    zero = [name for name, lr in lrs.items() if lr == 0]
    if len(zero) == len(lrs):
        raise ValueError(f"every learning rate is 0 ({', '.join(zero)}): nothing would train")
    return [f"learning rate 0: {name} does not train" for name in zero]


# kohya warns the same (library/train_util.py verify_training_args): "zero_terminal_snr is enabled, but
# v_parameterization is not enabled. training will be unexpected". ComfyUI reads `ztsnr` only inside its v-prediction
# branch (comfy/supported_models.py SDXL.model_type), so it samples such an export as a plain epsilon model.
ZTSNR_EPSILON = ("loss.zero_terminal_snr = true with epsilon prediction (model.v_parameterization = false): at the last "
                 "timestep the noised latent is pure noise, so epsilon prediction learns nothing there (Lin et al. "
                 "2023, sec. 3.2: zero terminal SNR needs v-prediction). The exports carry `ztsnr` without `v_pred`: "
                 "generate.py and sdtrain read it, ComfyUI ignores it and samples them as plain epsilon models with the "
                 "usual schedule (docs/checkpoints.md); set model.v_parameterization = true to train a v-prediction "
                 "zero-terminal-SNR model")


def prediction_notes(cfg: Config, family: models.Family) -> list[str]:
    """Zero terminal SNR without v-prediction: allowed, as kohya allows it, with a warning."""
    if family.objective == "ddpm" and cfg.loss.zero_terminal_snr and not cfg.model.v_parameterization:
        return [ZTSNR_EPSILON]
    return []
