#!/usr/bin/env python
"""Fine-tune SDXL or SD3 / SD3.5 (full fine-tune, DDP or FSDP2).

    torchrun --nproc_per_node=4 train.py cfg.toml [table.key=value ...]
    python train.py cfg.toml                      # one process
    python train.py cfg.toml --print-config       # resolved config as TOML, then exit
    python train.py cfg.toml --plan [--gpu-memory 24GiB]   # the memory plan (training/planner.py), then exit

Reads latents from the store written by cache.py ([cache] cache_dir) or encodes images on the fly.
Writes output_dir/{models,samples,logs,state}. Resume with train.resume = "auto".

main() reads top to bottom: settings, run folder, data, model, wrapping, optimizer, resume, then the loop (step,
logging, saving, sampling, stopping). The state lives in small objects: Progress and the Checkpointer
(training/checkpointer.py: what a resume restores), the Exporter (training/exports.py: model files), the Stepper
(training/steppers.py: how the optimizer steps), Previews and StopFlags (below).
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn

import models
from core import cli, dist
from core.config import (Config, ModelConfig, SampleConfig, SaveConfig, TrainConfig, format_output_dir,
                         make_run_dirs, run_dirs, to_dict, to_toml)
from core.dist import mix_seed
from core.fsio import atomic_write, check_dir_setting, clean_stale_temps, describe_os_error
from core.lock import DirLock, LockBusy, acquire_in_step, releases_locks
from core.metrics import MetricsWriter, check_tensorboard, check_wandb, group_lrs, peak_memory, setup_logging, wandb_run
from data.buckets import BucketSettings
from data.index import load_or_build_index
from data.loader import NoReadableData, batches_per_epoch, make_loader, usable_rows
from data.sources import require_store_for_containers
from data.store import LatentStore
from diffusion.objectives import Objective, build_objective
from models.family import host_to_device
from training import blockswap, crash, fp8, planner, preflight, run_metadata, speed, summary
from training import resume as rstate
from training.checkpointer import Checkpointer, Progress, read_resume_state
from training.ema import EMA
from training.exports import Exporter, export_suffix
from training.optim import (LossRecorder, OptimizerMode, build_optimizer, build_scheduler, check_fsdp_optimizer,
                            check_optimizer_type, check_schedule_free, scheduler_kwargs)
from training.steplog import StepLog, mean_loss
from training.steppers import Stepper, check_fused_settings, make_stepper
from training.trainable import TrainableSet, make_trainable
from training.validation import HeldOut, Validator, check_validation_settings, held_out

DTYPES = {"no": None, **models.DTYPES}  # config precision names -> torch dtypes ("no": no autocast)
EXIT_BAD_LOSS = 3
PLAN_FLAGS = (("--plan", "print the memory plan (weights, gradients, optimizer, activations; built on the meta "
                         "device, nothing loaded) and exit"),
              ("--gpu-memory", {"metavar": "SIZE", "help": "memory to plan for, e.g. 24GiB (default: this GPU's); "
                                "a run warns when its estimate exceeds it"}))
BAD_STEPS_STOP = ("{n} consecutive steps with a non-finite loss or gradient: stopping at step {step}. A resumable "
                  "state was saved; lower the learning rate or check the data / precision settings.")


@cli.one_line_errors("train.py")
@releases_locks
def main(argv: list[str] | None = None) -> int:
    """One training run (module docstring); returns the exit status (0, or EXIT_BAD_LOSS)."""
    cfg, args = cli.parse(argv, "train.py", __doc__ or "", extra_flags=PLAN_FLAGS)
    t_start = time.perf_counter()
    info = dist.init()
    device, master = info.device, dist.is_main()

    # ---- settings that only make sense together, checked before anything is created or loaded; precision
    cfg, family, notes, objective, prompts = resolve_settings(cfg, info.world_size, args.config, plan=args.plan)
    allowed = functools.partial(check_combination, family=family, world_size=info.world_size)  # for suggestions
    if args.plan:  # before anything is written or loaded: the parts are built on the meta device
        return planner.plan_command(cfg, info.world_size, device, args.gpu_memory, allowed) if master else 0
    amp_dtype, weight_dtype = DTYPES[cfg.train.mixed_precision], trained_weight_dtype(cfg.train)
    autocast = functools.partial(torch.autocast, device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext

    # ---- run folder (the {date}/{time} of rank 0, for every rank), run log, run id and the state to resume
    run = open_run(cfg, notes)
    log, paths = run.log, run.paths
    metrics = MetricsWriter(paths["logs"], master, cfg.log.tensorboard,
                            wandb=wandb_run(cfg.log, run.out_dir, run.run_id, to_dict(cfg)))
    seed_run(cfg, info.rank)

    # ---- data: index built once on rank 0 and shared (before any model is loaded); latents read lazily
    data = load_data(cfg, paths["state"], info.world_size)
    total_steps, accum = data.total_steps, cfg.train.gradient_accumulation_steps

    # ---- model: the memory it will need (estimated on the meta device first), the network, the frozen (or
    # trained) text encoders, the VAE when needed; what is trained; the frozen base in fp8 (model.fp8_base)
    memory = planner.startup_line(cfg, info.world_size, device, args.gpu_memory, log.warning, allowed) \
        if master else ""
    comp = load_components(cfg, family, prompts, device, weight_dtype, data.validation.needs_encoders)
    trainable = build_trainable(cfg, comp, device, log)
    fp8.apply(comp, fp8.fp8_parts(cfg.model, family), log.info)
    log.info(f"{family.name}: network {sum(p.numel() for p in comp.network.parameters()) / 1e6:.1f}M parameters "
             f"({weight_dtype}), autocast {amp_dtype}, trained: {trainable.describe()}")
    saved = read_resume_state(run.resume_path, trainable)  # a full state's weights go in before wrapping

    # ---- wrapping, then the EMA (of the trained modules: each rank's shards under FSDP), the optimizer (wrapped)
    model = parallelize(cfg.train, comp, family, trainable, device, amp_dtype, log)
    ema = make_ema(cfg.train, trainable, device)
    optimizer, scheduler, stepper = build_optimization(cfg, trainable, total_steps, device)
    mode = OptimizerMode.of(optimizer)  # schedule-free: validation, previews and exports see its eval-mode weights
    blockswap.start(cfg.train, comp.network, device, optimizer, log.info)  # train.blocks_to_swap
    train_meta = training_metadata(cfg, family, data, optimizer) if master else {}
    steplog = StepLog(LossRecorder(cfg.log.loss_recorder_stride, cfg.log.loss_recorder_gamma))  # read when logged

    # ---- resume: progress, RNG, optimizer, EMA, scheduler, loss scale, loss recorder (one object saves them all)
    progress = Progress()
    ckpt = Checkpointer(cfg, paths["state"], run.run_id, progress, trainable, model, optimizer, scheduler, stepper,
                        steplog, ema, log)
    ckpt.load(saved)
    exporter = Exporter(cfg, paths["models"], trainable, ema, train_meta, log)
    previews = Previews(cfg, comp, prompts, paths["samples"], device, amp_dtype, trainable, model, ema, exporter,
                        metrics, log, mode)
    validator = Validator(cfg, data.validation, objective, comp, model, ema, trainable.ema_module, mode, device,
                          autocast, metrics, log)

    # ---- loop
    stop = StopFlags(cfg.save, log)
    run_token = dist.broadcast_object(f"{os.getpid()}-{time.time_ns()}" if master else None)  # names crash markers
    if master:
        log.info(summary.start_block(
            cfg=cfg, world_size=info.world_size, device=device, index=data.index, rows=data.rows, comp=comp,
            trained=trainable.trainee, optimizer=optimizer, steps_per_epoch=data.steps_per_epoch,
            total_steps=total_steps, start_step=progress.step, out_dir=run.out_dir, amp_dtype=amp_dtype,
            weight_dtype=weight_dtype, memory=memory))
    if cfg.sample.sample_at_first and progress.step == 0:
        previews.run(0)
    bar = summary.Progress(total_steps, progress.step, enabled=master, log=log.info)
    meter, start_step = Throughput(info.world_size), progress.step
    events = Events(cfg, total_steps, steplog, optimizer, device, meter, metrics, bar, exporter, ckpt, previews, validator)
    try:
        loader = make_train_loader(cfg, data, progress, device)
        mode.training()
        while progress.step < total_steps:
            for micro in micro_batch_groups(loader, accum):
                done = progress.cursor // info.world_size  # this rank's micro-batches already run in this epoch
                gens = noise_generators(cfg, device, progress.epoch, info.rank, done, len(micro))
                loss = accumulate_gradients(model, comp, objective, micro, device, gens, autocast, stepper)
                progress.cursor += len(micro) * info.world_size  # global batches: every rank ran len(micro)
                meter.add(micro)
                grad_norm, applied = stepper.step(torch.isfinite(loss))
                optimizer.zero_grad(set_to_none=True)
                if applied:
                    progress.step, progress.bad_steps = progress.step + 1, 0
                    scheduler.step()
                    if ema is not None:
                        ema.update(trainable.ema_module, progress.step)
                    events.after_step(progress, loss, grad_norm)  # log line, exports / states, previews, validation
                elif count_skipped_step(progress, loss, cfg.train.max_bad_steps, log):  # the weights are untouched
                    ckpt.save()
                    log.error(BAD_STEPS_STOP.format(n=progress.bad_steps, step=progress.step))
                    return EXIT_BAD_LOSS
                # -- stopping: asked for on any rank (SIGTERM / SIGUSR1 / Ctrl-C); every rank saves, the run returns 0
                if stop.agreed():
                    save_outputs(exporter, ckpt, crash.INTERRUPTED, True)
                    return 0
                if progress.step >= total_steps:
                    break
            else:  # the loader ran out with steps to go: the next epoch
                progress.epoch, progress.cursor = progress.epoch + 1, 0
                loader.batch_sampler.set_epoch(progress.epoch)
                events.after_epoch(progress)
        # ---- end of training
        events.at_end(progress.step)
        bar.close()
        log.info(summary.end_block(steps=(start_step, progress.step, total_steps), started=(t_start, meter.t_start),
                                   images=meter.images * info.world_size, paths=paths,
                                   model_name=cfg.save.output_name, suffix=export_suffix(cfg)))
        return 0
    except KeyboardInterrupt:
        log.warning("aborted by a second Ctrl-C: no state saved")
        raise
    except NoReadableData as e:  # the data, not the code: one line, once the state is saved as after a crash
        if cfg.save.save_on_exception:
            save_after_crash(cfg, run_token, paths["state"], exporter, ckpt, log, traceback=False)
        raise SystemExit(f"data error: {e.line}") from None
    except Exception as e:
        if cfg.save.save_on_exception and describe_os_error(e) is None:  # not a full disk
            save_after_crash(cfg, run_token, paths["state"], exporter, ckpt, log)
        raise
    finally:
        bar.close()
        metrics.close()


# -----------------------------------------------------------------------------
# Set-up, in the order main() runs it


def resolve_settings(cfg: Config, world_size: int, source: str,
                     plan: bool = False) -> tuple[Config, models.Family, list[tuple[int, str]], Objective, list[Any]]:
    """The config with the checkpoint's prediction markers applied (config values win), the model family's record,
    log notes ((level, line): which won, settings allowed but probably not meant), the diffusion objective and the
    preview prompts. Settings that only make sense together, and every file the run reads later
    (training/preflight.py), are checked here, before anything is created or loaded: a bad one ends the run with one
    line (naming the config file `source`). `plan` (train.py --plan): the settings and the model files the plan reads
    (their headers) only; data folders, prompt files, hooks and resume states may not be there yet."""
    try:
        family = models.family(models.family_of(cfg.model))
        cfg, notes = models.resolve_prediction(cfg)
        check_combination(cfg, family, world_size)
        objective = build_objective(family.objective, cfg.loss, cfg.model.v_parameterization)
        if plan:
            previews = previews_scheduled(cfg.sample) and bool(cfg.sample.sample_prompts)
            preflight.check_model_files(cfg, family, preflight.parts_needed(cfg, family, previews))
            return cfg, family, [], objective, []
        check_dir_setting("cache.cache_dir", cfg.cache.cache_dir)
        prompts = load_sample_prompts(cfg)
        warnings = preflight.check_run(cfg, family, prompts)
        dist.main_first(functools.partial(preflight.check_data, cfg))  # lists folders: rank 0 only
    except models.CheckpointError as e:  # a missing / damaged checkpoint (its header is read for the markers)
        raise SystemExit(f"model error: {e}") from None
    except dist.MainRankError as e:  # rank 0's data check ([data] sources and buckets)
        raise SystemExit(f"data error: {e}") from None
    except (ValueError, OSError) as e:
        raise SystemExit(f"config error: {source}: {e}") from None
    notes = [(logging.INFO, n) for n in notes] + [(logging.WARNING, w) for w in warnings]
    return cfg, family, notes, objective, prompts


@dataclass
class RunFolder:
    """A run's output_dir as every rank sees it: sub-folders, the run log, the state to resume (None: a fresh
    start) and the run id."""

    out_dir: str
    paths: dict[str, str]
    log: logging.Logger
    resume_path: str | None
    run_id: str


def open_run(cfg: Config, notes: list[tuple[int, str]]) -> RunFolder:
    """Rank 0 names the run folder ({date}/{time}), prepares it, chooses the state to resume and the run id;
    every rank is told. A folder rank 0 cannot write is one line on every rank. The run log starts with the
    folder, the processes and `notes`."""
    master = dist.is_main()
    out_dir = dist.broadcast_object(format_output_dir(cfg.output_dir) if master else None)
    paths = run_dirs(out_dir)
    try:  # one run per folder: a second train.py on it stops here, before writing anything
        took = acquire_in_step(DirLock(out_dir, "train.py") if master else None, dist.broadcast_object, wait=False)
        removed = dist.main_first(functools.partial(prepare_run_folder, cfg, out_dir))
        log = setup_logging(paths["logs"], master)
        if took:
            log.warning(took)
        if removed:
            log.info(f"removed {len(removed)} temporary file(s) of an ended run: {', '.join(removed[:3])}")
        started = dist.main_first(functools.partial(rstate.start_run, out_dir, paths["state"], cfg.train.resume,
                                                    to_dict(cfg), log.warning))
    except (dist.MainRankError, LockBusy) as e:
        raise SystemExit(f"train.py: {e}") from None
    resume_path, run_id = dist.broadcast_object(started)
    if master:
        crash.clear_markers(paths["state"])
    log.info(f"run folder {out_dir}; {dist.world_size()} process(es) on {dist.info().device.type}, process group "
             f"{dist.backend() or 'none'}")
    for level, note in notes:
        log.log(level, note)
    return RunFolder(out_dir, paths, log, resume_path, run_id)


def seed_run(cfg: Config, rank: int) -> None:
    """Deterministic algorithms when asked; the global RNG seeded per rank (seed, rank)."""
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.manual_seed(mix_seed(cfg.seed, rank))


def trained_weight_dtype(t: TrainConfig) -> torch.dtype:
    """The dtype the trained weights are kept in: bf16 / fp16 with full_bf16 / full_fp16, else fp32."""
    return torch.bfloat16 if t.full_bf16 else torch.float16 if t.full_fp16 else torch.float32


@dataclass
class TrainData:
    """What the run trains from: the latent store (None: images encoded every step), the shared index, the rows
    that train, the run's length in batches and optimizer steps, and the validation set."""

    store: LatentStore | None
    index: Any
    rows: np.ndarray
    per_rank_batches: int
    steps_per_epoch: int
    total_steps: int
    validation: HeldOut  # the held-out images (training/validation.py), none without [validation]


