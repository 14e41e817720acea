"""The model files a run writes: `models/<output_name><tag>` in the original single-file layout (or a diffusers
folder, or a LoRA file for adapters) and, with an EMA, its `-ema` twin; modelspec and the run's training metadata
in the header; the newest save.save_last_n periodic ones kept. Resumable states are training/checkpointer.py's."""
from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any, Callable

import models
from core import dist
from core.config import Config
from core.fsio import is_temp, remove_quietly
from models.checkpoint import save_safetensors_streamed
from training import crash, run_metadata
from training.checkpointer import Progress
from training.ema import EMA

if TYPE_CHECKING:  # training/trainable.py writes its exports through write_export below
    from training.trainable import TrainableSet


class Exporter:
    """Writes the run's exports under a tag ("-step00000100", "-epoch0002", "-interrupted", "" at the end) and
    remembers the last one, so previews of the same weights carry its A1111 `Model hash`."""

    def __init__(self, cfg: Config, models_dir: str, trainable: TrainableSet, ema: EMA | None,
                 train_meta: dict[str, str], log: logging.Logger):
        self.cfg, self.models_dir, self.trainable, self.ema = cfg, models_dir, trainable, ema
        self.train_meta, self.log = train_meta, log
        self.last_step, self.last_path = -1, ""

    def path(self, tag: str) -> str:
        """Where the export with this tag goes."""
        return os.path.join(self.models_dir, self.cfg.save.output_name + tag + export_suffix(self.cfg))

    def export(self, tag: str, progress: Progress) -> None:
        """Every rank (collective under FSDP: every rank gathers each tensor in turn); rank 0 writes one tensor at a
        time, then prunes the older periodic exports."""
        path = self.path(tag)
        meta = run_metadata.export_metadata(self.train_meta, step=progress.step, epoch=progress.epoch) \
            if dist.is_main() else {}
        self.trainable.export(path, meta, self.ema)
        if dist.is_main():
            self.last_step, self.last_path = progress.step, path
            self.log.info(f"exported {path}")
            prune_exports(self.models_dir, self.cfg.save.output_name, self.cfg.save.save_last_n)
        dist.barrier()

    def export_alone(self, tag: str, progress: Progress) -> None:
        """This rank alone, nothing collective (after a crash under DDP the other ranks may be blocked)."""
        path = self.path(tag)
        meta = run_metadata.export_metadata(self.train_meta, step=progress.step, epoch=progress.epoch)
        self.trainable.export(path, meta, self.ema, alone=True)
        self.log.warning(f"exported {path}")

    def hash_at(self, step: int) -> str:
        """Short hash of the file holding the weights previews at `step` use (the EMA file when kept), or ""."""
        if step != self.last_step:
            return ""
        from core.hashes import short_hash
        path = ema_twin(self.last_path) if self.ema is not None else self.last_path
        return short_hash(path) if os.path.isfile(path) else ""  # a diffusers folder has no A1111 hash


# Text encoders an export may hold or leave out: part -> ([save] option, kohya's --save_clip / --save_t5xxl; the
# [model] option that gives the part as a file of its own, also the suffix of a file written beside the export,
# kohya's sd3_train_utils.save_models names). Every other part (the network, the VAE, SDXL's encoders) is always inside.
SEPARABLE = {"clip_l": ("save_clip", "clip_l"), "clip_g": ("save_clip", "clip_g"), "t5": ("save_t5xxl", "t5xxl")}


def export_layout(cfg: Config, family: models.Family) -> tuple[list[str], list[str]]:
    """(the parts inside each exported file, the trained parts written beside it as <name>_<clip_l|clip_g>.safetensors).
    A separable text encoder is inside as save.save_clip / save_t5xxl say; unset: as it was loaded (inside unless it
    came as its own model.* file, so an SD3.5 export is not 9.8 GB of the user's own T5-XXL larger). A trained
    encoder left out is written beside the export (its weights exist nowhere else). Diffusers folders hold every
    part."""
    path = cfg.model.pretrained_model_name_or_path
    held = parts_in_checkpoint(path, family) if path else set(family.prefix)  # a preset is built whole
    inside, beside = [], []
    for part in family.prefix:
        if part in family.optional_parts and not cfg.model.use_t5:
            continue
        rule = SEPARABLE.get(part)
        if rule is None or cfg.save.save_model_as != "safetensors":
            inside.append(part)
            continue
        option, source = rule
        wanted = getattr(cfg.save, option)
        if wanted is None:  # as it came: inside the checkpoint (and not replaced by a file of its own)
            wanted = part in held and not (path and getattr(cfg.model, source))
        if wanted:
            inside.append(part)
        elif cfg.train.train_text_encoder and part in family.trainable_text_lr:
            beside.append(part)
    return inside, beside


