"""What the trainable sets share (train.FullFineTune, networks.lora.LoRATraining): their resume-state tensors.

A trainable set says what is trained: `trainee` (the module DDP / FSDP wraps), `state_dict()` (the trained weights
as full tensors), `export()`. A resume state holds the trained weights, the optimizer and the EMA:
- one process or DDP: full tensors, written by rank 0 (trained.safetensors, optimizer.pt, ema.safetensors);
- FSDP: one torch.distributed.checkpoint folder (training/resume.py) that every rank writes its own shards into, in
  parallel, holding the trained parameters only (a LoRA's frozen base stays out: adapters + optimizer + EMA).
  DCP reshards on load, so it resumes under any world size, with FSDP or without.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from core import dist
from training import resume as rstate


class TrainableSet:
    """Base of the trainable sets: resume states for `trainee` under `cfg.train.fsdp`."""

    cfg: Any
    trainee: nn.Module

    def state_dict(self) -> dict[str, torch.Tensor]:  # the trained weights, full tensors (unsharded runs)
        raise NotImplementedError

    def write_state(self, tmp: str, optimizer: torch.optim.Optimizer, ema: Any) -> dict[str, Any]:
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

    def load_state(self, st: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer, ema: Any) -> None:
        """Every rank, once the optimizer exists: a sharded state's weights, optimizer and EMA (this rank's part,
        resharded for this world size), or a full state's optimizer and EMA (its weights went in before wrapping)."""
        if "dcp" in st:
            rstate.load_sharded(st["dcp"], self.trainee, optimizer, ema)
            return
        rstate.load_full_optimizer(model, optimizer, st["optimizer"], self.cfg.train.fsdp)
        if ema is not None and "ema" in st:
            ema.load_state_dict(st["ema"])
