#!/usr/bin/env python
"""The GPU suite: ours against diffusers side by side in one process, then what decides the trainer's defaults.

    python bench/gpu_suite.py                               # one H100 / H200: <= 7 minutes (--budget-s 390)
    python bench/gpu_suite.py --device cpu --preset tiny    # seconds; what CI runs (tests/test_gpu_suite.py)

Writes gpu_suite.json and gpu_suite.md to --out (default $OUT, else .), both rewritten after every row, so a run cut
short still returns every row measured before it. Each row is OOM-safe (an out-of-memory error is an "OOM" row and the
suite goes on) and budgeted: a row whose estimated time would end past --budget-s prints "SKIP (budget)". Only one
model is on the GPU at a time (the idle one waits in host memory). Sections, in this order (the cheap, decisive rows
first; the compile rows, the long pole, last):

  pair       per family (SDXL UNet, SD3-medium MMDiT; 1024 px): a parity row (bf16-autocast forward, max |ours - ref| /
             max |ref|, the same random weights on both sides via the converters the tests use), then training steps
             as the trainer runs them (fp32 weights, bf16 autocast, MSE, backward, fused AdamW, zero_grad; CUDA events,
             median) at --batches (4) with gradient checkpointing on and off: ours, then diffusers. MFU = images/s x 3
             x forward FLOPs per image (CONVENTIONS.md: SDXL 6.76 T, SD3-medium 8.44 T at 154 tokens; FlopCounterMode
             on the meta device for other sizes) / the GPU's dense bf16 peak (H100 / H200: 989 TFLOP/s).
  vae        the SDXL VAE encoder: parity, then images/s at batch 4 (bf16), ours vs diffusers; CLIP-L parity.
  memory     peak torch.cuda.max_memory_allocated of 3 steps of our SDXL UNet, batch 1, checkpointing: AdamW (fp32
             weights), Adafactor + fused backward (bf16 weights), the same + stochastic rounding. Each model built in
             its own dtype (never an fp32 copy first), nothing else on the GPU, the allocator with expandable_segments.
  attention  forward + backward of one SDPA call per kernel (flash, cuDNN, memory-efficient) at the networks' shapes
             (SDXL 64x64 self-attention, 10 heads; SD3-medium 4250 tokens, 24 heads; head dim 64; bf16, batch 4): which
             kernel models/attention.py should try first.
  layout     our SDXL UNet training step with channels_last on vs off (same batch, same process).
  compiled   training steps compiled: ours as train.py compiles (training/speed.compile_network: each block and the
             middle block a static-shape region), diffusers with each of its blocks compiled the same way; the first
             step's seconds (the compile) in compile_s. SD3 first (24 identical blocks: one compile), then SDXL.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import time
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
# Before CUDA is initialised (import of torch does not initialise it): fewer fragmentation OOMs in the memory rows.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import train_memory  # noqa: E402
import train_throughput as tt  # noqa: E402
from models import attention as attn_mod  # noqa: E402
from models import mmdit, text_encoders, unet_sdxl, vae as vae_mod  # noqa: E402
from training import speed  # noqa: E402
from training.optim import Adafactor  # noqa: E402
from training.steppers import FusedBackward  # noqa: E402

SIZE_EMB_DIM = 256  # sgm: 6 size / crop numbers, each a 256-d sinusoid
SD3_TOKENS = 154    # CLIP 77 + T5 77 (the reference code's padding)
TINY = {"resolution": 64, "sd3_resolution": 128, "unet": "tiny", "mmdit": "tiny", "vae": "tiny", "clip": "tiny_l"}
FULL = {"resolution": 1024, "sd3_resolution": 1024, "unet": "base", "mmdit": "sd3_medium", "vae": "sdxl",
        "clip": "clip_l"}
# CONVENTIONS.md "Compute figures": forward FLOPs per image at 1024 px (FlopCounterMode).
FWD_FLOPS_1024 = {"SDXL": 6.76e12, "SD3": 8.44e12}
TRAIN_FLOPS_PER_FWD = 3.0  # backward = 2x forward; a checkpointing recompute is not counted (model FLOPs)
PEAK_BF16 = {"H100": 989e12, "H200": 989e12}  # dense bf16 tensor-core peak, NVIDIA datasheets (SXM)
# Estimated seconds per row on an H100 (model build and moves included), for the budget: a row that would end past
# --budget-s is skipped, so the suite ends with its summary inside its timeout.
EST_S = {"parity": 12, "train": 6, "vae": 6, "memory": 8, "attention": 1, "layout": 8, "compiled_sd3": 60,
         "compiled_sdxl": 150}


class Suite:
    """Rows, the time budget and the output files."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.rows, self.t0 = args, [], time.perf_counter()
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        # bf16 as trained on GPUs; fp32 on CPU (CPU bf16 convolutions are slow, and fp32 parity is the stricter check)
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        name = torch.cuda.get_device_name(self.device) if self.cuda and torch.cuda.is_available() else "cpu"
        self.device_name = name
        self.peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
        os.makedirs(args.out, exist_ok=True)

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else contextlib.nullcontext()

    def run(self, section: str, name: str, fn: Callable[[], dict[str, Any]], est: str = "") -> dict[str, Any]:
        """One row: fn() -> measured fields; OOM and budget handled; printed and saved at once."""
        row: dict[str, Any] = {"section": section, "name": name}
        elapsed = time.perf_counter() - self.t0
        if elapsed + (EST_S.get(est, 0) if self.cuda else 0) > self.args.budget_s:
            row["status"] = "SKIP (budget)"
        else:
            oom = False
            try:
                row.update(fn())
                row.setdefault("status", "ok")
            except torch.cuda.OutOfMemoryError:
                oom = True  # released outside the except block, so the traceback's tensors go too
            except Exception as e:  # one broken row (e.g. a diffusers API change) must not end the suite
                row["status"] = f"error: {type(e).__name__}: {str(e)[:200]}"
            if oom:
                row["status"] = "OOM"
            free_cuda(self.device)
        row["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
        self.rows.append(row)
        print(f"[{row['elapsed_s']:6.1f}s] {section:9s} {name:44s} {fmt_fields(row)}", flush=True)
        self.save()
        return row

    def save(self) -> None:
        meta = {"device": self.device_name, "torch": torch.__version__, "preset": self.args.preset,
                "peak_bf16_tflops": self.peak / 1e12 if self.peak else None}
        write_atomic(os.path.join(self.args.out, "gpu_suite.json"), json.dumps({"meta": meta, "rows": self.rows},
                                                                                indent=1))
        write_atomic(os.path.join(self.args.out, "gpu_suite.md"), markdown(meta, self.rows))


def write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fmt_fields(row: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in row.items() if k not in ("section", "name", "elapsed_s"))


COLUMNS = {"parity": ("rel_err",), "pair": ("img_s", "step_ms", "tflops", "mfu", "peak_gib"),
           "vae": ("img_s", "rel_err"), "memory": ("peak_gib", "estimate_gib"), "attention": ("ms",),
           "layout": ("img_s", "step_ms", "peak_gib"), "compiled": ("img_s", "step_ms", "mfu", "compile_s", "peak_gib")}


def markdown(meta: dict, rows: list[dict]) -> str:
    out = [f"GPU suite on {meta['device']}, torch {meta['torch']}, preset {meta['preset']}", ""]
    for section, cols in COLUMNS.items():
        sel = [r for r in rows if r["section"] == section]
        if not sel:
            continue
        out += [f"| {section} | " + " | ".join(cols) + " | status |", "|---" * (len(cols) + 2) + "|"]
        out += [f"| {r['name']} | " + " | ".join(str(r.get(c, "-")) for c in cols) + f" | {r['status']} |"
                for r in sel]
        out.append("")
    return "\n".join(out)


def free_cuda(device: torch.device) -> None:
    """Between rows on a GPU: cycles collected, the cache emptied (a CPU run frees by reference counting alone)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float(f"{((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item():.3e}")


@torch.no_grad()
def seeded_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Deterministic random weights with some spread (norm weights and biases not at their trivial init), drawn on
    the model's device (a CPU draw of 2.6 B numbers would take half a minute)."""
    dev = next(model.parameters()).device
    g = torch.Generator(device=dev).manual_seed(seed)
    for p in model.parameters():
        scale = 0.02 if p.dim() > 1 else 0.1
        p.add_(torch.randn(p.shape, generator=g, device=dev, dtype=torch.float32).to(p.dtype) * scale)
    return model


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Modules built inside are created in `dtype` (no fp32 copy first)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def park(*models: nn.Module) -> None:
    """The idle models to host memory, the GPU's cache emptied."""
    for m in models:
        m.to("cpu")
    free_cuda(torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))


