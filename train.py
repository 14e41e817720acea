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
import math
import os
import signal
import sys
import time
from typing import Any

import torch
from torch import nn

from core import cli, dist
from core.config import RUN_SUBDIRS, format_output_dir, make_run_dirs, to_dict, to_toml
from core.ema import EMA
from core.metrics import MetricsWriter, setup_logging
from core.objectives import build_objective
from core.optim import LossRecorder, build_optimizer, build_param_groups_for_models, build_scheduler
from core import state as rstate
import models
from data.index import load_or_build_index
from data.loader import batches_per_epoch, make_loader

DTYPES = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
FSDP_BLOCKS = {"sdxl": ("input_blocks", "output_blocks"), "sd3": ("joint_blocks",)}
EXIT_BAD_LOSS = 3


# -----------------------------------------------------------------------------
# What DDP wraps: the network, plus the text encoders when they are trained


class Trainee(nn.Module):
    """One micro-batch forward: (text encoding when trained) + the diffusion network."""

    def __init__(self, comp: Any, train_text_encoder: bool):
        super().__init__()
        self.network = comp.network
        self.text_encoders = nn.ModuleDict(comp.text_encoders() if train_text_encoder else {})
        self.__dict__["comp"] = comp  # not a submodule: the frozen parts stay out of DDP

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, text: dict[str, torch.Tensor] | None,
                captions: list[str], sizes: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        if text is None:
            with contextlib.nullcontext() if len(self.text_encoders) else torch.no_grad():
                text = self.comp.encode_text(captions, device=x_t.device)
        cond = self.comp.conditioning(text, *sizes)
        return self.network(x_t, t, **cond)


def mix_seed(*parts: int) -> int:
    """Deterministic 63-bit seed from integers (noise of each micro-step: same on resume)."""
    h = 0
    for p in parts:
        h = (h * 0x9E3779B97F4A7C15 + int(p) + 1) % (1 << 63)
    return h


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