def load_data(cfg: Config, state_dir: str, world_size: int) -> TrainData:
    """The index, built once by rank 0 and read by every rank (beside the store, or in the run's state folder
    without one), the usable rows and the run's length. A data problem is one line on every rank."""
    use_store = bool(cfg.cache.cache_dir)
    index_dir = cfg.cache.cache_dir if use_store else state_dir
    try:
        require_store_for_containers(cfg.data, use_store)  # tar shards: cache.py reads them, train.py the store
        store = LatentStore(cfg.cache.cache_dir, check_validity=cfg.cache.check_cache_validity,
                            read_lock=True) if use_store else None  # read_lock: cache.py keeps shards we read
        dist.main_first(functools.partial(load_or_build_index, cfg.data, index_dir, is_main=True))
        index = load_or_build_index(cfg.data, index_dir, is_main=False)  # rank 0 too: the saved, shared index
    except (dist.MainRankError, OSError, ValueError) as e:
        raise SystemExit(cli.error_line("data error", e)) from None
    rows = usable_rows(index, store)  # one pass over the store's keys, shared by the two calls below
    try:  # the held-out images ([validation]): a split leaves them out of training
        rows, held = held_out(cfg, index, rows, store, state_dir)
    except (dist.MainRankError, OSError, ValueError) as e:
        raise SystemExit(cli.error_line("validation data error", e)) from None
    per_rank_batches = batches_per_epoch(index, cfg.data, world_size, rows=rows)
    check_training_data(cfg, store, index, rows, per_rank_batches)
    steps_per_epoch = math.ceil(per_rank_batches / cfg.train.gradient_accumulation_steps)
    total_steps = cfg.train.max_train_steps or steps_per_epoch * cfg.train.max_train_epochs
    return TrainData(store, index, rows, per_rank_batches, steps_per_epoch, total_steps, held)