# ---------------------------------------------------------------------------------------------------------------------
# Model pairs: ours and the reference with the same weights


class DiffusersUNet(nn.Module):
    """diffusers' UNet with the sgm call signature: y = [pooled (B, 1280), sinusoid(time_ids) (B, 6 x 256)] is split
    back into the pooled embedding and raw time_ids (diffusers embeds them itself)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, context, pooled, time_ids):
        return self.unet(x, t, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample

    def set_ckpt(self, on: bool) -> None:
        self.unet.enable_gradient_checkpointing() if on else self.unet.disable_gradient_checkpointing()

    def blocks(self) -> list[nn.Module]:
        return [*self.unet.down_blocks, self.unet.mid_block, *self.unet.up_blocks]


class DiffusersMMDiT(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x, t, y, context):
        return self.model(hidden_states=x, timestep=t, pooled_projections=y, encoder_hidden_states=context).sample

    def set_ckpt(self, on: bool) -> None:
        self.model.enable_gradient_checkpointing() if on else self.model.disable_gradient_checkpointing()

    def blocks(self) -> list[nn.Module]:
        return list(self.model.transformer_blocks)


def sdxl_pair(p: dict, device: torch.device) -> tuple[nn.Module, nn.Module]:
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from tests.test_unet_sdxl import PREFIX, _diffusers_config

    cfg = unet_sdxl.PRESETS[p["unet"]]
    with torch.device(device):
        ours = seeded_(unet_sdxl.UNet(cfg))
        dcfg = _diffusers_config(cfg)
        ref = UNet2DConditionModel(**dcfg)
    ref.load_state_dict(convert_ldm_unet_checkpoint({PREFIX + k: v for k, v in ours.state_dict().items()}, dcfg))
    return ours, DiffusersUNet(ref)


def sdxl_inputs(cfg, b: int, side: int, device: torch.device) -> tuple[tuple, tuple]:
    """(ours args, diffusers args) for the same batch."""
    from tests.test_unet_sdxl import _sgm_y

    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(b, cfg.in_channels, side, side, generator=g).to(device)
    t = (torch.rand(b, generator=g) * 999).to(device)
    ctx = torch.randn(b, 77, cfg.context_dim, generator=g).to(device)
    pooled = torch.randn(b, cfg.adm_in_channels - 6 * SIZE_EMB_DIM, generator=g).to(device)
    time_ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]] * b, device=device)
    return (x, t, ctx, _sgm_y(pooled, time_ids)), (x, t, ctx, pooled, time_ids)


def sd3_pair(p: dict, device: torch.device) -> tuple[nn.Module, nn.Module]:
    from tests.test_mmdit import _diffusers_model

    cfg = mmdit.PRESETS[p["mmdit"]]
    with torch.device(device):
        ours = seeded_(mmdit.MMDiT(cfg))
        ref = _diffusers_model(cfg, ours.state_dict())
    return ours, DiffusersMMDiT(ref)


def sd3_inputs(cfg, b: int, side: int, device: torch.device) -> tuple[tuple, tuple]:
    g = torch.Generator(device="cpu").manual_seed(2)
    x = torch.randn(b, cfg.in_channels, side, side, generator=g).to(device)
    t = (torch.rand(b, generator=g) * 1000).to(device)
    y = torch.randn(b, cfg.adm_in_channels, generator=g).to(device)
    ctx = torch.randn(b, SD3_TOKENS, cfg.context_in_dim, generator=g).to(device)
    return (x, t, y, ctx), (x, t, y, ctx)


FAMILIES = {"SDXL": (sdxl_pair, sdxl_inputs, "resolution"), "SD3": (sd3_pair, sd3_inputs, "sd3_resolution")}


def set_ckpt(model: nn.Module, on: bool) -> None:
    if hasattr(model, "set_ckpt"):
        model.set_ckpt(on)
    else:
        model.gradient_checkpointing = on


def fwd_flops(s: Suite, family: str, ours: nn.Module, inputs: Callable, side: int) -> float:
    """Forward FLOPs of one image: CONVENTIONS.md at 1024 px full size, else FlopCounterMode on the meta device."""
    if s.args.preset == "full" and side * 8 == 1024:
        return FWD_FLOPS_1024[family]
    with torch.device("meta"):
        model = type(ours)(ours.cfg)
    args = inputs(ours.cfg, 1, side, torch.device("meta"))[0]
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(*args)
    return float(counter.get_total_flops())


def train_fields(s: Suite, model: nn.Module, opt: torch.optim.Optimizer, a: tuple, b: int, flops: float,
                 warmup: int) -> dict[str, Any]:
    """Median step time of trainer-like steps -> images/s, step ms, model TFLOP/s, MFU, steady-state peak."""
    target = torch.randn_like(a[0])
    times = tt.time_steps(lambda: tt.train_step(model, opt, a, target, s.autocast()), s.device, warmup, s.args.steps)
    step = statistics.median(times)
    out: dict[str, Any] = {"img_s": round(b / step, 2), "step_ms": round(step * 1e3, 1),
                           "tflops": float(f"{b * TRAIN_FLOPS_PER_FWD * flops / step / 1e12:.3g}")}
    if s.peak:
        out["mfu"] = round(b * TRAIN_FLOPS_PER_FWD * flops / step / s.peak, 3)
    if s.cuda:
        out["peak_gib"] = round(torch.cuda.max_memory_allocated(s.device) / 2**30, 2)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Sections


def pair_rows(s: Suite, p: dict, family: str) -> None:
    """Parity, then training steps: ours (every batch / checkpointing setting), then diffusers; one model on the GPU."""
    make, inputs, res_key = FAMILIES[family]
    side = p[res_key] // 8
    models: dict[str, nn.Module] = {}

    def build() -> dict[str, Any]:
        ours, ref = make(p, s.device)
        models.update(ours=ours, diffusers=ref)
        a, r = inputs(ours.cfg, 1, side, s.device)
        with torch.no_grad(), s.autocast():
            return {"rel_err": rel_err(ours.eval()(*a), ref.eval()(*r))}

    s.run("parity", f"{family} forward {p[res_key]}px {'bf16 autocast' if s.cuda else 'fp32'}", build, "parity")
    if "ours" not in models:
        return
    flops = fwd_flops(s, family, models["ours"], inputs, side)
    park(models["diffusers"])
    for impl in ("ours", "diffusers"):
        model = models[impl].to(s.device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=1e-2, fused=s.cuda)
        for b in s.args.batches:
            for ck in (True, False):
                def fn(b=b, ck=ck, model=model, opt=opt):
                    set_ckpt(model, ck)
                    a = inputs(models["ours"].cfg, b, side, s.device)[0 if impl == "ours" else 1]
                    return train_fields(s, model, opt, a, b, flops, s.args.warmup)
                s.run("pair", f"{family} {impl} b{b} ckpt={'on' if ck else 'off'}", fn, "train")
                opt.zero_grad(set_to_none=True)
        del opt
        set_ckpt(model, False)
        park(model)
    models.clear()
    free_cuda(s.device)


def vae_rows(s: Suite, p: dict) -> None:
    from tests.test_vae import _diffusers_vae

    side = p["resolution"]
    with torch.device(s.device):
        ours = seeded_(vae_mod.AutoencoderKL(vae_mod.PRESETS[p["vae"]]).eval())
        ref = _diffusers_vae(ours).eval()
    ours.to(s.dtype)
    ref.to(s.dtype)
    x = (torch.rand(4, 3, side, side, generator=torch.Generator().manual_seed(3)) * 2 - 1).to(s.device, s.dtype)
    with torch.no_grad():
        err = rel_err(ours.encode(x[:1])[0], ref.encode(x[:1]).latent_dist.mean)
    pair = {"ours": (ours, ref, ours.encode), "diffusers": (ref, ours, ref.encode)}
    for impl, (model, other, encode) in pair.items():
        def row(model=model, other=other, encode=encode):
            park(other)
            model.to(s.device)
            with torch.no_grad():
                times = tt.time_steps(lambda: encode(x), s.device, s.args.warmup, s.args.steps)
            return {"img_s": round(x.shape[0] / statistics.median(times), 2), "rel_err": err}
        s.run("vae", f"VAE encode {impl} b4 {side}px", row, "vae")
    pair.clear()


def clip_row(s: Suite, p: dict) -> None:
    import transformers
    from tests.test_text_encoders import _hf_config, _input_ids, _load_into_hf

    def fn():
        with torch.device(s.device):
            ours = seeded_(text_encoders.CLIPTextModel(text_encoders.PRESETS[p["clip"]]).eval())
            ref = transformers.CLIPTextModel(_hf_config(ours.cfg)).eval()
        _load_into_hf(ref, ours.state_dict())
        ids = _input_ids().to(s.device)
        with torch.no_grad(), s.autocast():
            return {"rel_err": rel_err(ours(ids, layer=-2)[0],
                                       ref(input_ids=ids, output_hidden_states=True).hidden_states[-2])}
    s.run("parity", "CLIP-L hidden_states[-2]", fn, "parity")


def memory_rows(s: Suite, p: dict) -> None:
    """Peak memory of our SDXL UNet full fine-tune at batch 1 with checkpointing, three optimizer settings."""
    side = p["resolution"] // 8
    cfg = unet_sdxl.PRESETS[p["unet"]]
    settings = [("AdamW, fp32 weights", "adamw", torch.float32, False, False),
                ("Adafactor + fused backward, bf16 weights", "adafactor", torch.bfloat16, True, False),
                ("Adafactor + fused backward + stochastic rounding, bf16", "adafactor", torch.bfloat16, True, True)]
    for label, opt_name, dtype, fused, sr in settings[: p.get("only")]:
        def fn(opt_name=opt_name, dtype=dtype, fused=fused, sr=sr):
            free_cuda(s.device)
            if s.cuda:
                torch.cuda.reset_peak_memory_stats(s.device)
            with torch.device(s.device), default_dtype(dtype):  # built in its dtype: no fp32 copy in the peak
                net = unet_sdxl.UNet(cfg).train()
            net.gradient_checkpointing = True
            params = list(net.parameters())
            opt = (torch.optim.AdamW(params, lr=1e-5, fused=s.cuda) if opt_name == "adamw"
                   else Adafactor(params, lr=1e-5))
            hooks = FusedBackward(opt, max_grad_norm=0.0, stochastic_rounding=sr, seed=0) if fused else None
            a = sdxl_inputs(cfg, 1, side, s.device)[0]
            target = torch.randn_like(a[0])
            for _ in range(3 if s.cuda else 1):  # the optimizer state exists after the first step
                with s.autocast():
                    out = net(*a)
                F.mse_loss(out.float(), target).backward()
                if hooks is not None:
                    hooks.finish()
                else:
                    opt.step()
                    opt.zero_grad(set_to_none=True)
            est = train_memory.estimate(train_memory.Setting(
                "sdxl", 1, p["resolution"], opt_name, "fp32" if dtype == torch.float32 else "bf16", fused, True, sr),
                preset=p["unet"])
            row = {"estimate_gib": round(est["total"] / 2**30, 2)}
            if s.cuda:
                row["peak_gib"] = round(torch.cuda.max_memory_allocated(s.device) / 2**30, 2)
            if hooks is not None:
                hooks.remove()
            return row
        s.run("memory", f"SDXL full FT b1 ckpt: {label}", fn, "memory")


def attention_rows(s: Suite, p: dict) -> None:
    """One SDPA forward + backward per kernel at the networks' attention shapes (bf16, batch 4, head dim 64)."""
    if not s.cuda:
        return
    full = p is FULL
    shapes = {"SDXL self-attn 64x64, 10 heads": (4, 10, 4096 if full else 64, 64),
              "SDXL self-attn 32x32, 20 heads": (4, 20, 1024 if full else 16, 64),
              "SD3-medium joint 4250 tokens, 24 heads": (4, 24, 4250 if full else 80, 64)}
    for label, (b, h, n, d) in shapes.items():
        q, k, v = (torch.randn(b, h, n, d, device=s.device, dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        for name in ("flash", "cudnn", "efficient"):
            def fn(name=name, q=q, k=k, v=v):
                from torch.nn.attention import sdpa_kernel

                def step():
                    with sdpa_kernel([attn_mod.BACKENDS[name]]):
                        F.scaled_dot_product_attention(q, k, v).sum().backward()
                try:
                    times = tt.time_steps(step, s.device, 2, 10)
                except RuntimeError as e:  # this kernel does not take this call: a finding, not a failure
                    return {"status": f"unsupported: {str(e).splitlines()[0][:120]}"}
                return {"ms": round(statistics.median(times) * 1e3, 3)}
            s.run("attention", f"{label}: {name}", fn, "attention")
        del q, k, v


def layout_rows(s: Suite, p: dict) -> None:
    """Our SDXL UNet, batch 4, checkpointing on: channels_last off, then on (what train.channels_last switches)."""
    side = p["resolution"] // 8
    b = s.args.batches[0]
    with torch.device(s.device):
        net = seeded_(unet_sdxl.UNet(unet_sdxl.PRESETS[p["unet"]])).train()
    net.gradient_checkpointing = True
    a = sdxl_inputs(net.cfg, b, side, s.device)[0]
    flops = fwd_flops(s, "SDXL", net, sdxl_inputs, side)
    for on in (False, True):
        def fn(on=on):
            fmt = torch.channels_last if on else torch.contiguous_format
            net.to(memory_format=fmt)
            opt = torch.optim.AdamW(net.parameters(), lr=1e-5, fused=s.cuda)  # its state in the weights' layout
            return train_fields(s, net, opt, (a[0].contiguous(memory_format=fmt), *a[1:]), b, flops, s.args.warmup)
        s.run("layout", f"SDXL ours b{b} ckpt=on channels_last={'on' if on else 'off'}", fn, "layout")


def compiled_rows(s: Suite, p: dict) -> None:
    """Training steps compiled, checkpointing on: ours as train.py compiles (SD3, then SDXL), then diffusers block by
    block (the same static-shape regions); the first step's seconds, compile included, in compile_s."""
    from torch import _dynamo

    b = s.args.compiled_batch
    for impl in ("ours", "diffusers"):
        for family in ("SD3", "SDXL"):
            make, inputs, res_key = FAMILIES[family]
            side = p[res_key] // 8

            def fn(impl=impl, family=family, make=make, inputs=inputs, side=side):
                _dynamo.reset()
                ours, ref = make(p, s.device)
                cfg, flops = ours.cfg, fwd_flops(s, family, ours, inputs, side)
                model = ours if impl == "ours" else ref
                del ours, ref
                free_cuda(s.device)
                model.train()
                set_ckpt(model, True)
                speed.compile_network(model, lambda m: None, regions=None if impl == "ours" else model.blocks())
                opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=s.cuda)
                a = inputs(cfg, b, side, s.device)[0 if impl == "ours" else 1]
                t0 = time.perf_counter()
                tt.train_step(model, opt, a, torch.randn_like(a[0]), s.autocast())
                if s.cuda:
                    torch.cuda.synchronize(s.device)
                compile_s = time.perf_counter() - t0
                out = train_fields(s, model, opt, a, b, flops, s.args.warmup)
                out["compile_s"] = round(compile_s, 1)
                return out
            s.run("compiled", f"{family} {impl} b{b} ckpt=on compiled", fn, f"compiled_{family.lower()}")
            _dynamo.reset()
            free_cuda(s.device)


# ---------------------------------------------------------------------------------------------------------------------

SECTIONS = ("pair", "vae", "memory", "attention", "layout", "compiled")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="full", choices=("full", "tiny"))
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--budget-s", type=float, default=390.0, help="rows that would end later are skipped")
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--families", default="SDXL,SD3")
    ap.add_argument("--batches", default="4", type=lambda v: [int(b) for b in v.split(",")])
    ap.add_argument("--compiled-batch", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args(argv)
    if args.device == "cpu":  # a dry run: one step per row; inductor on CPU needs minutes (bench/compile_check.py)
        args.warmup, args.steps = 0, 1
        args.sections = ",".join(x for x in args.sections.split(",") if x != "compiled")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    s = Suite(args)
    p = TINY if args.preset == "tiny" else FULL
    sections = [x for x in SECTIONS if x in args.sections.split(",")]
    print(f"gpu_suite: device {s.device_name}, preset {args.preset}, budget {args.budget_s:.0f} s, sections "
          f"{','.join(sections)}, out {args.out}", flush=True)
    if s.cuda and not torch.cuda.is_available():
        print("gpu_suite: CUDA is not available")
        return 1
    if s.cuda:  # as train.py runs: TF32 for fp32 matmuls / convolutions, cuDNN autotuning per shape
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        from diffusers import AutoencoderKL, SD3Transformer2DModel, UNet2DConditionModel  # noqa: F401  (before rows)
        # everything imported so far (diffusers, transformers: millions of objects) goes to gc's permanent
        # generation, so the collection between rows (free_cuda) scans only what the rows made: ~1-2 s less per row
        gc.freeze()
    torch.manual_seed(0)
    runners = {"pair": lambda: [pair_rows(s, p, f) for f in args.families.split(",")],
               "vae": lambda: (vae_rows(s, p), clip_row(s, p)), "memory": lambda: memory_rows(s, p),
               "attention": lambda: attention_rows(s, p), "layout": lambda: layout_rows(s, p),
               "compiled": lambda: compiled_rows(s, p)}
    for section in sections:
        runners[section]()
        free_cuda(s.device)
    bad = [r for r in s.rows if r["status"].startswith("error")]
    print(f"gpu_suite: {len(s.rows)} rows, {len(bad)} errors, {time.perf_counter() - s.t0:.0f} s; wrote "
          f"{os.path.join(args.out, 'gpu_suite.json')} and gpu_suite.md", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
