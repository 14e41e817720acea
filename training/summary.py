"""What a run tells its user on rank 0: one block before the first step (data, model, batch, steps, precision,
caches), a progress bar with ETA while it runs, and one block at the end (time, throughput, where things are)."""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

RULE = "-" * 78
# Without a terminal (SLURM logs, pipes) the bar is replaced by a log line every this fraction of the run.
LOG_FRACTION = 0.05


def _count(n: int | float) -> str:
    """1234567 -> '1.23M'; small numbers as they are."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:g}"


def duration(seconds: float) -> str:
    """Seconds -> '42.1s', '3m05s', '2h07m'."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(round(seconds)), 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


def dataset_line(index: Any, rows: np.ndarray) -> str:
    """Images, samples per epoch with repeats, regularisation images, skipped inputs and buckets of what trains."""
    repeats = index.repeats[rows]
    reg_subsets = np.asarray([s.is_reg for s in index.subsets], dtype=bool)
    n_reg = int(reg_subsets[index.subset[rows]].sum()) if len(rows) else 0
    buckets, counts = np.unique(index.buckets[rows], axis=0, return_counts=True)
    order = np.argsort(-counts, kind="stable")
    shown = ", ".join(f"{w}x{h} ({c})" for (w, h), c in zip(buckets[order][:6], counts[order][:6]))
    more = f", +{len(buckets) - 6} more" if len(buckets) > 6 else ""
    left_out = len(index) - len(rows)
    rep = f"repeats {int(repeats.min())}-{int(repeats.max())}" if len(rows) and repeats.min() != repeats.max() \
        else f"repeats {int(repeats[0]) if len(rows) else 0}"
    return (f"{len(rows)} images trained ({rep}: {int(repeats.sum())} samples per epoch; {n_reg} regularisation)"
            f"{f', {left_out} indexed but not trained' if left_out else ''}, {len(index.skipped)} skipped; "
            f"{len(buckets)} bucket(s): {shown}{more}")


def batch_line(index: Any, data_cfg: Any, accum: int, world_size: int, device: torch.device) -> str:
    """Images per process, accumulation and processes; subsets with their own batch_size or resolution (kohya's
    [[datasets]]: a batch holds one of them) each with its [[data.subsets]] entries and resolution."""
    from training.run_metadata import dataset_groups
    groups = dataset_groups(index, data_cfg)
    tail = f" x {accum} accumulation x {world_size} process(es) on {device.type}"
    if len(groups) == 1:
        b = groups[0].batch_size
        return f"{b} per process{tail} = {b * accum * world_size} images per optimizer step"
    per = []
    for g in groups:
        entries = sorted({int(index.subsets[i].source) for i in g.subsets})
        which = f"subset{'s' if len(entries) > 1 else ''} {', '.join(map(str, entries))}"
        per.append(f"{g.batch_size} ({which} at {'x'.join(map(str, g.bucket.size))})")
    lo, hi = (n * accum * world_size for n in (min(g.batch_size for g in groups), max(g.batch_size for g in groups)))
    return (f"{', '.join(per)} per process{tail} = {lo if lo == hi else f'{lo}-{hi}'} images per optimizer step "
            f"(a batch holds one of these)")


def model_lines(comp: Any, trained: nn.Module) -> list[str]:
    """Family, parameters and dtype of every loaded part, and how many parameters train (train.py's Trainee:
    the network plus the trained text encoders)."""
    parts = ", ".join(f"{name} {_count(sum(p.numel() for p in m.parameters()))} {_dtype(m)}"
                      for name, m in comp.parts().items())
    n_train = sum(p.numel() for p in trained.parameters() if p.requires_grad)
    n_all = sum(p.numel() for m in comp.parts().values() for p in m.parameters())
    tes = list(trained.text_encoders)
    return [f"{comp.family}: {parts}",
            f"trainable {_count(n_train)} of {_count(n_all)} loaded parameters: the network"
            + (f" and text encoders {', '.join(tes)}" if tes else "; trained text encoders: none")]


def _dtype(m: nn.Module) -> str:
    p = next(m.parameters(), None)
    return str(p.dtype).replace("torch.", "") if p is not None else "-"