def check_training_data(cfg: Config, store: LatentStore | None, index: Any, rows: np.ndarray,
                        per_rank_batches: int) -> None:
    """One line, on every rank, for data train.py cannot train from: none at all, or a latent store without the
    text-encoder outputs that cache.cache_text_encoder_outputs says to train from (cache.py run without the option)."""
    if per_rank_batches == 0:
        raise SystemExit("no training data: the dataset (or the latent store) is empty; see the log and skipped.txt")
    if cfg.cache.cache_text_encoder_outputs and store is not None:
        first = store.first_readable(index.keys[int(r)] for r in rows[:64])  # a damaged shard is skipped later
        if first is not None and not any(name.startswith("te") for name in first[1]["t"]):
            raise SystemExit(f"data error: cache.cache_text_encoder_outputs = true, but the latent store "
                             f"{cfg.cache.cache_dir} holds no text-encoder outputs (record {first[0]!r}); run "
                             "cache.py with the same option first")


def load_components(cfg: Config, family: models.Family, prompts: list[Any], device: torch.device,
                    weight_dtype: torch.dtype, encode_validation: bool = False) -> Any:
    """The parts training needs: the network (in the trained dtype), the VAE without a latent store or for
    previews, the text encoders unless their outputs are cached (and nothing needs them); both for validation
    images the store does not hold (`encode_validation`). One line for a missing / damaged / mismatched
    checkpoint."""
    need_text = not cfg.cache.cache_text_encoder_outputs or bool(prompts) or cfg.train.train_text_encoder \
        or encode_validation
    parts = [family.network] + (["vae"] if (not cfg.cache.cache_dir or prompts or encode_validation) else []) \
        + (list(family.text_encoders) if need_text else [])
    dtypes = {"network": weight_dtype, "vae": DTYPES[cfg.model.vae_dtype], "text": DTYPES[cfg.model.text_encoder_dtype]}
    if cfg.train.train_text_encoder:
        dtypes.update({name: weight_dtype for name in family.trainable_text_lr})
    try:
        comp = models.from_config(cfg.model, device=device, seed=cfg.seed, parts=parts, dtype=dtypes,
                                  zero_terminal_snr=cfg.loss.zero_terminal_snr)
    except (models.CheckpointError, OSError) as e:
        raise SystemExit(cli.error_line("model error", e)) from None
    comp.network.gradient_checkpointing = cfg.train.gradient_checkpointing
    return comp


