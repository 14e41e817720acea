"""What is trained: a trainable set (FullFineTune here, networks.lora.LoRATraining for adapters) and the module DDP /
FSDP wraps (Trainee: one micro-batch's text encoding and network forward).

A trainable set says what is trained: `trainee` (the module DDP / FSDP wraps), its optimizer groups, `state_dict()`
(the trained weights as full tensors), `export()`, what the EMA follows. A resume state holds the trained weights,
the optimizer and the EMA:
- one process or DDP: full tensors, written by rank 0 (trained.safetensors, optimizer.pt, ema.safetensors);
- FSDP: one torch.distributed.checkpoint folder (training/resume.py) that every rank writes its own shards into, in
  parallel, holding the trained parameters only (a LoRA's frozen base stays out: adapters + optimizer + EMA).
  DCP reshards on load, so it resumes under any world size, with FSDP or without.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable

import torch
from torch import nn

import models
from core import dist
from core.config import Config, OptimizerConfig
from training import resume as rstate
from training.ema import EMA
from training.optim import build_param_groups_for_models


class Trainee(nn.Module):
    """One micro-batch forward: (text encoding when trained) + the diffusion network."""

    def __init__(self, comp: Any, train_text_encoder: bool):
        super().__init__()
        self.network = comp.network
        trainable = models.family(comp.family).trainable_text_lr  # the encoders this family trains
        trained = {k: m for k, m in comp.text_encoders().items() if k in trainable} if train_text_encoder else {}
        self.text_encoders = nn.ModuleDict(trained)
        self.__dict__["comp"] = comp  # not a submodule: the frozen parts stay out of DDP

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, text: dict[str, torch.Tensor] | None,
                captions: list[str], sizes: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                text_drop: torch.Tensor | None = None) -> torch.Tensor:
        """The network's prediction for noised latents `x_t` at `t`; `text`: cached encoder outputs, or None to
        encode `captions` here (with gradients when the text encoders train); `text_drop` [B, encoders]: the
        per-encoder caption dropout of each sample (comp.drop_text zeroes those encoders' outputs)."""
        if text is None:
            with contextlib.nullcontext() if len(self.text_encoders) else torch.no_grad():
                text = self.comp.encode_text(captions, device=x_t.device)
        # cached (bf16) or frozen fp16 encoder outputs must not meet an fp32 network without autocast
        text = {k: v.float() for k, v in text.items()}
        if text_drop is not None:
            text = self.comp.drop_text(text, text_drop)
        cond = self.comp.conditioning(text, *sizes)
        return self.network(x_t, t, **cond)


class TrainableSet:
    """Base of the trainable sets: the interface train.py uses, and resume states for `trainee` under
    `cfg.train.fsdp`."""

    cfg: Config
    trainee: nn.Module          # what DDP / FSDP wraps
    ema_module: nn.Module       # what the EMA follows
    find_unused: bool           # DDP's find_unused_parameters

    def describe(self) -> str:
        """What is trained, for the log."""
        raise NotImplementedError

    def param_groups(self, opt_cfg: OptimizerConfig) -> list[dict]:
        """The optimizer's parameter groups."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trained weights, full tensors (unsharded runs)."""
        raise NotImplementedError

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """The trained weights back from state_dict()'s tensors."""
        raise NotImplementedError

    def previewing(self, model: nn.Module) -> Any:
        """A context in which the network can run preview forwards outside the trainee's forward."""
        raise NotImplementedError

    def export(self, path: str, meta: dict[str, str], ema: EMA | None, alone: bool = False) -> None:
        """The exported file(s) at `path`; `alone`: by this rank, nothing collective."""
        raise NotImplementedError

    def write_state(self, tmp: str, optimizer: torch.optim.Optimizer, ema: EMA | None) -> dict[str, Any]:
        """Every rank (collective), into the state's temporary folder `tmp`. FSDP: each rank writes its shards
        into tmp/dcp/; else rank 0 holds the full tensors. Every rank hashes the files it wrote. Returns
        training.resume.write_state's keyword arguments for rank 0: trained / optimizer / ema (full states) and `hashed`."""
        full: dict[str, Any] = {}
        if self.cfg.train.fsdp:
            rstate.write_sharded(tmp, rstate.sharded_state_dict(self.trainee, optimizer, ema))
        elif dist.is_main():
            full = {"trained": self.state_dict(), "optimizer": optimizer.state_dict(),
                    "ema": ema.state_dict() if ema is not None else None}
        mine = rstate.hash_files(tmp, rstate.rank_files(tmp, dist.rank()))
        return {**full, "hashed": {k: v for part in dist.all_gather_object(mine) for k, v in part.items()}}

    def load_state(self, st: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
                   ema: EMA | None) -> None:
        """Every rank, once the optimizer exists: a sharded state's weights, optimizer and EMA (this rank's part,
        resharded for this world size), or a full state's optimizer and EMA (its weights went in before wrapping)."""
        if "dcp" in st:
            restored = rstate.load_sharded(st["dcp"], self.trainee, optimizer, ema)
            if ema is not None and not restored:
                # saved without EMA: it starts from the resumed weights, as with a full state (made after they went in)
                ema.copy_from(self.ema_module)
            return
        rstate.load_full_optimizer(model, optimizer, st["optimizer"], self.cfg.train.fsdp)
        if ema is not None and "ema" in st:
            ema.load_state_dict(st["ema"])


class FullFineTune(TrainableSet):
    """The trainable set of a full fine-tune: the whole network, plus the CLIP text encoders with
    train.train_text_encoder. The same interface as networks.lora.LoRATraining: the module DDP / FSDP wraps
    (`trainee`), optimizer groups, the weights of a resume state (sharded under FSDP), the export, what the EMA
    follows."""

    def __init__(self, cfg: Config, comp: Any, warn: Callable[[str], None]):
        self.cfg, self.comp = cfg, comp
        freeze(comp)
        comp.network.requires_grad_(True)
        self.trainee = Trainee(comp, cfg.train.train_text_encoder)
        self.trainee.text_encoders.requires_grad_(True).train()
        self.ema_module: nn.Module = comp.network
        self.find_unused = len(self.trainee.text_encoders) > 0
        self._complete: dict[str, Any] = {}  # the parts not loaded for training, kept once loaded for the first export
        if not cfg.train.train_text_encoder and (cfg.optimizer.learning_rate_te1 or cfg.optimizer.learning_rate_te2):
            warn("optimizer.learning_rate_te1 / _te2 are set but train.train_text_encoder is false: not used")

    def describe(self) -> str:
        return f"the network, text encoders: {list(self.trainee.text_encoders) or 'none'}"

    def param_groups(self, opt_cfg: OptimizerConfig) -> list[dict]:
        return trained_param_groups(self.trainee, opt_cfg)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The network and trained text encoders, full tensors (unsharded runs)."""
        return dict(self.trainee.state_dict())

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        self.trainee.load_state_dict(sd, strict=True)

    def previewing(self, model: nn.Module) -> Any:
        return contextlib.nullcontext()

    def export(self, path: str, meta: dict[str, str], ema: EMA | None, alone: bool = False) -> None:
        """The whole checkpoint in the original single-file layout (every part) and its -ema twin, written by rank 0
        one tensor at a time (FSDP: every rank gathers each tensor in turn, collective); `alone`: by this rank,
        nothing collective (a crash under DDP: the other ranks may be blocked)."""
        from training.exports import write_export
        write = alone or dist.is_main()
        if not (write or self.cfg.train.fsdp):
            return
        whole = with_all_parts(self.comp, self.cfg, self._complete) if write else self.comp
        write_export(whole, path, self.cfg, meta, ema, gather=dist.full_tensor if self.cfg.train.fsdp else None,
                     write=write)


def freeze(comp: Any) -> None:
    """Every loaded part frozen; the network in train mode (gradient checkpointing runs only in training mode)."""
    for m in comp.parts().values():
        m.requires_grad_(False).eval()
    comp.network.train()


def make_trainable(cfg: Config, comp: Any, device: torch.device, warn: Callable[[str], None]) -> TrainableSet:
    """FullFineTune, or LoRA / LoCon adapters when [network] network_module is set."""
    if not cfg.network.network_module:
        return FullFineTune(cfg, comp, warn)
    from networks.lora import LoRATraining
    freeze(comp)
    return LoRATraining(cfg, comp, Trainee(comp, train_text_encoder=not cfg.network.network_train_unet_only),
                        device, warn)


def trained_param_groups(trainee: Trainee, opt_cfg: OptimizerConfig) -> list[dict]:
    """Optimizer groups: the network at learning_rate, trained text encoders at theirs, regex groups within each."""
    named = {"network": list(trainee.network.named_parameters())}
    lrs = {"network": opt_cfg.learning_rate}
    lr_fields = models.family(trainee.comp.family).trainable_text_lr
    for name, te in trainee.text_encoders.items():
        named[name] = list(te.named_parameters())
        te_lr = getattr(opt_cfg, lr_fields[name])
        lrs[name] = te_lr if te_lr is not None else opt_cfg.learning_rate
    return build_param_groups_for_models(named, opt_cfg, lrs)


def with_all_parts(comp: Any, cfg: Config, loaded: dict[str, Any]) -> Any:
    """comp plus the parts training did not load that its exports hold (the VAE, text encoders:
    training.exports.export_layout), on the CPU, so exports are whole checkpoints. `loaded` keeps them between
    exports (they are frozen)."""
    from training.exports import export_layout
    family = models.family(comp.family)
    inside, _ = export_layout(cfg, family)
    missing = [p for p in inside if getattr(comp, p) is None and p not in loaded]
    if missing:
        extra = models.from_config(cfg.model, device="cpu", seed=cfg.seed, parts=missing,
                                   dtype=models.DTYPES[cfg.save.save_precision])
        loaded.update({p: getattr(extra, p) for p in missing})
    fill = {p: m for p, m in loaded.items() if getattr(comp, p) is None}
    return dataclasses.replace(comp, **fill) if fill else comp
