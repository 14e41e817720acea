#!/usr/bin/env python
"""Fine-tune SDXL or SD3 / SD3.5 (full fine-tune, DDP or FSDP2).

    torchrun --nproc_per_node=4 train.py cfg.toml [table.key=value ...]
    python train.py cfg.toml                      # one process
    python train.py cfg.toml --print-config       # resolved config as TOML, then exit

Reads latents from the store written by cache.py ([cache] cache_dir) or encodes images on the fly.
Writes output_dir/{models,samples,logs,state}. Resume with train.resume = "auto".
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import os
import signal
import sys
import time
from typing import Any, Callable

import torch
from torch import nn

from core import cli, dist
from training import speed, summary
from core.dist import mix_seed
from core.config import format_output_dir, make_run_dirs, run_dirs, to_dict, to_toml
from training.ema import EMA
from training.trainable import TrainableSet
from training.steppers import check_fused_settings, fp32_state, make_stepper, per_parameter_step
from core.fsio import atomic_write, clean_stale_temps, describe_os_error, is_temp, remove_quietly
from core.metrics import MetricsWriter, check_tensorboard, group_lrs, peak_memory, setup_logging
from diffusion.objectives import build_objective
from training.optim import LossRecorder, build_optimizer, build_param_groups_for_models, build_scheduler
from training.steplog import StepLog, mean_loss
from training import crash, run_metadata, resume as rstate
import models
from data.index import load_or_build_index
from data.loader import batches_per_epoch, make_loader, usable_rows
from data.sources import require_store_for_containers
from data.store import LatentStore

DTYPES = {"no": None, **models.DTYPES}  # config precision names -> torch dtypes ("no": no autocast)
FSDP_BLOCKS = {"sdxl": ("input_blocks", "output_blocks"), "sd3": ("joint_blocks",)}
# Text encoders that train.train_text_encoder trains, with their [optimizer] learning-rate field (SD3's T5 stays
# frozen: "also train the CLIP text encoders", as kohya's SD3 trainer).
TRAINABLE_TEXT_LR = {"te1": "learning_rate_te1", "te2": "learning_rate_te2",
                     "clip_l": "learning_rate_te1", "clip_g": "learning_rate_te2"}
EXIT_BAD_LOSS = 3


# -----------------------------------------------------------------------------
# What DDP wraps: the network, plus the text encoders when they are trained


class Trainee(nn.Module):
    """One micro-batch forward: (text encoding when trained) + the diffusion network."""

    def __init__(self, comp: Any, train_text_encoder: bool):
        super().__init__()
        self.network = comp.network
        trained = {k: m for k, m in comp.text_encoders().items() if k in TRAINABLE_TEXT_LR} if train_text_encoder else {}
        self.text_encoders = nn.ModuleDict(trained)
        self.__dict__["comp"] = comp  # not a submodule: the frozen parts stay out of DDP

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, text: dict[str, torch.Tensor] | None,
                captions: list[str], sizes: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        if text is None:
            with contextlib.nullcontext() if len(self.text_encoders) else torch.no_grad():
                text = self.comp.encode_text(captions, device=x_t.device)
        # cached (bf16) or frozen fp16 encoder outputs must not meet an fp32 network without autocast
        text = {k: v.float() for k, v in text.items()}
        cond = self.comp.conditioning(text, *sizes)
        return self.network(x_t, t, **cond)


class StopFlags:
    """SIGTERM / SIGUSR1 (SLURM) and a first Ctrl-C ask for a clean stop; a second Ctrl-C aborts."""

    def __init__(self, cfg_save: Any):
        self.requested: str | None = None
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


def check_training_data(cfg: Any, store: Any, index: Any, rows: Any, per_rank_batches: int) -> None:
    """One line, on every rank, for data train.py cannot train from: none at all, or a latent store without the
    text-encoder outputs that cache.cache_text_encoder_outputs says to train from (cache.py run without the option)."""
    if per_rank_batches == 0:
        raise SystemExit("no training data: the dataset (or the latent store) is empty; see the log and skipped.txt")
    if cfg.cache.cache_text_encoder_outputs and store is not None:
        key = index.keys[int(rows[0])]
        if not any(name.startswith("te") for name in store.record_info(key)["t"]):
            raise SystemExit(f"data error: cache.cache_text_encoder_outputs = true, but the latent store "
                             f"{cfg.cache.cache_dir} holds no text-encoder outputs (record {key!r}); run cache.py "
                             "with the same option first")


@cli.one_line_errors("train.py")
def main(argv: list[str] | None = None) -> int:
    cfg, _ = cli.parse(argv, "train.py", __doc__ or "")
    t_start = time.perf_counter()
    info = dist.init()
    device, master = info.device, dist.is_main()

    # ---- settings that only make sense together, checked before anything is created or loaded
    try:
        family = models.family_of(cfg.model)
        cfg, prediction_notes = models.resolve_prediction(cfg)  # config values win over the checkpoint's markers
        check_settings(cfg, family)
        check_fused_settings(cfg, info.world_size)
        objective = build_objective(family, cfg.loss, cfg.model.v_parameterization)
        prompts = load_sample_prompts(cfg)
    except models.CheckpointError as e:  # a missing / damaged checkpoint (its header is read for the markers)
        raise SystemExit(f"model error: {e}") from None
    except (ValueError, OSError) as e:
        raise SystemExit(f"config error: {e}") from None

    # ---- run folder (the {date}/{time} of rank 0, for every rank), run id and the state to resume, on rank 0
    out_dir = dist.broadcast_object(format_output_dir(cfg.output_dir) if master else None)
    paths = run_dirs(out_dir)
    try:
        removed = dist.main_first(lambda: prepare_run_folder(cfg, out_dir))
        log = setup_logging(paths["logs"], master)
        if removed:
            log.info(f"removed {len(removed)} temporary file(s) of an ended run: {', '.join(removed[:3])}")
        started = dist.main_first(lambda: rstate.start_run(out_dir, paths["state"], cfg.train.resume, to_dict(cfg),
                                                           log.warning))
    except dist.MainRankError as e:
        raise SystemExit(f"train.py: {e}") from None
    resume_path, run_id = dist.broadcast_object(started)
    if master:
        crash.clear_markers(paths["state"])
    metrics = MetricsWriter(paths["logs"], master, cfg.log.tensorboard)
    log.info(f"run folder {out_dir}; {info.world_size} process(es) on {device.type}, process group "
             f"{dist.backend() or 'none'}")
    for note in prediction_notes:
        log.info(note)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.manual_seed(mix_seed(cfg.seed, info.rank))

    # ---- precision
    amp_dtype = DTYPES[cfg.train.mixed_precision]
    weight_dtype = torch.bfloat16 if cfg.train.full_bf16 else torch.float16 if cfg.train.full_fp16 else torch.float32
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext

    # ---- data: index built once on rank 0 and shared (before any model is loaded); latents read lazily
    use_store = bool(cfg.cache.cache_dir)
    index_dir = cfg.cache.cache_dir if use_store else paths["state"]
    try:
        require_store_for_containers(cfg.data, use_store)  # tar shards: cache.py reads them, train.py the store
        store = LatentStore(cfg.cache.cache_dir, check_validity=cfg.cache.check_cache_validity) if use_store else None
        dist.main_first(lambda: load_or_build_index(cfg.data, index_dir, is_main=True))
        index = load_or_build_index(cfg.data, index_dir, is_main=False)  # rank 0 too: the saved, shared index
    except (dist.MainRankError, OSError, ValueError) as e:
        raise SystemExit(cli.error_line("data error", e)) from None
    rows = usable_rows(index, store)  # one pass over the store's keys, shared by the two calls below
    per_rank_batches = batches_per_epoch(index, cfg.data, info.world_size, rows=rows)
    check_training_data(cfg, store, index, rows, per_rank_batches)
    accum = cfg.train.gradient_accumulation_steps
    steps_per_epoch = math.ceil(per_rank_batches / accum)
    total_steps = cfg.train.max_train_steps or steps_per_epoch * cfg.train.max_train_epochs

    # ---- model: the network, the frozen (or trained) text encoders, the VAE when needed
    need_text = not cfg.cache.cache_text_encoder_outputs or bool(prompts) or cfg.train.train_text_encoder
    parts = [models.NETWORK_PART[family]] + (["vae"] if (not use_store or prompts) else []) \
        + (list(models.TEXT_PARTS[family]) if need_text else [])
    dtypes = {"network": weight_dtype, "vae": DTYPES[cfg.model.vae_dtype], "text": DTYPES[cfg.model.text_encoder_dtype]}
    if cfg.train.train_text_encoder:
        dtypes.update({name: weight_dtype for name in TRAINABLE_TEXT_LR})
    try:
        comp = models.from_config(cfg.model, device=device, seed=cfg.seed, parts=parts, dtype=dtypes,
                                  zero_terminal_snr=cfg.loss.zero_terminal_snr)
    except (models.CheckpointError, OSError) as e:  # missing / damaged / mismatched checkpoint files
        raise SystemExit(cli.error_line("model error", e)) from None
    net = comp.network
    net.gradient_checkpointing = cfg.train.gradient_checkpointing
    try:  # what is trained: the whole network (+ text encoders), or [network] adapters
        trainable = make_trainable(cfg, comp, device, log.warning)
    except (ValueError, OSError) as e:
        raise SystemExit(f"config error: {e}") from None
    trainee = trainable.trainee
    log.info(f"{family}: network {sum(p.numel() for p in net.parameters()) / 1e6:.1f}M parameters ({weight_dtype}), "
             f"autocast {amp_dtype}, trained: {trainable.describe()}")

    # ---- resume: trained weights back in place before wrapping (the rest after the optimizer exists)
    step, epoch, cursor, bad_steps = 0, 0, 0, 0
    st = rstate.read_state(resume_path, info.rank) if resume_path is not None else None
    if st is not None and "trained" in st:  # a full state (a sharded one is read once the optimizer exists)
        trainable.load_state_dict(st["trained"])

    # ---- wrapping, then the EMA (of the unwrapped trained modules: each rank's shards under FSDP) and the
    # optimizer over the wrapped parameters
    blocks = [b for name in FSDP_BLOCKS[family] for b in getattr(net, name)]
    speed.apply(cfg.train, comp, blocks, device, amp_dtype, log.info)  # channels_last, SDPA backend, compile
    # FSDP2 replaces parameters with sharded ones: the optimizer must be built after wrapping
    model = dist.wrap_fsdp(trainee, blocks + [net], amp_dtype) if cfg.train.fsdp else \
        dist.wrap_ddp(trainee, find_unused_parameters=trainable.find_unused)
    ema = EMA(trainable.ema_module, decay=cfg.train.ema_decay, device="cpu" if cfg.train.ema_device == "cpu" else device) \
        if cfg.train.use_ema else None
    try:
        optimizer = build_optimizer(trainable.param_groups(cfg.optimizer), cfg.optimizer)
        scheduler = build_scheduler(optimizer, cfg.optimizer, total_steps)
        stepper = make_stepper(cfg, optimizer)  # fused backward hooks / per-parameter steps, or None
    except ValueError as e:
        raise SystemExit(f"config error: {e}") from None
    train_meta = run_metadata.training_metadata(cfg, family=family, index=index, batches_per_epoch=per_rank_batches,
                                                world_size=info.world_size, optimizer=optimizer,
                                                num_epochs=math.ceil(total_steps / steps_per_epoch)) if master else {}
    scaler = make_scaler(cfg, device)
    steplog = StepLog(LossRecorder(cfg.log.loss_recorder_stride, cfg.log.loss_recorder_gamma))  # read when logged
    if st is not None:
        trainable.load_state(st, model, optimizer, ema)  # optimizer, EMA (and sharded weights: resharded by DCP)
        if stepper is not None and cfg.train.full_bf16 and cfg.train.stochastic_rounding:
            fp32_state(optimizer)  # the fp32 steps keep fp32 state; torch's loader cast it to bf16
        pr = st["progress"]
        scheduler.load_state_dict(pr["scheduler"])
        if scaler is not None and pr.get("scaler"):
            scaler.load_state_dict(pr["scaler"])
        steplog.recorder.load_state_dict(pr["loss_recorder"])
        step, epoch, bad_steps = pr["step"], pr["epoch"], pr["bad_steps"]
        cursor = pr["cursor"]  # global batches consumed in this epoch: valid for any world size
        if pr["world_size"] == info.world_size:
            rstate.restore_rng(st["rng"])
        else:
            log.warning(f"resuming with {info.world_size} processes (state saved with {pr['world_size']}): the epoch "
                        f"continues at global batch {cursor}; per-rank RNG streams are re-derived")
        log.info(f"resumed from {resume_path}: step {step}, epoch {epoch}")
        del st

    def previews(at_step: int) -> None:
        """Preview images of the sample prompts (with the EMA weights when kept), written by rank 0."""
        if not prompts:
            return
        from diffusion.preview import sample_round
        with ema.swapped_into(trainable.ema_module) if ema is not None else contextlib.nullcontext(), \
                trainable.previewing(model):
            written = sample_round(comp, prompts, paths["samples"], at_step, device, amp_dtype, cfg.save.output_name,
                                   log.info, split=not cfg.train.fsdp,  # FSDP: every rank runs every forward
                                   model_hash=exported.hash_at(at_step, ema is not None) if master else "")
        metrics.write_images(at_step, written)

    writes = [0]

    def progress_now() -> dict[str, Any]:
        return {"step": step, "epoch": epoch, "cursor": cursor, "world_size": info.world_size, "bad_steps": bad_steps,
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler is not None else None,
                "loss_recorder": steplog.state_dict(), "config": to_dict(cfg), "run_id": run_id}

    def save_state(crash_hook: bool = True) -> None:
        tmp = dist.broadcast_object(rstate.tmp_dir_for(paths["state"], step) if master else None)
        rstate.write_rank_rng(tmp, info.rank)
        files = trainable.write_state(tmp, optimizer, ema)  # FSDP: every rank writes its shards, in parallel
        if master:
            progress = progress_now()
            writes[0] += 1  # fault injection for tests: SIGKILL during the N-th state write
            hook = _crash_hook if crash_hook and writes[0] == int(os.environ.get("SDTRAIN_TEST_KILL_DURING_STATE_WRITE", "0")) else None
            final = os.path.join(paths["state"], f"step-{step:08d}")
            rstate.write_state(tmp, final, progress=progress, before_marker=hook, **files)
            rstate.prune_states(paths["state"], cfg.save.save_last_n_states, run_id, just_written=final)
            log.info(f"saved resumable state {final}")
        dist.barrier()

    exported = ExportLog()

    def export(tag: str, with_state: bool | None = None) -> None:
        """Exported model (original single-file layout, every part; a LoRA file for adapters) and its -ema twin,
        written by rank 0 one tensor at a time (FSDP: every rank gathers each tensor in turn); then a resumable
        state when `with_state` (default save.save_state)."""
        path = os.path.join(paths["models"], cfg.save.output_name + tag + export_suffix(cfg))
        meta = run_metadata.export_metadata(train_meta, step=step, epoch=epoch) if master else {}
        trainable.export(path, meta, ema)  # collective under FSDP; rank 0 writes
        if master:
            exported.add(step, path)
            log.info(f"exported {path}")
            prune_exports(paths["models"], cfg.save.output_name, cfg.save.save_last_n)
        dist.barrier()
        if cfg.save.save_state if with_state is None else with_state:
            save_state()

    def crash_save() -> None:
        """Model file + state from this rank alone (training/crash.py: the other ranks may be blocked)."""
        path = os.path.join(paths["models"], cfg.save.output_name + crash.CRASHED + export_suffix(cfg))
        trainable.export(path, run_metadata.export_metadata(train_meta, step=step, epoch=epoch), ema, alone=True)
        log.warning(f"exported {path}")
        final = crash.write_state_alone(paths["state"], step, info.rank, trained=trainable.state_dict(),
                                            optimizer=optimizer.state_dict(), progress=progress_now(),
                                            ema=ema.state_dict() if ema is not None else None)
        log.warning(f"saved resumable state {final}")

    # ---- loop
    stop = StopFlags(cfg.save)
    run_token = dist.broadcast_object(f"{os.getpid()}-{time.time_ns()}" if master else None)  # names crash markers

    def stop_requested() -> bool:
        """A stop asked for on any rank: every rank saves a resumable state (then the run returns 0)."""
        if not dist.any_true(stop.requested is not None):
            return False
        log.warning(f"stop requested ({stop.requested or 'another rank'}): exporting the model and a resumable state")
        export(crash.INTERRUPTED, with_state=True)
        return True

    if master:
        log.info(summary.start_block(cfg=cfg, world_size=info.world_size, device=device, index=index, rows=rows,
                                     comp=comp, trained=trainee, optimizer=optimizer, steps_per_epoch=steps_per_epoch,
                                     total_steps=total_steps, start_step=step, out_dir=out_dir, amp_dtype=amp_dtype,
                                     weight_dtype=weight_dtype))
    if cfg.sample.sample_at_first and step == 0:
        previews(0)
    bar = summary.Progress(total_steps, step, enabled=master, log=log.info)
    t_loop, start_step, images_seen = time.perf_counter(), step, 0  # images this rank trained on in this run
    t_last, seen_last = t_loop, 0
    try:  # the loader starts at the resumed epoch and cursor; later epochs are set at each epoch's end
        loader = make_loader(index, cfg.data, store, seed=cfg.seed, epoch=epoch, rank=info.rank,
                             world_size=info.world_size, skip=cursor,
                             num_workers=dist.default_workers(cfg.data.max_dataloader_n_workers, cap=8),
                             pin_memory=device.type == "cuda",
                             persistent_workers=cfg.data.persistent_data_loader_workers, rows=rows)
        while step < total_steps:
            batches = iter(loader)
            while step < total_steps:
                micro = list(itertools.islice(batches, accum))
                if not micro:
                    break
                _test_fault(step, info.rank)
                done = cursor // info.world_size  # this rank's micro-batches already run in this epoch
                gens = noise_generators(cfg, device, epoch, info.rank, done, len(micro))
                loss = accumulate_gradients(model, comp, objective, micro, device, gens, autocast, scaler)
                images_seen += sum(mb["loss_weight"].shape[0] for mb in micro)
                cursor += len(micro) * info.world_size  # global batches: every rank ran len(micro)
                grad_norm, applied = optimizer_step(cfg, model, optimizer, scaler, torch.isfinite(loss), stepper)
                optimizer.zero_grad(set_to_none=True)
                if not applied:  # nothing was changed: the weights are those of the last good step
                    bad_steps += 1
                    log.warning(f"step {step + 1}: non-finite {'gradient norm' if loss.isfinite() else 'loss'}, step "
                                f"skipped ({bad_steps} in a row, train.max_bad_steps = {cfg.train.max_bad_steps})")
                    if bad_steps >= cfg.train.max_bad_steps:
                        save_state()
                        log.error(f"{bad_steps} consecutive steps with a non-finite loss or gradient: stopping at step "
                                  f"{step}. A resumable state was saved; lower the learning rate or check the data / "
                                  f"precision settings.")
                        return EXIT_BAD_LOSS
                    if stop_requested():
                        return 0
                    continue
                bad_steps = 0
                scheduler.step()
                step += 1
                if ema is not None:
                    ema.update(trainable.ema_module, step)

                # -- logging (the step's loss and grad norm are read here, once per interval)
                steplog.add(loss, grad_norm)
                if step % cfg.log.log_every_n_steps == 0 or step == total_steps:
                    loss_now, norm_now = steplog.flush()
                    now = time.perf_counter()
                    ips = (images_seen - seen_last) * info.world_size / max(now - t_last, 1e-9)
                    t_last, seen_last = now, images_seen
                    lr = optimizer.param_groups[0]["lr"]
                    row = {"loss": loss_now, "loss_avg": steplog.recorder.windowed_mean, "grad_norm": norm_now,
                           "loss_ema": steplog.recorder.moving_average, "lr": lr, "images_per_s": ips, "epoch": epoch}
                    row.update(group_lrs(optimizer))
                    row.update(peak_memory(device))
                    metrics.write(step, row)
                    bar.show(row)
                bar.update()

                # -- saving, sampling, stopping
                if cfg.save.save_every_n_steps and step % cfg.save.save_every_n_steps == 0 and step < total_steps:
                    export(f"-step{step:08d}")
                if cfg.sample.sample_every_n_steps and step % cfg.sample.sample_every_n_steps == 0:
                    previews(step)
                if stop_requested():
                    return 0
            if step >= total_steps:
                break
            # end of epoch (the loader ran out; training goes on)
            epoch, cursor = epoch + 1, 0
            loader.batch_sampler.set_epoch(epoch)
            if cfg.save.save_every_n_epochs and epoch % cfg.save.save_every_n_epochs == 0:
                export(f"-epoch{epoch:04d}")
            if cfg.sample.sample_every_n_epochs and epoch % cfg.sample.sample_every_n_epochs == 0:
                previews(step)
        # ---- end of training
        if cfg.save.save_on_train_end:
            export("")
        sampled_now = cfg.sample.sample_every_n_steps and step % cfg.sample.sample_every_n_steps == 0
        if prompts and (cfg.sample.sample_every_n_steps or cfg.sample.sample_every_n_epochs) and not sampled_now:
            previews(step)
        bar.close()
        log.info(summary.end_block(steps=(start_step, step, total_steps), started=(t_start, t_loop),
                                   images=images_seen * info.world_size, paths=paths, model_name=cfg.save.output_name,
                                   suffix=export_suffix(cfg)))
        return 0
    except KeyboardInterrupt:
        log.warning("aborted by a second Ctrl-C: no state saved")
        raise
    except Exception as e:
        if cfg.save.save_on_exception and describe_os_error(e) is None:  # not a full disk
            log.exception(f"training failed on rank {info.rank}: saving the model and a resumable state before exiting")
            if cfg.train.fsdp:  # the export gathers and every rank writes its shards: all of them, or nothing
                crash.all_crashed(paths["state"], run_token, info.rank, info.world_size, log,
                                      lambda: export(crash.CRASHED, with_state=True))
            else:
                crash.on_crash(paths["state"], run_token, info.rank, log, crash_save)
        raise
    finally:
        bar.close()
        metrics.close()


# -----------------------------------------------------------------------------
# Helpers


def prepare_run_folder(cfg: Any, out_dir: str) -> list[str]:
    """Rank 0: output_dir/{models,samples,logs,state}, the resolved config.toml, and the temporaries a killed run
    left there removed (returned). A folder that cannot be written is one line."""
    try:
        paths = make_run_dirs(out_dir)
        atomic_write(os.path.join(out_dir, "config.toml"), lambda f: f.write(to_toml(cfg).encode()))
    except OSError as e:
        raise RuntimeError(f"cannot write the run folder: {describe_os_error(e) or e}") from None
    return clean_stale_temps([out_dir, *paths.values()])


def check_settings(cfg: Any, family: str) -> None:
    """Run-level combinations the config file alone cannot judge; raises ValueError before any model is loaded."""
    t, o, smp = cfg.train, cfg.optimizer, cfg.sample
    if not cfg.model.pretrained_model_name_or_path:
        if not cfg.model.model_preset:
            raise ValueError("set model.pretrained_model_name_or_path (a checkpoint) or model.model_preset")
        models.FAMILIES[family].preset_configs(cfg.model.model_preset)  # unknown preset: ValueError naming them
    if t.max_train_steps and o.lr_warmup_steps > t.max_train_steps:
        raise ValueError(f"optimizer.lr_warmup_steps = {o.lr_warmup_steps} exceeds train.max_train_steps = "
                         f"{t.max_train_steps}")
    if o.lr_scheduler == "constant" and o.lr_warmup_steps:
        raise ValueError("optimizer.lr_scheduler = \"constant\" ignores lr_warmup_steps; use \"constant_with_warmup\"")
    if cfg.log.tensorboard:
        check_tensorboard()
    if previews_scheduled(smp) and not smp.sample_prompts:
        raise ValueError("[sample] previews are scheduled but sample.sample_prompts is empty")


def previews_scheduled(smp: Any) -> bool:
    """Whether [sample] asks for previews at all."""
    return bool(smp.sample_every_n_steps or smp.sample_every_n_epochs or smp.sample_at_first)


def load_sample_prompts(cfg: Any) -> list[Any]:
    """The preview prompts when previews are scheduled, else []."""
    smp = cfg.sample
    if not smp.sample_prompts or not previews_scheduled(smp):
        return []
    from diffusion.prompts import load_prompts
    return load_prompts(smp.sample_prompts, {"sampler": smp.sample_sampler, "sigmas": smp.sample_sigmas, **smp.sample_params})


class FullFineTune(TrainableSet):
    """The trainable set of a full fine-tune: the whole network, plus the CLIP text encoders with
    train.train_text_encoder. The same interface as networks.lora.LoRATraining: the module DDP / FSDP wraps
    (`trainee`), optimizer groups, the weights of a resume state (training/trainable.py: sharded under FSDP), the
    export, what the EMA follows."""

    def __init__(self, cfg: Any, comp: Any, warn: Callable[[str], None]):
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

    def param_groups(self, opt_cfg: Any) -> list[dict]:
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


def make_trainable(cfg: Any, comp: Any, device: torch.device, warn: Callable[[str], None]) -> Any:
    """FullFineTune, or LoRA / LoCon adapters when [network] network_module is set."""
    if not cfg.network.network_module:
        return FullFineTune(cfg, comp, warn)
    from networks.lora import LoRATraining
    freeze(comp)
    return LoRATraining(cfg, comp, Trainee(comp, train_text_encoder=not cfg.network.network_train_unet_only),
                        device, warn)


def trained_param_groups(trainee: Trainee, opt_cfg: Any) -> list[dict]:
    """Optimizer groups: the network at learning_rate, trained text encoders at theirs, regex groups within each."""
    named = {"network": list(trainee.network.named_parameters())}
    lrs = {"network": opt_cfg.learning_rate}
    for name, te in trainee.text_encoders.items():
        named[name] = list(te.named_parameters())
        te_lr = getattr(opt_cfg, TRAINABLE_TEXT_LR[name])
        lrs[name] = te_lr if te_lr is not None else opt_cfg.learning_rate
    return build_param_groups_for_models(named, opt_cfg, lrs)


def with_all_parts(comp: Any, cfg: Any, loaded: dict[str, Any]) -> Any:
    """comp plus the parts training did not load (VAE, text encoders), on the CPU, so exports are whole checkpoints.
    `loaded` keeps them between exports (they are frozen)."""
    family = comp.family
    missing = [p for p in ("vae", *models.TEXT_PARTS[family]) if getattr(comp, p) is None and p not in loaded]
    if family == "sd3" and not cfg.model.use_t5:
        missing = [p for p in missing if p != "t5"]
    if missing:
        extra = models.from_config(cfg.model, device="cpu", seed=cfg.seed, parts=missing,
                                   dtype=models.DTYPES[cfg.save.save_precision])
        loaded.update({p: getattr(extra, p) for p in missing})
    fill = {p: m for p, m in loaded.items() if getattr(comp, p) is None}
    return dataclasses.replace(comp, **fill) if fill else comp


class ExportLog:
    """The last export's step and file, so previews of the same weights carry its A1111 `Model hash`."""

    def __init__(self) -> None:
        self.step, self.path = -1, ""

    def add(self, step: int, path: str) -> None:
        self.step, self.path = step, path

    def hash_at(self, step: int, ema: bool) -> str:
        """Short hash of the file holding the weights previews at `step` use (the EMA file when kept), or ""."""
        if step != self.step:
            return ""
        from core.hashes import short_hash
        path = ema_twin(self.path) if ema else self.path
        return short_hash(path) if os.path.isfile(path) else ""  # a diffusers folder has no A1111 hash