def build_trainable(cfg: Config, comp: Any, device: torch.device, log: logging.Logger) -> TrainableSet:
    """What is trained: the whole network (+ text encoders), or [network] adapters (make_trainable); a setting
    that does not fit the model is one line."""
    try:
        return make_trainable(cfg, comp, device, log.warning)
    except (ValueError, OSError) as e:
        raise SystemExit(f"config error: {e}") from None


def parallelize(t: TrainConfig, comp: Any, family: models.Family, trainable: TrainableSet, device: torch.device,
                amp_dtype: torch.dtype | None, log: logging.Logger) -> nn.Module:
    """channels_last, the SDPA backend and regional compile (training/speed.py), then the trainee wrapped: FSDP2
    shards each of the family's blocks and then the root (its parameters become sharded ones: the optimizer is
    built afterwards), DDP replicates it."""
    blocks = [b for name in family.blocks for b in getattr(comp.network, name)]
    speed.apply(t, comp, blockswap.resident(comp.network, t.blocks_to_swap, blocks), device, amp_dtype, log.info)
    if t.fsdp:
        return dist.wrap_fsdp(trainable.trainee, blocks + [comp.network], amp_dtype)
    return dist.wrap_ddp(trainable.trainee, find_unused_parameters=trainable.find_unused,
                         static_graph=t.gradient_accumulation_steps == 1)


