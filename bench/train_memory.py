#!/usr/bin/env python
"""Training memory: the planner's estimate (training/planner.py), and a real run on the CPU to check it.

    python bench/train_memory.py                                   # the standard table: planner, 1024 px, CUDA policy
    python bench/train_memory.py cfg.toml [table.key=value ...]    # one config's plan (as train.py --plan)
    python bench/train_memory.py cfg.toml [...] --measure          # + the config run on the CPU, random weights

--measure builds the config's parts on the CPU with random weights (model.model_preset: "base" is SDXL's real size,
"sd35_medium" SD3.5-medium's), attaches what train.py attaches (LoRA adapters, fp8 base weights), builds the
optimizer and fused-backward / stochastic-rounding stepper of the config, and runs --steps training micro-steps
(random latents and cached-text tensors unless the config loads the VAE / text encoders) under bf16 CPU autocast.
It prints, beside the planner's numbers (computed for the CPU's autocast policy, without the CUDA reserve):
  weights, gradients, optimizer  the sizes of the real tensors (parameters + buffers; .grad after a backward pass
                                 without stepping; optimizer.state after the steps);
  step                           the peak resident memory of the last step over the resident memory before it
                                 (/proc/self/status VmHWM, reset with /proc/self/clear_refs; glibc's heap trimmed
                                 before it), to compare with the planned activations (+ gradients without a fused
                                 backward pass);
  tensors                        the same step's peak of live tensor bytes, one more step counted by the planner's
                                 own counter (training/planner.py LiveBytes) on the real CPU tensors: what
                                 torch.cuda.max_memory_allocated would see, free of the C allocator;
  process                        the process's peak resident memory (includes torch's libraries, ~0.4-0.6 GB).
glibc's allocator is told to return freed blocks of >= 64 KiB at once (mallopt M_MMAP_THRESHOLD / M_TRIM_THRESHOLD,
as MALLOC_MMAP_THRESHOLD_ does), and its heap of smaller blocks is trimmed before each measured step (malloc_trim:
freed small blocks would otherwise stay resident from the step before, be reused without a new page, and be missed:
the tiny SDXL LoRA step then measured 25, 21, 17 MB in steps 2-4 against 32 MB with the trim), so the resident size
follows the live tensors; --default-malloc leaves glibc's defaults (no trim), under which freed memory is kept for
reuse and the resident size grows step by step.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import models  # noqa: E402
from core.config import config_from_dict, load_config  # noqa: E402
from training import fp8, planner  # noqa: E402

GB = 1e9
MMAP_THRESHOLD = 64 * 1024
STANDARD = [  # (label, config overrides on top of the base), all at 1024 px, batch 1
    ("SDXL full, AdamW fp32", {"model": {"model_preset": "base"}}),
    ("SDXL full, AdamW fp32, ckpt", {"model": {"model_preset": "base"}, "train": {"gradient_checkpointing": True}}),
    ("SDXL full, AdamW8bit bf16, ckpt", {"model": {"model_preset": "base"},
                                         "optimizer": {"optimizer_type": "AdamW8bit"},
                                         "train": {"gradient_checkpointing": True, "full_bf16": True}}),
    ("SDXL full, Adafactor bf16 fused SR, ckpt", {"model": {"model_preset": "base"},
                                                  "optimizer": {"optimizer_type": "Adafactor"},
                                                  "train": {"gradient_checkpointing": True, "full_bf16": True,
                                                            "fused_backward_pass": True}}),
    ("SDXL LoRA 32, ckpt", {"model": {"model_preset": "base"}, "train": {"gradient_checkpointing": True},
                            "network": {"network_module": "lora", "network_dim": 32, "network_train_unet_only": True}}),
    ("SD3.5-medium LoRA 32, ckpt", {"model": {"model_family": "sd3", "model_preset": "sd35_medium"},
                                    "train": {"gradient_checkpointing": True},
                                    "network": {"network_module": "lora", "network_dim": 32,
                                                "network_train_unet_only": True}}),
]
BASE = {"model": {"model_family": "sdxl"}, "data": {"resolution": 1024, "batch_size": 1},
        "cache": {"cache_dir": "<cache>", "cache_text_encoder_outputs": True}}


# ---------------------------------------------------------------------------------------------------------------------
# Memory of this process


def tame_malloc() -> None:
    """glibc: blocks >= 64 KiB mmapped and returned when freed (MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, MMAP_THRESHOLD)  # M_TRIM_THRESHOLD