def main(argv: list[str] | None = None) -> int:
    cfg, _ = cli.parse(argv, "train.py", __doc__ or "")
    info = dist.init()
    device, master = info.device, dist.is_main()

    # ---- run folder (the {date}/{time} of rank 0, for every rank)
    out_dir = dist.broadcast_object(format_output_dir(cfg.output_dir) if master else None)
    paths = {name: os.path.join(out_dir, name) for name in RUN_SUBDIRS}
    if master:
        make_run_dirs(out_dir)
        tmp = os.path.join(out_dir, f".config.toml.tmp-{os.getpid()}")
        with open(tmp, "w") as f:
            f.write(to_toml(cfg))
        os.replace(tmp, os.path.join(out_dir, "config.toml"))
    dist.barrier()
    log = setup_logging(paths["logs"], master)
    metrics = MetricsWriter(paths["logs"], master, cfg.log.tensorboard)
    log.info(f"run folder {out_dir}; {info.world_size} process(es) on {device.type}")
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.manual_seed(mix_seed(cfg.seed, info.rank))

    # ---- precision
    amp_dtype = DTYPES[cfg.train.mixed_precision]
    weight_dtype = torch.bfloat16 if cfg.train.full_bf16 else torch.float16 if cfg.train.full_fp16 else torch.float32
    te_dtype = weight_dtype if cfg.train.train_text_encoder else DTYPES[cfg.model.text_encoder_dtype]
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext

    # ---- model: the network, the frozen (or trained) text encoders, the VAE when needed
    family = models.family_of(cfg.model)
    use_store = bool(cfg.cache.cache_dir)
    sampling = bool(cfg.sample.sample_prompts) and (cfg.sample.sample_every_n_steps or cfg.sample.sample_every_n_epochs
                                                    or cfg.sample.sample_at_first)
    need_text = not cfg.cache.cache_text_encoder_outputs or sampling or cfg.train.train_text_encoder
    parts = [models.NETWORK_PART[family]] + (["vae"] if (not use_store or sampling) else []) \
        + (list(models.TEXT_PARTS[family]) if need_text else [])
    comp = models.from_config(cfg.model, device=device, seed=cfg.seed, parts=parts,
                              dtype={"network": weight_dtype, "vae": DTYPES[cfg.model.vae_dtype], "text": te_dtype})
    net = comp.network
    net.requires_grad_(True).train()
    net.gradient_checkpointing = cfg.train.gradient_checkpointing
    for name, te in comp.text_encoders().items():
        te.requires_grad_(cfg.train.train_text_encoder).train(cfg.train.train_text_encoder)
    if comp.vae is not None:
        comp.vae.requires_grad_(False).eval()
    trainee = Trainee(comp, cfg.train.train_text_encoder)
    log.info(f"{family}: network {sum(p.numel() for p in net.parameters()) / 1e6:.1f}M parameters "
             f"({weight_dtype}), autocast {amp_dtype}")

    # ---- data: index built once on rank 0 and shared; latents read lazily from the store
    store = None
    index_dir = cfg.cache.cache_dir if use_store else paths["state"]
    if use_store:
        from data.store import LatentStore
        store = LatentStore(cfg.cache.cache_dir, check_validity=cfg.cache.check_cache_validity)
    index = load_or_build_index(cfg.data, index_dir, is_main=master, barrier=dist.barrier)
    per_rank_batches = batches_per_epoch(index, cfg.data, info.world_size, store)
    if per_rank_batches == 0:
        raise SystemExit("no training data: the dataset (or the latent store) is empty; see the log and skipped.txt")
    accum = cfg.train.gradient_accumulation_steps
    steps_per_epoch = math.ceil(per_rank_batches / accum)
    total_steps = cfg.train.max_train_steps or steps_per_epoch * cfg.train.max_train_epochs
    log.info(f"{len(index)} images, {per_rank_batches} batches per rank per epoch, {steps_per_epoch} steps per epoch, "
             f"{total_steps} steps in all")

    # ---- optimizer, schedule, scaler, EMA, objective
    lrs = {"network": cfg.optimizer.learning_rate}
    named = {"network": list(net.named_parameters())}
    te_lr = {"te1": cfg.optimizer.learning_rate_te1, "te2": cfg.optimizer.learning_rate_te2,
             "clip_l": cfg.optimizer.learning_rate_te1, "clip_g": cfg.optimizer.learning_rate_te2}
    for name, te in trainee.text_encoders.items():
        named[name] = list(te.named_parameters())
        lrs[name] = te_lr.get(name) if te_lr.get(name) is not None else cfg.optimizer.learning_rate
    optimizer = build_optimizer(build_param_groups_for_models(named, cfg.optimizer, lrs), cfg.optimizer)
    scheduler = build_scheduler(optimizer, cfg.optimizer, total_steps)
    scaler = make_scaler(cfg, device)
    ema = EMA(net, decay=cfg.train.ema_decay, device="cpu" if cfg.train.ema_device == "cpu" else device) \
        if cfg.train.use_ema else None
    objective = build_objective(family, cfg.loss, cfg.model.v_parameterization)
    recorder = LossRecorder(cfg.log.loss_recorder_stride, cfg.log.loss_recorder_gamma)

    # ---- resume
    step, epoch, cursor, bad_steps = 0, 0, 0, 0
    resume_path = rstate.find_resume(cfg.train.resume, paths["state"], log.warning)
    if cfg.train.resume and resume_path is None:
        log.warning("resume = auto: no complete state found; starting from scratch")
    if resume_path is not None:
        st = rstate.read_state(resume_path, info.rank)
        load_trained(trainee, st["trained"])
        optimizer.load_state_dict(st["optimizer"])
        pr = st["progress"]
        scheduler.load_state_dict(pr["scheduler"])
        if scaler is not None and pr.get("scaler"):
            scaler.load_state_dict(pr["scaler"])
        if ema is not None and "ema" in st:
            ema.load_state_dict(st["ema"])
        recorder.load_state_dict(pr["loss_recorder"])
        step, epoch, bad_steps = pr["step"], pr["epoch"], pr["bad_steps"]
        cursor = pr["cursor"]  # global batches consumed in this epoch: valid for any world size
        if pr["world_size"] == info.world_size:
            rstate.restore_rng(st["rng"])
        else:
            log.warning(f"resuming with {info.world_size} processes (state saved with {pr['world_size']}): the epoch "
                        f"continues at global batch {cursor}; per-rank RNG streams are re-derived")
        log.info(f"resumed from {resume_path}: step {step}, epoch {epoch}")

    fsdp_blocks = [b for name in FSDP_BLOCKS[family] for b in getattr(net, name)]
    model = dist.wrap_fsdp(trainee, fsdp_blocks, amp_dtype) if cfg.train.fsdp else \
        dist.wrap_ddp(trainee, find_unused_parameters=cfg.train.train_text_encoder)

    # ---- sampling prompts
    prompts = []
    if sampling:
        from core.prompts import load_prompts
        defaults = {"sampler": cfg.sample.sample_sampler, **cfg.sample.sample_params}
        prompts = load_prompts(cfg.sample.sample_prompts, defaults)

    def previews(at_step: int) -> None:
        if not prompts:
            return
        from core.preview import sample_round
        with ema.swapped_into(net) if ema is not None else contextlib.nullcontext():
            sample_round(comp, prompts, paths["samples"], at_step, device, amp_dtype, cfg.save.output_name, log.info)

    def export(tag: str) -> None:
        """Exported model (original single-file layout) by rank 0, others wait (FSDP: gathered on all ranks first)."""
        full = {k: dist.full_tensor(v) for k, v in comp.export_state_dict().items()} if cfg.train.fsdp else None
        if master:
            path = os.path.join(paths["models"], f"{cfg.save.output_name}{tag}.safetensors")
            models.save(comp, path, cfg.save.save_precision, extra_metadata={"sdtrain.step": str(step)}, state_dict=full)
            if ema is not None:
                with ema.swapped_into(net):
                    models.save(comp, path.replace(".safetensors", "-ema.safetensors"), cfg.save.save_precision)
            log.info(f"exported {path}")
            prune_exports(paths["models"], cfg.save.output_name, cfg.save.save_last_n)
        dist.barrier()

    writes = [0]

    def save_state(crash_hook: bool = True) -> None:
        token = dist.broadcast_object(str(os.getpid()) if master else None)
        tmp = rstate.tmp_dir_for(paths["state"], step, token)
        rstate.write_rank_rng(tmp, info.rank)
        dist.barrier()
        if master:
            progress = {"step": step, "epoch": epoch, "cursor": cursor, "world_size": info.world_size,
                        "bad_steps": bad_steps, "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict() if scaler is not None else None,
                        "loss_recorder": recorder.state_dict(), "config": to_dict(cfg)}
            writes[0] += 1  # fault injection for tests: SIGKILL during the N-th state write
            hook = _crash_hook if crash_hook and writes[0] == int(os.environ.get("SDTRAIN_TEST_KILL_DURING_STATE_WRITE", "0")) else None
            final = os.path.join(paths["state"], f"step-{step:08d}")
            rstate.write_state(tmp, final, trained=trained_state(trainee), optimizer=optimizer.state_dict(),
                               progress=progress, ema=ema.state_dict() if ema is not None else None, before_marker=hook)
            rstate.prune_states(paths["state"], cfg.save.save_last_n_states)
            log.info(f"saved resumable state {final}")
        dist.barrier()

    # ---- loop
    stop = StopFlags(cfg.save)
    if cfg.sample.sample_at_first and step == 0:
        previews(0)
    bar = None
    if master:
        from tqdm import tqdm
        bar = tqdm(total=total_steps, initial=step, desc="steps", dynamic_ncols=True, disable=None)
    micro_in_epoch = cursor // info.world_size
    t_last, images_since = time.perf_counter(), 0
    exit_code = 0
    try:
        while step < total_steps:
            loader = make_loader(index, cfg.data, store, seed=cfg.seed, epoch=epoch, rank=info.rank,
                                 world_size=info.world_size, skip=cursor,
                                 num_workers=cfg.data.max_dataloader_n_workers, pin_memory=device.type == "cuda")
            batches = iter(loader)
            while step < total_steps:
                micro = []
                for _ in range(accum):
                    b = next(batches, None)
                    if b is None:
                        break
                    micro.append(b)
                if not micro:
                    break
                optimizer.zero_grad(set_to_none=True)
                loss_sum, finite = 0.0, True
                for i, batch in enumerate(micro):
                    gen_seed = mix_seed(cfg.seed, epoch, info.rank, micro_in_epoch + i)
                    generator = torch.Generator(device=device).manual_seed(gen_seed)
                    with dist.no_sync(model, skip=i < len(micro) - 1), autocast():
                        loss = micro_step_loss(model, comp, objective, batch, device, generator)
                    finite &= bool(torch.isfinite(loss).item())
                    scaled = loss / len(micro)
                    (scaler.scale(scaled) if scaler is not None else scaled).backward()
                    loss_sum += float(loss.detach()) / len(micro)
                    images_since += batch["loss_weight"].shape[0]
                micro_in_epoch += len(micro)
                cursor = micro_in_epoch * info.world_size
                if not dist.all_reduce_mean(1.0 if finite else 0.0) == 1.0:  # decided together: every rank skips
                    bad_steps += 1
                    optimizer.zero_grad(set_to_none=True)
                    log.warning(f"step {step}: non-finite loss, step skipped ({bad_steps} in a row)")
                    if bad_steps >= cfg.train.max_bad_steps:
                        save_state()
                        log.error(f"{bad_steps} consecutive non-finite losses: stopping. A resumable state was "
                                  f"saved; lower the learning rate or check the data / precision settings.")
                        exit_code = EXIT_BAD_LOSS
                        return exit_code
                    continue
                bad_steps = 0
                grad_norm = optimizer_step(cfg, model, optimizer, scaler)
                scheduler.step()
                step += 1
                if ema is not None:
                    ema.update(net, step)

                # -- logging
                loss_mean = dist.all_reduce_mean(loss_sum)
                recorder.add(loss_mean)
                if step % cfg.log.log_every_n_steps == 0 or step == total_steps:
                    now = time.perf_counter()
                    ips = images_since * info.world_size / max(now - t_last, 1e-9)
                    t_last, images_since = now, 0
                    lr = optimizer.param_groups[0]["lr"]
                    row = {"loss": loss_mean, "loss_avg": recorder.windowed_mean, "loss_ema": recorder.moving_average,
                           "lr": lr, "grad_norm": grad_norm, "images_per_s": ips, "epoch": epoch}
                    if device.type == "cuda":
                        row["gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                    metrics.write(step, row)
                    if bar is not None:
                        bar.set_postfix(loss=f"{loss_mean:.4f}", avg=f"{recorder.windowed_mean:.4f}",
                                        ema=f"{recorder.moving_average:.4f}", lr=f"{lr:.2e}", ips=f"{ips:.1f}")
                if bar is not None:
                    bar.update(1)

                # -- saving, sampling, stopping
                if cfg.save.save_every_n_steps and step % cfg.save.save_every_n_steps == 0 and step < total_steps:
                    export(f"-step{step:08d}")
                    if cfg.save.save_state:
                        save_state()
                if cfg.sample.sample_every_n_steps and step % cfg.sample.sample_every_n_steps == 0:
                    previews(step)
                if dist.any_true(stop.requested is not None):
                    log.warning(f"stop requested ({stop.requested or 'another rank'}): saving a resumable state")
                    save_state()
                    return 0
            else:
                continue
            # end of epoch
            epoch, cursor, micro_in_epoch = epoch + 1, 0, 0
            if step < total_steps:
                if cfg.save.save_every_n_epochs and epoch % cfg.save.save_every_n_epochs == 0:
                    export(f"-epoch{epoch:04d}")
                    if cfg.save.save_state:
                        save_state()
                if cfg.sample.sample_every_n_epochs and epoch % cfg.sample.sample_every_n_epochs == 0:
                    previews(step)
        # ---- end of training
        if cfg.save.save_on_train_end:
            export("")
            if cfg.save.save_state:
                save_state()
        sampled_now = cfg.sample.sample_every_n_steps and step % cfg.sample.sample_every_n_steps == 0
        if prompts and (cfg.sample.sample_every_n_steps or cfg.sample.sample_every_n_epochs) and not sampled_now:
            previews(step)
        log.info(f"done: {step} steps")
        return exit_code
    except KeyboardInterrupt:
        log.warning("aborted by a second Ctrl-C: no state saved")
        raise
    except Exception:
        if cfg.save.save_on_exception and info.world_size == 1:
            log.exception("training failed: saving a resumable state before exiting")
            with contextlib.suppress(Exception):
                save_state(crash_hook=False)
        raise
    finally:
        if bar is not None:
            bar.close()
        metrics.close()


# -----------------------------------------------------------------------------
# Helpers


def micro_step_loss(model: nn.Module, comp: Any, objective: Any, batch: dict[str, Any], device: torch.device,
                    generator: torch.Generator) -> torch.Tensor:
    """Loss of one micro-batch (mean over the batch, per-sample weights applied)."""
    if "latents" in batch:
        latents = batch["latents"].to(device, torch.float32, non_blocking=True)
    else:
        with torch.no_grad():
            latents = comp.encode_images(batch["images"].to(device, non_blocking=True))
    text = None
    cached = {k[3:]: v for k, v in batch.items() if k.startswith("te.")}
    if cached:
        items = [{k: v[i] for k, v in cached.items()} for i in range(len(batch["captions"]))]
        text = {k: v.to(device) for k, v in comp.collate_cached_text(items).items()}
    sizes = tuple(batch[k].to(device) for k in ("original_size", "crop_top_left", "target_size"))
    nb = objective.noise(latents, generator)
    pred = model(nb.x_t, nb.t, text, batch["captions"], sizes)
    return objective.loss(pred.float(), nb, batch["loss_weight"].to(device)).mean()


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
                   scaler: torch.amp.GradScaler | None) -> float:
    """Unscale, clip, step; returns the gradient norm before clipping."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    max_norm = cfg.optimizer.max_grad_norm if cfg.optimizer.max_grad_norm > 0 else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def trained_state(trainee: nn.Module) -> dict[str, torch.Tensor]:
    """Weights of everything trained (the network and trained text encoders), full tensors."""
    return {k: dist.full_tensor(v) for k, v in trainee.state_dict().items()}


def load_trained(trainee: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Resume: the trained weights back into place (before DDP/FSDP wrapping), strictly."""
    trainee.load_state_dict(sd, strict=True)


def prune_exports(model_dir: str, name: str, keep: int) -> None:
    """Keep the newest `keep` periodic exports (step/epoch files); 0 keeps all."""
    if keep <= 0:
        return
    periodic = sorted(f for f in os.listdir(model_dir)
                      if f.startswith(name + "-") and f.endswith(".safetensors") and "-ema" not in f)
    for f in periodic[:-keep]:
        for p in (f, f.replace(".safetensors", "-ema.safetensors")):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(model_dir, p))


def _crash_hook() -> None:  # fault injection for the kill-during-checkpoint test
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    code = main()
    dist.shutdown()
    sys.exit(code)