def training_metadata(cfg: Config, family: models.Family, data: TrainData,
                      optimizer: torch.optim.Optimizer) -> dict[str, str]:
    """The run's kohya ss_* / sdtrain metadata, written into every export (training/run_metadata.py)."""
    return run_metadata.training_metadata(cfg, family=family.name, index=data.index,
                                          batches_per_epoch=data.per_rank_batches, world_size=dist.world_size(),
                                          optimizer=optimizer,
                                          num_epochs=math.ceil(data.total_steps / data.steps_per_epoch))


def make_ema(t: TrainConfig, trainable: TrainableSet, device: torch.device) -> EMA | None:
    """The EMA of what is trained (train.use_ema), on the device or the CPU (train.ema_device); else None."""
    if not t.use_ema:
        return None
    return EMA(trainable.ema_module, decay=t.ema_decay, device="cpu" if t.ema_device == "cpu" else device)


def build_optimization(cfg: Config, trainable: TrainableSet, total_steps: int,
                       device: torch.device) -> tuple[torch.optim.Optimizer, Any, Stepper]:
    """The optimizer over the (wrapped) trained parameters, its learning-rate schedule and the stepper
    (training/steppers.py: plain, fp16-scaled, per-parameter or fused backward)."""
    try:
        optimizer = build_optimizer(trainable.param_groups(cfg.optimizer), cfg.optimizer)
        scheduler = build_scheduler(optimizer, cfg.optimizer, total_steps)
        stepper = make_stepper(cfg, optimizer, device)
    except ValueError as e:
        raise SystemExit(f"config error: {e}") from None
    return optimizer, scheduler, stepper


# -----------------------------------------------------------------------------
# The step


def make_train_loader(cfg: Config, data: TrainData, progress: Progress, device: torch.device) -> Any:
    """This rank's loader, starting at the (resumed) epoch and cursor; later epochs are set at each epoch's end."""
    return make_loader(data.index, cfg.data, data.store, seed=cfg.seed, epoch=progress.epoch, rank=dist.rank(),
                       world_size=dist.world_size(), skip=progress.cursor,
                       num_workers=dist.default_workers(cfg.data.max_dataloader_n_workers, cap=8),
                       pin_memory=device.type == "cuda", persistent_workers=cfg.data.persistent_data_loader_workers,
                       rows=data.rows, cached_text=cfg.cache.cache_text_encoder_outputs,
                       with_masks=cfg.loss.masked_loss,  # what trains decides
                       text_dropout=text_dropout_rates(cfg.model))


def text_dropout_rates(m: ModelConfig) -> tuple[float, ...]:
    """SD3's per-encoder caption dropout rates (kohya's clip_l / clip_g / t5_dropout_rate), in the order of the
    family's `text_dropout` record; () when all are 0 (batches then carry no flags)."""
    rates = (m.clip_l_dropout_rate, m.clip_g_dropout_rate, m.t5_dropout_rate)
    return rates if any(rates) else ()


def micro_batch_groups(loader: Iterable[dict[str, Any]], accum: int) -> Iterator[list[dict[str, Any]]]:
    """The rest of the loader's epoch, `accum` batches (one optimizer step) at a time; the last may be shorter."""
    batches = iter(loader)
    while micro := list(itertools.islice(batches, accum)):
        yield micro


def noise_generators(cfg: Config, device: torch.device, epoch: int, rank: int, done: int,
                     n: int) -> list[torch.Generator]:
    """One generator per micro-batch, seeded by (seed, epoch, rank, micro-batch of this rank in the epoch): the same
    noise on resume. On the training device's generator, or the CPU's with train.noise_device = "cpu" (CUDA's
    Philox and the CPU's Mersenne twister give different numbers from one seed)."""
    where = torch.device("cpu") if cfg.train.noise_device == "cpu" else device
    return [torch.Generator(device=where).manual_seed(mix_seed(cfg.seed, epoch, rank, done + i)) for i in range(n)]


