#!/usr/bin/env python
"""The GPU comparison suite: ours against diffusers / transformers, side by side, in one run.

    python bench/gpu_suite.py                               # one H100 / H200, about 8 minutes (--budget-s 420)
    python bench/gpu_suite.py --device cpu --preset tiny    # seconds; what CI runs (tests/test_gpu_suite.py)

Writes gpu_suite.json and gpu_suite.md to --out (default $OUT, else .), both rewritten after every row, so a run cut
short still leaves what it measured. Sections, in this order (each row OOM-safe: an out-of-memory error prints
"OOM" and the suite goes on; rows past --budget-s print "SKIP (budget)"):

  parity  full-size bf16 forward (fp32 on CPU), max |ours - ref| / max |ref|: SDXL UNet vs diffusers UNet2DConditionModel, SDXL VAE
          encoder vs diffusers AutoencoderKL, CLIP-L vs transformers CLIPTextModel, SD3-medium MMDiT vs diffusers
          SD3Transformer2DModel. The same random weights on both sides, converted by the converters the tests use
          (diffusers' convert_ldm_unet_checkpoint / convert_ldm_vae_checkpoint / convert_sd3_transformer_checkpoint_
          to_diffusers via tests/test_unet_sdxl.py, test_vae.py, test_mmdit.py helpers; CLIP-L keys load unchanged).
  train   training steps as bench/train_throughput.py times them (its train_step / time_steps: bf16 autocast, fp32
          weights, MSE, backward, fused AdamW, zero_grad; CUDA events, median) at 1024², batch 1 / 4 / 8, gradient
          checkpointing off / on, ours and diffusers with the same weights and optimizer; then --compiled-batch with
          regional torch.compile (ours: core/speed.compile_blocks on the UNet input/output blocks or the MMDiT
          joint blocks; diffusers: each of down_blocks / mid_block / up_blocks or transformer_blocks).
  vae     VAE encode images/s at 1024² (bf16, batch 4), ours vs diffusers.
  memory  peak torch.cuda.max_memory_allocated of 3 full fine-tune steps (1 on CPU, no peak there) of our SDXL UNet at batch 1 with
          checkpointing: AdamW (fp32 weights), Adafactor + fused backward (bf16 weights), Adafactor + fused backward +
          stochastic rounding (bf16); next to bench/train_memory.py's estimate of the same setting. LoRA: not in the
          trainer yet, so no row.
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

import torch
import torch.nn.functional as F
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import train_memory  # noqa: E402
import train_throughput as tt  # noqa: E402
from training import speed  # noqa: E402
from training.steppers import FusedBackward  # noqa: E402
from training.optim import Adafactor  # noqa: E402
from models import mmdit, text_encoders, unet_sdxl, vae as vae_mod  # noqa: E402

SIZE_EMB_DIM = 256  # sgm: 6 size / crop numbers, each a 256-d sinusoid
SD3_TOKENS = 154
TINY = {"resolution": 64, "sd3_resolution": 128, "unet": "tiny", "mmdit": "tiny", "vae": "tiny", "clip": "tiny_l"}
FULL = {"resolution": 1024, "sd3_resolution": 1024, "unet": "base", "mmdit": "sd3_medium", "vae": "sdxl",
        "clip": "clip_l"}


class Suite:
    """Rows, the time budget and the output files."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.rows, self.t0 = args, [], time.perf_counter()
        self.device = torch.device(args.device)
        # bf16 as trained on GPUs; fp32 on CPU (CPU bf16 convolutions are slow, and fp32 parity is the stricter check)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if self.device.type == "cuda" \
            else contextlib.nullcontext
        os.makedirs(args.out, exist_ok=True)

    def over_budget(self) -> bool:
        return time.perf_counter() - self.t0 > self.args.budget_s

    def run(self, section: str, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        """One row: fn() -> measured fields; OOM and budget handled; printed and saved at once."""
        row: dict[str, Any] = {"section": section, "name": name}
        if self.over_budget():
            row["status"] = "SKIP (budget)"
        else:
            oom = False
            try:
                row.update(fn())
                row.setdefault("status", "ok")
            except torch.cuda.OutOfMemoryError:
                oom = True  # released outside the except block, so the traceback's tensors go too
            except Exception as e:  # one broken row (e.g. a diffusers API change) must not end the suite
                row["status"] = f"error: {type(e).__name__}: {str(e)[:160]}"
            if oom:
                row["status"] = "OOM"
            free_cuda(self.device)
        row["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
        self.rows.append(row)
        print(f"[{row['elapsed_s']:6.1f}s] {section:7s} {name:46s} {fmt_fields(row)}", flush=True)
        self.save()
        return row

    def save(self) -> None:
        meta = {"device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
                "torch": torch.__version__, "preset": self.args.preset}
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
    keys = [k for k in row if k not in ("section", "name", "elapsed_s")]
    return " ".join(f"{k}={row[k]}" for k in keys)


def markdown(meta: dict, rows: list[dict]) -> str:
    out = [f"GPU suite on {meta['device']}, torch {meta['torch']}, preset {meta['preset']}", ""]
    for section, cols in (("parity", ("rel_err",)), ("train", ("img_s", "step_ms", "peak_gib")),
                          ("vae", ("img_s",)), ("memory", ("peak_gib", "estimate_gib"))):
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


def seeded_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Deterministic random weights with some spread (norm weights and biases not at their trivial init)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            scale = 0.02 if p.dim() > 1 else 0.1
            p.add_(torch.randn(p.shape, generator=g).to(p.device, p.dtype) * scale)
    return model


# ---------------------------------------------------------------------------------------------------------------------
# Model pairs: ours and the reference with the same weights


def sdxl_pair(p: dict, device: torch.device):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from tests.test_unet_sdxl import PREFIX, _diffusers_config

    cfg = unet_sdxl.PRESETS[p["unet"]]
    with torch.device(device):
        ours = unet_sdxl.UNet(cfg)
        dcfg = _diffusers_config(cfg)
        ref = UNet2DConditionModel(**dcfg)
    seeded_(ours)
    ref.load_state_dict(convert_ldm_unet_checkpoint({PREFIX + k: v for k, v in ours.state_dict().items()}, dcfg))
    return ours, DiffusersUNet(ref)


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


def sdxl_inputs(cfg, b: int, side: int, device: torch.device):
    """(ours args, diffusers args) for the same batch."""
    from tests.test_unet_sdxl import _sgm_y

    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(b, cfg.in_channels, side, side, generator=g).to(device)
    t = (torch.rand(b, generator=g) * 999).to(device)
    ctx = torch.randn(b, 77, cfg.context_dim, generator=g).to(device)
    pooled = torch.randn(b, cfg.adm_in_channels - 6 * SIZE_EMB_DIM, generator=g).to(device)
    time_ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]] * b, device=device)
    return (x, t, ctx, _sgm_y(pooled, time_ids)), (x, t, ctx, pooled, time_ids)


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