def write_export(whole: Any, path: str, cfg: Any, meta: dict[str, str], ema: EMA | None, gather: Any,
                 write: bool) -> None:
    """The exported model and, with an EMA, `-ema.safetensors` (the EMA's weights in the network's place), with
    modelspec from [save] and the run's training metadata. Streamed (models.save): one tensor gathered by `gather`
    (FSDP: collective, every rank calls this with the same network keys; `write` on rank 0 only) and written at
    a time."""
    s = cfg.save
    kw = {"resolution": cfg.data.resolution, "title": s.metadata_title, "gather": gather, "write": write,
          "info": {"author": s.metadata_author, "description": s.metadata_description, "license": s.metadata_license,
                   "tags": s.metadata_tags}}
    models.save(whole, path, s.save_precision, extra_metadata=meta, save_as=s.save_model_as, **kw)
    if ema is not None:  # the EMA's weights (FSDP: its shards) in the network's place
        prefix = whole.prefix[models.NETWORK_PART[whole.family]]
        sd = {**whole.export_state_dict(), **{prefix + k: v for k, v in ema.state_dict().items()}}
        models.save(whole, ema_twin(path), s.save_precision, state_dict=sd, save_as=s.save_model_as,
                    extra_metadata={**meta, "sdtrain.ema_decay": str(ema.decay)}, **kw)


