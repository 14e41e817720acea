"""What a resume restores, saved and loaded as one: the run's progress, every rank's RNG, the trained weights, the
optimizer, the EMA, the scheduler, the stepper's loss scale, the loss recorder, the run id and the resolved
config. The folder format (files, COMPLETE marker, atomic rename, pruning, runs) is training/resume.py's."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from core import dist
from core.config import Config, to_dict
from training import crash, resume as rstate
from training.ema import EMA
from training.steplog import StepLog
from training.steppers import Stepper

if TYPE_CHECKING:
    from training.trainable import TrainableSet


@dataclass
class Progress:
    """Where a run stands: optimizer steps done, the epoch, the global batches of this epoch consumed (valid for any
    world size: every rank runs the same number), and the non-finite steps skipped in a row."""

    step: int = 0
    epoch: int = 0
    cursor: int = 0
    bad_steps: int = 0


def read_resume_state(path: str | None, trainable: TrainableSet) -> dict[str, Any] | None:
    """The state to resume (None: a fresh start), read once on every rank. A full (unsharded) state's trained
    weights go into the trainable set here, before wrapping: FSDP then shards them like freshly loaded weights.
    Everything else (and a sharded state's weights) waits for Checkpointer.load."""
    if path is None:
        return None
    saved = rstate.read_state(path, dist.rank())
    saved["path"] = path
    if "trained" in saved:
        trainable.load_state_dict(saved.pop("trained"))  # copied into place: not kept twice
    return saved


class Checkpointer:
    """The resumable state of a run. `save` writes one (every rank, collective: FSDP ranks write their shards),
    `save_alone` one from this rank only (a crash: nothing collective), `load` restores one; `progress` is the
    Progress the loop advances."""

    def __init__(self, cfg: Config, state_dir: str, run_id: str, progress: Progress, trainable: TrainableSet,
                 model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, stepper: Stepper,
                 steplog: StepLog, ema: EMA | None, log: logging.Logger):
        self.cfg, self.state_dir, self.run_id, self.progress = cfg, state_dir, run_id, progress
        self.trainable, self.model, self.optimizer, self.scheduler = trainable, model, optimizer, scheduler
        self.stepper, self.steplog, self.ema, self.log = stepper, steplog, ema, log

    def progress_record(self) -> dict[str, Any]:
        """progress.json: progress, world size, scheduler / loss scaler / loss recorder state, config, run id."""
        p = self.progress
        return {"step": p.step, "epoch": p.epoch, "cursor": p.cursor, "world_size": dist.world_size(),
                "bad_steps": p.bad_steps, "scheduler": self.scheduler.state_dict(), "scaler": self.stepper.state_dict(),
                "loss_recorder": self.steplog.state_dict(), "config": to_dict(self.cfg), "run_id": self.run_id}

    def save(self) -> None:
        """Every rank: its RNG and (FSDP) its shards into one temporary folder; rank 0 the rest, the COMPLETE marker
        and the rename; the run's older states pruned."""
        master, step = dist.is_main(), self.progress.step
        tmp = dist.broadcast_object(rstate.tmp_dir_for(self.state_dir, step) if master else None)
        rstate.write_rank_rng(tmp, dist.rank())
        files = self.trainable.write_state(tmp, self.optimizer, self.ema)  # FSDP: every rank its shards, in parallel
        if master:
            final = os.path.join(self.state_dir, f"step-{step:08d}")
            rstate.write_state(tmp, final, progress=self.progress_record(), **files)
            rstate.prune_states(self.state_dir, self.cfg.save.save_last_n_states, self.run_id, just_written=final)
            self.log.info(f"saved resumable state {final}")
        dist.barrier()

    def save_alone(self) -> None:
        """A state from this rank's replica and RNG alone (training/crash.py: after a crash under DDP)."""
        final = crash.write_state_alone(self.state_dir, self.progress.step, dist.rank(),
                                        trained=self.trainable.state_dict(), optimizer=self.optimizer.state_dict(),
                                        progress=self.progress_record(),
                                        ema=self.ema.state_dict() if self.ema is not None else None)
        self.log.warning(f"saved resumable state {final}")

    def load(self, saved: dict[str, Any] | None) -> None:
        """Every rank, once the optimizer exists: the rest of a state read by read_resume_state (None: nothing).
        The RNG is restored only under the world size it was saved with (else every rank's stream is re-derived).
        `saved` is emptied afterwards, so its tensors are not held for the whole run."""
        if saved is None:
            return
        self.trainable.load_state(saved, self.model, self.optimizer, self.ema)  # (sharded weights: resharded by DCP)
        pr = saved["progress"]
        self.stepper.load_state_dict(pr.get("scaler"))
        self.scheduler.load_state_dict(pr["scheduler"])
        self.steplog.recorder.load_state_dict(pr["loss_recorder"])
        p = self.progress
        p.step, p.epoch, p.bad_steps, p.cursor = pr["step"], pr["epoch"], pr["bad_steps"], pr["cursor"]
        if pr["world_size"] == dist.world_size():
            if saved["rng"] is None:  # a state one rank wrote alone after a crash (training/crash.py)
                self.log.warning(f"the state holds the RNG of rank(s) {pr.get('rng_ranks')} only: rank {dist.rank()}'s "
                                 "stream is re-derived")
            rstate.restore_rng(saved["rng"])
        else:
            self.log.warning(f"resuming with {dist.world_size()} processes (state saved with {pr['world_size']}): the "
                             f"epoch continues at global batch {p.cursor}; per-rank RNG streams are re-derived")
        self.log.info(f"resumed from {saved['path']}: step {p.step}, epoch {p.epoch}")
        saved.clear()