def start_block(*, cfg: Any, world_size: int, device: torch.device, index: Any, rows: np.ndarray, comp: Any,
                trained: nn.Module, optimizer: torch.optim.Optimizer, steps_per_epoch: int, total_steps: int,
                start_step: int, out_dir: str, amp_dtype: torch.dtype | None, weight_dtype: torch.dtype,
                memory: str = "") -> str:
    """The start-of-run summary (one block of lines, for the log); `memory`: the planner's estimate."""
    d, t = cfg.data, cfg.train
    accum = t.gradient_accumulation_steps
    epochs = total_steps / max(1, steps_per_epoch)
    if cfg.cache.cache_dir:
        cached = f"latents from {cfg.cache.cache_dir}" + (" (posterior mean + std)" if cfg.cache.store_posterior else "")
        cached += "; text-encoder outputs cached there too" if cfg.cache.cache_text_encoder_outputs \
            else "; text encoded every step"
    else:
        cached = "nothing: images are VAE-encoded and text encoded every step"
    precision = f"autocast {amp_dtype or 'off'}, trained weights {weight_dtype}".replace("torch.", "")
    if t.gradient_checkpointing:
        precision += ", gradient checkpointing"
    lines = [
        f"data       {dataset_line(index, rows)}",
        *(f"model      {line}" for line in model_lines(comp, trained)),
        f"batch      {batch_line(index, d, accum, world_size, device)}",
        f"steps      {steps_per_epoch} per epoch, {total_steps} in all (~{epochs:.3g} epochs)"
        + (f", resuming at step {start_step}" if start_step else ""),
        f"precision  {precision}",
        f"cached     {cached}",
        f"optimizer  {cfg.optimizer.optimizer_type}, {cfg.optimizer.lr_scheduler} schedule, warm-up "
        f"{cfg.optimizer.lr_warmup_steps} steps",
        *(f"optimizer group {g.get('name', '?')}: {len(g['params'])} tensors, lr {g['lr']:g}"
          for g in optimizer.param_groups),
        f"output     {out_dir}",
        *([f"memory     {memory}"] if memory else []),
    ]
    return "\n".join(["run summary", RULE, *lines, RULE])


def end_block(*, steps: tuple[int, int, int], started: tuple[float, float], images: int, paths: dict[str, str],
              model_name: str, suffix: str = ".safetensors") -> str:
    """The end-of-run summary: time, throughput and where the outputs are. steps = (first, last, total) of this
    run; started = perf_counter() at the start of main() and of the loop; images = trained in this run, all ranks;
    suffix: of the exported model ("" for a diffusers folder)."""
    now = time.perf_counter()
    seconds, loop_seconds = now - started[0], now - started[1]
    ips = images / loop_seconds if loop_seconds > 0 else 0.0
    model = os.path.join(paths["models"], model_name + suffix)
    grids = sorted(f for f in _listdir(paths["samples"]) if f.endswith("_grid.png"))
    states = sorted(f for f in _listdir(paths["state"]) if f.startswith("step-"))
    lines = [
        f"time       {duration(seconds)} wall ({duration(loop_seconds)} in the training loop): steps {steps[0]} -> "
        f"{steps[1]} of {steps[2]}, {images} images, {ips:.2f} images/s",
        f"model      {model if os.path.exists(model) else paths['models'] + ' (no final export: save_on_train_end = false)'}",
        f"samples    {paths['samples']}" + (f" (last grid {grids[-1]})" if grids else " (none)"),
        f"logs       {paths['logs']} (train.log, metrics.jsonl)",
        f"state      {os.path.join(paths['state'], states[-1]) if states else '(none saved)'}",
    ]
    return "\n".join(["run finished", RULE, *lines, RULE])


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


class Progress:
    """tqdm bar with ETA on a terminal; elsewhere (batch jobs) a log line with the ETA every LOG_FRACTION of the run.
    Disabled (does nothing) on ranks other than 0."""

    def __init__(self, total: int, initial: int, enabled: bool, log: Callable[[str], None]):
        self.total, self.n, self.log = total, initial, log
        self.enabled = enabled
        self.bar = None
        self.postfix: dict[str, str] = {}
        self.t0, self.n0 = time.perf_counter(), initial
        self.every = max(1, int(total * LOG_FRACTION))
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, desc="steps", dynamic_ncols=True,
                            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining} ETA, {rate_fmt}]"
                                       "{postfix}")

    def show(self, row: dict[str, float]) -> None:
        """The latest logged metrics (loss, average, moving average, lr, images/s)."""
        if not self.enabled:
            return
        self.postfix = {"loss": f"{row['loss']:.4f}", "avg": f"{row['loss_avg']:.4f}", "ema": f"{row['loss_ema']:.4f}",
                        "lr": f"{row['lr']:.2e}", "ips": f"{row['images_per_s']:.1f}"}
        if self.bar is not None:
            self.bar.set_postfix(self.postfix, refresh=False)

    def update(self) -> None:
        """One optimizer step done."""
        if not self.enabled:
            return
        self.n += 1
        if self.bar is not None:
            self.bar.update(1)
        elif self.n % self.every == 0 or self.n == self.total:
            rate = (self.n - self.n0) / max(time.perf_counter() - self.t0, 1e-9)
            eta = duration((self.total - self.n) / rate) if rate > 0 else "?"
            stats = " ".join(f"{k} {v}" for k, v in self.postfix.items())
            self.log(f"step {self.n}/{self.total} ({100 * self.n / self.total:.0f}%), ETA {eta}, {stats}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