def export_suffix(cfg: Any) -> str:
    """File suffix of exports: .safetensors, or none for a diffusers folder (LoRA files are always .safetensors)."""
    return ".safetensors" if cfg.network.network_module else models.EXPORT_SUFFIX[cfg.save.save_model_as]


def ema_twin(path: str) -> str:
    """The EMA export beside an export: `x.safetensors` -> `x-ema.safetensors`, folder `x` -> `x-ema`."""
    return path[: -len(".safetensors")] + "-ema.safetensors" if path.endswith(".safetensors") else path + "-ema"


def noise_generators(cfg: Any, device: torch.device, epoch: int, rank: int, done: int, n: int) -> list[torch.Generator]:
    """One generator per micro-batch, seeded by (seed, epoch, rank, micro-batch of this rank in the epoch): the same
    noise on resume. On the training device's generator, or the CPU's with train.noise_device = "cpu" (CUDA's
    Philox and the CPU's Mersenne twister give different numbers from one seed)."""
    where = torch.device("cpu") if cfg.train.noise_device == "cpu" else device
    return [torch.Generator(device=where).manual_seed(mix_seed(cfg.seed, epoch, rank, done + i)) for i in range(n)]


def micro_step_loss(model: nn.Module, comp: Any, objective: Any, batch: dict[str, Any], device: torch.device,
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
            text = {k: v.to(device) for k, v in comp.collate_cached_text(items).items()}  # rejects a bf16 cat
    sizes = tuple(batch[k].to(device) for k in ("original_size", "crop_top_left", "target_size"))
    nb = objective.noise(latents, generator)
    pred = model(nb.x_t, nb.t, text, batch["captions"], sizes)
    return objective.loss(pred.float(), nb, batch["loss_weight"].to(device)).mean()


def accumulate_gradients(model: nn.Module, comp: Any, objective: Any, micro: list[dict[str, Any]],
                         device: torch.device, generators: list[torch.Generator],
                         autocast: Callable[[], Any], scaler: torch.amp.GradScaler | None) -> torch.Tensor:
    """Forward + backward of each micro-batch into .grad (each loss / len(micro); DDP all-reduces only on the
    last one). Returns the mean loss over micro-batches and ranks as a 0-d float64 tensor on the device, not read
    (no host sync): a non-finite loss on any rank makes it non-finite, so every rank skips the step together."""
    losses = []
    for i, (batch, generator) in enumerate(zip(micro, generators)):
        with dist.no_sync(model, skip=i < len(micro) - 1):  # backward inside: FSDP2 decides there
            with autocast():
                loss = micro_step_loss(model, comp, objective, batch, device, generator)
            scaled = loss / len(micro)
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        losses.append(loss.detach())
    return dist.all_reduce_mean_tensor(mean_loss(losses))


class _FP16Scaler(torch.amp.GradScaler):
    """GradScaler that also unscales fp16 gradients (full_fp16 keeps the weights themselves in fp16)."""

    def _unscale_grads_(self, optimizer, inv_scale, found_inf, allow_fp16):  # type: ignore[override]
        return super()._unscale_grads_(optimizer, inv_scale, found_inf, True)


def make_scaler(cfg: Any, device: torch.device) -> torch.amp.GradScaler | None:
    if cfg.train.mixed_precision != "fp16":
        return None
    cls = _FP16Scaler if cfg.train.full_fp16 else torch.amp.GradScaler
    return cls(device.type)


def optimizer_step(cfg: Any, model: nn.Module, optimizer: torch.optim.Optimizer,
                   scaler: torch.amp.GradScaler | None, loss_finite: torch.Tensor | bool = True,
                   stepper: Any = None) -> tuple[torch.Tensor | float, bool]:
    """Unscale, clip, step. Returns the gradient norm before clipping (a tensor, not read) and whether a step was
    taken: a non-finite loss (`loss_finite`, the same on every rank) or gradient norm skips it (with fp16 the scaler
    skips such steps itself and lowers its scale: part of its normal work). That decision is the step's one host
    read. A fused backward pass has stepped already (training/steppers.py; parameters with a non-finite gradient were left
    alone); stochastic rounding steps one parameter at a time."""
    if hasattr(stepper, "finish"):
        norm, ok = stepper.finish()
        return (norm, ok) if bool(loss_finite) else (math.nan, False)
    if scaler is not None:
        if not bool(loss_finite):
            return math.nan, False
        scaler.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    # no sync: scales on the device; FSDP: on the local shards. max_grad_norm = 0: logged only, no scaling pass
    norm = dist.clip_grad_norm_(params, cfg.optimizer.max_grad_norm or None)
    norm = dist.full_tensor(norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
        return norm, True
    if not bool(torch.as_tensor(loss_finite, device=norm.device) & torch.isfinite(norm)):  # the host read
        return norm, False
    if stepper is not None:
        per_parameter_step(optimizer, stepper, params)
    else:
        optimizer.step()
    return norm, True


def prune_exports(model_dir: str, name: str, keep: int) -> None:
    """Keep the newest `keep` periodic exports (step/epoch files); 0 keeps all."""
    if keep <= 0:
        return
    keep_always = (crash.INTERRUPTED, crash.CRASHED)

    def export_like(f: str) -> bool:  # a file, or a diffusers folder (not a temporary)
        return f.endswith(".safetensors") or (os.path.isdir(os.path.join(model_dir, f)) and not is_temp(f))

    periodic = sorted((f for f in os.listdir(model_dir) if f.startswith(name + "-") and export_like(f)
                       and "-ema" not in f and not f.removesuffix(".safetensors").endswith(keep_always)),
                      key=lambda f: (os.stat(os.path.join(model_dir, f)).st_mtime_ns, f))  # step and epoch files mixed
    for f in periodic[:-keep]:
        for p in (f, ema_twin(f)):
            remove_quietly(os.path.join(model_dir, p))


def _test_fault(step: int, rank: int) -> None:
    """Fault injection for the crash-export test: SDTRAIN_TEST_RAISE_AT_STEP="N" or "N:rank" raises in the loop."""
    spec = os.environ.get("SDTRAIN_TEST_RAISE_AT_STEP")
    if spec:
        at, _, only = spec.partition(":")
        if step == int(at) and (not only or rank == int(only)):
            raise RuntimeError(f"injected test fault at step {step} on rank {rank}")


def _crash_hook() -> None:  # fault injection for the kill-during-checkpoint test
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    code = main()
    dist.shutdown()
    cli.exit_now(code)
