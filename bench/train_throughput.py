#!/usr/bin/env python
"""Training-step throughput of the SDXL UNet and the SD3-medium MMDiT at 1024 px.

One step = bf16-autocast forward (fp32 weights) + MSE loss + backward + fused AdamW step + zero_grad.
For each model, batch size and gradient-checkpointing setting it prints images/s, the median step
time over --steps timed steps (after --warmup steps; CUDA events), the peak CUDA memory of the timed
steps (weights + grads + AdamW states + activations), achieved TFLOP/s and MFU.

FLOPs: forward FLOPs per image from shared/reference/CONVENTIONS.md (torch FlopCounterMode at 1024 px:
SDXL UNet 6.76 T; SD3-medium 8.44 T at 154 text tokens, 8.90 T at 333), and a training step counts
3x forward (backward = 2x forward). With gradient checkpointing the recomputed forward is NOT counted:
the MFU is model-FLOPs utilisation (the hardware does ~4x forward), so ckpt rows show the real cost of
the recompute as lower MFU. Other resolutions and the tiny preset use FLOPs measured on the meta device.

    python bench/train_throughput.py                                     # full run on one GPU
    python bench/train_throughput.py --models sd3 --batch-sizes 4 --grad-ckpt on
    python bench/train_throughput.py --flops-check                       # no GPU needed
    python bench/train_throughput.py --device cpu --preset tiny --steps 2  # smoke check
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

# Run as `python bench/train_throughput.py` from anywhere: make the repository importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models import mmdit, unet_sdxl  # noqa: E402

# shared/reference/CONVENTIONS.md "Compute figures": forward FLOPs per image at 1024 px.
REFERENCE_RESOLUTION = 1024
FWD_FLOPS_1024 = {"sdxl": 6.76e12, "sd3-154": 8.44e12, "sd3-333": 8.90e12}
# Forward + backward = 3x forward (backward computes grads of inputs and of weights).
TRAIN_FLOPS_PER_FWD = 3.0
# NVIDIA H100 SXM datasheet, dense bf16 tensor-core peak.
H100_SXM_BF16_TFLOPS = 989.0
# VAE downsampling factor (image px -> latent px) of SDXL and SD3.
VAE_FACTOR = 8
SDXL_TOKENS = 77  # CLIP context length
# Latent sides must divide by the UNet's two 2x downsamplings (and the MMDiT patch, 2).
LATENT_MULTIPLE = 4
# The tiny MMDiT's pos_embed table is 32 patches = 64 latent px wide: 256 px -> 32 latent px fits.
TINY_RESOLUTION = 256
GIB = 2**30


# ---------------------------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """One model + input shape: `name` keys FWD_FLOPS_1024, `family` groups rows sharing one model."""

    name: str
    family: str
    tokens: int
    build: Callable[[], nn.Module]
    inputs: Callable[[int, torch.device], tuple[Tensor, ...]]  # (batch, device) -> forward args


def sdxl_workload(preset: str, latent: int) -> Workload:
    cfg = unet_sdxl.PRESETS["base" if preset == "full" else "tiny"]

    def inputs(b: int, device: torch.device) -> tuple[Tensor, ...]:
        x = torch.randn(b, cfg.in_channels, latent, latent, device=device)  # [B, 4, H/8, W/8]
        timesteps = torch.rand(b, device=device) * 999  # [B]
        context = torch.randn(b, SDXL_TOKENS, cfg.context_dim, device=device)  # [B, 77, 2048]
        y = torch.randn(b, cfg.adm_in_channels, device=device)  # [B, 2816]
        return x, timesteps, context, y  # UNet.forward(x, timesteps, context, y)

    return Workload("sdxl", "sdxl", SDXL_TOKENS, lambda: unet_sdxl.UNet(cfg), inputs)


def sd3_workload(preset: str, latent: int, tokens: int) -> Workload:
    cfg = mmdit.PRESETS["sd3_medium" if preset == "full" else "tiny"]

    def inputs(b: int, device: torch.device) -> tuple[Tensor, ...]:
        x = torch.randn(b, cfg.in_channels, latent, latent, device=device)  # [B, 16, H/8, W/8]
        t = torch.rand(b, device=device) * 1000  # [B] sigma * 1000
        y = torch.randn(b, cfg.adm_in_channels, device=device)  # [B, 2048]
        context = torch.randn(b, tokens, cfg.context_in_dim, device=device)  # [B, T, 4096]
        return x, t, y, context  # MMDiT.forward(x, t, y, context)

    return Workload(f"sd3-{tokens}", "sd3", tokens, lambda: mmdit.MMDiT(cfg), inputs)


def make_workloads(args: argparse.Namespace) -> list[Workload]:
    latent = args.resolution // VAE_FACTOR
    out: list[Workload] = []
    for name in args.models:
        if name == "sdxl":
            out.append(sdxl_workload(args.preset, latent))
        else:
            out.extend(sd3_workload(args.preset, latent, t) for t in args.sd3_tokens)
    return out


# ---------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------


def measure_flops(w: Workload, backward: bool = False, grad_ckpt: bool = False) -> float:
    """FLOPs of one image (batch 1) counted by FlopCounterMode on the meta device: free, any size."""
    with torch.device("meta"):
        model = w.build()
        args = w.inputs(1, torch.device("meta"))
    model.train()
    model.gradient_checkpointing = grad_ckpt
    counter = FlopCounterMode(display=False)
    with counter, torch.set_grad_enabled(backward):
        out = model(*args)
        if backward:
            out.float().square().mean().backward()
    return float(counter.get_total_flops())


def fwd_flops_per_image(w: Workload, args: argparse.Namespace) -> tuple[float, str]:
    """Forward FLOPs per image and where the number comes from."""
    if args.preset == "full" and args.resolution == REFERENCE_RESOLUTION:
        return FWD_FLOPS_1024[w.name], "CONVENTIONS.md"
    return measure_flops(w), "measured (meta)"


def flops_check(workloads: list[Workload], args: argparse.Namespace) -> None:
    """Print measured forward / train-step FLOPs next to the CONVENTIONS.md constants."""
    print(f"FLOPs per image, FlopCounterMode on the meta device, {args.resolution} px, preset {args.preset}")
    header = f"{'model':<8} {'const fwd':>10} {'meas fwd':>10} {'meas/const':>10} {'fwd+bwd':>10} {'ratio':>6} {'ckpt f+b':>10} {'ratio':>6}"
    print(header)
    for w in workloads:
        fwd = measure_flops(w)
        train = measure_flops(w, backward=True)
        ckpt = measure_flops(w, backward=True, grad_ckpt=True)
        const = FWD_FLOPS_1024[w.name] if args.preset == "full" and args.resolution == REFERENCE_RESOLUTION else None
        print(
            f"{w.name:<8} {_tflop(const):>10} {_tflop(fwd):>10} "
            f"{(f'{fwd / const:.4f}' if const else '-'):>10} {_tflop(train):>10} {train / fwd:>6.2f} "
            f"{_tflop(ckpt):>10} {ckpt / fwd:>6.2f}"
        )
    print("per image; ratio = x forward. MFU counts 3x forward, also with checkpointing (which does ~4x).")


def _tflop(flops: float | None) -> str:
    """FLOPs with a unit that keeps 3 decimals readable (the tiny presets are ~GFLOP)."""
    if flops is None:
        return "-"
    return f"{flops / 1e12:.3f}T" if flops >= 1e11 else f"{flops / 1e9:.3f}G"


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One benchmark configuration and its result (step_s None = not run: see status)."""

    model: str
    batch: int
    grad_ckpt: bool
    status: str = "ok"
    step_s: float | None = None
    peak_bytes: int | None = None
    tflops: float | None = None
    mfu: float | None = None