def parts_in_checkpoint(path: str, family: models.Family) -> set[str]:
    """The parts a checkpoint holds (keys under their prefix), from its header."""
    keys = models.open_checkpoint(path).keys()
    return {p for p, prefix in family.prefix.items() if any(k.startswith(prefix) for k in keys)}


def beside_path(path: str, part: str) -> str:
    """`x.safetensors` -> `x_clip_l.safetensors` (kohya's names for SD3 text encoders saved beside a checkpoint)."""
    return path[: -len(".safetensors")] + f"_{SEPARABLE[part][1]}.safetensors"


def write_export(whole: Any, path: str, cfg: Config, meta: dict[str, str], ema: EMA | None,
                 gather: Callable[[Any], Any] | None, write: bool) -> None:
    """The exported model and, with an EMA, `-ema.safetensors` (the EMA's weights in the network's place), with
    modelspec from [save] and the run's training metadata; the parts export_layout leaves out are not in them,
    trained ones are written beside the export (shared by its EMA twin: the EMA follows the network). Streamed
    (models.save): one tensor gathered by `gather` (FSDP: collective, every rank calls this with the same network
    keys; `write` on rank 0 only) and written at a time."""
    s = cfg.save
    family = models.family(whole.family)
    inside, beside = export_layout(cfg, family)
    left_out = tuple(whole.prefix[p] for p in whole.prefix if p not in inside)
    kw = {"resolution": cfg.data.resolution, "title": s.metadata_title, "gather": gather, "write": write,
          "info": {"author": s.metadata_author, "description": s.metadata_description, "license": s.metadata_license,
                   "tags": s.metadata_tags}}

    def parts_inside(sd: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in sd.items() if not (left_out and k.startswith(left_out))}

    models.save(whole, path, s.save_precision, state_dict=parts_inside(whole.export_state_dict()),
                extra_metadata=meta, save_as=s.save_model_as, **kw)
    for part in beside:  # the part's own keys (ComfyUI's separate text-encoder files), no modelspec
        save_safetensors_streamed(getattr(whole, part).state_dict(), beside_path(path, part),
                                  models.DTYPES[s.save_precision], gather=gather, write=write)
    if ema is not None:  # the EMA's weights (FSDP: its shards) in the network's place
        prefix = whole.prefix[family.network]
        sd = {**whole.export_state_dict(), **{prefix + k: v for k, v in ema.state_dict().items()}}
        models.save(whole, ema_twin(path), s.save_precision, state_dict=parts_inside(sd), save_as=s.save_model_as,
                    extra_metadata={**meta, "sdtrain.ema_decay": str(ema.decay)}, **kw)


def export_suffix(cfg: Config) -> str:
    """File suffix of exports: .safetensors, or none for a diffusers folder (LoRA files are always .safetensors)."""
    return ".safetensors" if cfg.network.network_module else models.EXPORT_SUFFIX[cfg.save.save_model_as]


def ema_twin(path: str) -> str:
    """The EMA export beside an export: `x.safetensors` -> `x-ema.safetensors`, folder `x` -> `x-ema`."""
    return path[: -len(".safetensors")] + "-ema.safetensors" if path.endswith(".safetensors") else path + "-ema"


def _export_like(model_dir: str, f: str) -> bool:
    """An export file, or a diffusers folder (not a temporary); not a text encoder written beside an export."""
    if f.endswith(".safetensors"):
        return not f[: -len(".safetensors")].endswith(tuple(f"_{src}" for _, src in SEPARABLE.values()))
    return os.path.isdir(os.path.join(model_dir, f)) and not is_temp(f)


def prune_exports(model_dir: str, name: str, keep: int) -> None:
    """Keep the newest `keep` periodic exports (step/epoch files); 0 keeps all."""
    if keep <= 0:
        return
    keep_always = (crash.INTERRUPTED, crash.CRASHED)
    periodic = sorted((f for f in os.listdir(model_dir) if f.startswith(name + "-") and _export_like(model_dir, f)
                       and "-ema" not in f and not f.removesuffix(".safetensors").endswith(keep_always)),
                      key=lambda f: (os.stat(os.path.join(model_dir, f)).st_mtime_ns, f))  # step and epoch files mixed
    for f in periodic[:-keep]:
        beside = [beside_path(f, part) for part in SEPARABLE] if f.endswith(".safetensors") else []
        for p in (f, ema_twin(f), *beside):
            remove_quietly(os.path.join(model_dir, p))