def sd3_pair(p: dict, device: torch.device):
    from tests.test_mmdit import _diffusers_model

    cfg = mmdit.PRESETS[p["mmdit"]]
    with torch.device(device):
        ours = mmdit.MMDiT(cfg)
        seeded_(ours)
        ref = _diffusers_model(cfg, ours.state_dict())
    return ours, DiffusersMMDiT(ref)


def sd3_inputs(cfg, b: int, side: int, device: torch.device):
    g = torch.Generator(device="cpu").manual_seed(2)
    x = torch.randn(b, cfg.in_channels, side, side, generator=g).to(device)
    t = (torch.rand(b, generator=g) * 1000).to(device)
    y = torch.randn(b, cfg.adm_in_channels, generator=g).to(device)
    ctx = torch.randn(b, SD3_TOKENS, cfg.context_in_dim, generator=g).to(device)
    return (x, t, y, ctx), (x, t, y, ctx)


def set_ckpt(model: nn.Module, on: bool) -> None:
    if hasattr(model, "set_ckpt"):
        model.set_ckpt(on)
    else:
        model.gradient_checkpointing = on


def our_blocks(model: nn.Module) -> list[nn.Module]:
    if isinstance(model, unet_sdxl.UNet):
        return [*model.input_blocks, *model.output_blocks]
    return list(model.joint_blocks)


# ---------------------------------------------------------------------------------------------------------------------
# Sections