def micro_step_loss(model: nn.Module, comp: Any, objective: Objective, batch: dict[str, Any], device: torch.device,
                    generator: torch.Generator) -> torch.Tensor:
    """Loss of one micro-batch (mean over the batch, per-sample weights applied)."""
    if "latents" in batch:
        latents = batch["latents"].to(device, torch.float32, non_blocking=True)
    else:  # the VAE runs in model.vae_dtype, as cache.py does, never under the training autocast
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            latents = comp.encode_images(batch["images"].to(device, non_blocking=True)).float()
    text = None
    cached = {k[3:]: v for k, v in batch.items() if k.startswith("te.")}
    if cached:
        items = [{k: v[i] for k, v in cached.items()} for i in range(len(batch["captions"]))]
        with torch.autocast(device.type, enabled=False):  # assembling data, not compute: CPU fp16 autocast
            text = {k: host_to_device(v, device) for k, v in comp.collate_cached_text(items).items()}  # bf16 cat: error
    # the loader's tensors are pinned on CUDA: non-blocking copies, no stall of the device per micro-batch
    sizes = tuple(batch[k].to(device, non_blocking=True) for k in ("original_size", "crop_top_left", "target_size"))
    nb = objective.noise(latents, generator)
    drop = batch.get("text_drop")  # [B, encoders]: per-encoder caption dropout (SD3)
    pred = model(nb.x_t, nb.t, text, batch["captions"], sizes,
                 drop.to(device, non_blocking=True) if drop is not None else None)
    mask = batch.get("mask")  # loss.masked_loss: [B, 1, h, w] at latent resolution (diffusion/masks.py)
    return objective.loss(pred.float(), nb, batch["loss_weight"].to(device, non_blocking=True),
                          mask=mask.to(device, non_blocking=True) if mask is not None else None).mean()


def accumulate_gradients(model: nn.Module, comp: Any, objective: Objective, micro: list[dict[str, Any]],
                         device: torch.device, generators: list[torch.Generator],
                         autocast: Callable[[], Any], stepper: Stepper) -> torch.Tensor:
    """Forward + backward of each micro-batch into .grad (each loss / len(micro); DDP all-reduces only on the
    last one). Returns the mean loss over micro-batches and ranks as a 0-d float64 tensor on the device, not read
    (no host sync): a non-finite loss on any rank makes it non-finite, so every rank skips the step together."""
    losses = []
    for i, (batch, generator) in enumerate(zip(micro, generators)):
        with dist.no_sync(model, skip=i < len(micro) - 1):  # backward inside: FSDP2 decides there
            with autocast():
                loss = micro_step_loss(model, comp, objective, batch, device, generator)
            stepper.backward(loss / len(micro))  # (fp16: scaled first)
        losses.append(loss.detach())
    return dist.all_reduce_mean_tensor(mean_loss(losses))


def count_skipped_step(progress: Progress, loss: torch.Tensor, max_bad_steps: int, log: logging.Logger) -> bool:
    """A step skipped for a non-finite loss or gradient norm (nothing was changed: the weights are those of the last
    good step): counted and logged. Returns whether train.max_bad_steps are now skipped in a row."""
    progress.bad_steps += 1
    log.warning(f"step {progress.step + 1}: non-finite {'gradient norm' if loss.isfinite() else 'loss'}, step "
                f"skipped ({progress.bad_steps} in a row, train.max_bad_steps = {max_bad_steps})")
    return progress.bad_steps >= max_bad_steps


def every(n: int, k: int) -> bool:
    """Whether an every-`n` event falls on `k` (n = 0: never)."""
    return bool(n) and k % n == 0


class Throughput:
    """Images trained: this rank's count in this run, and the rate of all ranks between two log lines."""

    def __init__(self, world_size: int):
        self.world_size, self.images = world_size, 0
        self.t_start = self.t_last = time.perf_counter()
        self.seen_last = 0

    def add(self, micro: list[dict[str, Any]]) -> None:
        """A step's micro-batches trained on this rank."""
        self.images += sum(mb["loss_weight"].shape[0] for mb in micro)

    def rate(self) -> float:
        """Images per second of all ranks since the last call (the first: since the loop started)."""
        now = time.perf_counter()
        ips = (self.images - self.seen_last) * self.world_size / max(now - self.t_last, 1e-9)
        self.t_last, self.seen_last = now, self.images
        return ips


def log_row(steplog: StepLog, optimizer: torch.optim.Optimizer, device: torch.device, meter: Throughput,
            epoch: int) -> dict[str, float]:
    """The metrics of a log line: the interval's loss and gradient norm (read here, once), the loss recorder's
    averages, learning rates, throughput, epoch and peak memory."""
    loss_now, norm_now = steplog.flush()
    row = {"loss": loss_now, "loss_avg": steplog.recorder.windowed_mean, "grad_norm": norm_now,
           "loss_ema": steplog.recorder.moving_average, "lr": optimizer.param_groups[0]["lr"],
           "images_per_s": meter.rate(), "epoch": epoch}
    row.update(group_lrs(optimizer))
    row.update(peak_memory(device))
    return row


# -----------------------------------------------------------------------------
# What happens on the step / epoch schedule; previews, stopping, saving