def train_step(model: nn.Module, opt: torch.optim.Optimizer, args: tuple[Tensor, ...], target: Tensor,
               autocast: contextlib.AbstractContextManager) -> None:
    """Forward (autocast), MSE to a random target, backward, optimizer step, free grads."""
    with autocast:
        out = model(*args)
    F.mse_loss(out.float(), target).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def time_steps(step: Callable[[], None], device: torch.device, warmup: int, steps: int) -> list[float]:
    """Seconds per step after warm-up: CUDA events around each step, wall clock on CPU."""
    for _ in range(warmup):
        step()
    if device.type != "cuda":
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        return times
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)  # peak of the steady state, optimizer states included
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
    for start, end in events:
        start.record()
        step()
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) / 1e3 for start, end in events]


def bench_row(model: nn.Module, opt: torch.optim.Optimizer, w: Workload, batch: int, grad_ckpt: bool,
              fwd_flops: float, args: argparse.Namespace, device: torch.device) -> Row:
    """Time one configuration; a CUDA out-of-memory error gives an OOM row instead of stopping the run."""
    row = Row(w.name, batch, grad_ckpt)
    model.gradient_checkpointing = grad_ckpt
    autocast = contextlib.nullcontext() if args.full_bf16 else torch.autocast(device.type, dtype=torch.bfloat16)
    oom = False
    try:
        inputs = w.inputs(batch, device)
        target = torch.randn_like(inputs[0])
        times = time_steps(lambda: train_step(model, opt, inputs, target, autocast), device, args.warmup, args.steps)
    except torch.cuda.OutOfMemoryError:
        oom = True  # handled below, outside the except block, so the traceback's tensors are released
    inputs = target = None  # type: ignore[assignment]
    opt.zero_grad(set_to_none=True)
    if oom:
        row.status = "OOM"
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return row
    row.step_s = statistics.median(times)
    row.tflops = TRAIN_FLOPS_PER_FWD * fwd_flops * batch / row.step_s / 1e12
    if args.peak_tflops:
        row.mfu = row.tflops / args.peak_tflops
    if device.type == "cuda":
        row.peak_bytes = torch.cuda.max_memory_allocated(device)
    return row