def parity_forward(s: Suite, name: str, ours: nn.Module, ref: nn.Module, a_ours: tuple, a_ref: tuple) -> None:
    def fn():
        with torch.no_grad():
            return {"rel_err": rel_err(ours(*a_ours), ref(*a_ref))}
    s.run("parity", name, fn)


def train_rows(s: Suite, family: str, ours: nn.Module, ref: nn.Module, inputs: Callable, side: int) -> None:
    args, device = s.args, s.device
    for impl, model in (("ours", ours), ("diffusers", ref)):
        model.train().float()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=1e-2,
                                fused=device.type == "cuda")  # the same optimizer both sides
        plan = [(b, ck, False) for b in args.batches for ck in (False, True)]
        plan += [(args.compiled_batch, ck, True) for ck in (False, True)] if args.compile else []
        compiled = False
        for b, ck, comp in plan:
            def fn(b=b, ck=ck, comp=comp):
                nonlocal compiled
                if comp and not compiled:
                    t0 = time.perf_counter()
                    if impl == "ours":
                        speed.compile_blocks(model, our_blocks(model), lambda m: None)
                    else:
                        for blk in model.blocks():
                            blk.compile()
                    compiled = True
                    print(f"  compile set-up {time.perf_counter() - t0:.1f} s (the first steps compile)")
                set_ckpt(model, ck)
                a = inputs(b, side, device)[0 if impl == "ours" else 1]
                target = torch.randn_like(a[0])
                warm = args.warmup + (2 if comp else 0)
                times = tt.time_steps(lambda: tt.train_step(model, opt, a, target, s.autocast()), device, warm,
                                      args.steps)
                step = statistics.median(times)
                out = {"img_s": round(b / step, 2), "step_ms": round(step * 1e3, 1)}
                if device.type == "cuda":
                    out["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                return out
            s.run("train", f"{family} {impl} b{b} ckpt={'on' if ck else 'off'}{' compiled' if comp else ''}", fn)
            opt.zero_grad(set_to_none=True)
        del opt
        set_ckpt(model, False)
        model.eval()
        free_cuda(device)


def vae_rows(s: Suite, p: dict) -> None:
    from tests.test_vae import _diffusers_vae

    device, side = s.device, p["resolution"]
    with torch.device(device):
        ours = vae_mod.AutoencoderKL(vae_mod.PRESETS[p["vae"]]).eval()
    seeded_(ours)
    with torch.device(device):
        ref = _diffusers_vae(ours).eval()
    ours.to(s.dtype)
    ref.to(s.dtype)
    x = (torch.rand(4, 3, side, side, generator=torch.Generator().manual_seed(3)) * 2 - 1).to(device, s.dtype)
    parity_forward(s, "SDXL VAE encoder (posterior mean)", lambda im: ours.encode(im)[0],
                   lambda im: ref.encode(im).latent_dist.mean, (x[:1],), (x[:1],))
    for impl, fn in (("ours", lambda: ours.encode(x)), ("diffusers", lambda: ref.encode(x))):
        def row(fn=fn):
            with torch.no_grad():
                times = tt.time_steps(fn, device, s.args.warmup, s.args.steps)
            return {"img_s": round(x.shape[0] / statistics.median(times), 2)}
        s.run("vae", f"VAE encode {impl} b4", row)
    del ours, ref


def clip_row(s: Suite, p: dict) -> None:
    import transformers
    from tests.test_text_encoders import _hf_config, _input_ids, _load_into_hf

    device = s.device
    with torch.device(device):
        ours = text_encoders.CLIPTextModel(text_encoders.PRESETS[p["clip"]]).eval()
        seeded_(ours)
        ref = transformers.CLIPTextModel(_hf_config(ours.cfg)).eval()
    _load_into_hf(ref, ours.state_dict())
    ours.to(s.dtype)
    ref.to(s.dtype)
    ids = _input_ids().to(device)
    parity_forward(s, "CLIP-L hidden_states[-2]", lambda i: ours(i, layer=-2)[0],
                   lambda i: ref(input_ids=i, output_hidden_states=True).hidden_states[-2], (ids,), (ids,))
    del ours, ref


def memory_rows(s: Suite, p: dict) -> None:
    """Peak memory of our SDXL UNet full fine-tune at batch 1 with checkpointing, three optimizer settings."""
    device, side = s.device, p["resolution"] // 8
    cfg = unet_sdxl.PRESETS[p["unet"]]
    settings = [("AdamW, fp32 weights", "adamw", torch.float32, False, False),
                ("Adafactor + fused backward, bf16 weights", "adafactor", torch.bfloat16, True, False),
                ("Adafactor + fused backward + stochastic rounding, bf16", "adafactor", torch.bfloat16, True, True)]
    for label, opt_name, dtype, fused, sr in settings[: p.get("only")]:
        def fn(opt_name=opt_name, dtype=dtype, fused=fused, sr=sr):
            free_cuda(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            with torch.device(device):
                net = unet_sdxl.UNet(cfg).to(dtype).train()
            net.gradient_checkpointing = True
            params = list(net.parameters())
            opt = (torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda") if opt_name == "adamw"
                   else Adafactor(params, lr=1e-5))
            hooks = FusedBackward(opt, max_grad_norm=0.0, stochastic_rounding=sr, seed=0) if fused else None
            a = sdxl_inputs(cfg, 1, side, device)[0]
            target = torch.randn_like(a[0])
            for _ in range(max(1, s.args.steps - 2)):  # 3 steps on the GPU: the optimizer state exists after one
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
            if device.type == "cuda":
                row["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            if hooks is not None:
                hooks.remove()
            return row
        s.run("memory", f"SDXL full FT b1 ckpt: {label}", fn)


# ---------------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="full", choices=("full", "tiny"))
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--budget-s", type=float, default=420.0, help="rows starting later are skipped")
    ap.add_argument("--sections", default="parity,train,vae,memory")
    ap.add_argument("--batches", default="1,4,8", type=lambda v: [int(b) for b in v.split(",")])
    ap.add_argument("--compiled-batch", type=int, default=4)
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args(argv)
    if args.device == "cpu":  # a smoke run: inductor on CPU needs minutes of C++ builds; one step per row
        args.compile, args.warmup, args.steps = False, 0, 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    s = Suite(args)
    p = TINY if args.preset == "tiny" else FULL
    sections = set(args.sections.split(","))
    print(f"gpu_suite: device {s.device}, preset {args.preset}, budget {args.budget_s:.0f} s, out {args.out}")
    if s.device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_suite: CUDA is not available")
        return 1
    if s.device.type == "cuda":  # a process of its own (CI calls main() inside pytest: no global gc change there)
        if sections & {"parity", "train", "vae"}:  # the references, imported before any row
            from diffusers import AutoencoderKL, SD3Transformer2DModel, UNet2DConditionModel  # noqa: F401
        # everything imported so far (diffusers, transformers: millions of objects) goes to gc's permanent
        # generation, so the collection between rows (free_cuda) scans only what the rows made: ~1-2 s less per row
        gc.freeze()
    torch.manual_seed(0)
    for family, make, inputs, res in (("SDXL UNet", sdxl_pair, sdxl_inputs, p["resolution"]),
                                      ("SD3 MMDiT", sd3_pair, sd3_inputs, p["sd3_resolution"])):
        if not sections & {"parity", "train"} or s.over_budget():
            break
        ours, ref = make(p, s.device)
        side = res // 8
        mk = lambda b, sd, dev, _cfg=ours.cfg, _f=inputs: _f(_cfg, b, sd, dev)  # noqa: E731
        if "parity" in sections:
            ours.eval().to(s.dtype)
            ref.eval().to(s.dtype)
            a, r = mk(1, side, s.device)
            half = lambda args: tuple(t.to(s.dtype) if t.dim() > 1 else t for t in args)  # noqa: E731 (t stays fp32)
            parity_forward(s, f"{family} forward {str(s.dtype)[6:]} {res}px", ours, ref, half(a), half(r))
        if "train" in sections:
            train_rows(s, family, ours, ref, mk, side)
        del ours, ref
        free_cuda(s.device)
    if "parity" in sections:
        clip_row(s, p)
    if "vae" in sections or "parity" in sections:
        vae_rows(s, p)
    free_cuda(s.device)
    if "memory" in sections:
        memory_rows(s, p)
    bad = [r for r in s.rows if r["status"].startswith("error")]
    print(f"gpu_suite: {len(s.rows)} rows, {len(bad)} errors; wrote {os.path.join(args.out, 'gpu_suite.json')} and "
          "gpu_suite.md")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