class Events:
    """What the run does after an optimizer step, at the end of an epoch and at the end of training, on the
    schedule its config sets: the log line (the step's loss and grad norm are read there, once per interval), exports
    and resume states, previews, validation."""

    def __init__(self, cfg: Config, total_steps: int, steplog: StepLog, optimizer: torch.optim.Optimizer,
                 device: torch.device, meter: Throughput, metrics: MetricsWriter, bar: Any, exporter: Exporter,
                 ckpt: Checkpointer, previews: Previews, validator: Validator):
        self.cfg, self.total_steps, self.steplog, self.optimizer, self.device = cfg, total_steps, steplog, optimizer, device
        self.meter, self.metrics, self.bar = meter, metrics, bar
        self.exporter, self.ckpt, self.previews, self.validator = exporter, ckpt, previews, validator

    def after_step(self, progress: Progress, loss: torch.Tensor, grad_norm: Any) -> None:
        cfg, step = self.cfg, progress.step
        self.steplog.add(loss, grad_norm)
        if every(cfg.log.log_every_n_steps, step) or step == self.total_steps:
            row = log_row(self.steplog, self.optimizer, self.device, self.meter, progress.epoch)
            self.metrics.write(step, row)
            self.bar.show(row)
        self.bar.update()
        if every(cfg.save.save_every_n_steps, step) and step < self.total_steps:
            save_outputs(self.exporter, self.ckpt, f"-step{step:08d}", cfg.save.save_state)
        if every(cfg.sample.sample_every_n_steps, step):
            self.previews.run(step)
        self.validator.maybe(step)

    def after_epoch(self, progress: Progress) -> None:
        """A new epoch (progress.epoch) starts with steps to go."""
        cfg, epoch = self.cfg, progress.epoch
        if every(cfg.save.save_every_n_epochs, epoch):
            save_outputs(self.exporter, self.ckpt, f"-epoch{epoch:04d}", cfg.save.save_state)
        if every(cfg.sample.sample_every_n_epochs, epoch):
            self.previews.run(progress.step)
        self.validator.maybe(progress.step, epoch_end=epoch)

    def at_end(self, step: int) -> None:
        if self.cfg.save.save_on_train_end:
            save_outputs(self.exporter, self.ckpt, "", self.cfg.save.save_state)
        self.previews.run_at_end(step)
        self.validator.at_end(step)



class Previews:
    """Preview images of the sample prompts at a step (with the EMA weights when kept), written by rank 0 with
    the hash of the export of the same weights; every rank takes part (prompts split across ranks; under FSDP
    every rank runs every forward)."""

    def __init__(self, cfg: Config, comp: Any, prompts: list[Any], samples_dir: str, device: torch.device,
                 amp_dtype: torch.dtype | None, trainable: TrainableSet, model: nn.Module, ema: EMA | None,
                 exporter: Exporter, metrics: MetricsWriter, log: logging.Logger, mode: OptimizerMode):
        self.cfg, self.comp, self.prompts, self.samples_dir = cfg, comp, prompts, samples_dir
        self.device, self.amp_dtype, self.trainable, self.model, self.ema = device, amp_dtype, trainable, model, ema
        self.exporter, self.metrics, self.log, self.mode = exporter, metrics, log, mode

    def run(self, step: int) -> None:
        """One round of previews (nothing without prompts)."""
        if not self.prompts:
            return
        from diffusion.preview import sample_round
        # speed.eager: compiled regions run eagerly here (no-grad, eval-mode calls at the prompts' sizes would
        # otherwise compile a second set of graphs)
        ema = self.ema.swapped_into(self.trainable.ema_module) if self.ema is not None else contextlib.nullcontext()
        with speed.eager(), self.mode.evaluating(), ema, self.trainable.previewing(self.model):
            written = sample_round(self.comp, self.prompts, self.samples_dir, step, self.device, self.amp_dtype,
                                   self.cfg.save.output_name, self.log.info,
                                   split=not self.cfg.train.fsdp,  # FSDP: every rank runs every forward
                                   model_hash=self.exporter.hash_at(step) if dist.is_main() else "")
        self.metrics.write_images(step, written)

    def run_at_end(self, step: int) -> None:
        """The last step's previews when previews are scheduled and that step had none."""
        smp = self.cfg.sample
        sampled_now = every(smp.sample_every_n_steps, step)
        if (smp.sample_every_n_steps or smp.sample_every_n_epochs) and not sampled_now:
            self.run(step)


class StopFlags:
    """SIGTERM / SIGUSR1 (SLURM) and a first Ctrl-C ask for a clean stop; a second Ctrl-C aborts."""

    def __init__(self, cfg_save: SaveConfig, log: logging.Logger):
        self.requested: str | None = None
        self.log = log
        if cfg_save.save_on_signal:
            for sig in (signal.SIGTERM, getattr(signal, "SIGUSR1", None)):
                if sig is not None:
                    signal.signal(sig, self._on_signal)
        if cfg_save.save_on_keyboard_interrupt:
            signal.signal(signal.SIGINT, self._on_sigint)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.requested = signal.Signals(signum).name

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self.requested == "SIGINT":  # second Ctrl-C: abort now
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.requested = "SIGINT"
        print("\nCtrl-C: saving a resumable state at the end of this step (press again to abort)", file=sys.stderr)

    def agreed(self) -> bool:
        """Whether a stop was asked for on any rank (an all-reduce: every rank asks at the end of every step, so
        all of them stop together, healthy and at the same point); said in the log when so."""
        if not dist.any_true(self.requested is not None):
            return False
        self.log.warning(f"stop requested ({self.requested or 'another rank'}): exporting the model and a resumable "
                         "state")
        return True