def build(w: Workload, args: argparse.Namespace, device: torch.device) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Random-weight model on the device (fp32, or bf16 with --full-bf16) and its fused AdamW."""
    with torch.device(device):
        model = w.build()
    model.train()
    if args.full_bf16:
        model.to(torch.bfloat16)
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-2, fused=True)
    except RuntimeError as e:  # fused kernels exist for CUDA (and CPU on recent torch); say so, then go on
        print(f"note: fused AdamW unavailable on {device} ({e}); using the foreach implementation")
        opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-2)
    return model, opt


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def format_row(r: Row) -> str:
    ckpt = "on" if r.grad_ckpt else "off"
    if r.step_s is None:
        return f"{r.model:<8} {r.batch:>3} {ckpt:>4} {r.status:>8} {'-':>9} {'-':>9} {'-':>8} {'-':>6}"
    peak = f"{r.peak_bytes / GIB:.1f}" if r.peak_bytes is not None else "-"
    mfu = f"{100 * r.mfu:.1f}%" if r.mfu is not None else "-"
    return (f"{r.model:<8} {r.batch:>3} {ckpt:>4} {r.batch / r.step_s:>8.2f} {1e3 * r.step_s:>9.1f} "
            f"{peak:>9} {r.tflops:>8.3g} {mfu:>6}")


TABLE_HEADER = f"{'model':<8} {'B':>3} {'ckpt':>4} {'img/s':>8} {'step ms':>9} {'peak GiB':>9} {'TFLOP/s':>8} {'MFU':>6}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="sdxl,sd3", type=lambda s: s.split(","),
                    help="comma list of sdxl, sd3 (SD3-medium MMDiT) [sdxl,sd3]")
    ap.add_argument("--preset", choices=("full", "tiny"), default="full",
                    help="full: UNet 'base' and MMDiT 'sd3_medium'; tiny: the test presets (smoke checks) [full]")
    ap.add_argument("--device", default="cuda", help="torch device [cuda]")
    ap.add_argument("--batch-sizes", default="1,4,8", type=lambda s: [int(v) for v in s.split(",")],
                    help="comma list of batch sizes [1,4,8]")
    ap.add_argument("--grad-ckpt", choices=("off", "on", "both"), default="both",
                    help="gradient checkpointing (model attribute gradient_checkpointing) [both]")
    ap.add_argument("--sd3-tokens", default="154,333", type=lambda s: [int(v) for v in s.split(",")],
                    help="SD3 text tokens: 154 = 77 CLIP + 77 T5 (reference), 333 = 77 + 256 (diffusers) [154,333]")
    ap.add_argument("--resolution", type=int, default=None,
                    help="square image size in px, latents are size/8; FLOPs are measured when not 1024 "
                         f"[{REFERENCE_RESOLUTION}; {TINY_RESOLUTION} with --preset tiny]")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per configuration [3]")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per configuration; the median is reported [10]")
    ap.add_argument("--full-bf16", action="store_true",
                    help="bf16 weights, grads and AdamW states instead of fp32 weights + bf16 autocast")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help=f"peak TFLOP/s for MFU [{H100_SXM_BF16_TFLOPS:g} = H100 SXM bf16 dense on CUDA; "
                         "on other devices MFU is left out unless given]")
    ap.add_argument("--flops-check", action="store_true",
                    help="only print FLOPs measured with FlopCounterMode on the meta device next to the constants")
    args = ap.parse_args(argv)
    bad = [m for m in args.models if m not in ("sdxl", "sd3")]
    if bad:
        ap.error(f"--models: unknown {bad}; allowed: sdxl, sd3")
    if any(b < 1 for b in args.batch_sizes) or args.steps < 1 or args.warmup < 0:
        ap.error("batch sizes and --steps must be >= 1, --warmup >= 0")
    if args.resolution is None:
        args.resolution = REFERENCE_RESOLUTION if args.preset == "full" else TINY_RESOLUTION
    if args.resolution < LATENT_MULTIPLE * VAE_FACTOR or args.resolution % (LATENT_MULTIPLE * VAE_FACTOR):
        ap.error(f"--resolution must be a positive multiple of {LATENT_MULTIPLE * VAE_FACTOR}, got {args.resolution}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workloads = make_workloads(args)
    if args.flops_check:
        flops_check(workloads, args)
        return 0
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("error: --device cuda but no CUDA device is visible (use --device cpu --preset tiny for a smoke run)")
            return 2
        if args.peak_tflops is None:
            args.peak_tflops = H100_SXM_BF16_TFLOPS
        # TF32 for the fp32 work outside autocast; cuDNN autotunes the UNet convs during warm-up.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        name = torch.cuda.get_device_name(device)
    else:
        name = device.type
    torch.manual_seed(0)
    ckpts = {"off": [False], "on": [True], "both": [False, True]}[args.grad_ckpt]
    precision = "bf16 weights/grads/AdamW" if args.full_bf16 else "fp32 weights + bf16 autocast"
    print(f"device {name} | torch {torch.__version__} | {precision} | fused AdamW | "
          f"{args.resolution}px | warmup {args.warmup}, median of {args.steps} steps | "
          f"peak {args.peak_tflops or '-'} TFLOP/s")

    rows: list[Row] = []
    family = None
    model = opt = None
    for w in workloads:
        flops, source = fwd_flops_per_image(w, args)
        print(f"{w.name}: {_tflop(flops)}FLOP forward per image ({source}), step = {TRAIN_FLOPS_PER_FWD:g}x")
        if w.family != family:  # the SD3 token variants share one model and optimizer
            model = opt = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            try:
                model, opt = build(w, args, device)
            except torch.cuda.OutOfMemoryError:
                model = opt = None
            family = w.family
        for batch in args.batch_sizes:
            for ckpt in ckpts:
                if model is None or opt is None:
                    row = Row(w.name, batch, ckpt, status="OOM")
                else:
                    row = bench_row(model, opt, w, batch, ckpt, flops, args, device)
                rows.append(row)
                print(format_row(row), flush=True)

    print()
    print("MFU = 3 x forward FLOPs x images / step time / peak; with ckpt=on the recomputed forward is not counted.")
    print(TABLE_HEADER)
    for row in rows:
        print(format_row(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