def rss() -> tuple[int, int]:
    """(resident, peak resident) bytes of this process."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out["VmRSS"], out["VmHWM"]


def reset_peak() -> None:
    """Peak resident size := the current one (Linux: clear_refs 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _nbytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# ---------------------------------------------------------------------------------------------------------------------
# A real run of a config on the CPU


def _inputs(comp: Any, s: planner.Setup, b: int) -> dict[str, Any]:
    w, h = s.size
    g = torch.Generator().manual_seed(0)
    batch: dict[str, Any] = {}
    if s.latents_cached:
        batch["latents"] = torch.randn(b, comp.network.cfg.in_channels, h // 8, w // 8, generator=g)
    else:
        batch["images"] = torch.rand(b, 3, h, w, generator=g) * 2 - 1
    if not (comp.text_encoders() and not s.text_cached):
        batch["text"] = {k: torch.randn(v.shape, generator=g) for k, v in planner._cached_text(comp, s, b).items()}
    return batch


def random_components(cfg: Any, s: planner.Setup) -> Any:
    """The config's parts with random weights, materialised directly in their dtypes (models.build draws fp32
    weights first: an SDXL UNet would need its 10 GB fp32 copy on the way to bf16). A checkpoint in the config is
    read as usual."""
    if cfg.model.pretrained_model_name_or_path:
        return models.from_config(cfg.model, device="cpu", seed=0, parts=s.parts, dtype=s.dtypes)
    comp = models.build(s.family, cfg.model.model_preset, device="meta", parts=s.parts, dtype=s.dtypes,
                        max_token_length=cfg.model.max_token_length)
    g = torch.Generator().manual_seed(0)
    for name in s.parts:
        m = getattr(comp, name).to_empty(device="cpu")
        with torch.no_grad():
            for key, p in m.named_parameters():  # matrices random, 1-D weights (norm scales) 1, biases 0
                if p.dim() > 1:
                    p.normal_(0.0, 0.02, generator=g)
                else:
                    p.fill_(1.0 if key.endswith("weight") else 0.0)
            for b in m.buffers():
                b.zero_()
        setattr(comp, name, m)
    return comp


def measure(cfg: Any, steps: int = 2, log: Any = print, trim: bool = True) -> dict[str, int]:
    """Run `cfg`'s training step on the CPU with random weights; the real sizes and peaks (bytes). `trim`: glibc's
    heap trimmed before each measured step (malloc_trim), so that the step's small blocks count as new pages."""
    from diffusion.objectives import build_objective
    from training.optim import build_optimizer
    from training.steppers import make_stepper
    s = planner.setup_of(cfg)
    torch.manual_seed(0)
    comp = random_components(cfg, s)
    for m in comp.parts().values():
        m.requires_grad_(False).eval()
    net = comp.network
    net.train()
    net.gradient_checkpointing = s.ckpt
    if s.lora:
        from networks import lora
        lnet = lora.create_network(comp, cfg.network, unet=not cfg.network.network_train_text_encoder_only,
                                   text=not cfg.network.network_train_unet_only).apply_to()
        lnet.requires_grad_(True).train()
        trained = list(lnet.parameters())
    else:
        net.requires_grad_(True)
        trained = list(net.parameters())
        if cfg.train.train_text_encoder:
            for name, te in comp.text_encoders().items():
                if name in models.family(s.family).trainable_text_lr:
                    te.requires_grad_(True).train()
                    trained += list(te.parameters())
    fp8.apply(comp, s.fp8_parts, log)
    adapters = [*lnet.parameters(), *lnet.buffers()] if s.lora else []  # in no part's parameters
    out = {"weights": _nbytes([t for p in s.parts for t in (*getattr(comp, p).parameters(),
                                                             *getattr(comp, p).buffers())] + adapters)}
    opt = build_optimizer([{"params": trained}], cfg.optimizer)
    stepper = make_stepper(cfg, opt, torch.device("cpu"))
    objective = build_objective(models.family(s.family).objective, cfg.loss, bool(cfg.model.v_parameterization))
    batch = _inputs(comp, s, s.batch)
    autocast = torch.autocast("cpu", dtype=s.amp) if s.amp is not None else contextlib.nullcontext()

    def step(measure_grads: bool = False) -> None:
        with autocast:
            if "latents" in batch:
                latents = batch["latents"]
            else:
                with torch.no_grad(), torch.autocast("cpu", enabled=False):
                    latents = comp.encode_images(batch["images"]).float()
            if "text" in batch:
                text = batch["text"]
            else:
                with contextlib.nullcontext() if s.trained_text else torch.no_grad():
                    text = comp.encode_text(["a photo of a cat"] * s.batch, device="cpu")
            text = {k: v.float() for k, v in text.items()}
            sizes = tuple(torch.full((s.batch, 2), float(s.size[0])) for _ in range(3))
            nb = objective.noise(latents, torch.Generator().manual_seed(1))
            pred = net(nb.x_t, nb.t, **comp.conditioning(text, *sizes))
            loss = objective.loss(pred.float(), nb, torch.ones(s.batch)).mean()
        del pred
        stepper.backward(loss)
        if measure_grads:
            out["gradients"] = _nbytes(p.grad for p in trained if p.grad is not None)
        stepper.step(True)
        opt.zero_grad(set_to_none=True)

    if not s.fused:  # the gradients of one backward pass, before any step frees them
        t0 = time.perf_counter()
        step(measure_grads=True)
        log(f"step 1: {time.perf_counter() - t0:.1f} s")
    for i in range(steps - (0 if s.fused else 1)):
        gc.collect()
        if trim:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        before, _ = rss()
        reset_peak()
        t0 = time.perf_counter()
        step()
        _, peak = rss()
        out["step"] = peak - before
        log(f"step {i + 1 + (0 if s.fused else 1)}: {time.perf_counter() - t0:.1f} s, peak over resident "
            f"{(peak - before) / GB:.3f} GB")
    gc.collect()
    live = planner.LiveBytes("cpu")  # one more step, its tensors counted as the planner counts the simulated ones
    with live:
        step()
    out["tensors"] = live.peak
    if s.fused:
        out["gradients"] = max(p.numel() * p.element_size() for p in trained)
    state = {v.untyped_storage().data_ptr(): v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)}
    out["optimizer"] = _nbytes(state.values())  # shared tensors (bitsandbytes' quantile maps) once
    with open("/proc/self/status") as f:
        out["process"] = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
    return out


# ---------------------------------------------------------------------------------------------------------------------


def _cfg(overrides: dict[str, dict[str, Any]]) -> Any:
    raw: dict[str, dict[str, Any]] = {k: dict(v) for k, v in BASE.items()}
    for table, fields in overrides.items():
        raw.setdefault(table, {}).update(fields)
    return config_from_dict(raw)


@dataclass
class Setting:
    """One full fine-tune row as bench/gpu_suite.py asks for it (its memory rows compare the estimate with
    torch.cuda.max_memory_allocated)."""
    model: str
    batch: int = 1
    resolution: int = 1024
    optimizer: str = "adamw"
    weights: str = "fp32"
    fused: bool = False
    ckpt: bool = False
    sr: bool = False  # full_bf16 + stochastic rounding


def estimate(s: Setting, preset: str = "") -> dict[str, float]:
    """The planner's terms for a Setting (CUDA policy) and their sum without the CUDA reserve: what
    torch.cuda.max_memory_allocated sees."""
    names = {"adamw": "AdamW", "adamw8bit": "AdamW8bit", "adafactor": "Adafactor"}
    bf16 = s.weights == "bf16"
    cfg = _cfg({"model": {"model_family": s.model, "model_preset": preset or ("base" if s.model == "sdxl"
                                                                                else "sd3_medium")},
                "data": {"resolution": s.resolution, "batch_size": s.batch},
                "train": {"gradient_checkpointing": s.ckpt, "fused_backward_pass": s.fused, "full_bf16": bf16,
                          "stochastic_rounding": s.sr, "mixed_precision": "bf16"},
                "optimizer": {"optimizer_type": names[s.optimizer]}})
    p = planner.estimate(cfg, device_type="cuda")
    out = {"weights": float(sum(t.bytes for t in p.terms if t.name.startswith("weights"))),
           "grads": float(p.term("gradients")), "optimizer": float(p.term("optimizer")),
           "activations": float(p.term("activations"))}
    out["total"] = sum(out.values())
    return out


def standard_table() -> None:
    print(f"{'setting':44s} {'weights':>8} {'grads':>8} {'optim':>8} {'activ':>8} {'total GB':>9}  (planner, CUDA "
          "policy, no reserve)")
    for label, over in STANDARD:
        p = planner.estimate(_cfg(over), device_type="cuda")
        w = sum(t.bytes for t in p.terms if t.name.startswith("weights"))
        row = [w, p.term("gradients"), p.term("optimizer"), p.term("activations")]
        print(f"{label:44s} " + " ".join(f"{v / GB:8.2f}" for v in row) + f" {sum(row) / GB:9.2f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", nargs="?", help="TOML config (default: the standard table)")
    ap.add_argument("overrides", nargs="*", help="table.key=value overrides")
    ap.add_argument("--measure", action="store_true", help="also run the config on the CPU and measure it")
    ap.add_argument("--steps", type=int, default=2, help="measured steps (the first allocates the optimizer state)")
    ap.add_argument("--default-malloc", action="store_true", help="keep glibc's allocator defaults")
    ap.add_argument("--json", action="store_true", help="with --measure: one JSON line {term: [planned, measured]}")
    a = ap.parse_args(argv)
    if a.config is None:
        standard_table()
        return 0
    if a.measure and not a.default_malloc:
        tame_malloc()
    cfg = load_config(a.config, a.overrides)
    device_type = "cpu" if a.measure else "cuda"
    t0 = time.perf_counter()
    plan = planner.estimate(cfg, device_type=device_type)
    if not a.json:
        print(planner.report(plan))
        print(f"(planned in {time.perf_counter() - t0:.1f} s)")
    if not a.measure:
        return 0
    got = measure(cfg, a.steps, log=(lambda _m: None) if a.json else print, trim=not a.default_malloc)
    planned_step = plan.term("activations") + (0 if plan.setup.fused else plan.term("gradients"))
    rows = [("weights", sum(t.bytes for t in plan.terms if t.name.startswith("weights")), got["weights"]),
            ("gradients", plan.term("gradients"), got["gradients"]),
            ("optimizer", plan.term("optimizer"), got["optimizer"]),
            ("step (activations" + ("" if plan.setup.fused else " + gradients") + ")", planned_step, got["step"]),
            ("tensors (the step's live tensors)", planned_step, got["tensors"]),
            ("process peak", plan.total, got["process"])]
    if a.json:
        import json
        print(json.dumps({name.split(" ")[0]: [want, have] for name, want, have in rows}))
        return 0
    print(f"{'term':36s} {'planned GB':>11} {'measured GB':>12} {'ratio':>7}")
    for name, want, have in rows:
        print(f"{name:36s} {want / GB:11.3f} {have / GB:12.3f} {have / max(want, 1):7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