def save_outputs(exporter: Exporter, ckpt: Checkpointer, tag: str, with_state: bool) -> None:
    """The model file(s) under `tag` at the current step, then a resumable state when `with_state` (every rank);
    both with the optimizer's eval-mode weights (schedule-free: the x it means; the state holds the optimizer in
    the same mode, so a resume goes back to training exactly as the straight run does)."""
    with OptimizerMode.of(ckpt.optimizer).evaluating():
        exporter.export(tag, ckpt.progress)
        if with_state:
            ckpt.save()


def save_alone(exporter: Exporter, ckpt: Checkpointer) -> None:
    """The crash export and a state from this rank alone (nothing collective)."""
    exporter.export_alone(crash.CRASHED, ckpt.progress)
    ckpt.save_alone()


def save_after_crash(cfg: Config, token: str, state_dir: str, exporter: Exporter, ckpt: Checkpointer,
                     log: logging.Logger, traceback: bool = True) -> None:
    """Called in the loop's exception handler (training/crash.py): under FSDP every rank that crashed writes
    together once all have (else nothing can be gathered); otherwise the first crashed rank writes alone while the
    others wait for it, bounded. `traceback`: log the exception's (not for a data error said in one line)."""
    log.error(f"training failed on rank {dist.rank()}: saving the model and a resumable state before exiting",
              exc_info=traceback)
    if cfg.train.fsdp:  # the export gathers and every rank writes its shards: all of them, or nothing
        crash.all_crashed(state_dir, token, dist.rank(), dist.world_size(), log,
                          functools.partial(save_outputs, exporter, ckpt, crash.CRASHED, True))
    else:
        crash.on_crash(state_dir, token, dist.rank(), log, functools.partial(save_alone, exporter, ckpt))


# -----------------------------------------------------------------------------
# Settings checks


def prepare_run_folder(cfg: Config, out_dir: str) -> list[str]:
    """Rank 0: output_dir/{models,samples,logs,state}, the resolved config.toml, and the temporaries a killed run
    left there removed (returned). A folder that cannot be written is one line."""
    try:
        paths = make_run_dirs(out_dir)
        atomic_write(os.path.join(out_dir, "config.toml"), lambda f: f.write(to_toml(cfg).encode()))
    except OSError as e:
        raise RuntimeError(f"cannot write the run folder: {describe_os_error(e) or e}") from None
    return clean_stale_temps([out_dir, *paths.values()])


def check_combination(cfg: Config, family: models.Family, world_size: int) -> None:
    """The settings checks that read no file (ValueError): run-level combinations, what a fused backward pass needs,
    the optimizer's name and package. Also run by the memory planner on every changed config it considers
    suggesting, so that it never names settings this run would refuse."""
    check_settings(cfg, family)
    check_fused_settings(cfg, world_size)
    check_optimizer_type(cfg.optimizer)
    BucketSettings.from_data_cfg(cfg.data)


def check_settings(cfg: Config, family: models.Family) -> None:
    """Run-level combinations the config file alone cannot judge; raises ValueError before any model is loaded."""
    t, o, smp = cfg.train, cfg.optimizer, cfg.sample
    if not cfg.model.pretrained_model_name_or_path:
        if not cfg.model.model_preset:
            raise ValueError("set model.pretrained_model_name_or_path (a checkpoint) or model.model_preset")
        family.preset_configs(cfg.model.model_preset)  # unknown preset: ValueError naming them
    if t.max_train_steps and o.lr_warmup_steps > t.max_train_steps:
        raise ValueError(f"optimizer.lr_warmup_steps = {o.lr_warmup_steps} exceeds train.max_train_steps = "
                         f"{t.max_train_steps}")
    if o.lr_scheduler == "constant" and o.lr_warmup_steps:
        raise ValueError("optimizer.lr_scheduler = \"constant\" ignores lr_warmup_steps; use \"constant_with_warmup\"")
    scheduler_kwargs(o)  # lr_scheduler_kwargs the schedule does not take: one line before anything is written
    if cfg.log.tensorboard:
        check_tensorboard()
    if cfg.log.wandb:
        check_wandb()
    check_schedule_free(o)
    check_fsdp_optimizer(o, t.fsdp)
    check_validation_settings(cfg)
    if text_dropout_rates(cfg.model) and not family.text_dropout:
        raise ValueError(f"model.clip_l_dropout_rate / clip_g_dropout_rate / t5_dropout_rate are SD3 options (kohya's "
                         f"sd3_train.py); {family.name} has data.caption_dropout_rate")
    if previews_scheduled(smp) and not smp.sample_prompts:
        raise ValueError("[sample] previews are scheduled but sample.sample_prompts is empty")


def previews_scheduled(smp: SampleConfig) -> bool:
    """Whether [sample] asks for previews at all."""
    return bool(smp.sample_every_n_steps or smp.sample_every_n_epochs or smp.sample_at_first)


def load_sample_prompts(cfg: Config) -> list[Any]:
    """The preview prompts when previews are scheduled, else []."""
    smp = cfg.sample
    if not smp.sample_prompts or not previews_scheduled(smp):
        return []
    from diffusion.prompts import load_prompts
    return load_prompts(smp.sample_prompts, {"sampler": smp.sample_sampler, "sigmas": smp.sample_sigmas,
                                             **smp.sample_params})


if __name__ == "__main__":
    cli.run_entry(main, dist.shutdown)
